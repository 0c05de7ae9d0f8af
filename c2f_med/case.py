"""One scan through the whole pipeline: load, classify and explain slice by slice, score, export.

:func:`explain_and_score` is the one function that explains *and* scores a case: ``c2f-med
explain`` (through :func:`explain_case`), ``c2f-med evaluate``, the cohort audit and the bundle's
handlers all call it, so a slice is scored the same way whichever way it was run, and a case is
explained once. :func:`explain_case` adds the case folder::

    OUT/<case>/saliency.nii.gz   float32 saliency on the input file's own grid and affine
    OUT/<case>/overlay.png       montage: scan, lesion contour, saliency heat map, colour bar
    OUT/<case>/predictions.csv   slice, probability (calibrated), explained, positive (the model's decision)
    OUT/<case>/scores.json       localisation scores vs the lesion mask (only with a mask)
    OUT/<case>/provenance.json   bundle hash, method and parameters, inputs' hashes, versions, timings
    OUT/<case>/dicom/            for DICOM inputs: the saliency as a Parametric Map, a SEG of the salient
                                 region and a Secondary Capture overlay series (optional)

The folder is written to a temporary sibling and renamed when complete, so a killed run never
leaves a half-written case folder.

What a case's slices are (the model's decision at the bundle's operating point, a slice positive
when its calibrated lesion probability reaches the threshold; the mask says whether the slice has
lesion voxels):

* ``tp``: lesion, model positive; ``fn``: lesion, model negative; both get a *lesion row* of
  localisation scores against the mask (and, when asked, deletion / insertion AUCs);
* ``fp``: no lesion, model positive: a *false-alarm row* that says where the saliency mass falls
  (:func:`~c2f_med.metrics.localisation.saliency_mass`: inside the body's foreground or outside it);
* lesion-free slices the model calls negative are classified but not scored.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from c2f_med.atomic import atomic_dir, write_json
from c2f_med.explain import Explainer, Explanation, create, explain_volume
from c2f_med.explain.volume import VolumeExplanation
from c2f_med.io.manifest import case_id as case_id_of
from c2f_med.io.transforms import load_case_transforms, to_original_grid
from c2f_med.metrics.faithfulness import auc, perturbation_curve
from c2f_med.metrics.localisation import foreground_mask, localisation_scores, saliency_mass, threshold_mean
from c2f_med.metrics.stability import int16_storage, noise_floor, saliency_correlation
from c2f_med.models.bundle import Bundle, OperatingPoint
from c2f_med.provenance import provenance
from c2f_med.slices import INPUT_STD, evenly_spread, normalise_input, slice_context, to_model_grid, volume_slices
from c2f_med.summary import classifier_rows, iou_counts, lesion_components

__all__ = ["FAITHFULNESS", "ITEM_OPTIONS", "LOCALISATION_KEYS", "STABILITY", "CaseResult", "CaseScores", "Metered",
           "classify", "explain_and_score", "item_options", "load_scan", "load_variants", "tolerance_voxels",
           "write_predictions", "write_case", "explain_case"]

#: faithfulness curves on the model's input grid: ROAD's linear imputation as the fill of both curves
#: (:mod:`c2f_med.metrics.faithfulness`), 10 steps of 10 % of the pixels. ROAD's noise term is off
#: (``noise_std`` in the [0, 1] intensity range): on the shipped model's lesion slices, deleting random
#: pixels changed the lesion probability by -0.002 to -0.010 on average without noise, by -0.008 to
#: -0.05 with 1 % noise (two draws of four slices; ``tests/metrics/test_faithfulness.py``)
FAITHFULNESS = {"steps": 10, "deletion_fill": "road", "insertion_fill": "road", "noise_std": 0.0, "seed": 0}
#: the per-slice localisation scores (:func:`~c2f_med.metrics.localisation.localisation_scores`)
LOCALISATION_KEYS = ("pointing_game", "pointing_game_tol", "relevance_mass", "iou", "dice", "iou_topk", "dice_topk",
                     "auroc", "ap")
#: stability: slices per case explained again on the scan stored as int16 and on the scan with
#: noise at its own noise floor (seeded); 0 switches it off
STABILITY = {"slices": 3, "seed": 0}


class Metered(Explainer):
    """Delegates to ``inner`` and adds each slice's cost to its record.

    ``seconds``: the batch's wall time / its slices; ``forward_passes``: the inner explainer's
    per-slice count when its record has one, else the batch's count / its slices;
    ``backward_passes``: the batch's count / its slices.
    """

    def __init__(self, inner: Explainer):
        super().__init__(inner.model)
        self.inner, self.name, self.params = inner, inner.name, inner.params

    def param_dict(self) -> dict[str, Any]:
        return self.inner.param_dict()

    def _explain(self, x: torch.Tensor, target: torch.Tensor | int | None) -> Explanation:
        start = time.perf_counter()
        expl = self.inner.explain(x, target)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        b = x.shape[0]
        seconds = (time.perf_counter() - start) / b
        expl.records = [{**r, "seconds": seconds, "forward_passes": r.get("forward_passes", expl.forward_passes / b),
                         "backward_passes": expl.backward_passes / b} for r in expl.records]
        return expl


@dataclass
class CaseScores:
    """What :func:`explain_and_score` returns for one case and one method.

    Attributes:
        result: the :class:`~c2f_med.explain.volume.VolumeExplanation` (saliency volume, predictions,
            the explainer's records, pass counts).
        probability: ``n`` calibrated lesion probabilities per slice along the axis (NaN: background).
        rows: lesion rows (strata ``tp`` / ``fn``), slices ascending (:mod:`c2f_med.summary`).
        fp_rows: false-alarm rows (stratum ``fp``).
        classifier: classifier rows of the non-background slices (with ``positive``); empty without a mask.
        curves: ``{"fractions": steps + 1 fractions, "deletion": [per lesion slice], "insertion": [...]}``.
        stability: ``[{"slice", "int16": r, "noise": r}]`` for the slices tested.
        scores: the content of ``scores.json`` (None without a mask).
        seconds: wall time of the whole call.
    """

    result: VolumeExplanation
    probability: np.ndarray
    rows: list[dict[str, Any]] = field(default_factory=list)
    fp_rows: list[dict[str, Any]] = field(default_factory=list)
    classifier: list[dict[str, Any]] = field(default_factory=list)
    curves: dict[str, Any] = field(default_factory=dict)
    stability: list[dict[str, Any]] = field(default_factory=list)
    scores: dict[str, Any] | None = None
    seconds: float = 0.0


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
    scored: CaseScores | None = None


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


def load_variants(image: str | Path, preset: str = "auto", series_uid: str | None = None,
                  seed: int = STABILITY["seed"], stack: int | None = None) -> dict[str, MetaTensor]:
    """The scan given two ways that should not change an explanation, each ``1 x X x Y x Z`` as
    :func:`load_scan` gives it: ``"int16"``, the stored intensities rounded as a classic DICOM
    series stores them (:func:`~c2f_med.metrics.stability.int16_storage`), and ``"noise"``, with
    Gaussian noise at the scan's own noise floor (:func:`~c2f_med.metrics.stability.noise_floor`,
    ``numpy.random.default_rng(seed)``) on every non-zero voxel (zero is padding and stays zero). Both
    are perturbed before the intensity preset, as a file would be."""
    steps = load_case_transforms(keys=("image",), preset=preset, series_uid=series_uid, stack=stack).transforms
    raw = Compose(steps[:-1])({"image": str(image)})["image"]  # before the intensity preset
    preset_step = steps[-1]
    values = raw.as_tensor().double().numpy()  # 1 x X x Y x Z
    sigma = noise_floor(values[0])
    # zero is padding outside the field of view, not a measurement: it stays zero
    noise = np.random.default_rng(seed).normal(0.0, sigma, values.shape)
    noisy = np.where(values != 0, values + noise, 0.0)
    out = {}
    for name, array in (("int16", int16_storage(values)), ("noise", noisy)):
        out[name] = preset_step({"image": MetaTensor(torch.from_numpy(array).float(), meta=dict(raw.meta))})["image"]
    return out


def tolerance_voxels(model, slice_shape: tuple[int, int]) -> float:
    """The pointing game's tolerance ``p / 2`` model pixels, in voxels of a ``slice_shape`` slice."""
    return model.patch_size / 2 * max(slice_shape) / model.input_size[0]


