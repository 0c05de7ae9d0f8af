"""Datalists: round trip with relative paths, case ids, errors naming the datalist and the item."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from c2f_med.errors import InputError
from c2f_med.io.manifest import case_id, read_datalist, scan_items, write_datalist


@pytest.mark.parametrize(
    "path, expected",
    [
        ("images/case_001.nii.gz", "case_001"),
        ("case.v2.nii", "case.v2"),
        ("/data/scan.MHA", "scan"),
        ("scan.nrrd", "scan"),
        ("dicom/patient_17/", "patient_17"),
        ("dicom/case_003", "case_003"),
        ("slice.dcm", "slice"),
    ],
)
def test_case_id(path, expected):
    assert case_id(path) == expected


def _files(root: Path) -> dict[str, Path]:
    files = {
        "a": root / "images" / "a.nii.gz",
        "a_mask": root / "labels" / "a.nii.gz",
        "b": root / "images" / "b.mha",
        "c": root / "dicom" / "c",
    }
    for name, path in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir() if name == "c" else path.write_bytes(b"")
    return files


def test_write_then_read_round_trip_with_relative_paths(tmp_path, monkeypatch):
    files = _files(tmp_path / "data")
    datalist = tmp_path / "data" / "lists" / "datalist.json"
    monkeypatch.chdir(tmp_path)
    write_datalist(
        datalist,
        training=[{"image": files["a"], "label": files["a_mask"], "fold": 0}],
        testing=[{"image": Path("data/images/b.mha")}, {"image": files["c"]}],
        name="demo",
    )
    stored = json.loads(datalist.read_text())
    assert stored["name"] == "demo" and stored["validation"] == []
    assert stored["training"] == [{"image": "../images/a.nii.gz", "label": "../labels/a.nii.gz", "fold": 0}]
    assert stored["testing"] == [{"image": "../images/b.mha"}, {"image": "../dicom/c"}]

    training = read_datalist(datalist, "training")
    assert training == [
        {"image": str(files["a"].resolve()), "label": str(files["a_mask"].resolve()), "fold": 0, "case_id": "a"}
    ]
    testing = read_datalist(datalist)
    assert [item["case_id"] for item in testing] == ["b", "c"]
    assert [Path(item["image"]) for item in testing] == [files["b"].resolve(), files["c"].resolve()]
    assert all("label" not in item for item in testing)


def test_missing_file_names_the_datalist_and_the_item(tmp_path):
    files = _files(tmp_path)
    datalist = tmp_path / "datalist.json"
    write_datalist(datalist, testing=[{"image": files["a"]}, {"image": files["b"], "label": tmp_path / "gone.nii.gz"}])
    with pytest.raises(InputError) as err:
        read_datalist(datalist)
    message = str(err.value)
    assert message.startswith(f"{datalist}: testing[1] (b): label not found: ")
    assert message.endswith("gone.nii.gz")
    assert len(read_datalist(datalist, check_files=False)) == 2


def test_missing_section_bad_json_and_duplicate_case_ids(tmp_path):
    files = _files(tmp_path)
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [{"image": "images/a.nii.gz"}]}))
    with pytest.raises(InputError, match='no "testing" list'):
        read_datalist(datalist)
    datalist.write_text("{not json")
    with pytest.raises(InputError, match="not a valid JSON datalist"):
        read_datalist(datalist)
    write_datalist(datalist, testing=[{"image": files["a"]}, {"image": files["a_mask"]}])
    with pytest.raises(InputError, match=r"testing\[1\] has the same case id 'a' as testing\[0\]"):
        read_datalist(datalist)
    with pytest.raises(InputError, match="datalist not found"):
        read_datalist(tmp_path / "nope.json")
    datalist.write_text(json.dumps({"testing": [{"label": "labels/a.nii.gz"}]}))
    with pytest.raises(InputError, match=r'testing\[0\] has no "image" path'):
        read_datalist(datalist)


def test_scan_items_takes_one_image_or_a_datalist(tmp_path):
    image = tmp_path / "scan_01.nii.gz"
    image.write_bytes(b"x")
    items = scan_items(image=image)
    assert items == [{"image": str(image.resolve()), "case_id": "scan_01"}]
    with pytest.raises(InputError, match="label not found"):
        scan_items(image=image, label=tmp_path / "nope.nii.gz")
    with pytest.raises(InputError, match="without an image"):
        scan_items(label=image)
    with pytest.raises(InputError, match="both a datalist and an image"):
        scan_items(datalist=tmp_path / "d.json", image=image)
    with pytest.raises(InputError, match="no datalist given"):
        scan_items()
