"""Soft-edged synthetic lesions: sample, render in a small box, insert into a volume or one slice.

A lesion is a :class:`LesionSpec` (plain numbers, JSON-able with ``dataclasses.asdict``).
:func:`render_lesion` turns it into a *profile*: float32 values in [0, 1] on the voxels of its
bounding box (1 in the core, 0.5 on the nominal boundary, a logistic fall-off of width
``edge_mm`` across it, exactly 0 beyond twice that). :func:`insert_lesions` adds
``contrast * tissue_scale * profile`` to a clean image, inside the brain, and returns the mask

    mask = (max over the case's lesions of profile) >= 0.5

i.e. the voxels where a lesion changed the intensity by at least half its nominal contrast (a
lesion of a few mm may cover no voxel centre at that level and leave the mask empty). A
profile is exactly 0 farther than ``2 * edge_mm`` outside the nominal boundary, so voxels beyond
that never change.

Shapes: the generator draws from :data:`SHAPES` (soft blobs). :data:`HELD_OUT_SHAPES` are drawn
only when asked for (``shapes=...``; ``c2f-med synth --shapes``): a soft-edged ``cuboid`` (flat faces,
corners) and a ``ring`` (a rim of the lesion's contrast around a core of the opposite sign, as a
rim-enhancing lesion), so a model trained on the blobs can be checked on lesions it never saw drawn.

All of it works per slice too: :func:`insert_lesions` with ``plane=(axis, index)`` takes one 2-D
slice of the anatomy's grid and inserts the cross-sections of 3-D lesions that cross it
(:func:`lesion_slice`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
from numpy.typing import NDArray
from scipy.ndimage import gaussian_filter
from scipy.spatial.transform import Rotation

__all__ = [
    "HELD_OUT_SHAPES",
    "SHAPES",
    "LesionSpec",
    "check_shapes",
    "insert_lesions",
    "lesion_slice",
    "paste",
    "render_lesion",
    "sample_lesion",
]

SHAPES = ("ellipsoid", "lobulated", "irregular")  # what the generator draws by default (training, demo data)
HELD_OUT_SHAPES = ("cuboid", "ring")  # drawn only when asked for: robustness checks
RING_CORE = 0.55  # a ring's core: this fraction of each semi-axis ...
RING_CORE_CONTRAST = -0.6  # ... where the intensity change is this fraction of the lesion's contrast
AXIS_RATIO = (0.7, 1.3)  # semi-axis ratios before normalising their geometric mean to 1
EDGE_MM = (0.5, 3.0)  # 10-90 % width of the soft edge
TEXTURE = (0.0, 0.3)  # depth of the internal texture: profile *= 1 - texture * u, u in [0, 1]
CORE_FRACTION = 0.5  # the core (this fraction of each semi-axis) must lie inside the brain
_LOGISTIC_STEPS = 4.4  # a logistic of scale s rises from 10 % to 90 % over 4.4 s
_CUTOFF = 2.0  # profile set to 0 beyond CUTOFF * edge_mm outside the boundary


class HasBrain(Protocol):
    """What :func:`insert_lesions` needs of an anatomy (an :class:`~c2f_med.synth.anatomy.Anatomy`)."""

    brain: NDArray[np.bool_]
    affine: NDArray[np.float64]
    tissue_scale: float


@dataclass(frozen=True)
class LesionSpec:
    """One lesion; every field is a plain number so ``dataclasses.asdict`` gives JSON.

    Attributes:
        centre: voxel coordinates (float) of the lesion centre on the image grid.
        diameter_mm: diameter of the sphere with the main ellipsoid's volume.
        shape: "ellipsoid", "lobulated" (2-5 overlapping ellipsoids) or "irregular" (ellipsoid
            with its boundary perturbed by smooth low-frequency noise); held out from training:
            "cuboid" (a box with these semi-axes) or "ring" (ellipsoid, its core of the opposite sign).
        axes: semi-axis ratios (geometric mean 1): semi-axes are ``diameter_mm / 2 * axes``.
        rotation: rotation of the axes, "xyz" Euler angles in degrees.
        contrast: signed intensity change as a fraction of the anatomy's tissue_scale
            (+ hyperintense, - hypointense).
        edge_mm: 10-90 % width of the soft edge.
        texture: depth of the internal texture, 0 (flat) to 0.3.
        seed: seeds the shape's details (lobes, boundary noise, texture).
    """

    centre: tuple[float, float, float]
    diameter_mm: float
    shape: str
    axes: tuple[float, float, float]
    rotation: tuple[float, float, float]
    contrast: float
    edge_mm: float
    texture: float
    seed: int

    @property
    def reach_mm(self) -> float:
        """Largest distance (mm) from the centre at which the profile can be non-zero."""
        if self.shape == "cuboid":  # its distance is L-inf-like: the corners reach sqrt(3) times as far
            return 3**0.5 * (self.diameter_mm / 2 * max(self.axes) + _CUTOFF * self.edge_mm)
        extent = {"lobulated": 1.5, "irregular": 1.35}.get(self.shape, 1.0)
        return self.diameter_mm / 2 * max(self.axes) * extent + _CUTOFF * self.edge_mm


def check_shapes(shapes: tuple[str, ...]) -> None:
    """Raise ``ValueError`` unless ``shapes`` is a non-empty subset of :data:`SHAPES` + :data:`HELD_OUT_SHAPES`."""
    if not shapes or set(shapes) - set(SHAPES + HELD_OUT_SHAPES):
        raise ValueError(f"shapes must be among {', '.join(SHAPES + HELD_OUT_SHAPES)}, got {', '.join(shapes)}")


def sample_lesion(
    rng: np.random.Generator,
    brain: NDArray[np.bool_],
    affine: NDArray[np.floating],
    *,
    diameter_mm: tuple[float, float] = (3.0, 20.0),
    contrast: tuple[float, float] = (0.15, 0.8),
    plane: tuple[int, int] | None = None,
    shapes: tuple[str, ...] = SHAPES,
    max_tries: int = 200,
) -> LesionSpec:
    """Draw a random lesion whose core lies inside ``brain``.

    Diameter and contrast magnitude are uniform in the given ranges, the contrast's sign is
    random, the shape uniform over :data:`SHAPES`. The centre is uniform in the brain's bounding
    box, accepted when its voxel and the six points at half of each semi-axis (the core's tips)
    are in the brain; after ``max_tries`` the first centre inside the brain is kept.

    Args:
        rng: source of randomness.
        brain: bool ``X x Y x Z`` brain mask.
        affine: its 4 x 4 voxel-to-world matrix (only the voxel sizes are used).
        diameter_mm: (min, max) diameter.
        contrast: (min, max) contrast magnitude, fractions of the tissue range.
        plane: ``(axis, index)``: the lesion's core must cross that slice (for 2-D use).
        shapes: drawn uniformly from these (:data:`SHAPES` and / or :data:`HELD_OUT_SHAPES`).
        max_tries: rejection-sampling budget for the centre.
    """
    check_shapes(shapes)
    spacing = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    shape = shapes[rng.integers(len(shapes))]
    diameter = float(rng.uniform(*diameter_mm))
    axes = rng.uniform(*AXIS_RATIO, 3)
    axes = axes / np.prod(axes) ** (1 / 3)
    rotation = rng.uniform(-180.0, 180.0, 3)
    magnitude = float(rng.uniform(*contrast))
    sign = 1.0 if rng.random() < 0.5 else -1.0

    rot = Rotation.from_euler("xyz", rotation, degrees=True).as_matrix()
    # the six core points, relative to the centre, in voxels
    core = (rot @ (np.diag(axes) * diameter / 2 * CORE_FRACTION)).T / spacing
    core = np.concatenate([core, -core])  # 6 x 3

    # rejection sampling in the brain's bounding box (the slice's, with ``plane``)
    lo, hi = _bounding_box(brain if plane is None else np.take(brain, plane[1], axis=plane[0]))
    lo, hi = lo - 0.5, hi + 0.5  # voxel edges
    if plane is not None:  # the centre may leave the slice by up to the core's half-extent
        axis, index = plane
        half = diameter / 2 * CORE_FRACTION * axes.min() / spacing[axis]
        lo, hi = np.insert(lo, axis, index - half), np.insert(hi, axis, index + half)
    upper = np.asarray(brain.shape) - 1
    fallback = None
    for _ in range(max_tries):
        centre = rng.uniform(lo, hi)
        points = np.clip(np.rint(centre + np.vstack([np.zeros(3), core])), 0, upper).astype(int)
        inside = brain[tuple(points.T)]
        if inside.all():
            break
        if inside[0] and fallback is None:
            fallback = centre
    else:
        if fallback is None:
            raise ValueError(f"could not place a lesion in the brain in {max_tries} tries")
        centre = fallback
    return LesionSpec(
        centre=tuple(float(c) for c in centre),
        diameter_mm=diameter,
        shape=shape,
        axes=tuple(float(a) for a in axes),
        rotation=tuple(float(r) for r in rotation),
        contrast=sign * magnitude,
        edge_mm=float(rng.uniform(*EDGE_MM)),
        texture=float(rng.uniform(*TEXTURE)),
        seed=int(rng.integers(2**31)),
    )


def render_lesion(spec: LesionSpec, spacing_mm) -> tuple[NDArray[np.float32], tuple[int, ...]]:
    """The lesion's profile in its bounding box.

    The boundary of one ellipsoid is ``rho = 1`` with ``rho = |diag(1/a) R^T x|`` (``x`` in mm from
    its centre); the signed distance to it along the ray from the centre is
    ``d = |x| (1 - 1/rho)`` and the profile ``1 / (1 + exp(d / s))`` with ``s = edge_mm / 4.4``.
    Lobulated: the maximum of 2-5 such profiles (the main ellipsoid and lobes of 0.4-0.7 its size
    whose centres lie at 0.4-0.8 of its semi-axes). Irregular: the boundary's radius times
    ``1 + sum_j w_j sin(f_j u.v_j + phi_j)`` (``u`` the unit direction, 4 random low frequencies,
    a change of at most 15-30 %). Cuboid: ``d = max_j(|q_j| - a_j)`` in the box frame (exact
    inside and across the faces). Ring: the ellipsoid's profile (its extent: the mask). Texture:
    ``profile *= 1 - texture * n`` with ``n`` smoothed uniform noise rescaled to [0, 1].

    Args:
        spec: the lesion.
        spacing_mm: voxel size (3 floats) of the grid it is rendered on.

    Returns:
        ``(profile, offset)``: float32 ``bx x by x bz`` values in [0, 1] and the grid index of the
        box's first voxel (it may lie outside the image; :func:`paste` clips).
    """
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    centre = np.asarray(spec.centre, dtype=np.float64)
    reach = spec.reach_mm / spacing
    lo = np.floor(centre - reach).astype(int)
    hi = np.ceil(centre + reach).astype(int) + 1
    # mm offsets of the box's voxels from the centre, per axis (broadcastable 3-D grids)
    x, y, z = (((np.arange(a, b) - c) * s).astype(np.float32) for a, b, c, s in zip(lo, hi, centre, spacing))
    pts = (x[:, None, None], y[None, :, None], z[None, None, :])

    rng = np.random.default_rng(spec.seed)
    rot = Rotation.from_euler("xyz", spec.rotation, degrees=True).as_matrix()
    semi = np.asarray(spec.axes) * spec.diameter_mm / 2
    scale = spec.edge_mm / _LOGISTIC_STEPS

    if spec.shape == "lobulated":
        n_lobes = int(rng.integers(1, 5))
        dirs = rng.normal(size=(n_lobes, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        shifts = (rot @ (semi * dirs * rng.uniform(0.4, 0.8, (n_lobes, 1))).T).T
        sizes = rng.uniform(0.4, 0.7, n_lobes)
        dist = _ellipsoid_distance(pts, np.zeros(3), rot, semi)
        for shift, size in zip(shifts, sizes):
            dist = np.minimum(dist, _ellipsoid_distance(pts, shift, rot, semi * size))
    elif spec.shape == "cuboid":
        dist = _box_distance(pts, rot, semi)
    else:  # ellipsoid, irregular, ring (whose core insert_lesions adds)
        perturb = _boundary_noise(rng) if spec.shape == "irregular" else None
        dist = _ellipsoid_distance(pts, np.zeros(3), rot, semi, perturb)

    profile = 0.5 * (1.0 - np.tanh(dist / (2 * scale)))  # = logistic(-dist / scale), overflow-free
    profile[dist > _CUTOFF * spec.edge_mm] = 0.0
    if spec.texture > 0:
        noise = gaussian_filter(rng.uniform(size=profile.shape), sigma=1.0)
        noise = (noise - noise.min()) / max(float(np.ptp(noise)), 1e-6)
        profile *= 1.0 - spec.texture * noise
    return profile.astype(np.float32), tuple(int(v) for v in lo)


def lesion_slice(
    profile: NDArray[np.float32], offset: tuple[int, ...], axis: int, index: int
) -> tuple[NDArray[np.float32], tuple[int, ...]]:
    """Cross-section of a rendered 3-D lesion at grid slice ``index`` along ``axis``.

    Returns:
        ``(profile2d, offset2d)`` for the slice's grid (the other two axes, in order); an all-zero
        ``profile2d`` when the slice misses the lesion's box.
    """
    local = index - offset[axis]
    offset2d = tuple(o for i, o in enumerate(offset) if i != axis)
    if 0 <= local < profile.shape[axis]:
        return np.take(profile, local, axis=axis), offset2d
    return np.zeros([n for i, n in enumerate(profile.shape) if i != axis], np.float32), offset2d


def paste(target: NDArray, patch: NDArray, offset: tuple[int, ...], op=np.add) -> None:
    """In place ``target[box] = op(target[box], patch[part])``.

    ``patch`` is placed at ``offset`` and clipped to ``target``.
    """
    lo = np.maximum(offset, 0)
    hi = np.minimum(np.add(offset, patch.shape), target.shape)
    if np.any(hi <= lo):
        return
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    part = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, offset))
    target[box] = op(target[box], patch[part])


def insert_lesions(
    image: NDArray[np.floating],
    anatomy: HasBrain,
    rng: np.random.Generator,
    n: int,
    *,
    plane: tuple[int, int] | None = None,
    diameter_mm: tuple[float, float] = (3.0, 20.0),
    contrast: tuple[float, float] = (0.15, 0.8),
    shapes: tuple[str, ...] = SHAPES,
) -> tuple[NDArray[np.float32], NDArray[np.uint8], list[LesionSpec]]:
    """Add ``n`` random lesions to a clean image.

    ``out = max(image + sum_l contrast_l * tissue_scale * profile_l * brain, 0)`` and
    ``mask = max_l (profile_l * brain) >= 0.5`` (see the module docstring).

    Args:
        image: clean intensities: ``X x Y x Z`` on the anatomy's grid, or, with ``plane``, the
            2-D slice ``np.take(volume, index, axis)`` of it.
        anatomy: an :class:`~c2f_med.synth.anatomy.Anatomy` (or anything with ``brain``,
            ``affine`` and ``tissue_scale``).
        rng: source of randomness.
        n: number of lesions (0 gives the image unchanged and an empty mask).
        plane: ``(axis, index)`` when ``image`` is one slice: lesions are 3-D lesions whose core
            crosses that slice, inserted as their cross-sections.
        diameter_mm, contrast, shapes: passed to :func:`sample_lesion`. A ring's core (the same
            ellipsoid at :data:`RING_CORE` of its size) adds ``(RING_CORE_CONTRAST - 1) * contrast`` on
            top, so the core changes the intensity by ``RING_CORE_CONTRAST * contrast``.

    Returns:
        ``(image_with_lesions float32, mask uint8 0/1, specs)``, image and mask of ``image``'s shape.
    """
    brain = anatomy.brain if plane is None else np.take(anatomy.brain, plane[1], axis=plane[0])
    if np.shape(image) != brain.shape:
        raise ValueError(f"image shape {np.shape(image)} does not match the brain mask's {brain.shape}")
    spacing = np.linalg.norm(np.asarray(anatomy.affine)[:3, :3], axis=0)
    delta = np.zeros(brain.shape, np.float32)
    union = np.zeros(brain.shape, np.float32)
    specs = []
    for _ in range(n):
        spec = sample_lesion(
            rng, anatomy.brain, anatomy.affine, diameter_mm=diameter_mm, contrast=contrast, plane=plane, shapes=shapes
        )
        parts = [(spec, 1.0)]
        if spec.shape == "ring":
            core = replace(
                spec,
                shape="ellipsoid",
                diameter_mm=spec.diameter_mm * RING_CORE,
                edge_mm=min(spec.edge_mm, 1.0),
                texture=0.0,
            )
            parts.append((core, RING_CORE_CONTRAST - 1.0))
        for k, (part, weight) in enumerate(parts):
            profile, offset = render_lesion(part, spacing)
            if plane is not None:
                profile, offset = lesion_slice(profile, offset, *plane)
            paste(delta, weight * spec.contrast * anatomy.tissue_scale * profile, offset)
            if k == 0:  # the lesion's extent; a ring's core lies inside it
                paste(union, profile, offset, np.maximum)
        specs.append(spec)
    out = np.asarray(image, dtype=np.float32).copy()
    if n:
        out += delta * brain
        np.maximum(out, 0, out=out)
    mask = ((union * brain) >= 0.5).astype(np.uint8)
    return out, mask, specs


def _bounding_box(mask: NDArray[np.bool_]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """First and last index of ``mask``'s true voxels along each axis."""
    if not mask.any():
        raise ValueError("no brain voxel to place a lesion in")
    bounds = [np.flatnonzero(mask.any(axis=tuple(j for j in range(mask.ndim) if j != i))) for i in range(mask.ndim)]
    return np.array([b[0] for b in bounds]), np.array([b[-1] for b in bounds])


