"""Explain every case an evaluator loads: :class:`ExplainHandler`.

The bundle's evaluator (``configs/inference.json``) loads one scan per iteration with
:func:`~c2f_med.io.transforms.load_case_transforms` and runs no forward pass of its own
(:func:`no_forward`): the slices are classified and explained inside
:func:`~c2f_med.explain.explain_volume`, which :class:`ExplainHandler` runs at
``ITERATION_COMPLETED`` on the decollated output. The score and save handlers then read what it
stored in each item.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.utils import CommonKeys

from c2f_med.case import explain_and_score
from c2f_med.explain import Explainer, available, create
from c2f_med.io.manifest import case_id
from c2f_med.models.bundle import OperatingPoint
from c2f_med.models.vit import TokenViT

__all__ = ["ExplainHandler", "no_forward", "case_ids"]


def no_forward(inputs: torch.Tensor, network: torch.nn.Module) -> torch.Tensor:
    """Evaluator ``inferer`` for explanation runs: a ``B x 0`` placeholder, no forward pass.

    :class:`ExplainHandler` classifies every slice inside
    :func:`~c2f_med.explain.explain_volume` and replaces ``"pred"`` with the per-slice
    probabilities; a forward pass here would classify every slice twice.
    """
    return inputs.new_zeros((inputs.shape[0], 0))


def case_ids(engine: Engine) -> list[str]:
    """Case ids of the current decollated batch: each item's ``"case_id"`` (set by
    :func:`~c2f_med.io.manifest.read_datalist`), else the scan's file or folder name."""
    return [str(item["case_id"]) if "case_id" in item else case_id(item[CommonKeys.IMAGE].meta["filename_or_obj"])
            for item in engine.state.batch]


class ExplainHandler:
    """Saliency volume of every item of the batch, at ``ITERATION_COMPLETED``.

    The engine's ``network`` (a :class:`~c2f_med.models.vit.TokenViT`) gets the explainer
    ``method``; for each item of the decollated ``engine.state.output``, whose ``"image"`` is the
    loaded scan ``1 x X x Y x Z`` (RAS, intensities in [0, 1]), the item gains:

    - ``"saliency"``: ``1 x X x Y x Z`` float32 MetaTensor in [0, 1] with the image's meta data and
      applied operations, so ``Invertd`` / ``SaveImage`` or
      :func:`~c2f_med.export.nifti.save_on_original_grid` put it on the input file's grid;
    - ``"pred"``: ``n`` per-slice probabilities of ``target`` along ``axis`` (NaN on background slices);
    - ``"explanation"``: the :class:`~c2f_med.explain.volume.VolumeExplanation` (per-slice
      predictions, the explainer's records, forward / backward pass counts);
    - ``"explain_info"``: ``{"method", "params", "axis", "min_probability", "normalise", "seconds"}``
      for provenance and costs;
    - with ``score`` and a ``"label"`` (lesion mask ``1 x X x Y x Z``): ``"case_scores"``, the
      :class:`~c2f_med.case.CaseScores` of :func:`c2f_med.case.explain_and_score` (lesion rows by the
      model's decision, false alarms, classifier rows, ``scores.json``), which
      :class:`~c2f_med.handlers.LesionScoreHandler` collects.

    The explaining and scoring is :func:`c2f_med.case.explain_and_score`, the function ``c2f-med
    explain``, ``c2f-med evaluate`` and the audit call.

    MONAI evaluators run their forward pass under ``no_grad`` and may run in inference mode: the
    explainer runs with inference mode off and gradients on, so gradient methods (``gae``,
    ``gradcam``, ...) work. The evaluator must decollate (``decollate=True``, its default).

    Args:
        method: explainer name (:func:`c2f_med.explain.available`).
        params: explainer parameter overrides.
        axis: slicing axis after RAS orientation (2 = axial).
        target: class explained (the bundle's lesion class).
        min_probability: explain only slices whose ``target`` probability reaches it.
        normalise: ``"slice"`` or ``"volume"`` (see :func:`~c2f_med.explain.explain_volume`).
        slice_batch: slices classified and explained per batch.
        progress: a progress bar over each case's slices.
        score: score each item that has a lesion mask (the bundle's ``evaluate.json`` turns it on).
        faithfulness: with ``score``, also the deletion / insertion AUCs of the lesion slices.
        bundle: the :class:`~c2f_med.models.bundle.Bundle`, whose operating point decides which slices
            the model calls positive (default: threshold 0.5, temperature 1).
    """

    def __init__(
        self,
        method: str = "c2f",
        params: dict[str, Any] | None = None,
        axis: int = 2,
        target: int = 1,
        min_probability: float | None = None,
        normalise: str = "slice",
        slice_batch: int = 16,
        progress: bool = False,
        score: bool = False,
        faithfulness: bool = False,
        bundle: Any = None,
    ) -> None:
        if method not in available():
            raise ValueError(f"unknown explainer {method!r}; available: {', '.join(available())}")
        self.method = method
        self.params = dict(params or {})
        self.axis = axis
        self.target = target
        self.min_probability = min_probability
        self.normalise = normalise
        self.slice_batch = slice_batch
        self.progress = progress
        self.score = score
        self.faithfulness = faithfulness
        self.operating_point = getattr(bundle, "operating_point", None) or OperatingPoint()
        self.explainer: Explainer | None = None

    def attach(self, engine: Engine) -> None:
        """Run at every ``ITERATION_COMPLETED``."""
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _explainer_for(self, network: Any) -> Explainer:
        """The explainer on ``network``, built at the first iteration (MONAI workflows attach their
        handlers before they set ``engine.network``)."""
        if not isinstance(network, TokenViT):
            raise TypeError(f"ExplainHandler needs an engine whose network is a TokenViT, got {type(network).__name__}")
        if self.explainer is None or self.explainer.model is not network:
            self.explainer = create(self.method, network, **self.params)
        return self.explainer

    def __call__(self, engine: Engine) -> None:
        if not isinstance(engine.state.output, list):
            raise TypeError("ExplainHandler needs the decollated output: build the evaluator with decollate=True")
        explainer = self._explainer_for(getattr(engine, "network", None))
        for case, item in zip(case_ids(engine), engine.state.output):
            start = time.perf_counter()
            label = item.get(CommonKeys.LABEL) if self.score else None
            with torch.inference_mode(False), torch.enable_grad():
                scored = explain_and_score(
                    explainer.model,
                    item[CommonKeys.IMAGE].clone(),  # a normal tensor even if the run is in inference mode
                    None if label is None else label[0].cpu().numpy() > 0,
                    explainer,
                    case=case,
                    target=self.target,
                    operating_point=self.operating_point,
                    axis=self.axis,
                    min_probability=self.min_probability,
                    normalise=self.normalise,
                    slice_batch=self.slice_batch,
                    faithfulness=self.faithfulness,
                    progress=self.progress,
                )
            item["saliency"] = scored.result.saliency
            item[CommonKeys.PRED] = torch.as_tensor(scored.probability, dtype=torch.float32)
            item["explanation"] = scored.result
            if label is not None:
                item["case_scores"] = scored
            item["explain_info"] = {
                "method": self.method,
                "params": explainer.param_dict(),
                "axis": self.axis,
                "min_probability": self.min_probability,
                "normalise": self.normalise,
                "seconds": time.perf_counter() - start,
            }
