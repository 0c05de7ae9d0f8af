"""Saliency as a DICOM Parametric Map series that belongs to the source study.

:func:`save_parametric_map` writes one multi-frame Parametric Map instance (highdicom) with one
frame per source image: same Frame of Reference, ImagePositionPatient, ImageOrientationPatient,
PixelSpacing, Rows and Columns as that image, and a per-frame reference to it (Derivation Image
Sequence with its SOPInstanceUID; the Referenced Series Sequence names the source series). A
viewer can thus overlay the map on the source series frame by frame.

Pixel values: float32 (Float Pixel Data), the saliency itself, described by one Real World Value
Mapping (label "saliency", slope 1, intercept 0, no units, range [0, 1], widened if a value falls
outside) and a default window (centre 0.5, width 1). The series folder holds one file,
:data:`PM_FILENAME`; the map gets new Series and SOP Instance UIDs and SeriesNumber 1000 + the
source's.

Mapping the array to frames. The saliency comes on the grid that c2f_med's DICOM reader gives the
source (MONAI's ``PydicomReader`` convention: an ``X x Y x Z`` array indexed (column, row, slice)
with a RAS affine). Rather than trusting that convention, each source image's pixel
``(row r, column c)`` is placed in the world from the image's own DICOM geometry,
``P + c * dc * u + r * dr * v`` (LPS; ``P`` ImagePositionPatient, ``u``/``v`` the row/column
direction cosines, ``dr``/``dc`` PixelSpacing), turned into RAS and through the inverse of the
reader's affine into a voxel index of the array; the indices must be whole voxels inside the
array, else the saliency is not on the source's grid and a ``ValueError`` says so.

Identifiers. By default the Patient and Study attributes (PatientName, PatientID,
PatientBirthDate, PatientSex, StudyID, AccessionNumber, StudyDate, ...) are copied from the source,
as highdicom does. With ``deidentify=True`` highdicom is given a copy of each source image that
holds only what the map needs: the UIDs (Study, Series, SOP Instance, Frame of Reference, SOP
Class), the geometry, Modality, StudyDate/StudyTime and SeriesNumber, and dummy identifiers
(PatientName "ANONYMOUS", PatientID "ANON", empty PatientBirthDate, PatientSex, StudyID,
AccessionNumber and ReferringPhysicianName). So the map keeps its place in the study, its Frame of
Reference and its references to the source images (all UIDs are kept: the map stays linkable to
the source study, which the overlay needs), and dates (PS3.15's "retain longitudinal temporal
information" option); every other patient, institution, equipment and clinical-trial attribute
is left out. The map then says PatientIdentityRemoved "YES" and names the method.

Inputs that cannot carry a map (a source image without a Frame of Reference,
ImagePositionPatient, ImageOrientationPatient or PixelSpacing: nothing to place the frames with)
raise :class:`~c2f_med.errors.InputError` naming the file; the caller decides whether the rest of
its outputs are still written. Nothing identifying the patient is logged or put in a message.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from c2f_med.atomic import atomic_dir
from c2f_med.errors import InputError
from c2f_med.export.dicom_equipment import accepting_short_person_names, new_instance
from c2f_med.export.dicom_sc import SC_FOLDER, overlay_images
from c2f_med.export.dicom_seg import DEFAULT_THRESHOLD, SEG_FILENAME, saliency_segmentation
from c2f_med.export.nifti import DESCRIPTION
from c2f_med.io.multiframe import frame_geometry, is_multiframe, read_multiframe
from c2f_med.io.readers import DicomReader
from c2f_med.io.transforms import ReadScan

# highdicom reports every module it copies at INFO ('copy attributes of module "..."'): keep that off a
# terminal at INFO level
logging.getLogger("highdicom").setLevel(logging.WARNING)

__all__ = [
    "PM_FILENAME",
    "DicomSource",
    "read_source",
    "save_dicom_exports",
    "ANONYMOUS",
    "read_source_images",
    "deidentified_copy",
    "frames_on_source_grid",
    "parametric_map",
    "save_parametric_map",
]

#: Name of the Parametric Map file inside the output series folder.
PM_FILENAME = "saliency_parametric_map.dcm"

#: Dummy identifiers written with ``deidentify=True`` (type 2 attributes stay present, empty).
ANONYMOUS = {
    "PatientName": "ANONYMOUS",
    "PatientID": "ANON",
    "PatientBirthDate": "",
    "PatientSex": "",
    "StudyID": "",
    "AccessionNumber": "",
    "ReferringPhysicianName": "",
}

# what a de-identified source copy keeps: UIDs, geometry, image size and the study's dates
_KEPT = (
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
    "FrameOfReferenceUID", "PositionReferenceIndicator", "Modality", "SeriesNumber", "InstanceNumber",
    "StudyDate", "StudyTime", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
    "SliceThickness", "SpacingBetweenSlices", "Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation",
    "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
)
# attributes highdicom reads from the first source image (type 2: present, possibly empty)
_REQUIRED_EMPTY_OK = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID", "AccessionNumber",
                      "StudyDate", "StudyTime", "ReferringPhysicianName")
_GEOMETRY = ("FrameOfReferenceUID", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
_WHOLE_VOXEL_TOL = 0.05  # voxels: DICOM decimal strings round positions to about 1e-6 mm


def read_source_images(source: str | os.PathLike, series_uid: str | None = None) -> list[Dataset]:
    """The headers (no pixel data) of the source images, ordered by InstanceNumber.

    ``source`` is a DICOM series folder (the series is chosen as c2f_med's reader chooses it: the
    only one, or ``series_uid``) or a single DICOM file.

    Raises:
        InputError: no or several series (without ``series_uid``), an unreadable header, or an
            image without the geometry a Parametric Map needs.
    """
    source = Path(source)
    files = DicomReader(series_uid=series_uid).series_files(source) if source.is_dir() else (str(source),)
    images = []
    for name in files:
        try:
            images.append(pydicom.dcmread(name, stop_before_pixels=True))
        except Exception as err:  # pydicom raises many types for a corrupt header
            raise InputError(name, "corrupt DICOM header: cannot build a Parametric Map on it") from err
    for name, ds in zip(files, images):
        missing = [t for t in _GEOMETRY if t not in ds]
        if missing:
            raise InputError(name, f"DICOM image without {', '.join(missing)}: cannot place a Parametric Map on it")
    return sorted(images, key=lambda ds: int(ds.get("InstanceNumber") or 0))


@dataclass
class DicomSource:
    """What the DICOM exports are built on.

    Attributes:
        images: highdicom's ``source_images``: the series' images (one per frame), or the one multi-frame image.
        frames: one header per output frame (ImagePositionPatient, ImageOrientationPatient, PixelSpacing,
            Rows, Columns), in output frame order.
        references: one dataset per output frame holding its patient and study (the image itself for a series).
        plane_positions, plane_orientation, pixel_measures: the frames' geometry for a multi-frame source
            (None for a series: highdicom takes it from the images).
    """

    images: list[Dataset]
    frames: list[Dataset]
    references: list[Dataset]
    plane_positions: list[hd.PlanePositionSequence] | None = None
    plane_orientation: hd.PlaneOrientationSequence | None = None
    pixel_measures: hd.PixelMeasuresSequence | None = None

    def deidentified(self) -> DicomSource:
        """The same source with :func:`deidentified_copy` images."""
        copies = {id(ds): deidentified_copy(ds) for ds in [*self.images, *self.references]}
        return DicomSource([copies[id(ds)] for ds in self.images], self.frames,
                           [copies[id(ds)] for ds in self.references], self.plane_positions,
                           self.plane_orientation, self.pixel_measures)


def read_source(source: str | os.PathLike, series_uid: str | None = None, stack: int | None = None) -> DicomSource:
    """The source images of a DICOM scan: a series (:func:`read_source_images`) or a multi-frame image (its
    chosen stack, frames in the reader's order along the normal).

    Raises:
        InputError: as :func:`read_source_images`; a multi-frame image without plane geometry or Frame of Reference.
    """
    source = Path(source)
    files = DicomReader(series_uid=series_uid).series_files(source) if source.is_dir() else (str(source),)
    if len(files) == 1:
        try:
            header = pydicom.dcmread(files[0], stop_before_pixels=True)
        except Exception as err:  # pydicom raises many types for a corrupt header
            raise InputError(files[0], "corrupt DICOM header: cannot build DICOM exports on it") from err
        if is_multiframe(header):
            return _multiframe_source(files[0], header, stack)
    images = read_source_images(source, series_uid)
    return DicomSource(images, images, images)


def _multiframe_source(name: str, header: Dataset, stack: int | None) -> DicomSource:
    if "FrameOfReferenceUID" not in header:
        raise InputError(name, "multi-frame DICOM image without a Frame of Reference: cannot place DICOM exports on it")
    volume = read_multiframe(name, stack)
    if volume.stack.key == (("geometry", "file order"),):
        raise InputError(name, "multi-frame DICOM image without plane positions: cannot place DICOM exports on it")
    geometry = frame_geometry(name, header)
    frames = []
    for number in volume.frames:
        g = geometry[number - 1]
        ds = Dataset()
        ds.ImagePositionPatient, ds.ImageOrientationPatient = list(g.position), list(g.orientation)
        ds.PixelSpacing, ds.Rows, ds.Columns = list(g.spacing), header.Rows, header.Columns
        frames.append(ds)
    first = geometry[volume.frames[0] - 1]
    thickness = _spacing_between(volume.affine)
    return DicomSource(
        [header], frames, [header] * len(frames),
        plane_positions=[hd.PlanePositionSequence("PATIENT", f.ImagePositionPatient) for f in frames],
        plane_orientation=hd.PlaneOrientationSequence("PATIENT", first.orientation),
        pixel_measures=hd.PixelMeasuresSequence(first.spacing, thickness, thickness),
    )


def _spacing_between(affine: NDArray[np.floating]) -> float:
    return float(np.linalg.norm(np.asarray(affine)[:3, 0]))


def deidentified_copy(ds: Dataset) -> Dataset:
    """A new dataset with only the UIDs, geometry and dates of ``ds`` plus :data:`ANONYMOUS` identifiers."""
    out = Dataset()
    for keyword in _KEPT:
        if keyword in ds:
            setattr(out, keyword, ds.data_element(keyword).value)
    for keyword, value in ANONYMOUS.items():
        setattr(out, keyword, value)
    return out


def frames_on_source_grid(
    saliency: NDArray[np.floating], affine: NDArray[np.floating], images: Sequence[Dataset]
) -> NDArray[np.float32]:
    """The saliency at each source image's pixels: ``n x Rows x Columns`` in the order of ``images``.

    Args:
        saliency: ``X x Y x Z`` on the grid that ``affine`` (voxel index to RAS mm) describes.
        affine: the reader's affine of the source series (4 x 4).
        images: source image headers (ImagePositionPatient, ImageOrientationPatient, PixelSpacing,
            Rows, Columns).

    Raises:
        ValueError: a source pixel does not fall on a voxel centre of ``saliency``.
    """
    saliency = np.asarray(saliency, dtype=np.float32)
    world_to_index = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    frames = np.empty((len(images), int(images[0].Rows), int(images[0].Columns)), dtype=np.float32)
    for n, ds in enumerate(images):
        position = np.asarray(ds.ImagePositionPatient, dtype=np.float64)
        u, v = np.asarray(ds.ImageOrientationPatient, dtype=np.float64).reshape(2, 3)  # along a row, down a column
        dr, dc = (float(s) for s in ds.PixelSpacing)  # between rows, between columns
        r, c = np.meshgrid(np.arange(int(ds.Rows)), np.arange(int(ds.Columns)), indexing="ij")
        lps = position + c[..., None] * dc * u + r[..., None] * dr * v  # Rows x Columns x 3
        index = (lps @ _LPS_TO_RAS.T) @ world_to_index[:3, :3].T + world_to_index[:3, 3]
        voxel = np.rint(index).astype(np.int64)
        off_grid = np.abs(index - voxel).max()
        outside = (voxel < 0).any() or (voxel >= np.asarray(saliency.shape)).any()
        if off_grid > _WHOLE_VOXEL_TOL or outside:
            raise ValueError(
                f"saliency {saliency.shape} is not on the grid of source image {n + 1} "
                f"(off the voxel centres by up to {off_grid:.3g} voxels{', outside the array' if outside else ''})"
            )
        frames[n] = saliency[voxel[..., 0], voxel[..., 1], voxel[..., 2]]
    return frames


def parametric_map(
    frames: NDArray[np.float32], images: Sequence[Dataset], *, series_number: int | None = None,
    plane_positions: Sequence[hd.PlanePositionSequence] | None = None,
    plane_orientation: hd.PlaneOrientationSequence | None = None,
    pixel_measures: hd.PixelMeasuresSequence | None = None,
) -> hd.pm.ParametricMap:
    """A Parametric Map of ``frames`` (``n x Rows x Columns``, one per image of ``images``, or per plane
    position of a multi-frame source image).

    Plane positions, orientation and pixel measures are the source images' (or the ones given); each
    frame references its source image. New Series and SOP Instance UIDs; SeriesNumber ``1000 + source's``
    unless given. The General Series module's Laterality is the source's (empty when it has none).
    """
    images = [_with_type2_attributes(ds) for ds in images]
    low, high = float(min(0.0, frames.min())), float(max(1.0, frames.max()))
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="saliency",
        lut_explanation="c2f_med saliency (0 none, 1 most)",
        unit=codes.UCUM.NoUnits,
        value_range=(low, high),
        slope=1.0,
        intercept=0.0,
    )
    if series_number is None:
        series_number = 1000 + int(images[0].get("SeriesNumber") or 0)
    with accepting_short_person_names():
        pm = hd.pm.ParametricMap(
            source_images=images,
            pixel_array=np.ascontiguousarray(frames, dtype=np.float32),
            **new_instance(series_number),
            contains_recognizable_visual_features=False,
            real_world_value_mappings=[mapping],
            voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5, window_width=1.0)],
            content_label="SALIENCY",
            content_description=DESCRIPTION,
            plane_positions=plane_positions,
            plane_orientation=plane_orientation,
            pixel_measures=pixel_measures,
        )
    pm.SeriesDescription = DESCRIPTION
    pm.Laterality = images[0].get("Laterality", "")  # type 2C: present (empty when unknown)
    return pm


def save_parametric_map(
    saliency_on_original_grid: NDArray[np.floating],
    source: str | os.PathLike,
    out_folder: str | os.PathLike,
    *,
    series_uid: str | None = None,
    deidentify: bool = False,
    stack: int | None = None,
) -> Path:
    """Write the saliency as a Parametric Map series referencing the source DICOM series.

    Args:
        saliency_on_original_grid: ``[1 x] X0 x Y0 x Z0`` on the grid c2f_med's reader gives
            ``source`` (e.g. :func:`~c2f_med.io.transforms.to_original_grid` of the saliency).
        source: the DICOM series folder, single DICOM file or multi-frame image the scan was read from.
        out_folder: the output series folder (replaced as a whole, atomically); it receives
            :data:`PM_FILENAME`.
        series_uid: the series of a folder that holds several (as given to the reader).
        deidentify: replace the patient identifiers (see the module docstring).
        stack: the stack of a multi-frame image (as given to the reader).

    Returns:
        the path of the Parametric Map file.

    Raises:
        InputError: the source cannot carry a Parametric Map (see :func:`read_source`).
        ValueError: the saliency is not on the source's grid.
    """
    out_folder = Path(out_folder)
    with atomic_dir(out_folder) as tmp:
        _write_exports(saliency_on_original_grid, None, source, tmp, series_uid, stack, deidentify)
    return out_folder / PM_FILENAME


def save_dicom_exports(
    saliency_on_original_grid: NDArray[np.floating],
    scan_on_original_grid: NDArray[np.floating],
    source: str | os.PathLike,
    out_folder: str | os.PathLike,
    *,
    series_uid: str | None = None,
    deidentify: bool = False,
    stack: int | None = None,
    threshold: float = DEFAULT_THRESHOLD,
) -> list[Path]:
    """Write every DICOM export of a saliency map into ``out_folder`` (replaced as a whole, atomically):

    - :data:`PM_FILENAME`: the Parametric Map (:func:`save_parametric_map`);
    - :data:`~c2f_med.export.dicom_seg.SEG_FILENAME`: a DICOM SEG of ``saliency >= threshold``
      (:func:`~c2f_med.export.dicom_seg.saliency_segmentation`);
    - :data:`~c2f_med.export.dicom_sc.SC_FOLDER` ``/overlay_NNN.dcm``: a Secondary Capture series of the
      scan with the saliency over it, on the most salient slices (:mod:`c2f_med.export.dicom_sc`).

    Args:
        saliency_on_original_grid, scan_on_original_grid: ``[1 x] X0 x Y0 x Z0`` on the reader's grid of
            ``source``: the saliency, and the scan as the model saw it (in [0, 1]).
        source, series_uid, deidentify, stack: as in :func:`save_parametric_map`.
        threshold: the saliency at or above which a pixel belongs to the SEG's segment.

    Returns:
        the paths written.
    """
    out_folder = Path(out_folder)
    with atomic_dir(out_folder) as tmp:
        names = _write_exports(saliency_on_original_grid, scan_on_original_grid, source, tmp, series_uid, stack,
                               deidentify, threshold)
    return [out_folder / name for name in names]


def _write_exports(saliency, scan, source, folder: Path, series_uid, stack, deidentify, threshold=DEFAULT_THRESHOLD):
    saliency = _volume(saliency, "saliency")
    dicom = read_source(source, series_uid, stack)
    # the reader's own grid for the array, so the index convention is the one the saliency was made on
    affine = np.asarray(ReadScan(series_uid=series_uid, allow_constant=True, stack=stack)(source).affine,
                        dtype=np.float64)
    frames = frames_on_source_grid(saliency, affine, dicom.frames)
    if deidentify:
        dicom = dicom.deidentified()
    geometry = {"plane_positions": dicom.plane_positions, "plane_orientation": dicom.plane_orientation,
                "pixel_measures": dicom.pixel_measures}
    outputs = [(PM_FILENAME, parametric_map(frames, dicom.images, **geometry))]
    if scan is not None:
        grey = frames_on_source_grid(_volume(scan, "scan"), affine, dicom.frames)
        outputs.append((SEG_FILENAME, saliency_segmentation(frames, [_with_type2_attributes(d) for d in dicom.images],
                                                            threshold=threshold, **geometry)))
        references = [_with_type2_attributes(d) for d in dicom.references]
        for n, image in enumerate(overlay_images(grey, frames, dicom.frames, references), start=1):
            outputs.append((f"{SC_FOLDER}/overlay_{n:03d}.dcm", image))
    for _, ds in outputs:
        if deidentify:
            ds.PatientIdentityRemoved = "YES"
            ds.DeidentificationMethod = "c2f_med: identifiers replaced, UIDs and dates kept"
    for name, ds in outputs:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(folder / name)
    return [name for name, _ in outputs]


def _volume(array: NDArray[np.floating], what: str) -> NDArray[np.float32]:
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise ValueError(f"{what} must be X x Y x Z (or 1 x X x Y x Z), got shape {array.shape}")
    return array


def _with_type2_attributes(ds: Dataset) -> Dataset:
    """``ds`` itself, or a shallow copy with the type 2 attributes highdicom reads added empty."""
    missing = [k for k in _REQUIRED_EMPTY_OK if k not in ds]
    if not missing:
        return ds
    out = Dataset(ds)
    for keyword in missing:
        setattr(out, keyword, "")
    return out
