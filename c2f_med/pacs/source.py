"""Series on a DICOMweb server as inputs: retrieved into the cache, with the server's annotation as
the mask, the results stored back; for an audit, the next series retrieved while the current one is
explained.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from c2f_med.errors import InputError
from c2f_med.pacs.annotations import choose, find_annotations, seg_mask_series
from c2f_med.pacs.cache import ANNOTATION, DEFAULT_LIMIT, IMAGE, SeriesCache, default_cache_dir
from c2f_med.pacs.client import DicomWebError, SeriesRef, connect, is_dicomweb_url, server_call
from c2f_med.pacs.store import store_results

__all__ = ["DicomWebOptions", "Fetched", "RemoteSource", "RemoteInputs", "remote_inputs"]


@dataclass
class DicomWebOptions:
    """How DICOMweb inputs are handled.

    Attributes:
        cache: cache folder; limit: its size limit in bytes; keep: keep finished series in it.
        annotations: use the SEG / RTSTRUCT on the server that references the series as its mask.
        store: store the DICOM exports back into the study (STOW-RS).
        segment, roi: which segment (SEG) or ROI (RTSTRUCT) when several annotations reference a series.
    """

    cache: Path = field(default_factory=default_cache_dir)
    limit: int = DEFAULT_LIMIT
    keep: bool = False
    annotations: bool = False
    store: bool = False
    segment: str | None = None
    roi: str | None = None


@dataclass
class Fetched:
    """A series retrieved into the cache: the local series folder, the mask (or None), seconds spent."""

    ref: SeriesRef
    image: Path
    mask: Path | None
    seconds: float


class RemoteSource:
    """Retrieve series (and their annotations) into a :class:`SeriesCache`; store results back.

    Each thread gets its own HTTP session per server root.
    """

    def __init__(self, options: DicomWebOptions):
        self.options = options
        self.cache = SeriesCache(options.cache, options.limit, options.keep)
        self._local = threading.local()

    def client(self, root: str):
        clients = self._local.__dict__.setdefault("clients", {})
        if root not in clients:
            clients[root] = connect(root)
        return clients[root]

    def fetch(self, url: str, annotations: bool | None = None) -> Fetched:
        """Retrieve the series at ``url`` (WADO-RS) unless cached, and with ``annotations`` (default: the
        options') its SEG / RTSTRUCT as the mask. The series stays pinned until :meth:`release`.

        Raises:
            InputError: a bad URL, no or several annotations (listed); DicomWebError: server problems.
        """
        ref = SeriesRef.parse(url)
        start = time.perf_counter()
        self.cache.pin(ref)
        try:
            client = self.client(ref.root)
            image = self.cache.folder(ref) / IMAGE
            if not self.cache.has(ref):
                with server_call(ref.url, "retrieving the series (WADO-RS)"):
                    self.cache.store(ref, IMAGE, client.iter_series(ref.study, ref.series))
                if not any(image.iterdir()):
                    raise DicomWebError(ref.url, "the server returned no instances for this series")
            mask = None
            if self.options.annotations if annotations is None else annotations:
                mask = self._annotation(client, ref, image)
        except BaseException:
            self.cache.release(ref)
            raise
        return Fetched(ref, image, mask, time.perf_counter() - start)

    def _annotation(self, client, ref: SeriesRef, image: Path) -> Path:
        annotation, number = choose(find_annotations(client, ref), ref.url, self.options.segment, self.options.roi)
        url = f"{ref.root}/studies/{ref.study}/series/{annotation.series}"
        with server_call(url, "retrieving the annotation (WADO-RS)"):
            ds = client.retrieve_instance(ref.study, annotation.series, annotation.instance)
        file = self.cache.store(ref, ANNOTATION, [ds]) / "00000.dcm"
        if annotation.modality == "SEG":
            return seg_mask_series(file, sorted(image.iterdir()), number, file.parent / "mask") or file
        return file

    def store(self, fetched: Fetched, case_folder: Path, method: str, bundle) -> dict[str, int]:
        """STOW-RS the case's ``dicom/`` exports into the series' study (nothing already there is sent again).

        Raises:
            InputError: the case has no DICOM exports; DicomWebError: server problems.
        """
        exports = Path(case_folder) / "dicom"
        if not exports.is_dir() or not any(exports.rglob("*.dcm")):
            raise InputError(case_folder, "no DICOM exports to store back (--store-results)")
        return store_results(self.client(fetched.ref.root), fetched.ref, exports, method, bundle)

    def release(self, fetched: Fetched) -> None:
        """Done with the series: free its cache space (unless the cache keeps series)."""
        self.cache.release(fetched.ref)


class RemoteInputs:
    """DICOMweb items of an audit, retrieved one ahead in a background thread.

    :meth:`resolve` turns an item whose "image" is a series URL into one with the cached local folder
    (and the server's mask as "label" with ``options.annotations``), after starting the retrieval of
    the next URL item; :meth:`finish` stores the results and frees the cache. Items with local paths
    pass through unchanged. At most the current series and the next one are held at a time.
    """

    def __init__(self, items: Sequence[Mapping[str, Any]], options: DicomWebOptions):
        self.source = RemoteSource(options)
        self._items = [dict(item) for item in items if is_dicomweb_url(item["image"])]
        self._index = {item["case_id"]: i for i, item in enumerate(self._items)}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dicomweb-prefetch")
        self._futures: dict[str, Future[Fetched]] = {}
        self._held: dict[str, Fetched] = {}

    def _submit(self, position: int) -> None:
        if 0 <= position < len(self._items):
            item = self._items[position]
            if item["case_id"] not in self._futures and item["case_id"] not in self._held:
                self._futures[item["case_id"]] = self._pool.submit(self.source.fetch, item["image"])

    def resolve(self, item: Mapping[str, Any]) -> dict[str, Any]:
        """``item`` with local paths (blocks until its series is retrieved).

        Raises:
            InputError / DicomWebError: the retrieval's error (the case fails with it).
        """
        case = item["case_id"]
        if case not in self._index:
            return dict(item)
        for other in [c for c in self._held if c != case]:  # a case that failed before finish()
            self.source.release(self._held.pop(other))
        self._submit(self._index[case])
        self._submit(self._index[case] + 1)
        fetched = self._futures.pop(case).result()
        self._held[case] = fetched
        local = {**item, "image": str(fetched.image)}
        if fetched.mask is not None:
            local["label"] = str(fetched.mask)
        return local

    def finish(self, item: Mapping[str, Any], case_folder: Path, method: str, bundle) -> dict[str, Any]:
        """After a case is explained: store the results (``options.store``), free the cache.

        Returns ``{"retrieve_seconds", "stored_instances", "present_instances"}`` ({} for a local item).
        """
        fetched = self._held.get(item["case_id"])
        if fetched is None:
            return {}
        info: dict[str, Any] = {"retrieve_seconds": fetched.seconds}
        if self.source.options.store:
            info.update(self.source.store(fetched, case_folder, method, bundle))
        self.source.release(self._held.pop(item["case_id"]))
        return info

    def close(self) -> None:
        """Wait for a retrieval under way and free everything still held."""
        for case, future in self._futures.items():
            with contextlib.suppress(Exception):
                self._held[case] = future.result()
        self._futures.clear()
        self._pool.shutdown(wait=True)
        for fetched in self._held.values():
            self.source.release(fetched)
        self._held.clear()


@contextlib.contextmanager
def remote_inputs(items: Sequence[Mapping[str, Any]], options: DicomWebOptions | None,
                  rank: int | None = None) -> Iterator[RemoteInputs | None]:
    """:class:`RemoteInputs` for the items with series URLs (None when there are none); closed on exit.

    ``rank``: in a multi-process audit, each rank gets its own cache sub-folder ``rank<r>``.
    """
    if not any(is_dicomweb_url(item["image"]) for item in items):
        yield None
        return
    options = options or DicomWebOptions()
    if rank is not None:
        options = DicomWebOptions(**{**vars(options), "cache": Path(options.cache) / f"rank{rank}"})
    remote = RemoteInputs(items, options)
    try:
        yield remote
    finally:
        remote.close()
