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
    road_impute,
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
    with pytest.raises(ValueError, match="C x H x W"):
        perturbation_curve(image[:, :, None], good_saliency[:, None], region_mean_predict, baseline="road")
    with pytest.raises(ValueError, match="returned"):
        perturbation_curve(image, good_saliency, lambda b: torch.zeros(1), steps=4)


def test_auc_trapezoid():
    assert auc([0.0, 1.0], [1.0, 0.0]) == pytest.approx(0.5)
    assert auc([0.0, 0.5, 1.0], [1.0, 1.0, 0.0]) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="shape"):
        auc([0.0, 1.0], [1.0])


def test_road_keeps_kept_pixels_and_continues_smooth_images():
    rng = np.random.default_rng(0)
    g = np.linspace(0, 1, 20)
    ramp = np.stack([g[:, None] + 2 * g[None, :], np.full((20, 20), 3.0)])  # 2 channels: a plane and a constant
    keep = rng.random((20, 20)) > 0.6
    keep[[0, -1], :] = keep[:, [0, -1]] = True  # the border known
    filled = road_impute(ramp, keep, noise_std=0.0)
    np.testing.assert_array_equal(filled[:, keep], ramp[:, keep])
    # a linear ramp is harmonic: inside a known border the 8-neighbour mean reproduces it (up to the tiny
    # pull towards the mean)
    np.testing.assert_allclose(filled, ramp, atol=2e-3)
    noisy = road_impute(ramp, keep, noise_std=0.5, rng=np.random.default_rng(1))
    assert 0.4 < np.std(noisy[1, ~keep] - 3.0) < 0.6 and np.array_equal(noisy[:, keep], ramp[:, keep])
    np.testing.assert_allclose(road_impute(ramp, np.zeros((20, 20), bool), 0.0)[1], 3.0)  # nothing kept: the mean
    with pytest.raises(ValueError, match="C x H x W"):
        road_impute(ramp[0], keep)


def test_road_curves_fill_from_the_kept_pixels(image, good_saliency):
    fractions, deletion = perturbation_curve(image, good_saliency, region_mean_predict, baseline="road", steps=4,
                                             noise_std=0.0)
    _, insertion = perturbation_curve(image, good_saliency, region_mean_predict, mode="insertion", baseline="road",
                                      steps=4, noise_std=0.0)
    assert deletion[0] == pytest.approx(region_mean_predict(image[None]).item())
    assert insertion[-1] == pytest.approx(deletion[0])
    mean = region_mean_predict(torch.full_like(image, image.mean().item())[None]).item()
    assert deletion[-1] == pytest.approx(mean) and insertion[0] == pytest.approx(mean)


@pytest.fixture(scope="module")
def committed_lesion_slices():
    """The committed model and four lesion slices of fresh synthetic scans it calls positive (p > 0.8), at most
    two per scan."""
    from c2f_med.io.transforms import MRPercentileNorm
    from c2f_med.models.bundle import DEFAULT_BUNDLE, load_bundle
    from c2f_med.models.train import slice_dataset
    from c2f_med.synth.dataset import synth_case

    bundle = load_bundle(DEFAULT_BUNDLE)
    picked = []
    for index in range(10):
        case = synth_case(101, index)  # a seed never used for training or validation
        image = MRPercentileNorm()(torch.from_numpy(case.image.astype(np.float32))[None])[0]
        x, y, _, _ = slice_dataset(torch.as_tensor(image), torch.from_numpy(case.label), bundle.model.input_size[0])
        with torch.inference_mode():
            p = torch.softmax(bundle.model(x), 1)[:, bundle.lesion_class]
        chosen = torch.nonzero((y > 0) & (p > 0.8)).ravel()
        if chosen.numel():
            picked += [x[i] for i in chosen[[chosen.numel() // 3, 2 * chosen.numel() // 3]].unique()]
        if len(picked) >= 4:
            break
    assert len(picked) >= 4
    return bundle, torch.stack(picked[:4])


@pytest.mark.slow
def test_road_fill_deleting_random_pixels_leaves_the_lesion_probability_unchanged(committed_lesion_slices):
    """Deleting 10-50 % of the pixels in random order should not change what the model sees on average.
    With ROAD's linear imputation it does not; filling with zeros (RISE's deletion baseline) or a blur
    changes the probability by a lot, so the test can tell the fills apart."""
    bundle, slices = committed_lesion_slices

    def predict(batch):
        return torch.softmax(bundle.model(batch), 1)[:, bundle.lesion_class]

    change = {}
    for fill in ("road", "zero", "blur"):
        rng = np.random.default_rng(0)
        curves = []
        for x in slices:
            for _ in range(2):
                _, p = perturbation_curve(x, rng.random(x.shape[-2:]), predict, baseline=fill, steps=10, noise_std=0.0)
                curves.append(p[1:6] - p[0])  # 10 % ... 50 % deleted
        change[fill] = float(np.mean(curves))
    assert abs(change["road"]) < 0.03, change
    assert change["zero"] < -0.1 and change["blur"] < -0.1, change
