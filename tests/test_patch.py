"""patch.py: activation patching, attribution patching and the logit lens, against transformers' forward with its
own hooks (the TransformerLens-style loop: one forward per patch) on tiny random models."""
import pytest
import torch

from conftest import make_hf_model, save_hf_model
from model import hooks, load
from patch import (Patch, attribution, layer_head_patches, layer_position_patches, logit_lens, normalized,
                   record_run, sweep)

pytestmark = pytest.mark.usefixtures("one_thread")
FAMILIES = {"llama": {}, "qwen2": {}, "gemma2": dict(sliding_window=4, query_pre_attn_scalar=16)}
ANSWER = (7, 11)


@pytest.fixture(params=list(FAMILIES))
def pair(request, tmp_path):
    """(ours, hf, source ids, destination ids): two random 10-token prompts that share their last 5 tokens."""
    hf = make_hf_model(request.param, attn_implementation="eager", **FAMILIES[request.param])
    ours = load(save_hf_model(hf, tmp_path / request.param), dtype="fp32")
    g = torch.Generator().manual_seed(1)
    tail = torch.randint(3, 96, (5,), generator=g).tolist()
    src = torch.randint(3, 96, (5,), generator=g).tolist() + tail
    dst = torch.randint(3, 96, (5,), generator=g).tolist() + tail
    return ours, hf, src, dst


def hf_logodds(hf, ids, pre_hooks=()):
    """transformers' answer log-odds with forward pre-hooks [(module, fn(args) -> args)] installed for one forward."""
    handles = [m.register_forward_pre_hook(fn) for m, fn in pre_hooks]
    try:
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, -1]
    finally:
        for h in handles:
            h.remove()
    return float(logits[ANSWER[0]] - logits[ANSWER[1]])


def replace_at(index, value):
    """A pre-hook writing value into the first argument at [0, index] (hidden states, or o_proj's input)."""
    def fn(module, args):
        x = args[0].clone()
        x[(0, *index)] = value
        return (x, *args[1:])
    return fn


def test_sweeps_equal_the_one_forward_per_patch_loop_in_transformers(pair):
    """Every layer x position patch of resid_pre, and every layer x head patch of z (all positions, and the last
    position only), batched with the shared prefix read once, equal transformers run once per patch with a hook."""
    ours, hf, s_ids, d_ids = pair
    src, dst = record_run(ours, s_ids, ANSWER), record_run(ours, d_ids, ANSWER)
    assert abs(dst.logodds - hf_logodds(hf, d_ids)) <= 1e-4
    with torch.no_grad():
        hs = hf(torch.tensor([s_ids]), output_hidden_states=True).hidden_states     # hs[l] = block l's input
    patches = layer_position_patches(ours, dst, "resid_pre")
    got = sweep(ours, src, dst, patches, token_budget=40)                            # several batches per group
    for patch, value in zip(patches, got.tolist()):
        p = patch.positions[0]
        want = hf_logodds(hf, d_ids, [(hf.model.layers[patch.layer], replace_at((p,), hs[patch.layer][0, p]))])
        assert abs(value - want) <= 1e-4, patch
    # z: transformers' o_proj input holds the heads side by side; the source's is read with a hook
    hd = ours.config.head_dim
    o_in = {}
    handles = [b.self_attn.o_proj.register_forward_pre_hook(lambda m, a, l=l: o_in.__setitem__(l, a[0][0].clone()))
               for l, b in enumerate(hf.model.layers)]
    hf_logodds(hf, s_ids)
    for h in handles:
        h.remove()
    for positions in (None, (len(d_ids) - 1,)):
        patches = layer_head_patches(ours, "z", positions=positions)
        got = sweep(ours, src, dst, patches)
        for patch, value in zip(patches, got.tolist()):
            cols = slice(patch.head * hd, (patch.head + 1) * hd)
            rows = slice(None) if positions is None else positions[0]
            o = hf.model.layers[patch.layer].self_attn.o_proj
            want = hf_logodds(hf, d_ids, [(o, replace_at((rows, cols), o_in[patch.layer][rows, cols]))])
            assert abs(value - want) <= 1e-4, patch


def test_whole_stream_patch_gives_the_source_and_no_patch_changes_nothing(pair):
    ours, _, s_ids, d_ids = pair
    src, dst = record_run(ours, s_ids, ANSWER, name="p"), record_run(ours, d_ids, ANSWER, name="p")
    L = len(ours.layers)
    whole = [Patch(l, "resid_pre") for l in range(L)] + [Patch(L - 1, "resid_post"), Patch(1, "z"),
                                                            Patch(1, "mlp_post"), Patch(2, "pattern")]
    got = sweep(ours, src, dst, whole)
    assert (got[: L + 1] - src.logodds).abs().max() <= 1e-4            # the whole stream carries everything
    assert torch.allclose(normalized(got[: L + 1], src, dst), torch.ones(L + 1), atol=1e-4)
    # patching from the destination itself, or at no position, changes nothing
    same = sweep(ours, dst, dst, layer_position_patches(ours, dst, "resid_mid") + layer_head_patches(ours, "z"))
    assert (same - dst.logodds).abs().max() <= 1e-4
    assert sweep(ours, src, dst, [Patch(0, "resid_pre", ())]).item() == dst.logodds


