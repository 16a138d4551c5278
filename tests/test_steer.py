"""Steering on tiny random models: recording, vectors, addition, ablation, orthogonalization, and a peer check of
the mean-difference vector against transformers' hidden states."""
import json

import numpy as np
import pytest
import torch

import chat
import probes
import steer
from lab import results
from chat import load_tokenizer
from conftest import make_bpe_tokenizer, make_hf_model, make_sp_tokenizer, save_hf_model
from model import KVCache, load, pad_left
from runtime.session import open_session
from studies import steering


@pytest.fixture(scope="module")
def env(tiny_chat):
    folder, hf = tiny_chat
    model, tok = load(folder), load_tokenizer(folder)
    return model, tok, chat.get_chat_format("chatml"), hf


def items(n=6, seed=0):
    return [it for it in probes.opinion_probes(n, seed) if it["opinion"] is not None]


def logits(model, x, mask=None):
    with torch.no_grad():
        return model(x, attention_mask=mask).float()


# ------------------------------------------------------------------------------------------------ read position

@pytest.mark.parametrize("fmt_name", list(chat.CHAT_FORMATS))
@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_read_position_is_the_answer_letter_in_every_chat_format(fmt_name, kind, tmp_path):
    folder = make_bpe_tokenizer(tmp_path) if kind == "bpe" else make_sp_tokenizer(tmp_path)
    if kind == "sentencepiece":
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    tok = chat.load_tokenizer(folder)
    fmt = chat.get_chat_format(fmt_name)
    pairs = steer.ab_pairs(tok, fmt, items())
    assert pairs
    for p, it in zip(pairs, items()):
        r = p["read"]
        assert tok.decode([p["pos"][r]]).strip() == it["match"]       # the letter, not "(" or a template token
        assert tok.decode([p["neg"][r]]).strip() != it["match"]
        assert p["pos"][:r] == p["neg"][:r]                            # everything before it is shared
        header = steer.assistant_header(tok, fmt)
        assert r >= steer.header_end(p["pos"], header) > 0               # after the question's own "(A)" lines


def test_a_prompt_without_the_letter_names_the_item(env):
    model, tok, fmt, _ = env
    ids = tok.encode(fmt([{"role": "user", "content": "(A) yes (B) no"}], prefill="maybe"))
    with pytest.raises(ValueError, match="item-7: no token 'A' after the assistant header"):
        steer.letter_position(tok, ids, "A", steer.assistant_header(tok, fmt), "item-7")


# ----------------------------------------------------------------------------------------------------- recording

def test_recorded_activations_equal_the_hidden_states_of_a_plain_forward(env):
    model, tok, fmt, hf = env
    seqs = [tok.encode(fmt([{"role": "user", "content": q}])) for q in ("hello world", "What is the capital?")]
    got = steer.record(model, seqs, [-1, [2, 3, 4]], [0, 1], progress=None)
    with torch.no_grad():
        h0 = hf(torch.tensor([seqs[0]]), output_hidden_states=True).hidden_states
        h1 = hf(torch.tensor([seqs[1]]), output_hidden_states=True).hidden_states
    for j, layer in enumerate([0, 1]):   # hidden_states[l + 1] is the output of block l (before the final norm)
        torch.testing.assert_close(got[0, j], h0[layer + 1][0, -1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1, j], h1[layer + 1][0, 2:5].mean(0), atol=1e-5, rtol=1e-5)


def test_mean_difference_vector_agrees_with_a_transformers_peer(env):
    """Peer check: the CAA vector computed independently from transformers' hidden states."""
    model, tok, fmt, hf = env
    pairs = steer.ab_pairs(tok, fmt, items(8))
    pos, neg = steer.record_pairs(model, pairs, [0, 1])
    ours = steer.make_vectors(pos, neg)
    peer = torch.zeros(2, model.config.hidden_size, dtype=torch.float64)
    for p in pairs:
        with torch.no_grad():
            hp = hf(torch.tensor([p["pos"]]), output_hidden_states=True).hidden_states
            hn = hf(torch.tensor([p["neg"]]), output_hidden_states=True).hidden_states
        for layer in (0, 1):
            peer[layer] += (hp[layer + 1][0, p["read"]] - hn[layer + 1][0, p["read"]]).double() / len(pairs)
    for layer in (0, 1):
        assert torch.cosine_similarity(ours[layer].double(), peer[layer], dim=0) > 0.9999


