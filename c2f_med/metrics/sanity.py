"""Model-randomisation sanity check of explanation methods (Adebayo et al., NeurIPS 2018, "Sanity Checks for
Saliency Maps").

An explanation of a trained model should depend on what the model learned. Re-initialise every weight
of the same architecture (seeded) and explain the same slices again: a method whose maps keep their
ranking of pixels explains the input (edges, bright blobs) or the architecture, not the model. Per
method, the score is the Spearman rank correlation between the two maps of a slice, averaged over the
slices; a method is **flagged** when that mean exceeds :data:`FLAG_ABOVE` (0.5: the randomised
model's map still ranks pixels mostly as the trained one's does).

A map that is constant on a slice (e.g. a randomised model whose scores do not depend on the input)
has no ranking: its correlation with a non-constant map counts as 0, with another constant map as 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

from c2f_med.explain.base import create
from c2f_med.models.vit import TokenViT

__all__ = ["FLAG_ABOVE", "REINIT_SEED", "rank_correlation", "randomisation_check", "model_randomisation"]

#: a method is flagged when its mean rank correlation (trained vs re-initialised model) is above this
FLAG_ABOVE = 0.5
#: seed of the re-initialised weights
REINIT_SEED = 2018


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps of the same shape (ties get average ranks)."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"maps of different sizes: {a.size} and {b.size}")
    flat_a, flat_b = np.ptp(a) == 0, np.ptp(b) == 0
    if flat_a or flat_b:
        return 1.0 if flat_a and flat_b else 0.0
    return float(spearmanr(a, b).statistic)


def randomisation_check(
    trained: TokenViT,
    randomised: TokenViT,
    x: torch.Tensor,
    methods: Sequence[str],
    target: int | None,
    params: dict[str, dict[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per method, the rank correlation of its maps for ``trained`` and ``randomised`` on slices ``x``.

    Args:
        trained, randomised: the model and the same architecture with re-initialised weights.
        x: ``B x 1 x H x W`` model-input slices.
        methods: registered explainer names.
        target: class explained (``None``: the trained model's predicted class, used for both models).
        params: per-method parameter overrides.

    Returns:
        ``{method: {"spearman": mean r over the slices, "flagged": r > FLAG_ABOVE, "slices": B}}``.
    """
    params = params or {}
    if target is None:
        with torch.no_grad():
            target = trained(x).argmax(1)
    out = {}
    for method in methods:
        maps = [create(method, model, **params.get(method, {})).explain(x, target).saliency.float().cpu().numpy()
                for model in (trained, randomised)]
        r = float(np.mean([rank_correlation(a, b) for a, b in zip(*maps)]))
        out[method] = {"spearman": round(r, 4), "flagged": bool(r > FLAG_ABOVE), "slices": int(x.shape[0])}
    return out


def model_randomisation(
    bundle: Any,
    items: Sequence[dict[str, Any]],
    methods: Sequence[str],
    params: dict[str, dict[str, Any]] | None = None,
    *,
    max_slices: int = 8,
    axis: int = 2,
    seed: int = REINIT_SEED,
) -> dict[str, dict[str, Any]]:
    """:func:`randomisation_check` of a loaded bundle on the lesion slices of datalist ``items``.

    Up to ``max_slices`` lesion slices are explained for the bundle's class: the cases are read in an
    order that spreads over the list (its evenly spaced items first, the rest after them), each case
    gives up to ``ceil(max_slices / min(len(items), max_slices))`` of its lesion slices, evenly spread,
    and reading stops once ``max_slices`` are collected, so a large cohort is not read a second time.
    The re-initialised model is the bundle's ``network_def`` built under ``torch.manual_seed(seed)``
    without its weights.
    """
    from c2f_med.case import item_options, load_scan
    from c2f_med.models.bundle import load_bundle
    from c2f_med.slices import evenly_spread, normalise_input, slice_context, to_model_grid, volume_slices

    model = bundle.model
    device = next(model.parameters()).device
    if not items or max_slices < 1:
        return {}
    per_case = math.ceil(max_slices / min(len(items), max_slices))
    spread = evenly_spread(len(items), max_slices)
    first = set(spread)
    order = spread + [i for i in range(len(items)) if i not in first]
    slices, count = [], 0
    for i in order:
        if count >= max_slices:
            break
        item = items[i]
        data = load_scan(item["image"], item["label"], bundle.preset, **item_options(item))
        label = torch.movedim(torch.as_tensor(data["label"])[0], axis, 0)
        lesion = [int(k) for k in torch.nonzero(label.flatten(1).any(1)).flatten()]
        if not lesion:
            continue
        take = [lesion[k] for k in evenly_spread(len(lesion), min(per_case, max_slices - count))]
        volume = data["image"].as_tensor()[0]  # on the model's grid, so that cases of other sizes stack
        context = volume_slices(volume, axis, take, slice_context(model)).float()
        slices.append(to_model_grid(context, tuple(model.input_size))[0])
        count += len(take)
    if not slices:
        return {}
    x = normalise_input(torch.cat(slices)).to(device)
    randomised = load_bundle(bundle.root, device, reinit_seed=seed).model
    result = randomisation_check(model, randomised, x, methods, bundle.lesion_class, params)
    for value in result.values():
        value["seed"] = seed
    return result
