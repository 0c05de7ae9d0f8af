"""Bootstrap confidence intervals for per-slice scores and for paired differences between methods.

Percentile bootstrap of the mean (``scipy.stats.bootstrap(method="percentile")``): the data are
resampled with replacement ``n`` times with ``numpy.random.default_rng(seed)``, so a seed gives
the same interval on every run. NaN scores (not applicable) are dropped first.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.stats import bootstrap

__all__ = ["bootstrap_ci", "paired_bootstrap"]


def _bootstrap_mean(
    values: NDArray[np.float64], n: int, seed: int, ci: float
) -> tuple[float, float, NDArray[np.float64]]:
    """``(low, high, bootstrap means [n])``; NaN bounds and no means for fewer than 2 values."""
    if values.size < 2:
        return float("nan"), float("nan"), np.empty(0)
    res = bootstrap(
        (values,),
        np.mean,
        n_resamples=n,
        batch=256,  # bounds memory to 256 x len(values) per batch
        confidence_level=ci,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high), res.bootstrap_distribution


def bootstrap_ci(values: ArrayLike, n: int = 2000, seed: int = 0, ci: float = 0.95) -> dict[str, float]:
    """Mean of ``values`` with a percentile-bootstrap confidence interval.

    Args:
        values: per-item scores, any shape (flattened); NaNs are dropped.
        n: bootstrap resamples.
        seed: seed of ``numpy.random.default_rng``.
        ci: confidence level in ``(0, 1)``.

    Returns:
        ``{"mean", "low", "high", "n"}``: ``n`` is the number of non-NaN values; the mean is NaN
        when there are none, and the bounds are NaN with fewer than two.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[~np.isnan(v)]
    low, high, _ = _bootstrap_mean(v, n, seed, ci)
    return {"mean": float(v.mean()) if v.size else float("nan"), "low": low, "high": high, "n": int(v.size)}


def paired_bootstrap(
    a: ArrayLike, b: ArrayLike, n: int = 2000, seed: int = 0, ci: float = 0.95
) -> dict[str, float]:
    """Mean paired difference ``a - b`` of two methods' per-item scores, with a bootstrap CI.

    Pairs where either score is NaN are dropped. The two-sided p-value inverts the percentile
    interval: ``p = min(1, 2 min((#{d* <= 0} + 1) / (n + 1), (#{d* >= 0} + 1) / (n + 1)))`` over
    the bootstrap means ``d*``, so ``p < 1 - ci`` roughly when the interval excludes 0.

    Args:
        a, b: per-item scores of the two methods on the same items, same shape.
        n: bootstrap resamples.
        seed: seed of ``numpy.random.default_rng``.
        ci: confidence level in ``(0, 1)``.

    Returns:
        ``{"mean_diff", "low", "high", "p_value", "n_pairs"}``; NaN entries (but ``n_pairs``)
        with fewer than two valid pairs (``mean_diff`` is defined from one pair on).
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"a shape {x.shape} does not match b shape {y.shape}")
    d = (x - y).ravel()
    d = d[~np.isnan(d)]
    low, high, means = _bootstrap_mean(d, n, seed, ci)
    if means.size:
        below = (np.count_nonzero(means <= 0) + 1) / (means.size + 1)
        above = (np.count_nonzero(means >= 0) + 1) / (means.size + 1)
        p_value = min(1.0, 2 * min(below, above))
    else:
        p_value = float("nan")
    return {
        "mean_diff": float(d.mean()) if d.size else float("nan"),
        "low": low,
        "high": high,
        "p_value": p_value,
        "n_pairs": int(d.size),
    }
