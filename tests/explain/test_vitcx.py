"""ViT-CX: coverage normalisation, cost, and agreement with a direct computation."""

from __future__ import annotations

import pytest
import torch

from c2f_med.explain.base import create
from c2f_med.explain.masks import token_masks
from c2f_med.explain.perturb import Perturbation, class_probability
from c2f_med.explain.tokens import minmax
from c2f_med.explain.vitcx import coverage_map
from c2f_med.models.vit import LesionViT


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LesionViT(img_size=32, stem_channels=(8, 16), hidden_size=32, mlp_dim=64, num_layers=2, num_heads=2).eval()


@pytest.fixture(scope="module")
def slices():
    return torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))


def count_images(model):
    """Forward hook counting images through the model: returns the running list of batch sizes."""
    seen: list[int] = []
    handle = model.register_forward_hook(lambda _m, inp, _o: seen.append(inp[0].shape[0]))
    return seen, handle


def test_coverage_normalisation_by_hand():
    m1 = torch.tensor([[1.0, 0.0], [0.5, 0.0]])
    m2 = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    e = coverage_map(torch.tensor([2.0, 4.0]), torch.stack([m1, m2]))
    # (2*1 + 4*1)/2, 4/1, (2*0.5)/0.5, uncovered -> 0
    assert torch.allclose(e, torch.tensor([[3.0, 4.0], [2.0, 0.0]]))
    # an explicit coverage (all K masks) with only the first mask in the numerator
    e1 = coverage_map(torch.tensor([2.0]), m1[None], coverage=m1 + m2)
    assert torch.allclose(e1, torch.tensor([[1.0, 0.0], [2.0, 0.0]]))
    assert coverage_map(torch.zeros(0), torch.zeros(0, 2, 2)).eq(0).all()


def test_forward_passes_are_one_plus_two_k(model, slices):
    seen, handle = count_images(model)
    try:
        out = create("vitcx", model).explain(slices)
    finally:
        handle.remove()
    ks = [r["K"] for r in out.records]
    assert all(k >= 1 for k in ks)
    assert [r["forward_passes"] for r in out.records] == [1 + 2 * k for k in ks]
    assert out.forward_passes == sum(seen) == 3 + 2 * sum(ks)
    assert out.backward_passes == 0
    assert max(seen) <= 64
    assert out.saliency.shape == (3, 32, 32) and out.saliency.dtype == torch.float32
    assert out.saliency.min() == 0 and out.saliency.max() == pytest.approx(1.0)


def test_matches_direct_computation(model, slices):
    """One slice, computed image by image with the spec's formulas."""
    x = slices[2:3]
    out = create("vitcx", model, batch_size=5).explain(x, target=1)
    with torch.no_grad():
        rec = model.run(x, tokens=True)
        p = float(class_probability(rec.logits, torch.tensor([1])))
        masks = token_masks(rec.tokens[0], model.grid, model.input_size)
        noise = Perturbation("noise", noise_sigma=0.1, seed=0).baselines(x[0], len(masks))
        m = masks[:, None]  # K x 1 x H x W
        tilde = x[0] * m + noise * (1 - m)
        hat = x[0] + noise * (1 - m)
        one = torch.ones(len(masks), dtype=torch.long)
        scores = class_probability(model(tilde), one) - class_probability(model(hat), one) + p
    num = sum(s * m for s, m in zip(scores, masks))
    want = minmax((num / masks.sum(0))[None])[0]
    assert out.records[0]["K"] == len(masks)
    assert torch.allclose(out.saliency[0], want, atol=1e-4)


def test_sharpening_control(model, slices):
    plain = create("vitcx", model).explain(slices).saliency
    sq = create("vitcx-sq", model).explain(slices)
    assert create("vitcx-sq", model).params.gamma == 2.0
    assert torch.allclose(sq.saliency, minmax(plain**2), atol=1e-6)
    cube = create("vitcx-sq", model, gamma=3.0).explain(slices).saliency
    assert torch.allclose(cube, minmax(plain**3), atol=1e-6)


def test_seeded_and_perturbation_dependent(model, slices):
    a = create("vitcx", model).explain(slices).saliency
    assert torch.equal(a, create("vitcx", model).explain(slices).saliency)
    assert not torch.equal(a, create("vitcx", model, seed=1).explain(slices).saliency)
    zero = create("vitcx", model, perturbation="zero").explain(slices).saliency
    assert not torch.equal(a, zero)