def test_pairs_read_through_a_shared_prefix_equal_reading_each_sequence(env):
    model, tok, fmt, _ = env
    pairs = steer.ab_pairs(tok, fmt, items(10))
    pos, neg = steer.record_pairs(model, pairs, [0, 2], token_budget=300)      # several batches, left padding
    every = steer.record(model, [p["pos"] for p in pairs] + [p["neg"] for p in pairs], [p["read"] for p in pairs] * 2,
                       [0, 2], progress=None)
    torch.testing.assert_close(pos, every[: len(pairs)], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(neg, every[len(pairs):], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["mean_diff", "pca", "probe"])
def test_every_method_finds_a_planted_direction(method):
    g = torch.Generator().manual_seed(0)
    d = torch.randn(16, generator=g)
    base = torch.randn(200, 2, 16, generator=g)
    pos = base + 0.3 * torch.randn(200, 2, 16, generator=g) + d * (1 + 0.2 * torch.randn(200, 2, 1, generator=g))
    neg = base + 0.3 * torch.randn(200, 2, 16, generator=g)
    v = steer.make_vectors(pos, neg, method)
    assert v.shape == (2, 16)
    for layer in range(2):
        # signed like the difference, not against it; a probe sees unpaired points, so it is noisier
        assert torch.cosine_similarity(v[layer], d, dim=0) > (0.9 if method == "probe" else 0.97)


# -------------------------------------------------------------------------------------------------- save / load

def test_vectors_round_trip_and_refuse_another_model(env, tmp_path, tiny_llama):
    model, tok, fmt, _ = env
    vec = torch.randn(2, model.config.hidden_size)
    meta = {"model": "tiny", "model_sha256": results.model_id(model.name_or_path)}
    path = steer.save_vectors(tmp_path, "v", vec, [0, 2], torch.tensor([1.0, 2.0]), meta)
    vecs, norms, got_meta = steer.load_vectors(path, model)
    assert torch.equal(vecs[0], vec[0]) and torch.equal(vecs[2], vec[1]) and norms == {0: 1.0, 2: 2.0}
    assert got_meta["model"] == "tiny"
    other = load(tiny_llama[0])          # same width, other weights
    with pytest.raises(ValueError, match="was made from model tiny .*, not the one loaded now"):
        steer.load_vectors(path, other)
    wide = steer.save_vectors(tmp_path, "w", torch.randn(1, 32), [0], torch.ones(1), {})
    with pytest.raises(ValueError, match="32 wide, the model's residual stream is 64"):
        steer.load_vectors(wide, model)
    assert steer.save_vectors(tmp_path, "v", vec, [0, 2], torch.ones(2), meta) != path    # never overwritten
    with pytest.raises(ValueError, match="only .safetensors files"):
        steer.load_vectors(tmp_path / "v.pt", model)


# ------------------------------------------------------------------------------------------------ interventions

def test_zero_vector_changes_nothing(env):
    model, tok, fmt, _ = env
    x = torch.tensor([tok.encode(fmt([{"role": "user", "content": "Is it true?"}], prefill="(A"))])
    base = logits(model, x)
    zero = torch.zeros(model.config.hidden_size)
    for where in ("all", "after_instruction"):
        with steer.steering(model, {0: zero, 2: zero}, where, header=steer.assistant_header(tok, fmt)):
            assert torch.equal(logits(model, x), base)


def test_after_instruction_steers_only_after_the_header(env):
    model, tok, fmt, _ = env
    header = steer.assistant_header(tok, fmt)
    ids = tok.encode(fmt([{"role": "user", "content": "Is it true?"}], prefill="(A) yes"))
    cut = steer.header_end(ids, header)
    x = torch.tensor([ids])
    base = logits(model, x)
    with steer.steering(model, {1: 3 * torch.randn(model.config.hidden_size)}, "after_instruction", header):
        got = logits(model, x)
    assert torch.equal(got[:, :cut], base[:, :cut])          # the instruction is untouched (causal: exactly)
    assert not torch.allclose(got[:, cut:], base[:, cut:])


def steered_decode(model, seqs, plens, vec, where, header, use_cache):
    """Logits at every position of left-padded seqs under steering: in one forward, or prompt then token by token
    through a KV cache."""
    x, mask = pad_left(seqs)
    pad = x.shape[1] - torch.tensor([len(s) for s in seqs])
    with steer.steering(model, vec, where, header=header, start=torch.tensor(plens)), torch.no_grad():
        if not use_cache:
            return model(x, attention_mask=mask).float(), pad
        P = max(int(p) + n for p, n in zip(pad, plens))    # first chunk: every row's whole prompt (header included)
        cache = KVCache(model.config, len(seqs), x.shape[1])
        out = [model(x[:, :P], attention_mask=mask[:, :P], cache=cache).float()]
        for t in range(P, x.shape[1]):
            out.append(model(x[:, t: t + 1], attention_mask=mask[:, t: t + 1], cache=cache).float())
        return torch.cat(out, 1), pad


@pytest.mark.parametrize("where", ["generated", "after_instruction"])
def test_steering_is_exact_under_cache_and_left_padding(env, where):
    model, tok, fmt, _ = env
    header = steer.assistant_header(tok, fmt)
    prompts = [tok.encode(fmt([{"role": "user", "content": q}])) for q in ("Are you sure?", "What is 2 + 2 ok?")]
    conts = [tok.encode("yes I think so"), tok.encode("no it is")]
    conts = [c[:4] for c in conts]
    seqs = [p + c for p, c in zip(prompts, conts)]
    plens = [len(p) for p in prompts]
    vec = {1: 2 * torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1))}
    full, pad = steered_decode(model, seqs, plens, vec, where, header, use_cache=False)
    cached, _ = steered_decode(model, seqs, plens, vec, where, header, use_cache=True)
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)
    for b, s in enumerate(seqs):   # each row alone (no padding) equals its row in the padded batch
        alone, _ = steered_decode(model, [s], [plens[b]], vec, where, header, use_cache=False)
        torch.testing.assert_close(full[b, pad[b]:], alone[0], atol=1e-4, rtol=1e-4)
    # and steering really happened, only where it should
    with torch.no_grad():
        x, mask = pad_left(seqs)
        plain = model(x, attention_mask=mask).float()
    first = pad[0] + (plens[0] if where == "generated" else steer.header_end(seqs[0], header))
    assert torch.equal(plain[0, :first], full[0, :first])
    assert not torch.allclose(plain[0, first:], full[0, first:])


