"""Shared synthetic anatomy for the synth tests (the template is read once per session)."""

from __future__ import annotations

import numpy as np
import pytest

from c2f_med.synth.anatomy import Anatomy, make_anatomy


@pytest.fixture(scope="session")
def anatomy() -> Anatomy:
    """One random FLAIR anatomy (seed 0); tests must not modify its arrays."""
    return make_anatomy(np.random.default_rng(0), "flair")
