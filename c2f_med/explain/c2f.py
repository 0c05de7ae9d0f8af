"""C2F-Explainer (Ding, Cheng, Geng, Huang & Ju, IEEE TKDE 36(12), 2024): coarse-to-fine explanations.

This is the project's reconstruction, described in docs/method.md (the paper's equations are not
public). Step 0: one clean pass. Step 1: ViT-CX masks (:mod:`~c2f_med.explain.masks`). Step 2: S3WM
(:mod:`~c2f_med.explain.s3wm`) keeps the positive masks for the coarse map. Step 3: AF
(:mod:`~c2f_med.explain.af`) refines it with a cross-layer patch relation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from c2f_med.explain.af import fine_map, relation_matrix, rows_normalised
from c2f_med.explain.base import Explainer, Explanation, register, resolve_target
from c2f_med.explain.legrad import legrad_relations
from c2f_med.explain.masks import nested_token_masks
from c2f_med.explain.perturb import MaskRequest, causal_probabilities, class_probability
from c2f_med.explain.s3wm import BND, decide, decide_split, evaluation, normaliser, sharpen, three_way
from c2f_med.explain.tokens import minmax, targets_for
from c2f_med.explain.vitcx import (
    MaskScoringParams,
    causal_scores,
    coverage_map,
    mask_requests,
    perturbation_of,
    slice_masks,
)

__all__ = ["C2F", "SPEC_FIRST_DEFAULTS"]

#: the reconstruction's first defaults, pinned for the "c2f-first" variant while C2F.Params' defaults are searched
SPEC_FIRST_DEFAULTS = {
    "delta": 0.1,
    "cut": "fixed",
    "perturbation": "noise",
    "noise_sigma": 0.1,
    "noise_draws": "per-mask",
    "blur_sigma": 4.0,
    "s3wm": True,
    "costaware": False,
    "alpha1": 0.7,
    "beta1": 0.3,
    "sharpen_a": 0.5,
    "alpha2": 0.6,
    "beta2": 0.4,
    "gamma3": 0.5,
    "k_min": 5,
    "evaluation": "pc",
    "sharpen_accepted": False,
    "granularity": "band",
    "coarse_delta": 0.3,
    "coarse_scale": "minmax",
    "af": True,
    "relation": "gae",
    "l0": 1,
    "refine": "gate",
    "mix_lambda": 1.0,
    "importance": "cosine",
}


@register("c2f")
@register("c2f-first", SPEC_FIRST_DEFAULTS)
@register("c2f-noS3WM", {"s3wm": False})
@register("c2f-noAF", {"af": False})
@register("c2f-gae", {"relation": "gae"})
class C2F(Explainer):
    """C2F-Explainer (Ding et al., TKDE 2024), as reconstructed in the project's spec; the defaults are
    the design search's selection (``c2f_med.search``, variant ``best-costaware-split-legrad-stable``).

    Step 0: one pass ``model.run(x, tokens=True, attentions=af, target=c if relation == "gae")``
    gives ``F``, ``A^l`` (GAE), ``p_c(x)`` and ``dy_c/dA^l`` (GAE); nothing is recomputed.
    Step 1: the last layer's ``D`` feature maps clustered once (cosine distance, complete linkage);
    the tree cut at ``coarse_delta = 0.3`` gives the ``K`` level-1 masks ``M_k``, cut at
    ``delta = 0.1`` (ViT-CX's masks) the finer sub-masks ``M_kj`` inside each ``M_k``.
    Step 2 (S3WM, cost-aware and coarse-to-fine):
    level 1, one forward per mask: ``e_k = clip(p_c(x~_k) / Z, 0, 1)`` with ``Z = max_j p_c(x~_j)``
    (relative to the best mask; ``x~_k = x M_k + e (1 - M_k)``, ``e`` Gaussian noise of std 0.1, one
    draw shared by all masks of the slice, ``noise_draws="shared"``);
    ``POS1 = {e_k >= 0.7}``, ``NEG1 = {e_k <= 0.3}``. Only ``BND1`` masks pay for the finer
    evaluation: their full causal score ``S_k = p_c(x~_k) - p_c(x^_k) + p_c(x)`` and, at level 2,
    the causal scores ``S_kj`` of their sub-masks, ``e_kj = clip(S_kj / Z, 0, 1)``, decided with
    ``(0.6, 0.4)``; level 3 accepts a ``BND2`` sub-mask iff ``(e_k + e_kj) / 2 >= 0.5``; a ``BND1``
    mask without sub-masks is decided on its own ``e_k`` there. If fewer than ``k_min = 5`` objects
    are accepted, the best masks by ``e_k`` are added. Coarse map:
    ``E_c(u) = max(0, sum_accepted S M(u) / sum_k M_k(u))`` (``S_k = p_c(x~_k)`` for masks accepted
    at level 1, the causal score otherwise; coverage of the level-1 masks), kept on the scores' own
    scale (``coarse_scale="scores"``): a slice whose masks all score alike gives a flat coarse map
    that leaves the relation's map as it is, instead of one stretched to [0, 1] by min-max, where
    small score differences become full contrast. (The stretch made c2f's map of a scan and of the
    same scan with noise at its noise floor correlate at r = 0.61-0.90 on borderline slices.)
    Step 3 (AF): ``R`` = LeGrad's per-layer class-gradient relation
    (:func:`~c2f_med.explain.legrad.legrad_relations`: each layer's own class score read through the
    final norm and head, the ReLU of its gradient with respect to that layer's attention, mean over
    heads), summed over the layers from ``l0``; importance ``"cls"`` reads its map (the relation
    averaged over the query rows, ``P``): ``E_f = minmax(E_c * up(minmax(P)))``. One more forward and
    ``L - l0 + 1`` partial backward passes per slice.

    ``relation="gae"`` (``c2f-gae``, the earlier default): Chefer's gradient-weighted additive relation
    over all layers (``R <- R + E_h[(dy_c/dA^l * A^l)^+] R``) and its CLS row, from the Step-0 pass
    and one backward.

    Other designs by name (``c2f_med.explain.s3wm``, ``c2f_med.explain.af``): ``evaluation="pc"``
    (``Z = p_c(x)``), ``costaware=False`` (full causal score for every mask), ``granularity="band"``
    (level 2 re-scores ``M'_k = M_k [M_k >= sharpen_a]``), ``sharpen_accepted``; AF ``relation``,
    ``l0``, ``importance`` ("cosine" prototype, "contrast"), ``refine``. ``c2f-first`` pins the
    spec's first defaults. ``s3wm=False`` sets every ``g_k = 1`` on ViT-CX's masks; ``af=False``
    returns ``E_c``; both off is ViT-CX exactly.

    Cost per slice (forward passes): defaults ``1 + K + |BND1| + 2 sum_{k in BND1} n_k``
    (``n_k`` sub-masks); ``granularity="band"``: ``1 + 2K + 2|BND1|`` (cost-aware ``1 + K + 3|BND1|``);
    plus one forward to find the predicted class when ``target`` is ``None`` and AF needs gradients;
    one backward pass per slice with ``relation="gae"``. Records per slice: ``K``, ``pos1, neg1,
    bnd1, pos2, neg2, bnd2, acc3, fallback`` (``None`` with ``s3wm=False``), ``accepted``,
    ``forward_passes``.
    """

    @dataclass
    class Params(MaskScoringParams):
        noise_draws: Literal["per-mask", "shared"] = "shared"  #: one noise draw shared by a slice's masks
        s3wm: bool = True  #: Step 2's sequential three-way decisions (False: every g_k = 1, ViT-CX's map)
        costaware: bool = True  #: level 1 on one forward per mask; full score and level 2 only for BND1
        alpha1: float = 0.7  #: level-1 accept threshold on e_k (Yao, losses 0 / 0.3 / 1)
        beta1: float = 0.3  #: level-1 reject threshold on e_k
        sharpen_a: float = 0.5  #: level-2 core threshold a: M'_k = M_k [M_k >= a]
        alpha2: float = 0.6  #: level-2 accept threshold on e'_k (Yao, deferment loss 0.4)
        beta2: float = 0.4  #: level-2 reject threshold on e'_k
        gamma3: float = 0.5  #: level-3 two-way threshold on (e_k + e'_k) / 2
        k_min: int = 5  #: fewest accepted masks; the fallback adds the best by level-1 e_k
        evaluation: Literal["pc", "best"] = "best"  #: e_k = clip(S_k / Z, 0, 1), Z = p_c(x) or max_j S_j
        sharpen_accepted: bool = False  #: band removal for every accepted mask (M'_k with its level-1 S_k)
        granularity: Literal["band", "split"] = "split"  #: level 2: M'_k (band removed) | sub-masks of BND1
        coarse_delta: float = 0.3  #: "split": level-1 masks cut the clustering tree here; sub-masks at `delta`
        coarse_scale: Literal["scores", "minmax"] = "scores"  #: E_c into AF as scored (>= 0), or min-max stretched
        af: bool = True  #: Step 3's attention fusion (False: the coarse map is the output)
        relation: Literal["gae", "rollout-last", "rollout-all", "legrad"] = "legrad"  #: c2f_med.explain.af; legrad
        l0: int = 1  #: first layer (1-based) of the relation; 1 = all layers
        refine: Literal["gate", "propagate", "mix"] = "gate"  #: c2f_med.explain.af
        importance: Literal["cosine", "contrast", "cls"] = "cls"  #: patch importance of "gate" (explain.af)
        mix_lambda: float = 1.0  #: weight of up(P s) in refine="mix"

    def _explain(self, x: torch.Tensor, target: torch.Tensor | int | None) -> Explanation:
        prm = self.params
        b = x.shape[0]
        grads = prm.af and prm.relation == "gae"
        # Step 0: the one clean pass
        if grads:
            t, find_forward = targets_for(self.model, x, target)
            out = self.model.run(x, tokens=True, attentions=True, target=t)
        else:
            with torch.inference_mode():
                out = self.model.run(x, tokens=True, attentions=prm.af and prm.relation != "legrad")
            t, find_forward = resolve_target(out.logits, target), 0
        p_clean = class_probability(out.logits, t)
        # Step 1 (with granularity "split": coarser level-1 masks and their finer sub-masks)
        children = None
        if prm.s3wm and prm.granularity == "split":
            nested = [nested_token_masks(tok, self.model.grid, self.model.input_size, prm.coarse_delta, prm.delta,
                                         prm.cut) for tok in out.tokens]
            masks, children = [m for m, _ in nested], [c for _, c in nested]
        else:
            masks = slice_masks(self.model, out, prm.delta, prm.cut)
        perturbation = perturbation_of(prm)
        baselines = [perturbation.baselines(xs, len(m)) for xs, m in zip(x, masks)]
        # Step 2
        if prm.s3wm:
            coarse, records = self._s3wm(x, t, p_clean, masks, baselines, children)
        else:
            scores = causal_scores(self.model, x, t, p_clean, mask_requests(masks, baselines), prm.batch_size)
            per_slice = zip(scores.split([len(m) for m in masks]), masks)
            coarse = torch.stack([coverage_map(s, m) for s, m in per_slice])
            records = [_record(len(m), 2 * len(m), None, len(m)) for m in masks]
        if prm.coarse_scale == "minmax" or not prm.af:
            coarse = minmax(coarse)
        else:  # the causal scores' own scale: a map whose masks all score alike is not stretched
            coarse = coarse.clamp(min=0)
        # Step 3
        legrad_backward = 0
        if prm.af:
            if prm.relation == "legrad":  # per-layer class scores (LeGrad): one more pass, L - l0 + 1 partial backwards
                _, _, per_layer = legrad_relations(self.model, x, t, prm.l0)
                r = torch.stack(per_layer).sum(0)  # B x T x T
                row, legrad_backward = r.mean(1)[:, 1:], len(per_layer)  # LeGrad's map: mean over the query rows
            else:
                r = relation_matrix(out.attentions, out.attention_grads, prm.relation, prm.l0)  # B x T x T
                row = r[:, 0, 1:]
            maps = fine_map(
                coarse,
                rows_normalised(r),
                self.model.grid,
                self.model.patch_size,
                prm.refine,
                prm.mix_lambda,
                prm.importance,
                row,
            )
        else:
            maps = coarse
        # per slice: the clean pass (and the class search, and LeGrad's pass)
        step0 = 1 + (1 if find_forward else 0) + (1 if legrad_backward else 0)
        for rec in records:
            rec["forward_passes"] += step0
        forward = sum(rec["forward_passes"] for rec in records)
        backward = b if grads else b * legrad_backward
        return Explanation(saliency=maps.float(), target=t, forward_passes=forward, backward_passes=backward,
                           records=records)

    def _s3wm(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        p_clean: torch.Tensor,
        masks: list[torch.Tensor],
        baselines: list[torch.Tensor],
        children: list[list[torch.Tensor]] | None = None,
    ) -> tuple[torch.Tensor, list[dict]]:
        """Step 2 for the batch: coarse maps ``B x H x W`` and per-slice records (forwards without Step 0).
        ``children[i][k]``: the sub-masks of mask ``k`` of slice ``i`` (granularity "split")."""
        prm = self.params
        counts = [len(m) for m in masks]
        requests = mask_requests(masks, baselines)
        # level 1
        if prm.costaware:
            (p_tilde,) = causal_probabilities(self.model, x, t, requests, prm.batch_size, images=("tilde",))
            scores1 = p_tilde.split(counts)  # S_k = p_c(x~_k) until x^_k is scored
        else:
            scores1 = causal_scores(self.model, x, t, p_clean, requests, prm.batch_size).split(counts)
        z = [normaliser(s, p, prm.evaluation) for s, p in zip(scores1, p_clean)]  # per slice, from level 1
        regions1 = [three_way(evaluation(s, zi), prm.alpha1, prm.beta1) for s, zi in zip(scores1, z)]
        bnd = [torch.nonzero(r == BND).flatten().tolist() for r in regions1]
        if prm.costaware:  # the full causal score of the BND1 masks: S_k = p_c(x~_k) - p_c(x^_k) + p_c(x)
            pairs = [(i, k) for i, ks in enumerate(bnd) for k in ks]
            full = [MaskRequest(i, masks[i][k], baselines[i][k]) for i, k in pairs]
            (p_hat,) = causal_probabilities(self.model, x, t, full, prm.batch_size, images=("hat",))
            scores1 = [s.clone() for s in scores1]
            for (i, k), ph in zip(pairs, p_hat):
                scores1[i][k] += p_clean[i] - ph
        if children is not None:
            return self._split_levels(x, t, p_clean, masks, baselines, children, scores1, z, regions1, bnd)
        # level 2: the sharpened BND1 masks, same perturbation e_k as their level-1 mask
        sharp = [sharpen(m[ks], prm.sharpen_a) for m, ks in zip(masks, bnd)]
        level2 = [MaskRequest(i, sharp[i][j], baselines[i][k]) for i, ks in enumerate(bnd) for j, k in enumerate(ks)]
        scores2 = causal_scores(self.model, x, t, p_clean, level2, prm.batch_size).split([len(ks) for ks in bnd])
        maps, records = [], []
        for i, m in enumerate(masks):
            e1 = evaluation(scores1[i], z[i])
            e2 = torch.full_like(e1, float("nan"))
            e2[bnd[i]] = evaluation(scores2[i], z[i])
            d = decide(e1, e2, prm.alpha1, prm.beta1, prm.alpha2, prm.beta2, prm.gamma3, prm.k_min, region1=regions1[i])
            chosen_masks, chosen_scores = m.clone(), scores1[i].clone()
            for j, k in enumerate(bnd[i]):
                if d.sharpened[k]:
                    chosen_masks[k], chosen_scores[k] = sharp[i][j], scores2[i][j]
            if prm.sharpen_accepted:  # the band of masks accepted as they were goes too (scores kept)
                plain = d.gate & ~d.sharpened
                chosen_masks[plain] = sharpen(m[plain], prm.sharpen_a)
            maps.append(coverage_map(chosen_scores[d.gate], chosen_masks[d.gate], coverage=m.sum(0)))
            forward = (1 if prm.costaware else 2) * counts[i] + (3 if prm.costaware else 2) * len(bnd[i])
            records.append(_record(counts[i], forward, d.counts, int(d.gate.sum())))
        return torch.stack(maps), records

    def _split_levels(self, x, t, p_clean, masks, baselines, children, scores1, z, regions1, bnd):
        """Levels 2-3 with granularity "split": the sub-masks of the BND1 masks, scored with their
        parent's perturbation; accepted parents and sub-masks make the map (coverage of the level-1 masks)."""
        prm = self.params
        owners = [(i, k) for i, ks in enumerate(bnd) for k in ks]
        level2 = [MaskRequest(i, c, baselines[i][k]) for i, k in owners for c in children[i][k]]
        scores2 = causal_scores(self.model, x, t, p_clean, level2, prm.batch_size).split(
            [len(children[i][k]) for i, k in owners]
        )
        child_scores = {owner: s for owner, s in zip(owners, scores2)}
        maps, records = [], []
        for i, m in enumerate(masks):
            e2 = [
                evaluation(child_scores[(i, k)], z[i]) if (i, k) in child_scores else torch.empty(0)
                for k in range(len(m))
            ]
            d = decide_split(
                evaluation(scores1[i], z[i]),
                e2,
                prm.alpha1,
                prm.beta1,
                prm.alpha2,
                prm.beta2,
                prm.gamma3,
                prm.k_min,
                region1=regions1[i],
            )
            chosen_masks, chosen_scores = [m[d.gate]], [scores1[i][d.gate]]
            for k, g in enumerate(d.child_gate):
                if g.any():
                    chosen_masks.append(children[i][k][g])
                    chosen_scores.append(child_scores[(i, k)][g])
            maps.append(coverage_map(torch.cat(chosen_scores), torch.cat(chosen_masks), coverage=m.sum(0)))
            sub = sum(len(children[i][k]) for k in bnd[i])
            forward = (1 if prm.costaware else 2) * len(m) + (1 if prm.costaware else 0) * len(bnd[i]) + 2 * sub
            accepted = int(d.gate.sum()) + sum(int(g.sum()) for g in d.child_gate)
            records.append(_record(len(m), forward, d.counts, accepted))
        return torch.stack(maps), records


def _record(k: int, forward: int, counts: dict[str, int] | None, accepted: int) -> dict:
    """A slice's record; ``forward`` counts the perturbed images only (Step 0 is added by the caller)."""
    levels = ("pos1", "neg1", "bnd1", "pos2", "neg2", "bnd2", "acc3", "fallback")
    return {
        "K": k,
        **{key: (None if counts is None else counts[key]) for key in levels},
        "accepted": accepted,
        "forward_passes": forward,
    }
