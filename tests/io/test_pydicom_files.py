"""Every DICOM test file pydicom (and pydicom-data, when installed) ships in a compressed, big-endian,
deflated or multi-frame encoding: read as a scan with the geometry its header gives, or refused in one
line that names the file. None of these files was written by this project."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data.data_manager import DATA_ROOT, get_external_sources
from pydicom.uid import UID

from c2f_med.errors import InputError
from c2f_med.io.multiframe import frame_geometry, is_multiframe
from c2f_med.io.transforms import ReadScan

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def _all_test_files() -> list[Path]:
    """pydicom's own test files and those of its external data sources (no download)."""
    roots = [Path(DATA_ROOT) / "test_files"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        roots += [Path(source.data_path) for source in get_external_sources().values()]
    return sorted({p.name: p for root in roots for p in root.rglob("*.dcm")}.values())


def _is_special(path: Path) -> bool:
    """Pixel data in a compressed, big-endian or deflated syntax, or several frames."""
    try:
        ds = pydicom.dcmread(path, defer_size="1 KB")
        syntax = UID(ds.file_meta.TransferSyntaxUID)
    except Exception:
        return False
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        return False
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 1
    return frames > 1 or syntax.is_compressed or not syntax.is_little_endian or syntax.is_deflated


FILES = [p for p in _all_test_files() if _is_special(p)]
BY_NAME = {p.name: p for p in FILES}

#: multi-frame MR and CT volumes: they must load
MULTIFRAME_VOLUMES = ["emri_small.dcm", "emri_small_RLE.dcm", "emri_small_big_endian.dcm",
                      "emri_small_jpeg_2k_lossless.dcm", "emri_small_jpeg_ls_lossless.dcm", "eCT_Supplemental.dcm"]
#: lossless encodings of one image: same voxels as the first
LOSSLESS_FAMILIES = [
    ["emri_small.dcm", "emri_small_RLE.dcm", "emri_small_big_endian.dcm", "emri_small_jpeg_2k_lossless.dcm",
     "emri_small_jpeg_ls_lossless.dcm"],
    ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small_bigendian.dcm", "MR_small_expb.dcm", "MR_small_jp2klossless.dcm",
     "MR_small_jpeg_ls_lossless.dcm"],
]


def test_the_test_files_are_there():
    assert len(FILES) >= 40, [p.name for p in FILES]
    for name in MULTIFRAME_VOLUMES:
        if name.startswith("emri") and name not in BY_NAME:
            pytest.skip("pydicom-data is not installed")
        assert name in BY_NAME


def _expected_affine_columns(ds: pydicom.Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(column step, row step, origin) in RAS from a single-frame header's geometry, None without it."""
    if not all(k in ds for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")):
        return None
    u, v = np.asarray(ds.ImageOrientationPatient, dtype=float).reshape(2, 3)
    dr, dc = (float(s) for s in ds.PixelSpacing)
    return LPS_TO_RAS @ (u * dc), LPS_TO_RAS @ (v * dr), LPS_TO_RAS @ np.asarray(ds.ImagePositionPatient, float)


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_read_with_its_geometry_or_refused_in_one_line(path):
    try:
        img = ReadScan()(path)
    except InputError as err:
        message = str(err)
        assert "\n" not in message and str(path) in message
        assert path.name not in MULTIFRAME_VOLUMES, message
        if "decode" in message:  # a plugin failure names the encoding
            assert "pixel data encoded as" in message, message
        return
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert img.ndim == 4 and img.shape[0] == 1
    assert int(ds.get("SamplesPerPixel", 1)) == 1
    affine = img.affine.numpy()
    rows, columns = int(ds.Rows), int(ds.Columns)
    assert tuple(img.shape[1:3]) == (columns, rows)
    assert bool(np.isfinite(img.numpy()).all())
    if is_multiframe(ds):
        geometry = frame_geometry(path, ds) if "PerFrameFunctionalGroupsSequence" in ds else None
        assert img.shape[3] == int(ds.NumberOfFrames)
        if geometry is not None:
            u, v = np.asarray(geometry[0].orientation).reshape(2, 3)
            dr, dc = geometry[0].spacing
            np.testing.assert_allclose(affine[:3, 0], LPS_TO_RAS @ (u * dc), atol=1e-4)
            np.testing.assert_allclose(affine[:3, 1], LPS_TO_RAS @ (v * dr), atol=1e-4)
            origins = [LPS_TO_RAS @ np.asarray(g.position) for g in geometry]
            assert min(np.abs(o - affine[:3, 3]).max() for o in origins) < 1e-3  # the origin is a frame's position
        else:  # no plane geometry at all: frames in file order, SpacingBetweenSlices apart
            np.testing.assert_allclose(np.abs(np.diag(affine)[:3]), [1, 1, float(ds.SpacingBetweenSlices)])
        return
    expected = _expected_affine_columns(ds)
    if expected is not None:
        for column, value in enumerate(expected[:2]):
            np.testing.assert_allclose(affine[:3, column], value, atol=1e-4)
        np.testing.assert_allclose(affine[:3, 3], expected[2], atol=1e-3)
    else:  # no position or orientation: PixelSpacing (when positive) or 1 mm
        spacing = [float(s) if float(s) > 0 else 1.0 for s in ds.get("PixelSpacing", [1.0, 1.0])]
        np.testing.assert_allclose(np.linalg.norm(affine[:3, :2], axis=0), spacing[::-1], atol=1e-6)


@pytest.mark.parametrize("family", LOSSLESS_FAMILIES, ids=[f[0] for f in LOSSLESS_FAMILIES])
def test_lossless_encodings_give_the_same_volume(family):
    missing = [n for n in family if n not in BY_NAME and not (Path(DATA_ROOT) / "test_files" / n).exists()]
    if missing:
        pytest.skip(f"not installed: {missing}")
    paths = [BY_NAME.get(n, Path(DATA_ROOT) / "test_files" / n) for n in family]
    reference = ReadScan()(paths[0])
    for path in paths[1:]:
        img = ReadScan()(path)
        np.testing.assert_allclose(img.affine.numpy(), reference.affine.numpy(), atol=1e-6)
        np.testing.assert_array_equal(img.numpy(), reference.numpy())


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "emri_small_RLE.dcm"])
def test_an_undecodable_transfer_syntax_is_named(name, monkeypatch):
    """With no plugin for RLE (as on a machine without the decoders), the message names the syntax."""
    from types import SimpleNamespace

    import c2f_med.io.multiframe as multiframe

    path = BY_NAME.get(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    monkeypatch.setattr(multiframe, "get_decoder", lambda uid: SimpleNamespace(is_available=False))
    with pytest.raises(InputError, match=rf"{name}: cannot decode pixel data encoded as RLE Lossless "
                                         r"\(1\.2\.840\.10008\.1\.2\.5\): no installed decoder"):
        ReadScan()(path)
