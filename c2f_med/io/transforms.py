"""Scan loading, geometry checks and intensity presets as MONAI transforms.

A scan path (DICOM series folder, single DICOM file, NIfTI, MHA/NRRD/...) becomes a MetaTensor
``1 x X x Y x Z`` (float32) oriented to RAS, optionally resampled to a given spacing. MONAI's
``Orientation``/``Spacing`` record what they did in ``applied_operations`` and keep
``original_affine``/``spatial_shape``, so a map computed on the loaded grid can be put back on the
input file's own grid (:func:`to_original_grid`, or MONAI's ``Invertd`` with the ``Compose`` from
:func:`load_case_transforms`).

Every problem with the input raises :class:`~c2f_med.errors.InputError` naming the file.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection, PathLike
from monai.data import MetaTensor
from monai.data.utils import to_affine_nd
from monai.transforms import (
    Compose,
    LoadImage,
    MapTransform,
    Orientation,
    Orientationd,
    ScaleIntensityRange,
    Spacing,
    Spacingd,
    SpatialResample,
    Transform,
)
from monai.utils import MetaKeys, ensure_tuple, ensure_tuple_rep

from c2f_med.errors import InputError
from c2f_med.io.annotations import ReadMaskd
from c2f_med.io.readers import MODALITY_TAG, one_line, reader_for, scan_kind

__all__ = [
    "CT_WINDOWS",
    "ReadScan",
    "ReadScand",
    "LoadScan",
    "check_same_grid",
    "CheckSameGridd",
    "CTWindow",
    "CTWindowd",
    "MRPercentileNorm",
    "MRPercentileNormd",
    "IntensityPreset",
    "IntensityPresetd",
    "looks_like_ct",
    "BinarizeMask",
    "BinarizeMaskd",
    "to_original_grid",
    "load_case_transforms",
]

#: Named CT windows in HU as (level, width).
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "soft_tissue": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
}

_KIND_NAMES = {
    "dicom_series": "a DICOM series",
    "dicom_file": "a DICOM file",
    "nifti": "a NIfTI file",
    "itk": "an ITK image",
}


class ReadScan(Transform):
    """Read a scan path into a MetaTensor ``1 x X x Y x Z`` on the file's own voxel grid.

    The reader follows the path's kind (:func:`~c2f_med.io.readers.scan_kind`): a folder is a
    DICOM series, ``.dcm`` or the DICM magic a DICOM file, ``.nii``/``.nii.gz`` NIfTI (nibabel),
    ITK suffixes SimpleITK. The affine is in RAS (MONAI's convention); a 2D image (e.g. one DICOM
    slice) becomes a one-slice volume ``1 x X x Y x 1``.

    Args:
        series_uid: SeriesInstanceUID to read from a DICOM folder holding several series.
        stack: 1-based stack of a multi-frame DICOM image holding several (see :mod:`c2f_med.io.multiframe`).
        allow_2d: accept a 2D image as a one-slice volume; if False it raises InputError.
        allow_constant: accept a volume whose voxels all have one value (an empty mask); if False
            (scans) it raises InputError.

    Raises:
        InputError: missing path, unsupported type, unreadable or corrupt file, empty folder,
            several DICOM series, a 4D (several volumes or channels) image, NaN or infinite
            voxels, a constant volume.
    """

    def __init__(self, series_uid: str | None = None, allow_2d: bool = True, allow_constant: bool = False,
                 stack: int | None = None):
        self.series_uid = series_uid
        self.stack = stack
        self.allow_2d = allow_2d
        self.allow_constant = allow_constant
        self.loader = LoadImage(image_only=True, dtype=np.float32, ensure_channel_first=True)

    def __call__(self, path: PathLike) -> MetaTensor:
        kind = scan_kind(path)
        try:
            img = self.loader(path, reader=reader_for(kind, self.series_uid, self.stack))
        except InputError:
            raise
        except Exception as err:  # the readers' libraries raise many types for a bad file
            raise InputError(path, f"cannot read it as {_KIND_NAMES[kind]}: {one_line(err)}") from err
        img = self._ensure_3d(path, img)
        _check_values(path, img, self.allow_constant)
        return img

    def _ensure_3d(self, path: PathLike, img: MetaTensor) -> MetaTensor:
        shape = tuple(img.shape[1:])
        if img.shape[0] > 1:
            raise InputError(
                path, f"4D image ({img.shape[0]} volumes or channels of {_fmt(shape)}); expected one 3D volume"
            )
        if len(shape) > 3:
            raise InputError(path, f"{len(shape)}D image ({_fmt(shape)}); expected one 3D volume")
        if len(shape) < 2 or min(shape) < 1:
            raise InputError(path, f"not an image volume (shape {_fmt(shape)})")
        if len(shape) == 3:
            return img
        if not self.allow_2d:
            raise InputError(path, f"2D image ({_fmt(shape)}); a 3D volume is needed")
        # one slice: X x Y -> X x Y x 1 with a 4 x 4 affine (readers give 4 x 4 or 3 x 3 for 2D)
        volume = img.unsqueeze(-1)
        volume.affine = to_affine_nd(3, img.affine)
        volume.meta[MetaKeys.ORIGINAL_AFFINE] = to_affine_nd(3, np.asarray(img.meta[MetaKeys.ORIGINAL_AFFINE]))
        volume.meta[MetaKeys.SPATIAL_SHAPE] = np.asarray((*shape, 1))
        return volume


class ReadScand(MapTransform):
    """Dictionary version of :class:`ReadScan`: each key holds a path, replaced by its MetaTensor.

    ``allow_constant`` may be given per key (e.g. ``[False, True]`` for image and mask). A ``"stack"``
    value in the data (a datalist item's) overrides ``stack``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        series_uid: str | None = None,
        allow_2d: bool = True,
        allow_constant: Sequence[bool] | bool = False,
        allow_missing_keys: bool = False,
        stack: int | None = None,
    ):
        super().__init__(keys, allow_missing_keys)
        flags = ensure_tuple_rep(allow_constant, len(self.keys))
        self.readers = {key: ReadScan(series_uid, allow_2d, flag, stack) for key, flag in zip(self.keys, flags)}

    def __call__(self, data: Mapping[Hashable, PathLike]) -> dict:
        d = dict(data)
        stack = d.get("stack")  # a datalist item may choose the stack of its multi-frame image
        for key in self.key_iterator(d):
            reader = self.readers[key]
            if stack is not None:
                reader = ReadScan(reader.series_uid, reader.allow_2d, reader.allow_constant, int(stack))
            d[key] = reader(d[key])
        return d


