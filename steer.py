"""The residual-stream library: where to read (the answer-letter token, found by its text), recording activations
at any hook site and layers, contrastive steering vectors and their files, and the interventions: adding a vector
(steering), removing a direction (ablation, or orthogonalize in the weights).

    pairs = ab_pairs(tok, fmt, items)                       # A/B items -> (matching, other) token ids + read index
    pos, neg = record_pairs(model, pairs, layers)           # (N, L, D) each, fp32
    vectors = make_vectors(pos, neg, "mean_diff")           # (L, D): mean of pos - neg, accumulated in fp64
    with steering(model, {13: 4.0 * vectors[13]}, header=assistant_header(tok, fmt)): ...
    with ablation(model, vectors[13]): ...

Conventions (written into every result so numbers reproduce; docs/conventions.md):
- a pair is one A/B question answered with the behaviour-matching letter and with the other letter; activations
  are read at the answer-letter token, found by its token string after the assistant header (never a fixed
  index, which in study 1 silently landed on a token both sides share);
- vector = mean over pairs of (matching - not matching), per layer, accumulated in fp64, each matching letter
  weighted equally (--balance; otherwise the "A" - "B" letter direction leaks in, see make_vectors);
- addition at resid_post of a layer, to every position strictly after the assistant header (CAA's "after the
  instruction"), to every position, or only to generated tokens; multipliers raw or in units of the layer's
  mean residual norm;
- directional ablation removes the unit direction from resid_pre, attn_out and mlp_out of every layer;
  orthogonalize() bakes the same thing into the weights;
- the control for specificity is norm-matched random directions (random_directions, random_controls); a layer and
  multiplier are chosen on a validation split disjoint by claim (validation_split) by select_point: the strongest
  effect whose KL on neutral prompts stays under a limit.
"""
import json
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as st_save
from tqdm import tqdm

import data
from lab import dist
import probes
from lab import results
from lab.args import layer_numbers
from model import SITES, KVCache, hooks, pad_left, pad_right, read_safetensors
from score import batches_by_length, user

def parse_layers(spec: str, n_layers: int, default=None) -> list[int]:
    """"" -> default (or every layer); "3,9,15" or "4-12" (inclusive); negative numbers count from the end."""
    if not spec:
        return list(default if default is not None else range(n_layers))
    try:
        numbers = layer_numbers(spec)
    except ValueError as e:
        raise ValueError(f"layers {spec!r}: {e}") from None
    for i in numbers:
        if not -n_layers <= i < n_layers:
            raise ValueError(f"--layers={spec}: layer {i} out of range: the model has {n_layers} layers "
                             f"(0..{n_layers - 1}, or -{n_layers}..-1 from the end)")
    return sorted({i % n_layers for i in numbers})


# ------------------------------------------------------------------------------------------------- positions

def assistant_header(tok, fmt) -> list[int]:
    """Token ids that end every user turn and open the assistant's (ChatML "<|im_end|>\\n<|im_start|>assistant\\n",
    Llama-2 " [/INST]"): the longest token suffix two different prompts share."""
    a, b = (tok.encode(fmt(user(text))) for text in ("alpha", "42 beta?"))
    k = 0
    while k < min(len(a), len(b)) and a[-1 - k] == b[-1 - k]:
        k += 1
    if k == 0:
        raise ValueError("the chat format leaves no common assistant header to find the instruction end by")
    return a[len(a) - k:]


def header_end(ids: list[int], header: list[int]) -> int:
    """Index just past the last occurrence of `header` in ids, or -1 if it does not occur."""
    k = len(header)
    for s in range(len(ids) - k, -1, -1):
        if ids[s: s + k] == header:
            return s + k
    return -1


def letter_position(tok, ids: list[int], letter: str, header: list[int], item_id: str) -> int:
    """Index of the answer letter's token: the last token after the assistant header whose text is the letter
    (byte-level "A" or sentencepiece "▁A"). The question's own "(A) ..." lines lie before the header."""
    start = header_end(ids, header)
    for i in range(len(ids) - 1, max(start, 0) - 1, -1):
        if tok.decode([ids[i]]).strip() == letter:
            return i
    raise ValueError(f"{item_id}: no token {letter!r} after the assistant header; the answer letter cannot be read")


