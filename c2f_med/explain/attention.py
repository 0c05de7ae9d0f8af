"""Attention baselines: raw attention, attention rollout and Chefer's generic attention explainability.

All three read the attention probabilities ``A^l`` (``B x H_a x T x T``, ``T = N + 1``, CLS first)
of one forward pass through :meth:`TokenViT.run`, relate tokens with the algebra of
:mod:`c2f_med.explain.relevance`, take the CLS row's patch entries (``B x h x w``) and bring them to
the input grid with :func:`~c2f_med.explain.tokens.token_saliency` (bilinear upsampling, per-slice
min-max).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from c2f_med.explain.base import Explainer, Explanation, register, resolve_target
from c2f_med.explain.relevance import additive_relation, cls_row, fuse_heads_gradient, fuse_heads_mean, rollout
from c2f_med.explain.tokens import targets_for, token_explanation

__all__ = ["RawAttention", "AttentionRollout", "GenericAttention"]


@register("attention")
class RawAttention(Explainer):
    """Raw attention: the last layer's CLS row, heads averaged, ``mean_h A^L[CLS, patches]``.

    Cost: 1 forward pass per slice, no backward pass.
    """

    @dataclass
    class Params:
        pass

    def _explain(self, x: torch.Tensor, target: torch.Tensor | int | None) -> Explanation:
        with torch.inference_mode():
            out = self.model.run(x, attentions=True)
        maps = cls_row(fuse_heads_mean(out.attentions[-1]), self.model.grid)
        return token_explanation(maps, self.model, resolve_target(out.logits, target), x.shape[0], 0)


@register("rollout")
class AttentionRollout(Explainer):
    """Attention rollout (Abnar & Zuidema, ACL 2020, "Quantifying Attention Flow in Transformers").

    ``Ahat^l = (mean_h A^l + I) / rowsum``, ``R = Ahat^L ... Ahat^1``, map ``R[CLS, patches]``.
    Class-agnostic (``target`` is only recorded). Cost: 1 forward pass per slice, no backward pass.
    """

    @dataclass
    class Params:
        pass

    def _explain(self, x: torch.Tensor, target: torch.Tensor | int | None) -> Explanation:
        with torch.inference_mode():
            out = self.model.run(x, attentions=True)
        relation = rollout([fuse_heads_mean(a) for a in out.attentions])
        maps = cls_row(relation, self.model.grid)
        return token_explanation(maps, self.model, resolve_target(out.logits, target), x.shape[0], 0)


@register("gae")
class GenericAttention(Explainer):
    """Generic attention explainability (Chefer, Gur & Wolf, ICCV 2021, "Generic Attention-model
    Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers").

    ``Abar^l = E_h[(dy_c/dA^l * A^l)^+]``; ``R = I``, ``R <- R + Abar^l R`` for ``l = 1..L``; map
    ``R[CLS, patches]``. Cost: 1 forward and 1 backward pass per slice (plus 1 forward per slice
    when ``target`` is ``None``, to find the predicted class).
    """

    @dataclass
    class Params:
        pass

    def _explain(self, x: torch.Tensor, target: torch.Tensor | int | None) -> Explanation:
        t, forward = targets_for(self.model, x, target)
        out = self.model.run(x, attentions=True, target=t)
        fused = [fuse_heads_gradient(a, g) for a, g in zip(out.attentions, out.attention_grads)]
        maps = cls_row(additive_relation(fused), self.model.grid)
        return token_explanation(maps, self.model, t, forward + x.shape[0], x.shape[0])
