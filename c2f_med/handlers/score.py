"""Scores of every explained case against its lesion mask, merged over ranks: :class:`LesionScoreHandler`.

The scores are those :class:`~c2f_med.handlers.ExplainHandler` (``score=True``) got from
:func:`c2f_med.case.explain_and_score`, the function ``c2f-med explain --mask`` and ``c2f-med
evaluate`` use, so the bundle's ``evaluate.json`` writes ``summary.json`` / ``summary.md`` /
``per_case.csv`` / ``per_slice.csv`` / ``false_alarms.csv`` with the same rows, builder and columns
as ``c2f-med evaluate``, strata included. Deletion / insertion AUCs are null unless the explain
handler computes them (``faithfulness``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
from ignite.engine import Engine, Events
from monai.utils import CommonKeys

from c2f_med.atomic import write_csv
from c2f_med.handlers.explain import case_ids
from c2f_med.summary import (
    FALSE_ALARM_HEAD,
    PER_SLICE_HEAD,
    SCORE_KEYS,
    aggregate,
    classifier_scores,
    summarise,
    write_summary,
)

__all__ = ["LesionScoreHandler", "METRIC_KEYS", "is_rank0", "all_gather"]

#: the localisation scores (:func:`~c2f_med.metrics.localisation.localisation_scores`) among the summary's
LOCALISATION_KEYS = tuple(k for k in SCORE_KEYS if k not in ("deletion_auc", "insertion_auc"))
#: keys of ``engine.state.metrics`` set by :class:`LesionScoreHandler`
METRIC_KEYS = (*LOCALISATION_KEYS, "miou", "slice_auroc", "slice_accuracy")
PER_CASE_COLUMNS = ("case", "method", "slices", *SCORE_KEYS, "miou", "seconds_per_slice", "forward_passes_per_slice",
                    "backward_passes_per_slice", "tolerance_voxels", *(f"volume_{k}" for k in LOCALISATION_KEYS))


def is_rank0() -> bool:
    """True on rank 0 of ``ignite.distributed``'s group (and without one)."""
    return idist.get_rank() == 0


def all_gather(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` through ``ignite.distributed`` (``[obj]`` in one process);
    any picklable object."""
    return [part[0] for part in idist.all_gather([obj])]


class LesionScoreHandler:
    """Scores each case's saliency against its lesion mask (MONAI metric-handler style).

    Attach it after :class:`~c2f_med.handlers.ExplainHandler` built with ``score=True``. At
    ``ITERATION_COMPLETED``, each decollated output item with a ``"label"`` (lesion mask) gains
    ``"scores"``, exactly ``c2f-med explain``'s ``scores.json``; the handler keeps the item's rows
    (:class:`~c2f_med.case.CaseScores`): per lesion slice a :mod:`c2f_med.summary` row (the model's
    probability and decision, localisation scores, IoU counts at the mean threshold, the explainer's
    record and cost), per false alarm a saliency-mass row, per non-background slice a classifier row.

    At ``EPOCH_COMPLETED`` the rows of every rank are gathered (``ignite.distributed``), then

    - ``engine.state.metrics`` gets :data:`METRIC_KEYS`: the means over the dataset's lesion slices
      (NaN-aware), the dataset mIoU, and the classifier's slice AUROC and accuracy;
    - with ``output_dir``, rank 0 alone writes ``summary.json`` and ``summary.md``
      (:func:`c2f_med.summary.summarise`, strata by the model's decision included) and, with
      ``save_details``, ``per_case.csv`` (means over each case's lesion slices and its 3D
      ``volume_*`` scores), ``per_slice.csv`` and ``false_alarms.csv``; each file atomically.

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
        self.fp_rows: list[dict[str, Any]] = []
        self.classifier: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _engine: self.reset())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def iteration_completed(self, engine: Engine) -> None:
        for case, item in zip(case_ids(engine), engine.state.output):
            method = item["explain_info"]["method"]
            if item.get(CommonKeys.LABEL) is None:
                self.cases.append({"case": case, "method": method, "scores": None})
                continue
            if "case_scores" not in item:
                raise RuntimeError("LesionScoreHandler needs the scores of ExplainHandler(score=True)")
            scored = item["case_scores"]
            item["scores"] = scored.scores
            self.cases.append({"case": case, "method": method, "scores": scored.scores})
            self.rows += scored.rows
            self.fp_rows += scored.fp_rows
            self.classifier += scored.classifier

    def epoch_completed(self, engine: Engine) -> None:
        cases, rows, fp_rows, classifier = ([x for part in all_gather(v) for x in part]
                                            for v in (self.cases, self.rows, self.fp_rows, self.classifier))
        cases.sort(key=lambda c: c["case"])
        rows.sort(key=lambda r: (r["case"], r["slice"]))
        fp_rows.sort(key=lambda r: (r["case"], r["slice"]))
        means = aggregate(rows)
        engine.state.metrics.update({k: means[k] for k in METRIC_KEYS if k in means})
        threshold = self.bundle.operating_point.threshold if self.bundle is not None else 0.5
        engine.state.metrics.update({k: v for k, v in classifier_scores(classifier, threshold).items()
                                     if k in METRIC_KEYS})
        if self.output_dir is None or not is_rank0():
            return
        methods = list(dict.fromkeys(c["method"] for c in cases))
        summary = summarise(rows, classifier, self.bundle, self.datalist, len(cases), methods=methods,
                            fp_rows=fp_rows, n_boot=self.n_boot)
        write_summary(self.output_dir, summary)
        if self.save_details:
            write_csv(self.output_dir / "per_slice.csv", rows, _columns(rows, PER_SLICE_HEAD))
            write_csv(self.output_dir / "false_alarms.csv", fp_rows, _columns(fp_rows, FALSE_ALARM_HEAD))
            write_csv(self.output_dir / "per_case.csv", _per_case_rows(cases, rows), PER_CASE_COLUMNS)


def _columns(rows: Sequence[Mapping[str, Any]], head: Sequence[str]) -> list[str]:
    """``head`` then every other key of ``rows`` (the explainer's record), in order of appearance."""
    return [*head, *dict.fromkeys(k for r in rows for k in r if k not in head)]


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

