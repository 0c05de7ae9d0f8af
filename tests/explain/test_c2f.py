"""C2F: ablations, cost bound, batch-composition independence, records, parameters."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from c2f_med.explain.af import fine_map, patch_relation
from c2f_med.explain.base import create
from c2f_med.explain.c2f import C2F, SPEC_FIRST_DEFAULTS
from c2f_med.models.vit import LesionViT, TimmViTAdapter

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "c2f_lesion_vit"

LEVELS = ("pos1", "neg1", "bnd1", "pos2", "neg2", "bnd2", "acc3", "fallback")
# on an untrained model e_k clusters just below 1: these thresholds put many masks in BND1
WIDE_BAND = {"alpha1": 1.0, "beta1": 0.9, "alpha2": 1.0, "beta2": 0.95}


def lesion_vit() -> LesionViT:
    torch.manual_seed(0)
    return LesionViT(img_size=32, stem_channels=(8, 16), hidden_size=32, mlp_dim=64, num_layers=2, num_heads=2).eval()


@pytest.fixture(scope="module")
def model():
    return lesion_vit()


@pytest.fixture(scope="module")
def slices():
    return torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))


def count_images(model):
    seen: list[int] = []
    return seen, model.register_forward_hook(lambda _m, inp, _o: seen.append(inp[0].shape[0]))


def test_without_s3wm_and_af_it_is_vitcx_exactly(model, slices):
    vitcx = create("vitcx", model).explain(slices)
    c2f = create("c2f", model, s3wm=False, af=False, noise_draws="per-mask").explain(slices)
    assert torch.equal(c2f.saliency, vitcx.saliency)
    assert [r["K"] for r in c2f.records] == [r["K"] for r in vitcx.records]
    assert c2f.forward_passes == vitcx.forward_passes and c2f.backward_passes == 0
    other = create("vitcx", model, perturbation="blur").explain(slices)
    assert torch.equal(
        create("c2f", model, s3wm=False, af=False, perturbation="blur").explain(slices).saliency, other.saliency
    )


@pytest.mark.parametrize("costaware", [False, True])
def test_forward_pass_bound(model, slices, costaware):
    seen, handle = count_images(model)
    try:
        out = create("c2f-first", model, costaware=costaware, **WIDE_BAND).explain(slices, target=1)
    finally:
        handle.remove()
    assert sum(r["bnd1"] for r in out.records) > 0  # level 2 did run
    for r in out.records:
        k, bnd1 = r["K"], r["bnd1"]
        assert r["forward_passes"] <= 1 + 2 * k + 2 * bnd1
        assert r["forward_passes"] == (1 + k + 3 * bnd1 if costaware else 1 + 2 * k + 2 * bnd1)
    # the per-slice records add up to the images the model actually saw (Step 0 included)
    assert out.forward_passes == sum(r["forward_passes"] for r in out.records) == sum(seen)
    assert out.backward_passes == 3


def test_predicted_class_costs_one_forward_when_gradients_are_needed(model, slices):
    seen, handle = count_images(model)
    try:
        out = create("c2f-first", model).explain(slices)
    finally:
        handle.remove()
    assert out.forward_passes == sum(seen) == sum(1 + 1 + 2 * r["K"] + 2 * r["bnd1"] for r in out.records)
    no_grad = create("c2f-first", model, relation="rollout-last").explain(slices)
    assert no_grad.backward_passes == 0
    assert no_grad.forward_passes == sum(1 + 2 * r["K"] + 2 * r["bnd1"] for r in no_grad.records)


@pytest.mark.parametrize("name", ["c2f", "c2f-first"])
def test_batch_composition_independence(name):
    """A slice alone or inside a batch of 3 gives the same map (float64 LesionViT; float32 timm ViT).

    In float32 the conv stem's per-sample results vary with the batch size by ~1e-6, which the
    per-slice min-max amplifies on the nearly flat maps of an untrained model; float64 removes
    that rounding and leaves the algorithm's own batch dependence (there should be none).
    """
    torch.manual_seed(0)
    timm_vit = TimmViTAdapter(
        VisionTransformer(img_size=32, patch_size=8, in_chans=1, num_classes=2, embed_dim=32, depth=2, num_heads=2)
    ).eval()
    x = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    for model, xs in ((lesion_vit().double(), x.double()), (timm_vit, x)):
        explainer = create(name, model, batch_size=7, **WIDE_BAND)
        batch = explainer.explain(xs, target=1)
        alone = explainer.explain(xs[1:2], target=1)
        assert torch.allclose(alone.saliency[0], batch.saliency[1], atol=1e-5, rtol=0)
        assert alone.records[0] == batch.records[1]


def test_records(model, slices):
    out = create("c2f-first", model, **WIDE_BAND).explain(slices, target=1)
    assert len(out.records) == 3
    for r in out.records:
        assert set(r) == {"K", *LEVELS, "accepted", "forward_passes"}
        assert r["pos1"] + r["neg1"] + r["bnd1"] == r["K"]
        assert r["pos2"] + r["neg2"] + r["bnd2"] == r["bnd1"]
        assert r["acc3"] <= r["bnd2"]
        assert r["accepted"] == r["pos1"] + r["pos2"] + r["acc3"] + r["fallback"]
        assert r["accepted"] >= min(r["K"], 5)
    off = create("c2f-noS3WM", model).explain(slices, target=1)
    for r in off.records:
        assert all(r[key] is None for key in LEVELS) and r["accepted"] == r["K"]


def test_af_refines_the_coarse_map(model, slices):
    t = torch.tensor([1, 0, 1])
    af = {"relation": "gae", "l0": 1, "refine": "gate", "importance": "cosine", "coarse_scale": "minmax"}
    coarse = create("c2f-noAF", model, **af).explain(slices, target=t)
    fine = create("c2f", model, **af).explain(slices, target=t)
    out = model.run(slices, attentions=True, target=t)
    want = fine_map(coarse.saliency, patch_relation(out.attentions, out.attention_grads), model.grid, model.patch_size)
    assert torch.allclose(fine.saliency, want, atol=1e-5)
    assert fine.saliency.min() == 0 and fine.saliency.max() == pytest.approx(1.0)
    assert not torch.allclose(fine.saliency, coarse.saliency)


def test_s3wm_changes_the_map_only_through_its_gates(model, slices):
    # with thresholds every mask passes at level 1, S3WM is ViT-CX
    everything = create("c2f-first", model, af=False, alpha1=0.0, beta1=-1.0).explain(slices, target=1)
    assert torch.equal(everything.saliency, create("vitcx", model).explain(slices, target=1).saliency)
    assert all(r["pos1"] == r["K"] for r in everything.records)
    banded = create("c2f-first", model, af=False, **WIDE_BAND).explain(slices, target=1)
    assert not torch.equal(banded.saliency, everything.saliency)


def test_parameters_by_name(model):
    e = create("c2f", model, relation="rollout-last", alpha1=0.8)
    assert e.params.relation == "rollout-last" and e.params.alpha1 == 0.8 and e.params.beta1 == 0.3
    assert create("c2f-noS3WM", model).params.s3wm is False
    assert create("c2f-noAF", model).params.af is False
    assert create("c2f", model).params.costaware is True and create("c2f-first", model).params.costaware is False
    assert create("c2f-noAF", model, af=True).params.af is True  # overrides win over the variant's
    with pytest.raises(ValueError):
        create("c2f", model, alpah1=0.8)


def test_first_defaults_are_pinned(model):
    fields = {f.name for f in dataclasses.fields(C2F.Params)}
    assert set(SPEC_FIRST_DEFAULTS) == fields - {"batch_size", "seed"}  # every algorithm constant pinned
    first = create("c2f-first", model).param_dict()
    assert all(first[k] == v for k, v in SPEC_FIRST_DEFAULTS.items())


def test_sharpen_accepted_removes_the_band_of_every_accepted_mask(model, slices):
    from c2f_med.explain.perturb import class_probability
    from c2f_med.explain.s3wm import sharpen
    from c2f_med.explain.tokens import minmax
    from c2f_med.explain.vitcx import causal_scores, coverage_map, mask_requests, perturbation_of, slice_masks

    e = create("c2f-first", model, af=False, alpha1=0.0, beta1=-1.0, sharpen_accepted=True)  # every mask POS1
    got = e.explain(slices, target=1).saliency
    with torch.inference_mode():
        out = model.run(slices, tokens=True)
    t = torch.ones(len(slices), dtype=torch.long)
    p = class_probability(out.logits, t)
    masks = slice_masks(model, out, e.params.delta)
    base = [perturbation_of(e.params).baselines(xs, len(m)) for xs, m in zip(slices, masks)]
    scores = causal_scores(model, slices, t, p, mask_requests(masks, base), 64).split([len(m) for m in masks])
    want = minmax(
        torch.stack([coverage_map(s, sharpen(m, e.params.sharpen_a), coverage=m.sum(0)) for s, m in zip(scores, masks)])
    )
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got, create("vitcx", model).explain(slices, target=1).saliency)


def test_best_evaluation_accepts_the_best_mask(model, slices):
    # relative to the best mask, that mask has e = 1 and is always POS1 (its score is positive here)
    best = create("c2f-first", model, af=False, evaluation="best", k_min=0).explain(slices, target=1).records
    assert all(b["pos1"] >= 1 and b["accepted"] >= b["pos1"] for b in best)


@pytest.mark.parametrize("costaware", [False, True])
def test_split_granularity_costs_and_counts(model, slices, costaware):
    from c2f_med.explain.masks import nested_token_masks

    e = create("c2f-first", model, af=False, granularity="split", coarse_delta=0.3, costaware=costaware, **WIDE_BAND)
    seen, hook = count_images(model)
    try:
        res = e.explain(slices, target=1)
    finally:
        hook.remove()
    with torch.inference_mode():
        tokens = model.run(slices, tokens=True).tokens
    for rec, tok in zip(res.records, tokens):
        coarse, children = nested_token_masks(tok, model.grid, model.input_size, 0.3, e.params.delta)
        assert rec["K"] == len(coarse) and rec["pos1"] + rec["neg1"] + rec["bnd1"] == rec["K"]
        assert rec["forward_passes"] <= 1 + 2 * rec["K"] + 2 * sum(len(c) for c in children)
        if rec["bnd1"] == rec["K"]:  # every mask deferred: level 2 decides each sub-mask (or childless mask)
            assert rec["pos2"] + rec["neg2"] + rec["bnd2"] == sum(max(len(c), 1) for c in children)
    assert any(r["bnd1"] == r["K"] and r["bnd2"] > 1 for r in res.records)  # the wide band reached sub-masks
    assert sum(seen) == res.forward_passes
    assert res.saliency.shape == (3, 32, 32) and res.saliency.amax() == pytest.approx(1.0)


def test_legrad_relation_gates_the_coarse_map_with_legrads_map(model, slices):
    from c2f_med.explain.af import upsample_tokens
    from c2f_med.explain.legrad import legrad_maps
    from c2f_med.explain.tokens import minmax

    fine = create("c2f", model, coarse_scale="minmax").explain(slices, 1)
    coarse = create("c2f-noAF", model).explain(slices, 1)
    _, _, maps = legrad_maps(model, slices, 1)
    t = minmax(torch.stack(maps).sum(0))
    expected = minmax(coarse.saliency * upsample_tokens(t, model.grid, model.input_size))
    torch.testing.assert_close(fine.saliency, expected, atol=1e-5, rtol=0)
    layers = model.num_layers
    assert fine.backward_passes == layers * slices.shape[0]
    assert fine.forward_passes == coarse.forward_passes + slices.shape[0]  # LeGrad's own pass


def test_shared_noise_draws_give_every_mask_the_same_perturbation(model, slices):
    from c2f_med.explain.perturb import Perturbation

    shared = Perturbation("noise", seed=3, draws="shared").baselines(slices[0], 4)
    per_mask = Perturbation("noise", seed=3).baselines(slices[0], 4)
    assert all(torch.equal(shared[k], shared[0]) for k in range(4))
    assert torch.equal(shared[0], per_mask[0]) and not torch.equal(per_mask[1], per_mask[0])
    assert C2F(model).params.noise_draws == "shared" and SPEC_FIRST_DEFAULTS["noise_draws"] == "per-mask"
    with pytest.raises(ValueError, match="noise draws"):
        Perturbation("noise", draws="each")


@pytest.mark.slow
def test_on_the_bundle_it_is_stable_to_int16_storage_and_the_noise_floor():
    """Lesion slices of a validation-seed scan that the committed bundle calls positive: c2f's saliency of
    the scan, of the scan stored as int16 and of the scan plus noise at its own noise floor (as
    ``c2f-med evaluate``'s stability test makes them)."""
    from c2f_med.metrics.stability import int16_storage, noise_floor, saliency_correlation
    from c2f_med.models.bundle import load_bundle
    from c2f_med.slices import normalise_input, to_model_grid, volume_slices
    from c2f_med.synth.dataset import synth_case

    bundle = load_bundle(BUNDLE)
    case = synth_case(4, 0, n_lesions=2)  # a validation-seed scan (seed 3 is the test split)
    scan = np.asarray(case.image, dtype=np.float64)
    noisy = np.where(scan != 0, scan + np.random.default_rng(0).normal(0, noise_floor(scan), scan.shape), 0)
    lesion = np.nonzero(case.label.reshape(-1, case.label.shape[2]).any(0))[0].tolist()
    lo, hi = scan.min(), scan.max()

    def inputs(volume: np.ndarray) -> torch.Tensor:
        v = torch.as_tensor((volume - lo) / (hi - lo), dtype=torch.float32).clamp(0, 1)
        return normalise_input(to_model_grid(volume_slices(v, 2, lesion).float(), bundle.model.input_size[0])[0])

    x = inputs(scan)
    with torch.no_grad():
        keep = (bundle.model(x).softmax(1)[:, bundle.lesion_class] >= 0.5).nonzero().flatten()[:4]
    assert len(keep) >= 2
    explainer = create("c2f", bundle.model)
    given = explainer.explain(x[keep], bundle.lesion_class).saliency
    for name, other in (("int16", int16_storage(scan)), ("noise", noisy)):
        maps = explainer.explain(inputs(other)[keep], bundle.lesion_class).saliency
        r = [saliency_correlation(given[k].numpy(), maps[k].numpy()) for k in range(len(keep))]
        assert np.mean(r) >= 0.98, (name, r)
