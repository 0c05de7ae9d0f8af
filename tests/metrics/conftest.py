"""Quantus, imported once for the metrics tests (it is slow to import and chatty)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest


@pytest.fixture(scope="session")
def quantus_score():
    """``quantus_score(metric_cls, saliency_batch, mask_batch, **init) -> np.ndarray [B]``.

    Batches are ``B x 1 x *spatial``; normalisation and abs are off so numbers are comparable. The
    localisation metrics do not use the model, so none is passed.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantus = pytest.importorskip("quantus")

    def score(metric_name: str, a: np.ndarray, s: np.ndarray, **init) -> np.ndarray:
        metric = getattr(quantus, metric_name)(abs=False, normalise=False, disable_warnings=True, **init)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = metric(
                model=None,
                x_batch=np.zeros(a.shape, dtype=np.float32),
                y_batch=np.zeros(a.shape[0], dtype=int),
                a_batch=a,
                s_batch=s.astype(float),
                channel_first=True,
            )
        return np.asarray(out, dtype=np.float64)

    return score
