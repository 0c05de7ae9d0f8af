"""``summary.json`` and ``summary.md`` from per-slice score rows: the one builder that ``c2f-med evaluate``
and the cohort audit share.

A *row* is the score of one method on one lesion slice (a dict, one line of ``per_slice.csv``)::

    {"case": str, "slice": int, "method": str,
     "pointing_game", "pointing_game_tol", "relevance_mass", "iou", "dice", "iou_topk", "dice_topk",
     "auroc", "ap", "deletion_auc", "insertion_auc": float (NaN = not applicable or not computed),
     "seconds", "forward_passes", "backward_passes": float (the explainer's cost for this slice),
     "bg_intersection", "bg_union", "lesion_intersection", "lesion_union": int
        (the slice's {background, lesion} IoU counts at the mean threshold, so the dataset mIoU
         can be recomputed from the rows alone),
     ...any other keys (the explainer's record: K, pos1, ... for C2F)}

A *classifier row* is the classifier's view of one non-background slice::

    {"case": str, "slice": int, "probability": float (of the lesion class), "lesion": bool,
     "lesions": list[int] (the case's 3-D lesions that the slice cuts: connected components of the
        mask, numbered per case; empty on a lesion-free slice)}

:func:`summarise` turns rows into the ``summary.json`` dict whose keys scripts rely on
plus a few extras; :func:`write_summary` writes it as ``summary.json`` and ``summary.md``. Rows may
hold numbers or their CSV text (``csv.DictReader`` of ``per_slice.csv``; an empty cell is NaN), so
a summary can be rebuilt from the CSV alone.
Aggregates use ``nanmean``: NaN scores are "not applicable" and are counted, never averaged as 0.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from skimage import measure

from c2f_med.atomic import write_json, write_text
from c2f_med.metrics.bootstrap import bootstrap_ci, paired_bootstrap, paired_bootstrap_miou
from c2f_med.metrics.localisation import IoUAccumulator, pixel_auroc

__all__ = [
    "SCORE_KEYS",
    "IOU_COUNT_KEYS",
    "COST_KEYS",
    "LOWER_IS_BETTER",
    "CLASSIFIER_THRESHOLD",
    "REFERENCE_METHOD",
    "CI_KEYS",
    "RECORD_KEYS",
    "iou_counts",
    "aggregate",
    "classifier_rows",
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
#: summary columns where a smaller value is better (all other scores: larger is better)
LOWER_IS_BETTER = frozenset({"deletion_auc", "seconds_per_slice", "forward_passes_per_slice",
                             "backward_passes_per_slice"})
#: a slice is classified "lesion" when the lesion probability is at least this
CLASSIFIER_THRESHOLD = 0.5
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


def classifier_rows(case: str, predictions: Sequence[Any], mask: np.ndarray, axis: int) -> list[dict[str, Any]]:
    """Classifier rows of one case from its slice predictions (:class:`~c2f_med.explain.volume.SlicePrediction`:
    ``index``, ``probability``; NaN, a skipped background slice, gives no row) and its lesion mask
    ``X x Y x Z`` (bool) sliced along ``axis``. A case's lesions are the 26-connected components of
    the mask (:func:`skimage.measure.label`), numbered 1, 2, ... in the case."""
    components = np.moveaxis(measure.label(mask, connectivity=3), axis, 0)  # n x h x w
    return [{"case": case, "slice": p.index, "probability": p.probability, "lesion": bool(components[p.index].any()),
             "lesions": [int(k) for k in np.unique(components[p.index]) if k]}
            for p in predictions if not math.isnan(p.probability)]


def classifier_scores(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Slice- and lesion-level classifier scores from classifier rows.

    Per lesion, each 3-D lesion of a case is scored by its best slice, ``max`` of the probability
    over the slices that cut it, and ranked against every lesion-free slice: a lesion counts as
    found when any of its slices is flagged, as a reader scrolling through the scan would find it.

    Returns:
        ``{"slice_auroc": AUROC of the probability for the slice label (Mann-Whitney, ties
        averaged; NaN with one class only), "slice_accuracy": fraction of slices with
        ``(p >= 0.5) == lesion``, "slices": n, "lesion_slices": n with lesion,
        "lesions": number of 3-D lesions, "lesion_auroc": AUROC of the lesions' best-slice
        probabilities against the lesion-free slices' probabilities, "lesion_sensitivity":
        fraction of lesions whose best slice has ``p >= 0.5``}``; NaN without rows, and the
        lesion scores NaN when a lesion slice names no lesion (rows written before ``lesions``).
    """
    p = np.array([float(r["probability"]) for r in rows], dtype=np.float64)
    y = np.array([bool(r["lesion"]) for r in rows], dtype=bool)
    auroc = pixel_auroc(p, y) if p.size else math.nan
    accuracy = float(np.mean((p >= CLASSIFIER_THRESHOLD) == y)) if p.size else math.nan
    best: dict[tuple[str, int], float] = {}  # (case, lesion) -> its best slice's probability
    for r, prob in zip(rows, p):
        for lesion in r.get("lesions") or ():
            key = (str(r["case"]), int(lesion))
            best[key] = max(best.get(key, -math.inf), prob)
    named = all(r.get("lesions") for r, lesion in zip(rows, y) if lesion)
    lesion_p = np.array(list(best.values()), dtype=np.float64)
    if named and lesion_p.size:
        lesion_auroc = pixel_auroc(np.concatenate([lesion_p, p[~y]]),
                                   np.concatenate([np.ones(lesion_p.size, bool), np.zeros(int((~y).sum()), bool)]))
        sensitivity = float(np.mean(lesion_p >= CLASSIFIER_THRESHOLD))
    else:
        lesion_auroc = sensitivity = math.nan
    return {"slice_auroc": auroc, "slice_accuracy": accuracy, "slices": int(p.size), "lesion_slices": int(y.sum()),
            "lesions": len(best) if named else 0, "lesion_auroc": lesion_auroc, "lesion_sensitivity": sensitivity}


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


