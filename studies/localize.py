"""Where sycophancy lives (issue 20): which layers and heads carry the user's opinion to the answer, in the organism (a
model with planted sycophancy: --adapter=PATH, the adapter of `make organism`) and in the base model (the same session
with the adapter off, lora.lora_disabled); whether ablating the organism's top heads removes the planted sycophancy
while the capability control holds; and how those heads relate to the steering vector. The library: patch.py.

    python -m studies.localize --adapter=out/organism-<time>/dose400/adapter.safetensors     # make localize ADAPTER=...
    python -m studies.localize                                                  # one model only (no adapter)

1. Pairs. Each built-in opinion probe of the first --n claims (the claims studies/organism.py deals to its test part,
   never trained on) against the same prompt with the opposite opinion ("I agree with the claim" <-> "I disagree with
   the claim"; a pair whose two prompts differ in token count is left out and counted). Both end with the assistant
   turn prefilled with "("; the answer is read there as log-odds: the letter of the user's side in the first prompt
   minus the letter of the user's side in the second. The opinion gap = log-odds(first) - log-odds(second): how far
   the user's stated opinion moves the answer.
2. Heads and layers, per model. Activation patching from the first prompt (source) into the second (destination):
   each head's z at every position (layers x heads), each head's z at the answer position only, and the residual
   stream (resid_pre) at every layer x position of one pair; recovery = sum over pairs of the change / sum of the gaps
   (0 no effect, 1 the whole opinion effect). Attribution patching estimates the same head grid from one backward
   per pair; its agreement with exact patching is reported (Pearson r over heads, overlap of the top heads). Also
   with the opinion -> without it (the no-opinion control, shorter: align="end", the answer position is -1 in
   both): each head's z at the answer position, recovery of log-odds(with) - log-odds(without).
3. Organism vs base. Source = the organism, destination = the base model, the same opinion prompt, answer = the
   user's letter vs the other: which heads' organism outputs, written into the base model, bring back the planted
   sycophancy.
4. Logit lens. log-odds(user's letter - other letter) at the answer position read from every layer, with the
   opinion and without it (the probe's no-opinion control, same claim and options): where the answer turns.
5. Ablation. The organism's --top_k heads by exact recovery (step 2, every position) are ablated at every position
   (--ablation=mean: each head's z replaced by its mean over the no-opinion controls' positions; zero: by 0), in the
   organism and in the base model, beside --top_k heads drawn at random (seeded, not among the top) as the control.
   Measured on the held-out claims after the first --n (also organism test claims): p(match) (CAA: p of the user's
   letter over A and B after "("), the capability control (lettered arithmetic) and KL on neutral prompts.
   planted effect = p_match(organism) - p_match(base); removed = (p_match(organism) - p_match(organism, ablated))
   / planted effect.
6. Steering vector. Each head's output direction = the letter-balanced mean over pairs of its write to the stream
   (W_O z at the answer position) with the opinion on the source side minus the destination side, as make_vectors
   builds the steering vector; its cosine with the steering vector of that layer (--vector=FILE, or built here from
   --n_vector built-in pairs on the organism). Gemma's post-attention norm acts after W_O: the direction is before it.

One results JSON (config, provenance, conventions, metrics, items, grids, lens), heatmaps and curves drawn from it,
and a markdown summary beside it.
"""
import sys
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import probes
from lab import report, results, stats
from lab.args import Count, ModelOptions, Positive, parse_args, user_errors
from lora import lora_disabled, lora_modules
from model import hooks
from patch import Patch, attribution, layer_head_patches, layer_position_patches, logit_lens, record_run, sweep
from probes import LETTERS
from runtime.session import Session, open_session
from score import letter_ids, user
from steer import ab_items, ab_pairs, load_vectors, make_vectors, record_pairs
from studies.steering import SweepScorer, capability_items


@dataclass
class LocalizeConfig(ModelOptions):
    n: Positive = 12            # claims patched (each: an opinion prompt and its opposite-opinion twin)
    n_test: Positive = 40       # held-out claims the ablation is measured on (after the first n)
    top_k: Positive = 3         # heads ablated
    check: Positive = 20        # heads patched exactly at every position: attribution's top ones
    ablation: str = "mean"      # mean: z replaced by its mean over the no-opinion controls | zero
    vector: str = ""            # steering vectors file for the cosines; "" = built here on the organism
    n_vector: Count = 100       # built-in pairs for that vector
    n_neutral: Positive = 12    # neutral prompts for the KL side effect
    n_capability: Positive = 40 # built-in arithmetic questions for the capability control
    seed: int = 0
    out: str = "out"
    run: str = ""               # "" = localize


