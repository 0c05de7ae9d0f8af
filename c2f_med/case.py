"""One scan through the whole pipeline: load, classify and explain slice by slice, score, export.

``c2f-med explain``, the cohort audit and the bundle's handlers all call :func:`explain_case`, so a
case folder looks the same whichever way it was made::

    OUT/<case>/saliency.nii.gz   float32 saliency on the input file's own grid and affine
    OUT/<case>/overlay.png       montage: scan, lesion contour, saliency heat map, colour bar
    OUT/<case>/predictions.csv   slice, probability, explained
    OUT/<case>/scores.json       localisation scores vs the lesion mask (only with a mask)
    OUT/<case>/provenance.json   bundle hash, method and parameters, inputs' hashes, versions, timings
    OUT/<case>/dicom/            for DICOM inputs: the saliency as a Parametric Map, a SEG of the salient
                                 region and a Secondary Capture overlay series (optional)

The folder is written to a temporary sibling and renamed when complete, so a killed run never
leaves a half-written case folder.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import MetaTensor

from c2f_med.atomic import atomic_dir, write_json
from c2f_med.explain import create, explain_volume
from c2f_med.explain.volume import VolumeExplanation
from c2f_med.io.manifest import case_id as case_id_of
from c2f_med.io.transforms import load_case_transforms, to_original_grid
from c2f_med.metrics.localisation import localisation_scores
from c2f_med.models.bundle import Bundle
from c2f_med.provenance import provenance

__all__ = ["CaseResult", "ITEM_OPTIONS", "item_options",
           "load_scan", "score_volume", "tolerance_voxels", "case_scores", "write_predictions",
           "write_case", "explain_case"]


@dataclass
class CaseResult:
    """What :func:`explain_case` did for one scan."""

    case_id: str
    folder: Path
    lesion_slices: int
    scores: dict[str, Any] | None
    seconds: float
    forward_passes: int
    backward_passes: int
    explained_slices: int
    records: list[dict[str, Any]] = field(default_factory=list)


def load_scan(image: str | Path, mask: str | Path | None, preset: str = "auto",
              series_uid: str | None = None, *, stack: int | None = None, segment: str | int | None = None,
              roi: str | int | None = None) -> dict[str, Any]:
    """``{"image": 1 x X x Y x Z in [0, 1] (RAS), "label": 1 x X x Y x Z uint8 or absent}``.

    ``mask`` may be a NIfTI / MHA / NRRD image, a .seg.nrrd, a DICOM SEG (``segment``: number or label) or
    an RTSTRUCT (``roi``: number or name); ``stack`` picks the stack of a multi-frame DICOM scan.
    Raises :class:`~c2f_med.errors.InputError` (possibly wrapped by MONAI's ``Compose``; see
    :func:`c2f_med.errors.find_input_error`) for bad files or a mask off the scan's grid.
    """
    data = {"image": str(image)}
    if mask is not None:
        data["label"] = str(mask)
    return load_case_transforms(keys=("image", "label"), preset=preset, series_uid=series_uid, stack=stack,
                                segment=segment, roi=roi)(data)


#: datalist item keys that choose what is read from a case's files (all optional)
ITEM_OPTIONS = ("stack", "segment", "roi")


def item_options(item: Mapping[str, Any]) -> dict[str, Any]:
    """A datalist item's ``"stack"`` (multi-frame DICOM scan), ``"segment"`` (DICOM SEG / .seg.nrrd mask) and
    ``"roi"`` (RTSTRUCT mask) values, as keyword arguments of :func:`load_scan` / :func:`explain_case`."""
    return {key: item[key] for key in ITEM_OPTIONS if item.get(key) is not None}


def score_volume(saliency: np.ndarray, mask: np.ndarray, axis: int, tolerance: float) -> dict[str, Any]:
    """Localisation scores of a saliency volume against a lesion mask (both ``X x Y x Z``).

    Returns ``{"volume": 3D scores, "slices": mean 2D scores over lesion slices, "lesion_slices": n,
    "per_slice": [{"slice": i, **2D scores}, ...]}``; NaN ("not applicable") where the mask is empty.
    ``tolerance`` is the pointing game's, in voxels.
    """
    per_slice = [{"slice": i, **localisation_scores(np.take(saliency, i, axis), np.take(mask, i, axis), tolerance)}
                 for i in range(mask.shape[axis]) if np.take(mask, i, axis).any()]
    volume = localisation_scores(saliency, mask, tolerance)
    mean = {k: float(np.nanmean([s[k] for s in per_slice])) if per_slice else math.nan for k in volume}
    return {"volume": volume, "slices": mean, "lesion_slices": len(per_slice), "per_slice": per_slice}


def tolerance_voxels(model, slice_shape: tuple[int, int]) -> float:
    """The pointing game's tolerance ``p / 2`` model pixels, in voxels of a ``slice_shape`` slice."""
    return model.patch_size / 2 * max(slice_shape) / model.input_size[0]


