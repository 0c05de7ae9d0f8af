"""Bootstrap confidence intervals for per-slice scores and for paired differences between methods.

Percentile bootstrap of the mean (``scipy.stats.bootstrap(method="percentile")``): the data are
resampled with replacement ``n`` times with ``numpy.random.default_rng(seed)``, so a seed gives
the same interval on every run. NaN scores (not applicable) are dropped first.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.stats import bootstrap

from c2f_med.metrics.localisation import miou_from_counts

__all__ = ["bootstrap_ci", "paired_bootstrap", "paired_bootstrap_miou"]


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


def paired_bootstrap_miou(
    counts_a: ArrayLike, counts_b: ArrayLike, n: int = 2000, seed: int = 0, ci: float = 0.95
) -> dict[str, float]:
    """Paired bootstrap of the difference of two methods' dataset mIoU, resampling items (slices).

    ``counts_*``: ``n_items x 4`` IoU counts per item, columns (background intersection, background
    union, lesion intersection, lesion union). The dataset mIoU of a set of items is
    ``(sum I_bg / sum U_bg + sum I_les / sum U_les) / 2``; each resample draws the same items for both
    methods (percentile interval, ``numpy.random.default_rng(seed)``; p-value as
    :func:`paired_bootstrap`).

    Returns:
        ``{"mean_diff"`` (the difference on all items), ``"low", "high", "p_value", "n_pairs"}``.
    """
    a, b = np.asarray(counts_a, dtype=np.float64), np.asarray(counts_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[1] != 4:
        raise ValueError(f"counts must be two n x 4 arrays of one shape, got {a.shape} and {b.shape}")

    nan = float("nan")
    out = {"mean_diff": float(miou_from_counts(a) - miou_from_counts(b)) if len(a) else nan, "low": nan,
           "high": nan, "p_value": nan, "n_pairs": int(len(a))}
    if len(a) < 2:
        return out
    rng = np.random.default_rng(seed)
    diffs = np.concatenate([miou_from_counts(a[idx]) - miou_from_counts(b[idx]) for idx in
                            (rng.integers(0, len(a), (min(256, n - i), len(a))) for i in range(0, n, 256))])
    alpha = (1 - ci) / 2
    out["low"], out["high"] = (float(q) for q in np.nanquantile(diffs, [alpha, 1 - alpha]))
    below = (np.count_nonzero(diffs <= 0) + 1) / (diffs.size + 1)
    above = (np.count_nonzero(diffs >= 0) + 1) / (diffs.size + 1)
    out["p_value"] = min(1.0, 2 * min(below, above))
    return out
