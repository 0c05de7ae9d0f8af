"""Domain-randomised anatomies, scanner resolution and lesion families."""

from __future__ import annotations

import json
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest

from c2f_med.synth import randomised as R
from c2f_med.synth.lesions import paste, render_lesion


@pytest.fixture(scope="module")
def rand_anatomy():
    """One domain-randomised anatomy (training regimes); tests must not modify its arrays."""
    return R.make_random_anatomy(np.random.default_rng(0))


def test_held_out_names_are_disjoint_from_training():
    assert set(R.HELD_OUT_FAMILIES).isdisjoint(R.TRAINING_FAMILIES) and len(R.HELD_OUT_FAMILIES) >= 2
    assert R.HELD_OUT_REGIME not in R.TRAINING_REGIMES and set(R.TRAINING_REGIMES) | {R.HELD_OUT_REGIME} == set(
        R.REGIMES)
    assert len(set(R.REGIMES)) == 6


def test_tissue_means_follow_the_requested_regime_and_never_the_held_out_one():
    rng = np.random.default_rng(1)
    seen = set()
    for _ in range(300):
        means = R.sample_tissue_means(rng)
        regime = R.regime_of(means)
        assert regime != R.HELD_OUT_REGIME
        assert np.min(np.abs(np.subtract.outer(means, means))[np.triu_indices(3, 1)]) >= R.MIN_TISSUE_GAP - 1e-12
        seen.add(regime)
    assert seen == set(R.TRAINING_REGIMES)
    held = R.sample_tissue_means(rng, (R.HELD_OUT_REGIME,))
    assert R.regime_of(held) == "csf>wm>gm" and held[0] > held[2] > held[1]
    with pytest.raises(ValueError, match="regimes"):
        R.sample_tissue_means(rng, ("t1",))


def test_random_anatomy_renders_its_tissue_order(rand_anatomy):
    a = rand_anatomy
    assert a.image.shape == a.brain.shape == a.bias.shape and a.image.dtype == np.float32
    assert a.contrast.startswith("random:") and a.contrast[7:] in R.TRAINING_REGIMES
    from c2f_med.synth.anatomy import load_template

    t = load_template()
    # the rendered means of nearly pure tissue follow the regime (warp moves tissue little on average)
    pure = {name: (getattr(t, name) > 0.95) & a.brain for name in R.TISSUES}
    means = [float(np.median(a.image[pure[n]])) for n in R.TISSUES]
    assert R.regime_of(means) == a.contrast[7:]
    assert a.tissue_scale >= 2 * R.MIN_TISSUE_GAP - 1e-6


def test_training_sampler_never_draws_held_out_families_or_cystic_cores(rand_anatomy):
    rng = np.random.default_rng(2)
    families = set()
    for _ in range(40):
        lesion = R.sample_random_lesion(rng, rand_anatomy.brain, rand_anatomy.affine,
                                        R.TRAINING_FAMILIES[rng.integers(len(R.TRAINING_FAMILIES))])
        families.add(lesion.family)
        if lesion.family == "ring":  # a different core, but never a dark fluid core under a bright rim
            (_, rim), (_, core) = lesion.parts
            assert abs(core) <= 0.5 * abs(rim) + 1e-9 and core > -0.5
    assert families == set(R.TRAINING_FAMILIES)
    _, _, lesions = R.insert_random_lesions(rand_anatomy.image, rand_anatomy, rng, 12)
    assert {lesion.family for lesion in lesions} <= set(R.TRAINING_FAMILIES)
    cyst = R.sample_random_lesion(rng, rand_anatomy.brain, rand_anatomy.affine, "cystic")
    (_, rim), (_, core) = cyst.parts
    assert rim >= 0.25 and core <= -0.55


