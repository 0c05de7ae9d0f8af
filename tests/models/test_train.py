"""Training workflow: a short run lowers the loss and keeps a loadable best checkpoint; data sources."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from c2f_med.io.manifest import read_datalist, write_datalist
from c2f_med.io.transforms import load_case_transforms
from c2f_med.models.train import (
    OnlineLesionSlices,
    TokenLesionHead,
    TrainConfig,
    _curriculum,
    augment,
    faint_slices,
    run_training,
    slice_dataset,
    token_targets,
    twin_rows,
)
from c2f_med.models.vit import LesionViT
from tests.conftest import TINY_NETWORK, write_tiny_bundle

TINY = {k: v for k, v in TINY_NETWORK.items() if k not in ("_target_", "img_size", "in_channels", "num_classes")}


@pytest.fixture
def train_datalist(tiny_datalist, tmp_path):
    """The tiny cases as both the training and the validation section."""
    items = [{k: v for k, v in item.items() if k != "case_id"} for item in read_datalist(tiny_datalist, "testing")]
    path = tmp_path / "train.json"
    write_datalist(path, training=items, validation=items, name="tiny training")
    return path


def _train(datalist, bundle, epochs: int, epoch_steps: int, **kwargs) -> dict:
    """The shipped train.json on a tiny bundle (its own inference.json network, 32 px)."""
    if not (bundle / "configs").exists():
        write_tiny_bundle(bundle)
    return run_training(datalist, bundle, epochs=epochs, seed=kwargs.pop("seed", 0), online_lesions=False,
                        epoch_steps=epoch_steps, **kwargs)


def test_short_training_lowers_the_loss(train_datalist, tmp_path):
    bundle = tmp_path / "bundle"
    result = _train(train_datalist, bundle, 3, 20, recipe={"batch_size": 16, "lr": 2e-3, "warmup_steps": 5})
    rows = list(csv.DictReader(open(bundle / "models" / "training_log.csv")))
    assert len(rows) == 3
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    assert all(0.0 <= float(r["train_auroc"]) <= 1.0 for r in rows)  # balanced batches: always defined
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    LesionViT(img_size=32, **TINY).load_state_dict(state)  # the best checkpoint is a plain state dict
    assert 0.0 <= result["best"]["val_auroc"] <= 1.0
    assert result["config"]["batch_size"] == 16 and result["config"]["steps"] == 60
    assert (bundle / "docs" / "training_curve.png").exists()
    json.dumps(result)  # provenance-ready


def test_training_is_declared_in_train_json():
    """The shipped train.json declares MONAI's SupervisedTrainer, its optimiser, scheduler, loss, data and
    handlers under the model zoo's ids (train#trainer, validate#evaluator, ...)."""
    from monai.bundle import ConfigParser

    from c2f_med.models import DEFAULT_BUNDLE

    parser = ConfigParser()
    parser.read_config(DEFAULT_BUNDLE / "configs" / "train.json")
    assert parser["train"]["trainer"]["_target_"] == "SupervisedTrainer"
    assert parser["validate"]["evaluator"]["_target_"] == "SupervisedEvaluator"
    assert parser["optimizer"]["_target_"] == "torch.optim.AdamW"
    assert parser["lr_scheduler"]["_target_"] == "torch.optim.lr_scheduler.LambdaLR"
    assert {"run", "initialize", "finalize", "network_def", "train", "validate", "device"} <= set(parser.config)


def test_curriculum_widens_to_the_full_range():
    cfg = TrainConfig(steps=1000, curriculum_fraction=0.25)
    start, mid, end = (_curriculum(cfg, s) for s in (0, 125, 250))
    assert start["contrast"][0] == cfg.start_contrast and start["diameter_mm"][0] == cfg.start_diameter_mm
    assert cfg.contrast[0] < mid["contrast"][0] < cfg.start_contrast
    assert end["contrast"] == pytest.approx(cfg.contrast) and end["diameter_mm"] == pytest.approx(cfg.diameter_mm)


def test_online_batches_are_balanced_twins_and_seeded():
    cfg = TrainConfig(anatomy_pool=2, batch_size=16, seed=3)
    a, b = next(iter(OnlineLesionSlices(cfg))), next(iter(OnlineLesionSlices(cfg)))
    assert a["image"].shape == (16, 1, 96, 96) and a["mask"].shape == (16, 1, 96, 96)
    assert a["mask"][a["label"] == 0].max() == 0 and a["mask"][a["label"] == 1].amax((1, 2, 3)).min() > 0
    assert 4 <= int(a["label"].sum()) <= 12  # pairs of positives and negatives, shuffled
    torch.testing.assert_close(a["image"], b["image"])


