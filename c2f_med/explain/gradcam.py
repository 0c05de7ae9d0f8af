"""Grad-CAM baselines for ViTs: on the last block's tokens, and Chefer's attention Grad-CAM."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from c2f_med.explain.base import Explainer, Explanation, register
from c2f_med.explain.tokens import targets_for, token_explanation

__all__ = ["GradCAM", "AttentionGradCAM"]


@register("gradcam")
class GradCAM(Explainer):
    """Grad-CAM (Selvaraju et al., ICCV 2017) on a ViT's last block input.

    ``F`` = the LayerNorm-ed input of the last block (output of ``blocks[-1].norm1``), patch tokens
    only, ``B x N x D``, read as ``D`` maps on the ``h x w`` token grid (pytorch-grad-cam's ViT
    ``reshape_transform``). Channel weights ``w_d = mean_i dy_c/dF_(i,d)``,
    ``cam = ReLU(sum_d w_d F_(., d))``, upsampled bilinearly to ``H x W`` and min-max normalised.
    The last block's *output* patch tokens never reach the CLS head (zero gradient), hence its input;
    ``F`` is signed, so the ReLU matters. Cost: 1 forward and 1 backward pass per slice (plus 1
    forward per slice when ``target`` is ``None``).
    """

    @dataclass
    class Params:
        pass

    def _explain(self, x: torch.Tensor, target: torch.Tensor | int | None) -> Explanation:
        t, forward = targets_for(self.model, x, target)
        out = self.model.run(x, tokens=True, target=t)
        weights = out.token_grads.mean(1, keepdim=True)  # B x 1 x D
        cam = (weights * out.tokens).sum(-1).clamp(min=0)  # B x N
        maps = cam.reshape(x.shape[0], *self.model.grid)
        return token_explanation(maps, self.model, t, forward + x.shape[0], x.shape[0])


@register("gradcam-attn")
class AttentionGradCAM(Explainer):
    """Attention Grad-CAM, the baseline of Chefer, Gur & Wolf (CVPR 2021, "Transformer
    Interpretability Beyond Attention Visualization"; ``generate_attn_gradcam`` in their code).

    On the last layer's CLS row, per head ``h``: ``w_h = mean_j dy_c/dA^L_h[CLS, j]`` (j over the
    patches, Grad-CAM's global average pooling of the gradient), map
    ``ReLU(mean_h w_h A^L_h[CLS, patches])``, upsampled bilinearly and min-max normalised.
    Cost: 1 forward and 1 backward pass per slice (plus 1 forward per slice when ``target`` is
    ``None``).
    """

    @dataclass
    class Params:
        pass

    def _explain(self, x: torch.Tensor, target: torch.Tensor | int | None) -> Explanation:
        t, forward = targets_for(self.model, x, target)
        out = self.model.run(x, attentions=True, target=t)
        attn = out.attentions[-1][:, :, 0, 1:]  # B x H_a x N
        grad = out.attention_grads[-1][:, :, 0, 1:]
        cam = (grad.mean(-1, keepdim=True) * attn).mean(1).clamp(min=0)  # B x N
        maps = cam.reshape(x.shape[0], *self.model.grid)
        return token_explanation(maps, self.model, t, forward + x.shape[0], x.shape[0])
