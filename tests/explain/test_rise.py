"""RISE: the masks, the formula by hand, and the budget matched to C2F's forward passes per slice."""

from __future__ import annotations

import torch

from c2f_med.explain import create
from c2f_med.explain.perturb import class_probability
from c2f_med.explain.rise import rise_masks
from c2f_med.explain.tokens import minmax
from c2f_med.models.vit import LesionViT


def toy() -> LesionViT:
    torch.manual_seed(0)
    return LesionViT(img_size=32, stem_channels=(8, 16), hidden_size=16, mlp_dim=32, num_layers=2, num_heads=2).eval()


def test_masks_are_seeded_smooth_and_keep_about_p():
    a = rise_masks(200, (32, 32), 4, 0.5, seed=1)
    assert a.shape == (200, 32, 32) and a.min() >= 0 and a.max() <= 1
    assert abs(a.mean().item() - 0.5) < 0.05
    assert ((a > 0) & (a < 1)).any()  # bilinear, not binary
    torch.testing.assert_close(rise_masks(20, (32, 32), 4, 0.5, seed=1), a[:20])  # a larger n extends a smaller one
    assert not torch.equal(rise_masks(20, (32, 32), 4, 0.5, seed=2), a[:20])
    assert rise_masks(300, (32, 32), 4, 0.2, seed=1).mean() < 0.3


def test_rise_by_hand():
    model, x = toy(), torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    e = create("rise", model, n_masks=6, cells=4, fill=-1.0, seed=3, batch_size=4).explain(x, 1)
    m = rise_masks(6, (32, 32), 4, 0.5, seed=3)
    for i in range(2):
        with torch.no_grad():
            p = class_probability(model(x[i] * m[:, None] - (1 - m[:, None])), torch.ones(6, dtype=torch.long))
        torch.testing.assert_close(e.saliency[i], minmax((p.view(-1, 1, 1) * m).sum(0)[None])[0], atol=1e-5, rtol=0)
    assert e.forward_passes == 12 and e.backward_passes == 0 and e.records[0] == {"masks": 6, "budget": None}


def test_budget_matches_c2f_on_every_slice():
    model, x = toy(), torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    for target in (1, None):
        c2f = create("c2f", model).explain(x, target)
        rise = create("rise", model).explain(x, target)
        budgets = [r["forward_passes"] for r in c2f.records]
        assert [r["budget"] for r in rise.records] == budgets
        assert rise.forward_passes == c2f.forward_passes  # the same compute in forward passes
        assert rise.saliency.shape == (3, 32, 32)
