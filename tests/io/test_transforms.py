"""Loading transforms: shipped files, bad input, mask geometry, going back to the file's grid, presets."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nibabel as nib
import nibabel.testing
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.bundle import ConfigParser
from monai.data import Dataset, MetaTensor
from monai.transforms import Invertd
from pydicom.data import get_testdata_file

from c2f_med.errors import InputError
from c2f_med.io.transforms import (
    CT_WINDOWS,
    CTWindow,
    CTWindowd,
    IntensityPreset,
    LoadScan,
    MRPercentileNorm,
    MRPercentileNormd,
    ReadScan,
    load_case_transforms,
    to_original_grid,
)

NIBABEL_DATA = Path(nibabel.testing.data_path)
LPS_AFFINE = np.array([[-2.0, 0, 0, 40], [0, -3.0, 0, 50], [0, 0, 1.5, -10], [0, 0, 0, 1]])


def oblique_permuted_affine() -> np.ndarray:
    """Axes permuted (i ~ S, j ~ L, k ~ A), rotated by 20 degrees in plane, anisotropic voxels."""
    t = np.deg2rad(20.0)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    perm = np.array([[0, -1, 0], [0, 0, 1], [1, 0, 0]])  # columns: i -> +S, j -> -R, k -> +A
    affine = np.eye(4)
    affine[:3, :3] = rot @ perm @ np.diag([1.2, 0.8, 2.0])
    affine[:3, 3] = (5.0, -7.0, 12.0)
    return affine


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray = LPS_AFFINE) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(data), affine), path)
    return path


def index_volume(shape=(4, 5, 6)) -> np.ndarray:
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape)


def pipeline_input_error(run) -> InputError:
    """The InputError raised by ``run()``; MONAI's Compose wraps it in RuntimeError("applying transform ...")."""
    with pytest.raises(Exception) as caught:
        run()
    err = caught.value
    while err is not None and not isinstance(err, InputError):
        err = err.__cause__
    assert err is not None, f"no InputError in {caught.value!r}"
    return err


# ---- files that packages ship ----


@pytest.mark.parametrize(
    "name, shape, modality", [("CT_small.dcm", (128, 128), "CT"), ("MR_small.dcm", (64, 64), "MR")]
)
def test_pydicom_test_files_load_as_one_slice_volumes(name, shape, modality):
    path = get_testdata_file(name)
    img = LoadScan()(path)
    assert tuple(img.shape) == (1, *shape, 1) and img.dtype == torch.float32
    thickness = {"CT": 5.0, "MR": 0.8}[modality]
    assert np.all(np.diag(img.affine.numpy())[:3] > 0)  # RAS
    np.testing.assert_allclose(img.affine.numpy()[2, 2], thickness, rtol=1e-6)
    assert img.meta["00080060"]["Value"] == [modality]
    preset = IntensityPreset("auto")(img)
    assert preset.meta["intensity_preset"].startswith("ct_window" if modality == "CT" else "mr_percentiles")
    assert 0.0 <= float(preset.min()) and float(preset.max()) <= 1.0


@pytest.mark.parametrize("name", ["anatomical.nii", "standard.nii.gz", "reoriented_anat_moved.nii"])
def test_nibabel_test_images_load_like_nibabel_closest_canonical(name):
    path = NIBABEL_DATA / name
    canonical = nib.as_closest_canonical(nib.load(path))
    img = LoadScan()(path)
    np.testing.assert_allclose(img[0].numpy(), canonical.get_fdata(), rtol=1e-6)
    np.testing.assert_allclose(img.affine.numpy(), canonical.affine, atol=1e-4)
    np.testing.assert_allclose(img.meta["original_affine"], nib.load(path).affine, atol=1e-4)


@pytest.mark.parametrize("name", ["example4d.nii.gz", "example_nifti2.nii.gz", "functional.nii"])
def test_nibabel_4d_images_are_refused(name):
    path = NIBABEL_DATA / name
    with pytest.raises(InputError, match="4D image") as err:
        ReadScan()(path)
    assert str(err.value).startswith(f"{path}: ")


# ---- bad input ----