def _model_inputs(model, volume: torch.Tensor, axis: int, index: Sequence[int]) -> torch.Tensor:
    """``len(index) x C x H x W`` normalised inputs of ``model`` for the slices ``index`` of ``volume``
    (``X x Y x Z``; ``C = 2 k + 1`` for a model with ``k`` context slices)."""
    x, _ = to_model_grid(volume_slices(volume, axis, list(index), slice_context(model)).float(), model.input_size)
    return normalise_input(x).to(next(model.parameters()).device)


def classify(model, volume: torch.Tensor, axis: int, target: int, operating_point: OperatingPoint,
             batch: int = 64) -> np.ndarray:
    """``n`` calibrated ``target`` probabilities (:meth:`OperatingPoint.probabilities`) of the slices
    of ``volume`` (``X x Y x Z``) along ``axis``; NaN for an all-zero (background) slice."""
    slices = torch.movedim(volume, axis, 0)
    out = np.full(slices.shape[0], math.nan)
    foreground = [i for i in range(slices.shape[0]) if bool(slices[i].ne(0).any())]
    for start in range(0, len(foreground), batch):
        index = foreground[start:start + batch]
        with torch.inference_mode():
            logits = model(_model_inputs(model, volume, axis, index))
        out[index] = operating_point.probabilities(logits)[:, target].float().cpu().numpy()
    return out


