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


def test_committed_metadata_describes_the_network():
    """The shipped bundle's model-zoo network_data_format agrees with what its network takes and gives."""
    from c2f_med.models import DEFAULT_BUNDLE
    from c2f_med.models.bundle import read_model_zoo_format
    from c2f_med.slices import normalise_input

    bundle = load_bundle(DEFAULT_BUNDLE)
    fmt = read_model_zoo_format(DEFAULT_BUNDLE)
    assert fmt.model_input.channels == 1 and fmt.model_input.spatial_shape == bundle.model.input_size
    lo, hi = fmt.model_input.value_range
    assert abs(lo - normalise_input(0.0)) < 1e-3 and abs(hi - normalise_input(1.0)) < 1e-3
    assert len(fmt.class_names) == bundle.model.num_classes == 2
    assert bundle.class_names[bundle.lesion_class] == "lesion"


def test_a_bundle_setting_on_the_command_line_beats_the_bundles(tiny_bundle, monkeypatch):
    assert load_bundle(tiny_bundle).preset == "auto" and load_bundle(tiny_bundle).lesion_class == 1
    monkeypatch.setenv("C2F_MED_PRESET", "40,400")
    monkeypatch.setenv("C2F_MED_TARGET_CLASS", "0")
    bundle = load_bundle(tiny_bundle)
    assert bundle.preset == [40.0, 400.0] and bundle.lesion_class == 0


def test_unreadable_network_data_format_names_the_file(tiny_bundle, tmp_path):
    import json
    import shutil

    root = shutil.copytree(tiny_bundle, tmp_path / "b")
    meta = {"network_data_format": {"inputs": {"image": {"num_channels": 1, "spatial_shape": [32, 32, 32]}}}}
    (root / "configs" / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="metadata.json: network_data_format cannot be read"):
        load_bundle(root)
