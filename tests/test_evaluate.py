"""``c2f-med evaluate`` on a tiny bundle and tiny cases: files, contract keys, lesion slices only, NaN
handling, scores of the mapped-back maps, workers=2 == workers=1, and bad input."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from c2f_med.case import load_scan
from c2f_med.errors import InputError
from c2f_med.evaluate import run_evaluate
from c2f_med.explain import create, explain_volume
from c2f_med.io.manifest import read_datalist
from c2f_med.metrics.localisation import average_precision
from c2f_med.models.bundle import load_bundle
from tests.conftest import TINY_CASES

METHODS = ["c2f", "rollout", "gradcam"]
CONTRACT = ("pointing_game", "pointing_game_tol", "relevance_mass", "miou", "dice", "iou_topk", "auroc", "ap",
            "deletion_auc", "insertion_auc", "seconds_per_slice", "forward_passes_per_slice", "slices")
FILES = ("per_slice.csv", "per_case.csv", "false_alarms.csv", "stability.csv", "summary.json", "summary.md",
         "gallery.png", "curves.png")


def lesion_slices() -> set[tuple[str, int]]:
    """(case, axial slice) pairs with lesion voxels (the tiny cases' affines are already RAS)."""
    return {(name, z) for name, (_, box, _) in TINY_CASES.items() if box is not None
            for z in range(box[2].start, box[2].stop)}


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def evaluated(tiny_bundle, tiny_datalist, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluate") / "out"
    summary = run_evaluate(tiny_bundle, tiny_datalist, METHODS, out, progress=False)
    return out, summary


def test_writes_every_file_atomically(evaluated):
    out, _ = evaluated
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)  # no temporary leftovers
    for name in FILES:
        assert (out / name).stat().st_size > 0


def test_summary_has_the_contract_keys(evaluated, tiny_datalist, tiny_bundle):
    out, summary = evaluated
    s = json.loads((out / "summary.json").read_text())
    assert s["cases"] == 3 and s["lesion_slices"] == len(lesion_slices())
    assert s["datalist"] == str(tiny_datalist) and s["bundle"]["path"] == str(tiny_bundle)
    assert len(s["bundle"]["sha256"]) == 64
    n_foreground = sum(shape[2] - 2 for shape, _, _ in TINY_CASES.values())  # first and last slices are 0
    assert s["classifier"]["slices"] == n_foreground
    assert 0 <= s["classifier"]["slice_accuracy"] <= 1 and 0 <= s["classifier"]["slice_auroc"] <= 1
    assert s["classifier"]["lesions"] == 2  # one box in each of two cases
    assert 0 <= s["classifier"]["lesion_auroc"] <= 1 and 0 <= s["classifier"]["lesion_sensitivity"] <= 1
    assert "Per lesion (2 3-D lesions" in (out / "summary.md").read_text()
    assert list(s["methods"]) == METHODS
    for m in METHODS:
        assert all(k in s["methods"][m] for k in CONTRACT), m
        assert s["methods"][m]["slices"] == len(lesion_slices())
        assert 0 <= s["methods"][m]["deletion_auc"] <= 1 and 0 <= s["methods"][m]["insertion_auc"] <= 1
    assert set(s["comparisons"]) == {"c2f - rollout", "c2f - gradcam"}
    assert s["methods"]["c2f"]["records"]["K"] >= 1
    clf = s["classifier"]
    assert clf["threshold"] == 0.5 and 0 <= clf["specificity"] <= 1 and 0 <= clf["ece"] <= 1
    assert s["operating_point"] == {"threshold": 0.5, "source": "default"}


def test_strata_split_the_lesion_slices_by_the_models_decision(evaluated):
    out, s = evaluated
    rows = read_csv(out / "per_slice.csv")
    positive = {(r["case"], int(r["slice"])): r["positive"] == "True" for r in rows}
    for r in rows:
        assert r["stratum"] == ("tp" if float(r["probability"]) >= 0.5 else "fn") == ("tp" if r["positive"] == "True"
                                                                                     else "fn")
    strata = s["strata"]
    assert strata["tp"]["slices"] == sum(positive.values())
    assert strata["tp"]["slices"] + strata["fn"]["slices"] == s["lesion_slices"]
    for name in ("tp", "fn"):
        for m in METHODS:
            got = strata[name]["methods"][m]
            assert got["slices"] == strata[name]["slices"] and all(k in got for k in CONTRACT)
            own = [float(r["ap"]) for r in rows if r["method"] == m and r["stratum"] == name]
            if own:
                assert got["ap"] == pytest.approx(np.mean(own), rel=1e-4)
    # false alarms: the lesion-free slices called positive, every method explained them
    alarms = read_csv(out / "false_alarms.csv")
    fp = {(r["case"], int(r["slice"])) for r in alarms}
    assert strata["fp"]["slices"] == len(fp) and not fp & set(positive)
    for r in alarms:
        assert float(r["probability"]) >= 0.5 and 0 <= float(r["mass_foreground"]) <= 1
    for m in METHODS:
        assert strata["fp"]["methods"][m]["slices"] == len(fp)
        assert {"mass_foreground", "topk_foreground", "peak_foreground", "foreground_fraction"} <= set(
            strata["fp"]["methods"][m])
    # per 3-D lesion: two lesions, each the mean over its three slices
    for m in METHODS:
        lesion = s["lesions"][m]
        assert lesion["lesions"] == 2
        per = [np.mean([float(r["ap"]) for r in rows if r["method"] == m and r["case"] == c]) for c in ("tiny_a",
                                                                                                     "tiny_b")]
        assert lesion["ap"] == pytest.approx(np.mean(per), rel=1e-4)
        assert lesion["best"]["ap"] >= lesion["ap"]
    md = (out / "summary.md").read_text()
    assert md.index("(TP,") < md.index("(FN,") < md.index("All lesion slices") < md.index("(FP,")


def test_stability_is_reported_per_method(evaluated):
    out, s = evaluated
    rows = read_csv(out / "stability.csv")
    for m in METHODS:
        own = [r for r in rows if r["method"] == m]
        counts = {c: sum(r["case"] == c for r in own) for c in TINY_CASES}
        # three lesion slices each; the lesion-free case: its false alarms, at most three
        assert counts["tiny_a"] == counts["tiny_b"] == 3 and counts["tiny_c"] <= 3
        assert s["stability"][m]["slices"] == len(own)
        for key in ("int16", "noise"):
            assert -1 <= s["stability"][m][key] <= 1
    # gradient-free rollout on an int16 file: storing it as int16 changes nothing
    assert s["stability"]["rollout"]["int16"] == pytest.approx(1.0)
    # noise at the scan's noise floor does change the maps, a little
    assert min(s["stability"][m]["noise"] for m in METHODS) < 0.9999


def test_variants_differ_from_the_scan_as_loaded(tiny_datalist):
    from c2f_med.case import load_variants

    item = json.loads(tiny_datalist.read_text())["testing"][0]
    image = tiny_datalist.parent / item["image"]
    given = load_scan(image, None)["image"]
    variants = load_variants(image)
    assert set(variants) == {"int16", "noise"}
    torch.testing.assert_close(variants["int16"].as_tensor(), given.as_tensor())  # an int16 file already
    change = (variants["noise"].as_tensor() - given.as_tensor()).abs()
    assert 0 < float(change.mean()) < 0.2 and variants["noise"].shape == given.shape


def test_per_slice_rows_are_the_lesion_slices_of_every_method(evaluated):
    out, summary = evaluated
    rows = read_csv(out / "per_slice.csv")
    for m in METHODS:
        own = [r for r in rows if r["method"] == m]
        assert {(r["case"], int(r["slice"])) for r in own} == lesion_slices()
        assert len(own) == len(lesion_slices())
    for r in rows:
        assert float(r["seconds"]) > 0 and 0 <= float(r["probability"]) <= 1
        if r["method"] == "rollout":
            assert float(r["forward_passes"]) == 1 and float(r["backward_passes"]) == 0 and r["K"] == ""
        if r["method"] == "c2f":
            # cost-aware: one forward per mask at level 1
            assert int(r["K"]) >= 1 and float(r["forward_passes"]) >= 1 + int(r["K"])
    c2f = [r for r in rows if r["method"] == "c2f"]
    assert summary["methods"]["c2f"]["forward_passes_per_slice"] == pytest.approx(
        np.mean([float(r["forward_passes"]) for r in c2f]), rel=1e-4
    )


def test_per_case_keeps_a_lesion_free_case_with_empty_scores(evaluated):
    out, _ = evaluated
    rows = read_csv(out / "per_case.csv")
    assert [(r["case"], r["method"]) for r in rows] == [(c, m) for c in TINY_CASES for m in METHODS]
    for r in rows:
        if r["case"] == "tiny_c":  # no lesion: not applicable, never 0
            assert r["slices"] == "0" and r["ap"] == "" and r["miou"] == "" and r["case_slice_auroc"] == ""
            assert r["case_lesion_slices"] == "0" and r["case_slices"] == str(TINY_CASES["tiny_c"][0][2] - 2)
        else:
            assert int(r["slices"]) == 3 and 0 < float(r["ap"]) <= 1


def test_scores_are_those_of_the_map_on_the_scan_grid(evaluated, tiny_bundle, tiny_datalist):
    """Rollout's AP per slice equals the AP of explain_volume's mapped-back map over the whole volume."""
    out, _ = evaluated
    rows = [r for r in read_csv(out / "per_slice.csv") if r["method"] == "rollout" and r["case"] == "tiny_b"]
    bundle = load_bundle(tiny_bundle)
    folder = tiny_datalist.parent
    data = load_scan(folder / "images" / "tiny_b.nii.gz", folder / "labels" / "tiny_b.nii.gz", bundle.preset)
    res = explain_volume(data["image"], create("rollout", bundle.model), target=1, progress=False)
    sal, mask = res.saliency[0].numpy(), data["label"][0].numpy()
    for r in rows:
        z = int(r["slice"])
        assert float(r["ap"]) == pytest.approx(average_precision(sal[..., z], mask[..., z]), rel=1e-4)


def test_markdown_bolds_the_best_ap(evaluated):
    out, summary = evaluated
    md = (out / "summary.md").read_text()
    all_slices = md[md.index("All lesion slices"):]
    best = max(METHODS, key=lambda m: summary["methods"][m]["ap"])
    for m in METHODS:
        line = next(line for line in all_slices.splitlines() if line.startswith(f"| {m} |"))
        ap_cell = line.split("|")[2].strip()
        assert ap_cell.startswith("**") == (m == best)
    assert f"{len(lesion_slices())} lesion slices" in md and "3 cases" in md


@pytest.mark.slow
def test_two_workers_give_the_same_results(evaluated, tiny_bundle, tiny_datalist, tmp_path):
    out1, s1 = evaluated
    s2 = run_evaluate(tiny_bundle, tiny_datalist, METHODS, tmp_path / "w2", workers=2, progress=False)
    rows1, rows2 = read_csv(out1 / "per_slice.csv"), read_csv(tmp_path / "w2" / "per_slice.csv")
    assert len(rows1) == len(rows2)
    for a, b in zip(rows1, rows2):
        assert a.keys() == b.keys()
        for k in a:
            if k != "seconds":
                assert a[k] == b[k] or float(a[k]) == pytest.approx(float(b[k]), rel=1e-4, abs=1e-6), (a["case"], k)
    assert s1["classifier"] == pytest.approx(s2["classifier"])
    for m in METHODS:
        for k in CONTRACT:
            if k != "seconds_per_slice":
                assert s1["methods"][m][k] == pytest.approx(s2["methods"][m][k], rel=1e-4), (m, k)


def test_limit_takes_the_first_cases(tiny_bundle, tiny_datalist, tmp_path):
    s = run_evaluate(tiny_bundle, tiny_datalist, ["rollout"], tmp_path, limit=1, progress=False)
    assert s["cases"] == 1 and s["lesion_slices"] == 3
    assert {r["case"] for r in read_csv(tmp_path / "per_case.csv")} == {"tiny_a"}


def test_bad_input_is_one_input_error(tiny_bundle, tiny_datalist, tmp_path):
    with pytest.raises(InputError, match="unknown explainer 'nope'"):
        run_evaluate(tiny_bundle, tiny_datalist, ["rollout", "nope"], tmp_path / "a", progress=False)
    with pytest.raises(InputError, match="unknown parameter"):
        run_evaluate(tiny_bundle, tiny_datalist, ["c2f"], tmp_path / "b", params={"c2f": {"bogus": 1}}, progress=False)
    no_label = tmp_path / "no_label.json"
    item = json.loads(tiny_datalist.read_text())["testing"][0]
    no_label.write_text(json.dumps({"testing": [{"image": str(tiny_datalist.parent / item["image"])}]}))
    with pytest.raises(InputError, match='no "label"'):
        run_evaluate(tiny_bundle, no_label, ["rollout"], tmp_path / "c", progress=False)
    assert not any((tmp_path / d).exists() for d in "abc")


def test_explain_volume_explains_only_the_given_slices(tiny_bundle):
    """explain_volume(slices=...): others classified but not explained; model-grid maps kept."""
    bundle = load_bundle(tiny_bundle)
    g = torch.Generator().manual_seed(0)
    scan = torch.rand((1, 20, 18, 7), generator=g)
    scan[..., 0] = 0
    full = explain_volume(scan, create("gradcam", bundle.model), progress=False)
    part = explain_volume(scan, create("gradcam", bundle.model), slices=[2, 5], keep_model_grid=True, progress=False)
    assert [p.explained for p in part.predictions] == [i in (2, 5) for i in range(7)]
    assert math.isnan(part.predictions[0].probability)
    assert all(not math.isnan(p.probability) for p in part.predictions[1:])
    assert [r["index"] for r in part.records] == [2, 5] and set(part.model_grid_maps) == {2, 5}
    assert part.model_grid_maps[2].shape == bundle.model.input_size and not full.model_grid_maps
    for z in range(7):
        expected = full.saliency[0, ..., z] if z in (2, 5) else torch.zeros(20, 18)
        torch.testing.assert_close(part.saliency[0, ..., z], expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="slice indices"):
        explain_volume(scan, create("gradcam", bundle.model), slices=[7], progress=False)


def test_a_context_bundle_is_evaluated_end_to_end(tiny_datalist, tmp_path):
    """A 2.5-D bundle (each slice with one neighbour on either side) runs the whole evaluation: its lesion
    slices are scored, faithfulness curves perturb its three-slice input, and the classifier's probabilities
    are those of the model on three-slice inputs."""
    from tests.conftest import write_tiny_bundle

    bundle = write_tiny_bundle(tmp_path / "context_bundle", context_slices=1)
    s = run_evaluate(bundle, tiny_datalist, ["c2f", "gradcam"], tmp_path / "out", progress=False)
    assert s["lesion_slices"] == len(lesion_slices())
    rows = read_csv(tmp_path / "out" / "per_slice.csv")
    assert {(r["case"], int(r["slice"])) for r in rows} == lesion_slices()
    assert all(math.isfinite(float(r["deletion_auc"])) for r in rows)
    loaded = load_bundle(bundle)
    item = next(i for i in read_datalist(tiny_datalist, "testing") if i["case_id"] == "tiny_a")
    data = load_scan(item["image"], item["label"], loaded.preset)
    result = explain_volume(data["image"], create("gradcam", loaded.model), progress=False)
    probs = {p.index: p.probability for p in result.predictions}
    row = next(r for r in rows if r["case"] == "tiny_a" and r["method"] == "gradcam")
    assert float(row["probability"]) == pytest.approx(probs[int(row["slice"])], abs=1e-5)
