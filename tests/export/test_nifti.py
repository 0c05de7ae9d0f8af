"""Saliency NIfTI on the input file's grid: geometry, values, header, what ITK reads."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
from monai.data import MetaTensor

from c2f_med.export.nifti import DESCRIPTION, save_on_original_grid
from c2f_med.io.transforms import LoadScan, to_original_grid


def scaled(reference: MetaTensor) -> MetaTensor:
    """The loaded scan scaled to [0, 1]: a saliency whose value at a voxel is known on any grid."""
    return (reference - reference.min()) / (reference.max() - reference.min())


def test_nifti_input_gets_its_own_oblique_grid_back(oblique_nifti, tmp_path):
    source = nib.load(oblique_nifti)
    reference = LoadScan()(oblique_nifti)
    assert not np.allclose(reference.affine.numpy(), source.affine)  # the loaded grid is re-oriented
    out = save_on_original_grid(scaled(reference), reference, tmp_path / "out" / "saliency.nii.gz")

    saved = nib.load(out)
    assert saved.get_data_dtype() == np.float32
    assert saved.shape == source.shape
    np.testing.assert_allclose(saved.affine, source.affine, atol=1e-5)
    data = saved.get_fdata(dtype=np.float32)
    np.testing.assert_array_equal(data, to_original_grid(scaled(reference), reference)[0])
    voxels = source.get_fdata()
    np.testing.assert_allclose(data, (voxels - voxels.min()) / (voxels.max() - voxels.min()), atol=1e-6)
    assert sorted(p.name for p in out.parent.iterdir()) == ["saliency.nii.gz"]  # no temporary left


def test_dicom_series_input_gets_the_dicom_grid(dicom_series, tmp_path):
    reference = LoadScan()(dicom_series.folder)
    out = save_on_original_grid(scaled(reference), reference, tmp_path / "saliency.nii.gz")

    saved = nib.load(out)
    assert saved.get_data_dtype() == np.float32
    np.testing.assert_allclose(saved.affine, dicom_series.affine, atol=1e-4)
    voxels = dicom_series.voxels.astype(np.float64)
    expected = (voxels - voxels.min()) / (voxels.max() - voxels.min())
    np.testing.assert_allclose(saved.get_fdata(), expected, atol=1e-6)


def test_header_marks_a_saliency_map_with_both_transforms_set(oblique_nifti, tmp_path):
    reference = LoadScan()(oblique_nifti)
    saliency = MetaTensor(torch.rand(reference.shape, generator=torch.Generator().manual_seed(0)))
    header = nib.load(save_on_original_grid(saliency, reference, tmp_path / "s.nii.gz")).header
    assert int(header["qform_code"]) == int(header["sform_code"]) == 1
    np.testing.assert_allclose(header.get_qform(), header.get_sform(), atol=1e-5)
    assert header.get_intent() == ("estimate", (), DESCRIPTION)
    assert header["descrip"].item().decode() == DESCRIPTION
    assert (float(header["cal_min"]), float(header["cal_max"])) == (0.0, 1.0)
    assert header.get_xyzt_units()[0] == "mm"


def test_itk_reads_the_same_voxel_positions(oblique_nifti, tmp_path):
    """SimpleITK (the reader of 3D Slicer and ITK-SNAP) places every voxel where nibabel does."""
    reference = LoadScan()(oblique_nifti)
    out = save_on_original_grid(scaled(reference), reference, tmp_path / "s.nii.gz")
    affine = nib.load(out).affine
    image = sitk.ReadImage(str(out))
    assert image.GetSize() == nib.load(out).shape
    for index in [(0, 0, 0), (6, 0, 0), (0, 5, 0), (0, 0, 4), (6, 5, 4)]:
        ras = affine @ np.array([*index, 1.0])
        lps = np.asarray(image.TransformIndexToPhysicalPoint(index))
        np.testing.assert_allclose(lps, ras[:3] * [-1, -1, 1], atol=1e-4)
    np.testing.assert_allclose(sitk.GetArrayFromImage(image).T, nib.load(out).get_fdata(), atol=0)
