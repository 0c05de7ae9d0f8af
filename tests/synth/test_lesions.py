"""Lesion sampling, rendering and insertion, in 3-D and on one slice."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy.ndimage import distance_transform_edt

from c2f_med.synth.lesions import (
    HELD_OUT_SHAPES,
    RING_CORE,
    RING_CORE_CONTRAST,
    SHAPES,
    LesionSpec,
    insert_lesions,
    lesion_slice,
    paste,
    render_lesion,
    sample_lesion,
)

SPACING = (2.0, 2.0, 2.0)


def sphere(diameter_mm=16.0, edge_mm=1.0, shape="ellipsoid", texture=0.0, centre=(20.0, 20.0, 20.0)) -> LesionSpec:
    return LesionSpec(centre=centre, diameter_mm=diameter_mm, shape=shape, axes=(1.0, 1.0, 1.0),
                      rotation=(0.0, 0.0, 0.0), contrast=0.5, edge_mm=edge_mm, texture=texture, seed=3)


def test_sample_lesion_respects_ranges_and_brain(anatomy):
    rng = np.random.default_rng(0)
    specs = [sample_lesion(rng, anatomy.brain, anatomy.affine, diameter_mm=(5, 8), contrast=(0.2, 0.3))
             for _ in range(200)]
    assert {s.shape for s in specs} == set(SHAPES)
    assert all(5 <= s.diameter_mm <= 8 and 0.2 <= abs(s.contrast) <= 0.3 for s in specs)
    signs = np.sign([s.contrast for s in specs])
    assert 0.3 < np.mean(signs > 0) < 0.7  # hyper and hypo
    assert all(anatomy.brain[tuple(np.rint(s.centre).astype(int))] for s in specs)
    assert all(np.prod(s.axes) == pytest.approx(1.0) for s in specs)
    # every spec is plain data
    assert all(isinstance(v, (int, float, str, tuple)) for v in dataclasses.asdict(specs[0]).values())


def test_sample_lesion_on_a_plane_crosses_it(anatomy):
    rng = np.random.default_rng(1)
    k = anatomy.brain.shape[2] // 2
    for _ in range(50):
        s = sample_lesion(rng, anatomy.brain, anatomy.affine, plane=(2, k))
        half_core = s.diameter_mm / 4 * min(s.axes) / SPACING[2]
        assert abs(s.centre[2] - k) <= half_core + 1e-9


def test_same_spec_renders_the_same_profile():
    spec = sphere(shape="irregular", texture=0.2)
    p1, o1 = render_lesion(spec, SPACING)
    p2, o2 = render_lesion(spec, SPACING)
    np.testing.assert_array_equal(p1, p2)
    assert o1 == o2
    p3, _ = render_lesion(dataclasses.replace(spec, seed=4), SPACING)
    assert not np.array_equal(p1, p3)


@pytest.mark.parametrize("shape", SHAPES + HELD_OUT_SHAPES)
def test_profile_is_soft_bounded_and_zero_on_the_box_border(shape):
    rng = np.random.default_rng(2)
    for _ in range(30):
        spec = dataclasses.replace(sphere(shape=shape, texture=0.3), diameter_mm=float(rng.uniform(3, 20)),
                                   axes=tuple(rng.uniform(0.7, 1.3, 3)), rotation=tuple(rng.uniform(-180, 180, 3)),
                                   edge_mm=float(rng.uniform(0.5, 3)), seed=int(rng.integers(1000)))
        profile, offset = render_lesion(spec, SPACING)
        assert profile.dtype == np.float32 and profile.min() >= 0 and profile.max() <= 1
        for axis in range(3):  # the box holds the whole lesion
            assert np.take(profile, 0, axis).max() == 0 and np.take(profile, -1, axis).max() == 0
        # the box is around the centre
        centre_local = np.asarray(spec.centre) - offset
        assert np.all(centre_local > 0) and np.all(centre_local < profile.shape)


def test_sphere_profile_is_half_on_the_nominal_boundary():
    spec = sphere(diameter_mm=16.0, edge_mm=1.0)
    profile, offset = render_lesion(spec, SPACING)
    c = np.asarray(spec.centre, dtype=int) - offset
    line = profile[c[0]:, c[1], c[2]]  # voxels 0, 2, 4, ... mm from the centre along x
    assert line[0] > 0.99 and line[4] == pytest.approx(0.5, abs=0.01)  # 8 mm: the radius
    assert np.all(np.diff(line) <= 0)
    volume = (profile >= 0.5).sum() * np.prod(SPACING)
    assert volume == pytest.approx(np.pi / 6 * 16.0**3, rel=0.1)


def test_shapes_differ_from_the_plain_ellipsoid():
    base, _ = render_lesion(sphere(), SPACING)
    lobed, _ = render_lesion(sphere(shape="lobulated"), SPACING)
    irregular, _ = render_lesion(sphere(shape="irregular"), SPACING)
    textured, _ = render_lesion(sphere(texture=0.3), SPACING)
    assert (lobed >= 0.5).sum() >= (base >= 0.5).sum()  # a union of the main ellipsoid and lobes
    for other in (irregular, textured):
        pad = [((0, max(0, a - b))) for a, b in zip(other.shape, base.shape)]
        assert not np.array_equal(np.pad(base, pad)[tuple(slice(0, n) for n in other.shape)], other)
    assert textured.max() < 1.0 and textured.max() > 0.7


def test_cuboid_has_the_volume_of_its_box():
    profile, _ = render_lesion(sphere(shape="cuboid", diameter_mm=14.0, edge_mm=0.5), SPACING)
    volume = (profile >= 0.5).sum() * np.prod(SPACING)
    assert volume == pytest.approx(14.0**3, rel=0.1)  # the sphere of that diameter holds pi / 6 of it


def test_held_out_shapes_are_drawn_only_when_asked(anatomy):
    rng = np.random.default_rng(5)
    drawn = {sample_lesion(rng, anatomy.brain, anatomy.affine, shapes=HELD_OUT_SHAPES).shape for _ in range(40)}
    assert drawn == set(HELD_OUT_SHAPES)
    with pytest.raises(ValueError, match="shapes"):
        sample_lesion(rng, anatomy.brain, anatomy.affine, shapes=("star",))


def test_ring_has_a_core_of_the_opposite_sign(anatomy):
    rng = np.random.default_rng(6)
    out, mask, (spec,) = insert_lesions(anatomy.image, anatomy, rng, 1, diameter_mm=(16, 18), contrast=(0.6, 0.8),
                                        shapes=("ring",))
    change = (out - anatomy.image) / (spec.contrast * anatomy.tissue_scale)  # in units of the lesion's contrast
    c = tuple(np.rint(spec.centre).astype(int))
    # the outer profile's texture may lower it by up to 30 %: core change in [-1, RING_CORE_CONTRAST]
    assert mask[c] == 1 and -1.0 - 1e-3 <= change[c] <= RING_CORE_CONTRAST + 0.05
    # the rim, between the core and the boundary, carries the lesion's own sign
    spacing = np.asarray(SPACING)
    offset = np.argwhere(mask > 0) - np.asarray(spec.centre)
    radius = np.linalg.norm(offset * spacing, axis=1) / (spec.diameter_mm / 2)
    rim = np.argwhere(mask > 0)[(radius > RING_CORE + 0.15) & (radius < 0.8)]
    inside = anatomy.brain[tuple(rim.T)] & (out[tuple(rim.T)] > 0)
    assert inside.sum() > 5 and np.median(change[tuple(rim[inside].T)]) > 0.5


def test_lesion_slice_is_the_cross_section():
    profile, offset = render_lesion(sphere(), SPACING)
    k = offset[1] + 4
    sl, off2 = lesion_slice(profile, offset, axis=1, index=k)
    np.testing.assert_array_equal(sl, profile[:, 4, :])
    assert off2 == (offset[0], offset[2])
    missed, _ = lesion_slice(profile, offset, axis=1, index=offset[1] - 1)
    assert missed.shape == sl.shape and missed.max() == 0


def test_paste_clips_to_the_target():
    target = np.zeros((5, 5))
    paste(target, np.ones((3, 3)), (-1, 3))
    expected = np.zeros((5, 5))
    expected[0:2, 3:5] = 1
    np.testing.assert_array_equal(target, expected)
    paste(target, np.full((2, 2), 0.5), (0, 3), np.maximum)
    np.testing.assert_array_equal(target, expected)
    paste(target, np.ones((2, 2)), (7, 7))  # entirely outside: nothing happens
    np.testing.assert_array_equal(target, expected)


def test_no_lesion_leaves_the_image_alone(anatomy):
    out, mask, specs = insert_lesions(anatomy.image, anatomy, np.random.default_rng(0), 0)
    np.testing.assert_array_equal(out, anatomy.image)
    assert mask.dtype == np.uint8 and mask.max() == 0 and specs == []
    assert out is not anatomy.image


def test_inserted_lesions_change_only_their_neighbourhood(anatomy):
    rng = np.random.default_rng(3)
    out, mask, specs = insert_lesions(anatomy.image, anatomy, rng, 4, diameter_mm=(8, 14), contrast=(0.4, 0.8))
    assert len(specs) == 4 and out.shape == mask.shape == anatomy.image.shape
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
    assert np.all(anatomy.brain[mask > 0])
    changed = out != anatomy.image
    assert np.all(changed[mask > 0])
    # nothing changes beyond the soft edge (2 edge widths) plus a voxel
    far = distance_transform_edt(mask == 0, sampling=SPACING) > 2 * max(s.edge_mm for s in specs) + 2.0
    assert not np.any(changed & far)
    assert not np.any(changed & ~anatomy.brain)
    # each lesion's sign shows at its centre
    for s in specs:
        c = tuple(np.rint(s.centre).astype(int))
        if mask[c]:
            assert np.sign(out[c] - anatomy.image[c]) == np.sign(s.contrast) or out[c] == 0
    assert out.min() >= 0


def test_insert_lesions_on_a_slice(anatomy):
    rng = np.random.default_rng(4)
    k = anatomy.brain.shape[2] // 2
    image = anatomy.image[:, :, k]
    out, mask, specs = insert_lesions(image, anatomy, rng, 3, plane=(2, k), diameter_mm=(8, 12))
    assert out.shape == mask.shape == image.shape and len(specs) == 3
    assert mask.sum() > 0 and np.all(anatomy.brain[:, :, k][mask > 0])
    assert np.all((out != image)[mask > 0])
    with pytest.raises(ValueError, match="shape"):
        insert_lesions(image, anatomy, rng, 1)  # a slice without its plane
