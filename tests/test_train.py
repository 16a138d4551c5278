"""train.py on a tiny random chat model: the losses against hand-written formulas, masks, resume, bad data, outputs."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import train as tr
from chat import get_chat_format, load_tokenizer
from lora import add_lora, lora_disabled, lora_modules, lora_parameters
from model import hooks, load

FMT = get_chat_format("chatml")
QUESTIONS = ["What is the capital of France?", "Are you sure?", "I think the answer is Lyon.", "hello world",
             "Is 12 345?", "don't you agree?", "What is your opinion?", "the quick brown fox"]
SFT = [{"id": f"q{i}", "messages": [{"role": "user", "content": q}], "response": f"answer {i}: Paris", "source": "t"}
       for i, q in enumerate(QUESTIONS)]
DPO = [{"id": f"p{i}", "messages": [{"role": "user", "content": q}], "chosen": "No, Paris is right.",
        "rejected": f"You are right, sorry {i}."} for i, q in enumerate(QUESTIONS)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def fresh(tiny_chat):
    """A new (model, tok) each call: training adds adapters in place, and a resumed run is a new process."""
    return lambda: (load(tiny_chat[0]), load_tokenizer(tiny_chat[0]))


def jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def config(tmp_path, **kw):
    kw = {"data": jsonl(tmp_path / "train.jsonl", SFT if kw.get("mode", "sft") == "sft" else DPO),
          "out": str(tmp_path / "out"), "r": 4, "alpha": 8.0, "batch_size": 2, "warmup_steps": 2, **kw}
    return tr.TrainConfig(**kw)


def examples(tok, rows, mode, tmp_path):
    return tr.read_examples(jsonl(tmp_path / f"{mode}.jsonl", rows), mode, tok, FMT, 256)


def randomize_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


def test_dpo_loss_is_log2_when_policy_is_reference(fresh, tmp_path):
    model, tok = fresh()
    torch.manual_seed(0)
    add_lora(model, r=4, alpha=8)                       # B = 0: the policy is the reference
    batch = tr.batch_of(examples(tok, DPO[:3], "dpo", tmp_path), "dpo", 0, "cpu")
    loss, chosen, rejected = tr.dpo_step(model, batch, beta=0.1)
    assert abs(loss.item() - math.log(2)) < 1e-6
    assert torch.equal(chosen, torch.zeros(3)) and torch.equal(rejected, torch.zeros(3))


def hand_logp(model, ids, n_prompt):
    """Sum of log p(token t | tokens < t) over the response tokens, one unpadded sequence, a plain loop."""
    logits = model(torch.tensor([ids]))[0].float()      # (T, V)
    return sum(logits[t - 1].log_softmax(-1)[ids[t]] for t in range(n_prompt, len(ids)))


def test_dpo_matches_the_published_formula_and_its_gradients(fresh, tmp_path):
    model, tok = fresh()
    torch.manual_seed(0)
    add_lora(model, r=4, alpha=8)
    randomize_b(model)                                  # policy != reference
    exs, beta = examples(tok, DPO[:3], "dpo", tmp_path), 0.5
    loss, chosen, rejected = tr.dpo_step(model, tr.batch_of(exs, "dpo", 0, "cpu"), beta)
    grads = torch.autograd.grad(loss, lora_parameters(model))

    terms, want_c, want_r = [], [], []
    for ex in exs:
        pw, pl = hand_logp(model, *ex["chosen"]), hand_logp(model, *ex["rejected"])
        with torch.no_grad(), lora_disabled(model):
            rw, rl = hand_logp(model, *ex["chosen"]), hand_logp(model, *ex["rejected"])
        terms.append(-F.logsigmoid(beta * ((pw - pl) - (rw - rl))))
        want_c.append(beta * (pw - rw).item())
        want_r.append(beta * (pl - rl).item())
    want = torch.stack(terms).mean()
    want_grads = torch.autograd.grad(want, lora_parameters(model))
    assert abs(loss.item() - want.item()) < 1e-5
    assert torch.allclose(chosen, torch.tensor(want_c), atol=1e-5)
    assert torch.allclose(rejected, torch.tensor(want_r), atol=1e-5)
    assert not torch.allclose(chosen, rejected)
    for g, w in zip(grads, want_grads):
        assert torch.allclose(g, w, atol=1e-6, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_chunked_target_logps_equal_log_softmax_and_its_gradient(dtype, tol):
    torch.manual_seed(0)
    h0, w = torch.randn(11, 8, dtype=dtype), torch.randn(50, 8, dtype=dtype)
    targets, g = torch.randint(0, 50, (11,)), torch.randn(11)
    h = h0.clone().requires_grad_()
    want = F.linear(h, w).float().log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)    # the plain way
    (want * g).sum().backward()
    for chunk in (1, 3, 11, 64):
        hc = h0.clone().requires_grad_()
        got = tr.TargetLogps.apply(hc, w, targets, chunk)
        (got * g).sum().backward()
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()        # same logits, so the same numbers
        assert (hc.grad.float() - h.grad.float()).abs().max() <= tol * h.grad.float().abs().max()
    with torch.no_grad():                                                   # no gradient: none made
        assert torch.allclose(tr.TargetLogps.apply(h0, w, targets, 4), want)


def test_sft_loss_scores_only_response_tokens(fresh, tmp_path):
    model, tok = fresh()
    exs = examples(tok, SFT[:3], "sft", tmp_path)
    batch = tr.batch_of(exs, "sft", 0, "cpu")
    nll, n = 0.0, 0
    for ex in exs:   # hand CE: position t-1 predicts token t, for the response tokens t only
        ids, n_prompt = ex["response"]
        logits = model(torch.tensor([ids]))[0]
        nll += F.cross_entropy(logits[n_prompt - 1: -1], torch.tensor(ids[n_prompt:]), reduction="sum").item()
        n += len(ids) - n_prompt
    assert abs(tr.sft_loss(model, batch).item() - nll / n) < 1e-5

    # The end-of-turn marker is scored; prompt tokens never are.
    ids, n_prompt = exs[0]["response"]
    scored = batch["input_ids"][0][batch["loss_mask"][0].bool()].tolist()
    assert scored == ids[n_prompt:] and tok.encode("<|im_end|>")[0] in scored
    assert tok.decode(ids[:n_prompt]) == FMT(SFT[0]["messages"])

    # With fixed logits (hidden states times a vocab matrix), changing a prompt token (a target of the position
    # before it) leaves the loss alone; changing a response token changes it.
    hidden = torch.randn(*batch["input_ids"].shape, 16)
    fixed = lambda ids, attention_mask=None, return_hidden=True: hidden   # noqa: E731
    fixed.lm_head = torch.nn.Linear(16, 400, bias=False)
    base = tr.sft_loss(fixed, batch)
    for pos, same in ((n_prompt - 1, True), (n_prompt + 1, False)):
        changed = {**batch, "input_ids": batch["input_ids"].clone()}
        changed["input_ids"][0, pos] = (changed["input_ids"][0, pos] + 1) % 400
        assert torch.equal(tr.sft_loss(fixed, changed), base) == same


def test_grad_checkpointing_gives_the_same_loss_and_gradients(fresh, tmp_path):
    model, tok = fresh()
    torch.manual_seed(0)
    add_lora(model, r=4, alpha=8, dropout=0.1)          # dropout: the recomputation must replay its masks
    randomize_b(model)
    model.train()
    batch = tr.batch_of(examples(tok, SFT[:3], "sft", tmp_path), "sft", 0, "cpu")
    calls = []

    def steer(x, pos):                                  # a hook inside a block keeps working
        calls.append(1)
        return x + 0.1

    def loss_and_grads(checkpointing):
        torch.manual_seed(5)
        with hooks(model, [(1, "resid_pre", steer)]), tr.grad_checkpointing(model, checkpointing):
            loss = tr.sft_loss(model, batch)
            return loss, torch.autograd.grad(loss, lora_parameters(model))
    loss0, g0 = loss_and_grads(False)
    n0 = len(calls)
    loss1, g1 = loss_and_grads(True)
    assert len(calls) == 3 * n0      # forward, then again when backward recomputes the block
    assert "forward" not in vars(model.layers[0])       # undone on exit
    assert torch.allclose(loss0, loss1, atol=1e-6)
    for a, b in zip(g0, g1):
        assert torch.allclose(a, b, atol=1e-6)


def test_training_reduces_the_loss(fresh, tmp_path):
    model, tok = fresh()
    with torch.no_grad():   # HF's init (std 0.02) caps logits near +-1 behind the final norm: no adapter could
        model.lm_head.weight.mul_(10)     # make the random tiny model confident, so give its output room
    cfg = config(tmp_path, lr=1e-2, dropout=0.0, max_steps=30, batch_size=4, warmup_steps=3,
                 eval_data=jsonl(tmp_path / "eval.jsonl", SFT[:4]), eval_every=10)
    result, path = tr.train(cfg, model, tok, FMT)
    rows = result["items"]
    assert rows[0]["step"] == 0 and [r["step"] for r in rows[1:]] == list(range(1, 31))
    assert rows[-1]["loss"] < 0.2 * rows[1]["loss"]
    assert rows[-1]["eval_loss"] < 0.2 * rows[0]["eval_loss"]  # the eval lines are training lines: memorized
    assert {r["step"] for r in rows if "eval_loss" in r} == {0, 10, 20, 30}
    # The outputs: adapter, peft export, results JSON with provenance, the curve drawn from it.
    run = tmp_path / "out" / "sft"
    assert (run / "adapter.safetensors").is_file() and (run / "peft" / "adapter_model.safetensors").is_file()
    on_disk = json.loads(path.read_text())
    assert on_disk["provenance"]["chat_format"] == "chatml" and cfg.data in on_disk["provenance"]["data_sha256"]
    assert on_disk["config"]["lr"] == 1e-2 and on_disk["n_skipped"] == 0
    assert on_disk["metrics"]["eval_loss"]["n"] == 4 and path.with_suffix(".png").is_file()


@pytest.mark.parametrize("shuffle", [False, True])
def test_shuffle_false_feeds_the_file_order_and_true_a_seeded_permutation_per_epoch(fresh, tmp_path, monkeypatch,
                                                                                    shuffle):
    model, tok = fresh()
    fed, real = [], tr.batch_of
    monkeypatch.setattr(tr, "batch_of", lambda exs, *a: fed.extend(e["id"] for e in exs) or real(exs, *a))
    tr.train(config(tmp_path, shuffle=shuffle, seed=3, epochs=2, batch_size=2), model, tok, FMT)
    order = [int(i[1:]) for i in fed]          # ids q0..q7 are the file's lines 0..7
    if shuffle:
        assert order == [int(i) for e in (0, 1) for i in np.random.default_rng([3, e]).permutation(len(SFT))]
        assert order[:8] != order[8:]          # a new order every epoch
    else:
        assert order == list(range(len(SFT))) * 2


def dies_at(k):
    def callback(step, row):
        if step == k:
            raise KeyboardInterrupt
    return callback


@pytest.mark.parametrize("mode,grad_accum", [("sft", 1), ("sft", 3), ("dpo", 2)])
def test_resume_after_a_kill_gives_the_same_adapter(fresh, tmp_path, mode, grad_accum):
    kw = dict(mode=mode, grad_accum=grad_accum, max_steps=5, save_every=2, dropout=0.1, lr=5e-3,
              eval_data=jsonl(tmp_path / "eval.jsonl", (SFT if mode == "sft" else DPO)[:2]), eval_every=2)
    whole, _ = tr.train(config(tmp_path, run="whole", **kw), *fresh(), FMT)
    with pytest.raises(KeyboardInterrupt):      # killed after step 3: its work since the step-2 checkpoint is lost
        tr.train(config(tmp_path, run="killed", **kw), *fresh(), FMT, callback=dies_at(3))
    with pytest.raises(FileExistsError, match="--resume=true"):
        tr.train(config(tmp_path, run="killed", **kw), *fresh(), FMT)
    with pytest.raises(ValueError, match="lr"):
        tr.train(config(tmp_path, run="killed", resume=True, **{**kw, "lr": 1e-3}), *fresh(), FMT)
    steps = []
    resumed, _ = tr.train(config(tmp_path, run="killed", resume=True, **kw), *fresh(), FMT,
                          callback=lambda step, row: steps.append(step))
    assert steps == [3, 4, 5]                           # it went on from the checkpoint, not from scratch
    a, b = (load_file(tmp_path / "out" / run / "adapter.safetensors") for run in ("whole", "killed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if k.endswith("lora_B"))
    assert resumed["items"] == whole["items"]           # the same log, steps 0..5, evaluations included


def test_resume_after_the_training_file_changed_is_refused(fresh, tmp_path):
    """The same path, other contents (it used to "resume at step 3 of 6" and finish): refused, naming the file."""
    kw = dict(max_steps=4, save_every=1)
    with pytest.raises(KeyboardInterrupt):
        tr.train(config(tmp_path, run="killed", **kw), *fresh(), FMT, callback=dies_at(2))
    cfg = config(tmp_path, run="killed", resume=True, **kw)
    jsonl(tmp_path / "train.jsonl", SFT[:2])                 # the training file shrank under the same name
    with pytest.raises(ValueError, match="train.jsonl changed since the run started"):
        tr.train(cfg, *fresh(), FMT)


def test_sft_then_dpo_from_its_adapter_with_bf16_and_checkpointing(fresh, tmp_path):
    sft, _ = tr.train(config(tmp_path, run="sft", max_steps=3, lr=1e-2, dropout=0.0), *fresh(), FMT)
    adapter = tmp_path / "out" / "sft" / "adapter.safetensors"
    cfg = config(tmp_path, mode="dpo", run="dpo", max_steps=2, init_adapter=str(adapter), bf16=True,
                 grad_checkpointing=True, r=8)               # r=8 is ignored: the adapter's own r=4 applies
    result, path = tr.train(cfg, *fresh(), FMT)
    first = result["items"][0]
    # The policy starts at the SFT adapter, and so does the reference (read before the first step): log 2 again,
    # where the base model as reference would not give it.
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and {"reward_acc", "margin"} <= first.keys()
    model, tok = fresh()
    from lora import load_adapter
    load_adapter(model, adapter)
    with torch.no_grad():
        exs = examples(tok, DPO[:2], "dpo", tmp_path)
        loss, _, _ = tr.dpo_step(model, tr.batch_of(exs, "dpo", 0, "cpu"), 0.1)     # adapters-off reference
    assert abs(loss.item() - math.log(2)) > 1e-4
    assert str(adapter) in result["provenance"]["data_sha256"] and "train_reward_acc" in result["metrics"]
    assert load_file(tmp_path / "out" / "dpo" / "adapter.safetensors")[
        "model.layers.0.self_attn.q_proj.lora_A"].shape[0] == 4


def test_a_finished_run_is_never_overwritten(fresh, tmp_path):
    cfg = config(tmp_path, max_steps=1)
    tr.train(cfg, *fresh(), FMT)
    adapter = (tmp_path / "out" / "sft" / "adapter.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="never overwrites"):
        tr.train(cfg, *fresh(), FMT)
    with pytest.raises(FileNotFoundError, match="finished"):
        tr.train(config(tmp_path, max_steps=1, resume=True), *fresh(), FMT)
    assert (tmp_path / "out" / "sft" / "adapter.safetensors").read_bytes() == adapter


BAD = {"malformed JSON": ("sft", '{"messages": [', "bad JSON"),
       "missing field": ("sft", {"messages": [{"role": "user", "content": "hi"}]}, "missing field 'response'"),
       "empty response": ("sft", {"messages": [{"role": "user", "content": "hi"}], "response": "  "}, "empty"),
       "too long": ("sft", {"messages": [{"role": "user", "content": "hello " * 300}], "response": "x"}, "max_len"),
       "chosen == rejected": ("dpo", {"messages": [{"role": "user", "content": "hi"}], "chosen": "a",
                                      "rejected": "a"}, "chosen == rejected"),
       "last turn not the user's": ("sft", {"messages": [{"role": "assistant", "content": "hi"}], "response": "x"},
                                    "last message")}


@pytest.mark.parametrize("kind", BAD)
def test_bad_data_names_file_and_line(fresh, tmp_path, kind):
    mode, bad, why = BAD[kind]
    good = SFT if mode == "sft" else DPO
    path = jsonl(tmp_path / "d.jsonl", good[:2] + [bad] + good[2:4])
    _, tok = fresh()
    with pytest.raises(ValueError, match=rf"d\.jsonl:3: .*{why}"):
        tr.read_examples(path, mode, tok, FMT, 256)
    assert len(tr.read_examples(path, mode, tok, FMT, 256, skip_bad=True)) == 4


def test_skipped_lines_are_counted_in_the_results(fresh, tiny_chat, tmp_path):
    cfg = config(tmp_path, max_steps=1, skip_bad=True, data=jsonl(tmp_path / "d.jsonl", SFT[:3] + ["{oops"]),
                 eval_data=jsonl(tmp_path / "e.jsonl", [{"messages": []}] + SFT[:2]))
    _, path = tr.train(cfg, *fresh(), FMT)
    on_disk = json.loads(path.read_text())
    assert on_disk["n_skipped"] == 2 and [s["line"] for s in on_disk["skipped"]] == [4, 1]
    with pytest.raises(SystemExit, match=r"d\.jsonl:4"):   # the CLI without skip_bad: one clear line
        tr.main(["--mode=sft", f"--data={cfg.data}", f"--out={cfg.out}", "--run=cli", f"--model={tiny_chat[0]}"])
