"""Volume <-> model-input slices: the one geometry that training, explaining and scoring share.

A volume ``X x Y x Z`` (intensities already in [0, 1] from an intensity preset) is cut along
``axis`` into 2D slices. Each slice is zero-padded, centred, to the aspect ratio of the model's
input (keeping its own aspect ratio, so a lesion keeps its shape) and resized to the model's
``H x W``; then the input normalisation ``(x - mean) / std`` is applied. :func:`from_model_grid`
undoes the resize and the padding, so per-slice maps stack back onto the volume's own grid. A model
that wants several channels gets the gray slice repeated (:func:`repeat_channels`); its gradients,
and so its saliency, come back summed onto the one gray channel.

A 2.5-D model (``slice_context = k > 0``, :func:`slice_context`) sees each slice with its ``k``
neighbours on either side as ``2k + 1`` channels, in slice order (the slice itself in channel ``k``);
beyond the volume's first and last slice the edge slice is repeated. Its saliency is a map of the
middle slice: explainers return one ``H x W`` map whatever the number of channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "SliceGeometry",
    "evenly_spread",
    "volume_slices",
    "to_model_grid",
    "from_model_grid",
    "normalise_input",
    "repeat_channels",
    "slice_context",
    "INPUT_MEAN",
    "INPUT_STD",
]

#: model-input normalisation applied after the intensity preset ([0, 1]): (x - 0.25) / 0.3
INPUT_MEAN = 0.25
INPUT_STD = 0.3


@dataclass(frozen=True)
class SliceGeometry:
    """How an ``h x w`` slice maps onto the model's ``H x W`` grid (``size``: ``(H, W)``, or one int for a
    square grid).

    The slice is padded, centred, to ``side = (side_h, side_w)``, the smallest frame of the model's
    aspect ratio that holds it (``top``/``left`` rows/columns before it), and resized to ``H x W``.
    """

    height: int
    width: int
    size: int | tuple[int, int]

    @property
    def shape(self) -> tuple[int, int]:
        """The model's input ``(H, W)``."""
        return (self.size, self.size) if isinstance(self.size, int) else (int(self.size[0]), int(self.size[1]))

    @property
    def side(self) -> tuple[int, int]:
        rows, cols = self.shape
        scale = max(self.height / rows, self.width / cols)
        return max(self.height, round(scale * rows)), max(self.width, round(scale * cols))

    @property
    def top(self) -> int:
        return (self.side[0] - self.height) // 2

    @property
    def left(self) -> int:
        return (self.side[1] - self.width) // 2


def normalise_input(x: torch.Tensor, mean: float = INPUT_MEAN, std: float = INPUT_STD) -> torch.Tensor:
    """Model-input normalisation of [0, 1] intensities."""
    return (x - mean) / std


def repeat_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """``B x 1 x H x W`` gray slices -> ``B x channels x H x W`` (a view: gradients sum back onto the gray channel)."""
    if x.shape[1] == channels:
        return x
    if x.shape[1] != 1:
        raise ValueError(f"cannot repeat {x.shape[1]} channels to {channels}")
    return x.expand(-1, channels, -1, -1)


def to_model_grid(slices: torch.Tensor, size: int | tuple[int, int]) -> tuple[torch.Tensor, SliceGeometry]:
    """Pad ``B x C x h x w`` slices, centred, to the model's aspect ratio and resize to ``B x C x H x W``
    (``size``: ``(H, W)`` or one int for a square input).

    Bilinear with antialiasing when shrinking. Padding value 0 (the preset's background).
    """
    if not isinstance(size, int):
        size = (int(size[0]), int(size[1]))
    geom = SliceGeometry(int(slices.shape[-2]), int(slices.shape[-1]), size)
    (side_h, side_w), shape = geom.side, geom.shape
    pad_h, pad_w = side_h - geom.height, side_w - geom.width
    x = F.pad(slices, (geom.left, pad_w - geom.left, geom.top, pad_h - geom.top))
    if geom.side != shape:
        x = F.interpolate(x, size=shape, mode="bilinear", align_corners=False, antialias=side_h > shape[0])
    return x, geom


def from_model_grid(maps: torch.Tensor, geom: SliceGeometry) -> torch.Tensor:
    """Inverse of :func:`to_model_grid` for ``B x H x W`` maps -> ``B x h x w`` (bilinear)."""
    x = maps.unsqueeze(1)
    if geom.side != geom.shape:
        shrink = geom.shape[0] > geom.side[0]
        x = F.interpolate(x, size=geom.side, mode="bilinear", align_corners=False, antialias=shrink)
    return x[:, 0, geom.top : geom.top + geom.height, geom.left : geom.left + geom.width]


def slice_context(model) -> int:
    """Neighbouring slices a model sees on either side of each slice (its ``slice_context``; 0: 2-D)."""
    return int(getattr(model, "slice_context", 0))


def volume_slices(volume: torch.Tensor, axis: int, index: slice | list[int] | torch.Tensor | None = None,
                  context: int = 0) -> torch.Tensor:
    """``X x Y x Z`` volume -> ``n x (2 context + 1) x h x w`` slices along ``axis`` (0, 1 or 2), in index order.

    For ``axis=2`` the slice is ``X x Y``; for ``axis=0``, ``Y x Z``; for ``axis=1``, ``X x Z``. Channel
    ``j`` of slice ``i`` is slice ``i + j - context``, clamped to the volume (edge slices repeated), so
    ``context=0`` gives ``n x 1 x h x w``.
    """
    if context < 0:
        raise ValueError(f"context must be >= 0, got {context}")
    moved = torch.movedim(volume, axis, 0)  # n x h x w
    centre = torch.arange(moved.shape[0])
    if index is not None:
        centre = centre[index]
    offsets = torch.arange(-context, context + 1)
    rows = (centre.reshape(-1, 1) + offsets).clamp(0, moved.shape[0] - 1)  # n x (2 context + 1)
    return moved[rows]


def evenly_spread(n: int, k: int) -> list[int]:
    """Up to ``k`` distinct indices of ``range(n)``, spread evenly from the first to the last (``k`` rounded
    positions of ``linspace(0, n - 1, min(k, n))``; none when ``k <= 0``)."""
    k = min(k, n)
    return [int(i) for i in np.unique(np.rint(np.linspace(0, n - 1, k)).astype(int))] if k > 0 else []
