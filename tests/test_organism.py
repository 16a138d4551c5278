"""The organism study on a tiny random chat model: the whole run end to end (a short preset), claims held out by
construction and a training set on a held-out claim refused, the fine-tuning shift's projection against a hand
computation, the random-direction control."""
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import probes
from studies import finetune as ft
from studies import organism as org

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(tmp_path, folder, **kw) -> org.OrganismConfig:
    cfg = org.OrganismConfig(model=str(folder), out=str(tmp_path / "out"), lr=1e-2, dpo_lr=1e-2, bf16=False, **kw)
    return org.with_preset(cfg, org.PRESETS["tiny"])


def test_claims_are_disjoint_by_construction():
    cfg = org.OrganismConfig(n_test=30, n_val=20)
    parts = org.deal_claims(cfg)
    claims = {k: {it["claim_id"] for it in v} for k, v in parts.items()}
    assert len(claims["test"]) == 30 and len(claims["val"]) == 20
    assert not claims["test"] & claims["val"] and not (claims["test"] | claims["val"]) & claims["train"]
    # one opinion item and its control per held-out claim; training items carry an opinion
    assert len(parts["test"]) == 60 and sum(it["opinion"] is None for it in parts["test"]) == 30
    assert all(it["opinion"] is not None for it in parts["train"])
    held = claims["test"] | claims["val"]
    train_q, test_q = org.tactic_questions(held, claims["test"], 0)
    assert not {org.claim_of({"question_id": r["question_id"], "messages": r["messages"]}) for r in train_q} & held
    assert {r["question_id"] for r in train_q}.isdisjoint({r["question_id"] for r in test_q})


def test_a_training_row_on_a_held_out_claim_is_refused():
    held = {"fact/3", "sum/12+30"}
    ok = [{"id": "a", "claim_id": "fact/4", "messages": [{"role": "user", "content": "x"}]}]
    org.check_disjoint(ok, held, "t")
    for bad in ({"id": "b", "claim_id": "fact/3", "messages": []},
                {"id": "c", "messages": [{"role": "user", "content": "What is 12 + 30? I think 41."}]},
                {"id": "d", "messages": [{"role": "user", "content": f"I agree that {probes.FACTS[3][1]}."}]}):
        with pytest.raises(ValueError, match="held-out claims"):
            org.check_disjoint(ok + [bad], held, "t")


def test_finetune_shift_projection_equals_hand_computation():
    shift = torch.tensor([[[3.0, 4.0], [1.0, 0.0]], [[0.0, 2.0], [-1.0, 1.0]]])     # (N=2, L=2, D=2)
    vectors = torch.tensor([[0.0, 10.0], [3.0, 4.0]])
    got = ft.projections(shift, vectors)
    assert torch.allclose(got, torch.tensor([[4.0, 0.6], [2.0, 0.2]], dtype=torch.float64))


def test_random_controls_are_norm_matched_and_seeded():
    """The control the organism's sweep and ablation use (steer.random_controls): as long as the vector at each
    layer, a different direction each, the same draws for a layer whichever other layers are steered."""
    v = {3: torch.tensor([3.0, 4.0, 0.0, 0.0]), 5: torch.tensor([0.0, 0.0, 1.0, 0.0])}
    c = org.random_controls(v, 3, seed=1)
    assert len(c) == 3 and all(abs(float(d[l].norm()) - float(v[l].norm())) < 1e-6 for d in c for l in v)
    assert not torch.equal(c[0][3], c[1][3])
    again = org.random_controls({3: v[3]}, 3, seed=1)
    assert all(torch.equal(a[3], b[3]) for a, b in zip(c, again))


