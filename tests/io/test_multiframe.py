"""Enhanced multi-frame DICOM images: made from a classic series with highdicom's legacy conversion, they
must load onto the series' grid with the series' values; several stacks and uneven frames are refused."""

from __future__ import annotations

import copy
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import RLELossless

from c2f_med.errors import InputError
from c2f_med.io.multiframe import find_stacks, read_multiframe
from c2f_med.io.transforms import LoadScan, ReadScan
from c2f_med.synth.writers import write_dicom_series
from tests.export.conftest import oblique_affine

SHAPE = (12, 10, 6)


def classic_series(folder: Path, seed: int = 0) -> list[Dataset]:
    volume = np.random.default_rng(seed).integers(0, 1000, size=SHAPE).astype(np.int16)
    write_dicom_series(folder, volume, oblique_affine(), case_id="multiframe-test")
    return [pydicom.dcmread(f) for f in sorted(folder.iterdir())]


def legacy_converted(datasets: list[Dataset], path: Path, transfer_syntax=None) -> Path:
    """The series as one Legacy Converted Enhanced MR image (highdicom), optionally compressed."""
    kwargs = {} if transfer_syntax is None else {"transfer_syntax_uid": transfer_syntax}
    image = hd.legacy.LegacyConvertedEnhancedMRImage(datasets, hd.UID(), 5, hd.UID(), 1, **kwargs)
    image.save_as(path)
    return path


@pytest.fixture
def series_and_multiframe(tmp_path) -> tuple[Path, Path, Path]:
    datasets = classic_series(tmp_path / "series")
    plain = legacy_converted(datasets, tmp_path / "enhanced.dcm")
    rle = legacy_converted(datasets, tmp_path / "enhanced_rle.dcm", RLELossless)
    return tmp_path / "series", plain, rle


def test_multiframe_loads_onto_the_series_grid_with_the_same_values(series_and_multiframe):
    series, plain, rle = series_and_multiframe
    assert pydicom.dcmread(rle, stop_before_pixels=True).file_meta.TransferSyntaxUID == RLELossless
    reference = LoadScan()(series)
    for path in (plain, rle):
        img = LoadScan()(path)
        assert img.shape == reference.shape
        np.testing.assert_allclose(img.affine.numpy(), reference.affine.numpy(), atol=1e-4)
        np.testing.assert_array_equal(img.numpy(), reference.numpy())
        assert img.meta["00080060"]["Value"] == ["MR"]


def test_frames_are_sorted_along_the_normal_whatever_their_order_in_the_file(series_and_multiframe, tmp_path):
    series, plain, _ = series_and_multiframe
    ds = pydicom.dcmread(plain)
    frames = ds.pixel_array
    order = [3, 0, 5, 1, 4, 2] + list(range(6, len(frames)))
    ds.PixelData = np.ascontiguousarray(frames[order]).tobytes()
    ds.PerFrameFunctionalGroupsSequence = Sequence([ds.PerFrameFunctionalGroupsSequence[i] for i in order])
    ds.save_as(tmp_path / "shuffled.dcm")
    reference, img = LoadScan()(series), LoadScan()(tmp_path / "shuffled.dcm")
    np.testing.assert_allclose(img.affine.numpy(), reference.affine.numpy(), atol=1e-4)
    np.testing.assert_array_equal(img.numpy(), reference.numpy())


def test_each_frame_gets_its_own_rescale(series_and_multiframe, tmp_path):
    series, plain, _ = series_and_multiframe
    ds = pydicom.dcmread(plain)
    item = Dataset()
    item.RescaleSlope, item.RescaleIntercept, item.RescaleType = 2, -10, "US"
    ds.PerFrameFunctionalGroupsSequence[2].PixelValueTransformationSequence = Sequence([item])
    ds.save_as(tmp_path / "rescaled.dcm")
    volume = read_multiframe(tmp_path / "rescaled.dcm")
    stored = pydicom.dcmread(plain).pixel_array
    position = volume.frames.index(3)
    np.testing.assert_array_equal(volume.array[position], stored[2] * 2.0 - 10)
    others = [i for i, f in enumerate(volume.frames) if f != 3]
    np.testing.assert_array_equal(volume.array[others], stored[[volume.frames[i] - 1 for i in others]])


