"""LeGrad against torchcam's implementation on the same tiny ViT, and its definition by hand."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torchvision.models.vision_transformer import VisionTransformer as TorchvisionViT

from c2f_med.explain import create
from c2f_med.explain.legrad import legrad_maps
from c2f_med.explain.tokens import token_saliency
from c2f_med.models.vit import LesionViT, TimmViTAdapter

SIZE, PATCH, WIDTH, DEPTH, HEADS, CLASSES = 32, 8, 16, 3, 2, 3


def timm_vit(seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    vit = VisionTransformer(img_size=SIZE, patch_size=PATCH, in_chans=3, num_classes=CLASSES, embed_dim=WIDTH,
                            depth=DEPTH, num_heads=HEADS, mlp_ratio=2.0, qkv_bias=True)
    with torch.no_grad():  # timm initialises the CLS token and the position embedding small: make them matter
        vit.pos_embed.normal_(std=0.5)
        vit.cls_token.normal_(std=0.5)
    return vit.eval()


def torchvision_copy(vit: VisionTransformer) -> TorchvisionViT:
    """The same network as torchvision's ViT (nn.MultiheadAttention blocks, what torchcam's LeGrad reads)."""
    tv = TorchvisionViT(image_size=SIZE, patch_size=PATCH, num_layers=DEPTH, num_heads=HEADS, hidden_dim=WIDTH,
                        mlp_dim=2 * WIDTH, num_classes=CLASSES)
    with torch.no_grad():
        tv.conv_proj.load_state_dict(vit.patch_embed.proj.state_dict())
        tv.class_token.copy_(vit.cls_token)
        tv.encoder.pos_embedding.copy_(vit.pos_embed)
        for layer, blk in zip(tv.encoder.layers, vit.blocks):
            layer.ln_1.load_state_dict(blk.norm1.state_dict())
            layer.ln_2.load_state_dict(blk.norm2.state_dict())
            layer.self_attention.in_proj_weight.copy_(blk.attn.qkv.weight)
            layer.self_attention.in_proj_bias.copy_(blk.attn.qkv.bias)
            layer.self_attention.out_proj.load_state_dict(blk.attn.proj.state_dict())
            layer.mlp[0].load_state_dict(blk.mlp.fc1.state_dict())
            layer.mlp[3].load_state_dict(blk.mlp.fc2.state_dict())
        tv.encoder.ln.load_state_dict(vit.norm.state_dict())
        tv.heads.head.load_state_dict(vit.head.state_dict())
    return tv.eval()


def test_legrad_equals_torchcam_on_the_same_vit():
    from torchcam.methods import LeGrad as TorchcamLeGrad

    vit = timm_vit()
    tv = torchvision_copy(vit)
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    model = TimmViTAdapter(vit).eval()
    torch.testing.assert_close(tv(x), model(x), atol=1e-5, rtol=1e-5)  # the copy is the same network
    target = torch.tensor([0, 2, 1])

    def project(tokens):  # LeGrad's layer score: the CLS token through the final norm and head
        return tv.heads(tv.encoder.ln(tokens[:, 0]))

    with TorchcamLeGrad(tv, list(tv.encoder.layers), score_projection=project) as cam:
        scores = tv(x)
        (reference,) = cam(target.tolist(), scores)  # B x h x w, min-max normalised
    grid = model.grid
    assert reference.shape == (3, *grid)
    ours = create("legrad", model).explain(x, target)
    torch.testing.assert_close(ours.saliency, token_saliency(reference, model.input_size), atol=1e-4, rtol=1e-4)
    r = torch.corrcoef(torch.stack([ours.saliency.flatten(), token_saliency(reference, model.input_size).flatten()]))
    assert r[0, 1] > 0.9999
    assert ours.forward_passes == 3 and ours.backward_passes == 3 * DEPTH


def test_legrad_by_hand_on_a_monai_vit():
    """Layer l's map from a fresh graph per layer: ``s^l`` differentiated w.r.t. ``A^l`` alone."""
    torch.manual_seed(0)
    model = LesionViT(img_size=32, stem_channels=(8, 16), hidden_size=16, mlp_dim=32, num_layers=2, num_heads=2).eval()
    x = torch.randn(2, 1, 32, 32)
    logits, t, maps = legrad_maps(model, x, None)
    assert torch.equal(t, model(x).argmax(1)) and len(maps) == 2
    vit = model.vit
    for layer in range(2):
        rec = {}
        attention = model.attention_modules()[layer]
        hook = attention.register_forward_hook(lambda _m, _i, out, rec=rec: rec.setdefault("a", out))
        z = vit.patch_embedding(model.stem(x))
        z = torch.cat([vit.cls_token.expand(2, -1, -1), z], 1)
        for blk in vit.blocks[: layer + 1]:
            z = blk(z)
        hook.remove()
        score = vit.classification_head(vit.norm(z[:, 0])).gather(1, t.view(-1, 1)).sum()
        (g,) = torch.autograd.grad(score, rec["a"])
        torch.testing.assert_close(maps[layer], g.clamp(min=0).mean((1, 2))[:, 1:])
    assert all((m >= 0).all() for m in maps) and any((m > 0).any() for m in maps)


def test_legrad_from_a_later_layer_and_bad_l0():
    torch.manual_seed(0)
    model = TimmViTAdapter(timm_vit())
    x = torch.randn(1, 3, SIZE, SIZE)
    _, _, all_maps = legrad_maps(model, x, 1)
    _, _, late = legrad_maps(model, x, 1, l0=2)
    assert len(late) == DEPTH - 1
    torch.testing.assert_close(late[0], all_maps[1])
    with pytest.raises(ValueError, match="l0"):
        create("legrad", model, l0=DEPTH + 1).explain(x, 1)
