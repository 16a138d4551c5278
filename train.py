"""LoRA fine-tuning: SFT and DPO over the adapters only, resumable, with results in the lab's format.

    python train.py --mode=sft --data=sft.jsonl --eval_data=sft_eval.jsonl --run=sft-anti-syco
    python train.py --mode=dpo --data=pairs.jsonl --init_adapter=out/sft-anti-syco/adapter.safetensors --run=dpo
    python train.py --mode=sft --data=sft.jsonl --run=sft-anti-syco --resume=true       # continue after a kill
    torchrun --standalone --nproc_per_node 4 -- train.py --dist=fsdp ...  # 4 processes, the same steps as one

Data, one JSON object per line (other keys, e.g. provenance, are allowed and kept in the example's "record"):
    SFT  {"id": "...", "messages": [{"role": "user", "content": "..."}, ...], "response": "..."}
    DPO  {"id": "...", "messages": [...], "chosen": "...", "rejected": "..."}
The conversation is written in the model's chat format; the loss reads only the response's tokens, including the
end-of-turn marker the format writes after it (so the model also learns where to stop). DPO (Rafailov et al. 2023),
sigmoid form, with the reference = the same model as training starts, no second copy in memory:
    loss = -log sigmoid(beta * ((log pi(y_w|x) - log pi(y_l|x)) - (log ref(y_w|x) - log ref(y_l|x))))
The reference log-probs are read once before the first step. With fresh adapters (B = 0) that is the model with
its adapters off; with --init_adapter (SFT, then DPO) it is the SFT model, which the recipe anchors DPO to.
A run writes OUT/<run>/{config.json, ckpt.safetensors (adapter, AdamW, schedule, RNG, log: one file, no pickle,
replaced atomically every save_every steps), adapter.safetensors, peft/} and OUT/<run>-<time>.json (+ .png curve).

Under torchrun each micro-batch is shared among the processes (--dist=ddp: a whole model each; --dist=fsdp: each
holds 1/N of every block), and each one's loss is weighted by its share of the micro-batch's tokens (SFT) or pairs
(DPO), so N processes take the steps one process takes with the same batch_size and grad_accum. Rank 0 writes.
"""
import json
import math
import random
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import data
from lab import dist
from lab.args import Count, ModelOptions, Positive, parse_args, user_errors
from lab.report import plot_curve
from lab.results import check_same_inputs, input_hashes, provenance, write_atomic, write_result
from lab.stats import mean_metric, proportion_metric
from lora import add_lora, export_peft, load_adapter, lora_disabled, lora_parameters, lora_state_dict, save_adapter
from model import pad_right, read_safetensors
from runtime.session import open_session

DEFAULT_LR = {"sft": 2e-4, "dpo": 5e-5}   # DPO moves away from a reference it should stay near: a smaller step
FIELDS = {"sft": ("response",), "dpo": ("chosen", "rejected")}
# Settings a resumed run may change (prepack and compile never apply to training).
RESUMABLE_CHANGES = {"resume", "save_every", "eval_every", "dist", "dist_timeout", "prepack", "compile"}


