"""Parametric Map of the saliency: read back with highdicom and pydicom and checked against the source."""

from __future__ import annotations

import shutil

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ParametricMapStorage

from c2f_med.errors import InputError
from c2f_med.export.dicom import ANONYMOUS, PM_FILENAME, save_parametric_map
from c2f_med.io.transforms import LoadScan, to_original_grid
from tests.export.conftest import IDENTIFIERS, write_series


def saliency_of(source) -> tuple[np.ndarray, float, float]:
    """The loaded scan scaled to [0, 1] and put back on the file's grid, with the scale's (lo, hi)."""
    reference = LoadScan()(source)
    lo, hi = float(reference.min()), float(reference.max())
    return to_original_grid((reference - lo) / (hi - lo), reference), lo, hi


def real_values(ds: pydicom.Dataset) -> np.ndarray:
    return ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))


def test_frames_have_the_source_geometry_references_and_saliency(dicom_series, tmp_path):
    saliency, lo, hi = saliency_of(dicom_series.folder)
    path = save_parametric_map(saliency, dicom_series.folder, tmp_path / "out" / "dicom")
    assert path == tmp_path / "out" / "dicom" / PM_FILENAME
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["dicom"]  # no temporary folder left

    ds = pydicom.dcmread(path)
    sources = {s.SOPInstanceUID: s for s in dicom_series.headers}
    first = dicom_series.headers[0]
    assert ds.SOPClassUID == ParametricMapStorage
    assert int(ds.NumberOfFrames) == len(sources)
    assert (ds.Rows, ds.Columns) == (first.Rows, first.Columns)
    assert ds.StudyInstanceUID == first.StudyInstanceUID
    assert ds.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert ds.SeriesInstanceUID != first.SeriesInstanceUID
    shared = ds.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose(shared.PlaneOrientationSequence[0].ImageOrientationPatient,
                               first.ImageOrientationPatient, atol=1e-6)
    np.testing.assert_allclose(shared.PixelMeasuresSequence[0].PixelSpacing, first.PixelSpacing, atol=1e-6)
    mapping = shared.RealWorldValueMappingSequence[0]
    assert (mapping.RealWorldValueSlope, mapping.RealWorldValueIntercept) == (1.0, 0.0)

    referenced = ds.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == first.SeriesInstanceUID
    assert {r.ReferencedSOPInstanceUID for r in referenced.ReferencedInstanceSequence} == set(sources)

    frames = ds.pixel_array  # n x Rows x Columns float32
    seen = set()
    for frame, item in zip(frames, ds.PerFrameFunctionalGroupsSequence):
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        source = sources[uid]
        seen.add(uid)
        np.testing.assert_allclose(item.PlanePositionSequence[0].ImagePositionPatient,
                                   source.ImagePositionPatient, atol=1e-6)
        # the frame is the saliency at the source image's own pixels
        np.testing.assert_allclose(frame, (real_values(source) - lo) / (hi - lo), atol=1e-6)
    assert seen == set(sources)

    pm = hd.pm.ParametricMap.from_dataset(ds)
    assert {uid for _, _, uid in pm.get_source_image_uids()} == set(sources)
    order = [s.SOPInstanceUID for s in dicom_series.headers]
    by_source = pm.get_pixels_by_source_instance(order, apply_real_world_transform=True)
    np.testing.assert_allclose(by_source, np.moveaxis(saliency[0], -1, 0).transpose(0, 2, 1), atol=1e-6)


def test_identifiers_are_copied_by_default(dicom_series, tmp_path):
    saliency, _, _ = saliency_of(dicom_series.folder)
    ds = pydicom.dcmread(save_parametric_map(saliency, dicom_series.folder, tmp_path / "dicom"))
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID", "AccessionNumber"):
        assert str(ds.data_element(keyword).value) == IDENTIFIERS[keyword]
    assert "PatientIdentityRemoved" not in ds


