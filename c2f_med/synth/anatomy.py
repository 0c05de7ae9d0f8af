"""Random brain anatomy from the MNI152 template: warped T1 / T2 / FLAIR volumes with bias and noise.

The base is nilearn's MNI152 2009a template (skull-stripped T1, grey- and white-matter probability
maps, brain mask), which nilearn ships and reads offline. :func:`make_anatomy` deforms it with one
random affine + elastic warp (a single trilinear resampling of every tissue map) and renders one
contrast from the warped maps; :func:`finalise` adds the scanner's effects (bias field, Rician
noise) to a clean image, a whole volume or one slice of it.

Intensity convention: clean images are on a "white matter ~ 1.0" scale with background 0.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from scipy.ndimage import map_coordinates, zoom
from scipy.spatial.transform import Rotation

__all__ = ["CONTRASTS", "Anatomy", "Template", "finalise", "load_template", "make_anatomy"]

CONTRASTS = ("t1", "t2", "flair")

# Mean tissue intensities (white matter = 1) of the contrasts rendered from tissue maps;
# each case scales CSF and GM by a factor in [1 - TISSUE_JITTER, 1 + TISSUE_JITTER].
TISSUE_INTENSITY = {  # (csf, gm, wm)
    "t2": (2.0, 1.45, 1.0),  # CSF bright > GM > WM
    "flair": (0.25, 1.3, 1.0),  # CSF dark, GM > WM
}
TISSUE_JITTER = 0.1
T1_GAMMA = (0.85, 1.15)  # per-case gamma on the T1 template: changes its GM/WM/CSF contrast
CROP_MARGIN = 8  # voxels kept around the head's bounding box: room for the random warp

MAX_ROTATION_DEG = 10.0
SCALE_RANGE = (0.9, 1.1)
MAX_SHIFT_MM = 5.0
ELASTIC_GRID = 5  # control points per axis of the elastic displacement
ELASTIC_SIGMA_MM = (0.5, 2.5)  # std of the control-point displacements
BIAS_AMPLITUDE = (0.05, 0.18)  # bias = exp(a * p), p a smooth field with max |p| = 1: 0.84..1.2
NOISE_SIGMA = (0.01, 0.04)  # Rician noise std, white matter = 1


@dataclass(frozen=True)
class Template:
    """The MNI152 template cropped to the head, all maps ``X x Y x Z`` on one grid (read-only).

    Attributes:
        t1: float32 skull-stripped T1, scaled so the white-matter median is 1, background 0.
        gm, wm, csf: float32 tissue probabilities in [0, 1]; ``csf = clip(brain - gm - wm, 0, 1)``.
        brain: bool brain mask.
        head: bool head mask (T1 signal or brain; the template is skull-stripped, so close to brain).
        affine: float64 4 x 4 voxel-to-world (RAS, mm) of the cropped grid.
        t1_means: mean ``t1`` of CSF, GM and WM (voxels with probability > 0.9).
    """

    t1: NDArray[np.float32]
    gm: NDArray[np.float32]
    wm: NDArray[np.float32]
    csf: NDArray[np.float32]
    brain: NDArray[np.bool_]
    head: NDArray[np.bool_]
    affine: NDArray[np.float64]
    t1_means: tuple[float, float, float]

    @property
    def spacing(self) -> NDArray[np.float64]:
        """Voxel size (mm) along each array axis."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)


