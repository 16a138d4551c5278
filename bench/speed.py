"""make bench: our decoder against transformers on the same model, in the same process, warmed up.

Every row times ours and the reference alternately (so drift in machine load hits both alike), takes the
median of `rounds` runs, and prints ours / theirs as a ratio (> 1 = we are faster). transformers gets its best
settings: `logits_to_keep` for scoring and its own KV cache in `generate`. Ours runs as the scripts run it: on a
CPU with its weights packed for oneDNN (runtime.accelerate; --prepack=false times the plain weights). The evaluator rows
(fp32, several minutes) time evaluate.py's evaluators against the ways others compute the same numbers with
transformers: the CAA study's one-prompt-at-a-time loop, transformers batched as we batch, lm-evaluation-harness's
one row per option.
With --device=cuda every in-process row runs on the GPU (synchronized around each timed call); the fresh-process load
and LoRA rows measure CPU resident memory and are skipped there.

    python -m bench.speed [--model=models/SmolLM2-135M-Instruct] [--rounds=5] [--compile=true] [--evaluators=false]
                    [--device=cuda]
                    [--caa=test_dataset_ab.json] [--tqa=mc_task.json] [--tqa_n=10]
"""
import inspect
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from model import generate, hooks, load, pad_left, pad_right
from runtime import accelerate
from runtime.compile import compile_for_inference
from chat import load_tokenizer
from lab.args import parse_args, user_errors
from lab.prepare import ensure_default_model


@dataclass
class BenchConfig:
    model: str = ""            # empty = the embedded default (converted on first use)
    rounds: int = 5            # timed runs per side (scoring rows: 3x); the median is reported
    batch: int = 16            # scoring forward: batch x seq tokens, logits at the last position only
    seq: int = 128
    new_tokens: int = 128      # decode: greedy tokens generated per row
    compile: bool = False      # also time torch.compile(ours) (compiling takes ~1 minute here)
    evaluators: bool = True    # the evaluator rows (several minutes: each reference re-reads every prompt)
    caa: str = ""              # CAA A/B test set; "" = ../shared's copy if present, else 50 built-in stand-ins
    tqa: str = ""              # TruthfulQA mc_task.json; "" = ../shared's copy if present, else synthetic questions
    tqa_n: int = 10            # TruthfulQA questions timed (the lm-eval-style reference takes ~5 s per question)
    ays_n: int = 100           # are-you-sure items (two turns each, 48 new tokens in the second)
    lora: bool = True          # LoRA SFT step time and peak memory, ours vs transformers + peft (fresh processes)
    lora_batch: int = 4
    lora_seq: int = 256
    pairs: int = 250           # A/B pairs whose activations are recorded at every layer (built-in opinion probes)
    families: bool = True      # each model family at one small random shape: scoring and decode rows (~2 minutes)
    patching: bool = True      # a layer x position patching sweep against the TransformerLens-style loop (~3 minutes)
    patch_ref: int = 60        # patches the one-forward-per-patch reference runs (its time per patch is constant)
    out: str = "out"           # a JSON copy of the table lands here
    device: str = "cpu"        # cuda: every in-process row on the GPU (the fresh-process load and LoRA rows are CPU's)
    prepack: bool = True       # ours as the scripts run it (--prepack): runtime/cpu.py's packed weights (CPU only)


def timed(fns: dict, rounds: int, warmup: int = 2) -> dict:
    """{name: fn} -> {name: median seconds}, after `warmup` calls each, alternating the order every round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    names = list(fns)
    sync = torch.cuda.synchronize if torch.cuda.is_initialized() else (lambda: None)   # GPU work is asynchronous
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            sync()
            t0 = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


LOAD_PROBE = """
import json, sys, time, torch
sys.path.insert(0, {root!r})
def rss(field):
    return int(next(l for l in open('/proc/self/status') if l.startswith(field)).split()[1]) * 1024
if {hf}:
    import transformers
base = rss('VmRSS'); t0 = time.perf_counter()
if {hf}:
    m = transformers.AutoModelForCausalLM.from_pretrained({path!r}, dtype=torch.bfloat16)
else:
    from model import load
    m = load({path!r}, dtype='bf16')
print(json.dumps(dict(seconds=time.perf_counter() - t0, peak=rss('VmHWM') - base)))
"""


def load_probe(path: str, hf: bool) -> dict:
    """Load in a fresh process: its peak resident memory minus what it held before loading, and the time."""
    code = LOAD_PROBE.format(root=str(Path(__file__).resolve().parent.parent), path=path, hf=hf)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# A LoRA SFT step (r 16, alpha 32, all seven projections, AdamW, fp32) in a fresh process per side, so each
# peak is its own: the loss of the first step (the two must agree), the median step time, and the peak resident
# memory the steps add on top of the loaded model.
LORA_PROBE = """
import sys, json, time, statistics; sys.path.insert(0, {root!r})
import torch
torch.manual_seed(0)
def rss(field):
    return int(next(l for l in open('/proc/self/status') if l.startswith(field)).split()[1]) * 1024
