"""``c2f-med evaluate``: score explanation methods against lesion masks over a datalist.

Protocol, for every case of a datalist section (the first ``limit`` cases):

* The scan and its lesion mask are loaded as ``c2f-med explain`` loads them
  (:func:`c2f_med.case.load_scan`) and cut into axial slices (axis 2 after RAS orientation).
* Classifier: the calibrated lesion-class probability of every non-background slice and the model's
  decision at the bundle's operating point (threshold 0.5, source "default", when the bundle declares
  none); a slice's label is "its mask has lesion voxels". Slice AUROC, accuracy, sensitivity,
  specificity, ECE; per 3-D lesion AUROC and sensitivity.
* Explanations: one call of :func:`c2f_med.case.explain_and_score` per case and method. Every method
  explains the SAME slices: those whose mask has lesion voxels (strata TP and FN by the model's
  decision) and the lesion-free slices the model calls positive (FP). A lesion slice's map, on the
  slice's own grid, is scored against the mask (:func:`~c2f_med.metrics.localisation.localisation_scores`;
  pointing-game tolerance :func:`~c2f_med.case.tolerance_voxels`, i.e. ``p / 2`` model pixels), with
  the slice's {background, lesion} IoU counts at the mean threshold for the dataset mIoU; a false
  alarm's map by where its mass falls (:func:`~c2f_med.metrics.localisation.saliency_mass`).
* Faithfulness, on the model's input grid (the normalised ``size x size`` slice and the
  explainer's own map on it), ``p_c`` of the lesion class: deletion AUC (the most salient pixels
  are filled first) and insertion AUC (only the most salient pixels are kept), both with ROAD's
  noisy linear imputation as the fill, 10 steps (:data:`c2f_med.case.FAITHFULNESS`).
* Stability: on up to ``stability_slices`` lesion slices per case (0: off), the saliency correlation
  between the scan as given and the scan stored as int16, and with noise at its noise floor
  (:func:`c2f_med.case.load_variants`).
* Cost per slice: the explainer's wall time for its batch divided by the batch's slices
  (classification, mapping back and scoring excluded; every method first explains one random
  slice, so one-off set-up stays out), its forward passes (the explainer's per-slice count when
  it records one, else the batch's count / slices) and backward passes.

Outputs, each written atomically::

    OUT/per_slice.csv   case, slice, method, probability, positive, stratum (tp / fn), lesions, scores,
                        seconds, forward/backward passes, IoU counts, and the explainer's record (C2F: K,
                        pos1, neg1, ...); one row per (case, lesion slice, method); NaN (not applicable)
                        written as an empty cell
    OUT/false_alarms.csv one row per (case, lesion-free model-positive slice, method): probability,
                        saliency-mass keys, cost
    OUT/stability.csv   one row per (case, tested slice, method): r int16, r noise
    OUT/per_case.csv    case, method, mean scores over the case's lesion slices, the case's classifier
                        numbers (a case without lesion slices gets its rows with empty scores)
    OUT/summary.json    the stable keys (:func:`c2f_med.summary.summarise`), NaN as null, plus
                        the faithfulness settings and the provenance
    OUT/summary.md      tables (TP first), one row per method, best per column in bold, paired bootstrap CIs
    OUT/gallery.png     best and worst lesion slices (by AP of c2f, else of the first method), every
                        method side by side
    OUT/curves.png      mean deletion and insertion curves per method

``workers > 1`` spreads the cases over spawned processes (one torch thread each); results are
merged in datalist order, so they equal a single process's (timings aside).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from c2f_med.atomic import atomic_path, write_csv
from c2f_med.case import FAITHFULNESS, STABILITY, explain_and_score, item_options, load_scan, load_variants
from c2f_med.errors import InputError, find_input_error
from c2f_med.explain import create
from c2f_med.export.overlays import CONTOUR_COLOUR, display_slice, heat_colormap
from c2f_med.io.manifest import read_datalist
from c2f_med.metrics.faithfulness import auc
from c2f_med.metrics.sanity import model_randomisation
from c2f_med.models.bundle import Bundle, load_bundle
from c2f_med.provenance import provenance
from c2f_med.slices import slice_context
from c2f_med.summary import (
    FALSE_ALARM_HEAD,
    PER_SLICE_HEAD,
    REFERENCE_METHOD,
    SCORE_KEYS,
    STABILITY_HEAD,
    aggregate,
    classifier_scores,
    summarise,
    write_summary,
)

__all__ = ["AXIS", "FAITHFULNESS", "CaseOutput", "GalleryItem", "check_methods", "evaluate_case", "warm_up",
           "run_evaluate"]

logger = logging.getLogger(__name__)

#: slicing axis (axial after RAS orientation)
AXIS = 2
#: slices classified and explained per batch
SLICE_BATCH = 16
#: gallery rows: this many best and this many worst slices
GALLERY_ROWS = 2


@dataclass
class GalleryItem:
    """One lesion slice with every method's map, for ``gallery.png``.

    Attributes:
        case_index: the case's position in the evaluated datalist section (shown instead of its id).
        slice: slice index along :data:`AXIS`.
        image: the scan slice in [0, 1]; mask: the bool lesion mask; maps: ``{method: saliency}``;
            all three oriented for display (radiological view, :func:`c2f_med.export.overlays.display_slice`).
        ap: ``{method: AP on this slice}``.
    """

    case_index: int
    slice: int
    image: np.ndarray
    mask: np.ndarray
    maps: dict[str, np.ndarray]
    ap: dict[str, float]


@dataclass
class CaseOutput:
    """Everything one case contributes (picklable, so worker processes can return it).

    Attributes:
        index, case: position in the datalist section and case id.
        rows: per-slice lesion rows (:mod:`c2f_med.summary`), methods in request order, slices ascending.
        fp_rows: false-alarm rows; stability: stability rows (with ``case`` and ``method``).
        classifier: classifier rows of the case's non-background slices.
        curves: ``{method: {"fractions": steps + 1 fractions of changed pixels, "deletion": [steps + 1
            probabilities per slice], "insertion": [...]}}``.
        gallery: the case's best and worst slices (candidates for the dataset's gallery).
    """

    index: int
    case: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    fp_rows: list[dict[str, Any]] = field(default_factory=list)
    stability: list[dict[str, Any]] = field(default_factory=list)
    classifier: list[dict[str, Any]] = field(default_factory=list)
    curves: dict[str, dict[str, list[np.ndarray]]] = field(default_factory=dict)
    gallery: list[GalleryItem] = field(default_factory=list)


def _ranking_method(methods: Sequence[str]) -> str:
    """The method whose AP picks the gallery's best and worst slices."""
    return REFERENCE_METHOD if REFERENCE_METHOD in methods else methods[0]


