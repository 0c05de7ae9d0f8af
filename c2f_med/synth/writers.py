"""Write a volume as a NIfTI file or as a DICOM MR Image Storage series, atomically.

Both take the volume as an array ``X x Y x Z`` and its NIfTI affine (voxel index to RAS world, mm).
The DICOM series stores the same int16 voxels (RescaleSlope 1, RescaleIntercept 0) in the LPS
patient coordinates DICOM uses: reading the series back (SimpleITK, MONAI's PydicomReader) gives
the NIfTI's voxels and voxel-centre world positions.

Geometry of the series (``F = diag(-1, -1, 1)`` turns RAS into LPS, ``A`` the affine after the
in-plane flips below): slice ``k`` holds ``volume[:, :, k]`` transposed (rows follow the second
array axis, columns the first), ImagePositionPatient ``F A (0, 0, k, 1)``, ImageOrientationPatient
the unit columns 0 and 1 of ``F A``, PixelSpacing ``(|A e1|, |A e0|)`` (row spacing, then column
spacing), SliceThickness = SpacingBetweenSlices = ``|A e2|``. The two in-plane axes are first
flipped, where needed, to run toward the patient's left and posterior, so viewers show the slices
in the usual radiological orientation.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import nibabel as nib
import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from c2f_med.atomic import atomic_dir, atomic_path

__all__ = ["series_uid", "write_dicom_series", "write_nifti"]

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
STUDY_DATE = "20000101"  # synthetic scans carry a fixed, obviously artificial date
STUDY_TIME = "000000"


def write_nifti(path: str | os.PathLike, array: NDArray, affine: NDArray[np.floating]) -> Path:
    """Save ``array`` (its dtype kept, no scaling) with ``affine`` as qform and sform (scanner, mm).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    image = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
    image.set_qform(image.affine, code="scanner")
    image.set_sform(image.affine, code="scanner")
    image.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        nib.save(image, tmp)
    return Path(path)


def series_uid(key: str, kind: str) -> str:
    """Deterministic DICOM UID for ``kind`` ("study", "series", "frame", "instance-<k>") of ``key``."""
    return str(generate_uid(entropy_srcs=["c2f_med.synth", key, kind]))


def write_dicom_series(
    folder: str | os.PathLike,
    volume: NDArray[np.int16],
    affine: NDArray[np.floating],
    *,
    case_id: str,
    description: str = "synthetic MR",
) -> Path:
    """Write ``volume`` as one MR Image Storage series, one file per slice along the third axis.

    Args:
        folder: the series folder (replaced as a whole, atomically); files ``0001.dcm``, ...
        volume: int16 ``X x Y x Z``.
        affine: 4 x 4 voxel-to-world (RAS, mm); its columns must be orthogonal.
        case_id: names the synthetic patient (``SYNTH^<case_id>``, PatientID ``<case_id>``) and
            seeds every UID, so the same case gives the same series.
        description: SeriesDescription.

    Returns:
        ``folder`` as a :class:`~pathlib.Path`.
    """
    volume = np.asarray(volume)
    if volume.ndim != 3 or volume.dtype != np.int16:
        raise ValueError(f"volume must be a 3-D int16 array, got {volume.ndim}-D {volume.dtype}")
    volume, affine = _radiological(volume, np.asarray(affine, dtype=np.float64))
    lps = RAS_TO_LPS @ affine[:3]  # 3 x 4 voxel index -> LPS
    spacing = np.linalg.norm(lps[:, :3], axis=0)
    cosines = lps[:, :3] / spacing
    if not np.allclose(cosines.T @ cosines, np.eye(3), atol=1e-4):
        raise ValueError("the affine's axes are not orthogonal: a DICOM series cannot hold that grid")
    normal = np.cross(cosines[:, 0], cosines[:, 1])

    base = _series_dataset(case_id, description, volume)
    base.ImageOrientationPatient = [_ds(v) for v in (*cosines[:, 0], *cosines[:, 1])]
    base.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]
    base.SliceThickness = _ds(spacing[2])
    base.SpacingBetweenSlices = _ds(spacing[2])

    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        for k in range(volume.shape[2]):
            ds = copy.deepcopy(base)
            position = lps @ np.array([0.0, 0.0, k, 1.0])
            ds.ImagePositionPatient = [_ds(v) for v in position]
            ds.SliceLocation = _ds(position @ normal)
            ds.InstanceNumber = k + 1
            ds.SOPInstanceUID = series_uid(case_id, f"instance-{k}")
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.set_pixel_data(np.ascontiguousarray(volume[:, :, k].T), "MONOCHROME2", 16, generate_instance_uid=False)
            ds.save_as(tmp / f"{k + 1:04d}.dcm", enforce_file_format=True)
    return folder


def _radiological(volume: NDArray, affine: NDArray[np.float64]) -> tuple[NDArray, NDArray[np.float64]]:
    """Flip array axes 0 and 1 where they run toward the patient's right or anterior (the same world grid)."""
    for axis in (0, 1):
        direction = RAS_TO_LPS @ affine[:3, axis]
        if direction[np.argmax(np.abs(direction))] < 0:
            volume = np.flip(volume, axis)
            flip = np.eye(4)
            flip[axis, axis] = -1.0
            flip[axis, 3] = volume.shape[axis] - 1
            affine = affine @ flip
    return volume, affine


def _series_dataset(case_id: str, description: str, volume: NDArray[np.int16]) -> Dataset:
    """The attributes every slice of the series shares."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = MRImageStorage
    ds.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
    # patient and study: synthetic, nothing identifying
    ds.PatientName = f"SYNTH^{case_id}"
    ds.PatientID = case_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = series_uid(case_id, "study")
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = STUDY_DATE
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = STUDY_TIME
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.StudyDescription = "c2f_med synthetic lesion study"
    # series, equipment, frame of reference
    ds.Modality = "MR"
    ds.SeriesInstanceUID = series_uid(case_id, "series")
    ds.SeriesNumber = 1
    ds.SeriesDescription = description
    ds.PatientPosition = "HFS"
    ds.Manufacturer = "c2f_med synth"
    ds.FrameOfReferenceUID = series_uid(case_id, "frame")
    ds.PositionReferenceIndicator = ""
    # MR image module: a research-mode synthetic acquisition
    ds.ScanningSequence = "RM"
    ds.SequenceVariant = "NONE"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "3D"
    ds.RepetitionTime = ""
    ds.EchoTime = ""
    ds.EchoTrainLength = ""
    ds.BurnedInAnnotation = "NO"
    # stored values are the voxel values
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    lo, hi = np.percentile(volume, [1, 99.5])
    ds.WindowCenter = _ds((lo + hi) / 2)
    ds.WindowWidth = _ds(max(hi - lo, 1.0))
    return ds


def _ds(value: float) -> str:
    """A Decimal String value (at most 16 characters)."""
    text = f"{float(value):.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text[:16]
