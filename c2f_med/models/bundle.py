"""Load a MONAI bundle: network from ``configs/inference.json``, weights, model-zoo metadata, fingerprint.

Any bundle whose ``network_def`` builds a 2D ViT classifier works, not only this project's: a
network that is not already a :class:`~c2f_med.models.vit.TokenViT` is wrapped by
:func:`c2f_med.models.adapters.wrap_model` (MONAI, timm and torchvision ViTs, or one of them inside
a larger module named by ``backbone_attr``).

What the model takes and gives comes from ``configs/metadata.json`` ``network_data_format``:
``inputs.image``: ``num_channels`` (a gray slice is repeated to it), ``spatial_shape`` (slices are
resized to it), ``value_range`` (the intensity preset's [0, 1] is mapped onto it); the first
output's ``channel_def``: class names. Three settings can come from the bundle's inference config,
from an environment variable, or from the command line (which sets the variable), the latter first:

================  ========================  =======================================================
inference.json    environment               meaning
================  ========================  =======================================================
``target_class``  ``C2F_MED_TARGET_CLASS``  class explained: a name of ``channel_def`` or an index
                                            (``lesion_class`` is read too); none: the predicted class
``preset``        ``C2F_MED_PRESET``        intensity preset: auto, ct, mr, a CT window name, or
                                            ``LEVEL,WIDTH``
``backbone_attr`` ``C2F_MED_BACKBONE_ATTR`` dotted path of the ViT inside a larger network
================  ========================  =======================================================
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from c2f_med.errors import InputError
from c2f_med.models import BACKBONE_ENV, BUNDLE_ENV, DEFAULT_BUNDLE, PRESET_ENV, TARGET_ENV
from c2f_med.models.adapters import ModelInput, UnsupportedModel, wrap_model
from c2f_med.models.vit import TokenViT

__all__ = ["Bundle", "OperatingPoint", "inference_config", "load_bundle", "load_weights", "sha256_file",
           "DEFAULT_BUNDLE", "ModelZooFormat", "read_model_zoo_format", "resolve_class", "declared_target"]


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
        preset: intensity preset for :func:`c2f_med.io.transforms.load_case_transforms` (a name or
            ``[level, width]``).
        lesion_class: index of the explained class (the bundle's declared positive class or the one
            asked for); ``None``: each slice's predicted class.
        config: the inference config's plain values (for provenance).
        operating_point: temperature and decision threshold (:class:`OperatingPoint`).
        class_names: one name per output class (``channel_def``; ``class 0``, ... without one).
    """

    root: Path
    model: TokenViT
    sha256: str
    preset: str | list[float]
    lesion_class: int | None
    config: dict[str, Any]
    operating_point: OperatingPoint = OperatingPoint()
    class_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelZooFormat:
    """The parts of ``metadata.json`` ``network_data_format`` that c2f_med uses.

    Attributes:
        model_input: channels, spatial shape and value range of ``inputs.image``.
        class_names: the first output's ``channel_def`` by index (empty without one).
    """

    model_input: ModelInput = ModelInput()
    class_names: tuple[str, ...] = ()


def read_model_zoo_format(root: str | Path) -> ModelZooFormat:
    """``root/configs/metadata.json`` ``network_data_format`` (defaults when the file or the section is absent).

    Raises:
        InputError: the file is not JSON, or a field has the wrong form.
    """
    path = Path(root) / "configs" / "metadata.json"
    if not path.is_file():
        return ModelZooFormat()
    try:
        fmt = json.loads(path.read_text()).get("network_data_format") or {}
        inputs = fmt.get("inputs") or {}
        image = inputs.get("image") or next(iter(inputs.values()), {})
        channels = int(image.get("num_channels", 1))
        shape = image.get("spatial_shape") or None
        if shape is not None:
            shape = [int(v) for v in shape if not (isinstance(v, int) and v == 1 and len(shape) > 2)]
            if len(shape) != 2:
                raise ValueError(f"spatial_shape {image['spatial_shape']} is not 2D")
        value_range = image.get("value_range") or None
        if value_range is not None:
            lo, hi = (float(v) for v in value_range)
            if not hi > lo:
                raise ValueError(f"value_range {value_range} is empty")
            value_range = (lo, hi)
        outputs = fmt.get("outputs") or {}
        out = outputs.get("pred") or next(iter(outputs.values()), {})
        channel_def = out.get("channel_def") or {}
        names = tuple(str(channel_def[k]) for k in sorted(channel_def, key=int))
        if channels < 1:
            raise ValueError(f"num_channels {channels} < 1")
    except (ValueError, TypeError, AttributeError, KeyError) as err:
        raise InputError(path, f"network_data_format cannot be read ({err})") from err
    return ModelZooFormat(ModelInput(channels, None if shape is None else (shape[0], shape[1]), value_range), names)