@dataclass
class Anatomy:
    """One random case's anatomy, every array ``X x Y x Z`` on the template's grid.

    Attributes:
        image: float32 clean tissue intensities (white matter ~ 1, background 0; no bias, no noise).
        bias: float32 smooth multiplicative bias field, about 0.84..1.2.
        noise_sigma: std of the Rician noise :func:`finalise` adds (white matter = 1).
        brain: bool brain mask (lesions are placed inside it).
        tissue_scale: the tissue intensity range, max - min of the mean CSF / GM / WM intensities;
            lesion contrasts are fractions of it.
        affine: float64 4 x 4 voxel-to-world (RAS, mm).
        contrast: "t1", "t2" or "flair".
    """

    image: NDArray[np.float32]
    bias: NDArray[np.float32]
    noise_sigma: float
    brain: NDArray[np.bool_]
    tissue_scale: float
    affine: NDArray[np.float64]
    contrast: str

    @property
    def spacing(self) -> NDArray[np.float64]:
        """Voxel size (mm) along each array axis."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)


def load_template(resolution_mm: float = 2.0) -> Template:
    """Read nilearn's MNI152 T1, GM, WM and brain mask at ``resolution_mm`` and crop them to the head.

    Args:
        resolution_mm: isotropic voxel size; nilearn resamples its 1 mm template, so it must be a
            whole number of millimetres.

    Returns:
        the cached :class:`Template` (its arrays are read-only).
    """
    if float(resolution_mm) != int(resolution_mm) or resolution_mm < 1:
        raise ValueError(f"resolution_mm must be a whole number of mm >= 1, got {resolution_mm}")
    return _load_template(int(resolution_mm))


@functools.lru_cache(maxsize=4)
def _load_template(res: int) -> Template:
    """:func:`load_template` for a whole number of mm, cached in memory and on disk.

    Importing nilearn and resampling its 1 mm template take seconds, so the cropped maps are kept in
    ``$C2F_MED_CACHE`` (default ``~/.cache/c2f_med``) as an ``.npz`` named by the resolution, the
    crop margin and nilearn's version; the first call writes it atomically, later processes read it.
    """
    from importlib.metadata import version

    from c2f_med.atomic import atomic_path

    cache = Path(os.environ.get("C2F_MED_CACHE", Path.home() / ".cache" / "c2f_med"))
    path = cache / f"mni152_{res}mm_margin{CROP_MARGIN}_nilearn{version('nilearn')}.npz"
    try:
        with np.load(path) as npz:
            maps = {k: npz[k] for k in npz.files}
    except (OSError, ValueError):
        maps = _read_template(res)
        try:
            with atomic_path(path) as tmp:
                np.savez(tmp, **maps)
        except OSError:  # no writable cache folder: work without it
            pass
    affine = maps.pop("affine")
    for a in (*maps.values(), affine):
        a.flags.writeable = False
    t1_means = tuple(float(np.mean(maps["t1"][maps[n] > 0.9])) for n in ("csf", "gm", "wm"))
    return Template(affine=affine, t1_means=t1_means, **maps)


def _read_template(res: int) -> dict[str, NDArray]:
    """nilearn's maps at ``res`` mm, cropped to the head: t1, gm, wm, csf, brain, head, affine."""
    from nilearn.datasets import (
        load_mni152_brain_mask,
        load_mni152_gm_template,
        load_mni152_template,
        load_mni152_wm_template,
    )

    t1_img = load_mni152_template(resolution=res)
    t1 = np.asarray(t1_img.dataobj, dtype=np.float32)
    gm = np.clip(np.asarray(load_mni152_gm_template(resolution=res).dataobj, dtype=np.float32), 0, 1)
    wm = np.clip(np.asarray(load_mni152_wm_template(resolution=res).dataobj, dtype=np.float32), 0, 1)
    brain = np.asarray(load_mni152_brain_mask(resolution=res).dataobj) > 0
    # tiny positive resampling residue fills the template's background: threshold at 1 % of the max
    head = (t1 > 0.01 * t1.max()) | brain

    # the head's bounding box plus the margin, zero-padded where it leaves the template's grid
    idx = np.argwhere(head)
    lo = idx.min(0) - CROP_MARGIN
    hi = idx.max(0) + 1 + CROP_MARGIN
    pad = [(max(0, -a), max(0, b - n)) for a, b, n in zip(lo, hi, head.shape)]
    box = tuple(slice(a + p[0], b + p[0]) for a, b, p in zip(lo, hi, pad))
    affine = t1_img.affine.astype(np.float64).copy()
    affine[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]

    t1, gm, wm, brain, head = (np.pad(a, pad)[box] for a in (t1, gm, wm, brain, head))
    t1 = np.where(head, t1, 0).astype(np.float32)
    t1 /= np.median(t1[wm > 0.9])
    gm, wm = gm * brain, wm * brain
    csf = np.clip(brain - gm - wm, 0, 1).astype(np.float32)
    return dict(t1=t1, gm=gm.astype(np.float32), wm=wm.astype(np.float32), csf=csf,
                brain=brain, head=head, affine=affine)