def test_twin_rows_pair_the_same_slice_index():
    assert twin_rows(torch.tensor([3, 4, 5]), torch.tensor([4, 5, 6])).tolist() == [-1, 0, 1]


def test_faint_slices_are_the_grazing_slices_of_each_lesion():
    label = torch.zeros(12, 12, 20, dtype=torch.uint8)
    zz, yy, xx = np.meshgrid(np.arange(12), np.arange(12), np.arange(20), indexing="ij")
    label[torch.from_numpy((zz - 5) ** 2 + (yy - 5) ** 2 + (xx - 5) ** 2 <= 9)] = 1  # a sphere, slices 2-8
    label[1, 1, 12:15] = 1  # a 1-voxel-wide rod: every slice shows its whole cross-section
    index = torch.arange(20)
    faint = faint_slices(label, index, 0.3)
    # the sphere's caps (1 voxel of 29 at slices 2 and 8) are faint; its middle and the rod are not
    assert faint.tolist() == [i in (2, 8) for i in range(20)]
    assert not faint_slices(label, index, 0.0).any()
    assert faint_slices(label, index, 1.0).tolist() == [i in (2, 3, 4, 6, 7, 8) for i in range(20)]
    assert faint_slices(label, torch.tensor([8, 5]), 0.3).tolist() == [True, False]


def test_visible_fraction_keeps_faint_slices_out_of_the_online_stream():
    cfg = TrainConfig(anatomy_pool=1, batch_size=8, seed=5, visible_fraction=0.5)
    source = OnlineLesionSlices(cfg)
    rng = np.random.default_rng(1)
    (x, y, index, m), _ = source.twins(source._anatomy(rng), rng, 10**6)
    strict = OnlineLesionSlices(TrainConfig(anatomy_pool=1, batch_size=8, seed=5))
    rng = np.random.default_rng(1)
    (_, y_all, _, m_all), _ = strict.twins(strict._anatomy(rng), rng, 10**6)
    assert (y == -1).any() and ((y == -1) <= (y_all == 1)).all()  # only lesion slices are left out
    assert (y[y_all == 0] == 0).all()
    # a left-out slice shows less lesion than the slices kept: the caps of each lesion
    assert m_all[y == -1].sum((1, 2, 3)).mean() < m_all[y == 1].sum((1, 2, 3)).mean()
    assert set(next(iter(source))["label"].tolist()) <= {0, 1}


def test_randomised_fraction_draws_domain_randomised_anatomies_of_training_regimes(monkeypatch):
    from c2f_med.synth import randomised

    cfg = TrainConfig(anatomy_pool=2, batch_size=8, seed=4, randomised_fraction=1.0, families=("ring",))
    source = OnlineLesionSlices(cfg)
    rng = np.random.default_rng(0)
    anatomies = [source._anatomy(rng) for _ in range(2)]
    assert all(a.contrast.split(":")[1] in randomised.TRAINING_REGIMES for a in anatomies)
    assert OnlineLesionSlices(TrainConfig())._anatomy(rng).contrast in ("t1", "t2", "flair")
    drawn = []
    real = randomised.insert_random_lesions

    def spy(*args, **kw):
        out = real(*args, **kw)
        drawn.extend(lesion.family for lesion in out[2])
        return out

    monkeypatch.setattr(randomised, "insert_random_lesions", spy)
    batch = next(iter(source))
    assert batch["image"].shape == (8, 1, 96, 96) and set(drawn) == {"ring"}
    assert batch["mask"][batch["label"] == 1].amax((1, 2, 3)).min() > 0


def test_augment_keeps_shape_and_is_seeded():
    x = torch.randn(4, 1, 32, 32)
    y1, y2 = augment(x, np.random.default_rng(0)), augment(x, np.random.default_rng(0))
    assert y1.shape == x.shape and torch.equal(y1, y2) and not torch.equal(y1, x)
    masks = torch.zeros(4, 1, 32, 32)
    masks[:, :, 10:20, 12:22] = 1
    _, moved = augment(x, np.random.default_rng(0), masks)  # same geometry as the slices
    assert moved.shape == masks.shape and moved.sum() > 0 and not torch.equal(moved, masks)


