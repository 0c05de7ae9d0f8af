"""Lesion masks in clinical formats, placed on the scan's voxel grid.

Wherever a lesion mask is accepted, it may be given as

- a NIfTI, MHA, NRRD (or other ITK) image on the scan's grid, read as the scan is;
- a Slicer segmentation (``.seg.nrrd``): the segment chosen by number (1-based, in the file's order)
  or by name, the only one by default;
- a DICOM SEG (binary or fractional, read with highdicom): the segment chosen by SegmentNumber or
  SegmentLabel, the only one by default. Its frames are placed by their plane positions onto the
  scan's grid (whether the scan is a DICOM series, a multi-frame image or a NIfTI file in the same
  patient coordinates) with ``highdicom.Volume.match_geometry``: permutations, flips, padding and
  cropping, never resampling. A fractional segment is the voxels whose fraction is at least 0.5;
- a DICOM RTSTRUCT: the ROI chosen by ROINumber or ROIName, the only one by default. Its closed planar
  contours (patient coordinates, mm) are rasterised on the scan's slices with scikit-image polygons: a
  voxel belongs to the ROI when its centre is inside a contour or on it; contours on one slice combine
  by the even-odd rule (a contour inside another is a hole).

A DICOM SEG or RTSTRUCT must share the scan's Frame of Reference when both carry one, and its
frames or contours must lie on the scan's voxel centres; otherwise an
:class:`~c2f_med.errors.InputError` names both files and the problem. The choice of segment or ROI
comes from the arguments of :class:`ReadMask`, or per case from the data dictionary's ``"segment"``
and ``"roi"`` keys (a datalist item's).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import SimpleITK as sitk
import torch
from monai.config import KeysCollection, PathLike
from monai.data import MetaTensor
from monai.transforms import LoadImage, MapTransform, Transform
from monai.utils import MetaKeys
from skimage.draw import line, polygon

from c2f_med.errors import InputError
from c2f_med.io.readers import SimpleITKReader, one_line

__all__ = [
    "SEG_SOP_CLASS",
    "RTSTRUCT_SOP_CLASS",
    "mask_kind",
    "seg_on_grid",
    "rtstruct_on_grid",
    "seg_nrrd_segments",
    "ReadMask",
    "ReadMaskd",
]

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
FRAME_OF_REFERENCE_TAG = "00200052"
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
_FRACTION_THRESHOLD = 0.5
_ON_SLICE_TOL = 0.1  # voxels: a contour's distance to the nearest slice centre


def mask_kind(path: PathLike) -> str:
    """``"seg"`` (DICOM SEG), ``"rtstruct"`` (DICOM RTSTRUCT), ``"seg_nrrd"`` (Slicer segmentation) or
    ``"image"`` (anything :class:`~c2f_med.io.transforms.ReadScan` reads)."""
    path = Path(path)
    if path.is_file() and pydicom.misc.is_dicom(path):
        sop = str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"]).get("SOPClassUID", ""))
        return {SEG_SOP_CLASS: "seg", RTSTRUCT_SOP_CLASS: "rtstruct"}.get(sop, "image")
    if path.name.lower().endswith(".seg.nrrd"):
        return "seg_nrrd"
    return "image"


def _choose(path: PathLike, what: str, items: Sequence[tuple[int, str]], choice: str | int | None) -> int:
    """The number of the item chosen by number or name among ``(number, name)`` pairs (the only one by default)."""
    listing = "; ".join(f"{n} {name!r}" for n, name in items)
    if choice is None:
        if len(items) == 1:
            return items[0][0]
        flag = "--segment" if what == "segment" else "--roi"
        raise InputError(path, f"{len(items)} {what}s in this file, choose one with {flag} (number or name): {listing}")
    text = str(choice).strip()
    for number, name in items:
        if text == str(number) or text == name:
            return number
    folded = [n for n, name in items if name.lower() == text.lower()]
    if len(folded) == 1:
        return folded[0]
    raise InputError(path, f"no {what} {text!r} in this file; found: {listing}")


def _scan_geometry(scan: MetaTensor) -> hd.VolumeGeometry:
    """The scan's grid (``1 x X x Y x Z``, RAS affine) as a highdicom geometry in LPS."""
    affine = _RAS_TO_LPS @ np.asarray(scan.affine, dtype=np.float64)
    return hd.VolumeGeometry(affine, tuple(int(s) for s in scan.shape[1:]), "PATIENT")