class LoadScan(Transform):
    """Load a scan path into a float32 MetaTensor ``1 x X x Y x Z`` oriented to RAS.

    :class:`ReadScan`, then MONAI ``Orientation("RAS")`` and, when ``spacing`` is given,
    ``Spacing(spacing)``. The result keeps ``original_affine``, ``spatial_shape`` and
    ``applied_operations`` for :func:`to_original_grid`.

    Args:
        spacing: output voxel size in mm (one value or three); None keeps the file's voxels.
        mode: interpolation for the resampling ("bilinear" for scans, "nearest" for masks).
        series_uid, allow_2d, allow_constant, stack: as in :class:`ReadScan`.
    """

    def __init__(
        self,
        spacing: Sequence[float] | float | None = None,
        mode: str = "bilinear",
        series_uid: str | None = None,
        allow_2d: bool = True,
        allow_constant: bool = False,
        stack: int | None = None,
    ):
        self.read = ReadScan(series_uid, allow_2d, allow_constant, stack)
        self.orient = Orientation(axcodes="RAS", labels=None)
        self.resample = None if spacing is None else Spacing(pixdim=spacing, mode=mode)

    def __call__(self, path: PathLike) -> MetaTensor:
        img = self.orient(self.read(path))
        return img if self.resample is None else self.resample(img)


def check_same_grid(scan: MetaTensor, mask: MetaTensor, atol_mm: float = 1e-3, atol_linear: float = 1e-4) -> None:
    """Raise InputError unless ``mask`` (C x X x Y x Z) lies on the voxel grid of ``scan``.

    The grids match when the spatial shapes are equal and the affines agree within ``atol_mm``
    on the translation column and within ``atol_linear`` on the 3 x 3 part (direction times
    spacing). The error names both files and what differs.
    """
    scan_path = scan.meta.get("filename_or_obj", "the scan")
    mask_path = mask.meta.get("filename_or_obj", "the mask")
    scan_shape, mask_shape = tuple(scan.shape[1:]), tuple(mask.shape[1:])
    if scan_shape != mask_shape:
        raise InputError(
            mask_path, f"not on the grid of {scan_path}: shape {_fmt(mask_shape)} vs {_fmt(scan_shape)} (RAS voxels)"
        )
    diff = np.abs(np.asarray(mask.affine, dtype=float) - np.asarray(scan.affine, dtype=float))
    linear, translation = diff[:3, :3].max(), diff[:3, 3].max()
    if translation > atol_mm or linear > atol_linear:
        raise InputError(
            mask_path,
            f"not on the grid of {scan_path}: affines differ by up to {translation:.4g} mm in the origin "
            f"(tolerance {atol_mm:g}) and {linear:.4g} in direction x spacing (tolerance {atol_linear:g})",
        )


