"""What the residual stream says about sycophancy, answered with numbers (studies 1 and 3).

    python -m studies.geometry predict --vector=out/vectors-....safetensors     # does cos(activation, vector)
                                                      # predict the model's own sycophantic answer? AUROC per layer
    python -m studies.geometry consistency [--data=...]                  # how much do vectors depend on their prompts?
    python -m studies.geometry geometry --acts=out/vectors-....acts.safetensors  # PCA / t-SNE, held-out probe accuracy

Pitfalls of the originals fixed here: activations "after the continuation" are the mean over the generated tokens
(not the prompt's last position again); every number has an interval and n; t-SNE and splits are seeded; the
linear probe is tested on held-out pairs against a shuffled-label control.
"""
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import data
import probes
from lab import report, results, stats
from lab.args import Count, Layers, ModelOptions, Positive, parse_command, user_errors
from model import generate
from runtime.session import Session, open_session
from probes import LETTERS
from score import letter_ids, letter_probs, pick_letter, user
from steer import (ab_items, ab_pairs, load_activations, load_vectors, make_vectors, parse_layers, record,
                   record_pairs)


@dataclass
class GeometryConfig(ModelOptions):
    action: str = "predict"   # predict | consistency | geometry
    vector: str = ""          # predict: a vectors file from `python -m studies.steering vectors`
    acts: str = ""            # geometry: its activations file ("" = record from --data)
    data: str = ""            # A/B items ("" = built-in opinion probes; predict: their held-out part)
    data2: str = ""           # consistency: a second pair set to compare vectors across datasets
    ood: str = ""             # predict, out of distribution: TruthfulQA mc_task.json ("" = built-in arithmetic)
    n: Count = 0              # items (0 = all; built-in: 200 claims for vectors/geometry, 100 held out)
    n_ood: Positive = 100
    layers: Layers = ""       # "" = every layer
    max_new_tokens: Positive = 8  # predict: continuation whose tokens are averaged
    n_splits: Positive = 20   # consistency: random disjoint splits per point
    n_boot: Positive = 2000
    skip_bad: bool = False
    run: str = ""
    out: str = "out"
    seed: int = 0


# ------------------------------------------------------------------------------------------------------ AUROC

def auroc(labels, scores) -> float:
    """P(score of a random positive > score of a random negative), ties counting half (Mann-Whitney U / n+ n-)."""
    labels, scores = np.asarray(labels, bool), np.asarray(scores, np.float64)
    from scipy.stats import rankdata
    ranks = rankdata(scores)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auroc_metric(labels, scores, seed=0, n_boot=2000) -> dict:
    """AUROC with a stratified percentile-bootstrap 95% interval (positives and negatives resampled apart), and the
    point-biserial r (Pearson r of the 0/1 label with the score) with its p-value. Undefined with one class."""
    labels, scores = np.asarray(labels, bool), np.asarray(scores, np.float64)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    out = {"value": None, "ci": None, "n": len(labels), "kind": "auroc", "n_pos": n_pos, "n_neg": n_neg}
    if n_pos < 2 or n_neg < 2:
        return out
    rng = np.random.default_rng(seed)
    pos, neg = scores[labels], scores[~labels]
    boots = [auroc(np.r_[np.ones(n_pos, bool), np.zeros(n_neg, bool)],
                   np.r_[rng.choice(pos, n_pos), rng.choice(neg, n_neg)]) for _ in range(n_boot)]
    r = stats.correlation(labels.astype(float), scores)
    out.update(value=auroc(labels, scores), ci=[float(x) for x in np.quantile(boots, [0.025, 0.975])],
               r=r["r"], p=r["p"])
    return out


# ------------------------------------------------------------------------------------------------ predictivity

def cosines(acts: torch.Tensor, vecs: torch.Tensor) -> np.ndarray:
    """(N, L) cosine of each activation (N, L, D) with its layer's vector (L, D)."""
    return torch.cosine_similarity(acts.double(), vecs.double()[None], dim=-1).numpy()


