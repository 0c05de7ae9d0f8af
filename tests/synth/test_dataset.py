"""Deterministic cases, their lesion-free twins, and the `c2f-med synth` dataset layout."""

from __future__ import annotations

import dataclasses
import json

import nibabel as nib
import numpy as np
import pytest
from scipy.ndimage import distance_transform_edt

from c2f_med.errors import InputError
from c2f_med.synth import dataset as dataset_module
from c2f_med.synth.dataset import case_id, split_cases, synth_case, write_dataset


@pytest.fixture(scope="module")
def lesion_case():
    return synth_case(3, 1, n_lesions=3, diameter_mm=(6.0, 20.0))


def test_same_seed_same_case_other_seed_other_case(lesion_case):
    again = synth_case(3, 1, n_lesions=3, diameter_mm=(6.0, 20.0))
    np.testing.assert_array_equal(again.image, lesion_case.image)
    np.testing.assert_array_equal(again.label, lesion_case.label)
    np.testing.assert_array_equal(again.lesion_free, lesion_case.lesion_free)
    assert again.specs == lesion_case.specs and again.contrast == lesion_case.contrast
    for other in (synth_case(4, 1, n_lesions=3, diameter_mm=(6.0, 20.0)), synth_case(3, 2, n_lesions=3)):
        assert not np.array_equal(other.image, lesion_case.image)


def test_case_arrays(lesion_case):
    c = lesion_case
    assert c.case_id == "s3_0001" == case_id(3, 1)
    assert c.image.dtype == c.lesion_free.dtype == np.int16
    assert c.label.dtype == np.uint8 and set(np.unique(c.label)) == {0, 1}
    assert c.image.shape == c.label.shape == c.lesion_free.shape
    assert c.affine.shape == (4, 4) and len(c.specs) == 3
    # white matter ~ 1000 (bias and noise aside): the median brain voxel lies in the tissue range
    assert 500 < np.median(c.lesion_free[c.lesion_free > 100]) < 2000


def test_lesions_differ_from_the_twin_only_where_inserted(lesion_case):
    c = lesion_case
    mask = c.label > 0
    differs = c.image != c.lesion_free
    assert np.all(differs[mask])
    spacing = np.linalg.norm(c.affine[:3, :3], axis=0)
    edge = max(s.edge_mm for s in c.specs)
    beyond = distance_transform_edt(~mask, sampling=spacing) > 2 * edge + spacing.max()
    assert not np.any(differs & beyond)
    # hyper lesions brighten, hypo lesions darken, at their centres
    for s in c.specs:
        centre = tuple(np.rint(s.centre).astype(int))
        if mask[centre]:
            assert np.sign(int(c.image[centre]) - int(c.lesion_free[centre])) == np.sign(s.contrast)


def test_lesion_free_case_has_an_empty_mask_and_equals_its_twin():
    c = synth_case(3, 5, n_lesions=0)
    assert c.specs == [] and c.label.max() == 0
    np.testing.assert_array_equal(c.image, c.lesion_free)


def test_default_cases_mix_lesion_free_and_lesion_scans(monkeypatch, anatomy):
    """About a third of the cases are lesion-free, the others hold 1-4 lesions (cheap stand-in anatomy)."""
    small = dataclasses.replace(anatomy, image=anatomy.image[::3, ::3, ::3], bias=anatomy.bias[::3, ::3, ::3],
                                brain=anatomy.brain[::3, ::3, ::3], affine=anatomy.affine @ np.diag([3, 3, 3, 1]))
    monkeypatch.setattr(dataset_module, "make_anatomy", lambda rng, contrast: small)
    counts = np.array([len(synth_case(0, i).specs) for i in range(90)])
    assert 0.2 < np.mean(counts == 0) < 0.45
    assert set(counts[counts > 0]) == {1, 2, 3, 4}