def make_anatomy(rng: np.random.Generator, contrast: str | None = None, resolution_mm: float = 2.0) -> Anatomy:
    """Draw one random anatomy: a warped template rendered in one MR contrast, with a bias field.

    The warp maps each output voxel ``x`` to template coordinates
    ``M (x - c) + c + t + u(x)`` (``M``: rotation up to 10 deg about each axis times a 0.9..1.1
    scale per axis, ``c``: the grid centre, ``t``: a shift up to 5 mm, ``u``: a smooth elastic
    displacement, cubic-interpolated from a 5 x 5 x 5 grid of Gaussian control points), and every
    tissue map is resampled once, trilinearly. Contrasts:

    * ``"t1"``: the template T1 raised to a random gamma in [0.85, 1.15] (white matter stays ~1);
    * ``"t2"`` / ``"flair"``: ``sum_t I_t p_t`` over CSF, GM, WM probabilities ``p_t``, with
      :data:`TISSUE_INTENSITY` ``I_t`` (CSF and GM jittered by +-10 % per case).

    Args:
        rng: the only source of randomness (same generator state, same anatomy).
        contrast: one of :data:`CONTRASTS`, or ``None`` for a random one.
        resolution_mm: template resolution (see :func:`load_template`).
    """
    if contrast is None:
        contrast = CONTRASTS[rng.integers(len(CONTRASTS))]
    if contrast not in CONTRASTS:
        raise ValueError(f"contrast must be one of {CONTRASTS}, got {contrast!r}")
    template = load_template(resolution_mm)
    spacing = template.spacing
    shape = template.t1.shape

    coords = _warp_coordinates(rng, shape, spacing)  # 3 x X x Y x Z template voxel coordinates
    # csf + gm + wm is the brain mask, so the tissue contrasts need not resample it
    names = ("t1", "brain") if contrast == "t1" else ("csf", "gm", "wm")
    warped = {n: _resample(getattr(template, n), coords) for n in names}
    brain = (warped["brain"] if contrast == "t1" else warped["csf"] + warped["gm"] + warped["wm"]) > 0.5

    if contrast == "t1":
        gamma = rng.uniform(*T1_GAMMA)
        image = np.power(warped["t1"], gamma, dtype=np.float32)
        means = [m**gamma for m in template.t1_means]
    else:
        csf_i, gm_i, wm_i = TISSUE_INTENSITY[contrast]
        jitter = rng.uniform(1 - TISSUE_JITTER, 1 + TISSUE_JITTER, 2)
        means = [csf_i * jitter[0], gm_i * jitter[1], wm_i]
        image = (means[0] * warped["csf"] + means[1] * warped["gm"] + means[2] * warped["wm"]).astype(np.float32)

    return Anatomy(
        image=image,
        bias=_bias_field(rng, shape),
        noise_sigma=float(rng.uniform(*NOISE_SIGMA)),
        brain=brain,
        tissue_scale=float(max(means) - min(means)),
        affine=np.array(template.affine),
        contrast=contrast,
    )


def finalise(
    image: NDArray[np.floating], bias: NDArray[np.floating], noise_sigma: float, rng: np.random.Generator
) -> NDArray[np.float32]:
    """Apply the scanner's effects to a clean image: ``|image * bias + n1 + i n2|`` (Rician noise).

    ``n1, n2 ~ N(0, noise_sigma^2)`` everywhere, background too; the magnitude is ``>= 0``. Works on
    any shape: a volume with ``anatomy.bias``, or a slice with the same slice of the bias
    (``finalise(img2d, anatomy.bias[:, :, k], anatomy.noise_sigma, rng)``).

    Args:
        image: clean intensities, any shape.
        bias: multiplicative field, the shape of ``image``.
        noise_sigma: noise std (white matter = 1).
        rng: source of the noise.

    Returns:
        float32 array, the shape of ``image``.
    """
    if np.shape(image) != np.shape(bias):
        raise ValueError(f"image shape {np.shape(image)} and bias shape {np.shape(bias)} differ")
    signal = np.asarray(image, dtype=np.float32) * np.asarray(bias, dtype=np.float32)
    real = signal + noise_sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    imag = noise_sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    return np.hypot(real, imag)