class CheckSameGridd(MapTransform):
    """Check that every key's image lies on the grid of the first key's (see :func:`check_same_grid`).

    Keys that are missing (e.g. no mask for inference) are skipped when ``allow_missing_keys``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        atol_mm: float = 1e-3,
        atol_linear: float = 1e-4,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.atol_mm = atol_mm
        self.atol_linear = atol_linear

    def __call__(self, data: Mapping[Hashable, MetaTensor]) -> Mapping[Hashable, MetaTensor]:
        reference = self.keys[0]
        for key in self.key_iterator(data):
            if key != reference:
                check_same_grid(data[reference], data[key], self.atol_mm, self.atol_linear)
        return data


class CTWindow(Transform):
    """CT window: HU in [level - width/2, level + width/2] mapped linearly to [0, 1], clipped.

    Args:
        window: a name in :data:`CT_WINDOWS` ("brain" W80/L40, "soft_tissue" W400/L40,
            "lung" W1500/L-600, "bone" W1800/L400) or ``[level, width]`` in HU.
    """

    def __init__(self, window: str | Sequence[float] = "soft_tissue"):
        if isinstance(window, str):
            if window not in CT_WINDOWS:
                expected = f"one of {', '.join(CT_WINDOWS)} or [level, width]"
                raise ValueError(f"unknown CT window {window!r}; expected {expected}")
            window = CT_WINDOWS[window]
        level, width = (float(v) for v in window)
        if width <= 0:
            raise ValueError(f"CT window width must be positive, got {width}")
        self.level, self.width = level, width
        self.scale = ScaleIntensityRange(level - width / 2, level + width / 2, 0.0, 1.0, clip=True)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        out = self.scale(img)
        if isinstance(out, MetaTensor):
            out.meta["intensity_preset"] = f"ct_window(level={self.level:g}, width={self.width:g})"
        return out


class MRPercentileNorm(Transform):
    """MR normalisation: the ``lower``..``upper`` percentiles of the nonzero voxels map to ``[0, top]``,
    then everything is clipped to [0, 1].

    ``p_lo, p_hi = percentile(img[img != 0], (lower, upper))``;
    ``out = clip(top * (img - p_lo) / (p_hi - p_lo), 0, 1)``. If the two percentiles coincide, the
    image's min and max are used instead.

    ``top < 1`` leaves headroom above the upper percentile: voxels up to ``(1 / top - 1)`` of the
    percentile range brighter than ``p_hi`` keep their contrast. With ``top = 1`` (plain percentile
    scaling) a hyperintense lesion - a few hundredths of a percent of the voxels, so above
    ``p_hi`` - is clipped to the brightest tissue's value and looks like it (an FLAIR lesion like
    grey matter, a T1 one like white matter). The default ``top = 2/3`` keeps lesions up to half the
    percentile range brighter than ``p_hi``.
    """

    def __init__(self, lower: float = 0.5, upper: float = 99.5, top: float = 2 / 3):
        if not 0.0 <= lower < upper <= 100.0:
            raise ValueError(f"need 0 <= lower < upper <= 100, got {lower}, {upper}")
        if not 0.0 < top <= 1.0:
            raise ValueError(f"need 0 < top <= 1, got {top}")
        self.lower, self.upper, self.top = lower, upper, top

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        values = torch.as_tensor(img).detach().cpu().numpy().ravel()
        nonzero = values[values != 0]
        lo, hi = np.percentile(nonzero if nonzero.size else values, (self.lower, self.upper))
        if hi <= lo:
            lo, hi = values.min(), values.max()
        out = ScaleIntensityRange(float(lo), float(hi), 0.0, self.top, clip=False)(img).clamp(0.0, 1.0)
        if isinstance(out, MetaTensor):
            out.meta["intensity_preset"] = (
                f"mr_percentiles(lower={self.lower:g}, upper={self.upper:g}, top={self.top:.4g})"
            )
        return out


class IntensityPreset(Transform):
    """Intensity normalisation to [0, 1] chosen by name.

    Args:
        preset: "ct" (CT window ``ct_window``), "mr" (:class:`MRPercentileNorm`), a CT window name
            from :data:`CT_WINDOWS`, ``[level, width]``, or "auto": CT when the DICOM Modality
            (metadata key "00080060") is CT; when there is no Modality, CT if the values look
            like HU (min < -500); MR otherwise.
        ct_window: the window used by "ct" and by "auto" when it picks CT.
        lower, upper: percentiles used by "mr" and by "auto" when it picks MR.
    """

    def __init__(
        self,
        preset: str | Sequence[float] = "auto",
        ct_window: str | Sequence[float] = "soft_tissue",
        lower: float = 0.5,
        upper: float = 99.5,
    ):
        if isinstance(preset, str) and preset not in ("auto", "ct", "mr", *CT_WINDOWS):
            expected = f"auto, ct, mr, {', '.join(CT_WINDOWS)} or [level, width]"
            raise ValueError(f"unknown preset {preset!r}; expected {expected}")
        self.mr = MRPercentileNorm(lower, upper)
        self.ct = CTWindow(ct_window)
        if preset in ("auto", "ct", "mr"):
            self.fixed = {"auto": None, "ct": self.ct, "mr": self.mr}[preset]
        else:
            self.fixed = CTWindow(preset)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        transform = self.fixed or (self.ct if looks_like_ct(img) else self.mr)
        return transform(img)


def looks_like_ct(img: torch.Tensor) -> bool:
    """CT when the DICOM Modality in ``img.meta`` says so; without a Modality, when min < -500 (HU of air)."""
    meta = img.meta if isinstance(img, MetaTensor) else {}
    modality = meta.get(MODALITY_TAG, {}).get("Value", [None])[0]
    if modality:
        return str(modality).upper() == "CT"
    return float(img.min()) < -500.0


class CTWindowd(MapTransform):
    """Dictionary version of :class:`CTWindow`."""

    def __init__(
        self, keys: KeysCollection, window: str | Sequence[float] = "soft_tissue", allow_missing_keys: bool = False
    ):
        super().__init__(keys, allow_missing_keys)
        self.transform = CTWindow(window)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        return _apply(self, data)


class MRPercentileNormd(MapTransform):
    """Dictionary version of :class:`MRPercentileNorm`."""

    def __init__(
        self,
        keys: KeysCollection,
        lower: float = 0.5,
        upper: float = 99.5,
        top: float = 2 / 3,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.transform = MRPercentileNorm(lower, upper, top)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        return _apply(self, data)


class IntensityPresetd(MapTransform):
    """Dictionary version of :class:`IntensityPreset`."""

    def __init__(
        self,
        keys: KeysCollection,
        preset: str | Sequence[float] = "auto",
        ct_window: str | Sequence[float] = "soft_tissue",
        lower: float = 0.5,
        upper: float = 99.5,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.transform = IntensityPreset(preset, ct_window, lower, upper)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        return _apply(self, data)


class BinarizeMask(Transform):
    """Lesion mask to binary: ``(img > 0)`` as uint8, metadata kept."""

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        out = (torch.as_tensor(img) > 0).to(torch.uint8)
        if isinstance(img, MetaTensor):
            out = MetaTensor(out, meta=img.meta, applied_operations=img.applied_operations)
        return out


class BinarizeMaskd(MapTransform):
    """Dictionary version of :class:`BinarizeMask`."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.transform = BinarizeMask()

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        return _apply(self, data)


