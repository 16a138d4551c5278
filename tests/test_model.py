"""model.py against transformers (the reference) and against itself (cache, padding, hooks), plus bad input."""
import json
import struct

import pytest
import torch

from conftest import make_hf_model, save_hf_model
from model import KVCache, generate, hooks, load, read_safetensors

CONFIGS = {   # name -> (model_type, config overrides): every branch of the math
    "llama-mha-untied": ("llama", dict(num_key_value_heads=4)),
    "llama-gqa-tied": ("llama", dict(tie_word_embeddings=True)),
    "llama3-rope-scaling": ("llama", dict(rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "llama-linear-rope": ("llama", dict(rope_scaling=dict(rope_type="linear", factor=2.0))),
    "mistral-window": ("mistral", dict(sliding_window=5)),
}


def ours_and_theirs(tmp_path, name):
    mt, over = CONFIGS[name]
    hf = make_hf_model(mt, **over)
    return load(save_hf_model(hf, tmp_path / name), dtype="fp32"), hf


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_equal_transformers(tmp_path, name):
    ours, hf = ours_and_theirs(tmp_path, name)
    ids = torch.randint(0, 96, (2, 21))          # longer than the Mistral window (5) and rope's old context (16)
    with torch.no_grad():
        want = hf(ids).logits
        got = ours(ids)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-5


def left_padded_batch(ours, hf):
    """A left-padded batch of 12, 7 and 3 tokens: each row's logits against transformers' (given the rows' own
    positions) and against the row read alone, within 1e-5, and no NaN at the padding."""
    rows = [torch.randint(3, 96, (n,)) for n in (12, 7, 3)]
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = r, 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        got = ours(ids, attention_mask=mask)
        want = hf(ids, attention_mask=mask, position_ids=pos).logits
        assert not got.isnan().any()
        for i, r in enumerate(rows):
            alone = ours(r[None])[0]
            assert (got[i, T - len(r):] - alone).abs().max() <= 1e-5
            assert (got[i, T - len(r):] - want[i, T - len(r):]).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["llama-gqa-tied", "mistral-window"])
def test_left_padded_batch_equals_transformers_and_single_rows(tmp_path, name):
    left_padded_batch(*ours_and_theirs(tmp_path, name))


def decode_in_steps(ours, after_prompt=lambda cache: cache):
    """Logits of a padded batch read in steps through a KV cache (a prompt, 4 decode steps, a multi-token chunk)
    against the full forward's; after_prompt may swap the cache once the prompt is in."""
    ids = torch.randint(0, 96, (2, 14))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0                               # row 1 is left-padded
    with torch.no_grad():
        full = ours(ids, attention_mask=mask)
        cache = KVCache(ours.config, 2, 14)
        parts = [ours(ids[:, :6], attention_mask=mask[:, :6], cache=cache)]
        cache = after_prompt(cache)
        parts += [ours(ids[:, t:t + 1], cache=cache) for t in range(6, 10)]
        parts += [ours(ids[:, 10:], cache=cache)]  # a multi-token chunk after decoding
    stepped = torch.cat(parts, 1)
    assert (stepped[0] - full[0]).abs().max() <= 1e-5
    assert (stepped[1, 4:] - full[1, 4:]).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["llama-gqa-tied", "mistral-window"])
def test_cached_decode_equals_full_forward(tmp_path, name):
    decode_in_steps(ours_and_theirs(tmp_path, name)[0])


def test_logits_to_keep(tiny_llama):
    folder, _ = tiny_llama
    ours = load(folder)
    ids = torch.randint(0, 96, (3, 9))
    with torch.no_grad():
        full = ours(ids)
        assert torch.allclose(ours(ids, logits_to_keep=1), full[:, -1:], atol=1e-6)
        assert torch.allclose(ours(ids, logits_to_keep=4), full[:, -4:], atol=1e-6)
        assert torch.allclose(ours(ids, logits_to_keep=torch.tensor([0, 5])), full[:, [0, 5]], atol=1e-6)
        per_row = torch.tensor([[1], [4], [8]])
        assert torch.allclose(ours(ids, logits_to_keep=per_row)[:, 0], full[[0, 1, 2], [1, 4, 8]], atol=1e-6)


def test_generate_batched_equals_single_and_uncached(tiny_llama):
    folder, hf = tiny_llama
    ours = load(folder)
    prompts = [[5, 9, 11, 40, 2, 7], [8, 3], [60, 61, 62, 63]]
    batched = generate(ours, prompts, max_new_tokens=8)
    assert batched == [generate(ours, [p], max_new_tokens=8)[0] for p in prompts]
    assert batched == generate(ours, prompts, max_new_tokens=8, use_cache=False)
    for p, new in zip(prompts, batched):   # and greedy equals transformers' own generate
        ref = hf.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert ref[0, len(p):].tolist() == new