# ----------------------------------------------------------------------------------------------------- pairs

def held_out_claims(n: int, seed: int, skip: int = 0) -> list[dict]:
    """Opinion items (each with its no-opinion control as item["control"]) of distinct claims number skip..skip+n in
    the built-in pool's order, the first pair of each claim, as studies/organism.py deals its test part."""
    k = 2 * (skip + n)
    while True:
        pool = probes.opinion_probes(k, seed)
        controls = {it["pair"]: it for it in pool if it["opinion"] is None}
        firsts, seen = [], set()
        for it in pool:
            if it["opinion"] is not None and it["claim_id"] not in seen:
                seen.add(it["claim_id"])
                firsts.append(it)
        if len(firsts) >= skip + n:
            return [{**it, "control": controls[it["pair"]]} for it in firsts[skip: skip + n]]
        if k > 100_000:
            raise ValueError(f"the built-in pool has fewer than {skip + n} distinct claims")
        k *= 2


def opposite(it: dict) -> str:
    """The question with the user's opinion reversed; everything else the same."""
    other = "disagree" if it["opinion"] == "agree" else "agree"
    flipped = it["question"].replace(f"I {it['opinion']} with the claim", f"I {other} with the claim")
    if flipped == it["question"]:
        raise ValueError(f"{it['id']}: no 'I {it['opinion']} with the claim' to reverse")
    return flipped


def opinion_pairs(tok, fmt, items) -> tuple[list[dict], list[str]]:
    """[{id, src, dst, control, answer (ids), letters (user's letter in src, in dst)}], and the ids left out because
    the reversed opinion changes the token count."""
    ids = dict(zip(LETTERS, letter_ids(tok, LETTERS)))
    pairs, skipped = [], []
    for it in items:
        src = tok.encode(fmt(user(it["question"]), prefill="("))
        dst = tok.encode(fmt(user(opposite(it)), prefill="("))
        if len(src) != len(dst):
            skipped.append(it["id"])
            continue
        other = next(x for x in it["letters"] if x != it["match"])
        pairs.append({"id": it["id"], "src": src, "dst": dst, "letters": [it["match"], other],
                      "answer": (ids[it["match"]], ids[other]),
                      "control": tok.encode(fmt(user(it["control"]["question"]), prefill="("))})
    return pairs, skipped


# ------------------------------------------------------------------------------------------------- patching

def runs(model, p, sites=("resid_pre", "z")):
    return (record_run(model, p["src"], p["answer"], sites, name=p["id"]),
            record_run(model, p["dst"], p["answer"], sites, name=p["id"]))


