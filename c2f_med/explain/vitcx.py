"""ViT-CX (Xie et al., IJCAI 2023, "ViT-CX: Causal Explanation of Vision Transformers") and the
sharpening control ``vitcx-sq``; the mask-scoring pieces C2F shares with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from c2f_med.explain.base import Explainer, Explanation, register, resolve_target
from c2f_med.explain.masks import DEFAULT_DELTA, token_masks
from c2f_med.explain.perturb import MaskRequest, Perturbation, causal_probabilities, class_probability
from c2f_med.explain.tokens import minmax
from c2f_med.models.vit import TokenOutputs, TokenViT

__all__ = [
    "MaskScoringParams",
    "ViTCX",
    "coverage_map",
    "causal_scores",
    "slice_masks",
    "mask_requests",
    "perturbation_of",
]


@dataclass
class MaskScoringParams:
    """Parameters of Steps 1-2 shared by ViT-CX and C2F (both ``Params`` extend this)."""

    delta: float = DEFAULT_DELTA  #: clustering distance threshold (cosine, complete linkage)
    cut: Literal["fixed", "gap"] = "fixed"  #: cut the tree at delta, or in the widest merge gap near it
    perturbation: Literal["noise", "zero", "blur", "mean"] = "noise"  #: see c2f_med.explain.perturb
    noise_sigma: float = 0.1  #: std of the Gaussian noise perturbation, normalised input units
    blur_sigma: float = 4.0  #: Gaussian std (input pixels) of the "blur" perturbation
    seed: int = 0  #: noise seed (the same draws for every slice, whatever its content)
    noise_draws: Literal["per-mask", "shared"] = "per-mask"  #: one noise draw per mask, or one per slice
    batch_size: int = 64  #: perturbed images per forward pass (batched across masks and slices)


def perturbation_of(params: MaskScoringParams) -> Perturbation:
    """The :class:`Perturbation` described by ``params``."""
    return Perturbation(params.perturbation, params.noise_sigma, params.blur_sigma, params.seed, params.noise_draws)


def slice_masks(model: TokenViT, out: TokenOutputs, delta: float, cut: str = "fixed") -> list[torch.Tensor]:
    """Step 1 for every slice of a clean pass: ``B`` tensors ``K_b x H x W``."""
    return [token_masks(tokens, model.grid, model.input_size, delta, cut) for tokens in out.tokens]


def mask_requests(masks: Sequence[torch.Tensor], baselines: Sequence[torch.Tensor]) -> list[MaskRequest]:
    """One request per mask, slice-major: mask ``k`` of slice ``b`` with its perturbation ``baselines[b][k]``."""
    return [MaskRequest(b, m[k], e[k]) for b, (m, e) in enumerate(zip(masks, baselines)) for k in range(len(m))]


def causal_scores(
    model: TokenViT,
    x: torch.Tensor,
    target: torch.Tensor,
    p_clean: torch.Tensor,
    requests: Sequence[MaskRequest],
    batch_size: int,
) -> torch.Tensor:
    """ViT-CX's causal score per request: ``S = p_c(x~) - p_c(x^) + p_c(x)`` (``2`` forwards each)."""
    p_tilde, p_hat = causal_probabilities(model, x, target, requests, batch_size)
    slices = torch.tensor([r.slice for r in requests], dtype=torch.long, device=p_clean.device)
    return p_tilde - p_hat + p_clean[slices]


def coverage_map(scores: torch.Tensor, masks: torch.Tensor, coverage: torch.Tensor | None = None) -> torch.Tensor:
    """Score-weighted mask sum with ViT-CX's coverage normalisation (one slice, not min-max normalised).

    ``E(u) = sum_k S_k M_k(u) / sum_j M_j(u)``; pixels no mask covers (``sum_j M_j(u) = 0``) get 0.

    Args:
        scores: ``K`` scores ``S_k``.
        masks: ``K x H x W`` masks ``M_k``.
        coverage: ``H x W`` denominator ``sum_j M_j`` (default: the sum of ``masks``; C2F passes the
            sum over all ``K`` original masks while ``masks`` holds only the accepted ones).
    """
    num = (scores.to(masks).view(-1, 1, 1) * masks).sum(0)
    cov = masks.sum(0) if coverage is None else coverage
    return torch.where(cov > 0, num / cov.clamp(min=torch.finfo(cov.dtype).tiny), torch.zeros_like(num))


@register("vitcx")
@register("vitcx-sq", {"gamma": 2.0})
class ViTCX(Explainer):
    """ViT-CX (Xie, Li, Ma, Hu, Tang & Zhang, IJCAI 2023): causal scores of last-layer feature masks.

    Step 0: one clean pass records the last block's patch tokens and ``p_c(x)``.
    Step 1 (:mod:`c2f_med.explain.masks`): ``K`` masks ``M_k`` from the clustered token feature maps.
    Step 2 (:mod:`c2f_med.explain.perturb`): ``S_k = p_c(x~_k) - p_c(x^_k) + p_c(x)`` with
    ``x~_k = x M_k + e_k (1 - M_k)``, ``x^_k = x + e_k (1 - M_k)``.
    Map: ``E(u) = sum_k S_k M_k(u) / sum_j M_j(u)``, min-max normalised; ``vitcx-sq`` (``gamma = 2``) is
    the sharpening control ``minmax(E ** gamma)`` that C2F's fine stage must beat.

    Cost per slice: ``1 + 2K`` forward passes, no backward pass. Records per slice: ``K``,
    ``forward_passes``.
    """

    @dataclass
    class Params(MaskScoringParams):
        gamma: float = 1.0  #: sharpening exponent, map = minmax(E ** gamma); 1 = plain ViT-CX

    def _explain(self, x: torch.Tensor, target: torch.Tensor | int | None) -> Explanation:
        prm = self.params
        with torch.inference_mode():
            out = self.model.run(x, tokens=True)
        t = resolve_target(out.logits, target)
        p_clean = class_probability(out.logits, t)
        masks = slice_masks(self.model, out, prm.delta, prm.cut)
        perturbation = perturbation_of(prm)
        baselines = [perturbation.baselines(xb, len(m)) for xb, m in zip(x, masks)]
        scores = causal_scores(self.model, x, t, p_clean, mask_requests(masks, baselines), prm.batch_size)
        per_slice = scores.split([len(m) for m in masks])
        maps = minmax(torch.stack([coverage_map(s, m) for s, m in zip(per_slice, masks)]))
        if prm.gamma != 1.0:
            maps = minmax(maps**prm.gamma)
        ks = [len(m) for m in masks]
        records = [{"K": k, "forward_passes": 1 + 2 * k} for k in ks]
        return Explanation(
            saliency=maps.float(), target=t, forward_passes=x.shape[0] + 2 * sum(ks), backward_passes=0, records=records
        )