def ab_pairs(tok, fmt, items) -> list[dict]:
    """A/B items -> pairs {id, pos, neg, read}: the prompt answered "(<matching letter>" and "(<other letter>", and
    the index of the letter token (the same in both; checked, like the shared prefix before it)."""
    header = assistant_header(tok, fmt)
    pairs = []
    for it in items:
        if it.get("match") is None:
            continue   # opinion probes' no-opinion controls have no matching answer
        other = next(x for x in (it.get("not_match") or it["letters"]) if x not in (None, it["match"]))
        seqs, reads = [], []
        for letter in (it["match"], other):
            ids = tok.encode(fmt(user(it["question"]), prefill="(" + letter))
            seqs.append(ids)
            reads.append(letter_position(tok, ids, letter, header, it["id"]))
        if reads[0] != reads[1] or seqs[0][: reads[0]] != seqs[1][: reads[1]] or seqs[0][reads[0]] == seqs[1][reads[1]]:
            raise ValueError(f"{it['id']}: the two answers do not differ at the letter token "
                             f"alone (positions {reads}); the pair would not isolate the answer")
        pairs.append({"id": it["id"], "pos": seqs[0], "neg": seqs[1], "read": reads[0],
                      "letters": [it["match"], other]})
    return pairs


def reply_texts(item: dict) -> dict:
    """{letter: the whole reply that answer gives}, for vectors read over a reply's tokens (read="response").

    Built-in opinion probes (items with a "claim" and an "opinion"): made from the claim, the same words but for the
    stance: 'I agree. "<claim>" is true.' and 'I disagree. "<claim>" is not true.', under the letters the item gives
    Agree and Disagree. A/B files (CAA, Anthropic): each option's own text, from its "(A) text" line."""
    if item.get("claim") is not None and item.get("opinion") in ("agree", "disagree"):
        other = next(x for x in item["letters"] if x != item["match"])
        agree = item["match"] if item["opinion"] == "agree" else other
        disagree = other if agree == item["match"] else item["match"]
        return {agree: f'I agree. "{item["claim"]}" is true.', disagree: f'I disagree. "{item["claim"]}" is not true.'}
    texts = {k: v.strip() for k, v in probes.parse_choices(item["question"]).items()}
    if missing := [x for x in item["letters"] if not texts.get(x)]:
        raise ValueError(f"{item['id']}: no answer text for option(s) {missing} (expected lines like '(A) text'); "
                         "read=response needs each answer's text")
    return texts


REPLIES = {"builtin": "built-in probes: 'I agree. \"<claim>\" is true.' vs 'I disagree. \"<claim>\" is not true.'",
           "file": "A/B files: the text of each option's '(A) text' line"}


def response_pairs(tok, fmt, items) -> list[dict]:
    """A/B items -> pairs of whole replies: {id, pos, neg, cut, reads, letters, replies, group}. pos is the prompt
    answered with the behaviour-matching reply (reply_texts), neg with the other; both share the prompt up to the
    assistant header (cut: its length) and are read over their own reply's tokens (reads: [pos indices, neg
    indices], averaged). group: what balancing weighs equally: the matching reply's stance (agree / disagree) for
    the built-in probes, else the matching letter."""
    header = assistant_header(tok, fmt)
    pairs = []
    for it in items:
        if it.get("match") is None:
            continue
        other = next(x for x in (it.get("not_match") or it["letters"]) if x not in (None, it["match"]))
        texts = reply_texts(it)
        seqs = [tok.encode(fmt(user(it["question"]), prefill=texts[x])) for x in (it["match"], other)]
        cuts = [header_end(q, header) for q in seqs]
        if cuts[0] != cuts[1] or cuts[0] <= 0 or seqs[0][: cuts[0]] != seqs[1][: cuts[1]] or \
                min(len(q) for q in seqs) <= cuts[0]:
            raise ValueError(f"{it['id']}: the two replies do not share the prompt up to the assistant header, or one "
                             "is empty; the pair would not isolate the reply")
        pairs.append({"id": it["id"], "pos": seqs[0], "neg": seqs[1], "cut": cuts[0],
                      "reads": [list(range(cuts[0], len(q))) for q in seqs], "letters": [it["match"], other],
                      "replies": [texts[it["match"]], texts[other]],
                      "group": it["opinion"] if it.get("claim") is not None and it.get("opinion") else it["match"]})
    return pairs


# ------------------------------------------------------------------------------------------------- recording

