"""Result series naming without a server: one series per kind of export, UIDs that do not change."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from c2f_med.pacs.client import DicomWebError, SeriesRef
from c2f_med.pacs.store import result_series

PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"


def _export(path: Path, study: str, sop_class: str) -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesDescription = study, generate_uid(), "export"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def test_one_series_per_kind_with_stable_uids(tmp_path):
    ref = SeriesRef("http://127.0.0.1:1/dw", "1.2.3", "1.2.3.4")
    bundle = SimpleNamespace(root=tmp_path / "no_bundle", sha256="ab" * 32)
    _export(tmp_path / "dicom" / "pm.dcm", ref.study, PARAMETRIC_MAP)
    for k in range(2):
        _export(tmp_path / "dicom" / "overlay" / f"{k}.dcm", ref.study, SecondaryCaptureImageStorage)
    first = result_series(tmp_path / "dicom", ref, "c2f", bundle)
    again = result_series(tmp_path / "dicom", ref, "c2f", bundle)
    assert sorted(len(v) for v in first.values()) == [1, 2]
    assert {s: [d.SOPInstanceUID for d in v] for s, v in first.items()} == {
        s: [d.SOPInstanceUID for d in v] for s, v in again.items()}
    for series, datasets in first.items():
        assert all(d.SeriesInstanceUID == series and d.file_meta.MediaStorageSOPInstanceUID == d.SOPInstanceUID
                   for d in datasets)
        assert all(d.SeriesDescription == "c2f_med saliency, method c2f, model version abababab" for d in datasets)
    other_method = result_series(tmp_path / "dicom", ref, "rollout", bundle)
    assert not set(other_method) & set(first)
    _export(tmp_path / "dicom" / "stray.dcm", "9.9.9", PARAMETRIC_MAP)
    with pytest.raises(DicomWebError, match="another study"):
        result_series(tmp_path / "dicom", ref, "c2f", bundle)
