"""The DICOMweb options of ``c2f-med explain`` and ``c2f-med audit``, and what they do before and after.

- ``explain --input {root}/studies/{S}/series/{R}``: the series is retrieved into the cache and read
  like a local folder; ``--mask server`` takes the SEG / RTSTRUCT on the server that references it;
  ``--store-results`` stores the DICOM exports back into the study (:func:`explain_input`).
- ``audit --dicomweb ROOT --query KEY=VALUE ...``: the QIDO-RS query's series are written as a
  datalist of series URLs, ``OUT/dicomweb_series.json``, and audited like any datalist
  (:func:`audit_datalist`); ``--annotations server`` and ``--store-results`` as for explain.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.datadict import tag_for_keyword

from c2f_med.atomic import write_json
from c2f_med.errors import InputError
from c2f_med.pacs.cache import DEFAULT_LIMIT, default_cache_dir, parse_size
from c2f_med.pacs.client import SeriesRef, check_root, connect, is_dicomweb_url, server_call
from c2f_med.pacs.source import DicomWebOptions, Fetched, RemoteSource

__all__ = ["QUERY_DATALIST", "SKIPPED_MODALITIES", "input_path", "add_explain_arguments", "add_audit_arguments",
           "options_from_args", "parse_query", "query_series", "audit_datalist", "ExplainInput", "explain_input"]

logger = logging.getLogger(__name__)

#: the datalist an audit over a DICOMweb query writes into its output folder
QUERY_DATALIST = "dicomweb_series.json"
#: series that are not scans: annotations, reports, presentation states, key objects
SKIPPED_MODALITIES = ("SEG", "RTSTRUCT", "SR", "PR", "KO", "REG")
SERVER = "server"


def input_path(text: str) -> str | Path:
    """``--input``: a DICOMweb series URL as given, else a local path."""
    return text if is_dicomweb_url(text) else Path(text)


def _add_if_absent(parser: argparse.ArgumentParser, flag: str, **kwargs: Any) -> None:
    """Add ``flag`` unless the parser has it already (the file-mask options may define it too)."""
    with contextlib.suppress(argparse.ArgumentError):
        parser.add_argument(flag, **kwargs)


def _common(group, parser: argparse.ArgumentParser) -> None:
    group.add_argument("--store-results", action="store_true",
                       help="store the DICOM exports back into the scan's study with STOW-RS, as new series "
                            "(nothing already there is stored again)")
    group.add_argument("--cache", type=Path, default=None,
                       help=f"folder for retrieved series (default $C2F_MED_DICOMWEB_CACHE or {default_cache_dir()})")
    group.add_argument("--cache-limit", type=parse_size, default=DEFAULT_LIMIT, metavar="SIZE",
                       help="size limit of the cache, oldest series evicted first (default 2GB)")
    group.add_argument("--keep-cache", action="store_true", help="keep finished series in the cache")
    _add_if_absent(parser, "--segment", help="the SEG segment to use as the mask: number or label")
    _add_if_absent(parser, "--roi", help="the RTSTRUCT ROI to use as the mask: number or name")


def add_explain_arguments(parser: argparse.ArgumentParser) -> None:
    """DICOMweb options of ``explain`` (its ``--input`` may be a series URL, its ``--mask`` "server")."""
    group = parser.add_argument_group(
        "DICOMweb", "--input {root}/studies/{StudyInstanceUID}/series/{SeriesInstanceUID} reads a series from a "
                    "DICOMweb server; --mask server uses the DICOM SEG / RTSTRUCT there that references it. "
                    "Credentials: C2F_MED_DICOMWEB_TOKEN, C2F_MED_DICOMWEB_USER / C2F_MED_DICOMWEB_PASSWORD or "
                    "C2F_MED_DICOMWEB_CREDENTIALS (a JSON file), never on the command line")
    _common(group, parser)


def add_audit_arguments(parser: argparse.ArgumentParser) -> None:
    """DICOMweb options of ``audit``."""
    group = parser.add_argument_group(
        "DICOMweb", "audit the series a QIDO-RS query finds on a DICOMweb server (instead of --datalist; a "
                    "datalist may also list series URLs). Credentials as for explain")
    group.add_argument("--dicomweb", metavar="ROOT", help="the server's DICOMweb root, e.g. http://pacs:8042/dicom-web")
    group.add_argument("--query", action="append", default=[], metavar="KEY=VALUE",
                       help="QIDO-RS filter (DICOM keyword), e.g. Modality=MR, StudyDate=20240101-20241231; repeatable")
    group.add_argument("--annotations", choices=(SERVER,),
                       help="server: score against the DICOM SEG / RTSTRUCT on the server that references each series")
    _common(group, parser)


def options_from_args(a: argparse.Namespace) -> DicomWebOptions:
    return DicomWebOptions(cache=a.cache or default_cache_dir(), limit=a.cache_limit, keep=a.keep_cache,
                           annotations=getattr(a, "annotations", None) == SERVER
                           or str(getattr(a, "mask", "")) == SERVER,
                           store=a.store_results, segment=a.segment, roi=a.roi)


def parse_query(items: list[str]) -> dict[str, str]:
    """``["Modality=MR", "StudyDate=20240101-20241231"]`` -> QIDO-RS search filters.

    Raises:
        InputError: not KEY=VALUE, or KEY not a DICOM keyword.
    """
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise InputError(None, f"--query {item!r}: expected KEY=VALUE, e.g. Modality=MR")
        if tag_for_keyword(key) is None:
            raise InputError(None, f"--query {item!r}: {key} is not a DICOM attribute keyword")
        out[key] = value
    return out


def query_series(root: str, filters: dict[str, str]) -> list[str]:
    """Series URLs of the scans matching ``filters`` (QIDO-RS over all studies), sorted by study and series.

    Annotation, report and presentation series (:data:`SKIPPED_MODALITIES`) and c2f_med's own result
    series are left out.
    """
    root = check_root(root)
    client = connect(root)
    with server_call(f"{root}/series", "searching (QIDO-RS)"):
        found = client.search_for_series(search_filters=filters, get_remaining=True,
                                         fields=["StudyInstanceUID", "Modality", "SeriesDescription"])

    def value(item: dict, tag: str) -> str:
        return str(((item.get(tag) or {}).get("Value") or [""])[0])

    refs = {SeriesRef(root, value(s, "0020000D"), value(s, "0020000E")) for s in found
            if value(s, "00080060") not in SKIPPED_MODALITIES
            and not value(s, "0008103E").startswith("c2f_med saliency")}
    return [r.url for r in sorted(refs, key=lambda r: (r.study, r.series))]


def audit_datalist(a: argparse.Namespace) -> Path | None:
    """``--datalist``, or with ``--dicomweb`` the query's series written as ``OUT/dicomweb_series.json``.

    Raises:
        InputError: both or neither source, --query without --dicomweb, a bad query, server problems.
    """
    if a.dicomweb is None:
        if a.query:
            raise InputError(None, "--query needs --dicomweb ROOT")
        return a.datalist
    if a.datalist is not None:
        raise InputError(None, "give --datalist or --dicomweb, not both")
    urls = query_series(a.dicomweb, parse_query(a.query))
    if not urls:
        raise InputError(None, f"{check_root(a.dicomweb)}: no series matches {' '.join(a.query) or 'the query'}")
    path = Path(a.out) / QUERY_DATALIST
    write_json(path, {"name": "DICOMweb query", "query": parse_query(a.query), a.section: [{"image": u} for u in urls]})
    logger.info("%d series match the query", len(urls))
    return path


@dataclass
class ExplainInput:
    """What ``explain`` reads: a local scan and mask, or a server's series retrieved into the cache."""

    image: str | Path
    mask: Path | None
    case_id: str | None = None
    source: RemoteSource | None = None
    fetched: Fetched | None = None

    def finish(self, case_folder: Path, method: str, bundle) -> None:
        """With ``--store-results``: store the case's DICOM exports into the series' study."""
        if self.source is not None and self.fetched is not None and self.source.options.store:
            counts = self.source.store(self.fetched, case_folder, method, bundle)
            print(f"stored {counts['stored_instances']} result instance(s) into the study "
                  f"({counts['present_instances']} already there)")


@contextlib.contextmanager
def explain_input(a: argparse.Namespace) -> Iterator[ExplainInput]:
    """``explain``'s input: a series URL is retrieved (and released afterwards); a path passes through.

    Raises:
        InputError: --mask server or --store-results without a series URL; retrieval problems.
    """
    if not is_dicomweb_url(a.input):
        if str(a.mask) == SERVER or a.store_results:
            raise InputError(None, "--mask server and --store-results need a DICOMweb series URL as --input")
        yield ExplainInput(a.input, a.mask)
        return
    options = options_from_args(a)
    source = RemoteSource(options)
    fetched = source.fetch(a.input)
    try:
        mask = fetched.mask if options.annotations else a.mask
        yield ExplainInput(fetched.image, mask, fetched.ref.series, source, fetched)
    finally:
        source.release(fetched)
