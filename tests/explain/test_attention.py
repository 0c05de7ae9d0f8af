"""Attention baselines against hand computations on a toy with known attention (and gradients)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.transform import resize
from timm.models.vision_transformer import VisionTransformer

from c2f_med.explain.attention import AttentionRollout, GenericAttention, RawAttention
from c2f_med.explain.gradcam import AttentionGradCAM, GradCAM
from c2f_med.explain.tokens import minmax, token_saliency
from c2f_med.models.vit import TimmViTAdapter, TokenOutputs, TokenViT

B, HEADS, GRID, D, LAYERS = 2, 3, (2, 3), 4, 2
N = GRID[0] * GRID[1]


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


class KnownViT(TokenViT):
    """A TokenViT whose :meth:`run` returns given attention, tokens and gradients.

    ``patch_size = 1``, so token maps are already on the input grid (upsampling is the identity)
    and the saliency is the min-max of the token map.
    """

    def __init__(self, seed: int = 0):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.input_size, self.patch_size, self.num_classes, self.num_heads = GRID, 1, 2, HEADS
        t = N + 1
        self.att = [_softmax(3 * rng.normal(size=(B, HEADS, t, t))) for _ in range(LAYERS)]
        self.att_grad = [rng.normal(size=(B, HEADS, t, t)) for _ in range(LAYERS)]
        self.tok = rng.normal(size=(B, N, D))
        self.tok_grad = rng.normal(size=(B, N, D))
        self.logits = rng.normal(size=(B, 2))
        self.targets: list = []

    def attention_modules(self):
        return [None] * LAYERS

    def run(self, x, *, tokens=False, attentions=False, target=None):
        self.targets.append(None if target is None else target.tolist())
        f = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
        out = TokenOutputs(logits=f(self.logits))
        if attentions:
            out.attentions = [f(a) for a in self.att]
        if tokens:
            out.tokens = f(self.tok)
        if target is not None:
            out.attention_grads = [f(g) for g in self.att_grad] if attentions else None
            out.token_grads = f(self.tok_grad) if tokens else None
        return out


def tiny_timm() -> TokenViT:
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, in_chans=1, num_classes=2, embed_dim=32, depth=2, num_heads=2)
    return TimmViTAdapter(vit).eval()


def _norm(m: np.ndarray) -> np.ndarray:
    m = m.reshape(m.shape[0], -1)
    m = (m - m.min(1, keepdims=True)) / (m.max(1, keepdims=True) - m.min(1, keepdims=True))
    return m.reshape(B, *GRID)


@pytest.fixture
def toy() -> KnownViT:
    return KnownViT()


def test_raw_attention_by_hand(toy):
    x = torch.zeros(B, 1, *GRID)
    e = RawAttention(toy).explain(x)
    hand = toy.att[-1].mean(1)[:, 0, 1:]
    np.testing.assert_allclose(e.saliency.numpy(), _norm(hand), atol=1e-5)
    assert e.target.tolist() == toy.logits.argmax(1).tolist()
    assert (e.forward_passes, e.backward_passes) == (B, 0)


def test_rollout_by_hand(toy):
    e = AttentionRollout(toy).explain(torch.zeros(B, 1, *GRID), 1)
    eye = np.eye(N + 1)
    r = eye
    for a in toy.att:
        a_hat = a.mean(1) + eye
        a_hat = a_hat / a_hat.sum(-1, keepdims=True)
        r = a_hat @ r
    np.testing.assert_allclose(e.saliency.numpy(), _norm(r[:, 0, 1:]), atol=1e-5)
    assert (e.forward_passes, e.backward_passes) == (B, 0)
    assert e.target.tolist() == [1, 1]


def test_gae_by_hand(toy):
    e = GenericAttention(toy).explain(torch.zeros(B, 1, *GRID), torch.tensor([1, 0]))
    r = np.broadcast_to(np.eye(N + 1), (B, N + 1, N + 1))
    for a, g in zip(toy.att, toy.att_grad):
        a_bar = np.maximum(a * g, 0).mean(1)
        r = r + a_bar @ r
    np.testing.assert_allclose(e.saliency.numpy(), _norm(r[:, 0, 1:]), atol=1e-5)
    assert toy.targets == [[1, 0]]  # the gradient was taken for the given classes, in one pass
    assert (e.forward_passes, e.backward_passes) == (B, B)


def test_gae_predicted_class_costs_one_more_forward():
    model = tiny_timm()
    e = GenericAttention(model).explain(torch.randn(3, 1, 32, 32))
    assert (e.forward_passes, e.backward_passes) == (6, 3)


def test_gradcam_by_hand(toy):
    e = GradCAM(toy).explain(torch.zeros(B, 1, *GRID), 1)
    w = toy.tok_grad.mean(1, keepdims=True)
    cam = np.maximum((w * toy.tok).sum(-1), 0)
    np.testing.assert_allclose(e.saliency.numpy(), _norm(cam), atol=1e-5)
    assert (e.forward_passes, e.backward_passes) == (B, B)


def test_attention_gradcam_by_hand(toy):
    e = AttentionGradCAM(toy).explain(torch.zeros(B, 1, *GRID), 1)
    a, g = toy.att[-1][:, :, 0, 1:], toy.att_grad[-1][:, :, 0, 1:]
    cam = np.maximum((g.mean(-1, keepdims=True) * a).mean(1), 0)
    np.testing.assert_allclose(e.saliency.numpy(), _norm(cam), atol=1e-5)


def test_token_saliency_is_bilinear_then_minmax():
    rng = np.random.default_rng(1)
    maps = rng.random((2, 3, 4)).astype(np.float32)
    got = token_saliency(torch.from_numpy(maps), (12, 16)).numpy()
    ref = np.stack([resize(m, (12, 16), order=1, mode="edge", anti_aliasing=False) for m in maps])
    np.testing.assert_allclose(got, _norm2(ref), atol=1e-5)


def _norm2(m: np.ndarray) -> np.ndarray:
    lo, hi = m.min((1, 2), keepdims=True), m.max((1, 2), keepdims=True)
    return (m - lo) / (hi - lo)


def test_minmax_constant_map_is_zero():
    maps = torch.stack([torch.full((3, 3), 2.0), torch.arange(9.0).reshape(3, 3)])
    out = minmax(maps)
    assert out[0].eq(0).all() and out[1].min() == 0 and out[1].max() == 1
