"""bench.py's evaluator references compute what our evaluators compute (else their speed ratios mean nothing)."""
import pytest
import torch

from bench import speed as bench
from chat import get_chat_format, load_tokenizer
from evaluate import eval_ab, eval_truthfulqa_mc
from model import load
from probes import opinion_probes


@pytest.fixture(scope="module")
def setup(tiny_chat):
    folder, hf = tiny_chat
    model, tok = load(folder, dtype="fp32"), load_tokenizer(folder)
    return folder, model, tok, hf


def test_caa_references_equal_eval_ab(setup):
    _, model, tok, hf = setup
    fmt = get_chat_format("chatml")
    items = [dict(it, match=it["match"] or it["correct"]) for it in opinion_probes(6)]   # as bench's stand-ins
    ours = [r["p_match"] for r in eval_ab(model, tok, fmt, items, "caa")[0]]
    with torch.no_grad():
        one = bench.p_match_one_at_a_time(hf, tok, fmt, items)
        batched = bench.p_match_batched(hf, tok, fmt, items, token_budget=300)   # small: several batches
    assert max(abs(a - b) for a, b in zip(ours, one)) <= 1e-4
    assert max(abs(a - b) for a, b in zip(ours, batched)) <= 1e-4


def test_truthfulqa_lm_eval_way_equals_ours(setup):
    _, model, tok, hf = setup
    questions = bench.synthetic_tqa(3)
    assert all(4 <= len(q["mc1"]["options"]) <= 8 and 4 <= len(q["mc2"]["options"]) <= 8 for q in questions)
    ours = [r["mc2"] for r in eval_truthfulqa_mc(model, tok, questions)[0]]
    with torch.no_grad():
        ref = bench.mc2_lm_eval_way(hf, tok, questions, token_budget=600)
    assert max(abs(a - b) for a, b in zip(ours, ref)) <= 1e-4


def test_check_same_refuses_different_results():
    bench.check_same("x", {"ours": [0.5, 0.25], "ref": [0.5, 0.2505]})
    with pytest.raises(AssertionError, match="not comparable"):
        bench.check_same("x", {"ours": [0.5, 0.25], "ref": [0.5, 0.3]})


def test_hidden_states_reference_equals_record_pairs(setup):
    from steer import ab_pairs, record_pairs
    _, model, tok, hf = setup
    pairs = ab_pairs(tok, get_chat_format("chatml"), [it for it in opinion_probes(5) if it["opinion"]])
    pos, neg = record_pairs(model, pairs, list(range(len(model.layers))))
    ref_pos, ref_neg = bench.hidden_states_hf(hf, pairs, token_budget=300)
    torch.testing.assert_close(pos, ref_pos, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(neg, ref_neg, atol=1e-4, rtol=1e-4)
    empty, _ = record_pairs(model, pairs, [])                  # the bench's "no hooks" side
    assert empty.shape == (len(pairs), 0, model.config.hidden_size)


def test_lora_step_probes_agree_on_the_first_loss(setup):
    folder = str(setup[0])
    ours, peft_side = (bench.lora_probe(folder, hf, batch=2, seq=16, steps=2) for hf in (False, True))
    assert abs(ours["first_loss"] - peft_side["first_loss"]) < 1e-4
    assert ours["seconds"] > 0 and ours["peak"] >= 0 and peft_side["peak"] >= 0


@pytest.mark.parametrize("shape", ["tiny", "tiny-qwen3", "tiny-gemma2"])
def test_gpu_bench_runs_each_family_on_the_cpu(shape, tmp_path):
    """bench.gpu7b's code path (ours holding transformers' random tensors, the same logits checked before timing)
    for Llama, Qwen3 and Gemma-2, at a toy size on the CPU."""
    import json
    from bench import gpu7b
    gpu7b.main(gpu7b.GPUBenchConfig(shape=shape, device="cpu", rounds=2, compile=False, batch=2, seq=32, prompt=8,
                                    new_tokens=8, big_batch=2, dpo_seq=32, out=str(tmp_path)))
    result = json.loads(next(tmp_path.glob("bench-gpu-*.json")).read_text())
    assert result["logits_rel_error"] < 2e-2 and result["argmax_agreement"] > 0.9
    assert {r["what"].split(",")[0] for r in result["rows"]} >= {"scoring forward 2x32", "LoRA DPO step"}