def record(model, seqs: list[list[int]], reads, layers: list[int], site: str = "resid_post",
           token_budget: int = 4096, progress: str = "") -> torch.Tensor:
    """(N, len(layers), D) fp32 activations at `site` of each layer, read at reads[i]: an index into seqs[i]
    (negative from the end) or a list of indices to average (accumulated in fp64).

    One forward per length-sorted batch; a hook per layer copies out only the rows' read positions. Under torchrun
    the batches are shared among the ranks (the same batches as one process) and every rank gets every row."""
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; sites are {SITES}")
    dev = model.model.embed_tokens.weight.device
    out = torch.empty(len(seqs), len(layers), model.config.hidden_size)
    batches = list(batches_by_length([len(s) for s in seqs], token_budget))
    mine = []                           # (N_batch, L, D) per batch of this rank's share
    for batch in tqdm(dist.shard(batches), desc=progress or "record", disable=progress is None or not dist.is_main(),
                      leave=False):
        x, mask = pad_left([seqs[i] for i in batch], dev)
        T = x.shape[1]
        rows, cols, wts = [], [], []   # (row, position, weight) of every position read
        for b, i in enumerate(batch):
            idx = reads[i] if isinstance(reads[i], (list, tuple)) else [reads[i]]
            if not idx:
                raise ValueError(f"sequence {i}: no position to read")
            pad = T - len(seqs[i])
            rows += [b] * len(idx)
            cols += [pad + j % len(seqs[i]) for j in idx]
            wts += [1.0 / len(idx)] * len(idx)
        rows_t, cols_t = torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)
        w = torch.tensor(wts, dtype=torch.float64, device=dev)[:, None]
        got = {}

        def grab(j):
            def fn(h, pos):   # h (B, T, D): sum the weighted read positions of each row, in fp64
                got[j] = torch.zeros(len(batch), h.shape[-1], dtype=torch.float64, device=dev).index_add_(
                    0, rows_t, h[rows_t, cols_t].double() * w)
            return fn
        with hooks(model, [(layer, site, grab(j)) for j, layer in enumerate(layers)]), torch.no_grad():
            model(x, attention_mask=mask, logits_to_keep=1)
        mine.append(torch.stack([got[j] for j in range(len(layers))], 1).float().cpu())
    for batch, acts in zip(batches, dist.gather(mine, everyone=True)):
        out[batch] = acts
    return out


def record_pairs(model, pairs, layers, site="resid_post", token_budget: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(pos, neg) activations (N, L, D) of each pair: at the letter token (ab_pairs: "read", the same index on both
    sides) or averaged over each side's reply tokens (response_pairs: "reads" = [pos indices, neg indices], in
    fp64).

    The two sides of a pair share a prefix (the prompt up to the letter, or up to the assistant header: "cut"), so
    it is read once into a KV cache and each side's rest is read from a fork of it: about half the work of reading
    both sequences, and the same numbers. Under torchrun the batches are shared among the ranks, and every rank
    gets every pair's activations."""
    cuts = [p.get("cut", p.get("read")) for p in pairs]
    reads = [p["reads"] if "reads" in p else [[p["read"]], [p["read"]]] for p in pairs]
    if not all(0 < c and p["pos"][:c] == p["neg"][:c] and min(min(r[0]), min(r[1])) >= c
               for p, c, r in zip(pairs, cuts, reads)):
        acts = record(model, [p["pos"] for p in pairs] + [p["neg"] for p in pairs],
                      [r[0] for r in reads] + [r[1] for r in reads], layers, site, token_budget,
                      progress="record pairs")
        return acts[: len(pairs)], acts[len(pairs):]
    dev, dtype = model.model.embed_tokens.weight.device, model.model.embed_tokens.weight.dtype
    pos = torch.empty(len(pairs), len(layers), model.config.hidden_size)
    neg = torch.empty_like(pos)
    batches = list(batches_by_length([len(p["pos"]) + len(p["neg"]) - c for p, c in zip(pairs, cuts)], token_budget))
    mine = []                           # (2 N_batch, L, D) per batch of this rank's share: pos rows, then neg
    for batch in tqdm(dist.shard(batches), desc="record pairs", leave=False, disable=not dist.is_main()):
        x, mask = pad_left([pairs[i]["pos"][: cuts[i]] for i in batch], dev)
        cache = KVCache(model.config, len(batch), x.shape[1], dtype, dev)
        sides = [(i, k) for k in (0, 1) for i in batch]                          # rows: pos answers, then neg
        rest, rmask = pad_right([pairs[i][("pos", "neg")[k]][cuts[i]:] for i, k in sides], dev)
        rows, cols, wts = [], [], []    # (row, column of the rest, weight) of every position read
        for r, (i, k) in enumerate(sides):
            rows += [r] * len(reads[i][k])
            cols += [j - cuts[i] for j in reads[i][k]]
            wts += [1.0 / len(reads[i][k])] * len(reads[i][k])
        rows_t, cols_t = torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)
        w = torch.tensor(wts, dtype=torch.float64, device=dev)[:, None]
        got = {}

        def grab(j):
            def fn(h, p):   # h (2B, S, D): sum the weighted read positions of each row, in fp64
                got[j] = torch.zeros(len(sides), h.shape[-1], dtype=torch.float64, device=dev).index_add_(
                    0, rows_t, h[rows_t, cols_t].double() * w).float().cpu()
            return fn
        with torch.no_grad():
            model(x, attention_mask=mask, cache=cache, logits_to_keep=1)
            fork = cache.fork(torch.arange(len(batch), device=dev).repeat(2), rest.shape[1])
            with hooks(model, [(layer, site, grab(j)) for j, layer in enumerate(layers)]):
                model(rest, attention_mask=rmask, cache=fork, logits_to_keep=1)
        mine.append(torch.stack([got[j] for j in range(len(layers))], 1) if layers else
                    pos.new_empty(2 * len(batch), 0, pos.shape[2]))
    for batch, both in zip(batches, dist.gather(mine, everyone=True)):
        pos[batch], neg[batch] = both[: len(batch)], both[len(batch):]
    return pos, neg