@dataclass
class TrainConfig(ModelOptions):
    """The model options (dtype: of the base weights; adapters and AdamW state are fp32 whatever it is), then
    training's own."""
    prepack: bool = False      # the model is trained: no packed copy of its weights (runtime/cpu.py is for inference)
    compile: bool = False      # nor frozen ones
    mode: str = "sft"          # sft (imitate `response`) or dpo (prefer `chosen` over `rejected`)
    data: str = ""             # training JSONL (format: the docstring)
    eval_data: str = ""        # held-out JSONL of the same format; "" = no evaluation
    r: Positive = 16           # LoRA rank
    alpha: float = 32.0        # LoRA scale alpha / r
    dropout: float = 0.1       # LoRA dropout on the adapter's input
    targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    lr: float = 0.0            # peak learning rate; 0 = the mode's default (2e-4 SFT, 5e-5 DPO)
    epochs: Count = 1
    max_steps: Count = 0       # optimizer steps; 0 = as many as `epochs` passes give (the last partial step dropped)
    batch_size: Positive = 4   # examples (DPO: pairs) per micro-batch
    grad_accum: Positive = 1   # micro-batches per optimizer step
    warmup_steps: Count = 10   # linear warmup, then cosine decay to 0 at the last step
    clip: float = 1.0          # gradient-norm clip; 0 = none (the norm is logged either way)
    beta: float = 0.1          # DPO: how strongly the policy is tied to the reference
    bf16: bool = False         # bf16 autocast (the weights keep their dtype)
    grad_checkpointing: bool = False   # recompute each block in backward: less activation memory, more time
    max_len: Positive = 1024   # prompt + response tokens of one example; a longer one is bad data
    shuffle: bool = True       # a seeded new order every epoch; false: the file's order (rows meant to share a
                               # batch, such as contrast groups, stay together)
    eval_every: Positive = 50  # optimizer steps between held-out evaluations (also one at the start and the end)
    save_every: Positive = 100 # optimizer steps between checkpoints (also one at the end)
    skip_bad: bool = False     # skip malformed data lines (counted in the results) instead of stopping
    seed: int = 0
    out: str = "out"
    run: str = ""              # "" = the mode; OUT/<run>/ must not exist yet, unless --resume=true
    init_adapter: str = ""     # start from a save_adapter file (its r, alpha, dropout); DPO's reference = that model
    resume: bool = False       # continue OUT/<run>/ from its last checkpoint
    dist: str = "ddp"          # under torchrun: ddp (a whole model per process) or fsdp (each holds 1/N of each block)
    dist_timeout: float = 600.0   # under torchrun: seconds a rank waits for the others before the run stops


# ------------------------------------------------------------------------------------------------------- data
def encode(tok, fmt, messages, response: str, max_len: int) -> tuple[list[int], int]:
    """(ids of prompt + response, number of prompt ids). The response's ids are whatever the chat format writes for
    the assistant turn after the prompt: the text and the end-of-turn marker (ChatML: "<|im_end|>\\n")."""
    try:
        prompt = tok.encode(fmt(messages))                                  # ends with the assistant header
        full = tok.encode(fmt(messages + [{"role": "assistant", "content": response}], add_generation_prompt=False))
    except ValueError as e:                                                 # the format's check of the conversation
        raise data.BadRecord(str(e)) from None
    if full[:len(prompt)] != prompt:
        raise data.BadRecord("the prompt's tokens are not a prefix of prompt + response's (the tokenizer merges across "
                        "the assistant header), so the response tokens cannot be told apart")
    if len(full) > max_len:
        raise data.BadRecord(f"prompt + response is {len(full)} tokens, more than max_len={max_len}")
    return full, len(prompt)


def read_examples(path, mode: str, tok, fmt, max_len: int, skip_bad: bool = False) -> data.Items:
    """A training JSONL -> checked, tokenized examples {"id", "record", <field>: (ids, n_prompt) for each of
    FIELDS[mode]}. A bad line raises ValueError("path:line: why"), or with skip_bad lands in `.skipped`."""
    def make(r, i):
        messages = data.field(r, "messages", list)       # roles and contents are then checked by the chat format
        if not all(isinstance(m, dict) for m in messages) or messages[-1].get("role") != "user":
            raise data.BadRecord("messages must be {role, content} objects, the last message the user's "
                                 "(it is answered)")
        texts = {k: data.field(r, k) for k in FIELDS[mode]}
        if not all(text.strip() for text in texts.values()):
            raise data.BadRecord(f"an empty {' or '.join(FIELDS[mode])}")
        if mode == "dpo" and texts["chosen"] == texts["rejected"]:
            raise data.BadRecord("chosen == rejected: the pair teaches nothing")
        return {"id": r.get("id", f"{Path(path).stem}/{i}"), "record": r,
                **{k: encode(tok, fmt, messages, text, max_len) for k, text in texts.items()}}
    return data.read_jsonl(path, make, skip_bad)