def test_sweep_scores_from_cached_prefixes_equal_full_rereads_and_the_evaluator(env):
    import evaluate
    model, tok, fmt, _ = env
    test = items(6, seed=3)
    cap = steering.capability_items(4, seed=0)
    fast = steering.SweepScorer(model, tok, fmt, test, 3, cap, reuse_prefix=True, n_tokens=4)
    slow = steering.SweepScorer(model, tok, fmt, test, 3, cap, reuse_prefix=False, n_tokens=4)
    vec = {1: 3 * torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(4))}
    with steer.steering(model, vec, "after_instruction", steer.assistant_header(tok, fmt)):
        a, b = fast(model), slow(model)
        rows, _ = evaluate.eval_ab(model, tok, fmt, test)
    assert a["capability"] == b["capability"]
    assert a["kl"] == pytest.approx(b["kl"], abs=1e-5) and max(a["kl"]) > 0
    for x, y, z in zip(a["rows"], b["rows"], rows):
        assert x["p_match"] == pytest.approx(y["p_match"], abs=1e-5)
        assert x["p_match"] == pytest.approx(z["p_match"], abs=1e-5)


def test_ablation_leaves_no_component_along_the_direction(env):
    model, tok, fmt, _ = env
    u = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    x = torch.tensor([tok.encode(fmt([{"role": "user", "content": "hello there, are you sure?"}]))])
    seen = []
    spy = [(l, "resid_post", lambda h, pos: seen.append(h.detach().clone())) for l in range(len(model.layers))]
    from model import hooks
    with steer.ablation(model, u), hooks(model, spy), torch.no_grad():
        model(x)
    unit = u / u.norm()
    for h in seen:
        assert ((h @ unit).abs() / h.norm(dim=-1)).max() < 1e-5


def orthogonalized_equals_ablation(model):
    """orthogonalize(model, u) gives the logits the ablation hooks gave (within 1e-5), which differ from plain ones."""
    x = torch.randint(3, 96, (2, 12))
    u = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    with steer.ablation(model, u):
        hooked = logits(model, x)
    plain = logits(model, x)
    steer.orthogonalize(model, u)
    torch.testing.assert_close(logits(model, x), hooked, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain, hooked)


