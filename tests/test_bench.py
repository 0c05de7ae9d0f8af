"""``c2f-med bench`` on a tiny bundle: the contract's keys, the same slices for every method, the volume."""

from __future__ import annotations

import json

import pytest
import torch

from c2f_med.bench import bench_slices, run_bench
from c2f_med.errors import InputError
from c2f_med.io.manifest import read_datalist
from c2f_med.models.bundle import load_bundle
from tests.conftest import TINY_CASES

BENCH_KEYS = ("seconds_per_slice", "forward_passes_per_slice", "backward_passes_per_slice", "peak_rss_mb")


def scans(datalist):
    return [(it["image"], it["label"]) for it in read_datalist(datalist)]


def test_bench_slices_are_spread_over_the_lesion_slices(tiny_bundle, tiny_datalist):
    bundle = load_bundle(tiny_bundle)
    size = bundle.model.input_size[0]
    x, first, seen = bench_slices(bundle, iter(scans(tiny_datalist)), 4)
    # tiny_a has 3 lesion slices, not enough: tiny_b is read too (tiny_c is never needed)
    assert seen == 6 and x.shape == (4, 1, size, size) and first.name == "tiny_a.nii.gz"
    everything, _, _ = bench_slices(bundle, iter(scans(tiny_datalist)), 100)
    assert everything.shape[0] == 6  # no more than there are
    # evenly spread: first and last lesion slices included, no slice twice
    torch.testing.assert_close(x[0], everything[0])
    torch.testing.assert_close(x[-1], everything[-1])
    assert len({s.numpy().tobytes() for s in x}) == 4


def test_bench_writes_the_contract(tiny_bundle, tiny_datalist, tmp_path, capsys):
    methods = ["rollout", "legrad", "attnlrp", "rise", "c2f"]
    report = run_bench(tiny_bundle, methods, 3, tmp_path, datalist=tiny_datalist)
    b = json.loads((tmp_path / "bench.json").read_text())
    assert b == json.loads(json.dumps(report))
    assert list(b["methods"]) == methods
    for m in methods:
        assert all(k in b["methods"][m] for k in BENCH_KEYS), m
        r = b["methods"][m]
        assert r["seconds_per_slice"] > 0 and r["peak_rss_mb"] >= r["baseline_rss_mb"] > 0
    assert b["methods"]["rollout"]["forward_passes_per_slice"] == 1
    assert b["methods"]["rollout"]["backward_passes_per_slice"] == 0
    assert b["methods"]["c2f"]["forward_passes_per_slice"] > 1 and b["methods"]["c2f"]["ratio_to_c2f"] == 1
    lrp = b["methods"]["attnlrp"]
    assert lrp["forward_passes_per_slice"] == lrp["backward_passes_per_slice"] == 1
    layers = load_bundle(tiny_bundle).model.num_layers
    assert b["methods"]["legrad"]["forward_passes_per_slice"] == 1
    assert b["methods"]["legrad"]["backward_passes_per_slice"] == layers  # one partial backward per layer
    # RISE at c2f's budget: c2f's mean forward passes per slice, its own time
    n = round(b["methods"]["c2f"]["forward_passes_per_slice"])
    assert b["methods"]["rise"]["forward_passes_per_slice"] == n
    assert b["methods"]["rise"]["budget_from"] == f"c2f: {n} forward passes per slice"
    shape = TINY_CASES["tiny_a"][0]
    assert b["volume"]["method"] == "c2f" and b["volume"]["seconds"] > 0
    assert b["volume"]["slices"] == shape[2] - 2 and b["volume"]["slices_in_volume"] == shape[2]
    assert isinstance(b["torch_threads"], int) and b["torch_threads"] == torch.get_num_threads()
    assert b["slices"] == 3 and b["source"] == "datalist" and b["machine"]["cpu_count"] >= 1
    table = capsys.readouterr().out
    assert "s/slice" in table and "rollout" in table


def test_bench_refuses_bad_input(tiny_bundle, tmp_path):
    with pytest.raises(InputError, match="unknown explainer"):
        run_bench(tiny_bundle, ["nope"], 2, tmp_path)
    with pytest.raises(InputError, match="--slices"):
        run_bench(tiny_bundle, ["rollout"], 0, tmp_path)
    assert not (tmp_path / "bench.json").exists()