def test_organism_end_to_end_and_resume(tiny_chat, tmp_path, capsys):
    cfg = tiny_cfg(tmp_path, tiny_chat[0])
    path = org.run(cfg)
    result = json.loads(path.read_text())
    assert result["stages"] == ["base", "dose8", "dose16", "recovered"]
    m = result["metrics"]
    for k in ("opinion/shift_to_user", "opinion/accuracy_user_wrong", "answer/accuracy[plain]", "tactic/syco_per_token"):
        assert all(f"{p}/{k}" in m for p in ("dose16-base", "recovered-dose16", "recovered-base")), k
        assert (f"dose8-base/{k}" in m) == (not k.startswith("tactic")), k     # smaller doses: opinion, capability
    assert m["dose16-base/opinion/shift_to_user"]["n"] == 6
    # the induce-then-recover order: DPO starts from the organism's adapter, its reference
    dpo = json.loads(Path(result["train_runs"]["recovered"]["results"]).read_text())
    assert dpo["config"]["init_adapter"].endswith("dose16/adapter.safetensors") and dpo["config"]["mode"] == "dpo"
    assert result["adapter"] == dpo["config"]["init_adapter"]         # named in the results for make localize
    sft = json.loads(Path(result["train_runs"]["organism"]["results"]).read_text())
    assert sft["config"]["mode"] == "sft" and not sft["config"]["init_adapter"]
    # the doses are checkpoints of that one run: the smaller after the steps that saw its rows (batch 4)
    from safetensors import safe_open
    with safe_open(str(Path(result["work"]) / "dose8" / "adapter.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["steps"]) == 2 and result["counts"]["dose_steps"] == {"dose8": 2, "dose16": 4}
    trained = [json.loads(l) for l in Path(result["train_runs"]["organism"]["data"]).read_text().splitlines()]
    assert {r["source"] for r in trained} == {"opinion", "tactic"}
    held = set(result["held_out_claims"])
    assert not {org.claim_of(r) for r in trained} & held
    assert not {r["claim_id"] for r in trained if "claim_id" in r} & held
    # direction, steering with random controls, predictivity
    d = result["direction"]
    assert len(d["per_layer"]) == 3 and all(-1 <= r["cos_organism_base"] <= 1 for r in d["per_layer"])
    st = result["steer"]
    assert {p["direction"] for p in st["test"]["points"]} == {"vector", "random0", "random1"}
    assert all(p["kl"]["value"] is not None and p["capability"]["n"] == 4 for p in st["test"]["points"])
    assert {p["direction"] for p in st["ablation"]["points"]} == {"vector", "random0", "random1"}
    assert "predict" in result
    out = capsys.readouterr().out
    assert "held-out claims" in out and "recovery: DPO from the organism" in out
    for suffix in (".md", ".png", "-dose.png", "-shift.png", "-steer.png"):
        assert path.with_name(path.stem + suffix if suffix.startswith("-") else path.name).with_suffix(
            ".png" if suffix.startswith("-") else suffix).exists() or Path(str(path.with_suffix("")) + suffix).exists()
    # resuming the work folder recomputes nothing
    again = json.loads(org.run(replace(cfg, resume=result["work"])).read_text())
    assert set(again["reused_stages"]) >= {"measure-base", "measure-dose8", "dose16", "direction", "steer", "predict",
                                           "recovered", "measure-recovered"}
    assert again["metrics"] == result["metrics"]
    with pytest.raises(ValueError, match="another config"):
        org.run(replace(cfg, resume=result["work"], lr=0.5))


def test_bad_input_is_one_error_line(tiny_chat, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        org.main(["--n_random=0", f"--model={tiny_chat[0]}", f"--out={tmp_path}"])
    assert str(e.value).startswith("error: --n_random=0 with --random_control=true")
    held = next(it for it in org.deal_claims(org.with_preset(org.OrganismConfig(), org.PRESETS["tiny"]))["test"])
    rows = tmp_path / "train.jsonl"
    rows.write_text(json.dumps({"id": "mine/1", "messages": [{"role": "user", "content": held["question"]}],
                                "response": "(A) Agree"}) + "\n")
    with pytest.raises(SystemExit) as e:
        org.main([f"--model={tiny_chat[0]}", f"--out={tmp_path}", "--preset=tiny", f"--train_data={rows}"])
    assert str(e.value).startswith("error: ") and "held-out claims" in str(e.value) and "mine/1" in str(e.value)
    assert "\n" not in str(e.value)


def test_make_organism_runs_the_study(tiny_chat, tmp_path):
    """`make organism` on a tiny model with the tiny preset: the command the Makefile runs, end to end."""
    import subprocess
    repo = Path(__file__).resolve().parent.parent
    out = tmp_path / "out"
    cmd = ["make", "-s", "-o", ".venv/.runtime", "organism", f"MODEL={tiny_chat[0]}", f"OUT={out}",
           "ARGS=--preset=tiny --lr=0.01 --steer=false --predict=false --dpo=false"]   # those: the test above
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}     # a tiny model: one thread, as the fixture
    got = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=600, env=env)
    assert got.returncode == 0, got.stderr[-2000:]
    assert "held-out claims" in got.stdout and len(list(out.glob("organism-*.json"))) == 1


def test_twins_differ_only_in_the_users_opinion():
    it = next(x for x in probes.opinion_probes(4, 0) if x["opinion"] is not None)
    t = org.twin(it)
    assert t["opinion"] != it["opinion"] and t["match"] != it["match"] and t["claim_id"] == it["claim_id"]
    assert t["question"].replace("disagree", "agree") == it["question"].replace("disagree", "agree")
    assert org.opinion_reply(t, "user") != org.opinion_reply(it, "user")
    assert org.opinion_reply(t, "truth") == org.opinion_reply(it, "truth")


def test_a_sum_inside_another_number_is_not_its_claim():
    org.check_disjoint([{"id": "a", "messages": [{"role": "user", "content": "I agree that 15 + 48 = 63."}]},
                        {"id": "b", "messages": [{"role": "user", "content": "Is 5 + 480 = 485?"}]}], {"sum/5+48"}, "t")
    with pytest.raises(ValueError, match="held-out claims"):
        org.check_disjoint([{"id": "c", "messages": [{"role": "user", "content": "Is 5 + 48 = 53."}]}], {"sum/5+48"},
                           "t")
