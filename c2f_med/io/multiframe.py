"""Enhanced (multi-frame) DICOM images as one 3D volume: geometry, stacks, decoding.

An enhanced MR / CT / PET image, or a legacy-converted enhanced image, holds every slice of a
series as the frames of one file. Each frame's place in the patient comes from the Per-frame and
Shared Functional Groups (PlanePositionSequence, PlaneOrientationSequence, PixelMeasuresSequence);
its values from the stored pixels (decoded by pydicom) through the frame's rescale
(PixelValueTransformationSequence, per frame or shared).

A file may hold several stacks: frames with different StackIDs, orientations, temporal positions
or other dimension index values (echo, b-value, ...). :func:`find_stacks` groups the frames by
everything that is not their position in a stack; :func:`read_multiframe` reads one group as a
volume: the only one, or the one chosen (1-based, in the order :func:`find_stacks` lists them).
The frames of a group are sorted along the slice normal and must be parallel, equally spaced and
at distinct positions (``highdicom.spatial.get_volume_positions`` decides), else an
:class:`~c2f_med.errors.InputError` says why; a grid is never guessed.

Pixel data in a compressed transfer syntax are decoded by pydicom's pixel data plugins
(pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg, pylibjpeg-rle, python-gdcm, pyjpegls, Pillow);
:func:`check_decodable` names the transfer syntax when none of them can decode it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import pydicom
from highdicom.spatial import get_volume_positions
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import UID

from c2f_med.errors import InputError

__all__ = [
    "Stack",
    "MultiFrameVolume",
    "is_multiframe",
    "check_decodable",
    "frame_geometry",
    "find_stacks",
    "read_multiframe",
]

# dimension indices that order frames inside one stack (everything else tells stacks apart)
_IN_STACK_POINTERS = {
    pydicom.datadict.tag_for_keyword("InStackPositionNumber"),
    pydicom.datadict.tag_for_keyword("ImagePositionPatient"),
    pydicom.datadict.tag_for_keyword("StackID"),
}
_ORIENTATION_DECIMALS = 4
#: modalities whose frames may be slices of a volume
TOMOGRAPHIC_MODALITIES = ("MR", "CT", "PT")
logger = logging.getLogger(__name__)  # direction cosines equal to 1e-4 belong to the same stack


def is_multiframe(ds: Dataset) -> bool:
    """True for an image with more than one frame or with Per-frame Functional Groups (not a SEG)."""
    if "SegmentSequence" in ds:
        return False
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 1
    return frames > 1 or "PerFrameFunctionalGroupsSequence" in ds


def check_decodable(name: str | os.PathLike, ds: Dataset) -> None:
    """Raise InputError naming the transfer syntax when no installed plugin can decode the pixel data."""
    syntax = UID(ds.file_meta.get("TransferSyntaxUID", "")) if "file_meta" in dir(ds) else UID("")
    if not syntax:
        return
    try:
        available = get_decoder(syntax).is_available
    except NotImplementedError:
        available = False
    if not available:
        label = syntax.name if syntax.name != str(syntax) else "an unknown transfer syntax"
        raise InputError(name, f"cannot decode pixel data encoded as {label} ({syntax}): no installed decoder for it")


@dataclass(frozen=True)
class FrameGeometry:
    """Where one frame lies: ImagePositionPatient, ImageOrientationPatient, PixelSpacing (LPS, mm)."""

    position: tuple[float, float, float]
    orientation: tuple[float, ...]
    spacing: tuple[float, float]


def _functional_group(ds: Dataset, index: int, sequence: str) -> Dataset | None:
    """The first item of ``sequence`` for frame ``index`` (0-based): per-frame first, then shared."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared = ds.get("SharedFunctionalGroupsSequence")
    for item in (per_frame[index] if per_frame else None, shared[0] if shared else None):
        if item is not None and sequence in item and len(item[sequence].value):
            return item[sequence].value[0]
    return None


def frame_geometry(name: str | os.PathLike, ds: Dataset) -> list[FrameGeometry]:
    """The geometry of every frame, from the functional groups (or the top level for a legacy multi-frame).

    Raises:
        InputError: a frame without a position, an orientation or a pixel spacing.
    """
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    out = []
    for i in range(frames):
        position = _functional_group(ds, i, "PlanePositionSequence")
        orientation = _functional_group(ds, i, "PlaneOrientationSequence")
        measures = _functional_group(ds, i, "PixelMeasuresSequence")
        ipp = position.get("ImagePositionPatient") if position is not None else None
        iop = orientation.get("ImageOrientationPatient") if orientation is not None else None
        spacing = measures.get("PixelSpacing") if measures is not None else None
        ipp = ipp if ipp is not None else (ds.get("ImagePositionPatient") if frames == 1 else None)
        iop = iop if iop is not None else ds.get("ImageOrientationPatient")
        spacing = spacing if spacing is not None else ds.get("PixelSpacing")
        missing = [k for k, v in (("ImagePositionPatient", ipp), ("ImageOrientationPatient", iop),
                                  ("PixelSpacing", spacing)) if v is None]
        if missing:
            raise InputError(
                name,
                f"multi-frame DICOM image ({ds.get('Modality', '?')}, {frames} frames) without "
                f"{', '.join(missing)} for frame {i + 1}: its frames cannot be placed in 3D (not a tomographic volume)",
            )
        out.append(FrameGeometry(tuple(float(v) for v in ipp), tuple(float(v) for v in iop),
                                 tuple(float(v) for v in spacing)))
    return out


