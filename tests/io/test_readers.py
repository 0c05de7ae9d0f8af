"""Readers: SimpleITK vs nibabel, ITK formats' geometry, reader dispatch, DICOM series on the fly."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from monai.data import NibabelReader
from monai.transforms import LoadImage
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MediaStorageDirectoryStorage, generate_uid

from c2f_med.errors import InputError
from c2f_med.io.readers import DicomReader, SimpleITKReader, find_dicom_series, scan_kind

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
# an oblique in-plane direction with exact decimals: row (0.6, 0.8, 0), column (0, 0, -1)
ROW, COL = np.array([0.6, 0.8, 0.0]), np.array([0.0, 0.0, -1.0])


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    """3 x 3 rotation from angles (radians) about x, y and z."""
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def sitk_volume(seed: int = 0, shape_xyz=(5, 6, 7)) -> sitk.Image:
    """Random float32 volume with oblique direction, anisotropic spacing and an offset origin."""
    data = np.random.default_rng(seed).normal(size=shape_xyz[::-1]).astype(np.float32)  # (z, y, x)
    image = sitk.GetImageFromArray(data)
    image.SetSpacing((1.5, 2.0, 3.0))
    image.SetOrigin((10.0, -20.0, 5.0))
    image.SetDirection(tuple(rotation(0.2, -0.3, 0.5).ravel()))
    return image


def write_series(
    folder: Path,
    uid: str,
    slices: int = 4,
    rows: int = 6,
    cols: int = 5,
    spacing=(0.8, 0.6),
    gap: float = 2.5,
    origin=(10.5, -20.25, 30.0),
    description: str = "AX T1",
    seed: int = 0,
) -> np.ndarray:
    """Write a CT series (one file per slice, names shuffled against InstanceNumber) with pydicom.

    Returns the stored values in HU, shape (slices, rows, cols) in InstanceNumber order.
    The slice k lies at origin + k * gap * normal, normal = ROW x COL.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 2000, size=(slices, rows, cols)).astype(np.int16)
    normal = np.cross(ROW, COL)
    names = rng.permutation(slices)
    for k in range(slices):
        sop = generate_uid(entropy_srcs=[uid, str(k)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.StudyInstanceUID = generate_uid(entropy_srcs=["study"])
        ds.SeriesInstanceUID = uid
        ds.PatientName, ds.PatientID = "Doe^Jane", "PID-31337"
        ds.Modality, ds.SeriesDescription = "CT", description
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin) + k * gap * normal]
        ds.ImageOrientationPatient = [float(v) for v in (*ROW, *COL)]
        ds.PixelSpacing = list(spacing)
        ds.SliceThickness = gap
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = raw[k].tobytes()
        ds.save_as(folder / f"img_{uid[-6:]}_{names[k]:03d}.dcm", enforce_file_format=True)
    return raw.astype(np.float32) - 1024


def expected_series_affine(spacing=(0.8, 0.6), gap: float = 2.5, origin=(10.5, -20.25, 30.0)) -> np.ndarray:
    """RAS affine of the array indexed (column i, row j, slice k), written out from the DICOM definition."""
    dr, dc = spacing  # PixelSpacing: between rows, between columns
    lps = np.eye(4)
    lps[:3, 0] = ROW * dc  # i walks along a row
    lps[:3, 1] = COL * dr  # j walks down a column
    lps[:3, 2] = np.cross(ROW, COL) * gap
    lps[:3, 3] = origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def test_simpleitk_and_nibabel_agree_on_a_nifti_written_by_simpleitk(tmp_path):
    path = tmp_path / "sitk.nii.gz"
    sitk.WriteImage(sitk_volume(), os.fspath(path))
    sitk_data, sitk_meta = SimpleITKReader().get_data(SimpleITKReader().read(path))
    nib_reader = NibabelReader()
    nib_data, nib_meta = nib_reader.get_data(nib_reader.read(path))
    np.testing.assert_array_equal(sitk_data, nib_data)
    np.testing.assert_allclose(sitk_meta["affine"], nib_meta["affine"], atol=1e-4)
    np.testing.assert_array_equal(sitk_meta["spatial_shape"], nib_meta["spatial_shape"])
    assert sitk_meta["space"] == nib_meta["space"] == "RAS"


