"""make bench GPU=1: a model with Llama-2-7B's (or Qwen3-8B's, Gemma-2-9B's) shapes and random bf16 weights on one
GPU, ours vs transformers.

No download: transformers builds the model from a config with its own random init, and ours takes the very same
tensors (shared storage, so the weights are in memory once). Before anything is timed the two are checked to give
the same logits. Rows, each timed alternately with transformers in this run (median of `rounds`, CUDA-synced):
  - scoring forward, batch x seq tokens, logits at the last position; eager, and with --compile=true compiled;
  - greedy decode at batch 1 against the memory-bandwidth limit (every step reads all weights once: tokens/s
    <= bandwidth / weight bytes, bandwidth measured here by a device-to-device copy), and at a large batch;
  - one LoRA DPO step (chosen + rejected, gradient checkpointing, AdamW): peak memory and time, against
    transformers + peft with the same adapters, checkpointing and loss.

    python -m bench.gpu7b [--shape=llama2-7b|qwen3-8b|gemma2-9b|tiny] [--device=cuda] [--rounds=5] [--compile=true]
"""
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.speed import FAMILIES, timed
from lab.args import parse_args, user_errors
from lora import add_lora, lora_parameters
from model import Config, KVCache, Transformer, generate, move_constants
from runtime.gpu import graphed_step, use_gpu_kernels
from train import dpo_step, grad_checkpointing

SHAPES = {   # name -> (model_type, HF config fields): vocab, widths, depth and switches of the named model
    "llama2-7b": ("llama", dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5, rope_theta=10000.0,
                                max_position_embeddings=4096, tie_word_embeddings=False)),
    "qwen3-8b": ("qwen3", dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                               num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
                               rope_theta=1e6, max_position_embeddings=40960, tie_word_embeddings=False)),
    "gemma2-9b": ("gemma2", dict(vocab_size=256000, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                                 num_attention_heads=16, num_key_value_heads=8, head_dim=256, rms_norm_eps=1e-6,
                                 rope_theta=10000.0, query_pre_attn_scalar=256, sliding_window=4096,
                                 attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                 max_position_embeddings=8192, tie_word_embeddings=True)),
    # the CPU smoke test (tests/test_bench.py): each family's code path at a toy size
    "tiny": ("llama", dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
                           max_position_embeddings=2048, tie_word_embeddings=False)),
    "tiny-qwen3": ("qwen3", dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                                 tie_word_embeddings=False)),
    "tiny-gemma2": ("gemma2", dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                                   sliding_window=32, max_position_embeddings=2048, tie_word_embeddings=True)),
}


@dataclass
class GPUBenchConfig:
    shape: str = "llama2-7b"
    device: str = "cuda"
    rounds: int = 5
    batch: int = 16              # scoring forward: batch x seq
    seq: int = 512
    prompt: int = 64             # decode: prompt tokens per row, then new_tokens greedy tokens
    new_tokens: int = 128
    big_batch: int = 32          # the second decode row
    compile: bool = True         # also time torch.compile(ours) on the forward (compile time reported)
    lora: bool = True            # the LoRA DPO step row
    dpo_pairs: int = 1           # chosen + rejected sequences of dpo_seq tokens each (half prompt, half response)
    dpo_seq: int = 512
    r: int = 16
    targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    out: str = "out"


def synced(fn, device):
    """fn, then wait for the device: GPU work is asynchronous, so a host clock must not stop before it ends."""
    def run():
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out
    return run


def random_pair(shape: str, device, dtype=torch.bfloat16, seed: int = 0):
    """transformers' model of the shape's family with its random init, and ours holding the same tensors."""
    import transformers
    model_type, fields = SHAPES[shape]
    config_class, model_class, _ = FAMILIES[model_type]
    torch.manual_seed(seed)
    hf_cfg = getattr(transformers, config_class)(**fields, pad_token_id=0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)             # built in bf16 directly: a 7B model in fp32 would be 27 GB
    try:
        with torch.device(device):
            hf = getattr(transformers, model_class)(hf_cfg).eval()
    finally:
        torch.set_default_dtype(old)
    with torch.device("meta"):
        ours = Transformer(Config.from_dict(hf.config.to_dict(), f"transformers.{config_class}"))
    ours.load_state_dict(hf.state_dict(), strict=True, assign=True)    # the same storage: memory holds one copy
    if ours.config.tie_word_embeddings:
        ours.lm_head.weight = ours.model.embed_tokens.weight
    move_constants(ours, device)                                        # rope's frequencies etc., made on the CPU
    if device.type == "cuda":
        use_gpu_kernels(ours)                  # as the scripts run it (runtime.accelerate)
    return ours.eval(), hf


