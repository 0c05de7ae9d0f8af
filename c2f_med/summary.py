"""``summary.json`` and ``summary.md`` from per-slice score rows: the one builder that ``c2f-med evaluate``
and the cohort audit share.

A *row* is the score of one method on one lesion slice (a dict, one line of ``per_slice.csv``)::

    {"case": str, "slice": int, "method": str, "probability": float (calibrated, of the lesion class),
     "positive": bool (the model's decision at the operating point), "stratum": "tp" | "fn",
     "lesions": str (the 3-D lesions the slice cuts, "1 2"),
     "pointing_game", "pointing_game_tol", "relevance_mass", "iou", "dice", "iou_topk", "dice_topk",
     "auroc", "ap", "deletion_auc", "insertion_auc": float (NaN = not applicable or not computed),
     "seconds", "forward_passes", "backward_passes": float (the explainer's cost for this slice),
     "bg_intersection", "bg_union", "lesion_intersection", "lesion_union": int
        (the slice's {background, lesion} IoU counts at the mean threshold, so the dataset mIoU
         can be recomputed from the rows alone),
     ...any other keys (the explainer's record: K, pos1, ... for C2F)}

A *false-alarm row* is one method on one lesion-free slice that the model calls positive::

    {"case", "slice", "method", "probability", "positive": True, "stratum": "fp",
     "mass_foreground", "topk_foreground", "peak_foreground", "foreground_fraction": float
        (:func:`c2f_med.metrics.localisation.saliency_mass`), "seconds", "forward_passes", "backward_passes", ...}

A *classifier row* is the classifier's view of one non-background slice::

    {"case": str, "slice": int, "probability": float (of the lesion class), "lesion": bool,
     "lesions": list[int] (the case's 3-D lesions that the slice cuts: connected components of the
        mask, numbered per case; empty on a lesion-free slice), "positive": bool (optional)}

A *stability row*: ``{"case", "slice", "method", "int16": r, "noise": r}`` (:func:`c2f_med.case.explain_and_score`).

:func:`summarise` turns rows into the ``summary.json`` dict whose keys scripts rely on
plus a few extras; :func:`write_summary` writes it as ``summary.json`` and ``summary.md``. Rows may
hold numbers or their CSV text (``csv.DictReader`` of ``per_slice.csv``; an empty cell is NaN), so
a summary can be rebuilt from the CSV alone.
Aggregates use ``nanmean``: NaN scores are "not applicable" and are counted, never averaged as 0.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_roc_auc
from skimage import measure

from c2f_med.atomic import write_json, write_text
from c2f_med.metrics.bootstrap import bootstrap_ci, paired_bootstrap, paired_bootstrap_miou
from c2f_med.metrics.calibration import expected_calibration_error, rates_at
from c2f_med.metrics.localisation import FP_KEYS, IoUAccumulator

__all__ = [
    "comparison_table",
    "paired_comparison",
    "SCORE_KEYS",
    "IOU_COUNT_KEYS",
    "COST_KEYS",
    "FALSE_ALARM_HEAD",
    "PER_SLICE_HEAD",
    "STABILITY_HEAD",
    "FP_KEYS",
    "STRATA",
    "LOWER_IS_BETTER",
    "CLASSIFIER_THRESHOLD",
    "REFERENCE_METHOD",
    "CI_KEYS",
    "RECORD_KEYS",
    "iou_counts",
    "aggregate",
    "classifier_rows",
    "lesion_components",
    "classifier_scores",
    "summarise",
    "render_markdown",
    "write_summary",
]

#: per-slice scores averaged per method (NaN-aware)
SCORE_KEYS = ("pointing_game", "pointing_game_tol", "relevance_mass", "iou", "dice", "iou_topk", "dice_topk",
              "auroc", "ap", "deletion_auc", "insertion_auc")
#: per-slice IoU counts at the mean threshold; summed over slices they give the dataset mIoU
IOU_COUNT_KEYS = ("bg_intersection", "bg_union", "lesion_intersection", "lesion_union")
#: per-slice cost of the explainer
COST_KEYS = ("seconds", "forward_passes", "backward_passes")
#: the first columns of per_slice.csv (lesion rows), false_alarms.csv and stability.csv; the explainer's
#: record fields follow
PER_SLICE_HEAD = ("case", "slice", "method", "probability", "positive", "stratum", "lesions", *SCORE_KEYS, *COST_KEYS,
                  *IOU_COUNT_KEYS)
FALSE_ALARM_HEAD = ("case", "slice", "method", "probability", "positive", "stratum", *FP_KEYS, *COST_KEYS)
STABILITY_HEAD = ("case", "slice", "method", "int16", "noise")
#: summary columns where a smaller value is better (all other scores: larger is better)
LOWER_IS_BETTER = frozenset({"deletion_auc", "seconds_per_slice", "forward_passes_per_slice",
                             "backward_passes_per_slice"})
#: a slice is classified "lesion" when the lesion probability is at least this, unless the bundle
#: declares its own operating point
CLASSIFIER_THRESHOLD = 0.5
#: the model's decision on a slice: lesion slices it calls positive / negative, lesion-free slices it calls positive
STRATA = ("tp", "fn", "fp")
#: per-lesion scores: each 3-D lesion's mean (and best) over the slices that cut it
LESION_KEYS = ("pointing_game", "pointing_game_tol", "relevance_mass", "iou_topk", "auroc", "ap", "deletion_auc",
               "insertion_auc")
#: the method the paired bootstrap compares every other method with
REFERENCE_METHOD = "c2f"
#: the rank-based scores that separate methods best: bootstrap CIs and paired comparisons
CI_KEYS = ("ap", "iou_topk")
#: explainer record fields averaged per method (C2F's S3WM decision counts, ViT-CX's K)
RECORD_KEYS = ("K", "pos1", "neg1", "bnd1", "pos2", "neg2", "bnd2", "acc3", "fallback", "accepted")

# summary.md columns: (summary key, header); AP, iou_topk and mIoU first
_COLUMNS = (
    ("ap", "AP"), ("iou_topk", "IoU top-k"), ("miou", "mIoU"), ("pointing_game", "pointing game"),
    ("pointing_game_tol", "pointing game (tol.)"), ("relevance_mass", "relevance mass"), ("dice", "Dice"),
    ("auroc", "AUROC"), ("deletion_auc", "deletion AUC"), ("insertion_auc", "insertion AUC"),
    ("seconds_per_slice", "s / slice"), ("forward_passes_per_slice", "forwards / slice"),
    ("backward_passes_per_slice", "backwards / slice"),
)


def iou_counts(pred: np.ndarray, mask: np.ndarray) -> dict[str, int]:
    """The :data:`IOU_COUNT_KEYS` of one binary prediction against one lesion mask (same shape)."""
    acc = IoUAccumulator()
    acc.update(pred, mask)
    return {"bg_intersection": int(acc.intersection[0]), "bg_union": int(acc.union[0]),
            "lesion_intersection": int(acc.intersection[1]), "lesion_union": int(acc.union[1])}


def _miou(rows: Sequence[Mapping[str, Any]]) -> float:
    """Dataset mIoU over {background, lesion} from the rows' IoU counts (:class:`IoUAccumulator`)."""
    acc = IoUAccumulator()
    for r in rows:
        acc.intersection += [int(r["bg_intersection"]), int(r["lesion_intersection"])]
        acc.union += [int(r["bg_union"]), int(r["lesion_union"])]
        acc.count += 1
    return acc.aggregate()


