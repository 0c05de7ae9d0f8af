"""Model-randomisation check: rank correlation, the flag rule, and the committed bundle passing it."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from c2f_med.metrics.sanity import FLAG_ABOVE, model_randomisation, randomisation_check, rank_correlation
from c2f_med.models import DEFAULT_BUNDLE
from c2f_med.models.bundle import load_bundle


def test_rank_correlation():
    a = np.arange(12.0).reshape(3, 4)
    assert rank_correlation(a, a**3) == pytest.approx(1.0)  # monotone: same ranks
    assert rank_correlation(a, -a) == pytest.approx(-1.0)
    assert rank_correlation(np.ones(5), np.arange(5.0)) == 0.0  # a constant map ranks nothing
    assert rank_correlation(np.ones(5), np.ones(5)) == 1.0
    with pytest.raises(ValueError):
        rank_correlation(np.ones(4), np.ones(5))


def test_the_same_model_twice_is_flagged_and_a_reinitialised_one_is_not(tiny_bundle):
    trained = load_bundle(tiny_bundle).model
    x = torch.randn(3, 1, *trained.input_size, generator=torch.Generator().manual_seed(0))
    same = randomisation_check(trained, trained, x, ["rollout", "gradcam"], 1)
    assert all(v["spearman"] == pytest.approx(1.0) and v["flagged"] for v in same.values())
    other = randomisation_check(trained, load_bundle(tiny_bundle, reinit_seed=3).model, x, ["gradcam"], 1)
    assert other["gradcam"]["spearman"] < 1.0 and other["gradcam"]["slices"] == 3


@pytest.fixture(scope="module")
def synth_case(tmp_path_factory):
    from c2f_med.io.manifest import read_datalist
    from c2f_med.synth.dataset import write_dataset

    datalist = write_dataset(tmp_path_factory.mktemp("synth"), cases=1, seed=3, fmt="nifti", progress=False)
    items = [i for section in ("training", "validation", "testing") for i in read_datalist(datalist, section)]
    assert len(items) == 1
    return items


@pytest.mark.slow
def test_committed_bundle_passes_the_model_randomisation_check(synth_case):
    """The trained classifier's maps change when its weights are re-initialised: no method is flagged."""
    bundle = load_bundle(DEFAULT_BUNDLE)
    result = model_randomisation(bundle, synth_case, ["c2f", "rollout", "gae", "gradcam", "attention"], max_slices=3)
    assert set(result) == {"c2f", "rollout", "gae", "gradcam", "attention"}
    for method, value in result.items():
        assert value["slices"] == 3 and value["seed"] == 2018
        assert value["spearman"] < FLAG_ABOVE and not value["flagged"], (method, value)


def test_model_randomisation_over_cases_of_other_sizes(tiny_bundle, tiny_datalist):
    """Lesion slices of cases with different shapes are taken on the model's grid; the summary entry's form."""
    from c2f_med.io.manifest import read_datalist

    items = read_datalist(tiny_datalist, "testing")
    assert len({nib.load(i["image"]).shape for i in items}) > 1
    result = model_randomisation(load_bundle(tiny_bundle), items, ["rollout"], max_slices=4)
    assert set(result["rollout"]) == {"spearman", "flagged", "slices", "seed"}
    assert result["rollout"]["slices"] == 4 and -1 <= result["rollout"]["spearman"] <= 1


def test_model_randomisation_reads_only_the_cases_it_needs(tiny_bundle, tiny_datalist, monkeypatch):
    """A cohort is not read a second time: with one slice per case, only evenly spread cases are loaded."""
    import c2f_med.case
    from c2f_med.io.manifest import read_datalist

    items = read_datalist(tiny_datalist, "testing")
    cohort = items * 4  # a longer list of the same cases
    read = []
    load = c2f_med.case.load_scan
    monkeypatch.setattr(c2f_med.case, "load_scan", lambda image, *a, **k: read.append(image) or load(image, *a, **k))
    result = model_randomisation(load_bundle(tiny_bundle), cohort, ["rollout"], max_slices=2)
    assert result["rollout"]["slices"] == 2
    assert 2 <= len(read) < len(cohort)
    assert read[0] == cohort[0]["image"] and read[1] == cohort[-1]["image"]  # spread over the list