def test_simpleitk_and_nibabel_agree_on_a_nifti_written_by_nibabel(tmp_path):
    path = tmp_path / "nib.nii"
    affine = np.eye(4)
    affine[:3, :3] = rotation(-0.4, 0.1, 0.25) @ np.diag([0.9, 1.1, 2.5])
    affine[:3, 3] = (-30.0, 12.5, 7.0)
    data = np.random.default_rng(1).normal(size=(4, 6, 5)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, affine), path)
    reader = SimpleITKReader()
    sitk_data, sitk_meta = reader.get_data(reader.read(path))
    np.testing.assert_array_equal(sitk_data, data)
    np.testing.assert_allclose(sitk_meta["affine"], affine, atol=1e-4)


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_itk_formats_load_with_the_voxel_world_coordinates_of_simpleitk(tmp_path, suffix):
    image = sitk_volume(seed=2)
    path = tmp_path / f"vol{suffix}"
    sitk.WriteImage(image, os.fspath(path))
    img = LoadImage(image_only=True)(path)  # the registry must pick SimpleITKReader
    assert tuple(img.shape) == image.GetSize()
    affine = img.affine.numpy()
    for index in [(0, 0, 0), (4, 0, 0), (0, 5, 0), (0, 0, 6), (3, 2, 5), (4, 5, 6)]:
        ras = LPS_TO_RAS @ np.asarray(image.TransformIndexToPhysicalPoint(index))
        np.testing.assert_allclose(affine @ np.array([*index, 1.0]), [*ras, 1.0], atol=1e-5)
        assert float(img[index]) == pytest.approx(image.GetPixel(index))


def test_vector_image_puts_channels_last_like_itkreader(tmp_path):
    data = np.random.default_rng(3).normal(size=(4, 3, 2, 3)).astype(np.float32)  # (z, y, x, c)
    path = tmp_path / "vec.mha"
    sitk.WriteImage(sitk.GetImageFromArray(data, isVector=True), os.fspath(path))
    array, meta = SimpleITKReader().get_data(SimpleITKReader().read(path))
    assert array.shape == (2, 3, 4, 3)
    assert meta["original_channel_dim"] == -1
    np.testing.assert_array_equal(array[1, 2, 3], data[3, 2, 1])


def test_load_image_picks_the_reader_by_path(tmp_path):
    folder = tmp_path / "series"
    write_series(folder, uid=generate_uid(entropy_srcs=["a"]), slices=2)
    no_suffix = tmp_path / "slice_without_suffix"
    no_suffix.write_bytes(next(folder.iterdir()).read_bytes())
    readers = LoadImage().readers[::-1]  # LoadImage tries the last registered first

    def picked(path) -> str:
        return next(type(r).__name__ for r in readers if r.verify_suffix(os.fspath(path)))

    assert picked(tmp_path / "a.nii.gz") == picked(tmp_path / "a.nii") == "NibabelReader"
    for suffix in ("mha", "mhd", "nrrd", "nhdr", "MHA"):
        assert picked(tmp_path / f"a.{suffix}") == "SimpleITKReader"
    assert picked(folder) == picked(tmp_path / "x.dcm") == picked(no_suffix) == "DicomReader"


def test_scan_kind(tmp_path):
    folder = tmp_path / "series"
    write_series(folder, uid=generate_uid(entropy_srcs=["k"]), slices=2)
    magic = tmp_path / "IM0001"
    magic.write_bytes(next(folder.iterdir()).read_bytes())
    (tmp_path / "scan.nii.gz").touch()
    (tmp_path / "scan.nrrd").touch()
    (tmp_path / "notes.txt").write_text("hello")
    assert scan_kind(folder) == "dicom_series"
    (tmp_path / "x.dcm").touch()
    assert scan_kind(magic) == scan_kind(tmp_path / "x.dcm") == "dicom_file"
    assert scan_kind(tmp_path / "scan.nii.gz") == "nifti"
    assert scan_kind(tmp_path / "scan.nrrd") == "itk"
    with pytest.raises(InputError, match="unsupported file type"):
        scan_kind(tmp_path / "notes.txt")
    with pytest.raises(InputError, match="no such file"):
        scan_kind(tmp_path / "missing.nii.gz")