def head_grids(model, pairs, check: int, desc: str) -> dict:
    """Recovery per head, summed over pairs: attribution's estimate for every head (z at every position), exact
    patching of every head at the answer position, and exact patching at every position of the `check` heads that
    attribution ranks highest (|estimate|); the opinion gap per pair; one pair's layer x position grid of resid_pre
    (exact and attributed); each head's write W_O z at the answer position on both sides."""
    L, H, hd = len(model.layers), model.config.num_attention_heads, model.config.head_dim
    W = [b.self_attn.o_proj.weight.detach().float().view(-1, H, hd) for b in model.layers]     # (D, H, hd)
    est, last, bare, bare_gap = torch.zeros(L, H), torch.zeros(L * H), torch.zeros(L * H), 0.0
    gaps, rows, writes, showcase = [], [], {"src": [], "dst": []}, None
    for n, p in enumerate(tqdm(pairs, desc=f"{desc}: attribution, answer position", leave=False)):
        src, dst = runs(model, p)
        gap = src.logodds - dst.logodds
        # with the opinion -> without it (the no-opinion control, shorter: aligned from the end), answer position
        ctl = record_run(model, p["control"], p["answer"], ("resid_pre",), name=p["id"])
        bare += sweep(model, src, ctl, layer_head_patches(model, "z", positions=[-1]), align="end") - ctl.logodds
        bare_gap += src.logodds - ctl.logodds
        est += attribution(model, src, dst, "z").sum(1)                                         # (L, H)
        last += sweep(model, src, dst, layer_head_patches(model, "z", positions=[len(p["dst"]) - 1])) - dst.logodds
        gaps.append(gap)
        rows.append({"id": p["id"], "tokens": len(p["dst"]), "logodds_src": src.logodds, "logodds_dst": dst.logodds,
                     "gap": gap})
        for side, run in (("src", src), ("dst", dst)):      # each head's write W_O z at the answer position: (L*H, D)
            writes[side].append(torch.stack([torch.einsum("nh,dnh->nd", run.acts[l, "z"][-1], W[l])
                                             for l in range(L)]).view(L * H, -1))
        if n == 0:   # one pair's layer x position grid of the residual stream, exact and attributed
            grid = sweep(model, src, dst, layer_position_patches(model, dst, "resid_pre"))
            showcase = {"id": p["id"], "exact": ((grid - dst.logodds) / gap).view(L, -1).tolist(),
                        "attribution": (attribution(model, src, dst, "resid_pre") / gap).tolist()}
    total = sum(gaps)
    checked = sorted(range(L * H), key=lambda i: -abs(float(est.flatten()[i])))[:check]
    every = torch.zeros(len(checked))
    patches = [Patch(i // H, "z", None, i % H) for i in checked]
    for p in tqdm(pairs, desc=f"{desc}: exact, top {check} heads", leave=False):
        src, dst = runs(model, p)
        every += sweep(model, src, dst, patches) - dst.logodds
    every_grid = torch.full((L * H,), float("nan"))
    every_grid[checked] = every / total
    return {"gaps": gaps, "rows": rows, "total_gap": total, "showcase": showcase, "checked": checked,
            "every": every_grid.view(L, H), "last": (last / total).view(L, H), "attribution": est / total,
            "vs_control": (bare / bare_gap).view(L, H), "control_gap": bare_gap / len(pairs),
            "writes": (torch.stack(writes["src"]), torch.stack(writes["dst"]))}


def organism_vs_base(s: Session, pairs, check: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Source = the organism, destination = the base model, the same opinion prompt: (attribution's estimate for
    every head, exact recovery of the `check` heads it ranks highest (NaN elsewhere), the mean log-odds gap)."""
    model = s.model
    L, H = len(model.layers), model.config.num_attention_heads
    est, total = torch.zeros(L, H), 0.0
    for p in tqdm(pairs, desc="organism -> base: attribution", leave=False):
        src = record_run(model, p["src"], p["answer"], ("resid_pre", "z"), name=p["id"])
        with lora_disabled(model):
            dst = record_run(model, p["src"], p["answer"], ("resid_pre", "z"), name=p["id"])
            est += attribution(model, src, dst, "z").sum(1)
        total += src.logodds - dst.logodds
    checked = sorted(range(L * H), key=lambda i: -abs(float(est.flatten()[i])))[:check]
    patches = [Patch(i // H, "z", None, i % H) for i in checked]
    change = torch.zeros(len(checked))
    for p in tqdm(pairs, desc="organism -> base: exact", leave=False):
        src = record_run(model, p["src"], p["answer"], ("z",), name=p["id"])
        with lora_disabled(model):
            dst = record_run(model, p["src"], p["answer"], ("resid_pre", "z"), name=p["id"])
            change += sweep(model, src, dst, patches) - dst.logodds
    exact = torch.full((L * H,), float("nan"))
    exact[checked] = change / total
    return est / total, exact.view(L, H), total / len(pairs)


def lens_curves(model, pairs) -> dict:
    """Mean log-odds (user's letter - other) per layer at the answer position, with the opinion and without."""
    out = {}
    for name, key in (("opinion", "src"), ("no_opinion", "control")):
        got = logit_lens(model, [p[key] for p in pairs], sorted({t for p in pairs for t in p["answer"]}))
        toks = sorted({t for p in pairs for t in p["answer"]})
        lo = torch.stack([got[n, :, toks.index(p["answer"][0])] - got[n, :, toks.index(p["answer"][1])]
                          for n, p in enumerate(pairs)])                                   # (N, L)
        out[name] = lo.mean(0).tolist()
    return out


# --------------------------------------------------------------------------------------------------- ablation

def head_means(model, pairs) -> torch.Tensor:
    """(L, H, hd) each head's mean z over every position of the no-opinion controls."""
    L = len(model.layers)
    sums, count = None, 0
    for p in pairs:
        run = record_run(model, p["control"], p["answer"], ("z",))
        z = torch.stack([run.acts[l, "z"].sum(0) for l in range(L)]).double()
        sums = z if sums is None else sums + z
        count += len(p["control"])
    return (sums / count).float()


def ablated(model, heads, means, how: str):
    """z of each (layer, head) replaced at every position by its mean (how="mean") or by 0."""
    by_layer = {}
    for l, h in heads:
        by_layer.setdefault(l, []).append(h)

    def fn(layer):
        hs = by_layer[layer]

        def write(z, pos):
            z = z.clone()
            z[:, :, hs] = 0 if how == "zero" else means[layer, hs].to(z)
            return z
        return write
    return hooks(model, [(l, "z", fn(l)) for l in by_layer])


def ablation_points(s: Session, cfg, heads, control, means, organism: bool) -> dict:
    items = [it for it in held_out_claims(cfg.n_test, cfg.seed, skip=cfg.n)]
    cap = capability_items(cfg.n_capability, cfg.seed)
    out = {}
    for name, ctx in (("organism", nullcontext()), ("base", lora_disabled(s.model))) if organism else \
            (("model", nullcontext()),):
        with ctx:
            score = SweepScorer(s.model, s.tok, s.fmt, items, cfg.n_neutral, cap, reuse_prefix=False)
            for cond, hs in (("none", []), ("top", heads), ("random", control)):
                with ablated(s.model, hs, means, cfg.ablation) if hs else nullcontext():
                    got = score(s.model)
                out[name, cond] = {"p_match": [r["p_match"] for r in got["rows"]], "ids": [r["id"] for r in got["rows"]],
                                   "capability": got["capability"], "kl": got["kl"]}
    return out


# ------------------------------------------------------------------------------------------------------ run

def grid(values, title, xlabel="head", ylabel="layer", xticks=None) -> dict:
    """A heatmap's data for the results file; NaN (not measured) becomes None."""
    v = values.tolist() if isinstance(values, torch.Tensor) else values
    v = [[None if x != x else x for x in row] for row in v]
    return {"values": v, "title": title, "xlabel": xlabel, "ylabel": ylabel, "xticks": xticks}


def steering_vector(cfg, s: Session) -> tuple[dict, str]:
    if cfg.vector:
        vecs, _, _ = load_vectors(cfg.vector, s.model, cfg.cross_model)
        return vecs, cfg.vector
    items, _ = ab_items("", cfg.n_vector, 0, cfg.seed, n_builtin=(cfg.n_vector, 10))
    pairs = ab_pairs(s.tok, s.fmt, items)
    layers = list(range(len(s.model.layers)))
    pos, neg = record_pairs(s.model, pairs, layers)
    vec = make_vectors(pos, neg, "mean_diff", cfg.seed, [p["letters"][0] for p in pairs])
    return dict(zip(layers, vec)), f"built here: {len(pairs)} built-in pairs, mean_diff balanced by letter, resid_post"


def check(cfg: LocalizeConfig):
    if cfg.ablation not in ("mean", "zero"):
        raise ValueError(f"--ablation={cfg.ablation!r}: mean or zero")


def run(cfg: LocalizeConfig, s: Session) -> tuple[dict, Path]:
    check(cfg)
    model = s.model
    organism = bool(lora_modules(model))
    L, H = len(model.layers), model.config.num_attention_heads
    if 2 * cfg.top_k > L * H:
        raise ValueError(f"--top_k={cfg.top_k}: the model has {L * H} heads, too few for {cfg.top_k} top heads and as "
                         "many random ones")
    items = held_out_claims(cfg.n, cfg.seed)
    pairs, skipped = opinion_pairs(s.tok, s.fmt, items)
    if not pairs:
        raise ValueError("every pair changed its token count when the opinion was reversed: nothing to patch")
    print(f"localize: {len(pairs)} opinion / opposite-opinion pairs ({len(skipped)} left out: token counts differ), "
          f"{L} layers x {H} heads" + ("; organism and base" if organism else "; one model (no adapter)"))
    models = {"organism": nullcontext, "base": lambda: lora_disabled(model)} if organism else {"model": nullcontext}
    found, lens = {}, {}
    for name, ctx in models.items():
        with ctx():
            found[name] = head_grids(model, pairs, min(cfg.check, L * H), f"patch {name}")
            lens[name] = lens_curves(model, pairs)
    main = "organism" if organism else "model"
    ob_est, ob, ob_gap = organism_vs_base(s, pairs, min(cfg.check, L * H)) if organism else (None, None, None)
    rec = found[main]["every"]
    order = sorted(((i // H, i % H) for i in found[main]["checked"]), key=lambda lh: -float(rec[lh]))
    top = order[: cfg.top_k]
    rng = np.random.default_rng(cfg.seed)
    rest = [(l, h) for l in range(L) for h in range(H) if (l, h) not in top]
    control = [rest[i] for i in sorted(rng.choice(len(rest), cfg.top_k, replace=False))]
    means = head_means(model, pairs)
    points = ablation_points(s, cfg, top, control, means, organism)
    vecs, vec_source = steering_vector(cfg, s)
    src_w, dst_w = found[main]["writes"]
    head_dir = make_vectors(src_w, dst_w, "mean_diff", cfg.seed, [p["letters"][0] for p in pairs])      # (L*H, D)
    cos = torch.tensor([[float(torch.nn.functional.cosine_similarity(head_dir[l * H + h], vecs[l].float(), dim=0))
                         if l in vecs else float("nan") for h in range(H)] for l in range(L)])

    # metrics
    metrics = {}
    for name in models:
        metrics[f"opinion_gap[{name}]"] = stats.mean_metric(found[name]["gaps"])
        metrics[f"opinion_vs_control_gap[{name}]"] = {"value": found[name]["control_gap"], "ci": None, "n": len(pairs),
                                                      "kind": "mean"}
        checked = found[name]["checked"]            # attribution vs exact on the heads patched exactly
        ex, at = found[name]["every"].flatten()[checked], found[name]["attribution"].flatten()[checked]
        r = stats.correlation(at.tolist(), ex.tolist())
        metrics[f"attribution_vs_exact_r[{name}]"] = {"value": r["r"], "ci": None, "n": r["n"], "kind": "pearson"}
        k = cfg.top_k
        top_ex = set(ex.topk(k).indices.tolist())
        top_at = set(at.topk(k).indices.tolist())
        metrics[f"attribution_top{k}_overlap[{name}]"] = {"value": len(top_ex & top_at) / k, "ci": None, "n": k,
                                                         "kind": "fraction"}
        metrics[f"top{k}_heads_recovery[{name}]"] = {
            "value": float(sum(found[name]["every"][l, h] for l, h in top)), "ci": None, "n": len(pairs),
            "kind": "recovery"}
    if ob is not None:
        metrics["organism_over_base_logodds"] = {"value": ob_gap, "ci": None, "n": len(pairs), "kind": "mean"}
        if not any(torch.isnan(ob[l, h]) for l, h in top):
            metrics[f"top{cfg.top_k}_heads_recovery[organism->base]"] = {
                "value": float(sum(ob[l, h] for l, h in top)), "ci": None, "n": len(pairs), "kind": "recovery"}
    for (name, cond), got in points.items():
        metrics[f"p_match[{name},{cond}]"] = stats.mean_metric(got["p_match"])
        metrics[f"capability[{name},{cond}]"] = stats.proportion_metric(got["capability"])
        metrics[f"kl[{name},{cond}]"] = stats.mean_metric(got["kl"])
        if cond != "none":
            base = points[name, "none"]
            metrics[f"change_p_match[{name},{cond}]"] = stats.paired_difference(
                dict(zip(base["ids"], base["p_match"])), dict(zip(got["ids"], got["p_match"])))
    if organism:        # per held-out item (the same items in every condition), bootstrapped over items
        by_id = {key: dict(zip(got["ids"], got["p_match"])) for key, got in points.items()}
        ids = list(by_id["organism", "none"])
        planted = [by_id["organism", "none"][i] - by_id["base", "none"][i] for i in ids]
        for cond in ("top", "random"):
            removed = [by_id["organism", "none"][i] - by_id["organism", cond][i] for i in ids]
            metrics[f"planted_removed[{cond}]"] = stats.ratio_of_means(removed, planted, cfg.seed)
        metrics["planted_effect_p_match"] = stats.paired_difference(by_id["base", "none"], by_id["organism", "none"],
                                                                    cfg.seed)

    grids = {}
    for name in models:
        grids[f"heads_every[{name}]"] = grid(found[name]["every"], f"{name}: z patched at every position")
        grids[f"heads_last[{name}]"] = grid(found[name]["last"], f"{name}: z patched at the answer position")
        grids[f"heads_attribution[{name}]"] = grid(found[name]["attribution"], f"{name}: attribution estimate")
        grids[f"heads_vs_control[{name}]"] = grid(found[name]["vs_control"],
                                                  f"{name}: opinion -> no opinion, z at the answer position")
    if ob is not None:
        grids["heads_organism_to_base"] = grid(ob, "organism -> base: z at every position (exact)")
        grids["heads_organism_to_base_attribution"] = grid(ob_est, "organism -> base: attribution estimate")
    grids["head_cosine_with_vector"] = grid(cos, f"{main}: cos(head direction, steering vector)")
    sc = found[main]["showcase"]
    toks = [s.tok.decode([t]) for t in next(p["dst"] for p in pairs if p["id"] == sc["id"])]
    for kind in ("exact", "attribution"):
        grids[f"resid_positions_{kind}[{main}]"] = grid(sc[kind], f"{main}, {sc['id']}: resid_pre ({kind})",
                                                        xlabel="position (destination token)", xticks=toks)
    summary = {"top_heads": [{"layer": l, "head": h, "recovery": float(rec[l, h]),
                              "recovery_last": float(found[main]["last"][l, h]),
                              "attribution": float(found[main]["attribution"][l, h]),
                              "organism_to_base": None if ob is None or torch.isnan(ob[l, h]) else float(ob[l, h]),
                              "cos_vector": float(cos[l, h])} for l, h in order[:10]],
               "ablated": [list(x) for x in top], "random_control": [list(x) for x in control]}
    items_out = [{**r, **{f"{k}[{name}]": found[name]["rows"][i][k] for name in models
                          for k in ("logodds_src", "logodds_dst", "gap")}} for i, r in enumerate(found[main]["rows"])]
    result = {"config": asdict(cfg), "provenance": results.provenance(cfg, s.model_dir, s.fmt_name),
              "conventions": {
                  "pairs": "built-in opinion probe vs the same prompt with the opposite opinion, equal token counts; "
                           f"claims 0..{cfg.n - 1} of the pool (studies/organism.py's test claims)",
                  "answer": "log-odds at the prefilled '(': logit(user's letter in the source) - logit(user's letter "
                            "in the destination)",
                  "recovery": "sum over pairs of (patched - destination) / sum of (source - destination)",
                  "ablation": f"{cfg.ablation}: z of each head at every position "
                              + ("replaced by its mean over the no-opinion controls' positions" if cfg.ablation ==
                                 "mean" else "set to 0"),
                  "ablation_test": f"held-out claims {cfg.n}..{cfg.n + cfg.n_test - 1}, CAA p(match) after '('",
                  "head_direction": "letter-balanced mean over pairs of W_O z at the answer position, source minus "
                                    "destination (make_vectors)", "steering_vector": vec_source,
                  "base": "the same session with the adapter off (lora.lora_disabled)" if organism else None},
              "metrics": metrics, "summary": summary, "grids": grids, "lens": lens,
              "skipped": [{"item": i, "error": "the reversed opinion changes the token count"} for i in skipped],
              "items": items_out}
    path = results.write_result(cfg.out, cfg.run or "localize", result)
    draw(results.load_result(path), path)
    return result, path


# ----------------------------------------------------------------------------------------------- from the file

def draw(result: dict, path: Path) -> list[Path]:
    """The heatmaps, the layer x position grid, the logit-lens curves and the markdown summary, from the results file."""
    g = result["grids"]
    heads = [k for k in ("heads_attribution[organism]", "heads_every[organism]", "heads_last[organism]",
                         "heads_attribution[model]", "heads_every[model]", "heads_last[model]",
                         "heads_organism_to_base_attribution", "heads_organism_to_base", "heads_attribution[base]",
                         "heads_every[base]", "heads_last[base]", "heads_vs_control[organism]",
                         "heads_vs_control[base]", "heads_vs_control[model]", "head_cosine_with_vector") if k in g]
    out = [report.plot_heatmaps([g[k] for k in heads], path.with_suffix(".heads.png"),
                                "recovery of the user's opinion effect per layer x head")]
    pos = [k for k in g if k.startswith("resid_positions_")]
    out.append(report.plot_heatmaps([g[k] for k in pos], path.with_suffix(".positions.png"),
                                    "recovery per layer x position (resid_pre)"))
    lens = result["lens"]
    n_layers = len(next(iter(lens.values()))["opinion"])
    ys = [lens[m][k] for m in lens for k in ("opinion", "no_opinion")]
    labels = [f"{m}, {k.replace('_', ' ')}" for m in lens for k in ("opinion", "no_opinion")]
    out.append(report.plot_curve(list(range(n_layers)), ys, None, labels, path.with_suffix(".lens.png"), "layer",
                                 "log-odds (user's letter - other)", "logit lens at the answer position"))
    md = path.with_suffix(".md")
    md.write_text(summary_markdown(result, [p.name for p in out]))
    return out + [md]


def summary_markdown(result: dict, pictures) -> str:
    m, s, c = result["metrics"], result["summary"], result["config"]

    def val(key, fmt="{:.3f}"):
        v = m.get(key)
        if not v or v["value"] is None or v["value"] != v["value"]:       # None, or NaN (no gap to normalize by)
            return "n/a"
        ci = f" [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}]" if v.get("ci") else ""
        return fmt.format(v["value"]) + ci
    names = [k[len("opinion_gap["):-1] for k in m if k.startswith("opinion_gap[")]
    k = c["top_k"]
    lines = [f"# Where sycophancy lives: {result['provenance']['model_dir']}"
             + (f" + {c['adapter']}" if c.get("adapter") else ""), "",
             f"{len(result['items'])} opinion / opposite-opinion pairs ({len(result['skipped'])} left out); "
             f"{result['conventions']['recovery']}.", "",
             "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names),
             "| opinion gap (log-odds) | " + " | ".join(val(f"opinion_gap[{n}]") for n in names) + " |",
             "| with - without the opinion (log-odds) | "
             + " | ".join(val(f"opinion_vs_control_gap[{n}]") for n in names) + " |",
             f"| top-{k} heads' recovery | " + " | ".join(val(f"top{k}_heads_recovery[{n}]") for n in names) + " |",
             "| attribution vs exact, Pearson r over heads | "
             + " | ".join(val(f"attribution_vs_exact_r[{n}]") for n in names) + " |",
             f"| attribution's top-{k} = exact's top-{k} | "
             + " | ".join(val(f"attribution_top{k}_overlap[{n}]", "{:.2f}") for n in names) + " |", "",
             "Top heads (recovery with z patched at every position; at the answer position only; attribution's "
             "estimate; organism -> base; cosine of the head's direction with the steering vector):", "",
             "| layer.head | recovery | answer position | attribution | organism -> base | cos(vector) |",
             "|---|---|---|---|---|---|"]
    for t in s["top_heads"]:
        ob = "n/a" if t["organism_to_base"] is None else f"{t['organism_to_base']:.3f}"
        lines.append(f"| L{t['layer']}.H{t['head']} | {t['recovery']:.3f} | {t['recovery_last']:.3f} | "
                     f"{t['attribution']:.3f} | {ob} | {t['cos_vector']:+.3f} |")
    lines += ["", f"Ablation ({result['conventions']['ablation']}) of the top-{k} heads "
              f"{', '.join(f'L{l}.H{h}' for l, h in s['ablated'])} and of {k} random heads "
              f"{', '.join(f'L{l}.H{h}' for l, h in s['random_control'])}; {result['conventions']['ablation_test']}:",
              "", "| model | ablated | p(match) | capability | KL on neutral prompts |", "|---|---|---|---|---|"]
    for n in [x for x in ("organism", "base", "model") if f"p_match[{x},none]" in m]:
        for cond in ("none", "top", "random"):
            lines.append(f"| {n} | {cond} | {val(f'p_match[{n},{cond}]')} | {val(f'capability[{n},{cond}]')} | "
                         f"{val(f'kl[{n},{cond}]', '{:.4f}')} |")
    if "planted_effect_p_match" in m:
        lines += ["", f"Planted effect (p(match) organism - base): {val('planted_effect_p_match')}; removed by the "
                  f"top-{k} heads' ablation: {val('planted_removed[top]')}, by the random heads': "
                  f"{val('planted_removed[random]')} (fractions, bootstrapped over the items)."]
    lines += [""] + [f"![{p}]({p})" for p in pictures]
    return "\n".join(lines) + "\n"


@user_errors()
def main(argv):
    cfg = parse_args(LocalizeConfig, argv)
    check(cfg)
    torch.manual_seed(cfg.seed)
    s = open_session(cfg)
    result, path = run(cfg, s)
    print(Path(path).with_suffix(".md").read_text())
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
