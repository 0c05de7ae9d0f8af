"""A size-bounded folder of series retrieved with WADO-RS, evicted oldest first.

Layout::

    CACHE/<StudyInstanceUID>/<SeriesInstanceUID>/image/00000.dcm, ...   the series, read as a local folder
    CACHE/<StudyInstanceUID>/<SeriesInstanceUID>/annotation/...         the SEG / RTSTRUCT used as its mask

A series folder appears complete or not at all (written to a hidden sibling and renamed), so a
killed run leaves no half series; a rerun finds complete series and does not retrieve them again.
Series in use (:meth:`SeriesCache.pin`) are never evicted. :meth:`SeriesCache.release` removes a
finished series (and its study folder once empty) unless the cache was asked to keep them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
from collections.abc import Iterable
from pathlib import Path

from pydicom.dataset import Dataset

from c2f_med.atomic import atomic_dir
from c2f_med.pacs.client import SeriesRef

__all__ = ["DEFAULT_LIMIT", "IMAGE", "ANNOTATION", "SeriesCache", "default_cache_dir", "parse_size"]

logger = logging.getLogger(__name__)

#: default size limit of the cache: 2 GiB
DEFAULT_LIMIT = 2 * 1024**3
IMAGE, ANNOTATION = "image", "annotation"
_UNITS = {"": 1, "B": 1, "K": 1024, "KB": 1024, "M": 1024**2, "MB": 1024**2, "G": 1024**3, "GB": 1024**3,
          "T": 1024**4, "TB": 1024**4}


def default_cache_dir() -> Path:
    """``$C2F_MED_DICOMWEB_CACHE``, else ``$XDG_CACHE_HOME/c2f_med/dicomweb`` (``~/.cache/...``)."""
    if os.environ.get("C2F_MED_DICOMWEB_CACHE"):
        return Path(os.environ["C2F_MED_DICOMWEB_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "c2f_med" / "dicomweb"


def parse_size(text: str) -> int:
    """``"500MB"``, ``"2G"``, ``"1048576"`` -> bytes (binary units).

    Raises:
        ValueError: not a size.
    """
    value = text.strip().upper().replace("I", "")  # GiB == GB here
    number = value.rstrip("KMGTB")
    unit = value[len(number):]
    if unit not in _UNITS or not number:
        raise ValueError(f"not a size: {text!r} (e.g. 500MB, 2GB)")
    return int(float(number) * _UNITS[unit])


def _size(folder: Path) -> int:
    """Bytes of the files under ``folder``; files that vanish meanwhile (another thread's temporary
    folder being renamed or removed) count 0."""
    total = 0
    for file in folder.rglob("*"):
        with contextlib.suppress(FileNotFoundError):
            total += file.stat().st_size if file.is_file() else 0
    return total


class SeriesCache:
    """Series on disk under ``root``, at most ``limit`` bytes of unpinned ones, oldest evicted first.

    Thread-safe: an audit retrieves the next series in a background thread while the current one is
    explained.

    Args:
        root: the cache folder (created).
        limit: size limit in bytes; a single series larger than it is kept while in use (with a warning).
        keep: keep finished series (:meth:`release` then only unpins them; eviction still applies).
    """

    def __init__(self, root: str | os.PathLike, limit: int = DEFAULT_LIMIT, keep: bool = False):
        self.root = Path(root)
        self.limit = int(limit)
        self.keep = keep
        self._pinned: dict[Path, int] = {}
        self._lock = threading.RLock()

    def folder(self, ref: SeriesRef) -> Path:
        """The series' container folder (``image/`` and ``annotation/`` inside)."""
        return self.root / ref.study / ref.series

    def has(self, ref: SeriesRef) -> bool:
        return (self.folder(ref) / IMAGE).is_dir()

    def pin(self, ref: SeriesRef) -> None:
        """Protect the series from eviction until :meth:`release`; marks it as the newest."""
        with self._lock:
            folder = self.folder(ref)
            self._pinned[folder] = self._pinned.get(folder, 0) + 1
            if folder.is_dir():
                os.utime(folder)

    def store(self, ref: SeriesRef, part: str, datasets: Iterable[Dataset]) -> Path:
        """Write ``datasets`` as ``<series>/<part>/00000.dcm, 00001.dcm, ...`` in the order given (the part
        replaced atomically), then evict down to the limit; returns the part's folder. The series should
        be pinned."""
        target = self.folder(ref) / part
        with atomic_dir(target) as tmp:
            for k, ds in enumerate(datasets):
                ds.save_as(tmp / f"{k:05d}.dcm", enforce_file_format=True)
        os.utime(self.folder(ref))
        self.evict()
        return target

    def release(self, ref: SeriesRef) -> None:
        """Unpin the series; remove it (and its study folder once empty) unless ``keep``."""
        with self._lock:
            folder = self.folder(ref)
            count = self._pinned.get(folder, 0) - 1
            if count > 0:
                self._pinned[folder] = count
                return
            self._pinned.pop(folder, None)
            if not self.keep:
                self._remove(folder)

    def evict(self) -> list[Path]:
        """Remove unpinned series, least recently used first, until the cache fits its limit; returns them."""
        with self._lock:
            entries = []
            for folder in self.root.glob("*/*"):
                with contextlib.suppress(FileNotFoundError):
                    entries.append((folder.stat().st_mtime, folder, _size(folder)))
            total = sum(size for _, _, size in entries)
            removed = []
            for _, folder, size in sorted(entries, key=lambda e: e[0]):
                if total <= self.limit:
                    break
                if folder in self._pinned:
                    continue
                self._remove(folder)
                total -= size
                removed.append(folder)
            if total > self.limit:
                logger.warning("DICOMweb cache %s holds %.1f MB of series in use, over its limit of %.1f MB",
                               self.root, total / 1e6, self.limit / 1e6)
            return removed

    def size(self) -> int:
        """Bytes held now."""
        return _size(self.root) if self.root.is_dir() else 0

    def _remove(self, folder: Path) -> None:
        shutil.rmtree(folder, ignore_errors=True)
        study = folder.parent  # removed once empty, unless another series of it is on its way in
        if study.is_dir() and not any(study.iterdir()) and not any(p.parent == study for p in self._pinned):
            study.rmdir()
