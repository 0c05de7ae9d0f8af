"""The volume explainer: geometry, skipping, streaming, normalisation and the NIfTI round trip."""

from __future__ import annotations

import math
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, Invertd, LoadImage, LoadImaged, Orientationd
from timm.models.vision_transformer import VisionTransformer

from c2f_med.explain import Explainer, Explanation, create, explain_volume
from c2f_med.explain.tokens import minmax
from c2f_med.models.vit import TimmViTAdapter, TokenViT
from c2f_med.slices import from_model_grid, normalise_input, to_model_grid, volume_slices

SHAPE = (20, 13, 9)
BACKGROUND = {0: [0, 19], 1: [12], 2: [0, 8]}  # all-zero slices per axis


def affine() -> torch.Tensor:
    """Rotation about z by 30 degrees, spacing (0.8, 1.2, 2.5) mm, an origin off zero."""
    c, s = math.cos(math.pi / 6), math.sin(math.pi / 6)
    a = torch.eye(4, dtype=torch.float64)
    a[:3, :3] = torch.tensor([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=torch.float64) @ torch.diag(
        torch.tensor([0.8, 1.2, 2.5], dtype=torch.float64))
    a[:3, 3] = torch.tensor([-40.0, 12.5, 7.0])
    return a


def scan() -> MetaTensor:
    g = torch.Generator().manual_seed(0)
    v = torch.rand(SHAPE, generator=g)
    v[4:9, 3:7, 2:6] = 1.0  # a bright "lesion"
    for axis, index in BACKGROUND.items():
        torch.movedim(v, axis, 0)[index] = 0
    return MetaTensor(v[None], affine=affine(), meta={"filename_or_obj": "synthetic.nii.gz"})


def tiny_model() -> TokenViT:
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, in_chans=1, num_classes=2, embed_dim=32, depth=2, num_heads=2)
    return TimmViTAdapter(vit).eval()


class Recording(Explainer):
    """Delegates to another explainer and records the batch sizes it is called with."""

    @dataclass
    class Params:
        pass

    def __init__(self, inner: Explainer):
        super().__init__(inner.model)
        self.inner, self.name, self.batches = inner, inner.name, []

    def _explain(self, x: torch.Tensor, target) -> Explanation:
        self.batches.append(x.shape[0])
        return self.inner.explain(x, target)


class ImageCounter:
    """Forward hook: images through the model, per call."""

    def __init__(self, model: TokenViT):
        self.calls: list[int] = []
        model.register_forward_hook(lambda _m, inp, _out: self.calls.append(inp[0].shape[0]))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_geometry_affine_and_per_slice_maps(axis):
    model = tiny_model()
    s = scan()
    res = explain_volume(s, create("gradcam", model), axis=axis, slice_batch=5, progress=False)
    sal = res.saliency
    assert isinstance(sal, MetaTensor) and sal.shape == (1, *SHAPE) and sal.dtype == torch.float32
    torch.testing.assert_close(sal.affine, s.affine)
    assert sal.meta["filename_or_obj"] == "synthetic.nii.gz"
    assert 0 <= sal.min() and sal.max() <= 1
    n = SHAPE[axis]
    assert [p.index for p in res.predictions] == list(range(n))
    for p in res.predictions:
        plane = torch.movedim(sal[0], axis, 0)[p.index]
        if p.index in BACKGROUND[axis]:
            assert math.isnan(p.probability) and not p.explained and plane.eq(0).all()
        else:
            assert 0 <= p.probability <= 1 and p.explained and plane.max() == 1
    # one slice by hand: cut, pad + resize, normalise, explain, resize back, min-max
    k = 4
    raw = volume_slices(s[0], axis, [k])
    x, geom = to_model_grid(raw, 32)
    expected = minmax(from_model_grid(create("gradcam", model).explain(normalise_input(x), 1).saliency, geom))[0]
    torch.testing.assert_close(torch.movedim(sal[0], axis, 0)[k], expected, atol=1e-5, rtol=0)
    with torch.no_grad():
        prob = model(normalise_input(x)).softmax(1)[0, 1].item()
    assert res.predictions[k].probability == pytest.approx(prob, abs=1e-6)
    explained = [p.index for p in res.predictions if p.explained]
    assert [r["index"] for r in res.records] == explained
    assert res.forward_passes == 2 * len(explained) and res.backward_passes == len(explained)
    assert (res.method, res.axis) == ("gradcam", axis)


