"""Reports drawn from results files only: comparisons of runs, markdown tables and plots.

    python -m lab.report compare A.json B.json [C.json ...] [--out=out/compare.md] [--correlate=m1:m2,...]
    python -m lab.report report out/*.json [--out=out/report.md]

The files' schema is lab/results.py's. matplotlib is imported where it is used.
"""
import itertools
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lab.args import parse_args, user_errors
from lab.results import load_result
from lab.stats import correlation, paired_difference

# ----------------------------------------------------------------------------------------------- comparison


def run_names(paths) -> list[str]:
    names = [Path(p).stem for p in paths]  # the folder too where two files share a name
    return [f"{Path(p).parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(paths, names)]


def item_values(result, key):
    """{id: float | None} of one per-item score, or None where the items cannot be paired on it (no "id", no
    such key, duplicate ids, non-numbers). Rows without the key (e.g. a sanity-check row) are not items of it."""
    values = {}
    for it in result.get("items") or []:
        if "id" in it and key in it:
            v = it[key]
            if it["id"] in values or not (v is None or isinstance(v, (bool, int, float))):
                return None
            values[it["id"]] = None if v is None else float(v)
    return values or None


def compare(paths, metric_item_keys=None, correlate=None, method="pearson", seed=0, n_boot=10000) -> dict:
    """Compare 2+ result files on every metric they all have.

    For each metric: each run's value / ci / n, and each run's paired difference vs the first run computed from
    the item rows (item key = metric_item_keys.get(metric, metric); the item score must be what the metric
    averages); None where the items cannot be paired. Correlations: for each (x, y) metric pair in `correlate`
    (default: every pair, once there are 4+ runs, i.e. 3+ changes), Pearson/Spearman of the per-run changes
    (value - first run's value) of x against those of y, e.g. capability gain vs sycophancy change."""
    if len(paths) < 2:
        raise ValueError("compare needs at least 2 result files")
    results, names, keys = [load_result(p) for p in paths], run_names(paths), metric_item_keys or {}
    common = [m for m in results[0]["metrics"] if all(m in r["metrics"] for r in results[1:])]
    out = {"names": names, "paths": [str(p) for p in paths], "metrics": {}, "correlations": [],
           "not_in_all": sorted(set().union(*(r["metrics"] for r in results)) - set(common))}
    for m in common:
        key = keys.get(m, m)
        base = item_values(results[0], key)
        diffs = [None]
        for r in results[1:]:
            other = item_values(r, key)
            diffs.append(paired_difference(base, other, seed, n_boot) if base and other else None)
        out["metrics"][m] = {"item_key": key, "diffs": diffs,
                             "runs": [{k: r["metrics"][m].get(k) for k in ("value", "ci", "n")} for r in results]}
    if correlate is None:
        correlate = list(itertools.combinations(common, 2)) if len(results) >= 4 else []
    for mx, my in correlate:
        if mx not in common or my not in common:
            raise ValueError(f"cannot correlate {mx!r} with {my!r}: both must be metrics of every run")
        vx, vy = ([r["metrics"][m]["value"] for r in results] for m in (mx, my))
        points = [(x - vx[0], y - vy[0]) for x, y in zip(vx[1:], vy[1:]) if None not in (x, y, vx[0], vy[0])]
        try:
            c = correlation([p[0] for p in points], [p[1] for p in points], method)
        except ValueError as e:  # too few runs or a constant change: say so in the report, keep the rest
            c = {"r": None, "p": None, "n": len(points), "method": method, "error": str(e)}
        out["correlations"].append({"x": mx, "y": my, **c})
    return out


# ------------------------------------------------------------------------------------------ tables and plots


def number(v, sign=""):
    return f"{v:{sign}.3f}" if v == 0 or 1e-3 <= abs(v) < 1e4 else f"{v:{sign}.3g}"


def cell(m, sign=""):
    """'0.712 [0.490, 0.943] n=10' (+ missing / moved counts); files without ci or n_missing are fine too."""
    if m is None:
        return "–"
    if m.get("value") is None:
        return f"n/a n={m.get('n', 0)}"
    s = number(m["value"], sign) + (" [{}, {}]".format(*(number(c, sign) for c in m["ci"])) if m.get("ci") else "")
    s += f" n={m['n']}" if "n" in m else ""
    s += f" ({m['n_missing']} missing)" if m.get("n_missing") else ""
    return s + (f" ({m['n_up']}↑ {m['n_down']}↓)" if "n_up" in m else "")


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows]) + "\n"