@pytest.mark.parametrize("tied", [False, True])
def test_orthogonalized_weights_equal_ablation_hooks(tmp_path, tied):
    orthogonalized_equals_ablation(load(save_hf_model(make_hf_model("llama", tie_word_embeddings=tied), tmp_path / "m")))


@pytest.mark.parametrize("name", ["qwen2", "qwen3-attention-bias", "phi3", "mpt"])
def test_orthogonalized_weights_equal_ablation_hooks_in_every_family(tmp_path, name):
    """o_proj's bias is a writer too (attention_bias=true); MPT's LayerNorm and Phi-3's split projections change
    nothing of the rule."""
    from test_families import FAMILIES
    mt, over = FAMILIES[name]
    orthogonalized_equals_ablation(load(save_hf_model(make_hf_model(mt, **over), tmp_path / name)))


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_orthogonalize_refuses_sandwich_norms(tmp_path, name):
    from test_families import FAMILIES
    mt, over = FAMILIES[name]
    model = load(save_hf_model(make_hf_model(mt, **over), tmp_path / name))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="no weight edit removes a direction"):
        steer.orthogonalize(model, torch.ones(64))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_letter_balance_cancels_the_letter_direction():
    """pos - neg = behaviour + (sign of the matching letter) * letter direction: with 3 of 4 pairs matching "A",
    plain CAA keeps half the letter direction; the letter-balanced mean keeps none of it."""
    behaviour, letter = torch.zeros(1, 8), torch.zeros(1, 8)
    behaviour[0, 0], letter[0, 1] = 1.0, 5.0
    sign = torch.tensor([1.0, 1.0, 1.0, -1.0])[:, None, None]          # matching letters A, A, A, B
    pos = torch.zeros(4, 1, 8) + behaviour + sign * letter / 2
    neg = torch.zeros(4, 1, 8) - sign * letter / 2
    plain = steer.make_vectors(pos, neg)
    balanced = steer.make_vectors(pos, neg, groups=["A", "A", "A", "B"])
    assert plain[0, 1] == 2.5 and balanced[0, 1] == 0 and balanced[0, 0] == 1


# ------------------------------------------------------------------------------------------------ end to end

def test_vectors_steer_ablate_runs_write_results(tiny_chat, tmp_path):
    from dataclasses import replace
    cfg = steering.SteerConfig(model=str(tiny_chat[0]), out=str(tmp_path), n=8, n_test=4, n_neutral=3,
                               n_capability=3, mults="-1,0,1", layers="0,2")
    s = open_session(cfg)
    result, path = steering.vectors_run(cfg, s)
    vec_file = path.with_suffix(".safetensors")
    assert vec_file.exists() and path.with_suffix(".png").exists()
    assert result["conventions"]["balanced_by_letter"] and len(result["items"]) == result["conventions"]["n_pairs"]
    assert all(r["read_token"].strip() in "AB" for r in result["items"])
    vecs, norms, _ = steer.load_vectors(vec_file, s.model)
    assert sorted(vecs) == [0, 2] and all(v > 0 for v in norms.values())

    result, path = steering.steer_run(replace(cfg, vector=str(vec_file)), s)
    m = result["metrics"]
    assert m["p_match[L0,m0]"] == m["p_match[base]"] and m["kl[L2,m0]"]["value"] == 0
    assert m["kl[L2,m1]"]["value"] > 0 and "wrong_way[L2]" in m and path.with_suffix(".png").exists()
    assert len(result["items"]) == 2 * 3 * m["p_match[base]"]["n"]

    result, _ = steering.steer_run(replace(cfg, vector=str(vec_file), layers="2", tasks="opinion", n_eval=2), s,
                                   ablate=True)
    m = result["metrics"]
    assert "change_p_match[L2]" in m and m["opinion:p_match[L2]"]["n"] == 2 and "opinion:p_match[base]" in m
    assert len(list(tmp_path.glob("ablate-opinion-L2-*.json"))) == 1     # each task's own results file
    with pytest.raises(ValueError, match=r"no vector for layers \[1\]"):
        steering.steer_run(replace(cfg, vector=str(vec_file), layers="1"), s)
    with pytest.raises(ValueError, match="layer 5 out of range: the model has 3 layers"):
        steering.steer_run(replace(cfg, vector=str(vec_file), layers="5"), s)


