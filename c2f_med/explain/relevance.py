"""Token-relation algebra shared by the attention baselines and C2F's attention fusion (AF).

Shapes: ``B`` slices, ``H_a`` heads, ``T = N + 1`` tokens (CLS first). Attention probabilities
``A^l`` are ``B x H_a x T x T`` with rows summing to 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["fuse_heads_mean", "fuse_heads_gradient", "rollout", "additive_relation", "cls_row"]


def fuse_heads_mean(attention: torch.Tensor) -> torch.Tensor:
    """``mean_h A`` : ``B x H_a x T x T -> B x T x T``."""
    return attention.mean(1)


def fuse_heads_gradient(attention: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Chefer et al. 2021b head fusion ``Abar = E_h[(dy_c/dA * A)^+]`` : ``B x T x T``."""
    return (grad * attention).clamp(min=0).mean(1)


def rollout(fused: Sequence[torch.Tensor]) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020) of per-layer ``B x T x T`` matrices, first layer first.

    ``Ahat^l = (A^l + I) / rowsum``, ``R = Ahat^L ... Ahat^1`` : ``B x T x T``.
    """
    eye = torch.eye(fused[0].shape[-1], dtype=fused[0].dtype, device=fused[0].device)
    r = None
    for a in fused:
        a_hat = a + eye
        a_hat = a_hat / a_hat.sum(-1, keepdim=True)
        r = a_hat if r is None else a_hat @ r
    return r


def additive_relation(fused: Sequence[torch.Tensor]) -> torch.Tensor:
    """Chefer et al. 2021b aggregation ``R = I; R <- R + Abar^l R`` for l = 1..L : ``B x T x T``."""
    b, t = fused[0].shape[0], fused[0].shape[-1]
    r = torch.eye(t, dtype=fused[0].dtype, device=fused[0].device).expand(b, t, t).clone()
    for a in fused:
        r = r + a @ r
    return r


def cls_row(relation: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The CLS row's patch entries ``R[CLS, 1:]`` reshaped to the token grid: ``B x h x w``."""
    return relation[:, 0, 1:].reshape(relation.shape[0], *grid)
