"""Occlusion sensitivity (Zeiler & Fergus, ECCV 2014) through MONAI's ``OcclusionSensitivity``: the
model-agnostic reference."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from monai.visualize import OcclusionSensitivity

from c2f_med.explain.base import Explainer, Explanation, register
from c2f_med.explain.tokens import minmax, targets_for

__all__ = ["Occlusion", "occlusion_windows"]


def occlusion_windows(size: tuple[int, ...], mask_size: int, overlap: float) -> int:
    """Occluded images MONAI evaluates for one image of spatial ``size``: its sliding-window count.

    Per dimension of length ``S``: stride ``s = max(int(m * (1 - overlap)), 1)`` (``s = m`` when
    ``m = S``) and ``ceil((S - m) / s) + 1`` windows (``monai.data.utils.dense_patch_slices``).
    """
    count = 1
    for extent in size:
        stride = mask_size if mask_size == extent else max(int(mask_size * (1 - overlap)), 1)
        count *= math.ceil((extent - mask_size) / stride) + 1
    return count


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    return logits.softmax(1)


@register("occlusion")
class Occlusion(Explainer):
    """Occlusion sensitivity with :class:`monai.visualize.OcclusionSensitivity`.

    A ``m x m`` box slides over the slice (stride ``m * (1 - overlap)``); each occluded copy goes
    through the model and MONAI averages, per pixel, ``p_c`` of the copies whose box covers it:
    ``P_occ(u)``. Convention here: **high = important**, the saliency is the drop
    ``p_c(x) - P_occ(u)``, min-max normalised per slice (``p_c(x)`` is a per-slice constant, so this
    equals ``minmax(-P_occ)`` and needs no extra pass). Class probabilities are the softmax of the
    logits (MONAI's ``activate=True`` would pick a sigmoid for single-channel *inputs*).

    MONAI explains one image at a time; each slice's copies are batched ``batch_size`` at a time.
    Cost per slice: :func:`occlusion_windows` forward passes (144 for a 96 x 96 slice with the
    defaults, 529 with ``overlap=0.5``), plus 1 when ``target`` is ``None``; no backward pass.
    """

    @dataclass
    class Params:
        #: occluding box side in pixels; ``None`` = the model's patch size (one token)
        mask_size: int | None = None
        #: overlap of neighbouring boxes in [0, 1); 0 = a block map at token resolution. Measured on
        #: the default LesionViT (96 x 96, 2 busy CPU cores): 0 -> 144 forwards, ~3.5 s per slice;
        #: 0.5 -> 529 forwards, ~11 s per slice
        overlap: float = 0.0
        #: occluded value: a float in the model's normalised input space (0.0 = the reconstruction's "zero"
        #: baseline), or MONAI's "gaussian", "mean_patch", "mean_img"
        mode: float | Literal["gaussian", "mean_patch", "mean_img"] = 0.0
        #: occluded copies per forward batch (MONAI's ``n_batch``)
        batch_size: int = 64

    def _explain(self, x: torch.Tensor, target: torch.Tensor | int | None) -> Explanation:
        t, forward = targets_for(self.model, x, target)
        mask = self.params.mask_size or self.model.patch_size
        mode = self.params.mode if isinstance(self.params.mode, str) else float(self.params.mode)
        occ = OcclusionSensitivity(self.model, mask_size=mask, n_batch=self.params.batch_size, verbose=False,
                                   mode=mode, overlap=self.params.overlap, activate=_softmax)
        maps = []
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # MONAI's list-of-slices indexing
            for b in range(x.shape[0]):
                prob_occluded, _ = occ(x[b: b + 1])  # 1 x C x H x W
                maps.append(-prob_occluded[0, t[b]].as_tensor())
        saliency = minmax(torch.stack(maps).float())
        per_slice = occlusion_windows(tuple(x.shape[2:]), mask, self.params.overlap)
        return Explanation(saliency=saliency, target=t, forward_passes=forward + per_slice * x.shape[0],
                           backward_passes=0, records=[{} for _ in range(x.shape[0])])