def to_original_grid(volume_ras: torch.Tensor, reference: MetaTensor, mode: str = "bilinear") -> np.ndarray:
    """Resample a map on ``reference``'s grid back onto the grid of the file ``reference`` was read from.

    Args:
        volume_ras: ``C x X x Y x Z`` or ``X x Y x Z``, on the grid of ``reference`` (same spatial
            shape; typically a saliency computed on the loaded, RAS-oriented volume).
        reference: the loaded scan (e.g. from :class:`LoadScan`): its ``affine`` is the grid of
            ``volume_ras``; ``original_affine`` and ``spatial_shape`` describe the file's grid.
        mode: interpolation ("bilinear", or "nearest" for labels). A pure re-orientation maps
            voxel centres onto voxel centres, so it is exact in either mode.

    Returns:
        array of the file's spatial shape ``X0 x Y0 x Z0`` (with the leading channel axis if
        ``volume_ras`` had one), to be saved with ``reference.meta["original_affine"]``.
    """
    volume = volume_ras.as_tensor() if isinstance(volume_ras, MetaTensor) else torch.as_tensor(volume_ras)
    volume = volume.detach().cpu().float()
    has_channel = volume.ndim == 4
    if volume.shape[-3:] != reference.shape[-3:]:
        raise ValueError(f"volume shape {tuple(volume.shape)} is not on the reference grid {tuple(reference.shape)}")
    src = MetaTensor(volume if has_channel else volume[None], affine=reference.affine.clone().double())
    dst_affine = torch.as_tensor(np.asarray(reference.meta[MetaKeys.ORIGINAL_AFFINE]), dtype=torch.float64)
    shape = tuple(int(s) for s in np.asarray(reference.meta[MetaKeys.SPATIAL_SHAPE]))
    out = SpatialResample(mode=mode, padding_mode="border", dtype=torch.float64)(
        src, dst_affine=dst_affine, spatial_size=shape
    )
    array = out.detach().cpu().numpy().astype(np.float32)
    return array if has_channel else array[0]