def _check_frame_of_reference(path: PathLike, uid: str | None, scan: MetaTensor) -> None:
    scan_uid = scan.meta.get(FRAME_OF_REFERENCE_TAG, {}).get("Value", [None])[0]
    if uid and scan_uid and str(uid) != str(scan_uid):
        raise InputError(path, f"its Frame of Reference differs from that of {_name(scan)}: the annotation was made "
                               "on another scan (or another frame of reference)")


def _name(scan: MetaTensor) -> str:
    return str(scan.meta.get("filename_or_obj", "the scan"))


def seg_on_grid(path: PathLike, scan: MetaTensor, segment: str | int | None = None) -> np.ndarray:
    """The chosen segment of a DICOM SEG on the scan's grid: bool ``X x Y x Z``.

    Raises:
        InputError: unreadable SEG, several segments and no choice, an unknown segment, another frame of
            reference, frames that are not on the scan's voxel grid.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            seg = hd.seg.segread(os.fspath(path))
    except Exception as err:  # highdicom / pydicom raise many types for a bad file
        raise InputError(path, f"cannot read this DICOM SEG: {one_line(err)}") from err
    items = [(int(s.SegmentNumber), str(s.get("SegmentLabel", ""))) for s in seg.SegmentSequence]
    number = _choose(path, "segment", items, segment)
    _check_frame_of_reference(path, seg.get("FrameOfReferenceUID"), scan)
    fractional = str(seg.get("SegmentationType", "BINARY")).upper() == "FRACTIONAL"
    try:
        volume = seg.get_volume(segment_numbers=[number], combine_segments=False, dtype=np.float32,
                                rescale_fractional=True)
    except Exception as err:  # frames that do not form a regular volume
        raise InputError(path, f"the frames of segment {number} do not form a volume: {one_line(err)}") from err
    if volume.number_of_channel_dimensions:
        volume = volume.squeeze_channel()
    geometry = _scan_geometry(scan)
    if volume.spatial_shape[0] == 1:  # one frame: its slice spacing is the scan's by construction
        volume = _with_slice_axis(volume, geometry)
    try:
        matched = volume.match_geometry(geometry)
    except RuntimeError as err:
        raise InputError(path, f"its frames are not on the voxel grid of {_name(scan)} (different orientation, "
                               f"spacing or positions between voxel centres): {one_line(err)}") from err
    array = matched.array
    return array >= _FRACTION_THRESHOLD if fractional else array > 0


def _with_slice_axis(volume: hd.Volume, geometry: hd.VolumeGeometry) -> hd.Volume:
    """A one-frame volume given the scan's axis along the frame's normal (its own is arbitrary)."""
    affine = volume.affine
    normal = np.cross(affine[:3, 1], affine[:3, 2])
    candidates = [geometry.affine[:3, i] for i in range(3)]
    best = max(candidates, key=lambda c: abs(np.dot(c, normal)) / (np.linalg.norm(c) * np.linalg.norm(normal)))
    affine[:3, 0] = best if np.dot(best, normal) > 0 else -best
    return hd.Volume(volume.array, affine, "PATIENT", frame_of_reference_uid=volume.frame_of_reference_uid)


def rtstruct_on_grid(path: PathLike, scan: MetaTensor, roi: str | int | None = None) -> np.ndarray:
    """The chosen ROI of an RTSTRUCT rasterised on the scan's grid: bool ``X x Y x Z`` (module docstring).

    Raises:
        InputError: unreadable file, several ROIs and no choice, an unknown ROI, an ROI without closed
            contours, another frame of reference, a contour off the scan's slices or outside it.
    """
    try:
        ds = pydicom.dcmread(path)
        rois = [(int(r.ROINumber), str(r.get("ROIName", ""))) for r in ds.StructureSetROISequence]
    except Exception as err:  # pydicom raises many types for a bad file
        raise InputError(path, f"cannot read this RTSTRUCT: {one_line(err)}") from err
    number = _choose(path, "ROI", rois, roi)
    roi_item = next(r for r in ds.StructureSetROISequence if int(r.ROINumber) == number)
    _check_frame_of_reference(path, roi_item.get("ReferencedFrameOfReferenceUID"), scan)
    contours = [c for item in ds.get("ROIContourSequence", []) if int(item.ReferencedROINumber) == number
                for c in item.get("ContourSequence", [])
                if str(c.get("ContourGeometricType", "CLOSED_PLANAR")) == "CLOSED_PLANAR"]
    if not contours:
        raise InputError(path, f"ROI {number} has no closed planar contour to rasterise")
    shape = tuple(int(s) for s in scan.shape[1:])
    world_to_index = np.linalg.inv(_RAS_TO_LPS @ np.asarray(scan.affine, dtype=np.float64))
    mask = np.zeros(shape, dtype=bool)
    for n, contour in enumerate(contours):
        points = np.asarray(contour.ContourData, dtype=np.float64).reshape(-1, 3)
        index = points @ world_to_index[:3, :3].T + world_to_index[:3, 3]
        flat = [a for a in range(3) if np.ptp(index[:, a]) <= _ON_SLICE_TOL]  # a point or a line: several
        axis = (2 if 2 in flat else flat[0]) if flat else int(np.argmin(np.ptp(index, axis=0)))
        level = float(np.mean(index[:, axis]))
        k = int(round(level))
        if np.ptp(index[:, axis]) > _ON_SLICE_TOL or abs(level - k) > _ON_SLICE_TOL or not 0 <= k < shape[axis]:
            raise InputError(path, f"contour {n + 1} of ROI {number} does not lie on a slice of {_name(scan)} "
                                   f"(index {level:.2f} along voxel axis {axis})")
        plane = [a for a in range(3) if a != axis]
        in_plane = np.zeros(tuple(shape[a] for a in plane), dtype=bool)
        rows, cols = index[:, plane[0]], index[:, plane[1]]
        vertices = np.rint(np.c_[rows, cols]).astype(int)
        if (vertices < 0).any() or (vertices >= in_plane.shape).any():
            raise InputError(path, f"contour {n + 1} of ROI {number} goes outside {_name(scan)}")
        if len(vertices) >= 3:
            rr, cc = polygon(rows, cols, in_plane.shape)
            in_plane[rr, cc] = True
        for (r0, c0), (r1, c1) in zip(vertices, np.roll(vertices, -1, axis=0)):  # the outline itself
            rr, cc = line(r0, c0, r1, c1)
            in_plane[rr, cc] = True
        target = [slice(None)] * 3
        target[axis] = k
        mask[tuple(target)] ^= in_plane
    return mask


def seg_nrrd_segments(image: sitk.Image) -> list[tuple[int, str, int, int]]:
    """Segments of a Slicer ``.seg.nrrd``: ``(number (1-based), name, label value, layer)``."""
    keys = set(image.GetMetaDataKeys())
    out = []
    i = 0
    while f"Segment{i}_ID" in keys or f"Segment{i}_Name" in keys:
        get = lambda k, default, i=i: image.GetMetaData(f"Segment{i}_{k}") if f"Segment{i}_{k}" in keys else default  # noqa: E731
        out.append((i + 1, get("Name", get("ID", f"Segment_{i + 1}")), int(get("LabelValue", 1)), int(get("Layer", 0))))
        i += 1
    return out


def _single_annotation_file(path: PathLike) -> PathLike:
    """A folder holding one DICOM file that is a SEG or an RTSTRUCT (a PACS export of one annotation): that file."""
    if not Path(path).is_dir():
        return path
    files = [f for f in sorted(Path(path).iterdir()) if f.is_file() and pydicom.misc.is_dicom(f)]
    return files[0] if len(files) == 1 and mask_kind(files[0]) != "image" else path


class ReadMask(Transform):
    """Read a lesion mask path onto the grid of a scan read by :class:`~c2f_med.io.transforms.ReadScan`.

    Returns a MetaTensor ``1 x X x Y x Z`` (uint8 0/1 for DICOM SEG / RTSTRUCT / .seg.nrrd; as read for other
    images) with the scan's affine and metadata for the grid, so MONAI's ``Orientation`` treats both alike.

    Args:
        segment: DICOM SEG / .seg.nrrd segment by number or name (default: the only one).
        roi: RTSTRUCT ROI by number or name (default: the only one).
    """

    def __init__(self, segment: str | int | None = None, roi: str | int | None = None):
        self.segment = segment
        self.roi = roi

    def __call__(self, path: PathLike, scan: MetaTensor, segment: str | int | None = None,
                 roi: str | int | None = None) -> MetaTensor:
        from c2f_med.io.transforms import ReadScan

        segment = self.segment if segment is None else segment
        roi = self.roi if roi is None else roi
        if not Path(path).exists():
            raise InputError(path, "no such file or folder")
        path = _single_annotation_file(path)
        kind = mask_kind(path)
        if kind == "image":
            return ReadScan(allow_constant=True)(path)
        if kind == "seg":
            mask = seg_on_grid(path, scan, segment)
        elif kind == "rtstruct":
            mask = rtstruct_on_grid(path, scan, roi)
        else:
            return self._seg_nrrd(path, segment)
        return self._on_scan_grid(mask, path, scan)

    @staticmethod
    def _on_scan_grid(mask: np.ndarray, path: PathLike, scan: MetaTensor) -> MetaTensor:
        meta = {k: v for k, v in scan.meta.items() if k in (MetaKeys.AFFINE, MetaKeys.ORIGINAL_AFFINE,
                                                            MetaKeys.SPATIAL_SHAPE, MetaKeys.SPACE,
                                                            MetaKeys.ORIGINAL_CHANNEL_DIM, "spacing")}
        meta["filename_or_obj"] = str(path)
        return MetaTensor(torch.as_tensor(mask[None].astype(np.uint8)), affine=scan.affine.clone(), meta=meta)

    def _seg_nrrd(self, path: PathLike, segment: str | int | None) -> MetaTensor:
        from c2f_med.io.transforms import ReadScan

        try:
            header = sitk.ImageFileReader()
            header.SetFileName(os.fspath(path))
            header.ReadImageInformation()
        except Exception as err:  # SimpleITK raises RuntimeError with several lines
            raise InputError(path, f"cannot read this segmentation: {one_line(err)}") from err
        segments = seg_nrrd_segments(header)
        if not segments:
            return ReadScan(allow_constant=True)(path)
        number = _choose(path, "segment", [(n, name) for n, name, _, _ in segments], segment)
        _, _, label, layer = segments[number - 1]
        try:
            loader = LoadImage(image_only=True, ensure_channel_first=True, dtype=np.float32)
            img = loader(path, reader=SimpleITKReader())
        except Exception as err:  # SimpleITK raises RuntimeError with several lines
            raise InputError(path, f"cannot read this segmentation: {one_line(err)}") from err
        if not 0 <= layer < img.shape[0]:
            raise InputError(path, f"segment {number} is on layer {layer}, but the file has {img.shape[0]} layer(s)")
        out = (img[layer:layer + 1] == label).to(torch.uint8)
        return MetaTensor(out.as_tensor(), meta=img.meta)


class ReadMaskd(MapTransform):
    """Dictionary version of :class:`ReadMask`: each mask key's path is read onto the grid of ``scan_key``'s
    image (already read). The data's ``"segment"`` and ``"roi"`` values, when present, override the defaults."""

    def __init__(self, keys: KeysCollection, scan_key: str = "image", segment: str | int | None = None,
                 roi: str | int | None = None, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.scan_key = scan_key
        self.reader = ReadMask(segment, roi)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.reader(d[key], d[self.scan_key], d.get("segment"), d.get("roi"))
        return d