def resolve_class(value: int | str, class_names: tuple[str, ...], num_classes: int, where: str | Path) -> int:
    """The class index named by ``value``: an index (``1``, ``"1"``) or a ``channel_def`` name (any case).

    Raises:
        InputError: no such class (the message lists the names).
    """
    text = str(value).strip()
    known = ", ".join(f"{i}={n}" for i, n in enumerate(class_names)) or f"indices 0..{num_classes - 1}"
    if text.lstrip("-").isdigit():
        index = int(text)
    else:
        lowered = [n.lower() for n in class_names]
        index = lowered.index(text.lower()) if text.lower() in lowered else -1
    if not 0 <= index < num_classes:
        raise InputError(where, f"no class {text!r} in this model's {num_classes} classes ({known})")
    return index


def declared_target(parser: Any) -> int | str | None:
    """The bundle's positive class: ``$C2F_MED_TARGET_CLASS``, else ``target_class`` or ``lesion_class`` of
    the inference config (``parser``), else ``None``."""
    env = os.environ.get(TARGET_ENV)
    if env:
        return env
    for key in ("target_class", "lesion_class"):
        if key in parser and parser[key] is not None:
            return parser[key]
    return None


def _preset(parser: Any) -> str | list[float]:
    """The intensity preset: ``$C2F_MED_PRESET`` or the config's ``preset`` (``"LEVEL,WIDTH"`` -> two numbers)."""
    value = os.environ.get(PRESET_ENV) or parser.get("preset", "auto")
    if isinstance(value, str) and "," in value:
        with contextlib.suppress(ValueError):
            return [float(v) for v in value.split(",")]
    return value if isinstance(value, (list, tuple)) else str(value)


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
                 problem: str = "cannot load the weights",
                 adapt: Callable[[dict, torch.nn.Module], dict] | None = None) -> None:
    """Load the state dict at ``path`` into ``net`` with ``weights_only=True`` (no pickled code runs).

    ``adapt(state, net)`` may rewrite the state dict before it is loaded (e.g. resample position
    embeddings to ``net``'s token grid).

    Raises:
        InputError: ``path`` names no file, or its content is not a state dict that fits ``net``
            (the message: ``problem`` and the cause).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file of weights")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        net.load_state_dict(state if adapt is None else adapt(state, net))
    except Exception as err:  # noqa: BLE001 - any failure here is the file's
        cause = " ".join(str(err).split())[:200]  # one line: torch's messages span several
        raise InputError(path, f"{problem} ({type(err).__name__}: {cause})") from err


def load_bundle(root: str | Path, device: str | torch.device = "cpu", *, reinit_seed: int | None = None) -> Bundle:
    """Build ``network_def`` of ``root/configs/inference.json``, load ``root/models/model.pt`` and wrap the
    network behind :class:`TokenViT` when it is not one.

    The checkpoint is a state dict, loaded with ``weights_only=True`` into the network as built (before
    wrapping). With ``reinit_seed`` the weights are not loaded: the same architecture keeps the
    initialisation its constructor draws under ``torch.manual_seed(reinit_seed)`` (the
    model-randomisation check); the global random state is left as it was.

    Raises:
        InputError: the folder, config or weights are missing or do not fit each other, the network is not
            a ViT classifier c2f_med can explain, or the target class is unknown.
    """
    root = Path(root)
    config_file, weights = root / "configs" / "inference.json", root / "models" / "model.pt"
    if not root.is_dir():
        raise InputError(root, f"no bundle folder here: pass --bundle DIR or set {BUNDLE_ENV}")
    for path in (config_file, weights):
        if not path.exists():
            raise InputError(path, "bundle file not found")
    zoo = read_model_zoo_format(root)
    try:
        parser = inference_config(root)
        with torch.random.fork_rng(devices=[]):
            if reinit_seed is not None:
                torch.manual_seed(reinit_seed)
            net = parser.get_parsed_content("network_def", instantiate=True)
    except Exception as err:  # noqa: BLE001 - any config problem is the bundle's
        raise InputError(config_file, f"cannot build network_def ({type(err).__name__}: {err})") from err
    if not isinstance(net, torch.nn.Module):
        raise InputError(config_file, f"network_def builds a {type(net).__name__}, not a torch module")
    if reinit_seed is None:
        load_weights(net, weights, device)
    backbone = os.environ.get(BACKBONE_ENV) or parser.get("backbone_attr") or None
    try:
        model = wrap_model(net, zoo.model_input, backbone)
    except UnsupportedModel as err:
        raise InputError(config_file, f"network_def: {err}") from err
    names = zoo.class_names if len(zoo.class_names) == model.num_classes else ()
    names = names or tuple(f"class {i}" for i in range(model.num_classes))
    target = declared_target(parser)
    target = None if target is None else resolve_class(target, names, model.num_classes, config_file)
    plain = {k: parser[k] for k in ("preset", "lesion_class", "target_class", "backbone_attr", "axis", "method",
                                    "img_size", "operating_point") if k in parser}
    return Bundle(
        root=root,
        model=model.to(device).eval(),
        sha256=sha256_file(weights),
        preset=_preset(parser),
        lesion_class=target,
        config=plain,
        operating_point=OperatingPoint.from_config(parser.get("operating_point"), config_file),
        class_names=names,
    )