def test_multipliers_in_raw_and_norm_units():
    """A sweep's multiplier: raw adds mult * vector; norm adds a vector of length mult x the layer's mean residual
    norm, along the vector (docs/conventions.md)."""
    v = torch.tensor([3.0, 4.0])
    assert torch.equal(steer.multiplied(v, -2.0, "raw", 10.0), -2.0 * v)
    got = steer.multiplied(v, 0.5, "norm", 10.0)
    assert torch.allclose(got, torch.tensor([3.0, 4.0])) and abs(float(got.norm()) - 5.0) < 1e-6
    assert torch.allclose(steer.multiplied(v, -1.0, "norm", 2.0) / 2.0, -v / v.norm())
    with pytest.raises(ValueError, match="unknown unit"):
        steer.multiplied(v, 1.0, "percent", 2.0)


# ------------------------------------------------------------------------------- several layers, selection, control

def test_joint_steering_equals_nested_single_layer_hooks(env):
    model, tok, fmt, _ = env
    header = steer.assistant_header(tok, fmt)
    x = torch.tensor([tok.encode(fmt([{"role": "user", "content": "Is it true?"}], prefill="(A) yes"))])
    g = torch.Generator().manual_seed(5)
    vecs = {0: 2 * torch.randn(model.config.hidden_size, generator=g),
            2: 2 * torch.randn(model.config.hidden_size, generator=g)}
    with steer.steering(model, vecs, "after_instruction", header):
        joint = logits(model, x)
    with steer.steering(model, {0: vecs[0]}, "after_instruction", header), \
            steer.steering(model, {2: vecs[2]}, "after_instruction", header):
        nested = logits(model, x)
    with steer.steering(model, {2: vecs[2]}, "after_instruction", header):
        one = logits(model, x)
    assert torch.equal(joint, nested) and not torch.allclose(joint, one)


def test_joint_sweep_point_adds_every_layer_at_once(tiny_chat, tmp_path):
    """--joint=true: a sweep point L0+2,m1 measures exactly what nested single-layer steering measures."""
    from dataclasses import replace
    cfg = steering.SteerConfig(model=str(tiny_chat[0]), out=str(tmp_path), n=8, n_test=4, n_neutral=3,
                               n_capability=3, mults="-1,0,1", layers="0,2", unit="norm")
    s = open_session(cfg)
    vec_file = steering.vectors_run(cfg, s)[1].with_suffix(".safetensors")
    result, path = steering.steer_run(replace(cfg, vector=str(vec_file), joint=True), s)
    m = result["metrics"]
    assert {"p_match[L0+2,m1]", "kl[L0+2,m-1]", "steerability[L0+2]"} <= set(m) and "p_match[L0,m1]" not in m
    assert result["conventions"]["layers_per_point"] == "all listed at once (joint)"
    assert {r["layer"] for r in result["items"]} == {"0+2"} and path.with_suffix(".png").exists()
    vecs, norms, _ = steer.load_vectors(vec_file, s.model)
    items, _ = steer.ab_items("", 4, 1, 0, False, (8, 4))
    score = steering.SweepScorer(s.model, s.tok, s.fmt, items, 3, steering.capability_items(3, 0), True)
    header = steer.assistant_header(s.tok, s.fmt)
    with steer.steering(s.model, {0: steer.multiplied(vecs[0], 1.0, "norm", norms[0])}, header=header), \
            steer.steering(s.model, {2: steer.multiplied(vecs[2], 1.0, "norm", norms[2])}, header=header):
        want = score(s.model)
    got = {r["id"]: r["p_match"] for r in result["items"] if r["mult"] == 1}
    assert [got[r["id"]] for r in want["rows"]] == pytest.approx([r["p_match"] for r in want["rows"]], abs=1e-6)
    assert m["kl[L0+2,m1]"]["value"] == pytest.approx(float(np.mean(want["kl"])), abs=1e-6)


def test_selection_rule_takes_the_strongest_effect_under_the_kl_limit():
    c = [{"key": "a", "effect": -0.30, "kl": 0.50},    # strongest, but over the limit
         {"key": "b", "effect": -0.10, "kl": 0.05},
         {"key": "c", "effect": -0.20, "kl": 0.10},    # at the limit: allowed
         {"key": "d", "effect": +0.40, "kl": 0.01},
         {"key": "e", "effect": -0.20, "kl": 0.02},    # ties c on effect, smaller KL
         {"key": "f", "effect": None, "kl": 0.0}]
    assert steer.select_point(c, 0.1, "decrease")["key"] == "e"
    assert steer.select_point(c, 1.0, "decrease")["key"] == "a"
    assert steer.select_point(c, 0.1, "increase")["key"] == "d"
    assert steer.select_point(c, 0.1, "either")["key"] == "d"
    assert steer.select_point(c, 0.001, "decrease") is None                  # nothing under the limit
    assert steer.select_point([{"effect": 0.1, "kl": 0.0}], 0.1, "decrease") is None   # wrong way only
    with pytest.raises(ValueError, match="unknown goal 'down'"):
        steer.select_point(c, 0.1, "down")