def _paired(rows: Sequence[Mapping[str, Any]], a: str, b: str, n_boot: int, seed: int) -> dict[str, Any]:
    """Paired bootstrap of ``a - b`` on :data:`CI_KEYS` over the slices both methods scored."""
    by = {m: {(r["case"], int(r["slice"])): r for r in rows if r["method"] == m} for m in (a, b)}
    common = [key for key in by[a] if key in by[b]]
    ra, rb = [by[a][k] for k in common], [by[b][k] for k in common]
    out = {k: paired_bootstrap(_values(ra, k), _values(rb, k), n=n_boot, seed=seed) for k in CI_KEYS}
    counts = [np.array([[float(r[k]) for k in IOU_COUNT_KEYS] for r in rs]).reshape(-1, 4) for rs in (ra, rb)]
    out["miou"] = paired_bootstrap_miou(*counts, n=n_boot, seed=seed)
    return out


def summarise(
    rows: Sequence[Mapping[str, Any]],
    classifier: Sequence[Mapping[str, Any]],
    bundle: Any,
    datalist: str | os.PathLike,
    cases: int,
    *,
    methods: Sequence[str] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """The ``summary.json`` dict.

    Args:
        rows: per-slice score rows (module docstring), any number of methods.
        classifier: classifier rows of every non-background slice of the evaluated cases.
        bundle: the :class:`~c2f_med.models.bundle.Bundle` (its ``root`` and ``sha256`` are used).
        datalist: the datalist path, as the user gave it.
        cases: number of cases evaluated.
        methods: methods in report order (default: order of first appearance in ``rows``); a method
            without rows is reported with NaN scores and ``slices`` 0.
        n_boot, seed: bootstrap resamples and seed of every CI.

    Returns:
        The stable keys ``bundle``, ``datalist``, ``cases``, ``lesion_slices`` (distinct
        (case, slice) pairs scored), ``classifier`` (``slice_auroc``, ``slice_accuracy``, plus
        ``slices``, ``lesion_slices`` and the per-lesion ``lesions``, ``lesion_auroc`` and
        ``lesion_sensitivity``) and ``methods.<m>`` (the stable scores, plus ``iou``,
        ``dice_topk``, ``backward_passes_per_slice``, ``not_applicable`` counts per score,
        ``ci95`` bootstrap CIs of AP and IoU top-k, and ``records``: mean S3WM decision counts when
        the method records them); plus ``comparisons``: ``{"c2f - <m>": {"ap": paired bootstrap,
        "iou_topk": ..., "miou": paired bootstrap of the dataset mIoU}}`` when c2f is among the methods.
    """
    order = list(methods) if methods is not None else list(dict.fromkeys(r["method"] for r in rows))
    per_method = {m: [r for r in rows if r["method"] == m] for m in order}
    summary: dict[str, Any] = {
        "bundle": {"path": str(bundle.root), "sha256": bundle.sha256},
        "datalist": str(datalist),
        "cases": int(cases),
        "lesion_slices": len({(r["case"], int(r["slice"])) for r in rows}),
        "classifier": classifier_scores(classifier),
        "methods": {m: _method_summary(per_method[m], n_boot, seed) for m in order},
    }
    if REFERENCE_METHOD in order:
        summary["comparisons"] = {f"{REFERENCE_METHOD} - {m}": _paired(rows, REFERENCE_METHOD, m, n_boot, seed)
                                  for m in order if m != REFERENCE_METHOD}
    return summary


def _fmt(value: Any, key: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if key == "seconds_per_slice":
        return f"{value:.3g}"
    if key.endswith("passes_per_slice"):
        return f"{value:.1f}"
    return f"{value:.3f}"


def _best(summary: Mapping[str, Any], key: str) -> str | None:
    """Formatted best value of column ``key`` over the methods; None when fewer than two methods have a
    value or all show the same one (nothing to single out)."""
    values = [m[key] for m in summary["methods"].values()
              if m.get(key) is not None and not (isinstance(m[key], float) and math.isnan(m[key]))]
    if len({_fmt(v, key) for v in values}) < 2:
        return None
    best = min(values) if key in LOWER_IS_BETTER else max(values)
    return _fmt(best, key)


def render_markdown(summary: Mapping[str, Any]) -> str:
    """``summary.md``: one row per method, the best value of each column in bold (ties all bold; none
    when every method shows the same value), the slice and case counts, and the paired bootstrap CIs
    of c2f minus each other method."""
    methods = summary["methods"]
    clf = summary["classifier"]
    lines = [
        "# Explanation scores against lesion masks",
        "",
        f"Bundle `{summary['bundle']['path']}` (model sha256 `{str(summary['bundle']['sha256'])[:12]}`), "
        f"datalist `{summary['datalist']}`: **{summary['cases']} cases, {summary['lesion_slices']} lesion "
        "slices** (slices whose mask has lesion voxels; every method explains the same slices).",
        "",
        f"Classifier on {clf.get('slices', 'n/a')} non-background slices: slice AUROC "
        f"{_fmt(clf['slice_auroc'], 'auroc')}, accuracy {_fmt(clf['slice_accuracy'], 'auroc')} "
        f"(threshold {CLASSIFIER_THRESHOLD}). Per lesion ({clf.get('lesions', 'n/a')} 3-D lesions, each "
        f"scored by its best slice against the lesion-free slices): AUROC {_fmt(clf.get('lesion_auroc'), 'auroc')}, "
        f"found {_fmt(clf.get('lesion_sensitivity'), 'auroc')}.",
        "",
    ]
    header = ["method", *(h for _, h in _COLUMNS), "slices"]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    best = {key: _best(summary, key) for key, _ in _COLUMNS}
    for name, m in methods.items():
        cells = [name]
        for key, _ in _COLUMNS:
            text = _fmt(m.get(key), key)
            cells.append(f"**{text}**" if best[key] is not None and text == best[key] else text)
        cells.append(str(m.get("slices", 0)))
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Lower is better for deletion AUC and the costs; higher for every other column. AP, IoU top-k "
        "(area-matched) and AUROC are rank-based: monotone sharpening of a map does not change them; "
        "mIoU (dataset {background, lesion} at the mean threshold), Dice and relevance mass reward "
        "peaked maps. Bold: the best value of the column.",
    ]
    missing = {name: {k: n for k, n in m.get("not_applicable", {}).items() if n}
               for name, m in methods.items()}
    missing = {name: counts for name, counts in missing.items() if counts}
    if missing:
        lines += ["", "Not applicable (NaN, left out of the means): " + "; ".join(
            f"{name}: " + ", ".join(f"{k} {n}" for k, n in counts.items()) for name, counts in missing.items()) + "."]
    comparisons = summary.get("comparisons") or {}
    if comparisons:
        lines += ["", f"## Paired bootstrap, {REFERENCE_METHOD} minus each method (95% CI over lesion slices)", "",
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
    return "\n".join(lines) + "\n"


def write_summary(out: str | os.PathLike, summary: Mapping[str, Any]) -> None:
    """Write ``out/summary.json`` (NaN as null) and ``out/summary.md``, each atomically."""
    out = Path(out)
    write_json(out / "summary.json", summary)
    write_text(out / "summary.md", render_markdown(summary))
