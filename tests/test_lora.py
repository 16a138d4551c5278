"""lora.py: the invariants (init = base, disabled = base, merge = unmerged, frozen base) and peft in both directions."""
import json

import pytest
import torch

from conftest import make_hf_model, save_hf_model
from lora import (LoRALinear, add_lora, export_peft, import_peft, load_adapter, lora_disabled, lora_modules,
                  lora_parameters, lora_state_dict, merge, save_adapter, unmerge)
from model import load

IDS = torch.randint(3, 96, (2, 11), generator=torch.Generator().manual_seed(0))


def ours(folder, dtype="fp32"):
    return load(folder, dtype=dtype)


def randomize_b(model, seed=1):
    """B starts at zero (adapter = no-op); give it values so the adapter really changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.2)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_init_is_the_base_model(tiny_llama, dtype):
    model = ours(tiny_llama[0], dtype)
    before = model(IDS)
    torch.manual_seed(0)
    names = add_lora(model)
    assert len(names) == 3 * 7 and names[0] == "model.layers.0.self_attn.q_proj"
    m = model.layers[0].self_attn.q_proj
    assert isinstance(m, LoRALinear) and m.lora_A.dtype == torch.float32 and m.lora_A.abs().sum() > 0
    after = model(IDS)
    assert after.dtype == before.dtype and torch.equal(after, before)


def test_state_dict_keeps_base_keys_and_tensors(tiny_llama):
    model = ours(tiny_llama[0])
    base = model.state_dict()
    add_lora(model, targets=("q_proj", "down_proj"), r=4, layers=[1])
    sd = model.state_dict()
    assert set(base) <= set(sd)
    assert sorted(set(sd) - set(base)) == sorted(lora_state_dict(model)) == [
        "model.layers.1.mlp.down_proj.lora_A", "model.layers.1.mlp.down_proj.lora_B",
        "model.layers.1.self_attn.q_proj.lora_A", "model.layers.1.self_attn.q_proj.lora_B"]
    for k, t in base.items():
        assert sd[k].data_ptr() == t.data_ptr()      # the same memory: wrapping copied nothing
    assert model.layers[1].mlp.down_proj.lora_A.shape == (4, 96)
    assert model.layers[1].mlp.down_proj.lora_B.shape == (64, 4)


def test_training_moves_only_the_adapters(tiny_llama):
    model = ours(tiny_llama[0])
    torch.manual_seed(0)
    add_lora(model, r=4, alpha=8)
    base = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    lora0 = {k: v.clone() for k, v in lora_state_dict(model).items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)   # all of them: freezing must suffice
    for step in range(3):
        loss = torch.nn.functional.cross_entropy(model(IDS[:, :-1]).flatten(0, 1), IDS[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        if step == 0:
            for n, p in model.named_parameters():
                assert (p.grad is not None) == ("lora_" in n), n
                assert p.requires_grad == ("lora_" in n), n
        opt.step()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in base.items())
    assert all(not torch.equal(v, lora_state_dict(model)[k]) for k, v in lora0.items())
    assert len(lora_parameters(model)) == 2 * 3 * 7


def test_disabled_is_base_and_restores_on_error(tiny_llama):
    model = ours(tiny_llama[0])
    base = model(IDS)
    add_lora(model, r=4)
    randomize_b(model)
    tuned = model(IDS)
    assert (tuned - base).abs().max() > 1e-3
    with lora_disabled(model):
        assert torch.equal(model(IDS), base)
    assert torch.equal(model(IDS), tuned)
    with pytest.raises(KeyError):
        with lora_disabled(model):
            raise KeyError("boom")
    assert not any(m.disabled for m in lora_modules(model).values())
    assert torch.equal(model(IDS), tuned)


def test_merge_equals_unmerged_and_unmerge_restores(tiny_llama):
    model = ours(tiny_llama[0])
    add_lora(model, r=4, alpha=32)
    randomize_b(model)
    w0 = model.layers[2].mlp.up_proj.weight.clone()
    want = model(IDS)
    merge(model)
    assert all(m.merged for m in lora_modules(model).values())
    assert not torch.equal(model.layers[2].mlp.up_proj.weight, w0)
    torch.testing.assert_close(model(IDS), want, atol=1e-5, rtol=0)
    merge(model)                                   # a second merge adds nothing
    torch.testing.assert_close(model(IDS), want, atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="unmerge"):
        with lora_disabled(model):
            model(IDS)
    unmerge(model)
    assert not any(m.merged for m in lora_modules(model).values())
    torch.testing.assert_close(model.layers[2].mlp.up_proj.weight, w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(IDS), want, atol=1e-5, rtol=0)


def test_save_load_round_trip(tiny_llama, tmp_path):
    model = ours(tiny_llama[0])
    torch.manual_seed(0)
    add_lora(model, targets=("v_proj", "up_proj"), r=4, alpha=8, dropout=0.1, layers=[0, 2])
    randomize_b(model)
    model.eval()                                   # dropout off
    want = model(IDS)
    path = save_adapter(model, tmp_path / "a" / "sft.safetensors", meta={"model": "tiny", "hash": 123})
    assert [p.name for p in path.parent.iterdir()] == ["sft.safetensors"]     # no temporary file left behind
    fresh = ours(tiny_llama[0]).eval()
    meta = load_adapter(fresh, path)
    assert meta == {"r": 4, "alpha": 8, "dropout": 0.1, "targets": ["v_proj", "up_proj"], "layers": [0, 2],
                    "model": "tiny", "hash": 123}
    assert torch.equal(fresh(IDS), want)
    assert all(not p.requires_grad for n, p in fresh.named_parameters() if "lora_" not in n)
    again = load_adapter(fresh, path)              # into existing adapters: the same numbers
    assert again == meta and torch.equal(fresh(IDS), want)


def test_mismatched_adapter_is_refused(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file
    model = ours(tiny_llama[0])
    add_lora(model, targets=("q_proj", "v_proj"), r=4)
    path = save_adapter(model, tmp_path / "a.safetensors", meta={})
    other = ours(tiny_llama[0])
    add_lora(other, targets=("q_proj",), r=4)
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.v_proj\.lora_A' has no adapter"):
        load_adapter(other, path)
    other = ours(tiny_llama[0])
    add_lora(other, targets=("q_proj", "v_proj", "k_proj"), r=4)
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.0\.self_attn\.k_proj\.lora_A'"):
        load_adapter(other, path)
    other = ours(tiny_llama[0])
    add_lora(other, targets=("q_proj", "v_proj"), r=8)
    with pytest.raises(ValueError, match="r=4, but the model's adapters have r=8"):
        load_adapter(other, path)
    # A tampered file: a wrong shape is named, and nothing is installed into a model without adapters.
    sd = load_file(path)
    sd["model.layers.1.self_attn.v_proj.lora_B"] = torch.zeros(32, 3)
    save_file(sd, tmp_path / "bad.safetensors", metadata={"r": "4", "alpha": "16"})
    fresh = ours(tiny_llama[0])
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.self_attn\.v_proj\.lora_B' has shape \(32, 3\)"):
        load_adapter(fresh, tmp_path / "bad.safetensors")
    assert not lora_modules(fresh)
    save_file({"lm_head.lora_A": torch.zeros(4, 64)}, tmp_path / "head.safetensors", metadata={"r": "4", "alpha": "16"})
    with pytest.raises(ValueError, match="'lm_head.lora_A' is not a LoRA target"):
        load_adapter(fresh, tmp_path / "head.safetensors")


def test_bad_arguments_are_refused(tiny_llama):
    model = ours(tiny_llama[0])
    with pytest.raises(ValueError, match=r"unknown LoRA target\(s\) \['lm_head'\]; valid targets are \['q_proj'"):
        add_lora(model, targets=("q_proj", "lm_head"))
    with pytest.raises(ValueError, match="layers 0..2"):
        add_lora(model, layers=[3])
    assert not lora_modules(model)                 # a refused call changed nothing
    with pytest.raises(ValueError, match="bias"):
        LoRALinear(torch.nn.Linear(4, 4, bias=True), r=2, alpha=4)
    add_lora(model, r=2)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        add_lora(model, r=2)


def test_export_loads_in_peft_with_our_logits(tmp_path):
    peft = pytest.importorskip("peft")
    hf = make_hf_model("llama")
    folder = save_hf_model(hf, tmp_path / "tiny")
    model = ours(folder)
    torch.manual_seed(0)
    add_lora(model, targets=("k_proj", "o_proj", "gate_proj"), r=4, alpha=12, layers=[0, 2])
    randomize_b(model)
    want = model(IDS)
    export_peft(model, tmp_path / "adapter", base_model_name_or_path=str(folder))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["target_modules"] == ["k_proj", "o_proj", "gate_proj"]
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    n_peft = sum("lora_A" in n for n, _ in pm.named_parameters())
    assert n_peft == 2 * 3                         # layers_to_transform honoured: only layers 0 and 2
    with torch.no_grad():
        got = pm(IDS).logits
    assert (got - want).abs().max() <= 1e-5


def test_peft_adapter_imports_with_peft_logits(tmp_path):
    peft = pytest.importorskip("peft")
    hf = make_hf_model("llama", tie_word_embeddings=True)
    folder = save_hf_model(hf, tmp_path / "tiny")
    torch.manual_seed(0)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                 layers_to_transform=[1, 2], task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    pm.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        want = pm.eval()(IDS).logits
    model = ours(folder)
    cfg = import_peft(model, tmp_path / "adapter")
    assert cfg["r"] == 4 and sorted(lora_modules(model))[0] == "model.layers.1.mlp.down_proj"
    assert len(lora_modules(model)) == 2 * 3
    assert (model(IDS) - want).abs().max() <= 1e-5
    # Options that change the math are refused by name.
    conf = tmp_path / "adapter" / "adapter_config.json"
    for key, value in (("use_rslora", True), ("use_dora", True), ("bias", "all"), ("init_lora_weights", "pissa")):
        bad = {**json.loads(conf.read_text()), key: value}
        (tmp_path / "bad").mkdir(exist_ok=True)
        (tmp_path / "bad" / "adapter_config.json").write_text(json.dumps(bad))
        (tmp_path / "bad" / "adapter_model.safetensors").write_bytes(
            (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes())
        with pytest.raises(ValueError, match=key):
            import_peft(ours(folder), tmp_path / "bad")
