"""Every model family model.py loads, against transformers: logits (fp32, left-padded, through the KV cache, bf16),
the hook sites' meaning, and the configs and checkpoints it must refuse by name."""
import json

import pytest
import torch

from conftest import make_hf_model, save_hf_model
from model import SITES, Config, hooks, load, read_safetensors
from test_model import decode_in_steps, left_padded_batch

WINDOW = 5      # shorter than the 21-token sequences below, so the sliding layers cut
LONGROPE = {"rope_type": "longrope", "long_factor": [1.0 + i for i in range(8)],
            "short_factor": [1.0 + 0.1 * i for i in range(8)]}
FAMILIES = {   # name -> (model_type, config overrides): every family's switches, each on
    "qwen2": ("qwen2", {}),                                                 # q/k/v biases
    "qwen3": ("qwen3", {}),                                                 # per-head q/k RMSNorm
    "qwen3-attention-bias": ("qwen3", dict(attention_bias=True)),           # q/k/v/o biases
    "gemma2": ("gemma2", dict(sliding_window=WINDOW, query_pre_attn_scalar=24, attn_logit_softcapping=1.0,
                              final_logit_softcapping=2.0)),                # soft-capping that bends: tiny caps
    "gemma3": ("gemma3_text", dict(sliding_window=WINDOW, query_pre_attn_scalar=24,
                                   layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                   rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                       "rope_theta": 1e6},
                                                    "sliding_attention": {"rope_type": "default",
                                                                          "rope_theta": 10000.0}})),
    "phi3": ("phi3", dict(sliding_window=WINDOW)),                          # fused qkv_proj, gate_up_proj
    "phi3-longrope": ("phi3", dict(original_max_position_embeddings=16, rope_scaling=LONGROPE)),
    "mpt": ("mpt", dict(attn_config=dict(alibi=True, alibi_bias_max=8))),   # LayerNorm, GELU, ALiBi, fused Wqkv
    # 6 heads: not a power of two, so MPT interleaves its slopes. (transformers' MPT ignores a config's
    # alibi_bias_max and uses 8, the value of every MPT release; ours reads it, as MosaicML's code does.)
    "mpt-6-heads": ("mpt", dict(num_attention_heads=6, hidden_size=48)),
}
# Where our bf16 runs other ops than transformers': their eager attention multiplies q and k in bf16, ours in fp32
# (Gemma-2's soft-capping and MPT's ALiBi take plain_attention, whose scores are fp32 like SDPA's on the CPU).
BF16_OTHER_OPS = {"gemma2", "mpt", "mpt-6-heads"}


def ours_and_theirs(tmp_path, name, dtype="fp32"):
    mt, over = FAMILIES[name]
    hf = make_hf_model(mt, **over)
    return load(save_hf_model(hf, tmp_path / name), dtype=dtype), hf


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_equal_transformers(tmp_path, name):
    ours, hf = ours_and_theirs(tmp_path, name)
    ids = torch.randint(3, 96, (2, 21))      # past the window (5) and longrope's trained length (16)
    with torch.no_grad():
        want, got = hf(ids).logits, ours(ids)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", FAMILIES)
def test_left_padded_batch_equals_transformers_and_single_rows(tmp_path, name):
    left_padded_batch(*ours_and_theirs(tmp_path, name))


@pytest.mark.parametrize("name", FAMILIES)
def test_cached_decode_equals_full_forward(tmp_path, name):
    decode_in_steps(ours_and_theirs(tmp_path, name)[0])


