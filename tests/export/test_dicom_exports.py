"""Every DICOM object written (Parametric Map, SEG of the salient region, Secondary Capture overlays) for a
classic series, an enhanced multi-frame image and with de-identification: validated by dciodvfy, read back
onto the scan's grid, identifiers copied or removed."""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from c2f_med.export.dicom import PM_FILENAME, save_dicom_exports
from c2f_med.export.dicom_sc import MAX_SLICES, choose_slices, overlay_rgb, patient_orientation
from c2f_med.export.dicom_seg import SEG_FILENAME
from c2f_med.io.annotations import ReadMask
from c2f_med.io.transforms import LoadScan, ReadScan, to_original_grid
from tests.export.conftest import IDENTIFIERS

DCIODVFY = shutil.which("dciodvfy")


def enhanced(series, path: Path) -> Path:
    datasets = [pydicom.dcmread(f) for f in sorted(series.folder.iterdir())]
    hd.legacy.LegacyConvertedEnhancedMRImage(datasets, hd.UID(), 5, hd.UID(), 1).save_as(path)
    return path


def export(source: Path, out: Path, deidentify: bool = False) -> tuple[list[Path], np.ndarray]:
    """The exports of a saliency that is the scan's own values rescaled (so every slice differs)."""
    scan = LoadScan()(source)
    display = (scan - scan.min()) / (scan.max() - scan.min())
    saliency = to_original_grid(display**2, scan)
    return save_dicom_exports(saliency, to_original_grid(display, scan), source, out, deidentify=deidentify), saliency


def dciodvfy_errors(path: Path) -> list[str]:
    result = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


@pytest.fixture(params=["series", "multiframe", "deidentified"])
def exported(request, dicom_series, tmp_path):
    source = dicom_series.folder if request.param != "multiframe" else enhanced(dicom_series, tmp_path / "mf.dcm")
    paths, saliency = export(source, tmp_path / "out" / "dicom", deidentify=request.param == "deidentified")
    return request.param, source, paths, saliency


def test_what_is_written(exported):
    kind, source, paths, _ = exported
    names = [p.relative_to(paths[0].parent).as_posix() for p in paths]
    assert names[:2] == [PM_FILENAME, SEG_FILENAME]
    overlays = [pydicom.dcmread(p) for p in paths[2:]]
    assert 1 <= len(overlays) <= MAX_SLICES and all(n.startswith("overlay/overlay_") for n in names[2:])
    assert len({ds.SeriesInstanceUID for ds in overlays}) == 1
    first = overlays[0]
    assert first.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert (first.SamplesPerPixel, first.PhotometricInterpretation) == (3, "RGB")
    assert first.pixel_array.shape[-1] == 3 and first.pixel_array.dtype == np.uint8
    study = pydicom.dcmread(next(iter(sorted(Path(source).iterdir()))) if Path(source).is_dir() else source,
                            stop_before_pixels=True).StudyInstanceUID
    assert {pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID for p in paths} == {study}


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (Debian package dicom3tools) is not installed")
def test_every_object_passes_dciodvfy_without_errors(exported):
    _, _, paths, _ = exported
    for path in paths:
        assert dciodvfy_errors(path) == [], path.name


def test_the_seg_is_the_thresholded_saliency_on_the_scan_grid(exported):
    _, source, paths, saliency = exported
    scan = ReadScan()(source)
    mask = ReadMask()(paths[1], scan)[0].numpy() > 0
    np.testing.assert_array_equal(mask, np.squeeze(saliency, 0) >= 0.5)
    assert 0 < mask.sum() < mask.size


def test_identifiers_are_kept_or_removed(exported):
    kind, _, paths, _ = exported
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        text = str(ds)
        if kind == "deidentified":
            assert ds.PatientIdentityRemoved == "YES" and ds.PatientName == "ANONYMOUS"
            assert not [v for v in IDENTIFIERS.values() if len(v) > 1 and v in text], path.name
            assert ds.get("PatientSex", "") == ""
        else:
            assert ds.PatientID == IDENTIFIERS["PatientID"]


def test_multiframe_parametric_map_has_the_frames_of_the_source(dicom_series, tmp_path):
    source = enhanced(dicom_series, tmp_path / "mf.dcm")
    paths, _ = export(source, tmp_path / "out")
    pm = pydicom.dcmread(paths[0])
    header = pydicom.dcmread(source, stop_before_pixels=True)
    assert int(pm.NumberOfFrames) == int(header.NumberOfFrames)
    assert pm.FrameOfReferenceUID == header.FrameOfReferenceUID
    positions = sorted(tuple(np.round(np.asarray(f.PlanePositionSequence[0].ImagePositionPatient, float), 3))
                       for f in pm.PerFrameFunctionalGroupsSequence)
    expected = sorted(tuple(np.round(np.asarray(f.PlanePositionSequence[0].ImagePositionPatient, float), 3))
                      for f in header.PerFrameFunctionalGroupsSequence)
    assert positions == expected


def test_overlay_helpers():
    frames = np.zeros((5, 4, 4))
    frames[1] = 0.2
    frames[3, 0, 0] = 1.0
    assert choose_slices(frames) == [1, 3] and choose_slices(frames, 1) == [1]
    assert patient_orientation([1, 0, 0, 0, 1, 0]) == ("L", "P")
    assert patient_orientation([0, 1, 0, 0, 0, -1]) == ("P", "F")
    rgb = overlay_rgb(np.full((2, 2), 0.5), np.array([[0.0, 1.0], [0.0, 0.0]]))
    assert rgb.dtype == np.uint8 and tuple(rgb[0, 0]) == (128, 128, 128) and tuple(rgb[0, 1]) != (128, 128, 128)


def test_highdicom_info_messages_stay_off_the_terminal():
    assert logging.getLogger("highdicom").getEffectiveLevel() >= logging.WARNING
