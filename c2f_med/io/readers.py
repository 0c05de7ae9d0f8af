"""Which MONAI ``ImageReader`` reads a scan path, and the two readers this project adds.

- :class:`SimpleITKReader` reads MetaImage, NRRD and other ITK formats with SimpleITK (MONAI's
  ``ITKReader`` needs the ``itk`` package, which this project does not use). Data and metadata
  follow ``ITKReader``'s convention: array indexed (x, y, z[, c]), ``affine``/``original_affine``
  in RAS, ``spatial_shape``, ``original_channel_dim``.
- :class:`DicomReader` is MONAI's ``PydicomReader`` with series selection (a folder may hold
  several series), readable errors for bad series, the Modality kept in the metadata, a
  proper slice axis for a single slice, and enhanced multi-frame images (one file holding every
  slice, :mod:`c2f_med.io.multiframe`) read as volumes with a stack choice. Compressed pixel data
  are decoded by pydicom's pixel data plugins; one no plugin decodes is refused naming its
  transfer syntax.

Importing this module registers both readers in MONAI's ``SUPPORTED_READERS``, so a plain
``LoadImage()`` picks NibabelReader for .nii/.nii.gz, DicomReader for a DICOM folder, a .dcm
file or a file with the DICM magic, and SimpleITKReader for .mha/.mhd/.nrrd/.nhdr/.gipl/.vtk.
"""

from __future__ import annotations

import glob
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from monai.config import PathLike
from monai.data import ImageReader, NibabelReader, PydicomReader
from monai.data.image_reader import _copy_compatible_dict, _stack_images, is_dicom_path
from monai.data.utils import affine_to_spacing, orientation_ras_lps
from monai.transforms.io.array import SUPPORTED_READERS
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple
from pydicom.uid import MediaStorageDirectoryStorage

from c2f_med.errors import InputError
from c2f_med.io.multiframe import MultiFrameVolume, check_decodable, is_multiframe, read_multiframe

__all__ = [
    "NIFTI_SUFFIXES",
    "ITK_SUFFIXES",
    "DICOM_SUFFIXES",
    "SimpleITKReader",
    "DicomReader",
    "DicomSeries",
    "find_dicom_series",
    "scan_kind",
    "reader_for",
]

NIFTI_SUFFIXES = ("nii", "nii.gz")
ITK_SUFFIXES = ("mha", "mhd", "nrrd", "nhdr", "gipl", "gipl.gz", "vtk")
DICOM_SUFFIXES = ("dcm",)

# DICOM tags (PydicomReader's JSON keys) kept in the metadata besides the geometry ones
MODALITY_TAG = "00080060"
SLICE_THICKNESS_TAG = "00180050"
PIXEL_SPACING_TAG = "00280030"
FRAME_OF_REFERENCE_TAG = "00200052"
# objects that are not scans (annotations, dose grids), with what they are
NOT_SCANS = {
    "1.2.840.10008.5.1.4.1.1.66.4": "a DICOM SEG (a segmentation): give it as the lesion mask",
    "1.2.840.10008.5.1.4.1.1.481.3": "an RT Structure Set (contours): give it as the lesion mask",
    "1.2.840.10008.5.1.4.1.1.481.2": "an RT Dose grid, not a scan",
}


def _has_suffix(path: PathLike, suffixes: Sequence[str]) -> bool:
    name = Path(path).name.lower()
    return any(name.endswith(f".{s}") for s in suffixes)


