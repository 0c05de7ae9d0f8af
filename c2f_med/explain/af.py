"""Step 3 of C2F: AF, attention fusion into a cross-layer patch relation that refines the coarse map.

Shapes: ``B`` slices, ``L`` layers, ``H_a`` heads, ``N = h * w`` patches, ``T = N + 1`` tokens (CLS
first), input ``H x W`` with ``p x p`` pixels per token.

1. Relation between patches, ``P`` (:func:`patch_relation`), by ``relation``:
   - ``"gae"`` (default, one backward pass): ``Abar^l = E_h[(dy_c/dA^l * A^l)^+]``; ``R = I``,
     ``R <- R + Abar^l R`` for the layers ``l >= l0``;
   - ``"rollout-last"`` (no backward): ``Ahat^L = (mean_h A^L + I) / rowsum`` (``l0`` unused);
   - ``"rollout-all"`` (no backward): ``R = Ahat^L ... Ahat^(l0)``.
   ``P`` = ``R`` without the CLS row and column, rows normalised to sum 1 (``B x N x N``).
2. Token-level coarse map ``s`` = average pool of ``E_c`` over each ``p x p`` patch (:func:`token_pool`).
3. Foreground prototype ``f = sum_j s_j P[j, :] / sum_j s_j`` (:func:`prototype`).
4. Patch importance ``t`` (:func:`patch_importance`), min-max normalised, by ``importance``:
   - ``"cosine"`` (default): ``t_i = cos(P[i, :], f)``;
   - ``"contrast"``: ``t_i = cos(P[i, :], f) - cos(P[i, :], g)`` with the background prototype
     ``g`` = the prototype weighted by ``1 - s / max(s)`` (foreground against background);
   - ``"cls"``: ``t_i = R[CLS, i]``, the relation's CLS row (the class token's relevance instead of a
     prototype; with ``"gae"`` this is Chefer's GAE map, so the fine map is ``E_c`` times GAE).
5. Fine map (:func:`fine_map`), by ``refine``:
   - ``"gate"`` (default): ``E_f = minmax(E_c * up(t))``;
   - ``"propagate"``: ``E_f = minmax(up(P s))``, the coarse map spread along the relation;
   - ``"mix"``: ``E_f = minmax(E_c + mix_lambda * up(P s))``.
   ``up`` = bilinear upsampling of the ``h x w`` token grid to ``H x W`` (``align_corners=False``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from c2f_med.explain.relevance import additive_relation, fuse_heads_gradient, fuse_heads_mean, rollout
from c2f_med.explain.tokens import minmax

__all__ = [
    "RELATIONS",
    "REFINES",
    "IMPORTANCES",
    "relation_matrix",
    "patch_relation",
    "rows_normalised",
    "token_pool",
    "prototype",
    "patch_importance",
    "upsample_tokens",
    "fine_map",
]

RELATIONS = ("gae", "rollout-last", "rollout-all")
REFINES = ("gate", "propagate", "mix")
IMPORTANCES = ("cosine", "contrast", "cls")


def relation_matrix(
    attentions: Sequence[torch.Tensor],
    attention_grads: Sequence[torch.Tensor] | None = None,
    relation: str = "gae",
    l0: int = 1,
) -> torch.Tensor:
    """The token relation ``R`` (``B x T x T``, CLS first) from ``L`` attentions ``B x H_a x T x T``.

    Args:
        attentions: every layer's attention probabilities, first layer first.
        attention_grads: their gradients ``dy_c/dA^l`` (needed by ``"gae"``).
        relation: ``"gae"``, ``"rollout-last"`` or ``"rollout-all"``.
        l0: first layer used (1-based; 1 = all layers); ignored by ``"rollout-last"``.
    """
    if relation not in RELATIONS:
        raise ValueError(f"unknown relation {relation!r}; choose from {RELATIONS}")
    if not 1 <= l0 <= len(attentions):
        raise ValueError(f"l0 = {l0} outside 1..{len(attentions)}")
    if relation == "gae":
        if attention_grads is None:
            raise ValueError("relation 'gae' needs the attention gradients")
        return additive_relation(
            [fuse_heads_gradient(a, g) for a, g in zip(attentions[l0 - 1 :], attention_grads[l0 - 1 :])]
        )
    if relation == "rollout-last":
        return rollout([fuse_heads_mean(attentions[-1])])
    return rollout([fuse_heads_mean(a) for a in attentions[l0 - 1 :]])


def rows_normalised(r: torch.Tensor) -> torch.Tensor:
    """``P``: ``R`` (``B x T x T``) without the CLS row and column, rows normalised to sum 1 (``B x N x N``;
    an all-zero row stays zero)."""
    p = r[:, 1:, 1:]
    p = p.to(torch.promote_types(p.dtype, torch.float32))
    rows = p.sum(-1, keepdim=True)
    return torch.where(rows > 0, p / rows.clamp(min=torch.finfo(p.dtype).tiny), torch.zeros_like(p))


def patch_relation(
    attentions: Sequence[torch.Tensor],
    attention_grads: Sequence[torch.Tensor] | None = None,
    relation: str = "gae",
    l0: int = 1,
) -> torch.Tensor:
    """Row-normalised patch relation ``P`` (``B x N x N``): :func:`rows_normalised` of :func:`relation_matrix`."""
    return rows_normalised(relation_matrix(attentions, attention_grads, relation, l0))


def token_pool(maps: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Average of ``B x H x W`` maps over each ``p x p`` patch: ``B x N`` (row-major token order)."""
    return F.avg_pool2d(maps.unsqueeze(1), patch_size).flatten(1)