def collate(seqs: list[tuple[list[int], int]], pad_id: int, device) -> dict:
    """[(ids, n_prompt)] -> right-padded input_ids, attention_mask, loss_mask, each (B, T). loss_mask is 1 on the
    response tokens: the tokens the loss asks the model to predict (each from the positions before it)."""
    ids, attn = pad_right([s for s, _ in seqs], device, pad_id)
    loss_mask = torch.zeros_like(ids)
    for b, (s, n) in enumerate(seqs):
        loss_mask[b, n:len(s)] = 1
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask}


def batch_of(examples, mode: str, pad_id: int, device) -> dict:
    """SFT: one row per example. DPO: the B chosen rows, then the B rejected rows (one forward for both), and
    their reference log-probs (2B,) when attach_reference has set them."""
    batch = collate([ex[k] for k in FIELDS[mode] for ex in examples], pad_id, device)
    if mode == "dpo" and all("ref" in ex for ex in examples):
        batch["ref"] = torch.tensor([ex["ref"][j] for j in (0, 1) for ex in examples], device=device)
    return batch


# ------------------------------------------------------------------------------------------------------ losses
class TargetLogps(torch.autograd.Function):
    """log softmax(h W^T)[target] for rows of h, in chunks of rows, keeping no (N, V) logits for backward.

    The usual way (logits, fp32 log-softmax, gather) holds several (N, V) tensors at once, the largest memory of a
    LoRA step. Here each chunk's gradient d logp / d h = (onehot - softmax) W is made at once in the forward (the
    same matmul backward would do), so the step keeps only (N, D). The frozen W gets no gradient.
    """

    @staticmethod
    def forward(ctx, h, w, targets, chunk: int):            # h (N, D), w (V, D), targets (N,) -> (N,) fp32
        out = torch.empty(len(h), dtype=torch.float32, device=h.device)
        grad = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        for i in range(0, len(h), chunk):
            z = F.linear(h[i: i + chunk], w).float()                   # (n, V): logits as the model would give
            t = targets[i: i + chunk, None]
            lse = z.logsumexp(-1, keepdim=True)
            out[i: i + chunk] = (z.gather(-1, t) - lse).squeeze(-1)
            if grad is not None:
                p = z.sub_(lse).exp_()                                 # softmax, in z's memory
                p.scatter_add_(-1, t, torch.full_like(t, -1, dtype=p.dtype))   # softmax - onehot
                grad[i: i + chunk] = -(p.to(w.dtype) @ w)
        ctx.save_for_backward(grad)
        return out

    @staticmethod
    def backward(ctx, g):                                    # g (N,)
        (grad,) = ctx.saved_tensors
        return g[:, None].to(grad.dtype) * grad, None, None, None


def token_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of each scored token, 0 elsewhere; the mask), both (B, T-1): position t predicts token t+1.
    Only the scored positions are projected onto the vocabulary (TargetLogps; a trained lm_head the plain way)."""
    h = model(batch["input_ids"], attention_mask=batch["attention_mask"], return_hidden=True)   # (B, T, D)
    mask = batch["loss_mask"][:, 1:].bool()                                                      # (B, T-1)
    core = getattr(model, "module", model)
    w = core.lm_head.weight                                                                     # (V, D)
    h, targets = h[:, :-1][mask], batch["input_ids"][:, 1:][mask]                               # (N, D), (N,)
    cap = getattr(getattr(core, "config", None), "final_softcap", None)   # Gemma-2 caps its logits: not in chunks
    if w.requires_grad or cap is not None:
        z = F.linear(h, w) if cap is None else core.logits(h)
        lp = z.float().log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    else:   # chunks of about 8M logits (32 MB in fp32)
        lp = TargetLogps.apply(h, w, targets, max(1, 2**23 // w.shape[0]))
    out = torch.zeros(mask.shape, dtype=torch.float32, device=h.device).masked_scatter(mask, lp)
    return out, mask.float()


def sequence_logps(model, batch) -> torch.Tensor:
    """(B,) summed log-probabilities of each row's response tokens."""
    return token_logps(model, batch)[0].sum(-1)


