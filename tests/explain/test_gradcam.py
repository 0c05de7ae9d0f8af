"""Grad-CAM on ViT tokens against an independent implementation (pytorch-grad-cam)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM as ReferenceGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from timm.models.vision_transformer import VisionTransformer

from c2f_med.explain.gradcam import GradCAM
from c2f_med.models.vit import LesionViT, TimmViTAdapter, TokenViT


def _timm() -> tuple[TokenViT, torch.nn.Module]:
    vit = VisionTransformer(img_size=32, patch_size=8, in_chans=1, num_classes=2, embed_dim=32, depth=2, num_heads=2)
    model = TimmViTAdapter(vit).eval()
    return model, vit.blocks[-1].norm1


def _lesion() -> tuple[TokenViT, torch.nn.Module]:
    model = LesionViT(img_size=32, stem_channels=(8, 16), hidden_size=32, mlp_dim=64, num_layers=2, num_heads=2).eval()
    return model, model.vit.blocks[-1].norm1


@pytest.mark.parametrize("build", [_timm, _lesion], ids=["timm", "lesionvit"])
@pytest.mark.parametrize("target", [0, 1])
def test_gradcam_matches_pytorch_grad_cam(build, target):
    torch.manual_seed(0)
    model, layer = build()
    x = torch.randn(3, 1, 32, 32)
    h, w = model.grid

    def tokens_to_maps(t: torch.Tensor) -> torch.Tensor:  # B x (N+1) x D -> B x D x h x w, CLS dropped
        return t[:, 1:].reshape(t.shape[0], h, w, t.shape[-1]).permute(0, 3, 1, 2)

    ref = ReferenceGradCAM(model=model, target_layers=[layer], reshape_transform=tokens_to_maps)
    expected = ref(input_tensor=x, targets=[ClassifierOutputTarget(target)] * x.shape[0])  # B x H x W, min-maxed
    ours = GradCAM(model).explain(x, target)
    assert ours.saliency.shape == (3, 32, 32)
    assert (ours.saliency.flatten(1).amax(1) == 1).all()  # non-trivial maps
    np.testing.assert_allclose(ours.saliency.numpy(), expected, atol=1e-5)
    assert (ours.forward_passes, ours.backward_passes) == (3, 3)