def _ids(components: np.ndarray, i: int) -> str:
    """The 3-D lesions (component numbers) that slice ``i`` cuts, as ``"1 2"``."""
    return " ".join(str(int(k)) for k in np.unique(components[i]) if k)


def explain_and_score(
    model,
    scan: MetaTensor,
    label: np.ndarray | None,
    explainer: Explainer,
    *,
    case: str,
    target: int = 1,
    operating_point: OperatingPoint | None = None,
    axis: int = 2,
    explain: Literal["all", "scored"] = "all",
    min_probability: float | None = None,
    normalise: str = "slice",
    slice_batch: int = 16,
    faithfulness: bool = False,
    variants: Mapping[str, MetaTensor] | None = None,
    stability_slices: int = STABILITY["slices"],
    progress: bool = False,
) -> CaseScores:
    """Explain one loaded case with ``explainer`` and score every slice that has something to score.

    Args:
        model: the :class:`~c2f_med.models.vit.TokenViT` (the explainer's model).
        scan: ``1 x X x Y x Z`` in [0, 1] (RAS), as :func:`load_scan` gives it.
        label: ``X x Y x Z`` lesion mask (bool) on the scan's grid, or None (nothing is scored).
        explainer: any explainer; it is wrapped in :class:`Metered` for the per-slice cost.
        case: the case id written into the rows.
        target: the explained class (the bundle's lesion class).
        operating_point: temperature and threshold of the model's decision (default 1 and 0.5).
        axis: slicing axis after RAS orientation.
        explain: ``"all"`` explains every non-background slice (a whole saliency volume, as
            ``c2f-med explain`` writes it; ``min_probability`` may skip some); ``"scored"`` only the
            lesion slices and the model-positive lesion-free slices (what ``c2f-med evaluate`` scores).
        normalise, slice_batch, progress: as in :func:`~c2f_med.explain.explain_volume`.
        faithfulness: deletion / insertion AUCs of the lesion slices (:data:`FAITHFULNESS`); else NaN.
        variants: ``{"int16": scan, "noise": scan}`` (:func:`load_variants`): measure stability on up to
            ``stability_slices`` lesion (else model-positive) slices, evenly spread.

    Returns:
        :class:`CaseScores`.
    """
    start = time.perf_counter()
    operating_point = operating_point or OperatingPoint()
    volume = scan.as_tensor()[0] if isinstance(scan, MetaTensor) else scan[0]  # X x Y x Z
    metered = explainer if isinstance(explainer, Metered) else Metered(explainer)
    components = None if label is None else lesion_components(label, axis)  # n x h x w
    probability = None
    if explain == "scored" or operating_point.temperature != 1:
        probability = classify(model, volume, axis, target, operating_point)
    slices = None
    if explain == "scored":
        lesion = components.reshape(components.shape[0], -1).any(1) if components is not None else None
        slices = [i for i, p in enumerate(probability) if not math.isnan(p)
                  and ((lesion is not None and lesion[i]) or p >= operating_point.threshold)]
    result = explain_volume(scan, metered, axis=axis, target=target, slice_batch=slice_batch,
                            min_probability=min_probability, normalise=normalise, progress=progress, slices=slices,
                            keep_model_grid=faithfulness and label is not None)
    if probability is None:
        probability = np.array([p.probability for p in result.predictions], dtype=np.float64)
    out = CaseScores(result=result, probability=probability)
    if label is not None:
        _score(out, model, volume, label, components, case, explainer.name, target, operating_point, axis,
               faithfulness)
        if variants:
            out.stability = _stability(metered, volume, variants, out, target, axis, stability_slices)
    out.seconds = time.perf_counter() - start
    return out


