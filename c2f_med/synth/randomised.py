"""Domain-randomised scans: random tissue contrasts, scanner effects and lesion families.

In the spirit of SynthSeg (Billot et al., Medical Image Analysis 2023), a case's look is drawn at
random instead of imitating one MR sequence, so that a classifier trained on many looks meets a
new one as just another draw:

* **Tissue intensities** (:func:`make_random_anatomy`): the warped MNI152 tissue maps (the same
  random warp as :func:`~c2f_med.synth.anatomy.make_anatomy`) rendered with a random mean per tissue
  (CSF, GM, WM uniform in [0.05, 1], at least 0.08 apart), a smooth random field per tissue
  (+-5-15 %) and per-voxel tissue noise. The *regime* of a case is the order of its tissue means,
  e.g. ``"wm>gm>csf"`` (T1-like); :data:`HELD_OUT_REGIME` is never drawn for training.
* **Scanner** (:class:`Scanner`): bias field of random strength, Rician noise, in-plane resolution
  1-2.5 mm and slice thickness up to 5 mm (a Gaussian blur of the 2 mm template to that resolution;
  the dataset writer also resamples onto that grid).
* **Lesion families** (:data:`FAMILIES`), each a randomised generator whose intensities are set
  against the **local** surrounding tissue: a lesion part of relative contrast ``c`` replaces the
  clean intensity by ``(1 + c) * local`` where its profile is 1 (``local``: the mean clean intensity of
  brain voxels in a shell around the lesion, out of its reach), blending with the tissue across the
  soft edge: ``image += profile * ((1 + c) * local - image)``. ``c = 0.2`` is 20 % brighter than what
  surrounds it, whatever the tissue.

  - ``homogeneous``: hyper / hypo, 3-20 mm, ``|c|`` 0.15-0.8, ellipsoid, lobulated or irregular;
  - ``ring``: a rim (``|c|`` 0.25-0.8) around a core of another contrast (``c * k``, ``k`` in [-0.5, 0.5]);
  - ``infiltrative``: 10-30 mm, low contrast (``|c|`` 0.08-0.3), wide soft edge (3-6 mm), irregular;
  - ``necrotic``: 10-30 mm, ``|c|`` 0.3-0.8, deep internal texture (0.5-0.9);
  - ``cystic`` (held out): a bright rim (``c`` 0.25-0.8) around a dark fluid core (``c`` -0.9 to -0.55);
  - ``satellites`` (held out): 3-7 small (2.5-6 mm) lesions of one sign scattered within 15 mm.

  :data:`TRAINING_FAMILIES` never produce a cystic core: a ring's core is at least -0.4.

The mask is where the union of the lesions' outer profiles is >= 0.5, as in
:mod:`~c2f_med.synth.lesions`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from scipy.ndimage import gaussian_filter, zoom

from c2f_med.synth.anatomy import Anatomy, _bias_field, _resample, _warp_coordinates, finalise, load_template
from c2f_med.synth.lesions import LesionSpec, paste, render_lesion, sample_lesion

__all__ = [
    "FAMILIES",
    "HELD_OUT_FAMILIES",
    "HELD_OUT_REGIME",
    "REGIMES",
    "TRAINING_FAMILIES",
    "TRAINING_REGIMES",
    "RandomLesion",
    "Scanner",
    "insert_random_lesions",
    "make_random_anatomy",
    "regime_of",
    "sample_random_lesion",
    "sample_scanner",
    "synth_randomised_case",
    "write_randomised_dataset",
]

TISSUES = ("csf", "gm", "wm")
REGIMES = tuple(f"{a}>{b}>{c}" for a, b, c in
                [("wm", "gm", "csf"), ("csf", "gm", "wm"), ("gm", "wm", "csf"), ("gm", "csf", "wm"),
                 ("wm", "csf", "gm"), ("csf", "wm", "gm")])
HELD_OUT_REGIME = "csf>wm>gm"  # bright fluid, dark cortex: no usual sequence, never drawn for training
TRAINING_REGIMES = tuple(r for r in REGIMES if r != HELD_OUT_REGIME)
FAMILIES = ("homogeneous", "ring", "infiltrative", "necrotic", "cystic", "satellites")
HELD_OUT_FAMILIES = ("cystic", "satellites")
TRAINING_FAMILIES = tuple(f for f in FAMILIES if f not in HELD_OUT_FAMILIES)

TISSUE_MEAN = (0.05, 1.0)
MIN_TISSUE_GAP = 0.08
TISSUE_FIELD = (0.05, 0.15)  # amplitude of each tissue's smooth multiplicative field
TISSUE_NOISE = (0.0, 0.05)  # per-voxel tissue noise std, a fraction of the tissue's mean
BIAS_AMPLITUDE = (0.0, 0.35)
NOISE_SIGMA = (0.005, 0.05)  # Rician noise std, a fraction of the brightest tissue mean
IN_PLANE_MM = (1.0, 2.5)
THICKNESS_MM = (1.0, 5.0)  # drawn in [in-plane, 5]
RING_CORE_K = (-0.5, 0.5)
SHELL_MM = 4.0  # width of the local-tissue shell around a lesion's reach


@dataclass(frozen=True)
class Scanner:
    """The resolution one case is acquired at (its bias field and noise are the anatomy's)."""

    in_plane_mm: float
    thickness_mm: float

    def blur_sigma(self, spacing: NDArray) -> NDArray[np.float64]:
        """Gaussian sigma (voxels of ``spacing``) turning ``spacing`` into this resolution (FWHM rule);
        0 where the acquisition is finer than the grid (axes 0, 1 in-plane, 2 through-plane)."""
        target = np.array([self.in_plane_mm, self.in_plane_mm, self.thickness_mm])
        fwhm = np.sqrt(np.maximum(target**2 - np.asarray(spacing) ** 2, 0.0))
        return fwhm / 2.355 / np.asarray(spacing)


@dataclass(frozen=True)
class RandomLesion:
    """One lesion of a family: its parts, composited in order against one local tissue intensity.

    Attributes:
        family: one of :data:`FAMILIES`.
        parts: ``(spec, c)`` pairs; each part replaces the intensity by ``(1 + c) * local`` under its
            profile. ``outer`` parts make the mask (a ring's core does not add to it).
        outer: per part, whether it is part of the lesion's extent.
    """

    family: str
    parts: tuple[tuple[LesionSpec, float], ...]
    outer: tuple[bool, ...] = field(default=())

    def as_dict(self) -> dict:
        """JSON-able record: family, and each part's spec fields with its relative contrast."""
        return {"family": self.family,
                "parts": [{**dataclasses.asdict(s), "relative_contrast": c, "outer": o}
                          for (s, c), o in zip(self.parts, self.outer)]}


def regime_of(means) -> str:
    """``(csf, gm, wm)`` means -> their order, brightest first, e.g. ``"wm>gm>csf"``."""
    order = np.argsort(-np.asarray(means, dtype=np.float64), kind="stable")
    return ">".join(TISSUES[i] for i in order)


def sample_tissue_means(rng: np.random.Generator, regimes: tuple[str, ...] = TRAINING_REGIMES) -> NDArray:
    """Random ``(csf, gm, wm)`` means in :data:`TISSUE_MEAN`, pairwise at least :data:`MIN_TISSUE_GAP`
    apart, whose order is one of ``regimes`` (a regime is drawn first, uniformly)."""
    check_names(regimes, REGIMES, "regimes")
    regime = regimes[rng.integers(len(regimes))].split(">")
    while True:
        values = np.sort(rng.uniform(*TISSUE_MEAN, 3))[::-1]
        if np.all(-np.diff(values) >= MIN_TISSUE_GAP):
            return np.array([values[regime.index(t)] for t in TISSUES])


def check_names(names: tuple[str, ...], allowed: tuple[str, ...], what: str) -> None:
    """Raise ``ValueError`` unless ``names`` is a non-empty subset of ``allowed``."""
    if not names or set(names) - set(allowed):
        raise ValueError(f"{what} must be among {', '.join(allowed)}, got {', '.join(names) or 'nothing'}")


def sample_scanner(rng: np.random.Generator) -> Scanner:
    """Random resolution: in-plane in :data:`IN_PLANE_MM`, thickness in [in-plane, 5 mm]."""
    in_plane = float(rng.uniform(*IN_PLANE_MM))
    return Scanner(in_plane_mm=in_plane, thickness_mm=float(rng.uniform(max(in_plane, THICKNESS_MM[0]),
                                                                        THICKNESS_MM[1])))


def make_random_anatomy(rng: np.random.Generator, regimes: tuple[str, ...] = TRAINING_REGIMES,
                        resolution_mm: float = 2.0) -> Anatomy:
    """A warped MNI152 anatomy rendered with random tissue intensities (module docstring).

    Returns an :class:`~c2f_med.synth.anatomy.Anatomy` whose ``contrast`` is ``"random:<regime>"``,
    ``tissue_scale`` the range of the tissue means, ``bias`` of strength :data:`BIAS_AMPLITUDE` and
    ``noise_sigma`` in :data:`NOISE_SIGMA` times the brightest tissue mean (the resolution is
    :func:`sample_scanner`'s, applied by :func:`degrade`).
    """
    template = load_template(resolution_mm)
    shape = template.t1.shape
    coords = _warp_coordinates(rng, shape, template.spacing)
    maps = [_resample(getattr(template, t), coords) for t in TISSUES]
    brain = (maps[0] + maps[1] + maps[2]) > 0.5
    means = sample_tissue_means(rng, regimes)
    image = np.zeros(shape, np.float32)
    for prob, mean in zip(maps, means):
        tissue = mean * np.exp(rng.uniform(*TISSUE_FIELD) * _smooth_field(rng, shape))
        tissue = tissue * (1 + rng.uniform(*TISSUE_NOISE) * rng.standard_normal(shape, dtype=np.float32))
        image += prob * tissue.astype(np.float32)
    bias = np.exp(rng.uniform(*BIAS_AMPLITUDE) * _smooth_field(rng, shape)).astype(np.float32)
    return Anatomy(image=np.maximum(image, 0), bias=bias, noise_sigma=float(rng.uniform(*NOISE_SIGMA) * means.max()),
                   brain=brain, tissue_scale=float(means.max() - means.min()), affine=np.array(template.affine),
                   contrast=f"random:{regime_of(means)}")


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...]) -> NDArray[np.float32]:
    """A random smooth field (quadratic polynomial of the coordinates) with max ``|p| = 1``."""
    p = np.log(_bias_field(rng, shape))
    return (p / max(float(np.abs(p).max()), 1e-6)).astype(np.float32)


