"""Scan I/O on MONAI: readers (nibabel, pydicom, SimpleITK), loading transforms, intensity presets, datalists.

Importing this package registers :class:`~c2f_med.io.readers.DicomReader` and
:class:`~c2f_med.io.readers.SimpleITKReader` with MONAI's ``LoadImage``.
"""

from c2f_med.io.manifest import case_id, read_datalist, write_datalist
from c2f_med.io.readers import DicomReader, SimpleITKReader, find_dicom_series, scan_kind
from c2f_med.io.transforms import (
    CT_WINDOWS,
    BinarizeMask,
    BinarizeMaskd,
    CheckSameGridd,
    CTWindow,
    CTWindowd,
    IntensityPreset,
    IntensityPresetd,
    LoadScan,
    MRPercentileNorm,
    MRPercentileNormd,
    ReadScan,
    ReadScand,
    check_same_grid,
    load_case_transforms,
    to_original_grid,
)

__all__ = [
    "CT_WINDOWS",
    "BinarizeMask",
    "BinarizeMaskd",
    "CTWindow",
    "CTWindowd",
    "CheckSameGridd",
    "DicomReader",
    "IntensityPreset",
    "IntensityPresetd",
    "LoadScan",
    "MRPercentileNorm",
    "MRPercentileNormd",
    "ReadScan",
    "ReadScand",
    "SimpleITKReader",
    "case_id",
    "check_same_grid",
    "find_dicom_series",
    "load_case_transforms",
    "read_datalist",
    "scan_kind",
    "to_original_grid",
    "write_datalist",
]