def _bad_inputs(tmp: Path) -> dict[str, tuple[Path, str, dict]]:
    """name -> (path, expected words in the message, ReadScan arguments)."""
    cases = {"missing": (tmp / "nope.nii.gz", "no such file or folder", {})}
    (tmp / "empty").mkdir()
    cases["empty folder"] = (tmp / "empty", "empty folder", {})
    (tmp / "docs").mkdir()
    (tmp / "docs" / "readme.txt").write_text("not a scan")
    cases["folder without DICOM"] = (tmp / "docs", "no DICOM file", {})
    full = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    (tmp / "truncated.dcm").write_bytes(full[: len(full) // 2])
    cases["truncated DICOM"] = (tmp / "truncated.dcm", "cannot read it as a DICOM file", {})
    (tmp / "text.nii.gz").write_text("this is not a NIfTI file\n")
    cases["text named .nii.gz"] = (tmp / "text.nii.gz", "cannot read it as a NIfTI file", {})
    cases["4D"] = (save_nifti(tmp / "four.nii.gz", np.ones((3, 4, 5, 2), np.float32)), "4D image", {})
    flat = save_nifti(tmp / "flat.nii.gz", np.random.default_rng(0).normal(size=(6, 7)).astype(np.float32))
    cases["2D where 3D is needed"] = (flat, "2D image (6x7)", {"allow_2d": False})
    nan = np.random.default_rng(0).normal(size=(4, 4, 4)).astype(np.float32)
    nan[1, 2, 3] = np.nan
    nan[0, 0, 0] = np.inf
    cases["NaN volume"] = (save_nifti(tmp / "nan.nii.gz", nan), "2 voxels are NaN or infinite", {})
    cases["constant volume"] = (save_nifti(tmp / "zero.nii.gz", np.zeros((4, 4, 4), np.float32)), "same value (0)", {})
    (tmp / "scan.png").write_bytes(b"\x89PNG")
    cases["unsupported type"] = (tmp / "scan.png", "unsupported file type", {})
    return cases


BAD_INPUTS = [
    "missing",
    "empty folder",
    "folder without DICOM",
    "truncated DICOM",
    "text named .nii.gz",
    "4D",
    "2D where 3D is needed",
    "NaN volume",
    "constant volume",
    "unsupported type",
]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_raises_one_line_input_error_naming_the_file(tmp_path, case):
    path, words, kwargs = _bad_inputs(tmp_path)[case]
    with pytest.raises(InputError) as err:
        LoadScan(**kwargs)(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and words in message
    assert "\n" not in message and err.value.path == os.fspath(path)


def test_a_2d_image_becomes_a_one_slice_volume(tmp_path):
    data = np.random.default_rng(0).normal(size=(6, 7)).astype(np.float32)
    img = LoadScan()(save_nifti(tmp_path / "flat.nii.gz", data, np.diag([0.5, 0.7, 3.0, 1.0])))
    assert tuple(img.shape) == (1, 6, 7, 1)
    np.testing.assert_allclose(img[0, :, :, 0].numpy(), data)
    np.testing.assert_allclose(np.diag(img.affine.numpy()), [0.5, 0.7, 3.0, 1.0])


def test_nothing_is_written_next_to_the_inputs(tmp_path):
    save_nifti(tmp_path / "scan.nii.gz", index_volume())
    save_nifti(tmp_path / "mask.nii.gz", (index_volume() > 50).astype(np.float32))
    before = sorted(tmp_path.iterdir())
    load_case_transforms(spacing=1.0)({"image": tmp_path / "scan.nii.gz", "label": tmp_path / "mask.nii.gz"})
    assert sorted(tmp_path.iterdir()) == before


# ---- lesion mask on the scan's grid ----


def _case(tmp: Path, mask: np.ndarray, mask_affine: np.ndarray = LPS_AFFINE) -> dict:
    scan = np.random.default_rng(0).normal(size=(6, 7, 8)).astype(np.float32)
    return {
        "image": save_nifti(tmp / "scan.nii.gz", scan),
        "label": save_nifti(tmp / "mask.nii.gz", mask.astype(np.float32), mask_affine),
    }


def test_mask_is_binary_uint8_on_the_scan_grid(tmp_path):
    mask = np.zeros((6, 7, 8))
    mask[1:3, 2:5, 3] = 2.0
    mask[4, 4, 4] = 0.5
    nearly = LPS_AFFINE.copy()
    nearly[0, 3] += 5e-4  # below the 1e-3 mm tolerance
    out = load_case_transforms(preset="mr")(_case(tmp_path, mask, nearly))
    assert out["label"].dtype == torch.uint8 and out["image"].dtype == torch.float32
    assert out["label"].shape == out["image"].shape
    assert set(np.unique(out["label"].numpy())) == {0, 1}
    assert int(out["label"].sum()) == int((mask > 0).sum())


def test_mask_of_another_shape_names_both_files(tmp_path):
    case = _case(tmp_path, np.zeros((6, 7, 9)))
    message = str(pipeline_input_error(lambda: load_case_transforms()(case)))
    assert message.startswith(f"{case['label']}: ") and str(case["image"]) in message
    assert "shape 6x7x9 vs 6x7x8" in message


def test_mask_with_another_affine_names_both_files_and_the_difference(tmp_path):
    shifted = LPS_AFFINE.copy()
    shifted[1, 3] += 2.5
    case = _case(tmp_path, np.zeros((6, 7, 8)), shifted)
    message = str(pipeline_input_error(lambda: load_case_transforms()(case)))
    assert message.startswith(f"{case['label']}: ") and str(case["image"]) in message
    assert "up to 2.5 mm in the origin" in message


def test_mask_stored_in_another_axis_order_but_on_the_same_world_grid_is_accepted(tmp_path):
    scan = index_volume((6, 7, 8))
    mask = (scan % 5 == 0).astype(np.float32)
    ras = nib.as_closest_canonical(nib.Nifti1Image(mask, LPS_AFFINE))  # same voxels, RAS axis order
    case = {"image": save_nifti(tmp_path / "scan.nii.gz", scan), "label": tmp_path / "mask.nii.gz"}
    nib.save(ras, case["label"])
    out = load_case_transforms(preset="mr")(case)
    loaded = LoadScan()(case["image"])
    np.testing.assert_array_equal(out["label"][0].numpy(), (loaded[0].numpy() % 5 == 0).astype(np.uint8))


def test_resampled_mask_stays_binary_and_matches_the_scan(tmp_path):
    mask = np.zeros((6, 7, 8))
    mask[2:4, 2:5, 2:6] = 1
    out = load_case_transforms(spacing=[1.0, 1.0, 1.0], preset="mr")(_case(tmp_path, mask))
    assert out["image"].shape == out["label"].shape
    np.testing.assert_allclose(np.abs(np.diag(out["image"].affine.numpy()))[:3], 1.0)
    assert set(np.unique(out["label"].numpy())) == {0, 1}
    # the 1 mm grid holds every centre of the 2 x 3 x 1.5 mm voxels: nearest there and back is exact
    np.testing.assert_array_equal(to_original_grid(out["label"], out["label"], mode="nearest")[0], mask)


# ---- back to the input file's grid ----


@pytest.mark.parametrize("affine", [LPS_AFFINE, oblique_permuted_affine()], ids=["LPS", "oblique-permuted"])
def test_to_original_grid_inverts_the_orientation_exactly(tmp_path, affine):
    raw = index_volume()
    img = LoadScan()(save_nifti(tmp_path / "scan.nii.gz", raw, affine))
    assert not np.array_equal(img[0].numpy(), raw)  # the loading did re-index the voxels
    assert np.allclose(img.meta["original_affine"], affine, atol=1e-5)
    for mode in ("nearest", "bilinear"):
        np.testing.assert_allclose(to_original_grid(img, img, mode=mode)[0], raw, atol=1e-3)
    np.testing.assert_array_equal(to_original_grid(img[0].numpy(), img, mode="nearest"), raw)


def test_to_original_grid_after_resampling(tmp_path):
    # a linear function of the voxel index is reproduced by trilinear resampling there and back
    i, j, k = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in (5, 6, 7)), indexing="ij")
    raw = 3 * i - 2 * j + k
    img = LoadScan(spacing=[1.0, 1.0, 0.5])(save_nifti(tmp_path / "scan.nii.gz", raw, LPS_AFFINE))
    assert tuple(img.shape) == (1, 9, 16, 19)  # (n - 1) * old / new + 1 voxels per axis
    np.testing.assert_allclose(to_original_grid(img, img)[0], raw, atol=1e-3)


def test_invertd_with_the_case_pipeline_restores_the_file_grid(tmp_path):
    raw = index_volume()
    path = save_nifti(tmp_path / "scan.nii.gz", raw, oblique_permuted_affine())
    pipeline = load_case_transforms(keys=["image"], preset="mr")
    data = pipeline({"image": path})
    data["saliency"] = MetaTensor(LoadScan()(path).as_tensor())  # a map on the loaded grid
    restored = Invertd("saliency", transform=pipeline, orig_keys="image", nearest_interp=True)(data)
    np.testing.assert_array_equal(restored["saliency"][0].numpy(), raw)


# ---- intensity presets ----


@pytest.mark.parametrize("name", sorted(CT_WINDOWS))
def test_ct_window_maps_its_edges_to_zero_and_one(name):
    level, width = CT_WINDOWS[name]
    hu = torch.tensor([[level - width / 2, level, level + width / 2, level - width, level + width, level + width / 4]])
    out = CTWindow(name)(hu)
    np.testing.assert_allclose(out.numpy(), [[0.0, 0.5, 1.0, 0.0, 1.0, 0.75]], atol=1e-6)


def test_named_ct_windows_have_the_documented_numbers():
    assert CT_WINDOWS == {
        "brain": (40, 80),
        "soft_tissue": (40, 400),
        "lung": (-600, 1500),
        "bone": (400, 1800),
    }


def test_custom_ct_window_and_dict_version():
    hu = torch.tensor([[-1000.0, -100.0, 0.0, 100.0, 1000.0]])
    out = CTWindowd("image", window=[0, 200])({"image": hu})["image"]
    np.testing.assert_allclose(out.numpy(), [[0.0, 0.0, 0.5, 1.0, 1.0]], atol=1e-6)
    with pytest.raises(ValueError, match="unknown CT window"):
        CTWindow("liver")
    with pytest.raises(ValueError, match="unknown preset 'liver'; expected auto, ct, mr, brain"):
        IntensityPreset("liver")


def test_mr_percentiles_use_the_nonzero_voxels():
    rng = np.random.default_rng(0)
    body = rng.gamma(2.0, 100.0, size=(1, 20, 20, 10)).astype(np.float32) + 1.0
    padded = np.zeros((1, 40, 20, 10), np.float32)
    padded[:, :20] = body
    lo, hi = np.percentile(body, (0.5, 99.5))
    expected = np.clip((padded - lo) / (hi - lo), 0.0, 1.0)
    out = MRPercentileNormd("image", top=1.0)({"image": torch.as_tensor(padded)})["image"]
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-5)
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0
    # 0.5% of the nonzero voxels lie above the upper percentile and are clipped to 1
    assert int((out[:, :20] == 1.0).sum()) == pytest.approx(0.005 * body.size, abs=3)


