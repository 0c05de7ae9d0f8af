"""Training the slice classifier as a MONAI ``SupervisedTrainer`` workflow.

The workflow is declared in the bundle's ``configs/train.json`` as model-zoo bundles declare theirs
(network, optimiser, scheduler, loss, data, trainer, evaluator and handlers under the ids
``network_def``, ``optimizer``, ``lr_scheduler``, ``train#...``, ``validate#...``); this module holds
the parts it names. ``c2f-med train`` (:func:`run_training`) and ``python -m monai.bundle run
--config_file configs/train.json`` run the same workflow.

Two slice sources, one recipe:

- :class:`OnlineLesionSlices` (the demo model): random anatomies from :mod:`c2f_med.synth` with
  lesions drawn afresh for every volume, so the model never sees the same lesion twice. Each
  volume goes through the same intensity preset and slicing as inference
  (:mod:`c2f_med.slices`), so training and explaining see identical inputs.
- :class:`DatalistSlices` (your own data): every slice of the datalist's "training" cases.

Both yield balanced batches (half the slices show a lesion, label = the slice has lesion voxels;
``visible_fraction`` leaves out the slices that only graze a lesion, :func:`faint_slices`) with
augmentation applied to whole batches (random rotation, scaling, flips, gamma, gain, noise, blur).
Validation runs on the datalist's "validation" cases (another synth seed for the demo): slice
AUROC and accuracy every epoch, the best checkpoint kept as ``models/model.pt`` (a state
dict). Recipe (measured on CPU, see docs/experiments.md): AdamW, warmup then cosine decay, weight decay
off for norms / biases / position embeddings / CLS, gradient clipping, and a curriculum that
widens the lesion contrast and size ranges from conspicuous to the full range over the first
quarter of the steps. The forward pass runs in bfloat16 under CPU autocast (``TrainConfig.bf16``):
measured 0.23-0.26 s against 0.44-0.46 s per step of 32 slices on this project's 2-core machine.
Fine-tuning starts from a state dict (``TrainConfig.init``) with recipe fields changed
(:func:`recipe_value` parses ``c2f-med train --set``), as the shipped weights' later stages did.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import IterableDataset

from c2f_med.slices import INPUT_MEAN, INPUT_STD, normalise_input, to_model_grid, volume_slices

__all__ = ["TrainConfig", "OnlineLesionSlices", "DatalistSlices", "GradientClip", "SliceTokenLoss", "TokenBatch",
           "TrainingLog", "WarmupCosine", "augment", "build_network", "bundle_network", "faint_slices", "finish",
           "make_config", "param_groups", "plot_curve", "probabilities_onehot", "recipe_fields", "recipe_value",
           "run_training", "slice_dataset", "training_slices", "twin_rows", "validation_slices"]


@dataclass
class TrainConfig:
    """Every constant of the recipe (defaults: the committed model)."""

    steps: int = 13000  # optimiser steps in all
    epoch_steps: int = 500  # steps between validations
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    final_lr_fraction: float = 0.02  # cosine decays to lr * this
    grad_clip: float = 1.0
    curriculum_fraction: float = 0.25  # share of the steps over which the lesion ranges widen
    diameter_mm: tuple[float, float] = (3.0, 20.0)  # full lesion range (synth's)
    contrast: tuple[float, float] = (0.15, 0.8)
    start_diameter_mm: float = 12.0  # the curriculum's first minimum diameter
    start_contrast: float = 0.6  # the curriculum's first minimum |contrast|
    anatomy_pool: int = 24  # anatomies kept in memory, one replaced every `anatomy_refresh` volumes
    anatomy_refresh: int = 8
    lesions_per_volume: tuple[int, int] = (2, 6)
    token_loss_weight: float = 2.0  # auxiliary per-token lesion loss (0 = slice labels only)
    token_pos_weight: float = 10.0  # BCE weight of lesion tokens (they are a few of 144)
    twin_negative: float = 0.75  # share of negatives taken at a positive's slice of the lesion-free twin
    seed: int = 0
    init: str | None = None  # state dict (a model.pt) to start from instead of random weights: fine-tuning
    # CPU autocast to bfloat16 for the forward pass (fp32 master weights): ~1.8x faster on CPUs with bfloat16 units
    # (AVX-512 BF16 / AMX); emulated, ~100x slower, without them (59 s per step measured on an AVX2-only CPU)
    bf16: bool = True
    model: dict = field(default_factory=dict)  # LesionViT keyword arguments (run_training: the bundle's network_def)
    img_size: int = 96
    randomised_fraction: float = 0.0  # share of pool anatomies drawn domain-randomised (c2f_med.synth.randomised)
    families: tuple[str, ...] = ()  # lesion families on those anatomies (empty: the training families)
    # lesion slices showing every lesion they cut at less than this share of its largest cross-section are
    # left out of training (neither positive nor negative: faint_slices); 0 keeps every lesion slice
    visible_fraction: float = 0.0
    # learning rate of the first convolution's kernel, as a multiple of lr (1: the same as every weight);
    # above 1 it lets input channels added at zero (neighbouring slices, local contrast) grow in a fine-tune
    input_lr_scale: float = 1.0

    @property
    def context_slices(self) -> int:
        """Neighbouring slices on either side that the network sees (``network_def``'s ``context_slices``)."""
        return int(self.model.get("context_slices", 0))


RECIPE_FIXED = ("steps", "epoch_steps", "seed", "init", "model", "img_size")  # set by run_training's own arguments


def recipe_fields() -> set[str]:
    """The :class:`TrainConfig` fields a recipe may change (all but :data:`RECIPE_FIXED`)."""
    return {f.name for f in dataclasses.fields(TrainConfig)} - set(RECIPE_FIXED)


def recipe_value(item: str) -> tuple[str, object]:
    """``"lr=3e-4"`` -> ``("lr", 0.0003)``: one :class:`TrainConfig` field and its value (``c2f-med train --set``).

    Values are JSON (``2e-4``, ``0``, ``true``, ``[3, 20]``); lists become tuples. Raises
    :class:`~c2f_med.errors.InputError` naming the item when it is not ``FIELD=VALUE``, the field is
    unknown or set by other arguments (:data:`RECIPE_FIXED`), or the value is not JSON.
    """
    from c2f_med.errors import InputError

    name, sep, text = item.partition("=")
    if not sep:
        raise InputError(None, f"--set {item!r}: expected FIELD=VALUE, e.g. lr=3e-4")
    if name not in recipe_fields():
        raise InputError(None, f"--set {item!r}: not a recipe field; one of {', '.join(sorted(recipe_fields()))}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(None, f"--set {item!r}: the value is not JSON ({exc.msg})") from exc
    return name, tuple(value) if isinstance(value, list) else value


def _curriculum(cfg: TrainConfig, step: int) -> dict[str, tuple[float, float]]:
    """Lesion ranges at ``step``: minimum diameter / contrast move linearly to the full range
    (the full range from the start with ``curriculum_fraction`` 0)."""
    frac = min(1.0, step / (cfg.curriculum_fraction * cfg.steps)) if cfg.curriculum_fraction > 0 else 1.0
    d_min = cfg.start_diameter_mm + frac * (cfg.diameter_mm[0] - cfg.start_diameter_mm)
    c_min = cfg.start_contrast + frac * (cfg.contrast[0] - cfg.start_contrast)
    return {"diameter_mm": (d_min, cfg.diameter_mm[1]), "contrast": (c_min, cfg.contrast[1])}


def _balanced(labels: torch.Tensor, rng: np.random.Generator, half: int) -> list[int]:
    """Shuffled indices of ``half`` positive and ``half`` negative slices (with replacement only
    when a class has fewer than ``half`` slices)."""
    pos, neg = np.flatnonzero(labels.numpy() == 1), np.flatnonzero(labels.numpy() == 0)
    picks = [rng.choice(c, half, replace=len(c) < half) for c in (pos, neg)]
    return rng.permutation(np.concatenate(picks)).tolist()


def faint_slices(label: torch.Tensor, index: torch.Tensor, fraction: float, axis: int = 2) -> torch.Tensor:
    """Which of the slices ``index`` of a lesion mask ``X x Y x Z`` cut their lesions only faintly.

    Each lesion is a 26-connected component ``k`` of the mask. A slice ``i`` shows ``a_k(i)`` voxels
    of it, and ``A_k = max_i a_k(i)`` is its largest cross-section. Slice ``i`` is faint when it cuts
    at least one lesion and ``a_k(i) < fraction * A_k`` for every lesion ``k`` it cuts: the cap of a
    sphere, the tail of a soft lesion. Returns ``len(index)`` booleans (all ``False`` for ``fraction`` 0).
    """
    from c2f_med.summary import lesion_components

    if fraction <= 0:
        return torch.zeros(len(index), dtype=torch.bool)
    components = lesion_components(label.numpy(), axis)  # slices x h x w, 0 = no lesion
    n, k = components.shape[0], int(components.max()) + 1
    area = np.bincount((np.arange(n)[:, None] * k + components.reshape(n, -1)).ravel(), minlength=n * k)
    area = area.reshape(n, k)[:, 1:]  # slice x lesion voxel counts
    cut = area > 0
    shown = area >= fraction * area.max(0, initial=0)
    faint = cut.any(1) & ~(cut & shown).any(1)
    return torch.from_numpy(faint[index.numpy()])


def slice_dataset(image: torch.Tensor, label: torch.Tensor | None, size: int, axis: int = 2, context: int = 0):
    """One preset-normalised volume ``X x Y x Z`` (and its mask) -> model-grid slices and slice labels.

    Background-only slices (all zero) are dropped. Returns ``(x, y, index, masks)``: ``n x (2 context + 1)
    x size x size`` normalised input (each slice with ``context`` neighbours on either side,
    :func:`~c2f_med.slices.volume_slices`), ``n`` labels (1 = lesion voxels in the slice, -1 without a mask), ``n``
    slice indices, and the lesion masks on the model grid (``n x 1 x size x size`` in [0, 1], or
    ``None`` without a mask).
    """
    keep = torch.movedim(image, axis, 0).flatten(1).amax(1) > 0
    index = torch.nonzero(keep).flatten()
    x, _ = to_model_grid(volume_slices(image, axis, index, context), size)
    if label is None:
        return normalise_input(x), torch.full((len(index),), -1, dtype=torch.long), index, None
    y = (torch.movedim(label, axis, 0)[index].flatten(1).amax(1) > 0).long()
    masks, _ = to_model_grid(volume_slices(label.float(), axis, index), size)
    return normalise_input(x), y, index, masks


def twin_rows(index: torch.Tensor, twin_index: torch.Tensor) -> np.ndarray:
    """For each slice ``index[r]`` of a lesion volume, the row of the same slice among its twin's
    slices ``twin_index`` (-1 where the twin has none). Both as :func:`slice_dataset` returns them."""
    row = {int(i): r for r, i in enumerate(twin_index.tolist())}
    return np.array([row.get(int(i), -1) for i in index.tolist()], dtype=np.int64)


class OnlineLesionSlices(IterableDataset):
    """Endless balanced batches of synthetic slices with freshly drawn lesions.

    Yields ``{"image": B x (2k + 1) x S x S, "label": B, "mask": B x 1 x S x S}`` (``k``: the network's
    ``context_slices``). The number of batches yielded so far drives
    the curriculum, so the stream is the same in a DataLoader worker as in the main process.
    """

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def _anatomy(self, rng: np.random.Generator):
        """A fresh pool anatomy: domain-randomised (training regimes only) with probability
        ``randomised_fraction``, else a T1 / T2 / FLAIR one."""
        from c2f_med.synth.anatomy import make_anatomy
        from c2f_med.synth.randomised import make_random_anatomy

        if rng.random() < self.cfg.randomised_fraction:
            return make_random_anatomy(rng)
        return make_anatomy(rng)

    def twins(self, anatomy, rng: np.random.Generator, step: int):
        """One volume with fresh lesions and its lesion-free twin (same bias and noise), both through
        the inference preset and slicing: :func:`slice_dataset`'s ``(x, y, index, masks)`` of each, the
        lesion volume's labels -1 at its faint slices (:func:`faint_slices`, ``visible_fraction``)."""
        from c2f_med.io.transforms import MRPercentileNorm
        from c2f_med.synth import randomised
        from c2f_med.synth.anatomy import finalise
        from c2f_med.synth.lesions import insert_lesions

        n = int(rng.integers(self.cfg.lesions_per_volume[0], self.cfg.lesions_per_volume[1] + 1))
        scanner = None
        if anatomy.contrast.startswith("random:"):  # a domain-randomised anatomy: lesion families, a resolution
            families = tuple(self.cfg.families) or randomised.TRAINING_FAMILIES
            lesioned, mask, _ = randomised.insert_random_lesions(anatomy.image, anatomy, rng, n, families)
            scanner = randomised.sample_scanner(rng)
        else:
            lesioned, mask, _ = insert_lesions(anatomy.image, anatomy, rng, n, **_curriculum(self.cfg, step))
        noise_seed = int(rng.integers(2**31))
        out = []
        for image, label in ((lesioned, mask), (anatomy.image, np.zeros_like(mask))):
            if scanner is not None:
                image = randomised.degrade(image, scanner, anatomy.spacing)
            image = finalise(image, anatomy.bias, anatomy.noise_sigma, np.random.default_rng(noise_seed))
            image = MRPercentileNorm()(torch.from_numpy(image)[None])[0].as_tensor()  # plain tensor: fast ops
            out.append(slice_dataset(image, torch.from_numpy(label), self.cfg.img_size,
                                     context=self.cfg.context_slices))
        _, y, index, _ = out[0]
        y[faint_slices(torch.from_numpy(mask), index, self.cfg.visible_fraction)] = -1
        return out

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Positives: slices through fresh lesions. Negatives: with probability ``twin_negative`` the
        same slice of the lesion-free twin, else any slice of the twin. Pairing removes the shortcut
        that lesion-bearing slices sit mid-brain while lesion-free ones are edge slices."""
        cfg = self.cfg
        rng = np.random.default_rng(cfg.seed)
        pool = [self._anatomy(rng) for _ in range(cfg.anatomy_pool)]
        buffer: list[tuple[torch.Tensor, torch.Tensor, int]] = []  # (slice, model-grid mask, label)
        volumes = 0
        for step in itertools.count():
            while len(buffer) < 4 * cfg.batch_size:
                (x, y, index, m), (tx, _, tindex, tm) = self.twins(pool[int(rng.integers(len(pool)))], rng, step)
                positives = np.flatnonzero(y.numpy() == 1)
                rows = twin_rows(index, tindex)
                for p in rng.permutation(positives)[: cfg.batch_size]:
                    buffer.append((x[p], m[p], 1))
                    same = int(rows[p])
                    q = same if same >= 0 and rng.random() < cfg.twin_negative else int(rng.integers(len(tx)))
                    buffer.append((tx[q], tm[q], 0))
                volumes += 1
                if volumes % cfg.anatomy_refresh == 0:
                    pool[int(rng.integers(len(pool)))] = self._anatomy(rng)
            order = rng.permutation(len(buffer))
            take = order[: cfg.batch_size]
            images = torch.stack([buffer[i][0] for i in take])
            masks = torch.stack([buffer[i][1] for i in take])
            labels = torch.tensor([buffer[i][2] for i in take])
            buffer = [buffer[i] for i in order[cfg.batch_size:]]
            images, masks = augment(images, rng, masks)
            yield {"image": images, "label": labels, "mask": masks}


class DatalistSlices(IterableDataset):
    """Endless balanced, augmented batches from the slices of a datalist's labelled cases."""

    def __init__(self, items: list[dict], cfg: TrainConfig):
        xs, ys, ms = [], [], []
        for image, label in _load_cases(items):
            if label is None:
                raise ValueError(f"training case {image.meta.get('filename_or_obj', '')} has no label")
            x, y, index, m = slice_dataset(image, label, cfg.img_size, context=cfg.context_slices)
            y[faint_slices(label, index, cfg.visible_fraction)] = -1  # left out by _balanced
            xs.append(x)
            ys.append(y)
            ms.append(m)
        self.x, self.y, self.m, self.cfg = torch.cat(xs), torch.cat(ys), torch.cat(ms), cfg
        if not (self.y == 1).any() or not (self.y == 0).any():
            raise ValueError("the training cases need slices with and without lesions")

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        rng = np.random.default_rng(self.cfg.seed)
        while True:
            idx = _balanced(self.y, rng, self.cfg.batch_size // 2)
            images, masks = augment(self.x[idx], rng, self.m[idx])
            yield {"image": images, "label": self.y[idx], "mask": masks}


def augment(x: torch.Tensor, rng: np.random.Generator, masks: torch.Tensor | None = None):
    """Random per-slice augmentation of normalised slices ``B x C x S x S`` (the same for every channel of a
    slice; returns a new tensor;
    with ``masks`` ``B x 1 x S x S``, the pair ``(slices, masks)``, masks moved by the same geometry).

    Geometry (one bilinear resampling): rotation +-20 deg, sampling scale 0.75-1.25 (zoom in to out), anisotropic
    stretch +-10 %, shift +-8 %, left-right and up-down flips. Intensity, on the [0, 1] preset scale:
    gamma 0.6-1.6, gain 0.85-1.15, offset +-0.05, Gaussian noise sigma 0-0.04, and a Gaussian blur
    (sigma 0.5-0.8 px) on a tenth of the slices.
    """
    b = x.shape[0]
    g = torch.Generator().manual_seed(int(rng.integers(2**31)))
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(b, generator=g)  # noqa: E731
    ang = u(-math.pi / 9, math.pi / 9)
    scale = u(0.75, 1.25)  # > 1 zooms out; kept mild: a 3 mm lesion is barely 1.5 px at 96 px
    stretch = u(0.9, 1.1)
    flip_x = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0)
    flip_y = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(ang), torch.sin(ang)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos * scale * flip_x, -sin * scale
    theta[:, 1, 0], theta[:, 1, 1] = sin * scale * stretch, cos * scale * stretch * flip_y
    theta[:, :, 2] = torch.stack([u(-0.08, 0.08), u(-0.08, 0.08)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    raw = x * INPUT_STD + INPUT_MEAN  # back to the [0, 1] preset scale; zero padding = background
    raw = F.grid_sample(raw, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if masks is not None:
        masks = F.grid_sample(masks.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    raw = raw.clamp(min=0).pow(u(0.6, 1.6).view(b, 1, 1, 1)) * u(0.85, 1.15).view(b, 1, 1, 1)
    raw = raw + u(-0.05, 0.05).view(b, 1, 1, 1)
    raw = raw + torch.randn(raw.shape, generator=g) * u(0.0, 0.04).view(b, 1, 1, 1)
    blur = torch.rand(b, generator=g) < 0.1
    if blur.any():
        from torchvision.transforms.functional import gaussian_blur

        sig = float(u(0.5, 0.8)[0])
        raw[blur] = gaussian_blur(raw[blur], kernel_size=5, sigma=sig)
    return normalise_input(raw) if masks is None else (normalise_input(raw), masks)


def _load_cases(items: list[dict]) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Preset-normalised ``X x Y x Z`` scans and masks (``None`` without a label) of datalist items."""
    from c2f_med.io.transforms import load_case_transforms

    load = load_case_transforms(keys=("image", "label"))
    for item in items:
        case = load(dict(item))
        label = case.get("label")
        yield case["image"][0].as_tensor(), None if label is None else label[0].as_tensor()


class TokenLesionHead(nn.Module):
    """Training-only wrapper of a :class:`~c2f_med.models.vit.MonaiViTAdapter`: besides the slice
    logits ``B x C`` it predicts, from the final LayerNorm-ed patch tokens, which tokens hold lesion
    (``B x N`` logits). The dense target speeds up learning to find small lesions; only the wrapped
    network's weights are saved, and inference never uses this head. With ``bf16`` the forward pass
    runs under CPU autocast to bfloat16 (the weights and the optimiser stay float32); both outputs
    are returned as float32.
    """

    def __init__(self, net, bf16: bool = False):
        super().__init__()
        self.net = net
        self.head = nn.Linear(net.vit.norm.normalized_shape[0], 1)
        self.bf16 = bf16

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits, hidden = self.net.vit(self.net.stem(x))
            tokens = self.net.vit.norm(hidden[-1])[:, 1:]  # B x N x D, CLS dropped
            token_logits = self.head(tokens).squeeze(-1)
        return logits.float(), token_logits.float()


def token_targets(masks: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``B x 1 x S x S`` model-grid lesion masks -> ``B x N`` 0/1: a token holds lesion when at least
    5 % of its ``p x p`` pixels do (row-major over the token grid, as the ViT orders tokens)."""
    return (F.avg_pool2d(masks.float(), patch_size) >= 0.05).float().flatten(1)


def param_groups(net: nn.Module, weight_decay: float, input_lr: float | None = None) -> list[dict]:
    """AdamW groups: no decay on norms, biases, position embeddings and the CLS token. With ``input_lr``,
    the first convolution's kernel (the one that reads the input channels) is a group of its own at that
    learning rate: new input channels that start at zero (:func:`~c2f_med.models.vit.fit_state_dict`)
    move at most about one learning rate per Adam step, so at a fine-tune's rate they hardly move."""
    first = next((m.weight for m in net.modules() if isinstance(m, nn.Conv2d)), None) if input_lr else None
    decay, no_decay = [], []
    for name, p in net.named_parameters():
        if p is first:
            continue
        if p.ndim <= 1 or "position_embeddings" in name or "cls_token" in name or "norm" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if first is not None:
        groups.append({"params": [first], "weight_decay": weight_decay, "lr": float(input_lr)})
    return groups


class WarmupCosine:
    """Learning-rate multiplier per step (for ``LambdaLR``): linear warmup over ``warmup_steps``, then
    cosine from 1 to ``final_lr_fraction`` at ``steps``."""

    def __init__(self, config: TrainConfig):
        self.warmup, self.steps, self.final = config.warmup_steps, config.steps, config.final_lr_fraction

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        t = min(1.0, (step - self.warmup) / max(1, self.steps - self.warmup))
        return self.final + (1 - self.final) * 0.5 * (1 + math.cos(math.pi * t))


def make_config(bundle_root: str | Path, *, epochs: int, epoch_steps: int, seed: int, init: str | None = None,
                recipe: dict | None = None) -> TrainConfig:
    """The recipe of one run: :class:`TrainConfig` defaults, the bundle's network (:func:`bundle_network`),
    the run's length, seed and starting weights, and ``recipe`` (fields that replace defaults).

    Raises:
        InputError: an unknown recipe field, a network training cannot build.
    """
    from c2f_med.errors import InputError

    recipe = dict(recipe or {})
    unknown = set(recipe) - recipe_fields()
    if unknown:
        raise InputError(None, f"recipe fields {', '.join(sorted(unknown))} are not among "
                               f"{', '.join(sorted(recipe_fields()))}")
    img_size, model = bundle_network(Path(bundle_root))
    return TrainConfig(steps=epochs * epoch_steps, epoch_steps=epoch_steps, seed=seed, img_size=img_size, model=model,
                       init=None if init is None else str(init), **recipe)


def build_network(config: TrainConfig, device: str | torch.device = "cpu") -> nn.Module:
    """The bundle's :class:`~c2f_med.models.vit.LesionViT`, from ``config.init``'s weights when given
    (trained at any input size, with or without local contrast: :func:`~c2f_med.models.vit.fit_state_dict`)."""
    from c2f_med.models.bundle import load_weights
    from c2f_med.models.vit import LesionViT, fit_state_dict

    torch.manual_seed(config.seed)
    net = LesionViT(img_size=config.img_size, **config.model).to(device)
    if config.init is not None:
        load_weights(net, config.init, device, problem="is not a state dict of the bundle's network",
                     adapt=fit_state_dict)
    return net


def training_slices(datalist: str | Path | None, config: TrainConfig, online_lesions: bool) -> IterableDataset:
    """The training stream: :class:`OnlineLesionSlices` with ``online_lesions``, else :class:`DatalistSlices`
    of the datalist's "training" cases (an :class:`~c2f_med.errors.InputError` when it has none)."""
    from c2f_med.errors import InputError
    from c2f_med.io.manifest import read_datalist

    if online_lesions:
        return OnlineLesionSlices(config)
    items = read_datalist(datalist, "training")
    if not items:
        raise InputError(datalist, "has no 'training' cases (or pass --online-lesions)")
    return DatalistSlices(items, config)


def validation_slices(datalist: str | Path | None, config: TrainConfig) -> list[dict[str, torch.Tensor]]:
    """Every non-background slice of the datalist's "validation" cases, ``[{"image": C x S x S, "label": ()}]``
    (they choose the kept checkpoint; an :class:`~c2f_med.errors.InputError` when there are none)."""
    from c2f_med.errors import InputError
    from c2f_med.io.manifest import read_datalist

    items = read_datalist(datalist, "validation")
    if not items:
        raise InputError(datalist, "has no 'validation' cases to select the best checkpoint on")
    xs, ys = [], []
    for image, label in _load_cases(items):
        x, y, _, _ = slice_dataset(image, label, config.img_size, context=config.context_slices)
        xs.append(x)
        ys.append(y)
    x, y = torch.cat(xs), torch.cat(ys)
    return [{"image": x[i], "label": y[i]} for i in range(len(y))]


class TokenBatch:
    """``prepare_batch`` of the trainer: a batch of :class:`OnlineLesionSlices` / :class:`DatalistSlices`
    -> ``(images, (slice labels B, token targets B x N))`` (:func:`token_targets`)."""

    def __init__(self, patch_size: int):
        self.patch_size = patch_size

    def __call__(self, batch: dict, device, non_blocking: bool = False, **_):
        targets = (batch["label"].to(device), token_targets(batch["mask"], self.patch_size).to(device))
        return batch["image"].to(device), targets


class SliceTokenLoss(nn.Module):
    """Cross-entropy of the slice logits plus ``token_loss_weight`` x BCE of the token logits (lesion
    tokens weighted by ``token_pos_weight``): ``pred`` and ``targets`` as :class:`TokenLesionHead` and
    :class:`TokenBatch` give them."""

    def __init__(self, token_loss_weight: float, token_pos_weight: float):
        super().__init__()
        self.weight = token_loss_weight
        self.register_buffer("pos_weight", torch.tensor(float(token_pos_weight)))

    def forward(self, pred, targets) -> torch.Tensor:
        (logits, token_logits), (label, token_label) = pred, targets
        token_loss = F.binary_cross_entropy_with_logits(token_logits, token_label, pos_weight=self.pos_weight)
        return F.cross_entropy(logits, label) + self.weight * token_loss


def probabilities_onehot(output: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Output transform for ROCAUC on a batch (not decollated) output: softmax probabilities, one-hot labels."""
    return torch.softmax(output["pred"], 1), F.one_hot(output["label"].long(), 2)


class GradientClip:
    """Clips the gradient norm of ``module``'s parameters to ``max_norm`` after every backward pass."""

    def __init__(self, module: nn.Module, max_norm: float):
        self.module, self.max_norm = module, max_norm

    def attach(self, engine) -> None:
        from monai.engines import IterationEvents

        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine) -> None:
        nn.utils.clip_grad_norm_(self.module.parameters(), self.max_norm)


class TrainingLog:
    """One row per epoch (step, seconds, mean loss of the epoch, ``train_auroc``, the evaluator's
    ``val_auroc`` and ``val_accuracy``) written atomically to ``path`` (CSV) after every epoch.

    ``train_auroc`` is the slice AUROC of the epoch's own training batches, from the logits the
    trainer computed for them (no extra forward pass; augmented, balanced slices, the weights moving
    during the epoch). Next to ``val_auroc`` it tells a model that does not fit its training stream
    (both low) from one that fits it but does not carry over (a gap).
    """

    def __init__(self, path: str | Path, evaluator, epoch_steps: int):
        self.path, self.evaluator, self.epoch_steps = Path(path), evaluator, epoch_steps
        self.rows: list[dict] = []
        self.losses: list[float] = []
        self.scores: list[float] = []  # this epoch's lesion probability (softmax) per training slice
        self.labels: list[int] = []
        self.start = time.time()

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._loss)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)

    def _started(self, engine) -> None:
        self.start = time.time()

    def _loss(self, engine) -> None:
        self.losses.append(float(engine.state.output[0]["loss"]))
        for item in engine.state.output:  # decollated: pred = [slice logits C, token logits N], label = [y, tokens]
            self.scores.append(float(torch.softmax(item["pred"][0].double(), 0)[1]))
            self.labels.append(int(item["label"][0]))

    def _epoch(self, engine) -> None:
        from c2f_med.atomic import write_csv
        from c2f_med.metrics.localisation import pixel_auroc

        metrics = self.evaluator.state.metrics
        self.rows.append({
            "step": engine.state.iteration,
            "seconds": round(time.time() - self.start, 1),
            "loss": float(np.mean(self.losses[-self.epoch_steps:])),
            "train_auroc": pixel_auroc(np.array(self.scores), np.array(self.labels, bool)),  # NaN for one class
            "val_auroc": float(metrics["val_auroc"]),
            "val_accuracy": float(metrics["val_accuracy"]),
        })
        self.scores, self.labels = [], []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_csv(self.path, self.rows, list(self.rows[0]))


def finish(bundle_root: str | Path, log: TrainingLog, config: TrainConfig, datalist: str | Path | None,
           online_lesions: bool, validation: Sequence[dict]) -> dict:
    """After training: ``models/train_summary.json`` (the best epoch, the recipe, the data) and
    ``docs/training_curve.png`` in the bundle; returns the summary."""
    from c2f_med.atomic import write_json

    bundle = Path(bundle_root)
    result = {
        "best": max(log.rows, key=lambda r: r["val_auroc"]),
        "config": asdict(config),
        "val_slices": len(validation),
        "val_positive": int(sum(int(v["label"]) for v in validation)),
        "datalist": str(datalist),
        "online_lesions": online_lesions,
    }
    write_json(bundle / "models" / "train_summary.json", result)
    plot_curve([log.path], bundle / "docs" / "training_curve.png")
    return result


def plot_curve(logs: Sequence[Path], png: Path) -> None:
    """Training loss, validation AUROC / accuracy and (where logged) training-batch AUROC against steps, as a PNG.

    ``logs``: the ``training_log.csv`` of each stage in order (a run, then runs fine-tuning its
    weights with ``init``); a stage's steps continue from the previous stage's last step, and a
    dotted line marks where each later stage starts.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from c2f_med.atomic import atomic_path

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    offset, steps, loss, auroc, train_auroc, accuracy = 0, [], [], [], [], []
    for k, log in enumerate(logs):
        rows = list(csv.DictReader(open(log)))
        if k:
            for ax in (ax1, ax2):
                ax.axvline(offset, color="grey", linestyle=":", linewidth=1)
        steps += [offset + int(r["step"]) for r in rows]
        loss += [float(r["loss"]) for r in rows]
        auroc += [float(r["val_auroc"]) for r in rows]
        train_auroc += [float(r.get("train_auroc") or "nan") for r in rows]  # older logs lack it
        accuracy += [float(r["val_accuracy"]) for r in rows]
        offset = steps[-1]
    ax1.plot(steps, loss)
    ax1.set(xlabel="step", ylabel="training loss (epoch mean)")
    ax2.plot(steps, auroc, label="slice AUROC")
    ax2.plot(steps, accuracy, label="slice accuracy")
    if not np.all(np.isnan(train_auroc)):
        ax2.plot(steps, train_auroc, linestyle="--", label="training-batch AUROC")
    ax2.set(xlabel="step", ylabel="validation", ylim=(0.5, 1.0))
    ax2.legend(loc="lower right")
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def bundle_network(bundle: Path) -> tuple[int, dict]:
    """``(img_size, LesionViT keyword arguments)`` of the bundle's ``network_def`` (configs/inference.json),
    so that training builds exactly the network that inference loads."""
    from c2f_med.errors import InputError
    from c2f_med.models.bundle import inference_config

    parser = inference_config(bundle)
    config_file = Path(bundle) / "configs" / "inference.json"
    target = parser.get("network_def::_target_")
    if target != "c2f_med.models.vit.LesionViT":
        raise InputError(config_file, f"training builds c2f_med.models.vit.LesionViT, network_def is {target!r}")
    kwargs = {k: parser.get_parsed_content(f"network_def::{k}") for k in parser["network_def"] if k != "_target_"}
    if kwargs.pop("in_channels", 1) != 1:
        raise InputError(config_file, "training makes one-channel slices: network_def needs in_channels 1")
    return int(kwargs.pop("img_size", 96)), kwargs


def run_training(datalist: Path | str | None, bundle: Path, *, epochs: int, seed: int, online_lesions: bool,
                 epoch_steps: int = 250, init: Path | None = None, recipe: dict | None = None,
                 device: str = "cpu") -> dict:
    """``c2f-med train``: run the bundle's training workflow (``configs/train.json``, the declarative
    MONAI ``SupervisedTrainer`` with its handlers; the shipped bundle's when ``bundle`` has none) with
    these overrides. Writes ``models/model.pt`` (the best validation AUROC), ``models/training_log.csv``,
    ``models/train_summary.json`` and ``docs/training_curve.png`` into ``bundle``, and returns the summary.

    ``init``: a state dict to start from (fine-tuning); ``recipe``: :class:`TrainConfig` fields that
    replace its defaults (e.g. ``{"lr": 3e-4, "curriculum_fraction": 0}``). Both are recorded in
    ``train_summary.json``'s config.
    """
    from monai.bundle import ConfigWorkflow

    from c2f_med.errors import find_input_error
    from c2f_med.models import DEFAULT_BUNDLE

    bundle = Path(bundle)
    configs = bundle / "configs" if (bundle / "configs" / "train.json").is_file() else DEFAULT_BUNDLE / "configs"
    workflow = ConfigWorkflow(
        config_file=str(configs / "train.json"), meta_file=str(configs / "metadata.json"), logging_file=False,
        workflow_type=None, bundle_root=str(bundle), datalist=None if datalist is None else str(datalist),
        epochs=epochs, epoch_steps=epoch_steps, seed=seed, online_lesions=online_lesions,
        init=None if init is None else str(init), recipe=dict(recipe or {}), device=device,
    )
    try:
        workflow.initialize()
        workflow.run()
        workflow.finalize()
    except Exception as exc:  # MONAI wraps a component's InputError: give the caller the error itself
        err = find_input_error(exc)
        if err is None:
            raise
        raise err from exc
    return json.loads((bundle / "models" / "train_summary.json").read_text())
