"""Localisation scores: known answers, conventions, and agreement with Quantus and scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.morphology import ball, dilation, disk

from c2f_med.metrics.localisation import (
    IoUAccumulator,
    average_precision,
    dice,
    dice_topk,
    iou,
    iou_topk,
    localisation_scores,
    miou_from_counts,
    pixel_auroc,
    pointing_game,
    relevance_mass,
    saliency_order,
    threshold_mean,
    topk_binarise,
)

SCORE_FNS = [pointing_game, relevance_mass, iou_topk, dice_topk, pixel_auroc, average_precision]
SHAPES = [(24, 20), (10, 9, 8)]  # a slice H x W and a volume X x Y x Z


def random_case(shape, rng, box=None, ties=False):
    """Saliency >= 0 and a box-shaped lesion mask (``box`` = its size; random position)."""
    s = rng.random(shape)
    if ties:
        s = np.round(s * 4) / 4  # few distinct values: many ties
    box = box or tuple(int(rng.integers(2, n // 2)) for n in shape)
    start = [int(rng.integers(0, n - b + 1)) for n, b in zip(shape, box)]
    m = np.zeros(shape, dtype=bool)
    m[tuple(slice(a, a + b) for a, b in zip(start, box))] = True
    return s, m


def batch(shape, rng, n=6, box=None, ties=False):
    """``n`` cases as Quantus batches ``n x 1 x *shape``."""
    cases = [random_case(shape, rng, box=box, ties=ties) for _ in range(n)]
    return np.stack([c[0] for c in cases])[:, None], np.stack([c[1] for c in cases])[:, None]


# ----------------------------------------------------------------------------- known answers


def test_pointing_game_hit_miss_and_tolerance():
    m = np.zeros((9, 9), dtype=bool)
    m[2, 2] = True
    s = np.zeros((9, 9))
    s[2, 4] = 1.0  # 2 pixels right of the lesion
    assert pointing_game(s, m) == 0.0
    assert pointing_game(s, m, tolerance=1) == 0.0
    assert pointing_game(s, m, tolerance=2) == 1.0
    s = np.zeros((9, 9))
    s[3, 3] = 1.0  # diagonal neighbour: distance sqrt(2)
    assert pointing_game(s, m, tolerance=1) == 0.0
    assert pointing_game(s, m, tolerance=1.5) == 1.0
    s = np.zeros((9, 9))
    s[2, 2] = 5.0
    assert pointing_game(s, m) == 1.0


@pytest.mark.parametrize("radius", [1, 2, 3])
def test_tolerance_is_a_disk_or_ball_dilation(radius):
    """A hit with tolerance r <=> the maximum lies in the mask dilated by skimage's disk/ball(r)."""
    rng = np.random.default_rng(radius)
    for shape, footprint in [((16, 16), disk(radius)), ((9, 9, 9), ball(radius))]:
        _, m = random_case(shape, rng, box=(2,) * len(shape))
        dilated = dilation(m, footprint)
        for flat in range(m.size):
            s = np.zeros(shape)
            s.flat[flat] = 1.0
            assert pointing_game(s, m, tolerance=radius) == float(dilated.flat[flat])


def test_pointing_game_ties():
    m = np.zeros((4, 4), dtype=bool)
    m[3, 3] = True
    s = np.zeros((4, 4))
    s[0, 0] = s[3, 3] = 1.0  # two maxima; the first (raster order) is outside the lesion
    assert pointing_game(s, m) == 1.0
    assert pointing_game(s, m, ties="first") == 0.0
    assert pointing_game(np.ones((4, 4)), m) == 1.0  # constant map: every voxel is a maximum
    with pytest.raises(ValueError, match="ties"):
        pointing_game(s, m, ties="all")


def test_relevance_mass_known_values():
    m = np.zeros((4, 4), dtype=bool)
    m[:2, :2] = True
    assert relevance_mass(np.ones((4, 4)), m) == pytest.approx(0.25)
    s = np.zeros((4, 4))
    s[0, 0], s[3, 3] = 1.0, 3.0
    assert relevance_mass(s, m) == pytest.approx(0.25)
    assert relevance_mass(s * 7.5, m) == pytest.approx(0.25)  # scale-free
    assert relevance_mass(np.zeros((4, 4)), m) == pytest.approx(m.mean())  # all-zero map: chance
    v = np.zeros((4, 4, 4))
    v[0, 0, 0], v[1, 1, 1], v[3, 3, 3], v[2, 3, 0] = 1, 1, 1, 1
    vm = np.zeros((4, 4, 4), dtype=bool)
    vm[:2, :2, :2] = True
    assert relevance_mass(v, vm) == pytest.approx(0.5)


