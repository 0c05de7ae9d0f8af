"""Token-level ViT adapters: one interface over MONAI's ViT and timm's VisionTransformer.

Every explainer talks to a :class:`TokenViT`. Besides logits it exposes, on request, what
transformer explanations need (``B`` slices, ``N = h * w`` patch tokens plus one CLS token at index 0,
``L`` blocks, ``H_a`` heads, width ``D``):

- ``tokens``: the last block's patch-token features, the LayerNorm-ed input of the last block
  (output of ``blocks[-1].norm1`` without CLS), ``B x N x D``;
- ``attentions``: every block's attention probabilities, ``L x [B x H_a x (N+1) x (N+1)]``;
- their gradients with respect to the target logits ``sum_b y[b, target_b]`` (one backward pass).

The attention probabilities are taken by forward hooks on the dropout that follows the softmax
(``attn.drop_weights`` in MONAI, ``attn.attn_drop`` in timm): its output is exactly the matrix that
multiplies the values, so the gradients are those of the matrix the model uses. (MONAI's own
``att_mat`` is detached, and timm's fused attention never forms the matrix, so neither serves.)

Samples never interact (LayerNorm, eval-mode BatchNorm), so the gradient of the summed target
logits gives every slice its own gradient: explanations do not depend on batch composition.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from monai.networks.nets import ViT
from torch import nn

__all__ = ["TokenOutputs", "TokenViT", "MonaiViTAdapter", "TimmViTAdapter", "LesionViT", "LocalContrast", "conv_stem",
           "resample_position_embeddings", "add_local_contrast_inputs", "add_context_inputs", "fit_state_dict"]


@dataclass
class TokenOutputs:
    """What one pass of a :class:`TokenViT` recorded.

    Attributes:
        logits: ``B x C``.
        tokens: ``B x N x D`` last block's LayerNorm-ed input, patch tokens only (``None`` if not asked).
        attentions: ``L`` tensors ``B x H_a x (N+1) x (N+1)``, rows sum to 1 (``None`` if not asked).
        token_grads: ``d sum_b y[b, t_b] / d tokens``, ``B x N x D`` (only with a target).
        attention_grads: ``d sum_b y[b, t_b] / d attentions[l]``, same shapes (only with a target).
    """

    logits: torch.Tensor
    tokens: torch.Tensor | None = None
    attentions: list[torch.Tensor] | None = None
    token_grads: torch.Tensor | None = None
    attention_grads: list[torch.Tensor] | None = None


class TokenViT(nn.Module):
    """Base class: a 2D ViT classifier ``B x C_in x H x W -> B x C`` with token-level access.

    Subclasses set ``input_size`` (H, W), ``patch_size`` (input pixels per token side),
    ``num_classes``, ``num_heads`` and implement :meth:`forward`, :meth:`attention_modules` and
    :meth:`last_norm`. ``slice_context = k > 0`` marks a 2.5-D model: its ``C_in = 2k + 1`` channels are
    a slice and its ``k`` neighbours on either side (:func:`c2f_med.slices.volume_slices`).
    """

    input_size: tuple[int, int]
    patch_size: int
    num_classes: int
    num_heads: int
    slice_context: int = 0

    @property
    def grid(self) -> tuple[int, int]:
        """Token grid ``(h, w) = (H / p, W / p)``."""
        return self.input_size[0] // self.patch_size, self.input_size[1] // self.patch_size

    @property
    def num_layers(self) -> int:
        return len(self.attention_modules())

    def attention_modules(self) -> Sequence[nn.Module]:
        """Per block, the module whose forward output is the attention probability matrix."""
        raise NotImplementedError

    def last_norm(self) -> nn.Module:
        """The LayerNorm whose output is the last block's attention input (``blocks[-1].norm1``)."""
        raise NotImplementedError

    def blocks(self) -> Sequence[nn.Module]:
        """The transformer blocks, first first; each maps the token sequence ``B x T x D`` (CLS first) on."""
        raise NotImplementedError

    def readout(self, tokens: torch.Tensor) -> torch.Tensor:
        """Class logits ``B x C`` of a token sequence ``B x T x D`` through the final norm and the head
        (the CLS token's); on the last block's output this is :meth:`forward`'s result."""
        raise NotImplementedError

    @contextlib.contextmanager
    def _recording(self, attentions: bool, tokens: bool) -> Iterator[dict]:
        rec: dict = {"attentions": []}
        handles = []

        def keep_attention(_m, _inp, out):
            rec["attentions"].append(out)

        def keep_tokens(_m, _inp, out):
            rec["tokens"] = out

        if attentions:
            handles += [m.register_forward_hook(keep_attention) for m in self.attention_modules()]
        if tokens:
            handles.append(self.last_norm().register_forward_hook(keep_tokens))
        try:
            yield rec
        finally:
            for h in handles:
                h.remove()

    def run(
        self,
        x: torch.Tensor,
        *,
        tokens: bool = False,
        attentions: bool = False,
        target: torch.Tensor | None = None,
    ) -> TokenOutputs:
        """One forward pass of ``x`` (``B x C_in x H x W``) recording what is asked.

        Args:
            tokens: record the last block's patch tokens ``B x N x D``.
            attentions: record every block's attention probabilities.
            target: ``B`` class indices; when given, one backward pass of ``sum_b y[b, target_b]``
                fills ``token_grads`` / ``attention_grads`` for whatever was recorded.
        """
        grad = target is not None
        with torch.set_grad_enabled(grad), self._recording(attentions, tokens) as rec:
            logits = self(x)
        out = TokenOutputs(logits=logits.detach())
        recorded_tokens = rec.get("tokens")  # B x (N+1) x D, CLS first
        if grad:
            score = logits.gather(1, target.long().view(-1, 1).to(logits.device)).sum()
            wrt = list(rec["attentions"]) + ([recorded_tokens] if tokens else [])
            grads = torch.autograd.grad(score, wrt) if wrt else []
            if attentions:
                out.attention_grads = [g.detach() for g in grads[: len(rec["attentions"])]]
            if tokens:
                out.token_grads = grads[-1][:, 1:].detach()
        if attentions:
            out.attentions = [a.detach() for a in rec["attentions"]]
        if tokens:
            out.tokens = recorded_tokens[:, 1:].detach()
        return out