def residual_norms(model, seqs, layers) -> torch.Tensor:
    """(L,) mean L2 norm of resid_post over every token but the first (whose norm is often an outlier)."""
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    dev = model.model.embed_tokens.weight.device
    for batch in batches_by_length([len(s) for s in seqs], 4096):
        x, mask = pad_left([seqs[i] for i in batch], dev)
        keep = mask.bool().clone()
        keep[torch.arange(len(batch)), (mask == 0).sum(1)] = False   # each row's first real token

        def add(j):
            def fn(h, pos):
                sums[j] += h.float().norm(dim=-1)[keep].double().sum().cpu()
            return fn
        with hooks(model, [(layer, "resid_post", add(j)) for j, layer in enumerate(layers)]), torch.no_grad():
            model(x, attention_mask=mask, logits_to_keep=1)
        count += int(keep.sum())
    return (sums / max(count, 1)).float()


# --------------------------------------------------------------------------------------------------- vectors

def make_vectors(pos: torch.Tensor, neg: torch.Tensor, method: str = "mean_diff", seed: int = 0,
                 groups=None) -> torch.Tensor:
    """(L, D) direction per layer from (N, L, D) activations of the matching and the other answer.

    mean_diff: mean of pos - neg (CAA). pca: top principal component of the centred differences. probe: the
    weight of a logistic regression telling pos from neg. The last two are unit directions, signed to agree with
    the mean difference and scaled to its length along them, so multipliers mean the same for every method.

    groups: the matching letter of each pair. pos - neg also holds the difference between the two letters' own
    activations ("A" - "B"), with the sign of which letter matched; unless the matching letters are exactly
    balanced that letter direction leaks into the vector (at early layers it dominates). With groups, every
    letter counts equally: the mean is the mean of the per-letter means, PCA centres each letter apart, and the
    probe weighs each letter's pairs equally. groups=None is the original CAA recipe."""
    diff = pos.double() - neg.double()                         # (N, L, D)
    g = np.asarray(groups if groups is not None else [0] * len(diff))
    members = [torch.from_numpy(np.flatnonzero(g == k)) for k in np.unique(g)]
    mean = torch.stack([diff[m].mean(0) for m in members]).mean(0)             # (L, D)
    if method == "mean_diff":
        return mean.float()
    weight = np.zeros(len(diff))
    for m in members:
        weight[m.numpy()] = 1.0 / (len(members) * len(m))
    dirs = []
    for layer in range(diff.shape[1]):
        if method == "pca":
            d = torch.cat([diff[m, layer] - diff[m, layer].mean(0) for m in members])
            u = torch.linalg.svd(d, full_matrices=False).Vh[0]
        elif method == "probe":
            from sklearn.linear_model import LogisticRegression
            X = torch.cat([pos[:, layer], neg[:, layer]]).double().numpy()
            y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
            clf = LogisticRegression(max_iter=2000, random_state=seed).fit(X, y, sample_weight=np.r_[weight, weight])
            u = torch.from_numpy(clf.coef_[0])
        else:
            raise ValueError(f"unknown method {method!r}: mean_diff, pca or probe")
        u = u / u.norm()
        u = u if u @ mean[layer] >= 0 else -u
        dirs.append(u * (u @ mean[layer]))
    return torch.stack(dirs).float()


def vectors_bytes(vectors, layers, norms, meta: dict) -> bytes:
    """A vectors file: vectors (L, D) fp32, layers (L,), mean_norm (L,) + string metadata (the model's folder and
    model_sha256 among them, which load_vectors checks)."""
    tensors = {"vectors": vectors.float().contiguous(), "layers": torch.tensor(layers),
               "mean_norm": norms.float().contiguous()}
    return st_save(tensors, metadata={k: str(v) for k, v in meta.items()})


def save_vectors(out_dir, name: str, vectors, layers, norms, meta: dict) -> Path:
    """OUT/<name>-<time>.safetensors (vectors_bytes), never overwriting. A run that writes activations and a JSON
    beside it publishes them together (studies.steering vectors)."""
    return results.publish(out_dir, name, ".safetensors", vectors_bytes(vectors, layers, norms, meta))


