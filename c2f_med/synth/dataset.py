"""Deterministic semi-synthetic cases and the ``c2f-med synth`` dataset writer.

A case is drawn from ``np.random.default_rng([seed, index])``: a random anatomy
(:func:`~c2f_med.synth.anatomy.make_anatomy`, T1 / T2 / FLAIR), 0 lesions with probability 1/3
and otherwise 1-4 (3-20 mm, contrast 0.15-0.8 of the tissue range, hyper or hypo,
:func:`~c2f_med.synth.lesions.insert_lesions`), then bias and Rician noise. Its lesion-free twin
goes through the same anatomy, bias and noise without the lesions, so the two differ only where
a lesion changed the clean intensities (inside the mask and its soft edge).

Stored intensities are int16, ``round(1000 * value)`` (white matter ~ 1000), so the NIfTI file and
the DICOM series of a case hold the very same voxels.

Layout written by :func:`write_dataset` (what ``c2f-med synth`` writes)::

    DIR/images/<case>.nii.gz   int16 scan                 (format "nifti" or "both")
    DIR/labels/<case>.nii.gz   uint8 0/1 lesion mask, the scan's grid and affine
    DIR/dicom/<case>/          one MR series, 0001.dcm ... (format "dicom" or "both")
    DIR/lesions.json           per case: MR contrast and the lesions' LesionSpec fields
    DIR/datalist.json          MONAI decathlon datalist, paths relative to DIR

Case ids are ``s<seed>_<index:04d>`` so datasets of two seeds never collide.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from tqdm import tqdm

from c2f_med.atomic import write_json
from c2f_med.errors import InputError
from c2f_med.synth.anatomy import finalise, make_anatomy
from c2f_med.synth.lesions import SHAPES, LesionSpec, check_shapes, insert_lesions
from c2f_med.synth.writers import write_dicom_series, write_nifti

__all__ = ["FORMATS", "Case", "case_id", "split_cases", "synth_case", "write_dataset"]

FORMATS = ("nifti", "dicom", "both")
INTENSITY_SCALE = 1000.0  # stored value of clean white matter
LESION_FREE_FRACTION = 1 / 3
MAX_LESIONS = 4
TEST_FRACTION = 0.2
VALIDATION_FRACTION = 0.1


@dataclass
class Case:
    """One synthetic scan; arrays ``X x Y x Z`` on one grid.

    Attributes:
        case_id: ``s<seed>_<index:04d>``.
        image: int16 scan (white matter ~ 1000).
        label: uint8 0/1 lesion mask (where a lesion's profile is >= 0.5).
        lesion_free: int16 twin: the same scan without lesions.
        affine: 4 x 4 voxel-to-world (RAS, mm).
        specs: the inserted lesions.
        contrast: "t1", "t2" or "flair".
    """

    case_id: str
    image: NDArray[np.int16]
    label: NDArray[np.uint8]
    lesion_free: NDArray[np.int16]
    affine: NDArray[np.float64]
    specs: list[LesionSpec]
    contrast: str


def case_id(seed: int, index: int) -> str:
    """The id of case ``index`` of a dataset drawn with ``seed``: ``s<seed>_<index:04d>``."""
    return f"s{seed}_{index:04d}"


def synth_case(
    seed: int,
    index: int,
    *,
    contrast: str | None = None,
    n_lesions: int | None = None,
    diameter_mm: tuple[float, float] = (3.0, 20.0),
    lesion_contrast: tuple[float, float] = (0.15, 0.8),
    shapes: tuple[str, ...] = SHAPES,
) -> Case:
    """Draw case ``index`` of the dataset ``seed``: the same arguments always give the same case.

    Args:
        seed, index: non-negative integers seeding the case's generator.
        contrast: MR contrast ("t1", "t2", "flair"), random when ``None``.
        n_lesions: number of lesions; when ``None``, 0 with probability 1/3, else 1-4 uniformly.
        diameter_mm, lesion_contrast: lesion diameter and contrast-magnitude ranges.
        shapes: lesion shapes drawn (default the training generator's :data:`~c2f_med.synth.lesions.SHAPES`;
            :data:`~c2f_med.synth.lesions.HELD_OUT_SHAPES` give lesions a blob-trained model never saw).
    """
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got {seed}, {index}")
    rng = np.random.default_rng([seed, index])
    anatomy = make_anatomy(rng, contrast)
    if n_lesions is None:
        n_lesions = 0 if rng.random() < LESION_FREE_FRACTION else int(rng.integers(1, MAX_LESIONS + 1))
    clean, label, specs = insert_lesions(
        anatomy.image, anatomy, rng, n_lesions, diameter_mm=diameter_mm, contrast=lesion_contrast, shapes=shapes
    )
    noise_seed = int(rng.integers(2**63))  # the twin gets the very same noise
    scan, twin = (
        _to_int16(finalise(img, anatomy.bias, anatomy.noise_sigma, np.random.default_rng(noise_seed)))
        for img in (clean, anatomy.image)
    )
    return Case(case_id(seed, index), scan, label, twin, anatomy.affine, specs, anatomy.contrast)


def split_cases(n: int) -> dict[str, range]:
    """Indices of the "training", "validation" and "testing" parts of ``n`` cases, in that order.

    Testing gets ``max(1, round(0.2 n))`` cases, validation ``round(0.1 n)``, training the rest.
    """
    n_test = max(1, round(TEST_FRACTION * n))
    n_val = min(round(VALIDATION_FRACTION * n), n - n_test)
    n_train = n - n_test - n_val
    return {
        "training": range(0, n_train),
        "validation": range(n_train, n_train + n_val),
        "testing": range(n_train + n_val, n),
    }


def write_dataset(out: str | os.PathLike, cases: int, seed: int, fmt: str = "nifti", *, progress: bool = True,
                  shapes: tuple[str, ...] = SHAPES) -> Path:
    """Write ``cases`` synthetic cases of dataset ``seed`` under ``out`` (layout in the module docstring).

    Every file is written atomically; files of the same names are replaced, nothing else is
    touched. The datalist's "image" is the NIfTI file, or the DICOM folder with ``fmt="dicom"``.

    Args:
        out: the dataset folder (created if missing).
        cases: number of cases, >= 1.
        seed: dataset seed, >= 0.
        fmt: "nifti", "dicom" or "both".
        progress: show a tqdm progress bar over the cases.
        shapes: lesion shapes (see :func:`synth_case`); recorded in the datalist's description.

    Returns:
        the path of ``datalist.json``.

    Raises:
        InputError: bad arguments, or ``out`` is an existing file.
    """
    out = Path(out)
    if fmt not in FORMATS:
        raise InputError(out, f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if cases < 1:
        raise InputError(out, f"cases must be >= 1, got {cases}")
    if seed < 0:
        raise InputError(out, f"seed must be >= 0, got {seed}")
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a folder")
    try:
        check_shapes(shapes)
    except ValueError as err:
        raise InputError(out, str(err)) from err

    items, lesions = [], {}
    for index in tqdm(range(cases), desc="synth", unit="case", disable=not progress):
        case = synth_case(seed, index, shapes=shapes)
        cid = case.case_id
        label = f"labels/{cid}.nii.gz"
        write_nifti(out / label, case.label, case.affine)
        image = f"images/{cid}.nii.gz" if fmt != "dicom" else f"dicom/{cid}"
        if fmt != "dicom":
            write_nifti(out / image, case.image, case.affine)
        if fmt != "nifti":
            write_dicom_series(out / "dicom" / cid, case.image, case.affine, case_id=cid,
                               description=f"synthetic {case.contrast.upper()}")
        items.append({"image": image, "label": label})
        lesions[cid] = {"contrast": case.contrast, "lesions": [dataclasses.asdict(s) for s in case.specs]}

    parts = {name: [items[i] for i in idx] for name, idx in split_cases(cases).items()}
    write_json(out / "lesions.json", lesions)
    datalist = out / "datalist.json"
    write_json(datalist, {
        "name": "c2f_med synthetic lesions",
        "description": f"semi-synthetic MR lesion scans on the MNI152 template, seed {seed}"
                       + ("" if tuple(shapes) == SHAPES else f", lesion shapes {', '.join(shapes)}"),
        "reference": "MNI ICBM152 2009a template (via nilearn); lesions by c2f_med.synth",
        "tensorImageSize": "3D",
        "modality": {"0": "MR"},
        "labels": {"0": "background", "1": "lesion"},
        "seed": seed,
        "numTraining": len(parts["training"]),
        "numTest": len(parts["testing"]),
        **parts,
    })
    return datalist


def _to_int16(volume: NDArray[np.floating]) -> NDArray[np.int16]:
    """``round(1000 * volume)`` clipped to the int16 range."""
    return np.clip(np.rint(volume * INTENSITY_SCALE), -32768, 32767).astype(np.int16)
