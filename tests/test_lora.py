"""lora.py: the invariants (init = base, disabled = base, merge = unmerged, frozen base) and peft in both directions,
in every family (biases carried; Phi-3's and MPT's fused modules)."""
import json

import pytest
import torch

from conftest import make_hf_model, save_hf_model
from lab import results
from lora import (LoRALinear, adapter_config, add_lora, export_peft, import_peft, load_adapter, lora_disabled,
                  lora_modules, lora_parameters, lora_state_dict, merge, save_adapter, unmerge)
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
    check = meta.pop("model_check")
    assert meta == {"r": 4, "alpha": 8, "dropout": 0.1, "targets": ["v_proj", "up_proj"], "layers": [0, 2],
                    "model": "tiny", "hash": 123, "base_model": str(tiny_llama[0]),
                    "base_model_sha256": results.model_id(tiny_llama[0])}
    assert check["same_model"] and check["used_on_sha256"] == meta["base_model_sha256"]
    assert torch.equal(fresh(IDS), want)
    assert all(not p.requires_grad for n, p in fresh.named_parameters() if "lora_" not in n)
    again = load_adapter(fresh, path)              # into existing adapters: the same numbers
    assert again == meta | {"model_check": check} and torch.equal(fresh(IDS), want)


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
        load_adapter(fresh, tmp_path / "bad.safetensors", cross_model=True)     # no identity recorded
    assert not lora_modules(fresh)
    save_file({"lm_head.lora_A": torch.zeros(4, 64)}, tmp_path / "head.safetensors", metadata={"r": "4", "alpha": "16"})
    with pytest.raises(ValueError, match="'lm_head.lora_A' is not a LoRA target"):
        load_adapter(fresh, tmp_path / "head.safetensors", cross_model=True)