def answered_items(s: Session, items, prefill: str):
    """Prompt ids (assistant turn prefilled) and the model's own letter for each item."""
    prompts = [s.tok.encode(s.fmt(it["messages"] if "messages" in it else user(it["question"]), prefill=prefill))
               for it in items]
    probs = letter_probs(s.model, prompts, letter_ids(s.tok, LETTERS))
    answers = [pick_letter(it["letters"], p) for it, p in zip(items, probs)]
    return prompts, answers


def prompt_and_continuation_acts(model, prompts, layers, max_new_tokens):
    """(N, L, D) at the last prompt token and (N, L, D) averaged over the greedy continuation's own positions
    (None rows where the model stopped at once)."""
    at_prompt = record(model, prompts, [-1] * len(prompts), layers, progress="record prompts")
    conts = generate(model, prompts, max_new_tokens=max_new_tokens)
    seqs = [p + c for p, c in zip(prompts, conts)]
    reads = [list(range(len(p), len(p) + len(c))) or [-1] for p, c in zip(prompts, conts)]
    after = record(model, seqs, reads, layers, progress="record continuations")
    empty = [not c for c in conts]
    return at_prompt, after, empty


def predict_run(cfg, s: Session):
    vecs, _, vmeta = load_vectors(cfg.vector, s.model, cfg.cross_model)
    layers = parse_layers(cfg.layers, len(s.model.layers), default=sorted(vecs))
    V = torch.stack([vecs[l] for l in layers])
    n = cfg.n or 100
    sets = {}
    items, files = ab_items(cfg.data, cfg.n, 1, cfg.seed, cfg.skip_bad, (200, n))
    prompts, answers = answered_items(s, items, "(")
    # Within one prompt type, and within one matching letter: a model with a letter bias "agrees" whenever the
    # user's side happens to be its favourite letter, and the label then says more about the letter than the user.
    sets["in_distribution"] = (items, prompts, [a == it["match"] for it, a in zip(items, answers)],
                               {"type": [it.get("kind") or it["source"] for it in items],
                                "match": [f"match {it['match']}" for it in items]})
    qa, ood_files = ood_items(cfg)
    probe_items = [p for p in probes.answer_probes(qa, cfg.seed) if p["template"] == "suggest_incorrect"]
    prompts, answers = answered_items(s, probe_items, probes.MC_PREFILL)
    sets["out_of_distribution"] = (probe_items, prompts, [a == it["incorrect_letter"] for it, a in
                                                          zip(probe_items, answers)], {})
    metrics, rows = {}, []
    for name, (its, prompts, labels, groupings) in sets.items():
        at_prompt, after, empty = prompt_and_continuation_acts(s.model, prompts, layers, cfg.max_new_tokens)
        cos_p, cos_c = cosines(at_prompt, V), cosines(after, V)
        keep = ~np.array(empty)
        metrics[f"sycophantic_rate[{name}]"] = stats.proportion_metric(labels)
        for j, layer in enumerate(tqdm(layers, desc=f"AUROC {name}", leave=False)):
            lab = np.array(labels)
            metrics[f"auroc_prompt[{name},L{layer}]"] = auroc_metric(lab, cos_p[:, j], cfg.seed, cfg.n_boot)
            metrics[f"auroc_continuation[{name},L{layer}]"] = auroc_metric(lab[keep], cos_c[keep, j], cfg.seed,
                                                                           cfg.n_boot)
            for values in groupings.values():
                for t in sorted(set(values)) if len(set(values)) > 1 else []:
                    sel = np.array([x == t for x in values])
                    metrics[f"auroc_prompt[{name}:{t},L{layer}]"] = auroc_metric(lab[sel], cos_p[sel, j], cfg.seed,
                                                                                 cfg.n_boot)
        rows += [{"id": it["id"], "set": name, "sycophantic": bool(y), "empty_continuation": e,
                  **{k: v[i] for k, v in groupings.items()},
                  "cos_prompt": dict(zip(map(str, layers), cp.round(6).tolist())),
                  "cos_continuation": dict(zip(map(str, layers), cc.round(6).tolist()))}
                 for i, (it, y, e, cp, cc) in enumerate(zip(its, labels, empty, cos_p, cos_c))]
    result = {"config": asdict(cfg), "provenance": results.provenance(cfg, s.model_dir, s.fmt_name, files + ood_files),
              "conventions": {"vector": cfg.vector, **vmeta, "label": "the model's own greedy letter agrees with "
                              "the user (in distribution) / is the user's suggested incorrect answer (out of "
                              "distribution)", "prompt_position": "last prompt token (the prefilled '(')",
                              "continuation": f"mean over up to {cfg.max_new_tokens} greedy generated tokens"},
              "metrics": metrics, "skipped": data.skipped_of(items, qa), "items": rows}
    path = results.write_result(cfg.out, cfg.run or "predict", result)
    plot_predict(result, path.with_suffix(".png"))
    return result, path


