"""Saliency stability: the helpers, and C2F on the committed bundle given a slice two ways."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from c2f_med.explain import create
from c2f_med.explain.stability import as_stored_levels, saliency_correlation, saliency_stability, with_noise_floor
from c2f_med.models.bundle import load_bundle
from c2f_med.models.vit import LesionViT
from c2f_med.slices import normalise_input, to_model_grid, volume_slices
from c2f_med.synth.dataset import synth_case

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


@pytest.mark.slow
def test_c2f_on_the_bundle_is_stable_to_storage_and_a_noise_floor():
    """Lesion slices of a synthetic scan the bundle calls positive: c2f's saliency of the slice, of the
    slice rounded to 12-bit storage levels and of the slice plus noise at half a percent of the window."""
    bundle = load_bundle(BUNDLE)
    case = synth_case(4, 0, n_lesions=2)  # a validation-seed scan (seed 3 is the test split)
    volume = torch.as_tensor(case.image, dtype=torch.float32)
    volume = (volume - volume.min()) / (volume.max() - volume.min())
    lesion = np.nonzero(case.label.reshape(-1, case.label.shape[2]).any(0))[0].tolist()
    x, _ = to_model_grid(volume_slices(volume, 2, lesion).float(), bundle.model.input_size[0])
    with torch.no_grad():
        p = bundle.model(normalise_input(x)).softmax(1)[:, bundle.lesion_class]
    x = x[p >= 0.5][:4]
    assert x.shape[0] >= 2
    r = saliency_stability(create("c2f", bundle.model), x, bundle.lesion_class)
    assert r["int16"].mean() >= 0.98, r  # measured 1.000 on each slice (0.86-1.0 with content-keyed noise)
    # a noise floor still moves the clustering's discrete cuts on some slices (docs/method.md, Stability):
    # measured mean 0.94 here, short of 0.98
    assert r["noise"].mean() >= 0.9, r
