"""Saliency stability: the helpers, and C2F on the committed bundle given a slice two ways."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from c2f_med.explain import create
from c2f_med.explain.stability import as_stored_levels, saliency_correlation, saliency_stability, with_noise_floor
from c2f_med.models.vit import LesionViT

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "c2f_lesion_vit"


def test_storage_levels_and_noise_floor():
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    q = as_stored_levels(x, 15)
    assert torch.allclose(q * 15, torch.round(q * 15)) and (q - x).abs().max() <= 0.5 / 15 + 1e-7
    n = with_noise_floor(x, 0.01, seed=3)
    assert torch.equal(n, with_noise_floor(x, 0.01, seed=3)) and 0.007 < (n - x).std() < 0.013


def test_saliency_correlation_is_pearson_per_slice():
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(3, 5, 5, generator=g), torch.rand(3, 5, 5, generator=g)
    expected = [np.corrcoef(a[i].flatten(), b[i].flatten())[0, 1] for i in range(3)]
    np.testing.assert_allclose(saliency_correlation(a, b).numpy(), expected, rtol=1e-5)
    assert saliency_correlation(a, 2 * a + 1).tolist() == pytest.approx([1, 1, 1])
    flat = torch.zeros(1, 5, 5)
    assert saliency_correlation(flat, flat).tolist() == [1.0] and saliency_correlation(flat, a[:1]).tolist() == [0.0]


def test_a_deterministic_gradient_method_is_stable():
    torch.manual_seed(0)
    model = LesionViT(img_size=32, stem_channels=(8, 16), hidden_size=16, mlp_dim=32, num_layers=2, num_heads=2).eval()
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    r = saliency_stability(create("legrad", model), x, 1, noise_sigma=1e-4)
    assert set(r) == {"int16", "noise"} and all(v.shape == (2,) for v in r.values())
    assert (r["int16"] > 0.999).all() and (r["noise"] > 0.99).all()
    with pytest.raises(ValueError, match="B x 1 x H x W"):
        saliency_stability(create("legrad", model), x[0], 1)