def test_token_targets_follow_the_token_grid():
    masks = torch.zeros(1, 1, 32, 32)
    masks[0, 0, 4:8, 8:12] = 1  # exactly token (1, 2) of a 8 x 8 grid of 4 x 4 patches
    target = token_targets(masks, 4)
    assert target.shape == (1, 64) and target.sum() == 1 and target[0, 1 * 8 + 2] == 1


def test_bf16_training_head_matches_fp32_closely_and_returns_fp32():
    torch.manual_seed(0)
    net = LesionViT(img_size=32, **TINY).eval()
    x = torch.randn(4, 1, 32, 32)
    fp32, bf16 = TokenLesionHead(net), TokenLesionHead(net, bf16=True)
    bf16.head.load_state_dict(fp32.head.state_dict())
    (l32, t32), (l16, t16) = fp32(x), bf16(x)
    assert l16.dtype == t16.dtype == torch.float32
    assert t16.shape == t32.shape == (4, 64)
    torch.testing.assert_close(l16, l32, atol=0.1, rtol=0.05)  # bfloat16 keeps ~3 significant digits
    assert not torch.equal(l16, l32)  # it did run in bfloat16


def test_training_builds_the_bundles_network(tmp_path):
    from c2f_med.errors import InputError
    from c2f_med.models.bundle import DEFAULT_BUNDLE
    from c2f_med.models.train import bundle_network

    img_size, kwargs = bundle_network(DEFAULT_BUNDLE)
    assert img_size == 96 and kwargs["stem_depth"] == 2 and "_target_" not in kwargs
    other = tmp_path / "configs"
    other.mkdir()
    (other / "inference.json").write_text(json.dumps({"network_def": {"_target_": "torch.nn.Identity"}}))
    with pytest.raises(InputError, match="LesionViT"):
        bundle_network(tmp_path)


def test_init_starts_from_the_given_weights(train_datalist, tmp_path):
    start = LesionViT(img_size=32, **TINY)
    torch.save(start.state_dict(), tmp_path / "start.pt")
    _train(train_datalist, tmp_path / "bundle", 1, 2, init=tmp_path / "start.pt", seed=5,
           recipe={"batch_size": 8, "lr": 1e-12, "warmup_steps": 1})
    tuned = torch.load(tmp_path / "bundle" / "models" / "model.pt", weights_only=True)
    for name, value in start.named_parameters():  # lr ~0: the weights are still the ones it started from
        torch.testing.assert_close(tuned[name], value.detach(), rtol=0, atol=1e-6)  # (BatchNorm's buffers do move)


def test_init_from_another_input_size_resamples_the_position_embeddings(train_datalist, tmp_path):
    """Weights trained at 16 px fine-tune a 32 px bundle: same weights, a 4 x 4 position grid from 2 x 2."""
    from c2f_med.models.vit import POSITION_KEY

    start = LesionViT(img_size=16, **TINY)
    torch.save(start.state_dict(), tmp_path / "start16.pt")
    _train(train_datalist, tmp_path / "bundle", 1, 2, init=tmp_path / "start16.pt",
           recipe={"batch_size": 8, "lr": 1e-12, "warmup_steps": 1})
    tuned = torch.load(tmp_path / "bundle" / "models" / "model.pt", weights_only=True)
    assert tuned[POSITION_KEY].shape[1] == 4 * start.state_dict()[POSITION_KEY].shape[1]
    for name, value in start.named_parameters():
        if name != POSITION_KEY:
            torch.testing.assert_close(tuned[name], value.detach(), rtol=0, atol=1e-6)


def test_init_that_does_not_fit_is_a_clear_error(train_datalist, tmp_path):
    from c2f_med.errors import InputError

    other = LesionViT(img_size=32, **{**TINY, "hidden_size": TINY["hidden_size"] * 2, "mlp_dim": 8})
    torch.save(other.state_dict(), tmp_path / "other.pt")
    for path, message in ((tmp_path / "other.pt", "not a state dict"), (tmp_path / "missing.pt", "no such file")):
        with pytest.raises(InputError, match=message) as info:
            _train(train_datalist, tmp_path / "bundle", 1, 1, init=path, recipe={"batch_size": 8})
        assert path.name in str(info.value)