@dataclass(frozen=True)
class Stack:
    """One group of frames that may form a volume: its key values and 1-based frame numbers."""

    number: int
    key: tuple
    frames: tuple[int, ...]
    orientation: tuple[float, ...]

    def summary(self) -> str:
        """``stack 2 (StackID 1, 12 frames, axial)``: no patient identifiers."""
        labels = ", ".join(f"{k} {v}" for k, v in self.key if k != "orientation")
        plane = _plane_name(self.orientation)
        return f"stack {self.number} ({labels + ', ' if labels else ''}{len(self.frames)} frames, {plane})"


def _plane_name(orientation: Sequence[float]) -> str:
    normal = np.abs(np.cross(np.asarray(orientation[:3]), np.asarray(orientation[3:])))
    return {0: "sagittal", 1: "coronal", 2: "axial"}[int(np.argmax(normal))] + (
        "" if normal.max() > 0.99 else " oblique")


def _stack_key(ds: Dataset, index: int, geometry: FrameGeometry) -> tuple:
    """What tells frame ``index`` (0-based) apart from other stacks: orientation, StackID, TemporalPositionIndex
    and the non-spatial dimension index values."""
    key: list[tuple[str, object]] = [("orientation", tuple(np.round(geometry.orientation, _ORIENTATION_DECIMALS)))]
    content = _functional_group(ds, index, "FrameContentSequence")
    if content is None:
        return tuple(key)
    if "StackID" in content:
        key.append(("StackID", str(content.StackID)))
    if "TemporalPositionIndex" in content:
        key.append(("TemporalPositionIndex", int(content.TemporalPositionIndex)))
    values = content.get("DimensionIndexValues")
    pointers = [item.get("DimensionIndexPointer") for item in ds.get("DimensionIndexSequence", [])]
    if values is not None and pointers:
        values = values if isinstance(values, Sequence) and not isinstance(values, str) else [values]
        for pointer, value in zip(pointers, values):
            if pointer is None or pointer in _IN_STACK_POINTERS:
                continue
            keyword = pydicom.datadict.keyword_for_tag(pointer) or str(pointer)
            if keyword != "TemporalPositionIndex" or ("TemporalPositionIndex", int(value)) not in key:
                key.append((f"{keyword} index", int(value)))
    return tuple(key)


def find_stacks(name: str | os.PathLike, ds: Dataset) -> list[Stack]:
    """The frame groups of a multi-frame image, in the order their first frame comes in the file."""
    geometry = frame_geometry(name, ds)
    groups: dict[tuple, list[int]] = {}
    for i, g in enumerate(geometry):
        groups.setdefault(_stack_key(ds, i, g), []).append(i + 1)
    return [Stack(n + 1, key, tuple(frames), geometry[frames[0] - 1].orientation)
            for n, (key, frames) in enumerate(groups.items())]


@dataclass
class MultiFrameVolume:
    """A volume read from a multi-frame file.

    Attributes:
        name: the file.
        dataset: its header (no decoded pixel data).
        array: ``slices x rows x columns`` float32, the frames sorted along the slice normal.
        affine: 4 x 4, (slice, row, column) index to LPS mm.
        frames: the 1-based frame number of every slice of ``array``.
        stack: the stack read.
    """

    name: str
    dataset: Dataset
    array: np.ndarray
    affine: np.ndarray
    frames: tuple[int, ...]
    stack: Stack