def evaluate_case(
    bundle: Bundle,
    item: Mapping[str, Any],
    index: int,
    methods: Sequence[str],
    params: Mapping[str, Mapping[str, Any]] | None = None,
    on_method: Callable[[str], None] | None = None,
    faithfulness: bool = True,
    stability_slices: int = 0,
) -> CaseOutput:
    """Classify, explain and score one datalist item (``{"image", "label", "case_id"}``) with every method
    (:func:`c2f_med.case.explain_and_score`, the lesion and the model-positive slices).

    ``on_method(name)`` is called after each method (progress bars). ``faithfulness=False`` skips the
    deletion / insertion curves (their AUCs are NaN): the design search scores localisation only.
    ``stability_slices``: slices per case of the stability test (0, the default: none; ``run_evaluate``
    asks for :data:`c2f_med.case.STABILITY`'s).
    """
    params = params or {}
    case = item["case_id"]
    data = load_scan(item["image"], item["label"], bundle.preset, **item_options(item))
    scan = data["image"]  # 1 x X x Y x Z in [0, 1]
    label = data["label"][0].numpy() > 0  # X x Y x Z
    variants = (load_variants(item["image"], bundle.preset, stack=item.get("stack"))
                if stability_slices > 0 else None)
    out = CaseOutput(index=index, case=case)
    lesion_maps: dict[str, dict[int, np.ndarray]] = {}
    for method in methods:
        scored = explain_and_score(bundle.model, scan, label, create(method, bundle.model, **params.get(method, {})),
                                   case=case, target=bundle.lesion_class, operating_point=bundle.operating_point,
                                   axis=AXIS, explain="scored", slice_batch=SLICE_BATCH, faithfulness=faithfulness,
                                   variants=variants, stability_slices=stability_slices)
        if method == methods[0]:  # the classifier's numbers do not depend on the method
            out.classifier = scored.classifier
        out.rows += scored.rows
        out.fp_rows += scored.fp_rows
        out.stability += [{"case": case, "method": method, **r} for r in scored.stability]
        out.curves[method] = scored.curves
        volume_map = scored.result.saliency[0].numpy()  # X x Y x Z
        lesion_maps[method] = {r["slice"]: display_slice(volume_map, r["slice"], AXIS).copy() for r in scored.rows}
        if on_method is not None:
            on_method(method)
    out.gallery = _gallery_candidates(out.rows, index, scan.as_tensor()[0].cpu().numpy(), label, lesion_maps, methods)
    return out


