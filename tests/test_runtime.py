"""runtime/: the speed applied from outside gives the numbers of the plain model. Packed linears (bit for bit in
bf16 where packed_matches_plain says so), the attention kernels (plain_attention against SDPA), the decode steps,
the static KV cache and the compiled forward."""
import pytest
import torch

from conftest import make_hf_model, save_hf_model
from lora import LoRALinear, add_lora
from model import KVCache, Transformer, generate, load, plain_attention
from runtime import accelerate
from runtime.compile import compile_for_inference
from runtime.cpu import (AMX, PackedLinear, is_packed, packable, packed, packed_matches_plain, packs_exactly,
                         use_cpu_kernels)
from runtime.gpu import StaticKVCache
from test_model import CONFIGS, decode_in_steps, ours_and_theirs

F = torch.nn.functional


def plain_generate(model, prompts, n):
    """generate with the model's own decode steps, whatever runtime/ set on it."""
    swapped = model.__dict__.pop("decoder", None)
    try:
        return generate(model, prompts, n)
    finally:
        if swapped is not None:
            model.decoder = swapped


def test_plain_attention_equals_sdpa():
    """The written-out attention (decode steps and compiled forwards on a CPU without AMX) against SDPA, with every
    mask the model makes: causal, none (one query), and bool (padding, a window, queries after a cache)."""
    B, nh, nkv, hd = 3, 6, 2, 8
    for T, S, mask in [(7, 7, "causal"), (1, 9, None), (1, 9, torch.rand(B, 1, 1, 9) > 0.3),
                       (7, 7, torch.rand(B, 1, 7, 7) > 0.3), (4, 11, torch.rand(B, 1, 4, 11) > 0.3)]:
        if isinstance(mask, torch.Tensor):
            mask[..., -1] = True                    # no query without a key (SDPA would give NaN)
        q, k, v = torch.randn(B, nh, T, hd), torch.randn(B, nkv, S, hd), torch.randn(B, nkv, S, hd)
        want = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1),
                                              attn_mask=None if isinstance(mask, str) else mask,
                                              is_causal=isinstance(mask, str))
        got = plain_attention(q, k, v, mask)
        assert got.shape == want.shape and (got - want).abs().max() <= 1e-5, (T, S)
        got = plain_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)
        assert got.dtype == torch.bfloat16 and (got.float() - want).abs().max() <= 0.05


