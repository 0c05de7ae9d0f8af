"""Faithfulness of a saliency map: how the target probability reacts when salient pixels change.

The model is any callable ``predict(batch) -> p_c`` taking a float tensor ``B x C x H x W`` and
returning the probability of the target class, ``[B]`` (tensor or array); so these functions do
not depend on the project's model code. Forward passes run under ``torch.no_grad()`` on the
device of ``image``.

Written for slices (``image`` ``C x H x W``, ``saliency`` ``H x W``); nothing is 2D-specific, so
a volume ``C x X x Y x Z`` works the same way when ``predict`` accepts ``B x C x X x Y x Z``.

Curves (Petsiuk et al., "RISE", BMVC 2018): pixels are ordered by decreasing saliency (ties in
raster order) and changed in ``steps`` equal chunks; ``p_c`` is recorded at every fraction
``0, 1/steps, ..., 1`` of changed pixels, and the score is the trapezoid area under the curve.

* deletion: pixels go from the image to the baseline (lower AUC = more faithful);
* insertion: pixels go from the baseline to the image (higher AUC = more faithful).

Baselines (the values a removed pixel takes), all in the model's input space:

* ``"zero"``: 0 (RISE's deletion default);
* ``"blur"``: the image smoothed by a Gaussian of ``blur_sigma`` pixels (default 5) over the
  spatial axes, ``scipy.ndimage.gaussian_filter`` with reflected borders (RISE's insertion
  default);
* ``"mean"``: each channel's mean intensity;
* ``"road"``: noisy linear imputation (Rong et al., "A consistent and efficient evaluation strategy
  for attribution methods", ICML 2022, "ROAD"): every changed pixel is filled from the pixels
  that are not changed at that step, by solving the sparse linear system in which each filled
  pixel equals the weighted mean of its 8 neighbours (weight 1/6 for the 4 edge neighbours, 1/12
  for the 4 diagonal ones, as ROAD), plus Gaussian noise of ``noise_std`` (seeded by ``seed``).
  The fill is a smooth continuation of the surrounding tissue: it draws no edges or blobs, so
  the model does not see new structure where pixels were removed. With nothing left to fill
  from (all pixels changed) every pixel takes the channel's mean plus the noise. 2-D images only.

The "zero" and "blur" fills put shapes into the image that it never had (a dark hole with sharp
edges, a blurred copy of the lesion), and a model may respond to those rather than to the missing
evidence: on lesion slices, deleting the most salient pixels towards zero can *raise* the lesion
probability. ``"road"`` avoids this: deleting random pixels with it leaves the probability
unchanged on average (``tests/metrics/test_faithfulness.py``).

Positive / negative perturbation (Chefer et al., CVPR 2021): deletion towards ``"zero"`` (zero
in the model's input space, i.e. after intensity normalisation), most relevant pixels first
(positive, lower AUC = better) or least relevant first (negative, higher AUC = better). Chefer
et al. track top-1 accuracy over a dataset at 0%, 10%, ..., 90%; here ``p_c`` is tracked per slice
from 0% to 100% (average over slices for a dataset score).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from scipy import sparse
from scipy.ndimage import gaussian_filter
from scipy.sparse.linalg import cg

from c2f_med.metrics.localisation import saliency_order

__all__ = [
    "Predict",
    "auc",
    "deletion_auc",
    "insertion_auc",
    "negative_perturbation_auc",
    "perturbation_curve",
    "positive_perturbation_auc",
    "road_impute",
]

#: ROAD's neighbour weights: (row offset, column offset, weight)
_ROAD_NEIGHBOURS = ((-1, 0, 1 / 6), (1, 0, 1 / 6), (0, -1, 1 / 6), (0, 1, 1 / 6),
                    (-1, -1, 1 / 12), (-1, 1, 1 / 12), (1, -1, 1 / 12), (1, 1, 1 / 12))
#: weak pull of every filled pixel towards the channel mean: keeps the system solvable where a
#: filled region touches no kept pixel, negligible (1e-4 of a neighbour's weight) elsewhere
_ROAD_RIDGE = 1e-4

Predict = Callable[[torch.Tensor], "torch.Tensor | np.ndarray"]
"""``predict(batch B x C x H x W) -> p_c [B]``."""


def _baseline(x: torch.Tensor, kind: str, blur_sigma: float) -> torch.Tensor:
    """Baseline image of the same shape as ``x`` (``C x *spatial``)."""
    if kind == "zero":
        return torch.zeros_like(x)
    if kind == "mean":
        return x.mean(dim=tuple(range(1, x.ndim)), keepdim=True).expand_as(x)
    if kind == "blur":
        sigma = (0.0,) + (blur_sigma,) * (x.ndim - 1)
        blurred = gaussian_filter(x.detach().cpu().numpy(), sigma=sigma, mode="reflect")
        return torch.from_numpy(blurred).to(x)
    raise ValueError(f"baseline must be 'zero', 'blur', 'mean' or 'road', got {kind!r}")


def road_impute(image: ArrayLike, keep: ArrayLike, noise_std: float = 0.01,
                rng: np.random.Generator | None = None) -> NDArray[np.float64]:
    """ROAD's noisy linear imputation of the pixels of ``image`` (``C x H x W``) where ``keep`` (``H x W``)
    is False (module docstring); kept pixels are returned unchanged.

    Each filled pixel ``i`` solves ``sum_j w_ij (x_i - x_j) + r (x_i - m) = 0`` over its 8 neighbours
    ``j`` inside the image (kept neighbours are known values), ``m`` the channel mean, ``r`` tiny;
    solved by conjugate gradients (relative tolerance 1e-6); then ``N(0, noise_std^2)`` noise is added to
    the filled pixels (``rng``, default seed 0).
    """
    x = np.asarray(image, dtype=np.float64)
    known = np.asarray(keep, dtype=bool)
    if x.ndim != 3 or known.shape != x.shape[1:]:
        raise ValueError(f"road_impute needs a C x H x W image and an H x W mask, got {x.shape} and {known.shape}")
    rng = rng or np.random.default_rng(0)
    out = x.copy()
    unknown = ~known
    n = int(unknown.sum())
    if n == 0:
        return out
    mean = x.mean(axis=(1, 2))  # C
    if not known.any():
        out[:, unknown] = mean[:, None]
    else:
        h, w = known.shape
        index = np.full((h, w), -1, dtype=np.int64)
        index[unknown] = np.arange(n)
        uy, ux = np.nonzero(unknown)
        diag = np.full(n, _ROAD_RIDGE)
        rhs = np.tile(_ROAD_RIDGE * mean, (n, 1))  # n x C
        rows, cols, vals = [], [], []
        for dy, dx, weight in _ROAD_NEIGHBOURS:
            ny, nx = uy + dy, ux + dx
            inside = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
            src, ny, nx = index[uy[inside], ux[inside]], ny[inside], nx[inside]
            diag[src] += weight  # each direction reaches a pixel once: no repeated indices
            filled = unknown[ny, nx]
            rows.append(src[filled])
            cols.append(index[ny[filled], nx[filled]])
            vals.append(np.full(int(filled.sum()), -weight))
            rhs[src[~filled]] += weight * x[:, ny[~filled], nx[~filled]].T
        a = sparse.coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
        a = (a + sparse.diags(diag)).tocsr()  # symmetric, diagonally dominant: conjugate gradients converge
        for c in range(x.shape[0]):
            out[c, unknown] = cg(a, rhs[:, c], x0=np.full(n, mean[c]), rtol=1e-6, maxiter=10 * n)[0]
    if noise_std > 0:
        out[:, unknown] += rng.normal(0.0, noise_std, size=(x.shape[0], n))
    return out


def perturbation_curve(
    image: ArrayLike | torch.Tensor,
    saliency: ArrayLike,
    predict: Predict,
    *,
    mode: Literal["deletion", "insertion"] = "deletion",
    baseline: Literal["blur", "zero", "mean", "road"] | None = None,
    order: Literal["descending", "ascending"] = "descending",
    steps: int = 20,
    batch_size: int = 32,
    blur_sigma: float = 5.0,
    noise_std: float = 0.01,
    seed: int = 0,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """``p_c`` as pixels are deleted from, or inserted into, the image in saliency order.

    At step ``i`` the ``n_i = round(i N / steps)`` first pixels of the order (``N`` pixels) are
    changed in every channel; ``steps + 1`` images in all, sent to ``predict`` in batches of at
    most ``batch_size``.

    Args:
        image: the model input ``C x H x W`` (tensor on any device, or array).
        saliency: ``H x W`` (or ``1 x H x W``) finite scores; only their order matters.
        predict: ``B x C x H x W`` -> ``[B]`` target-class probabilities.
        mode: ``"deletion"`` (image -> baseline) or ``"insertion"`` (baseline -> image).
        baseline: ``"zero"``, ``"blur"`` or ``"mean"``; ``None`` picks RISE's choice, ``"zero"``
            for deletion and ``"blur"`` for insertion.
        order: ``"descending"`` changes the most salient pixels first, ``"ascending"`` the
            least salient first (the exact reverse order).
        steps: number of equal chunks, ``>= 1``.
        batch_size: images per forward pass, ``>= 1``.
        blur_sigma: Gaussian sigma in pixels of the ``"blur"`` baseline.
        noise_std, seed: the ``"road"`` fill's noise (in the image's units) and its seed.

    Returns:
        ``(fractions, probs)``, two float arrays of length ``steps + 1``: the fraction of
        changed pixels ``n_i / N`` (0 to 1) and ``p_c`` at that fraction.
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    if order not in ("descending", "ascending"):
        raise ValueError(f"order must be 'descending' or 'ascending', got {order!r}")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    x = torch.as_tensor(image).as_subclass(torch.Tensor)  # C x *spatial, plain tensor
    if not x.is_floating_point():
        x = x.float()
    spatial = tuple(x.shape[1:])
    s = np.asarray(saliency, dtype=np.float64)
    if s.shape not in (spatial, (1, *spatial)):
        raise ValueError(f"saliency shape {s.shape} does not match image shape {tuple(x.shape)}")
    if not np.all(np.isfinite(s)):
        raise ValueError("saliency contains NaN or infinite values")

    pixel_order = saliency_order(s)
    if order == "ascending":
        pixel_order = pixel_order[::-1]
    n_pixels = pixel_order.size
    rank = np.empty(n_pixels, dtype=np.int64)
    rank[pixel_order] = np.arange(n_pixels)
    rank_t = torch.from_numpy(rank.reshape(spatial)).to(x.device)  # *spatial

    kind = baseline or ("zero" if mode == "deletion" else "blur")
    counts = np.rint(np.linspace(0, n_pixels, steps + 1)).astype(np.int64)
    if kind == "road":
        if len(spatial) != 2:
            raise ValueError(f"the road fill needs a C x H x W image, got shape {tuple(x.shape)}")
        rng = np.random.default_rng(seed)
        x_np, grid_rank = x.detach().cpu().numpy(), rank.reshape(spatial)

        def images(chunk: np.ndarray) -> torch.Tensor:
            # deletion: the n most salient pixels are filled; insertion: only they are kept
            keeps = [(grid_rank >= n) == (mode == "deletion") for n in chunk]
            return torch.from_numpy(np.stack([road_impute(x_np, keep, noise_std, rng) for keep in keeps])).to(x)
    else:
        base = _baseline(x, kind, blur_sigma)
        start, end = (x, base) if mode == "deletion" else (base, x)

        def images(chunk: np.ndarray) -> torch.Tensor:
            n = torch.as_tensor(chunk, device=x.device).view(-1, *([1] * len(spatial)))
            changed = (rank_t.unsqueeze(0) < n).unsqueeze(1)  # B x 1 x *spatial
            return torch.where(changed, end.unsqueeze(0), start.unsqueeze(0))  # B x C x *spatial

    probs = []
    with torch.no_grad():
        for chunk in np.array_split(counts, range(batch_size, counts.size, batch_size)):
            batch = images(chunk)
            p = torch.as_tensor(predict(batch)).detach().cpu().double().reshape(-1)
            if p.numel() != chunk.size:
                raise ValueError(f"predict returned {p.numel()} values for a batch of {chunk.size}")
            probs.append(p.numpy())
    return counts / n_pixels, np.concatenate(probs)