def test_deidentify_replaces_identifiers_and_keeps_the_study_relations(dicom_series, tmp_path):
    saliency, _, _ = saliency_of(dicom_series.folder)
    path = save_parametric_map(saliency, dicom_series.folder, tmp_path / "dicom", deidentify=True)
    ds = pydicom.dcmread(path)
    for keyword, value in ANONYMOUS.items():
        assert str(ds.data_element(keyword).value) == value
    assert (ds.PatientName, ds.PatientID, ds.PatientBirthDate) == ("ANONYMOUS", "ANON", "")
    assert ds.PatientIdentityRemoved == "YES"
    texts = [str(e.value) for e in ds.iterall() if e.VR not in ("SQ", "OB", "OW", "OF", "OD", "UN")]
    for keyword, value in IDENTIFIERS.items():
        if keyword != "PatientSex":  # one letter: checked above
            assert not any(value in text for text in texts), keyword
    first = dicom_series.headers[0]
    assert ds.StudyInstanceUID == first.StudyInstanceUID
    assert ds.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    sources = {s.SOPInstanceUID for s in dicom_series.headers}
    assert {item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
            for item in ds.PerFrameFunctionalGroupsSequence} == sources


def test_series_uid_chooses_the_source_series(tmp_path):
    a = write_series(tmp_path / "a", seed=3, case_id="series-a")
    b = write_series(tmp_path / "b", seed=4, case_id="series-b")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for series in (a, b):
        for f in series.folder.iterdir():
            shutil.copy(f, mixed / f"{series.folder.name}_{f.name}")
    uid = b.headers[0].SeriesInstanceUID
    reference = LoadScan(series_uid=uid)(mixed)
    saliency = to_original_grid(reference / reference.max(), reference)
    ds = pydicom.dcmread(save_parametric_map(saliency, mixed, tmp_path / "dicom", series_uid=uid))
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == uid
    with pytest.raises(InputError, match="2 DICOM series found"):
        save_parametric_map(saliency, mixed, tmp_path / "other")


def test_single_dicom_file(tmp_path):
    source = get_testdata_file("CT_small.dcm")
    saliency, lo, hi = saliency_of(source)
    assert saliency.shape[-1] == 1
    ds = pydicom.dcmread(save_parametric_map(saliency, source, tmp_path / "dicom"))
    original = pydicom.dcmread(source)
    assert int(ds.NumberOfFrames) == 1
    item = ds.PerFrameFunctionalGroupsSequence[0]
    np.testing.assert_allclose(item.PlanePositionSequence[0].ImagePositionPatient,
                               original.ImagePositionPatient, atol=1e-6)
    assert item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID == \
        original.SOPInstanceUID
    np.testing.assert_allclose(ds.pixel_array, (real_values(original) - lo) / (hi - lo), atol=1e-6)


def test_saliency_off_the_source_grid_is_refused(dicom_series, tmp_path):
    saliency, _, _ = saliency_of(dicom_series.folder)
    with pytest.raises(ValueError, match="not on the grid"):
        save_parametric_map(saliency[:, :-1], dicom_series.folder, tmp_path / "dicom")
    assert not (tmp_path / "dicom").exists()


def test_source_without_frame_of_reference_is_refused(dicom_series, tmp_path):
    name = tmp_path / "no_frame.dcm"
    ds = dicom_series.headers[0].copy()
    del ds.FrameOfReferenceUID
    ds.save_as(name, enforce_file_format=True)
    saliency = np.zeros(dicom_series.voxels.shape[:2] + (1,), np.float32)
    with pytest.raises(InputError, match="without FrameOfReferenceUID"):
        save_parametric_map(saliency, name, tmp_path / "dicom")


def test_source_without_optional_identifiers_still_gives_a_map(dicom_series, tmp_path):
    """Type 2 attributes that highdicom copies (StudyID, AccessionNumber, ...) may be absent in the source."""
    missing = ("PatientBirthDate", "PatientSex", "StudyID", "AccessionNumber", "StudyTime", "ReferringPhysicianName")
    folder = tmp_path / "sparse"
    folder.mkdir()
    for k, source in enumerate(dicom_series.headers):
        ds = source.copy()
        for keyword in missing:
            delattr(ds, keyword)
        ds.save_as(folder / f"{k}.dcm", enforce_file_format=True)
    saliency, _, _ = saliency_of(folder)
    ds = pydicom.dcmread(save_parametric_map(saliency, folder, tmp_path / "dicom"))
    assert all(ds.data_element(keyword).value in ("", None) for keyword in missing)
    assert ds.PatientID == IDENTIFIERS["PatientID"]