def test_iou_dice_of_squares():
    p = np.zeros((8, 8), dtype=bool)
    m = np.zeros((8, 8), dtype=bool)
    p[0:4, 0:4] = True
    m[2:6, 2:6] = True  # overlap 2 x 2 = 4, union 16 + 16 - 4 = 28
    assert iou(p, m) == pytest.approx(4 / 28)
    assert dice(p, m) == pytest.approx(8 / 32)
    assert iou(m, m) == dice(m, m) == 1.0
    assert iou(~m, m) == dice(~m, m) == 0.0
    assert iou(p.astype(np.uint8), m.astype(float)) == pytest.approx(4 / 28)  # 0/1 arrays


def test_threshold_mean():
    s = np.array([[0.0, 1.0], [2.0, 5.0]])  # mean 2
    np.testing.assert_array_equal(threshold_mean(s), [[False, False], [False, True]])
    assert not threshold_mean(np.full((3, 3), 0.7)).any()


def test_topk_binarise_count_and_tie_break():
    rng = np.random.default_rng(0)
    s = rng.random((7, 5))
    for k in (0, 1, 13, 35):
        top = topk_binarise(s, k)
        assert top.shape == s.shape and top.sum() == k
        if 0 < k < s.size:
            assert s[top].min() > s[~top].max()
    flat = np.array([[1.0, 2.0, 2.0], [2.0, 0.0, 2.0]])  # four tied maxima: the first two in raster order
    np.testing.assert_array_equal(topk_binarise(flat, 2), [[False, True, True], [False, False, False]])
    np.testing.assert_array_equal(saliency_order(flat), [1, 2, 3, 5, 0, 4])
    with pytest.raises(ValueError, match="k must be"):
        topk_binarise(s, 36)


def test_iou_topk_known_value():
    m = np.zeros((6, 6), dtype=bool)
    m[0, :4] = True  # k = 4
    s = np.zeros((6, 6))
    s[0, :2] = 3.0
    s[5, :2] = 2.0  # top-4 = two lesion + two background pixels
    assert iou_topk(s, m) == pytest.approx(2 / 6)
    assert dice_topk(s, m) == pytest.approx(0.5)


@pytest.mark.parametrize("shape", SHAPES)
def test_rank_scores_invariant_to_monotone_rescaling(shape):
    rng = np.random.default_rng(1)
    s, m = random_case(shape, rng)
    for g in (lambda x: x**3, lambda x: 10 * np.log1p(x) + 2, lambda x: np.exp(5 * x)):
        for fn in (iou_topk, dice_topk, pixel_auroc, average_precision):
            assert fn(g(s), m) == pytest.approx(fn(s, m), abs=1e-12)
    assert iou(threshold_mean(s**8), m) != pytest.approx(iou(threshold_mean(s), m))  # not rank-based


def test_constant_map_chance_levels():
    m = np.zeros((10, 10), dtype=bool)
    m[2:5, 3:7] = True  # 12 % of the image
    c = np.full((10, 10), 0.3)
    assert pixel_auroc(c, m) == pytest.approx(0.5)
    assert average_precision(c, m) == pytest.approx(0.12)
    assert relevance_mass(c, m) == pytest.approx(0.12)


def test_auroc_ap_degenerate_masks():
    s = np.random.default_rng(2).random((5, 5))
    full = np.ones((5, 5), dtype=bool)
    assert np.isnan(pixel_auroc(s, full))  # no background: undefined
    assert average_precision(s, full) == pytest.approx(1.0)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_auroc_ap_match_sklearn(shape, ties):
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    for _ in range(5):
        s, m = random_case(shape, rng, ties=ties)
        assert pixel_auroc(s, m) == pytest.approx(metrics.roc_auc_score(m.ravel(), s.ravel()), abs=1e-12)
        assert average_precision(s, m) == pytest.approx(
            metrics.average_precision_score(m.ravel(), s.ravel()), abs=1e-12
        )


# ----------------------------------------------------------------------------- conventions


def test_empty_mask_is_not_applicable():
    s = np.random.default_rng(4).random((6, 6))
    empty = np.zeros((6, 6), dtype=bool)
    for fn in SCORE_FNS:
        assert np.isnan(fn(s, empty)), fn.__name__
    assert np.isnan(pointing_game(s, empty, tolerance=3))
    assert np.isnan(iou(s > 0.5, empty)) and np.isnan(dice(s > 0.5, empty))
    scores = localisation_scores(s, empty, tolerance=2)
    assert all(np.isnan(v) for v in scores.values())


