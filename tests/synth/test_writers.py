"""NIfTI and DICOM series writers: the series reads back as the NIfTI's voxels on the same grid."""

from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

from c2f_med.synth.writers import write_dicom_series, write_nifti


def make_affine(spacing, angles_deg=(0.0, 0.0, 0.0), flips=(1, 1, 1), origin=(-50.0, 20.0, -30.0)):
    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_euler("xyz", angles_deg, degrees=True).as_matrix() @ np.diag(
        np.multiply(spacing, flips)
    )
    affine[:3, 3] = origin
    return affine


AFFINES = {
    "ras": make_affine((2.0, 2.0, 2.0)),
    "anisotropic_las": make_affine((0.9, 1.1, 2.5), flips=(-1, 1, 1)),
    "oblique_flipped": make_affine((0.8, 1.2, 3.0), angles_deg=(10.0, -5.0, 20.0), flips=(1, -1, 1)),
}


@pytest.fixture
def volume() -> np.ndarray:
    """int16 volume with distinct sizes per axis, so a transposition cannot go unnoticed."""
    return np.random.default_rng(0).integers(-1000, 3000, (12, 10, 7)).astype(np.int16)


def series(folder) -> list:
    return [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]


def test_nifti_keeps_dtype_values_and_affine(tmp_path, volume):
    affine = AFFINES["oblique_flipped"]
    path = write_nifti(tmp_path / "a" / "x.nii.gz", volume, affine)
    img = nib.load(path)
    assert img.get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asarray(img.dataobj), volume)
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)
    assert int(img.header["sform_code"]) == int(img.header["qform_code"]) == 1
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["x.nii.gz"]  # no temporary left behind


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_series_matches_nifti_with_simpleitk(tmp_path, volume, name):
    affine = AFFINES[name]
    nifti = write_nifti(tmp_path / "x.nii.gz", volume, affine)
    folder = write_dicom_series(tmp_path / "dicom", volume, affine, case_id="s0_0000")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    dcm = sitk.DICOMOrient(reader.Execute(), "LPS")
    ref = sitk.DICOMOrient(sitk.ReadImage(str(nifti)), "LPS")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(dcm), sitk.GetArrayFromImage(ref))
    np.testing.assert_allclose(dcm.GetOrigin(), ref.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(dcm.GetSpacing(), ref.GetSpacing(), atol=1e-3)
    np.testing.assert_allclose(dcm.GetDirection(), ref.GetDirection(), atol=1e-5)


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_series_matches_nifti_with_monai(tmp_path, volume, name):
    from monai.transforms import LoadImage, Orientation

    affine = AFFINES[name]
    nifti = write_nifti(tmp_path / "x.nii.gz", volume, affine)
    folder = write_dicom_series(tmp_path / "dicom", volume, affine, case_id="s0_0000")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        orient = Orientation("RAS")
        dcm = orient(LoadImage(reader="PydicomReader", ensure_channel_first=True)(str(folder)))
        ref = orient(LoadImage(reader="NibabelReader", ensure_channel_first=True)(str(nifti)))
    np.testing.assert_array_equal(np.asarray(dcm), np.asarray(ref))
    np.testing.assert_allclose(np.asarray(dcm.affine), np.asarray(ref.affine), atol=1e-3)


def test_series_attributes(tmp_path, volume):
    folder = write_dicom_series(
        tmp_path / "dicom", volume, AFFINES["ras"], case_id="s7_0003", description="synthetic T2"
    )
    slices = series(folder)
    assert len(slices) == volume.shape[2]
    first = slices[0]
    assert first.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert first.SOPClassUID == pydicom.uid.MRImageStorage and first.Modality == "MR"
    assert str(first.PatientName) == "SYNTH^s7_0003" and first.PatientID == "s7_0003"
    assert (first.BitsAllocated, first.BitsStored, first.PixelRepresentation) == (16, 16, 1)
    assert (first.Rows, first.Columns) == (volume.shape[1], volume.shape[0])
    assert (float(first.RescaleSlope), float(first.RescaleIntercept)) == (1.0, 0.0)
    assert first.SeriesDescription == "synthetic T2"
    for name in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        assert len({getattr(s, name) for s in slices}) == 1
        assert pydicom.uid.UID(getattr(first, name)).is_valid
    assert len({s.SOPInstanceUID for s in slices}) == len(slices)
    assert all(s.SOPInstanceUID == s.file_meta.MediaStorageSOPInstanceUID for s in slices)
    assert [s.InstanceNumber for s in slices] == list(range(1, len(slices) + 1))
    z = [float(s.ImagePositionPatient[2]) for s in slices]
    np.testing.assert_allclose(np.diff(z), 2.0)
    assert float(first.SliceThickness) == float(first.SpacingBetweenSlices) == 2.0
    # RAS in-plane axes are flipped to run toward the patient's left and posterior
    np.testing.assert_allclose([float(v) for v in first.ImageOrientationPatient], [1, 0, 0, 0, 1, 0])
    np.testing.assert_array_equal(first.pixel_array, volume[::-1, ::-1, 0].T)


def test_series_uids_are_deterministic_per_case(tmp_path, volume):
    a = series(write_dicom_series(tmp_path / "a", volume, AFFINES["ras"], case_id="s1_0000"))
    b = series(write_dicom_series(tmp_path / "b", volume, AFFINES["ras"], case_id="s1_0000"))
    c = series(write_dicom_series(tmp_path / "c", volume, AFFINES["ras"], case_id="s2_0000"))
    assert [s.SOPInstanceUID for s in a] == [s.SOPInstanceUID for s in b]
    assert a[0].StudyInstanceUID == b[0].StudyInstanceUID != c[0].StudyInstanceUID
    assert not {s.SOPInstanceUID for s in a} & {s.SOPInstanceUID for s in c}


def test_series_folder_is_replaced_whole(tmp_path, volume):
    folder = tmp_path / "dicom"
    folder.mkdir()
    (folder / "stale.dcm").write_text("old")
    write_dicom_series(folder, volume, AFFINES["ras"], case_id="s0_0000")
    assert sorted(p.name for p in folder.iterdir()) == [f"{k:04d}.dcm" for k in range(1, volume.shape[2] + 1)]
    assert [p.name for p in tmp_path.iterdir()] == ["dicom"]


def test_series_rejects_what_dicom_cannot_hold(tmp_path, volume):
    sheared = AFFINES["ras"].copy()
    sheared[0, 1] = 0.5
    with pytest.raises(ValueError, match="orthogonal"):
        write_dicom_series(tmp_path / "d", volume, sheared, case_id="x")
    with pytest.raises(ValueError, match="int16"):
        write_dicom_series(tmp_path / "d", volume.astype(np.float32), AFFINES["ras"], case_id="x")
    assert not (tmp_path / "d").exists()
