"""Write every explained case's folder: :class:`SaliencySaver`.

The folder is the one ``c2f-med explain`` writes (see :mod:`c2f_med.case`)::

    OUT/<case>/saliency.nii.gz   float32 saliency on the input file's own grid and affine
    OUT/<case>/overlay.png       montage: scan, lesion contour, saliency heat map, colour bar
    OUT/<case>/predictions.csv   slice, probability, explained, positive
    OUT/<case>/scores.json       when LesionScoreHandler scored the case
    OUT/<case>/provenance.json   bundle hash, method and parameters, inputs' hashes, versions, costs
    OUT/<case>/dicom/            for DICOM inputs: a Parametric Map of the saliency

Each folder is written to a temporary sibling and renamed when complete, by the process that
explained the case (under ``torchrun`` every rank writes its own cases; no two ranks share one).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events
from monai.utils import CommonKeys

from c2f_med.case import write_case
from c2f_med.handlers.explain import case_ids

__all__ = ["SaliencySaver"]

logger = logging.getLogger(__name__)


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
            folder = write_case(
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
                probability=item[CommonKeys.PRED].tolist(),
            )
            logger.info("%s: %d slices explained -> %s", case,
                        sum(p.explained for p in item["explanation"].predictions), folder)
