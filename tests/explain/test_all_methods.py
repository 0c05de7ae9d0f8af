"""Every registered explainer on a hand-built ViT that reads exactly one patch.

``spot_vit`` is a timm ViT (32 x 32 input, 8 x 8 patches, 4 x 4 tokens, 2 blocks, 1 head, width 8)
with hand-set weights: the CLS query attends (softmax logit gap ~19) to the token of patch ``SPOT``
only, that token's brightness is the value written into the CLS token, and the head reads it. The
class-1 logit therefore depends on the pixels of that one patch, and every method, attention-based,
gradient-based or perturbation-based, must put its maximum saliency there.
"""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from c2f_med.explain import available, create
from c2f_med.models.vit import TimmViTAdapter, TokenViT

#: the methods the project must provide (spec "Baselines" + C2F and its ablations)
EXPECTED = ["attention", "rollout", "gae", "gradcam", "gradcam-attn", "occlusion", "vitcx", "vitcx-sq",
            "c2f", "c2f-noS3WM", "c2f-noAF", "c2f-first", "legrad", "attnlrp", "attnlrp-uniform", "rise"]
#: where the toy needs other parameters: RISE at C2F's budget (a handful of passes here) is noise, which is
#: what the budget-matched control is for (tests/explain/test_rise.py); with enough masks it finds the spot
PARAMS = {"rise": {"n_masks": 400}}
SPOT = (1, 2)  # token (row, column) the toy reads
GRID, PATCH, SIZE, WIDTH = 4, 8, 32, 8


def _registered() -> list[str]:
    try:
        return available()
    except ImportError:  # an explainer module is not written yet
        return []


METHODS = sorted(set(EXPECTED) | set(_registered()))


def spot_vit() -> TokenViT:
    """Channels of the width-8 tokens: 0 patch mean, 1 constant 1, 2 SPOT marker, 3 CLS marker,
    4 what attention wrote (the value), 5-7 unused. LayerNorms are identity-affine, MLPs zero."""
    vit = VisionTransformer(img_size=SIZE, patch_size=PATCH, in_chans=1, num_classes=2, embed_dim=WIDTH, depth=2,
                            num_heads=1, mlp_ratio=1.0)
    with torch.no_grad():
        for p in vit.parameters():
            p.zero_()
        for m in vit.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.fill_(1)
        vit.patch_embed.proj.weight[0].fill_(1 / PATCH**2)  # channel 0: patch mean
        vit.patch_embed.proj.bias[1] = 1
        vit.pos_embed[0, 1 + SPOT[0] * GRID + SPOT[1], 2] = 1
        vit.cls_token[0, 0, 3] = 1
        for blk in vit.blocks:
            w, b = blk.attn.qkv.weight, blk.attn.qkv.bias  # rows: q 0-7, k 8-15, v 16-23
            w[0, 3] = 10.0  # query: CLS marker (large: a sharp softmax)
            w[8, 2] = 1.0  # key: SPOT marker
            w[16, 0], b[16] = 1.0, 1.0  # value: brightness + 1 (> 0)
            blk.attn.proj.weight[4, 0] = 1.0  # written to channel 4
        vit.head.weight[1, 4], vit.head.bias[1] = 4.0, -4.0 * 1.95  # p_1 ~ 0.87 with a spot, < 0.15 without
    return TimmViTAdapter(vit).eval()


def images(n: int, seed: int) -> torch.Tensor:
    """Noise (sd 0.3) with a 4 x 4 spot of value 3 somewhere inside patch SPOT."""
    g = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.randn(n, 1, SIZE, SIZE, generator=g)
    for i in range(n):
        dr, dc = torch.randint(0, PATCH - 3, (2,), generator=g).tolist()
        r, c = SPOT[0] * PATCH + dr, SPOT[1] * PATCH + dc
        x[i, 0, r: r + 4, c: c + 4] = 3.0
    return x


@pytest.fixture(scope="module")
def model() -> TokenViT:
    return spot_vit()


def _explainer(name: str, model: TokenViT):
    if name not in _registered():
        pytest.skip(f"{name} is not registered yet")
    return create(name, model, **PARAMS.get(name, {}))


