"""report.py: intervals, the results files, resumable progress, comparisons, tables and plots.

    python report.py compare A.json B.json [C.json ...] [--out=out/compare.md] [--correlate=m1:m2,...]
    python report.py report out/*.json [--out=out/report.md]

A results file is OUT/<run>-<time>.json = {"config", "provenance", "metrics", "items"[, "timing"]}, where
    metrics = {name: {"value": float, "ci": [lo, hi] | None, "n": int, "kind": "proportion" | "mean", "n_missing"}}
and items holds one row per example (parse failures included), with an "id" and one key per metric holding
that item's score, so runs can be compared item by item. Tables and plots are drawn from these files only.
numpy is the one import at load time; scipy (p-values) and matplotlib are imported where they are used.
"""
import hashlib
import itertools
import json
import math
import os
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prepare import parse_args

# ------------------------------------------------------------------------------------------------- intervals


def wilson(k, n, z=1.96):
    """Wilson score interval for k successes in n trials (z = 1.96: 95%).

        center = (k + z²/2) / (n + z²)
        half   = z / (n + z²) * sqrt(k (n - k) / n + z²/4)
        (lo, hi) = (center - half, center + half)

    Unlike p ± z sqrt(p (1 - p) / n) it stays inside [0, 1] and is not zero-width at k = 0 or k = n.
    n = 0 gives (nan, nan): no data, no interval (the metric builders then write "ci": None).
    """
    if n == 0:
        return (math.nan, math.nan)
    if not 0 <= k <= n:
        raise ValueError(f"wilson needs 0 <= k <= n, got k={k}, n={n}")
    z2 = z * z
    center = (k + z2 / 2) / (n + z2)
    half = z / (n + z2) * math.sqrt(k * (n - k) / n + z2 / 4)
    return (max(0.0, center - half), min(1.0, center + half))  # clip float round-off at k = 0 or n


