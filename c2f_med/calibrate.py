"""``c2f-med calibrate``: the bundle's operating point, fitted on validation scans, and the classifier's scores.

The classifier's logits on every non-background slice of the validation cases give

* the **temperature** ``T`` minimising the negative log-likelihood of ``softmax(logits / T)``
  (:func:`~c2f_med.metrics.calibration.fit_temperature`; rankings, hence AUROCs, do not change);
* the **threshold**: the smallest calibrated lesion probability at which at least ``specificity``
  of the lesion-free slices are called negative
  (:func:`~c2f_med.metrics.calibration.threshold_at_specificity`).

Both go into the bundle's ``configs/inference.json`` as ``"operating_point": {"temperature": T,
"threshold": t}`` (rewritten atomically, every other key kept), where every workflow that calls a
slice or a lesion positive reads them (:class:`~c2f_med.models.bundle.OperatingPoint`).

:func:`classifier_measures` scores the bundle at its operating point on any labelled datalist:
slice AUROC, lesion AUROC (each 3-D lesion by its best slice against the lesion-free slices),
lesions found (best slice at or above the threshold), specificity on lesion-free slices and the
expected calibration error of the slice probabilities.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray

from c2f_med.errors import InputError
from c2f_med.metrics.calibration import (
    expected_calibration_error,
    fit_temperature,
    rates_at,
    threshold_at_specificity,
)
from c2f_med.models.bundle import Bundle, OperatingPoint

__all__ = ["CaseLogits", "batched_logits", "calibrate_bundle", "case_logits", "classifier_measures",
           "fit_operating_point", "labelled_volumes", "measures_table", "run_calibrate", "volume_logits",
           "write_operating_point"]

TABLE_COLUMNS = (("slice_auroc", "slice AUROC"), ("lesion_auroc", "lesion AUROC"),
                 ("lesion_sensitivity", "lesions found"), ("specificity", "specificity"), ("ece", "ECE"))


@dataclass
class CaseLogits:
    """The classifier's raw output on one case's non-background slices (along the bundle's axis).

    Attributes:
        case: case id.
        logits: float32 ``n x C`` class scores.
        label: ``n`` bool, the slice holds lesion voxels.
        lesions: per slice, the ids of the case's 3-D lesions (26-connected mask components) it cuts.
    """

    case: str
    logits: NDArray[np.float32]
    label: NDArray[np.bool_]
    lesions: list[list[int]]


def labelled_volumes(bundle: Bundle, items: Sequence[dict], progress: bool = False
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor, str]]:
    """``(preset-normalised X x Y x Z image, its lesion mask, case id)`` of each labelled datalist item.

    Raises:
        InputError: an item without a label (naming its image).
    """
    from tqdm import tqdm

    from c2f_med.io.transforms import load_case_transforms

    load = load_case_transforms(keys=("image", "label"), preset=bundle.preset)
    for item in tqdm(items, desc="load", unit="case", disable=not progress):
        if not item.get("label"):
            raise InputError(item["image"], "has no lesion mask (label): calibration needs labelled cases")
        case = load(dict(item))
        yield case["image"][0].as_tensor(), case["label"][0].as_tensor(), str(item.get("case_id", item["image"]))


def case_logits(bundle: Bundle, items: Sequence[dict], batch: int = 64, progress: bool = False) -> list[CaseLogits]:
    """Run the bundle's classifier over every non-background slice of each labelled datalist item
    (:func:`labelled_volumes`, :func:`volume_logits`)."""
    return [volume_logits(bundle, image, mask, case, batch)
            for image, mask, case in labelled_volumes(bundle, items, progress)]


def batched_logits(model: torch.nn.Module, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """``model`` on ``n x C x H x W`` slices, ``batch`` at a time, without gradients: ``n x K`` float32 logits."""
    with torch.inference_mode():
        return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)]).float()


def volume_logits(bundle: Bundle, image: torch.Tensor, mask: torch.Tensor, case: str, batch: int = 64) -> CaseLogits:
    """:class:`CaseLogits` of one preset-normalised ``X x Y x Z`` volume and its lesion mask (same grid)."""
    from c2f_med.models.train import slice_dataset
    from c2f_med.slices import slice_context
    from c2f_med.summary import lesion_components

    axis = int(bundle.config.get("axis", 2))
    x, y, index, _ = slice_dataset(image, mask, int(bundle.model.input_size[0]), axis, slice_context(bundle.model))
    logits = batched_logits(bundle.model, x, batch).numpy()
    components = lesion_components(mask.numpy(), axis)
    lesions = [[int(k) for k in np.unique(components[int(i)]) if k] for i in index]
    return CaseLogits(case, logits, y.numpy() == 1, lesions)


def _stack(cases: Sequence[CaseLogits]) -> tuple[NDArray, NDArray]:
    return np.concatenate([c.logits for c in cases]), np.concatenate([c.label for c in cases])


def fit_operating_point(cases: Sequence[CaseLogits], lesion_class: int = 1, specificity: float = 0.9) -> OperatingPoint:
    """Temperature (NLL on the slices) and threshold (``specificity`` on the lesion-free slices)."""
    logits, label = _stack(cases)
    if label.all() or not label.any():
        raise ValueError("calibration needs slices with and without lesions")
    target = np.where(label, lesion_class, 1 - lesion_class) if logits.shape[1] == 2 else label.astype(int)
    temperature = fit_temperature(logits, target)
    p = OperatingPoint(temperature=temperature).probabilities(torch.from_numpy(logits))[:, lesion_class].numpy()
    threshold = threshold_at_specificity(p, label, specificity)
    return OperatingPoint(temperature=float(temperature), threshold=float(min(max(threshold, 1e-6), 1 - 1e-6)),
                          source="bundle")


def classifier_measures(cases: Sequence[CaseLogits], point: OperatingPoint, lesion_class: int = 1) -> dict[str, float]:
    """Scores at ``point``: ``slice_auroc``, ``lesion_auroc``, ``lesion_sensitivity`` (lesions found),
    ``specificity`` (lesion-free slices below the threshold), ``slice_sensitivity``, ``ece`` (15 bins),
    and the counts ``cases``, ``slices``, ``lesion_slices``, ``lesions``."""
    from c2f_med.metrics.localisation import pixel_auroc

    logits, label = _stack(cases)
    p = point.probabilities(torch.from_numpy(logits))[:, lesion_class].numpy().astype(np.float64)
    best: dict[tuple[str, int], float] = {}
    k = 0
    for case in cases:
        for ids in case.lesions:
            for lesion in ids:
                best[(case.case, lesion)] = max(best.get((case.case, lesion), -math.inf), p[k])
            k += 1
    lesion_p = np.array(list(best.values()))
    neg = p[~label]
    rates = rates_at(p, label, point.threshold)
    both = label.any() and (~label).any()
    return {
        "cases": len(cases), "slices": int(p.size), "lesion_slices": int(label.sum()), "lesions": len(best),
        "slice_auroc": pixel_auroc(p, label) if both else math.nan,
        "lesion_auroc": (pixel_auroc(np.concatenate([lesion_p, neg]),
                                     np.concatenate([np.ones(lesion_p.size, bool), np.zeros(neg.size, bool)]))
                         if lesion_p.size and neg.size else math.nan),
        "lesion_sensitivity": float(np.mean(lesion_p >= point.threshold)) if lesion_p.size else math.nan,
        "slice_sensitivity": rates["sensitivity"], "specificity": rates["specificity"],
        "ece": expected_calibration_error(p, label),
        "threshold": point.threshold, "temperature": point.temperature,
    }


def write_operating_point(bundle_dir: str | os.PathLike, point: OperatingPoint) -> Path:
    """Set ``"operating_point"`` in ``bundle_dir/configs/inference.json`` atomically; other keys untouched."""
    from c2f_med.atomic import write_text

    path = Path(bundle_dir) / "configs" / "inference.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise InputError(path, "bundle file not found") from err
    except json.JSONDecodeError as err:
        raise InputError(path, f"is not valid JSON ({err.msg}, line {err.lineno})") from err
    config["operating_point"] = {"temperature": round(point.temperature, 4), "threshold": round(point.threshold, 4)}
    write_text(path, json.dumps(config, indent=4) + "\n")
    return path


def calibrate_bundle(bundle: Bundle, cases: Sequence[CaseLogits], specificity: float = 0.9) -> dict:
    """Fit the operating point on ``cases``; return it with the validation scores before (temperature 1,
    threshold 0.5) and after."""
    point = fit_operating_point(cases, bundle.lesion_class, specificity)
    rounded = OperatingPoint(round(point.temperature, 4), round(point.threshold, 4), "bundle")
    return {"operating_point": {"temperature": rounded.temperature, "threshold": rounded.threshold},
            "specificity_target": specificity,
            "before": classifier_measures(cases, OperatingPoint(), bundle.lesion_class),
            "after": classifier_measures(cases, rounded, bundle.lesion_class)}


def run_calibrate(bundle_dir: str | os.PathLike, datalist: str | os.PathLike, *, section: str = "validation",
                  specificity: float = 0.9, write: bool = True, measure: Sequence[tuple[str, Path, str]] = (),
                  report: str | os.PathLike | None = None, progress: bool = False) -> dict:
    """``c2f-med calibrate``: fit on ``datalist``'s ``section``, write the operating point into the
    bundle (unless ``write`` is false), then score the bundle at it on each ``(name, datalist,
    section)`` of ``measure``. The result (and ``report``, a JSON file, when given) holds the fitted
    point, the validation scores before / after and each measured set's :func:`classifier_measures`.
    """
    from c2f_med.atomic import write_json
    from c2f_med.io.manifest import read_datalist
    from c2f_med.models.bundle import load_bundle

    if not 0 < specificity < 1:
        raise InputError(datalist, f"specificity must be in (0, 1), got {specificity}")
    bundle = load_bundle(bundle_dir)
    items = read_datalist(datalist, section)
    if not items:
        raise InputError(datalist, f"has no {section!r} cases to calibrate on")
    cases = case_logits(bundle, items, progress=progress)
    try:
        result = calibrate_bundle(bundle, cases, specificity)
    except ValueError as err:
        raise InputError(datalist, f"{section}: {err}") from err
    point = OperatingPoint(**result["operating_point"], source="bundle")
    if write:
        write_operating_point(bundle_dir, point)
    result.update(bundle=str(bundle_dir), weights_sha256=bundle.sha256, datalist=str(datalist), section=section,
                  written=write, measured={})
    for name, path, part in measure:
        scored = case_logits(bundle, read_datalist(path, part), progress=progress)
        result["measured"][name] = {"datalist": str(path), "section": part,
                                    **classifier_measures(scored, point, bundle.lesion_class)}
    if report is not None:
        write_json(report, result)
    return result


def measures_table(reports: dict[str, dict]) -> str:
    """Markdown table of ``run_calibrate`` reports: one row per (measured set, weights), keyed by the
    weights' label in ``reports``; the validation ECE before / after calibration in the header line."""
    lines = ["| cases | weights | slices (lesion) | lesions | " + " | ".join(h for _, h in TABLE_COLUMNS) + " |",
             "|---|---|---:|---:|" + "---:|" * len(TABLE_COLUMNS)]
    names = list(dict.fromkeys(n for r in reports.values() for n in r["measured"]))
    for name in names:
        for label, report in reports.items():
            m = report["measured"].get(name)
            if m is None:
                continue
            cells = [f"{m[k]:.3f}" if isinstance(m[k], float) and not math.isnan(m[k]) else "n/a"
                     for k, _ in TABLE_COLUMNS]
            lines.append(f"| {name} | {label} | {m['slices']} ({m['lesion_slices']}) | {m['lesions']} | "
                         + " | ".join(cells) + " |")
    points = "; ".join(f"{label}: temperature {r['operating_point']['temperature']:.3f}, threshold "
                       f"{r['operating_point']['threshold']:.3f}, validation ECE {r['before']['ece']:.3f} -> "
                       f"{r['after']['ece']:.3f}" for label, r in reports.items())
    return "\n".join(lines) + "\n\nOperating points (fitted on validation): " + points + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m c2f_med.calibrate LABEL=REPORT.json ...``: print :func:`measures_table` of the reports."""
    import sys

    argv = sys.argv[1:] if argv is None else argv
    reports = {}
    for item in argv:
        label, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"expected LABEL=REPORT.json, got {item!r}")
        try:
            reports[label] = json.loads(Path(path).read_text())
            measures_table({label: reports[label]})
        except FileNotFoundError:
            raise SystemExit(f"{path}: no such report file") from None
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise SystemExit(f"{path}: not a 'c2f-med calibrate --report' file ({type(err).__name__}: {err})") from None
    print(measures_table(reports), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
