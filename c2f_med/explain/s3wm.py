"""Step 2 of C2F: S3WM, sequential three-way decisions over the masks of one slice.

Pure functions on score arrays (one slice, ``K`` masks); the explainer (:mod:`c2f_med.explain.c2f`)
does the forward passes.

Evaluation function (the conditional probability that mask ``k`` supports class ``c``)::

    e_k = clip(S_k / Z, 0, 1)

with the normaliser ``Z`` (:func:`normaliser`) either ``p_c(x)`` (``"pc"``, the reconstruction's first
choice) or the slice's best level-1 score ``max_j S_j`` (``"best"``): when ``p_c(x)`` is near 1,
masks score near 0 or near ``p_c`` and ``e`` is bimodal; relative to the best mask, ``e`` spreads
over [0, 1] and the boundary region is populated.

Level 1 (the mask as it is): ``POS1 = {e_k >= alpha1}``, ``NEG1 = {e_k <= beta1}``, ``BND1`` the rest.
Level 2 (only ``BND1``): the sharpened mask ``M'_k = M_k [M_k >= a]`` is re-scored to ``e'_k``;
``POS2 = {e'_k >= alpha2}``, ``NEG2 = {e'_k <= beta2}``, ``BND2`` the rest.
Level 3 (only ``BND2``, two-way): accept iff ``(e_k + e'_k) / 2 >= gamma3``.
Gate ``g_k = 1`` if accepted at any level. Masks accepted at level 1 use ``(M_k, S_k)``, at levels 2-3
``(M'_k, S'_k)``. Fallback: with fewer than ``k_min`` accepted, the ``k_min`` best by level-1 ``e`` are
accepted (all ``K`` if ``K < k_min``); those the fallback adds use ``(M_k, S_k)``.

Granularity ``"split"`` (:func:`decide_split`): level 2 re-decides a ``BND1`` mask at a finer
granularity instead of removing its band: its finer sub-masks (the clusters it contains at a
smaller clustering threshold, :func:`~c2f_med.explain.masks.nested_token_masks`) are scored and
each is decided on its own ``e'`` (``POS2``, ``NEG2``, ``BND2``; level 3 accepts a ``BND2`` sub-mask iff
``(e_parent + e') / 2 >= gamma3``). A ``BND1`` mask with no finer sub-masks is decided by the
level-2 and level-3 thresholds on its own ``e``. The fallback tops up with the best parents by
``e`` among those none of whose sub-masks was accepted.

Thresholds from Yao's decision-theoretic rough sets (:func:`yao_thresholds`): with losses
``lambda_PP = lambda_NN = 0``, ``lambda_PN = lambda_NP = 1`` and a deferment (boundary) loss ``b``
for both states, ``alpha = 1 - b`` and ``beta = b``. Level 1 uses ``b = 0.3`` -> (0.7, 0.3), level 2
``b = 0.4`` -> (0.6, 0.4) and level 3 ``b = 0.5`` -> alpha = beta = 0.5 (two-way): deferring costs
more at each finer level, so the boundary shrinks until no mask is deferred.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "POS",
    "NEG",
    "BND",
    "REFERENCES",
    "yao_thresholds",
    "normaliser",
    "evaluation",
    "sharpen",
    "three_way",
    "decide",
    "Decision",
    "decide_split",
    "SplitDecision",
]

#: region labels of :func:`three_way`
POS, NEG, BND = 1, -1, 0
#: what the evaluation function divides by (:func:`normaliser`)
REFERENCES = ("pc", "best")


def yao_thresholds(
    lambda_PP: float, lambda_BP: float, lambda_NP: float, lambda_PN: float, lambda_BN: float, lambda_NN: float
) -> tuple[float, float]:
    """Yao's (2010) decision-theoretic three-way thresholds from the six losses.

    ``lambda_aP`` is the loss of action ``a`` (P accept, B defer, N reject) when the mask does support
    the class, ``lambda_aN`` when it does not. Minimum Bayes risk accepts when ``Pr >= alpha`` and
    rejects when ``Pr <= beta`` with::

        alpha = (lambda_PN - lambda_BN) / ((lambda_PN - lambda_BN) + (lambda_BP - lambda_PP))
        beta  = (lambda_BN - lambda_NN) / ((lambda_BN - lambda_NN) + (lambda_NP - lambda_BP))

    Requires ``lambda_PP <= lambda_BP < lambda_NP`` and ``lambda_NN <= lambda_BN < lambda_PN``, and
    the result must satisfy ``alpha >= beta``. The spec's losses (0, 0.3, 1, 1, 0.3, 0) give (0.7, 0.3).
    """
    if not (lambda_PP <= lambda_BP < lambda_NP and lambda_NN <= lambda_BN < lambda_PN):
        raise ValueError(
            "losses must satisfy lambda_PP <= lambda_BP < lambda_NP and lambda_NN <= lambda_BN < lambda_PN"
        )
    alpha = (lambda_PN - lambda_BN) / ((lambda_PN - lambda_BN) + (lambda_BP - lambda_PP))
    beta = (lambda_BN - lambda_NN) / ((lambda_BN - lambda_NN) + (lambda_NP - lambda_BP))
    if alpha < beta:
        raise ValueError(f"losses give alpha {alpha:.4g} < beta {beta:.4g}: no three-way region")
    return alpha, beta


def normaliser(scores: torch.Tensor, p_clean: float | torch.Tensor, reference: str = "pc") -> torch.Tensor:
    """``Z`` of the evaluation function for one slice: ``p_c(x)`` (``"pc"``) or ``max_k S_k`` (``"best"``, of the
    ``K`` level-1 scores; an empty or non-positive maximum gives 0, hence ``e = 0``)."""
    if reference not in REFERENCES:
        raise ValueError(f"unknown evaluation reference {reference!r}; choose from {REFERENCES}")
    scores = torch.as_tensor(scores, dtype=torch.float32)
    if reference == "pc":
        return torch.as_tensor(p_clean, dtype=scores.dtype)
    return scores.max().clamp(min=0) if scores.numel() else torch.zeros((), dtype=scores.dtype)


def evaluation(scores: torch.Tensor, z: float | torch.Tensor) -> torch.Tensor:
    """``e = clip(S / Z, 0, 1)`` for ``K`` scores (``Z = 0`` gives 0); ``Z`` from :func:`normaliser`."""
    scores = torch.as_tensor(scores, dtype=torch.float32)
    z = torch.as_tensor(z, dtype=scores.dtype)
    if z <= 0:
        return torch.zeros_like(scores)
    return (scores / z).clamp(0.0, 1.0)


def sharpen(masks: torch.Tensor, a: float) -> torch.Tensor:
    """Level 2's sharpened masks ``M' = M [M >= a]`` (the uncertain band and background removed)."""
    return masks * (masks >= a)


def three_way(e: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """Regions of ``K`` evaluations: :data:`POS` if ``e >= alpha``, :data:`NEG` if ``e <= beta``, else :data:`BND`."""
    e = torch.as_tensor(e)
    region = torch.full(e.shape, BND, dtype=torch.int8, device=e.device)
    region[e <= beta] = NEG
    region[e >= alpha] = POS
    return region


def _level1_regions(e1: torch.Tensor, alpha1: float, beta1: float, region1: torch.Tensor | None) -> torch.Tensor:
    """Level-1 regions of :func:`decide` and :func:`decide_split`: ``region1`` when given, else ``three_way(e1)``."""
    if region1 is None:
        return three_way(e1, alpha1, beta1)
    return torch.as_tensor(region1, dtype=torch.int8, device=e1.device)


@dataclass
class Decision:
    """The outcome of S3WM for one slice's ``K`` masks.

    Attributes:
        gate: ``K`` bools ``g_k``.
        sharpened: ``K`` bools, ``True`` where the accepted mask is ``M'_k`` with score ``S'_k``
            (accepted at level 2 or 3); accepted masks with ``False`` use ``M_k``, ``S_k``.
        level: ``K`` ints, the level that accepted the mask (1, 2, 3; 4 = the fallback; 0 = rejected).
        counts: ``pos1, neg1, bnd1, pos2, neg2, bnd2, acc3, fallback`` (the record).
    """

    gate: torch.Tensor
    sharpened: torch.Tensor
    level: torch.Tensor
    counts: dict[str, int]


def decide(
    e1: torch.Tensor,
    e2: torch.Tensor,
    alpha1: float = 0.7,
    beta1: float = 0.3,
    alpha2: float = 0.6,
    beta2: float = 0.4,
    gamma3: float = 0.5,
    k_min: int = 5,
    region1: torch.Tensor | None = None,
) -> Decision:
    """S3WM's sequential three-way decision for one slice.

    Args:
        e1: ``K`` level-1 evaluations ``e_k`` (also used by level 3 and to rank the fallback).
        e2: ``K`` level-2 evaluations ``e'_k``; read only where level 1 is ``BND`` (any value elsewhere).
        alpha1, beta1: level-1 thresholds.
        alpha2, beta2: level-2 thresholds.
        gamma3: level-3 two-way threshold on ``(e_k + e'_k) / 2``.
        k_min: fewest accepted masks; the fallback tops up with the best by ``e1``.
        region1: level-1 regions when they were decided on another evaluation than ``e1`` (the
            ``costaware`` variant decides level 1 on ``clip(p_c(x~)/p_c(x), 0, 1)`` and passes the
            full causal ``e_k`` of the ``BND1`` masks in ``e1``); default ``three_way(e1, alpha1, beta1)``.
    """
    e1 = torch.as_tensor(e1, dtype=torch.float32)
    e2 = torch.as_tensor(e2, dtype=torch.float32, device=e1.device)
    r1 = _level1_regions(e1, alpha1, beta1, region1)
    bnd1 = r1 == BND
    r2 = three_way(e2, alpha2, beta2)  # meaningful only on BND1
    pos2, neg2, bnd2 = bnd1 & (r2 == POS), bnd1 & (r2 == NEG), bnd1 & (r2 == BND)
    acc3 = bnd2 & ((e1 + e2) / 2 >= gamma3)

    level = torch.zeros(e1.shape, dtype=torch.int8, device=e1.device)
    level[r1 == POS] = 1
    level[pos2] = 2
    level[acc3] = 3
    gate = level > 0
    accepted = int(gate.sum())
    if accepted < k_min:
        best = torch.argsort(-e1, stable=True)[:k_min]
        added = torch.zeros_like(gate)
        added[best] = ~gate[best]
        level[added] = 4
        gate = gate | added
    counts = {
        "pos1": int((r1 == POS).sum()),
        "neg1": int((r1 == NEG).sum()),
        "bnd1": int(bnd1.sum()),
        "pos2": int(pos2.sum()),
        "neg2": int(neg2.sum()),
        "bnd2": int(bnd2.sum()),
        "acc3": int(acc3.sum()),
        "fallback": int((level == 4).sum()),
    }
    return Decision(gate=gate, sharpened=(level == 2) | (level == 3), level=level, counts=counts)


@dataclass
class SplitDecision:
    """The outcome of S3WM with ``granularity="split"`` for one slice's ``K`` level-1 masks.

    Attributes:
        gate: ``K`` bools: the level-1 mask enters the map as it is (accepted at level 1, at levels
            2-3 when it has no sub-masks, or by the fallback).
        child_gate: per mask, ``n_k`` bools: which of its sub-masks enter the map (all ``False`` unless
            the mask was ``BND1``).
        counts: ``pos1, neg1, bnd1, pos2, neg2, bnd2, acc3, fallback``; level-2/3 counts are over the
            objects decided there (sub-masks, or ``BND1`` masks without sub-masks).
    """

    gate: torch.Tensor
    child_gate: list[torch.Tensor]
    counts: dict[str, int]


def decide_split(
    e1: torch.Tensor,
    e2_children: list[torch.Tensor],
    alpha1: float = 0.7,
    beta1: float = 0.3,
    alpha2: float = 0.6,
    beta2: float = 0.4,
    gamma3: float = 0.5,
    k_min: int = 5,
    region1: torch.Tensor | None = None,
) -> SplitDecision:
    """S3WM with a finer granularity at level 2 (module docstring).

    Args:
        e1: ``K`` level-1 evaluations.
        e2_children: ``K`` tensors, the ``n_k`` evaluations of mask ``k``'s sub-masks (read only for
            ``BND1`` masks; empty when a mask has no sub-masks).
        alpha1, beta1, alpha2, beta2, gamma3, k_min, region1: as in :func:`decide`.
    """
    e1 = torch.as_tensor(e1, dtype=torch.float32)
    r1 = _level1_regions(e1, alpha1, beta1, region1)
    gate = r1 == POS
    child_gate = [torch.zeros(len(e), dtype=torch.bool, device=e1.device) for e in e2_children]
    counts = dict.fromkeys(("pos2", "neg2", "bnd2", "acc3"), 0)
    for k in torch.nonzero(r1 == BND).flatten().tolist():
        e2 = torch.as_tensor(e2_children[k], dtype=torch.float32, device=e1.device)
        if e2.numel() == 0:  # no finer granularity: the mask itself, on its own e
            e2 = e1[k : k + 1]
        r2 = three_way(e2, alpha2, beta2)
        acc3 = (r2 == BND) & ((e1[k] + e2) / 2 >= gamma3)
        accepted = (r2 == POS) | acc3
        counts["pos2"] += int((r2 == POS).sum())
        counts["neg2"] += int((r2 == NEG).sum())
        counts["bnd2"] += int((r2 == BND).sum())
        counts["acc3"] += int(acc3.sum())
        if len(child_gate[k]):
            child_gate[k] = accepted
        else:
            gate[k] = bool(accepted[0])
    units = int(gate.sum()) + sum(int(c.sum()) for c in child_gate)
    fallback = 0
    if units < k_min:
        free = torch.tensor([not gate[k] and not bool(child_gate[k].any()) for k in range(len(e1))], dtype=torch.bool)
        order = [k for k in torch.argsort(-e1, stable=True).tolist() if free[k]]
        for k in order[: k_min - units]:
            gate[k] = True
            fallback += 1
    counts = {
        "pos1": int((r1 == POS).sum()),
        "neg1": int((r1 == NEG).sum()),
        "bnd1": int((r1 == BND).sum()),
        **counts,
        "fallback": fallback,
    }
    return SplitDecision(gate=gate, child_gate=child_gate, counts=counts)
