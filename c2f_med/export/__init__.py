"""Outputs of an explained scan: saliency NIfTI on the input's grid, PNG montages, DICOM Parametric Maps.

- :mod:`~c2f_med.export.nifti`: :func:`save_on_original_grid` (float32 NIfTI, the file's own affine).
- :mod:`~c2f_med.export.overlays`: :func:`overlay_montage` (scan, saliency heat map, lesion contour).
- :mod:`~c2f_med.export.dicom`: :func:`save_parametric_map` (highdicom Parametric Map referencing
  the source DICOM series).

Every file is written atomically (:mod:`c2f_med.atomic`).
"""

from c2f_med.export.dicom import save_parametric_map
from c2f_med.export.nifti import save_nifti, save_on_original_grid
from c2f_med.export.overlays import montage_slices, overlay_montage

__all__ = ["montage_slices", "overlay_montage", "save_nifti", "save_on_original_grid", "save_parametric_map"]
