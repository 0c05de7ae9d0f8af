"""RISE (Petsiuk, Das & Saenko, BMVC 2018, "RISE: Randomized Input Sampling for Explanation of
Black-box Models") with C2F's budget: the perturbation control that spends as many forward passes as
C2F does on the same slice, so that a better map can be told from more compute."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from c2f_med.explain.base import Explainer, Explanation, create, register
from c2f_med.explain.perturb import class_probability
from c2f_med.explain.tokens import minmax, targets_for

__all__ = ["RISE", "rise_masks"]


def rise_masks(n: int, size: tuple[int, int], cells: int, p_keep: float, seed: int) -> torch.Tensor:
    """RISE's ``n`` smooth random masks ``n x H x W`` in [0, 1].

    A ``cells x cells`` grid of Bernoulli(``p_keep``) cells is upsampled bilinearly to
    ``(cells + 1) * c`` pixels per side (``c = ceil(H / cells)``, one cell more than needed) and
    cropped at a random offset in ``[0, c)`` per axis. Mask ``i`` depends on ``seed`` and ``i`` only,
    so a larger ``n`` extends a smaller one.
    """
    h, w = size
    c = math.ceil(max(h, w) / cells)
    gen = torch.Generator().manual_seed(int(seed))
    out = torch.empty(n, h, w)
    for i in range(n):
        grid = (torch.rand(1, 1, cells, cells, generator=gen) < p_keep).float()
        up = F.interpolate(grid, size=((cells + 1) * c,) * 2, mode="bilinear", align_corners=False)[0, 0]
        dy, dx = torch.randint(0, c, (2,), generator=gen).tolist()
        out[i] = up[dy : dy + h, dx : dx + w]
    return out.clamp_(0.0, 1.0)  # bilinear weights can overshoot by rounding


@register("rise")
class RISE(Explainer):
    """RISE: ``E(u) = sum_i p_c(x * M_i + f (1 - M_i)) M_i(u) / (N p_keep)``, min-max normalised.

    The budget: with ``n_masks = 0`` (default) every slice gets as many forward passes as
    ``budget_method`` (``c2f`` with its defaults) spends on it, read from that method's per-slice
    record (which counts its class search too; RISE's own class search, when ``target`` is ``None``,
    comes out of the same budget). Matching runs that method first, so RISE's time includes it; its
    forward passes are not counted in RISE's. Masks are seeded (:func:`rise_masks`); the same for
    every slice. Records per slice: ``masks``, ``budget`` (the matched forward count, or ``None``).
    """

    @dataclass
    class Params:
        n_masks: int = 0  #: masks per slice; 0 = as many forward passes as budget_method spends on the slice
        budget_method: str = "c2f"  #: the registered method whose per-slice forward count is matched
        cells: int = 7  #: grid cells per side of the random masks (RISE's s)
        p_keep: float = 0.5  #: probability that a cell is kept
        fill: float = 0.0  #: value of the removed pixels, in the model's normalised input space
        seed: int = 0  #: mask seed
        batch_size: int = 64  #: masked images per forward pass

    def _explain(self, x: torch.Tensor, target: torch.Tensor | int | None) -> Explanation:
        prm = self.params
        b = x.shape[0]
        t, forward = targets_for(self.model, x, target)
        if prm.n_masks > 0:
            budgets, counts = [None] * b, [prm.n_masks] * b
        else:
            matched = create(prm.budget_method, self.model).explain(x, target)
            budgets = [int(r["forward_passes"]) for r in matched.records]
            counts = [max(n - (1 if target is None else 0), 1) for n in budgets]
        masks = rise_masks(max(counts), tuple(x.shape[-2:]), prm.cells, prm.p_keep, prm.seed).to(x)
        maps = []
        with torch.inference_mode():
            for i in range(b):
                m = masks[: counts[i]].unsqueeze(1)  # n x 1 x H x W
                probs = torch.cat([
                    class_probability(self.model(x[i] * chunk + prm.fill * (1 - chunk)), t[i].expand(len(chunk)))
                    for chunk in m.split(prm.batch_size)
                ])
                maps.append((probs.view(-1, 1, 1).to(m) * m[:, 0]).sum(0) / (counts[i] * prm.p_keep))
        records = [{"masks": n, "budget": budget} for n, budget in zip(counts, budgets)]
        return Explanation(saliency=minmax(torch.stack(maps).float()), target=t, forward_passes=forward + sum(counts),
                           backward_passes=0, records=records)