def test_toy_reads_the_spot(model):
    x = images(4, 0)
    with torch.no_grad():
        with_spot = model(x).softmax(1)[:, 1]
        x[:, :, SPOT[0] * PATCH: (SPOT[0] + 1) * PATCH, SPOT[1] * PATCH: (SPOT[1] + 1) * PATCH] = 0
        without = model(x).softmax(1)[:, 1]
        elsewhere = images(4, 0)
        elsewhere[:, :, :PATCH] = 0  # blank the first token row: p_1 barely moves
        moved = model(elsewhere).softmax(1)[:, 1]
    assert (with_spot > 0.8).all() and (without < 0.2).all()
    torch.testing.assert_close(moved, with_spot, atol=1e-3, rtol=0)


def test_registry_holds_the_project_methods():
    names = _registered()
    if not names:
        pytest.skip("an explainer module is not written yet")
    assert set(EXPECTED) <= set(names)


@pytest.mark.parametrize("name", METHODS)
def test_maximum_in_the_read_patch(model, name):
    explainer = _explainer(name, model)
    x = images(3, 1)
    e = explainer.explain(x, 1)
    assert e.saliency.shape == (3, SIZE, SIZE)
    assert e.saliency.dtype == torch.float32
    assert 0 <= e.saliency.min() and e.saliency.max() <= 1
    assert e.target.tolist() == [1, 1, 1]
    assert len(e.records) == 3
    assert e.forward_passes >= 3
    peak = e.saliency.flatten(1).argmax(1)
    rows, cols = peak // SIZE // PATCH, peak % SIZE // PATCH
    assert rows.tolist() == [SPOT[0]] * 3 and cols.tolist() == [SPOT[1]] * 3, name


@pytest.mark.parametrize("name", METHODS)
def test_independent_of_batch_composition(model, name):
    explainer = _explainer(name, model)
    x = torch.cat([images(2, 2), 0.3 * torch.randn(1, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(3))])
    together = explainer.explain(x, 1).saliency
    for b in range(x.shape[0]):
        alone = explainer.explain(x[b: b + 1], 1).saliency[0]
        torch.testing.assert_close(alone, together[b], atol=1e-5, rtol=0, msg=f"{name}: slice {b}")
    reordered = explainer.explain(x.flip(0), 1).saliency.flip(0)
    torch.testing.assert_close(reordered, together, atol=1e-5, rtol=0)


def context_spot_vit() -> TokenViT:
    """:func:`spot_vit` as a 2.5-D model (``slice_context = 1``): three channels, a slice between its two
    neighbours, of which it reads the middle one only."""
    flat = spot_vit().model
    vit = VisionTransformer(img_size=SIZE, patch_size=PATCH, in_chans=3, num_classes=2, embed_dim=WIDTH, depth=2,
                            num_heads=1, mlp_ratio=1.0)
    state = flat.state_dict()
    kernel = torch.zeros(WIDTH, 3, PATCH, PATCH)
    kernel[:, 1] = state["patch_embed.proj.weight"][:, 0]
    vit.load_state_dict({**state, "patch_embed.proj.weight": kernel})
    model = TimmViTAdapter(vit).eval()
    model.slice_context = 1
    return model


@pytest.mark.parametrize("name", METHODS)
def test_a_context_model_is_explained_on_its_middle_slice(name):
    """With neighbour channels that hold a spot elsewhere (which the model does not read), every method
    still returns one map per slice with its maximum in the patch the model reads."""
    model = context_spot_vit()
    explainer = _explainer(name, model)
    middle = images(3, 1)
    decoy = images(3, 4).roll(shifts=(PATCH * 2, PATCH), dims=(-2, -1))  # the spot moved two rows, one column
    x = torch.cat([decoy, middle, decoy], 1)
    e = explainer.explain(x, 1)
    assert e.saliency.shape == (3, SIZE, SIZE)
    peak = e.saliency.flatten(1).argmax(1)
    rows, cols = peak // SIZE // PATCH, peak % SIZE // PATCH
    assert rows.tolist() == [SPOT[0]] * 3 and cols.tolist() == [SPOT[1]] * 3, name
