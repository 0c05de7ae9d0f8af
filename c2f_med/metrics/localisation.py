"""Localisation scores of a saliency map against a lesion mask.

Plain functions on arrays of any shape (a slice ``H x W``, a volume ``X x Y x Z``, with or without
a leading channel axis): ``saliency`` and ``mask`` must have the same shape. Conventions shared by
every function:

* ``saliency`` is a finite float array ``>= 0``; it need not be normalised. Array-likes (torch
  tensors, MONAI ``MetaTensor`` on the CPU) are read with ``np.asarray``.
* ``mask`` is read as ``mask > 0`` (a 0/1 or boolean lesion mask, or a label map).
* An empty lesion mask makes a score "not applicable": the functions return ``NaN``, never 0.
* A shape mismatch raises ``ValueError`` naming both shapes.
* Ties in the saliency are broken in raster (C) order of the flattened array: the first voxel
  wins, as ``np.argsort(kind="stable")`` does (see :func:`saliency_order`), except in
  :func:`pointing_game` (any tied maximum counts, as in Quantus) and in the rank scores
  :func:`pixel_auroc` / :func:`average_precision` (ties are averaged, as in scikit-learn).

References: Zhang et al., "Top-down neural attention by excitation backprop", IJCV 2018
(pointing game); Arras et al., "CLEVR-XAI", Information Fusion 2022 (relevance mass accuracy);
Chefer et al., "Transformer interpretability beyond attention visualization", CVPR 2021 (mean
threshold, mIoU over {background, object}).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.ndimage import binary_fill_holes, distance_transform_edt
from scipy.stats import rankdata
from skimage import measure

__all__ = [
    "IoUAccumulator",
    "miou_from_counts",
    "average_precision",
    "dice",
    "dice_topk",
    "FP_KEYS",
    "foreground_mask",
    "iou",
    "iou_topk",
    "localisation_scores",
    "pixel_auroc",
    "pointing_game",
    "relevance_mass",
    "saliency_mass",
    "saliency_order",
    "threshold_mean",
    "topk_binarise",
]


def _as_saliency(saliency: ArrayLike) -> NDArray[np.float64]:
    s = np.asarray(saliency, dtype=np.float64)
    if not np.all(np.isfinite(s)):
        raise ValueError("saliency contains NaN or infinite values")
    if s.size and s.min() < 0:
        raise ValueError(f"saliency must be >= 0 (min {s.min():.3g}); clip or take abs first")
    return s


def _as_mask(mask: ArrayLike) -> NDArray[np.bool_]:
    return np.asarray(mask) > 0


def _check_shapes(a: np.ndarray, b: np.ndarray, a_name: str, b_name: str = "mask") -> None:
    if a.shape != b.shape:
        raise ValueError(f"{a_name} shape {a.shape} does not match {b_name} shape {b.shape}")


def _pair(saliency: ArrayLike, mask: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    s, m = _as_saliency(saliency), _as_mask(mask)
    _check_shapes(s, m, "saliency")
    return s, m


def _bool_pair(pred: ArrayLike, mask: ArrayLike) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    p, m = np.asarray(pred).astype(bool), _as_mask(mask)
    _check_shapes(p, m, "prediction")
    return p, m


def saliency_order(saliency: ArrayLike) -> NDArray[np.intp]:
    """Flat indices of ``saliency`` from most to least salient; ties in raster (C) order.

    Args:
        saliency: array of any shape (N elements in all).

    Returns:
        ``N`` flat indices (into ``saliency.ravel()``), a permutation of ``range(N)``.
    """
    s = np.asarray(saliency, dtype=np.float64).ravel()
    return np.argsort(-s, kind="stable")


def pointing_game(
    saliency: ArrayLike,
    mask: ArrayLike,
    tolerance: float = 0,
    ties: Literal["any", "first"] = "any",
) -> float:
    """Pointing game: 1.0 if the saliency maximum lies in the lesion, 0.0 if not, NaN if no lesion.

    The lesion is first dilated by a Euclidean ball of radius ``tolerance`` voxels (a disk for
    slices): a voxel ``v`` counts as inside when ``min_{u in mask} ||u - v||_2 <= tolerance``,
    the footprint of ``skimage.morphology.disk(r)`` / ``ball(r)``.

    Ties: with ``ties="any"`` (default, as ``quantus.PointingGame``) it is a hit when *any* voxel
    equal to the maximum lies in the (dilated) lesion, so a constant map is always a hit; with
    ``ties="first"`` only ``np.argmax`` (the first maximum in raster order) is tested.

    Args:
        saliency: float array ``>= 0``, e.g. ``H x W`` or ``X x Y x Z``.
        mask: lesion mask, same shape.
        tolerance: dilation radius in voxels, ``>= 0``.
        ties: how several equal maxima are scored (see above).

    Returns:
        1.0 (hit), 0.0 (miss) or NaN (empty mask).
    """
    s, m = _pair(saliency, mask)
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    if ties not in ("any", "first"):
        raise ValueError(f"ties must be 'any' or 'first', got {ties!r}")
    if not m.any():
        return float("nan")
    if tolerance > 0:
        m = distance_transform_edt(~m) <= tolerance
    if ties == "first":
        return float(m.flat[np.argmax(s)])
    return float(np.any(m & (s == s.max())))


def relevance_mass(saliency: ArrayLike, mask: ArrayLike) -> float:
    """Relevance mass accuracy (energy pointing game): ``sum(s * mask) / sum(s)``.

    Equals ``quantus.RelevanceMassAccuracy`` without normalisation. An all-zero map is scored as
    a uniform map (the limit of constant maps): ``sum(mask) / mask.size``, the chance level.

    Args:
        saliency: float array ``>= 0``.
        mask: lesion mask, same shape.

    Returns:
        A value in ``[0, 1]``, or NaN for an empty mask.
    """
    s, m = _pair(saliency, mask)
    if not m.any():
        return float("nan")
    total = s.sum()
    if total == 0:
        return float(m.mean())
    return float(s[m].sum() / total)


def threshold_mean(saliency: ArrayLike) -> NDArray[np.bool_]:
    """Binarise a map at its mean, ``s > mean(s)`` (Chefer et al. 2021's segmentation protocol).

    A constant map gives an all-False array.

    Args:
        saliency: float array ``>= 0`` of any shape.

    Returns:
        Boolean array of the same shape.
    """
    s = _as_saliency(saliency)
    return s > s.mean()


def iou(pred: ArrayLike, mask: ArrayLike) -> float:
    """Intersection over union ``|P & M| / |P | M|`` of a binary prediction and the lesion.

    Args:
        pred: boolean (or 0/1) array; nonzero is foreground.
        mask: lesion mask, same shape.

    Returns:
        A value in ``[0, 1]``, or NaN for an empty mask.
    """
    p, m = _bool_pair(pred, mask)
    if not m.any():
        return float("nan")
    return float(np.count_nonzero(p & m) / np.count_nonzero(p | m))


def dice(pred: ArrayLike, mask: ArrayLike) -> float:
    """Dice coefficient ``2 |P & M| / (|P| + |M|)`` of a binary prediction and the lesion.

    Args:
        pred: boolean (or 0/1) array; nonzero is foreground.
        mask: lesion mask, same shape.

    Returns:
        A value in ``[0, 1]``, or NaN for an empty mask.
    """
    p, m = _bool_pair(pred, mask)
    if not m.any():
        return float("nan")
    return float(2 * np.count_nonzero(p & m) / (np.count_nonzero(p) + np.count_nonzero(m)))


def topk_binarise(saliency: ArrayLike, k: int) -> NDArray[np.bool_]:
    """The ``k`` most salient voxels as a boolean array; ties go to the first in raster order.

    Args:
        saliency: float array ``>= 0`` of any shape (N elements).
        k: number of voxels to keep, ``0 <= k <= N``.

    Returns:
        Boolean array of the same shape with exactly ``k`` True values.
    """
    s = _as_saliency(saliency)
    if not 0 <= k <= s.size:
        raise ValueError(f"k must be in [0, {s.size}], got {k}")
    out = np.zeros(s.size, dtype=bool)
    out[saliency_order(s)[:k]] = True
    return out.reshape(s.shape)


def iou_topk(saliency: ArrayLike, mask: ArrayLike) -> float:
    """Area-matched IoU: :func:`iou` of the top-``k`` voxels (``k = |mask|``) and the lesion.

    Depends only on the ranking of the map, so it is invariant to any strictly increasing
    rescaling (power, log, min-max); it separates localisation from peakedness.

    Returns:
        A value in ``[0, 1]``, or NaN for an empty mask.
    """
    s, m = _pair(saliency, mask)
    return iou(topk_binarise(s, int(m.sum())), m)


def dice_topk(saliency: ArrayLike, mask: ArrayLike) -> float:
    """Area-matched Dice: :func:`dice` of the top-``k`` voxels (``k = |mask|``) and the lesion.

    With ``|P| = |M| = k`` this is also the precision (and recall) at ``k``, i.e.
    ``quantus.TopKIntersection(k=|mask|)``.

    Returns:
        A value in ``[0, 1]``, or NaN for an empty mask.
    """
    s, m = _pair(saliency, mask)
    return dice(topk_binarise(s, int(m.sum())), m)


def pixel_auroc(saliency: ArrayLike, mask: ArrayLike) -> float:
    """Voxel-wise ROC AUC of the saliency as a score for the lesion (Mann-Whitney U).

    ``AUROC = (R_1 - n_1 (n_1 + 1) / 2) / (n_1 n_0)``, with ``R_1`` the sum of the ranks of the
    lesion voxels among all voxels (ties get their average rank), ``n_1`` lesion and ``n_0``
    background voxels. Equals ``sklearn.metrics.roc_auc_score``; a constant map gives 0.5.

    Returns:
        A value in ``[0, 1]``; NaN for an empty mask or a mask that covers every voxel.
    """
    s, m = _pair(saliency, mask)
    n1 = np.count_nonzero(m)
    n0 = m.size - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = rankdata(s.ravel(), method="average")
    u = ranks[m.ravel()].sum() - n1 * (n1 + 1) / 2
    return float(u / (n1 * n0))


def average_precision(saliency: ArrayLike, mask: ArrayLike) -> float:
    """Average precision of the saliency as a score for the lesion (step-wise, as scikit-learn).

    ``AP = sum_t (R_t - R_{t-1}) P_t`` over the distinct saliency values ``t`` in decreasing
    order, with ``P_t`` / ``R_t`` the precision / recall of ``s >= t`` and ``R_0 = 0``. Equals
    ``sklearn.metrics.average_precision_score``; a constant map gives the lesion fraction.

    Returns:
        A value in ``(0, 1]``, or NaN for an empty mask.
    """
    s, m = _pair(saliency, mask)
    if not m.any():
        return float("nan")
    order = saliency_order(s)
    s_sorted, m_sorted = s.ravel()[order], m.ravel()[order]
    # last position of each run of equal values = one threshold
    ends = np.flatnonzero(np.append(s_sorted[1:] != s_sorted[:-1], True))
    tp = np.cumsum(m_sorted)[ends]
    precision = tp / (ends + 1)
    recall = tp / tp[-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def localisation_scores(saliency: ArrayLike, mask: ArrayLike, tolerance: float = 0) -> dict[str, float]:
    """All localisation scores of one slice or volume.

    Keys: ``pointing_game`` (tolerance 0), ``pointing_game_tol`` (``tolerance`` voxels), both with
    ``ties="first"`` so that a flat map is not rewarded with a hit,
    ``relevance_mass``, ``iou`` / ``dice`` (map thresholded at its mean), ``iou_topk`` /
    ``dice_topk`` (area-matched), ``auroc``, ``ap``. All NaN for an empty mask.

    Args:
        saliency: float array ``>= 0``.
        mask: lesion mask, same shape.
        tolerance: pointing-game tolerance in voxels (C2F's evaluation reports ``patch_size / 2``).
    """
    s, m = _pair(saliency, mask)
    pred = threshold_mean(s)
    return {
        "pointing_game": pointing_game(s, m, ties="first"),
        "pointing_game_tol": pointing_game(s, m, tolerance, ties="first"),
        "relevance_mass": relevance_mass(s, m),
        "iou": iou(pred, m),
        "dice": dice(pred, m),
        "iou_topk": iou_topk(s, m),
        "dice_topk": dice_topk(s, m),
        "auroc": pixel_auroc(s, m),
        "ap": average_precision(s, m),
    }


#: :func:`saliency_mass` keys: where a false alarm's saliency falls
FP_KEYS = ("mass_foreground", "topk_foreground", "peak_foreground", "foreground_fraction")


def foreground_mask(image: ArrayLike, level: float = 0.02) -> NDArray[np.bool_]:
    """The body on a slice (or volume) in [0, 1]: the largest connected region above ``level``, holes
    filled (so the brain inside a bright skull ring, or air in the sinuses, counts as inside).

    An empty image gives an all-False mask.
    """
    above = np.asarray(image, dtype=np.float64) > level
    if not above.any():
        return above
    labels = measure.label(above, connectivity=1)
    largest = np.argmax(np.bincount(labels.ravel())[1:]) + 1
    return binary_fill_holes(labels == largest)


def saliency_mass(saliency: ArrayLike, foreground: ArrayLike, top: float = 0.05) -> dict[str, float]:
    """Where the saliency of a slice without lesion falls, relative to the body's foreground.

    Keys (:data:`FP_KEYS`): ``mass_foreground``, the share of the saliency mass inside the
    foreground (an all-zero map counts as uniform); ``topk_foreground``, the share of the ``top``
    fraction of most salient pixels (at least one) that lie inside it; ``peak_foreground``, 1.0 when
    the maximum (first in raster order) lies inside it; ``foreground_fraction``, the foreground's
    share of the pixels: what the first two are for a map that looks nowhere in particular.

    Args:
        saliency: float array ``>= 0``.
        foreground: body mask (:func:`foreground_mask`), same shape.
        top: fraction of pixels in the top-k region, in (0, 1].
    """
    s = _as_saliency(saliency)
    f = _as_mask(foreground)
    _check_shapes(s, f, "saliency", "foreground")
    if not 0 < top <= 1:
        raise ValueError(f"top must be in (0, 1], got {top}")
    total = s.sum()
    k = max(1, int(round(top * s.size)))
    return {
        "mass_foreground": float(s[f].sum() / total) if total > 0 else float(f.mean()),
        "topk_foreground": float(f.ravel()[saliency_order(s)[:k]].mean()),
        "peak_foreground": float(f.flat[np.argmax(s)]),
        "foreground_fraction": float(f.mean()),
    }


def miou_from_counts(counts: ArrayLike) -> NDArray[np.float64]:
    """Dataset mIoU over {background, lesion} from per-item IoU counts (Chefer et al. 2021).

    ``counts``: ``... x items x 4``, columns ``(I_bg, U_bg, I_les, U_les)`` (intersection and union
    voxel counts of each class). The counts are summed over items, ``IoU_c = sum I_c / sum U_c``, and
    ``mIoU = (IoU_bg + IoU_les) / 2``; a class whose summed union is 0 is left out of the mean (NaN
    when both are).

    Returns:
        the mIoU, shape ``...`` (a 0-d array for one set of items).
    """
    s = np.asarray(counts, dtype=np.float64).sum(-2)  # ... x 4
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.stack([s[..., 0] / s[..., 1], s[..., 2] / s[..., 3]], -1)  # ... x 2
        valid = ~np.isnan(iou)
        return np.where(valid, iou, 0.0).sum(-1) / valid.sum(-1)


class IoUAccumulator:
    """Dataset mIoU over the classes {background, lesion} (Chefer et al. 2021).

    Intersections ``I_c`` and unions ``U_c`` of the two classes are summed over slices (or
    volumes); ``IoU_c = I_c / U_c`` and ``mIoU = (IoU_0 + IoU_1) / 2``. Items with an empty lesion
    mask are not applicable and are skipped. Accumulators from several workers combine with
    :meth:`merge`.

    Example::

        acc = IoUAccumulator()
        for s, m in zip(saliencies, masks):
            acc.update(threshold_mean(s), m)
        miou = acc.aggregate()
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        self.intersection = np.zeros(2, dtype=np.int64)  # [background, lesion]
        self.union = np.zeros(2, dtype=np.int64)
        self.count = 0

    def update(self, pred: ArrayLike, mask: ArrayLike) -> None:
        """Add one binary prediction and its lesion mask (same shape); empty masks are skipped."""
        p, m = _bool_pair(pred, mask)
        if not m.any():
            return
        self.intersection += [np.count_nonzero(~p & ~m), np.count_nonzero(p & m)]
        self.union += [np.count_nonzero(~p | ~m), np.count_nonzero(p | m)]
        self.count += 1

    def merge(self, other: IoUAccumulator) -> None:
        """Add the counts of another accumulator (e.g. from another process)."""
        self.intersection += other.intersection
        self.union += other.union
        self.count += other.count

    def class_iou(self) -> NDArray[np.float64]:
        """``[IoU_background, IoU_lesion]``; NaN for a class with an empty union (e.g. no update)."""
        with np.errstate(invalid="ignore"):
            return self.intersection / self.union

    def aggregate(self) -> float:
        """Mean of the two class IoUs; NaN before any (non-empty) update.

        If the background class has an empty union (every voxel is lesion and predicted so), the
        mean is taken over the lesion class alone.
        """
        if self.count == 0:
            return float("nan")
        counts = np.stack([self.intersection, self.union], 1).ravel()  # I_bg, U_bg, I_les, U_les
        return float(miou_from_counts(counts[None]))
