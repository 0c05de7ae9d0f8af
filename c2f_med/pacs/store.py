"""Store a case's DICOM exports back into the scan's study with STOW-RS, once.

Every export object kind (Parametric Map, Secondary Capture, SEG, ...: one SOP class in one export
sub-folder) becomes its own new series in the source study, with UIDs that depend only on the source
series, the method, the model's SHA-256 and the kind (:func:`result_series_uid`), and the description
``c2f_med saliency, method <method>, model version <version>``. Before storing, the instances already
in that series are listed with QIDO-RS and only the missing ones are sent: a rerun stores nothing
new, a store cut short is completed, and nothing on the server is modified or deleted.
"""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from c2f_med.pacs.client import DicomWebError, SeriesRef, server_call

__all__ = ["DESCRIPTION", "model_version", "result_series_uid", "result_series", "stored_instances", "store_results"]

DESCRIPTION = "c2f_med saliency, method {method}, model version {version}"


def model_version(bundle) -> str:
    """The bundle's ``metadata.json`` version and the first 8 hex digits of its weights' SHA-256."""
    version = ""
    metadata = Path(bundle.root) / "configs" / "metadata.json"
    if metadata.is_file():
        version = str(json.loads(metadata.read_text()).get("version", ""))
    return f"{version} {bundle.sha256[:8]}".strip()


def result_series_uid(source_series: str, method: str, model_sha256: str, kind: str) -> str:
    """The UID of the result series of one export ``kind`` for a source series, method and model."""
    return str(generate_uid(entropy_srcs=["c2f_med.results", source_series, method, model_sha256, kind]))


def result_series(dicom_folder: Path, ref: SeriesRef, method: str, bundle) -> dict[str, list[Dataset]]:
    """``{result series UID: datasets}`` of the exports under ``dicom_folder``, renamed for storing.

    The series and SOP Instance UIDs are replaced by deterministic ones and the SeriesDescription set
    (see the module docstring); nothing else changes.

    Raises:
        DicomWebError: an export belongs to another study than ``ref``'s.
    """
    description = DESCRIPTION.format(method=method, version=model_version(bundle))[:64]  # LO: 64 characters
    out: dict[str, list[Dataset]] = {}
    for file in sorted(dicom_folder.rglob("*.dcm")):
        ds = pydicom.dcmread(file)
        if ds.StudyInstanceUID != ref.study:
            raise DicomWebError(ref.url, f"export {file.name} belongs to another study; not stored")
        kind = f"{file.parent.relative_to(dicom_folder).as_posix()}|{ds.SOPClassUID}"
        series = result_series_uid(ref.series, method, bundle.sha256, kind)
        datasets = out.setdefault(series, [])
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[series, str(len(datasets))])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesDescription = description
        datasets.append(ds)
    return out


def stored_instances(client, ref: SeriesRef, series: str) -> set[str]:
    """SOP Instance UIDs the server holds in ``series`` of ``ref``'s study (QIDO-RS)."""
    with server_call(ref.url, "listing stored results"):
        found = client.search_for_instances(ref.study, series, fields=["SOPInstanceUID"], get_remaining=True)
    return {i["00080018"]["Value"][0] for i in found if i.get("00080018", {}).get("Value")}


def store_results(client, ref: SeriesRef, dicom_folder: Path, method: str, bundle) -> dict[str, int]:
    """STOW-RS the exports under ``dicom_folder`` into ``ref``'s study, skipping instances already there.

    Returns:
        ``{"stored_instances": sent now, "present_instances": already on the server}``.

    Raises:
        DicomWebError: the server cannot be reached, answers with an error or refuses an instance.
    """
    stored = present = 0
    for series, datasets in result_series(dicom_folder, ref, method, bundle).items():
        there = stored_instances(client, ref, series)
        missing = [ds for ds in datasets if ds.SOPInstanceUID not in there]
        present += len(datasets) - len(missing)
        if not missing:
            continue
        with server_call(ref.url, "storing results (STOW-RS)"):
            answer = client.store_instances(missing, ref.study)
        failed = answer.get("FailedSOPSequence") if answer is not None else None
        if failed:
            raise DicomWebError(ref.url, f"the server refused {len(failed)} of {len(missing)} result instances")
        stored += len(missing)
    return {"stored_instances": stored, "present_instances": present}