def degrade(image: NDArray, scanner: Scanner, spacing: NDArray) -> NDArray[np.float32]:
    """Blur a clean image on a grid of ``spacing`` mm to the scanner's resolution (:meth:`Scanner.blur_sigma`)."""
    sigma = scanner.blur_sigma(spacing)
    if not np.any(sigma > 0.05):
        return np.asarray(image, np.float32)
    return gaussian_filter(np.asarray(image, np.float32), sigma=sigma, mode="constant", truncate=3.0)


def sample_random_lesion(rng: np.random.Generator, brain: NDArray[np.bool_], affine: NDArray,
                         family: str) -> RandomLesion:
    """One lesion of ``family`` (ranges in the module docstring), its core inside ``brain``."""
    check_names((family,), FAMILIES, "family")
    sign = 1.0 if rng.random() < 0.5 else -1.0

    def place(diameter, shapes=("ellipsoid", "lobulated", "irregular")):
        return sample_lesion(rng, brain, affine, diameter_mm=diameter, contrast=(0.5, 0.5), shapes=shapes)

    if family == "homogeneous":
        spec = replace(place((3.0, 20.0)), texture=float(rng.uniform(0, 0.15)))
        c = sign * rng.uniform(0.15, 0.8)
        return RandomLesion(family, ((spec, c),), (True,))
    if family in ("ring", "cystic"):
        spec = replace(place((8.0, 25.0), ("ellipsoid", "lobulated")), texture=float(rng.uniform(0, 0.1)))
        frac = rng.uniform(0.45, 0.75) if family == "ring" else rng.uniform(0.6, 0.8)
        core = replace(spec, shape="ellipsoid", diameter_mm=spec.diameter_mm * frac, edge_mm=min(spec.edge_mm, 1.0),
                       texture=0.0)
        if family == "ring":
            rim = sign * rng.uniform(0.25, 0.8)
            inner = rim * rng.uniform(*RING_CORE_K)
        else:
            rim, inner = rng.uniform(0.25, 0.8), rng.uniform(-0.9, -0.55)
        return RandomLesion(family, ((spec, float(rim)), (core, float(inner))), (True, False))
    if family == "infiltrative":
        spec = replace(place((10.0, 30.0), ("irregular",)), edge_mm=float(rng.uniform(3.0, 6.0)),
                       texture=float(rng.uniform(0, 0.2)))
        return RandomLesion(family, ((spec, float(sign * rng.uniform(0.08, 0.3))),), (True,))
    if family == "necrotic":
        spec = replace(place((10.0, 30.0), ("lobulated", "irregular")), texture=float(rng.uniform(0.5, 0.9)))
        return RandomLesion(family, ((spec, float(sign * rng.uniform(0.3, 0.8))),), (True,))
    # satellites: small lesions scattered around a centre that lies in the brain
    anchor = place((6.0, 12.0))
    spacing = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    c = float(sign * rng.uniform(0.3, 0.8))
    parts = []
    for _ in range(int(rng.integers(3, 8))):
        offset = rng.normal(size=3)
        offset *= rng.uniform(0, 15.0) / max(np.linalg.norm(offset), 1e-6)
        centre = np.asarray(anchor.centre) + offset / spacing
        idx = np.clip(np.rint(centre).astype(int), 0, np.asarray(brain.shape) - 1)
        if not brain[tuple(idx)]:
            continue
        parts.append((replace(anchor, centre=tuple(float(v) for v in centre), diameter_mm=float(rng.uniform(2.5, 6.0)),
                              shape="ellipsoid", edge_mm=float(rng.uniform(0.5, 1.5)), texture=0.0,
                              seed=int(rng.integers(2**31))), c))
    if not parts:
        parts = [(replace(anchor, diameter_mm=float(rng.uniform(2.5, 6.0)), shape="ellipsoid"), c)]
    return RandomLesion(family, tuple(parts), (True,) * len(parts))