@pytest.mark.parametrize("name", FAMILIES)
def test_bf16_equals_transformers_where_the_ops_are_the_same(tmp_path, name):
    """bf16, plain and left-padded: transformers' very bits where both run SDPA; where their eager attention rounds
    q.k to bf16 (Gemma-2, MPT), ours is about as far from the fp32 logits as theirs (mean error)."""
    import transformers
    ours, hf32 = ours_and_theirs(tmp_path, name, dtype="bf16")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / name, dtype=torch.bfloat16).eval()
    ids = torch.randint(3, 96, (4, 21), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        for kw in (dict(), dict(attention_mask=mask)):
            got = ours(ids, **kw)[:, -1]
            want = hf(ids, position_ids=pos if kw else None, **kw).logits[:, -1]
            if name not in BF16_OTHER_OPS:
                assert torch.equal(got, want)
            else:
                exact = hf32(ids, position_ids=pos if kw else None, **kw).logits[:, -1]
                ours_err, their_err = (got.float() - exact).abs().mean(), (want.float() - exact).abs().mean()
                assert ours_err <= 1.5 * their_err       # seen: 0.9x to 1.2x


@pytest.mark.parametrize("name", ["qwen2", "gemma2", "gemma3", "phi3", "mpt"])
def test_hook_sites_keep_their_meaning(tmp_path, name):
    """resid_pre + attn_out = resid_mid and resid_mid + mlp_out = resid_post in every layer, where attn_out and
    mlp_out are what is added to the stream (after Gemma's post-norms); resid_pre is transformers' hidden_states."""
    ours, hf = ours_and_theirs(tmp_path, name)
    ids = torch.randint(3, 96, (2, 9))
    seen = {}
    specs = [(layer, site, lambda x, pos, k=(layer, site): seen.__setitem__(k, x.clone()))
             for layer in range(len(ours.layers)) for site in SITES]
    with torch.no_grad(), hooks(ours, specs):
        ours(ids)
        states = hf(ids, output_hidden_states=True).hidden_states
    for layer in range(len(ours.layers)):
        s = {site: seen[layer, site] for site in SITES}
        assert torch.equal(s["resid_pre"] + s["attn_out"], s["resid_mid"])
        assert torch.equal(s["resid_mid"] + s["mlp_out"], s["resid_post"])
        assert (s["resid_pre"] - states[layer]).abs().max() <= 1e-5


def test_runtime_leaves_plain_attention_where_the_math_needs_it(tmp_path):
    """runtime/ swaps SDPA for this machine's kernel, but Gemma-2's soft-capped and MPT's ALiBi layers keep
    plain_attention; packing skips projections with a bias (Qwen2's q/k/v) and the logits stay the same."""
    from model import plain_attention
    from runtime import accelerate
    for name in ("gemma2", "mpt", "qwen2"):
        ours, _ = ours_and_theirs(tmp_path, name)
        ids = torch.randint(3, 96, (2, 9))
        with torch.no_grad():
            want = ours(ids)
            accelerate(ours)
            assert torch.equal(ours(ids), want)
        if name != "qwen2":
            assert all(b.self_attn.attend is plain_attention for b in ours.layers)


def test_config_switches_read_from_each_family(tmp_path):
    """The switches each family turns on, read from transformers' own saved config.json."""
    switches = {}
    for name in ("qwen2", "qwen3", "gemma2", "gemma3", "phi3", "mpt"):
        mt, over = FAMILIES[name]
        folder = save_hf_model(make_hf_model(mt, **over), tmp_path / name)
        switches[name] = Config.from_dict(json.loads((folder / "config.json").read_text()))
    assert switches["qwen2"].qkv_bias and not switches["qwen2"].o_bias and switches["qwen2"].sliding_window is None
    assert switches["qwen3"].qk_norm and switches["qwen3"].norm == "rms"
    g2, g3 = switches["gemma2"], switches["gemma3"]
    assert (g2.norm, g2.hidden_act, g2.embed_scale, g2.sandwich_norms) == ("gemma", "gelu_pytorch_tanh", True, True)
    assert (g2.attn_softcap, g2.final_softcap, g2.attn_scale) == (1.0, 2.0, 24 ** -0.5)
    assert g2.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    assert g3.qk_norm and g3.local_rope_theta == 10000.0 and g3.rope_theta == 1e6
    assert g3.rope_scaling == {"rope_type": "linear", "factor": 8.0}
    assert switches["phi3"].layer_types == ("sliding_attention",) * 3
    mpt = switches["mpt"]
    assert (mpt.norm, mpt.hidden_act, mpt.gated_mlp, mpt.alibi_bias_max) == ("layer", "gelu", False, 8.0)


def edit_config(folder, fn):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    fn(cfg)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("name,edit,message", [
    ("qwen2", lambda c: c.update(model_type="gpt2"), "unknown model_type 'gpt2'"),
    ("qwen2", lambda c: c.update(use_sliding_window=True), "use_sliding_window=True is not supported"),
    ("qwen3", lambda c: c.update(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}),
     "rope type 'yarn' is not supported"),
    ("gemma3", lambda c: c.update(use_bidirectional_attention=True), "use_bidirectional_attention=true"),
    ("phi3", lambda c: c["rope_parameters"].update(partial_rotary_factor=0.75), "partial_rotary_factor"),
    ("mpt", lambda c: c["attn_config"].update(clip_qkv=8.0), r"attn_config.clip_qkv=8.0 is not supported"),
    ("mpt", lambda c: c["attn_config"].update(alibi=False), r"attn_config.alibi=False is not supported"),
    ("mpt", lambda c: c.update(no_bias=False), "no_bias=False is not supported"),
])
def test_config_the_decoder_does_not_do_is_refused_by_name(tmp_path, name, edit, message):
    mt, over = FAMILIES[name]
    folder = save_hf_model(make_hf_model(mt, **over), tmp_path / name)
    edit_config(folder, edit)
    with pytest.raises(ValueError, match=message) as e:
        load(folder)
    assert "config.json" in str(e.value)