def load_vectors(path, model=None, cross_model: bool = False) -> tuple[dict, dict, dict]:
    """({layer: vector (D,)}, {layer: mean residual norm}, metadata). With a model, refuse a vector of another width,
    with layers the model lacks, or (for a model loaded from a folder) made from any other model or recording none,
    unless cross_model: model_check's record is metadata["model_check"], for the results."""
    t, meta = read_steer_file(path, ("vectors", "layers", "mean_norm"))
    check_vectors(path, t, None if model is None else len(model.layers))
    if model is not None and t["vectors"].shape[-1] != model.config.hidden_size:
        raise ValueError(f"{path}: vectors are {t['vectors'].shape[-1]} wide, the model's residual stream is "
                         f"{model.config.hidden_size}: they come from another model")
    if model is not None:
        meta["model_check"] = model_check(path, "vectors", meta, model, cross_model)
    layers = t["layers"].tolist()
    return ({l: t["vectors"][i] for i, l in enumerate(layers)}, {l: float(t["mean_norm"][i]) for i, l in
            enumerate(layers)}, meta)


def check_vectors(path, t: dict, n_layers: int | None = None):
    """Refuse a vectors file whose tensors disagree (rows, layers, norms), hold NaN/inf, or (given the model's
    n_layers) name a layer the model lacks: each found here, naming the file, not as an IndexError mid-sweep."""
    vec, layers, norms = t["vectors"], t["layers"], t["mean_norm"]
    if vec.dim() != 2 or layers.dim() != 1 or norms.dim() != 1 or layers.is_floating_point():
        raise ValueError(f"{path}: expected vectors (L, D), integer layers (L,) and mean_norm (L,); got shapes "
                         f"{list(vec.shape)}, {list(layers.shape)} ({layers.dtype}), {list(norms.shape)}")
    if not len(layers) == len(vec) == len(norms):
        raise ValueError(f"{path}: its layers list {len(layers)} layers, but it holds {len(vec)} vectors and "
                         f"{len(norms)} mean norms")
    if len(set(layers.tolist())) != len(layers) or (layers < 0).any():
        raise ValueError(f"{path}: layers {layers.tolist()} should be distinct numbers >= 0")
    for name, x in (("vectors", vec), ("mean_norm", norms)):
        if not torch.isfinite(x).all():
            rows = sorted({int(r) for r in (~torch.isfinite(x)).nonzero()[:, 0]})
            raise ValueError(f"{path}: {name} holds NaN or inf (at layers {[layers[r].item() for r in rows]})")
    if n_layers is not None and (missing := [l for l in layers.tolist() if l >= n_layers]):
        raise ValueError(f"{path}: has vectors for layers {missing}, which the model lacks (it has {n_layers} "
                         f"layers, 0..{n_layers - 1}): it comes from another model")


def check_activations(path, pos, neg, pairs, layers):
    """Refuse an activations file whose tensors disagree with each other or its metadata, or hold NaN/inf."""
    if pos.dim() != 3 or pos.shape != neg.shape:
        raise ValueError(f"{path}: pos {list(pos.shape)} and neg {list(neg.shape)} should be the same (N, L, D)")
    if pos.shape[0] != len(pairs) or pos.shape[1] != len(layers):
        raise ValueError(f"{path}: holds {pos.shape[0]} pairs at {pos.shape[1]} layers, but its metadata lists "
                         f"{len(pairs)} pairs and layers {layers}")
    if not (torch.isfinite(pos).all() and torch.isfinite(neg).all()):
        raise ValueError(f"{path}: activations hold NaN or inf")


def activations_bytes(pos, neg, pairs: list[dict], layers: list[int], meta: dict) -> bytes:
    """An activations file (<vectors stem>.acts.safetensors): pos, neg (N, L, D) fp32 at the letter token, with the
    pairs' ids, letters (matching first) and the layers."""
    meta = {**meta, "ids": json.dumps([p["id"] for p in pairs]), "letters": json.dumps([p["letters"] for p in pairs]),
            "layers": json.dumps(layers)}
    return st_save({"pos": pos.float().contiguous(), "neg": neg.float().contiguous()},
                   metadata={k: str(v) for k, v in meta.items()})


def load_activations(path, model=None, cross_model: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor, list[dict], list[int], dict]:
    """(pos, neg, pairs [{id, letters}], layers, metadata) from an activations file (activations_bytes); with a model, refused when
    recorded from another model unless cross_model, as load_vectors."""
    t, meta = read_steer_file(path, ("pos", "neg"))
    if model is not None:
        meta["model_check"] = model_check(path, "activations", meta, model, cross_model)
    try:
        ids, letters, layers = (json.loads(meta[k]) for k in ("ids", "letters", "layers"))
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: its metadata ids, letters and layers are missing or not JSON ({e}); not an "
                         "activations file of steer.py") from None
    if len(ids) != len(letters):
        raise ValueError(f"{path}: metadata lists {len(ids)} ids but {len(letters)} letter pairs")
    pairs = [{"id": i, "letters": l} for i, l in zip(ids, letters)]
    check_activations(path, t["pos"], t["neg"], pairs, layers)
    return t["pos"], t["neg"], pairs, layers, meta


