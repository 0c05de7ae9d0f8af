"""The bundle through MONAI's runner on small cases: the contract's inference command, and evaluation."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import run

from .conftest import AFFINE, SHAPE


def test_inference_command_of_the_contract(tiny_bundle, cases, tmp_path):
    configs = tiny_bundle / "configs"
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--bundle_root", str(tiny_bundle),
           "--config_file", str(configs / "inference.json"), "--meta_file", str(configs / "metadata.json"),
           "--datalist", str(cases / "datalist.json"), "--output_dir", str(out), "--method", "rollout",
           "--device", "cpu"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["a", "b"]
    for case in ("a", "b"):
        folder = out / case
        assert {p.name for p in folder.iterdir()} == {"saliency.nii.gz", "overlay.png", "predictions.csv",
                                                       "provenance.json"}
        image = nib.load(folder / "saliency.nii.gz")
        assert image.shape == SHAPE
        np.testing.assert_allclose(image.affine, AFFINE)
        saliency = image.get_fdata()
        assert saliency.min() >= 0 and saliency.max() == np.float32(1)
        rows = list(csv.DictReader(open(folder / "predictions.csv")))
        assert [int(r["slice"]) for r in rows] == list(range(SHAPE[2]))
        provenance = json.load(open(folder / "provenance.json"))
        assert provenance["method"] == "rollout" and provenance["bundle"]["path"] == str(tiny_bundle)


def test_evaluate_adds_the_scores(tiny_bundle, cases, tmp_path):
    configs = tiny_bundle / "configs"
    out = tmp_path / "out"
    run(config_file=[str(configs / "inference.json"), str(configs / "evaluate.json")],
        meta_file=str(configs / "metadata.json"), logging_file=False, bundle_root=str(tiny_bundle),
        datalist=str(cases / "datalist.json"), output_dir=str(out), method="attention")
    assert {p.name for p in out.iterdir()} == {"a", "b", "summary.json", "summary.md", "per_case.csv",
                                               "per_slice.csv", "false_alarms.csv"}
    assert (out / "a" / "scores.json").exists() and not (out / "b" / "scores.json").exists()
    summary = json.load(open(out / "summary.json"))
    assert summary["datalist"] == str(cases / "datalist.json")
    assert summary["bundle"]["path"] == str(tiny_bundle)
    assert (summary["cases"], summary["lesion_slices"]) == (2, 3)
    assert list(summary["methods"]) == ["attention"]
    scores = json.load(open(out / "a" / "scores.json"))
    rows = list(csv.DictReader(open(out / "per_case.csv")))
    assert float(rows[0]["volume_ap"]) == pytest.approx(scores["volume"]["ap"], rel=1e-5)


@pytest.mark.parametrize("datalist", [None, "missing.json"])
def test_runner_names_a_bad_datalist_in_one_line(tiny_bundle, tmp_path, datalist):
    configs = tiny_bundle / "configs"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--bundle_root", str(tiny_bundle),
           "--config_file", str(configs / "inference.json"), "--meta_file", str(configs / "metadata.json"),
           "--output_dir", str(tmp_path / "out")]
    if datalist:
        cmd += ["--datalist", str(tmp_path / datalist)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "datalist" in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_one_scan_needs_no_datalist(tiny_bundle, cases, tmp_path):
    configs = tiny_bundle / "configs"
    out = tmp_path / "out"
    item = json.load(open(cases / "datalist.json"))["testing"][0]
    run(config_file=str(configs / "inference.json"), meta_file=str(configs / "metadata.json"), logging_file=False,
        bundle_root=str(tiny_bundle), image=str(cases / item["image"]), output_dir=str(out), method="attention")
    assert [p.name for p in out.iterdir()] == ["a"]
    assert nib.load(out / "a" / "saliency.nii.gz").shape == SHAPE


@pytest.mark.parametrize("extra", [["--image", "missing.nii.gz"], ["--image", "x.nii.gz", "--datalist", "d.json"]])
def test_runner_names_a_bad_image_override_in_one_line(tiny_bundle, tmp_path, extra):
    configs = tiny_bundle / "configs"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--bundle_root", str(tiny_bundle),
           "--config_file", str(configs / "inference.json"), "--meta_file", str(configs / "metadata.json"),
           "--output_dir", str(tmp_path / "out"), *[str(tmp_path / v) if v.endswith(("gz", "json")) else v
                                                    for v in extra]]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and ("not found" in errors[0] or "both" in errors[0]), result.stderr[-2000:]
    assert not (tmp_path / "out").exists()