def test_curriculum_fraction_zero_gives_the_full_range_at_once():
    cfg = TrainConfig(steps=1000, curriculum_fraction=0.0)
    assert _curriculum(cfg, 0)["contrast"] == pytest.approx(cfg.contrast)
    assert _curriculum(cfg, 0)["diameter_mm"] == pytest.approx(cfg.diameter_mm)


def test_recipe_values_are_parsed_and_checked():
    from c2f_med.errors import InputError
    from c2f_med.models.train import recipe_value

    assert recipe_value("lr=3e-4") == ("lr", 3e-4)
    assert recipe_value("diameter_mm=[5, 20]") == ("diameter_mm", (5, 20))
    assert recipe_value("bf16=false") == ("bf16", False)
    for bad, message in (("lr", "FIELD=VALUE"), ("learning_rate=1", "not a recipe field"),
                         ("steps=10", "not a recipe field"), ("lr=fast", "not JSON")):
        with pytest.raises(InputError, match=message):
            recipe_value(bad)


def test_training_curve_joins_stages(tmp_path):
    import matplotlib.image

    from c2f_med.models.train import plot_curve

    logs = []
    for k in range(2):
        log = tmp_path / f"stage{k}.csv"
        log.write_text("step,seconds,loss,val_auroc,val_accuracy\n500,10,0.8,0.7,0.8\n1000,20,0.7,0.75,0.85\n")
        logs.append(log)
    plot_curve(logs, tmp_path / "curve.png")
    image = matplotlib.image.imread(tmp_path / "curve.png")
    assert image.shape[0] > 100 and image.shape[1] > 2 * image.shape[0]  # two panels side by side


def test_run_training_rejects_unknown_recipe_fields(tmp_path):
    """The bundle's train.json passes ``recipe`` straight to run_training: it is checked there too."""
    from c2f_med.errors import InputError
    from c2f_med.models.train import run_training

    for recipe in ({"learning_rate": 1e-3}, {"seed": 3}):
        with pytest.raises(InputError, match="not among"):
            run_training(tmp_path / "dl.json", tmp_path, epochs=1, seed=0, online_lesions=True, recipe=recipe)


def test_training_log_scores_the_epochs_own_batches(tmp_path):
    """train_auroc ranks each epoch's training slices by the logits the trainer computed, then starts afresh."""
    from types import SimpleNamespace

    from c2f_med.models.train import TrainingLog

    evaluator = SimpleNamespace(state=SimpleNamespace(metrics={"val_auroc": 0.5, "val_accuracy": 0.5}))
    log = TrainingLog(tmp_path / "log.csv", evaluator, epoch_steps=1)

    def batch(margins, labels):
        return [{"loss": torch.tensor(1.0), "pred": [torch.tensor([0.0, m]), torch.zeros(4)],
                 "label": [torch.tensor(y), torch.zeros(4)]} for m, y in zip(margins, labels)]

    engine = SimpleNamespace(state=SimpleNamespace(iteration=1, output=batch([0.1, 0.9, 0.2, 0.8], [0, 1, 0, 1])))
    log._loss(engine)
    log._epoch(engine)
    engine.state.iteration, engine.state.output = 2, batch([0.9, 0.1, 0.6, 0.4], [0, 1, 1, 0])
    log._loss(engine)
    log._epoch(engine)
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert [float(r["train_auroc"]) for r in rows] == [1.0, 0.25]


def test_visible_fraction_leaves_faint_datalist_slices_out_of_the_batches(tmp_path):
    from c2f_med.models.train import DatalistSlices
    from tests.conftest import write_nifti

    grid = np.meshgrid(*(np.arange(n) for n in (24, 24, 24)), indexing="ij")
    head = sum((g - 11.5) ** 2 for g in grid) <= 121
    ball = sum((g - c) ** 2 for g, c in zip(grid, (12, 12, 8))) <= 16  # radius 4: caps of 1 voxel at z 4, 12
    image = np.where(head, 600 + 80 * np.random.default_rng(0).standard_normal(head.shape), 0) + 400 * ball
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    item = {"image": str(write_nifti(tmp_path / "ball.nii.gz", image.astype(np.int16), affine)),
            "label": str(write_nifti(tmp_path / "ball_mask.nii.gz", ball.astype(np.uint8), affine))}
    every = DatalistSlices([item], TrainConfig(img_size=32, batch_size=8))
    visible = DatalistSlices([item], TrainConfig(img_size=32, batch_size=8, visible_fraction=0.3))
    left_out = visible.y == -1
    assert int(left_out.sum()) == 2 and (every.y[left_out] == 1).all()
    assert (visible.y[~left_out] == every.y[~left_out]).all()
    assert set(next(iter(visible))["label"].tolist()) <= {0, 1}