def _box_distance(pts, rot, semi) -> NDArray[np.float32]:
    """Signed distance (mm) ``max_j(|q_j| - a_j)`` to a box of semi-axes ``semi`` rotated by ``rot``
    (``q`` the box-frame coordinates): exact inside and across the faces, a lower bound near corners."""
    q = [sum(np.float32(rot[i, j]) * pts[i] for i in range(3)) for j in range(3)]
    return np.maximum(np.maximum(np.abs(q[0]) - semi[0], np.abs(q[1]) - semi[1]), np.abs(q[2]) - semi[2])


def _ellipsoid_distance(pts, centre, rot, semi, perturb=None) -> NDArray[np.float32]:
    """Approximate signed distance (mm) to an ellipsoid's surface, along the ray from its centre.

    ``pts``: three broadcastable mm-coordinate grids; ``rot``: 3 x 3 rotation; ``semi``: semi-axes
    (mm); ``perturb``: optional function of the unit direction (ellipsoid frame) scaling the
    boundary's radius. The boundary lies at radius ``r / rho`` along each ray (``min(semi)`` at
    the centre itself, where the direction is undefined).
    """
    # coordinates in the ellipsoid frame: q_j = sum_i R_ij (p_i - c_i)
    rel = [p - np.float32(c) for p, c in zip(pts, centre)]
    q = [sum(np.float32(rot[i, j]) * rel[i] for i in range(3)) for j in range(3)]
    r = np.sqrt(q[0] ** 2 + q[1] ** 2 + q[2] ** 2)
    rho = np.sqrt(sum((qj / np.float32(a)) ** 2 for qj, a in zip(q, semi)))
    safe = np.maximum(r, 1e-6)
    boundary = np.where(r > 1e-6, safe / np.maximum(rho, 1e-12), np.float32(min(semi)))
    if perturb is not None:
        boundary = boundary * perturb([qj / safe for qj in q])
    return r - boundary


def _boundary_noise(rng: np.random.Generator):
    """Random smooth radial factor ``1 + sum_j w_j sin(f_j u.v_j + phi_j)`` of a unit direction ``u``."""
    v = rng.normal(size=(4, 3)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    freq = rng.uniform(2.0, 4.0, 4).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, 4).astype(np.float32)
    weight = rng.uniform(-1, 1, 4)
    weight = (weight * rng.uniform(0.15, 0.3) / np.abs(weight).sum()).astype(np.float32)  # |change| <= 15-30 %

    def factor(u):
        return 1.0 + sum(
            w * np.sin(f * (vi[0] * u[0] + vi[1] * u[1] + vi[2] * u[2]) + p)
            for w, f, vi, p in zip(weight, freq, v, phase)
        )

    return factor