vocab = json.load(open({path!r} + '/config.json'))['vocab_size']
ids = torch.randint(3, min(vocab, 40000), ({batch}, {seq}))
targets = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']
if {hf}:
    import transformers, peft
    m = transformers.AutoModelForCausalLM.from_pretrained({path!r}, dtype=torch.float32)
    m = peft.get_peft_model(m, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets))
    loss_fn = lambda: m(input_ids=ids, labels=ids).loss
else:
    from model import load
    from lora import add_lora
    from train import sft_loss
    m = load({path!r}, dtype='fp32')
    add_lora(m, targets=targets, r=16, alpha=32)
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), loss_mask=torch.ones_like(ids))
    loss_fn = lambda: sft_loss(m, batch)
m.train()
opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
base, times, first = rss('VmRSS'), [], None
for step in range({steps}):
    t0 = time.perf_counter()
    loss = loss_fn()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t0)
    first = loss.item() if first is None else first
print(json.dumps(dict(first_loss=first, seconds=statistics.median(times[1:]), peak=rss('VmHWM') - base)))
"""


def lora_probe(path: str, hf: bool, batch: int, seq: int, steps: int = 4) -> dict:
    code = LORA_PROBE.format(root=str(Path(__file__).resolve().parent.parent), path=path, hf=hf, batch=batch, seq=seq,
                             steps=steps)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# -------------------------------------------------------------------------------------------------- evaluators
# Ours = the evaluator itself, called as evaluate.py calls it (tokenizing and metrics included). Each reference is
# a way people compute the same numbers with transformers, written out plainly: the ratio means "that way, on the
# same model and the same token ids, takes this much longer". Both sides run in fp32, the evaluators' default on
# the CPU, and their results are checked to agree (to 1e-3) before anything is timed: a fast wrong answer must
# not pass for a speedup. The data is read only here, never at import: bench runs without ../shared.
SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
CAA_TEST = SHARED_DATA / "nrimsky_CAA/datasets/test/sycophancy/test_dataset_ab.json"
TQA_MC = SHARED_DATA / "TruthfulQA/data/mc_task.json"


def caa_items(path: str) -> tuple[list[dict], str]:
    """CAA's A/B sycophancy test set, or 50 built-in opinion probes in the same item schema when it is absent."""
    from data import read_caa_ab
    if path or CAA_TEST.is_file():
        return list(read_caa_ab(path or CAA_TEST)), "CAA test set"
    from probes import opinion_probes
    # A no-opinion control has no user side: score it toward the truth instead (same prompt shape, same cost).
    return [dict(it, match=it["match"] or it["correct"]) for it in opinion_probes(25)], "opinion-probe stand-ins"


def synthetic_tqa(n: int, seed: int = 0) -> list[dict]:
    """n TruthfulQA-shaped questions (4-8 MC1 and 4-8 MC2 options of 4-12 words) for when mc_task.json is absent."""
    rng = random.Random(seed)
    words = ("people water the moon city river you will nothing happens in particular eat never always it is "
             "a an of true false known science says most many some country sleep light dark cold warm").split()

    def sentence():
        return " ".join(rng.choice(words) for _ in range(rng.randint(4, 12))).capitalize()
    items = []
    for i in range(n):
        mc1 = [sentence() + "." for _ in range(rng.randint(4, 8))]
        mc2 = [sentence() + "." for _ in range(rng.randint(4, 8))]
        items.append({"id": f"synthetic/{i}", "source": "synthetic", "question": sentence() + "?",
                      "mc1": {"options": mc1, "correct": [0]},
                      "mc2": {"options": mc2, "correct": list(range(rng.randint(1, len(mc2) - 1)))}})
    return items


def caa_prompts(tok, fmt, items) -> list[list[int]]:
    """The token ids eval_ab reads: the question as the user's turn, the assistant's turn prefilled with "("."""
    from score import user
    return [tok.encode(fmt(user(it["question"]), prefill="(")) for it in items]


def p_match_one_at_a_time(hf, tok, fmt, items) -> list[float]:
    """The CAA study's way (nrimsky/CAA's behavior evaluation): one prompt at a time, a plain forward that computes
    logits at every position, the last position's softmaxed over the answer letters. (CAA softmaxes over the whole
    vocabulary and divides by p(A) + p(B) later: the same number.)"""
    from score import letter_ids
    out = []
    for it, ids in zip(items, caa_prompts(tok, fmt, items)):
        logits = hf(torch.tensor([ids], device=hf.device)).logits[0, -1]
        p = logits[letter_ids(tok, it["letters"])].float().softmax(-1)
        out.append(p[it["letters"].index(it["match"])].item())
    return out


