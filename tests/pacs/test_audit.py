"""``c2f-med audit --dicomweb``: a query's series explained, scored against the server's SEGs, results
stored back; the server stopped mid-audit, restarted, and the audit resumed without loss or duplicates."""

from __future__ import annotations

import csv
import json

import pytest

import c2f_med.audit
from c2f_med.audit import read_ledger
from c2f_med.cli import main
from c2f_med.pacs.client import connect

from .conftest import PASSWORD


def _results(server, studies) -> dict[str, list[str]]:
    """``{result series UID: [SOP instance UIDs]}`` of the audit's results on the server, over all studies."""
    client = connect(server.root)
    out = {}
    for case in studies.values():
        for s in client.search_for_series(case.study, fields=["SeriesDescription"]):
            if str((s.get("0008103E") or {}).get("Value", [""])[0]).startswith("c2f_med saliency, method attention,"):
                series = s["0020000E"]["Value"][0]
                out[series] = [i["00080018"]["Value"][0] for i in client.search_for_instances(case.study, series)]
    return out


@pytest.mark.slow
def test_audit_over_a_query_survives_a_server_restart(orthanc, credentials, tmp_path, tiny_bundle, monkeypatch):
    server, studies = orthanc
    out, cache = tmp_path / "audit", tmp_path / "cache"
    args = ["audit", "--dicomweb", server.root, "--query", "Modality=MR", "--annotations", "server",
            "--segment", "lesion", "--store-results", "--method", "attention", "--bundle", str(tiny_bundle),
            "--out", str(out), "--cache", str(cache)]
    original, calls = c2f_med.audit.audit_case, []

    def stop_after_first(*a, **k):  # the server goes down once the first case is finished
        record = original(*a, **k)
        calls.append(record["case"])
        if len(calls) == 1:
            server.stop()
        return record

    monkeypatch.setattr(c2f_med.audit, "audit_case", stop_after_first)
    try:
        assert main(args) == 0
    finally:
        server.start()
    first = {r["case"]: r for r in read_ledger(out)}
    assert len(first) == 3 and first[calls[0]]["status"] == "done"
    failed = [r for r in first.values() if r["status"] == "failed"]
    assert len(failed) == 2 and all("not reachable" in r["error"] and server.root in r["error"] for r in failed)
    kinds = 3  # result series per case: Parametric Map, SEG of the salient region, colour overlay images
    assert len(_results(server, studies)) == kinds

    monkeypatch.setattr(c2f_med.audit, "audit_case", original)
    assert main(args) == 0  # the rerun retries the failed cases only
    records = read_ledger(out)
    done = [r["case"] for r in records if r["status"] == "done"]
    assert sorted(done) == sorted(s.series for s in studies.values())  # each case done exactly once
    results = _results(server, studies)
    assert len(results) == 3 * kinds and all(len(uids) >= 1 for uids in results.values())

    rows = list(csv.DictReader(open(out / "per_case.csv")))
    assert all(row["error"] == "" for row in rows)
    assert all(float(row["retrieve_seconds"]) > 0 and float(row["explain_seconds"]) > 0 for row in rows)
    assert all(float(row["case_lesion_slices"]) > 0 for row in rows)  # scored against the server's SEGs
    summary = json.loads((out / "summary.json").read_text())
    assert summary["audit"] == {"cases": 3, "done": 3, "failed": 0}

    assert main(args) == 0  # a third run: nothing to do, nothing stored
    assert len(read_ledger(out)) == len(records) and _results(server, studies) == results
    assert not any(cache.rglob("*.dcm"))  # finished studies are not kept
    assert all(PASSWORD not in f.read_text() for f in out.rglob("*") if f.suffix in (".json", ".jsonl", ".csv"))
