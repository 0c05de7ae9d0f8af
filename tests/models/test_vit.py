"""TokenViT adapters: documented shapes, attention rows, gradients against finite differences."""

import pytest
import timm
import torch

from c2f_med.models.vit import LesionViT, LocalContrast, MonaiViTAdapter, TimmViTAdapter


def tiny_monai() -> LesionViT:
    torch.manual_seed(0)
    return LesionViT(img_size=32, stem_channels=(8, 16), hidden_size=32, mlp_dim=64, num_layers=2, num_heads=2).eval()


def tiny_timm() -> TimmViTAdapter:
    torch.manual_seed(0)
    net = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, in_chans=1, num_classes=2, embed_dim=32, depth=2, num_heads=2)
    return TimmViTAdapter(net).eval()


ADAPTERS = {"monai": tiny_monai, "timm": tiny_timm}


@pytest.mark.parametrize("name", ADAPTERS)
def test_shapes_and_attention_rows(name):
    model = ADAPTERS[name]()
    x = torch.randn(3, 1, 32, 32)
    out = model.run(x, tokens=True, attentions=True, target=torch.tensor([0, 1, 1]))
    h, w = model.grid
    n = h * w
    assert out.logits.shape == (3, 2)
    assert out.tokens.shape[:2] == (3, n) and out.token_grads.shape == out.tokens.shape
    assert len(out.attentions) == model.num_layers == 2
    for a, g in zip(out.attentions, out.attention_grads):
        assert a.shape == (3, model.num_heads, n + 1, n + 1) == g.shape
        torch.testing.assert_close(a.sum(-1), torch.ones(3, model.num_heads, n + 1))
    torch.testing.assert_close(out.logits, model(x))  # recording changes nothing


def test_stem_depth_adds_stride_one_convs():
    torch.manual_seed(0)
    deep = LesionViT(img_size=32, stem_channels=(8, 16), stem_depth=3, hidden_size=32, mlp_dim=64, num_layers=2,
                     num_heads=2).eval()
    convs = [m for m in deep.stem if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride[0] for c in convs] == [2, 1, 1, 2, 1, 1]
    assert [c.out_channels for c in convs] == [8, 8, 8, 16, 16, 16]
    assert deep.stem(torch.randn(2, 1, 32, 32)).shape == (2, 16, 8, 8)
    assert deep.patch_size == 4 and deep.grid == (8, 8)
    with pytest.raises(ValueError, match="depth"):
        LesionViT(img_size=32, stem_channels=(8, 16), stem_depth=0)


def test_grid_and_patch_size():
    model = tiny_monai()
    assert model.patch_size == 4 and model.grid == (8, 8)
    assert tiny_timm().grid == (4, 4)


