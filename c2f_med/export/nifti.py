"""Saliency volumes as NIfTI files on the input file's own voxel grid.

The saliency is computed on the loaded scan (RAS-oriented, perhaps resampled); the NIfTI written
here is on the grid of the file the scan was read from (for a DICOM series or file: the DICOM's
grid, with MONAI's reader axes column, row, slice), so it overlays the original scan voxel for
voxel in any viewer.

Header: float32 data without scaling, qform and sform both set to the same affine with code 1
("scanner anat": coordinates of the scanner, as the source's were). ITK (3D Slicer, ITK-SNAP) and
nibabel read the same geometry from either field. ``intent_code`` 1001 (NIFTI_INTENT_ESTIMATE,
"parameter estimate"), ``intent_name`` and ``descrip`` "c2f_med saliency", ``cal_min`` 0 and
``cal_max`` 1 (the display range), spatial units mm.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.data import MetaTensor
from monai.utils import MetaKeys
from numpy.typing import NDArray

from c2f_med.atomic import atomic_path
from c2f_med.io.transforms import to_original_grid

__all__ = ["DESCRIPTION", "saliency_image", "save_nifti", "save_on_original_grid"]

#: ``intent_name`` (at most 16 characters) and ``descrip`` of every saliency file.
DESCRIPTION = "c2f_med saliency"


def saliency_image(saliency: NDArray[np.floating], affine: NDArray[np.floating]) -> nib.Nifti1Image:
    """A float32 NIfTI image of ``saliency`` (``X x Y x Z``) with ``affine`` (voxel to RAS mm).

    qform and sform are both ``affine`` with code 1 (scanner); see the module docstring.
    """
    array = np.asarray(saliency, dtype=np.float32)
    if array.ndim != 3:
        raise ValueError(f"saliency must be X x Y x Z, got shape {array.shape}")
    affine = np.asarray(affine, dtype=np.float64)
    image = nib.Nifti1Image(array, affine)
    header = image.header
    header.set_data_dtype(np.float32)
    header.set_slope_inter(1.0, 0.0)
    image.set_qform(affine, code="scanner")
    image.set_sform(affine, code="scanner")
    header.set_xyzt_units("mm")
    header.set_intent("estimate", name=DESCRIPTION)
    header["descrip"] = DESCRIPTION
    header["cal_min"], header["cal_max"] = 0.0, 1.0
    return image


def save_nifti(saliency: NDArray[np.floating], affine: NDArray[np.floating], path: str | os.PathLike) -> Path:
    """Write :func:`saliency_image` to ``path`` (``.nii`` or ``.nii.gz``) atomically; returns ``path``."""
    image = saliency_image(saliency, affine)
    with atomic_path(path) as tmp:
        nib.save(image, tmp)
    return Path(path)


def save_on_original_grid(saliency: MetaTensor, reference: MetaTensor, path: str | os.PathLike) -> Path:
    """Save a saliency map computed on the loaded scan as NIfTI on the input file's own grid.

    Args:
        saliency: ``1 x X x Y x Z`` (or ``X x Y x Z``) on the grid of ``reference``.
        reference: the loaded scan (:class:`~c2f_med.io.transforms.LoadScan` or
            :func:`~c2f_med.io.transforms.load_case_transforms`); its ``original_affine`` and
            ``spatial_shape`` metadata describe the file's grid.
        path: output ``.nii.gz`` (or ``.nii``), written atomically.

    Returns:
        ``path``: float32 ``X0 x Y0 x Z0`` with the file's affine (see the module docstring).
    """
    array = to_original_grid(saliency, reference)  # [1 x] X0 x Y0 x Z0
    if array.ndim == 4:
        if array.shape[0] != 1:
            raise ValueError(f"saliency must have one channel, got shape {tuple(saliency.shape)}")
        array = array[0]
    affine = np.asarray(reference.meta[MetaKeys.ORIGINAL_AFFINE], dtype=np.float64)
    return save_nifti(array, affine, path)
