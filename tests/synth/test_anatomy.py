"""Template loading, random anatomies (warp, contrasts, bias) and the scanner effects."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import binary_dilation

from c2f_med.synth import anatomy as anatomy_module
from c2f_med.synth.anatomy import CONTRASTS, CROP_MARGIN, TISSUE_INTENSITY, finalise, load_template, make_anatomy


def test_template_maps_share_one_cropped_grid():
    t = load_template(2.0)
    shape = t.t1.shape
    for name in ("t1", "gm", "wm", "csf"):
        arr = getattr(t, name)
        assert arr.shape == shape and arr.dtype == np.float32
        assert not arr.flags.writeable  # the cached template cannot be altered by a caller
    assert t.brain.dtype == bool and t.head.dtype == bool
    assert np.all(t.head[t.brain])
    np.testing.assert_allclose(t.spacing, [2.0, 2.0, 2.0])
    # the head's bounding box plus the margin on every side
    idx = np.argwhere(t.head)
    assert np.all(idx.min(0) == CROP_MARGIN) and np.all(np.asarray(shape) - 1 - idx.max(0) == CROP_MARGIN)
    # white matter is ~1 and the T1 ordering CSF < GM < WM holds
    csf, gm, wm = t.t1_means
    assert csf < gm < wm and wm == pytest.approx(1.0, abs=0.05)
    np.testing.assert_allclose(t.csf, np.clip(t.brain - t.gm - t.wm, 0, 1), atol=1e-6)
    assert t.t1[~t.head].max() == 0


def test_template_affine_is_mni():
    """The cropped grid still maps the anterior commissure's neighbourhood into the brain."""
    t = load_template()
    origin = np.linalg.solve(t.affine, [0.0, 0.0, 0.0, 1.0])[:3]  # MNI (0, 0, 0): near the AC
    assert t.brain[tuple(np.rint(origin).astype(int))]


def test_same_generator_state_gives_the_same_anatomy():
    a = make_anatomy(np.random.default_rng(5))
    b = make_anatomy(np.random.default_rng(5))
    c = make_anatomy(np.random.default_rng(6), a.contrast)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.bias, b.bias)
    assert a.contrast == b.contrast and a.noise_sigma == b.noise_sigma
    assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("contrast", CONTRASTS)
def test_anatomy_fields(contrast):
    a = make_anatomy(np.random.default_rng(1), contrast)
    t = load_template()
    assert a.contrast == contrast
    assert a.image.shape == a.bias.shape == a.brain.shape == t.t1.shape
    assert a.image.dtype == a.bias.dtype == np.float32 and a.brain.dtype == bool
    assert a.image.min() >= 0
    assert np.all(a.image[~binary_dilation(a.brain, iterations=2)] < 0.05)  # background ~0 (partial volume)
    assert 0.8 <= a.bias.min() and a.bias.max() <= 1.25
    assert 0 < a.noise_sigma < 0.1 and a.tissue_scale > 0.3
    np.testing.assert_array_equal(a.affine, t.affine)
    # warped, but still mostly over the template's brain
    dice = 2 * (a.brain & t.brain).sum() / (a.brain.sum() + t.brain.sum())
    assert 0.7 < dice < 0.995


@pytest.mark.parametrize("contrast", CONTRASTS)
def test_tissue_intensities_order(monkeypatch, contrast):
    """Without the warp, the tissue means follow the contrast: T2 CSF > GM > WM, FLAIR GM > WM > CSF."""
    monkeypatch.setattr(
        anatomy_module, "_warp_coordinates", lambda rng, shape, spacing: np.indices(shape, dtype=np.float32)
    )
    a = make_anatomy(np.random.default_rng(2), contrast)
    t = load_template()
    csf, gm, wm = (float(np.mean(a.image[getattr(t, n) > 0.9])) for n in ("csf", "gm", "wm"))
    assert wm == pytest.approx(1.0, abs=0.1)
    if contrast == "t1":
        assert csf < gm < wm
    elif contrast == "t2":
        assert csf > gm > wm
    else:
        assert gm > wm > csf
    if contrast != "t1":  # pure-tissue voxels sit within the jitter of the nominal intensities
        nominal = TISSUE_INTENSITY[contrast]
        assert csf == pytest.approx(nominal[0], rel=0.15) and gm == pytest.approx(nominal[1], rel=0.15)
    assert a.tissue_scale == pytest.approx(max(csf, gm, wm) - min(csf, gm, wm), rel=0.15)


def test_unknown_contrast_is_rejected():
    with pytest.raises(ValueError, match="contrast"):
        make_anatomy(np.random.default_rng(0), "pd")


def test_finalise_without_noise_is_the_biased_image(anatomy):
    out = finalise(anatomy.image, anatomy.bias, 0.0, np.random.default_rng(0))
    np.testing.assert_allclose(out, anatomy.image * anatomy.bias, rtol=1e-6)


def test_finalise_adds_rician_noise_to_volumes_and_slices(anatomy):
    rng = np.random.default_rng(0)
    sigma = 0.05
    vol = finalise(anatomy.image, anatomy.bias, sigma, rng)
    assert vol.shape == anatomy.image.shape and vol.dtype == np.float32 and vol.min() >= 0
    background = vol[anatomy.image == 0]
    # magnitude of complex Gaussian noise on zero signal: Rayleigh, mean sigma * sqrt(pi / 2)
    assert background.mean() == pytest.approx(sigma * np.sqrt(np.pi / 2), rel=0.05)
    k = anatomy.image.shape[2] // 2
    sl = finalise(anatomy.image[:, :, k], anatomy.bias[:, :, k], sigma, rng)
    assert sl.shape == anatomy.image.shape[:2]
    bright = anatomy.image[:, :, k] > 0.9
    assert np.mean(sl[bright] - (anatomy.image * anatomy.bias)[:, :, k][bright]) == pytest.approx(0, abs=0.01)
    with pytest.raises(ValueError, match="shape"):
        finalise(anatomy.image[:, :, k], anatomy.bias, sigma, rng)
