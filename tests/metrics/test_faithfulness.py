"""Deletion / insertion curves and perturbation AUCs with toy predict functions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from c2f_med.metrics.faithfulness import (
    auc,
    deletion_auc,
    insertion_auc,
    negative_perturbation_auc,
    perturbation_curve,
    positive_perturbation_auc,
)

H, W = 16, 12


def region_mask() -> torch.Tensor:
    """The evidence region the toy model looks at (H x W)."""
    r = torch.zeros(H, W, dtype=torch.bool)
    r[4:10, 3:8] = True
    return r


def region_mean_predict(batch: torch.Tensor) -> torch.Tensor:
    """Toy model: p_c = mean intensity of the evidence region ([B])."""
    assert batch.ndim == 4 and batch.shape[1:] == (1, H, W)
    return batch[:, 0, region_mask()].mean(dim=1)


@pytest.fixture
def image() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return 0.5 + 0.5 * torch.rand(1, H, W, generator=g)  # values in [0.5, 1]: p_c > 0


@pytest.fixture
def good_saliency() -> np.ndarray:
    rng = np.random.default_rng(0)
    return region_mask().numpy() + 0.1 * rng.random((H, W))


def test_curve_shape_and_end_points(image, good_saliency):
    for mode, baseline, first, last in [
        ("deletion", "zero", image, torch.zeros_like(image)),
        ("insertion", "zero", torch.zeros_like(image), image),
        ("deletion", "mean", image, torch.full_like(image, image.mean().item())),
    ]:
        fractions, probs = perturbation_curve(
            image, good_saliency, region_mean_predict, mode=mode, baseline=baseline, steps=8
        )
        assert fractions.shape == probs.shape == (9,)
        assert fractions[0] == 0.0 and fractions[-1] == 1.0 and np.all(np.diff(fractions) > 0)
        assert probs[0] == pytest.approx(region_mean_predict(first[None]).item())
        assert probs[-1] == pytest.approx(region_mean_predict(last[None]).item())


def test_blur_baseline_is_the_documented_gaussian(image, good_saliency):
    _, probs = perturbation_curve(
        image, good_saliency, region_mean_predict, mode="insertion", blur_sigma=2.0, steps=4
    )
    blurred = torch.from_numpy(gaussian_filter(image.numpy(), sigma=(0, 2.0, 2.0), mode="reflect"))
    assert probs[0] == pytest.approx(region_mean_predict(blurred[None]).item())  # insertion default: blur


def test_changes_pixels_in_saliency_order_in_equal_chunks(image):
    rng = np.random.default_rng(1)
    saliency = rng.random((H, W))
    seen = []

    def recording_predict(batch):
        seen.append(batch.clone())
        return batch.mean(dim=(1, 2, 3))

    steps = 6
    fractions, _ = perturbation_curve(
        image, saliency, recording_predict, baseline="zero", steps=steps, batch_size=4
    )
    assert [b.shape[0] for b in seen] == [4, 3]  # 7 images in batches of at most 4
    images = torch.cat(seen)
    order = np.argsort(-saliency.ravel())
    for i, img in enumerate(images):
        n = round(i * H * W / steps)
        assert fractions[i] == pytest.approx(n / (H * W))
        deleted = (img[0] == 0).numpy().ravel()
        assert deleted.sum() == n
        assert set(np.flatnonzero(deleted)) == set(order[:n])


def test_right_order_beats_reverse_order(image, good_saliency):
    reverse = good_saliency.max() - good_saliency
    for baseline in ("zero", "blur", "mean"):
        kw = dict(baseline=baseline, steps=20)
        assert deletion_auc(image, good_saliency, region_mean_predict, **kw) < deletion_auc(
            image, reverse, region_mean_predict, **kw
        )
        assert insertion_auc(image, good_saliency, region_mean_predict, **kw) > insertion_auc(
            image, reverse, region_mean_predict, **kw
        )
    # Chefer et al.: removing the most relevant first hurts most
    assert positive_perturbation_auc(image, good_saliency, region_mean_predict) < negative_perturbation_auc(
        image, good_saliency, region_mean_predict
    )
    # negative perturbation = positive perturbation of the reversed order (no ties here)
    assert negative_perturbation_auc(image, good_saliency, region_mean_predict) == pytest.approx(
        positive_perturbation_auc(image, reverse, region_mean_predict)
    )


def test_batch_size_and_input_types_do_not_change_the_curve(image, good_saliency):
    ref = perturbation_curve(image, good_saliency, region_mean_predict, steps=10, batch_size=32)
    for kw in (dict(batch_size=1), dict(batch_size=3)):
        np.testing.assert_allclose(
            perturbation_curve(image, good_saliency, region_mean_predict, steps=10, **kw)[1], ref[1]
        )
    def numpy_predict(batch):
        return region_mean_predict(batch).numpy()

    numpy_in = perturbation_curve(image.numpy(), good_saliency[None], numpy_predict, steps=10)
    np.testing.assert_allclose(numpy_in[0], ref[0])
    np.testing.assert_allclose(numpy_in[1], ref[1], rtol=1e-6)


def test_predict_runs_without_grad(image, good_saliency):
    def predict(batch):
        assert not torch.is_grad_enabled()
        return region_mean_predict(batch)

    perturbation_curve(image, good_saliency, predict, steps=2)


def test_invalid_arguments(image, good_saliency):
    with pytest.raises(ValueError, match=r"\(5, 5\).*\(1, 16, 12\)"):
        perturbation_curve(image, np.ones((5, 5)), region_mean_predict)
    with pytest.raises(ValueError, match="mode"):
        perturbation_curve(image, good_saliency, region_mean_predict, mode="erase")
    with pytest.raises(ValueError, match="baseline"):
        perturbation_curve(image, good_saliency, region_mean_predict, baseline="noise")
    with pytest.raises(ValueError, match="returned"):
        perturbation_curve(image, good_saliency, lambda b: torch.zeros(1), steps=4)


def test_auc_trapezoid():
    assert auc([0.0, 1.0], [1.0, 0.0]) == pytest.approx(0.5)
    assert auc([0.0, 0.5, 1.0], [1.0, 1.0, 0.0]) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="shape"):
        auc([0.0, 1.0], [1.0])