def test_mr_percentiles_keep_headroom_for_hyperintensities():
    """With the default top = 2/3, a bright spot up to half the percentile range above p_hi keeps its
    contrast instead of being clipped to the brightest tissue's value."""
    rng = np.random.default_rng(0)
    body = rng.uniform(100.0, 200.0, size=(1, 30, 30, 10)).astype(np.float32)
    lo, hi = np.percentile(body, (0.5, 99.5))
    body[0, :2, :2, 0] = hi + 0.4 * (hi - lo)  # a "lesion" of 4 voxels above the upper percentile
    out = MRPercentileNorm()(torch.as_tensor(body)).numpy()
    lo, hi = np.percentile(body, (0.5, 99.5))
    np.testing.assert_allclose(out, np.clip(2 / 3 * (body - lo) / (hi - lo), 0, 1), atol=1e-5)
    tissue_max = out[0, 2:, 2:].max()
    assert out[0, :2, :2, 0].min() > tissue_max + 0.2  # still clearly brighter than any tissue
    plain = MRPercentileNorm(top=1.0)(torch.as_tensor(body)).numpy()
    assert plain[0, :2, :2, 0].min() == plain[0, 2:, 2:].max() == 1.0  # clipped: same as the brightest tissue
    with pytest.raises(ValueError, match="top"):
        MRPercentileNorm(top=0.0)


