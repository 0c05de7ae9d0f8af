"""LeGrad (Bousselham, Boggust, Chaybouti, Strobelt & Kuehne 2024, "LeGrad: An Explainability Method
for Vision Transformers via Feature Formation Sensitivity")."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from c2f_med.explain.base import Explainer, Explanation, register, resolve_target
from c2f_med.explain.tokens import recorded_outputs, token_explanation

__all__ = ["LeGrad", "legrad_maps", "legrad_relations"]


def legrad_relations(model, x: torch.Tensor, target: torch.Tensor | int | None, l0: int = 1
                     ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """LeGrad's per-layer token relations of ``x`` (``B x C x H x W``) in one forward pass.

    For block ``l`` (output ``z^l``, attention probabilities ``A^l``): the layer's score
    ``s^l = readout(z^l)[target]`` (its CLS token through the final norm and the head), and the
    relation ``G^l = mean_heads ReLU(ds^l / dA^l)`` (``B x T x T``, CLS first); LeGrad's map of the
    layer is ``G^l`` averaged over the query rows, its patch columns (:func:`legrad_maps`).

    Args:
        model: a :class:`~c2f_med.models.vit.TokenViT`.
        target: ``B`` classes, one class, or ``None`` (the predicted class, from this same pass).
        l0: first block (1-based) whose map is returned.

    Returns:
        ``(logits B x C, target B, relations)`` with ``relations[l - l0]`` = ``G^l``, one partial
        backward pass each (from ``s^l`` back to ``A^l``: one block and the head).
    """
    blocks, attention = model.blocks(), model.attention_modules()
    if not 1 <= l0 <= len(blocks):
        raise ValueError(f"l0 must be in 1..{len(blocks)}, got {l0}")
    with torch.enable_grad(), recorded_outputs([*attention, *blocks]) as rec:
        logits = model(x.detach().requires_grad_())  # a graph even where the weights are frozen
    attn, tokens = [r[-1] for r in rec[: len(attention)]], [r[-1] for r in rec[len(attention):]]
    t = resolve_target(logits.detach(), target)
    maps = []
    for layer in range(l0 - 1, len(blocks)):
        score = model.readout(tokens[layer]).gather(1, t.view(-1, 1)).sum()
        (grad,) = torch.autograd.grad(score, attn[layer], retain_graph=layer < len(blocks) - 1)
        maps.append(grad.clamp(min=0).mean(dim=1).detach())
    return logits.detach(), t, maps


def legrad_maps(model, x: torch.Tensor, target: torch.Tensor | int | None, l0: int = 1
                ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """LeGrad's per-layer maps ``m^l = mean_{heads, query rows} ReLU(ds^l / dA^l)[..., patches]``
    (``B x N`` each; :func:`legrad_relations`): ``(logits, target, maps)``."""
    logits, t, relations = legrad_relations(model, x, target, l0)
    return logits, t, [g.mean(1)[:, 1:] for g in relations]


@register("legrad")
class LeGrad(Explainer):
    """LeGrad: for every block ``l``, the gradient of that layer's own class score with respect to its
    attention probabilities, ReLU, averaged over heads and query rows, summed over layers
    (:func:`legrad_maps`); the CLS key is dropped, the ``h x w`` map upsampled bilinearly and
    min-max normalised.

    The layer score reads block ``l``'s CLS token through the model's final norm and head
    (:meth:`TokenViT.readout`), as the paper does for CLS-token ViTs. Attention values are not
    multiplied in. Cost: 1 forward pass per slice (the predicted class comes from the same pass) and
    ``L - l0 + 1`` partial backward passes (each through one block and the head).
    """

    @dataclass
    class Params:
        l0: int = 1  #: first block (1-based) whose map is summed; 1 = all blocks

    def _explain(self, x: torch.Tensor, target: torch.Tensor | int | None) -> Explanation:
        _, t, maps = legrad_maps(self.model, x, target, self.params.l0)
        summed = torch.stack(maps).sum(0).reshape(x.shape[0], *self.model.grid)
        return token_explanation(summed, self.model, t, x.shape[0], x.shape[0] * len(maps))