def read_multiframe(name: str | os.PathLike, stack: int | None = None) -> MultiFrameVolume:
    """Read a multi-frame image's stack as a volume (module docstring).

    Args:
        name: the DICOM file.
        stack: which stack (1-based, :func:`find_stacks` order) when the file holds several.

    Raises:
        InputError: no geometry, several stacks and no (or a wrong) ``stack``, frames not parallel, not
            equally spaced or repeated, a colour image, pixel data no installed plugin decodes.
    """
    name = os.fspath(name)
    header = pydicom.dcmread(name, stop_before_pixels=True)
    check_decodable(name, header)
    if int(header.get("SamplesPerPixel", 1)) != 1:
        raise InputError(name, f"colour DICOM image ({header.get('PhotometricInterpretation')}); "
                               "a greyscale scan is needed")
    if _without_plane_geometry(header):
        return _in_file_order(name, header)
    stacks = find_stacks(name, header)
    if stack is None and len(stacks) > 1:
        found = "; ".join(s.summary() for s in stacks)
        raise InputError(name, f"{len(stacks)} stacks of frames in this image, choose one with --stack: {found}")
    if stack is not None and not 1 <= stack <= len(stacks):
        found = "; ".join(s.summary() for s in stacks)
        raise InputError(name, f"no stack {stack} in this image; found: {found}")
    chosen = stacks[0 if stack is None else stack - 1]
    geometry = frame_geometry(name, header)
    frames = [geometry[f - 1] for f in chosen.frames]
    spacings = {g.spacing for g in frames}
    if len(spacings) > 1:
        raise InputError(name, f"{chosen.summary()}: frames with different pixel spacings {sorted(spacings)}")
    slice_spacing = header.get("SpacingBetweenSlices") or _shared_value(header, "PixelMeasuresSequence",
                                                                         "SpacingBetweenSlices")
    slice_spacing = slice_spacing or _shared_value(header, "PixelMeasuresSequence", "SliceThickness")
    positions = [g.position for g in frames]
    spacing, volume_positions = get_volume_positions(
        positions, chosen.orientation, allow_duplicate_positions=False,
        spacing_hint=float(slice_spacing) if slice_spacing else None)
    if volume_positions is None:
        raise InputError(name, f"{chosen.summary()}: frames are not parallel, equally spaced slices at distinct "
                               "positions (or not stacked along their normal); cannot make a volume of them")
    if len(frames) == 1 and not spacing:
        spacing = 1.0
    order = np.argsort(volume_positions)
    frame_numbers = tuple(chosen.frames[i] for i in order)
    ds, stored = _decoded_frames(name)
    array = np.stack([_rescaled(ds, stored, f) for f in frame_numbers])
    geometry_0 = hd.VolumeGeometry.from_attributes(
        image_position=positions[order[0]], image_orientation=chosen.orientation, rows=int(header.Rows),
        columns=int(header.Columns), pixel_spacing=frames[0].spacing, number_of_frames=len(frames),
        spacing_between_slices=float(spacing), coordinate_system="PATIENT")
    return MultiFrameVolume(name, header, array, geometry_0.affine, frame_numbers, chosen)


def _without_plane_geometry(ds: Dataset) -> bool:
    """A tomographic (MR, CT, PET) multi-frame image that has no plane position, orientation or pixel spacing
    at all (e.g. stripped by an anonymiser): its frames can only be taken in file order."""
    if str(ds.get("Modality", "")).upper() not in TOMOGRAPHIC_MODALITIES:
        return False
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    keys = ("PlanePositionSequence", "PlaneOrientationSequence", "PixelMeasuresSequence")
    in_groups = any(_functional_group(ds, i, k) is not None for i in range(frames) for k in keys)
    return not in_groups and not any(k in ds for k in ("ImagePositionPatient", "ImageOrientationPatient",
                                                       "PixelSpacing"))


def _in_file_order(name: str, header: Dataset) -> MultiFrameVolume:
    """Frames in file order as axial slices, 1 mm pixels, SpacingBetweenSlices (or 1 mm) apart, with a warning."""
    frames = int(header.get("NumberOfFrames", 1) or 1)
    spacing = float(header.get("SpacingBetweenSlices") or 1.0)
    logger.warning("%s: multi-frame image without plane positions, orientation or pixel spacing; its %d frames are "
                   "taken in file order as axial slices %.3g mm apart with 1 mm pixels", name, frames, spacing)
    ds, stored = _decoded_frames(name)
    array = np.stack([_rescaled(ds, stored, f) for f in range(1, frames + 1)])
    affine = np.eye(4)
    affine[:3, :3] = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [spacing, 0.0, 0.0]])  # (slice, row, col) -> LPS
    stack = Stack(1, (("geometry", "file order"),), tuple(range(1, frames + 1)), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0))
    return MultiFrameVolume(name, header, array, affine, stack.frames, stack)


def _decoded_frames(name: str) -> tuple[Dataset, np.ndarray]:
    """The dataset and all its frames (``frames x rows x columns``, stored values), decoded by pydicom."""
    try:
        ds = pydicom.dcmread(name)
        return ds, ds.pixel_array.reshape(int(ds.get("NumberOfFrames", 1) or 1), int(ds.Rows), int(ds.Columns))
    except Exception as err:  # pydicom and its pixel data plugins raise many types for a bad file
        from c2f_med.io.readers import one_line

        raise InputError(name, f"cannot decode this multi-frame DICOM image: {one_line(err)}") from err


def _rescaled(ds: Dataset, stored: np.ndarray, number: int) -> np.ndarray:
    """Frame ``number`` (1-based) through its rescale: the frame's PixelValueTransformationSequence, else the
    shared one, else the top-level RescaleSlope / RescaleIntercept (float32)."""
    item = _functional_group(ds, number - 1, "PixelValueTransformationSequence") or ds
    slope = float(item.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(item.get("RescaleIntercept", 0.0) or 0.0)
    return (stored[number - 1].astype(np.float64) * slope + intercept).astype(np.float32)


def _shared_value(ds: Dataset, sequence: str, keyword: str):
    groups = ds.get("SharedFunctionalGroupsSequence")
    if not groups or sequence not in groups[0] or not len(groups[0][sequence].value):
        groups = ds.get("PerFrameFunctionalGroupsSequence")
        if not groups or sequence not in groups[0] or not len(groups[0][sequence].value):
            return None
    return groups[0][sequence].value[0].get(keyword)