def ood_items(cfg):
    """Out-of-distribution QA items: TruthfulQA (a local copy) or the built-in arithmetic questions."""
    path = cfg.ood or data.local_truthfulqa()
    if path:
        items = data.read_truthfulqa_mc(path, skip_bad=cfg.skip_bad)
        rng = np.random.default_rng(cfg.seed)
        idx = sorted(rng.choice(len(items), min(cfg.n_ood, len(items)), replace=False).tolist())
        return data.derived(items, [items[i] for i in idx]), [Path(path)]
    return probes.arithmetic_qa(cfg.n_ood, seed=cfg.seed + 2), []


def plot_predict(result, dest_png):
    m = result["metrics"]
    layers = sorted({int(k.split(",L")[1].rstrip("]")) for k in m if k.startswith("auroc_prompt[in_")})
    lines = [(s, where) for s in ("in_distribution", "out_of_distribution") for where in ("prompt", "continuation")]
    ys = [[m[f"auroc_{w}[{s},L{l}]"]["value"] for l in layers] for s, w in lines]
    cis = [[m[f"auroc_{w}[{s},L{l}]"]["ci"] or [np.nan, np.nan] for l in layers] for s, w in lines]
    ys = [[np.nan if v is None else v for v in y] for y in ys]
    return report.plot_curve(layers, ys, cis, [f"{s.replace('_', ' ')}, {w}" for s, w in lines], dest_png, "layer",
                             "AUROC of cos(activation, vector)", "does the vector predict the model's own answer?")


# ------------------------------------------------------------------------------------------------- consistency

def pair_acts(cfg, s: Session, path, layers, select=None):
    """(pos, neg, matching letters, files, skipped lines) at the letter token for the pairs of one dataset."""
    items, files = ab_items(path, cfg.n, 0, cfg.seed, cfg.skip_bad, (cfg.n or 200, 100))
    pairs = ab_pairs(s.tok, s.fmt, [it for it in items if select is None or select(it)])
    pos, neg = record_pairs(s.model, pairs, layers)
    return pos, neg, np.array([p["letters"][0] for p in pairs]), files, data.skipped_of(items)


def vector_of(pos, neg, letters, idx, flip=None) -> torch.Tensor:
    """(L, D) letter-balanced mean-difference vector of the pairs idx; flip (N,) bool swaps those pairs' answers
    (the shuffled-label control: each pair still has one of each, but which one "matches" is a coin flip)."""
    p, n, g = pos[idx], neg[idx], letters[idx]
    if flip is not None:
        f = torch.from_numpy(flip[idx])[:, None, None]
        p, n = torch.where(f, n, p), torch.where(f, p, n)
        g = np.where(flip[idx], "~" + g, g)    # the swapped pair's "matching" letter is the other one
    return make_vectors(p, n, groups=g)