def prototype(relation: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Foreground relation prototype ``f = sum_j s_j P[j, :] / sum_j s_j``: ``B x N`` (0 where ``sum s = 0``)."""
    total = s.sum(1, keepdim=True)
    f = torch.einsum("bj,bjn->bn", s, relation)
    return torch.where(total > 0, f / total.clamp(min=torch.finfo(f.dtype).tiny), torch.zeros_like(f))


def patch_importance(
    relation: torch.Tensor, s: torch.Tensor, importance: str = "cosine", cls_row: torch.Tensor | None = None
) -> torch.Tensor:
    """Patch importance ``t`` (``B x N``, min-max normalised per slice) by ``importance`` (module docstring).

    Args:
        relation: ``P``, ``B x N x N``.
        s: token-level coarse map, ``B x N``.
        importance: ``"cosine"``, ``"contrast"`` or ``"cls"``.
        cls_row: ``R[:, 0, 1:]`` (``B x N``), needed by ``"cls"``.
    """
    if importance not in IMPORTANCES:
        raise ValueError(f"unknown importance {importance!r}; choose from {IMPORTANCES}")
    if importance == "cls":
        if cls_row is None:
            raise ValueError("importance 'cls' needs the relation's CLS row")
        return minmax(cls_row.to(relation.dtype))
    t = F.cosine_similarity(relation, prototype(relation, s).unsqueeze(1), dim=-1, eps=1e-12)
    if importance == "contrast":
        peak = s.amax(1, keepdim=True)
        background = torch.where(peak > 0, 1 - s / peak.clamp(min=torch.finfo(s.dtype).tiny), torch.ones_like(s))
        t = t - F.cosine_similarity(relation, prototype(relation, background).unsqueeze(1), dim=-1, eps=1e-12)
    return minmax(t)


def upsample_tokens(values: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """``B x N`` token values -> ``B x H x W`` (bilinear, ``align_corners=False``)."""
    maps = values.reshape(values.shape[0], 1, *grid)
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)[:, 0]


def fine_map(
    coarse: torch.Tensor,
    relation: torch.Tensor,
    grid: tuple[int, int],
    patch_size: int,
    refine: str = "gate",
    mix_lambda: float = 1.0,
    importance: str = "cosine",
    cls_row: torch.Tensor | None = None,
) -> torch.Tensor:
    """The fine map ``E_f`` (``B x H x W`` in [0, 1]) from the coarse map ``E_c`` (``B x H x W``) and ``P``
    (``importance`` and ``cls_row`` as in :func:`patch_importance`, used by ``refine="gate"``)."""
    if refine not in REFINES:
        raise ValueError(f"unknown refine {refine!r}; choose from {REFINES}")
    size = tuple(coarse.shape[-2:])
    relation = relation.to(coarse.dtype)
    s = token_pool(coarse, patch_size)
    if refine == "gate":
        return minmax(coarse * upsample_tokens(patch_importance(relation, s, importance, cls_row), grid, size))
    spread = upsample_tokens(torch.einsum("bij,bj->bi", relation, s), grid, size)  # up(P s)
    if refine == "propagate":
        return minmax(spread)
    return minmax(coarse + mix_lambda * spread)
