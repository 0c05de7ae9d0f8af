"""Helpers shared by C2F and the baselines: normalising maps, bringing token maps to the input grid,
finding the explained class, and wrapping token maps as an :class:`~c2f_med.explain.base.Explanation`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from c2f_med.explain.base import Explanation, resolve_target
from c2f_med.models.vit import TokenViT

__all__ = ["minmax", "token_saliency", "targets_for", "token_explanation", "recorded_outputs"]


def minmax(maps: torch.Tensor) -> torch.Tensor:
    """Per-slice min-max normalisation of ``B x ...`` maps to [0, 1]; a constant map becomes zeros."""
    flat = maps.reshape(maps.shape[0], -1)
    lo = flat.amin(1, keepdim=True)
    span = flat.amax(1, keepdim=True) - lo
    out = torch.where(span > 0, (flat - lo) / span.clamp(min=torch.finfo(flat.dtype).tiny), torch.zeros_like(flat))
    return out.reshape(maps.shape)


def token_saliency(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Token-grid maps ``B x h x w`` -> saliency ``B x H x W`` (bilinear, ``align_corners=False``; min-max)."""
    up = F.interpolate(maps.unsqueeze(1).float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    return minmax(up)


def targets_for(model: TokenViT, x: torch.Tensor, target: torch.Tensor | int | None) -> tuple[torch.Tensor, int]:
    """``B`` target classes for ``x`` and the forward passes spent finding them.

    A given ``target`` costs nothing; ``None`` (the predicted class) costs one forward pass per
    slice, because gradient methods need the class before their own pass.
    """
    if target is not None:
        return resolve_target(torch.empty(x.shape[0], model.num_classes, device=x.device), target), 0
    with torch.inference_mode():
        logits = model(x)
    return resolve_target(logits, None), x.shape[0]


def token_explanation(
    maps: torch.Tensor, model: TokenViT, target: torch.Tensor, forward: int, backward: int
) -> Explanation:
    """The :class:`Explanation` of token-grid maps ``B x h x w`` (no per-slice records)."""
    saliency = token_saliency(maps, model.input_size)
    return Explanation(saliency=saliency, target=target, forward_passes=forward, backward_passes=backward,
                       records=[{} for _ in range(saliency.shape[0])])


@contextlib.contextmanager
def recorded_outputs(modules: Sequence[torch.nn.Module]) -> Iterator[list[list[torch.Tensor]]]:
    """Record the forward outputs of ``modules`` (not detached, so gradients can be taken with
    respect to them): ``rec[i]`` lists module ``i``'s outputs in call order. Hooks go when the block ends."""
    rec: list[list[torch.Tensor]] = [[] for _ in modules]
    handles = [m.register_forward_hook(lambda _m, _i, out, i=i: rec[i].append(out)) for i, m in enumerate(modules)]
    try:
        yield rec
    finally:
        for h in handles:
            h.remove()
