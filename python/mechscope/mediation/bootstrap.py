"""Seeded, weighted, vectorised bootstrap over examples: percentile and BCa intervals.

A statistic here is a function of example weights: statistic(W) with W [k, n] returns
[k, ...], one value (or array) per row of weights. The plain estimate is
statistic(w[None]); a bootstrap replicate is statistic(w * counts) with multinomial
resampling counts, so all replicates are one call (matrix products, not a loop), and
the BCa acceleration uses the jackknife, statistic(w * (1 - I)).
"""
from statistics import NormalDist

import numpy as np

__all__ = ["check_weights", "bootstrap", "weighted_mean_ci"]

_NORMAL = NormalDist()
_JACKKNIFE_MAX = 4000  # above this many examples, BCa's jackknife uses groups


def check_weights(weights, n, argument="weights"):
    """None -> uniform; else finite, non-negative, [n], with a positive sum; float64."""
    if weights is None:
        return np.full(n, 1.0 / n)
    w = np.asarray(weights, np.float64)
    if w.shape != (n,):
        raise ValueError(f"{argument}: expected one weight per example ({n}), got shape {list(w.shape)}")
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"{argument}: weights must be finite and non-negative")
    total = w.sum()
    if not total > 0:
        raise ValueError(f"{argument}: weights must sum to a positive number (they sum to {total})")
    return w / total


def _counts(n, n_boot, seed):
    """[n_boot, n] multinomial resampling counts from a seeded generator."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)


def _jackknife_weights(w):
    """Leave-one-out (or, for many examples, leave-one-group-out) weights [g, n]."""
    n = w.size
    if n <= _JACKKNIFE_MAX:
        W = np.repeat(w[None], n, axis=0)
        W[np.arange(n), np.arange(n)] = 0.0
        return W
    groups = np.array_split(np.arange(n), _JACKKNIFE_MAX)
    W = np.repeat(w[None], len(groups), axis=0)
    for g, idx in enumerate(groups):
        W[g, idx] = 0.0
    return W


def _quantile(sorted_reps, q):
    """Per-column quantile q (array per column) of sorted replicates [B, m]."""
    B = sorted_reps.shape[0]
    pos = np.clip(q, 0, 1) * (B - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, B - 1)
    frac = pos - lo
    cols = np.arange(sorted_reps.shape[1])
    return sorted_reps[lo, cols] * (1 - frac) + sorted_reps[hi, cols] * frac


def bootstrap(statistic, n, weights=None, n_boot=1000, seed=0, level=0.95, method="bca", chunk=None):
    """Bootstrap a statistic of example weights (see the module's docstring).

    Returns a dict of arrays in the statistic's shape: estimate, se (the replicates'
    standard deviation), low, high (the interval at `level`), and replicates [n_boot, ...].
    method: "percentile" or "bca" (bias-corrected and accelerated, Efron 1987)."""
    if method not in ("percentile", "bca"):
        raise ValueError(f"method: expected 'percentile' or 'bca', got {method!r}")
    if not 0 < level < 1:
        raise ValueError(f"level: expected a number in (0, 1), got {level!r}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 2:
        raise ValueError(f"n_boot: expected an int >= 2, got {n_boot!r}")
    w = check_weights(weights, n)
    estimate = np.asarray(statistic(w[None]), np.float64)[0]
    counts = _counts(n, n_boot, seed)
    chunk = chunk or max(1, int(2e7 // max(n, 1)))
    reps = np.concatenate([np.asarray(statistic(w * counts[i:i + chunk]), np.float64)
                           for i in range(0, n_boot, chunk)])
    shape = estimate.shape
    flat = reps.reshape(n_boot, -1)
    est = estimate.reshape(-1)
    srt = np.sort(flat, axis=0)
    alpha = (1 - level) / 2
    if method == "percentile":
        q_lo, q_hi = np.full(est.size, alpha), np.full(est.size, 1 - alpha)
    else:
        # bias correction: how far the replicates' median is from the estimate
        below = (flat < est).mean(0) + 0.5 * (flat == est).mean(0)
        z0 = np.array([_NORMAL.inv_cdf(min(max(p, 1e-10), 1 - 1e-10)) for p in below])
        jack = np.asarray(statistic(_jackknife_weights(w)), np.float64).reshape(-1, est.size)
        d = jack.mean(0) - jack
        den = 6.0 * (d ** 2).sum(0) ** 1.5
        acc = np.divide((d ** 3).sum(0), den, out=np.zeros(est.size), where=den > 0)
        qs = []
        for z_a in (_NORMAL.inv_cdf(alpha), _NORMAL.inv_cdf(1 - alpha)):
            z = z0 + (z0 + z_a) / (1 - acc * (z0 + z_a))
            qs.append(np.array([_NORMAL.cdf(v) for v in z]))
        q_lo, q_hi = qs
    low, high = _quantile(srt, q_lo), _quantile(srt, q_hi)
    return {"estimate": estimate, "se": flat.std(0, ddof=1).reshape(shape),
            "low": low.reshape(shape), "high": high.reshape(shape), "replicates": reps}


def weighted_mean_ci(values, weights=None, **kwargs):
    """Weighted mean over examples of values [m, n] (m quantities, e.g. units), with
    its bootstrap: a dict as bootstrap() returns, each [m] (replicates [n_boot, m])."""
    values = np.asarray(values, np.float64)
    if values.ndim == 1:
        values = values[None]
    if not np.isfinite(values).all():
        raise ValueError("values: not finite (a relative effect divides by an outcome of 0?)")
    n = values.shape[1]

    def mean(W):
        return (W @ values.T) / W.sum(1, keepdims=True)

    return bootstrap(mean, n, weights, **kwargs)
