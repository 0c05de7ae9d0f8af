"""S3WM's sequential three-way decisions on hand-set scores."""

from __future__ import annotations

import pytest
import torch

from c2f_med.explain.s3wm import BND, NEG, POS, decide, evaluation, normaliser, sharpen, three_way, yao_thresholds

NAN = float("nan")


def _set(mask: torch.Tensor) -> set[int]:
    return set(torch.nonzero(mask).flatten().tolist())


def test_yao_thresholds_spec_losses():
    alpha, beta = yao_thresholds(0.0, 0.3, 1.0, 1.0, 0.3, 0.0)
    assert alpha == pytest.approx(0.7) and beta == pytest.approx(0.3)
    alpha, beta = yao_thresholds(0.0, 0.4, 1.0, 1.0, 0.4, 0.0)  # level 2
    assert alpha == pytest.approx(0.6) and beta == pytest.approx(0.4)
    alpha, beta = yao_thresholds(0.0, 0.5, 1.0, 1.0, 0.5, 0.0)  # level 3: two-way
    assert alpha == pytest.approx(0.5) and beta == pytest.approx(0.5)


def test_yao_thresholds_asymmetric_losses():
    # accept-when-wrong costs 2, defer costs 0.2 / 0.5, reject-when-right costs 1
    alpha, beta = yao_thresholds(0.0, 0.2, 1.0, 2.0, 0.5, 0.0)
    assert alpha == pytest.approx(1.5 / 1.7)
    assert beta == pytest.approx(0.5 / 1.3)


def test_yao_thresholds_rejects_inconsistent_losses():
    with pytest.raises(ValueError):
        yao_thresholds(0.0, 1.2, 1.0, 1.0, 0.3, 0.0)  # deferring dearer than rejecting
    with pytest.raises(ValueError):
        yao_thresholds(0.0, 0.6, 1.0, 1.0, 0.6, 0.0)  # alpha 0.4 < beta 0.6


def test_evaluation_clips_ratio():
    e = evaluation(torch.tensor([-0.1, 0.2, 0.5, 0.9]), 0.5)
    assert torch.allclose(e, torch.tensor([0.0, 0.4, 1.0, 1.0]))
    assert torch.all(evaluation(torch.tensor([0.3, 0.1]), 0.0) == 0)


def test_normaliser_pc_or_best_score():
    scores = torch.tensor([0.1, 0.4, 0.2])
    assert float(normaliser(scores, 0.9, "pc")) == pytest.approx(0.9)
    assert float(normaliser(scores, 0.9, "best")) == pytest.approx(0.4)
    assert torch.allclose(evaluation(scores, normaliser(scores, 0.9, "best")), torch.tensor([0.25, 1.0, 0.5]))
    assert float(normaliser(torch.tensor([-0.2, -0.1]), 0.9, "best")) == 0.0  # no supporting mask: e = 0
    with pytest.raises(ValueError, match="unknown evaluation reference"):
        normaliser(scores, 0.9, "mean")


def test_three_way_regions_and_boundaries():
    r = three_way(torch.tensor([0.7, 0.69, 0.31, 0.3, 0.0, 1.0]), 0.7, 0.3)
    assert r.tolist() == [POS, BND, BND, NEG, NEG, POS]


def test_sharpen_keeps_core_only():
    m = torch.tensor([[0.2, 0.5], [0.49, 0.9]])
    assert torch.equal(sharpen(m, 0.5), torch.tensor([[0.0, 0.5], [0.0, 0.9]]))


def test_decide_three_levels():
    e1 = torch.tensor([0.9, 0.7, 0.1, 0.3, 0.5, 0.5, 0.5, 0.5, 0.65])
    # e2 is read only on BND1 = {4..8}; NaN elsewhere must not matter
    e2 = torch.tensor([NAN, NAN, NAN, NAN, 0.8, 0.2, 0.5, 0.45, 0.6])
    d = decide(e1, e2)  # defaults (0.7, 0.3), (0.6, 0.4), 0.5, k_min 5
    assert d.counts == {"pos1": 2, "neg1": 2, "bnd1": 5, "pos2": 2, "neg2": 1, "bnd2": 2, "acc3": 1, "fallback": 0}
    assert _set(d.gate) == {0, 1, 4, 6, 8}  # POS1 {0,1}, POS2 {4,8}, level 3: (0.5+0.5)/2 >= 0.5 for 6 only
    assert _set(d.sharpened) == {4, 6, 8}
    assert d.level.tolist() == [1, 1, 0, 0, 2, 0, 3, 0, 2]


def test_level3_rule_is_the_mean_of_both_evaluations():
    # both in BND1 and BND2; the mean decides
    e1 = torch.tensor([0.62, 0.38])
    e2 = torch.tensor([0.41, 0.59])
    d = decide(e1, e2, k_min=0)
    assert d.counts["bnd2"] == 2
    assert d.gate.tolist() == [True, False]  # (0.62+0.41)/2 = 0.515, (0.38+0.59)/2 = 0.485
    d = decide(e1, e2, gamma3=0.52, k_min=0)
    assert d.gate.tolist() == [False, False]


def test_fallback_tops_up_with_best_level1_masks():
    e1 = torch.tensor([0.9, 0.1, 0.2, 0.25, 0.05, 0.15, 0.28])
    d = decide(e1, torch.full_like(e1, NAN))
    assert d.counts["pos1"] == 1 and d.counts["neg1"] == 6
    assert _set(d.gate) == {0, 6, 3, 2, 5}  # 0 accepted, then 0.28, 0.25, 0.2, 0.15
    assert d.counts["fallback"] == 4
    assert _set(d.level == 4) == {2, 3, 5, 6}
    assert not d.sharpened.any()  # fallback masks use their level-1 mask and score


def test_fallback_keeps_earlier_acceptances_and_breaks_ties_by_index():
    e1 = torch.tensor([0.5, 0.2, 0.2, 0.2, 0.1])
    e2 = torch.tensor([0.9, NAN, NAN, NAN, NAN])
    d = decide(e1, e2, k_min=3)
    assert d.level.tolist() == [2, 4, 4, 0, 0]  # mask 0 by level 2, ties 1, 2, 3 resolved by index
    assert d.sharpened.tolist() == [True, False, False, False, False]


def test_fewer_masks_than_k_min_accepts_all():
    d = decide(torch.tensor([0.0, 0.1]), torch.tensor([NAN, NAN]))
    assert d.gate.all() and d.counts["fallback"] == 2


def test_region1_override_for_costaware():
    # level 1 was decided on a cheap evaluation: mask 0 BND1 though its full e1 is 0.95
    e1 = torch.tensor([0.95, 0.8])
    e2 = torch.tensor([0.3, NAN])
    d = decide(e1, e2, k_min=0, region1=torch.tensor([BND, POS]))
    assert d.counts["bnd1"] == 1 and d.counts["neg2"] == 1
    assert d.gate.tolist() == [False, True]
    assert d.counts["pos1"] == 1