def test_shape_mismatch_names_both_shapes():
    s, m = np.ones((4, 5)), np.ones((5, 4), dtype=bool)
    for fn in [*SCORE_FNS, iou, dice, localisation_scores]:
        with pytest.raises(ValueError, match=r"\(4, 5\).*\(5, 4\)"):
            fn(s, m)
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(5, 4\)"):
        IoUAccumulator().update(s > 0, m)


def test_invalid_saliency_rejected():
    m = np.ones((3, 3), dtype=bool)
    with pytest.raises(ValueError, match=">= 0"):
        relevance_mass(np.full((3, 3), -1.0), m)
    with pytest.raises(ValueError, match="NaN"):
        pixel_auroc(np.full((3, 3), np.nan), m)
    with pytest.raises(ValueError, match="tolerance"):
        pointing_game(np.ones((3, 3)), m, tolerance=-1)


def test_label_map_mask_read_as_nonzero():
    s = np.random.default_rng(5).random((6, 6))
    labels = np.zeros((6, 6), dtype=np.int16)
    labels[1:3, 1:4] = 2
    assert localisation_scores(s, labels) == localisation_scores(s, labels > 0)


@pytest.mark.parametrize("shape", SHAPES)
def test_localisation_scores_bundle(shape):
    rng = np.random.default_rng(6)
    s, m = random_case(shape, rng)
    scores = localisation_scores(s, m, tolerance=2)
    pred = threshold_mean(s)
    assert scores == {
        "pointing_game": pointing_game(s, m),
        "pointing_game_tol": pointing_game(s, m, tolerance=2),
        "relevance_mass": relevance_mass(s, m),
        "iou": iou(pred, m),
        "dice": dice(pred, m),
        "iou_topk": iou_topk(s, m),
        "dice_topk": dice_topk(s, m),
        "auroc": pixel_auroc(s, m),
        "ap": average_precision(s, m),
    }
    assert all(isinstance(v, float) for v in scores.values())


# ----------------------------------------------------------------------------- dataset mIoU


def test_iou_accumulator_matches_pooled_counts():
    rng = np.random.default_rng(7)
    preds, masks = [], []
    for _ in range(5):
        s, m = random_case((12, 10), rng)
        preds.append(threshold_mean(s))
        masks.append(m)
    acc = IoUAccumulator()
    for p, m in zip(preds, masks):
        acc.update(p, m)
    acc.update(preds[0], np.zeros((12, 10)))  # empty mask: skipped
    assert acc.count == 5
    p, m = np.stack(preds), np.stack(masks)
    expected = [((~p) & (~m)).sum() / ((~p) | (~m)).sum(), (p & m).sum() / (p | m).sum()]
    np.testing.assert_allclose(acc.class_iou(), expected)
    assert acc.aggregate() == pytest.approx(np.mean(expected))

    first, second = IoUAccumulator(), IoUAccumulator()
    for i, (p_i, m_i) in enumerate(zip(preds, masks)):
        (first if i < 2 else second).update(p_i, m_i)
    first.merge(second)
    assert first.count == 5 and first.aggregate() == pytest.approx(acc.aggregate())

    acc.reset()
    assert acc.count == 0 and np.isnan(acc.aggregate())


def test_iou_accumulator_known_value():
    p = np.zeros((4, 4), dtype=bool)
    m = np.zeros((4, 4), dtype=bool)
    p[:2, :2] = True  # 4 pixels
    m[:2, :] = True  # 8 pixels: lesion IoU 4/8, background IoU 8/12
    acc = IoUAccumulator()
    acc.update(p, m)
    assert acc.aggregate() == pytest.approx((4 / 8 + 8 / 12) / 2)


def test_miou_from_counts_sums_items_before_dividing():
    counts = np.array([[8, 12, 4, 8], [2, 4, 0, 0]])  # (I_bg, U_bg, I_les, U_les) of two items
    assert miou_from_counts(counts) == pytest.approx((10 / 16 + 4 / 8) / 2)  # not the mean of item mIoUs
    batched = miou_from_counts(np.stack([counts, counts[:1].repeat(2, 0)]))  # leading axes: several item sets
    np.testing.assert_allclose(batched, [(10 / 16 + 4 / 8) / 2, (16 / 24 + 8 / 16) / 2])
    assert miou_from_counts([[0, 0, 3, 4]]) == pytest.approx(3 / 4)  # empty background union: lesion alone
    assert np.isnan(miou_from_counts(np.zeros((1, 4))))