def sft_loss(model, batch) -> torch.Tensor:
    """Mean negative log-likelihood per response token of the batch (prompt tokens are context, never targets)."""
    lp, mask = token_logps(model, batch)
    return -lp.sum() / mask.sum()


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """The sigmoid DPO loss (mean over pairs) and the implicit rewards beta * (log pi - log ref), each (B,).
    chosen - rejected = beta * ((pi_w - pi_l) - (ref_w - ref_l)): the formula at the top of this file, rearranged."""
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    return -F.logsigmoid(chosen - rejected).mean(), chosen.detach(), rejected.detach()


def dpo_step(model, batch, beta: float):
    """dpo_loss of a batch_of() DPO batch. The reference: the batch's precomputed "ref" log-probs, else the model
    with its adapters off (no second copy)."""
    policy = sequence_logps(model, batch)                                 # (2B,): chosen rows, then rejected
    ref = batch.get("ref")
    if ref is None:
        with torch.no_grad(), lora_disabled(model):
            ref = sequence_logps(model, batch)
    B = policy.shape[0] // 2
    return dpo_loss(policy[:B], policy[B:], ref[:B], ref[B:], beta)


@contextmanager
def grad_checkpointing(model, enabled: bool = True):
    """Recompute each block's activations in backward instead of keeping them, by wrapping block.forward from here
    (model.py stays unaware). Hooks run in the recomputation too, so a hook must be deterministic. Undone on exit."""
    blocks = list(model.layers) if enabled else []
    for block in blocks:
        def forward(*args, _inner=block.forward, **kw):
            if not torch.is_grad_enabled():          # the DPO reference and evaluation keep nothing anyway
                return _inner(*args, **kw)
            # non-reentrant: takes non-tensor arguments ("causal", None); the RNG is replayed, so dropout repeats
            return checkpoint(_inner, *args, use_reentrant=False, **kw)
        block.forward = forward                          # an instance attribute shadows Block.forward
    try:
        yield model
    finally:
        for block in blocks:
            del block.forward