def _values(rows: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    """``float`` column of ``rows``; missing / ``None`` / empty -> NaN."""
    return np.array([math.nan if r.get(key) in (None, "") else float(r[key]) for r in rows], dtype=np.float64)


def _nanmean(v: np.ndarray) -> float:
    return float(np.mean(v[~np.isnan(v)])) if np.any(~np.isnan(v)) else math.nan


def lesion_components(mask: np.ndarray, axis: int) -> np.ndarray:
    """A case's lesions: the 26-connected components of its mask ``X x Y x Z``
    (:func:`skimage.measure.label`), numbered 1, 2, ... (0: no lesion), as ``n x h x w`` slices along ``axis``."""
    return np.moveaxis(measure.label(np.asarray(mask) > 0, connectivity=3), axis, 0)


def classifier_rows(case: str, predictions: Sequence[Any], mask: np.ndarray, axis: int,
                    components: np.ndarray | None = None) -> list[dict[str, Any]]:
    """Classifier rows of one case from its slice predictions (:class:`~c2f_med.explain.volume.SlicePrediction`:
    ``index``, ``probability``; NaN, a skipped background slice, gives no row) and its lesion mask
    ``X x Y x Z`` (bool) sliced along ``axis``. A case's lesions are the 26-connected components of
    the mask (:func:`lesion_components`), numbered 1, 2, ... in the case; ``components`` (``n x h x w``,
    as :func:`lesion_components` returns them) passes them when already computed."""
    if components is None:
        components = lesion_components(mask, axis)
    return [{"case": case, "slice": p.index, "probability": p.probability, "lesion": bool(components[p.index].any()),
             "lesions": [int(k) for k in np.unique(components[p.index]) if k]}
            for p in predictions if not math.isnan(p.probability)]


def roc_auc(score: np.ndarray, label: np.ndarray) -> float:
    """ROC AUC of ``score`` for the binary ``label`` (MONAI's ``compute_roc_auc``: Mann-Whitney, ties
    averaged); NaN unless both classes are present."""
    if not (label.any() and (~label).any()):
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(compute_roc_auc(torch.as_tensor(score, dtype=torch.float64), torch.as_tensor(label.astype(int))))


def classifier_scores(rows: Sequence[Mapping[str, Any]], threshold: float = CLASSIFIER_THRESHOLD) -> dict[str, Any]:
    """Slice- and lesion-level classifier scores from classifier rows, decisions at ``threshold``.

    Per lesion, each 3-D lesion of a case is scored by its best slice, ``max`` of the probability
    over the slices that cut it, and ranked against every lesion-free slice: a lesion counts as
    found when any of its slices is flagged, as a reader scrolling through the scan would find it.

    Returns:
        ``{"slice_auroc": AUROC of the probability for the slice label (Mann-Whitney, ties
        averaged; NaN with one class only), "slice_accuracy": fraction of slices with
        ``(p >= threshold) == lesion``, "threshold", "sensitivity" / "specificity": of the slices at
        the threshold, "ece": expected calibration error of the slice probabilities (15 bins),
        "slices": n, "lesion_slices": n with lesion,
        "lesions": number of 3-D lesions, "lesion_auroc": AUROC of the lesions' best-slice
        probabilities against the lesion-free slices' probabilities, "lesion_sensitivity":
        fraction of lesions whose best slice has ``p >= threshold``}``; NaN without rows, and the
        lesion scores NaN when a lesion slice names no lesion (rows written before ``lesions``).
    """
    p = np.array([float(r["probability"]) for r in rows], dtype=np.float64)
    y = np.array([bool(r["lesion"]) for r in rows], dtype=bool)
    auroc = roc_auc(p, y)
    accuracy = float(np.mean((p >= threshold) == y)) if p.size else math.nan
    rates = rates_at(p, y, threshold) if p.size else {"sensitivity": math.nan, "specificity": math.nan}
    best: dict[tuple[str, int], float] = {}  # (case, lesion) -> its best slice's probability
    for r, prob in zip(rows, p):
        for lesion in r.get("lesions") or ():
            key = (str(r["case"]), int(lesion))
            best[key] = max(best.get(key, -math.inf), prob)
    named = all(r.get("lesions") for r, lesion in zip(rows, y) if lesion)
    lesion_p = np.array(list(best.values()), dtype=np.float64)
    if named and lesion_p.size:
        lesion_auroc = roc_auc(np.concatenate([lesion_p, p[~y]]),
                               np.concatenate([np.ones(lesion_p.size, bool), np.zeros(int((~y).sum()), bool)]))
        sensitivity = float(np.mean(lesion_p >= threshold))
    else:
        lesion_auroc = sensitivity = math.nan
    return {"slice_auroc": auroc, "slice_accuracy": accuracy, "threshold": float(threshold),
            "sensitivity": rates["sensitivity"], "specificity": rates["specificity"],
            "ece": expected_calibration_error(p, y) if p.size else math.nan, "slices": int(p.size),
            "lesion_slices": int(y.sum()), "lesions": len(best) if named else 0, "lesion_auroc": lesion_auroc,
            "lesion_sensitivity": sensitivity}


def aggregate(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Means of one method's rows (of a dataset or of one case).

    Returns:
        ``{<score>: nanmean for each of SCORE_KEYS, "miou": dataset mIoU from the IoU counts,
        "seconds_per_slice", "forward_passes_per_slice", "backward_passes_per_slice": means of the
        costs, "slices": len(rows), "not_applicable": {<score>: NaN count}}``; NaN means without rows.
    """
    scores = {k: _values(rows, k) for k in SCORE_KEYS}
    out: dict[str, Any] = {k: _nanmean(v) for k, v in scores.items()}
    out["miou"] = _miou(rows)
    out["seconds_per_slice"] = _nanmean(_values(rows, "seconds"))
    out["forward_passes_per_slice"] = _nanmean(_values(rows, "forward_passes"))
    out["backward_passes_per_slice"] = _nanmean(_values(rows, "backward_passes"))
    out["slices"] = len(rows)
    out["not_applicable"] = {k: int(np.isnan(v).sum()) for k, v in scores.items()}
    return out


def _method_summary(rows: Sequence[Mapping[str, Any]], n_boot: int, seed: int) -> dict[str, Any]:
    out = aggregate(rows)
    out["ci95"] = {k: bootstrap_ci(_values(rows, k), n=n_boot, seed=seed) for k in CI_KEYS}
    records = {k: _values(rows, k) for k in RECORD_KEYS if any(r.get(k) not in (None, "") for r in rows)}
    if records:
        out["records"] = {k: _nanmean(v) for k, v in records.items()}
    return out


def paired_comparison(rows: Sequence[Mapping[str, Any]], a: str, b: str, n_boot: int = 2000,
                      seed: int = 0) -> dict[str, Any]:
    """Paired bootstrap of method ``a`` minus method ``b`` (rows' ``"method"``) on :data:`CI_KEYS` and the dataset
    mIoU, over the slices (case, slice) both methods scored: ``{key: paired bootstrap}``."""
    by = {m: {(r["case"], int(r["slice"])): r for r in rows if r["method"] == m} for m in (a, b)}
    common = [key for key in by[a] if key in by[b]]
    ra, rb = [by[a][k] for k in common], [by[b][k] for k in common]
    out = {k: paired_bootstrap(_values(ra, k), _values(rb, k), n=n_boot, seed=seed) for k in CI_KEYS}
    counts = [np.array([[float(r[k]) for k in IOU_COUNT_KEYS] for r in rs]).reshape(-1, 4) for rs in (ra, rb)]
    out["miou"] = paired_bootstrap_miou(*counts, n=n_boot, seed=seed)
    return out


def _positive(row: Mapping[str, Any], threshold: float) -> bool | None:
    """The model's decision on a row's slice: its ``positive`` (bool or CSV text), else ``probability >=
    threshold``; None when the row has neither."""
    value = row.get("positive")
    if isinstance(value, str) and value:
        return value in ("True", "true", "1")
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    p = row.get("probability")
    return None if p in (None, "") or math.isnan(float(p)) else float(p) >= threshold


def _lesion_ids(row: Mapping[str, Any]) -> list[int]:
    """A row's 3-D lesion numbers (``"1 2"`` or a list)."""
    value = row.get("lesions")
    if value in (None, ""):
        return []
    return [int(v) for v in (value.split() if isinstance(value, str) else value)]


def _fp_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Means of one method's false-alarm rows: the saliency-mass keys and the costs."""
    out: dict[str, Any] = {k: _nanmean(_values(rows, k)) for k in FP_KEYS}
    out["seconds_per_slice"] = _nanmean(_values(rows, "seconds"))
    out["forward_passes_per_slice"] = _nanmean(_values(rows, "forward_passes"))
    out["slices"] = len(rows)
    return out


def _lesion_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per 3-D lesion: each lesion's mean over the slices that cut it, averaged over lesions (the flat
    keys), and its best slice (``best``), averaged over lesions; ``lesions``: how many."""
    by: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for r in rows:
        for lesion in _lesion_ids(r):
            by.setdefault((str(r["case"]), lesion), []).append(r)
    means = {k: np.array([_nanmean(_values(rs, k)) for rs in by.values()]) for k in LESION_KEYS}
    best = {k: np.array([np.nanmax(v) if np.any(~np.isnan(v := _values(rs, k))) else math.nan for rs in by.values()])
            for k in LESION_KEYS}
    best["deletion_auc"] = np.array([np.nanmin(v) if np.any(~np.isnan(v := _values(rs, "deletion_auc")))
                                     else math.nan for rs in by.values()])
    return {"lesions": len(by), **{k: _nanmean(v) for k, v in means.items()},
            "best": {k: _nanmean(v) for k, v in best.items()}}


def summarise(
    rows: Sequence[Mapping[str, Any]],
    classifier: Sequence[Mapping[str, Any]],
    bundle: Any,
    datalist: str | os.PathLike,
    cases: int,
    *,
    methods: Sequence[str] | None = None,
    fp_rows: Sequence[Mapping[str, Any]] = (),
    stability: Sequence[Mapping[str, Any]] = (),
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """The ``summary.json`` dict.

    Args:
        rows: per-slice lesion rows (module docstring), any number of methods.
        classifier: classifier rows of every non-background slice of the evaluated cases.
        bundle: the :class:`~c2f_med.models.bundle.Bundle` (its ``root``, ``sha256`` and
            ``operating_point`` are used; without an operating point, threshold 0.5, source "default").
        datalist: the datalist path, as the user gave it.
        cases: number of cases evaluated.
        methods: methods in report order (default: order of first appearance in ``rows``); a method
            without rows is reported with NaN scores and ``slices`` 0.
        fp_rows: false-alarm rows (module docstring).
        stability: stability rows (module docstring).
        n_boot, seed: bootstrap resamples and seed of every CI.

    Returns:
        The stable keys ``bundle``, ``datalist``, ``cases``, ``lesion_slices`` (distinct
        (case, slice) pairs scored), ``classifier`` (:func:`classifier_scores` at the operating
        point's threshold: ``slice_auroc``, ``slice_accuracy``, ``threshold``, ``sensitivity``,
        ``specificity``, ``ece``, ``lesion_auroc``, ``lesion_sensitivity``, counts) and ``methods.<m>``
        (every lesion slice, whatever the model decided: the stable scores, plus ``iou``,
        ``dice_topk``, ``backward_passes_per_slice``, ``not_applicable`` counts per score, ``ci95``
        bootstrap CIs of AP and IoU top-k, and ``records``: mean S3WM decision counts when the method
        records them); ``comparisons``: ``{"c2f - <m>": {"ap": paired bootstrap, "iou_topk": ...,
        "miou": paired bootstrap of the dataset mIoU}}`` when c2f is among the methods; and, when the rows
        carry the model's decision:

        - ``operating_point``: ``{"threshold", "source": "bundle" | "default"}``;
        - ``strata``: ``{"tp" | "fn": {"slices": n, "methods": {m: the keys of methods.<m>}},
          "fp": {"slices": n, "methods": {m: the saliency-mass keys, costs, slices}}}``; ``tp`` also has
          ``comparisons`` (paired bootstrap on the TP slices);
        - ``lesions``: ``{m: {"lesions": n, <score>: mean over lesions of the lesion's mean over its
          slices, "best": {<score>: mean over lesions of its best slice}}}``;
        - ``stability``: ``{m: {"int16": mean r, "noise": mean r, "slices": n}}`` when measured.
    """
    order = list(methods) if methods is not None else list(dict.fromkeys(r["method"] for r in rows))
    per_method = {m: [r for r in rows if r["method"] == m] for m in order}
    point = getattr(bundle, "operating_point", None)
    threshold = float(getattr(point, "threshold", CLASSIFIER_THRESHOLD))
    summary: dict[str, Any] = {
        "bundle": {"path": str(bundle.root), "sha256": bundle.sha256},
        "datalist": str(datalist),
        "cases": int(cases),
        "lesion_slices": len({(r["case"], int(r["slice"])) for r in rows}),
        "classifier": classifier_scores(classifier, threshold),
        "methods": {m: _method_summary(per_method[m], n_boot, seed) for m in order},
    }
    if REFERENCE_METHOD in order:
        summary["comparisons"] = {f"{REFERENCE_METHOD} - {m}": paired_comparison(rows, REFERENCE_METHOD, m, n_boot,
                                                                                   seed)
                                  for m in order if m != REFERENCE_METHOD}
    decided = [_positive(r, threshold) for r in rows]
    if rows and all(d is not None for d in decided):
        summary["operating_point"] = {"threshold": threshold, "source": str(getattr(point, "source", "default"))}
        strata: dict[str, Any] = {}
        for name, want in (("tp", True), ("fn", False)):
            chosen = [r for r, d in zip(rows, decided) if d is want]
            strata[name] = {"slices": len({(r["case"], int(r["slice"])) for r in chosen}),
                            "methods": {m: _method_summary([r for r in chosen if r["method"] == m], n_boot, seed)
                                        for m in order}}
            if name == "tp" and REFERENCE_METHOD in order:
                strata[name]["comparisons"] = {
                    f"{REFERENCE_METHOD} - {m}": paired_comparison(chosen, REFERENCE_METHOD, m, n_boot, seed)
                    for m in order if m != REFERENCE_METHOD}
        strata["fp"] = {"slices": len({(r["case"], int(r["slice"])) for r in fp_rows}),
                        "methods": {m: _fp_summary([r for r in fp_rows if r["method"] == m]) for m in order}}
        summary["strata"] = strata
        summary["lesions"] = {m: _lesion_summary(per_method[m]) for m in order}
    if stability:
        summary["stability"] = {m: {"int16": _nanmean(_values(own, "int16")), "noise": _nanmean(_values(own, "noise")),
                                    "slices": len(own)}
                                for m in order if (own := [r for r in stability if r["method"] == m])}
    return summary


def _fmt(value: Any, key: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if key == "seconds_per_slice":
        return f"{value:.3g}"
    if key.endswith("passes_per_slice"):
        return f"{value:.1f}"
    return f"{value:.3f}"


def _best(methods: Mapping[str, Mapping[str, Any]], key: str) -> str | None:
    """Formatted best value of column ``key`` over the methods; None when fewer than two methods have a
    value or all show the same one (nothing to single out)."""
    values = [m[key] for m in methods.values()
              if m.get(key) is not None and not (isinstance(m[key], float) and math.isnan(m[key]))]
    if len({_fmt(v, key) for v in values}) < 2:
        return None
    best = min(values) if key in LOWER_IS_BETTER else max(values)
    return _fmt(best, key)


def _table(methods: Mapping[str, Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> list[str]:
    """One row per method, the best value of each column in bold, the slice count last."""
    header = ["method", *(h for _, h in columns), "slices"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    best = {key: _best(methods, key) for key, _ in columns}
    for name, m in methods.items():
        cells = [name]
        for key, _ in columns:
            text = _fmt(m.get(key), key)
            cells.append(f"**{text}**" if best[key] is not None and text == best[key] else text)
        cells.append(str(m.get("slices", 0)))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def comparison_table(title: str, comparisons: Mapping[str, Any]) -> list[str]:
    """Markdown lines: ``title`` and one row per ``{"a - b": paired_comparison(...)}`` entry."""
    lines = ["", title, "",
             "| comparison | Δ AP [95% CI] | p | Δ IoU top-k [95% CI] | p | Δ mIoU [95% CI] | p | pairs |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, c in comparisons.items():
        cells = [name]
        for key in (*CI_KEYS, "miou"):
            d = c[key]
            cells += [f"{_fmt(d['mean_diff'], key)} [{_fmt(d['low'], key)}, {_fmt(d['high'], key)}]",
                      _fmt(d["p_value"], key)]
        cells.append(str(c[CI_KEYS[0]]["n_pairs"]))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


_FP_COLUMNS = (("mass_foreground", "mass in body"), ("topk_foreground", "top 5 % in body"),
               ("peak_foreground", "peak in body"), ("foreground_fraction", "body share of slice"),
               ("seconds_per_slice", "s / slice"))
_LESION_COLUMNS = (("pointing_game", "pointing game"), ("ap", "AP"), ("iou_topk", "IoU top-k"),
                   ("relevance_mass", "relevance mass"), ("deletion_auc", "deletion AUC"),
                   ("insertion_auc", "insertion AUC"))


def render_markdown(summary: Mapping[str, Any]) -> str:
    """``summary.md``: the classifier at its operating point; the scores of the lesion slices the model
    called positive (TP, the primary table), those it missed (FN) and all lesion slices; where the
    saliency of false alarms falls (FP); per 3-D lesion; stability; paired bootstrap CIs of c2f minus
    each other method. In each table the best value of each column is bold (ties all bold; none when
    every method shows the same value)."""
    methods = summary["methods"]
    clf = summary["classifier"]
    point = summary.get("operating_point")
    threshold = clf.get("threshold", CLASSIFIER_THRESHOLD)
    source = (f"the bundle's operating point {_fmt(threshold, 'auroc')}" if point and point["source"] == "bundle"
              else f"threshold {threshold:g}, a default: the bundle declares no operating point")
    lines = [
        "# Explanation scores against lesion masks",
        "",
        f"Bundle `{summary['bundle']['path']}` (model sha256 `{str(summary['bundle']['sha256'])[:12]}`), "
        f"datalist `{summary['datalist']}`: **{summary['cases']} cases, {summary['lesion_slices']} lesion "
        "slices** (slices whose mask has lesion voxels; every method explains the same slices).",
        "",
        f"Classifier on {clf.get('slices', 'n/a')} non-background slices: slice AUROC "
        f"{_fmt(clf['slice_auroc'], 'auroc')}, accuracy {_fmt(clf['slice_accuracy'], 'auroc')}, sensitivity "
        f"{_fmt(clf.get('sensitivity'), 'auroc')}, specificity {_fmt(clf.get('specificity'), 'auroc')} "
        f"({source}); expected calibration error {_fmt(clf.get('ece'), 'auroc')}. Per lesion "
        f"({clf.get('lesions', 'n/a')} 3-D lesions, each "
        f"scored by its best slice against the lesion-free slices): AUROC {_fmt(clf.get('lesion_auroc'), 'auroc')}, "
        f"found {_fmt(clf.get('lesion_sensitivity'), 'auroc')}.",
        "",
    ]
    strata = summary.get("strata")
    if strata:
        lines += [f"## Lesion slices the model called positive (TP, {strata['tp']['slices']} slices)", "",
                  "Is the model looking at the lesion when it flags it? The primary comparison.", ""]
        lines += _table(strata["tp"]["methods"], _COLUMNS)
        lines += ["", f"## Lesion slices the model missed (FN, {strata['fn']['slices']} slices)", "",
                  "What the model looked at instead when it called a lesion slice negative.", ""]
        lines += _table(strata["fn"]["methods"], _COLUMNS)
        lines += ["", "## All lesion slices, whatever the model decided", ""]
    lines += _table(methods, _COLUMNS)
    lines += [
        "",
        "Lower is better for deletion AUC and the costs; higher for every other column. AP, IoU top-k "
        "(area-matched) and AUROC are rank-based: monotone sharpening of a map does not change them; "
        "mIoU (dataset {background, lesion} at the mean threshold), Dice and relevance mass reward "
        "peaked maps. Deletion / insertion: the lesion probability as the most salient pixels are "
        "filled from the surrounding tissue (noisy linear imputation) / as only they are kept. Bold: the best "
        "value of the column.",
    ]
    missing = {name: {k: n for k, n in m.get("not_applicable", {}).items() if n}
               for name, m in methods.items()}
    missing = {name: counts for name, counts in missing.items() if counts}
    if missing:
        lines += ["", "Not applicable (NaN, left out of the means): " + "; ".join(
            f"{name}: " + ", ".join(f"{k} {n}" for k, n in counts.items()) for name, counts in missing.items()) + "."]
    if strata:
        lines += ["", f"## False alarms: lesion-free slices the model called positive (FP, {strata['fp']['slices']} "
                      "slices)", "",
                  "Where the saliency falls: its share inside the body (the slice's foreground) and of its 5 % most "
                  "salient pixels, and whether its peak is inside; compare with the body's share of the slice "
                  "(what a map that looks nowhere in particular gets).", ""]
        lines += _table(strata["fp"]["methods"], _FP_COLUMNS)
    lesions = summary.get("lesions")
    if lesions:
        n = max((m.get("lesions", 0) for m in lesions.values()), default=0)
        lines += ["", f"## Per 3-D lesion ({n} lesions; each lesion's mean over its slices, then its best slice)",
                  ""]
        lines += _table({name: {**m, "slices": m.get("lesions", 0)} for name, m in lesions.items()}, _LESION_COLUMNS)
        lines += [""]
        lines += _table({f"{name} (best slice)": {**m["best"], "slices": m.get("lesions", 0)}
                         for name, m in lesions.items()}, _LESION_COLUMNS)
    stability = summary.get("stability")
    if stability:
        lines += ["", "## Stability (saliency correlation with the scan as given)", "",
                  "int16: the scan stored as a classic DICOM series stores it (integers after a rescale); noise: "
                  "Gaussian noise at the scan's own noise floor. r = 1: the map does not change.", ""]
        lines += _table(stability, (("int16", "r, int16 storage"), ("noise", "r, noise floor")))
    if strata and strata["tp"].get("comparisons"):
        lines += comparison_table(
            f"## Paired bootstrap on the TP slices, {REFERENCE_METHOD} minus each method (95% CI)",
            strata["tp"]["comparisons"])
    comparisons = summary.get("comparisons") or {}
    if comparisons:
        lines += comparison_table(
            f"## Paired bootstrap, {REFERENCE_METHOD} minus each method (95% CI over lesion slices)", comparisons)
    return "\n".join(lines) + "\n"


def write_summary(out: str | os.PathLike, summary: Mapping[str, Any]) -> None:
    """Write ``out/summary.json`` (NaN as null) and ``out/summary.md``, each atomically."""
    out = Path(out)
    write_json(out / "summary.json", summary)
    write_text(out / "summary.md", render_markdown(summary))