def _gallery_candidates(rows, index, image, label, lesion_maps, methods) -> list[GalleryItem]:
    """The case's ``GALLERY_ROWS`` best and worst slices by the ranking method's AP (``image``, ``label``:
    ``X x Y x Z``; ``lesion_maps``: ``{method: {slice: display-oriented map}}``)."""
    ranking = _ranking_method(methods)
    ranked = sorted((r for r in rows if r["method"] == ranking), key=lambda r: -r["ap"])
    picked = list(dict.fromkeys(r["slice"] for r in ranked[:GALLERY_ROWS] + ranked[-GALLERY_ROWS:]))
    ap = {(r["method"], r["slice"]): r["ap"] for r in rows}
    return [GalleryItem(index, i, display_slice(image, i, AXIS).copy(), display_slice(label, i, AXIS).copy(),
                        {m: lesion_maps[m][i] for m in methods}, {m: ap[(m, i)] for m in methods}) for i in picked]


def warm_up(bundle: Bundle, methods: Sequence[str], params: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Explain one random (seeded) slice with every method, so one-off set-up costs (lazy
    initialisation, allocator growth) stay out of the timings."""
    model = bundle.model
    g = torch.Generator().manual_seed(0)
    channels = 2 * slice_context(model) + 1
    x = torch.randn((1, channels, *model.input_size), generator=g).to(next(model.parameters()).device)
    for m in methods:
        create(m, model, **(params or {}).get(m, {})).explain(x, bundle.lesion_class)



# ---------------------------------------------------------------------------------------------- workers

_WORKER_BUNDLE: Bundle | None = None


def _init_worker(bundle_dir: str, device: str, methods: list[str], params: dict) -> None:
    global _WORKER_BUNDLE
    torch.set_num_threads(1)
    _WORKER_BUNDLE = load_bundle(bundle_dir, device)
    warm_up(_WORKER_BUNDLE, methods, params)


def _worker_case(item: dict, index: int, methods: list[str], params: dict,
                 stability_slices: int) -> CaseOutput | tuple[str, str | None, str]:
    """One case in a worker; an :class:`InputError` comes back as ``("input_error", path, problem)``
    (its constructor's signature does not survive pickling)."""
    try:
        return evaluate_case(_WORKER_BUNDLE, item, index, methods, params, stability_slices=stability_slices)
    except Exception as exc:
        err = find_input_error(exc)
        if err is None:
            raise
        return ("input_error", err.path, err.problem)


def _run_cases(bundle: Bundle, bundle_dir: str | os.PathLike, device: str, items: list[dict], methods: list[str],
               params: dict, workers: int, progress: bool, stability_slices: int) -> list[CaseOutput]:
    bar = tqdm(total=len(items) * len(methods), desc="evaluate", unit="case x method", disable=not progress)
    with bar:
        if workers <= 1:
            warm_up(bundle, methods, params)
            return [evaluate_case(bundle, item, i, methods, params, on_method=lambda _m: bar.update(1),
                                  stability_slices=stability_slices) for i, item in enumerate(items)]
        import multiprocessing

        outputs: dict[int, CaseOutput] = {}
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_init_worker, initargs=(str(bundle_dir), device, methods, params)) as pool:
            futures = {pool.submit(_worker_case, item, i, methods, params, stability_slices): i
                       for i, item in enumerate(items)}
            for future in as_completed(futures):
                result = future.result()
                if isinstance(result, tuple):
                    for f in futures:
                        f.cancel()
                    raise InputError(result[1], result[2])
                outputs[futures[future]] = result
                bar.update(len(methods))
        return [outputs[i] for i in range(len(items))]


# ---------------------------------------------------------------------------------------------- outputs

CASE_KEYS = ("slices", *SCORE_KEYS, "miou", "seconds_per_slice", "forward_passes_per_slice",
             "backward_passes_per_slice")
CASE_CLASSIFIER_KEYS = ("case_slices", "case_lesion_slices", "case_slice_auroc", "case_slice_accuracy")


def _per_case_rows(outputs: Sequence[CaseOutput], methods: Sequence[str], threshold: float) -> list[dict[str, Any]]:
    rows = []
    for o in outputs:
        clf = classifier_scores(o.classifier, threshold)
        case_clf = {"case_slices": clf["slices"], "case_lesion_slices": clf["lesion_slices"],
                    "case_slice_auroc": clf["slice_auroc"], "case_slice_accuracy": clf["slice_accuracy"]}
        for m in methods:
            means = aggregate([r for r in o.rows if r["method"] == m])
            rows.append({"case": o.case, "method": m, **{k: means[k] for k in CASE_KEYS}, **case_clf})
    return rows


def _plot_gallery(path: Path, outputs: Sequence[CaseOutput], methods: Sequence[str]) -> None:
    """Best and worst slices (rows) x [scan, every method] (columns): scan, lesion contour, saliency
    (the colours and orientation of ``c2f-med explain``'s overlays)."""
    from matplotlib.figure import Figure

    ranking = _ranking_method(methods)
    items = sorted((g for o in outputs for g in o.gallery), key=lambda g: (-g.ap[ranking], g.case_index, g.slice))
    best = items[:GALLERY_ROWS]
    worst = [g for g in items[::-1][:GALLERY_ROWS] if all(g is not b for b in best)][::-1]
    chosen = [("best", g) for g in best] + [("worst", g) for g in worst]
    cols = 1 + len(methods)
    fig = Figure(figsize=(2.2 * cols, 2.4 * max(1, len(chosen))), layout="constrained")
    if not chosen:
        fig.text(0.5, 0.5, "no lesion slices", ha="center", va="center")
    else:
        axes = fig.subplots(len(chosen), cols, squeeze=False)
        heat = heat_colormap()
        for row, (kind, g) in zip(axes, chosen):
            for col, ax in enumerate(row):
                ax.imshow(g.image, cmap="gray", vmin=0, vmax=1)
                if col:
                    m = methods[col - 1]
                    ax.imshow(g.maps[m], cmap=heat, vmin=0, vmax=1)
                    ax.set_title(f"{m}: AP {g.ap[m]:.2f}", fontsize=8)
                else:
                    ax.set_title(f"{kind} ({ranking} AP {g.ap[ranking]:.2f})\ncase #{g.case_index}, z={g.slice}",
                                 fontsize=8)
                if g.mask.any():
                    ax.contour(g.mask.astype(float), levels=[0.5], colors=CONTOUR_COLOUR, linewidths=0.8)
                ax.set_axis_off()
    fig.suptitle(f"best and worst lesion slices by {ranking} AP (case # = position in the datalist section; "
                 "axial, radiological view)", fontsize=9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)


def _plot_curves(path: Path, outputs: Sequence[CaseOutput], methods: Sequence[str]) -> None:
    """Mean deletion and insertion curves (p_c against the fraction of changed pixels) per method."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, mode in zip(axes, ("deletion", "insertion")):
        for m in methods:
            curves = [c for o in outputs for c in o.curves.get(m, {}).get(mode, [])]
            if curves:
                fractions = next(o.curves[m]["fractions"] for o in outputs if o.curves[m][mode])
                mean = np.mean(curves, axis=0)
                ax.plot(fractions, mean, label=f"{m} (AUC {auc(fractions, mean):.3f})")
        ax.set(xlabel="fraction of pixels filled (most salient first)" if mode == "deletion" else
               "fraction of pixels kept (most salient first)", ylabel="p(lesion)", ylim=(0, 1),
               title=f"{mode} (fill: noisy linear imputation); {'lower' if mode == 'deletion' else 'higher'} is better")
        ax.legend(fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)


# ---------------------------------------------------------------------------------------------- entry point


def check_methods(bundle: Bundle, methods: Sequence[str],
                   params: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every method's parameters in use (for provenance); refuses unknown methods or parameters
    before any work (one-line error)."""
    if not methods:
        raise InputError(None, "no methods given (--methods c2f,vitcx,...)")
    unused = sorted(set(params) - set(methods))
    if unused:
        raise InputError(None, f"--param for method(s) {unused} not in --methods {','.join(methods)}")
    used = {}
    for m in methods:
        try:
            used[m] = create(m, bundle.model, **params.get(m, {})).param_dict()
        except (ValueError, TypeError) as err:
            raise InputError(None, f"--methods/--param: {err}") from err
    return used


def run_evaluate(
    bundle_dir: str | os.PathLike,
    datalist: str | os.PathLike,
    methods: Sequence[str],
    out: str | os.PathLike,
    *,
    limit: int | None = None,
    workers: int = 1,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    section: str = "testing",
    device: str = "cpu",
    stability_slices: int = STABILITY["slices"],
    progress: bool = True,
    item_defaults: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate ``methods`` on the lesion slices of a datalist section and write ``out/`` (module docstring).

    Args:
        bundle_dir: the MONAI bundle folder.
        datalist: datalist JSON; every item of ``section`` needs a "label" (lesion mask).
        methods: explainer names (:func:`c2f_med.explain.available`).
        out: output folder (created).
        limit: only the first ``limit`` cases.
        workers: processes; ``> 1`` spawns them, one torch thread each.
        params: ``{method: {parameter: value}}`` overrides.
        section: datalist section.
        device: torch device.
        stability_slices: slices per case of the stability test (0: off; each costs three explanations
            per method).
        progress: show a progress bar over cases x methods.
        item_defaults: ``"stack"`` / ``"segment"`` / ``"roi"`` for the items that do not set their own.

    Returns:
        The summary dict written to ``summary.json``.

    Raises:
        InputError: bad datalist, missing label, unknown method or parameter, unreadable scan.
    """
    methods, params = list(dict.fromkeys(methods)), {m: dict(p) for m, p in (params or {}).items()}
    if limit is not None and limit < 1:
        raise InputError(datalist, f"--limit must be >= 1, got {limit}")
    if workers < 1:
        raise InputError(None, f"--workers must be >= 1, got {workers}")
    if stability_slices < 0:
        raise InputError(None, f"--stability-slices must be >= 0, got {stability_slices}")
    items = [{**(item_defaults or {}), **item} for item in read_datalist(datalist, section)[:limit]]
    if not items:
        raise InputError(datalist, f'the "{section}" list is empty')
    for i, item in enumerate(items):
        if "label" not in item:
            raise InputError(datalist, f'{section}[{i}] has no "label": evaluation needs lesion masks')
    bundle = load_bundle(bundle_dir, device)
    used_params = check_methods(bundle, methods, params)

    start = time.perf_counter()
    outputs = _run_cases(bundle, bundle_dir, device, items, methods, params, min(workers, len(items)), progress,
                         stability_slices)
    rows = [r for o in outputs for r in o.rows]
    fp_rows = [r for o in outputs for r in o.fp_rows]
    stability = [r for o in outputs for r in o.stability]
    summary = summarise(rows, [c for o in outputs for c in o.classifier], bundle, datalist, len(items),
                        methods=methods, fp_rows=fp_rows, stability=stability)
    summary["section"] = section
    summary["faithfulness"] = {**FAITHFULNESS, "grid": "model input", "target": "lesion class"}
    summary["stability_settings"] = {"slices_per_case": stability_slices, "seed": STABILITY["seed"],
                                     "grid": "model input", "variants": {
                                         "int16": "intensities stored as int16 after a rescale, read back",
                                         "noise": "Gaussian noise at the scan's own noise floor"}}
    summary["sanity"] = model_randomisation(bundle, items, methods, params)  # trained vs re-initialised model
    summary["provenance"] = provenance(bundle, inputs={"datalist": datalist}, method=",".join(methods),
                                       params=used_params,
                                       extra={"workers": workers, "seconds": time.perf_counter() - start})

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    extras = list(dict.fromkeys(k for r in rows for k in r if k not in PER_SLICE_HEAD))
    write_csv(out / "per_slice.csv", rows, [*PER_SLICE_HEAD, *extras])
    fp_extras = list(dict.fromkeys(k for r in fp_rows for k in r if k not in FALSE_ALARM_HEAD))
    write_csv(out / "false_alarms.csv", fp_rows, [*FALSE_ALARM_HEAD, *fp_extras])
    write_csv(out / "stability.csv", stability, STABILITY_HEAD)
    write_csv(out / "per_case.csv", _per_case_rows(outputs, methods, bundle.operating_point.threshold),
               ["case", "method", *CASE_KEYS, *CASE_CLASSIFIER_KEYS])
    write_summary(out, summary)
    _plot_gallery(out / "gallery.png", outputs, methods)
    _plot_curves(out / "curves.png", outputs, methods)
    logger.info("%d cases, %d lesion slices, %d methods -> %s", summary["cases"], summary["lesion_slices"],
                len(methods), out / "summary.md")
    return summary