def test_bad_arguments_are_refused(tiny_llama):
    model = ours(tiny_llama[0])
    with pytest.raises(ValueError, match=r"unknown LoRA target\(s\) \['lm_head'\]; valid targets are \['q_proj'"):
        add_lora(model, targets=("q_proj", "lm_head"))
    with pytest.raises(ValueError, match="layers 0..2"):
        add_lora(model, layers=[3])
    assert not lora_modules(model)                 # a refused call changed nothing
    with pytest.raises(ValueError, match="rank r must be at least 1"):
        LoRALinear(torch.nn.Linear(4, 4), r=0, alpha=4)
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
    for key, value in (("use_rslora", True), ("use_dora", True), ("bias", "all"), ("lora_bias", True),
                       ("init_lora_weights", "pissa")):
        bad = {**json.loads(conf.read_text()), key: value}
        (tmp_path / "bad").mkdir(exist_ok=True)
        (tmp_path / "bad" / "adapter_config.json").write_text(json.dumps(bad))
        (tmp_path / "bad" / "adapter_model.safetensors").write_bytes(
            (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes())
        with pytest.raises(ValueError, match=key):
            import_peft(ours(folder), tmp_path / "bad")


# ---------------------------------------------------------------------------------------------- every family
FAMILIES = [pytest.param(mt, kw, id=mt + ("-attention_bias" if kw else "")) for mt, kw in (
    ("llama", {}), ("mistral", {}), ("qwen2", {}), ("qwen3", {}), ("qwen3", {"attention_bias": True}),
    ("gemma2", {}), ("gemma3_text", {}), ("phi3", {}), ("mpt", {}))]
# The modules peft adapts in the transformers model: the checkpoint's names (Phi-3 and MPT fuse and rename).
PEFT_TARGETS = {"phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
                "mpt": ["Wqkv", "out_proj", "up_proj", "down_proj"]}
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def family(mt, kw, tmp_path):
    hf = make_hf_model(mt, **kw)
    return hf, save_hf_model(hf, tmp_path / mt)


def peft_logits(pm):
    with torch.no_grad():
        return pm.eval()(IDS).logits


def random_peft_b(pm, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("mt, kw", FAMILIES)
def test_every_family_init_is_base_and_merge_round_trips(mt, kw, tmp_path):
    model = ours(family(mt, kw, tmp_path)[1])
    base, params = model(IDS), dict(model.named_parameters())
    torch.manual_seed(0)
    names = add_lora(model, r=4, alpha=8)
    n_targets = 6 if mt == "mpt" else 7                # MPT's MLP has no gate_proj: the default adapts what exists
    assert len(names) == 3 * n_targets
    assert torch.equal(model(IDS), base)                # B = 0: exactly the base, biases included
    for n, p in params.items():                         # every base tensor (biases too) keeps its key and memory
        assert dict(model.named_parameters())[n] is p and not p.requires_grad
    attn = model.layers[0].self_attn
    assert (attn.q_proj.bias is not None) == (mt == "qwen2" or bool(kw))
    assert (attn.o_proj.bias is not None) == bool(kw)
    randomize_b(model)
    want = model(IDS)
    assert (want - base).abs().max() > 1e-2
    with lora_disabled(model):
        assert torch.equal(model(IDS), base)
    biases = {n: p.clone() for n, p in model.named_parameters() if n.endswith(".bias")}
    weights = {n: p.clone() for n, p in model.named_parameters() if n.endswith("proj.weight")}
    merge(model)
    torch.testing.assert_close(model(IDS), want, atol=1e-5, rtol=0)
    unmerge(model)
    torch.testing.assert_close(model(IDS), want, atol=1e-5, rtol=0)
    for n, p in model.named_parameters():
        if n in biases:
            assert torch.equal(p, biases[n]), n         # merge folds B A into W only
        elif n in weights:
            torch.testing.assert_close(p, weights[n], atol=1e-6, rtol=0)


def test_bias_bf16_init_is_bit_identical(tmp_path):
    model = ours(family("qwen2", {}, tmp_path)[1], "bf16")
    before = model(IDS)
    add_lora(model)
    assert model.layers[1].self_attn.k_proj.bias.dtype == torch.bfloat16
    assert torch.equal(model(IDS), before)


def test_a_target_the_model_lacks_is_named(tmp_path):
    folder = family("mpt", {}, tmp_path)[1]
    model = ours(folder)
    for targets in (("q_proj", "gate_proj"), "gate_proj"):
        with pytest.raises(ValueError, match=r"\['gate_proj'\]: a mpt model has no such projection; its targets are "
                                             r"\['q_proj', 'k_proj', 'v_proj', 'o_proj', 'up_proj', 'down_proj'\]"):
            add_lora(model, targets=targets)
    assert not lora_modules(model)
    add_lora(model, targets=SEVEN, r=2, layers=[0])     # all seven listed = the default: what the model has
    assert adapter_config(model)["targets"] == [t for t in SEVEN if t != "gate_proj"]
    llama = ours(family("llama", {}, tmp_path)[1])
    add_lora(llama, targets=("gate_proj",), r=2)
    path = save_adapter(llama, tmp_path / "llama.safetensors")
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.gate_proj\.lora_[AB]': a mpt model has no "
                                         r"gate_proj"):
        load_adapter(ours(folder), path, cross_model=True)     # past the identity check, to the structural one


@pytest.mark.parametrize("mt, kw", FAMILIES)
def test_peft_adapter_imports_in_every_family(mt, kw, tmp_path):
    peft = pytest.importorskip("peft")
    hf, folder = family(mt, kw, tmp_path)
    torch.manual_seed(0)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=PEFT_TARGETS.get(mt, SEVEN),
                                                 task_type="CAUSAL_LM"))
    random_peft_b(pm)
    pm.save_pretrained(tmp_path / "adapter")
    want = peft_logits(pm)
    model = ours(folder)
    base = model(IDS)
    import_peft(model, tmp_path / "adapter")
    got = model(IDS)
    assert (got - base).abs().max() > 1e-2
    assert (got - want).abs().max() <= 1e-5
    mods = lora_modules(model)
    assert len(mods) == 3 * (6 if mt == "mpt" else 7) and {m.r for m in mods.values()} == {4}
    if mt in PEFT_TARGETS:   # a fused module's A is shared by its parts; each takes its rows of B
        attn = model.layers[2].self_attn
        assert torch.equal(attn.q_proj.lora_A, attn.v_proj.lora_A)
        fused = [k for k in pm.state_dict() if "layers.2." in k or "blocks.2." in k]
        B = pm.state_dict()[next(k for k in fused if ("qkv_proj" in k or "Wqkv" in k) and "lora_B" in k)]
        assert torch.equal(torch.cat([attn.q_proj.lora_B, attn.k_proj.lora_B, attn.v_proj.lora_B]), B)


