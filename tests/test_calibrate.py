"""``c2f-med calibrate``: operating point fitted on labelled cases and written into the bundle."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from c2f_med.calibrate import CaseLogits, classifier_measures, fit_operating_point, write_operating_point
from c2f_med.cli import main
from c2f_med.models.bundle import OperatingPoint, load_bundle


def _cases(seed: int = 0) -> list[CaseLogits]:
    """Two synthetic cases of logits: positives score higher on average, overconfidently (x 4)."""
    rng = np.random.default_rng(seed)
    out = []
    for c in range(2):
        label = rng.random(200) < 0.3
        margin = np.where(label, 1.0, -1.0) + rng.normal(0, 1.2, 200)
        logits = np.stack([-2 * margin, 2 * margin], 1).astype(np.float32)  # logit difference 4 x margin
        lesions = [[1 + (i // 20)] if lab else [] for i, lab in enumerate(label)]
        out.append(CaseLogits(f"c{c}", logits, label, lesions))
    return out


def test_fit_operating_point_cools_overconfident_logits_and_meets_the_specificity():
    cases = _cases()
    point = fit_operating_point(cases, specificity=0.9)
    assert point.temperature > 2  # the logits were scaled up by 4 around a unit-noise margin
    before = classifier_measures(cases, OperatingPoint())
    after = classifier_measures(cases, point)
    assert after["ece"] < before["ece"]
    assert after["slice_auroc"] == pytest.approx(before["slice_auroc"])  # temperature keeps the ranking
    assert after["specificity"] >= 0.9 and after["specificity"] < 0.92
    # a lesion is found when its best slice reaches the threshold
    logits = np.concatenate([c.logits for c in cases])
    p = point.probabilities(torch.from_numpy(logits))[:, 1].numpy()
    best = {}
    k = 0
    for case in cases:
        for ids in case.lesions:
            for lesion in ids:
                best[(case.case, lesion)] = max(best.get((case.case, lesion), 0), p[k])
            k += 1
    assert after["lesions"] == len(best)
    assert after["lesion_sensitivity"] == pytest.approx(np.mean(np.array(list(best.values())) >= point.threshold))


def test_fit_needs_both_classes():
    case = _cases()[0]
    only = CaseLogits("x", case.logits, np.ones(len(case.label), bool), case.lesions)
    with pytest.raises(ValueError, match="with and without"):
        fit_operating_point([only])


def test_write_operating_point_keeps_every_other_key(tiny_bundle, tmp_path):
    bundle = shutil.copytree(tiny_bundle, tmp_path / "b")
    before = json.loads((bundle / "configs" / "inference.json").read_text())
    write_operating_point(bundle, OperatingPoint(1.7, 0.31, "bundle"))
    after = json.loads((bundle / "configs" / "inference.json").read_text())
    assert after.pop("operating_point") == {"temperature": 1.7, "threshold": 0.31}
    assert after == before
    point = load_bundle(bundle).operating_point
    assert (point.temperature, point.threshold, point.source) == (1.7, 0.31, "bundle")


def test_calibrate_command_writes_the_point_and_reports(tiny_bundle, tiny_datalist, tmp_path, capsys):
    bundle = shutil.copytree(tiny_bundle, tmp_path / "b")
    datalist = json.loads(tiny_datalist.read_text())
    val = tmp_path / "val.json"
    base = tiny_datalist.parent
    items = [{k: str(base / v) for k, v in it.items()} for it in datalist["testing"]]
    val.write_text(json.dumps({"validation": items, "testing": items}))
    report = tmp_path / "report.json"
    inputs = {p: p.read_bytes() for p in base.rglob("*") if p.is_file()}
    rc = main(["calibrate", "--bundle", str(bundle), "--datalist", str(val), "--specificity", "0.8",
               "--measure", f"tiny={val}", "--report", str(report)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "temperature" in out and "ECE" in out and "tiny: slice AUROC" in out
    result = json.loads(report.read_text())
    point = json.loads((bundle / "configs" / "inference.json").read_text())["operating_point"]
    assert point == result["operating_point"] and 0 < point["threshold"] < 1 and point["temperature"] > 0
    assert result["after"]["specificity"] >= 0.8
    assert result["measured"]["tiny"]["lesions"] == 2 and result["measured"]["tiny"]["threshold"] == point["threshold"]
    assert {p: p.read_bytes() for p in base.rglob("*") if p.is_file()} == inputs  # inputs untouched


def test_calibrate_dry_run_leaves_the_bundle_and_bad_input_is_one_line(tiny_bundle, tiny_datalist, tmp_path, capsys):
    bundle = shutil.copytree(tiny_bundle, tmp_path / "b")
    config = (bundle / "configs" / "inference.json").read_bytes()
    rc = main(["calibrate", "--bundle", str(bundle), "--datalist", str(tiny_datalist), "--section", "testing",
               "--dry-run"])
    assert rc == 0 and (bundle / "configs" / "inference.json").read_bytes() == config
    capsys.readouterr()
    assert main(["calibrate", "--bundle", str(bundle), "--datalist", str(tiny_datalist)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "datalist.json" in err
    assert main(["calibrate", "--bundle", str(bundle), "--datalist", str(tiny_datalist), "--section", "testing",
                 "--specificity", "1.5"]) == 2


def test_measures_table_has_a_row_per_set_and_weights():
    from c2f_med.calibrate import calibrate_bundle, measures_table

    class FakeBundle:
        lesion_class = 1

    reports = {}
    for label, seed in (("old", 0), ("new", 1)):
        result = calibrate_bundle(FakeBundle(), _cases(seed))
        point = OperatingPoint(**result["operating_point"])
        result["measured"] = {"fresh": classifier_measures(_cases(seed + 5), point)}
        reports[label] = result
    table = measures_table(reports)
    rows = [line for line in table.splitlines() if line.startswith("| fresh")]
    assert len(rows) == 2 and "| old |" in rows[0] and "| new |" in rows[1]
    assert f"{reports['new']['measured']['fresh']['slice_auroc']:.3f}" in rows[1]
    assert "validation ECE" in table


def test_report_table_names_a_missing_or_foreign_report_in_one_line(tmp_path):
    from c2f_med.calibrate import main as table_main

    with pytest.raises(SystemExit, match=r"nothere\.json: no such report file"):
        table_main([f"x={tmp_path / 'nothere.json'}"])
    (tmp_path / "other.json").write_text('{"measured": {}}')
    with pytest.raises(SystemExit, match=r"other\.json: not a 'c2f-med calibrate --report' file"):
        table_main([f"x={tmp_path / 'other.json'}"])
