"""Step 1 masks: token maps, redundancy merging at token resolution, upsampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from c2f_med.explain.masks import merge_maps, token_maps, token_masks, upsample_masks

GRID = (4, 4)


def _tokens(columns: list[torch.Tensor]) -> torch.Tensor:
    """``N x D`` tokens from ``D`` columns of length ``N``."""
    return torch.stack(columns, dim=1)


def test_token_maps_are_minmax_normalised_and_constant_maps_vanish():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(16, 5, generator=g)
    tokens[:, 3] = 2.5  # a constant channel
    maps = token_maps(tokens, GRID)
    assert maps.shape == (5, 4, 4)
    for d in (0, 1, 2, 4):
        assert maps[d].min() == 0 and torch.isclose(maps[d].max(), torch.tensor(1.0))
        # row-major token order: token i sits at (i // w, i % w)
        i = int(tokens[:, d].argmax())
        assert maps[d][i // 4, i % 4] == maps[d].max()
    assert torch.all(maps[3] == 0)


def test_duplicated_channels_merge():
    g = torch.Generator().manual_seed(1)
    a, b, c = (torch.rand(16, generator=g) for _ in range(3))
    # a positive affine copy min-max normalises to the same map; a constant channel is dropped
    tokens = _tokens([a, 2 * a + 3, b, b, c, 0.5 * c - 1, a, torch.full((16,), 7.0)])
    masks = merge_maps(token_maps(tokens, GRID), delta=0.1)
    assert masks.shape == (3, 4, 4)
    expected = torch.stack([token_maps(_tokens([v]), GRID)[0] for v in (a, b, c)])
    # each merged mask is the min-max of a sum of identical maps = that map; order is fcluster's
    matched = sorted(int(torch.argmin(((expected - m) ** 2).sum((1, 2)))) for m in masks)
    assert matched == [0, 1, 2]
    for m in masks:
        assert torch.allclose(m, expected[torch.argmin(((expected - m) ** 2).sum((1, 2)))], atol=1e-6)


def test_cluster_is_summed_then_minmax_normalised():
    g = torch.Generator().manual_seed(2)
    a = torch.rand(16, generator=g) + 0.5
    a2 = a + 0.02 * torch.rand(16, generator=g)  # near-duplicate: cosine distance << 0.1
    b = torch.zeros(16)
    b[:4] = 1.0  # far from a
    maps = token_maps(_tokens([a, a2, b]), GRID)
    masks = merge_maps(maps, delta=0.1)
    assert masks.shape[0] == 2
    s = maps[0] + maps[1]
    want = (s - s.min()) / (s.max() - s.min())
    assert min(float((m - want).abs().max()) for m in masks) < 1e-6
    assert min(float((m - maps[2]).abs().max()) for m in masks) < 1e-6


def test_k_bounded_and_masks_in_unit_interval():
    g = torch.Generator().manual_seed(3)
    tokens = torch.randn(16, 32, generator=g)
    masks = token_masks(tokens, GRID, (32, 32))
    assert 1 <= masks.shape[0] <= 32
    assert masks.shape[1:] == (32, 32)
    assert masks.min() >= 0 and masks.max() <= 1


def test_threshold_effect():
    g = torch.Generator().manual_seed(4)
    maps = token_maps(torch.randn(16, 24, generator=g), GRID)
    ks = [merge_maps(maps, delta=d).shape[0] for d in (0.0, 0.05, 0.1, 0.3, 0.6, 1.0, 2.0)]
    assert ks == sorted(ks, reverse=True)  # a larger threshold never gives more masks
    assert ks[0] == 24  # distinct maps never merge at distance 0
    assert ks[-1] == 1  # cosine distance of non-negative maps is <= 1: everything merges
    assert ks[2] < ks[0] or ks[3] < ks[0]


def test_all_constant_maps_give_no_mask():
    tokens = torch.ones(16, 6) * torch.arange(6.0)
    assert merge_maps(token_maps(tokens, GRID)).shape == (0, 4, 4)
    assert token_masks(tokens, GRID, (8, 8)).shape == (0, 8, 8)


def test_upsampling_is_bilinear_half_pixel():
    g = torch.Generator().manual_seed(5)
    m = torch.rand(3, 4, 4, generator=g)
    up = upsample_masks(m, (16, 16))
    assert torch.equal(up, F.interpolate(m[:, None], size=(16, 16), mode="bilinear", align_corners=False)[:, 0])
    # align_corners=False: output pixel 0 of a 4x upsampling samples token coordinate -0.375, clamped to 0
    assert torch.isclose(up[0, 0, 0], m[0, 0, 0])


def test_nested_masks_split_coarse_clusters_into_the_finer_ones():
    from c2f_med.explain.masks import nested_token_masks

    tokens = torch.randn(16, 24, generator=torch.Generator().manual_seed(3))
    coarse, children = nested_token_masks(tokens, (4, 4), (8, 8), coarse_delta=0.9, fine_delta=0.3)
    fine = token_masks(tokens, (4, 4), (8, 8), delta=0.3)
    assert len(coarse) == len(children) and len(coarse) < len(fine)
    # every finer cluster lies in exactly one coarse cluster: the children are the fine masks
    # (a coarse cluster holding one fine cluster has no children and is that fine mask itself)
    parts = torch.cat([c if len(c) else p[None] for p, c in zip(coarse, children)])
    assert len(parts) == len(fine)
    matched = [(torch.cdist(part.flatten()[None], fine.flatten(1)).min()) for part in parts]
    assert max(float(d) for d in matched) < 1e-5
    with pytest.raises(ValueError, match="fine_delta"):
        nested_token_masks(tokens, (4, 4), (8, 8), coarse_delta=0.1, fine_delta=0.3)


def test_stable_cut_sits_in_the_widest_gap_near_the_threshold():
    from c2f_med.explain.masks import stable_cut

    heights = np.array([0.05, 0.21, 0.29, 0.31, 0.44, 0.9])
    # window [0.2, 0.45]: edges 0.2 .21 .29 .31 .44 .45 -> widest gap 0.31..0.44
    assert stable_cut(heights, 0.3) == pytest.approx(0.375)
    assert stable_cut(np.array([0.05, 0.9]), 0.3) == 0.3  # no merge near the threshold: unchanged
    # the fixed cut at 0.3 flips when a merge at 0.299 moves to 0.301; the gap cut does not
    for h in (0.299, 0.301):
        assert stable_cut(np.array([0.1, h, 0.6]), 0.3) == pytest.approx((h + 0.45) / 2)


def test_gap_cut_keeps_the_masks_under_a_tiny_change():
    from c2f_med.explain.masks import CUTS
    from c2f_med.explain.tokens import minmax

    g = torch.Generator().manual_seed(0)
    base = torch.rand(4, 6, 6, generator=g)
    maps = torch.cat([base + 0.05 * torch.rand(4, 6, 6, generator=g) for _ in range(6)])  # 4 groups of 6
    maps = minmax(maps)
    nudged = maps + 1e-6 * torch.rand(maps.shape, generator=g)
    a, b = merge_maps(maps, 0.1, "gap"), merge_maps(nudged, 0.1, "gap")
    assert a.shape == b.shape and torch.allclose(a, b, atol=1e-4)
    assert CUTS == ("fixed", "gap")
    with pytest.raises(ValueError, match="cut"):
        merge_maps(maps, 0.1, "middle")
