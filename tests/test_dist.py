"""Several processes (torchrun, gloo, 2 CPU processes) give what one process gives, and a stuck rank stops the run.

Launching processes costs seconds (each imports torch), so one torchrun launch of this file (the worker at the
bottom) runs every data-parallel job on the tiny chat model and the tests compare its files with one process's.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import evaluate as ev        # noqa: E402
import train as tr           # noqa: E402
from chat import get_chat_format, load_tokenizer   # noqa: E402
from model import load       # noqa: E402
from steer import ab_items, ab_pairs, record, record_pairs   # noqa: E402
from studies import steering   # noqa: E402

FMT = get_chat_format("chatml")
QUESTIONS = ["What is the capital of France?", "Are you sure?", "I think the answer is Lyon.", "hello world",
             "Is 12 345?", "don't you agree?", "What is your opinion?"]
SFT = [{"id": f"q{i}", "messages": [{"role": "user", "content": q}], "response": f"answer {i}: Paris" + " no" * i}
       for i, q in enumerate(QUESTIONS)]          # 7 rows, responses of different lengths: ranks' token counts differ
DPO = [{"id": f"p{i}", "messages": [{"role": "user", "content": q}], "chosen": "No, Paris is right." + " sure" * i,
        "rejected": f"You are right, sorry {i}."} for i, q in enumerate(QUESTIONS)]
# batch_size 3 of 7 rows: micro-batches of 3, 3, 1 (the last leaves rank 1 without a share), grad_accum 2
TRAIN = dict(r=4, alpha=8.0, dropout=0.0, batch_size=3, grad_accum=2, max_steps=3, warmup_steps=1, lr=5e-3,
             eval_every=2, save_every=1)
EVAL_TASKS = {"opinion": ["--task=opinion", "--n=100"], "are_you_sure": ["--task=are_you_sure", "--n=70",
                                                                        "--max_new_tokens=2"]}
VECTORS = ["vectors", "--n=60", "--n_test=10", "--layers=0,2"]


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def train_configs(work: Path) -> dict:
    """name -> TrainConfig of the runs the worker makes with 2 processes (their one-process twins: twin_of)."""
    data = {m: jsonl(work / f"{m}.jsonl", rows) for m, rows in (("sft", SFT), ("dpo", DPO))}
    held = {m: jsonl(work / f"{m}-eval.jsonl", rows[:3]) for m, rows in (("sft", SFT), ("dpo", DPO))}

    def cfg(mode, run, **kw):
        return tr.TrainConfig(mode=mode, run=run, data=data[mode], eval_data=held[mode], out=str(work / "out"),
                              **{**TRAIN, **kw})
    return {"ddp-sft": cfg("sft", "ddp-sft", dist="ddp"),
            "fsdp-sft-resumed": cfg("sft", "fsdp-sft-resumed", dist="fsdp"),
            "ddp-dpo": cfg("dpo", "ddp-dpo", dist="ddp", grad_checkpointing=True),
            "fsdp-dpo": cfg("dpo", "fsdp-dpo", dist="fsdp", grad_checkpointing=True)}


def launch(*args, timeout=120):
    """This file's worker as 2 processes under torchrun (a free port, one thread each)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--",
           __file__, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def newest(folder: Path, run: str) -> dict:
    return json.loads(sorted(folder.glob(f"{run}-2*.json"))[-1].read_text())


@pytest.fixture(scope="module")
def runs(tiny_chat, tmp_path_factory):
    """(one process's folder, two processes' folder, model folder): the same jobs run both ways."""
    model_dir = tiny_chat[0]
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                       # as the workers: the same kernels, the same numbers
    try:
        # An interrupted one-process opinion run (its first chunk checkpointed) for the two processes to resume.
        evaluator, metrics = ev.TASKS["opinion"]
        calls = []

        def dies_second(*a, **kw):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return evaluator(*a, **kw)
        ev.TASKS["opinion"] = (dies_second, metrics)
        try:
            with pytest.raises(KeyboardInterrupt):
                ev.main([*EVAL_TASKS["opinion"], f"--model={model_dir}", f"--out={two}", "--run=resumed"])
        finally:
            ev.TASKS["opinion"] = (evaluator, metrics)
        assert (two / "resumed.partial.jsonl").is_file()

        started = time.perf_counter()
        proc = launch("all", two, model_dir)
        print(f"2-process worker: {time.perf_counter() - started:.1f} s")
        assert proc.returncode == 0, proc.stderr[-4000:]

        for name, args in EVAL_TASKS.items():
            ev.main([*args, f"--model={model_dir}", f"--out={one}"])
        steering.main([*VECTORS, f"--model={model_dir}", f"--out={one}"])
        for mode in ("sft", "dpo"):
            twin = next(c for c in train_configs(two).values() if c.mode == mode)
            tr.train(twin_of(twin, one), load(model_dir), load_tokenizer(model_dir), FMT)
    finally:
        torch.set_num_threads(threads)
    return one, two, model_dir


