"""Lesion annotations stored on the server: the SEG and RTSTRUCT instances that reference a series.

:func:`find_annotations` searches the series' study with QIDO-RS (Modality SEG, then RTSTRUCT) and
reads each candidate series' metadata with WADO-RS (headers only) to keep those whose references name
the series: a SEG's ReferencedSeriesSequence, an RTSTRUCT's ReferencedFrameOfReferenceSequence >
RTReferencedStudySequence > RTReferencedSeriesSequence. :func:`choose` picks one segment / ROI as the
mask (``--segment`` / ``--roi``), or raises an error that lists them all.

:func:`seg_mask_series` turns the chosen SEG segment into a mask series on the scan's own slices: a
copy of each source image's geometry with the segment's pixels (placed by the SEG's per-frame
references to the source images, read with highdicom), which the ordinary DICOM reader loads on the
scan's grid. An RTSTRUCT, or a SEG whose frames do not reference the source images one by one, is
handed to the mask reader as the file itself.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from c2f_med.atomic import atomic_dir
from c2f_med.errors import InputError
from c2f_med.pacs.client import SeriesRef, server_call
from c2f_med.pacs.store import DESCRIPTION

__all__ = ["MODALITIES", "Annotation", "find_annotations", "choose", "seg_mask_series"]

MODALITIES = ("SEG", "RTSTRUCT")
#: series descriptions of the results this tool stores back: never taken as annotations
RESULT_PREFIX = DESCRIPTION.partition(",")[0]
_SOP_INSTANCE, _SERIES, _MODALITY, _DESCRIPTION = "00080018", "0020000E", "00080060", "0008103E"


@dataclass(frozen=True)
class Annotation:
    """One SEG or RTSTRUCT instance that references a series, with its segments / ROIs ``(number, label)``."""

    modality: str
    series: str
    instance: str
    description: str
    labels: tuple[tuple[int, str], ...]

    def summary(self) -> str:
        """``SEG <series uid> ('description'): 1 'lesion', 2 'oedema'``: no patient identifiers."""
        kind = "segments" if self.modality == "SEG" else "ROIs"
        listed = ", ".join(f"{n} {label!r}" for n, label in self.labels) or f"no {kind}"
        return f"{self.modality} {self.series} ({self.description!r}): {listed}"


def _values(item: dict[str, Any], tag: str) -> list[Any]:
    return (item.get(tag) or {}).get("Value") or []


def _first(item: dict[str, Any], tag: str, default: Any = "") -> Any:
    values = _values(item, tag)
    return values[0] if values else default


def _referenced_series(meta: dict[str, Any]) -> set[str]:
    """Series UIDs a SEG (ReferencedSeriesSequence) or RTSTRUCT (RT referenced series) instance references."""
    found = {_first(s, _SERIES) for s in _values(meta, "00081115")}
    for frame in _values(meta, "30060010"):
        for study in _values(frame, "30060012"):
            found |= {_first(s, _SERIES) for s in _values(study, "30060014")}
    return found - {""}


def _labels(meta: dict[str, Any]) -> tuple[tuple[int, str], ...]:
    if _first(meta, _MODALITY) == "SEG":  # SegmentSequence: SegmentNumber, SegmentLabel
        return tuple((int(_first(s, "00620004", 0)), str(_first(s, "00620005"))) for s in _values(meta, "00620002"))
    return tuple((int(_first(r, "30060022", 0)), str(_first(r, "30060026")))  # StructureSetROISequence
                 for r in _values(meta, "30060020"))


def find_annotations(client, ref: SeriesRef) -> list[Annotation]:
    """The SEG and RTSTRUCT instances in ``ref``'s study that reference ``ref``'s series (by series UID),
    leaving out the SEG of the salient region this tool stores back (``--store-results``).

    Raises:
        DicomWebError: the server cannot be reached or answers with an error.
    """
    candidates: dict[str, None] = {}
    for modality in MODALITIES:
        with server_call(ref.url, f"searching the study for {modality}"):
            found = client.search_for_instances(ref.study, search_filters={"Modality": modality},
                                                fields=["SeriesInstanceUID"], get_remaining=True)
        candidates.update(dict.fromkeys(_first(i, _SERIES) for i in found))
    out = []
    for series in candidates:
        with server_call(f"{ref.root}/studies/{ref.study}/series/{series}", "reading the annotation's headers"):
            metadata = client.retrieve_series_metadata(ref.study, series)
        for meta in metadata:
            if str(_first(meta, _DESCRIPTION)).startswith(RESULT_PREFIX):  # this tool's own saliency SEG
                continue
            if _first(meta, _MODALITY) in MODALITIES and ref.series in _referenced_series(meta):
                out.append(Annotation(_first(meta, _MODALITY), series, _first(meta, _SOP_INSTANCE),
                                      str(_first(meta, _DESCRIPTION)), _labels(meta)))
    return sorted(out, key=lambda a: (a.modality, a.series, a.instance))


def _matches(annotation: Annotation, number: int, label: str, wanted: str) -> bool:
    """``wanted`` is a number, a label, or ``<annotation series UID>:<number or label>``."""
    series, sep, which = wanted.rpartition(":")
    if sep and series != annotation.series:
        return False
    which = which if sep else wanted
    return which == str(number) or which == label


def choose(annotations: Sequence[Annotation], url: str, segment: str | None = None,
           roi: str | None = None) -> tuple[Annotation, int]:
    """The one annotation and segment / ROI number to use as the mask of the series at ``url``.

    Without ``segment`` or ``roi`` there must be exactly one segment or ROI in all; ``segment`` (SEG)
    and ``roi`` (RTSTRUCT) select by number, label or ``<series UID>:<number or label>``.

    Raises:
        InputError: none references the series, none matches, or several remain (all listed).
    """
    if not annotations:
        raise InputError(url, "no DICOM SEG or RTSTRUCT on the server references this series")
    candidates = [(a, n, label) for a in annotations for n, label in a.labels]
    if segment is not None or roi is not None:
        candidates = [(a, n, label) for a, n, label in candidates
                      if (segment is not None and a.modality == "SEG" and _matches(a, n, label, segment))
                      or (roi is not None and a.modality == "RTSTRUCT" and _matches(a, n, label, roi))]
    listed = "; ".join(a.summary() for a in annotations)
    if len(candidates) == 1:
        annotation, number, _ = candidates[0]
        return annotation, number
    if not candidates:
        asked = " ".join(f"--{k} {v}" for k, v in (("segment", segment), ("roi", roi)) if v is not None)
        raise InputError(url, f"no annotation matches {asked or 'a segment or ROI'}; found: {listed}")
    raise InputError(url, f"{len(candidates)} segments / ROIs reference this series, choose one with --segment "
                          f"NUMBER|LABEL (SEG) or --roi NUMBER|NAME (RTSTRUCT), or SERIES_UID:NUMBER: {listed}")


def seg_mask_series(seg_file: Path, images: Iterable[Path], segment: int, folder: Path) -> Path | None:
    """Write segment ``segment`` of the SEG as a mask series on the source images' slices into ``folder``.

    Each mask file copies one source image's header (geometry, InstanceNumber) with the segment's
    0/1 pixels in place of the image's. Returns ``folder``, or None when the SEG cannot be placed this
    way (multi-frame sources, or frames without per-image references): the SEG file is then the mask.
    """
    sources = sorted((pydicom.dcmread(f, stop_before_pixels=True) for f in images),
                     key=lambda ds: int(ds.get("InstanceNumber", 0) or 0))
    if any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for ds in sources):
        return None
    seg = hd.seg.segread(seg_file)
    try:
        pixels = seg.get_pixels_by_source_instance([ds.SOPInstanceUID for ds in sources], segment_numbers=[segment],
                                                   ignore_spatial_locations=True)
    except (ValueError, KeyError, AttributeError, IndexError):
        return None
    mask_series = generate_uid(entropy_srcs=["c2f_med.mask", seg.SOPInstanceUID, str(segment)])
    with atomic_dir(folder) as tmp:
        for k, (ds, plane) in enumerate(zip(sources, pixels[..., 0])):
            out = copy.deepcopy(ds)
            for keyword in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth", "VOILUTSequence",
                            "ModalityLUTSequence", "SmallestImagePixelValue", "LargestImagePixelValue"):
                if keyword in out:
                    delattr(out, keyword)
            out.SeriesInstanceUID = mask_series
            out.SOPInstanceUID = generate_uid(entropy_srcs=[mask_series, str(k)])
            out.SeriesDescription = f"mask: segment {segment} of SEG {seg.SeriesInstanceUID}"[:64]
            out.file_meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
            out.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            out.set_pixel_data((np.asarray(plane) > 0).astype(np.uint16), "MONOCHROME2", 16,
                               generate_instance_uid=False)
            out.save_as(tmp / f"{k + 1:04d}.dcm", enforce_file_format=True)
    return folder
