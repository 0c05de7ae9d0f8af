"""Small scans on disk for the export tests: an oblique NIfTI and an oblique DICOM series (int16)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from c2f_med.synth.writers import write_dicom_series, write_nifti

SHAPE = (7, 6, 5)  # X x Y x Z voxels: small, and every axis a different length


def oblique_affine() -> np.ndarray:
    """Voxel to RAS: rotated off the axes, axes permuted and mirrored (not RAS), anisotropic, offset."""
    angle = 0.35
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
    axes = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, 1.0], [-1.0, 0.0, 0.0]])  # i -> -y, j -> z, k -> -x
    affine = np.eye(4)
    affine[:3, :3] = rotation @ axes @ np.diag([1.5, 1.2, 2.5])
    affine[:3, 3] = (12.5, -30.0, 7.25)
    return affine


def int16_volume(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(-200, 1500, size=SHAPE).astype(np.int16)


@pytest.fixture
def oblique_nifti(tmp_path) -> Path:
    """An int16 NIfTI with :func:`oblique_affine` (qform and sform)."""
    return write_nifti(tmp_path / "oblique.nii.gz", int16_volume(seed=1), oblique_affine())


@dataclass
class Series:
    """A DICOM series on disk and what the tests compare against, computed from its headers."""

    folder: Path
    headers: list[Dataset]  # by InstanceNumber, with pixel data
    affine: np.ndarray  # RAS affine of the (column, row, slice) array, from the DICOM geometry
    voxels: np.ndarray  # stored values as X (columns) x Y (rows) x Z (slices by InstanceNumber)


# identifiers added to the synthetic series, to check they are copied or removed
IDENTIFIERS = {
    "PatientName": "Doe^Jane",
    "PatientID": "PID-31337",
    "PatientBirthDate": "19700101",
    "PatientSex": "F",
    "StudyID": "STUDY-42",
    "AccessionNumber": "ACC-9876",
    "ReferringPhysicianName": "House^Gregory",
    "InstitutionName": "General Hospital Springfield",
    "OtherPatientIDs": "OTHER-555",
}


def read_series(folder: Path) -> Series:
    headers = sorted((pydicom.dcmread(f) for f in folder.iterdir()), key=lambda ds: int(ds.InstanceNumber))
    first, last = (np.asarray(ds.ImagePositionPatient, dtype=float) for ds in (headers[0], headers[-1]))
    u, v = np.asarray(headers[0].ImageOrientationPatient, dtype=float).reshape(2, 3)
    dr, dc = (float(s) for s in headers[0].PixelSpacing)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = u * dc, v * dr  # i along a row (columns), j down a column (rows)
    lps[:3, 2] = (last - first) / max(len(headers) - 1, 1)
    lps[:3, 3] = first
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    voxels = np.stack([ds.pixel_array.T for ds in headers], axis=-1)
    return Series(folder, headers, affine, voxels)


def write_series(folder: Path, seed: int, case_id: str) -> Series:
    """An oblique int16 series (c2f_med's writer) with :data:`IDENTIFIERS` added to every file."""
    write_dicom_series(folder, int16_volume(seed), oblique_affine(), case_id=case_id)
    for name in folder.iterdir():
        ds = pydicom.dcmread(name)
        for keyword, value in IDENTIFIERS.items():
            setattr(ds, keyword, value)
        ds.save_as(name, enforce_file_format=True)
    return read_series(folder)


@pytest.fixture
def dicom_series(tmp_path) -> Series:
    return write_series(tmp_path / "series", seed=2, case_id="export-test")