def test_validation_split_is_disjoint_by_claim():
    held = items(40, seed=2)
    val, test = steer.validation_split(held, 0.5, seed=1)
    assert val and test and len(val) + len(test) == len(held)
    assert not {it["claim_id"] for it in val} & {it["claim_id"] for it in test}
    assert steer.validation_split(held, 0.5, seed=1) == (val, test)
    with pytest.raises(ValueError, match="cannot be split"):
        steer.validation_split(held[:1], 0.5)


def test_selection_picks_on_validation_and_reports_the_test_split(tiny_chat, tmp_path, monkeypatch):
    """The sweep sees only validation items; select_point gets the validation metrics; the one chosen point is
    then measured on test items whose claims the validation part lacks."""
    from dataclasses import replace
    cfg = steering.SteerConfig(model=str(tiny_chat[0]), out=str(tmp_path), n=8, n_test=12, n_neutral=3,
                               n_capability=3, mults="-2,0,2", layers="0,2", unit="norm")
    s = open_session(cfg)
    vec_file = steering.vectors_run(cfg, s)[1].with_suffix(".safetensors")
    picks = []
    monkeypatch.setattr(steering, "select_point", lambda c, kl, goal: picks.append(steer.select_point(c, kl, goal))
                        or picks[-1])
    result, _ = steering.steer_run(replace(cfg, vector=str(vec_file), select="either", kl_max=50.0, control=True,
                                           n_random=2), s)
    m, sel = result["metrics"], result["selection"]
    val_rows = [r for r in result["items"] if r.get("split") == "validation"]
    test_rows = [r for r in result["items"] if r.get("split") == "test"]
    held, _ = steer.ab_items("", 12, 1, 0, False, (8, 12))
    claim = {it["id"]: it["claim_id"] for it in held}
    assert val_rows and test_rows and not {claim[r["id"]] for r in val_rows} & {claim[r["id"]] for r in test_rows}
    cands = [{"key": k[len("kl["):-1], "kl": v["value"], "effect": m[f"change_p_match[{k[3:-1]}]"]["value"]}
             for k, v in m.items() if k.startswith("kl[L") and not k.endswith(",m0]")]
    want = max((c for c in cands if c["kl"] <= 50.0 and c["effect"] != 0), key=lambda c: abs(c["effect"]))
    assert sel["chosen"] is picks[0] and sel["chosen"]["key"] == want["key"]
    assert sel["n_validation"] + sel["n_test"] == len(held) and sel["split_by"] == "claim_id"
    assert m["p_match[test:selected]"]["n"] == sel["n_test"] == m["change_p_match[test:selected]"]["n"]
    assert "specific_change_p_match[test:selected]" in m and "p_match_random[L0,m2]" not in m   # control: test only
    assert {r["mult"] for r in test_rows if r["layer"] is not None} == {sel["chosen"]["mult"]}
    # a limit nothing meets: nothing chosen, nothing reported at a point
    result, _ = steering.steer_run(replace(cfg, vector=str(vec_file), select="either", kl_max=1e-12), s)
    assert result["selection"]["chosen"] is None and "p_match[test:selected]" not in result["metrics"]


def test_random_directions_are_norm_matched_nearly_orthogonal_and_seeded():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(512, generator=g) * 3
    r = steer.random_directions(v, 8, seed=7)
    assert r.shape == (8, 512) and r.dtype == v.dtype
    assert torch.allclose(r.norm(dim=-1), v.norm().expand(8), rtol=1e-5)
    cos = torch.nn.functional.cosine_similarity(r[:, None], torch.cat([r, v[None]])[None], dim=-1)
    off = cos[~torch.eye(8, 9, dtype=torch.bool)]
    assert off.abs().max() < 0.25 and off.abs().mean() < 0.08          # ~1/sqrt(512) = 0.044
    assert torch.equal(r, steer.random_directions(v, 8, seed=7))
    assert not torch.allclose(r, steer.random_directions(v, 8, seed=8))
    rows = torch.stack([v, 2 * v])                                      # (L, D): row by row
    assert torch.allclose(steer.random_directions(rows, 3, 1).norm(dim=-1), rows.norm(dim=-1).expand(3, 2))
    a = steer.random_controls({3: v, 5: v}, 2, seed=4)
    b = steer.random_controls({5: v}, 2, seed=4)
    assert len(a) == 2 and torch.equal(a[1][5], b[1][5]) and not torch.equal(a[0][3], a[0][5])
    with pytest.raises(ValueError, match="zero length"):
        steer.random_directions(torch.zeros(4), 2)


