"""Saliency stability: the same slices given two ways that should not matter, and how well the two
saliency maps agree (Pearson r per slice).

- ``"int16"``: the intensities rounded to ``levels`` storage levels over the window, as when a float
  scan (NIfTI) is stored as an integer DICOM series (12 bits: 4095 levels, coarser than int16's);
- ``"noise"``: Gaussian noise of ``noise_sigma`` (in window units, [0, 1]) added, a scanner's noise
  floor (0.005 = half a percent of the window).

Both act on slices already on the model's input grid, as [0, 1] intensities (before
:func:`~c2f_med.slices.normalise_input`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from c2f_med.explain.base import Explainer
from c2f_med.slices import normalise_input

__all__ = ["STABILITY_KINDS", "as_stored_levels", "with_noise_floor", "saliency_correlation", "saliency_stability"]

STABILITY_KINDS = ("int16", "noise")


def as_stored_levels(x: torch.Tensor, levels: int = 4095) -> torch.Tensor:
    """[0, 1] intensities rounded to ``levels`` equal steps (integer storage of the window)."""
    return torch.round(x.clamp(0, 1) * levels) / levels


def with_noise_floor(x: torch.Tensor, sigma: float = 0.005, seed: int = 0) -> torch.Tensor:
    """``x`` plus seeded Gaussian noise of standard deviation ``sigma`` (same units as ``x``)."""
    gen = torch.Generator().manual_seed(int(seed))
    return x + sigma * torch.randn(x.shape, generator=gen, dtype=torch.float32).to(x)


def saliency_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson r per slice of two ``B x H x W`` saliency batches (``B``); 1 where both maps are equal
    constants, 0 where only one is constant."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    den = (a.norm(dim=1) * b.norm(dim=1))
    r = (a * b).sum(1) / den.clamp(min=torch.finfo(den.dtype).tiny)
    both_flat = (a.norm(dim=1) == 0) & (b.norm(dim=1) == 0)
    return torch.where(both_flat, torch.ones_like(r), torch.where(den > 0, r, torch.zeros_like(r))).float()


def saliency_stability(
    explainer: Explainer,
    slices: torch.Tensor,
    target: torch.Tensor | int | None,
    *,
    levels: int = 4095,
    noise_sigma: float = 0.005,
    seed: int = 0,
) -> Mapping[str, torch.Tensor]:
    """Per-slice Pearson r between ``explainer``'s saliency of ``slices`` and of the same slices given
    another way (module docstring).

    Args:
        explainer: any registered explainer.
        slices: ``B x 1 x H x W`` [0, 1] intensities on the model's input grid.
        target: class(es) explained (as :meth:`Explainer.explain`).
        levels: storage levels of ``"int16"``.
        noise_sigma, seed: the ``"noise"`` floor and its seed.

    Returns:
        ``{"int16": B correlations, "noise": B correlations}``.
    """
    if slices.ndim != 4:
        raise ValueError(f"expected B x 1 x H x W slices, got shape {tuple(slices.shape)}")
    reference = explainer.explain(normalise_input(slices), target).saliency
    others = {"int16": as_stored_levels(slices, levels), "noise": with_noise_floor(slices, noise_sigma, seed)}
    return {kind: saliency_correlation(reference, explainer.explain(normalise_input(x), target).saliency)
            for kind, x in others.items()}
