"""Statistics for every metric: Wilson intervals for proportions, bootstrap intervals for means and paired
differences, correlations. A metric is {"value", "ci": [lo, hi] | None, "n", "kind", "n_missing"}.
numpy is the one import at load time; scipy (p-values) is imported where it is used.
"""
import math

import numpy as np

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


def ratio_of_means(num, den, seed=0, n_boot=10000, level=0.95):
    """{"value": mean(num) / mean(den), "ci": percentile bootstrap, "n", "kind": "ratio"} over paired items
    (num[i] and den[i] from the same item; the same items resampled for both): e.g. the fraction of a planted effect
    (den: organism - base per item) that an ablation takes away (num: organism - ablated). Resamples whose mean den
    is 0 are dropped from the interval; a zero mean den gives value None."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    if num.shape != den.shape:
        raise ValueError(f"ratio_of_means: {num.size} numerators for {den.size} denominators")
    n = num.size
    if n == 0 or den.mean() == 0:
        return {"value": None, "ci": None, "n": n, "kind": "ratio", "n_missing": 0}
    idx = np.random.default_rng(seed).integers(0, n, (n_boot, n))
    d = den[idx].mean(1)
    r = num[idx].mean(1)[d != 0] / d[d != 0]
    lo, hi = np.quantile(r, [(1 - level) / 2, (1 + level) / 2])
    return _metric(num.mean() / den.mean(), (lo, hi), n, "ratio", 0)


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