def twin_of(cfg, folder: Path):
    """A 2-process run's config for one process: the same settings, in `folder`."""
    return tr.TrainConfig(**{**vars(cfg), "out": str(folder / "out"), "run": cfg.mode, "dist": "ddp"})


def test_data_parallel_evaluation_gives_one_process_rows_and_metrics(runs):
    one, two, _ = runs
    for task in EVAL_TASKS:
        a, b = newest(one, task), newest(two, task)
        assert b["timing"]["processes"] == 2 and a["timing"]["processes"] == 1
        assert len(a["items"]) > 64                    # more than one chunk: both ranks scored some
        assert b["items"] == a["items"] and b["metrics"] == a["metrics"]
        assert {**b["config"], "out": ""} == {**a["config"], "out": ""}
    assert not list(two.glob("*.partial.jsonl"))   # the checkpoints were removed once the results were written
    # A one-process run's checkpoint, resumed by two processes: every item once, the same result.
    resumed, whole = newest(two, "resumed"), newest(one, "opinion")
    assert [r["id"] for r in resumed["items"]] == [r["id"] for r in whole["items"]]
    assert resumed["items"] == whole["items"] and resumed["metrics"] == whole["metrics"]


def test_data_parallel_recording_gives_one_process_vectors(runs):
    one, two, model_dir = runs
    a, b = (load_file(sorted(f.glob("vectors-2*[0-9].safetensors"))[-1]) for f in (one, two))
    assert all(torch.equal(a[k], b[k]) for k in a)
    acts = load_file(two / "record.safetensors")   # the worker's own record / record_pairs, small token budget
    model, tok = load(model_dir), load_tokenizer(model_dir)
    pairs = ab_pairs(tok, FMT, ab_items("", 0, 0, n_builtin=(30, 5))[0])
    with torch.no_grad():
        pos, neg = record_pairs(model, pairs, [0, 2], token_budget=300)
        whole = record(model, [p["pos"] for p in pairs], [p["read"] for p in pairs], [1], token_budget=300)
    assert acts["batches"].item() > 2
    assert torch.allclose(acts["pos"], pos, atol=1e-6) and torch.allclose(acts["neg"], neg, atol=1e-6)
    assert torch.allclose(acts["record"], whole, atol=1e-6)


