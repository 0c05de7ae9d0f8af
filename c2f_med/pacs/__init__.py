"""Scans from a PACS over DICOMweb: search (QIDO-RS), retrieve (WADO-RS) into a bounded cache, use the
server's SEG / RTSTRUCT as masks, store the explanations back (STOW-RS), all with ``dicomweb-client``.

- :mod:`c2f_med.pacs.client`: client from a URL and credentials from the environment, one-line errors;
- :mod:`c2f_med.pacs.cache`: the size-bounded series cache;
- :mod:`c2f_med.pacs.annotations`: finding and choosing the annotations that reference a series;
- :mod:`c2f_med.pacs.store`: storing results once, under deterministic UIDs;
- :mod:`c2f_med.pacs.source`: series URLs as inputs, prefetched for audits;
- :mod:`c2f_med.pacs.cli`: the ``explain`` / ``audit`` options.
"""

from c2f_med.pacs.client import DicomWebError, SeriesRef, connect, is_dicomweb_url
from c2f_med.pacs.source import DicomWebOptions, RemoteInputs, RemoteSource, remote_inputs

__all__ = ["DicomWebError", "DicomWebOptions", "RemoteInputs", "RemoteSource", "SeriesRef", "connect",
           "is_dicomweb_url", "remote_inputs"]
