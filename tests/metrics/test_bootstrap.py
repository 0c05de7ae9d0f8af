"""Bootstrap confidence intervals: coverage, reproducibility, NaN handling."""

from __future__ import annotations

import numpy as np
import pytest

from c2f_med.metrics.bootstrap import bootstrap_ci, paired_bootstrap


def synthetic_pair(rng, n=200, diff=0.05):
    """Per-slice scores of two methods whose true mean difference is ``diff``."""
    base = rng.uniform(0.2, 0.8, n)  # slice difficulty, shared by both methods
    return base + diff + rng.normal(0, 0.1, n), base + rng.normal(0, 0.1, n)


def test_paired_ci_contains_true_difference_and_has_nominal_coverage():
    rng = np.random.default_rng(0)
    a, b = synthetic_pair(rng)
    res = paired_bootstrap(a, b, n=2000, seed=0)
    assert res["n_pairs"] == 200
    assert res["low"] < 0.05 < res["high"]
    assert res["low"] < res["mean_diff"] < res["high"]
    assert res["mean_diff"] == pytest.approx(np.mean(a - b))
    assert res["p_value"] < 0.01  # a true difference of ~3.5 standard errors

    covered = 0
    for rep in range(100):
        a, b = synthetic_pair(np.random.default_rng(100 + rep), n=60)
        r = paired_bootstrap(a, b, n=500, seed=rep)
        covered += r["low"] <= 0.05 <= r["high"]
    assert 88 <= covered <= 100


def test_reproducible_for_a_seed():
    a, b = synthetic_pair(np.random.default_rng(1))
    assert paired_bootstrap(a, b, seed=3) == paired_bootstrap(a, b, seed=3)
    assert paired_bootstrap(a, b, seed=3)["low"] != paired_bootstrap(a, b, seed=4)["low"]
    assert bootstrap_ci(a, seed=5) == bootstrap_ci(a, seed=5)


def test_nan_pairs_are_dropped():
    a, b = synthetic_pair(np.random.default_rng(2), n=50)
    a_nan, b_nan = a.copy(), b.copy()
    a_nan[[3, 7]] = np.nan
    b_nan[[7, 20]] = np.nan
    keep = np.ones(50, dtype=bool)
    keep[[3, 7, 20]] = False
    assert paired_bootstrap(a_nan, b_nan, seed=0) == paired_bootstrap(a[keep], b[keep], seed=0)
    assert bootstrap_ci(a_nan, seed=0) == bootstrap_ci(a[~np.isnan(a_nan)], seed=0)


def test_no_difference():
    a = np.random.default_rng(3).random(40)
    res = paired_bootstrap(a, a.copy())
    assert res["mean_diff"] == res["low"] == res["high"] == 0.0
    assert res["p_value"] == 1.0


def test_bootstrap_ci_of_a_mean():
    v = np.random.default_rng(4).normal(1.0, 0.2, 400)
    res = bootstrap_ci(v, n=1000, ci=0.9)
    assert res["n"] == 400 and res["mean"] == pytest.approx(v.mean())
    se = v.std(ddof=1) / np.sqrt(v.size)
    assert res["high"] - res["low"] == pytest.approx(2 * 1.645 * se, rel=0.15)


def test_too_few_values():
    res = bootstrap_ci([np.nan, 0.4])
    assert res["n"] == 1 and res["mean"] == 0.4 and np.isnan(res["low"]) and np.isnan(res["high"])
    res = paired_bootstrap([np.nan], [0.1])
    assert res["n_pairs"] == 0 and all(np.isnan(res[k]) for k in ("mean_diff", "low", "high", "p_value"))


def test_shape_mismatch():
    with pytest.raises(ValueError, match=r"\(3,\).*\(4,\)"):
        paired_bootstrap(np.zeros(3), np.zeros(4))


def test_paired_bootstrap_miou_recomputes_the_dataset_miou():
    from c2f_med.metrics.bootstrap import paired_bootstrap_miou

    rng = np.random.default_rng(0)
    union = rng.integers(50, 100, (40, 4)).astype(float)
    a = np.stack([union[:, 1] * 0.9, union[:, 1], union[:, 3] * 0.6, union[:, 3]], 1)
    b = np.stack([union[:, 1] * 0.9, union[:, 1], union[:, 3] * 0.4, union[:, 3]], 1)
    res = paired_bootstrap_miou(a, b, n=500, seed=1)
    # lesion IoU 0.6 vs 0.4 on every slice: the mIoU differs by exactly 0.1, in every resample
    assert (
        res["mean_diff"] == pytest.approx(0.1)
        and res["low"] == pytest.approx(0.1)
        and res["high"] == pytest.approx(0.1)
    )
    assert res["p_value"] < 0.01 and res["n_pairs"] == 40
    same = paired_bootstrap_miou(a, a, n=200)
    assert same["mean_diff"] == 0 and same["p_value"] == 1.0
    with pytest.raises(ValueError):
        paired_bootstrap_miou(a[:, :3], b[:, :3])
