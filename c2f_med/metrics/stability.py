"""Stability of a saliency map: the same scan given two ways that should not change an explanation.

Plain functions on arrays.

* :func:`int16_storage`: the intensities as a classic DICOM series stores them, integers with a
  linear rescale (``value = stored * slope + intercept``), read back. Intensities that already are
  integers within the int16 range come back unchanged (slope 1, the usual CT storage in HU);
  others are rounded on a grid of ``slope = range / 65535`` above their minimum (the finest grid
  that fits 16 bits), as a writer that keeps the full dynamic range does.
* :func:`noise_floor`: the scan's own noise level, a robust estimate from second differences of
  neighbouring voxels inside the body: ``sigma = 1.4826 MAD(d) / sqrt(6)`` of ``d = x[i-1] - 2 x[i] +
  x[i+1]`` along the first axis (for white noise of sigma ``s``, ``d`` has sigma ``s sqrt(6)``; smooth
  anatomy cancels to first order, edges give few large values, which the median ignores). Noise of
  that level is what a second acquisition of the same scan would differ by.
* :func:`saliency_correlation`: Pearson's r of two maps of one slice (NaN when either is constant).
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["int16_storage", "noise_floor", "saliency_correlation"]

_INT16 = (-32768, 32767)


def int16_storage(values: ArrayLike) -> NDArray[np.float64]:
    """``values`` (any shape) stored as int16 with a rescale slope and intercept, then read back."""
    v = np.asarray(values, dtype=np.float64)
    lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 0.0)
    if np.all(v == np.round(v)) and _INT16[0] <= lo and hi <= _INT16[1]:
        return v.copy()
    slope = (hi - lo) / (_INT16[1] - _INT16[0]) or 1.0
    stored = np.clip(np.round((v - lo) / slope) + _INT16[0], *_INT16)
    return (stored - _INT16[0]) * slope + lo


def noise_floor(values: ArrayLike) -> float:
    """Robust noise sigma of a volume ``X x Y x Z`` (module docstring; differences along ``X``), from the
    voxels above its 10th percentile (the body); 0 for a constant volume or fewer than 3 voxels along ``X``."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim < 1 or v.shape[0] < 3:
        return 0.0
    d = np.diff(v, n=2, axis=0)
    low = np.percentile(v, 10)
    inside = (v[:-2] > low) & (v[1:-1] > low) & (v[2:] > low)
    d = d[inside] if inside.any() else d.ravel()
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / math.sqrt(6))


def saliency_correlation(a: ArrayLike, b: ArrayLike) -> float:
    """Pearson's r between two saliency maps of the same shape; NaN when either map is constant."""
    x, y = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"maps of different shapes: {np.shape(a)} and {np.shape(b)}")
    x, y = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(x @ x) * float(y @ y))
    return float(x @ y / denom) if denom > 0 else math.nan
