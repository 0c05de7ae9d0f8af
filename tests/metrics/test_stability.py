"""Stability helpers: int16 storage as a DICOM series stores it, the noise floor, saliency correlation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from c2f_med.metrics.stability import int16_storage, noise_floor, saliency_correlation


def test_int16_storage_keeps_integers_and_rounds_floats_on_a_16_bit_grid():
    ct = np.array([[-1024.0, 0.0], [40.0, 3000.0]])  # integer HU: stored exactly
    np.testing.assert_array_equal(int16_storage(ct), ct)
    rng = np.random.default_rng(0)
    mr = rng.uniform(0, 1, (50, 40))  # float intensities in [0, 1]
    stored = int16_storage(mr)
    step = (mr.max() - mr.min()) / 65535
    assert not np.array_equal(stored, mr)
    assert np.abs(stored - mr).max() <= step / 2 + 1e-12
    assert len(np.unique(np.round((stored - mr.min()) / step, 6) % 1)) == 1  # on the grid
    assert int16_storage(np.full((3, 3), 0.5)).tolist() == np.full((3, 3), 0.5).tolist()  # constant


def test_noise_floor_recovers_white_noise_under_smooth_anatomy():
    rng = np.random.default_rng(1)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in (64, 64, 8)), indexing="ij")
    anatomy = 500 + 200 * np.exp(-(x**2 + y**2) * 3)
    for sigma in (5.0, 20.0):
        assert noise_floor(anatomy + rng.normal(0, sigma, anatomy.shape)) == pytest.approx(sigma, rel=0.1)
    assert noise_floor(anatomy) < 1.0


def test_saliency_correlation():
    rng = np.random.default_rng(2)
    a = rng.random((16, 16))
    assert saliency_correlation(a, 3 * a + 1) == pytest.approx(1.0)
    assert saliency_correlation(a, -a) == pytest.approx(-1.0)
    assert abs(saliency_correlation(a, rng.random((16, 16)))) < 0.2
    assert math.isnan(saliency_correlation(a, np.zeros((16, 16))))
    with pytest.raises(ValueError, match="shapes"):
        saliency_correlation(a, a[:8])
