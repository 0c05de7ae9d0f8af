"""Cohort audits: outputs and provenance, resuming (also after SIGKILL), failing cases, unwritable
output folders, and two torchrun processes against one."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from c2f_med.audit import Ledger, case_seed, check_output, read_ledger, run_audit
from c2f_med.errors import InputError
from c2f_med.io.manifest import read_datalist, write_datalist
from c2f_med.models.bundle import sha256_file
from c2f_med.provenance import input_hash
from tests.conftest import TINY_CASES, write_tiny_case

#: a cheap explainer keeps the cohort runs short; the audit does not depend on the method
METHOD = "rollout"
#: the contract's per-method keys of summary.json
SUMMARY_KEYS = ("pointing_game", "pointing_game_tol", "relevance_mass", "miou", "dice", "iou_topk", "auroc", "ap",
                "deletion_auc", "insertion_auc", "seconds_per_slice", "forward_passes_per_slice", "slices")
#: columns that hold wall times or the rank, which differ from run to run
TIMING = {"case_seconds", "explain_seconds", "seconds_per_slice", "seconds", "rank"}
#: four cases: three with a lesion, one without
COHORT = {**TINY_CASES, "tiny_d": ((36, 36, 9), (slice(12, 20), slice(6, 12), slice(2, 5)), 4)}

KILL_SCRIPT = r"""
import sys, time
from pathlib import Path
import c2f_med.case
from c2f_med.audit import run_audit

bundle, datalist, out, marker, method = sys.argv[1:6]
real, provenance_files = c2f_med.case.write_json, []

def write_json(path, obj):
    # the second case's provenance.json: its folder is half-written; say so and wait for SIGKILL
    if Path(path).name == "provenance.json":
        provenance_files.append(path)
        if len(provenance_files) == 2:
            Path(marker).touch()
            time.sleep(600)
    real(path, obj)