def test_min_probability_skips_slices_without_model_calls():
    model = tiny_model()
    s = scan()
    full = explain_volume(s, create("rollout", model), progress=False)
    probs = [p.probability for p in full.predictions if p.explained]
    threshold = float(np.median(probs))
    counter = ImageCounter(model)
    rec = Recording(create("rollout", model))
    res = explain_volume(s, rec, min_probability=threshold, progress=False)
    kept = [p.index for p in res.predictions if p.explained]
    assert 0 < len(kept) < len(probs)
    for p in res.predictions:
        plane = res.saliency[0, :, :, p.index]
        if p.explained:
            assert p.probability >= threshold
            torch.testing.assert_close(plane, full.saliency[0, :, :, p.index])
        else:
            assert plane.eq(0).all()
            assert math.isnan(p.probability) or p.probability < threshold
    assert sum(rec.batches) == len(kept)
    # model images: one classification pass per non-background slice + rollout's one per kept slice
    assert sum(counter.calls) == len(probs) + len(kept) == res.forward_passes


def test_streams_at_most_slice_batch_slices():
    model = tiny_model()
    counter = ImageCounter(model)
    rec = Recording(create("gae", model))
    res = explain_volume(scan(), rec, slice_batch=3, progress=False)
    assert max(rec.batches) <= 3 and max(counter.calls) <= 3
    assert sum(rec.batches) == SHAPE[2] - len(BACKGROUND[2])
    one = explain_volume(scan(), create("gae", model), slice_batch=1, progress=False)
    torch.testing.assert_close(one.saliency.as_tensor(), res.saliency.as_tensor(), atol=1e-5, rtol=0)


def test_volume_normalisation_weights_slices_by_probability():
    model = tiny_model()
    per_slice = explain_volume(scan(), create("rollout", model), progress=False)
    vol = explain_volume(scan(), create("rollout", model), normalise="volume", progress=False)
    probs = {p.index: p.probability for p in vol.predictions if p.explained}
    top = max(probs.values())
    assert vol.saliency.max() == pytest.approx(1.0)
    for k, p in probs.items():
        torch.testing.assert_close(vol.saliency[0, :, :, k], per_slice.saliency[0, :, :, k] * p / top,
                                   atol=1e-6, rtol=0)


def test_nifti_round_trip_keeps_the_input_affine(tmp_path):
    s = scan()
    src = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(s[0].numpy(), s.affine.numpy()), src)
    loaded = LoadImage(image_only=True, ensure_channel_first=True)(str(src))
    res = explain_volume(loaded, create("attention", tiny_model()), progress=False)
    out = tmp_path / "saliency.nii.gz"
    nib.save(nib.Nifti1Image(res.saliency[0].numpy(), res.saliency.affine.numpy()), out)
    back = nib.load(out)
    np.testing.assert_allclose(back.affine, nib.load(src).affine, atol=1e-5)
    np.testing.assert_allclose(back.get_fdata(), res.saliency[0].numpy(), atol=1e-6)
    assert back.shape == SHAPE


def test_invertd_puts_the_saliency_on_the_original_grid(tmp_path):
    """A file in LPI-like orientation: Orientationd(RAS) flips it; Invertd flips the saliency back."""
    lps = np.diag([-0.8, -1.2, 2.5, 1.0])
    lps[:3, 3] = [10.0, 20.0, -5.0]
    src = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(scan()[0].numpy(), lps), src)
    pre = Compose([LoadImaged("image"), EnsureChannelFirstd("image"), Orientationd("image", axcodes="RAS")])
    data = pre({"image": str(src)})
    res = explain_volume(data["image"], create("attention", tiny_model()), progress=False)
    data["saliency"] = res.saliency
    inverted = Invertd("saliency", transform=pre, orig_keys="image", nearest_interp=False)(data)["saliency"]
    np.testing.assert_allclose(inverted.affine.numpy(), lps, atol=1e-6)
    np.testing.assert_allclose(inverted[0].numpy(), np.flip(res.saliency[0].numpy(), (0, 1)), atol=1e-6)


def test_plain_tensor_gets_identity_affine_and_bad_input_is_refused():
    model = tiny_model()
    res = explain_volume(scan().as_tensor(), create("attention", model), progress=False)
    torch.testing.assert_close(res.saliency.affine, torch.eye(4, dtype=res.saliency.affine.dtype))
    with pytest.raises(ValueError, match="1 x X x Y x Z"):
        explain_volume(torch.zeros(2, 4, 4, 4), create("attention", model))
    with pytest.raises(ValueError, match="normalise"):
        explain_volume(scan(), create("attention", model), normalise="global")
    with pytest.raises(ValueError, match="target"):
        explain_volume(scan(), create("attention", model), target=2)
