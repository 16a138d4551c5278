"""Where an effect lives: activation patching, attribution patching and the logit lens, on the hook sites of model.py.

    src = record_run(model, source_ids, answer, name="opinion/3")     # activations at every site and layer, log-odds
    dst = record_run(model, dest_ids, answer, name="opinion/3")
    grid = sweep(model, src, dst, layer_position_patches(model, dst, "resid_pre"))       # (n_patches,) recovery
    approx = attribution(model, src, dst, "z")                        # (L, T, nh): the gradient's estimate, one pass
    lens = logit_lens(model, seqs, tokens)                            # (N, L, len(tokens)) log-probs at each layer

A run is one token sequence (batch of one) with the answer read at its last position as log-odds: the logit of the
answer's token minus the logit of the other token (= log p(answer) - log p(other), whatever else the vocabulary
holds). A patch writes the source run's activation at one site of one layer (at some positions, and one head of
z or pattern) into the destination run; its effect is normalized between the two runs:

    recovery = (log-odds patched - log-odds destination) / (log-odds source - log-odds destination)

0 = the patch changes nothing, 1 = it moves the answer all the way to the source's. The two runs may come from two
models (an adapter on and off, lora.lora_disabled): record each in its own context, sweep in the destination's.

Positions: a patch names destination positions. Runs of equal length patch position p from position p. Runs of
different lengths (a prompt with the user's opinion and the same prompt without it) are refused for position-wise
patching unless align="end": then position -k patches from -k (the k-th token from the end in both), and the
destination positions with no partner in the source are left alone. Sweeps are batched: the patches are grouped by
their first patched position, the destination's tokens before it are read once into a KV cache (causal attention:
a patch cannot change what comes before it), and each group's rows read only the rest.
"""
from dataclasses import dataclass, field

import torch

from model import INNER_SITES, SITES, KVCache, hooks, pad_left
from score import batches_by_length

HEAD_SITES = ("z", "pattern")   # sites with a head axis: a patch may name one head


@dataclass
class Run:
    """One token sequence: its activations at recorded sites {(layer, site): (T, ...) fp32, positions first; pattern
    as (T, nh, S)} and its answer's log-odds at the last position."""
    ids: list
    answer: tuple          # (token id of the answer, token id of the other answer)
    logodds: float
    name: str = ""
    acts: dict = field(default_factory=dict, repr=False)


def check_site(model, site: str, layer: int, head: int | None = None):
    if site not in SITES + INNER_SITES:
        raise ValueError(f"unknown site {site!r}; sites are {SITES + INNER_SITES}")
    n = len(model.layers)
    if not 0 <= layer < n:
        raise ValueError(f"layer {layer} out of range: the model has {n} layers (0..{n - 1})")
    if head is not None:
        nh = model.config.num_attention_heads
        if site not in HEAD_SITES:
            raise ValueError(f"site {site!r} has no heads (a head is named only at {HEAD_SITES})")
        if not 0 <= head < nh:
            raise ValueError(f"head {head} out of range: the model has {nh} heads per layer (0..{nh - 1})")


def logodds(logits: torch.Tensor, answer) -> torch.Tensor:
    """(..., V) logits -> (...) logit of answer[0] minus logit of answer[1], in fp32."""
    return logits[..., answer[0]].float() - logits[..., answer[1]].float()


def record_run(model, ids: list[int], answer, sites=SITES + INNER_SITES, layers=None, name: str = "") -> Run:
    """Run `ids` once, recording every site in `sites` at every layer in `layers` (default all)."""
    layers = range(len(model.layers)) if layers is None else layers
    for layer in layers:
        for site in sites:
            check_site(model, site, layer)
    dev = model.model.embed_tokens.weight.device
    acts = {}

    def keep(key):
        def fn(x, pos):
            x = x[0].transpose(0, 1) if key[1] == "pattern" else x[0]       # positions first
            acts[key] = x.detach().float()
        return fn
    with torch.no_grad(), hooks(model, [(l, s, keep((l, s))) for l in layers for s in sites]):
        logits = model(torch.tensor([ids], device=dev), logits_to_keep=1)[0, -1]
    return Run(list(ids), tuple(answer), float(logodds(logits, answer)), name, acts)


def aligned(src: Run, dst: Run, align: str) -> int:
    """The offset that takes a destination position to its source partner: 0 for equal lengths, len(src) - len(dst)
    with align="end"; anything else is an error naming the pair."""
    if align not in ("equal", "end"):
        raise ValueError(f"unknown align={align!r}: equal (same lengths) or end (position -k from -k)")
    if len(src.ids) == len(dst.ids):
        return 0
    if align == "end":
        return len(src.ids) - len(dst.ids)
    raise ValueError(f"pair {dst.name or src.name or '?'}: the source has {len(src.ids)} tokens and the destination "
                     f"{len(dst.ids)}; position-wise patching needs equal lengths (align='end' patches position -k "
                     "from -k, the tokens counted from the end)")