def eager_generate(model, prompts, new_tokens: int):
    """generate with the model's own decode steps (no CUDA graph): what the graph is timed against."""
    graphed = model.__dict__.pop("decoder", None)
    try:
        return generate(model, prompts, max_new_tokens=new_tokens)
    finally:
        if graphed is not None:
            model.decoder = graphed


def bandwidth(device, gib: float = 2.0) -> float:
    """Device memory bandwidth in bytes/s, from a large device-to-device copy (bytes read + bytes written)."""
    if device.type != "cuda":
        return float("nan")
    a = torch.empty(int(gib * 2**30), dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    s = timed({"copy": synced(lambda: b.copy_(a), device)}, rounds=10)["copy"]
    return 2 * gib * 2**30 / s


def step_difference(model, prompts, device) -> str:
    """Decode-step logits, graphed (static cache: every slot read, unfilled ones masked) vs eager, from two caches
    holding the same prompts. Random weights give near-flat logits, so bf16 rounding alone flips some argmaxes and
    the generated rows then part: the logits say whether the two compute the same function."""
    if device.type != "cuda":
        return "no CUDA graph off a GPU"
    ids = torch.tensor(prompts, device=device)
    caches = [KVCache(model.config, len(prompts), ids.shape[1] + 2, torch.bfloat16, device) for _ in range(2)]
    for cache in caches:
        model(ids, cache=cache, logits_to_keep=1)
    graphed = graphed_step(model, caches[1])
    for nxt in torch.randint(3, model.config.vocab_size, (2, len(prompts)), device=device):
        eager = model(nxt[:, None], cache=caches[0], logits_to_keep=1)[:, -1].float()
        got = graphed(nxt).float()               # the first step runs eagerly and captures; the second replays
    rel = ((got - eager).norm() / eager.norm()).item()
    agree = (got.argmax(-1) == eager.argmax(-1)).float().mean().item()
    return f"a replayed step's logits vs eager: relative difference {rel:.1e}, argmax agreement {agree:.3f}"


def dpo_batch(cfg, vocab: int, device) -> dict:
    """dpo_pairs pairs of random tokens: rows [chosen..., rejected...], loss on the second half of each row."""
    ids = torch.randint(3, vocab, (2 * cfg.dpo_pairs, cfg.dpo_seq), device=device)
    loss_mask = torch.zeros_like(ids)
    loss_mask[:, cfg.dpo_seq // 2:] = 1
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), loss_mask=loss_mask)


def hf_dpo_loss(pm, batch, beta: float):
    """The same sigmoid DPO loss written the way a transformers + peft user would (TRL's shape): full logits,
    log-softmax, gather the response tokens; the reference is the same model with its adapters off."""
    def logps(ids, mask):
        logits = pm(input_ids=ids).logits[:, :-1].float()
        lp = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return (lp * mask[:, 1:]).sum(-1)
    policy = logps(batch["input_ids"], batch["loss_mask"])
    with torch.no_grad(), pm.disable_adapter():
        ref = logps(batch["input_ids"], batch["loss_mask"])
    B = policy.shape[0] // 2
    return -F.logsigmoid(beta * ((policy[:B] - ref[:B]) - (policy[B:] - ref[B:]))).mean()


