"""Localisation scores of every explained case against its lesion mask: :class:`LesionScoreHandler`.

Per case it computes what ``c2f-med explain --mask`` writes as ``scores.json``
(:func:`c2f_med.case.score_volume`) and the per-slice rows of :mod:`c2f_med.summary`, so the
bundle's ``evaluate.json`` writes ``summary.json`` / ``summary.md`` / ``per_case.csv`` /
``per_slice.csv`` with the same builder and columns as ``c2f-med evaluate``. Faithfulness
(deletion / insertion AUC) is not computed here: those keys are null (``c2f-med evaluate``
computes them on the model's input grid).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist
from ignite.engine import Engine, Events
from monai.utils import CommonKeys

from c2f_med.atomic import write_csv
from c2f_med.case import case_scores
from c2f_med.handlers.explain import case_ids
from c2f_med.metrics.localisation import threshold_mean
from c2f_med.summary import (
    COST_KEYS,
    IOU_COUNT_KEYS,
    SCORE_KEYS,
    aggregate,
    classifier_rows,
    classifier_scores,
    iou_counts,
    summarise,
    write_summary,
)

__all__ = ["LesionScoreHandler", "METRIC_KEYS", "is_rank0", "all_gather"]

#: the localisation scores (:func:`~c2f_med.metrics.localisation.localisation_scores`) among the summary's
LOCALISATION_KEYS = tuple(k for k in SCORE_KEYS if k not in ("deletion_auc", "insertion_auc"))
#: keys of ``engine.state.metrics`` set by :class:`LesionScoreHandler`
METRIC_KEYS = (*LOCALISATION_KEYS, "miou", "slice_auroc", "slice_accuracy")
PER_SLICE_COLUMNS = ("case", "slice", "method", "probability", *SCORE_KEYS, *COST_KEYS, *IOU_COUNT_KEYS)
PER_CASE_COLUMNS = ("case", "method", "slices", *SCORE_KEYS, "miou", "seconds_per_slice", "forward_passes_per_slice",
                    "backward_passes_per_slice", "tolerance_voxels", *(f"volume_{k}" for k in LOCALISATION_KEYS))


def is_rank0() -> bool:
    """True without ``torch.distributed`` or on rank 0."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def all_gather(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` without ``torch.distributed``); picklable objects."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class LesionScoreHandler:
    """Scores each case's saliency against its lesion mask (MONAI metric-handler style).

    Attach it after :class:`~c2f_med.handlers.ExplainHandler`. At ``ITERATION_COMPLETED``, each
    decollated output item with a ``"label"`` (lesion mask ``1 x X x Y x Z`` on the scan's grid)
    gains ``"scores"``: :func:`c2f_med.case.score_volume` plus ``"tolerance_voxels"`` (the
    pointing game's ``p / 2`` model pixels), exactly ``c2f-med explain``'s ``scores.json``. The
    handler keeps, per lesion slice, a :mod:`c2f_med.summary` row (localisation scores, IoU counts
    at the mean threshold, the slice's probability, the explainer's record and its cost per
    explained slice) and, per non-background slice, a classifier row.

    At ``EPOCH_COMPLETED`` the rows of every rank are gathered (``torch.distributed``), then

    - ``engine.state.metrics`` gets :data:`METRIC_KEYS`: the means over the dataset's lesion slices
      (NaN-aware), the dataset mIoU, and the classifier's slice AUROC and accuracy;
    - with ``output_dir``, rank 0 alone writes ``summary.json`` and ``summary.md``
      (:func:`c2f_med.summary.summarise`; ``deletion_auc`` / ``insertion_auc`` null) and, with
      ``save_details``, ``per_case.csv`` (means over each case's lesion slices and its 3D
      ``volume_*`` scores) and ``per_slice.csv``; each file atomically.

    Items without a label count in ``cases`` but are not scored.

    Args:
        output_dir: folder of the merged files; None keeps the scores in the engine only.
        bundle: the :class:`~c2f_med.models.bundle.Bundle` named in ``summary.json`` (needed with ``output_dir``).
        datalist: the datalist named in ``summary.json``.
        save_details: also write ``per_case.csv`` and ``per_slice.csv``.
        n_boot: bootstrap resamples of the summary's confidence intervals.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike | None = None,
        bundle: Any = None,
        datalist: str | os.PathLike = "",
        save_details: bool = True,
        n_boot: int = 2000,
    ) -> None:
        if output_dir is not None and bundle is None:
            raise ValueError("LesionScoreHandler needs the bundle to write summary.json")
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.bundle = bundle
        self.datalist = str(datalist)
        self.save_details = save_details
        self.n_boot = n_boot
        self.reset()

    def reset(self) -> None:
        """Forget the rows of the previous epoch."""
        self.cases: list[dict[str, Any]] = []  # {"case", "method", "scores" or None}
        self.rows: list[dict[str, Any]] = []
        self.classifier: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _engine: self.reset())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def iteration_completed(self, engine: Engine) -> None:
        for case, item in zip(case_ids(engine), engine.state.output):
            info = item["explain_info"]
            label = item.get(CommonKeys.LABEL)
            if label is None:
                self.cases.append({"case": case, "method": info["method"], "scores": None})
                continue
            axis = info["axis"]
            saliency = item["saliency"][0].numpy()  # X x Y x Z
            mask = label[0].cpu().numpy() > 0
            scores = case_scores(saliency, mask, axis, engine.network)
            item["scores"] = scores
            self.cases.append({"case": case, "method": info["method"], "scores": scores})
            self._add_rows(case, item, saliency, mask, scores)

    def _add_rows(self, case: str, item: Mapping[str, Any], saliency: np.ndarray, mask: np.ndarray,
                  scores: Mapping[str, Any]) -> None:
        info, result = item["explain_info"], item["explanation"]
        axis = info["axis"]
        classified = sum(not math.isnan(p.probability) for p in result.predictions)
        explained = max(1, sum(p.explained for p in result.predictions))
        cost = {"seconds": info["seconds"] / explained,
                "forward_passes": (result.forward_passes - classified) / explained,  # the explainer's passes
                "backward_passes": result.backward_passes / explained}
        records = {r["index"]: {k: v for k, v in r.items() if k != "index"} for r in result.records}
        probability = {p.index: p.probability for p in result.predictions}
        for entry in scores["per_slice"]:
            i = entry["slice"]
            s, m = np.take(saliency, i, axis), np.take(mask, i, axis)
            record = records.get(i, {})
            self.rows.append({"case": case, "slice": i, "method": info["method"], "probability": probability[i],
                              **{k: v for k, v in entry.items() if k != "slice"}, **cost, **record,
                              **iou_counts(threshold_mean(s), m)})
        self.classifier += classifier_rows(case, result.predictions, mask, axis)

    def epoch_completed(self, engine: Engine) -> None:
        cases, rows, classifier = ([x for part in all_gather(v) for x in part]
                                   for v in (self.cases, self.rows, self.classifier))
        cases.sort(key=lambda c: c["case"])
        rows.sort(key=lambda r: (r["case"], r["slice"]))
        means = aggregate(rows)
        engine.state.metrics.update({k: means[k] for k in METRIC_KEYS if k in means})
        engine.state.metrics.update({k: v for k, v in classifier_scores(classifier).items() if k in METRIC_KEYS})
        if self.output_dir is None or not is_rank0():
            return
        methods = list(dict.fromkeys(c["method"] for c in cases))
        summary = summarise(rows, classifier, self.bundle, self.datalist, len(cases), methods=methods,
                            n_boot=self.n_boot)
        write_summary(self.output_dir, summary)
        if self.save_details:
            write_csv(self.output_dir / "per_slice.csv", rows, PER_SLICE_COLUMNS)
            write_csv(self.output_dir / "per_case.csv", _per_case_rows(cases, rows), PER_CASE_COLUMNS)


def _per_case_rows(cases: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per scored case: means over its lesion slices and its 3D scores."""
    out = []
    for c in cases:
        if c["scores"] is None:
            continue
        means = aggregate([r for r in rows if r["case"] == c["case"]])
        out.append({"case": c["case"], "method": c["method"], **means,
                    "tolerance_voxels": c["scores"]["tolerance_voxels"],
                    **{f"volume_{k}": c["scores"]["volume"][k] for k in LOCALISATION_KEYS}})
    return out