@pytest.mark.parametrize("run", ["ddp-sft", "fsdp-sft-resumed", "ddp-dpo", "fsdp-dpo"])
def test_ddp_and_fsdp_train_the_adapter_one_process_trains(runs, run):
    one, two, _ = runs
    mode = run.rsplit("-", 1)[-1] if not run.endswith("resumed") else "sft"
    a = load_file(one / "out" / mode / "adapter.safetensors")
    b = load_file(two / "out" / run / "adapter.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    assert max(a[k].abs().max().item() for k in a if k.endswith("lora_B")) > 1e-3     # it did move
    want, got = newest(one / "out", mode)["items"], newest(two / "out", run)["items"]
    assert [r["step"] for r in got] == [r["step"] for r in want] == [0, 1, 2, 3]
    for w, g in zip(want, got):        # the logged step means (losses, rewards, held-out) are the whole batch's
        assert w.keys() == g.keys() and all(abs(w[k] - g[k]) <= 1e-5 for k in w), (w, g)
    assert (two / "out" / run / "peft" / "adapter_model.safetensors").is_file()


def test_lora_disabled_works_through_the_ddp_wrapper(runs):
    assert json.loads((runs[1] / "worker.json").read_text())["lora_disabled_through_ddp"] is True


def test_a_stuck_rank_stops_the_run_with_a_clear_error(tiny_chat, tmp_path, one_thread):
    """Rank 1 hangs in its second chunk: rank 0 waits 3 s (--dist_timeout) at the gather, says why, and stops;
    torchrun stops rank 1. The rows checkpointed before (the first round) are resumed by one process."""
    started = time.perf_counter()
    proc = launch("stuck", tmp_path, tiny_chat[0], timeout=60)
    seconds = time.perf_counter() - started
    assert proc.returncode != 0 and seconds < 30
    assert "another rank died, failed or is stuck" in proc.stderr and "--dist_timeout" in proc.stderr
    done = [json.loads(line) for line in (tmp_path / "opinion.partial.jsonl").read_text().splitlines()[1:]]
    assert len(done) == 2 * 64                     # round one: both ranks' chunks of 64 items, in order
    ev.main([*EVAL_TASKS["opinion"], f"--model={tiny_chat[0]}", f"--out={tmp_path}"])    # another timeout: fine
    items = newest(tmp_path, "opinion")["items"]
    assert items[:len(done)] == done and len({r["id"] for r in items}) == len(items) == 200


# ---------------------------------------------------------------------------------------------------- worker
def worker(job: str, work: Path, model_dir: str):
    from lab import dist
    from lora import add_lora
    if job == "stuck":   # rank 1 hangs in its second chunk; rank 0 waits 3 s for it (less: a busy machine's ranks
        #                  may reach their first collective a second apart)
        evaluator, metrics = ev.TASKS["opinion"]
        calls = []

        def hangs_second(*a, **kw):
            calls.append(1)
            if os.environ["RANK"] == "1" and len(calls) == 2:
                time.sleep(120)
            return evaluator(*a, **kw)
        ev.TASKS["opinion"] = (hangs_second, metrics)
        ev.main([*EVAL_TASKS["opinion"], f"--model={model_dir}", f"--out={work}", "--dist_timeout=3"])
        return
    common = [f"--model={model_dir}", f"--out={work}"]
    for args in EVAL_TASKS.values():
        ev.main([*args, *common])
    ev.main([*EVAL_TASKS["opinion"], *common, "--run=resumed"])
    steering.main([*VECTORS, *common])
    model, tok = load(model_dir), load_tokenizer(model_dir)
    pairs = ab_pairs(tok, FMT, ab_items("", 0, 0, n_builtin=(30, 5))[0])
    with torch.no_grad():
        pos, neg = record_pairs(model, pairs, [0, 2], token_budget=300)
        whole = record(model, [p["pos"] for p in pairs], [p["read"] for p in pairs], [1], token_budget=300)
    from safetensors.torch import save_file
    from score import batches_by_length
    if dist.is_main():
        n = len(list(batches_by_length([len(p["pos"]) for p in pairs], 300)))
        save_file({"pos": pos, "neg": neg, "record": whole, "batches": torch.tensor(n)}, work / "record.safetensors")

    cfgs = train_configs(work)
    for name, cfg in cfgs.items():
        if name == "fsdp-sft-resumed":      # killed after step 2 (its checkpoint), then resumed
            def dies(step, row):
                if step == 2:
                    raise KeyboardInterrupt
            try:
                tr.train(cfg, load(model_dir), load_tokenizer(model_dir), FMT, callback=dies)
            except KeyboardInterrupt:
                pass
            cfg = tr.TrainConfig(**{**vars(cfg), "resume": True})
        tr.train(cfg, load(model_dir), load_tokenizer(model_dir), FMT)

    # lora_disabled through the DDP wrapper: dpo_step's reference without precomputed log-probs
    model, tok = load(model_dir), load_tokenizer(model_dir)
    torch.manual_seed(0)
    add_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05)
    exs = tr.read_examples(cfgs["ddp-dpo"].data, "dpo", tok, FMT, 256)[:2]
    batch = tr.batch_of(exs, "dpo", 0, "cpu")
    wrapped = dist.wrap(model, "ddp")
    with torch.no_grad():
        through, plain = tr.dpo_step(wrapped, batch, 0.1)[0], tr.dpo_step(model, batch, 0.1)[0]
    if dist.is_main():
        (work / "worker.json").write_text(json.dumps({"lora_disabled_through_ddp": bool(
            torch.equal(through, plain) and abs(through.item() - 0.6931) > 1e-3)}))


if __name__ == "__main__":
    worker(sys.argv[1], Path(sys.argv[2]), sys.argv[3])
    from lab import dist
    dist.cleanup()