def test_dicom_series_loads_with_the_affine_of_its_geometry(tmp_path):
    folder = tmp_path / "series"
    hu = write_series(folder, uid=generate_uid(entropy_srcs=["geometry"]))
    img = LoadImage(image_only=True)(folder)
    assert tuple(img.shape) == (5, 6, 4)  # (columns, rows, slices)
    np.testing.assert_allclose(img.affine.numpy(), expected_series_affine(), atol=1e-6)
    # voxel (i, j, k) is column i of row j of the k-th slice by InstanceNumber
    np.testing.assert_array_equal(img.numpy(), hu.transpose(2, 1, 0))
    assert img.meta["00080060"]["Value"] == ["CT"]


def write_dicomdir(path: Path) -> None:
    """A minimal file with the DICOMDIR SOP class (a media storage directory, not an image)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MediaStorageDirectoryStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["dicomdir"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.FileSetID = "C2F"
    ds.save_as(path, enforce_file_format=True)


def test_a_dicomdir_beside_the_series_is_ignored(tmp_path):
    folder = tmp_path / "cd"
    hu = write_series(folder, uid=generate_uid(entropy_srcs=["cd"]), slices=3)
    write_dicomdir(folder / "DICOMDIR")
    np.testing.assert_array_equal(LoadImage(image_only=True)(folder).numpy(), hu.transpose(2, 1, 0))
    only = tmp_path / "only"
    only.mkdir()
    write_dicomdir(only / "DICOMDIR")
    with pytest.raises(InputError, match="only a DICOMDIR"):
        find_dicom_series(only)


def test_two_series_in_a_folder_are_listed_without_patient_identifiers(tmp_path):
    folder = tmp_path / "mixed"
    uid_a, uid_b = generate_uid(entropy_srcs=["A"]), generate_uid(entropy_srcs=["B"])
    write_series(folder, uid=uid_a, slices=4, description="AX T1")
    write_series(folder, uid=uid_b, slices=3, rows=4, description="COR T2", seed=1)
    assert [(s.uid, len(s.files)) for s in find_dicom_series(folder)] == sorted([(uid_a, 4), (uid_b, 3)])
    with pytest.raises(InputError) as err:
        LoadImage(image_only=True)(folder)
    message = str(err.value)
    assert message.startswith(f"{folder}: 2 DICOM series found")
    assert f"{uid_a} (4 files, 'AX T1')" in message and f"{uid_b} (3 files, 'COR T2')" in message
    assert "Doe" not in message and "PID-31337" not in message and "\n" not in message


def test_series_uid_chooses_one_series(tmp_path):
    folder = tmp_path / "mixed"
    uid_a, uid_b = generate_uid(entropy_srcs=["A"]), generate_uid(entropy_srcs=["B"])
    write_series(folder, uid=uid_a, slices=4)
    hu_b = write_series(folder, uid=uid_b, slices=3, rows=4, seed=1)
    img = LoadImage(image_only=True)(folder, reader=DicomReader(series_uid=uid_b))
    np.testing.assert_array_equal(img.numpy(), hu_b.transpose(2, 1, 0))
    with pytest.raises(InputError, match="no DICOM series with UID 1.2.3"):
        LoadImage(image_only=True)(folder, reader=DicomReader(series_uid="1.2.3"))


def test_unevenly_spaced_series_is_refused(tmp_path):
    folder = tmp_path / "gap"
    uid = generate_uid(entropy_srcs=["gap"])
    write_series(folder, uid=uid, slices=4)
    second = next(f for f in folder.iterdir() if pydicom.dcmread(f).InstanceNumber == 2)
    second.unlink()
    with pytest.raises(InputError, match="not evenly spaced"):
        LoadImage(image_only=True)(folder)


def test_single_slice_gets_the_slice_normal_as_third_axis(tmp_path):
    folder = tmp_path / "one"
    write_series(folder, uid=generate_uid(entropy_srcs=["one"]), slices=1)
    img = LoadImage(image_only=True)(next(folder.iterdir()))
    np.testing.assert_allclose(img.affine.numpy(), expected_series_affine(), atol=1e-6)
