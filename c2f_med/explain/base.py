"""The Explainer protocol and the registry of explainers by name.

An explainer maps slices ``B x 1 x H x W`` (the model's normalised input) and a target class to
saliency maps ``B x H x W`` in [0, 1], and records what it cost: forward passes (one image through
the model counts one, however the images are batched) and backward passes, plus a per-slice record
(for C2F: K, and the POS / NEG / BND counts at each S3WM level).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from c2f_med.models.vit import TokenViT

__all__ = ["Explanation", "Explainer", "register", "create", "available", "resolve_target", "check_choices"]


@dataclass
class Explanation:
    """Result of :meth:`Explainer.explain` for a batch of ``B`` slices.

    Attributes:
        saliency: ``B x H x W`` float32 in [0, 1] (min-max normalised per slice; an all-zero map
            stays zero).
        target: ``B`` class indices explained.
        forward_passes: images put through the model for the whole batch.
        backward_passes: backward passes for the whole batch (one per slice when a method takes a
            gradient of the slice's target logit).
        records: one dict per slice (method-specific bookkeeping, JSON-serialisable).
    """

    saliency: torch.Tensor
    target: torch.Tensor
    forward_passes: int = 0
    backward_passes: int = 0
    records: list[dict[str, Any]] = field(default_factory=list)


class Explainer:
    """Base class. Subclasses implement :meth:`_explain` and declare their parameters as a dataclass
    ``Params`` whose fields (with defaults and docs) are the method's named constants. A field typed
    ``Literal[...]`` (alone or in a union) only takes those strings: anything else is refused at
    construction, naming the valid values.
    """

    name: str = ""

    @dataclass
    class Params:
        pass

    def __init__(self, model: TokenViT, **params: Any):
        self.model = model.eval()
        names = {f.name for f in dataclasses.fields(self.Params)}
        unknown = set(params) - names
        if unknown:
            raise ValueError(f"unknown parameter(s) {sorted(unknown)}; known: {sorted(names)}")
        self.params = self.Params(**params)
        check_choices(self.params)

    def param_dict(self) -> dict[str, Any]:
        """The parameters in use, for provenance."""
        return dataclasses.asdict(self.params)

    def explain(self, x: torch.Tensor, target: torch.Tensor | int | None = None) -> Explanation:
        """Explain ``x`` (``B x 1 x H x W``) for ``target`` (``B`` classes, one class, or ``None`` for
        the predicted class)."""
        if x.ndim != 4:
            raise ValueError(f"expected B x C x H x W slices, got shape {tuple(x.shape)}")
        return self._explain(x, target)

    def _explain(self, x: torch.Tensor, target: torch.Tensor | int | None) -> Explanation:
        raise NotImplementedError


def _choices(hint: Any) -> tuple[Any, ...]:
    """The values of the ``Literal`` types in ``hint`` (itself, or members of a union)."""
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return tuple(v for member in typing.get_args(hint) for v in _choices(member))
    return ()


def check_choices(params: Any) -> None:
    """Refuse a string option of the dataclass ``params`` that its ``Literal`` type does not list.

    A field typed only ``Literal[...]`` must hold one of its values; a union such as
    ``float | Literal["a", "b"]`` restricts only string values.

    Raises:
        ValueError: one line, ``name='value' is not one of 'a', 'b'``.
    """
    hints = typing.get_type_hints(type(params))
    for f in dataclasses.fields(params):
        choices = _choices(hints[f.name])
        value = getattr(params, f.name)
        only_literal = typing.get_origin(hints[f.name]) is Literal
        if choices and (only_literal or isinstance(value, str)) and value not in choices:
            valid = ", ".join(repr(c) for c in choices)
            raise ValueError(f"{f.name}={value!r} is not one of {valid}")


def resolve_target(logits: torch.Tensor, target: torch.Tensor | int | None) -> torch.Tensor:
    """``B`` target classes: the argmax of ``logits`` (``B x C``) when ``target`` is ``None``."""
    n, c = logits.shape
    if target is None:
        return logits.argmax(1)
    t = torch.as_tensor(target, device=logits.device).long().reshape(-1).expand(n).clone()
    if (t < 0).any() or (t >= c).any():
        raise ValueError(f"target class {t.tolist()} out of range for a {c}-class model")
    return t


_REGISTRY: dict[str, tuple[type[Explainer], dict[str, Any]]] = {}


def register(name: str, params: dict[str, Any] | None = None) -> Callable[[type[Explainer]], type[Explainer]]:
    """Class decorator: register ``cls`` under ``name`` with fixed parameter overrides ``params``.

    Stack it to register named variants of one class (``c2f-noAF`` = ``C2F`` with ``af=False``).
    """

    def deco(cls: type[Explainer]) -> type[Explainer]:
        if name in _REGISTRY:
            raise ValueError(f"explainer {name!r} registered twice")
        _REGISTRY[name] = (cls, dict(params or {}))
        return cls

    return deco


def create(name: str, model: TokenViT, **overrides: Any) -> Explainer:
    """The explainer registered as ``name`` on ``model``; ``overrides`` change its parameters."""
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown explainer {name!r}; available: {', '.join(available())}")
    cls, fixed = _REGISTRY[name]
    try:
        explainer = cls(model, **{**fixed, **overrides})
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None
    explainer.name = name
    return explainer


def available() -> list[str]:
    """Registered explainer names."""
    _load_builtin()
    return sorted(_REGISTRY)


def _load_builtin() -> None:
    # importing the modules runs their @register decorators
    from c2f_med.explain import attention, attnlrp, c2f, gradcam, legrad, occlusion, rise, vitcx  # noqa: F401