def case_scores(saliency: np.ndarray, label: np.ndarray, axis: int, model) -> dict[str, Any]:
    """:func:`score_volume` with the pointing game's ``p / 2`` model pixels (:func:`tolerance_voxels`),
    which it adds as ``"tolerance_voxels"``: the content of ``scores.json``."""
    tolerance = tolerance_voxels(model, tuple(s for i, s in enumerate(saliency.shape) if i != axis))
    return {**score_volume(saliency, label, axis, tolerance), "tolerance_voxels": tolerance}


def write_predictions(path: Path, result: VolumeExplanation) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slice", "probability", "explained"])
        for p in result.predictions:
            w.writerow([p.index, "" if math.isnan(p.probability) else f"{p.probability:.6f}", int(p.explained)])


def write_case(
    folder: str | os.PathLike,
    *,
    bundle: Bundle,
    scan: MetaTensor,
    result: VolumeExplanation,
    label: Any,
    scores: Mapping[str, Any] | None,
    image: str | os.PathLike,
    mask: str | os.PathLike | None,
    info: Mapping[str, Any],
    series_uid: str | None = None,
    dicom_export: bool = True,
    deidentify: bool = False,
) -> Path:
    """Write one case folder (module docstring) atomically; returns ``folder``.

    ``c2f-med explain`` (:func:`explain_case`) and the bundle's ``SaliencySaver`` write their folders with it.

    Args:
        folder: ``OUT/<case>``.
        bundle: the :class:`~c2f_med.models.bundle.Bundle` (provenance).
        scan: the loaded scan ``1 x X x Y x Z`` (its meta data map back to the file's grid).
        result: the explanation of ``scan``; label: ``X x Y x Z`` lesion mask or None.
        scores: :func:`c2f_med.case.score_volume` result with ``"tolerance_voxels"``, or None.
        image, mask: the input paths (provenance; a DICOM ``image`` adds ``dicom/``).
        info: ``{"method", "params", "axis", "min_probability", "normalise", "seconds"}``.
        series_uid, dicom_export, deidentify: as in :func:`c2f_med.case.explain_case`.
    """
    from c2f_med.export.nifti import save_on_original_grid
    from c2f_med.export.overlays import overlay_montage

    folder = Path(folder)
    method, axis = info["method"], info["axis"]
    scan = scan.cpu()
    with atomic_dir(folder) as tmp:
        save_on_original_grid(result.saliency, scan, tmp / "saliency.nii.gz")
        overlay_montage(scan[0].numpy(), result.saliency[0].numpy(), label, axis=axis, path=tmp / "overlay.png",
                        title=f"{folder.name}: {method}", probability=[p.probability for p in result.predictions])
        write_predictions(tmp / "predictions.csv", result)
        if scores is not None:
            write_json(tmp / "scores.json", scores)
        if dicom_export and _is_dicom(image):
            _export_dicom(result.saliency, scan, image, tmp / "dicom", series_uid, deidentify)
        write_json(tmp / "provenance.json", provenance(
            bundle, inputs={"image": image, "mask": mask}, method=method, params=info["params"],
            extra={"axis": axis, "min_probability": info["min_probability"], "normalise": info["normalise"],
                   "seconds": info["seconds"], "forward_passes": result.forward_passes,
                   "backward_passes": result.backward_passes, "records": result.records}))
    return folder