def per_batch(fn, examples, size: int) -> list:
    """[fn(batch) for each batch of `size` examples, in order]. Under torchrun the batches are shared among the ranks
    (the same batches as one process: the same numbers) and every rank gets every result. Every rank makes the same
    number of calls, since under FSDP a forward is a collective: one left without a batch repeats the first."""
    batches = [examples[b: b + size] for b in range(0, len(examples), size)]
    mine = dist.shard(batches)
    out = [fn(b) for b in mine]
    for _ in range(-(-len(batches) // dist.world()) - len(mine)):
        fn(batches[0])
    return dist.gather(out, everyone=True)


@torch.no_grad()
def evaluate(model, examples, cfg, pad_id: int) -> tuple[dict, list[dict]]:
    """Held-out evaluation: ({eval_loss[, eval_reward_acc, eval_margin]}, one row per example)."""
    dev = model.model.embed_tokens.weight.device
    model.eval()                                         # no dropout; train() puts the model back in train mode

    def rows_of(exs):
        batch = batch_of(exs, cfg.mode, pad_id, dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            if cfg.mode == "sft":
                lp, mask = token_logps(model, batch)
                return [{"loss": v} for v in (-lp.sum(-1) / mask.sum(-1)).tolist()]   # per example, per token
            _, c, r = dpo_step(model, batch, cfg.beta)
            return [{"loss": -F.logsigmoid(ci - ri).item(), "reward_acc": bool(ci > ri), "margin": (ci - ri).item()}
                    for ci, ri in zip(c, r)]
    rows = [row for rows in per_batch(rows_of, examples, cfg.batch_size) for row in rows]
    model.train()
    return {f"eval_{k}": float(np.mean([r[k] for r in rows])) for k in rows[0]}, rows


@torch.no_grad()
def attach_reference(model, examples, cfg, pad_id: int):
    """ex["ref"] = (log ref(chosen), log ref(rejected)) from the model as it is now (eval mode: no dropout)."""
    dev = model.model.embed_tokens.weight.device
    model.eval()

    def refs_of(exs):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            lp = sequence_logps(model, batch_of([{k: ex[k] for k in FIELDS["dpo"]} for ex in exs], "dpo", pad_id,
                                                dev)).tolist()
        return [(lp[i], lp[len(exs) + i]) for i in range(len(exs))]
    refs = [ref for refs in per_batch(refs_of, examples, cfg.batch_size) for ref in refs]
    for ex, ref in zip(examples, refs):
        ex["ref"] = ref
    model.train()


# ------------------------------------------------------------------------------------------------- checkpoints
def lr_lambda(warmup: int, total: int):
    """Multiplier of the peak lr at step s (0-based): linear warmup, then cosine decay towards 0 at step `total`."""
    return lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(
        math.pi * (s - warmup) / max(1, total - warmup)))


def rng_state(cuda: bool) -> dict:
    """This process's torch generators: the CPU's, and each visible card's."""
    return {"torch": torch.get_rng_state(), **({f"cuda.{i}": g for i, g in enumerate(torch.cuda.get_rng_state_all())}
                                              if cuda else {})}


def save_checkpoint(path: Path, model, opt, sched, step: int, rows: list):
    """One safetensors file: adapter, AdamW moments and RNG states as tensors; the rest as JSON metadata.
    Under torchrun every rank calls it (FSDP's shards are gathered, each rank's RNG too) and rank 0 writes."""
    from safetensors.torch import save
    tensors = {f"adapter.{k}": dist.full(v).float().contiguous().cpu() for k, v in lora_state_dict(model).items()}
    opt_state = opt.state_dict()                     # {"state": {i: {step, exp_avg, exp_avg_sq}}, "param_groups"}
    for i, state in sorted(opt_state["state"].items()):   # sorted: FSDP's gathers go in the same order on every rank
        tensors |= {f"opt.{i}.{k}": dist.full(v).contiguous().cpu() for k, v in sorted(state.items())}
    # every rank's generators, since each drew its own dropout masks: rank 0's as rng.*, rank r's as rng.rank<r>.*
    for r, state in enumerate(dist.gather([rng_state(model.model.embed_tokens.weight.is_cuda)]) or []):
        tensors |= {f"rng.{f'rank{r}.' if r else ''}{k}": v for k, v in state.items()}
    if not dist.is_main():
        return
    np_rng = np.random.get_state()
    meta = {"step": step, "param_groups": opt_state["param_groups"], "scheduler": sched.state_dict(),
            "rng_python": random.getstate(), "rng_numpy": [np_rng[0], np_rng[1].tolist(), *np_rng[2:]], "rows": rows}
    write_atomic(path, save(tensors, metadata={"state": json.dumps(meta)}))


def load_checkpoint(path: Path, model, opt, sched) -> tuple[int, list]:
    """Restore everything save_checkpoint wrote; returns (step, log rows so far). Under torchrun rank 0 reads the
    file and sends it to the others (which need not see its disk); each rank takes its own shards and generators."""
    raw = dist.broadcast(Path(path).read_bytes() if dist.is_main() else None)
    t, meta = read_safetensors(raw, name=str(path))
    meta = json.loads(meta["state"])
    with torch.no_grad():
        for k, v in lora_state_dict(model).items():      # detached views of the adapter parameters
            v.copy_(dist.like(t[f"adapter.{k}"], v))
    params = [p for group in opt.param_groups for p in group["params"]]     # the optimizer's state i is params[i]'s
    state = {}
    for k, v in t.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v if name == "step" else dist.like(v, params[int(i)])
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    sched.load_state_dict(meta["scheduler"])
    own = f"rng.rank{dist.rank()}."
    pre = own if own + "torch" in t else "rng."      # rank 0, or a rank the interrupted run did not have: rank 0's
    torch.set_rng_state(t[pre + "torch"])
    if pre + "cuda.0" in t:
        torch.cuda.set_rng_state_all([t[f"{pre}cuda.{i}"] for i in range(sum(k.startswith(pre + "cuda.") for k in t))])
    version, mt, gauss = meta["rng_python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, *rest = meta["rng_numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    return meta["step"], meta["rows"]


# -------------------------------------------------------------------------------------------------------- loop
def check_run_dir(cfg, run_dir: Path, now: dict, inputs: dict):
    """The error starting or resuming OUT/<run>/ runs into (a finished or taken run, other settings, an input whose
    contents changed), or None."""
    if run_dir.exists() and not cfg.resume:
        return FileExistsError(f"{run_dir} exists and a run never overwrites an earlier one: pass --resume=true to "
                               "continue it, or choose another --run")
    if cfg.resume:
        if (run_dir / "adapter.safetensors").exists() or not (run_dir / "config.json").exists():
            return FileNotFoundError(f"--resume: {run_dir} is finished already, or holds no run to continue")
        saved = json.loads((run_dir / "config.json").read_text())
        changed = {k: (saved.get(k), v) for k, v in now.items() if k not in RESUMABLE_CHANGES and saved.get(k) != v}
        if changed:
            return ValueError(f"--resume: {run_dir} was started with other settings (was, now): {changed}")
        saved_inputs = run_dir / "inputs.json"
        try:
            check_same_inputs(f"--resume: {run_dir}", json.loads(saved_inputs.read_text())
                              if saved_inputs.exists() else None, inputs)
        except ValueError as e:
            return e
    return None


def train(cfg: TrainConfig, model, tok, fmt, callback=None) -> tuple[dict, Path]:
    """Fine-tune `model` in place (adapters added, or read from cfg.init_adapter) and write the run's files.
    callback(step, row) runs after each optimizer step (and its checkpoint). Returns (result, results path).
    Under torchrun (dist.init first) every rank calls it and gets the result; rank 0 writes the files. With
    --dist=fsdp the model is left sharded."""
    cfg = replace(cfg, lr=cfg.lr or DEFAULT_LR.get(cfg.mode, 0), run=cfg.run or cfg.mode)
    if cfg.mode not in FIELDS or min(cfg.batch_size, cfg.grad_accum, cfg.max_steps or cfg.epochs) < 1 or not cfg.data:
        raise ValueError("train needs --mode=sft|dpo, --data=PATH, and batch_size, grad_accum, epochs at least 1")
    if cfg.dist not in ("ddp", "fsdp"):
        raise ValueError(f"--dist={cfg.dist!r}: ddp or fsdp")
    run_dir, now = Path(cfg.out) / cfg.run, asdict(cfg)
    # What the run reads, hashed: a resumed run must read the very same (the config holds paths, not contents).
    model_dir = getattr(model, "name_or_path", cfg.model)
    inputs = input_hashes(model_dir, [Path(p) for p in (cfg.data, cfg.eval_data, cfg.init_adapter) if p]) \
        if dist.is_main() else None
    problem = dist.broadcast(check_run_dir(cfg, run_dir, now, inputs) if dist.is_main() else None)   # rank 0 owns OUT
    if problem:
        raise problem
    pad_id = tok.pad_id or 0
    train_set = read_examples(cfg.data, cfg.mode, tok, fmt, cfg.max_len, cfg.skip_bad)
    eval_set = read_examples(cfg.eval_data, cfg.mode, tok, fmt, cfg.max_len, cfg.skip_bad) if cfg.eval_data else []
    skipped = train_set.skipped + (eval_set.skipped if cfg.eval_data else [])
    if not train_set:
        raise ValueError(f"{cfg.data}: every line was bad ({len(train_set.skipped)} skipped)")
    N, bs, ga = len(train_set), cfg.batch_size, cfg.grad_accum
    per_epoch = math.ceil(N / bs)                                          # micro-batches per pass over the data
    total = cfg.max_steps or max(1, cfg.epochs * per_epoch // ga)

    random.seed(cfg.seed)                                 # seeded before add_lora: its A init is random
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)                           # every device's generator (every rank's alike)
    init_check = None
    if cfg.init_adapter:
        init_check = load_adapter(model, cfg.init_adapter, cfg.cross_model).get("model_check")
    else:
        add_lora(model, targets=cfg.targets.split(","), r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout)
    net = dist.wrap(model, cfg.dist)      # what the training forward calls: DDP's wrapper, or the model (FSDP: itself)
    dev = model.model.embed_tokens.weight.device                          # after wrap: FSDP moves shards to theirs
    if cfg.mode == "dpo":        # the reference: the starting model, before any step (also when resuming)
        attach_reference(model, list(train_set) + list(eval_set), cfg, pad_id)
    params = lora_parameters(model)                       # the base weights are frozen (FSDP: this rank's shards)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = LambdaLR(opt, lr_lambda(cfg.warmup_steps, total))
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=cfg.resume)                   # claims the name (fails if taken)
        if not cfg.resume:
            write_atomic(run_dir / "inputs.json", json.dumps(inputs, indent=1).encode())
            write_atomic(run_dir / "config.json", json.dumps(now, indent=1).encode())
    ckpt, step, rows = run_dir / "ckpt.safetensors", 0, []
    if dist.broadcast(ckpt.exists() if dist.is_main() else None):
        step, rows = load_checkpoint(ckpt, model, opt, sched)
        print(f"resuming {run_dir} at step {step} of {total}")

    def micro_batch(k):        # the run's k-th micro-batch, all of it. The data order is a seeded permutation per
        epoch, j = divmod(k, per_epoch)     # epoch, so the step number alone says what comes next: nothing to save
        order = np.random.default_rng([cfg.seed, epoch]).permutation(N) if cfg.shuffle else np.arange(N)
        return [train_set[i] for i in order[j * bs: (j + 1) * bs]]

    was_training, t0 = model.training, time.perf_counter()
    model.train()                                                          # LoRA dropout on
    if step == 0 and eval_set:                                             # the held-out starting point
        rows.append({"step": 0, **evaluate(model, eval_set, cfg, pad_id)[0]})
    with grad_checkpointing(model, cfg.grad_checkpointing), \
            tqdm(total=total, initial=step, desc=cfg.run, disable=None if dist.is_main() else True) as bar:
        while step < total:
            stats = {}
            for k in range(step * ga, (step + 1) * ga):
                exs = micro_batch(k)
                mine = dist.shard(exs)          # this rank's share; an empty one still joins DDP/FSDP's collectives
                batch = batch_of(mine or exs[:1], cfg.mode, pad_id, dev)
                # sft_loss is the mean over this rank's response tokens, dpo_step's over its pairs: weighted by their
                # share of the micro-batch's, the ranks' losses add up to the whole micro-batch's (one process: share
                # is exactly 1, the numbers unchanged)
                n = (batch["loss_mask"][:, 1:].sum().item() if cfg.mode == "sft" else len(mine)) if mine else 0
                share = n / dist.all_sum([n])[0]
                last = k == (step + 1) * ga - 1
                with net.no_sync() if net is not model and not last else nullcontext():   # DDP: sync once per step
                    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                        if cfg.mode == "sft":
                            loss, extra = sft_loss(net, batch), {}
                        else:
                            loss, c, r = dpo_step(net, batch, cfg.beta)
                            extra = {"reward_acc": (c > r).float().mean().item(), "margin": (c - r).mean().item(),
                                     "chosen_reward": c.mean().item(), "rejected_reward": r.mean().item()}
                    # gradients add up: the step follows the mean of its micro-batches. DDP and FSDP average the
                    # ranks' gradients, so * world makes that the sum of their parts.
                    (loss * (share * dist.world()) / ga).backward()
                for key, v in {"loss": loss.item(), **extra}.items():
                    stats[key] = stats.get(key, 0.0) + v * share / ga
            stats = dict(zip(stats, dist.all_sum(list(stats.values()))))       # the whole step's, on every rank
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip > 0 else math.inf)
            row = {"step": step + 1, "epoch": round((step + 1) * ga / per_epoch, 3), "lr": sched.get_last_lr()[0],
                   "grad_norm": dist.full(norm).item(), **stats}
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if eval_set and cfg.eval_every and step % cfg.eval_every == 0 and step < total:   # the last: below
                row |= evaluate(model, eval_set, cfg, pad_id)[0]
            rows.append(row)
            if step == total or (cfg.save_every and step % cfg.save_every == 0):
                save_checkpoint(ckpt, model, opt, sched, step, rows)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            if callback:
                callback(step, row)
    final, per_item = evaluate(model, eval_set, cfg, pad_id) if eval_set else ({}, [])
    rows[-1] |= final
    model.train(was_training)
    seconds = time.perf_counter() - t0
    adapter = {k: dist.full(v) for k, v in lora_state_dict(model).items()}      # FSDP: gathered from the shards
    if not dist.is_main():            # rank 0 writes the files, then sends every rank the result
        return dist.broadcast(None)

    fmt_name = fmt.__name__
    save_adapter(model, run_dir / "adapter.safetensors", meta={"mode": cfg.mode, "steps": step, "run": cfg.run,
                                                              "base_model": str(model_dir), "chat_format": fmt_name},
                 tensors=adapter)
    export_peft(model, run_dir / "peft", base_model_name_or_path=str(model_dir), tensors=adapter)
    # train_*: the mean of the last (up to 10) steps, as one step's loss is one batch's, too noisy to report alone
    last = [r for r in rows if "loss" in r][-max(1, min(10, total // 5)):]
    metrics = {f"train_{k}": mean_metric([r[k] for r in last]) for k in ("loss", "reward_acc", "margin")
               if k in last[0]}
    for k in per_item[0] if per_item else []:    # the final evaluation, with intervals over the held-out examples
        values = [r[k] for r in per_item]
        metrics[f"eval_{k}"] = proportion_metric(values) if k == "reward_acc" else mean_metric(values)
    inputs = [Path(p) for p in (cfg.data, cfg.eval_data, cfg.init_adapter) if p]      # their sha256 go in provenance
    result = dict(config=asdict(cfg), provenance=provenance(cfg, model_dir, fmt_name, inputs), metrics=metrics,
                  timing=dict(seconds=seconds, steps=step, processes=dist.world()), n_skipped=len(skipped),
                  skipped=skipped, adapter=str(run_dir / "adapter.safetensors"), items=rows,
                  **({"init_adapter_check": init_check} if cfg.init_adapter else {}))
    path = write_result(cfg.out, cfg.run, result)
    plot_losses(path)
    return dist.broadcast((result, path))


def plot_losses(path) -> Path:
    """The loss curve, drawn from the results file (never from memory): train loss per step, eval loss where run."""
    rows = json.loads(Path(path).read_text(encoding="utf-8"))["items"]
    lines = {label: [(r["step"], r[key]) for r in rows if key in r]
             for label, key in (("train loss", "loss"), ("eval loss", "eval_loss"))}
    lines = {label: pts for label, pts in lines.items() if pts}
    return plot_curve([[s for s, _ in p] for p in lines.values()], [[v for _, v in p] for p in lines.values()], None,
                      list(lines), Path(path).with_suffix(".png"), "optimizer step", "loss", Path(path).stem)


@user_errors()
def main(argv=None):
    cfg = parse_args(TrainConfig, sys.argv[1:] if argv is None else argv)
    if not cfg.data:
        sys.exit("error: --data=PATH.jsonl is required (its format: the top of train.py)")
    if cfg.prepack or cfg.compile:
        sys.exit("error: --prepack and --compile are for inference: train.py trains the model")
    if cfg.adapter:
        sys.exit("error: --adapter is for inference: train.py continues from an adapter with --init_adapter=PATH")
    dist.init(cfg.device, cfg.dist_timeout)        # under torchrun: the micro-batches are shared among the processes
    # FSDP is for a model too big for one card: read it into CPU memory, and fully_shard moves each rank's shard over
    fsdp = cfg.dist == "fsdp" and dist.world() > 1
    s = open_session(replace(cfg, device="cpu") if fsdp else cfg)
    result, path = train(cfg, s.model, s.tok, s.fmt)
    for name, m in result["metrics"].items():
        print(f"  {name:<18} {m['value']:.4f}  [{m['ci'][0]:.4f}, {m['ci'][1]:.4f}]  n={m['n']}")
    print(f"skipped {result['n_skipped']} bad lines\nresults {path} (+ .png)\nadapter {result['adapter']}")


if __name__ == "__main__":
    main()
    dist.cleanup()
