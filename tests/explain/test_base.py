"""The registry refuses bad parameters at construction, in one line that names the valid values."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Literal

import pytest

from c2f_med.errors import InputError
from c2f_med.evaluate import check_methods
from c2f_med.explain import create
from c2f_med.explain.base import check_choices
from c2f_med.models.vit import LesionViT


@pytest.fixture(scope="module")
def model():
    return LesionViT(img_size=32, stem_channels=(8, 16), hidden_size=16, mlp_dim=32, num_layers=1, num_heads=2)


@pytest.mark.parametrize(("name", "param", "value", "valid"), [
    ("c2f", "granularity", "splt", "'band', 'split'"),
    ("c2f", "relation", "rollout", "'gae', 'rollout-last', 'rollout-all', 'legrad'"),
    ("c2f-first", "perturbation", "gaussian", "'noise', 'zero', 'blur', 'mean'"),
    ("vitcx", "perturbation", "Noise", "'noise', 'zero', 'blur', 'mean'"),
    ("occlusion", "mode", "gauss", "'gaussian', 'mean_patch', 'mean_img'"),
])
def test_a_misspelt_option_names_the_valid_values(model, name, param, value, valid):
    with pytest.raises(ValueError) as err:
        create(name, model, **{param: value})
    msg = str(err.value)
    assert "\n" not in msg and msg == f"{name}: {param}={value!r} is not one of {valid}"


def test_valid_options_and_non_string_members_of_a_union_pass(model):
    assert create("c2f", model, granularity="band").params.granularity == "band"
    assert create("occlusion", model, mode=0.5).params.mode == 0.5  # float | Literal[...]: floats pass
    assert create("occlusion", model, mode="mean_img").params.mode == "mean_img"


def test_the_command_line_path_gives_an_input_error(model):
    bundle = SimpleNamespace(model=model)
    with pytest.raises(InputError, match=r"--param: c2f: granularity='splt' is not one of 'band', 'split'$"):
        check_methods(bundle, ["c2f"], {"c2f": {"granularity": "splt"}})


def test_check_choices_on_a_plain_dataclass():
    @dataclass
    class P:
        kind: Literal["a", "b"] = "a"
        n: int = 1

    check_choices(P())
    with pytest.raises(ValueError, match=r"^kind=3 is not one of 'a', 'b'$"):
        check_choices(P(kind=3))