def explain_case(
    bundle: Bundle,
    image: str | Path,
    out_root: str | Path,
    *,
    mask: str | Path | None = None,
    method: str = "c2f",
    params: dict[str, Any] | None = None,
    axis: int = 2,
    min_probability: float | None = None,
    normalise: str = "slice",
    series_uid: str | None = None,
    slice_batch: int = 16,
    case_id: str | None = None,
    dicom_export: bool = True,
    deidentify: bool = False,
    progress: bool = True,
    stack: int | None = None,
    segment: str | int | None = None,
    roi: str | int | None = None,
) -> CaseResult:
    """Explain one scan with ``method`` and write ``out_root/<case>/`` (see the module docstring).

    Args:
        bundle: the loaded bundle (model, preset, lesion class).
        image: NIfTI / MHA / NRRD file, a DICOM series folder or a single DICOM file.
        mask: optional lesion mask on the scan's grid; adds ``scores.json``.
        method, params: explainer name and parameter overrides.
        axis: slicing axis after RAS orientation (2 = axial).
        min_probability: explain only slices whose lesion probability reaches it (others get 0).
        normalise: "slice" or "volume" (see :func:`~c2f_med.explain.volume.explain_volume`).
        series_uid: which series of a folder holding several.
        case_id: output folder name (default: from the input's file or folder name).
        dicom_export: for DICOM inputs, also write a Parametric Map series into ``dicom/``.
        deidentify: strip patient identifiers from DICOM outputs.
        stack: which stack of a multi-frame DICOM image holding several (1-based).
        segment, roi: which segment of a DICOM SEG / .seg.nrrd mask, which ROI of an RTSTRUCT mask.
    """
    start = time.perf_counter()
    case = case_id or case_id_of(image)
    data = load_scan(image, mask, bundle.preset, series_uid, stack=stack, segment=segment, roi=roi)
    scan = data["image"]
    explainer = create(method, bundle.model, **(params or {}))
    result = explain_volume(scan, explainer, axis=axis, target=bundle.lesion_class, slice_batch=slice_batch,
                            min_probability=min_probability, normalise=normalise, progress=progress)
    saliency = result.saliency[0].numpy()  # X x Y x Z on the loaded (RAS) grid
    label = data["label"][0].numpy().astype(bool) if "label" in data else None

    scores = None if label is None else case_scores(saliency, label, axis, bundle.model)
    seconds = time.perf_counter() - start

    info = {"method": method, "params": explainer.param_dict(), "axis": axis, "min_probability": min_probability,
            "normalise": normalise, "seconds": seconds}
    write_case(Path(out_root) / case, bundle=bundle, scan=scan, result=result, label=label, scores=scores,
               image=image, mask=mask, info=info, series_uid=series_uid, dicom_export=dicom_export,
               deidentify=deidentify)
    return CaseResult(
        case_id=case, folder=Path(out_root) / case,
        lesion_slices=0 if scores is None else scores["lesion_slices"], scores=scores, seconds=seconds,
        forward_passes=result.forward_passes, backward_passes=result.backward_passes,
        explained_slices=sum(p.explained for p in result.predictions), records=result.records)


def _export_dicom(saliency, scan, image, folder: Path, series_uid: str | None, deidentify: bool) -> None:
    """DICOM exports of the saliency for a DICOM input (:func:`c2f_med.export.dicom.save_dicom_exports`: a
    Parametric Map, a SEG of the salient region, a Secondary Capture overlay series); a source that cannot
    carry them (no frame of reference, say) costs the DICOM export only, with a warning, never the case's
    other outputs."""
    from c2f_med.errors import InputError
    from c2f_med.export.dicom import save_dicom_exports

    stack = scan.meta.get("stack_number")
    try:
        save_dicom_exports(to_original_grid(saliency, scan), to_original_grid(scan, scan), image, folder,
                           series_uid=series_uid, deidentify=deidentify, stack=None if stack is None else int(stack))
    except InputError as err:
        logging.getLogger(__name__).warning("no DICOM export: %s", err)


def _is_dicom(path: str | Path) -> bool:
    from c2f_med.io.readers import scan_kind

    return scan_kind(path) in ("dicom_series", "dicom_file")
