"""`c2f-med` verbs end to end on tiny data: contract files, and bad input as one clear line."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from c2f_med.cli import main, parse_params
from c2f_med.errors import InputError


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_parse_params():
    assert parse_params(["c2f.relation=rollout-last", "c2f.alpha1=0.8", "vitcx.gamma=2"]) == {
        "c2f": {"relation": "rollout-last", "alpha1": 0.8}, "vitcx": {"gamma": 2}}
    with pytest.raises(InputError, match="METHOD.NAME=VALUE"):
        parse_params(["relation=gae"])


def test_explain_writes_the_contract_files(capsys, tiny_bundle, tiny_datalist, tmp_path):
    items = json.loads(tiny_datalist.read_text())["testing"]
    image, mask = (tiny_datalist.parent / items[0][k] for k in ("image", "label"))
    code, _, err = run(capsys, "explain", "--bundle", tiny_bundle, "--input", image, "--mask", mask,
                       "--method", "rollout", "--out", tmp_path / "out")
    assert code == 0, err
    case = tmp_path / "out" / "tiny_a"
    for name in ("saliency.nii.gz", "overlay.png", "predictions.csv", "scores.json", "provenance.json"):
        assert (case / name).is_file(), name
    sal, img = nib.load(case / "saliency.nii.gz"), nib.load(image)
    assert sal.shape == img.shape and np.allclose(sal.affine, img.affine)
    assert sal.get_data_dtype() == np.float32
    scores = json.loads((case / "scores.json").read_text())
    assert scores["lesion_slices"] == 3 and 0 <= scores["volume"]["relevance_mass"] <= 1
    prov = json.loads((case / "provenance.json").read_text())
    assert prov["method"] == "rollout" and len(prov["bundle"]["sha256"]) == 64
    assert len(prov["inputs"]["image"]["sha256"]) == 64


def test_explain_dicom_series_and_nifti_agree_in_world_coordinates(capsys, tiny_bundle, tmp_path):
    """The same scan as an LPS-stored DICOM series and as RAS NIfTI gives the same map at each world point."""
    from c2f_med.synth.writers import write_dicom_series, write_nifti

    rng = np.random.default_rng(0)
    volume = (rng.random((30, 34, 6)) * 400 + 300).astype(np.int16)
    volume[8:14, 10:16, 2:4] += 600
    affine = np.array([[1.2, 0, 0, -20.0], [0, 1.1, 0, 15.0], [0, 0, 3.0, -7.0], [0, 0, 0, 1]])
    nifti = write_nifti(tmp_path / "scan.nii.gz", volume, affine)
    series = tmp_path / "series"
    write_dicom_series(series, volume, affine, case_id="scan", description="test")
    for src, out in ((nifti, "n"), (series, "d")):
        code, _, err = run(capsys, "explain", "--bundle", tiny_bundle, "--input", src, "--method", "gae",
                           "--out", tmp_path / out)
        assert code == 0, err
    a = nib.load(tmp_path / "n" / "scan" / "saliency.nii.gz")
    b = nib.load(tmp_path / "d" / "series" / "saliency.nii.gz")
    # map b's voxels onto a's grid through the world coordinates
    ijk = np.stack(np.meshgrid(*(np.arange(n) for n in a.shape), indexing="ij"), -1).reshape(-1, 3)
    world = nib.affines.apply_affine(a.affine, ijk)
    ijk_b = np.rint(nib.affines.apply_affine(np.linalg.inv(b.affine), world)).astype(int)
    np.testing.assert_allclose(b.get_fdata()[tuple(ijk_b.T)], a.get_fdata()[tuple(ijk.T)], atol=1e-4)
    assert a.get_fdata().max() > 0


def _bad_inputs(tmp_path, tiny_datalist):
    items = json.loads(tiny_datalist.read_text())["testing"]
    image = tiny_datalist.parent / items[0]["image"]
    other = tiny_datalist.parent / items[1]["label"]  # another case's mask: another shape
    text = tmp_path / "notes.nii.gz"
    text.write_text("not an image")
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    four_d = tmp_path / "four_d.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((5, 5, 5, 2), np.float32), np.eye(4)), four_d)
    from pydicom.data import get_testdata_file

    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(open(get_testdata_file("CT_small.dcm"), "rb").read()[:700])
    return {
        "truncated DICOM": (["--input", truncated], "truncated.dcm"),
        "text named .nii.gz": (["--input", text], "notes.nii.gz"),
        "mask of another shape": (["--input", image, "--mask", other], "tiny_b.nii.gz"),
        "empty folder": (["--input", empty], "empty_folder"),
        "4D file": (["--input", four_d], "four_d.nii.gz"),
        "missing path": (["--input", tmp_path / "absent.nii.gz"], "absent.nii.gz"),
    }


@pytest.mark.parametrize("case", ["truncated DICOM", "text named .nii.gz", "mask of another shape",
                                  "empty folder", "4D file", "missing path"])
def test_bad_input_is_one_clear_line_and_writes_nothing(case, capsys, tiny_bundle, tiny_datalist, tmp_path):
    args, name = _bad_inputs(tmp_path, tiny_datalist)[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = run(capsys, "explain", "--bundle", tiny_bundle, *args, "--out", tmp_path / "out")
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and name in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written next to the inputs


def test_output_inside_input_folder_is_refused(capsys, tiny_bundle, tmp_path):
    folder = tmp_path / "series"
    folder.mkdir()
    code, _, err = run(capsys, "explain", "--bundle", tiny_bundle, "--input", folder, "--out", folder / "out")
    assert code == 2 and "inside the input" in err


def test_synth_verb_is_deterministic(capsys, tmp_path):
    for out in ("a", "b"):
        assert run(capsys, "synth", "--out", tmp_path / out, "--cases", "1", "--seed", "5")[0] == 0
    a, b = (nib.load(next((tmp_path / o / "images").glob("*.nii.gz"))).get_fdata() for o in ("a", "b"))
    np.testing.assert_array_equal(a, b)
    shutil.rmtree(tmp_path / "a")


def test_help_does_not_import_torch():
    """Building the parser (``c2f-med --help``) imports no torch or MONAI: the verbs import them when they run."""
    import subprocess
    import sys

    code = ("import sys; from c2f_med.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'monai') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
