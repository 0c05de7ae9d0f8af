"""Datalists in MONAI's decathlon style, with a stable case id per item.

A datalist is a JSON file::

    {"name": "...",
     "training":   [{"image": "images/case_000.nii.gz", "label": "labels/case_000.nii.gz"}, ...],
     "validation": [...],
     "testing":    [{"image": "dicom/case_001"}, ...]}

Paths are relative to the datalist's folder; "label" (the lesion mask) is optional. An "image" may
also be a DICOMweb series URL, ``{root}/studies/{StudyInstanceUID}/series/{SeriesInstanceUID}``
(see :mod:`c2f_med.pacs`). Reading uses
``monai.data.load_decathlon_datalist``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from monai.data import load_decathlon_datalist

from c2f_med.atomic import write_json
from c2f_med.errors import InputError
from c2f_med.io.readers import DICOM_SUFFIXES, ITK_SUFFIXES, NIFTI_SUFFIXES

__all__ = ["case_id", "read_datalist", "scan_items", "write_datalist"]

PATH_KEYS = ("image", "label")

# longest first, so "x.nii.gz" loses ".nii.gz" and not only ".gz"
_SUFFIXES = sorted((f".{s}" for s in NIFTI_SUFFIXES + ITK_SUFFIXES + DICOM_SUFFIXES), key=len, reverse=True)


def case_id(path: str | os.PathLike) -> str:
    """Case id of a scan path: its file name without the image suffix (``.nii.gz``, ``.nii``, ``.mha``,
    ``.nrrd``, ...), or the name of a DICOM folder."""
    name = Path(path).name
    for suffix in _SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def read_datalist(datalist: str | os.PathLike | None, section: str = "testing", check_files: bool = True) -> list[dict]:
    """Items of one section of a datalist, with absolute paths and a ``"case_id"``.

    Args:
        datalist: path of the datalist JSON.
        section: "training", "validation" or "testing".
        check_files: raise if an item's image or label does not exist.

    Returns:
        ``[{"image": abs_path, "label": abs_path (if given), "case_id": str, ...other keys}, ...]``

    Raises:
        InputError: no datalist (``None``); naming the datalist (and the item): no such file, invalid JSON, no such
            section, an item without "image", a missing file, two items with the same case id.
    """
    if datalist is None:
        raise InputError(None, "no datalist given: pass --datalist FILE (a JSON list of scans) or --image PATH")
    path = Path(datalist)
    if not path.is_file():
        raise InputError(path, "datalist not found")
    try:
        items = load_decathlon_datalist(path, is_segmentation=True, data_list_key=section)
    except json.JSONDecodeError as err:
        raise InputError(path, f"not a valid JSON datalist ({err})") from err
    except ValueError as err:  # the section is missing
        raise InputError(path, f'no "{section}" list in this datalist') from err
    except TypeError as err:  # an item is not an object
        raise InputError(path, f'"{section}" items must be objects like {{"image": path, "label": path}}') from err
    _keep_urls(path, section, items)
    seen: dict[str, int] = {}
    for index, item in enumerate(items):
        where = f"{section}[{index}]"
        if not isinstance(item.get("image"), str):
            raise InputError(path, f'{where} has no "image" path')
        item["case_id"] = case = case_id(item["image"])
        if case in seen:
            raise InputError(path, f"{where} has the same case id {case!r} as {section}[{seen[case]}]")
        seen[case] = index
        if check_files:
            for key in PATH_KEYS:
                if key in item and not _is_url(item[key]) and not os.path.exists(item[key]):
                    raise InputError(path, f"{where} ({case}): {key} not found: {item[key]}")
    return items


def scan_items(
    datalist: str | os.PathLike | None = None,
    section: str = "testing",
    image: str | os.PathLike | None = None,
    label: str | os.PathLike | None = None,
) -> list[dict]:
    """The scans a run works on: one section of a datalist, or one image (and optional mask).

    This is what the bundle's ``datalist``, ``image`` and ``label`` overrides feed: a cohort comes as
    a datalist, a single scan as ``image`` (a file or a DICOM folder) with an optional ``label``.

    Returns:
        items as :func:`read_datalist` returns them.

    Raises:
        InputError: both or neither of ``datalist`` and ``image``; ``label`` without ``image``; a
            missing image or label; everything :func:`read_datalist` raises.
    """
    if image is None:
        if label is not None:
            raise InputError(label, "a label was given without an image: pass --image PATH too")
        return read_datalist(datalist, section)
    if datalist is not None:
        raise InputError(datalist, "both a datalist and an image were given: pass one of --datalist or --image")
    item = {"image": str(Path(image).resolve()), "case_id": case_id(image)}
    if label is not None:
        item["label"] = str(Path(label).resolve())
    for key in PATH_KEYS:
        if key in item and not os.path.exists(item[key]):
            raise InputError(item[key], f"{key} not found")
    return [item]


def _is_url(value: object) -> bool:
    return isinstance(value, str) and value.lower().startswith(("http://", "https://"))


def _keep_urls(path: Path, section: str, items: list[dict]) -> None:
    """Put back the DICOMweb series URLs (``http(s)://...``) of ``items`` as the datalist gives them (MONAI
    joins every "image" / "label" to the datalist's folder)."""
    given = json.loads(path.read_text()).get(section, [])
    for item, raw in zip(items, given):
        for key in PATH_KEYS:
            if isinstance(raw, dict) and _is_url(raw.get(key)):
                item[key] = raw[key]


def write_datalist(
    datalist: str | os.PathLike,
    training: Sequence[Mapping] = (),
    validation: Sequence[Mapping] = (),
    testing: Sequence[Mapping] = (),
    name: str = "c2f_med",
) -> None:
    """Write a datalist atomically; "image"/"label" paths are stored relative to its folder.

    Items are mappings with "image" and optionally "label" (absolute or relative to the current
    directory) and any other JSON keys, written as given.
    """
    folder = Path(datalist).resolve().parent

    def relative(item: Mapping) -> dict:
        out = dict(item)
        for key in PATH_KEYS:
            if key in out:
                out[key] = Path(os.path.relpath(Path(out[key]).resolve(), folder)).as_posix()
        return out

    sections = {"training": training, "validation": validation, "testing": testing}
    write_json(datalist, {"name": name, **{key: [relative(i) for i in items] for key, items in sections.items()}})