def test_generate_stops_and_samples_reproducibly(tiny_llama):
    folder, _ = tiny_llama
    ours = load(folder)
    free = generate(ours, [[5, 6, 7]], max_new_tokens=10)[0]
    stopped = generate(ours, [[5, 6, 7]], max_new_tokens=10, stop_ids={free[2]})[0]
    assert stopped == free[: free.index(free[2]) + 1]
    a = generate(ours, [[5, 6, 7]] * 2, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=3)
    assert a == generate(ours, [[5, 6, 7]] * 2, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=3)
    text = generate(ours, [[5, 6, 7]], max_new_tokens=10, stop_strings=["x"],
                    decode=lambda ids: "".join("x" if i == free[1] else "." for i in ids))[0]
    assert text == free[:2]
    # Looking at the tokens only every few steps (the GPU default) cuts each row at the same stop, sampled too.
    prompts = [[5, 6, 7], [9, 1], [4, 4, 4, 4]]
    for kw in (dict(stop_ids={free[2]}), dict(temperature=1.0, seed=5, stop_ids={free[3], free[5]}),
               dict(stop_strings=["x"], decode=lambda ids: "".join("x" if i == free[4] else "." for i in ids))):
        each = generate(ours, prompts, max_new_tokens=10, **kw)
        assert generate(ours, prompts, max_new_tokens=10, look_every=4, **kw) == each
        assert generate(ours, prompts, max_new_tokens=10, look_every=16, **kw) == each


