"""AttnLRP (Achtibat, Hatefi, Dreyer, Jain, Wiegand, Lapuschkin & Samek, ICML 2024, "AttnLRP:
Attention-Aware Layer-wise Relevance Propagation for Transformers") on any :class:`TokenViT`.

Layer-wise relevance propagation in the Gradient x Input form of the ``lxt`` package (its "efficient"
rules): one forward pass in which some operations get a modified gradient, one backward pass of the
target logit, and the relevance of the input pixels is ``x * dy_c/dx`` summed over channels. Rules,
set by forward hooks for the one pass (:func:`lrp_rules`):

- linear maps (convolutions, ``nn.Linear``, eval-mode BatchNorm, residual sums): the epsilon rule,
  which in this form is the plain gradient;
- LayerNorm: the identity rule on the division by the standard deviation (the deviation is treated
  as a constant in the backward pass; the centring stays linear);
- element-wise non-linearities (GELU, SiLU): the identity rule, ``dy/dx := f(x) / x``;
- the attention softmax, by ``softmax_rule``:

  * ``"cp"`` (CP-LRP, Ali et al. ICML 2022, lxt's default for vision transformers): the attention
    probabilities are constants of the backward pass, relevance flows through the values only;
  * ``"uniform"`` (AttnLRP's own): the softmax's gradient x input rule, and the uniform rule on both
    matrix products (``A V`` and ``Q K^T``): half the relevance of ``A V`` goes to ``A`` and half to
    ``V``, half of ``Q K^T``'s to each of ``Q`` and ``K`` (gradient factors 1/4 for ``Q``, ``K`` and
    1/2 for ``V``, lxt's ``divide_gradient``).

The hooks are on modules, so MONAI's ``SABlock`` and timm's ``Attention`` get the same rule map:
LayerNorms and activations by type, the attention probabilities at the module the adapter exposes
(:meth:`TokenViT.attention_modules`), the ``Q, K, V`` projection at its sibling ``qkv`` (or
``to_q``/``to_k``/``to_v``).

Relevance is conserved up to what the biases, the CLS token and the position embedding absorb
(:func:`conservation`, ``sum_u R(u) / y_c``); the softmax rule of ``"uniform"`` is not conservative.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from c2f_med.explain.base import Explainer, Explanation, register, resolve_target
from c2f_med.explain.tokens import minmax
from c2f_med.models.vit import TokenViT

__all__ = ["AttnLRP", "SOFTMAX_RULES", "lrp_rules", "input_relevance", "conservation"]

SOFTMAX_RULES = ("cp", "uniform")
#: element-wise non-linearities that get the identity rule
ACTIVATIONS = (nn.GELU, nn.SiLU)
#: names of the Q, K, V projections next to the attention probabilities (timm, MONAI)
QKV_NAMES = ("qkv", "to_q", "to_k", "to_v")


class _IdentityRule(torch.autograd.Function):
    """``y = f(x)`` with the backward ``g * f(x) / (x + eps)`` (lxt's ``identity_rule_implicit``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(y / (x + 1e-10))
        return y.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (ratio,) = ctx.saved_tensors
        return grad * ratio, None


class _ScaleGradient(torch.autograd.Function):
    """Identity forward, gradient times ``factor`` (lxt's ``divide_gradient`` with ``1 / factor``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def _layer_norm_rule(module: nn.LayerNorm, inputs: tuple, _output: torch.Tensor) -> torch.Tensor:
    x = inputs[0]
    dims = tuple(range(-len(module.normalized_shape), 0))
    centred = x - x.mean(dim=dims, keepdim=True)
    std = (centred.pow(2).mean(dim=dims, keepdim=True) + module.eps).sqrt()
    y = centred / std.detach()
    if module.weight is not None:
        y = y * module.weight
    if module.bias is not None:
        y = y + module.bias
    return y


def _identity_rule(_module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return _IdentityRule.apply(inputs[0], output)


def _qkv_projections(model: TokenViT) -> list[nn.Module]:
    """The ``Q, K, V`` projections of every block: the siblings named in :data:`QKV_NAMES` of each
    attention-probability module."""
    parents = {id(m): name.rpartition(".")[0] for name, m in model.named_modules()}
    modules = dict(model.named_modules())
    found = []
    for attn in model.attention_modules():
        parent = modules[parents[id(attn)]]
        projections = [getattr(parent, n) for n in QKV_NAMES if isinstance(getattr(parent, n, None), nn.Module)]
        if not projections:
            raise ValueError(f"no Q/K/V projection ({', '.join(QKV_NAMES)}) beside {parents[id(attn)]}")
        found += projections
    return found


@contextlib.contextmanager
def lrp_rules(model: TokenViT, softmax_rule: str = "cp") -> Iterator[None]:
    """Within the block, ``model``'s forward passes carry the LRP rules of the module docstring."""
    if softmax_rule not in SOFTMAX_RULES:
        raise ValueError(f"unknown softmax rule {softmax_rule!r}; choose from {SOFTMAX_RULES}")
    handles = []
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            handles.append(m.register_forward_hook(_layer_norm_rule))
        elif isinstance(m, ACTIVATIONS):
            handles.append(m.register_forward_hook(_identity_rule))
    if softmax_rule == "cp":
        attention_hook = lambda _m, _i, out: out.detach()  # noqa: E731
    else:
        attention_hook = lambda _m, _i, out: _ScaleGradient.apply(out, 0.5)  # noqa: E731
        for m in _qkv_projections(model):
            handles.append(m.register_forward_hook(lambda _m, _i, out: _ScaleGradient.apply(out, 0.5)))
    handles += [m.register_forward_hook(attention_hook) for m in model.attention_modules()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def input_relevance(
    model: TokenViT, x: torch.Tensor, target: torch.Tensor | int | None, softmax_rule: str = "cp"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Relevance of the input pixels for the target logits: one forward and one backward pass.

    Returns:
        ``(relevance B x H x W (channels summed), logits B x C, target B)``.
    """
    x = x.detach().requires_grad_()
    with torch.enable_grad(), lrp_rules(model, softmax_rule):
        logits = model(x)
        t = resolve_target(logits.detach(), target)
        (grad,) = torch.autograd.grad(logits.gather(1, t.view(-1, 1)).sum(), x)
    return (x * grad).sum(1).detach(), logits.detach(), t


def conservation(model: TokenViT, x: torch.Tensor, target: torch.Tensor | int | None, softmax_rule: str = "cp"
                 ) -> torch.Tensor:
    """``sum_u R(u) / y_c`` per slice (``B``): the share of the target logit that reaches the pixels."""
    relevance, logits, t = input_relevance(model, x, target, softmax_rule)
    return relevance.flatten(1).sum(1) / logits.gather(1, t.view(-1, 1))[:, 0]


@register("attnlrp")
@register("attnlrp-uniform", {"softmax_rule": "uniform"})
class AttnLRP(Explainer):
    """AttnLRP (module docstring): pixel relevance ``x * dy_c/dx`` under the LRP rules, the positive part
    min-max normalised per slice (``positive=False``: the signed relevance, min-max normalised).

    ``softmax_rule="cp"`` is the default: on the bundle's model it conserves more of the logit than
    ``"uniform"`` (``conservation``; see docs/method.md). Cost: 1 forward and 1 backward pass per slice
    (the predicted class comes from the same pass).
    """

    @dataclass
    class Params:
        softmax_rule: Literal["cp", "uniform"] = "cp"  #: rule at the attention softmax
        positive: bool = True  #: keep the positive relevance only

    def _explain(self, x: torch.Tensor, target: torch.Tensor | int | None) -> Explanation:
        relevance, _, t = input_relevance(self.model, x, target, self.params.softmax_rule)
        if self.params.positive:
            relevance = relevance.clamp(min=0)
        b = x.shape[0]
        return Explanation(saliency=minmax(relevance.float()), target=t, forward_passes=b, backward_passes=b,
                           records=[{} for _ in range(b)])
