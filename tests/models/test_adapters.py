"""Other people's ViTs: wrapped without changing their outputs, explained by every method, refused in one line."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import timm
import torch
import torchvision
from monai.bundle import ConfigParser
from monai.networks.nets import ViT
from torch import nn

from c2f_med.case import load_scan
from c2f_med.cli import main
from c2f_med.errors import InputError
from c2f_med.explain import available, create, explain_volume
from c2f_med.models.adapters import ExplicitAttention, InputMap, ModelInput, UnsupportedModel, wrap_model
from c2f_med.models.bundle import load_bundle
from c2f_med.slices import INPUT_MEAN, INPUT_STD, normalise_input
from tests.models.conftest import FAMILIES, write_family_bundle


def raw_network(root):
    """The bundle's network as its owner runs it: built from network_def, weights loaded, not wrapped."""
    net = ConfigParser(json.loads((root / "configs" / "inference.json").read_text())).get_parsed_content("network_def")
    net.load_state_dict(torch.load(root / "models" / "model.pt", weights_only=True))
    return net.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_wrapping_keeps_the_networks_scores(family, family_bundles):
    """The wrapped model on a gray slice in the pipeline's normalisation gives what the owner's network gives on
    that slice mapped to its value range and repeated to its channels."""
    root = family_bundles[family]
    _, channels, size, (lo, hi), names, _ = FAMILIES[family]
    bundle = load_bundle(root)
    assert bundle.model.input_size == (size, size) and bundle.model.num_classes == len(names)
    assert bundle.class_names == tuple(names)
    x01 = torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(1))
    expected = raw_network(root)((lo + (hi - lo) * x01).expand(-1, channels, -1, -1))
    expected = expected[0] if isinstance(expected, tuple) else expected
    with torch.no_grad():
        got = bundle.model(normalise_input(x01))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert got.std(0).max() > 1e-4  # the scores depend on the input


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_tokens_and_gradients_are_recorded(family, family_bundles):
    model = load_bundle(family_bundles[family]).model
    x = torch.randn(2, 1, *model.input_size, generator=torch.Generator().manual_seed(2))
    out = model.run(x, tokens=True, attentions=True, target=torch.tensor([1, 0]))
    n = model.grid[0] * model.grid[1]
    assert model.num_layers == 2 and out.tokens.shape[:2] == (2, n)
    for a, g in zip(out.attentions, out.attention_grads):
        assert a.shape == g.shape == (2, model.num_heads, n + 1, n + 1)
        torch.testing.assert_close(a.sum(-1), torch.ones(2, model.num_heads, n + 1))
    assert out.attention_grads[-1].abs().sum() > 0 and out.token_grads.abs().sum() > 0


