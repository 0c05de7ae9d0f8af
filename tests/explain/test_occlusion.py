"""Occlusion sensitivity: MONAI's window count, the high = important convention, exact maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data.utils import dense_patch_slices
from monai.inferers.utils import _get_scan_interval

from c2f_med.explain.occlusion import Occlusion, occlusion_windows
from c2f_med.models.vit import TokenViT

SPOT = (1, 2)  # token (row, column) the toy reads


class SpotModel(TokenViT):
    """Logits ``(0, 4 * mean of the pixels of token SPOT)``: only that 8 x 8 patch matters."""

    def __init__(self):
        super().__init__()
        self.input_size, self.patch_size, self.num_classes, self.num_heads = (32, 40), 8, 2, 1
        self.images = 0

    def forward(self, x):
        self.images += x.shape[0]
        r, c = SPOT
        s = x[:, 0, 8 * r: 8 * r + 8, 8 * c: 8 * c + 8].mean((1, 2))
        return torch.stack([torch.zeros_like(s), 4 * s], 1)


@pytest.mark.parametrize("size", [(32, 40), (96, 96), (30, 17)])
@pytest.mark.parametrize("mask", [8, 5])
@pytest.mark.parametrize("overlap", [0.0, 0.5, 0.6, 0.9])
def test_window_count_matches_monai(size, mask, overlap):
    interval = _get_scan_interval(size, (mask, mask), 2, (overlap, overlap))
    assert occlusion_windows(size, mask, overlap) == len(dense_patch_slices(size, (mask, mask), interval))


@pytest.mark.parametrize("overlap", [0.0, 0.5])
def test_forward_passes_are_the_images_evaluated(overlap):
    model = SpotModel()
    x = torch.rand(2, 1, 32, 40)
    e = Occlusion(model, overlap=overlap, batch_size=7).explain(x, 1)
    assert e.forward_passes == model.images == 2 * occlusion_windows((32, 40), 8, overlap)
    assert e.backward_passes == 0
    model.images = 0
    e = Occlusion(model, overlap=overlap).explain(x)  # predicted class: one clean pass more per slice
    assert e.forward_passes == model.images == 2 + 2 * occlusion_windows((32, 40), 8, overlap)


def test_high_means_important_exactly():
    """Zero-occluding the read patch drops p_1 (bright patch): exactly that block is 1, the rest 0."""
    torch.manual_seed(0)
    x = torch.rand(1, 1, 32, 40) + 0.5
    e = Occlusion(SpotModel()).explain(x, 1)
    expected = np.zeros((32, 40), dtype=np.float32)
    r, c = SPOT
    expected[8 * r: 8 * r + 8, 8 * c: 8 * c + 8] = 1
    np.testing.assert_array_equal(e.saliency[0].numpy(), expected)
    # for the other class, occluding the patch *raises* p_0: the drop is lowest there
    e0 = Occlusion(SpotModel()).explain(x, 0)
    np.testing.assert_array_equal(e0.saliency[0].numpy(), 1 - expected)


def test_overlapping_windows_peak_on_the_patch():
    torch.manual_seed(0)
    x = torch.rand(1, 1, 32, 40) + 0.5
    sal = Occlusion(SpotModel(), overlap=0.5).explain(x, 1).saliency[0]
    r, c = SPOT
    inside = torch.zeros_like(sal, dtype=torch.bool)
    inside[8 * r: 8 * r + 8, 8 * c: 8 * c + 8] = True
    assert sal[inside].max() == 1 and sal[~inside].max() < 1
    assert sal.min() == 0
