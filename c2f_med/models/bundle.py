"""Load the project's MONAI bundle: network from ``configs/inference.json``, weights, fingerprint."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from c2f_med.errors import InputError
from c2f_med.models import BUNDLE_ENV, DEFAULT_BUNDLE
from c2f_med.models.vit import TokenViT

__all__ = ["Bundle", "OperatingPoint", "inference_config", "load_bundle", "load_weights", "sha256_file",
           "DEFAULT_BUNDLE"]


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class OperatingPoint:
    """Where a slice (or a lesion, by its best slice) is called positive.

    ``p = softmax(logits / temperature)[target]`` is the calibrated probability; a slice is positive
    when ``p >= threshold``. A bundle declares both in its inference config
    (``"operating_point": {"temperature": T, "threshold": t}``); without it the temperature is 1 and
    the threshold 0.5, and ``source`` says ``"default"``.
    """

    temperature: float = 1.0
    threshold: float = 0.5
    source: str = "default"  # "bundle" | "default"

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated class probabilities: ``B x C`` logits -> ``B x C``."""
        return torch.softmax(logits.float() / self.temperature, dim=1)

    @classmethod
    def from_config(cls, value: Any, where: Path) -> OperatingPoint:
        """Read the inference config's ``operating_point`` (``None`` -> the defaults).

        Raises:
            InputError: not a mapping, or a temperature <= 0 / threshold outside (0, 1).
        """
        if value is None:
            return cls()
        try:
            point = cls(float(value.get("temperature", 1.0)), float(value["threshold"]), "bundle")
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            raise InputError(where, f"operating_point must be {{'temperature': T, 'threshold': t}} ({err})") from err
        if not (point.temperature > 0 and 0 < point.threshold < 1):
            raise InputError(where, f"operating_point out of range: temperature {point.temperature} must be > 0, "
                                    f"threshold {point.threshold} in (0, 1)")
        return point


@dataclass
class Bundle:
    """A loaded bundle.

    Attributes:
        root: the bundle folder.
        model: the slice classifier in eval mode, as a :class:`TokenViT`.
        sha256: SHA-256 of ``models/model.pt``.
        preset: intensity preset name for :func:`c2f_med.io.transforms.load_case_transforms`.
        lesion_class: index of the "lesion" class (the explained target by default).
        config: the inference config's plain values (for provenance).
        operating_point: temperature and decision threshold (:class:`OperatingPoint`).
    """

    root: Path
    model: TokenViT
    sha256: str
    preset: str
    lesion_class: int
    config: dict[str, Any]
    operating_point: OperatingPoint = OperatingPoint()


def inference_config(root: str | Path):
    """``root/configs/inference.json`` read by MONAI's ``ConfigParser``, with ``bundle_root`` set to ``root``.

    Raises:
        InputError: the config file is missing.
    """
    from monai.bundle import ConfigParser

    config_file = Path(root) / "configs" / "inference.json"
    if not config_file.exists():
        raise InputError(config_file, "bundle file not found")
    parser = ConfigParser()
    parser.read_config(str(config_file))
    parser["bundle_root"] = str(root)
    return parser


def load_weights(net: torch.nn.Module, path: str | Path, device: str | torch.device = "cpu",
                 problem: str = "cannot load the weights") -> None:
    """Load the state dict at ``path`` into ``net`` with ``weights_only=True`` (no pickled code runs).

    Raises:
        InputError: ``path`` names no file, or its content is not a state dict that fits ``net``
            (the message: ``problem`` and the cause).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file of weights")
    try:
        net.load_state_dict(torch.load(path, map_location=device, weights_only=True))
    except Exception as err:  # noqa: BLE001 - any failure here is the file's
        raise InputError(path, f"{problem} ({type(err).__name__}: {str(err)[:200]})") from err


def load_bundle(root: str | Path, device: str | torch.device = "cpu") -> Bundle:
    """Build ``network_def`` of ``root/configs/inference.json`` and load ``root/models/model.pt``.

    The checkpoint is a state dict, loaded with ``weights_only=True``.

    Raises:
        InputError: the folder, config or weights are missing or do not fit each other.
    """
    root = Path(root)
    config_file, weights = root / "configs" / "inference.json", root / "models" / "model.pt"
    if not root.is_dir():
        raise InputError(root, f"no bundle folder here: pass --bundle DIR or set {BUNDLE_ENV}")
    for path in (config_file, weights):
        if not path.exists():
            raise InputError(path, "bundle file not found")
    try:
        parser = inference_config(root)
        model = parser.get_parsed_content("network_def", instantiate=True)
    except Exception as err:  # noqa: BLE001 - any config problem is the bundle's
        raise InputError(config_file, f"cannot build network_def ({type(err).__name__}: {err})") from err
    load_weights(model, weights, device)
    plain = {k: parser[k] for k in ("preset", "lesion_class", "axis", "method", "img_size", "operating_point")
             if k in parser}
    return Bundle(
        root=root,
        model=model.to(device).eval(),
        sha256=sha256_file(weights),
        preset=str(parser.get("preset", "auto")),
        lesion_class=int(parser.get("lesion_class", 1)),
        config=plain,
        operating_point=OperatingPoint.from_config(parser.get("operating_point"), config_file),
    )
