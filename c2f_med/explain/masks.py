"""Step 1 of ViT-CX / C2F: perturbation masks from the last layer's patch-token features.

For one slice, the last block's patch tokens ``F`` (``N x D``, ``N = h * w``) are read as ``D``
feature maps on the ``h x w`` token grid (:func:`token_maps`, each min-max normalised). Redundant
maps are merged by agglomerative clustering at token resolution (:func:`merge_maps`: cosine distance,
complete linkage, distance threshold ``delta``; each cluster's maps summed and min-max normalised),
giving ``K <= D`` masks; these are upsampled bilinearly to the input grid (:func:`upsample_masks`).

Clustering runs at TOKEN resolution (``h * w`` values per map), not at pixel resolution as in the
ViT-CX code: bilinear upsampling is linear, so the two agree up to the boundary weighting of the
interpolation, and token resolution is ``p**2`` times cheaper.

Constant maps: a feature channel that is constant over the tokens min-max normalises to all zeros.
It carries no location and its cosine distance is undefined, so all-zero maps are dropped before
clustering (and a merged mask that is constant is dropped too). ``K`` counts the masks that remain;
a slice whose every map is constant has ``K = 0``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.cluster.hierarchy import fcluster, linkage

from c2f_med.explain.tokens import minmax

__all__ = ["token_maps", "merge_maps", "upsample_masks", "token_masks", "nested_token_masks", "stable_cut",
           "DEFAULT_DELTA", "CUTS"]

#: distance threshold of the agglomerative clustering (cosine distance, complete linkage), as ViT-CX
DEFAULT_DELTA = 0.1
#: where the tree is cut: at the threshold ("fixed") or in the widest merge gap near it ("gap", stable_cut)
CUTS = ("fixed", "gap")
#: the window of stable_cut: [delta / CUT_SPREAD, delta * CUT_SPREAD]
CUT_SPREAD = 1.5


def token_maps(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``F^T`` as ``D`` min-max normalised maps: tokens ``N x D`` -> ``D x h x w`` in [0, 1]."""
    maps = tokens.t().reshape(tokens.shape[1], *grid)  # D x h x w (tokens are row-major on the grid)
    return minmax(maps)


def stable_cut(heights: np.ndarray, delta: float, spread: float = CUT_SPREAD) -> float:
    """The cut of a dendrogram near ``delta`` that tiny input changes do not move across a merge.

    ``heights``: the tree's merge heights. In the window ``[delta / spread, delta * spread]`` the cut
    is the middle of the widest gap between consecutive merge heights (the window's ends count as
    heights), so the nearest merge is as far as it can be; without a merge in the window, ``delta``.
    """
    lo, hi = delta / spread, delta * spread
    inside = np.sort(heights[(heights > lo) & (heights < hi)])
    if inside.size == 0:
        return delta
    edges = np.concatenate([[lo], inside, [hi]])
    k = int(np.argmax(np.diff(edges)))
    return float((edges[k] + edges[k + 1]) / 2)


def _cluster_labels(kept: torch.Tensor, deltas: tuple[float, ...], cut: str = "fixed") -> list[np.ndarray]:
    """``fcluster`` labels of ``D' x N`` maps (cosine distance, complete linkage) at each threshold of
    ``deltas`` (``cut="gap"``: moved to :func:`stable_cut`); one tree, so clusters at a smaller
    threshold nest inside those at a larger one."""
    if cut not in CUTS:
        raise ValueError(f"unknown cut {cut!r}; choose from {CUTS}")
    if kept.shape[0] == 1:
        return [np.ones(1, dtype=int) for _ in deltas]
    tree = linkage(kept.detach().cpu().double().numpy(), method="complete", metric="cosine")
    if cut == "gap":
        deltas = tuple(stable_cut(tree[:, 2], d) for d in deltas)
    return [fcluster(tree, t=d, criterion="distance") for d in deltas]