c2f_med.case.write_json = write_json
run_audit(bundle, datalist, out, method=method, progress=False)
"""


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (by relative name)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def same_cell(a: str, b: str) -> bool:
    """Equal CSV cells: numbers up to float noise (threads differ between runs), text exactly."""
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-5, abs_tol=1e-7)
    except ValueError:
        return a == b


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """Datalist of the four :data:`COHORT` cases (testing section)."""
    folder = tmp_path_factory.mktemp("cohort")
    items = [write_tiny_case(folder, name, *spec) for name, spec in COHORT.items()]
    write_datalist(folder / "datalist.json", testing=items, name="cohort")
    return folder / "datalist.json"


@pytest.fixture(scope="module")
def single_run(tiny_bundle, cohort, tmp_path_factory):
    """One process audits the cohort: ``(out, summary, digest of the inputs before the run)``."""
    before = tree_digest(cohort.parent)
    out = tmp_path_factory.mktemp("single") / "audit"
    summary = run_audit(tiny_bundle, cohort, out, method=METHOD, progress=False)
    return out, summary, before


def test_outputs_scores_and_provenance(single_run, tiny_bundle, cohort):
    out, summary, before = single_run
    assert tree_digest(cohort.parent) == before  # inputs never written

    rows = read_csv(out / "per_case.csv")
    assert [r["case"] for r in rows] == list(COHORT)
    assert all(r["error"] == "" for r in rows)
    assert [int(r["slices"]) for r in rows] == [3, 3, 0, 3]  # lesion slices scored per case
    assert rows[2]["ap"] == ""  # no lesion: not applicable, not 0

    saved = json.loads((out / "summary.json").read_text())
    assert saved["methods"][METHOD]["ap"] == pytest.approx(summary["methods"][METHOD]["ap"])
    for key in ("bundle", "datalist", "cases", "lesion_slices", "classifier", "methods"):
        assert key in saved
    assert set(SUMMARY_KEYS) <= set(saved["methods"][METHOD])
    assert saved["cases"] == 4 and saved["lesion_slices"] == 9 and saved["methods"][METHOD]["slices"] == 9
    assert saved["audit"] == {"cases": 4, "done": 4, "failed": 0}
    assert (out / "summary.md").is_file() and (out / "report.html").is_file()

    # the slices scored for the summary are the case folder's: same maps, same AP
    for row in read_csv(out / "per_slice.csv"):
        scores = json.loads((out / "cases" / row["case"] / "scores.json").read_text())
        ap = {s["slice"]: s["ap"] for s in scores["per_slice"]}
        assert float(row["ap"]) == pytest.approx(ap[int(row["slice"])], abs=1e-6)

    prov = json.loads((out / "provenance.json").read_text())
    assert prov["bundle"]["sha256"] == sha256_file(tiny_bundle / "models" / "model.pt")
    assert prov["inputs"]["datalist"]["sha256"] == input_hash(cohort)
    assert prov["method"] == METHOD and prov["versions"]["torch"]
    assert prov["world_size"] == 1 and prov["counts"]["done"] == 4
    for name, case in prov["cases"].items():
        image = cohort.parent / "images" / f"{name}.nii.gz"
        assert case["inputs"]["image"]["sha256"] == input_hash(image)
        assert case["seed"] == case_seed(name) and case["seconds"] > 0
        case_prov = json.loads((out / "cases" / name / "provenance.json").read_text())
        assert case_prov["method"] == METHOD and case_prov["seed"] == case_seed(name)
        assert case_prov["params"] == prov["params"]


def test_rerun_skips_finished_cases(single_run, tiny_bundle, cohort):
    out, summary, _ = single_run
    ledger = read_ledger(out)
    folders = {p.name: p.stat().st_mtime_ns for p in (out / "cases").iterdir()}
    again = run_audit(tiny_bundle, cohort, out, method=METHOD, progress=False)
    assert read_ledger(out) == ledger  # nothing redone
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cases").iterdir()} == folders
    assert again["methods"][METHOD]["ap"] == summary["methods"][METHOD]["ap"]


def test_rerun_with_another_method_is_refused(single_run, tiny_bundle, cohort):
    out, _, _ = single_run
    with pytest.raises(InputError, match="another method"):
        run_audit(tiny_bundle, cohort, out, method="attention", progress=False)


def test_two_processes_share_the_cases_and_merge_like_one(single_run, tiny_bundle, cohort, tmp_path):
    out = tmp_path / "audit"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "c2f_med.cli", "audit", "--bundle", str(tiny_bundle), "--datalist", str(cohort),
           "--out", str(out), "--method", METHOD]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]

    # every case exactly once, the ranks' shares disjoint and both non-empty
    shares = {p.name: [json.loads(line)["case"] for line in p.read_text().splitlines()]
              for p in sorted((out / "ledger").glob("*.jsonl"))}
    assert sorted(shares) == ["rank000.jsonl", "rank001.jsonl"]
    assert all(len(s) == 2 for s in shares.values())
    assert Counter(c for s in shares.values() for c in s) == Counter(list(COHORT))

    one, two = single_run[0], out
    for name in ("per_case.csv", "per_slice.csv"):
        a, b = read_csv(one / name), read_csv(two / name)
        assert len(a) == len(b) and a[0].keys() == b[0].keys()
        for ra, rb in zip(a, b):
            for key in ra.keys() - TIMING:
                assert same_cell(ra[key], rb[key]), (name, ra["case"], key, ra[key], rb[key])
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert sa["classifier"] == pytest.approx(sb["classifier"])
    for key, value in sa["methods"][METHOD].items():
        if key not in TIMING and isinstance(value, float):
            assert value == pytest.approx(sb["methods"][METHOD][key], rel=1e-5), key
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["world_size"] == 2 and [r["cases"] for r in prov["ranks"]] == [2, 2]


def test_sigkill_then_resume_loses_and_duplicates_nothing(tiny_bundle, cohort, tmp_path):
    three = ["tiny_a", "tiny_b", "tiny_c"]
    datalist = tmp_path / "three.json"
    write_datalist(datalist, testing=[{k: item[k] for k in ("image", "label")} for item in read_datalist(cohort)
                                      if item["case_id"] in three])
    out, marker, log = tmp_path / "audit", tmp_path / "half_written", tmp_path / "log.txt"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(tiny_bundle), str(datalist), str(out),
                                 str(marker), METHOD], stdout=fh, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the audit never reached its second case"
            time.sleep(0.1)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    # killed while writing the second case: one finished, one hidden half-written folder
    cases = out / "cases"
    assert [(r["case"], r["status"]) for r in read_ledger(out)] == [("tiny_a", "done")]
    assert sorted(p.name for p in cases.iterdir() if not p.name.startswith(".")) == ["tiny_a"]
    (half,) = [p for p in cases.iterdir() if p.name.startswith(".tiny_b.")]
    assert (half / "saliency.nii.gz").exists() and not (half / "provenance.json").exists()
    # a complete-looking folder without a ledger line (killed between rename and ledger) is not done
    shutil.copytree(cases / "tiny_a", cases / "tiny_c")
    first = (cases / "tiny_a" / "provenance.json").stat().st_mtime_ns

    run_audit(tiny_bundle, datalist, out, method=METHOD, progress=False)
    assert Counter((r["case"], r["status"]) for r in read_ledger(out)) == Counter((c, "done") for c in three)
    assert sorted(p.name for p in cases.iterdir()) == three  # no hidden leftovers
    assert (cases / "tiny_a" / "provenance.json").stat().st_mtime_ns == first  # not redone
    redone = json.loads((cases / "tiny_c" / "provenance.json").read_text())
    assert redone["inputs"]["image"]["path"].endswith("tiny_c.nii.gz")
    rows = read_csv(out / "per_case.csv")
    assert [r["case"] for r in rows] == three and all(r["error"] == "" for r in rows)


def test_corrupt_scan_is_reported_and_the_others_finish(tiny_bundle, tmp_path):
    data = tmp_path / "data"
    good = [write_tiny_case(data, name, *TINY_CASES[name]) for name in ("tiny_a", "tiny_c")]
    corrupt = data / "images" / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b this is not a gzipped NIfTI file" * 10)
    write_datalist(data / "datalist.json", testing=[good[0], {"image": str(corrupt)}, good[1]])
    out = tmp_path / "audit"
    summary = run_audit(tiny_bundle, data / "datalist.json", out, method=METHOD, progress=False)

    rows = read_csv(out / "per_case.csv")
    assert [r["case"] for r in rows] == ["tiny_a", "corrupt", "tiny_c"]
    assert rows[0]["error"] == rows[2]["error"] == ""
    assert "corrupt.nii.gz" in rows[1]["error"] and "\n" not in rows[1]["error"]
    assert summary["audit"] == {"cases": 3, "done": 2, "failed": 1} and summary["cases"] == 2
    assert (out / "cases" / "tiny_c" / "saliency.nii.gz").exists() and not (out / "cases" / "corrupt").exists()
    report = (out / "report.html").read_text()
    assert "Failed cases (1)" in report and "corrupt.nii.gz" in report

    # a rerun retries the failed case only
    run_audit(tiny_bundle, data / "datalist.json", out, method=METHOD, progress=False)
    assert Counter(r["case"] for r in read_ledger(out)) == {"tiny_a": 1, "corrupt": 2, "tiny_c": 1}


def test_unwritable_output_is_refused_before_any_work(tiny_datalist, tmp_path, capsys):
    from c2f_med.cli import main

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = blocker / "audit"  # fails for root too: a path under a regular file
    with pytest.raises(InputError, match="cannot be written") as err:  # before the (missing) bundle is read
        run_audit(tmp_path / "no_such_bundle", tiny_datalist, out, progress=False)
    assert err.value.path == str(out)
    assert main(["audit", "--bundle", str(tmp_path / "no_such_bundle"), "--datalist", str(tiny_datalist),
                 "--out", str(out)]) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("c2f-med: error: ") and str(out) in message and "\n" not in message


def test_output_inside_an_input_folder_is_refused(tmp_path):
    series = tmp_path / "dicom" / "case_001"
    series.mkdir(parents=True)
    with pytest.raises(InputError, match="inside the input"):
        check_output(series / "audit", [tmp_path / "datalist.json", series])
    assert not (series / "audit").exists()
    assert check_output(tmp_path / "elsewhere", [series]) == (tmp_path / "elsewhere").resolve()
    assert not (tmp_path / "elsewhere").exists()  # nothing created before the work


def test_ledger_keeps_records_around_a_line_cut_by_a_kill(tmp_path):
    ledger = Ledger(tmp_path / "ledger" / "rank000.jsonl")
    ledger.append({"case": "a", "status": "done", "finished": 1.0})
    with open(ledger.path, "ab") as fh:
        fh.write(b'{"case": "b", "sta')  # killed mid-line
    ledger.append({"case": "c", "status": "failed", "error": "x", "finished": 2.0})
    assert [r["case"] for r in read_ledger(tmp_path)] == ["a", "c"]


def test_case_seed_depends_on_the_case_only():
    assert case_seed("tiny_a") == case_seed("tiny_a") != case_seed("tiny_b")
    assert 0 <= case_seed("tiny_a") < 2**32