def test_a_context_network_trains_from_2d_weights_and_is_classified_and_explained_in_context(train_datalist,
                                                                                            tmp_path):
    """A 2.5-D bundle (``context_slices`` 1 in network_def) fine-tunes from 2-D weights on three-slice
    inputs, and calibration and the volume explainer hand its model three slices as well."""
    from c2f_med.calibrate import volume_logits
    from c2f_med.explain import create
    from c2f_med.explain.volume import explain_volume
    from c2f_med.models.bundle import load_bundle

    start = LesionViT(img_size=32, **TINY)
    torch.save(start.state_dict(), tmp_path / "start.pt")
    bundle = write_tiny_bundle(tmp_path / "bundle", context_slices=1)
    _train(train_datalist, bundle, 1, 2, init=tmp_path / "start.pt", recipe={"batch_size": 8, "warmup_steps": 1})
    loaded = load_bundle(bundle)
    assert loaded.model.slice_context == 1 and loaded.model.stem[0].in_channels == 3
    item = read_datalist(train_datalist, "validation")[0]
    data = load_case_transforms(keys=("image", "label"))({"image": item["image"], "label": item["label"]})
    image, mask = data["image"][0].as_tensor(), data["label"][0].as_tensor()
    x, y, index, _ = slice_dataset(image, mask, 32, context=1)
    assert x.shape[1] == 3
    torch.testing.assert_close(x[:, 1:2], slice_dataset(image, mask, 32)[0])
    logits = volume_logits(loaded, image, mask, "tiny").logits
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(logits), loaded.model(x), atol=1e-5, rtol=0)
    result = explain_volume(data["image"], create("gradcam", loaded.model), progress=False)
    probs = [p.probability for p in result.predictions if p.explained]
    with torch.no_grad():
        expected = loaded.model(x).softmax(1)[:, 1]
    torch.testing.assert_close(torch.tensor(probs), expected, atol=1e-5, rtol=0)
    assert result.saliency.shape == data["image"].shape and result.saliency.max() > 0


def test_the_online_stream_gives_a_context_network_each_slice_between_its_neighbours():
    flat = OnlineLesionSlices(TrainConfig(anatomy_pool=1, batch_size=8, seed=5))
    wide = OnlineLesionSlices(TrainConfig(anatomy_pool=1, batch_size=8, seed=5, model={"context_slices": 1}))
    rng = np.random.default_rng(2)
    (x, y, _, _), _ = flat.twins(flat._anatomy(rng), rng, 0)
    rng = np.random.default_rng(2)
    (wx, wy, _, _), _ = wide.twins(wide._anatomy(rng), rng, 0)
    assert wx.shape == (x.shape[0], 3, *x.shape[2:]) and torch.equal(wy, y)
    torch.testing.assert_close(wx[:, 1:2], x)
    torch.testing.assert_close(wx[1:, 0], x[:-1, 0])  # (the brain's slices are contiguous)
    batch = next(iter(wide))
    assert batch["image"].shape == (8, 3, 96, 96) and batch["mask"].shape == (8, 1, 96, 96)


def test_input_lr_puts_the_first_kernel_in_a_group_of_its_own():
    from c2f_med.models.train import param_groups

    net = TokenLesionHead(LesionViT(img_size=32, **TINY, context_slices=1))
    plain = param_groups(net, 0.05)
    assert len(plain) == 2 and sum(len(g["params"]) for g in plain) == len(list(net.parameters()))
    groups = param_groups(net, 0.05, input_lr=3e-3)
    assert len(groups) == 3 and groups[2]["params"] == [net.net.stem[0].weight] and groups[2]["lr"] == 3e-3
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
    optimiser = torch.optim.AdamW(groups, lr=1e-4)
    assert [g["lr"] for g in optimiser.param_groups] == [1e-4, 1e-4, 3e-3]