# ----------------------------------------------------------------------------- Quantus


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_pointing_game_matches_quantus(quantus_score, shape, ties):
    a, s = batch(shape, np.random.default_rng(10), n=8, ties=ties)
    # make half of the cases hits: a lesion voxel gets the maximum (tied with others when ties)
    for i in range(0, 8, 2):
        first_lesion_voxel = np.flatnonzero(s[i])[0]
        a[i].flat[first_lesion_voxel] = a[i].max() + (0.0 if ties else 1.0)
    ours = [pointing_game(a_i[0], s_i[0]) for a_i, s_i in zip(a, s)]
    np.testing.assert_array_equal(ours, quantus_score("PointingGame", a, s))


@pytest.mark.parametrize("shape", SHAPES)
def test_relevance_mass_matches_quantus(quantus_score, shape):
    a, s = batch(shape, np.random.default_rng(11), n=8)
    ours = [relevance_mass(a_i[0], s_i[0]) for a_i, s_i in zip(a, s)]
    np.testing.assert_allclose(ours, quantus_score("RelevanceMassAccuracy", a, s), rtol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_dice_topk_matches_quantus_topk_intersection(quantus_score, shape):
    box = tuple(n // 3 for n in shape)  # same lesion area in every case: Quantus takes one k
    a, s = batch(shape, np.random.default_rng(12), n=8, box=box)
    ours = [dice_topk(a_i[0], s_i[0]) for a_i, s_i in zip(a, s)]
    k = int(np.prod(box))
    np.testing.assert_allclose(ours, quantus_score("TopKIntersection", a, s, k=k), rtol=1e-12)
    # and iou_topk is the same overlap seen as IoU: |I| / (2k - |I|)
    inter = np.array(ours) * k
    np.testing.assert_allclose([iou_topk(a_i[0], s_i[0]) for a_i, s_i in zip(a, s)], inter / (2 * k - inter))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_auroc_matches_quantus_auc(quantus_score, shape, ties):
    a, s = batch(shape, np.random.default_rng(13), n=8, ties=ties)
    ours = [pixel_auroc(a_i[0], s_i[0]) for a_i, s_i in zip(a, s)]
    np.testing.assert_allclose(ours, quantus_score("AUC", a, s), rtol=1e-12)


def test_foreground_mask_fills_the_body_and_drops_specks():
    from c2f_med.metrics.localisation import foreground_mask

    image = np.zeros((40, 40))
    yy, xx = np.mgrid[:40, :40]
    ring = (np.hypot(yy - 20, xx - 20) <= 15) & (np.hypot(yy - 20, xx - 20) >= 12)  # a skull
    image[ring] = 1.0
    image[16:24, 16:24] = 0.3  # brain inside, with dark gaps between it and the skull
    image[2, 2] = 0.5  # a speck outside the body
    body = foreground_mask(image)
    assert body[20, 20] and body[12, 20] and not body[2, 2] and not body[0, 0]
    assert body.sum() == np.count_nonzero(np.hypot(yy - 20, xx - 20) <= 15)
    assert not foreground_mask(np.zeros((5, 5))).any()


def test_saliency_mass_inside_and_outside_the_body():
    from c2f_med.metrics.localisation import FP_KEYS, saliency_mass

    body = np.zeros((10, 10), bool)
    body[:, :5] = True  # left half
    inside = np.zeros((10, 10))
    inside[2, 2] = 1.0
    scores = saliency_mass(inside, body)
    assert list(scores) == list(FP_KEYS)
    assert scores["mass_foreground"] == 1.0 and scores["peak_foreground"] == 1.0
    assert scores["foreground_fraction"] == 0.5
    outside = np.zeros((10, 10))
    outside[:, 5:] = 1.0
    outside[0, 0] = 0.5
    scores = saliency_mass(outside, body, top=0.1)  # the 10 most salient pixels: all on the right
    assert scores["mass_foreground"] == pytest.approx(0.5 / 50.5)
    assert scores["topk_foreground"] == 0.0 and scores["peak_foreground"] == 0.0
    assert saliency_mass(np.zeros((10, 10)), body)["mass_foreground"] == 0.5  # a flat map: chance
    with pytest.raises(ValueError, match="top"):
        saliency_mass(inside, body, top=0)