def rewrite_weights(folder, fn):
    from safetensors.torch import save_file
    sd, meta = read_safetensors(folder / "model.safetensors")
    save_file(fn(sd), folder / "model.safetensors", metadata=meta)


@pytest.mark.parametrize("name,key", [("phi3", "model.layers.1.self_attn.qkv_proj.weight"),
                                      ("phi3", "model.layers.0.mlp.gate_up_proj.weight"),
                                      ("mpt", "transformer.blocks.2.attn.Wqkv.weight")])
def test_fused_tensor_of_the_wrong_shape_names_file_and_key(tmp_path, name, key):
    mt, over = FAMILIES[name]
    folder = save_hf_model(make_hf_model(mt, **over), tmp_path / name)
    rewrite_weights(folder, lambda sd: sd | {key: sd[key][:-8]})
    with pytest.raises(ValueError, match=f"model.safetensors: tensor '{key}' has shape"):
        load(folder)


def test_fused_tensors_split_into_the_decoders_projections(tmp_path):
    ours, hf = ours_and_theirs(tmp_path, "phi3")
    qkv = hf.model.layers[1].self_attn.qkv_proj.weight
    attn = ours.layers[1].self_attn
    assert torch.equal(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]), qkv)
    gate, up = hf.model.layers[0].mlp.gate_up_proj.weight.chunk(2)
    assert torch.equal(ours.layers[0].mlp.gate_proj.weight, gate) and torch.equal(ours.layers[0].mlp.up_proj.weight, up)


def gemma3_multimodal(tmp_path, prefix, drop_text=False):
    """A multimodal Gemma-3 folder as the hub has them: config model_type gemma3 with a text_config, the text
    model's tensors under `prefix` beside a vision tower's (here a stand-in tensor), its output matrix tied."""
    mt, over = FAMILIES["gemma3"]
    hf = make_hf_model(mt, **over, tie_word_embeddings=True)
    text = save_hf_model(hf, tmp_path / "text")
    folder = tmp_path / "multimodal"
    folder.mkdir()
    cfg = json.loads((text / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": cfg,
                                                    "vision_config": {"model_type": "siglip_vision_model"}}))
    from safetensors.torch import save_file
    sd, _ = read_safetensors(text / "model.safetensors")
    sd = {} if drop_text else {prefix + k.removeprefix("model."): v for k, v in sd.items()}
    save_file(sd | {"vision_tower.vision_model.embeddings.patch_embedding.weight": torch.zeros(4, 3)},
              folder / "model.safetensors")
    return folder, hf


@pytest.mark.parametrize("prefix", ["language_model.model.", "model.language_model."])
def test_multimodal_gemma3_loads_its_text_part(tmp_path, prefix):
    folder, hf = gemma3_multimodal(tmp_path, prefix)
    ours = load(folder, dtype="fp32")
    ids = torch.randint(3, 96, (2, 21))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() <= 1e-5


def test_multimodal_checkpoint_without_a_text_part_is_refused(tmp_path):
    folder, _ = gemma3_multimodal(tmp_path, "", drop_text=True)
    with pytest.raises(ValueError, match="multimodal gemma3 checkpoint without a text part"):
        load(folder)
    edit_config(folder, lambda c: c.pop("text_config"))
    with pytest.raises(ValueError, match="config.json: a multimodal gemma3 config without a text_config"):
        load(folder)


@pytest.mark.parametrize("name", ["gemma2", "qwen3", "mpt"])
def test_training_log_probs_equal_transformers(tmp_path, name):
    """train.py's per-token log-probs (projected in chunks, or the plain way where Gemma-2 caps the logits) against
    log_softmax of transformers' logits."""
    import train
    ours, hf = ours_and_theirs(tmp_path, name)
    ids = torch.randint(3, 96, (2, 10))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones_like(ids)}
    with torch.no_grad():
        got, _ = train.token_logps(ours, batch)
        want = hf(ids).logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert (got - want).abs().max() <= 1e-5