def lora_dpo_rows(cfg, ours, hf, device) -> dict:
    """Peak memory (above the loaded weights) and time of a LoRA DPO step with checkpointing, ours vs peft."""
    import peft
    targets = cfg.targets.split(",")
    batch = dpo_batch(cfg, ours.config.vocab_size, device)
    res = {}
    for side in ("ours", "peft"):
        torch.manual_seed(0)
        if side == "ours":
            add_lora(ours, targets=targets, r=cfg.r, alpha=2 * cfg.r)
            ours.train()
            params, ctx = lora_parameters(ours), grad_checkpointing(ours)
            loss_fn = lambda: dpo_step(ours, batch, beta=0.1)[0]             # noqa: E731
        else:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            hf.config.use_cache = False
            pm = peft.get_peft_model(hf, peft.LoraConfig(r=cfg.r, lora_alpha=2 * cfg.r, lora_dropout=0.0,
                                                         target_modules=targets))
            pm.train()
            params, ctx = [p for p in pm.parameters() if p.requires_grad], torch.enable_grad()
            loss_fn = lambda: hf_dpo_loss(pm, batch, beta=0.1)               # noqa: E731
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step():
            loss = loss_fn()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()
        with ctx:
            first = step()                                   # the optimizer's state exists from here on
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            seconds = timed({side: synced(step, device)}, rounds=max(2, cfg.rounds // 2), warmup=0)[side]
            peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else float("nan")
        res[side] = dict(first_loss=first, seconds=seconds, peak_above_weights=peak)
        if side == "peft":
            pm.unload()                                      # hf back as it was (not needed after, but tidy)
    return res


def main(cfg: GPUBenchConfig):
    import transformers
    transformers.logging.set_verbosity_error()
    device = torch.device(cfg.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}, transformers {transformers.__version__}, shape {cfg.shape}, bf16\n")
    t0 = time.perf_counter()
    ours, hf = random_pair(cfg.shape, device)
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    print(f"random {cfg.shape}: {weight_bytes / 1e9:.2f} GB of bf16 weights, built in {time.perf_counter() - t0:.0f} s")
    rows = []

    def row(what, ours_s, theirs_s, unit, work, theirs_name="transformers"):
        rows.append(dict(what=what, ours=work / ours_s, theirs=work / theirs_s, unit=unit, ratio=theirs_s / ours_s,
                         reference=theirs_name))
        r = rows[-1]
        print(f"{what:<52} {r['ours']:>10.1f} {r['theirs']:>10.1f} {unit:<6} {r['ratio']:>6.2f}x  vs {theirs_name}",
              flush=True)

    V = ours.config.vocab_size
    with torch.no_grad():
        # Same function first: logits of a few rows, bf16 on both sides (so about 1e-2 relative is rounding).
        ids = torch.randint(3, V, (2, 128), device=device)
        a, b = ours(ids).float(), hf(ids).logits.float()
        rel = ((a - b).norm() / b.norm()).item()
        agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
        print(f"logits vs transformers: relative error {rel:.2e}, argmax agreement {agree:.3f}")
        if not rel < 2e-2:
            sys.exit(f"error: our logits differ from transformers' by {rel:.2e} (relative): not timing a wrong model")

        print(f"\n{'what':<52} {'ours':>10} {'theirs':>10} {'unit':<6} {'ratio':>7}")
        ids = torch.randint(3, V, (cfg.batch, cfg.seq), device=device)
        fwd = {"ours": synced(lambda: ours(ids, logits_to_keep=1), device),
               "hf": synced(lambda: hf(ids, logits_to_keep=1), device)}
        s = timed(fwd, cfg.rounds)
        row(f"scoring forward {cfg.batch}x{cfg.seq}, last logit, eager", s["ours"], s["hf"], "tok/s",
            cfg.batch * cfg.seq)
        if cfg.compile:
            t0 = time.perf_counter()
            fast = torch.compile(ours)
            synced(lambda: fast(ids, logits_to_keep=1), device)()
            compile_s = time.perf_counter() - t0
            s = timed({"ours": synced(lambda: fast(ids, logits_to_keep=1), device), "hf": fwd["hf"]}, cfg.rounds)
            row(f"scoring forward, compiled ({compile_s:.0f} s to compile)", s["ours"], s["hf"], "tok/s",
                cfg.batch * cfg.seq, "transformers eager")
            del fast
            torch._dynamo.reset()

        bw = bandwidth(device)
        for B in (1, cfg.big_batch):
            prompts = torch.randint(3, V, (B, cfg.prompt)).tolist()
            s = timed({"ours": synced(lambda: generate(ours, prompts, max_new_tokens=cfg.new_tokens), device),
                       "hf": synced(lambda: hf.generate(torch.tensor(prompts, device=device),
                                                        max_new_tokens=cfg.new_tokens, min_new_tokens=cfg.new_tokens,
                                                        do_sample=False, pad_token_id=0), device)},
                      max(1, cfg.rounds // 2), warmup=1)
            row(f"decode greedy, batch {B}, {cfg.prompt}+{cfg.new_tokens} tokens", s["ours"], s["hf"], "tok/s",
                B * cfg.new_tokens, "transformers generate")
            # The CUDA graph against our own eager steps, and their tokens (bf16 ties may differ by rounding).
            eager = synced(lambda: eager_generate(ours, prompts, cfg.new_tokens), device)
            e = timed({"eager": eager}, max(1, cfg.rounds // 2), warmup=1)["eager"]
            row("  same, CUDA graph vs eager steps (ours)", s["ours"], e, "tok/s", B * cfg.new_tokens, "ours eager")
            g, e = generate(ours, prompts, max_new_tokens=cfg.new_tokens), eager()
            same = sum(a == b for ga, ea in zip(g, e) for a, b in zip(ga, ea)) / sum(map(len, g))
            print(f"  tokens equal, graph vs eager: {same:.3f}; {step_difference(ours, prompts, device)}")
        limit = bw / weight_bytes
        b1 = [rows[-4]]
        if cfg.compile:    # the decode step compiled too (inside the same CUDA graph): fewer, fused kernels
            prompts, fast = torch.randint(3, V, (1, cfg.prompt)).tolist(), torch.compile(ours)
            t0 = time.perf_counter()
            generate(fast, prompts, max_new_tokens=cfg.new_tokens)
            compile_s = time.perf_counter() - t0
            s = timed({"ours": synced(lambda: generate(fast, prompts, max_new_tokens=cfg.new_tokens), device)},
                      max(1, cfg.rounds // 2), warmup=1)
            row(f"decode greedy, batch 1, compiled ({compile_s:.0f} s)", s["ours"], b1[0]["ours"] ** -1 *
                cfg.new_tokens, "tok/s", cfg.new_tokens, "ours eager")
            b1.append(rows[-1])
            torch._dynamo.reset()
        for r in b1:
            print(f"{r['what']}: {r['ours']:.1f} tok/s = {r['ours'] / limit:.0%} of the bandwidth limit "
                  f"{limit:.1f} tok/s ({bw / 1e12:.2f} TB/s measured copy / {weight_bytes / 1e9:.2f} GB of weights)")

    lora = None
    if cfg.lora:
        lora = lora_dpo_rows(cfg, ours, hf, device)
        o, p = lora["ours"], lora["peft"]
        row(f"LoRA DPO step, {cfg.dpo_pairs} pair x {cfg.dpo_seq}, checkpointing", o["seconds"], p["seconds"],
            "step/s", 1, "transformers+peft")
        print(f"LoRA DPO step peak memory above the weights: ours {o['peak_above_weights'] / 2**30:.2f} GiB, "
              f"transformers+peft {p['peak_above_weights'] / 2**30:.2f} GiB "
              f"({p['peak_above_weights'] / max(o['peak_above_weights'], 1):.2f}x); weights "
              f"{weight_bytes / 2**30:.2f} GiB; first losses {o['first_loss']:.6f} / {p['first_loss']:.6f}")
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    dest = Path(cfg.out) / f"bench-gpu-{time.strftime('%Y%m%d-%H%M%S')}.json"
    dest.write_text(json.dumps(dict(config=asdict(cfg), device=name, torch=torch.__version__, rows=rows,
                                    logits_rel_error=rel, argmax_agreement=agree, bandwidth=bw,
                                    weight_bytes=weight_bytes, lora_dpo=lora, cores=os.cpu_count()), indent=1))
    print(f"\nwrote {dest}")


if __name__ == "__main__":
    with user_errors():
        main(parse_args(GPUBenchConfig, sys.argv[1:]))