@pytest.mark.parametrize("mt, kw", FAMILIES)
def test_export_loads_in_peft_in_every_family(mt, kw, tmp_path):
    peft = pytest.importorskip("peft")
    from peft.tuners.lora import LoraLayer
    hf, folder = family(mt, kw, tmp_path)
    model = ours(folder)
    torch.manual_seed(0)
    add_lora(model, r=4, alpha=12)
    randomize_b(model)
    want = model(IDS)
    export_peft(model, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == PEFT_TARGETS.get(mt, SEVEN)
    fused = {"phi3": ({"qkv_proj": 12, "gate_up_proj": 8}, {"qkv_proj": 36, "gate_up_proj": 24}),
             "mpt": ({"Wqkv": 12}, {"Wqkv": 36})}.get(mt, ({}, {}))
    assert (cfg["rank_pattern"], cfg["alpha_pattern"]) == fused     # k parts: rank k r, alpha k alpha
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter")
    layers = {n: m for n, m in pm.named_modules() if isinstance(m, LoraLayer)}
    assert len(layers) == 3 * len(cfg["target_modules"])
    assert {m.scaling["default"] for m in layers.values()} == {12 / 4}      # peft's alpha / r is ours
    assert (peft_logits(pm) - want).abs().max() <= 1e-5
    back = ours(folder)                                 # and back: the blocks split into the very same tensors
    import_peft(back, tmp_path / "adapter")
    assert lora_state_dict(back).keys() == lora_state_dict(model).keys()
    assert all(torch.equal(v, lora_state_dict(back)[k]) for k, v in lora_state_dict(model).items())
    assert torch.equal(back(IDS), want)


@pytest.mark.parametrize("mt", ["phi3", "mpt"])
def test_export_of_some_parts_of_a_fused_module(mt, tmp_path):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file
    hf, folder = family(mt, {}, tmp_path)
    model = ours(folder)
    torch.manual_seed(0)
    add_lora(model, targets=("q_proj", "v_proj", "down_proj"), r=2, alpha=4, layers=[1])
    randomize_b(model)
    want = model(IDS)
    export_peft(model, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    qkv = {"phi3": "model.layers.1.self_attn.qkv_proj", "mpt": "transformer.blocks.1.attn.Wqkv"}[mt]
    assert cfg["layers_to_transform"] == [1] and cfg["layers_pattern"] == qkv.split(".")[-4]
    sd = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    A, B = sd[f"base_model.model.{qkv}.lora_A.weight"], sd[f"base_model.model.{qkv}.lora_B.weight"]
    assert A.shape == (6, 64) and not A[2:4].any()      # k not adapted: a zero block in A ...
    assert not B[64:96].any() and not B[:, 2:4].any()  # ... and in B (rows of k, columns of its block)
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter")
    assert sum("lora_A" in n for n, _ in pm.named_parameters()) == 2
    assert (peft_logits(pm) - want).abs().max() <= 1e-5
    back = ours(folder)
    import_peft(back, tmp_path / "adapter")             # the zero block is no adapter: k_proj stays plain
    assert sorted(lora_modules(back)) == sorted(lora_modules(model))
    assert torch.equal(back(IDS), want)


def test_peft_layouts_that_cannot_be_ours_are_refused(tmp_path):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file, save_file
    hf, folder = family("llama", {}, tmp_path)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"],
                                                 rank_pattern={"o_proj": 2}, task_type="CAUSAL_LM"))
    pm.save_pretrained(tmp_path / "mixed")
    with pytest.raises(ValueError, match=r"o_proj r=2, alpha=8 but model\.layers\.0\.self_attn\.q_proj r=4, "
                                         r"alpha=8; syco-lab keeps one r and alpha"):
        import_peft(ours(folder), tmp_path / "mixed")
    # A Phi-3 adapter must name the fused module: its checkpoint has no q_proj.
    phi = family("phi3", {}, tmp_path)[1]
    model = ours(phi)
    add_lora(model, targets=("q_proj",), r=2)
    export_peft(model, tmp_path / "phi")
    sd = load_file(tmp_path / "phi" / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight"
    save_file({k.replace("qkv_proj", "q_proj"): v for k, v in sd.items()},
              tmp_path / "phi" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"self_attn\.q_proj: a phi3 checkpoint has no such module \(the checkpoint "
                                         r"holds it in model\.layers\.0\.self_attn\.qkv_proj\)"):
        import_peft(ours(phi), tmp_path / "phi")
    save_file({**sd, key: sd[key][:100]}, tmp_path / "phi" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"qkv_proj\.lora_B\.weight has 100 rows, the model's q_proj \+ k_proj \+ "
                                         r"v_proj have 64 \+ 32 \+ 32"):
        import_peft(ours(phi), tmp_path / "phi")
