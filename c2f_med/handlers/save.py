"""Write every explained case's folder: :class:`SaliencySaver`.

The folder is the one ``c2f-med explain`` writes (see :mod:`c2f_med.case`)::

    OUT/<case>/saliency.nii.gz   float32 saliency on the input file's own grid and affine
    OUT/<case>/overlay.png       montage: scan, lesion contour, saliency heat map, colour bar
    OUT/<case>/predictions.csv   slice, probability, explained
    OUT/<case>/scores.json       when LesionScoreHandler scored the case
    OUT/<case>/provenance.json   bundle hash, method and parameters, inputs' hashes, versions, costs
    OUT/<case>/dicom/            for DICOM inputs: a Parametric Map of the saliency

Each folder is written to a temporary sibling and renamed when complete, by the process that
explained the case (under ``torchrun`` every rank writes its own cases; no two ranks share one).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.utils import CommonKeys

from c2f_med.atomic import atomic_dir, write_json
# the pieces of c2f-med explain's case folder (module-private there; see write_case_folder)
from c2f_med.case import _export_dicom, _is_dicom, _write_predictions
from c2f_med.explain.volume import VolumeExplanation
from c2f_med.handlers.explain import case_ids
from c2f_med.provenance import provenance

__all__ = ["SaliencySaver", "write_case_folder"]

logger = logging.getLogger(__name__)


def write_case_folder(
    folder: str | os.PathLike,
    *,
    bundle: Any,
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

    The same files, written the same way, as :func:`c2f_med.case.explain_case`'s folder.

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
                        title=f"{folder.name}: {method}")
        _write_predictions(tmp / "predictions.csv", result)
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


class SaliencySaver:
    """Write ``output_dir/<case>/`` for every item of the batch, at ``ITERATION_COMPLETED``.

    Attach it after :class:`~c2f_med.handlers.ExplainHandler` (and after
    :class:`~c2f_med.handlers.LesionScoreHandler` for ``scores.json``). The saliency goes back
    onto the input file's grid with the loading transforms' recorded operations
    (:func:`~c2f_med.export.nifti.save_on_original_grid`); the case id is the datalist item's
    ``"case_id"`` (else the scan's file name).

    Args:
        output_dir: the run's output folder.
        bundle: the :class:`~c2f_med.models.bundle.Bundle` (provenance: path, model hash, config).
        dicom_export: for DICOM inputs, also write a Parametric Map series into ``dicom/``.
        deidentify: strip patient identifiers from DICOM outputs.
    """

    def __init__(self, output_dir: str | os.PathLike, bundle: Any, dicom_export: bool = True,
                 deidentify: bool = False) -> None:
        self.output_dir = Path(output_dir)
        self.bundle = bundle
        self.dicom_export = dicom_export
        self.deidentify = deidentify

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        for case, item in zip(case_ids(engine), engine.state.output):
            scan, label = item[CommonKeys.IMAGE], item.get(CommonKeys.LABEL)
            folder = write_case_folder(
                self.output_dir / case,
                bundle=self.bundle,
                scan=scan,
                result=item["explanation"],
                label=None if label is None else label[0].cpu().numpy() > 0,
                scores=item.get("scores"),
                image=scan.meta["filename_or_obj"],
                mask=None if label is None else label.meta["filename_or_obj"],
                info=item["explain_info"],
                dicom_export=self.dicom_export,
                deidentify=self.deidentify,
            )
            logger.info("%s: %d slices explained -> %s", case,
                        sum(p.explained for p in item["explanation"].predictions), folder)