def p_match_batched(hf, tok, fmt, items, token_budget: int) -> list[float]:
    """transformers batched as ours is: the same length-sorted batches under the same padded-token budget,
    left-padded with an attention mask and positions counted from each row's first real token (as transformers'
    generate counts them), logits at the last position only."""
    from score import batches_by_length, letter_ids
    prompts = caa_prompts(tok, fmt, items)
    out = [0.0] * len(items)
    for batch in batches_by_length([len(p) for p in prompts], token_budget):
        ids, mask = pad_left([prompts[i] for i in batch], hf.device)
        logits = hf(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    logits_to_keep=1).logits[:, -1]
        for r, i in enumerate(batch):
            p = logits[r, letter_ids(tok, items[i]["letters"])].float().softmax(-1)
            out[i] = p[items[i]["letters"].index(items[i]["match"])].item()
    return out


def mc2_lm_eval_way(hf, tok, items, token_budget: int = 4096) -> list[float]:
    """TruthfulQA MC2 the lm-evaluation-harness way (HFLM._loglikelihood_tokens): every (question, option) pair is
    its own row, context + continuation with the last token dropped; rows sorted longest first and batched,
    right-padded (no attention mask: padding after every real token cannot be attended to), logits at every
    position, log_softmax, the continuation's log-probs summed. MC1's options are scored too, as ours scores both.
    MC2 = the probability mass on the true options, exp(loglik) normalized over all MC2 options."""
    from evaluate import TQA_PRIMER
    from score import split_continuation
    rows = []                                   # (question, option index, input ids, continuation ids)
    for q, it in enumerate(items):
        context = f"{TQA_PRIMER}\n\nQ: {it['question']}\nA:"
        for j, option in enumerate(it["mc1"]["options"] + it["mc2"]["options"]):
            ctx, cont = split_continuation(tok, context, " " + option)
            rows.append((q, j, (ctx + cont)[:-1], cont))
    rows.sort(key=lambda r: -len(r[2]))
    loglik = [{} for _ in items]
    start = 0
    while start < len(rows):
        batch = rows[start: start + max(1, token_budget // len(rows[start][2]))]   # the first row is the longest
        start += len(batch)
        ids, _ = pad_right([inp for _, _, inp, _ in batch], hf.device)     # no mask: see above
        logp = hf(ids).logits.float().log_softmax(-1)
        for r, (q, j, inp, cont) in enumerate(batch):
            span = logp[r, len(inp) - len(cont): len(inp)]         # the positions that predict the continuation
            loglik[q][j] = span.gather(1, torch.tensor(cont, device=hf.device)[:, None]).sum().item()
    out = []
    for q, it in enumerate(items):
        k = len(it["mc1"]["options"])
        ll = torch.tensor([loglik[q][k + j] for j in range(len(it["mc2"]["options"]))], dtype=torch.float64)
        out.append(ll.softmax(-1)[it["mc2"]["correct"]].sum().item())
    return out


def check_same(what: str, results: dict, tol: float = 1e-3):
    """Assert every reference's per-item results equal ours within tol: the timings compare one computation."""
    for name, values in results.items():
        worst = max(abs(a - b) for a, b in zip(results["ours"], values))
        assert len(values) == len(results["ours"]) and worst <= tol, (
            f"{what}: ours and the {name!r} reference differ by up to {worst:.3g} (> {tol}), so their speeds are "
            f"not comparable; fix the evaluator or the reference before reading this row")


def are_you_sure_hf(hf, tok, fmt, items, max_new_tokens, batch_size=16):
    """The reference for eval_are_you_sure: the same three steps with transformers, batched the same way, but
    the reply to the challenge is generated by re-reading the whole conversation (its generate has no way to
    continue a previous call's cache across a new user turn)."""
    from probes import MC_PREFILL
    from probes import LETTERS
    from score import letter_ids, pick_letter
    ids = letter_ids(tok, LETTERS)
    firsts = []

    def letters_after(convs):
        x, mask = pad_left([tok.encode(fmt(c, prefill=MC_PREFILL)) for c in convs], hf.device)
        with torch.no_grad():
            p = hf(x, attention_mask=mask, logits_to_keep=1).logits[:, -1].float().softmax(-1)[:, ids]
        return [pick_letter(it["letters"], q) for it, q in zip(chunk, p)]
    for b in range(0, len(items), batch_size):
        chunk = items[b: b + batch_size]
        first = letters_after([it["messages"] for it in chunk])
        convs = [it["messages"] + [{"role": "assistant", "content": f"{MC_PREFILL}{a})."},
                                   {"role": "user", "content": it["challenge"]}] for it, a in zip(chunk, first)]
        x, mask = pad_left([tok.encode(fmt(c)) for c in convs], hf.device)
        hf.generate(x, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                    eos_token_id=sorted(tok.eos_ids), pad_token_id=tok.pad_id)
        letters_after(convs)
        firsts += first
    return firsts


def replies_hf(hf, tok, prompts, max_new_tokens):
    """Greedy replies to token-id prompts from transformers generate, one left-padded batch, cut after end of turn."""
    x, mask = pad_left(prompts, hf.device, tok.pad_id)
    out = hf.generate(x, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                      eos_token_id=sorted(tok.eos_ids), pad_token_id=tok.pad_id)[:, x.shape[1]:].tolist()
    cut = [next((i + 1 for i, t in enumerate(r) if t in tok.eos_ids), len(r)) for r in out]
    return [tok.decode(r[:c], skip_special=True) for r, c in zip(out, cut)]


def ask_hf(hf, tok, fmt, batch_size=16):
    """The reference's judge: the same judge model asked the same chats as score.local_ask, through transformers
    generate in batches of batch_size, in the order given."""
    def ask(prompts, system="", max_tokens=16, prefill=""):
        head = [{"role": "system", "content": system}] if system else []
        ids = [tok.encode(fmt(head + [{"role": "user", "content": p}], prefill=prefill)) for p in prompts]
        return [(r, None) for b in range(0, len(ids), batch_size)
                for r in replies_hf(hf, tok, ids[b: b + batch_size], max_tokens)]
    return ask


def are_you_sure_free_hf(hf, tok, fmt, items, judge, max_new_tokens, batch_size=16):
    """The reference for eval_are_you_sure on free-form items: transformers generates turn 1 and then the reply to
    the challenge, re-reading the whole conversation (batched as ours), and the judge (the same model, asked through
    transformers: ask_hf) grades both answers (correct / incorrect) and the reply (admits a mistake). Returns the
    first answers."""
    firsts = []
    for b in range(0, len(items), batch_size):
        chunk = items[b: b + batch_size]
        first = replies_hf(hf, tok, [tok.encode(fmt(it["messages"])) for it in chunk], max_new_tokens)
        convs = [it["messages"] + [{"role": "assistant", "content": a.strip()}, {"role": "user", "content": it["challenge"]}]
                 for it, a in zip(chunk, first)]
        second = replies_hf(hf, tok, [tok.encode(fmt(c)) for c in convs], max_new_tokens)
        for answers in (first, second):
            judge.grade("correct", [{"question": it["messages"][-1]["content"], "gold": " / ".join(it["aliases"]),
                                     "answer": a.strip()} for it, a in zip(chunk, answers)])
        judge.grade("admits", [{"challenge": it["challenge"], "reply": a.strip()} for it, a in zip(chunk, second)])
        firsts += first
    return firsts


def hidden_states_hf(hf, pairs, token_budget: int = 4096):
    """(pos, neg) (N, L, D): transformers' hidden states of both full sequences of every pair, left-padded batches
    by length, read at the last position (hidden_states[l + 1] is block l's output, except that the last entry
    has the final norm applied: block L-1's output is taken from a hook instead)."""
    from score import batches_by_length
    seqs = [p["pos"] for p in pairs] + [p["neg"] for p in pairs]
    out = torch.empty(len(seqs), hf.config.num_hidden_layers, hf.config.hidden_size)
    last = {}
    handle = hf.model.layers[-1].register_forward_hook(lambda m, a, o: last.update(h=o[0] if isinstance(o, tuple) else o))
    try:
        for batch in batches_by_length([len(s) for s in seqs], token_budget):
            ids, mask = pad_left([seqs[i] for i in batch], hf.device)
            with torch.no_grad():
                hs = hf(ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1).hidden_states
            out[batch] = torch.stack([h[:, -1] for h in hs[1:-1]] + [last["h"][:, -1]], 1).float().cpu()
    finally:
        handle.remove()
    return out[: len(pairs)], out[len(pairs):]


def bench_evaluators(path, cfg, row) -> dict:
    """Evaluator rows: ours against its references, timed alternately in this process, fp32 on both sides."""
    import transformers
    from chat import detect_chat_format, get_chat_format
    from data import read_truthfulqa_mc
    from evaluate import ab_probs, ab_rows, eval_are_you_sure, eval_truthfulqa_mc
    from steer import ab_pairs, record_pairs
    from probes import are_you_sure_probes, arithmetic_qa, opinion_probes
    from score import letter_probs
    t_start = time.perf_counter()
    ours, tok = accelerate(load(path, dtype="fp32", device=cfg.device), cfg.prepack), load_tokenizer(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(cfg.device).eval()
    fmt = get_chat_format(detect_chat_format(path))
    # One call takes 10-60 s, so: the correctness check doubles as the single warm-up, and fewer rounds.
    rounds = max(1, (cfg.rounds + 1) // 2)

    # 1. CAA A/B: p(letter the user would pick) after "(".
    items, caa_data = caa_items(cfg.caa)
    budget = inspect.signature(letter_probs).parameters["token_budget"].default   # what eval_ab batches with
    # Ours is timed without the bootstrap intervals eval_ab adds (~30 ms), which the references do not compute.
    fns = {"ours": lambda: [r["p_match"] for r in ab_rows(items, ab_probs(ours, tok, fmt, items, "caa"))],
           "caa": lambda: p_match_one_at_a_time(hf, tok, fmt, items),
           "hf": lambda: p_match_batched(hf, tok, fmt, items, budget)}
    check_same("CAA A/B p_match", {name: fn() for name, fn in fns.items()})
    s = timed(fns, rounds, warmup=0)
    n = len(items)
    row(f"CAA A/B fp32 ({n}) vs CAA's loop, all logits", s["ours"], s["caa"], "items/s", n)
    row(f"CAA A/B fp32 ({n}) vs transformers batched", s["ours"], s["hf"], "items/s", n)

    # 2. TruthfulQA MC2 (MC1's options scored too), the first tqa_n questions.
    if cfg.tqa or TQA_MC.is_file():
        questions, tqa_data = read_truthfulqa_mc(cfg.tqa or TQA_MC)[: cfg.tqa_n], "TruthfulQA mc_task.json"
    else:
        questions, tqa_data = synthetic_tqa(cfg.tqa_n), "synthetic questions"
    fns = {"ours": lambda: [r["mc2"] for r in eval_truthfulqa_mc(ours, tok, questions)[0]],
           "lm_eval": lambda: mc2_lm_eval_way(hf, tok, questions)}
    check_same("TruthfulQA MC2", {name: fn() for name, fn in fns.items()})
    s = timed(fns, rounds, warmup=0)
    n = len(questions)
    row(f"TruthfulQA MC2 fp32 ({n} q) vs lm-eval's way", s["ours"], s["lm_eval"], "q/s", n)

    # 3. are-you-sure, two turns on ays_n built-in arithmetic items: ours continues turn 1's KV cache for the
    #    reply to the challenge; transformers re-reads the whole conversation in generate, batched the same way.
    ays = are_you_sure_probes(arithmetic_qa(cfg.ays_n), seed=0)
    fns = {"ours": lambda: [r["first"] for r in eval_are_you_sure(ours, tok, fmt, ays, max_new_tokens=48)[0]],
           "hf": lambda: are_you_sure_hf(hf, tok, fmt, ays, max_new_tokens=48)}
    check_same("are-you-sure first answers", {name: [float(ord(a)) for a in fn()] for name, fn in fns.items()})
    s = timed(fns, 1, warmup=0)
    row(f"are-you-sure fp32 ({len(ays)}, 2 turns) vs transformers generate", s["ours"], s["hf"], "items/s",
        len(ays))

    # 3b. judged are-you-sure on free-form questions: two generated turns, each answer graded by a judge (the default
    #     model itself, a fresh judge per call so that no verdict comes from a cache). Ours continues turn 1's KV
    #     cache for the reply and its judge (score.local_ask) reads the rubric's shared prefix once; transformers
    #     re-reads the conversation in generate and judges with generate as well (ask_hf).
    from evaluate import eval_are_you_sure as ays_eval
    from lab.judge import Judge
    from probes import free_form_qa
    from score import local_ask
    free = are_you_sure_probes(free_form_qa(cfg.ays_n), seed=0)
    fns = {"ours": lambda: [r["first"] for r in ays_eval(ours, tok, fmt, free, judge=Judge(local_ask(ours, tok, fmt),
                                                                                             "bench"),
                                                         max_new_tokens=48)[0]],
           "hf": lambda: are_you_sure_free_hf(hf, tok, fmt, free, Judge(ask_hf(hf, tok, fmt), "bench"),
                                              max_new_tokens=48)}
    got = {name: fn() for name, fn in fns.items()}
    same = sum(a == b for a, b in zip(got["ours"], got["hf"])) / len(free)
    assert same >= 0.9, f"judged are-you-sure: only {same:.0%} of the first answers are the same text"
    s = timed(fns, 1, warmup=0)
    row(f"judged are-you-sure (free-form) fp32 ({len(free)}) vs transformers + judge", s["ours"],
        s["hf"], "items/s", len(free))

    # 4. Recording every layer's resid_post at the answer letter of both answers of each pair: ours (shared prefix
    #    read once, one decode step per answer) against the same forwards without hooks (the hooks' cost), and
    #    against transformers' output_hidden_states over both full sequences (how the studies recorded).
    pairs = ab_pairs(tok, fmt, [it for it in opinion_probes(cfg.pairs, seed=0) if it["opinion"] is not None])
    layers = list(range(len(ours.layers)))
    fns = {"ours": lambda: record_pairs(ours, pairs, layers), "plain": lambda: record_pairs(ours, pairs, []),
           "hf": lambda: hidden_states_hf(hf, pairs)}
    check_same("letter-token activations", {"ours": torch.cat(fns["ours"]()).flatten().tolist()[::997],
                                            "hf": torch.cat(fns["hf"]()).flatten().tolist()[::997]}, tol=0.05)
    s = timed(fns, rounds, warmup=0)
    row(f"record {len(pairs)} pairs x {len(layers)} layers vs no hooks", s["ours"], s["plain"], "pairs/s", len(pairs))
    row(f"record {len(pairs)} pairs vs transformers hidden_states", s["ours"], s["hf"], "pairs/s", len(pairs))

    return dict(seconds=time.perf_counter() - t_start, caa=caa_data, caa_items=len(items), tqa=tqa_data,
                tqa_questions=len(questions), dtype="fp32")


def opinion_pair(tok, fmt, seed: int = 0) -> tuple[list[int], list[int], str]:
    """A built-in opinion probe and the same prompt with the opposite opinion ("I agree" <-> "I disagree"), both
    prefilled with "(": the first such pair whose two prompts have the same number of tokens."""
    from probes import opinion_probes
    from score import user
    for it in opinion_probes(50, seed):
        if it["opinion"] is None:
            continue
        q = it["question"]
        other = "disagree" if it["opinion"] == "agree" else "agree"
        flipped = q.replace(f"I {it['opinion']} with the claim", f"I {other} with the claim")
        a, b = (tok.encode(fmt(user(x), prefill="(")) for x in (q, flipped))
        if len(a) == len(b):
            return a, b, it["id"]
    raise ValueError("no opinion probe whose flipped opinion keeps its token count")


def patch_loop_hf(hf, src_ids, dst_ids, answer, patches):
    """The TransformerLens-style reference: for each (layer, position), one forward of the destination with
    transformers, a forward pre-hook on that decoder layer writing the source's hidden state at that position."""
    with torch.no_grad():
        hs = hf(torch.tensor([src_ids]), output_hidden_states=True).hidden_states     # hs[l]: layer l's input
    x = torch.tensor([dst_ids], device=hf.device)
    out = []
    for layer, p in patches:
        def write(module, args, p=p, value=hs[layer][0, p]):
            h = args[0].clone()
            h[0, p] = value
            return (h, *args[1:])
        handle = hf.model.layers[layer].register_forward_pre_hook(write)
        try:
            with torch.no_grad():
                z = hf(x, logits_to_keep=1).logits[0, -1]
        finally:
            handle.remove()
        out.append(float(z[answer[0]] - z[answer[1]]))
    return out


def bench_patching(path, cfg, row):
    """Activation patching, fp32: every layer x every position of resid_pre for an opinion / opposite-opinion pair
    (~100 tokens), ours batched (patch.sweep) against one transformers forward per patch with a hook (the
    TransformerLens way), same math, checked equal on the reference's patches. The reference's time per patch does
    not depend on the patch, so it runs an evenly spaced sample of them. Then what reading the attention pattern
    costs when asked (every layer recorded: plain attention written out) against the same forward with no hooks."""
    import transformers
    from chat import detect_chat_format, get_chat_format
    from patch import Patch, record_run, sweep
    from score import letter_ids
    ours, tok = accelerate(load(path, dtype="fp32", device=cfg.device), cfg.prepack), load_tokenizer(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(cfg.device).eval()
    fmt = get_chat_format(detect_chat_format(path))
    a, b, name = opinion_pair(tok, fmt)
    answer = tuple(letter_ids(tok, ["A", "B"]))
    L, T = len(ours.layers), len(b)
    grid = [(l, p) for l in range(L) for p in range(T)]
    sample = grid[:: max(1, len(grid) // cfg.patch_ref)]

    got = {}

    def ours_sweep():
        src, dst = record_run(ours, a, answer, ("resid_pre",)), record_run(ours, b, answer, ("resid_pre",))
        got["ours"] = sweep(ours, src, dst, [Patch(l, "resid_pre", (p,)) for l, p in grid]).tolist()

    def tl_loop():
        got["tl_loop"] = patch_loop_hf(hf, a, b, answer, sample)
    # One run each (the sweep takes minutes on 2 cores); the reference's first patch warms it up, ours is warm.
    patch_loop_hf(hf, a, b, answer, sample[:2])
    s = timed({"ours": ours_sweep, "tl_loop": tl_loop}, 1, warmup=0)
    check_same("patching sweep", {"ours": [got["ours"][grid.index(g)] for g in sample], "tl_loop": got["tl_loop"]})
    row(f"patch sweep {L} layers x {T} positions vs TL-style loop", s["ours"] / len(grid),
        s["tl_loop"] / len(sample), "patches/s", 1)
    ids = torch.tensor([b] * cfg.batch, device=cfg.device)

    def patterns():
        with hooks(ours, [(l, "pattern", lambda p, pos: None) for l in range(L)]):
            ours(ids, logits_to_keep=1)
    s = timed({"rec": patterns, "plain": lambda: ours(ids, logits_to_keep=1)}, cfg.rounds)
    row(f"record every pattern {cfg.batch}x{T} (w/ vs w/o hooks)", s["rec"], s["plain"], "tok/s", cfg.batch * T)
    return dict(pair=name, tokens=T, layers=L, patches=len(grid), reference_patches=len(sample))


# Each family at one small shape (random weights: speed does not depend on the values), its own switches on: Gemma's
# and Phi-3's sliding window shorter than the scored sequence, so the windowed mask is timed.
SMALL = dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8,
             num_key_value_heads=4, head_dim=64, max_position_embeddings=4096, tie_word_embeddings=False, pad_token_id=0)
FAMILIES = {"llama": ("LlamaConfig", "LlamaForCausalLM", {}),
            "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
            "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
            "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(sliding_window=64, query_pre_attn_scalar=64)),
            "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(sliding_window=64, query_pre_attn_scalar=64,
                                                                          sliding_window_pattern=2)),
            "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(sliding_window=64)),
            "mpt": ("MptConfig", "MptForCausalLM", dict(d_model=512, n_heads=8, n_layers=6, expansion_ratio=4,
                                                        max_seq_len=4096))}


def bench_families(cfg: BenchConfig, row, folder: Path):
    """Scoring (bf16 and fp32, batch x seq, last logit) and bf16 greedy decode (batch 1) of every family at the SMALL
    shape, ours as the scripts run it against transformers' eager forward and generate."""
    import transformers
    ids = torch.randint(100, 30000, (cfg.batch, cfg.seq), device=cfg.device)
    prompt = [list(range(1000, 1020))]
    for name, (config_class, model_class, over) in FAMILIES.items():
        kw = over if name == "mpt" else {**SMALL, **over}
        torch.manual_seed(0)
        hf = getattr(transformers, model_class)(getattr(transformers, config_class)(**kw)).eval()
        hf.save_pretrained(folder / name)
        for dt_name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            ours = accelerate(load(folder / name, dtype=dt_name, device=cfg.device), cfg.prepack)
            theirs = hf.to(cfg.device, dt)
            s = timed({"ours": lambda: ours(ids, logits_to_keep=1), "hf": lambda: theirs(ids, logits_to_keep=1)},
                      cfg.rounds)
            row(f"{name} scoring {dt_name} {cfg.batch}x{cfg.seq}", s["ours"], s["hf"], "tok/s", cfg.batch * cfg.seq)
            if dt_name == "bf16":
                x = torch.tensor(prompt, device=cfg.device)
                s = timed({"ours": lambda: generate(ours, prompt, max_new_tokens=32),
                           "hf": lambda: theirs.generate(x, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                                         pad_token_id=0)}, max(1, cfg.rounds // 2))
                row(f"{name} decode bf16 greedy 32 new, batch 1", s["ours"], s["hf"], "tok/s", 32)
        ours = hf = theirs = None


def main(cfg: BenchConfig):
    path = cfg.model or str(ensure_default_model())
    import transformers
    transformers.logging.set_verbosity_error()
    rows = []

    def row(what, ours_s, theirs_s, unit, work):
        rows.append(dict(what=what, ours=work / ours_s, theirs=work / theirs_s, unit=unit, ratio=theirs_s / ours_s))
        r = rows[-1]
        print(f"{what:<46} {r['ours']:>9.1f} {r['theirs']:>9.1f} {unit:<9} {r['ratio']:>6.2f}x", flush=True)

    gpu = f"{torch.cuda.get_device_name(cfg.device)}, " if cfg.device != "cpu" else ""
    print(f"{gpu}{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}\n")
    print(f"{'what':<46} {'ours':>9} {'theirs':>9} {'unit':<9} {'ratio':>7}")
    torch.manual_seed(0)
    ids = torch.randint(100, 40000, (cfg.batch, cfg.seq), device=cfg.device)
    prompt = [list(range(1000, 1020))]
    ntok = cfg.batch * cfg.seq
    # A scoring forward takes ~1.5 s here and the machine's speed drifts within seconds, so a median of 5 moved
    # single scoring rows by 10-20% between runs: they get three times the rounds (~1 minute a row).
    score_rounds = 3 * cfg.rounds
    with torch.no_grad():
        for dt_name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            ours = accelerate(load(path, dtype=dt_name, device=cfg.device), cfg.prepack)    # as the scripts run it
            hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dt).to(cfg.device).eval()
            s = timed({"ours": lambda: ours(ids, logits_to_keep=1), "hf": lambda: hf(ids, logits_to_keep=1)},
                      score_rounds)
            row(f"scoring forward {dt_name} {cfg.batch}x{cfg.seq}, last logit", s["ours"], s["hf"], "tok/s", ntok)
            if dt_name == "bf16":      # decode, recording and compiling are timed in bf16 only
                for B in (1, 16):
                    p = prompt * B
                    x = torch.tensor(p, device=cfg.device)
                    s = timed({"ours": lambda: generate(ours, p, max_new_tokens=cfg.new_tokens),
                               "hf": lambda: hf.generate(x, max_new_tokens=cfg.new_tokens, do_sample=False,
                                                         min_new_tokens=cfg.new_tokens, pad_token_id=0)},
                              max(1, cfg.rounds // 2))
                    row(f"decode {dt_name} greedy {cfg.new_tokens} new, batch {B}", s["ours"], s["hf"], "tok/s",
                        B * cfg.new_tokens)
                # Recording every layer's resid_post at the last position against the same forward without hooks.
                store = {}
                rec = [(i, "resid_post", lambda x, pos, i=i: store.__setitem__(i, x[:, -1].float()))
                       for i in range(len(ours.layers))]

                def recorded():
                    with hooks(ours, rec):
                        ours(ids, logits_to_keep=1)
                s = timed({"plain": lambda: ours(ids, logits_to_keep=1), "rec": recorded}, score_rounds)
                row("record all resid_post (ours w/ vs w/o hooks)", s["rec"], s["plain"], "tok/s", ntok)
                if cfg.compile:
                    t0 = time.perf_counter()
                    fast = compile_for_inference(ours)
                    fast(ids, logits_to_keep=1)
                    compile_s = time.perf_counter() - t0
                    s = timed({"ours": lambda: fast(ids, logits_to_keep=1), "hf": lambda: hf(ids, logits_to_keep=1)},
                              score_rounds)
                    row(f"scoring forward bf16 compiled ({compile_s:.0f} s to compile)", s["ours"], s["hf"], "tok/s",
                        ntok)
            ours = hf = None      # free both before the next dtype (closures above hold the names)
        evaluators = bench_evaluators(path, cfg, row) if cfg.evaluators else None
        patching = bench_patching(path, cfg, row) if cfg.patching else None
        if cfg.families:
            with tempfile.TemporaryDirectory() as tmp:
                bench_families(cfg, row, Path(tmp))
    weights = sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))
    cpu = cfg.device == "cpu"     # the load and LoRA rows measure a fresh process's resident memory: CPU only
    ours_l, hf_l = (load_probe(path, hf=False), load_probe(path, hf=True)) if cpu else (None, None)
    if cfg.lora and cpu:
        ours_t, peft_t = (lora_probe(path, hf, cfg.lora_batch, cfg.lora_seq) for hf in (False, True))
        check_same("LoRA SFT first loss", {"ours": [ours_t["first_loss"]], "peft": [peft_t["first_loss"]]})
        row(f"LoRA SFT step fp32 {cfg.lora_batch}x{cfg.lora_seq} vs transformers+peft", ours_t["seconds"],
            peft_t["seconds"], "steps/s", 1)
        print(f"LoRA SFT step peak memory above the loaded model: ours {ours_t['peak'] / 2**20:.0f} MiB, "
              f"transformers+peft {peft_t['peak'] / 2**20:.0f} MiB ({peft_t['peak'] / max(ours_t['peak'], 1):.2f}x)")
    if cpu:
        row("load bf16, fresh process", ours_l["seconds"], hf_l["seconds"], "loads/s", 1)
        print(f"load: ours {ours_l['seconds']:.2f} s, peak +{ours_l['peak'] / 2**20:.0f} MiB = "
              f"{ours_l['peak'] / weights:.2f}x the {weights / 2**20:.0f} MiB of weights; transformers "
              f"{hf_l['seconds']:.2f} s, peak +{hf_l['peak'] / 2**20:.0f} MiB = {hf_l['peak'] / weights:.2f}x")
    if evaluators:
        print(f"evaluator rows: {evaluators['caa_items']} items of the {evaluators['caa']}, "
              f"{evaluators['tqa_questions']} {evaluators['tqa']} questions, fp32; {evaluators['seconds']:.0f} s")
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    dest = Path(cfg.out) / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    dest.write_text(json.dumps(dict(config=asdict(cfg), model=path, cores=os.cpu_count(), rows=rows,
                                    load=dict(ours=ours_l, transformers=hf_l, weight_bytes=weights),
                                    evaluators=evaluators, patching=patching), indent=1))
    print(f"\nwrote {dest}")


if __name__ == "__main__":
    with user_errors():
        main(parse_args(BenchConfig, sys.argv[1:]))
