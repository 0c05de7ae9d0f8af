"""Explain a whole scan slice by slice: the volume explainer.

A scan ``1 x X x Y x Z`` (intensities in [0, 1] from the intensity preset, RAS) is cut along
``axis`` into slices (:mod:`c2f_med.slices`: pad to a centred square, resize to the model's input,
normalise). Slices are streamed ``slice_batch`` at a time: classified (probability of ``target``),
explained by any :class:`~c2f_med.explain.base.Explainer`, resized back to the slice's own grid and
written into the saliency volume, which keeps the scan's affine, meta data and applied operations
(so MONAI's ``Invertd`` / ``SaveImage`` put it back on the original file's grid). Peak memory is
the output volume plus one batch of slices, whatever the number of slices.

Slices that are entirely 0 (background, e.g. padding outside the field of view) are neither
classified nor explained: saliency 0, probability NaN. With ``min_probability`` set, slices whose
target probability is below it get saliency 0 and are not explained. With ``slices`` set, only
those indices are explained (every non-background slice is still classified): the evaluation
explains the lesion slices only. ``keep_model_grid`` also returns each explained slice's map on
the model's ``size x size`` input grid, as the explainer gave it (for faithfulness curves, which
perturb the model's input).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from monai.data import MetaTensor
from tqdm.auto import tqdm

from c2f_med.explain.base import Explainer
from c2f_med.explain.tokens import minmax
from c2f_med.slices import from_model_grid, normalise_input, slice_context, to_model_grid, volume_slices

__all__ = ["SlicePrediction", "VolumeExplanation", "explain_volume"]

NORMALISATIONS = ("slice", "volume")


@dataclass
class SlicePrediction:
    """The classifier's view of one slice.

    Attributes:
        index: slice index along the axis.
        probability: softmax probability of the target class (NaN for a skipped background slice).
        explained: whether the slice was explained (False: background, or below ``min_probability``).
    """

    index: int
    probability: float
    explained: bool


@dataclass
class VolumeExplanation:
    """Result of :func:`explain_volume`.

    Attributes:
        saliency: ``1 x X x Y x Z`` float32 MetaTensor in [0, 1] on the scan's grid, with its affine
            and meta data; 0 on slices that were not explained.
        predictions: one :class:`SlicePrediction` per slice, in index order.
        records: the explainer's per-slice records for the explained slices, each with its ``index``.
        forward_passes: images through the model: the classification pass of every non-background
            slice plus the explainer's passes.
        backward_passes: the explainer's backward passes.
        method: the explainer's registry name.
        axis: the slicing axis.
        model_grid_maps: with ``keep_model_grid``, ``{slice index: size x size}`` float32 CPU maps of
            the explained slices on the model's input grid (before mapping back); else empty.
    """

    saliency: MetaTensor
    predictions: list[SlicePrediction]
    records: list[dict[str, Any]] = field(default_factory=list)
    forward_passes: int = 0
    backward_passes: int = 0
    method: str = ""
    axis: int = 2
    model_grid_maps: dict[int, torch.Tensor] = field(default_factory=dict)


def explain_volume(
    scan: torch.Tensor,
    explainer: Explainer,
    *,
    axis: int = 2,
    target: int | None = 1,
    slice_batch: int = 16,
    min_probability: float | None = None,
    normalise: str = "slice",
    progress: bool = True,
    slices: Sequence[int] | None = None,
    keep_model_grid: bool = False,
) -> VolumeExplanation:
    """Explain every slice of ``scan`` along ``axis`` with ``explainer`` (and its model).

    Args:
        scan: ``1 x X x Y x Z`` MetaTensor, intensities in [0, 1] (a plain tensor gets an identity affine).
        explainer: any registered explainer (``create(name, model)``); its model classifies the slices.
        axis: spatial axis to slice along (0, 1 or 2; 2 = axial after RAS orientation).
        target: class explained and scored (default 1 = lesion); ``None``: each slice's predicted class.
        slice_batch: slices classified and explained per batch.
        min_probability: ``None`` explains every non-background slice; otherwise slices whose target
            probability is below it get saliency 0 and cost no explainer call.
        normalise: ``"slice"``: each explained slice min-max normalised to [0, 1] on its own grid;
            ``"volume"``: each slice's map then weighted by its target probability and the volume
            divided by its maximum, so saliency is comparable across slices.
        progress: show a tqdm bar over slices.
        slices: explain only these slice indices (``None``: all); the others get saliency 0 and
            ``explained=False`` but are classified all the same (non-background ones).
        keep_model_grid: also keep the model-grid maps in ``model_grid_maps``.
    """
    if scan.ndim != 4 or scan.shape[0] != 1:
        raise ValueError(f"expected a 1 x X x Y x Z scan, got shape {tuple(scan.shape)}")
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
    if normalise not in NORMALISATIONS:
        raise ValueError(f"normalise must be one of {NORMALISATIONS}, got {normalise!r}")
    if slice_batch < 1:
        raise ValueError(f"slice_batch must be >= 1, got {slice_batch}")
    model = explainer.model
    if target is not None and not 0 <= target < model.num_classes:
        raise ValueError(f"target class {target} out of range for a {model.num_classes}-class model")
    size = tuple(model.input_size)
    device = next(model.parameters()).device

    volume = scan.as_tensor()[0] if isinstance(scan, MetaTensor) else scan[0]  # X x Y x Z
    saliency = torch.zeros((1, *volume.shape), dtype=torch.float32)
    if isinstance(scan, MetaTensor):  # its meta data hold the affine
        saliency = MetaTensor(saliency, meta=copy.deepcopy(scan.meta),
                              applied_operations=copy.deepcopy(scan.applied_operations))
    else:
        saliency = MetaTensor(saliency)
    out_slices = torch.movedim(saliency.as_tensor()[0], axis, 0)  # n x h x w view: writes land in `saliency`
    n = out_slices.shape[0]
    selected = torch.ones(n, dtype=torch.bool)
    if slices is not None:
        wanted = torch.as_tensor(list(slices), dtype=torch.long)
        if wanted.numel() and (wanted.min() < 0 or wanted.max() >= n):
            raise ValueError(f"slice indices must lie in [0, {n}), got {sorted(set(wanted.tolist()))}")
        selected = torch.zeros(n, dtype=torch.bool)
        selected[wanted] = True
    result = VolumeExplanation(saliency=saliency, predictions=[], method=explainer.name, axis=axis)

    with tqdm(total=n, disable=not progress, desc=f"explain {explainer.name or 'volume'}", unit="slice") as bar:
        for start in range(0, n, slice_batch):
            index = list(range(start, min(start + slice_batch, n)))
            _explain_batch(volume, index, selected[index], axis, explainer, target, min_probability, size, device,
                           out_slices, result, keep_model_grid)
            bar.update(len(index))

    if normalise == "volume":
        for p in result.predictions:
            if p.explained:
                out_slices[p.index] *= p.probability
        peak = out_slices.max()
        if peak > 0:
            out_slices /= peak
    return result


def _explain_batch(
    volume: torch.Tensor,
    index: list[int],
    selected: torch.Tensor,
    axis: int,
    explainer: Explainer,
    target: int | None,
    min_probability: float | None,
    size: tuple[int, int],
    device: torch.device,
    out_slices: torch.Tensor,
    result: VolumeExplanation,
    keep_model_grid: bool,
) -> None:
    """Classify the slices ``index``, explain the ``selected`` ones (``len(index)`` booleans) that pass
    ``min_probability``; write their maps into ``out_slices``."""
    context = slice_context(explainer.model)
    raw = volume_slices(volume, axis, index, context).float()  # b x (2 context + 1) x h x w
    foreground = raw[:, context].flatten(1).ne(0).any(1)  # the slice itself, not its neighbours
    probs = torch.full((len(index),), math.nan)
    chosen = torch.zeros(len(index), dtype=torch.bool)
    if foreground.any():
        x, geom = to_model_grid(raw[foreground].to(device), size)
        x = normalise_input(x)
        with torch.inference_mode():
            prob = explainer.model(x).softmax(1).float()
        prob = prob.clone()  # a normal tensor: the predicted classes become gradient targets
        t = prob.argmax(1) if target is None else torch.full_like(prob[:, 0], target, dtype=torch.long)
        p = prob.gather(1, t[:, None])[:, 0].cpu()
        result.forward_passes += x.shape[0]
        probs[foreground] = p
        keep = selected[foreground] if min_probability is None else selected[foreground] & (p >= min_probability)
        chosen[foreground] = keep
        if keep.any():
            expl = explainer.explain(x[keep.to(device)], t[keep.to(device)] if target is None else target)
            maps = minmax(from_model_grid(expl.saliency.float(), geom)).cpu()  # k x h x w
            explained = [i for i, c in zip(index, chosen.tolist()) if c]
            out_slices[explained] = maps
            result.forward_passes += expl.forward_passes
            result.backward_passes += expl.backward_passes
            result.records += [{"index": i, **r} for i, r in zip(explained, expl.records)]
            if keep_model_grid:
                result.model_grid_maps.update(zip(explained, expl.saliency.float().cpu()))
    result.predictions += [SlicePrediction(i, p, c) for i, p, c in zip(index, probs.tolist(), chosen.tolist())]
