"""PNG montages of a saliency volume over its scan, with the lesion contour (matplotlib, Agg).

Each panel is one slice along ``axis`` of the RAS-oriented volume: the scan in grey (display range
[0, 1]), the saliency as an ``inferno`` heat map that is transparent below 0.1 and reaches 75 %
opacity at 0.5, the lesion mask's outline (``skimage.measure.find_contours`` at 0.5) in
:data:`CONTOUR_COLOUR`, and the slice index in the corner. One colour bar for the saliency, the
title above, a note on the orientation below.

Display orientation (radiological convention). For an array in RAS orientation (index ``i`` toward
the patient's right, ``j`` anterior, ``k`` superior) a slice with in-plane axes ``a < b`` is shown
with ``b`` running up the screen and ``a`` running right to left (:func:`display_slice`):

- axial (``axis=2``): anterior up, the patient's left on the image's right;
- coronal (``axis=1``): superior up, the patient's left on the image's right;
- sagittal (``axis=0``): superior up, anterior on the image's left.

Which slices (:func:`montage_slices`): with a non-empty lesion mask, the slices that contain lesion
(evenly spaced ones when there are more than ``max_slices``, always including the slice with the
largest lesion area); otherwise, among the slices well inside the body (foreground area at least
:data:`BODY_FRACTION` of the largest slice's), the ``max_slices`` with the highest lesion
probability (or, without probabilities, the largest saliency inside the body). The end slices
outside the head never fill a montage with noise.

The saliency of all panels is shown on one scale (divided by its maximum over the volume), so
panels compare with each other. The title says what the panels are, the footer's legend names only
what is drawn, and long titles and footers are wrapped to the figure's width.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.figure import Figure
from numpy.typing import NDArray
from skimage.measure import find_contours

from c2f_med.atomic import atomic_path

__all__ = [
    "CONTOUR_COLOUR",
    "HEAT_CMAP",
    "DPI",
    "PANEL_INCHES",
    "COLUMNS",
    "montage_slices",
    "display_slice",
    "heat_colormap",
    "figure_inches",
    "overlay_montage",
]

CONTOUR_COLOUR = "#00ffff"  # cyan: absent from inferno and from grey
HEAT_CMAP = "inferno"
DPI = 100
PANEL_INCHES = 2.5  # each panel's cell is PANEL_INCHES square
COLUMNS = 4  # panels per row
COLOURBAR_INCHES = 1.0
TITLE_INCHES = 1.0  # title above and orientation note below
BODY_FRACTION = 0.3  # a slice is "inside the body" when its foreground is this share of the largest slice's
FOREGROUND_LEVEL = 0.05  # image values above this (display range [0, 1]) are foreground
ORIENTATION_NOTES = (
    "sagittal: superior up, anterior on the left",
    "coronal, radiological view: superior up, patient's left on the image's right",
    "axial, radiological view: anterior up, patient's left on the image's right",
)


def montage_slices(
    saliency: NDArray, mask: NDArray | None, axis: int, max_slices: int = 12, *,
    image: NDArray | None = None, probability: Sequence[float] | None = None,
) -> list[int]:
    """Indices of the slices along ``axis`` to show (ascending); see the module docstring.

    Args:
        saliency: ``X x Y x Z``.
        mask: ``X x Y x Z`` lesion mask (nonzero = lesion) or None.
        axis: the slicing axis.
        max_slices: at most this many slices.
        image: ``X x Y x Z`` scan in [0, 1]: without a lesion, only slices inside the body qualify.
        probability: the classifier's lesion probability of each slice along ``axis`` (NaN: not
            classified); without a lesion, the slices are ranked by it.
    """
    if max_slices < 1:
        raise ValueError(f"max_slices must be at least 1, got {max_slices}")
    others = tuple(a for a in range(3) if a != axis)
    if mask is not None and np.any(mask):
        area = np.count_nonzero(mask, axis=others)  # voxels of lesion per slice
        lesion = np.flatnonzero(area)
        if lesion.size <= max_slices:
            return lesion.tolist()
        chosen = lesion[np.round(np.linspace(0, lesion.size - 1, max_slices)).astype(int)]
        largest = lesion[np.argmax(area[lesion])]
        if largest not in chosen:
            chosen[np.argmin(np.abs(chosen - largest))] = largest
        return sorted(chosen.tolist())
    inside = np.ones(saliency.shape, bool) if image is None else np.asarray(image) > FOREGROUND_LEVEL
    body = np.count_nonzero(inside, axis=others)
    candidates = np.flatnonzero(body >= BODY_FRACTION * body.max()) if body.max() else np.arange(body.size)
    if probability is not None:
        rank = np.nan_to_num(np.asarray(probability, dtype=np.float64), nan=-np.inf)
    else:
        rank = np.where(inside, np.asarray(saliency, dtype=np.float64), 0.0).sum(axis=others)
    order = candidates[np.argsort(-rank[candidates], kind="stable")]
    return sorted(order[:max_slices].tolist())


def display_slice(volume: NDArray, index: int, axis: int) -> NDArray:
    """Slice ``index`` along ``axis`` of a RAS ``X x Y x Z`` volume, oriented for display.

    The returned ``rows x columns`` array has the later in-plane axis running up (row 0 = its
    last index) and the earlier one running right to left (column 0 = its last index): the
    radiological views of the module docstring.
    """
    return np.flip(np.take(volume, index, axis=axis).T, (0, 1))


def heat_colormap(name: str = HEAT_CMAP, transparent_below: float = 0.1, opaque_from: float = 0.5,
                  max_alpha: float = 0.75) -> ListedColormap:
    """``name`` with an alpha ramp: 0 up to ``transparent_below``, ``max_alpha`` from ``opaque_from``."""
    ramp = np.linspace(0.0, 1.0, 256)
    colours = matplotlib.colormaps[name](ramp)
    colours[:, 3] = max_alpha * np.clip((ramp - transparent_below) / (opaque_from - transparent_below), 0.0, 1.0)
    return ListedColormap(colours, name=f"{name}_fading")


def figure_inches(panels: int) -> tuple[float, float]:
    """Figure (width, height) in inches of a montage of ``panels`` panels; the PNG is ``DPI`` times it."""
    columns, rows = min(panels, COLUMNS), math.ceil(panels / COLUMNS)
    return columns * PANEL_INCHES + COLOURBAR_INCHES, rows * PANEL_INCHES + TITLE_INCHES


def overlay_montage(
    image: NDArray,
    saliency: NDArray,
    mask: NDArray | None,
    *,
    axis: int,
    path: str | os.PathLike,
    title: str,
    slices: Sequence[int] | None = None,
    max_slices: int = 12,
    spacing: Sequence[float] | None = None,
    probability: Sequence[float] | None = None,
) -> Path:
    """Write a PNG montage of ``saliency`` over ``image`` with ``mask``'s contour (atomically).

    Args:
        image: ``X x Y x Z`` scan in [0, 1], RAS-oriented.
        saliency: ``X x Y x Z`` in [0, 1] on the same grid.
        mask: ``X x Y x Z`` lesion mask (bool or 0/1) or None.
        axis: the slicing axis (2 = axial).
        path: the PNG file.
        title: the figure's title; a line saying what the panels are is added below it.
        slices: the slices to show; None chooses them (:func:`montage_slices`).
        max_slices: at most this many panels when choosing.
        spacing: voxel size (mm) along the three axes, for the panels' aspect; None shows square voxels.
        probability: each slice's lesion probability along ``axis``, to choose slices without a lesion.

    Returns:
        ``path``: a ``DPI * figure_inches(n)`` pixel RGBA PNG.
    """
    image, saliency = np.asarray(image, dtype=np.float32), np.asarray(saliency, dtype=np.float32)
    mask = None if mask is None else np.asarray(mask).astype(bool)
    shapes = {image.shape, saliency.shape} | ({mask.shape} if mask is not None else set())
    if image.ndim != 3 or len(shapes) != 1:
        raise ValueError(f"image, saliency and mask must be X x Y x Z of one shape, got {sorted(shapes)}")
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
    lesion = mask is not None and bool(mask.any())
    if slices is None:
        chosen = montage_slices(saliency, mask, axis, max_slices, image=image, probability=probability)
    else:
        chosen = [int(s) for s in slices]
    if not chosen or not all(0 <= s < image.shape[axis] for s in chosen):
        raise ValueError(f"slices must be a non-empty list of indices below {image.shape[axis]}, got {chosen}")
    a, b = (d for d in range(3) if d != axis)
    aspect = 1.0 if spacing is None else float(spacing[b]) / float(spacing[a])  # display rows follow b

    top = float(saliency.max())
    saliency = saliency / top if top > 0 else saliency  # one scale for the whole montage
    width, _ = figure_inches(len(chosen))
    fig = Figure(figsize=figure_inches(len(chosen)), dpi=DPI, layout="constrained")
    rows, columns = math.ceil(len(chosen) / COLUMNS), min(len(chosen), COLUMNS)
    axes = fig.subplots(rows, columns, squeeze=False)
    heat = heat_colormap()
    outlined = False
    for ax in axes.ravel():
        ax.set_axis_off()
    for ax, index in zip(axes.ravel(), chosen):
        ax.imshow(display_slice(image, index, axis), cmap="gray", vmin=0.0, vmax=1.0, aspect=aspect,
                  interpolation="nearest")
        ax.imshow(display_slice(saliency, index, axis), cmap=heat, vmin=0.0, vmax=1.0, aspect=aspect,
                  interpolation="nearest")
        if mask is not None:
            outline = display_slice(mask, index, axis).astype(np.float32)
            for contour in find_contours(outline, 0.5):  # (row, column) points
                ax.plot(contour[:, 1], contour[:, 0], color=CONTOUR_COLOUR, linewidth=1.5)
                outlined = True
        ax.text(0.03, 0.97, f"slice {index}", transform=ax.transAxes, ha="left", va="top", fontsize=8,
                color="white", bbox={"facecolor": "black", "alpha": 0.6, "pad": 1.5, "linewidth": 0})
    fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), cmap=HEAT_CMAP), ax=axes.ravel().tolist(),
                 label="saliency", shrink=0.8)
    if lesion:
        what = "slices with the annotated lesion"
    elif probability is not None:
        what = "no lesion annotated: slices with the highest lesion probability"
    else:
        what = "no lesion annotated: slices with the most saliency inside the body"
    fig.suptitle(_wrap(f"{title}\n{what}", width, 11), fontsize=11)
    note = ORIENTATION_NOTES[axis] + ("; cyan line: lesion outline" if outlined else "")
    fig.supxlabel(_wrap(note, width, 8), fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return Path(path)


def _wrap(text: str, width_inches: float, fontsize: float) -> str:
    """``text`` wrapped to lines that fit ``width_inches`` at ``fontsize`` points (about 0.55 em a character)."""
    chars = max(12, int(width_inches * 72 / (0.55 * fontsize)))
    return "\n".join(textwrap.fill(line, chars) for line in text.split("\n"))
