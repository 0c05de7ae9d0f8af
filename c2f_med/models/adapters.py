"""Put a researcher's own 2D ViT slice classifier behind the :class:`~c2f_med.models.vit.TokenViT` interface.

:func:`wrap_model` recognises three families of Vision Transformer and wraps the network with
:class:`BackboneViT`, which records what the explainers need through hooks, without changing the
network's weights or its outputs:

============================================  ==================================  =========================
family                                        attention probabilities (hooked)    last block's ``norm1``
============================================  ==================================  =========================
``monai.networks.nets.ViT`` (2D,              ``blocks[i].attn.drop_weights``     ``blocks[-1].norm1``
``classification=True``)                      (flash attention switched off)
timm ``VisionTransformer`` (one class token,  ``blocks[i].attn.attn_drop``        ``blocks[-1].norm1``
``global_pool='token'``)                      (fused attention switched off)
``torchvision.models.VisionTransformer``      ``nn.MultiheadAttention`` computed  ``layers[-1].ln_1``
                                              explicitly (:class:`ExplicitAttention`)
============================================  ==================================  =========================

The ViT may also sit inside a larger module (e.g. behind a preprocessing stem): name it with
``backbone_attr`` (a dotted submodule path). The wrapper then runs the whole network and hooks the
named ViT; one token covers ``input / token grid`` input pixels.

The explainers feed single-channel slices in the pipeline's normalisation
(:func:`c2f_med.slices.normalise_input` of the intensity preset's [0, 1]). :class:`InputMap` turns
them into what the network was trained on: the preset's [0, 1] mapped linearly onto the model's
``value_range`` and the gray channel repeated to its channel count. Because the repeat is part of
the forward pass, gradients and saliency come back on the single gray channel.

Anything else (a CNN, a 3D ViT, extra prefix tokens, pooling that bypasses the class token) is
refused with :class:`UnsupportedModel`, whose message says what was found and what is needed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from c2f_med.models.vit import TokenViT
from c2f_med.slices import INPUT_MEAN, INPUT_STD, repeat_channels

__all__ = ["UnsupportedModel", "ModelInput", "InputMap", "ExplicitAttention", "BackboneViT", "wrap_model",
           "NEEDED"]

#: what :func:`wrap_model` accepts, for error messages
NEEDED = ("a 2D Vision Transformer classifier: monai.networks.nets.ViT(spatial_dims=2, classification=True), "
          "a timm VisionTransformer with one class token, or torchvision.models.VisionTransformer")


class UnsupportedModel(ValueError):
    """The network is not a ViT classifier that c2f_med can explain; the message says why."""


@dataclass(frozen=True)
class ModelInput:
    """What the network takes, from the bundle's ``network_data_format.inputs``.

    Attributes:
        channels: ``num_channels`` (the gray slice is repeated to it).
        spatial_shape: ``(H, W)``, or ``None`` to use the ViT's own image size.
        value_range: ``(lo, hi)``: the intensity preset's [0, 1] is mapped linearly onto it; ``None``
            feeds the pipeline's normalisation ``(x - 0.25) / 0.3`` unchanged.
    """

    channels: int = 1
    spatial_shape: tuple[int, int] | None = None
    value_range: tuple[float, float] | None = None


class InputMap(nn.Module):
    """``B x 1 x H x W`` slices in the pipeline's normalisation -> ``B x C x H x W`` model input.

    ``y = lo + (hi - lo) * (x * 0.3 + 0.25)`` (the preset's [0, 1] onto ``[lo, hi]``), then the channel
    repeated ``C`` times. Without a ``value_range`` the intensities pass unchanged.
    """

    def __init__(self, channels: int = 1, value_range: Sequence[float] | None = None):
        super().__init__()
        self.channels = int(channels)
        if value_range is None:
            self.scale, self.shift = 1.0, 0.0
        else:
            lo, hi = (float(v) for v in value_range)
            self.scale, self.shift = (hi - lo) * INPUT_STD, lo + (hi - lo) * INPUT_MEAN

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0 or self.shift != 0.0:
            x = x * self.scale + self.shift
        return repeat_channels(x, self.channels)


class ExplicitAttention(nn.Module):
    """``nn.MultiheadAttention`` self-attention computed step by step, so its probabilities exist.

    PyTorch's attention either never forms the probability matrix (fused kernels) or returns an
    averaged copy that the output does not depend on. This module shares the wrapped module's
    parameters under the same names (its state dict keys are unchanged) and computes
    ``softmax(q k^T / sqrt(d)) v`` with ``attn_drop`` after the softmax: its output is the matrix
    that multiplies the values, the one hooked. Called like the original (``query, key, value,
    need_weights=...``) for self-attention (``query is key is value``); returns ``(output, None)``.
    """

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise UnsupportedModel("its nn.MultiheadAttention has separate key/value sizes or extra key/value "
                                   "biases; needed: plain self-attention (one in_proj_weight)")
        self.in_proj_weight = mha.in_proj_weight
        self.in_proj_bias = mha.in_proj_bias
        self.out_proj = mha.out_proj
        self.num_heads = mha.num_heads
        self.batch_first = mha.batch_first
        self.attn_drop = nn.Dropout(mha.dropout)
        self.qkv = nn.Identity()  # the Q, K, V projection's output, for hooks (no parameters of its own)

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None, value: torch.Tensor | None = None,
                need_weights: bool = False, **_: object) -> tuple[torch.Tensor, None]:
        x = query if self.batch_first else query.transpose(0, 1)  # B x N x D
        b, n, d = x.shape
        qkv = self.qkv(F.linear(x, self.in_proj_weight, self.in_proj_bias)).view(b, n, 3, self.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each B x H x N x d_h
        attn = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        attn = self.attn_drop(attn.softmax(-1))
        out = self.out_proj((attn @ v).transpose(1, 2).reshape(b, n, d))
        return (out if self.batch_first else out.transpose(0, 1)), None


@dataclass
class _Layout:
    """What a family found in a ViT: hook points and sizes (``tokens`` patch tokens, one class token)."""

    attention: list[nn.Module]
    last_norm: nn.Module
    blocks: list[nn.Module]
    readout: Callable[[torch.Tensor], torch.Tensor]  # B x T x D tokens after the last block -> B x C logits
    tokens: int
    num_heads: int
    in_channels: int
    image_size: tuple[int, int]


def _monai(vit: nn.Module) -> _Layout:
    embed = vit.patch_embedding
    proj = embed.patch_embeddings
    if isinstance(proj, nn.Sequential):  # "perceptron": Rearrange then Linear
        patch = [v for k, v in proj[0].axes_lengths.items() if k.startswith("p")]
        channels = proj[1].in_features // math.prod(patch)
    else:
        patch, channels = list(proj.kernel_size), proj.in_channels
    if len(patch) != 2:
        raise UnsupportedModel(f"found a {len(patch)}D monai.networks.nets.ViT (spatial_dims={len(patch)}); "
                               "needed: spatial_dims=2 (slices are explained one at a time)")
    if not getattr(vit, "classification", False):
        raise UnsupportedModel("found a monai.networks.nets.ViT built with classification=False (no class "
                               "scores); needed: classification=True")
    for blk in vit.blocks:
        blk.attn.use_flash_attention = False  # else the probabilities are never formed
    n = int(embed.n_patches)
    side = math.isqrt(n)
    return _Layout([blk.attn.drop_weights for blk in vit.blocks], vit.blocks[-1].norm1, list(vit.blocks),
                   partial(_monai_readout, vit), n, vit.blocks[0].attn.num_heads, int(channels),
                   (side * patch[0], side * patch[1]))


def _monai_readout(vit: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return vit.classification_head(vit.norm(tokens)[:, 0])


def _timm(vit: nn.Module) -> _Layout:
    prefix = int(getattr(vit, "num_prefix_tokens", 1))
    if getattr(vit, "cls_token", None) is None:
        raise UnsupportedModel("found a timm VisionTransformer without a class token (class_token=False); "
                               "needed: one class token that feeds the head")
    if prefix != 1:
        raise UnsupportedModel(f"found a timm {type(vit).__name__} with {prefix} prefix tokens (class token plus "
                               "register or distillation tokens); needed: exactly one class token")
    if getattr(vit, "global_pool", "token") != "token":
        raise UnsupportedModel(f"found a timm VisionTransformer with global_pool={vit.global_pool!r}; needed: "
                               "global_pool='token' (the class token feeds the head)")
    for blk in vit.blocks:
        attn = getattr(blk, "attn", None)
        if not (hasattr(attn, "fused_attn") and isinstance(getattr(attn, "attn_drop", None), nn.Module)):
            raise UnsupportedModel(f"found a timm VisionTransformer whose block attention "
                                   f"({type(attn).__name__}) cannot switch off fused attention; needed: timm's "
                                   "Attention with fused_attn and attn_drop")
        attn.fused_attn = False  # else the probabilities are never formed
    embed = vit.patch_embed
    proj = embed.proj
    return _Layout([blk.attn.attn_drop for blk in vit.blocks], vit.blocks[-1].norm1, list(vit.blocks),
                   partial(_timm_readout, vit), int(embed.num_patches), vit.blocks[0].attn.num_heads,
                   int(proj.in_channels), tuple(int(s) for s in embed.img_size))


def _timm_readout(vit: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return vit.forward_head(vit.norm(tokens))


def _torchvision(vit: nn.Module) -> _Layout:
    layers = list(vit.encoder.layers)
    for layer in layers:
        if not isinstance(layer.self_attention, ExplicitAttention):
            layer.self_attention = ExplicitAttention(layer.self_attention)
    proj = vit.conv_proj
    first = proj if isinstance(proj, nn.Conv2d) else next(m for m in proj.modules() if isinstance(m, nn.Conv2d))
    n = (vit.image_size // vit.patch_size) ** 2
    return _Layout([layer.self_attention.attn_drop for layer in layers], layers[-1].ln_1, layers,
                   partial(_torchvision_readout, vit), n, layers[0].self_attention.num_heads,
                   int(first.in_channels), (vit.image_size, vit.image_size))


def _torchvision_readout(vit: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return vit.heads(vit.encoder.ln(tokens)[:, 0])


def _family(module: nn.Module):
    """The layout function for ``module``'s family, or ``None``."""
    from monai.networks.nets import ViT as MonaiViT

    if isinstance(module, MonaiViT):
        return _monai
    try:
        from timm.models.vision_transformer import VisionTransformer as TimmViT
    except ImportError:  # timm is optional for users of the other families
        TimmViT = ()  # noqa: N806
    if TimmViT and isinstance(module, TimmViT):
        return _timm
    from torchvision.models import VisionTransformer as TvViT

    if isinstance(module, TvViT):
        return _torchvision
    return None


def _logits(out: object) -> torch.Tensor:
    """The class scores in a network's output: the tensor itself, or the first item of a tuple / list
    (MONAI's ViT returns ``(logits, hidden_states)``)."""
    while isinstance(out, (tuple, list)) and out:
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UnsupportedModel(f"its output is {shape}; needed: B x C class scores (or a tuple starting with them)")
    return out


class BackboneViT(TokenViT):
    """A network with a standard ViT inside (or itself one), recorded through hooks.

    Args:
        net: the whole network ``B x C_in x H x W -> B x C`` (its output may be a tuple led by the scores).
        backbone: dotted path of the ViT inside ``net`` (``""``: ``net`` is the ViT).
        model_input: channels, input shape and value range (:class:`ModelInput`).

    Raises:
        UnsupportedModel: no recognised ViT at ``backbone``, or sizes that do not fit.
    """

    def __init__(self, net: nn.Module, backbone: str = "", model_input: ModelInput = ModelInput()):
        super().__init__()
        vit = net.get_submodule(backbone) if backbone else net
        family = _family(vit)
        if family is None:
            raise UnsupportedModel(_not_a_vit(vit, backbone))
        layout = family(vit)
        self.net = net
        self.backbone = backbone
        self.family = family.__name__.lstrip("_")
        self._attention, self._last_norm = layout.attention, layout.last_norm
        self._blocks, self._readout = layout.blocks, layout.readout
        if backbone and model_input.spatial_shape is None:
            raise UnsupportedModel(f"the ViT sits inside the network at {backbone!r}: declare the network's input "
                                   "size in metadata.json (network_data_format.inputs.image.spatial_shape)")
        size = model_input.spatial_shape or layout.image_size
        self.input_size = (int(size[0]), int(size[1]))
        self.patch_size = _patch_size(self.input_size, layout.tokens)
        channels = model_input.channels if backbone else layout.in_channels
        if not backbone and model_input.channels not in (1, layout.in_channels):
            raise UnsupportedModel(f"metadata declares {model_input.channels} input channels but the ViT takes "
                                   f"{layout.in_channels}")
        self.input_map = InputMap(channels, model_input.value_range)
        self.in_channels = channels
        self.num_heads = int(layout.num_heads)
        self.num_classes = self._probe()

    def attention_modules(self) -> Sequence[nn.Module]:
        return self._attention

    def last_norm(self) -> nn.Module:
        return self._last_norm

    def blocks(self) -> Sequence[nn.Module]:
        return self._blocks

    def readout(self, tokens: torch.Tensor) -> torch.Tensor:
        """The ViT's own final norm and head on the class token (a wrapper's layers after the ViT are not
        applied)."""
        return self._readout(tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _logits(self.net(self.input_map(x)))

    def _probe(self) -> int:
        """One pass of a zero slice: checks the hooks see ``L`` attention maps over ``N + 1`` tokens and the
        tokens of the last block; returns the number of classes."""
        was_training = self.net.training
        self.net.eval()
        x = torch.zeros(1, 1, *self.input_size, device=next(self.net.parameters()).device)
        try:
            with torch.no_grad(), self._recording(True, True) as rec:
                logits = self(x)
        except UnsupportedModel:
            raise
        except Exception as err:  # noqa: BLE001 - any failure here means the sizes do not fit
            raise UnsupportedModel(f"a {self.in_channels} x {self.input_size[0]} x {self.input_size[1]} input does "
                                   f"not run through it ({type(err).__name__}: {str(err)[:160]})") from err
        finally:
            self.net.train(was_training)
        n = self.grid[0] * self.grid[1] + 1
        shapes = {tuple(a.shape[-2:]) for a in rec["attentions"]}
        if len(rec["attentions"]) != self.num_layers or shapes != {(n, n)} or rec.get("tokens") is None:
            raise UnsupportedModel(f"its attention does not cover {n} tokens (class token + {n - 1} patches) in "
                                   f"every block (saw {sorted(shapes)}); needed: one class token and no other "
                                   "extra tokens")
        return int(logits.shape[1])


def _patch_size(size: tuple[int, int], tokens: int) -> int:
    """Input pixels per (square) token for ``tokens`` patches on an ``H x W`` input."""
    h, w = size
    rows = round(math.sqrt(tokens * h / w))
    cols = tokens // rows if rows else 0
    if rows * cols != tokens or h % rows or w % cols or h // rows != w // cols:
        raise UnsupportedModel(f"its {tokens} patch tokens do not tile a {h} x {w} input in square patches; "
                               "check network_data_format.inputs.image.spatial_shape in metadata.json")
    return h // rows


def _not_a_vit(module: nn.Module, backbone: str) -> str:
    """The refusal for a module that is not a recognised ViT: what it is, where a ViT sits if any."""
    found = type(module).__name__
    if backbone:
        return f"{backbone!r} is a {found}; needed: {NEEDED}"
    inside = [name for name, m in module.named_modules() if name and _family(m) is not None]
    if inside:
        return (f"found a {found} with a ViT at {inside[0]!r}: name it with --backbone-attr {inside[0]} "
                f"(or \"backbone_attr\": \"{inside[0]}\" in inference.json)")
    convs = sum(isinstance(m, nn.Conv3d) for m in module.modules()), sum(
        isinstance(m, nn.Conv2d) for m in module.modules())
    kind = "a 3D network" if convs[0] else ("a CNN" if convs[1] else "no Vision Transformer")
    return f"found a {found} ({kind}); needed: {NEEDED}"


def wrap_model(net: nn.Module, model_input: ModelInput = ModelInput(), backbone: str | None = None) -> TokenViT:
    """``net`` behind the :class:`TokenViT` interface: itself if it already is one, else a :class:`BackboneViT`.

    Raises:
        UnsupportedModel: one line saying what was found and what is needed.
    """
    if isinstance(net, TokenViT) and not backbone:
        return net
    if backbone:
        try:
            net.get_submodule(backbone)
        except AttributeError as err:
            names = ", ".join(n for n, _ in net.named_children()) or "none"
            raise UnsupportedModel(f"no submodule {backbone!r} in the {type(net).__name__} (its children: "
                                   f"{names})") from err
    return BackboneViT(net, backbone or "", model_input)
