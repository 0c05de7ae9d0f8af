"""Shared fixtures: a tiny MONAI bundle (random LesionViT) and tiny NIfTI cases with known lesions.

Both are session-scoped and small enough that a whole evaluation runs in seconds on a CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from c2f_med.io.manifest import write_datalist
from c2f_med.synth.writers import write_nifti

#: the tiny bundle's network: 32 x 32 input, stem stride 4 -> 8 x 8 tokens of 4 x 4 pixels, 2 blocks
TINY_NETWORK = {"_target_": "c2f_med.models.vit.LesionViT", "img_size": 32, "in_channels": 1, "num_classes": 2,
                "stem_channels": [8, 16], "hidden_size": 32, "mlp_dim": 64, "num_layers": 2, "num_heads": 2}

#: tiny cases: name -> (shape, lesion box as slices or None, seed); slices 0 and Z-1 are all background
TINY_CASES = {
    "tiny_a": ((40, 36, 10), (slice(8, 16), slice(10, 17), slice(3, 6)), 1),
    "tiny_b": ((36, 40, 9), (slice(20, 27), slice(22, 30), slice(4, 7)), 2),
    "tiny_c": ((40, 40, 8), None, 3),
}


def write_tiny_bundle(root: Path, seed: int = 0, **network) -> Path:
    """A bundle folder whose ``configs/inference.json`` builds :data:`TINY_NETWORK` (``network``: keyword
    arguments changed or added) and whose ``models/model.pt`` holds its random (seeded) weights."""
    from c2f_med.models.vit import LesionViT

    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(parents=True, exist_ok=True)
    config = {"imports": ["$import torch", "$import c2f_med"], "bundle_root": ".", "device": "cpu",
              "img_size": TINY_NETWORK["img_size"], "preset": "auto", "lesion_class": 1, "axis": 2,
              "method": "c2f", "network_def": {**TINY_NETWORK, **network}}
    (root / "configs" / "inference.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(seed)
    kwargs = {k: v for k, v in {**TINY_NETWORK, **network}.items() if k != "_target_"}
    torch.save(LesionViT(**kwargs).state_dict(), root / "models" / "model.pt")
    return root


def write_tiny_case(folder: Path, name: str, shape: tuple[int, int, int], lesion: tuple[slice, ...] | None,
                    seed: int) -> dict[str, str]:
    """An int16 "head" (a noisy ellipsoid, first and last slices 0) with a bright box lesion, and its
    0/1 mask; returns the datalist item ``{"image", "label"}`` (absolute paths)."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    head = sum(g**2 / r**2 for g, r in zip(grid, (0.9, 0.9, 1.4))) <= 1
    image = np.where(head, 600 + 80 * rng.standard_normal(shape), 0)
    image[..., 0] = image[..., -1] = 0
    label = np.zeros(shape, dtype=np.uint8)
    if lesion is not None:
        label[lesion] = 1
        image[lesion] += 500
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    image_path = write_nifti(folder / "images" / f"{name}.nii.gz", image.astype(np.int16), affine)
    label_path = write_nifti(folder / "labels" / f"{name}.nii.gz", label, affine)
    return {"image": str(image_path), "label": str(label_path)}


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """Folder of a tiny bundle (:func:`write_tiny_bundle`)."""
    return write_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny_bundle")


@pytest.fixture(scope="session")
def tiny_datalist(tmp_path_factory) -> Path:
    """A datalist whose "testing" section holds the :data:`TINY_CASES` (two with a lesion, one without)."""
    folder = tmp_path_factory.mktemp("tiny_cases")
    items = [write_tiny_case(folder, name, *spec) for name, spec in TINY_CASES.items()]
    path = folder / "datalist.json"
    write_datalist(path, testing=items, name="tiny")
    return path
