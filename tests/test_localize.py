"""studies/localize.py end to end on a tiny random chat model with a random adapter standing in for the organism."""
import json

import pytest
import torch

from lora import add_lora, lora_modules, save_adapter
from model import load
from studies import localize

pytestmark = pytest.mark.usefixtures("one_thread")


def test_localize_end_to_end(tiny_chat, tmp_path, capsys):
    folder, _ = tiny_chat
    m = load(folder)
    torch.manual_seed(0)
    add_lora(m, r=2, alpha=4.0)
    with torch.no_grad():
        for mod in lora_modules(m).values():
            mod.lora_B.normal_(0, 0.05)
    adapter = save_adapter(m, tmp_path / "adapter.safetensors")
    localize.main([f"--model={folder}", f"--adapter={adapter}", "--n=3", "--n_test=3", "--top_k=2", "--n_vector=6",
                   "--n_neutral=2", "--n_capability=3", f"--out={tmp_path / 'out'}", "--run=t"])
    path = next((tmp_path / "out").glob("t-*.json"))
    r = json.loads(path.read_text())
    m = r["metrics"]
    L, H = 3, 4
    for key in ("heads_every[organism]", "heads_every[base]", "heads_organism_to_base", "head_cosine_with_vector"):
        assert len(r["grids"][key]["values"]) == L and len(r["grids"][key]["values"][0]) == H
    for key in ("opinion_gap[organism]", "opinion_gap[base]", "p_match[organism,top]", "capability[base,random]",
                "planted_effect_p_match", "attribution_vs_exact_r[organism]"):
        assert key in m, key
    # the planted effect and the fraction each ablation removes, per item, with intervals
    assert m["planted_effect_p_match"]["n"] == 3 and len(m["planted_effect_p_match"]["ci"]) == 2
    for cond in ("top", "random"):
        got = m[f"planted_removed[{cond}]"]
        assert got["kind"] == "ratio" and got["n"] == 3
        removed = m["p_match[organism,none]"]["value"] - m[f"p_match[organism,{cond}]"]["value"]
        assert got["value"] == pytest.approx(removed / m["planted_effect_p_match"]["value"], rel=1e-9)
    assert len(r["summary"]["ablated"]) == 2 and not set(map(tuple, r["summary"]["ablated"])) & set(
        map(tuple, r["summary"]["random_control"]))
    assert len(r["items"]) + len(r["skipped"]) == 3
    for suffix in (".heads.png", ".positions.png", ".lens.png", ".md"):
        assert path.with_suffix(suffix).is_file()
    assert "Top heads" in capsys.readouterr().out


def test_localize_refuses_bad_options(tiny_chat, tmp_path):
    for flag, message in (("--ablation=resample", "error: --ablation='resample': mean or zero"),
                          ("--top_k=0", "top_k")):
        with pytest.raises(SystemExit) as e:
            localize.main([f"--model={tiny_chat[0]}", flag, f"--out={tmp_path}"])
        assert message in str(e.value.code)