def conv_stem(in_channels: int, channels: Sequence[int], depth: int = 1) -> nn.Sequential:
    """Hybrid-ViT stem: per entry of ``channels`` a 3x3 conv of stride 2 and ``depth - 1`` 3x3 convs of
    stride 1, each with BatchNorm and ReLU (downsamples by ``2**len(channels)``)."""
    if depth < 1:
        raise ValueError(f"stem depth must be >= 1, got {depth}")
    layers: list[nn.Module] = []
    c_in = in_channels
    for c in channels:
        for stride in (2,) + (1,) * (depth - 1):
            layers += [nn.Conv2d(c_in, c, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c),
                       nn.ReLU(inplace=True)]
            c_in = c
    return nn.Sequential(*layers)


class LocalContrast(nn.Module):
    """``B x C x H x W -> B x 2C x H x W``: each channel followed by its local contrast

        lcn(x) = (x - G * x) / sqrt(G * (x - G * x)^2 + eps),

    ``G`` a Gaussian of ``sigma`` pixels (MONAI's separable filtering, reflected edges). A lesion then
    reads as its contrast to the tissue around it, whatever that tissue's own intensity; the raw
    channel keeps the tissue itself. No weights (the kernel is a non-persistent buffer), so the state
    dict is the stem's alone.
    """

    def __init__(self, sigma: float, eps: float = 1e-2):
        super().__init__()
        from monai.networks.layers import gaussian_1d

        self.sigma, self.eps = float(sigma), float(eps)
        self.register_buffer("kernel", gaussian_1d(torch.tensor(self.sigma), truncated=3.0, normalize=True),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from monai.networks.layers import separable_filtering

        kernels = [self.kernel.to(x.dtype)] * 2
        detail = x - separable_filtering(x, kernels, mode="reflect")
        spread = separable_filtering(detail * detail, kernels, mode="reflect")
        return torch.cat([x, detail / torch.sqrt(spread + self.eps)], 1)


class MonaiViTAdapter(TokenViT):
    """MONAI's ``monai.networks.nets.ViT`` (2D, ``classification=True``), optionally behind a conv stem.

    The ViT must be built with ``post_activation=None`` (the default Tanh saturates class scores).
    With a stem of stride ``s`` and ViT patches of ``q`` feature pixels, one token covers
    ``p = s * q`` input pixels.

    Args:
        vit: the MONAI ViT; its ``img_size`` is the stem's output size.
        input_size: (H, W) of the adapter's input.
        stem: module ``B x C_in x H x W -> B x C_vit x H/s x W/s`` or ``None``.
        stem_stride: ``s`` (1 without a stem).
    """

    def __init__(self, vit: ViT, input_size: Sequence[int], stem: nn.Module | None = None, stem_stride: int = 1):
        super().__init__()
        if not getattr(vit, "classification", False):
            raise ValueError("MonaiViTAdapter needs a ViT built with classification=True")
        if isinstance(vit.classification_head, nn.Sequential):
            raise ValueError("build the MONAI ViT with post_activation=None: Tanh saturates the class scores")
        self.stem = stem if stem is not None else nn.Identity()
        self.vit = vit
        self.input_size = (int(input_size[0]), int(input_size[1]))
        embed = vit.patch_embedding
        q = int(embed.patch_size[0]) if hasattr(embed, "patch_size") else 1
        self.patch_size = stem_stride * q
        self.num_classes = vit.classification_head.out_features
        self.num_heads = vit.blocks[0].attn.num_heads
        if self.grid[0] * self.grid[1] != embed.n_patches:
            raise ValueError(f"input {self.input_size} with patch {self.patch_size} does not give "
                             f"the ViT's {embed.n_patches} patches")

    def attention_modules(self) -> Sequence[nn.Module]:
        return [blk.attn.drop_weights for blk in self.vit.blocks]

    def last_norm(self) -> nn.Module:
        return self.vit.blocks[-1].norm1

    def blocks(self) -> Sequence[nn.Module]:
        return list(self.vit.blocks)

    def readout(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.vit.classification_head(self.vit.norm(tokens[:, 0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(self.stem(x))[0]


class LesionViT(MonaiViTAdapter):
    """The bundle's slice classifier: conv stem (stride 8) + MONAI ViT on the 1x1-patch feature map.

    ``B x 1 x H x W`` slices -> ``B x num_classes`` logits (class 1 = the slice shows a lesion).
    Defaults (the shipped bundle's network): 96 x 96 input, stem stages of 32-64-128 channels,
    6 blocks of width 128 with 4 heads, 12 x 12 tokens of 8 x 8 input pixels each. The bundle's
    ``network_def`` adds ``stem_depth=2`` (a stride-1 conv after each stride-2 one): at 1,000 steps it
    beat one conv per stage by 0.05 validation AUROC for 5 % more time per step.
    ``local_contrast_sigma > 0`` puts :class:`LocalContrast` (Gaussian of that many pixels) in front of
    the stem, which then sees each slice and its local contrast (2 channels).
    ``context_slices = k > 0`` makes it 2.5-D: ``B x (2k + 1) x H x W``, each slice with its ``k``
    neighbours on either side (with local contrast, each of them gets its contrast map too).
    """

    def __init__(
        self,
        img_size: int = 96,
        in_channels: int = 1,
        num_classes: int = 2,
        stem_channels: Sequence[int] = (32, 64, 128),
        stem_depth: int = 1,
        hidden_size: int = 128,
        mlp_dim: int = 512,
        num_layers: int = 6,
        num_heads: int = 4,
        dropout_rate: float = 0.0,
        local_contrast_sigma: float = 0.0,
        context_slices: int = 0,
    ):
        if context_slices < 0:
            raise ValueError(f"context_slices must be >= 0, got {context_slices}")
        channels = in_channels * (2 * context_slices + 1)
        stride = 2 ** len(stem_channels)
        if img_size % stride:
            raise ValueError(f"img_size {img_size} must be a multiple of the stem stride {stride}")
        vit = ViT(
            in_channels=stem_channels[-1] if stem_channels else channels,
            img_size=(img_size // stride,) * 2,
            patch_size=(1, 1),
            hidden_size=hidden_size,
            mlp_dim=mlp_dim,
            num_layers=num_layers,
            num_heads=num_heads,
            proj_type="perceptron",
            classification=True,
            num_classes=num_classes,
            dropout_rate=dropout_rate,
            spatial_dims=2,
            post_activation=None,
            qkv_bias=True,
        )
        if local_contrast_sigma > 0 and not stem_channels:
            raise ValueError("local_contrast_sigma needs a convolutional stem (stem_channels)")
        stem = conv_stem(channels * (2 if local_contrast_sigma > 0 else 1), stem_channels, stem_depth) \
            if stem_channels else None
        if local_contrast_sigma > 0:
            stem = nn.Sequential(LocalContrast(local_contrast_sigma), *stem)
        super().__init__(vit, (img_size, img_size), stem=stem, stem_stride=stride)
        self.slice_context = int(context_slices)


POSITION_KEY = "vit.patch_embedding.position_embeddings"


def resample_position_embeddings(state: dict, net: LesionViT) -> dict:
    """A :class:`LesionViT` state dict with its position embeddings resampled to ``net``'s token grid.

    Fine-tuning at another input size (e.g. 96 -> 128 px: 12 x 12 -> 16 x 16 tokens) keeps every
    weight but the ``1 x N x D`` position embeddings, which are resized as a ``sqrt(N) x sqrt(N)`` grid
    (bicubic, timm's ``resample_abs_pos_embed``). A state dict already on ``net``'s grid is returned as it is.
    """
    from timm.layers import resample_abs_pos_embed

    old = state.get(POSITION_KEY)
    h, w = net.grid
    if old is None or old.shape[1] == h * w:
        return state
    side = math.isqrt(old.shape[1])
    if side * side != old.shape[1]:
        raise ValueError(f"{POSITION_KEY} holds {old.shape[1]} tokens, not a square grid")
    return {**state, POSITION_KEY: resample_abs_pos_embed(old, [h, w], [side, side], num_prefix_tokens=0)}


def add_local_contrast_inputs(state: dict, net: LesionViT) -> dict:
    """A state dict of a :class:`LesionViT` without :class:`LocalContrast`, made to fit ``net``, which has it.

    The stem's keys move one place down (``stem.i.* -> stem.(i+1).*``: the layer in front has no
    weights) and the first convolution's ``C_out x C x 3 x 3`` kernel gets ``C`` zero input channels for
    the local-contrast maps, so ``net`` computes exactly what the old weights did until fine-tuning
    gives those channels weight (the new kernel's gradient is not zero). A state dict that already
    fits, or a ``net`` without the layer, is returned as it is.
    """
    stem = getattr(net, "stem", None)
    if not (isinstance(stem, nn.Sequential) and len(stem) and isinstance(stem[0], LocalContrast)
            and "stem.0.weight" in state):
        return state
    out = {}
    for key, value in state.items():
        if key.startswith("stem."):
            index, rest = key[len("stem."):].split(".", 1)
            key = f"stem.{int(index) + 1}.{rest}"
        out[key] = value
    kernel = out["stem.1.weight"]
    out["stem.1.weight"] = torch.cat([kernel, torch.zeros_like(kernel)], 1)
    return out


def add_context_inputs(state: dict, net: LesionViT) -> dict:
    """A state dict of a 2-D :class:`LesionViT` made to fit ``net``, a 2.5-D one (``slice_context = k``).

    The first convolution's ``C_out x G x 3 x 3`` kernel (``G`` = 1, or 2 with local contrast: the
    slice, then its contrast map) becomes ``C_out x G (2k + 1) x 3 x 3``: within each group the old
    kernel on the middle slice's channel, zeros on the ``2k`` neighbours'. ``net`` then computes exactly
    what the 2-D weights did until fine-tuning gives the neighbours weight. A state dict that already
    fits, or a 2-D ``net``, is returned as it is.
    """
    k = int(getattr(net, "slice_context", 0))
    first = next((name for name, m in net.stem.named_modules() if isinstance(m, nn.Conv2d)), None) \
        if isinstance(getattr(net, "stem", None), nn.Sequential) else None
    key = f"stem.{first}.weight"
    if not k or first is None or key not in state:
        return state
    kernel, wanted = state[key], net.get_parameter(key).shape[1]
    groups = kernel.shape[1]
    if groups * (2 * k + 1) != wanted:
        return state
    grown = kernel.new_zeros(kernel.shape[0], groups, 2 * k + 1, *kernel.shape[2:])
    grown[:, :, k] = kernel
    return {**state, key: grown.reshape(kernel.shape[0], wanted, *kernel.shape[2:])}


def fit_state_dict(state: dict, net: LesionViT) -> dict:
    """``state`` fitted to ``net`` for fine-tuning: :func:`add_local_contrast_inputs`,
    :func:`add_context_inputs`, then :func:`resample_position_embeddings`."""
    return resample_position_embeddings(add_context_inputs(add_local_contrast_inputs(state, net), net), net)


class TimmViTAdapter(TokenViT):
    """timm's ``VisionTransformer`` with a class token and ``global_pool='token'``.

    Fused attention is switched off on every block, or the attention probabilities never exist.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if getattr(model, "num_prefix_tokens", 1) != 1 or not getattr(model, "cls_token", None) is not None:
            raise ValueError("TimmViTAdapter needs exactly one prefix token: the class token")
        if getattr(model, "global_pool", "token") != "token":
            raise ValueError("TimmViTAdapter needs global_pool='token' (the CLS token feeds the head)")
        for blk in model.blocks:
            blk.attn.fused_attn = False
        self.model = model
        embed = model.patch_embed
        self.input_size = tuple(int(s) for s in embed.img_size)
        self.patch_size = int(embed.patch_size[0])
        self.num_classes = model.num_classes
        self.num_heads = model.blocks[0].attn.num_heads

    def attention_modules(self) -> Sequence[nn.Module]:
        return [blk.attn.attn_drop for blk in self.model.blocks]

    def last_norm(self) -> nn.Module:
        return self.model.blocks[-1].norm1

    def blocks(self) -> Sequence[nn.Module]:
        return list(self.model.blocks)

    def readout(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.norm(tokens))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)
