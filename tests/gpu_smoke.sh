# Every script on DEVICE=cuda DTYPE=bf16 with a tiny random chat model (no download): OK or FAIL per command.
# On a GPU machine: bash tests/gpu_smoke.sh  (PY=python3 by default; not part of make test, which has no GPU)
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
$PY - <<'PY'
import sys; sys.path[:0] = ['tests', '.']
from pathlib import Path
from conftest import make_hf_model, save_hf_model, make_bpe_tokenizer
hf = make_hf_model("llama", vocab_size=400, bos_token_id=1, eos_token_id=2, pad_token_id=2)
make_bpe_tokenizer(save_hf_model(hf, Path("/tmp/tiny")))
PY
C="--model=/tmp/tiny --device=cuda --dtype=bf16 --out=/tmp/o"
try() { if timeout 300 "$@" > /tmp/log.txt 2>&1; then echo "OK   $*"; else echo "FAIL $*"; tail -15 /tmp/log.txt; fi; }
try $PY -m studies.baseline $C
try $PY -m evaluate $C --task=opinion --n=10
try $PY -m evaluate $C --task=are_you_sure --n=6 --max_new_tokens=6
try $PY -m studies.steering vectors $C --n=24
V=$(ls /tmp/o/vectors-*[0-9].safetensors | tail -1)
try $PY -m studies.steering steer --vector=$V $C --n_test=8 --layers=1 --mults=-1,1 --n_neutral=4 --n_capability=4
try $PY -m studies.steering ablate --vector=$V $C --n_test=8 --layers=1 --n_neutral=4 --n_capability=4
try $PY -m studies.steering demo $C
try $PY -m studies.geometry predict --vector=$V $C --n=24 --n_ood=8 --n_boot=50
try $PY -m studies.geometry consistency $C --n=24
try $PY -m studies.geometry geometry $C --n=24
try $PY -m studies.tactics --data=builtin --n=6 --out=/tmp/o
try $PY -m studies.tactics --data=builtin --n=2 --generator=model:/tmp/tiny --device=cuda --dtype=bf16 --max_new_tokens=8 --out=/tmp/o --run=gen
S=$(ls /tmp/o/tactics-*.sft-train.jsonl | head -1); D=$(ls /tmp/o/tactics-*.dpo-train.jsonl | head -1)
try $PY -m train --mode=sft --data=$S $C --max_steps=3 --run=sft
try $PY -m train --mode=dpo --data=$D $C --max_steps=3 --run=dpo --grad_checkpointing=true
try $PY -m studies.finetune recovery --quick=true $C
# Logits on CUDA in fp32 for left-padded batches (the masked SDPA path, whose key heads are repeated for GQA),
# ours against transformers, for GQA groups of 4, 2 and 1.
try $PY - <<'PY'
import sys, torch
sys.path[:0] = ['tests', '.']
from pathlib import Path
from conftest import make_hf_model, save_hf_model
from model import load, pad_left
torch.backends.cuda.matmul.allow_tf32 = False
for nkv in (1, 2, 4):
    hf = make_hf_model("llama", num_key_value_heads=nkv)
    ours = load(save_hf_model(hf, Path(f"/tmp/gqa{nkv}")), dtype="fp32", device="cuda")
    ids, mask = pad_left([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19]], "cuda")
    with torch.no_grad():
        a = ours(ids, attention_mask=mask)
        b = hf.cuda()(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    err = ((a - b).abs() * mask[..., None]).max().item()
    assert err < 1e-4, f"{nkv} key heads: logits differ from transformers by {err}"
PY
# Every other family: a tiny chat model of each in its own chat format, through evaluation, steering and training.
for fam in qwen2:qwen2_5 qwen3:qwen3_nothink gemma2:gemma gemma3_text:gemma phi3:phi3 mpt:plain; do
  mt=${fam%%:*}; fmt=${fam##*:}
  $PY - "$mt" <<'PY'
import sys; sys.path[:0] = ['tests', '.']
from pathlib import Path
from conftest import make_hf_model, save_hf_model, make_bpe_tokenizer
from test_family_scripts import CHATS
mt = sys.argv[1]
hf = make_hf_model(mt, vocab_size=400, bos_token_id=1, eos_token_id=2, pad_token_id=2)
make_bpe_tokenizer(save_hf_model(hf, Path(f"/tmp/tiny-{mt}")), special_tokens=CHATS[mt][1])
PY
  F="--model=/tmp/tiny-$mt --device=cuda --dtype=bf16 --out=/tmp/o-$mt --chat_format=$fmt"
  try $PY -m evaluate $F --task=opinion --n=10
  try $PY -m evaluate $F --task=are_you_sure --n=4 --max_new_tokens=6
  try $PY -m studies.steering vectors $F --n=24
  V=$(ls /tmp/o-$mt/vectors-*[0-9].safetensors | tail -1)
  try $PY -m studies.steering steer --vector=$V $F --n_test=8 --layers=1 --mults=-1,1 --n_neutral=4 --n_capability=4
  try $PY -m train --mode=sft --data=$S $F --max_steps=3 --run=sft
  try $PY -m train --mode=dpo --data=$D $F --max_steps=3 --run=dpo --grad_checkpointing=true
done
# The 7B-class shapes of the new families, random weights (make bench GPU=1 times Llama-2-7B's).
try $PY -m bench.gpu7b --shape=qwen3-8b --rounds=3 --compile=false --out=/tmp/o
try $PY -m bench.gpu7b --shape=gemma2-9b --rounds=3 --compile=false --out=/tmp/o