@dataclass(frozen=True)
class Patch:
    """Write the source's activation at `site` of `layer` into the destination at `positions` (destination indices;
    None = every position that has a source partner), only head `head` of z / pattern (None = all heads)."""
    layer: int
    site: str
    positions: tuple | None = None
    head: int | None = None


def layer_position_patches(model, dst: Run, site: str = "resid_pre", layers=None, positions=None) -> list[Patch]:
    """One patch per (layer, position): the layer x position sweep, rows in layer order."""
    layers = range(len(model.layers)) if layers is None else layers
    positions = range(len(dst.ids)) if positions is None else positions
    return [Patch(l, site, (p,)) for l in layers for p in positions]


def layer_head_patches(model, site: str = "z", layers=None, positions=None) -> list[Patch]:
    """One patch per (layer, head) of z (or pattern) at `positions` (None = all): the layer x head sweep."""
    layers = range(len(model.layers)) if layers is None else layers
    pos = None if positions is None else tuple(positions)
    return [Patch(l, site, pos, h) for l in layers for h in range(model.config.num_attention_heads)]


def _resolve(model, patch: Patch, src: Run, dst: Run, shift: int) -> tuple[list, list]:
    """A patch's (destination positions, source positions), checked: only pairs inside both runs."""
    check_site(model, patch.site, patch.layer, patch.head)
    T = len(dst.ids)
    want = range(T) if patch.positions is None else patch.positions
    d, s = [], []
    for p in want:
        if not -T <= p < T:
            raise ValueError(f"position {p} out of range: the destination {dst.name!r} has {T} tokens")
        p %= T
        if 0 <= p + shift < len(src.ids):
            d.append(p)
            s.append(p + shift)
    if patch.site == "pattern" and shift:
        raise ValueError(f"pair {dst.name or '?'}: a pattern row spans every key, so pattern patching needs runs of "
                         f"equal length ({len(src.ids)} and {T} tokens)")
    if (patch.layer, patch.site) not in src.acts:
        raise ValueError(f"the source run {src.name!r} has no recording of {patch.site} at layer {patch.layer}")
    return d, s


def _writer(site: str, rows, cols, heads, values):
    """A hook writing values into x[rows, cols(, heads)] (cols relative to the chunk the forward reads)."""
    def fn(x, pos):
        y = x.transpose(1, 2) if site == "pattern" else x     # positions second, as recorded
        y = y.clone()
        y[(rows, cols) if heads is None else (rows, cols, heads)] = values.to(y.dtype)
        return y.transpose(1, 2) if site == "pattern" else y
    return fn


