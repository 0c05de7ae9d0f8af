"""AttnLRP: conservation on bias-free toys, and the same relevance as lxt's explicit LRP functions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from c2f_med.explain import create
from c2f_med.explain.attnlrp import conservation, input_relevance
from c2f_med.models.vit import LesionViT, TimmViTAdapter

SIZE, PATCH, WIDTH, DEPTH, HEADS = 32, 8, 16, 2, 2


def without_biases(model: torch.nn.Module) -> torch.nn.Module:
    """Biases, BatchNorm means, CLS token and position embeddings zero: nothing absorbs relevance."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "pos" in name or "cls_token" in name:
                p.zero_()
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.zero_()
    return model


def monai_toy() -> LesionViT:
    torch.manual_seed(0)
    return LesionViT(img_size=32, stem_channels=(8, 16), hidden_size=16, mlp_dim=32, num_layers=2, num_heads=2).eval()


def timm_toy() -> VisionTransformer:
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=SIZE, patch_size=PATCH, in_chans=1, num_classes=2, embed_dim=WIDTH, depth=DEPTH,
                            num_heads=HEADS, mlp_ratio=2.0, qkv_bias=True)
    with torch.no_grad():
        for p in vit.parameters():  # timm's init leaves biases at zero: make them count
            p.add_(0.05 * torch.randn_like(p))
    return vit.eval()


@pytest.mark.parametrize("build", [monai_toy, lambda: TimmViTAdapter(timm_toy())], ids=["monai", "timm"])
def test_cp_conserves_the_logit_and_uniform_does_not(build):
    model = without_biases(build())
    x = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    cp, uniform = conservation(model, x, 1, "cp"), conservation(model, x, 1, "uniform")
    torch.testing.assert_close(cp, torch.ones(3), atol=1e-4, rtol=0)
    assert ((uniform - 1).abs() > 0.05).all()  # the softmax rule leaks
    assert create("attnlrp", model).params.softmax_rule == "cp"  # the default: the rule that conserves


def test_rules_leave_the_forward_pass_unchanged():
    model = monai_toy()
    x = torch.randn(2, 1, 32, 32)
    for rule in ("cp", "uniform"):
        _, logits, t = input_relevance(model, x, None, rule)
        torch.testing.assert_close(logits, model(x), atol=1e-5, rtol=1e-5)
        assert torch.equal(t, model(x).argmax(1))
    with pytest.raises(ValueError, match="softmax rule"):
        input_relevance(model, x, 1, "softmax")


class _Double(torch.autograd.Function):
    """Relevance x 2 backwards: lxt's matmul halves relevance between its operands; with the attention
    probabilities constant (CP-LRP) the values get all of it."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, r):
        return 2 * r


def lxt_relevance(vit: VisionTransformer, x: torch.Tensor, target: int, rule: str) -> torch.Tensor:
    """The pixel relevance of the same timm ViT written with lxt's explicit LRP functions (each op's
    backward passes relevance, not gradients): epsilon rule on linear maps and sums, lxt's LayerNorm
    rule, the identity rule on GELU, AttnLRP's softmax and matmul rules (``rule="uniform"``) or constant
    attention probabilities (``"cp"``)."""
    import lxt.explicit.functional as lf
    from lxt.explicit.rules import identity

    b = x.shape[0]
    patches = F.unfold(x, PATCH, stride=PATCH).transpose(1, 2).detach().requires_grad_()  # B x N x p*p
    proj = vit.patch_embed.proj
    z = lf.linear_epsilon(patches, proj.weight.flatten(1), proj.bias)
    z = torch.cat([vit.cls_token.expand(b, -1, -1).detach(), z], 1)
    z = lf.add2(z, vit.pos_embed.expand(b, -1, -1).detach())
    for blk in vit.blocks:
        h = lf.layer_norm(z, blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
        w, bias = blk.attn.qkv.weight.detach().clone(), blk.attn.qkv.bias.detach().clone()
        w[:WIDTH] *= blk.attn.scale  # the query scaling folded into the projection
        bias[:WIDTH] *= blk.attn.scale
        qkv = lf.linear_epsilon(h, w, bias).reshape(b, -1, 3, HEADS, WIDTH // HEADS).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attention = lf.softmax(lf.matmul(q, k.transpose(-2, -1)), -1)
        if rule == "cp":
            o = _Double.apply(lf.matmul(attention.detach(), v))
        else:
            o = lf.matmul(attention, v)
        o = lf.linear_epsilon(o.transpose(1, 2).reshape(b, -1, WIDTH), blk.attn.proj.weight, blk.attn.proj.bias)
        z = lf.add2(z, o)
        h = lf.layer_norm(z, blk.norm2.weight, blk.norm2.bias, blk.norm2.eps)
        h = identity(F.gelu, lf.linear_epsilon(h, blk.mlp.fc1.weight, blk.mlp.fc1.bias))
        z = lf.add2(z, lf.linear_epsilon(h, blk.mlp.fc2.weight, blk.mlp.fc2.bias))
    z = lf.layer_norm(z, vit.norm.weight, vit.norm.bias, vit.norm.eps)
    y = lf.linear_epsilon(z[:, 0], vit.head.weight, vit.head.bias)
    start = torch.zeros_like(y)
    start[:, target] = y[:, target].detach()
    y.backward(start)
    return F.fold(patches.grad.transpose(1, 2), (SIZE, SIZE), PATCH, stride=PATCH).sum(1)


@pytest.mark.parametrize("rule", ["cp", "uniform"])
def test_same_relevance_as_lxt(rule):
    vit = timm_toy()
    x = torch.randn(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    reference = lxt_relevance(vit, x, 1, rule)
    ours, logits, _ = input_relevance(TimmViTAdapter(vit).eval(), x, 1, rule)
    torch.testing.assert_close(logits, vit(x))
    assert reference.abs().sum() > 0
    # equal up to the stabilisers (epsilon 1e-6 in lxt's denominators)
    torch.testing.assert_close(ours, reference, atol=1e-3 * reference.abs().max().item(), rtol=1e-2)
    assert torch.corrcoef(torch.stack([ours.flatten(), reference.flatten()]))[0, 1] > 0.9999


def test_explainer_cost_and_maps():
    model = monai_toy()
    x = torch.randn(3, 1, 32, 32)
    for name in ("attnlrp", "attnlrp-uniform"):
        e = create(name, model).explain(x, None)
        assert e.saliency.shape == (3, 32, 32) and e.forward_passes == 3 and e.backward_passes == 3
        assert e.saliency.min() == 0 and torch.allclose(e.saliency.flatten(1).amax(1), torch.ones(3))
    relevance, _, _ = input_relevance(model, x, 1, "cp")
    signed = create("attnlrp", model, positive=False).explain(x, 1).saliency
    assert torch.equal(signed.flatten(1).argmin(1), relevance.flatten(1).argmin(1))
