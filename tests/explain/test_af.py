"""AF against a hand computation (explicit loops, numpy) on a 2-layer toy with known attention and gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from c2f_med.explain.af import fine_map, patch_importance, patch_relation, prototype, token_pool

GRID = (2, 3)  # h x w tokens
P_SIZE = 2  # pixels per token side
SIZE = (4, 6)  # H x W
N = GRID[0] * GRID[1]
T = N + 1
HEADS = 2


@pytest.fixture(scope="module")
def toy():
    rng = np.random.default_rng(0)
    attn, grads = [], []
    for _ in range(2):
        logits = rng.normal(size=(HEADS, T, T))
        a = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        attn.append(a)
        grads.append(rng.normal(size=(HEADS, T, T)))
    coarse = rng.random(SIZE)
    coarse[:2, :2] += 2.0  # a bright corner
    coarse = (coarse - coarse.min()) / (coarse.max() - coarse.min())
    return attn, grads, coarse


def _t(arrays):
    return [torch.tensor(a[None], dtype=torch.float64) for a in arrays]


# ---- the hand computation -------------------------------------------------------------------


def hand_matmul(a, b):
    n, m, k = a.shape[0], b.shape[1], a.shape[1]
    out = np.zeros((n, m))
    for i in range(n):
        for j in range(m):
            for q in range(k):
                out[i, j] += a[i, q] * b[q, j]
    return out


def hand_gae_relation(attn, grads, first_layer=0):
    r = np.eye(T)
    for a, g in list(zip(attn, grads))[first_layer:]:
        fused = np.zeros((T, T))
        for i in range(T):
            for j in range(T):
                fused[i, j] = sum(max(g[h, i, j] * a[h, i, j], 0.0) for h in range(HEADS)) / HEADS
        r = r + hand_matmul(fused, r)
    return r


def hand_rollout(attn):
    r = np.eye(T)
    for a in attn:
        a_hat = np.zeros((T, T))
        for i in range(T):
            for j in range(T):
                a_hat[i, j] = sum(a[h, i, j] for h in range(HEADS)) / HEADS + (1.0 if i == j else 0.0)
            a_hat[i] /= a_hat[i].sum()
        r = hand_matmul(a_hat, r)
    return r


def hand_patch_rows(r):
    p = np.array([[r[i + 1, j + 1] for j in range(N)] for i in range(N)])
    for i in range(N):
        p[i] /= p[i].sum()
    return p


def hand_pool(coarse):
    s = np.zeros(N)
    for ti in range(GRID[0]):
        for tj in range(GRID[1]):
            block = [coarse[ti * P_SIZE + u, tj * P_SIZE + v] for u in range(P_SIZE) for v in range(P_SIZE)]
            s[ti * GRID[1] + tj] = sum(block) / len(block)
    return s


def hand_minmax(v):
    return (v - v.min()) / (v.max() - v.min())


def hand_bilinear(tok):
    """align_corners=False bilinear upsampling of an h x w grid to H x W."""
    h, w = tok.shape
    out = np.zeros(SIZE)
    for y in range(SIZE[0]):
        for x in range(SIZE[1]):
            sy = max((y + 0.5) * h / SIZE[0] - 0.5, 0.0)
            sx = max((x + 0.5) * w / SIZE[1] - 0.5, 0.0)
            y0, x0 = int(np.floor(sy)), int(np.floor(sx))
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            fy, fx = sy - y0, sx - x0
            out[y, x] = ((1 - fy) * (1 - fx) * tok[y0, x0] + (1 - fy) * fx * tok[y0, x1]
                         + fy * (1 - fx) * tok[y1, x0] + fy * fx * tok[y1, x1])
    return out


def hand_importance(p, s):
    f = np.zeros(N)
    for j in range(N):
        f += s[j] * p[j]
    f /= s.sum()
    t = np.array([np.dot(p[i], f) / (np.sqrt(np.dot(p[i], p[i])) * np.sqrt(np.dot(f, f))) for i in range(N)])
    return f, hand_minmax(t)


# ---- the tests ------------------------------------------------------------------------------


def test_gae_relation_matches_hand(toy):
    attn, grads, _ = toy
    p = patch_relation(_t(attn), _t(grads), "gae")[0].numpy()
    want = hand_patch_rows(hand_gae_relation(attn, grads))
    np.testing.assert_allclose(p, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(p.sum(1), np.ones(N), atol=1e-12)


def test_layer_start_l0(toy):
    attn, grads, _ = toy
    p = patch_relation(_t(attn), _t(grads), "gae", l0=2)[0].numpy()
    np.testing.assert_allclose(p, hand_patch_rows(hand_gae_relation(attn, grads, first_layer=1)), atol=1e-12)
    assert not np.allclose(p, hand_patch_rows(hand_gae_relation(attn, grads)))
    with pytest.raises(ValueError):
        patch_relation(_t(attn), _t(grads), "gae", l0=3)


def test_rollout_relations_match_hand(toy):
    attn, _, _ = toy
    last = patch_relation(_t(attn), None, "rollout-last")[0].numpy()
    np.testing.assert_allclose(last, hand_patch_rows(hand_rollout(attn[-1:])), atol=1e-12)
    full = patch_relation(_t(attn), None, "rollout-all")[0].numpy()
    np.testing.assert_allclose(full, hand_patch_rows(hand_rollout(attn)), atol=1e-12)
    with pytest.raises(ValueError):
        patch_relation(_t(attn), None, "gae")  # GAE needs gradients


def test_prototype_importance_and_fine_map_match_hand(toy):
    attn, grads, coarse = toy
    p_hand = hand_patch_rows(hand_gae_relation(attn, grads))
    s_hand = hand_pool(coarse)
    f_hand, t_hand = hand_importance(p_hand, s_hand)

    p = torch.tensor(p_hand[None])
    ec = torch.tensor(coarse[None])
    s = token_pool(ec, P_SIZE)
    np.testing.assert_allclose(s[0].numpy(), s_hand, atol=1e-12)
    np.testing.assert_allclose(prototype(p, s)[0].numpy(), f_hand, atol=1e-12)
    np.testing.assert_allclose(patch_importance(p, s)[0].numpy(), t_hand, atol=1e-12)

    fine = fine_map(ec, patch_relation(_t(attn), _t(grads)), GRID, P_SIZE)[0].numpy()
    want = hand_minmax(coarse * hand_bilinear(t_hand.reshape(GRID)))
    np.testing.assert_allclose(fine, want, atol=1e-10)
    assert fine.min() == 0 and fine.max() == pytest.approx(1.0)


def test_propagate_and_mix_match_hand(toy):
    attn, grads, coarse = toy
    p_hand = hand_patch_rows(hand_gae_relation(attn, grads))
    spread = hand_matmul(p_hand, hand_pool(coarse)[:, None])[:, 0].reshape(GRID)
    p, ec = torch.tensor(p_hand[None]), torch.tensor(coarse[None])
    prop = fine_map(ec, p, GRID, P_SIZE, refine="propagate")[0].numpy()
    np.testing.assert_allclose(prop, hand_minmax(hand_bilinear(spread)), atol=1e-10)
    mix = fine_map(ec, p, GRID, P_SIZE, refine="mix", mix_lambda=0.5)[0].numpy()
    np.testing.assert_allclose(mix, hand_minmax(coarse + 0.5 * hand_bilinear(spread)), atol=1e-10)
    with pytest.raises(ValueError):
        fine_map(ec, p, GRID, P_SIZE, refine="sharpen")


def test_zero_coarse_map_stays_zero(toy):
    attn, grads, _ = toy
    fine = fine_map(torch.zeros(1, *SIZE, dtype=torch.float64), patch_relation(_t(attn), _t(grads)), GRID, P_SIZE)
    assert torch.all(fine == 0)


def test_contrast_and_cls_importance_match_hand(toy):
    attn, grads, coarse = toy
    r_hand = hand_gae_relation(attn, grads)
    p_hand = hand_patch_rows(r_hand)
    s_hand = hand_pool(coarse)
    cos = lambda a, b: np.dot(a, b) / (np.sqrt(np.dot(a, a)) * np.sqrt(np.dot(b, b)))  # noqa: E731
    f = sum(s_hand[j] * p_hand[j] for j in range(N)) / s_hand.sum()
    w = 1 - s_hand / s_hand.max()
    g = sum(w[j] * p_hand[j] for j in range(N)) / w.sum()
    want = hand_minmax(np.array([cos(p_hand[i], f) - cos(p_hand[i], g) for i in range(N)]))
    p, s = torch.tensor(p_hand[None]), torch.tensor(s_hand[None])
    np.testing.assert_allclose(patch_importance(p, s, "contrast")[0].numpy(), want, atol=1e-12)

    cls_row = torch.tensor(r_hand[None, 0, 1:])
    got = patch_importance(p, s, "cls", cls_row)[0].numpy()
    np.testing.assert_allclose(got, hand_minmax(r_hand[0, 1:]), atol=1e-12)
    fine = fine_map(torch.tensor(coarse[None]), p, GRID, P_SIZE, importance="cls", cls_row=cls_row)[0].numpy()
    np.testing.assert_allclose(
        fine, hand_minmax(coarse * hand_bilinear(hand_minmax(r_hand[0, 1:]).reshape(GRID))), atol=1e-10
    )
    with pytest.raises(ValueError, match="CLS row"):
        patch_importance(p, s, "cls")
    with pytest.raises(ValueError, match="unknown importance"):
        patch_importance(p, s, "prototype")
