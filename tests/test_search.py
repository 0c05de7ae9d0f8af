"""The C2F design search: the selection rule on hand-made results, and a tiny end-to-end run whose
rows and summaries agree with ``run_evaluate``'s scoring of the same variant."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from c2f_med.errors import InputError
from c2f_med.evaluate import run_evaluate
from c2f_med.explain import create
from c2f_med.search import VARIANTS, render_search, run_search, select, variant_params


def _result(method, ap, topk, miou, fwd, bwd=0.0):
    return {"method": method, "params": {}, "ap": ap, "iou_topk": topk, "miou": miou, "relevance_mass": 0.1,
            "seconds_per_slice": 0.1, "forward_passes_per_slice": fwd, "backward_passes_per_slice": bwd}


def _report_text(results):
    return render_search({"section": "validation", "cases": 1, "lesion_slices": 1, "results": results,
                          "selection": select(results), "stratum": "tp", "tp_slices": 1,
                          "operating_point": {"threshold": 0.5, "source": "default"}})


def test_select_applies_the_miou_and_cost_conditions():
    results = {
        "vitcx": _result("vitcx", 0.30, 0.30, 0.50, 21),
        "gae": _result("gae", 0.20, 0.20, 0.60, 1, 1),
        "a": _result("c2f", 0.50, 0.50, 0.55, 11),  # best (AP + topk) but mIoU below gae's
        "b": _result("c2f", 0.40, 0.40, 0.61, 15),  # qualifies
        "c": _result("c2f", 0.45, 0.45, 0.62, 20, 1),  # mIoU fine but 20 + 2 > 21 passes
        "d": _result("c2f", 0.35, 0.35, 0.65, 12),  # qualifies, lower score than b
    }
    sel = select(results)
    assert sel["selected"] == "b" and sel["qualified"] == ["b", "d"] and not sel["fallback"]
    assert sel["best_baseline_miou"] == 0.60 and sel["vitcx_cost"] == 21
    assert "Selected: **b**." in _report_text(results)
    # nobody reaches the mIoU: the best within the cost, flagged as a fallback
    results["gae"]["miou"] = 0.9
    sel = select(results)
    assert sel["selected"] == "a" and sel["fallback"] and sel["qualified"] == []
    assert "no variant within the cost met the mIoU condition" in _report_text(results)
    # nobody is within the cost either: the best of all variants
    results["vitcx"]["forward_passes_per_slice"] = 5
    sel = select(results)
    assert sel["selected"] == "a" and sel["fallback"] and sel["within_cost"] == []
    assert "no variant was within vitcx's cost" in _report_text(results)


def test_select_needs_vitcx():
    with pytest.raises(ValueError, match="vitcx"):
        select({"a": _result("c2f", 0.5, 0.5, 0.5, 1), "gae": _result("gae", 0.1, 0.1, 0.1, 1)})


def test_every_variant_is_a_valid_c2f_parameter_set(tiny_bundle):
    from c2f_med.evaluate import check_methods
    from c2f_med.models.bundle import load_bundle

    bundle = load_bundle(tiny_bundle)
    for name in VARIANTS:
        params = variant_params(name)
        used = check_methods(bundle, ["c2f"], {"c2f": params})["c2f"]
        assert all(used[k] == v for k, v in params.items()), name
    first = create("c2f-first", bundle.model).param_dict()
    assert variant_params("first") == {k: v for k, v in first.items() if k not in ("batch_size", "seed")}


def test_search_end_to_end_matches_evaluate(tiny_bundle, tiny_datalist, tmp_path):
    variants = ["best-costaware", "noAF"]
    report = run_search(tiny_bundle, [tiny_datalist], tmp_path / "s", variants=variants,
                        baselines=("vitcx", "rollout"), section="testing", progress=False)
    assert set(report["results"]) == {"vitcx", "rollout", *variants}
    assert report["selection"]["selected"] in variants
    assert json.loads((tmp_path / "s" / "search.json").read_text())["selection"] == report["selection"]
    assert "Selected: **" in (tmp_path / "s" / "search.md").read_text()
    selected = report["selection"]["selected"]
    others = {"vitcx", "rollout", *variants} - {selected}
    assert set(report["comparisons"]) == {f"{selected} - {n}" for n in others}
    for c in report["comparisons"].values():  # paired on the same slices: the CI holds the mean difference
        assert c["ap"]["n_pairs"] >= 1
        assert c["ap"]["n_pairs"] < 2 or c["ap"]["low"] <= c["ap"]["mean_diff"] <= c["ap"]["high"]
    assert f"{selected} minus each" in (tmp_path / "s" / "search.md").read_text()
    with open(tmp_path / "s" / "search.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["variant"] for r in rows} == set(report["results"])
    # the deciding stratum: the lesion slices the model calls positive
    tp = {(r["case"], r["slice"]) for r in rows if float(r["probability"]) >= 0.5}
    assert report["tp_slices"] == len(tp) and report["operating_point"] == {"threshold": 0.5, "source": "default"}
    assert report["stratum"] == ("tp" if tp else "all")
    if tp:
        assert report["results"]["vitcx"]["slices"] == len(tp)
    # the same variant through c2f-med evaluate's path gives the same scores
    summary = run_evaluate(
        tiny_bundle,
        tiny_datalist,
        ["c2f"],
        tmp_path / "e",
        params={"c2f": variant_params("best-costaware")},
        progress=False,
    )
    got = report["results_all"]["best-costaware"]
    for key in ("ap", "iou_topk", "miou", "forward_passes_per_slice"):
        np.testing.assert_allclose(got[key], summary["methods"]["c2f"][key], rtol=1e-9)


def test_search_rejects_unknown_variants(tiny_bundle, tiny_datalist, tmp_path):
    with pytest.raises(InputError, match="unknown variant"):
        run_search(tiny_bundle, [tiny_datalist], tmp_path / "s", variants=["nope"], section="testing")