@pytest.mark.parametrize("name", ADAPTERS)
def test_attention_gradient_matches_finite_difference(name):
    """<dy/dA, E> from run() equals (y(A + eps E) - y(A - eps E)) / 2 eps with A perturbed in the forward."""
    model = ADAPTERS[name]().double()
    x = torch.randn(2, 1, 32, 32, dtype=torch.float64)
    target = torch.tensor([1, 0])
    out = model.run(x, attentions=True, target=target)
    layer = 0
    direction = torch.randn_like(out.attentions[layer])
    predicted = (out.attention_grads[layer] * direction).sum()

    def score(eps: float) -> torch.Tensor:
        module = model.attention_modules()[layer]
        handle = module.register_forward_hook(lambda m, i, o: o + eps * direction)
        try:
            with torch.no_grad():
                logits = model(x)
        finally:
            handle.remove()
        return logits.gather(1, target.view(-1, 1)).sum()

    eps = 1e-6
    numeric = (score(eps) - score(-eps)) / (2 * eps)
    torch.testing.assert_close(predicted, numeric, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", ADAPTERS)
def test_token_gradient_matches_autograd(name):
    """token_grads equal autograd's gradient of the target logit w.r.t. the last block's norm1 output."""
    model = ADAPTERS[name]().double()
    x = torch.randn(2, 1, 32, 32, dtype=torch.float64)
    target = torch.tensor([0, 1])
    out = model.run(x, tokens=True, target=target)
    kept = {}
    handle = model.last_norm().register_forward_hook(lambda m, i, o: kept.setdefault("t", o))
    try:
        logits = model(x)
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(logits.gather(1, target.view(-1, 1)).sum(), kept["t"])
    torch.testing.assert_close(out.token_grads, grad[:, 1:])


def test_each_slice_gets_its_own_gradient():
    model = tiny_monai()
    x = torch.randn(3, 1, 32, 32)
    both = model.run(x, attentions=True, target=torch.tensor([1, 1, 1]))
    alone = model.run(x[1:2], attentions=True, target=torch.tensor([1]))
    torch.testing.assert_close(both.attention_grads[1][1:2], alone.attention_grads[1], rtol=1e-4, atol=1e-6)


def test_monai_adapter_refuses_tanh_head():
    from monai.networks.nets import ViT

    vit = ViT(in_channels=1, img_size=(32, 32), patch_size=(8, 8), hidden_size=32, mlp_dim=64, num_layers=1,
              num_heads=2, classification=True, num_classes=2, spatial_dims=2)  # default Tanh head
    with pytest.raises(ValueError, match="post_activation=None"):
        MonaiViTAdapter(vit, (32, 32))


def test_position_embeddings_are_resampled_to_another_input_size():
    """A 32 px network's weights load into a 48 px one: every other weight kept, the 8 x 8 position
    grid resized to 12 x 12 (a smooth resampling: its mean barely moves)."""
    from c2f_med.models.vit import POSITION_KEY, resample_position_embeddings

    small = tiny_monai()
    torch.manual_seed(1)
    large = LesionViT(img_size=48, stem_channels=(8, 16), hidden_size=32, mlp_dim=64, num_layers=2, num_heads=2)
    state = resample_position_embeddings(small.state_dict(), large)
    large.load_state_dict(state)
    old, new = small.state_dict()[POSITION_KEY], state[POSITION_KEY]
    assert old.shape == (1, 64, 32) and new.shape == (1, 144, 32)
    torch.testing.assert_close(new.mean(), old.mean(), atol=0.02, rtol=0)
    same = {k for k in state if k != POSITION_KEY}
    assert all(torch.equal(state[k], small.state_dict()[k]) for k in same)
    assert torch.equal(resample_position_embeddings(small.state_dict(), small)[POSITION_KEY], old)


def test_local_contrast_reads_a_lesion_against_its_surroundings():
    """A bump 30 % above flat tissue reads positive at its centre and negative just outside it, flat
    tissue reads 0, and once the step is well above sqrt(eps) the reading no longer depends on the
    tissue's own level (divisive normalisation); the raw slice is kept as the first channel."""
    lc = LocalContrast(sigma=3.0)
    centre = {}
    for level in (0.2, 3.0, 10.0):
        x = torch.full((1, 1, 48, 48), level)
        x[..., 20:26, 20:26] *= 1.3
        y = lc(x)
        assert y.shape == (1, 2, 48, 48) and torch.equal(y[:, :1], x)
        assert abs(float(y[0, 1, 2, 2])) < 1e-4 and float(y[0, 1, 18, 23]) < 0
        centre[level] = float(y[0, 1, 23, 23])
    assert 0 < centre[0.2] < centre[3.0]  # a faint step is damped by eps
    assert centre[3.0] == pytest.approx(centre[10.0], abs=0.05)
    x = 2 + torch.randn(1, 1, 48, 48, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(lc(x)[:, 1], lc(3 * x)[:, 1], atol=0.02)


def test_lesion_vit_with_local_contrast_keeps_one_input_channel_and_a_plain_state_dict():
    net = LesionViT(img_size=32, stem_channels=(8, 16), hidden_size=32, mlp_dim=64, num_layers=2, num_heads=2,
                    local_contrast_sigma=2.0)
    assert net(torch.randn(2, 1, 32, 32)).shape == (2, 2)
    state = net.state_dict()
    assert not any("kernel" in k for k in state)  # no weights of its own
    assert state["stem.1.weight"].shape[1] == 2  # the first conv sees slice and contrast
    with pytest.raises(ValueError, match="stem"):
        LesionViT(stem_channels=(), local_contrast_sigma=2.0)


def test_weights_without_local_contrast_fine_tune_a_network_with_it_from_the_same_function():
    """Weights of a plain network load into one with the local-contrast layer (keys moved, zero kernels
    for the contrast channels): the logits are the same, the new kernels get a gradient, and a
    state dict that already fits is left alone."""
    from c2f_med.models.vit import fit_state_dict

    plain = tiny_monai()
    torch.manual_seed(1)
    net = LesionViT(img_size=32, stem_channels=(8, 16), hidden_size=32, mlp_dim=64, num_layers=2, num_heads=2,
                    local_contrast_sigma=2.0)
    state = fit_state_dict(plain.state_dict(), net)
    net.load_state_dict(state)
    net.eval()
    x = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(net(x), plain(x))
    assert not torch.any(state["stem.1.weight"][:, 1:]) and torch.equal(state["stem.1.weight"][:, :1],
                                                                         plain.state_dict()["stem.0.weight"])
    net(x)[:, 1].sum().backward()
    assert torch.any(net.stem[1].weight.grad[:, 1:] != 0)
    fitting = net.state_dict()
    assert fit_state_dict(fitting, net) is fitting


@pytest.mark.parametrize("sigma", [0.0, 2.0])
def test_2d_weights_fine_tune_a_context_network_from_the_same_function(sigma):
    """Weights of a 2-D network (with or without local contrast) load into a 2.5-D one: the first kernel
    keeps the old weights on the middle slice's channels and zeros on the neighbours', so the logits
    equal the 2-D network's on the middle slice whatever the neighbours hold, and the neighbour kernels
    get a gradient."""
    from c2f_med.models.vit import fit_state_dict

    kw = dict(img_size=32, stem_channels=(8, 16), hidden_size=32, mlp_dim=64, num_layers=2, num_heads=2,
              local_contrast_sigma=sigma)
    torch.manual_seed(0)
    flat = LesionViT(**kw).eval()
    net = LesionViT(**kw, context_slices=2)
    assert net.slice_context == 2 and flat.slice_context == 0
    state = fit_state_dict(flat.state_dict(), net)
    net.load_state_dict(state)
    net.eval()
    g = torch.Generator().manual_seed(3)
    middle, neighbours = torch.randn(2, 1, 32, 32, generator=g), torch.randn(2, 4, 32, 32, generator=g)
    x = torch.cat([neighbours[:, :2], middle, neighbours[:, 2:]], 1)
    torch.testing.assert_close(net(x), flat(middle))
    first = next(m for m in net.stem.modules() if isinstance(m, torch.nn.Conv2d))
    groups = 2 if sigma else 1
    assert first.in_channels == 5 * groups
    kernel = first.weight.detach().view(first.out_channels, groups, 5, 3, 3)
    assert not torch.any(kernel[:, :, [0, 1, 3, 4]])
    net(x)[:, 1].sum().backward()
    assert torch.any(first.weight.grad.view(first.out_channels, groups, 5, 3, 3)[:, :, [0, 1, 3, 4]] != 0)
    fitting = net.state_dict()
    assert fit_state_dict(fitting, net) is fitting
    with pytest.raises(ValueError, match="context_slices"):
        LesionViT(**kw, context_slices=-1)
