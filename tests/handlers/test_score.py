"""LesionScoreHandler: per-case scores equal the CLI pipeline's, merged files and metrics agree."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from c2f_med.case import explain_case
from c2f_med.handlers import METRIC_KEYS, ExplainHandler, LesionScoreHandler, all_gather, is_rank0

CONTRACT_KEYS = ("pointing_game", "pointing_game_tol", "relevance_mass", "miou", "dice", "iou_topk", "auroc", "ap",
                 "deletion_auc", "insertion_auc", "seconds_per_slice", "forward_passes_per_slice", "slices")


def _floats(rows, key):
    return np.array([float(r[key]) for r in rows])


def test_scores_match_explain_case(evaluate, bundle, cases, tmp_path):
    out = tmp_path / "run"
    items, evaluator = evaluate([ExplainHandler("gae", score=True, bundle=bundle),
                                 LesionScoreHandler(out, bundle, cases / "datalist.json")])
    a, b = items
    assert "scores" not in b  # no mask, not scored
    cli = explain_case(bundle, cases / "images" / "a.nii.gz", tmp_path / "cli", mask=cases / "labels" / "a.nii.gz",
                       method="gae", progress=False)
    assert a["scores"]["lesion_slices"] == cli.scores["lesion_slices"] == 3
    assert a["scores"]["tolerance_voxels"] == cli.scores["tolerance_voxels"]
    for level in ("volume", "slices"):
        assert a["scores"][level] == pytest.approx(cli.scores[level], nan_ok=True)

    rows = list(csv.DictReader(open(out / "per_slice.csv")))
    assert [int(r["slice"]) for r in rows] == [1, 2, 3] and {r["case"] for r in rows} == {"a"}
    metrics = evaluator.state.metrics
    assert set(METRIC_KEYS) <= set(metrics)
    for key in ("ap", "auroc", "relevance_mass", "iou_topk"):
        assert metrics[key] == pytest.approx(_floats(rows, key).mean(), rel=1e-5)
        assert metrics[key] == pytest.approx(a["scores"]["slices"][key])  # one scored case

    summary = json.load(open(out / "summary.json"))
    assert (summary["cases"], summary["lesion_slices"]) == (2, 3)
    assert summary["classifier"]["slices"] == 5 and summary["classifier"]["lesion_slices"] == 3
    assert summary["classifier"]["lesions"] == 1  # case a's one lesion, cut by slices 1-3
    method = summary["methods"]["gae"]
    assert set(CONTRACT_KEYS) <= set(method)
    assert method["deletion_auc"] is None and method["insertion_auc"] is None  # faithfulness not asked for
    assert method["slices"] == 3
    assert method["forward_passes_per_slice"] == 1 and method["backward_passes_per_slice"] == 1  # GAE: one each
    assert (out / "summary.md").read_text().startswith("# Explanation scores")
    # the model's decision at the bundle's operating point splits the lesion slices, as in c2f-med evaluate
    point = bundle.operating_point
    assert summary["operating_point"] == {"threshold": point.threshold, "source": point.source}
    positive = [float(r["probability"]) >= point.threshold for r in rows]
    assert [r["stratum"] for r in rows] == ["tp" if p else "fn" for p in positive]
    assert summary["strata"]["tp"]["slices"] == sum(positive) and summary["strata"]["fn"]["slices"] == 3 - sum(
        positive)
    assert summary["lesions"]["gae"]["lesions"] == 1
    alarms = list(csv.DictReader(open(out / "false_alarms.csv")))
    assert summary["strata"]["fp"]["slices"] == len(alarms)
    assert all(float(r["probability"]) >= 0.5 and r["case"] == "a" for r in alarms)

    per_case = list(csv.DictReader(open(out / "per_case.csv")))
    assert [r["case"] for r in per_case] == ["a"]
    assert float(per_case[0]["volume_ap"]) == pytest.approx(a["scores"]["volume"]["ap"], rel=1e-5)
    assert float(per_case[0]["ap"]) == pytest.approx(a["scores"]["slices"]["ap"], rel=1e-5)


def test_each_run_starts_afresh(evaluate, bundle, cases, tmp_path):
    handler = LesionScoreHandler(tmp_path, bundle, save_details=False)
    _, evaluator = evaluate([ExplainHandler("rollout", score=True), handler])
    first = dict(evaluator.state.metrics)
    evaluator.run()
    assert len(handler.rows) == 3 and evaluator.state.metrics == pytest.approx(first, nan_ok=True)
    assert not (tmp_path / "per_case.csv").exists() and (tmp_path / "summary.json").exists()


def test_metrics_only_without_output_dir(evaluate):
    _, evaluator = evaluate([ExplainHandler("rollout", score=True), LesionScoreHandler()])
    assert 0 <= evaluator.state.metrics["ap"] <= 1
    with pytest.raises(ValueError, match="bundle"):
        LesionScoreHandler("somewhere")


def test_faithfulness_on_request(evaluate, bundle):
    items, _ = evaluate([ExplainHandler("rollout", score=True, faithfulness=True)])
    rows = items[0]["case_scores"].rows
    assert len(rows) == 3 and all(0 <= r["deletion_auc"] <= 1 and 0 <= r["insertion_auc"] <= 1 for r in rows)
    assert "case_scores" not in items[1]  # no mask, nothing scored


def test_needs_the_explain_handlers_scores(evaluate, bundle):
    with pytest.raises(RuntimeError, match="score=True"):
        evaluate([ExplainHandler("rollout"), LesionScoreHandler()])


def test_single_process_gather():
    assert is_rank0() and all_gather({"x": 1}) == [{"x": 1}]