def bootstrap_mean(x, seed=0, n_boot=10000, level=0.95):
    """Percentile bootstrap interval of the mean: draw n of the n values with replacement, n_boot times, and
    take the (1 - level)/2 and (1 + level)/2 quantiles of those n_boot means. The same seed gives the same
    interval. n = 0 gives (nan, nan); n = 1 gives (x, x), so always read n beside the interval."""
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    chunk = max(1, (1 << 22) // x.size)  # <= 4M resampled indices (32 MB) at a time, whatever n is
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        means[start:stop] = x[rng.integers(0, x.size, (stop - start, x.size))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return (float(lo), float(hi))


def _metric(value, ci, n, kind, n_missing):
    return {"value": None if n == 0 else float(value), "ci": None if n == 0 else [float(ci[0]), float(ci[1])],
            "n": n, "kind": kind, "n_missing": n_missing}


def proportion_metric(flags):
    """{"value": k/n, "ci": Wilson 95%, "n", "kind": "proportion", "n_missing"} from 0/1/bool flags.
    None entries (parse failures) are left out of n and counted in n_missing: never scored as wrong."""
    kept = [f for f in flags if f is not None]
    bad = [f for f in kept if f not in (0, 1)]  # True == 1 and False == 0, numpy bools too
    if bad:
        raise ValueError(f"proportion_metric takes 0/1/bool flags (None = missing), got e.g. {bad[:3]}")
    n, k = len(kept), int(sum(kept))
    return _metric(k / max(n, 1), wilson(k, n), n, "proportion", len(flags) - n)


def mean_metric(values, seed=0, n_boot=10000):
    """{"value": mean, "ci": percentile bootstrap 95%, "n", "kind": "mean", "n_missing"}; None = missing.
    NaN is refused rather than skipped: a missing score must be an explicit None, not an accident."""
    kept = np.array([float(v) for v in values if v is not None])
    if not np.isfinite(kept).all():
        raise ValueError("mean_metric got a NaN/inf value: mark missing scores with None")
    return _metric(kept.mean() if kept.size else 0.0, bootstrap_mean(kept, seed, n_boot), kept.size, "mean",
                   len(values) - kept.size)


def paired_difference(a, b, seed=0, n_boot=10000):
    """Mean change b - a over the ids scored (not None) in both {id: value} dicts, with a paired bootstrap:

        d_i = b[i] - a[i];   value = mean_i d_i;   ci = bootstrap_mean(d)

    Resampling items (not the two runs separately) cancels the between-item variance both runs share, so when
    runs agree item by item (before/after runs do) the interval is narrower than two independent ones. n_unpaired counts ids in either dict left out; n_up /
    n_down count items that went up / down (a small mean shift can hide many items moving the wrong way)."""
    ids = [i for i in a if i in b and a[i] is not None and b[i] is not None]
    d = np.array([float(b[i]) - float(a[i]) for i in ids])
    lo, hi = bootstrap_mean(d, seed, n_boot)
    return {"value": float(d.mean()) if ids else None, "ci": [lo, hi] if ids else None, "n": len(ids),
            "n_unpaired": len(set(a) | set(b)) - len(ids), "n_up": int((d > 0).sum()), "n_down": int((d < 0).sum())}


def correlation(x, y, method="pearson"):
    """{"r", "p", "n", "method"}: correlation of paired points with a two-sided p-value (scipy.stats).

    pearson:  r = Σ (x - x̄)(y - ȳ) / sqrt(Σ (x - x̄)² Σ (y - ȳ)²);  under "no correlation"
              t = r sqrt((n - 2) / (1 - r²)) follows Student's t with n - 2 degrees of freedom;  p = 2 P(T > |t|).
    spearman: the same on ranks (ties share their mean rank); p from the same t approximation.
    n < 3 is refused (two points always give r = ±1 and leave no degree of freedom), and so is a constant input
    (r undefined). With a handful of runs (study 2 had 6 points) p and n matter more than r.
    """
    from scipy import stats
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape or len(x) < 3:
        raise ValueError(f"correlation needs two equal-length sequences of n >= 3 points (two points always give "
                         f"r = ±1), got shapes {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()) or np.ptp(x) == 0 or np.ptp(y) == 0:
        raise ValueError("correlation needs finite values and is undefined when one variable is constant")
    if method not in ("pearson", "spearman"):
        raise ValueError(f"unknown correlation method {method!r}: pearson or spearman")
    r, p = (stats.pearsonr if method == "pearson" else stats.spearmanr)(x, y)
    return {"r": float(r), "p": float(p), "n": len(x), "method": method}


# -------------------------------------------------------------------------------------------- results files


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def provenance(cfg, model_dir: Path, chat_format: str, data_files=()) -> dict:
    """Everything needed to reproduce a number: code commit, weights and data hashes, formats, versions."""
    import torch  # here, not at the top: reading and plotting results needs no torch

    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
    return dict(git_commit=git("rev-parse", "HEAD"),
                git_dirty=git("status", "--porcelain", "--untracked-files=no") != "", model_dir=str(model_dir),
                weights_sha256={p.name: sha256(p) for p in sorted(Path(model_dir).glob("*.safetensors"))},
                data_sha256={str(p): sha256(p) for p in data_files}, chat_format=chat_format,
                seed=cfg.seed, dtype=cfg.dtype, device=cfg.device, python=sys.version.split()[0],
                torch=torch.__version__, numpy=np.__version__)


def _temp_copy(folder: Path, name: str, payload: bytes) -> Path:
    """payload in a fresh temp file in `folder` (so the rename that follows stays on one filesystem), fsynced,
    with the permissions of any file the user makes (open() applies the umask; mkstemp would give 0600)."""
    for k in itertools.count():
        tmp = folder / f".{name}.{os.getpid()}.{k}.tmp"
        try:
            with open(tmp, "xb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            return tmp
        except FileExistsError:
            continue
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def write_atomic(path, payload: bytes) -> Path:
    """Replace `path` with payload atomically: a kill or a full disk leaves the old file or the new one, never half
    of one (checkpoints, adapters)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = _temp_copy(path.parent, path.name, payload)
    except OSError as e:
        raise OSError(e.errno, f"could not write {path} ({e}); the previous file is untouched") from e
    try:
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def publish(out_dir, name: str, suffix: str, payload: bytes, stamp: bool = True) -> Path:
    """Write OUT/<name>-<YYYYmmdd-HHMMSS>[-k]<suffix> (or OUT/<name><suffix> with stamp=False): never overwriting,
    never leaving a partial file.

    The bytes go to a temp file in the same folder, then os.link gives them their final name: link fails if the
    name exists, so two writers finishing in the same second get -2, -3, ... instead of replacing each other
    (exists() then os.replace has that race); an unstamped name that exists is an error. An OSError on the way
    (a full disk) removes the temp file and is raised again naming the destination."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}" if stamp else name
    dest = out_dir / f"{base}{suffix}"
    tmp = None
    try:
        tmp = _temp_copy(out_dir, base + suffix, payload)
        for k in itertools.count(2):
            try:
                os.link(tmp, dest)
                break
            except FileExistsError:
                if not stamp:
                    raise FileExistsError(f"{dest} exists; refusing to overwrite it") from None
                dest = out_dir / f"{base}-{k}{suffix}"
    except OSError as e:
        if isinstance(e, FileExistsError):
            raise
        msg = f"could not write {dest} ({e}); no partial file was left"
        raise (OSError(e.errno, msg) if e.errno else OSError(msg)) from e
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    return dest


def write_result(out_dir, name: str, result: dict) -> Path:
    """Write OUT/<name>-<time>.json with publish (never overwriting, never partial); then delete
    OUT/<name>.partial.jsonl (see Checkpoint): its rows now live in the result."""
    text = json.dumps(result, indent=1, ensure_ascii=False)  # first: an unserializable value touches no file
    dest = publish(out_dir, name, ".json", text.encode("utf-8"))
    (Path(out_dir) / f"{name}.partial.jsonl").unlink(missing_ok=True)
    return dest


def load_result(path) -> dict:
    result = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(result, dict) or not isinstance(result.get("metrics"), dict):
        raise ValueError(f"{path} is not a results file (no 'metrics'; see DESIGN.md, Results format)")
    return result


def read_partial(path):
    """(config, rows, n_bad) of a .partial.jsonl: line 1 is {"config": ...}, then one item row per line.
    Unreadable lines (the last one torn by a kill mid-write) are skipped with a warning, not a crash."""
    config, rows, n_bad = None, [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f):
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict) or not ("id" in obj or (i == 0 and "config" in obj)):
                    raise ValueError("neither an item row with an 'id' nor the config header")
            except ValueError as e:
                n_bad += 1
                warnings.warn(f"{path}:{i + 1}: unreadable line ignored (torn by a kill mid-write?): {e}")
                continue
            if "id" in obj:
                rows.append(obj)
            else:
                config = obj["config"]
    return config, rows, n_bad


def done_ids(path) -> set:
    """Ids of the rows already in a .partial.jsonl (empty if there is none)."""
    return {r["id"] for r in read_partial(path)[1]} if Path(path).exists() else set()


class Checkpoint:
    """Resumable progress: every finished item row is appended to OUT/<run>.partial.jsonl as one JSON line,
    flushed and fsynced, so a kill loses at most the row being written. Rerunning skips ids already done, and
    write_result(OUT, run, ...) deletes the file once the full result is on disk.

        ckpt = Checkpoint(cfg.out, "mmlu", config=asdict(cfg))
        for item in items:
            if item["id"] not in ckpt.done:
                ckpt.add(score(item))                  # a dict with an "id"
        write_result(cfg.out, "mmlu", dict(..., items=ckpt.rows))

    Resuming under another config is refused: it would silently mix two runs' items into one result."""

    def __init__(self, out_dir, run: str, config=None):
        self.path = Path(out_dir) / f"{run}.partial.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        config = json.loads(json.dumps(config))  # compare as it reads back from disk (tuples become lists)
        if self.path.exists():
            old, self.rows, n_bad = read_partial(self.path)
            if old is not None and old != config:
                raise ValueError(f"{self.path} was written under another config; delete it to start afresh, or "
                                 f"use another run name.\n  on disk: {old}\n  now:     {config}")
            if n_bad or old is None:  # rewrite without the torn line: else the next row would be glued onto it
                tmp = self.path.with_suffix(".tmp")
                lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in [{"config": config}, *self.rows]]
                tmp.write_text("".join(lines), encoding="utf-8")
                os.replace(tmp, self.path)
            print(f"resuming {self.path}: {len(self.rows)} items already done")
        else:
            self.rows = []
            self._append({"config": config})
        self.done = {r["id"] for r in self.rows}

    def _append(self, obj):
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def add(self, row: dict):
        if "id" not in row or row["id"] in self.done:
            raise ValueError(f"a checkpoint row needs a new, unique 'id', got {row.get('id', '(none)')!r}")
        self._append(row)
        self.rows.append(row)
        self.done.add(row["id"])


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


def _num(v, sign=""):
    return f"{v:{sign}.3f}" if v == 0 or 1e-3 <= abs(v) < 1e4 else f"{v:{sign}.3g}"


def _cell(m, sign=""):
    """'0.712 [0.490, 0.943] n=10' (+ missing / moved counts); files without ci or n_missing are fine too."""
    if m is None:
        return "–"
    if m.get("value") is None:
        return f"n/a n={m.get('n', 0)}"
    s = _num(m["value"], sign) + (" [{}, {}]".format(*(_num(c, sign) for c in m["ci"])) if m.get("ci") else "")
    s += f" n={m['n']}" if "n" in m else ""
    s += f" ({m['n_missing']} missing)" if m.get("n_missing") else ""
    return s + (f" ({m['n_up']}↑ {m['n_down']}↓)" if "n_up" in m else "")


def _table(header, rows):
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
    runs = _table(["run", "model", "commit", "seed", "items", "seconds"], map(run_row, names, results))
    return runs + "\n" + _table(["metric: value [95% CI] n", *names],
                                [[m, *(_cell(r["metrics"].get(m)) for r in results)] for m in metrics])


def render_comparison(cmp) -> str:
    """Markdown of compare(): paired differences vs the first run, then the correlations of per-run changes."""
    names = cmp["names"]
    md = f"\nPaired differences vs `{names[0]}` (paired bootstrap over the item ids both runs scored):\n\n"
    rows = []
    for m, c in cmp["metrics"].items():
        v0, cells = c["runs"][0]["value"], []
        for d, r in zip(c["diffs"][1:], c["runs"][1:]):
            if d:
                cells.append(_cell(d, "+"))
            else:  # the items cannot be paired: only the difference of the two values, without an interval
                cells.append("unpaired " + ("n/a" if None in (v0, r["value"]) else _num(r["value"] - v0, "+")))
        rows.append([m, c["item_key"], *cells])
    md += _table(["metric", "item key", *(f"{n} − {names[0]}" for n in names[1:])], rows)
    if cmp["not_in_all"]:
        md += f"\nNot in every run (not compared): {', '.join(cmp['not_in_all'])}\n"
    if cmp["correlations"]:
        k = len(cmp["correlations"])
        md += (f"\nCorrelations of per-run changes vs `{names[0]}` ({k} tests, uncorrected; Bonferroni p < "
               f"{0.05 / k:.3g}):\n\n")
        md += _table(["change in", "vs change in", "r", "p", "n", "method"],
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


# ---------------------------------------------------------------------------------------------------------- CLI


@dataclass
class ReportConfig:
    out: str = ""            # markdown destination; "" = out/<command>.md; the PNG is written next to it
    seed: int = 0            # bootstrap seed
    n_boot: int = 10000      # bootstrap resamples
    correlate: str = ""      # compare: "x_metric:y_metric,..." per-run changes to correlate; "" = all pairs (4+ runs)
    method: str = "pearson"  # correlation: pearson or spearman
    item_keys: str = ""      # compare: "metric=item_key,..." where the items' score key is not the metric name


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("compare", "report"):
        sys.exit(__doc__.split("\n\n")[1])
    cmd, rest = argv[0], argv[1:]
    paths = [a for a in rest if not a.startswith("-")]  # positional files; the --key=value rest is the config
    cfg = parse_args(ReportConfig, [a for a in rest if a.startswith("-")])
    out = Path(cfg.out or f"out/{cmd}.md")
    png = out.with_suffix(".png")
    try:
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
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(md)
    print(f"wrote {out} and {png}")


if __name__ == "__main__":
    main()