def auc(fractions: ArrayLike, values: ArrayLike) -> float:
    """Trapezoid area ``sum_i (f_{i+1} - f_i) (v_i + v_{i+1}) / 2`` under a curve."""
    f, v = np.asarray(fractions, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if f.shape != v.shape or f.ndim != 1:
        raise ValueError(f"fractions shape {f.shape} and values shape {v.shape} must be equal and 1-D")
    return float(np.trapezoid(v, f))


def deletion_auc(
    image: ArrayLike | torch.Tensor, saliency: ArrayLike, predict: Predict, **kwargs: Any
) -> float:
    """Area under the deletion curve (lower = more faithful).

    ``kwargs`` (``baseline``, ``steps``, ...) go to :func:`perturbation_curve`.
    """
    return auc(*perturbation_curve(image, saliency, predict, mode="deletion", **kwargs))


def insertion_auc(
    image: ArrayLike | torch.Tensor, saliency: ArrayLike, predict: Predict, **kwargs: Any
) -> float:
    """Area under the insertion curve (higher = more faithful).

    ``kwargs`` (``baseline``, ``steps``, ...) go to :func:`perturbation_curve`.
    """
    return auc(*perturbation_curve(image, saliency, predict, mode="insertion", **kwargs))


def positive_perturbation_auc(
    image: ArrayLike | torch.Tensor, saliency: ArrayLike, predict: Predict, **kwargs: Any
) -> float:
    """Chefer et al.'s positive perturbation: zero the most relevant pixels first (lower = better).

    ``kwargs`` (``steps``, ``batch_size``) go to :func:`perturbation_curve`.
    """
    curve = perturbation_curve(
        image, saliency, predict, mode="deletion", baseline="zero", order="descending", **kwargs
    )
    return auc(*curve)


def negative_perturbation_auc(
    image: ArrayLike | torch.Tensor, saliency: ArrayLike, predict: Predict, **kwargs: Any
) -> float:
    """Chefer et al.'s negative perturbation: zero the least relevant pixels first (higher = better).

    ``kwargs`` (``steps``, ``batch_size``) go to :func:`perturbation_curve`.
    """
    curve = perturbation_curve(
        image, saliency, predict, mode="deletion", baseline="zero", order="ascending", **kwargs
    )
    return auc(*curve)