def test_contrast_is_relative_to_the_local_tissue(rand_anatomy):
    """A flat lesion's core reads (1 + c) times the mean of the tissue around it, whatever the tissue."""
    a = rand_anatomy
    rng = np.random.default_rng(3)
    for c in (0.4, -0.3):
        lesion = R.sample_random_lesion(rng, a.brain, a.affine, "homogeneous")
        spec = replace(lesion.parts[0][0], texture=0.0, diameter_mm=14.0, edge_mm=0.5, shape="ellipsoid")
        lesion = R.RandomLesion("homogeneous", ((spec, c),), (True,))
        local = R.local_intensity(a.image, a.brain, lesion, a.spacing)
        grids = np.meshgrid(*[(np.arange(n) - c0) * sp for n, c0, sp in zip(a.image.shape, spec.centre, a.spacing)],
                            indexing="ij")
        dist = np.sqrt(sum(g**2 for g in grids))
        shell = (dist > spec.reach_mm) & (dist < spec.reach_mm + R.SHELL_MM) & a.brain
        assert local == pytest.approx(float(np.mean(a.image[shell])), rel=0.1)  # the tissue around it
        full = np.zeros(a.image.shape, np.float32)
        paste(full, *render_lesion(spec, a.spacing), np.maximum)
        core = (full > 0.999) & a.brain
        assert core.sum() > 20
        out = a.image.copy()
        union = R.composite_lesion(out, a.image, a.brain, lesion, a.spacing)
        mask = union >= 0.5
        assert np.mean(out[core]) == pytest.approx((1 + c) * local, rel=0.02)
        assert mask[core].all()
        assert np.array_equal(out[full == 0], a.image[full == 0])  # beyond its reach nothing changed


def test_every_family_gives_a_mask_that_matches_the_change(rand_anatomy):
    rng = np.random.default_rng(4)
    for family in R.FAMILIES:
        out, mask, lesions = R.insert_random_lesions(rand_anatomy.image, rand_anatomy, rng, 1, (family,))
        assert out.shape == mask.shape == rand_anatomy.image.shape and mask.dtype == np.uint8
        assert lesions[0].family == family
        changed = np.abs(out - rand_anatomy.image) > 1e-6
        assert mask.any() or family == "satellites", family
        assert not (mask.astype(bool) & ~rand_anatomy.brain).any()
        assert changed[mask > 0].mean() > 0.5, family  # inside the mask the intensity really changed


def test_scanner_blur_and_resolution():
    s = R.Scanner(in_plane_mm=1.0, thickness_mm=2.0)
    assert np.allclose(s.blur_sigma(np.array([2.0, 2.0, 2.0])), 0)
    s = R.Scanner(in_plane_mm=2.5, thickness_mm=5.0)
    sigma = s.blur_sigma(np.array([2.0, 2.0, 2.0]))
    assert sigma[2] > sigma[0] > 0
    rng = np.random.default_rng(5)
    for _ in range(50):
        sc = R.sample_scanner(rng)
        assert R.IN_PLANE_MM[0] <= sc.in_plane_mm <= R.IN_PLANE_MM[1] <= 2.5
        assert sc.in_plane_mm <= sc.thickness_mm <= R.THICKNESS_MM[1]


def test_cases_are_deterministic_and_on_their_own_grid():
    a, lesions, scanner = R.synth_randomised_case(7, 0, n_lesions=2)
    b, _, _ = R.synth_randomised_case(7, 0, n_lesions=2)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    assert a.image.shape == a.label.shape == a.lesion_free.shape
    spacing = np.linalg.norm(a.affine[:3, :3], axis=0)
    assert spacing[0] == pytest.approx(scanner.in_plane_mm, rel=0.05)
    assert spacing[2] == pytest.approx(scanner.thickness_mm, rel=0.1)
    assert a.label.any() and len(lesions) == 2
    assert (a.image != a.lesion_free).any()


def test_write_randomised_dataset_records_families(tmp_path):
    path = R.write_randomised_dataset(tmp_path / "d", 2, 9, families=R.HELD_OUT_FAMILIES,
                                      regimes=(R.HELD_OUT_REGIME,), section="testing", progress=False)
    datalist = json.loads(path.read_text())
    assert len(datalist["testing"]) == 2 and "cystic" in datalist["description"]
    records = json.loads((tmp_path / "d" / "lesions.json").read_text())
    for rec in records.values():
        assert rec["regime"] == R.HELD_OUT_REGIME
        assert {le["family"] for le in rec["lesions"]} <= set(R.HELD_OUT_FAMILIES)
    item = datalist["testing"][0]
    img, lab = nib.load(tmp_path / "d" / item["image"]), nib.load(tmp_path / "d" / item["label"])
    assert img.shape == lab.shape and np.allclose(img.affine, lab.affine)
    from c2f_med.errors import InputError

    with pytest.raises(InputError, match="families"):
        R.write_randomised_dataset(tmp_path / "e", 1, 1, families=("blob",), progress=False)
