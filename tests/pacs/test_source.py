"""Against the Orthanc of the fixture: search, retrieve, annotations, store without duplicates."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
import torch

from c2f_med.case import load_scan
from c2f_med.cli import main
from c2f_med.errors import InputError
from c2f_med.pacs.annotations import choose, find_annotations
from c2f_med.pacs.cli import query_series
from c2f_med.pacs.client import SeriesRef, connect
from c2f_med.pacs.source import DicomWebOptions, RemoteSource
from c2f_med.pacs.store import result_series_uid
from c2f_med.synth.writers import write_nifti

from .conftest import PASSWORD


def test_query_finds_the_scans_not_the_annotations(orthanc, credentials):
    server, studies = orthanc
    dated = query_series(server.root, {"Modality": "MR", "StudyDate": "20240101-20241231"})
    assert dated == sorted([studies["pacs_a"].url, studies["pacs_b"].url], key=lambda u: u.split("/studies/")[1])
    everything = query_series(server.root, {})
    assert set(everything) == {s.url for s in studies.values()}  # no SEG series among them


def test_retrieved_series_reads_like_the_local_one_and_leaves_the_cache(orthanc, credentials, tmp_path):
    server, studies = orthanc
    case = studies["pacs_a"]
    source = RemoteSource(DicomWebOptions(cache=tmp_path / "cache"))
    fetched = source.fetch(case.url)
    assert fetched.image.parent.name == case.series and fetched.mask is None
    remote, local = load_scan(fetched.image, None)["image"], load_scan(case.folder, None)["image"]
    assert remote.shape == local.shape and torch.equal(remote, local)
    assert np.allclose(remote.affine, local.affine)
    source.release(fetched)
    assert not any((tmp_path / "cache").iterdir())  # a finished study is not kept


def test_server_annotations_found_chosen_and_used_as_the_mask(orthanc, credentials, tmp_path):
    server, studies = orthanc
    client = connect(server.root)
    found = find_annotations(client, SeriesRef.parse(studies["pacs_b"].url))
    assert [(a.modality, a.labels) for a in found] == [("SEG", ((1, "lesion"), (2, "oedema")))]
    with pytest.raises(InputError, match="2 segments / ROIs .*'lesion'.*'oedema'"):
        choose(found, studies["pacs_b"].url)
    assert choose(found, studies["pacs_b"].url, segment="oedema")[1] == 2
    assert choose(found, studies["pacs_b"].url, segment=f"{found[0].series}:1")[1] == 1
    with pytest.raises(InputError, match="no annotation matches --segment 7"):
        choose(found, studies["pacs_b"].url, segment="7")

    both = find_annotations(client, SeriesRef.parse(studies["pacs_old"].url))
    assert [(a.modality, a.labels) for a in both] == [("RTSTRUCT", ((1, "GTV"),)), ("SEG", ((1, "lesion"),))]
    with pytest.raises(InputError, match="2 segments / ROIs") as err:
        choose(both, studies["pacs_old"].url)
    assert "RTSTRUCT" in str(err.value) and "'GTV'" in str(err.value)
    assert choose(both, studies["pacs_old"].url, roi="GTV")[0].modality == "RTSTRUCT"
    assert choose(both, studies["pacs_old"].url, segment="lesion")[0].modality == "SEG"

    case = studies["pacs_a"]
    source = RemoteSource(DicomWebOptions(cache=tmp_path / "cache", annotations=True))
    fetched = source.fetch(case.url)
    truth = write_nifti(tmp_path / "mask.nii.gz", case.mask, np.diag([1.5, 1.5, 3.0, 1.0]))
    from_server = load_scan(fetched.image, fetched.mask)["label"]
    from_file = load_scan(case.folder, truth)["label"]
    assert from_server.sum() == case.mask.sum() > 0 and torch.equal(from_server, from_file)
    source.release(fetched)


def _result_instances(server, case, method: str) -> dict[str, list[str]]:
    """``{series UID: [SOP instance UIDs]}`` of ``method``'s result series in ``case``'s study."""
    client = connect(server.root)
    out = {}
    for s in client.search_for_series(case.study, fields=["SeriesDescription"]):
        description = str((s.get("0008103E") or {}).get("Value", [""])[0])
        if description.startswith(f"c2f_med saliency, method {method},"):
            series = s["0020000E"]["Value"][0]
            out[series] = [i["00080018"]["Value"][0] for i in client.search_for_instances(case.study, series)]
    return out


def test_explain_stores_results_once(orthanc, credentials, tmp_path, tiny_bundle, capsys):
    server, studies = orthanc
    case = studies["pacs_b"]
    args = ["explain", "--input", case.url, "--mask", "server", "--segment", "lesion", "--store-results",
            "--bundle", str(tiny_bundle), "--method", "rollout", "--cache", str(tmp_path / "cache")]
    assert main([*args, "--out", str(tmp_path / "first")]) == 0
    folder = tmp_path / "first" / case.series
    exported = [p for p in (folder / "dicom").rglob("*") if p.is_file()]  # Parametric Map, SEG, overlay images
    assert f"stored {len(exported)} result instance(s) into the study (0 already there)" in capsys.readouterr().out
    scores = json.loads((folder / "scores.json").read_text())
    assert scores["lesion_slices"] == int(case.mask.any(axis=(0, 1)).sum())
    stored = _result_instances(server, case, "rollout")
    kinds = {pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID for p in exported}
    assert len(stored) == len(kinds) == 3 and sum(len(v) for v in stored.values()) == len(exported)
    model_sha = json.loads((folder / "provenance.json").read_text())["bundle"]["sha256"]
    parametric_map = "1.2.840.10008.5.1.4.1.1.30"  # SOP class of the Parametric Map in dicom/
    assert result_series_uid(case.series, "rollout", model_sha, f".|{parametric_map}") in stored
    assert main([*args, "--out", str(tmp_path / "second")]) == 0  # a rerun: nothing new on the server
    assert f"stored 0 result instance(s) into the study ({len(exported)} already there)" in capsys.readouterr().out
    assert _result_instances(server, case, "rollout") == stored
    for file in [*(tmp_path / "first").rglob("*.json"), *(tmp_path / "second").rglob("*.json")]:
        assert PASSWORD not in file.read_text()
    assert not any((tmp_path / "cache").iterdir())