def _merge(kept: torch.Tensor, labels: np.ndarray) -> torch.Tensor:
    """Each cluster's maps summed and min-max normalised, constant results dropped: ``K x N``."""
    label_t = torch.as_tensor(labels, device=kept.device)
    merged = minmax(torch.stack([kept[label_t == c].sum(0) for c in np.unique(labels)]))
    return merged[merged.amax(1) > 0]


def merge_maps(maps: torch.Tensor, delta: float = DEFAULT_DELTA, cut: str = "fixed") -> torch.Tensor:
    """Merge redundant maps ``D x h x w`` -> ``K x h x w`` masks in [0, 1] (``K <= D``).

    All-zero maps are dropped; the rest are clustered (scipy ``linkage``, cosine distance, complete
    linkage; ``fcluster`` at distance ``delta``). Each cluster's maps are summed and min-max
    normalised. Masks come in the order of ``fcluster``'s labels, a function of the maps alone.
    """
    flat = maps.reshape(maps.shape[0], -1)
    kept = flat[flat.amax(1) > 0]  # D' x N, constant maps removed
    if kept.shape[0] == 0:
        return maps.new_zeros((0, *maps.shape[1:]))
    (labels,) = _cluster_labels(kept, (delta,), cut)
    merged = _merge(kept, labels)
    return merged.reshape(merged.shape[0], *maps.shape[1:])


def upsample_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling (``align_corners=False``) of ``K x h x w`` masks to ``K x H x W``."""
    if masks.shape[0] == 0:
        return masks.new_zeros((0, *size))
    return F.interpolate(masks.unsqueeze(1), size=size, mode="bilinear", align_corners=False)[:, 0]


def nested_token_masks(
    tokens: torch.Tensor,
    grid: tuple[int, int],
    size: tuple[int, int],
    coarse_delta: float,
    fine_delta: float = DEFAULT_DELTA,
    cut: str = "fixed",
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Masks at two granularities of one clustering tree, for S3WM's ``granularity="split"``.

    The maps are clustered once (as :func:`merge_maps`); cutting the tree at ``coarse_delta`` gives the
    level-1 masks ``K1 x H x W``, cutting it at ``fine_delta < coarse_delta`` splits each coarse
    cluster into the finer clusters it contains. Returns ``(coarse, children)`` where
    ``children[k]`` (``n_k x H x W``) are the finer masks inside coarse mask ``k``; a coarse cluster
    that holds a single finer cluster has no children (``n_k = 0``): splitting it changes nothing.
    """
    if not fine_delta < coarse_delta:
        raise ValueError(f"need fine_delta < coarse_delta, got {fine_delta} and {coarse_delta}")
    tokens = tokens.to(torch.promote_types(tokens.dtype, torch.float32))
    maps = token_maps(tokens, grid)
    flat = maps.reshape(maps.shape[0], -1)
    kept = flat[flat.amax(1) > 0]
    if kept.shape[0] == 0:
        return maps.new_zeros((0, *size)), []
    coarse_labels, fine_labels = _cluster_labels(kept, (coarse_delta, fine_delta), cut)
    coarse, children = [], []
    for c in np.unique(coarse_labels):
        inside = coarse_labels == c
        parent = _merge(kept[inside], np.ones(int(inside.sum()), dtype=int))
        if parent.shape[0] == 0:  # constant after merging: dropped, as in merge_maps
            continue
        sub = _merge(kept[inside], fine_labels[inside]) if len(np.unique(fine_labels[inside])) > 1 else parent[:0]
        coarse.append(parent[0])
        children.append(upsample_masks(sub.reshape(-1, *grid), size))
    return upsample_masks(torch.stack(coarse).reshape(-1, *grid), size), children


def token_masks(
    tokens: torch.Tensor, grid: tuple[int, int], size: tuple[int, int], delta: float = DEFAULT_DELTA,
    cut: str = "fixed",
) -> torch.Tensor:
    """Step 1 for one slice: tokens ``N x D`` -> masks ``K x H x W`` in [0, 1]; ``K`` = ``len(result)``."""
    tokens = tokens.to(torch.promote_types(tokens.dtype, torch.float32))
    return upsample_masks(merge_maps(token_maps(tokens, grid), delta, cut), size)