def render_markdown(results, names) -> str:
    """Markdown: one row per run (model, commit, seed, items, seconds), then one row per metric with each run's
    value [lo, hi] n. Metrics missing from a run show '–'."""
    def run_row(name, r):
        pv, t = r.get("provenance", {}), r.get("timing", {})
        commit = (pv.get("git_commit") or "?")[:8] + ("+dirty" if pv.get("git_dirty") else "")
        return [name, Path(pv.get("model_dir", "?")).name, commit, pv.get("seed", "?"), len(r.get("items", [])),
                f"{t['seconds']:.0f}" if "seconds" in t else "?"]
    metrics = list(dict.fromkeys(m for r in results for m in r["metrics"]))
    runs = table(["run", "model", "commit", "seed", "items", "seconds"], map(run_row, names, results))
    return runs + "\n" + table(["metric: value [95% CI] n", *names],
                                [[m, *(cell(r["metrics"].get(m)) for r in results)] for m in metrics])


def render_comparison(cmp) -> str:
    """Markdown of compare(): paired differences vs the first run, then the correlations of per-run changes."""
    names = cmp["names"]
    md = f"\nPaired differences vs `{names[0]}` (paired bootstrap over the item ids both runs scored):\n\n"
    rows = []
    for m, c in cmp["metrics"].items():
        v0, cells = c["runs"][0]["value"], []
        for d, r in zip(c["diffs"][1:], c["runs"][1:]):
            if d:
                cells.append(cell(d, "+"))
            else:  # the items cannot be paired: only the difference of the two values, without an interval
                cells.append("unpaired " + ("n/a" if None in (v0, r["value"]) else number(r["value"] - v0, "+")))
        rows.append([m, c["item_key"], *cells])
    md += table(["metric", "item key", *(f"{n} − {names[0]}" for n in names[1:])], rows)
    if cmp["not_in_all"]:
        md += f"\nNot in every run (not compared): {', '.join(cmp['not_in_all'])}\n"
    if cmp["correlations"]:
        k = len(cmp["correlations"])
        md += (f"\nCorrelations of per-run changes vs `{names[0]}` ({k} tests, uncorrected; Bonferroni p < "
               f"{0.05 / k:.3g}):\n\n")
        md += table(["change in", "vs change in", "r", "p", "n", "method"],
                     [[c["x"], c["y"], "n/a" if c["r"] is None else f"{c['r']:+.3f}",
                       c.get("error") or f"{c['p']:.3g}", c["n"], c["method"]] for c in cmp["correlations"]])
    return md


