"""The bundle's configs: metadata against MONAI's schema, network I/O, export, training entry, logging."""

from __future__ import annotations

import configparser
import json

import jsonschema
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow, ckpt_export, verify_net_in_out

from c2f_med.explain import available
from c2f_med.models.bundle import DEFAULT_BUNDLE
from c2f_med.models.train import bundle_network
from c2f_med.models.vit import LesionViT

CONFIGS = DEFAULT_BUNDLE / "configs"
META = CONFIGS / "metadata.json"
INFERENCE = CONFIGS / "inference.json"

# The required parts of MONAI's bundle metadata schema meta_schema_20240725.json (the schema
# MONAI 1.6's model zoo points to; https://project-monai.github.io/schema/meta_schema_20240725.json):
# top-level required keys and types, tensor specifiers' required keys and types.
_TENSOR = {
    "type": "object",
    "properties": {
        "type": {"type": "string"}, "format": {"type": "string"}, "num_channels": {"type": "integer"},
        "spatial_shape": {"type": "array", "items": {"type": ["string", "integer"]}}, "dtype": {"type": "string"},
        "value_range": {"type": "array", "items": {"type": "number"}}, "is_patch_data": {"type": "boolean"},
        "channel_def": {"type": "object"},
    },
    "required": ["type", "format", "num_channels", "spatial_shape", "dtype", "value_range"],
}
_IO = {"type": "object", "patternProperties": {"^.+$": _TENSOR}}
SCHEMA = {
    "$schema": "https://json-schema.org/draft/2019-09/schema",
    "type": "object",
    "properties": {
        **{k: {"type": "string"} for k in ("schema", "version", "monai_version", "pytorch_version", "numpy_version",
                                           "task", "description", "authors", "copyright", "data_source",
                                           "data_type", "image_classes", "label_classes", "pred_classes",
                                           "intended_use")},
        **{k: {"type": "object"} for k in ("changelog", "required_packages_version", "eval_metrics")},
        "references": {"type": "array", "items": {"type": "string"}},
        "network_data_format": {
            "type": "object",
            "properties": {"inputs": _IO, "outputs": _IO, "post_processed_outputs": _IO},
            "required": ["inputs", "outputs"],
        },
    },
    "required": ["schema", "version", "monai_version", "pytorch_version", "numpy_version",
                 "required_packages_version", "task", "description", "authors", "copyright", "network_data_format"],
}


def test_metadata_follows_the_schema():
    meta = json.loads(META.read_text())
    jsonschema.Draft201909Validator(SCHEMA).validate(meta)
    assert meta["schema"].endswith("meta_schema_20240725.json")
    assert meta["version"] in meta["changelog"]
    image = meta["network_data_format"]["inputs"]["image"]
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert (image["modality"], image["num_channels"], image["spatial_shape"]) == ("MR", 1, [96, 96])
    assert (pred["type"], pred["format"], pred["num_channels"]) == ("probabilities", "classes", 2)
    assert pred["channel_def"] == {"0": "no lesion", "1": "lesion"}
    for key in ("monai_version", "pytorch_version", "numpy_version"):
        assert meta[key].count(".") == 2


def test_metadata_schema_check_fails_without_a_required_key():
    meta = json.loads(META.read_text())
    del meta["required_packages_version"]
    with pytest.raises(jsonschema.ValidationError, match="required_packages_version"):
        jsonschema.Draft201909Validator(SCHEMA).validate(meta)


def test_verify_net_in_out():
    verify_net_in_out(net_id="network_def", meta_file=str(META), config_file=str(INFERENCE), device="cpu")


def test_network_def_is_what_training_builds():
    parser = ConfigParser()
    parser.read_config(str(INFERENCE))
    shipped = parser.get_parsed_content("network_def").state_dict()
    img_size, kwargs = bundle_network(DEFAULT_BUNDLE)
    trained = LesionViT(img_size=img_size, **kwargs).state_dict()
    assert {k: v.shape for k, v in shipped.items()} == {k: v.shape for k, v in trained.items()}


def test_ids_that_other_code_and_users_rely_on():
    config = json.loads(INFERENCE.read_text())
    for key in ("network_def", "img_size", "preset", "lesion_class", "axis", "method", "device", "bundle_root",
                "datalist", "output_dir"):
        assert key in config
    assert config["method"] in available()
    assert config["datalist"] is None  # a required override: the bundle names no data outside itself


def test_no_config_path_leaves_the_bundle():
    for path in CONFIGS.glob("*.json"):
        assert "/.." not in path.read_text(), f"{path.name} names a path outside the bundle"


def test_ckpt_export_by_tracing(tiny_bundle, tmp_path):
    from .conftest import TINY_NET

    ts = tmp_path / "model.ts"
    ckpt_export(net_id="network_def", filepath=str(ts), ckpt_file=str(tiny_bundle / "models" / "model.pt"),
                meta_file=str(META), config_file=str(tiny_bundle / "configs" / "inference.json"), use_trace=True,
                input_shape=[1, 1, TINY_NET["img_size"], TINY_NET["img_size"]])
    net = LesionViT(**TINY_NET)
    net.load_state_dict(torch.load(tiny_bundle / "models" / "model.pt", weights_only=True))
    x = torch.randn(3, 1, TINY_NET["img_size"], TINY_NET["img_size"])
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(ts)(x), net.eval()(x))


def test_train_config_runs_with_monai_runner(tmp_path, tiny_bundle, tiny_datalist):
    """train.json as MONAI's runner sees it: the model zoo's training properties, overrides for the data,
    length and seed; a datalist without a validation section stops it with the project's error."""
    from c2f_med.errors import find_input_error

    items = json.loads(tiny_datalist.read_text())["testing"]
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps({"validation": [{k: str(tiny_datalist.parent / v) for k, v in i.items()}
                                               for i in items]}))
    bad.write_text(json.dumps({"training": []}))

    def workflow(datalist):
        flow = ConfigWorkflow(config_file=str(CONFIGS / "train.json"), meta_file=str(META), logging_file=False,
                              workflow_type="train", bundle_root=str(tiny_bundle), datalist=str(datalist), epochs=2,
                              seed=5)
        flow.initialize()
        return flow

    flow = workflow(good)
    assert flow.check_properties() == []
    assert flow.max_epochs == 2 and flow.trainer.optimizer.__class__.__name__ == "AdamW"
    with pytest.raises(RuntimeError) as info:  # MONAI wraps it; the project's runners print the InputError's line
        workflow(bad).run()
    err = find_input_error(info.value)
    assert err is not None and 'no "validation" list' in str(err) and str(bad) in str(err)


def test_logging_conf_is_model_zoo_style():
    conf = configparser.ConfigParser()
    conf.read(CONFIGS / "logging.conf")
    assert conf["loggers"]["keys"] == "root" and conf["logger_root"]["level"] == "INFO"
    assert conf["handler_consoleHandler"]["class"] == "StreamHandler"
    assert conf["handler_consoleHandler"]["args"] == "(sys.stdout,)"