def _warp_coordinates(rng: np.random.Generator, shape: tuple[int, ...], spacing: NDArray) -> NDArray[np.float32]:
    """Template voxel coordinates (3 x X x Y x Z) sampled by each output voxel: affine + elastic."""
    angles = rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, 3)
    # rotation and scaling in mm, expressed in voxel units: S^-1 R diag(1/scale) S
    rot = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
    matrix = np.diag(1 / spacing) @ rot @ np.diag(1 / rng.uniform(*SCALE_RANGE, 3)) @ np.diag(spacing)
    shift = rng.uniform(-MAX_SHIFT_MM, MAX_SHIFT_MM, 3) / spacing
    centre = (np.asarray(shape) - 1) / 2

    sigma = rng.uniform(*ELASTIC_SIGMA_MM)
    control = rng.normal(0.0, 1.0, (3, ELASTIC_GRID, ELASTIC_GRID, ELASTIC_GRID))
    control *= (sigma / spacing)[:, None, None, None]
    wx, wy, wz = (_cubic_upsampling(ELASTIC_GRID, n) for n in shape)  # n x ELASTIC_GRID each

    axes = [np.arange(n, dtype=np.float32) - c for n, c in zip(shape, centre)]
    coords = np.empty((3, *shape), dtype=np.float32)
    for i in range(3):  # M (x - c) + c + t, built by broadcasting the three 1-D axes
        coords[i] = (matrix[i, 0] * axes[0][:, None, None] + matrix[i, 1] * axes[1][None, :, None]
                     + matrix[i, 2] * axes[2][None, None, :] + (centre[i] + shift[i]))
        coords[i] += np.einsum("ia,jb,kc,abc->ijk", wx, wy, wz, control[i], optimize=True)
    return coords


@functools.lru_cache(maxsize=16)
def _cubic_upsampling(n_in: int, n_out: int) -> NDArray[np.float32]:
    """``n_out x n_in`` matrix of ``scipy.ndimage.zoom`` (cubic spline) from ``n_in`` to ``n_out`` points.

    ``zoom`` is linear, so zooming each unit vector gives its columns; applied along each axis it
    upsamples a tensor-product field far faster than a 3-D ``zoom``.
    """
    eye = np.eye(n_in)
    cols = [zoom(e, n_out / n_in, order=3, mode="nearest", grid_mode=True) for e in eye]
    return np.stack(cols, axis=1).astype(np.float32)


def _resample(volume: NDArray, coords: NDArray[np.float32]) -> NDArray[np.float32]:
    """Trilinear sample of ``volume`` at ``coords`` (3 x X x Y x Z), 0 outside."""
    return map_coordinates(volume.astype(np.float32, copy=False), coords, order=1, mode="constant", cval=0.0)


def _bias_field(rng: np.random.Generator, shape: tuple[int, ...]) -> NDArray[np.float32]:
    """``exp(a p)``: ``p`` a random quadratic polynomial of the normalised coordinates, max |p| = 1."""
    x, y, z = (np.linspace(-1, 1, n, dtype=np.float32) for n in shape)
    x, y, z = x[:, None, None], y[None, :, None], z[None, None, :]
    terms = (x, y, z, x * x, y * y, z * z, x * y, x * z, y * z)
    coef = rng.normal(0.0, 1.0, len(terms)).astype(np.float32)
    p = sum(c * t for c, t in zip(coef, terms))
    p = p - p.mean()
    p /= np.abs(p).max()
    return np.exp(rng.uniform(*BIAS_AMPLITUDE) * p).astype(np.float32)