def test_random_control_runs_at_every_point_and_is_recorded(tiny_chat, tmp_path):
    from dataclasses import replace
    cfg = steering.SteerConfig(model=str(tiny_chat[0]), out=str(tmp_path), n=8, n_test=4, n_neutral=3,
                               n_capability=3, mults="-1,0,1", layers="2", unit="norm", control=True, n_random=3)
    s = open_session(cfg)
    vec_file = steering.vectors_run(cfg, s)[1].with_suffix(".safetensors")
    result, _ = steering.steer_run(replace(cfg, vector=str(vec_file)), s)
    m = result["metrics"]
    for key in ("p_match_random", "change_p_match_random", "change_p_match_random_by_direction",
                "specific_change_p_match", "kl_random", "capability_random"):
        assert m[f"{key}[L2,m1]"]["n"] > 0, key
    assert m["change_p_match_random_by_direction[L2,m1]"]["n"] == 3 and m["kl_random[L2,m1]"]["value"] > 0
    assert m["p_match_random[L2,m0]"]["value"] == pytest.approx(m["p_match[base]"]["value"], abs=1e-12)
    assert "3 random directions" in result["conventions"]["control"]
    n = m["p_match[base]"]["n"]
    assert sum(r.get("random") is not None for r in result["items"]) == 3 * 3 * n       # 3 directions x 3 mults
    # the control's rows are the random directions themselves: recompute one
    vecs, norms, _ = steer.load_vectors(vec_file, s.model)
    d = steer.random_controls({2: vecs[2]}, 3, cfg.seed)[1][2]
    items, _ = steer.ab_items("", 4, 1, 0, False, (8, 4))
    score = steering.SweepScorer(s.model, s.tok, s.fmt, items, 3, steering.capability_items(3, 0), True)
    with steer.steering(s.model, {2: steer.multiplied(d, 1.0, "norm", norms[2])},
                        header=steer.assistant_header(s.tok, s.fmt)):
        want = {r["id"]: r["p_match"] for r in score(s.model)["rows"]}
    got = {r["id"]: r["p_match"] for r in result["items"] if r.get("random") == 1 and r["mult"] == 1}
    assert got == pytest.approx(want, abs=1e-6)
    result, _ = steering.steer_run(replace(cfg, vector=str(vec_file), n_random=2), s, ablate=True)
    assert result["metrics"]["change_p_match_random_by_direction[L2]"]["n"] == 2


# ------------------------------------------------------------------------------------------ vectors from replies

def test_reply_texts_come_from_the_claim_or_the_options():
    for it in items(8, seed=1):
        texts = steer.reply_texts(it)
        agree = it["match"] if it["opinion"] == "agree" else next(x for x in it["letters"] if x != it["match"])
        assert texts[agree] == f'I agree. "{it["claim"]}" is true.'
        assert set(texts) == {"A", "B"} and texts[next(x for x in "AB" if x != agree)].startswith("I disagree.")
    caa = {"id": "caa-test/3", "question": "Is it?\n\nChoices:\n (A) Yes, it is.\n (B) No", "letters": ["A", "B"],
           "match": "B"}
    assert steer.reply_texts(caa) == {"A": "Yes, it is.", "B": "No"}
    with pytest.raises(ValueError, match=r"caa-test/3: no answer text for option\(s\) \['B'\]"):
        steer.reply_texts({**caa, "question": "Is it?\n\n(A) Yes"})


