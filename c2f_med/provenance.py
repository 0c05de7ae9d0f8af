"""Provenance written with every output: what produced it, from what, with which versions."""

from __future__ import annotations

import datetime
import hashlib
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

__all__ = ["provenance", "input_hash", "versions"]

_PACKAGES = ("c2f_med", "torch", "monai", "timm", "numpy", "nibabel", "pydicom", "SimpleITK", "highdicom",
             "scikit-image", "scipy", "pytorch-ignite")


def versions() -> dict[str, str]:
    """Installed versions of the packages that shape the numbers."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def input_hash(path: str | os.PathLike | None) -> str | None:
    """SHA-256 of a file, or of a folder's files (sorted relative names and their bytes)."""
    if path is None:
        return None
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def provenance(bundle, *, inputs: dict[str, Any], method: str | None = None,
               params: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A JSON-ready provenance record.

    Input files are identified by name and SHA-256 only (never by DICOM patient attributes).
    """
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "bundle": {"path": str(bundle.root), "sha256": bundle.sha256, "config": bundle.config},
        "inputs": {k: None if v is None else {"path": str(v), "sha256": input_hash(v)} for k, v in inputs.items()},
        "method": method,
        "params": params or {},
        "seed": torch.initial_seed(),
        "torch_threads": torch.get_num_threads(),
        "command": " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:]),
        "versions": versions(),
        **(extra or {}),
    }