def test_attention_gradient_matches_finite_difference_through_torchvision(family_bundles):
    """The hooked matrix of torchvision's attention is the one that multiplies the values."""
    model = load_bundle(family_bundles["torchvision"]).model.double()
    x = torch.randn(1, 1, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out = model.run(x, attentions=True, target=torch.tensor([1]))
    direction = torch.randn_like(out.attentions[0])

    def score(eps: float) -> float:
        handle = model.attention_modules()[0].register_forward_hook(lambda m, i, o: o + eps * direction)
        with torch.no_grad():
            value = model(x)[0, 1].item()
        handle.remove()
        return value

    numeric = (score(1e-5) - score(-1e-5)) / 2e-5
    assert abs(numeric - (out.attention_grads[0] * direction).sum().item()) < 1e-6 * max(1.0, abs(numeric))


def test_explicit_attention_equals_multihead_attention():
    torch.manual_seed(0)
    for batch_first in (True, False):
        mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
        x = torch.randn(3, 5, 16)
        ref, _ = mha(x, x, x, need_weights=False)
        keys = set(mha.state_dict())
        explicit = ExplicitAttention(mha)
        assert set(explicit.state_dict()) == keys  # weights load under the same names
        torch.testing.assert_close(explicit(x, x, x)[0], ref, atol=1e-5, rtol=1e-5)


def test_input_map_of_the_committed_value_range_is_the_identity():
    """[0, 1] onto [(0 - 0.25) / 0.3, (1 - 0.25) / 0.3] is the pipeline's own normalisation."""
    x = torch.randn(2, 1, 4, 4)
    lo, hi = -INPUT_MEAN / INPUT_STD, (1 - INPUT_MEAN) / INPUT_STD
    torch.testing.assert_close(InputMap(1, (lo, hi))(x), x)
    three = InputMap(3, (0.0, 1.0))(x)
    assert three.shape == (2, 3, 4, 4)
    torch.testing.assert_close(three[:, 2:], x * INPUT_STD + INPUT_MEAN)


#: methods ending in a ReLU of a signed map: on a scan unlike its training data a toy model's whole map may be <= 0
RELU_METHODS = ("gradcam", "gradcam-attn")


@pytest.mark.parametrize("method", available())
@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_explains_every_family_on_the_scans_grid(family, method, family_bundles, held_out_scan):
    """Finite maps on the scan's grid, 0 on the slices not asked for, not constant on the explained lesion slice
    (for the ReLU methods, whose toy-model maps may be all 0 there: not constant on a noise slice for class 0 or 1)."""
    bundle = load_bundle(family_bundles[family])
    scan = load_scan(*held_out_scan, bundle.preset)["image"]
    explainer = create(method, bundle.model)
    result = explain_volume(scan, explainer, target=1, slices=[2], progress=False)
    saliency = result.saliency[0].numpy()
    assert saliency.shape == tuple(scan.shape[1:])
    assert np.isfinite(saliency).all()
    assert (saliency[..., [0, 1, 3, 4]] == 0).all()  # slices not asked for stay 0
    if method in RELU_METHODS:
        noise = torch.randn(1, 1, *bundle.model.input_size, generator=torch.Generator().manual_seed(4))
        assert max(explainer.explain(noise, t).saliency.std().item() for t in (0, 1)) > 1e-3
    else:
        assert saliency[..., 2].std() > 1e-3


def test_without_a_declared_class_each_slice_explains_its_predicted_class(family_bundles, held_out_scan):
    bundle = load_bundle(family_bundles["monai_tanh"])
    assert bundle.lesion_class is None
    scan = load_scan(*held_out_scan, bundle.preset)["image"]
    result = explain_volume(scan, create("gradcam", bundle.model), target=None, progress=False)
    with torch.no_grad():
        from c2f_med.slices import to_model_grid, volume_slices

        x, _ = to_model_grid(volume_slices(scan.as_tensor()[0], 2, [2]).float(), bundle.model.input_size)
        prob = bundle.model(normalise_input(x)).softmax(1)[0]
    assert result.predictions[2].probability == pytest.approx(prob.max().item(), abs=1e-5)


@pytest.mark.parametrize(("value", "index"), [("lesion", 1), ("ARTEFACT", 2), ("0", 0), (2, 2)])
def test_target_class_by_name_or_index(value, index, family_bundles, monkeypatch):
    monkeypatch.setenv("C2F_MED_TARGET_CLASS", str(value))
    assert load_bundle(family_bundles["monai_tanh"]).lesion_class == index


def test_an_unknown_target_class_lists_the_classes(family_bundles, monkeypatch):
    monkeypatch.setenv("C2F_MED_TARGET_CLASS", "tumour")
    with pytest.raises(InputError, match="no class 'tumour'.*0=normal, 1=lesion, 2=artefact"):
        load_bundle(family_bundles["monai_tanh"])


def _refusals():
    def monai(**kw):
        return ViT(**{"in_channels": 1, "img_size": (16, 16), "patch_size": (8, 8), "hidden_size": 16, "mlp_dim": 16,
                      "num_layers": 1, "num_heads": 2, "classification": True, "spatial_dims": 2, **kw})

    def timm_vit(cls=timm.models.vision_transformer.VisionTransformer, **kw):
        return cls(img_size=16, patch_size=8, in_chans=1, num_classes=2, embed_dim=16, depth=1, num_heads=2, **kw)

    return {
        "cnn": (lambda: torchvision.models.resnet18(num_classes=2), "found a ResNet \\(a CNN\\); needed: a 2D Vision"),
        "3d": (lambda: monai(img_size=(16, 16, 16), patch_size=(8, 8, 8), spatial_dims=3), "3D .*spatial_dims=2"),
        "no head": (lambda: monai(classification=False), "classification=False"),
        "registers": (lambda: timm_vit(reg_tokens=4), "5 prefix tokens"),
        "distilled": (lambda: timm_vit(timm.models.deit.VisionTransformerDistilled), "Distilled with 2 prefix"),
        "avg pool": (lambda: timm_vit(global_pool="avg"), "global_pool='avg'"),
        "no class token": (lambda: timm_vit(global_pool="avg", class_token=False), "without a class token"),
        "wrapper": (lambda: nn.Sequential(nn.Identity(), monai()), "ViT at '1': name it with --backbone-attr 1"),
    }


@pytest.mark.parametrize("case", list(_refusals()))
def test_unsupported_networks_are_refused_in_one_line(case, tmp_path, monkeypatch):
    build, message = _refusals()[case]
    net = build()
    root = tmp_path / "bundle"
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    torch.save(net.state_dict(), root / "models" / "model.pt")
    (root / "configs" / "inference.json").write_text(json.dumps({"network_def": "$torch.nn.Identity()"}))
    monkeypatch.setattr("monai.bundle.ConfigParser.get_parsed_content", lambda self, *a, **k: net)
    with pytest.raises(InputError, match=message) as err:
        load_bundle(root)
    assert "\n" not in str(err.value) and str(err.value).startswith(str(root / "configs" / "inference.json"))
    with pytest.raises(UnsupportedModel):
        wrap_model(build())


def test_backbone_path_that_does_not_exist_names_the_children(family_bundles, monkeypatch):
    monkeypatch.setenv("C2F_MED_BACKBONE_ATTR", "encoder")
    with pytest.raises(InputError, match="no submodule 'encoder' in the StemmedViT \\(its children: stem, vit\\)"):
        load_bundle(family_bundles["wrapper"])


def test_metadata_shape_that_the_tokens_do_not_tile_is_refused(family_bundles, tmp_path):
    root = shutil.copytree(family_bundles["timm"], tmp_path / "b")
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    meta["network_data_format"]["inputs"]["image"]["spatial_shape"] = [32, 40]
    (root / "configs" / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="do not tile a 32 x 40 input"):
        load_bundle(root)


def test_reinitialised_bundle_has_other_weights_and_leaves_the_random_state(family_bundles):
    root = family_bundles["timm"]
    state = torch.random.get_rng_state()
    a, b = load_bundle(root, reinit_seed=5).model, load_bundle(root, reinit_seed=5).model
    assert torch.equal(torch.random.get_rng_state(), state)
    trained = load_bundle(root).model
    wa, wb, wt = (dict(m.named_parameters())["net.patch_embed.proj.weight"] for m in (a, b, trained))
    assert torch.equal(wa, wb) and not torch.allclose(wa, wt)


EXPLAIN = {"monai": ("c2f", "gradcam", "rollout"), "timm": ("gradcam", "rollout"),
           "torchvision": ("gradcam", "rollout"), "wrapper": ("rollout",)}


@pytest.mark.parametrize(("family", "method"), [(f, m) for f, ms in EXPLAIN.items() for m in ms])
def test_cli_explains_a_held_out_scan_with_their_bundle(family, method, family_bundles, held_out_scan, tmp_path,
                                                        capsys):
    image, mask = held_out_scan
    code = main(["explain", "--bundle", str(family_bundles[family]), "--input", str(image), "--mask", str(mask),
                 "--method", method, "--target-class", "lesion", "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    case = tmp_path / "out" / "scan"
    sal, img = nib.load(case / "saliency.nii.gz"), nib.load(image)
    assert sal.shape == img.shape and np.allclose(sal.affine, img.affine)
    data = sal.get_fdata()
    assert np.isfinite(data).all()
    if method not in RELU_METHODS:
        assert all(data[..., k].std() > 1e-3 for k in (1, 2, 3))
    assert json.loads((case / "provenance.json").read_text())["method"] == method


def test_cli_refuses_a_cnn_bundle_in_one_line(tmp_path, capsys):
    root = write_family_bundle(tmp_path / "b", "timm")
    (root / "configs" / "inference.json").write_text(json.dumps(
        {"network_def": {"_target_": "torchvision.models.resnet18", "num_classes": 2}}))
    torch.save(torchvision.models.resnet18(num_classes=2).state_dict(), root / "models" / "model.pt")
    code = main(["explain", "--bundle", str(root), "--input", str(tmp_path / "scan.nii.gz"), "--out",
                 str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "inference.json: network_def: found a ResNet (a CNN); needed: a 2D Vision Transformer" in err


def test_scoring_verbs_need_a_declared_class(family_bundles, tmp_path, capsys):
    datalist = tmp_path / "d.json"
    datalist.write_text(json.dumps({"testing": []}))
    code = main(["evaluate", "--bundle", str(family_bundles["monai_tanh"]), "--datalist", str(datalist),
                 "--out", str(tmp_path / "o")])
    assert code == 2 and "declares no class to explain" in capsys.readouterr().err


def test_wrap_model_leaves_a_token_vit_alone():
    from c2f_med.models.vit import LesionViT

    net = LesionViT(img_size=32, stem_channels=(8, 16), hidden_size=16, mlp_dim=16, num_layers=1, num_heads=2)
    assert wrap_model(net, ModelInput(3, (64, 64), (0, 1))) is net


@pytest.mark.slow
def test_the_worked_example_of_the_docs_runs(tmp_path):
    """docs/own_model.md's example builds a bundle, writes a scan and explains it with c2f-med, as printed."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    text = (repo / "docs" / "own_model.md").read_text()
    code = re.search(r"## Worked example.*?```python\n(.*?)```", text, re.S).group(1)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(repo), "TMPDIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == str(
        ["overlay.png", "predictions.csv", "provenance.json", "saliency.nii.gz"])
