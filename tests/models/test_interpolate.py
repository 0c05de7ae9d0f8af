"""``c2f-med interpolate``: weights blended between a start and its fine-tune, the blend chosen on validation."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from c2f_med.cli import main
from c2f_med.models.bundle import sha256_file
from c2f_med.models.interpolate import interpolate_weights
from tests.conftest import write_tiny_bundle


def test_interpolate_weights_is_the_straight_line_between_the_two():
    start = {"w": torch.zeros(3), "n": torch.tensor(4)}
    tuned = {"w": torch.tensor([2.0, 4.0, -2.0]), "n": torch.tensor(9)}
    assert torch.equal(interpolate_weights(start, tuned, 0.0)["w"], start["w"])
    assert torch.equal(interpolate_weights(start, tuned, 1.0)["w"], tuned["w"])
    half = interpolate_weights(start, tuned, 0.25)
    assert torch.allclose(half["w"], torch.tensor([0.5, 1.0, -0.5]))
    assert int(half["n"]) == 9  # integer buffers come from the fine-tune
    with pytest.raises(ValueError, match="outside"):
        interpolate_weights(start, tuned, 1.5)
    with pytest.raises(ValueError, match="keys"):
        interpolate_weights({"w": torch.zeros(3)}, tuned, 0.5)
    with pytest.raises(ValueError, match="shape"):
        interpolate_weights({"w": torch.zeros(2), "n": torch.tensor(1)}, tuned, 0.5)


def _validation(tiny_datalist, tmp_path):
    base = tiny_datalist.parent
    items = [{k: str(base / v) for k, v in it.items()} for it in json.loads(tiny_datalist.read_text())["testing"]]
    path = tmp_path / "val.json"
    path.write_text(json.dumps({"validation": items}))
    return path


def test_interpolate_command_scores_each_alpha_and_keeps_the_best(tiny_bundle, tiny_datalist, tmp_path, capsys):
    bundle = shutil.copytree(tiny_bundle, tmp_path / "b")
    start = tiny_bundle / "models" / "model.pt"
    tuned = write_tiny_bundle(tmp_path / "other", seed=7) / "models" / "model.pt"  # a different network state
    val = _validation(tiny_datalist, tmp_path)
    inputs = {p: p.read_bytes() for p in (start, tuned, *tiny_datalist.parent.rglob("*.nii.gz"))}
    rc = main(["interpolate", "--bundle", str(bundle), "--start", str(start), "--tuned", str(tuned),
               "--datalist", str(val), "--alphas", "0,0.5,1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert out.count("validation slice AUROC") == 3 and "selected alpha" in out
    result = json.loads((bundle / "models" / "interpolation.json").read_text())
    scores = {r["alpha"]: r["val_auroc"] for r in result["alphas"]}
    assert set(scores) == {0.0, 0.5, 1.0} and all(0.0 <= v <= 1.0 for v in scores.values())
    assert scores[result["selected"]] == max(scores.values())
    assert result["sha256"] == sha256_file(bundle / "models" / "model.pt")
    assert result["start"]["sha256"] == sha256_file(start) and result["tuned"]["sha256"] == sha256_file(tuned)
    written = torch.load(bundle / "models" / "model.pt", weights_only=True)
    expected = interpolate_weights(torch.load(start, weights_only=True), torch.load(tuned, weights_only=True),
                                   result["selected"])
    assert all(torch.equal(written[k], expected[k]) for k in expected)
    assert {p: p.read_bytes() for p in inputs} == inputs  # the two weights and the cases are left as they were


def test_interpolate_bad_input_is_one_line(tiny_bundle, tiny_datalist, tmp_path, capsys):
    bundle = shutil.copytree(tiny_bundle, tmp_path / "b")
    weights = bundle / "models" / "model.pt"
    before = weights.read_bytes()
    val = _validation(tiny_datalist, tmp_path)
    foreign = tmp_path / "foreign.pt"
    torch.save({"w": torch.zeros(2)}, foreign)
    for argv, name in (
        (["--start", str(tmp_path / "missing.pt"), "--tuned", str(weights), "--datalist", str(val)], "missing.pt"),
        (["--start", str(foreign), "--tuned", str(weights), "--datalist", str(val)], "foreign.pt"),
        (["--start", str(weights), "--tuned", str(weights), "--datalist", str(val), "--alphas", "0,2"], "--alphas"),
        (["--start", str(weights), "--tuned", str(weights), "--datalist", str(tiny_datalist)], "datalist.json"),
    ):
        assert main(["interpolate", "--bundle", str(bundle), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and name in err
    assert weights.read_bytes() == before  # nothing written on failure