def load_case_transforms(
    keys: Sequence[str] = ("image", "label"),
    preset: str | Sequence[float] = "auto",
    spacing: Sequence[float] | float | None = None,
    series_uid: str | None = None,
    ct_window: str | Sequence[float] = "soft_tissue",
    stack: int | None = None,
    segment: str | int | None = None,
    roi: str | int | None = None,
) -> Compose:
    """Dictionary pipeline for a case ``{"image": path, "label": path (optional)}``.

    ``keys[0]`` is the scan; the other keys are lesion masks (optional in the data), in any format
    :class:`~c2f_med.io.annotations.ReadMask` reads (NIfTI / MHA / NRRD on the scan's grid, .seg.nrrd,
    DICOM SEG, RTSTRUCT). ``stack`` picks the stack of a multi-frame DICOM scan, ``segment`` / ``roi``
    the segment of a SEG or .seg.nrrd / the ROI of an RTSTRUCT; a case's own ``"stack"``, ``"segment"``
    and ``"roi"`` values (datalist item keys) take precedence. Steps:
    :class:`ReadScand` -> :class:`~c2f_med.io.annotations.ReadMaskd` -> ``Orientationd("RAS")`` ->
    :class:`CheckSameGridd` (masks on the scan's
    grid) -> ``Spacingd`` (when ``spacing``; bilinear for the scan, nearest for masks) ->
    :class:`IntensityPresetd` on the scan -> :class:`BinarizeMaskd` on the masks.
    The result: ``image`` float32 ``1 x X x Y x Z`` in [0, 1], masks uint8 on the same grid.
    All arguments are JSON values, so a bundle config can build it with ``_target_``;
    ``Invertd(keys=..., transform=<this Compose>, orig_keys=keys[0])`` undoes the spatial steps.
    """
    keys = list(ensure_tuple(keys))
    image, masks = keys[0], keys[1:]
    steps: list = [ReadScand(image, series_uid=series_uid, stack=stack)]
    if masks:
        steps.append(ReadMaskd(masks, scan_key=image, segment=segment, roi=roi, allow_missing_keys=True))
    steps += [
        Orientationd(keys, axcodes="RAS", labels=None, allow_missing_keys=True),
        CheckSameGridd(keys, allow_missing_keys=True),
    ]
    if spacing is not None:
        modes = ["bilinear"] + ["nearest"] * len(masks)
        steps.append(Spacingd(keys, pixdim=spacing, mode=modes, allow_missing_keys=True))
    steps.append(IntensityPresetd(image, preset=preset, ct_window=ct_window))
    if masks:
        steps.append(BinarizeMaskd(masks, allow_missing_keys=True))
    return Compose(steps)


def _apply(transform: MapTransform, data: Mapping[Hashable, torch.Tensor]) -> dict:
    d = dict(data)
    for key in transform.key_iterator(d):
        d[key] = transform.transform(d[key])
    return d


def _check_values(path: PathLike, img: torch.Tensor, allow_constant: bool) -> None:
    bad = int((~torch.isfinite(img)).sum())
    if bad:
        raise InputError(path, f"{bad} voxels are NaN or infinite")
    if not allow_constant and bool(img.min() == img.max()):
        raise InputError(path, f"all voxels have the same value ({float(img.min()):g}): the volume is empty")


def _fmt(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)