def test_mr_percentiles_custom_range():
    values = torch.arange(1, 101, dtype=torch.float32)[None]
    out = MRPercentileNorm(lower=10, upper=90, top=1.0)(values)
    lo, hi = np.percentile(np.arange(1, 101), (10, 90))
    np.testing.assert_allclose(out.numpy()[0], np.clip((np.arange(1, 101) - lo) / (hi - lo), 0, 1), atol=1e-6)


def test_auto_preset_looks_at_hu_without_a_modality():
    rng = np.random.default_rng(0)
    ct = MetaTensor(torch.as_tensor(rng.uniform(-1024, 1500, size=(1, 8, 8, 4)).astype(np.float32)))
    mr = MetaTensor(torch.as_tensor(rng.uniform(0, 900, size=(1, 8, 8, 4)).astype(np.float32)))
    assert IntensityPreset("auto")(ct).meta["intensity_preset"] == "ct_window(level=40, width=400)"
    assert IntensityPreset("auto", ct_window="lung")(ct).meta["intensity_preset"] == "ct_window(level=-600, width=1500)"
    assert IntensityPreset("auto")(mr).meta["intensity_preset"].startswith("mr_percentiles")
    # a DICOM Modality wins over the value heuristic
    mr.meta["00080060"] = {"vr": "CS", "Value": ["CT"]}
    assert IntensityPreset("auto")(mr).meta["intensity_preset"].startswith("ct_window")