class SimpleITKReader(ImageReader):
    """Load ITK-supported images (MHA/MHD, NRRD, GIPL, VTK, ...) with SimpleITK.

    The returned array is indexed (x, y, z) for a scalar volume and (x, y, z, c) for a vector
    image, as MONAI's ``ITKReader`` with ``reverse_indexing=False``. ITK stores geometry in LPS;
    with ``affine_lps_to_ras`` the affine is converted to RAS like ``NibabelReader``'s, so
    ``Orientation`` and ``Spacing`` treat every reader's output the same way.

    Args:
        channel_dim: the channel axis of the data, written to ``original_channel_dim``; None means
            "no channel" for scalar images and -1 (last) for vector or 4D images.
        affine_lps_to_ras: convert ITK's LPS geometry to a RAS affine (MONAI's default convention).
        kwargs: passed to ``SimpleITK.ReadImage`` (e.g. ``outputPixelType``).
    """

    def __init__(self, channel_dim: int | None = None, affine_lps_to_ras: bool = True, **kwargs):
        super().__init__()
        self.channel_dim = channel_dim
        self.affine_lps_to_ras = affine_lps_to_ras
        self.kwargs = kwargs

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        """True when every file name ends with one of :data:`ITK_SUFFIXES`."""
        return all(_has_suffix(name, ITK_SUFFIXES) for name in ensure_tuple(filename))

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs) -> sitk.Image | list[sitk.Image]:
        """Read one image, or a list of images that ``get_data`` stacks as channels."""
        kwargs_ = {**self.kwargs, **kwargs}
        images = [sitk.ReadImage(os.fspath(name), **kwargs_) for name in ensure_tuple(data)]
        return images if len(images) > 1 else images[0]

    def get_data(self, img: sitk.Image | Sequence[sitk.Image]) -> tuple[np.ndarray, dict]:
        """Return the voxel array (x, y, z[, c]) and the metadata (affine in RAS, spatial_shape, ...)."""
        arrays: list[np.ndarray] = []
        compatible_meta: dict = {}
        for image in img if isinstance(img, Sequence) else [img]:  # an Image is iterable (its pixels)
            data = self._get_array_data(image)
            header = self._get_meta_dict(image)
            header[MetaKeys.ORIGINAL_AFFINE] = self._get_affine(image)
            header[MetaKeys.SPACE] = SpaceKeys.RAS if self.affine_lps_to_ras else SpaceKeys.LPS
            header[MetaKeys.AFFINE] = header[MetaKeys.ORIGINAL_AFFINE].copy()
            header[MetaKeys.SPATIAL_SHAPE] = np.asarray(image.GetSize()[: min(image.GetDimension(), 3)])
            if self.channel_dim is None:
                no_channel = data.ndim == len(header[MetaKeys.SPATIAL_SHAPE])
                header[MetaKeys.ORIGINAL_CHANNEL_DIM] = float("nan") if no_channel else -1
            else:
                header[MetaKeys.ORIGINAL_CHANNEL_DIM] = self.channel_dim
            arrays.append(data)
            _copy_compatible_dict(header, compatible_meta)
        return _stack_images(arrays, compatible_meta), compatible_meta

    @staticmethod
    def _get_array_data(image: sitk.Image) -> np.ndarray:
        array = sitk.GetArrayFromImage(image)  # (z, y, x) or (z, y, x, c): ITK's reversed indexing
        if image.GetNumberOfComponentsPerPixel() == 1:
            return array.T
        return np.moveaxis(array.T, 0, -1)

    @staticmethod
    def _get_meta_dict(image: sitk.Image) -> dict:
        meta = {key: image.GetMetaData(key) for key in image.GetMetaDataKeys() if not key.startswith("ITK_")}
        meta["spacing"] = np.asarray(image.GetSpacing())
        return meta

    def _get_affine(self, image: sitk.Image) -> np.ndarray:
        """4 x 4 (3 x 3 for 2D) affine from ITK's direction, spacing and origin (spatial axes <= 3)."""
        dim = image.GetDimension()
        sr = min(dim, 3)
        direction = np.asarray(image.GetDirection()).reshape(dim, dim)
        affine = np.eye(sr + 1)
        affine[:sr, :sr] = direction[:sr, :sr] @ np.diag(image.GetSpacing()[:sr])
        affine[:sr, -1] = image.GetOrigin()[:sr]
        return orientation_ras_lps(affine) if self.affine_lps_to_ras else affine


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM series in a folder: its SeriesInstanceUID, files and SeriesDescription."""

    uid: str
    files: tuple[str, ...]
    description: str

    def summary(self) -> str:
        """``uid (N files, 'description')``: no patient identifiers."""
        files = f"{len(self.files)} file{'s' if len(self.files) > 1 else ''}"
        return f"{self.uid or '<no SeriesInstanceUID>'} ({files}, {self.description!r})"


def find_dicom_series(folder: PathLike) -> list[DicomSeries]:
    """Group the DICOM files directly inside ``folder`` by SeriesInstanceUID (sorted by UID).

    Files are recognised by the DICM magic (``pydicom.misc.is_dicom``); other files and a DICOMDIR
    (media storage directory) are ignored.

    Raises:
        InputError: the folder is empty, has no DICOM file, or a DICOM header cannot be read.
    """
    names = sorted(f for f in glob.glob(os.path.join(os.fspath(folder), "*")) if os.path.isfile(f))
    if not names:
        raise InputError(folder, "empty folder (no files to read)")
    files = [f for f in names if pydicom.misc.is_dicom(f)]
    if not files:
        raise InputError(folder, f"no DICOM file in this folder (non-DICOM files: {len(names)})")
    groups: dict[str, list[str]] = {}
    descriptions: dict[str, str] = {}
    tags = ["SeriesInstanceUID", "SeriesDescription"]
    for name in files:
        try:
            ds = pydicom.dcmread(name, stop_before_pixels=True, specific_tags=tags)
        except Exception as err:  # pydicom raises many types for a corrupt header
            raise InputError(name, f"corrupt DICOM header: {one_line(err)}") from err
        if ds.file_meta.get("MediaStorageSOPClassUID") == MediaStorageDirectoryStorage:
            continue
        uid = str(ds.get("SeriesInstanceUID", ""))
        groups.setdefault(uid, []).append(name)
        descriptions.setdefault(uid, str(ds.get("SeriesDescription", "")))
    if not groups:
        raise InputError(folder, "no DICOM image in this folder, only a DICOMDIR (give the folder of one series)")
    return [DicomSeries(uid, tuple(groups[uid]), descriptions[uid]) for uid in sorted(groups)]


class DicomReader(PydicomReader):
    """MONAI's ``PydicomReader`` for a DICOM folder holding one or several series, or one DICOM file.

    A folder is read as one series: the only one it holds, or the one named by ``series_uid``.
    The series' slices must carry InstanceNumber, ImagePositionPatient and
    ImageOrientationPatient and be evenly spaced along the slice normal (PydicomReader orders
    them by InstanceNumber and derives the slice axis from the first and last positions).
    A single slice gets the slice normal times SliceThickness as its third affine column
    (PydicomReader puts (0, 0, 1) there whatever the orientation). The Modality tag is kept in
    the metadata (key ``"00080060"``) next to the geometry tags.

    A multi-frame image (a file, or a folder whose series is one file) is read by
    :func:`~c2f_med.io.multiframe.read_multiframe`: frames sorted along the slice normal, each through
    its own rescale, into the same ``X x Y x Z`` (column, row, slice) layout and RAS affine as a series;
    ``stack`` picks one of several stacks. The metadata then hold ``"stack"`` (which frames were read).

    Args:
        series_uid: SeriesInstanceUID to read from a folder with several series.
        stack: 1-based stack number for a multi-frame image holding several stacks.
        kwargs: passed to ``PydicomReader`` (``swap_ij``, ``affine_lps_to_ras``, ...).

    Raises (from ``read``):
        InputError: several series and no (or an unknown) ``series_uid``, a corrupt header, slices
            without position tags, uneven slice spacing, a multi-frame image whose frames do not make
            one volume (or several stacks and no ``stack``), pixel data no installed plugin decodes.
    """

    def __init__(self, series_uid: str | None = None, stack: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.series_uid = series_uid
        self.stack = stack

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        """True for a folder, a ``.dcm`` file or a file that starts with the DICM magic."""
        return is_dicom_path(filename)

    def series_files(self, folder: PathLike) -> tuple[str, ...]:
        """The files of the series to read from ``folder``."""
        series = find_dicom_series(folder)
        if self.series_uid is not None:
            chosen = [s for s in series if s.uid == self.series_uid]
            if not chosen:
                found = "; ".join(s.summary() for s in series)
                raise InputError(folder, f"no DICOM series with UID {self.series_uid}; found: {found}")
            return chosen[0].files
        if len(series) > 1:
            found = "; ".join(s.summary() for s in series)
            raise InputError(folder, f"{len(series)} DICOM series found, choose one by series UID: {found}")
        return series[0].files

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs):
        """Read a folder as one series (a list of datasets), a file as one dataset; lists as ``PydicomReader``."""
        names = ensure_tuple(data)
        if len(names) != 1:
            return super().read(data, **kwargs)
        if not Path(names[0]).is_dir():
            return self._read_file(names[0], **kwargs)
        files = self.series_files(names[0])
        kwargs_ = {**self.kwargs, **kwargs}
        if len(files) == 1:
            return self._read_file(files[0], **kwargs)
        slices = [pydicom.dcmread(f, **kwargs_) for f in files]
        for name, ds in zip(files, slices):
            _check_single_frame(name, ds)
            _check_greyscale(name, ds)
            check_decodable(name, ds)
        _check_slice_positions(names[0], files, slices)
        self.has_series, self.filenames = True, [list(files)]  # the layout PydicomReader.get_data expects
        return slices

    def _read_file(self, name: PathLike, **kwargs):
        """One file: a multi-frame image as a :class:`MultiFrameVolume`, else one dataset."""
        kwargs_ = {**self.kwargs, **kwargs}
        ds = pydicom.dcmread(name, **kwargs_)
        if str(ds.get("SOPClassUID", "")) in NOT_SCANS:
            raise InputError(name, f"this is {NOT_SCANS[str(ds.SOPClassUID)]}")
        if is_multiframe(ds):
            return read_multiframe(name, self.stack)
        _check_greyscale(name, ds)
        check_decodable(name, ds)
        self.has_series, self.filenames = False, [os.fspath(name)]
        return ds

    def get_data(self, data) -> tuple[np.ndarray, dict]:
        """``PydicomReader.get_data``, and for a multi-frame volume its frames as ``X x Y x Z`` (column, row,
        slice) with the RAS (or LPS) affine of that layout."""
        if not isinstance(data, MultiFrameVolume):
            try:
                return super().get_data(data)
            except Exception as err:  # a pixel data plugin failing on this file's encoding
                first = data[0] if isinstance(data, list) else data
                name = self.filenames[0][0] if isinstance(self.filenames[0], list) else self.filenames[0]
                syntax = first.file_meta.get("TransferSyntaxUID") if hasattr(first, "file_meta") else None
                if syntax is None or not syntax.is_compressed:
                    raise  # not a decoder's failure: a corrupt or truncated file
                label = syntax.name
                reason = one_line(err).rstrip(":")
                raise InputError(name, f"cannot decode pixel data encoded as {label}: {reason}") from err
        array = np.ascontiguousarray(data.array.transpose(2, 1, 0))  # (slice, row, col) -> (col, row, slice)
        affine = data.affine[:, [2, 1, 0, 3]]
        if self.affine_lps_to_ras:
            affine = orientation_ras_lps(affine)
        meta = {
            MetaKeys.ORIGINAL_AFFINE: affine,
            MetaKeys.AFFINE: affine.copy(),
            MetaKeys.SPATIAL_SHAPE: np.asarray(array.shape),
            MetaKeys.SPACE: SpaceKeys.RAS if self.affine_lps_to_ras else SpaceKeys.LPS,
            MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan"),
            "stack": data.stack.summary(),
            "stack_number": data.stack.number,
        }
        meta["spacing"] = affine_to_spacing(affine, r=3)
        for tag in (MODALITY_TAG, FRAME_OF_REFERENCE_TAG):
            if int(tag, 16) in data.dataset:
                meta[tag] = data.dataset[int(tag, 16)].to_json_dict(None, 0)
        return array, meta

    def _get_meta_dict(self, img) -> dict:
        meta = super()._get_meta_dict(img)
        for tag in (MODALITY_TAG, SLICE_THICKNESS_TAG, FRAME_OF_REFERENCE_TAG):
            if tag not in meta and int(tag, 16) in img:
                meta[tag] = img[int(tag, 16)].to_json_dict(None, 0)
        return meta

    def _get_affine(self, metadata: dict, lps_to_ras: bool = True) -> np.ndarray:
        with warnings.catch_warnings():  # no position or orientation: handled below
            warnings.filterwarnings("ignore", message="PydicomReader: ImageOrientationPatient")
            affine = super()._get_affine(metadata, lps_to_ras=False)
        if "00200032" not in metadata or "00200037" not in metadata:  # no geometry: PixelSpacing, else 1 mm
            spacing = [float(v) for v in metadata.get(PIXEL_SPACING_TAG, {}).get("Value", [1.0, 1.0])]
            affine[:3, :2] = np.diag([s if s > 0 else 1.0 for s in spacing] + [1.0])[:, :2]
        single_slice = "lastImagePositionPatient" not in metadata and "00200037" in metadata
        if single_slice:
            orientation = np.asarray(metadata["00200037"]["Value"], dtype=float).reshape(2, 3)
            thickness = float(metadata.get(SLICE_THICKNESS_TAG, {}).get("Value", [1.0])[0] or 1.0)
            affine[:3, 2] = np.cross(orientation[0], orientation[1]) * thickness
        return orientation_ras_lps(affine) if lps_to_ras else affine


def one_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message (libraries' messages can span lines)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _check_single_frame(name: PathLike, ds) -> None:
    if is_multiframe(ds):
        raise InputError(name, "multi-frame DICOM image inside a series of several files: give this file on its own")


def _check_greyscale(name: PathLike, ds) -> None:
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise InputError(name, f"colour DICOM image ({ds.get('PhotometricInterpretation', '?')}); "
                               "a greyscale scan is needed")


def _check_slice_positions(folder: PathLike, files: Sequence[str], slices: Sequence) -> None:
    """Raise InputError unless the slices, ordered by InstanceNumber, are evenly spaced along the normal."""
    for name, ds in zip(files, slices):
        missing = [t for t in ("InstanceNumber", "ImagePositionPatient", "ImageOrientationPatient") if t not in ds]
        if missing:
            raise InputError(name, f"DICOM slice without {', '.join(missing)}: cannot place it in the series")
    ordered = sorted(slices, key=lambda ds: int(ds.InstanceNumber))
    normal = np.cross(*np.asarray(ordered[0].ImageOrientationPatient, dtype=float).reshape(2, 3))
    position = np.array([np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=float)) for ds in ordered])
    gaps = np.diff(position)  # mm along the slice normal, in InstanceNumber order
    mean_gap = gaps.mean()
    if abs(mean_gap) < 1e-6 or np.abs(gaps - mean_gap).max() > 1e-3 + 0.01 * abs(mean_gap):
        raise InputError(
            folder,
            f"DICOM slices are not evenly spaced along the slice normal in InstanceNumber order "
            f"(gaps {gaps.min():.3g} to {gaps.max():.3g} mm)",
        )


def scan_kind(path: PathLike) -> str:
    """Kind of scan at ``path``: ``"dicom_series"`` (a folder), ``"dicom_file"`` (``.dcm`` or the
    DICM magic), ``"nifti"`` (.nii/.nii.gz) or ``"itk"`` (:data:`ITK_SUFFIXES`).

    Raises:
        InputError: the path does not exist or its type is not supported.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file or folder")
    if path.is_dir():
        return "dicom_series"
    if _has_suffix(path, DICOM_SUFFIXES) or pydicom.misc.is_dicom(path):
        return "dicom_file"
    if _has_suffix(path, NIFTI_SUFFIXES):
        return "nifti"
    if _has_suffix(path, ITK_SUFFIXES):
        return "itk"
    supported = ", ".join(f".{s}" for s in NIFTI_SUFFIXES + ITK_SUFFIXES + DICOM_SUFFIXES)
    raise InputError(path, f"unsupported file type (expected a DICOM folder or one of {supported})")


def reader_for(kind: str, series_uid: str | None = None, stack: int | None = None) -> ImageReader:
    """A reader for a :func:`scan_kind` result; ``series_uid`` picks a series in a DICOM folder, ``stack`` a
    stack of a multi-frame DICOM image."""
    if kind in ("dicom_series", "dicom_file"):
        return DicomReader(series_uid=series_uid, stack=stack)
    if kind == "nifti":
        return NibabelReader()
    if kind == "itk":
        return SimpleITKReader()
    raise ValueError(f"unknown scan kind {kind!r}")


# LoadImage tries the registered readers from the last to the first, so these two come before
# MONAI's catch-all PydicomReader; both verify_suffix checks are strict.
SUPPORTED_READERS["dicomreader"] = DicomReader
SUPPORTED_READERS["simpleitkreader"] = SimpleITKReader