def local_intensity(image: NDArray, brain: NDArray[np.bool_], lesion: RandomLesion, spacing: NDArray) -> float:
    """Mean clean intensity of the brain voxels around ``lesion``: in its box widened by
    :data:`SHELL_MM`, outside every part's reach (the surrounding tissue a reader compares with)."""
    near = np.zeros(image.shape, bool)
    box = np.zeros(image.shape, bool)
    for spec, _ in lesion.parts:
        centre = np.asarray(spec.centre)
        reach = spec.reach_mm / spacing
        lo = np.maximum(np.floor(centre - reach).astype(int), 0)
        hi = np.minimum(np.ceil(centre + reach).astype(int) + 1, image.shape)
        near[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
        lo = np.maximum(np.floor(centre - reach - SHELL_MM / spacing).astype(int), 0)
        hi = np.minimum(np.ceil(centre + reach + SHELL_MM / spacing).astype(int) + 1, image.shape)
        box[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    shell = box & ~near & brain
    if not shell.any():
        shell = box & brain
    return float(np.mean(image[shell])) if shell.any() else float(np.mean(image[brain]))


def composite_lesion(out: NDArray[np.float32], clean: NDArray, brain: NDArray[np.bool_], lesion: RandomLesion,
                     spacing: NDArray) -> NDArray[np.float32]:
    """Composite ``lesion`` into ``out`` in place, against the local intensity of the ``clean`` image.

    Each part in order: ``out += profile * brain * ((1 + c) * local - out)`` with ``local`` from
    :func:`local_intensity`. Returns the union of the outer parts' profiles (in the brain), the
    shape of ``out``.
    """
    local = local_intensity(clean, brain, lesion, spacing)
    union = np.zeros(out.shape, np.float32)
    for (spec, c), outer in zip(lesion.parts, lesion.outer):
        profile, offset = render_lesion(spec, spacing)
        weight = np.zeros(out.shape, np.float32)
        paste(weight, profile, offset, np.maximum)
        weight *= brain
        out += weight * ((1 + c) * local - out)
        if outer:
            np.maximum(union, weight, out=union)
    return union


def insert_random_lesions(image: NDArray, anatomy: Anatomy, rng: np.random.Generator, n: int,
                          families: tuple[str, ...] = TRAINING_FAMILIES
                          ) -> tuple[NDArray[np.float32], NDArray[np.uint8], list[RandomLesion]]:
    """Insert ``n`` lesions, each of a family drawn uniformly from ``families``, into a clean volume.

    Returns ``(image, mask, lesions)``: the composited float32 volume (brain only, >= 0), the uint8
    mask (union of outer profiles >= 0.5, in the brain) and the lesions drawn.
    """
    check_names(families, FAMILIES, "families")
    out = np.asarray(image, np.float32).copy()
    union = np.zeros(out.shape, np.float32)
    lesions = []
    for _ in range(n):
        lesion = sample_random_lesion(rng, anatomy.brain, anatomy.affine, families[rng.integers(len(families))])
        np.maximum(union, composite_lesion(out, image, anatomy.brain, lesion, anatomy.spacing), out=union)
        lesions.append(lesion)
    np.maximum(out, 0, out=out)
    return out, (union >= 0.5).astype(np.uint8), lesions


def synth_randomised_case(seed: int, index: int, *, families: tuple[str, ...] = TRAINING_FAMILIES,
                          regimes: tuple[str, ...] = TRAINING_REGIMES, resample: bool = True,
                          n_lesions: int | None = None):
    """Case ``index`` of the domain-randomised dataset ``seed`` (same arguments, same case).

    0 lesions with probability 1/3, else 1-3, of ``families``, on an anatomy of ``regimes``; the scan
    is blurred to a random resolution and, with ``resample``, resampled onto that voxel grid (the
    mask too, trilinearly, kept where >= 0.5).

    Returns:
        ``(case, lesions, scanner)``: a :class:`~c2f_med.synth.dataset.Case` (its ``specs`` empty, its
        ``contrast`` ``"random:<regime>"``), the :class:`RandomLesion` list and the :class:`Scanner`.
    """
    from c2f_med.synth.dataset import Case, _to_int16, case_id

    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got {seed}, {index}")
    rng = np.random.default_rng([seed, index, 18])
    anatomy = make_random_anatomy(rng, regimes)
    scanner = sample_scanner(rng)
    if n_lesions is None:
        n_lesions = 0 if rng.random() < 1 / 3 else int(rng.integers(1, 4))
    clean, label, lesions = insert_random_lesions(anatomy.image, anatomy, rng, n_lesions, families)
    noise_seed = int(rng.integers(2**63))
    affine = np.array(anatomy.affine)
    outs = []
    for img, lab in ((clean, label), (anatomy.image, None)):
        img = degrade(img, scanner, anatomy.spacing)
        img = finalise(img, anatomy.bias, anatomy.noise_sigma, np.random.default_rng(noise_seed))
        if resample:
            img, lab, affine = _to_grid(img, lab, anatomy.affine, scanner)
        outs.append((img, lab))
    (scan, label), (twin, _) = outs
    norm = 1.0 / max(float(np.percentile(anatomy.image[anatomy.brain], 99)), 1e-6)  # brightest tissue ~ 1000
    case = Case(case_id(seed, index), _to_int16(scan * norm), label.astype(np.uint8), _to_int16(twin * norm), affine,
                [], anatomy.contrast)
    return case, lesions, scanner


def _to_grid(image: NDArray, label: NDArray | None, affine: NDArray, scanner: Scanner):
    """Resample onto the scanner's voxel grid (in-plane, in-plane, thickness) by trilinear zoom."""
    spacing = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    target = np.array([scanner.in_plane_mm, scanner.in_plane_mm, scanner.thickness_mm])
    shape = np.maximum(np.rint(np.array(image.shape) * spacing / target).astype(int), 1)
    factors = shape / np.array(image.shape)
    img = zoom(image, factors, order=1, grid_mode=True, mode="grid-constant")
    lab = None if label is None else (zoom(label.astype(np.float32), factors, order=1, grid_mode=True,
                                           mode="grid-constant") >= 0.5).astype(np.uint8)
    new = np.array(affine, dtype=np.float64).copy()
    real = np.array(image.shape) / shape  # exact voxel-size ratio of the zoom
    new[:3, :3] = new[:3, :3] * real
    new[:3, 3] = affine[:3, 3] + affine[:3, :3] @ ((real - 1) / 2)  # grid_mode: voxel corners stay put
    return img.astype(np.float32), lab, new


def write_randomised_dataset(out: str | os.PathLike, cases: int, seed: int, *,
                             families: tuple[str, ...] = TRAINING_FAMILIES, regimes: tuple[str, ...] = TRAINING_REGIMES,
                             section: str | None = None, progress: bool = True) -> Path:
    """Write ``cases`` domain-randomised cases (NIfTI) under ``out``, as ``c2f-med synth`` lays them out.

    ``section``: put every case in that datalist section (e.g. ``"testing"``); by default the
    training / validation / testing split of :func:`~c2f_med.synth.dataset.split_cases`.
    ``lesions.json`` records, per case, the regime, the scanner and each lesion's family and parts.
    """
    from tqdm import tqdm

    from c2f_med.atomic import write_json
    from c2f_med.errors import InputError
    from c2f_med.synth.dataset import split_cases
    from c2f_med.synth.writers import write_nifti

    out = Path(out)
    if cases < 1 or seed < 0:
        raise InputError(out, f"cases must be >= 1 and seed >= 0, got {cases}, {seed}")
    try:
        check_names(families, FAMILIES, "families")
        check_names(regimes, REGIMES, "regimes")
    except ValueError as err:
        raise InputError(out, str(err)) from err
    items, records = [], {}
    for index in tqdm(range(cases), desc="synth", unit="case", disable=not progress):
        case, lesions, scanner = synth_randomised_case(seed, index, families=families, regimes=regimes)
        image, label = f"images/{case.case_id}.nii.gz", f"labels/{case.case_id}.nii.gz"
        write_nifti(out / image, case.image, case.affine)
        write_nifti(out / label, case.label, case.affine)
        items.append({"image": image, "label": label})
        records[case.case_id] = {"regime": case.contrast.split(":", 1)[1], "scanner": dataclasses.asdict(scanner),
                                 "lesions": [lesion.as_dict() for lesion in lesions]}
    parts = ({section: items} if section else
             {name: [items[i] for i in idx] for name, idx in split_cases(cases).items()})
    write_json(out / "lesions.json", records)
    datalist = out / "datalist.json"
    write_json(datalist, {
        "name": "c2f_med domain-randomised lesions",
        "description": f"domain-randomised MR-like scans on the MNI152 template, seed {seed}, lesion families "
                       f"{', '.join(families)}, tissue regimes {', '.join(regimes)}",
        "reference": "MNI ICBM152 2009a template (via nilearn); c2f_med.synth.randomised",
        "tensorImageSize": "3D", "modality": {"0": "MR"}, "labels": {"0": "background", "1": "lesion"},
        "seed": seed, **parts,
    })
    return datalist


def main(argv: list[str] | None = None) -> int:
    """``python -m c2f_med.synth.randomised --out DIR --cases N --seed S [--families ...] [--regimes ...]``."""
    p = argparse.ArgumentParser(prog="python -m c2f_med.synth.randomised", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--cases", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--families", default=",".join(TRAINING_FAMILIES), help=f"among {','.join(FAMILIES)}")
    p.add_argument("--regimes", default=",".join(TRAINING_REGIMES), help=f"among {','.join(REGIMES)}")
    p.add_argument("--section", help="put every case in this datalist section (default: training/validation/testing)")
    a = p.parse_args(argv)
    path = write_randomised_dataset(a.out, a.cases, a.seed, families=tuple(a.families.split(",")),
                                    regimes=tuple(a.regimes.split(",")), section=a.section)
    print(f"wrote {a.cases} cases and {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