def two_stacks(plain: Path, path: Path) -> Path:
    """The image twice over, the copy's frames marked StackID 2 and holding the values + 100."""
    ds = pydicom.dcmread(plain)
    frames = ds.pixel_array
    groups = list(ds.PerFrameFunctionalGroupsSequence)
    copies = [copy.deepcopy(g) for g in groups]
    for stack_id, items in (("1", groups), ("2", copies)):
        for number, item in enumerate(items, start=1):
            content = Dataset()
            content.StackID, content.InStackPositionNumber = stack_id, number
            item.FrameContentSequence = Sequence([content])
    ds.PerFrameFunctionalGroupsSequence = Sequence(groups + copies)
    ds.PixelData = np.concatenate([frames, frames + 100]).astype(frames.dtype).tobytes()
    ds.NumberOfFrames = 2 * len(frames)
    ds.save_as(path)
    return path


def test_several_stacks_are_listed_and_one_can_be_chosen(series_and_multiframe, tmp_path):
    series, plain, _ = series_and_multiframe
    path = two_stacks(plain, tmp_path / "stacks.dcm")
    stacks = find_stacks(path, pydicom.dcmread(path, stop_before_pixels=True))
    assert [len(s.frames) for s in stacks] == [SHAPE[2], SHAPE[2]]
    with pytest.raises(InputError, match=r"2 stacks .*--stack: stack 1 \(StackID 1, 6 frames.*stack 2 \(StackID 2"):
        ReadScan()(path)
    reference = LoadScan()(series)
    np.testing.assert_array_equal(LoadScan(stack=1)(path).numpy(), reference.numpy())
    np.testing.assert_array_equal(LoadScan(stack=2)(path).numpy(), reference.numpy() + 100)
    with pytest.raises(InputError, match="no stack 3"):
        ReadScan(stack=3)(path)


def test_uneven_or_repeated_frames_are_refused(series_and_multiframe, tmp_path):
    _, plain, _ = series_and_multiframe
    ds = pydicom.dcmread(plain)
    position = ds.PerFrameFunctionalGroupsSequence[2].PlanePositionSequence[0]
    normal = np.cross(*np.asarray(ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
                                  .ImageOrientationPatient, dtype=float).reshape(2, 3))
    position.ImagePositionPatient = [f"{v:.6f}" for v in np.asarray(position.ImagePositionPatient) + 0.7 * normal]
    ds.save_as(tmp_path / "uneven.dcm")
    with pytest.raises(InputError, match="not parallel, equally spaced slices") as err:
        ReadScan()(tmp_path / "uneven.dcm")
    assert "\n" not in str(err.value) and "uneven.dcm" in str(err.value)


def test_a_tilted_frame_is_not_silently_stacked(series_and_multiframe, tmp_path):
    _, plain, _ = series_and_multiframe
    ds = pydicom.dcmread(plain)
    shared = ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence
    for n, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        item.PlaneOrientationSequence = copy.deepcopy(shared)
        if n == 4:
            item.PlaneOrientationSequence[0].ImageOrientationPatient = [1, 0, 0, 0, 0.9950042, 0.0998334]
    del ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence
    ds.save_as(tmp_path / "tilted.dcm")
    with pytest.raises(InputError, match="2 stacks"):
        ReadScan()(tmp_path / "tilted.dcm")


def test_rollout_saliency_of_the_multiframe_matches_the_series(series_and_multiframe, tiny_bundle, tmp_path):
    from c2f_med.case import explain_case
    from c2f_med.models.bundle import load_bundle

    bundle = load_bundle(tiny_bundle, "cpu")
    maps = []
    for n, path in enumerate(series_and_multiframe):
        result = explain_case(bundle, path, tmp_path / "out", method="rollout", case_id=f"case{n}", progress=False)
        maps.append(LoadScan()(result.folder / "saliency.nii.gz"))
    reference = maps[0]
    assert float(reference.std()) > 0
    for other in maps[1:]:
        assert other.shape == reference.shape
        np.testing.assert_allclose(other.affine.numpy(), reference.affine.numpy(), atol=1e-4)
        r = np.corrcoef(other.numpy().ravel(), reference.numpy().ravel())[0, 1]
        assert r >= 0.99, r