def consistency_run(cfg, s: Session):
    """Cosines between vectors built from disjoint halves, from growing numbers of pairs, from different
    datasets (or prompt types), and from shuffled labels (the control: what "no shared direction" looks like)."""
    layers = parse_layers(cfg.layers, len(s.model.layers))
    pos, neg, letters, files, skipped = pair_acts(cfg, s, cfg.data, layers)
    rng = np.random.default_rng(cfg.seed)
    N = len(pos)
    cos = lambda a, b: torch.cosine_similarity(a.double(), b.double(), dim=-1).numpy()     # (L,)
    sizes = [k for k in (4, 8, 16, 32, 64, 128, 256, 512) if 2 * k <= N] or [N // 2]
    metrics, rows = {}, []
    for k in tqdm(sizes, desc="split-half"):
        real, ctl = [], []
        for _ in range(cfg.n_splits):
            perm, flip = rng.permutation(N), rng.random(N) < 0.5
            real.append(cos(vector_of(pos, neg, letters, perm[:k]), vector_of(pos, neg, letters, perm[k: 2 * k])))
            ctl.append(cos(vector_of(pos, neg, letters, perm[:k], flip),
                           vector_of(pos, neg, letters, perm[k: 2 * k], flip)))
        real, ctl = np.stack(real), np.stack(ctl)                                        # (splits, L)
        for j, layer in enumerate(layers):
            metrics[f"split_half[n{k},L{layer}]"] = stats.mean_metric(real[:, j].tolist(), cfg.seed, cfg.n_boot)
            metrics[f"split_half_shuffled[n{k},L{layer}]"] = stats.mean_metric(ctl[:, j].tolist(), cfg.seed,
                                                                                cfg.n_boot)
        rows += [{"pairs": k, "layer": layer, "cos": real[:, j].tolist(), "cos_shuffled": ctl[:, j].tolist()}
                 for j, layer in enumerate(layers)]
    every = np.arange(N)
    full = vector_of(pos, neg, letters, every)
    cross = {"real_vs_shuffled_labels": (full, vector_of(pos, neg, letters, every, rng.random(N) < 0.5))}
    # Across datasets: a second file if given, else the built-in probes' two prompt types against each other.
    if cfg.data2:
        p2, n2, l2, f2, skip2 = pair_acts(cfg, s, cfg.data2, layers)
        files, skipped = files + f2, skipped + skip2
        cross["data_vs_data2"] = (full, vector_of(p2, n2, l2, np.arange(len(p2))))
    elif not cfg.data:
        kinds = {k: pair_acts(cfg, s, "", layers, lambda it, k=k: it["kind"] == k)
                 for k in ("arithmetic", "facts")}
        a, f = (vector_of(p, n, l, np.arange(len(p))) for p, n, l, _, _ in kinds.values())
        cross["arithmetic_vs_facts"] = (a, f)
    for name, (a, b) in cross.items():
        c = cos(a, b)
        for j, layer in enumerate(layers):
            metrics[f"cos[{name},L{layer}]"] = {"value": float(c[j]), "ci": None, "n": N, "kind": "cosine"}
    result = {"config": asdict(cfg), "provenance": results.provenance(cfg, s.model_dir, s.fmt_name, files),
              "conventions": {"vectors": "letter-balanced mean differences at the answer letter"},
              "metrics": metrics, "skipped": skipped, "items": rows}
    path = results.write_result(cfg.out, cfg.run or "consistency", result)
    show = sorted({layers[round(k * (len(layers) - 1) / 3)] for k in range(4)})
    ys = [[metrics[f"split_half[n{k},L{l}]"]["value"] for k in sizes] for l in show]
    cis = [[metrics[f"split_half[n{k},L{l}]"]["ci"] for k in sizes] for l in show]
    ys.append([metrics[f"split_half_shuffled[n{k},L{show[-1]}]"]["value"] for k in sizes])
    cis.append([metrics[f"split_half_shuffled[n{k},L{show[-1]}]"]["ci"] for k in sizes])
    report.plot_curve(sizes, ys, cis, [f"layer {l}" for l in show] + [f"layer {show[-1]}, shuffled labels"],
                      path.with_suffix(".png"), "pairs per half", "cosine between halves' vectors",
                      "split-half reliability of the steering vector")
    return result, path


# ---------------------------------------------------------------------------------------------------- geometry

def probe_accuracy(X: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int, shuffle: bool = False):
    """Held-out accuracy of a standardized logistic probe: 5 folds split by pair (both answers of a pair on one
    side), predictions pooled over folds -> (correct flags). shuffle: labels permuted (by pair) before training,
    the control that shows what the probe finds in noise."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    rng = np.random.default_rng(seed)
    y_fit = y.copy()
    if shuffle:   # flip whole pairs at random: each pair keeps one 1 and one 0, the link to the answer is gone
        flip = rng.random(groups.max() + 1) < 0.5
        y_fit = np.where(flip[groups], 1 - y, y)
    correct = np.zeros(len(y), bool)
    for train, test in GroupKFold(n_splits=5).split(X, y, groups):
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000, random_state=seed))
        clf.fit(X[train], y_fit[train])
        correct[test] = clf.predict(X[test]) == y_fit[test]
    return correct


def projections(X: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """2-D PCA and seeded t-SNE of (N, D) points."""
    from sklearn.manifold import TSNE
    Xc = X - X.mean(0)
    pca = Xc @ np.linalg.svd(Xc, full_matrices=False)[2][:2].T
    tsne = TSNE(2, perplexity=min(30, (len(X) - 1) / 3), init="pca", random_state=seed).fit_transform(X)
    return pca, tsne


def geometry_run(cfg, s: Session):
    items, ameta = [], {}
    if cfg.acts:
        pos, neg, pairs, layers, ameta = load_activations(cfg.acts, s.model, cfg.cross_model)
        files = [Path(cfg.acts)]
        keep = parse_layers(cfg.layers, len(s.model.layers), default=layers)
        if missing := [l for l in keep if l not in layers]:
            raise ValueError(f"{cfg.acts} has no activations at layers {missing}; it holds layers {layers}")
        pos, neg = pos[:, [layers.index(l) for l in keep]], neg[:, [layers.index(l) for l in keep]]
        layers = keep
    else:
        layers = parse_layers(cfg.layers, len(s.model.layers))
        items, files = ab_items(cfg.data, cfg.n, 0, cfg.seed, cfg.skip_bad, (cfg.n or 200, 100))
        pairs = ab_pairs(s.tok, s.fmt, items)
        pos, neg = record_pairs(s.model, pairs, layers)
    # Equal numbers of pairs per matching letter: otherwise "is this the letter A" alone predicts the label.
    letters = np.array([p["letters"][0] for p in pairs])
    rng = np.random.default_rng(cfg.seed)
    m = min(int((letters == x).sum()) for x in np.unique(letters))
    keep = np.sort(np.concatenate([rng.choice(np.flatnonzero(letters == x), m, replace=False)
                                   for x in np.unique(letters)]))
    pos, neg, ids = pos[keep], neg[keep], [pairs[i]["id"] for i in keep]
    N = len(pos)
    y = np.r_[np.ones(N, int), np.zeros(N, int)]                # 1 = the answer that matches the user's view
    groups = np.r_[np.arange(N), np.arange(N)]
    metrics, rows, proj = {}, [], {}
    for j, layer in enumerate(tqdm(layers, desc="probe per layer")):
        X = torch.cat([pos[:, j], neg[:, j]]).double().numpy()
        acc = probe_accuracy(X, y, groups, cfg.seed)
        ctl = probe_accuracy(X, y, groups, cfg.seed, shuffle=True)
        metrics[f"probe_accuracy[L{layer}]"] = stats.proportion_metric(acc.tolist())
        metrics[f"probe_accuracy_shuffled[L{layer}]"] = stats.proportion_metric(ctl.tolist())
        rows.append({"layer": layer, "correct": acc.astype(int).tolist(), "correct_shuffled": ctl.astype(int).tolist()})
    show = sorted({layers[round(k * (len(layers) - 1) / 5)] for k in range(6)})
    for layer in show:
        X = torch.cat([pos[:, layers.index(layer)], neg[:, layers.index(layer)]]).double().numpy()
        pca, tsne = projections(X, cfg.seed)
        proj[str(layer)] = {"pca": pca.round(4).tolist(), "tsne": tsne.round(4).tolist()}
    result = {"config": asdict(cfg), "provenance": results.provenance(cfg, s.model_dir, s.fmt_name, files),
              "conventions": {"label": "1 = the answer letter that matches the user's view", "ids": ids,
                              "probe": "standardized logistic regression, C=0.1, 5 folds grouped by pair",
                              "balance": f"{m} pairs per matching letter (of {len(letters)})",
                              **({"activations": cfg.acts, "model_check": ameta["model_check"]} if cfg.acts else {})},
              "metrics": metrics, "skipped": data.skipped_of(items), "items": rows, "projections": proj}
    path = results.write_result(cfg.out, cfg.run or "geometry", result)
    plot_geometry(result, path.with_suffix(".png"))
    return result, path


def plot_geometry(result, dest_png):
    """Top: held-out probe accuracy per layer against the shuffled-label control. Below: PCA and t-SNE panels."""
    from matplotlib.figure import Figure
    m, proj = result["metrics"], result["projections"]
    layers = [r["layer"] for r in result["items"]]
    fig = Figure(figsize=(3 * len(proj), 9.5), layout="constrained")
    grid = fig.add_gridspec(3, len(proj))
    ax = fig.add_subplot(grid[0, :])
    for key, label in (("probe_accuracy", "held-out probe"), ("probe_accuracy_shuffled", "shuffled labels")):
        v = [m[f"{key}[L{l}]"] for l in layers]
        line, = ax.plot(layers, [x["value"] for x in v], marker="o", label=label)
        ax.fill_between(layers, [x["ci"][0] for x in v], [x["ci"][1] for x in v], alpha=0.2, color=line.get_color())
    ax.set(xlabel="layer", ylabel="accuracy (95% interval)", title="is sycophancy linearly readable at the letter?")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    for k, (layer, pts) in enumerate(proj.items()):
        for row, kind in ((1, "pca"), (2, "tsne")):
            a = fig.add_subplot(grid[row, k])
            xy = np.asarray(pts[kind])
            n = len(xy) // 2
            a.scatter(*xy[:n].T, s=6, label="matches the user")
            a.scatter(*xy[n:].T, s=6, label="does not")
            a.set_title(f"layer {layer} {kind.upper()}", fontsize=9)
            a.set_xticks([]), a.set_yticks([])
    fig.axes[1].legend(fontsize=7)
    fig.savefig(dest_png, dpi=110)
    return Path(dest_png)


RUNS = {"predict": predict_run, "consistency": consistency_run, "geometry": geometry_run}


@user_errors()
def main(argv):
    cfg = parse_command(GeometryConfig, argv, tuple(RUNS))
    torch.manual_seed(cfg.seed)
    result, path = RUNS[cfg.action](cfg, open_session(cfg))
    for name, v in result["metrics"].items():
        if v["value"] is not None and ("[n" not in name or name.startswith("split_half[n16")):
            ci = f"  [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}]" if v.get("ci") else ""
            print(f"  {name:44s} {v['value']:.4f}{ci}  n={v['n']}")
    print(f"wrote {path} (+ .png)")


if __name__ == "__main__":
    main(sys.argv[1:])