def _score(out: CaseScores, model, volume: torch.Tensor, label: np.ndarray, components: np.ndarray, case: str,
           method: str, target: int, operating_point: OperatingPoint, axis: int, faithfulness: bool) -> None:
    """Fill ``out``'s rows, classifier rows, curves and ``scores`` (the case has a mask)."""
    result = out.result
    saliency = np.moveaxis(result.saliency[0].numpy(), axis, 0)  # n x h x w
    image = np.moveaxis(volume.cpu().numpy(), axis, 0)
    tolerance = tolerance_voxels(model, saliency.shape[1:])
    records = {r["index"]: r for r in result.records}
    explained = {p.index for p in result.predictions if p.explained}  # lesion or positive slices get a row
    threshold = operating_point.threshold
    out.classifier = [{**r, "positive": bool(out.probability[r["slice"]] >= threshold),
                       "probability": float(out.probability[r["slice"]])}
                      for r in classifier_rows(case, result.predictions, label, axis, components=components)]

    def predict(batch: torch.Tensor) -> torch.Tensor:
        return operating_point.probabilities(model(batch))[:, target]

    fill_noise = FAITHFULNESS["noise_std"] / INPUT_STD  # in model-input units
    out.curves = {"fractions": np.empty(0), "deletion": [], "insertion": []}
    lesion = components.reshape(components.shape[0], -1).any(1)
    for i in sorted(set(np.flatnonzero(lesion).tolist()) | explained):
        p = float(out.probability[i])
        positive = bool(p >= threshold)
        record = records.get(i, {})  # a lesion slice skipped by min_probability: map 0, no cost
        cost = {k: record.get(k, 0.0) for k in ("seconds", "forward_passes", "backward_passes")}
        extra = {k: v for k, v in record.items() if k not in ("index", *cost)}
        head = {"case": case, "slice": i, "method": method, "probability": p, "positive": positive}
        if lesion[i]:
            s, m = saliency[i], components[i] > 0
            faith = {"deletion_auc": math.nan, "insertion_auc": math.nan}
            if faithfulness and i in result.model_grid_maps:
                x = _model_inputs(model, volume, axis, [i])[0]
                for mode in ("deletion", "insertion"):
                    fractions, probs = perturbation_curve(
                        x, result.model_grid_maps[i].numpy(), predict, mode=mode,
                        baseline=FAITHFULNESS[f"{mode}_fill"], steps=FAITHFULNESS["steps"], noise_std=fill_noise,
                        seed=FAITHFULNESS["seed"])
                    out.curves[mode].append(probs)
                    out.curves["fractions"] = fractions
                    faith[f"{mode}_auc"] = auc(fractions, probs)
            out.rows.append({**head, "stratum": "tp" if positive else "fn", "lesions": _ids(components, i),
                             **localisation_scores(s, m, tolerance), **faith, **cost,
                             **iou_counts(threshold_mean(s), m), **extra})
        elif positive:
            out.fp_rows.append({**head, "stratum": "fp", **saliency_mass(saliency[i], foreground_mask(image[i])),
                                **cost, **extra})
    per_slice = [{k: r[k] for k in ("slice", "probability", "positive", *LOCALISATION_KEYS)} for r in out.rows]
    out.scores = {
        "volume": localisation_scores(result.saliency[0].numpy(), label, tolerance),
        "slices": {k: _nanmean([r[k] for r in per_slice]) for k in LOCALISATION_KEYS},
        "lesion_slices": len(per_slice),
        "per_slice": per_slice,
        "tolerance_voxels": tolerance,
        "operating_point": {"threshold": threshold, "source": operating_point.source},
    }


def _nanmean(values: Sequence[float]) -> float:
    v = np.asarray(values, dtype=np.float64)
    return float(v[~np.isnan(v)].mean()) if np.any(~np.isnan(v)) else math.nan


def _stability(explainer: Explainer, volume: torch.Tensor, variants: Mapping[str, MetaTensor], out: CaseScores,
               target: int, axis: int, limit: int) -> list[dict[str, Any]]:
    """Saliency correlation, slice by slice, between the scan as given and each variant (module docstring of
    :mod:`c2f_med.metrics.stability`); maps on the model's input grid, every explanation started from the same
    seed so that only the input differs."""
    candidates = [r["slice"] for r in out.rows] or [r["slice"] for r in out.fp_rows]
    if limit <= 0 or not candidates:
        return []
    picked = [candidates[k] for k in evenly_spread(len(candidates), limit)]
    model = explainer.model

    def maps(vol: torch.Tensor) -> np.ndarray:
        torch.manual_seed(STABILITY["seed"])
        with torch.enable_grad():
            expl = explainer.explain(_model_inputs(model, vol, axis, picked), target)
        return expl.saliency.float().cpu().numpy()

    given = maps(volume)
    other = {name: maps(scan.as_tensor()[0]) for name, scan in variants.items()}
    return [{"slice": i, **{name: saliency_correlation(given[k], m[k]) for name, m in other.items()}}
            for k, i in enumerate(picked)]


