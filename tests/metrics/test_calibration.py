import math

import numpy as np
import pytest
import torch

from c2f_med.metrics.calibration import expected_calibration_error, fit_temperature, rates_at, threshold_at_specificity


def test_ece_by_hand():
    # two bins used: 0.2 (2 slices, 1 positive: |0.5 - 0.2| = 0.3) and 0.9 (2 slices, both positive: 0.1)
    p = [0.2, 0.2, 0.9, 0.9]
    y = [0, 1, 1, 1]
    assert expected_calibration_error(p, y, bins=10) == pytest.approx(0.5 * 0.3 + 0.5 * 0.1)
    assert expected_calibration_error([1.0, 0.0], [1, 0]) == pytest.approx(0.0)
    assert math.isnan(expected_calibration_error([], []))


def test_fit_temperature_recovers_the_scale():
    rng = np.random.default_rng(0)
    true = rng.normal(size=(4000, 2)) * 2.0
    labels = torch.distributions.Categorical(logits=torch.as_tensor(true)).sample().numpy()
    temp = fit_temperature(true * 3.0, labels)  # over-confident by 3x
    assert temp == pytest.approx(3.0, rel=0.1)


def test_threshold_at_specificity_and_rates():
    neg = np.linspace(0.0, 0.99, 100)
    p = np.concatenate([neg, [0.5, 0.95, 0.999]])
    y = np.concatenate([np.zeros(100), np.ones(3)])
    t = threshold_at_specificity(p, y, 0.9)
    assert 0.89 < t < 0.9 + 1e-9
    r = rates_at(p, y, t)
    assert r["specificity"] == pytest.approx(0.9)
    assert r["sensitivity"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        threshold_at_specificity([0.3], [1])
