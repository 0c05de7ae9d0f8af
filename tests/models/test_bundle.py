"""Finding and loading a bundle: the default folder, the environment variable, clear errors."""

import os
import subprocess
import sys

import pytest

from c2f_med.errors import InputError
from c2f_med.models import BUNDLE_ENV
from c2f_med.models.bundle import OperatingPoint, load_bundle


def test_a_missing_bundle_folder_says_how_to_give_one(tmp_path):
    with pytest.raises(InputError, match=f"pass --bundle DIR or set {BUNDLE_ENV}"):
        load_bundle(tmp_path / "nowhere")


def test_the_environment_variable_names_the_default_bundle(tmp_path):
    code = "from c2f_med.models import DEFAULT_BUNDLE; print(DEFAULT_BUNDLE)"
    env = {**os.environ, BUNDLE_ENV: str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(tmp_path)


def test_operating_point_from_config(tmp_path):
    assert OperatingPoint.from_config(None, tmp_path) == OperatingPoint()
    point = OperatingPoint.from_config({"temperature": 2.0, "threshold": 0.3}, tmp_path)
    assert (point.temperature, point.threshold, point.source) == (2.0, 0.3, "bundle")
    for bad in ({"threshold": 1.5}, {"temperature": 0, "threshold": 0.5}, {"temperature": 1.0}, "0.5"):
        with pytest.raises(InputError):
            OperatingPoint.from_config(bad, tmp_path)
