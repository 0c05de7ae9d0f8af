"""What every DICOM object c2f_med writes with highdicom shares: its equipment and new-instance identity,
and tolerance of one-component patient names."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import highdicom as hd

import c2f_med

__all__ = ["accepting_short_person_names", "new_instance"]


def new_instance(series_number: int) -> dict[str, Any]:
    """Keyword arguments of a highdicom constructor for the first instance of a new series written by
    this software: fresh series and SOP instance UIDs, the series number, and the General Equipment
    attributes (manufacturer, model, software version, device serial number)."""
    return {
        "series_instance_uid": hd.UID(),
        "series_number": series_number,
        "sop_instance_uid": hd.UID(),
        "instance_number": 1,
        "manufacturer": "c2f_med",
        "manufacturer_model_name": "C2F-Explainer",
        "software_versions": c2f_med.__version__,
        "device_serial_number": "0",
    }


@contextlib.contextmanager
def accepting_short_person_names() -> Iterator[None]:
    """Silence highdicom's warning on a one-component PatientName ("ANONYMOUS", many real IDs), which is
    valid DICOM."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The string .* is unlikely to represent the intended person name")
        yield
