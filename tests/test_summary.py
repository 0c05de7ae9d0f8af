"""summary.json / summary.md builder: NaN-aware means, dataset mIoU from counts, classifier scores, bold best."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from c2f_med.metrics.localisation import IoUAccumulator, threshold_mean
from c2f_med.summary import (
    CI_KEYS,
    SCORE_KEYS,
    classifier_scores,
    iou_counts,
    render_markdown,
    summarise,
    write_summary,
)

CONTRACT = ("pointing_game", "pointing_game_tol", "relevance_mass", "miou", "dice", "iou_topk", "auroc", "ap",
            "deletion_auc", "insertion_auc", "seconds_per_slice", "forward_passes_per_slice", "slices")
BUNDLE = SimpleNamespace(root="/bundles/tiny", sha256="ab" * 32)


def make_rows(seed: int = 0):
    """Two methods on the same 5 slices of 2 cases, real IoU counts; "good" beats "bad" on every score."""
    rng = np.random.default_rng(seed)
    rows, preds = [], {"good": [], "bad": []}
    for case, slices in (("a", [3, 4, 5]), ("b", [1, 2])):
        for i in slices:
            mask = np.zeros((12, 12), bool)
            mask[2:6, 3:8] = True
            for method, quality in (("good", 0.8), ("bad", 0.2)):
                sal = rng.random((12, 12)) + quality * mask
                pred = threshold_mean(sal)
                preds[method].append((pred, mask))
                scores = {k: quality + 0.01 * rng.random() for k in SCORE_KEYS}
                scores["deletion_auc"] = 1 - quality
                rows.append({"case": case, "slice": i, "method": method, **scores, "seconds": quality,
                             "forward_passes": 10 * quality, "backward_passes": 1.0, **iou_counts(pred, mask),
                             **({"K": 4, "pos1": 3} if method == "good" else {})})
    return rows, preds


def test_means_counts_and_dataset_miou():
    rows, preds = make_rows()
    rows[0]["auroc"] = math.nan  # "good", case a slice 3: not applicable
    s = summarise(rows, [], BUNDLE, "dl.json", 2, n_boot=200)
    assert s["cases"] == 2 and s["lesion_slices"] == 5 and s["datalist"] == "dl.json"
    assert s["bundle"] == {"path": "/bundles/tiny", "sha256": "ab" * 32}
    for name, m in s["methods"].items():
        assert all(k in m for k in CONTRACT)
        assert m["slices"] == 5
        own = [r for r in rows if r["method"] == name]
        assert m["ap"] == pytest.approx(np.mean([r["ap"] for r in own]))
        acc = IoUAccumulator()
        for pred, mask in preds[name]:
            acc.update(pred, mask)
        assert m["miou"] == pytest.approx(acc.aggregate())
    good = s["methods"]["good"]
    assert good["auroc"] == pytest.approx(np.mean([r["auroc"] for r in rows if r["method"] == "good"][1:]))
    assert good["not_applicable"]["auroc"] == 1 and s["methods"]["bad"]["not_applicable"]["auroc"] == 0
    assert good["records"] == {"K": 4, "pos1": 3} and "records" not in s["methods"]["bad"]
    assert good["ci95"]["ap"]["low"] <= good["ap"] <= good["ci95"]["ap"]["high"]


def test_method_without_rows_is_reported_as_not_applicable():
    rows, _ = make_rows()
    s = summarise(rows, [], BUNDLE, "dl.json", 2, methods=["good", "bad", "absent"], n_boot=50)
    absent = s["methods"]["absent"]
    assert absent["slices"] == 0 and math.isnan(absent["ap"]) and math.isnan(absent["miou"])
    assert list(s["methods"]) == ["good", "bad", "absent"]


def test_paired_comparison_only_with_c2f_and_on_common_slices():
    rows, _ = make_rows()
    assert "comparisons" not in summarise(rows, [], BUNDLE, "d", 2, n_boot=50)
    for r in rows:
        r["method"] = {"good": "c2f"}.get(r["method"], r["method"])
    rows = rows[:-1]  # "bad" misses the last slice
    c = summarise(rows, [], BUNDLE, "d", 2, n_boot=200)["comparisons"]["c2f - bad"]
    for key in CI_KEYS:
        assert c[key]["n_pairs"] == 4 and c[key]["mean_diff"] > 0.5 and c[key]["low"] > 0


def test_classifier_scores():
    rows = [{"case": "a", "slice": i, "probability": p, "lesion": y}
            for i, (p, y) in enumerate([(0.9, True), (0.6, False), (0.4, True), (0.1, False), (0.5, True)])]
    c = classifier_scores(rows)
    # positives 0.9, 0.4, 0.5 vs negatives 0.6, 0.1: pairs won 2 + 1 + 1 = 4 of 6
    assert c["slice_auroc"] == pytest.approx(4 / 6)
    assert c["slice_accuracy"] == pytest.approx(3 / 5)  # 0.9 yes, 0.6 no, 0.4 no, 0.1 yes, 0.5 yes
    assert c["slices"] == 5 and c["lesion_slices"] == 3
    only = classifier_scores([r for r in rows if r["lesion"]])
    assert math.isnan(only["slice_auroc"]) and only["slice_accuracy"] == pytest.approx(2 / 3)
    assert math.isnan(classifier_scores([])["slice_auroc"])


def test_classifier_scores_per_lesion():
    # case a: lesion 1 cut by slices 0-2 (best 0.8), lesion 2 by slices 2-3 (best 0.3); case b: its
    # lesion 1 is another lesion (best 0.6); lesion-free slices 0.5 and 0.1
    spec = [("a", 0.2, [1]), ("a", 0.8, [1]), ("a", 0.3, [1, 2]), ("a", 0.1, [2]), ("a", 0.5, []),
            ("b", 0.6, [1]), ("b", 0.1, [])]
    rows = [{"case": c, "slice": i, "probability": p, "lesion": bool(ids), "lesions": ids}
            for i, (c, p, ids) in enumerate(spec)]
    c = classifier_scores(rows)
    assert c["lesions"] == 3
    # lesions 0.8, 0.3, 0.6 against lesion-free 0.5, 0.1: pairs won 2 + 1 + 2 = 5 of 6
    assert c["lesion_auroc"] == pytest.approx(5 / 6)
    assert c["lesion_sensitivity"] == pytest.approx(2 / 3)
    # the slice level is lower: the lesions' faint slices 0.2, 0.3, 0.1 rank below a lesion-free 0.5
    assert c["slice_auroc"] < c["lesion_auroc"]
    # rows without lesion ids (written before they existed) give no per-lesion scores
    old = classifier_scores([{k: v for k, v in r.items() if k != "lesions"} for r in rows])
    assert old["lesions"] == 0 and math.isnan(old["lesion_auroc"]) and math.isnan(old["lesion_sensitivity"])
    assert old["slice_auroc"] == c["slice_auroc"]


def _table(md: str) -> dict[str, dict[str, str]]:
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    header = [h.strip() for h in lines[0].strip("|").split("|")]
    out = {}
    for line in lines[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] in ("good", "bad", "c2f"):
            out[cells[0]] = dict(zip(header, cells))
    return out


def test_markdown_bolds_the_best_and_states_counts(tmp_path):
    rows, _ = make_rows()
    clf = [{"case": "a", "slice": 1, "probability": 0.7, "lesion": True},
           {"case": "a", "slice": 0, "probability": 0.2, "lesion": False}]
    s = summarise(rows, clf, BUNDLE, "dl.json", 2, n_boot=50)
    md = render_markdown(s)
    table = _table(md)
    header = list(table["good"])
    assert header[:4] == ["method", "AP", "IoU top-k", "mIoU"]
    for col in ("AP", "IoU top-k", "pointing game", "relevance mass", "deletion AUC"):
        assert table["good"][col].startswith("**") and not table["bad"][col].startswith("**"), col
    # costs: lower is better, "bad" is cheaper here
    assert table["bad"]["s / slice"].startswith("**") and not table["good"]["s / slice"].startswith("**")
    assert "2 cases, 5 lesion slices" in md
    write_summary(tmp_path, s)
    assert (tmp_path / "summary.md").read_text() == md
    assert json.loads((tmp_path / "summary.json").read_text())["methods"]["good"]["slices"] == 5


def test_nan_written_as_null_and_not_applicable_listed(tmp_path):
    rows, _ = make_rows()
    for r in rows:
        if r["method"] == "bad":
            r["deletion_auc"] = math.nan
    s = summarise(rows, [], BUNDLE, "dl.json", 2, n_boot=50)
    write_summary(tmp_path, s)
    data = json.loads((tmp_path / "summary.json").read_text())
    assert data["methods"]["bad"]["deletion_auc"] is None
    assert data["classifier"]["slice_auroc"] is None
    md = (tmp_path / "summary.md").read_text()
    assert _table(md)["bad"]["deletion AUC"] == "n/a" and "bad: deletion_auc 5" in md


def test_markdown_bolds_nothing_when_all_methods_tie():
    rows, _ = make_rows()
    for r in rows:
        r["pointing_game"] = 1.0
    table = _table(render_markdown(summarise(rows, [], BUNDLE, "d", 2, n_boot=50)))
    assert table["good"]["pointing game"] == table["bad"]["pointing game"] == "1.000"


def test_rows_read_back_from_csv_give_the_same_summary(tmp_path):
    import csv

    rows, _ = make_rows()
    rows[3]["ap"] = math.nan
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(tmp_path / "rows.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns)
        w.writeheader()
        w.writerows({k: "" if isinstance(r.get(k), float) and math.isnan(r[k]) else r.get(k, "") for k in columns}
                    for r in rows)
    with open(tmp_path / "rows.csv", newline="") as fh:
        text_rows = list(csv.DictReader(fh))
    a = summarise(rows, [], BUNDLE, "d", 2, n_boot=100)
    b = summarise(text_rows, [], BUNDLE, "d", 2, n_boot=100)
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_strata_lesions_and_stability():
    rows, _ = make_rows()
    for r in rows:  # case a's slices called positive, case b's missed; each case one 3-D lesion
        r["probability"] = 0.9 if r["case"] == "a" else 0.2
        r["positive"] = r["case"] == "a"
        r["stratum"] = "tp" if r["positive"] else "fn"
        r["lesions"] = "1"
    fp = [{"case": "b", "slice": 7, "method": m, "probability": 0.8, "positive": True, "stratum": "fp",
           "mass_foreground": v, "topk_foreground": v, "peak_foreground": 1.0, "foreground_fraction": 0.4,
           "seconds": 0.1, "forward_passes": 1.0} for m, v in (("good", 0.9), ("bad", 0.3))]
    stability = [{"case": "a", "slice": 3, "method": "good", "int16": 1.0, "noise": 0.9},
                 {"case": "a", "slice": 4, "method": "good", "int16": 0.98, "noise": 0.7}]
    bundle = SimpleNamespace(**vars(BUNDLE), operating_point=SimpleNamespace(threshold=0.5, source="bundle"))
    clf = [{"case": "a", "slice": 3, "probability": 0.9, "lesion": True, "lesions": [1]},
           {"case": "b", "slice": 7, "probability": 0.8, "lesion": False, "lesions": []},
           {"case": "b", "slice": 8, "probability": 0.1, "lesion": False, "lesions": []}]
    s = summarise(rows, clf, bundle, "dl.json", 2, fp_rows=fp, stability=stability, n_boot=50)
    assert s["operating_point"] == {"threshold": 0.5, "source": "bundle"}
    assert s["classifier"]["threshold"] == 0.5 and s["classifier"]["specificity"] == 0.5
    assert set(s["strata"]) == {"tp", "fn", "fp"}
    assert (s["strata"]["tp"]["slices"], s["strata"]["fn"]["slices"], s["strata"]["fp"]["slices"]) == (3, 2, 1)
    for name, case in (("tp", "a"), ("fn", "b")):
        got = s["strata"][name]["methods"]["good"]
        assert all(k in got for k in CONTRACT) and got["slices"] == len({3, 4, 5} if case == "a" else {1, 2})
        own = [r["ap"] for r in rows if r["method"] == "good" and r["case"] == case]
        assert got["ap"] == pytest.approx(np.mean(own))
    assert s["strata"]["fp"]["methods"]["good"]["mass_foreground"] == 0.9
    assert s["strata"]["fp"]["methods"]["bad"]["slices"] == 1
    lesion = s["lesions"]["good"]
    per_case = [np.mean([r["ap"] for r in rows if r["method"] == "good" and r["case"] == c]) for c in "ab"]
    assert lesion["lesions"] == 2 and lesion["ap"] == pytest.approx(np.mean(per_case))
    best = [max(r["ap"] for r in rows if r["method"] == "good" and r["case"] == c) for c in "ab"]
    assert lesion["best"]["ap"] == pytest.approx(np.mean(best))
    assert s["stability"] == {"good": {"int16": pytest.approx(0.99), "noise": pytest.approx(0.8), "slices": 2}}
    md = render_markdown(s)
    assert md.index("(TP, 3 slices)") < md.index("(FN, 2 slices)") < md.index("All lesion slices") < md.index(
        "(FP, 1 slices)") < md.index("Per 3-D lesion") < md.index("Stability")
    assert "the bundle's operating point" in md
    # rows without the model's decision (older CSVs): no strata
    plain, _ = make_rows()
    assert "strata" not in summarise(plain, [], BUNDLE, "d", 2, n_boot=50)