@pytest.mark.parametrize("name", ["llama-gqa-tied", "mistral-window"])
def test_machine_kernels_give_the_same_logits_and_tokens(tmp_path, name):
    """accelerate() sets this machine's attention kernel and decode steps: fp32 logits within 1e-5 of the plain
    model's, padded and cached, and the same greedy tokens."""
    ours, _ = ours_and_theirs(tmp_path, name)
    ids = torch.randint(3, 96, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    with torch.no_grad():
        plain = ours(ids, attention_mask=mask)
        tokens = generate(ours, prompts, 20)
        fast = accelerate(ours, prepack=False)
        assert fast is ours and (fast(ids, attention_mask=mask) - plain).abs().max() <= 1e-5
        cache = KVCache(ours.config, 3, 12)
        steps = [ours(ids[:, :6], attention_mask=mask[:, :6], cache=cache)]
        steps += [ours(ids[:, t:t + 1], cache=cache) for t in range(6, 12)]
        assert (torch.cat(steps, 1) - plain)[mask.bool()].abs().max() <= 1e-5
        assert generate(ours, prompts, 20) == tokens
    assert all(b.self_attn.attend.__name__ == ("sdpa_attention" if AMX else "cpu_attention") for b in ours.layers)


@pytest.mark.parametrize("name", ["llama-gqa-tied", "mistral-window"])
def test_static_cache_decode_equals_full_forward(tmp_path, name):
    """After the prompt, the cache a CUDA graph replays on (slots on the device, every slot read, unfilled ones
    masked) gives the full forward's logits, for decode steps and a multi-token chunk."""
    decode_in_steps(ours_and_theirs(tmp_path, name)[0], after_prompt=StaticKVCache)


@pytest.mark.parametrize("compiled", [False, True])
def test_logits_to_keep_gives_the_full_forwards_rows(tmp_path, compiled):
    """Eager: exactly the full forward's rows (bf16, bit for bit). Compiled, with this CPU's kernels: the same
    within 1e-5 in fp32. With padding, a sliding window, negative positions and a KV cache."""
    dtype = "fp32" if compiled else "bf16"
    ours = load(save_hf_model(make_hf_model("mistral", sliding_window=5), tmp_path / "m"), dtype=dtype)
    fast = accelerate(ours, prepack=False, compile=True) if compiled else ours
    ids = torch.randint(3, 96, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    same = (lambda a, b: (a - b).abs().max() <= 1e-5) if compiled else torch.equal
    with torch.no_grad():
        for m in (None, mask):
            full = ours(ids, attention_mask=m)
            assert same(fast(ids, attention_mask=m, logits_to_keep=1), full[:, -1:])
            assert same(fast(ids, attention_mask=m, logits_to_keep=torch.tensor([2, -1])), full[:, [2, -1]])
        cache = KVCache(ours.config, 3, 12, dtype=full.dtype)
        fast(ids[:, :5], attention_mask=mask[:, :5], cache=cache)
        assert same(fast(ids[:, 5:], cache=cache, logits_to_keep=2), full[:, -2:])


@pytest.mark.slow
def test_compiled_forward_freezes_weights_and_equals_eager(tmp_path):
    """compile_for_inference on the CPU: the weights really become graph constants that inductor prepacks (with
    torch.compile's freezing option alone they did not), and the logits equal the eager ones, padded or not."""
    from torch._dynamo.utils import counters
    from torch._inductor import config as inductor_config
    ours, _ = ours_and_theirs(tmp_path, "mistral-window")      # GQA, and a window shorter than the rows
    ids = torch.randint(3, 96, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    use_cpu_kernels(ours)
    fast = compile_for_inference(ours)
    counters.clear()
    with torch.no_grad(), inductor_config.patch(force_disable_caches=True):
        for kwargs in (dict(), dict(attention_mask=mask, logits_to_keep=1)):
            want, got = ours(ids, **kwargs), fast(ids, **kwargs)
            assert (got - want).abs().max() <= 1e-5, kwargs
    if torch.backends.mkldnn.is_available():
        assert counters["inductor"]["mkldnn_linear_weight_pack_matcher_count"] > 0


def projection(m: Transformer, layer: int, name: str):
    block = m.layers[layer]
    return getattr(block.self_attn, name) if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) \
        else getattr(block.mlp, name)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="packing needs oneDNN")
@pytest.mark.parametrize("name", ["llama-gqa-tied", "mistral-window"])
def test_packed_weights_are_the_same_numbers(tmp_path, name):
    """Forwards with PackedLinear swapped in for the projections on a CPU: the same logits bit for bit in bf16
    wherever packed_matches_plain says so (close elsewhere, and in fp32), the same tokens, the plain modules back
    afterwards, and LoRA-wrapped projections left alone."""
    mt, over = CONFIGS[name]
    folder = save_hf_model(make_hf_model(mt, **over), tmp_path / name)
    for dtype in ("bf16", "fp32"):
        m = load(folder, dtype=dtype)
        if not packable(m):                      # bf16 on a CPU without oneDNN bf16 kernels: nothing to test
            assert dtype == "bf16" and not packs_exactly(m, 1)
            continue
        keys = list(m.state_dict())
        for rows in (1, 2, 33, 96):              # decode steps of 1 and 2 rows; prompts of 33 and 96 rows
            ids = torch.randint(0, 96, (rows, 1) if rows < 3 else (3, rows // 3))
            with torch.no_grad():
                plain = m(ids)
                with packed(m):
                    assert isinstance(m.layers[0].self_attn.q_proj, PackedLinear)
                    assert isinstance(m.lm_head, PackedLinear) and list(m.state_dict()) == keys
                    fast = m(ids)
            # The promise generate's default rests on; with AMX, bf16 products of 33+ rows keep the plain weights.
            if dtype == "bf16" and (packed_matches_plain(m, rows) or AMX and rows > 32):
                assert torch.equal(fast, plain), rows
            else:                                # a bf16 step here and there
                assert (fast.float() - plain.float()).abs().max() <= (1e-5 if dtype == "fp32" else 0.05), rows
        assert type(m.layers[0].mlp.gate_proj) is torch.nn.Linear and not is_packed(m)
        prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
        with packed(m):
            assert generate(m, prompts, 12) == generate(m, prompts, 12) == plain_generate(m, prompts, 12)
        want = generate(m, prompts, 12)
        assert want == plain_generate(m, prompts, 12)
        use_cpu_kernels(m)                       # the decode steps: packed where packs_exactly (bf16)
        assert generate(m, prompts, 20) == plain_generate(m, prompts, 20)
        assert packs_exactly(m, 2) == (dtype == "bf16" and torch.ops.mkldnn._is_mkldnn_bf16_supported()
                                       and packed_matches_plain(m, 2))
    ids = torch.randint(0, 96, (3, 11))
    add_lora(m, targets=("q_proj", "down_proj"), layers=[0])   # a wrapper runs its own forward: not packed
    m.layers[0].self_attn.q_proj.lora_B.data.normal_()
    with torch.no_grad():
        plain = m(ids)
        with packed(m):
            assert isinstance(m.layers[0].self_attn.q_proj, LoRALinear)
            assert isinstance(m.layers[0].mlp.down_proj, LoRALinear)
            assert isinstance(m.layers[0].self_attn.o_proj, PackedLinear)
            assert isinstance(m.layers[1].self_attn.q_proj, PackedLinear)
            assert torch.allclose(m(ids), plain, atol=1e-5)
    with packed(m):
        with packed(m):                          # nested: the outer one's modules stay
            pass
        assert isinstance(m.layers[1].self_attn.q_proj, PackedLinear)
        assert m(ids).requires_grad              # gradients recorded: the plain weights, which have them
        with torch.no_grad():
            m.layers[1].mlp.up_proj.weight.mul_(2)       # edited in place: the stale copy is no longer used
            edited = m(ids)
        assert not torch.allclose(edited, plain, atol=1e-3)
    with torch.no_grad():
        assert torch.allclose(m(ids), edited, atol=1e-5)
    fresh = load(folder, dtype="fp32")
    zero = lambda mod, args, out: out * 0       # noqa: E731
    with torch.no_grad(), packed(fresh):   # changed after packing: a LoRA wrapper, a module hook
        add_lora(fresh, targets=("v_proj",), layers=[1])
        fresh.layers[1].self_attn.v_proj.lora_B.normal_()
        hook = fresh.layers[0].mlp.down_proj.register_forward_hook(zero)   # on the PackedLinear: it fires
        got = fresh(ids)
        hook.remove()
        unhooked = fresh(ids)
    assert isinstance(fresh.layers[1].self_attn.v_proj, LoRALinear) and not is_packed(fresh)
    hook = fresh.layers[0].mlp.down_proj.register_forward_hook(zero)       # the same hook on the plain module
    with torch.no_grad():
        assert torch.allclose(got, fresh(ids), atol=1e-5)
        hook.remove()
        assert not torch.allclose(got, fresh(ids), atol=1e-3) and torch.allclose(unhooked, fresh(ids), atol=1e-5)
    moved = load(folder, dtype="fp32")
    with torch.no_grad(), packed(moved):
        want = moved(ids)
        got = moved.double()(ids)               # moved to another dtype: each weight has new storage
        assert got.dtype == torch.float64 and torch.allclose(got.float(), want, atol=1e-5)
    with pytest.raises(ZeroDivisionError), packed(m):
        1 / 0
    assert not is_packed(m)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="packing needs oneDNN")
def test_packed_matches_plain_sees_a_kernel_that_rounds_differently(tiny_llama, monkeypatch):
    """The probe behind generate's default compares real products: a packed kernel one rounding off is caught,
    and the verdict is kept per shape, row count and dtype."""
    import runtime.cpu as M
    m = load(tiny_llama[0], dtype="bf16")
    if not M.packable(m):                        # no oneDNN bf16 kernels on this CPU
        m = load(tiny_llama[0], dtype="fp32")
    monkeypatch.setattr(M, "MATCHES", {})
    first = M.packed_matches_plain(m, 3)
    assert M.packed_matches_plain(m, 3) == first and len(M.MATCHES) == 1
    exact = M.onednn_linear
    monkeypatch.setattr(M, "onednn_linear", lambda x, p: exact(x, p) * (1 + 2 ** -6))   # off by ~2 bf16 steps
    assert not M.packed_matches_plain(m, 4) and len(M.MATCHES) == 2
    assert not M.packs_exactly(m, 4)