# ---- the pipeline as a bundle builds it ----


def test_pipeline_builds_from_a_json_config_and_runs_in_a_monai_dataset(tmp_path):
    mask = np.zeros((6, 7, 8), np.float32)
    mask[2:4, 3:5, 4] = 1
    items = [_case(tmp_path, mask), {"image": save_nifti(tmp_path / "other.nii.gz", index_volume() - 1000)}]
    config = {
        "preprocessing": {
            "_target_": "c2f_med.io.transforms.load_case_transforms",
            "keys": ["image", "label"],
            "preset": "brain",
            "spacing": [2.0, 2.0, 2.0],
        }
    }
    transform = ConfigParser(config).get_parsed_content("preprocessing")
    dataset = Dataset(data=[{k: os.fspath(v) for k, v in item.items()} for item in items], transform=transform)
    first, second = dataset[0], dataset[1]
    assert first["image"].shape == first["label"].shape and first["label"].dtype == torch.uint8
    assert "label" not in second
    assert second["image"].meta["intensity_preset"] == "ct_window(level=40, width=80)"
    assert 0.0 <= float(second["image"].min()) and float(second["image"].max()) <= 1.0


def test_dicom_modality_reaches_the_pipeline(tmp_path):
    shutil.copy(get_testdata_file("MR_small.dcm"), tmp_path / "mr.dcm")
    out = load_case_transforms(keys=["image"])({"image": tmp_path / "mr.dcm"})
    assert out["image"].meta["intensity_preset"].startswith("mr_percentiles")
    assert tuple(out["image"].shape) == (1, 64, 64, 1)


def test_sitk_written_volume_loads_in_ras(tmp_path):
    image = sitk.GetImageFromArray(index_volume((6, 5, 4)))  # x=4, y=5, z=6
    image.SetSpacing((1.0, 2.0, 3.0))
    path = tmp_path / "scan.mha"
    sitk.WriteImage(image, os.fspath(path))
    img = LoadScan()(path)
    # ITK's identity direction is LPS: x and y flip to reach RAS
    np.testing.assert_allclose(np.diag(img.affine.numpy()), [1.0, 2.0, 3.0, 1.0])
    np.testing.assert_array_equal(to_original_grid(img, img, mode="nearest")[0], index_volume((6, 5, 4)).T)