def write_predictions(path: Path, result: VolumeExplanation, operating_point: OperatingPoint | None = None,
                      probability: Sequence[float] | None = None) -> None:
    """``predictions.csv``: slice, probability (``probability`` when given, the calibrated one of
    :func:`explain_and_score`, else the explanation's), explained (0/1) and positive (1 when the
    probability reaches the operating point's threshold; empty on background slices)."""
    threshold = (operating_point or OperatingPoint()).threshold
    values = [p.probability for p in result.predictions] if probability is None else list(probability)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slice", "probability", "explained", "positive"])
        for p, value in zip(result.predictions, values):
            nan = math.isnan(value)
            w.writerow([p.index, "" if nan else f"{value:.6f}", int(p.explained),
                        "" if nan else int(value >= threshold)])


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
    probability: Sequence[float] | None = None,
) -> Path:
    """Write one case folder (module docstring) atomically; returns ``folder``.

    ``c2f-med explain`` (:func:`explain_case`) and the bundle's ``SaliencySaver`` write their folders with it.

    Args:
        folder: ``OUT/<case>``.
        bundle: the :class:`~c2f_med.models.bundle.Bundle` (provenance).
        scan: the loaded scan ``1 x X x Y x Z`` (its meta data map back to the file's grid).
        result: the explanation of ``scan``; label: ``X x Y x Z`` lesion mask or None.
        scores: the ``scores`` of :func:`c2f_med.case.explain_and_score` (``scores.json``), or None.
        image, mask: the input paths (provenance; a DICOM ``image`` adds ``dicom/``).
        info: ``{"method", "params", "axis", "min_probability", "normalise", "seconds"}``.
        series_uid, dicom_export, deidentify: as in :func:`c2f_med.case.explain_case`.
        probability: the calibrated per-slice probabilities (:class:`CaseScores`), for ``predictions.csv``.
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
        write_predictions(tmp / "predictions.csv", result, getattr(bundle, "operating_point", None), probability)
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
    faithfulness: bool = False,
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
        faithfulness: with a mask, also the deletion / insertion AUCs of the lesion slices (the audit's).
        stack: which stack of a multi-frame DICOM image holding several (1-based).
        segment, roi: which segment of a DICOM SEG / .seg.nrrd mask, which ROI of an RTSTRUCT mask.

    Returns:
        :class:`CaseResult`; its ``scored`` holds :func:`explain_and_score`'s rows.
    """
    start = time.perf_counter()
    case = case_id or case_id_of(image)
    data = load_scan(image, mask, bundle.preset, series_uid, stack=stack, segment=segment, roi=roi)
    scan = data["image"]
    explainer = create(method, bundle.model, **(params or {}))
    label = data["label"][0].numpy() > 0 if "label" in data else None
    scored = explain_and_score(bundle.model, scan, label, explainer, case=case, target=bundle.lesion_class,
                               operating_point=bundle.operating_point, axis=axis, min_probability=min_probability,
                               normalise=normalise, slice_batch=slice_batch, faithfulness=faithfulness,
                               progress=progress)
    result, scores = scored.result, scored.scores
    seconds = time.perf_counter() - start

    info = {"method": method, "params": explainer.param_dict(), "axis": axis, "min_probability": min_probability,
            "normalise": normalise, "seconds": seconds}
    write_case(Path(out_root) / case, bundle=bundle, scan=scan, result=result, label=label, scores=scores,
               image=image, mask=mask, info=info, series_uid=series_uid, dicom_export=dicom_export,
               deidentify=deidentify, probability=scored.probability)
    return CaseResult(
        case_id=case, folder=Path(out_root) / case,
        lesion_slices=0 if scores is None else scores["lesion_slices"], scores=scores, seconds=seconds,
        forward_passes=result.forward_passes, backward_passes=result.backward_passes,
        explained_slices=sum(p.explained for p in result.predictions), records=result.records, scored=scored)


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
