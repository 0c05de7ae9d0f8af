"""A tiny bundle (random LesionViT, img_size 32) and two small scans, shared by the handler and bundle tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from c2f_med.models.bundle import DEFAULT_BUNDLE
from c2f_med.models.vit import LesionViT

TINY_NET = {"img_size": 32, "in_channels": 1, "num_classes": 2, "stem_channels": [8, 16], "hidden_size": 32,
            "mlp_dim": 64, "num_layers": 2, "num_heads": 2}
#: a left-posterior-superior grid (as DICOM writes it): loading re-orients it to RAS
AFFINE = np.array([[-1.5, 0, 0, 20.0], [0, -1.5, 0, 30.0], [0, 0, 3.0, -5.0], [0, 0, 0, 1]])
SHAPE = (20, 24, 5)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """The repository's bundle configs with a tiny ``network_def`` and its random weights."""
    root = tmp_path_factory.mktemp("bundle") / "c2f_lesion_vit"
    shutil.copytree(DEFAULT_BUNDLE / "configs", root / "configs")
    config_file = root / "configs" / "inference.json"
    config = json.loads(config_file.read_text())
    config["img_size"] = TINY_NET["img_size"]
    config["network_def"] = {"_target_": "c2f_med.models.vit.LesionViT", **TINY_NET, "img_size": "@img_size"}
    config_file.write_text(json.dumps(config, indent=4))
    torch.manual_seed(0)
    (root / "models").mkdir()
    torch.save(LesionViT(**TINY_NET).state_dict(), root / "models" / "model.pt")
    return root


@pytest.fixture(scope="session")
def cases(tmp_path_factory) -> Path:
    """``datalist.json`` whose "testing" lists case ``a`` (with a lesion mask on slices 1-3) and
    case ``b`` (no mask): positive MR-like scans ``20 x 24 x 5`` on an LPS grid."""
    root = tmp_path_factory.mktemp("cases")
    rng = np.random.default_rng(0)
    x, y, _ = np.meshgrid(*(np.arange(s) for s in SHAPE), indexing="ij")
    items = []
    for name, with_mask in (("a", True), ("b", False)):
        image = 100 + 20 * rng.standard_normal(SHAPE)
        lesion = ((x - 8) ** 2 + (y - 14) ** 2 <= 9) & (np.arange(SHAPE[2]) >= 1) & (np.arange(SHAPE[2]) <= 3)
        image[lesion] += 150
        (root / "images").mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(image.astype(np.float32), AFFINE), root / "images" / f"{name}.nii.gz")
        item = {"image": f"images/{name}.nii.gz"}
        if with_mask:
            (root / "labels").mkdir(exist_ok=True)
            nib.save(nib.Nifti1Image(lesion.astype(np.uint8), AFFINE), root / "labels" / f"{name}.nii.gz")
            item["label"] = f"labels/{name}.nii.gz"
        items.append(item)
    (root / "datalist.json").write_text(json.dumps({"name": "tiny", "testing": items}))
    return root


@pytest.fixture(scope="session")
def bundle(tiny_bundle):
    """The tiny bundle, loaded."""
    from c2f_med.models.bundle import load_bundle

    return load_bundle(tiny_bundle)


@pytest.fixture
def evaluate(bundle, cases):
    """``evaluate(handlers, inference_mode=False) -> (items, evaluator)``: a ``SupervisedEvaluator`` built
    as the bundle's ``inference.json`` builds it, over the ``cases`` datalist; ``items`` are the
    decollated output items of every iteration, as the handlers left them."""
    from ignite.engine import Events
    from monai.data import DataLoader, Dataset
    from monai.engines import SupervisedEvaluator

    from c2f_med.handlers import no_forward
    from c2f_med.io.manifest import read_datalist
    from c2f_med.io.transforms import load_case_transforms

    def run(handlers, inference_mode: bool = False):
        data = Dataset(read_datalist(cases / "datalist.json"), load_case_transforms(preset=bundle.preset))
        evaluator = SupervisedEvaluator(device="cpu", val_data_loader=DataLoader(data, batch_size=1),
                                        network=bundle.model, inferer=no_forward, val_handlers=handlers)
        items: list[dict] = []
        evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: items.extend(engine.state.output))
        with torch.inference_mode(inference_mode):
            evaluator.run()
        return items, evaluator

    return run
