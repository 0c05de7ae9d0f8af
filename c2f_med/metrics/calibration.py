"""Calibration and operating point of a binary slice classifier.

Plain functions on arrays. ``probability`` is the positive-class probability of each slice (or
lesion), ``label`` its truth (read as ``label > 0``).

* :func:`expected_calibration_error`: ``ECE = sum_b (n_b / n) |acc_b - conf_b|`` over ``bins``
  equal-width bins of the predicted probability of the *positive* class, where ``acc_b`` is the
  fraction of positives in bin ``b`` and ``conf_b`` the mean predicted probability in it (the
  reliability-diagram form for a binary task; Naeini et al., AAAI 2015; Guo et al., ICML 2017).
* :func:`fit_temperature`: the temperature ``T > 0`` that minimises the negative log-likelihood of
  ``softmax(logits / T)`` (Guo et al., "On calibration of modern neural networks", ICML 2017). It
  does not change any ranking, so AUROC is unchanged.
* :func:`threshold_at_specificity`: the smallest threshold ``t`` such that at least ``specificity``
  of the negatives have ``p < t``.
* :func:`rates_at`: sensitivity and specificity at a threshold (positive when ``p >= t``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numpy.typing import ArrayLike

__all__ = ["expected_calibration_error", "fit_temperature", "rates_at", "threshold_at_specificity"]


def _pair(probability: ArrayLike, label: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probability, dtype=np.float64).ravel()
    y = np.asarray(label).ravel() > 0
    if p.shape != y.shape:
        raise ValueError(f"probability has {p.size} values but label has {y.size}")
    if not np.all(np.isfinite(p)):
        raise ValueError("probability contains NaN or infinite values")
    return p, y


def expected_calibration_error(probability: ArrayLike, label: ArrayLike, bins: int = 15) -> float:
    """ECE over ``bins`` equal-width bins of ``[0, 1]`` (the last bin closed); NaN without values."""
    p, y = _pair(probability, label)
    if not p.size:
        return math.nan
    which = np.minimum((p * bins).astype(np.int64), bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            ece += sel.mean() * abs(y[sel].mean() - p[sel].mean())
    return float(ece)


def fit_temperature(logits: ArrayLike, label: ArrayLike, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """Temperature minimising the NLL of ``softmax(logits / T)[label]``: ``logits`` ``N x C``, ``label`` ``N``
    class indices. Golden-section search on ``log T`` within ``bounds`` (the NLL is convex in ``1 / T``)."""
    z = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    t = torch.as_tensor(np.asarray(label, dtype=np.int64))
    if z.ndim != 2 or z.shape[0] != t.shape[0]:
        raise ValueError(f"logits must be N x C with N = {t.shape[0]} labels, got {tuple(z.shape)}")

    def nll(log_temp: float) -> float:
        return float(torch.nn.functional.cross_entropy(z / math.exp(log_temp), t))

    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(80):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(b)
    return float(math.exp((lo + hi) / 2))


def threshold_at_specificity(probability: ArrayLike, label: ArrayLike, specificity: float = 0.9) -> float:
    """Smallest ``t`` with ``mean(p[negatives] < t) >= specificity``: the ``ceil(specificity * n)``-th
    smallest negative probability, nudged just above it (``np.nextafter``). Raises ``ValueError``
    without negatives."""
    p, y = _pair(probability, label)
    neg = np.sort(p[~y])
    if not neg.size:
        raise ValueError("no negative values to set a specificity on")
    k = min(max(math.ceil(specificity * neg.size), 1), neg.size)
    return float(np.nextafter(neg[k - 1], np.inf))


def rates_at(probability: ArrayLike, label: ArrayLike, threshold: float) -> dict[str, float]:
    """``{"sensitivity": mean(p[pos] >= t), "specificity": mean(p[neg] < t)}`` (NaN for an absent class)."""
    p, y = _pair(probability, label)
    sens = float(np.mean(p[y] >= threshold)) if y.any() else math.nan
    spec = float(np.mean(p[~y] < threshold)) if (~y).any() else math.nan
    return {"sensitivity": sens, "specificity": spec}
