"""Volume <-> model-input slices: the one geometry that training, explaining and scoring share.

A volume ``X x Y x Z`` (intensities already in [0, 1] from an intensity preset) is cut along
``axis`` into 2D slices. Each slice is zero-padded to a centred square (keeping its aspect
ratio, so a lesion keeps its shape) and resized to the model's ``size x size``; then the model's
input normalisation ``(x - mean) / std`` is applied. :func:`from_model_grid` undoes the resize and
the padding, so per-slice maps stack back onto the volume's own grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "SliceGeometry",
    "volume_slices",
    "to_model_grid",
    "from_model_grid",
    "normalise_input",
    "INPUT_MEAN",
    "INPUT_STD",
]

#: model-input normalisation applied after the intensity preset ([0, 1]): (x - 0.25) / 0.3
INPUT_MEAN = 0.25
INPUT_STD = 0.3


@dataclass(frozen=True)
class SliceGeometry:
    """How an ``h x w`` slice maps onto the model's ``size x size`` grid.

    The slice is padded to ``side = max(h, w)`` (centred: ``top``/``left`` rows/columns before it)
    and resized by ``size / side``.
    """

    height: int
    width: int
    size: int

    @property
    def side(self) -> int:
        return max(self.height, self.width)

    @property
    def top(self) -> int:
        return (self.side - self.height) // 2

    @property
    def left(self) -> int:
        return (self.side - self.width) // 2


def normalise_input(x: torch.Tensor, mean: float = INPUT_MEAN, std: float = INPUT_STD) -> torch.Tensor:
    """Model-input normalisation of [0, 1] intensities."""
    return (x - mean) / std


def to_model_grid(slices: torch.Tensor, size: int) -> tuple[torch.Tensor, SliceGeometry]:
    """Pad ``B x C x h x w`` slices to a centred square and resize to ``B x C x size x size``.

    Bilinear with antialiasing when shrinking. Padding value 0 (the preset's background).
    """
    geom = SliceGeometry(int(slices.shape[-2]), int(slices.shape[-1]), size)
    pad_h, pad_w = geom.side - geom.height, geom.side - geom.width
    x = F.pad(slices, (geom.left, pad_w - geom.left, geom.top, pad_h - geom.top))
    if geom.side != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=geom.side > size)
    return x, geom


def from_model_grid(maps: torch.Tensor, geom: SliceGeometry) -> torch.Tensor:
    """Inverse of :func:`to_model_grid` for ``B x size x size`` maps -> ``B x h x w`` (bilinear)."""
    x = maps.unsqueeze(1)
    if geom.side != geom.size:
        x = F.interpolate(
            x, size=(geom.side, geom.side), mode="bilinear", align_corners=False, antialias=geom.size > geom.side
        )
    return x[:, 0, geom.top : geom.top + geom.height, geom.left : geom.left + geom.width]


def volume_slices(volume: torch.Tensor, axis: int, index: slice | list[int] | None = None) -> torch.Tensor:
    """``X x Y x Z`` volume -> ``n x 1 x h x w`` slices along ``axis`` (0, 1 or 2), in index order.

    For ``axis=2`` the slice is ``X x Y``; for ``axis=0``, ``Y x Z``; for ``axis=1``, ``X x Z``.
    """
    moved = torch.movedim(volume, axis, 0)  # n x h x w
    if index is not None:
        moved = moved[index]
    return moved.unsqueeze(1)