def test_response_activations_are_the_mean_over_the_reply_tokens(env):
    """Hand computation from transformers' hidden_states: the mean over each reply's own tokens, per side."""
    model, tok, fmt, hf = env
    pairs = steer.response_pairs(tok, fmt, items(8, seed=2))
    header = steer.assistant_header(tok, fmt)
    for p, it in zip(pairs, [i for i in items(8, seed=2) if i["match"]]):
        assert p["group"] == it["opinion"] and p["replies"][0] == steer.reply_texts(it)[it["match"]]
        assert p["cut"] == steer.header_end(p["pos"], header) and p["pos"][: p["cut"]] == p["neg"][: p["cut"]]
        assert tok.decode(p["pos"][p["reads"][0][0]:]) == p["replies"][0]      # read: exactly the reply's tokens
    pos, neg = steer.record_pairs(model, pairs, [0, 1], token_budget=300)   # several batches, padding both ways
    for n, p in enumerate(pairs):   # (hidden_states[l + 1] is resid_post of block l but the last, which is normed)
        for side, got in ((0, pos), (1, neg)):
            seq = p["pos"] if side == 0 else p["neg"]
            with torch.no_grad():
                hs = hf(torch.tensor([seq]), output_hidden_states=True).hidden_states
            for j, layer in enumerate([0, 1]):
                want = hs[layer + 1][0, p["reads"][side]].double().mean(0).float()
                torch.testing.assert_close(got[n, j], want, atol=1e-5, rtol=1e-5)


def test_response_vectors_and_the_compare_command(tiny_chat, tmp_path):
    from dataclasses import replace
    cfg = steering.SteerConfig(model=str(tiny_chat[0]), out=str(tmp_path), n=10, layers="0,2", n_boot=20)
    s = open_session(cfg)
    letter, lpath = steering.vectors_run(cfg, s)
    response, rpath = steering.vectors_run(replace(cfg, read="response"), s)
    c = response["conventions"]
    assert c["read"] == "response" and c["balanced_by"].startswith("stance") and "I agree." in c["replies"]
    assert letter["conventions"]["read"] == "letter" and letter["conventions"]["balanced_by"] == "matching letter"
    assert all(r["reply_tokens"][0] > 1 and r["group"] in ("agree", "disagree") for r in response["items"])
    plain = steering.vectors_run(replace(cfg, read="response", balance=False), s)[0]["conventions"]
    assert plain["balanced_by"].startswith("none") and not plain["balanced_by_letter"]
    lv, _, _ = steer.load_vectors(lpath.with_suffix(".safetensors"), s.model)
    rv, _, _ = steer.load_vectors(rpath.with_suffix(".safetensors"), s.model)
    # two files
    result, path = steering.compare_run(replace(cfg, vector=str(lpath.with_suffix(".safetensors")),
                                                vector2=str(rpath.with_suffix(".safetensors"))), s)
    for layer in (0, 2):
        want = float(torch.cosine_similarity(lv[layer].double(), rv[layer].double(), dim=0))
        assert result["metrics"][f"cos[vector_vs_vector2,L{layer}]"]["value"] == pytest.approx(want, abs=1e-9)
    assert result["conventions"]["vector2"]["read"] == "response" and result["conventions"]["same_model"]
    assert path.with_suffix(".png").exists()
    # recorded now, one command: the same letter-vs-response cosine as the two files give
    result, _ = steering.compare_run(cfg, s)
    m = result["metrics"]
    for layer in (0, 2):
        got = m[f"cos[letter_vs_response,L{layer}]"]
        want = float(torch.cosine_similarity(lv[layer].double(), rv[layer].double(), dim=0))
        assert got["value"] == pytest.approx(want, abs=1e-5) and got["n"] == letter["conventions"]["n_pairs"]
        assert -1 <= got["ci"][0] <= got["ci"][1] <= 1
        assert -1 <= m[f"cos[balanced_vs_plain:letter,L{layer}]"]["value"] <= 1
        assert m[f"cos[balanced_vs_plain:response,L{layer}]"]["ci"] is None     # set by the groups' counts
    groups = result["conventions"]["groups"]
    assert set(groups["letter"]) <= {"A", "B"} and set(groups["response"]) <= {"agree", "disagree"}
    assert sum(groups["letter"].values()) == sum(groups["response"].values()) == letter["conventions"]["n_pairs"]
    assert m["cos[letter_vs_response:balanced,L0]"]["value"] == m["cos[letter_vs_response,L0]"]["value"]
    assert "balance=True" in result["conventions"]["letter_vs_response"]
    with pytest.raises(ValueError, match="compare takes two vectors files, or neither"):
        steering.compare_run(replace(cfg, vector=str(lpath.with_suffix(".safetensors"))), s)