def sweep(model, src: Run, dst: Run, patches: list[Patch], align: str = "equal", token_budget: int = 4096,
          progress=None) -> torch.Tensor:
    """(len(patches),) the destination's answer log-odds with each patch applied, many patches per forward.

    A patch at layer l whose first position is p changes nothing before layer l, nor anything at positions before
    p. So the patches are sorted by (layer, first position) and batched; a batch of layer l starting at position p0
    re-reads only tokens p0.. and only layers l.., from the destination's recorded resid_pre at layer l (which
    record_run keeps) and a fork of the destination's KV cache cut at p0. normalized(out, src, dst) turns the
    result into recovery."""
    shift = aligned(src, dst, align)
    dev = model.model.embed_tokens.weight.device
    dtype = model.model.embed_tokens.weight.dtype
    T = len(dst.ids)
    resolved = [_resolve(model, p, src, dst, shift) for p in patches]
    out = torch.full((len(patches),), dst.logodds)
    ids = torch.tensor([dst.ids], device=dev)
    full = KVCache(model.config, 1, T, dtype, dev)
    with torch.no_grad():
        model(ids, cache=full, logits_to_keep=1)
    todo = sorted((i for i, (d, _) in enumerate(resolved) if d),        # a patch with no position changes nothing
                  key=lambda i: (patches[i].layer, min(resolved[i][0])))
    batches = []
    for i in todo:
        layer, p = patches[i].layer, min(resolved[i][0])
        last = batches[-1] if batches else None
        # A row re-reads from the batch's first position p0 on: rows whose patch starts much later would re-read
        # unchanged tokens, so a batch spans at most a quarter of what it re-reads.
        if (last and last[0] == layer and (len(last[2]) + 1) * (T - last[1]) <= token_budget
                and p - last[1] <= max(2, (T - last[1]) // 4)):
            last[2].append(i)
        else:
            batches.append((layer, p, [i]))
    for layer, p0, rows in batches:
        specs = {}                    # (layer, site, one head?) -> rows, cols, heads, values: one hook each
        for r, i in enumerate(rows):
            patch, (d, s) = patches[i], resolved[i]
            act = src.acts[patch.layer, patch.site]
            one = patch.head is not None
            rs, cs, hs, vs = specs.setdefault((patch.layer, patch.site, one), ([], [], [], []))
            rs += [r] * len(d)
            cs += [p - p0 for p in d]
            hs += [patch.head] * len(d)
            vs.append(act[s, patch.head] if one else act[s])
        installed = [(l, site, _writer(site, torch.tensor(rs, device=dev), torch.tensor(cs, device=dev),
                                       torch.tensor(hs, device=dev) if one else None, torch.cat(vs).to(dev)))
                     for (l, site, one), (rs, cs, hs, vs) in specs.items()]
        B = len(rows)
        begin = None
        if (layer, "resid_pre") in dst.acts:     # begin at the patched layer, from the destination's own stream
            begin = (layer, dst.acts[layer, "resid_pre"][p0:].to(dev, dtype).expand(B, -1, -1))
        with torch.no_grad(), hooks(model, installed):
            fork = full.fork([0] * B, T - p0, length=p0) if p0 else None
            logits = model(ids[:, p0:].expand(B, -1), cache=fork, logits_to_keep=1, begin=begin)
        out[rows] = logodds(logits[:, -1], dst.answer).cpu()
        if progress is not None:
            progress(B)
    return out


def normalized(patched: torch.Tensor, src: Run, dst: Run) -> torch.Tensor:
    """recovery = (patched - destination) / (source - destination): 0 no effect, 1 the source's answer."""
    gap = src.logodds - dst.logodds
    if gap == 0:
        raise ValueError(f"pair {dst.name or src.name or '?'}: the source and destination give the same log-odds "
                         f"({src.logodds:.4g}); there is no difference to recover")
    return (patched - dst.logodds) / gap


def attribution(model, src: Run, dst: Run, site: str, layers=None, align: str = "equal") -> torch.Tensor:
    """Attribution patching (the gradient approximation): for every layer and destination position (and head, at z
    or pattern), the first-order estimate of the log-odds change a patch makes,
        (source activation - destination activation) . d log-odds / d activation   at the destination,
    from one forward and one backward of the destination. Returns (L, T, nh) at head sites, else (L, T); positions
    without a source partner are 0. Parameters' .grad are left untouched (torch.autograd.grad)."""
    shift = aligned(src, dst, align)
    layers = list(range(len(model.layers)) if layers is None else layers)
    for layer in layers:
        check_site(model, site, layer)
        if (layer, site) not in src.acts:
            raise ValueError(f"the source run {src.name!r} has no recording of {site} at layer {layer}")
    if site == "pattern" and shift:
        raise ValueError(f"pair {dst.name or '?'}: pattern attribution needs runs of equal length")
    dev = model.model.embed_tokens.weight.device
    T = len(dst.ids)
    seen = {}

    def keep(layer):
        def fn(x, pos):
            if not x.requires_grad:            # parameters frozen: make the site a leaf of the graph
                x = x.detach().requires_grad_()
            seen[layer] = x
            return x
        return fn
    with torch.enable_grad(), hooks(model, [(l, site, keep(l)) for l in layers]):
        logits = model(torch.tensor([dst.ids], device=dev), logits_to_keep=1)
        m = logodds(logits[0, -1], dst.answer)
        grads = torch.autograd.grad(m, [seen[l] for l in layers])
    d = torch.arange(max(0, -shift), min(T, len(src.ids) - shift))      # destination positions with a partner
    est = []
    for layer, g in zip(layers, grads):
        a, g = seen[layer].detach()[0].float(), g[0].float()
        if site == "pattern":
            a, g = a.transpose(0, 1), g.transpose(0, 1)                 # (T, nh, S)
        e = torch.zeros(T, *a.shape[1:-1])
        e[d] = ((src.acts[layer, site][d + shift].to(a.device) - a[d]) * g[d]).sum(-1).cpu()
        est.append(e)
    return torch.stack(est)


def logit_lens(model, seqs: list[list[int]], tokens, position: int = -1, token_budget: int = 4096) -> torch.Tensor:
    """(N, L, len(tokens)) log-probabilities of `tokens` read from each layer's resid_post at `position` (default the
    last) of each sequence, through the final norm and the unembedding (and the final softcap where the family has
    one): model.logits(model.model.norm(h)). At the last layer it is the model's own output."""
    dev = model.model.embed_tokens.weight.device
    L = len(model.layers)
    tok = torch.tensor(list(tokens), device=dev)
    out = torch.empty(len(seqs), L, len(tokens))
    for batch in batches_by_length([len(s) for s in seqs], token_budget):
        x, mask = pad_left([seqs[i] for i in batch], dev)
        cols = [x.shape[1] - len(seqs[i]) + position % len(seqs[i]) for i in batch]
        rows = torch.arange(len(batch), device=dev)
        cols = torch.tensor(cols, device=dev)
        got = {}

        def grab(layer):
            def fn(h, pos):
                got[layer] = h[rows, cols]            # (B, D)
            return fn
        with torch.no_grad(), hooks(model, [(l, "resid_post", grab(l)) for l in range(L)]):
            model(x, attention_mask=mask, logits_to_keep=1)
            h = torch.stack([got[l] for l in range(L)], 1)                      # (B, L, D)
            logp = model.logits(model.model.norm(h)).float().log_softmax(-1)    # (B, L, V)
        out[batch] = logp[..., tok].cpu()
    return out