def test_resid_post_hook_equals_hidden_states(tiny_llama):
    """The hook sites against transformers' hidden_states (docs/conventions.md): resid_pre L = hidden_states[L],
    resid_post L = hidden_states[L + 1] but the last (HF's last entry is after the final norm), and what the sites
    add up to: resid_mid = resid_pre + attn_out, resid_post = resid_mid + mlp_out."""
    folder, hf = tiny_llama
    ours = load(folder)
    ids = torch.randint(0, 96, (2, 7))
    seen = {}
    rec = [(i, site, lambda x, pos, key=(i, site): seen.__setitem__(key, x.detach()))
           for i in range(3) for site in ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")]
    with torch.no_grad(), hooks(ours, rec):
        ours(ids)
        want = hf(ids, output_hidden_states=True).hidden_states   # embeddings, layer 0, 1, norm(layer 2)
    for i in range(3):
        assert (seen[i, "resid_pre"] - want[i]).abs().max() <= 1e-5
        assert torch.equal(seen[i, "resid_mid"], seen[i, "resid_pre"] + seen[i, "attn_out"])
        assert torch.equal(seen[i, "resid_post"], seen[i, "resid_mid"] + seen[i, "mlp_out"])
    for i in range(2):
        assert (seen[i, "resid_post"] - want[i + 1]).abs().max() <= 1e-5
    assert (ours.model.norm(seen[2, "resid_post"]) - want[3]).abs().max() <= 1e-5


def test_hooks_edit_removed_on_exception_and_pass_gradients(tiny_llama):
    folder, _ = tiny_llama
    ours = load(folder)
    ids = torch.randint(0, 96, (1, 6))
    base = ours(ids).detach()
    delta = torch.zeros(64, requires_grad=True)
    positions = []

    def add(x, pos):
        positions.append(pos.clone())
        return x + delta
    with hooks(ours, [(1, "resid_pre", add), (1, "mlp_out", lambda x, pos: None)]):
        out = ours(ids)
        out[0, -1, 3].backward()
    assert delta.grad is not None and delta.grad.abs().sum() > 0
    assert torch.allclose(out, base, atol=1e-6)                    # delta = 0 changes nothing
    assert positions[0].tolist() == [list(range(6))]
    with pytest.raises(RuntimeError, match="boom"):
        with hooks(ours, [(0, "attn_out", lambda x, pos: x * 0)]):
            assert not torch.allclose(ours(ids), base, atol=1e-3)
            raise RuntimeError("boom")
    assert all(not fns for block in ours.layers for fns in block.hooks.values())
    assert torch.equal(ours(ids), ours(ids)) and torch.allclose(ours(ids), base, atol=1e-6)
    with pytest.raises(ValueError, match="unknown hook site"):
        with hooks(ours, [(0, "resid_post", add), (0, "resid_middle", add)]):
            pass
    assert not ours.layers[0].hooks["resid_post"]


def test_bf16_load_and_default_dtype(tiny_llama):
    folder, _ = tiny_llama
    m = load(folder, dtype="bf16")
    assert m.model.embed_tokens.weight.dtype == torch.bfloat16
    assert m(torch.tensor([[1, 2, 3]])).dtype == torch.bfloat16
    assert load(folder).lm_head.weight.dtype == torch.float32   # saved as float32
    assert sum(p.is_meta for p in m.parameters()) == 0 and not m.inv_freq.is_meta
    # eval mode, as from_pretrained: generate replays CUDA graphs only outside training mode (and LoRA dropout)
    assert not m.training and not any(mod.training for mod in m.modules())


# ------------------------------------------------------------------------------------------- bad checkpoints
def rewrite(folder, fn):
    """Apply fn to the state dict of folder's model.safetensors and write it back."""
    from safetensors.torch import save_file
    sd = read_safetensors(folder / "model.safetensors")[0]
    fn(sd)
    save_file(sd, str(folder / "model.safetensors"))


def test_missing_tensor(tiny_llama):
    folder, _ = tiny_llama
    rewrite(folder, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load(folder)


def test_unexpected_tensor(tiny_llama):
    folder, _ = tiny_llama
    rewrite(folder, lambda sd: sd.__setitem__("model.layers.0.self_attn.q_proj.bias", torch.zeros(64)))
    with pytest.raises(ValueError, match=r"model\.safetensors: unexpected tensor.*q_proj\.bias"):
        load(folder)


def test_wrong_shape(tiny_llama):
    folder, _ = tiny_llama
    rewrite(folder, lambda sd: sd.__setitem__("model.norm.weight", torch.ones(63)))
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'model\.norm\.weight' has shape \(63,\)"):
        load(folder)


def test_truncated_file(tiny_llama):
    folder, _ = tiny_llama
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=r"model\.safetensors: truncated: tensor"):
        load(folder)
    f.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(ValueError, match="truncated or not safetensors"):
        load(folder)


def test_pickle_checkpoint_refused(tiny_llama):
    folder, hf = tiny_llama
    (folder / "model.safetensors").unlink()
    torch.save(hf.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin.*arbitrary code"):
        load(folder)
    with pytest.raises(ValueError, match="arbitrary code"):
        load(folder / "pytorch_model.bin")


@pytest.mark.parametrize("change,message", [
    ({"model_type": "gpt2"}, "unknown model_type 'gpt2'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ({"mlp_bias": True}, "mlp_bias=True is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn' is not supported"),
])
def test_config_that_changes_the_math_is_refused(tiny_llama, change, message):
    folder, _ = tiny_llama
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    (folder / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ValueError, match=message):
        load(folder)


def test_sharded_checkpoint(tmp_path):
    hf = make_hf_model("llama")
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = load(tmp_path)
    ids = torch.randint(0, 96, (1, 5))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() <= 1e-5
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"names shard {shard.name}"):
        load(tmp_path)


def test_second_turn_continues_the_cache(tiny_llama):
    """Turn 2 appended to a kept cache equals generating it from the whole conversation re-read from scratch."""
    folder, _ = tiny_llama
    ours = load(folder)
    first = [[5, 9, 11, 40, 7], [8, 3]]
    cache = KVCache(ours.config, 2, 64)
    a1 = generate(ours, first, max_new_tokens=6, stop_ids={a for a in range(20, 40)}, cache=cache)
    second = [[12, 13, 14], [15, 16]]
    a2 = generate(ours, second, max_new_tokens=5, cache=cache)
    for i in range(2):
        whole = first[i] + a1[i] + second[i]
        assert generate(ours, [whole], max_new_tokens=5)[0] == a2[i]
    assert cache.next_pos.tolist() == [len(first[i] + a1[i] + second[i] + a2[i]) for i in range(2)]


def test_a_rewound_row_continues_as_if_its_later_tokens_were_never_read(tiny_llama):
    """KVCache.rewind(keep): row r keeps its first keep[r] tokens; a turn appended after it equals generating from
    those tokens + the new ones re-read from scratch, whatever the rows held after keep[r]."""
    folder, _ = tiny_llama
    ours = load(folder)
    first = [[5, 9, 11, 40, 7], [8, 3, 4]]
    cache = KVCache(ours.config, 2, 64)
    a1 = generate(ours, first, max_new_tokens=6, cache=cache)
    keep = [3, len(first[1]) + 2]                   # row 0 forgets part of its prompt, row 1 part of its answer
    cache.rewind(keep)
    second = [[12, 13, 14], [15, 16]]
    a2 = generate(ours, second, max_new_tokens=5, cache=cache)
    for i in range(2):
        whole = (first[i] + a1[i])[: keep[i]] + second[i]
        assert generate(ours, [whole], max_new_tokens=5)[0] == a2[i]
    assert cache.next_pos.tolist() == [keep[i] + len(second[i] + a2[i]) for i in range(2)]


def test_generate_leaves_no_autograd_graph_in_a_kept_cache(tiny_llama):
    # Outside no_grad a kept cache written from grad-requiring tensors held every step's graph (2 GB a batch).
    folder, _ = tiny_llama
    ours = load(folder)
    assert all(p.requires_grad for p in ours.parameters())
    cache = KVCache(ours.config, 1, 12)
    generate(ours, [[5, 6, 7]], max_new_tokens=4, cache=cache)
    assert not cache.k.requires_grad and cache.k.grad_fn is None and cache.len == 7


# ---------------------------------------------------------------------------------- head-level and MLP sites
# Each family whose attention or MLP differs: GQA Llama, Qwen2's q/k/v biases, Gemma-2's softcap, sandwich norms and
# sliding window, MPT's ALiBi and ungated MLP, Llama with an o_proj bias.
INNER_CONFIGS = {"llama-gqa": ("llama", {}), "llama-o-bias": ("llama", dict(attention_bias=True)),
                 "qwen2": ("qwen2", {}), "gemma2": ("gemma2", dict(sliding_window=4, query_pre_attn_scalar=16)),
                 "mpt": ("mpt", {})}


def inner_pair(tmp_path, name):
    mt, over = INNER_CONFIGS[name]
    hf = make_hf_model(mt, attn_implementation="eager", **over)
    return load(save_hf_model(hf, tmp_path / name), dtype="fp32"), hf


def hf_parts(hf):
    """transformers' (layers, attention module name, o_proj, down_proj) of each layer, MPT's named its own way."""
    if hf.config.model_type == "mpt":
        return [(b, b.attn, b.attn.out_proj, b.ffn.down_proj) for b in hf.transformer.blocks]
    return [(b, b.self_attn, b.self_attn.o_proj, b.mlp.down_proj) for b in hf.model.layers]


@pytest.mark.parametrize("name", INNER_CONFIGS)
def test_inner_sites_equal_transformers(tmp_path, name):
    """z summed through o_proj is what attention adds (before Gemma's post-norm); the pattern is transformers' eager
    attention weights; mlp_post is what transformers' down_proj reads; and a forward without a pattern hook never
    writes the attention out (SDPA stays, where the family uses it)."""
    ours, hf = inner_pair(tmp_path, name)
    ids = torch.randint(0, 96, (2, 9))
    seen, down_in = {}, {}
    rec = [(i, site, lambda x, pos, key=(i, site): seen.__setitem__(key, x.detach()))
           for i in range(3) for site in ("z", "pattern", "mlp_post", "attn_out", "mlp_out", "resid_mid")]
    handles = [down.register_forward_pre_hook(lambda m, a, i=i: down_in.__setitem__(i, a[0].detach()))
               for i, (_, _, _, down) in enumerate(hf_parts(hf))]
    with torch.no_grad(), hooks(ours, rec):
        ours(ids)
        want = hf(ids, output_attentions=True).attentions
    for h in handles:
        h.remove()
    nh, hd = ours.config.num_attention_heads, ours.config.head_dim
    for i, block in enumerate(ours.layers):
        o = block.self_attn.o_proj
        z = seen[i, "z"]
        assert z.shape == (2, 9, nh, hd) and seen[i, "pattern"].shape == (2, nh, 9, 9)
        per_head = torch.einsum("btnh,dnh->btnd", z, o.weight.view(-1, nh, hd))      # each head's write to the stream
        attn = per_head.sum(2) + (o.bias if o.bias is not None else 0)
        if ours.config.sandwich_norms:
            attn = block.post_attention_layernorm(attn)
        assert (attn - seen[i, "attn_out"]).abs().max() <= 1e-5
        assert (seen[i, "pattern"] - want[i]).abs().max() <= 1e-5
        assert (seen[i, "mlp_post"] - down_in[i]).abs().max() <= 1e-5
    calls = []
    import model as model_module
    real = model_module.plain_attention
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr(model_module, "plain_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
        ours(ids)
        written_out = len(calls)
        with hooks(ours, [(1, "pattern", lambda x, pos: None)]):
            ours(ids)
    assert written_out == 0 and len(calls) == 1     # SDPA (or the family's own plain path) unless a pattern is asked


@pytest.mark.parametrize("name", ["llama-gqa", "gemma2", "mpt"])
def test_inner_sites_are_writable(tmp_path, name):
    """Zeroing head 1's z at layer 1 equals transformers with that head's o_proj columns zeroed; zeroing MLP neuron
    5's mlp_post equals its down_proj column zeroed; a pattern hook returning its input changes nothing, and one
    putting all of a query's weight on itself equals z = v (each head's own value)."""
    ours, hf = inner_pair(tmp_path, name)
    hd = ours.config.head_dim
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        base = ours(ids)

        def zero_head(z, pos):
            z = z.clone()
            z[:, :, 1] = 0
            return z

        def zero_neuron(h, pos):
            h = h.clone()
            h[..., 5] = 0
            return h
        with hooks(ours, [(1, "z", zero_head), (2, "mlp_post", zero_neuron)]):
            got = ours(ids)
        _, _, o, down = hf_parts(hf)[1]
        o.weight[:, hd: 2 * hd] = 0
        hf_parts(hf)[2][3].weight[:, 5] = 0
        assert (got - hf(ids).logits).abs().max() <= 1e-5
        assert (got - base).abs().max() > 1e-3
        with hooks(ours, [(i, "pattern", lambda p, pos: p) for i in range(3)]):
            assert (ours(ids) - base).abs().max() <= 1e-5
        seen = {}

        def diagonal(p, pos):
            return torch.eye(p.shape[-1]).expand_as(p)
        with hooks(ours, [(0, "pattern", diagonal), (0, "z", lambda z, pos: seen.__setitem__("z", z))]):
            ours(ids)
        x = ours.layers[0].input_layernorm(ours.model.embed_tokens(ids) * (
            ours.embed_scale if ours.config.embed_scale else 1))
        v = ours.layers[0].self_attn.v_proj(x).view(2, 9, ours.config.num_key_value_heads, hd)
        g = ours.config.num_attention_heads // ours.config.num_key_value_heads
        assert (seen["z"] - v.repeat_interleave(g, dim=2)).abs().max() <= 1e-5


def test_inner_hooks_are_removed_and_checked(tiny_llama):
    folder, _ = tiny_llama
    ours = load(folder)
    ids = torch.randint(0, 96, (1, 6))
    base = ours(ids).detach()
    with pytest.raises(RuntimeError, match="boom"):
        with hooks(ours, [(0, "z", lambda z, pos: z * 0), (2, "pattern", lambda p, pos: p * 0),
                          (1, "mlp_post", lambda h, pos: h * 0)]):
            raise RuntimeError("boom")
    assert not ours.hooked and torch.allclose(ours(ids), base, atol=1e-6)
    with pytest.raises(ValueError, match="unknown hook site 'hook_z'.*'z', 'pattern', 'mlp_post'"):
        with hooks(ours, [(0, "hook_z", lambda z, pos: None)]):
            pass
    with pytest.raises(ValueError, match="layer 3: the model has 3 layers"):
        with hooks(ours, [(0, "z", lambda z, pos: None), (3, "z", lambda z, pos: None)]):
            pass
    assert not ours.hooked
    # Under a KV cache a decode step's pattern covers every key held: (B, nh, 1, S)
    shapes = []
    cache = KVCache(ours.config, 1, 8)
    with torch.no_grad(), hooks(ours, [(0, "pattern", lambda p, pos: shapes.append(tuple(p.shape)))]):
        ours(ids, cache=cache)
        ours(ids[:, :1], cache=cache)
    assert shapes == [(1, 4, 6, 6), (1, 4, 1, 7)]


def test_forward_can_begin_at_a_layer(tiny_llama):
    """begin=(layer, resid_pre of that layer) gives the full forward's logits, from a cache's fork too."""
    folder, _ = tiny_llama
    ours = load(folder)
    ids = torch.randint(0, 96, (2, 8))
    seen = {}
    with torch.no_grad():
        with hooks(ours, [(i, "resid_pre", lambda x, pos, i=i: seen.__setitem__(i, x)) for i in range(3)]):
            full = ours(ids)
        for i in range(3):
            assert (ours(ids, begin=(i, seen[i])) - full).abs().max() <= 1e-5
        cache = KVCache(ours.config, 2, 8)
        ours(ids, cache=cache)
        fork = cache.fork([0, 1], 3, length=5)
        assert fork.next_pos.tolist() == [5, 5]
        assert (ours(ids[:, 5:], cache=fork, begin=(2, seen[2][:, 5:])) - full[:, 5:]).abs().max() <= 1e-5
