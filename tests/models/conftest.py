"""Tiny bundles of other people's ViTs: only ``network_def`` in ``configs/inference.json``, random (seeded)
weights in ``models/model.pt`` and a model-zoo ``configs/metadata.json``.

Their weights are briefly fitted to tell slices with a bright square from slices without. One per family
the loader wraps: a MONAI ViT at its own input and patch size returning a tuple, a
MONAI ViT with the default Tanh head and three named classes, a timm ViT, a 3-channel torchvision
ViT, and a MONAI ViT behind a convolutional stem inside a wrapper module (``backbone_attr``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from torch import nn

from c2f_med.models.adapters import ModelInput, wrap_model
from c2f_med.slices import normalise_input
from c2f_med.synth.writers import write_nifti


class StemmedViT(nn.Module):
    """A researcher's wrapper: a stride-2 convolution, then a MONAI ViT (the backbone ``vit``)."""

    def __init__(self, img_size: int = 48, patch: int = 6):
        super().__init__()
        from monai.networks.nets import ViT

        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU())
        self.vit = ViT(in_channels=4, img_size=(img_size // 2,) * 2, patch_size=(patch,) * 2, hidden_size=32,
                       mlp_dim=64, num_layers=2, num_heads=2, classification=True, num_classes=2, spatial_dims=2,
                       post_activation=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(self.stem(x))[0]


def _monai(img: int, patch: int, **kw: Any) -> dict[str, Any]:
    return {"_target_": "monai.networks.nets.ViT", "in_channels": 1, "img_size": [img, img],
            "patch_size": [patch, patch], "hidden_size": 32, "mlp_dim": 64, "num_layers": 2, "num_heads": 2,
            "classification": True, "spatial_dims": 2, **kw}


#: family -> (network_def, input channels, input size, value_range, class names, inference.json extras)
FAMILIES: dict[str, tuple[dict[str, Any], int, int, list[float], list[str], dict[str, Any]]] = {
    "monai": (_monai(48, 12, num_classes=2, post_activation=None), 1, 48, [0.0, 1.0], ["normal", "lesion"], {}),
    "monai_tanh": (_monai(32, 8, num_classes=3, proj_type="perceptron"), 1, 32, [-1.0, 1.0],
                   ["normal", "lesion", "artefact"], {}),
    "timm": ({"_target_": "timm.models.vision_transformer.VisionTransformer", "img_size": 32, "patch_size": 8,
              "in_chans": 1, "num_classes": 2, "embed_dim": 32, "depth": 2, "num_heads": 2}, 1, 32, [0.0, 1.0],
             ["no lesion", "lesion"], {}),
    "torchvision": ({"_target_": "torchvision.models.VisionTransformer", "image_size": 32, "patch_size": 8,
                     "num_layers": 2, "num_heads": 2, "hidden_dim": 32, "mlp_dim": 64, "num_classes": 2}, 3, 32,
                    [0.0, 1.0], ["healthy", "lesion"], {}),
    "wrapper": ({"_target_": "tests.models.conftest.StemmedViT", "img_size": 48, "patch": 6}, 1, 48, [0.0, 1.0],
                ["normal", "lesion"], {"backbone_attr": "vit"}),
}


#: left at their random weights: a trained Tanh head saturates, and its gradients (so the gradient methods'
#: maps) become exactly 0 in float32
UNTRAINED = {"monai_tanh"}


def model_zoo_metadata(channels: int, size: int, value_range: list[float], names: list[str]) -> dict[str, Any]:
    """A model-zoo ``metadata.json`` with just enough besides ``network_data_format``."""
    pred = {"type": "probabilities", "format": "classes", "num_channels": len(names), "spatial_shape": [len(names)],
            "dtype": "float32", "value_range": [], "is_patch_data": False,
            "channel_def": {str(i): n for i, n in enumerate(names)}}
    return {"version": "0.1.0", "name": "someone's slice classifier",
            "network_data_format": {
                "inputs": {"image": {"type": "image", "format": "magnitude", "modality": "MR",
                                     "num_channels": channels, "spatial_shape": [size, size], "dtype": "float32",
                                     "value_range": value_range, "is_patch_data": False,
                                     "channel_def": {str(i): "image" for i in range(channels)}}},
                "outputs": {"pred": pred}}}


def write_family_bundle(root: Path, family: str, seed: int = 0, steps: int = 100) -> Path:
    """The tiny bundle of ``family`` (:data:`FAMILIES`) in ``root``: seeded random weights fitted for ``steps``
    Adam steps to tell slices with a bright square from slices without (class 1 = lesion), so that the
    explained class depends on the input as a trained model's does."""
    network, channels, size, value_range, names, extra = FAMILIES[family]
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(parents=True, exist_ok=True)
    (root / "configs" / "inference.json").write_text(json.dumps({"network_def": network, **extra}, indent=2))
    (root / "configs" / "metadata.json").write_text(
        json.dumps(model_zoo_metadata(channels, size, value_range, names), indent=2))
    torch.manual_seed(seed)
    net = ConfigParser({"network_def": network}).get_parsed_content("network_def")
    model = wrap_model(net, ModelInput(channels, (size, size), tuple(value_range)), extra.get("backbone_attr"))
    if family in UNTRAINED:
        steps = 0
    model.train()
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(steps):
        x, y = lesion_batch(8, size)
        loss = torch.nn.functional.cross_entropy(model(normalise_input(x)), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    torch.save(net.state_dict(), root / "models" / "model.pt")
    return root


def lesion_batch(n: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n x 1 x size x size`` noisy gray slices in [0, 1], half with a bright square (label 1)."""
    x = (0.4 + 0.05 * torch.randn(n, 1, size, size)).clamp(0, 1)
    y = torch.arange(n) % 2
    for i in torch.nonzero(y).flatten():
        r, c = torch.randint(0, size - size // 4, (2,)).tolist()
        x[i, :, r : r + size // 4, c : c + size // 4] += 0.4
    return x, y


@pytest.fixture(scope="session")
def family_bundles(tmp_path_factory) -> dict[str, Path]:
    """Every family's tiny bundle folder."""
    root = tmp_path_factory.mktemp("own_models")
    return {name: write_family_bundle(root / name, name) for name in FAMILIES}


def write_held_out_scan(folder: Path) -> tuple[Path, Path]:
    """A small MR-like scan (int16, 40 x 36 x 5, slices 0 and 4 background) with a bright lesion on slices 1-3,
    and its mask, as NIfTI files in ``folder``."""
    rng = np.random.default_rng(7)
    shape = (40, 36, 5)
    grid = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    head = (grid[0] ** 2 / 0.8 + grid[1] ** 2 / 0.8) <= 1
    image = np.where(head, 500 + 60 * rng.standard_normal(shape), 0)
    label = np.zeros(shape, dtype=np.uint8)
    label[10:18, 12:20, 1:4] = 1
    image[label > 0] += 400
    image[..., 0] = image[..., -1] = 0
    affine = np.diag([1.2, 1.2, 2.5, 1.0])
    return (write_nifti(folder / "scan.nii.gz", image.astype(np.int16), affine),
            write_nifti(folder / "mask.nii.gz", label, affine))


@pytest.fixture(scope="session")
def held_out_scan(tmp_path_factory) -> tuple[Path, Path]:
    """:func:`write_held_out_scan` in a session folder."""
    return write_held_out_scan(tmp_path_factory.mktemp("held_out"))
