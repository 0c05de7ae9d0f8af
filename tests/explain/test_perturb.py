"""Perturbations and batched causal scoring."""

from __future__ import annotations

import pytest
import torch

from c2f_med.explain.perturb import MaskRequest, Perturbation, causal_probabilities, class_probability
from c2f_med.models.vit import LesionViT


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LesionViT(img_size=32, stem_channels=(8, 16), hidden_size=32, mlp_dim=64, num_layers=2, num_heads=2).eval()


def test_noise_is_seeded_independent_of_content_and_per_mask():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 16, 16, generator=g)
    pert = Perturbation("noise", noise_sigma=0.1, seed=7)
    e = pert.baselines(x[1], 4)
    assert e.shape == (4, 1, 16, 16)
    assert torch.equal(e, pert.baselines(x[1].clone(), 4))  # same content, same noise
    assert torch.equal(e, pert.baselines(x[2], 4))  # content does not change the draws
    assert torch.equal(e, pert.baselines(x[1] + 1e-4, 4))  # (a scan stored another way gets the same noise)
    assert not torch.equal(e, Perturbation("noise", seed=8).baselines(x[1], 4))
    assert not torch.equal(e[0], e[1])  # one draw per mask
    assert float(e.std()) == pytest.approx(0.1, rel=0.15)


def test_deterministic_baselines():
    x = torch.linspace(-1, 1, 64).reshape(1, 8, 8)
    assert torch.all(Perturbation("zero").baselines(x, 2) == 0)
    mean = Perturbation("mean").baselines(x, 2)
    assert torch.allclose(mean, torch.full_like(mean, float(x.mean())))
    flat = torch.full((1, 8, 8), 0.3)
    assert torch.allclose(
        Perturbation("blur", blur_sigma=2.0).baselines(flat, 1)[0], flat, atol=1e-4
    )  # replicated border
    blurred = Perturbation("blur", blur_sigma=2.0).baselines(x, 1)[0]
    assert blurred.std() < x.std()
    with pytest.raises(ValueError):
        Perturbation("minimum")


def test_causal_probabilities_match_direct_images(model):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 32, 32, generator=g)
    target = torch.tensor([1, 0])
    masks = torch.rand(3, 32, 32, generator=g)
    noise = Perturbation("noise", seed=3).baselines(x[0], 3)
    requests = [
        MaskRequest(0, masks[0], noise[0]),
        MaskRequest(1, masks[1], noise[1]),
        MaskRequest(0, masks[2], noise[2]),
    ]
    p_tilde, p_hat = causal_probabilities(model, x, target, requests, batch_size=4)  # 6 images, 2 chunks
    for i, r in enumerate(requests):
        m, e = r.mask[None], r.baseline
        with torch.no_grad():
            lt = model((x[r.slice] * m + e * (1 - m))[None])
            lh = model((x[r.slice] + e * (1 - m))[None])
        t = target[r.slice : r.slice + 1]
        assert p_tilde[i] == pytest.approx(float(class_probability(lt, t)), abs=1e-5)
        assert p_hat[i] == pytest.approx(float(class_probability(lh, t)), abs=1e-5)
    (only_hat,) = causal_probabilities(model, x, target, requests, batch_size=4, images=("hat",))
    assert torch.allclose(only_hat, p_hat, atol=1e-5)
