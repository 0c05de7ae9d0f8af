"""Client, URLs, credentials and cache without a server; one-line errors against the real one."""

from __future__ import annotations

import json

import pytest
import requests

from c2f_med.cli import main
from c2f_med.errors import InputError
from c2f_med.pacs.cache import SeriesCache, parse_size
from c2f_med.pacs.cli import parse_query
from c2f_med.pacs.client import DicomWebError, SeriesRef, connect, session_from_environment
from c2f_med.pacs.source import DicomWebOptions, RemoteSource

from .conftest import PASSWORD, USER


def test_series_url_parsed_and_credentials_in_urls_refused():
    ref = SeriesRef.parse("http://127.0.0.1:8042/dicom-web/studies/1.2.3/series/4.5.6/")
    assert (ref.root, ref.study, ref.series) == ("http://127.0.0.1:8042/dicom-web", "1.2.3", "4.5.6")
    assert ref.url == "http://127.0.0.1:8042/dicom-web/studies/1.2.3/series/4.5.6"
    with pytest.raises(InputError, match="not a DICOMweb series URL"):
        SeriesRef.parse("http://host/dicom-web/studies/1.2.3")
    with pytest.raises(InputError, match="credentials in a URL are not accepted") as err:
        SeriesRef.parse("https://bob:hunter2@host/dicom-web/studies/1.2/series/3.4")
    assert "hunter2" not in str(err.value)


def test_credentials_from_environment_or_file(tmp_path):
    assert session_from_environment({}).auth is None
    basic = session_from_environment({"C2F_MED_DICOMWEB_USER": "u", "C2F_MED_DICOMWEB_PASSWORD": "p"}).auth
    assert (basic.username, basic.password) == ("u", "p")
    bearer = session_from_environment({"C2F_MED_DICOMWEB_TOKEN": "tok-123"}).auth
    assert "tok-123" not in repr(bearer)
    prepared = bearer(requests.Request("GET", "http://x/").prepare())
    assert prepared.headers["Authorization"] == "Bearer tok-123"
    file = tmp_path / "creds.json"
    file.write_text(json.dumps({"username": "fu", "password": "fp"}))
    file.chmod(0o600)
    assert session_from_environment({"C2F_MED_DICOMWEB_CREDENTIALS": str(file)}).auth.username == "fu"
    with pytest.raises(InputError, match="both set"):
        session_from_environment({"C2F_MED_DICOMWEB_TOKEN": "t", "C2F_MED_DICOMWEB_USER": "u",
                                  "C2F_MED_DICOMWEB_PASSWORD": "p"})
    with pytest.raises(InputError, match="set both"):
        session_from_environment({"C2F_MED_DICOMWEB_USER": "u"})
    file.write_text("token: abc")
    with pytest.raises(InputError, match="not JSON"):
        session_from_environment({"C2F_MED_DICOMWEB_CREDENTIALS": str(file)})


def test_sizes_and_queries():
    assert parse_size("2GB") == parse_size("2GiB") == 2 * 1024**3
    assert parse_size("500m") == 500 * 1024**2 and parse_size("1024") == 1024
    with pytest.raises(ValueError):
        parse_size("lots")
    assert parse_query(["Modality=MR", "StudyDate=20240101-20241231"]) == {
        "Modality": "MR", "StudyDate": "20240101-20241231"}
    with pytest.raises(InputError, match="not a DICOM attribute"):
        parse_query(["Modaliti=MR"])
    with pytest.raises(InputError, match="KEY=VALUE"):
        parse_query(["Modality"])


def test_cache_evicts_oldest_unpinned_and_releases(tmp_path):
    cache = SeriesCache(tmp_path / "cache", limit=3000, keep=True)
    refs = [SeriesRef("http://h/dw", f"1.{i}", f"2.{i}") for i in range(3)]
    for i, ref in enumerate(refs):
        cache.pin(ref)
        folder = cache.folder(ref) / "image"
        folder.mkdir(parents=True)
        (folder / "x.dcm").write_bytes(b"0" * 1400)
        cache.folder(ref).touch()
        import os

        os.utime(cache.folder(ref), (1000 + i, 1000 + i))
        cache.release(ref)  # keep=True: stays until evicted
    cache.pin(refs[0])  # in use: never evicted, though the oldest
    removed = cache.evict()
    assert removed == [cache.folder(refs[1])]
    assert cache.has(refs[0]) and cache.has(refs[2]) and not cache.has(refs[1])
    assert not (tmp_path / "cache" / "1.1").exists()  # the empty study folder went too
    dropping = SeriesCache(tmp_path / "cache", limit=10**9, keep=False)
    dropping.pin(refs[2])
    dropping.release(refs[2])
    assert not dropping.has(refs[2])


def test_server_down_is_one_line_naming_the_url(tmp_path, credentials, capsys, tiny_bundle):
    url = "http://127.0.0.1:9/dicom-web/studies/1.2/series/3.4"  # discard port: nothing listens
    with pytest.raises(DicomWebError) as err:
        RemoteSource(DicomWebOptions(cache=tmp_path / "c")).fetch(url)
    assert str(err.value).startswith(url) and "not reachable" in str(err.value)
    code = main(["explain", "--input", url, "--bundle", str(tiny_bundle), "--out", str(tmp_path / "out"),
                 "--cache", str(tmp_path / "c")])
    stderr = capsys.readouterr().err.strip()
    assert code == 2 and len(stderr.splitlines()) == 1
    assert url in stderr and "not reachable" in stderr and PASSWORD not in stderr


def test_wrong_credentials_and_http_errors(orthanc, tmp_path, monkeypatch):
    server, studies = orthanc
    monkeypatch.setenv("C2F_MED_DICOMWEB_USER", USER)
    monkeypatch.setenv("C2F_MED_DICOMWEB_PASSWORD", "wrong-password")
    source = RemoteSource(DicomWebOptions(cache=tmp_path / "c"))
    with pytest.raises(DicomWebError, match="HTTP 401.*check the credentials") as err:
        source.fetch(studies["pacs_a"].url)
    assert "wrong-password" not in str(err.value)
    monkeypatch.setenv("C2F_MED_DICOMWEB_PASSWORD", PASSWORD)
    source = RemoteSource(DicomWebOptions(cache=tmp_path / "c"))  # a client is made with the credentials of its time
    missing = f"{server.root}/studies/{studies['pacs_a'].study}/series/1.2.3.999"
    with pytest.raises(DicomWebError, match="HTTP 404"):
        source.fetch(missing)
    assert not any((tmp_path / "c").rglob("*.dcm"))
    assert connect(server.root).search_for_studies()  # the right credentials work