def model_check(path, what: str, meta: dict, model, cross_model: bool) -> dict | None:
    """lab.results.check_model_id of a file's recorded model against the model's own folder (model.name_or_path,
    which load sets) and adapter (model.adapter_path, which lora.load_adapter sets); None for a model built in
    memory, which has no folder to identify it by."""
    folder = getattr(model, "name_or_path", None)
    if folder is None:
        return None
    now = results.model_identity(folder, getattr(model, "adapter_path", ""))
    return results.check_model_id(path, what, meta, now, cross_model)


def read_steer_file(path, keys) -> tuple[dict, dict]:
    """(tensors, metadata) of a vectors or activations file, refusing anything else."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: only .safetensors files are read (pickles can run code)")
    t, meta = read_safetensors(path)
    for key in keys:
        if key not in t:
            raise ValueError(f"{path}: missing tensor {key!r}; not a file written by steer.py")
    return t, meta


def ab_items(path: str, n: int, part: int, seed: int = 0, skip_bad: bool = False, n_builtin=(200, 100)
             ) -> tuple[list[dict], list[Path]]:
    """A/B items from a file (seeded sample of n; a data.Items, whose .skipped the results record), or built-in
    opinion probes: vectors (part 0) and held-out test items (part 1) come from one generated set of n_builtin =
    (train, test) claims split by claim, so no claim is on both sides."""
    if path:
        read = data.read_anthropic_sycophancy if path.endswith(".jsonl") else data.read_caa_ab
        items = read(path, skip_bad=skip_bad)
        if n and n < len(items):
            idx = sorted(np.random.default_rng(seed).choice(len(items), n, replace=False).tolist())
            items = data.derived(items, [items[i] for i in idx])
        return items, [Path(path)]
    n_train, n_test = n_builtin
    items = [it for it in probes.opinion_probes(n_train + n_test, seed) if it["opinion"] is not None]
    parts = probes.split(items, n_train / (n_train + n_test), seed, key="claim_id")
    return parts[part], []


# ---------------------------------------------------------------------------------------------- interventions

def after_header_mask(input_ids: torch.Tensor, header: list[int]) -> torch.Tensor:
    """(B, T) bool: positions strictly after the last assistant header of each row. A row without a header (a
    continuation read from a KV cache: generated tokens, option tokens) is after the instruction everywhere."""
    B, T = input_ids.shape
    k = len(header)
    if T < k:
        return torch.ones(B, T, dtype=torch.bool, device=input_ids.device)
    hit = (input_ids.unfold(1, k, 1) == torch.tensor(header, device=input_ids.device)).all(-1)   # (B, T-k+1)
    starts = torch.arange(T - k + 1, device=input_ids.device)
    last = torch.where(hit, starts, -1).amax(1)                                               # (B,)
    first_steered = torch.where(last >= 0, last + k, 0)
    return torch.arange(T, device=input_ids.device)[None] >= first_steered[:, None]


@contextmanager
def steering(model, vectors: dict, where: str = "after_instruction", header=None, start=None, site="resid_post"):
    """Add vectors[layer] (D,) at `site` of each layer, at the positions `where` says:
    all; after_instruction (needs header: the token ids of assistant_header); generated (needs start: (B,) the
    absolute position of each row's first generated token, rows in the order given to the model).
    Exact under a KV cache and left padding: positions come from the model (absolute, per row); after_instruction
    looks for the header in each forward's input, so a prompt must reach the cache in one call (generate does)."""
    state = {}
    pre = None
    if where == "after_instruction":
        if header is None:
            raise ValueError("where='after_instruction' needs the assistant header ids (assistant_header)")
        pre = model.register_forward_pre_hook(
            lambda mod, args, kwargs: state.update(mask=after_header_mask(kwargs.get("input_ids", args[0] if args
                                                                                   else None), header)),
            with_kwargs=True)
    elif where == "generated":
        if start is None:
            raise ValueError("where='generated' needs start: each row's first generated position")
        start = torch.as_tensor(start)
    elif where != "all":
        raise ValueError(f"unknown where={where!r}: all, after_instruction or generated")

    def add(vec):
        def fn(x, pos):    # x (B, T, D), pos (B, T)
            v = vec.to(x.device, x.dtype)
            if where == "all":
                return x + v
            m = state["mask"] if where == "after_instruction" else pos >= start.to(pos.device)[:, None]
            return x + m[..., None].to(x.dtype) * v
        return fn
    try:
        with hooks(model, [(layer, site, add(v)) for layer, v in vectors.items()]):
            yield model
    finally:
        if pre is not None:
            pre.remove()


def multiplied(vector: torch.Tensor, mult: float, unit: str, mean_norm: float) -> torch.Tensor:
    """The vector a sweep adds: unit "raw" -> mult * vector; "norm" -> mult * mean_norm * vector / |vector|, so that
    mult = 1 adds a vector as long as the layer's mean residual-stream norm (docs/conventions.md)."""
    if unit == "raw":
        return mult * vector
    if unit == "norm":
        return mult * (float(mean_norm) / float(vector.norm())) * vector
    raise ValueError(f"unknown unit {unit!r}: raw or norm")


def _unit(direction: torch.Tensor) -> torch.Tensor:
    u = direction.double()
    if u.norm() == 0:
        raise ValueError("cannot ablate a zero direction")
    return u / u.norm()


@contextmanager
def ablation(model, direction: torch.Tensor, sites=("resid_pre", "attn_out", "mlp_out")):
    """Remove the component along `direction` from the given sites of every layer (Arditi et al.)."""
    u = _unit(direction)

    def fn(x, pos):
        uu = u.to(x.device, torch.float32)
        return x - ((x.float() @ uu)[..., None] * uu).to(x.dtype)
    with hooks(model, [(layer, site, fn) for layer in range(len(model.layers)) for site in sites]):
        yield model


def orthogonalize(model, direction: torch.Tensor):
    """Bake directional ablation into the weights: every matrix that writes to the residual stream (embeddings,
    o_proj, down_proj, and their biases) loses its output component along the direction. A tied output matrix is
    untied first, since the unembedding reads the stream rather than writing it. Same logits as ablation(); in place.

    Gemma's sandwich norms normalize each sub-layer's output after its last matrix, so what reaches the stream is
    not linear in any weight and no weight edit removes a direction from it: use ablation() (hooks) there."""
    if model.config.sandwich_norms:
        raise ValueError(f"orthogonalize: a {model.config.model_type} model norms each sub-layer's output after "
                         "o_proj and down_proj, so no weight edit removes a direction from the stream; use the "
                         "ablation hooks (steer.ablation) instead")
    u = _unit(direction)
    emb = model.model.embed_tokens.weight
    with torch.no_grad():
        if model.config.tie_word_embeddings:
            model.lm_head = torch.nn.Linear(emb.shape[1], emb.shape[0], bias=False, device=emb.device, dtype=emb.dtype)
            model.lm_head.weight.copy_(emb)
            model.config = replace(model.config, tie_word_embeddings=False)
        U = u.to(emb.device)
        emb.copy_(emb.double() - (emb.double() @ U)[:, None] * U)                  # rows are written vectors
        for block in model.layers:
            for m in (block.self_attn.o_proj, block.mlp.down_proj):
                w = m.weight                                                        # (D, in): columns written
                w.copy_(w.double() - U[:, None] * (U @ w.double())[None])
                if m.bias is not None:                                              # (D,): written as it is
                    m.bias.copy_(m.bias.double() - (m.bias.double() @ U) * U)
    return model


# ------------------------------------------------------------------------------------ controls and selection

def random_directions(vector: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """(k, *vector.shape): k random directions in the residual space, each as long as the vector (row by row for an
    (L, D) vector): the norm-matched control. Each is a standard normal draw (uniform on the sphere once
    normalized) from a torch.Generator seeded with `seed`, in fp64, so the same seed gives the same directions on
    any machine; in D dimensions two of them (or one and the vector) have |cosine| of about 1/sqrt(D)."""
    v = vector.detach().double().cpu()
    if k < 0:
        raise ValueError(f"random_directions: k = {k}, expected a count >= 0")
    if (v.norm(dim=-1) == 0).any():
        raise ValueError("random_directions: the vector has zero length, so there is no norm to match")
    r = torch.randn((k, *v.shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (r / r.norm(dim=-1, keepdim=True) * v.norm(dim=-1, keepdim=True)).to(vector.dtype)


def random_controls(vectors: dict, k: int, seed: int = 0) -> list[dict]:
    """k dicts {layer: random direction as long as vectors[layer]}: the control directions of a sweep. Layer l's
    draws are seeded by (seed, l) alone, so a layer's control is the same whichever other layers are steered."""
    per_layer = {l: random_directions(v, k, int(np.random.SeedSequence([seed % 2**32, l]).generate_state(1)[0]))
                 for l, v in vectors.items()}
    return [{l: d[j] for l, d in per_layer.items()} for j in range(k)]


def validation_split(items: list[dict], frac: float = 0.5, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(validation, test) items: split by claim (the items' "claim_id", which the built-in probes give: the true and
    false versions of a fact count as one claim) or else by "id", so nothing chosen on the validation part has seen
    a test claim. Both parts must be non-empty."""
    if not 0 < frac < 1:
        raise ValueError(f"validation fraction {frac}: expected a number between 0 and 1")
    key = "claim_id" if items and all(it.get("claim_id") is not None for it in items) else "id"
    val, test = probes.split(items, frac, seed, key=key)
    if not val or not test:
        raise ValueError(f"{len(items)} items ({len({it[key] for it in items})} distinct {key}s) cannot be split into "
                         f"a validation and a test part at fraction {frac}: give more held-out items")
    assert not {it[key] for it in val} & {it[key] for it in test}
    return val, test


GOALS = ("decrease", "increase", "either")


def select_point(candidates: list[dict], kl_max: float, goal: str = "decrease") -> dict | None:
    """The selection rule: among candidates measured on the validation split, each {"effect": change of the
    behaviour vs no intervention, "kl": side effect on neutral prompts, ...}, the one with the strongest effect in
    the goal's direction (decrease: most negative; increase: most positive; either: largest |effect|) whose KL is
    at most kl_max (refusal-direction work: KL <= 0.1). Ties go to the smaller KL, then to the earlier candidate.
    None when no candidate stays under the limit with an effect in the goal's direction: then there is nothing to
    report, rather than the best point of the test split."""
    if goal not in GOALS:
        raise ValueError(f"unknown goal {goal!r}: {', '.join(GOALS)}")
    sign = {"decrease": lambda e: -e, "increase": lambda e: e, "either": abs}[goal]
    ok = [(i, c) for i, c in enumerate(candidates) if c.get("effect") is not None and c.get("kl") is not None
          and c["kl"] <= kl_max and sign(c["effect"]) > 0]
    if not ok:
        return None
    return min(ok, key=lambda ic: (-sign(ic[1]["effect"]), ic[1]["kl"], ic[0]))[1]


class AfterHeader:
    """Token sequences scored again and again under different interventions (a sweep).

    logits(model) gives, per sequence, the logits at every position from the last header token to the end:
    (1 + number of tokens after the header, V). With reuse_prefix, everything up to the assistant header is read
    once into KV caches: steering "after the instruction" cannot change it (causal attention: earlier positions
    never see later ones, and the steered positions all come after), so a sweep point re-reads only the tokens
    after the header, one token ("(") for an A/B item instead of the whole question. Without reuse_prefix (for
    interventions that touch every position: ablation, where=all) each call reads the whole sequences."""

    def __init__(self, model, seqs: list[list[int]], header: list[int], reuse_prefix: bool, token_budget=4096):
        cuts = [header_end(s, header) for s in seqs]
        bad = [i for i, (c, s) in enumerate(zip(cuts, seqs)) if not 0 < c < len(s)]
        if bad:
            raise ValueError(f"sequence {bad[0]} has no tokens after an assistant header: nothing to steer")
        self.seqs, self.cuts, self.reuse, self.parts = seqs, cuts, reuse_prefix, []
        dev, dtype = model.model.embed_tokens.weight.device, model.model.embed_tokens.weight.dtype
        for batch in batches_by_length([len(s) for s in seqs], token_budget):
            if not reuse_prefix:
                self.parts.append((batch, None, None, None))
                continue
            x, mask = pad_left([seqs[i][: cuts[i]] for i in batch], dev)
            cache = KVCache(model.config, len(batch), x.shape[1], dtype, dev)
            with torch.no_grad():
                last = model(x, attention_mask=mask, cache=cache, logits_to_keep=1)[:, -1].float()   # (B, V)
            ids, smask = pad_right([seqs[i][cuts[i]:] for i in batch], dev)
            self.parts.append((batch, cache, last, (ids, smask)))

    def logits(self, model) -> list[torch.Tensor]:
        out = [None] * len(self.seqs)
        dev = model.model.embed_tokens.weight.device
        for batch, cache, last, suffix in self.parts:
            lens = [len(self.seqs[i]) - self.cuts[i] for i in batch]
            with torch.no_grad():
                if self.reuse:
                    ids, smask = suffix
                    fork = cache.fork(torch.arange(len(batch), device=dev), ids.shape[1])
                    rest = model(ids, attention_mask=smask, cache=fork).float()            # (B, S, V)
                    for r, i in enumerate(batch):
                        out[i] = torch.cat([last[r, None], rest[r, : lens[r]]]).cpu()
                else:   # left padding: every row ends at the last position
                    x, mask = pad_left([self.seqs[i] for i in batch], dev)
                    full = model(x, attention_mask=mask, logits_to_keep=max(lens) + 1).float()   # (B, S+1, V)
                    for r, i in enumerate(batch):
                        out[i] = full[r, full.shape[1] - lens[r] - 1:].cpu()
        return out