@pytest.mark.parametrize("n, sizes", [(1, (0, 0, 1)), (2, (1, 0, 1)), (3, (2, 0, 1)), (10, (7, 1, 2))])
def test_split_sizes(n, sizes):
    parts = split_cases(n)
    assert tuple(len(parts[k]) for k in ("training", "validation", "testing")) == sizes
    assert sorted(i for r in parts.values() for i in r) == list(range(n))


def load_datalist(path):
    data = json.loads(path.read_text())
    return data, [item for part in ("training", "validation", "testing") for item in data[part]]


def test_write_dataset_both_formats(tmp_path):
    path = write_dataset(tmp_path / "ds", cases=2, seed=11, fmt="both", progress=False)
    root = tmp_path / "ds"
    assert path == root / "datalist.json"
    data, items = load_datalist(path)
    assert len(data["training"]) == len(data["testing"]) == 1 and data["numTraining"] == 1
    ids = ["s11_0000", "s11_0001"]
    assert [item["image"] for item in items] == [f"images/{i}.nii.gz" for i in ids]
    for cid, item in zip(ids, items):
        image, label = nib.load(root / item["image"]), nib.load(root / item["label"])
        assert image.shape == label.shape and np.allclose(image.affine, label.affine)
        assert image.get_data_dtype() == np.int16
        assert label.get_data_dtype() == np.uint8 and set(np.unique(np.asarray(label.dataobj))) <= {0, 1}
        assert len(list((root / "dicom" / cid).glob("*.dcm"))) == image.shape[2]
    case = synth_case(11, 1)  # the files hold the case itself
    np.testing.assert_array_equal(np.asarray(nib.load(root / items[1]["image"]).dataobj), case.image)
    np.testing.assert_array_equal(np.asarray(nib.load(root / items[1]["label"]).dataobj), case.label)
    lesions = json.loads((root / "lesions.json").read_text())
    assert sorted(lesions) == ids and all(v["contrast"] in ("t1", "t2", "flair") for v in lesions.values())
    assert not list(root.rglob(".*"))  # no temporary files left


def test_write_dataset_with_held_out_shapes(tmp_path):
    path = write_dataset(tmp_path, cases=3, seed=5, shapes=("cuboid", "ring"), progress=False)
    lesions = json.loads((tmp_path / "lesions.json").read_text())
    shapes = {lesion["shape"] for case in lesions.values() for lesion in case["lesions"]}
    assert shapes and shapes <= {"cuboid", "ring"}
    assert "cuboid, ring" in json.loads(path.read_text())["description"]


def test_write_dataset_dicom_only_points_at_the_series(tmp_path):
    path = write_dataset(tmp_path, cases=1, seed=2, fmt="dicom", progress=False)
    data, items = load_datalist(path)
    assert items == [{"image": "dicom/s2_0000", "label": "labels/s2_0000.nii.gz"}]
    assert data["testing"] == items
    assert (tmp_path / "dicom" / "s2_0000").is_dir() and not (tmp_path / "images").exists()
    # a second seed in the same folder adds its own cases, never overwriting the first's
    write_dataset(tmp_path, cases=1, seed=3, fmt="dicom", progress=False)
    assert sorted(p.name for p in (tmp_path / "labels").iterdir()) == ["s2_0000.nii.gz", "s3_0000.nii.gz"]


@pytest.mark.parametrize("kwargs, problem", [
    (dict(cases=0, seed=0, fmt="nifti"), "cases"),
    (dict(cases=1, seed=-1, fmt="nifti"), "seed"),
    (dict(cases=1, seed=0, fmt="png"), "format"),
    (dict(cases=1, seed=0, fmt="nifti", shapes=("cuboid", "star")), "shapes"),
])
def test_write_dataset_rejects_bad_arguments(tmp_path, kwargs, problem):
    with pytest.raises(InputError, match=problem):
        write_dataset(tmp_path / "ds", progress=False, **kwargs)
    assert not (tmp_path / "ds").exists()


def test_write_dataset_refuses_a_file_as_folder(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        write_dataset(target, cases=1, seed=0, progress=False)