def plot_metrics(results, names, dest_png):
    """Bar chart, one subplot per metric (their scales differ), one bar per run with its 95% interval."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no backend switching
    metrics = list(dict.fromkeys(m for r in results for m in r["metrics"]))
    cols = min(3, max(1, len(metrics)))
    rows = math.ceil(len(metrics) / cols) or 1
    fig = Figure(figsize=(4.5 * cols, 3.6 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    colors = [f"C{i % 10}" for i in range(len(results))]  # one colour per run, the same in every subplot
    for ax, m in zip(axes, metrics):
        for i, r in enumerate(results):  # a run keeps its slot and colour in every subplot, empty where it lacks m
            v = r["metrics"].get(m) or {}
            if v.get("value") is not None:
                err = [[v["value"] - v["ci"][0]], [v["ci"][1] - v["value"]]] if v.get("ci") else None
                ax.bar(i, v["value"], width=0.6, yerr=err, capsize=4, color=colors[i])
        ax.set_xticks(range(len(results)), names, rotation=30, ha="right", fontsize=8)
        ax.set_xlim(-0.6, max(len(results), 2) - 0.4)
        ax.set_title(m, fontsize=10)
        ax.axhline(0, color="black", linewidth=0.6)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    fig.savefig(dest_png, dpi=120)
    return Path(dest_png)


def plot_study(results, names, dest_png):
    """One panel for a study whose runs measure different things (the baseline): a horizontal bar per metric,
    labelled "run: metric", with its 95% interval; changes (which can be negative) get a line at zero."""
    from matplotlib.figure import Figure
    bars = [(f"{name}: {m}", v) for r, name in zip(results, names) for m, v in r["metrics"].items()
            if v.get("value") is not None]
    fig = Figure(figsize=(8, 0.32 * len(bars) + 1.2), layout="constrained")
    ax = fig.subplots()
    for i, (label, v) in enumerate(bars[::-1]):
        err = [[v["value"] - v["ci"][0]], [v["ci"][1] - v["value"]]] if v.get("ci") else None
        ax.barh(i, v["value"], xerr=err, capsize=3, color=f"C{names.index(label.split(': ')[0]) % 10}")
    ax.set_yticks(range(len(bars)), [b[0] for b in bars[::-1]], fontsize=8)
    ax.axvline(0, color="black", linewidth=0.6)
    ax.set_xlabel("value (95% interval)")
    fig.savefig(dest_png, dpi=120)
    return Path(dest_png)


def plot_curve(xs, ys, cis, labels, dest_png, xlabel, ylabel, title=""):
    """Lines with a shaded interval band, e.g. behaviour vs steering multiplier, one line per layer.
    xs: one shared x sequence or one per line; ys: one sequence per line; cis: per line a sequence of (lo, hi),
    or None for no band."""
    from matplotlib.figure import Figure
    if np.ndim(xs[0]) == 0:
        xs = [xs] * len(ys)
    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.subplots()
    for x, y, ci, label in zip(xs, ys, cis or [None] * len(ys), labels):
        line, = ax.plot(x, y, marker="o", label=str(label))
        if ci is not None:
            lo, hi = np.asarray(ci, dtype=np.float64).T
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(dest_png, dpi=120)
    return Path(dest_png)


def plot_heatmaps(panels, dest_png, suptitle=""):
    """Heatmaps, three to a row (one to a row when labelled by more than 40 tokens), e.g. patching recovery per
    layer x head. panels: dicts {values: rows x cols (None = empty), title, xlabel, ylabel, xticks: labels or None
    (numbers), yticks likewise}; a diverging colour scale centred on 0, one per panel."""
    from matplotlib.figure import Figure
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.ticker import MaxNLocator
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    wide = max(len(p.get("xticks") or ()) for p in panels) > 40       # token labels: one panel a row, wide
    if wide:
        cols, rows = 1, len(panels)
    fig = Figure(figsize=(16 if wide else 5.2 * cols, (5.5 if wide else 4.4) * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax, p in zip(axes, panels):
        v = np.asarray([[np.nan if x is None else x for x in row] for row in p["values"]], dtype=np.float64)
        span = float(np.nanmax(np.abs(v))) if np.isfinite(v).any() else 1.0
        im = ax.imshow(v, aspect="auto", cmap="RdBu_r", interpolation="nearest", origin="lower",
                       norm=TwoSlopeNorm(0.0, -(span or 1.0), span or 1.0))
        ax.set(title=p.get("title", ""), xlabel=p.get("xlabel", ""), ylabel=p.get("ylabel", ""))
        for axis, labels in (("x", p.get("xticks")), ("y", p.get("yticks"))):
            getattr(ax, f"{axis}axis").set_major_locator(MaxNLocator(integer=True))    # layers and heads
            if labels is not None:
                getattr(ax, f"set_{axis}ticks")(range(len(labels)), labels, fontsize=6,
                                                **({"rotation": 90} if axis == "x" else {}))
        fig.colorbar(im, ax=ax, shrink=0.8)
    if suptitle:
        fig.suptitle(suptitle)
    fig.savefig(dest_png, dpi=120)
    return Path(dest_png)


# ---------------------------------------------------------------------------------------------------------- CLI


@dataclass
class ReportConfig:
    out: str = ""            # markdown destination; "" = out/<command>.md; the PNG is written next to it
    seed: int = 0            # bootstrap seed
    n_boot: int = 10000      # bootstrap resamples
    correlate: str = ""      # compare: "x_metric:y_metric,..." per-run changes to correlate; "" = all pairs (4+ runs)
    method: str = "pearson"  # correlation: pearson or spearman
    item_keys: str = ""      # compare: "metric=item_key,..." where the items' score key is not the metric name


@user_errors()
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("compare", "report"):
        sys.exit(__doc__.split("\n\n")[1])
    cmd, rest = argv[0], argv[1:]
    paths = [a for a in rest if not a.startswith("-")]  # positional files; the --key=value rest is the config
    cfg = parse_args(ReportConfig, [a for a in rest if a.startswith("-")])
    out = Path(cfg.out or f"out/{cmd}.md")
    png = out.with_suffix(".png")
    if cmd == "compare":
        if any(":" not in p for p in cfg.correlate.split(",") if p) or \
                any("=" not in kv for kv in cfg.item_keys.split(",") if kv):
            sys.exit("error: expected --correlate=x_metric:y_metric,... and --item_keys=metric=item_key,...")
        pairs = [tuple(p.split(":", 1)) for p in cfg.correlate.split(",") if p] or None
        keys = dict(kv.split("=", 1) for kv in cfg.item_keys.split(",") if kv)
        cmp = compare(paths, keys, pairs, cfg.method, cfg.seed, cfg.n_boot)
        results, names = [load_result(p) for p in paths], cmp["names"]
    else:  # any set of files, e.g. out/*.json: skip what is not a result (bench timings, ...)
        results, kept = [], []
        for p in paths:
            try:
                results.append(load_result(p))
                kept.append(p)
            except ValueError as e:
                print(f"skipping: {e}", file=sys.stderr)
        if not results:
            sys.exit("error: no results files given")
        names = run_names(kept)
    md = f"# {cmd}\n\n" + render_markdown(results, names)
    md += (render_comparison(cmp) if cmd == "compare" else "") + f"\n![metrics]({png.name})\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md, encoding="utf-8")
    plot_metrics(results, names, png)
    print(md)
    print(f"wrote {out} and {png}")


if __name__ == "__main__":
    main()