def test_end_alignment_and_bad_input(pair):
    """Unequal lengths: an error naming the pair, unless align="end" (position -k from -k); unknown sites, heads out
    of range, heads at a site without heads: one clear error each."""
    ours, hf, s_ids, d_ids = pair
    longer = record_run(ours, [5, 6, 7] + s_ids, ANSWER, name="opinion/3")
    dst = record_run(ours, d_ids, ANSWER, name="opinion/3")
    with pytest.raises(ValueError, match=r"pair opinion/3: the source has 13 tokens and the destination 10.*align='end'"):
        sweep(ours, longer, dst, [Patch(1, "resid_pre", (9,))])
    with pytest.raises(ValueError, match="pair opinion/3.*equal length"):
        attribution(ours, longer, dst, "pattern", align="end")
    T = len(d_ids)
    got = sweep(ours, longer, dst, [Patch(1, "resid_pre", (T - 1,)), Patch(1, "resid_pre", (-1,)),
                                    Patch(2, "resid_pre")], align="end")
    with torch.no_grad():
        hs = hf(torch.tensor([[5, 6, 7] + s_ids]), output_hidden_states=True).hidden_states
    want = hf_logodds(hf, d_ids, [(hf.model.layers[1], replace_at((T - 1,), hs[1][0, -1]))])
    assert abs(got[0] - want) <= 1e-4 and got[0] == got[1]
    want = hf_logodds(hf, d_ids, [(hf.model.layers[2], replace_at((slice(None),), hs[2][0, 3:]))])
    assert abs(got[2] - want) <= 1e-4
    for patch, message in ((Patch(0, "hook_z"), "unknown site 'hook_z'"), (Patch(0, "z", None, 4), "head 4 out of range"),
                           (Patch(0, "resid_pre", None, 0), "site 'resid_pre' has no heads"),
                           (Patch(3, "z"), "layer 3 out of range"), (Patch(0, "z", (10,)), "position 10 out of range")):
        with pytest.raises(ValueError, match=message):
            sweep(ours, dst, dst, [patch])
    with pytest.raises(ValueError, match="no difference to recover"):
        normalized(torch.zeros(1), dst, dst)


def test_attribution_is_the_linear_term_of_exact_patching(pair):
    """For each site, the attribution estimate equals the derivative of exact patching along the patch,
    d/de log-odds(destination + e (source - destination)) at e = 0 (central differences), at every layer and
    position (and head); the estimates sum over positions to the whole-site patch's derivative too."""
    ours, _, s_ids, d_ids = pair
    src, dst = record_run(ours, s_ids, ANSWER), record_run(ours, d_ids, ANSWER)
    eps = 1e-2
    for site in ("resid_pre", "z", "pattern", "mlp_post"):
        est = attribution(ours, src, dst, site)
        T = len(d_ids)
        assert est.shape == ((3, T, 4) if site in ("z", "pattern") else (3, T))
        for layer in range(3):
            for p in (0, 4, T - 1):
                def moved(e, p=p):
                    def fn(x, pos):
                        y = x.transpose(1, 2).clone() if site == "pattern" else x.clone()
                        y[0, p] += e * (src.acts[layer, site][p] - y[0, p])
                        return y.transpose(1, 2) if site == "pattern" else y
                    with torch.no_grad(), hooks(ours, [(layer, site, fn)]):
                        logits = ours(torch.tensor([d_ids]), logits_to_keep=1)[0, -1]
                    return float(logits[ANSWER[0]] - logits[ANSWER[1]])
                slope = (moved(eps) - moved(-eps)) / (2 * eps)
                got = est[layer, p].sum().item()
                assert abs(got - slope) <= 2e-3 * max(1.0, abs(slope)), (site, layer, p, got, slope)


def test_logit_lens_equals_transformers_hidden_states_through_norm_and_head(pair):
    ours, hf, s_ids, d_ids = pair
    seqs = [s_ids, d_ids[3:]]                                     # two lengths: left padding in one batch
    tokens = [7, 11, 40]
    lens = logit_lens(ours, seqs, tokens)
    assert lens.shape == (2, 3, 3)
    cap = ours.config.final_softcap
    for n, ids in enumerate(seqs):
        with torch.no_grad():
            out = hf(torch.tensor([ids]), output_hidden_states=True)
            assert (lens[n, -1] - out.logits[0, -1].log_softmax(-1)[tokens]).abs().max() <= 1e-4
            for layer in range(2):   # hidden_states[l + 1] is block l's output (the last entry is normed already)
                z = hf.lm_head(hf.model.norm(out.hidden_states[layer + 1][0, -1]))
                z = z if cap is None else cap * torch.tanh(z / cap)
                assert (lens[n, layer] - z.log_softmax(-1)[tokens]).abs().max() <= 1e-4
