"""Retrieve vs explain seconds of one synthetic MR series audited from a loopback Orthanc.

Run from the repository root (needs Orthanc and its DICOMweb plugin):

    PYTHONPATH=$PWD python -m tests.pacs.loopback_timing OUT_FOLDER [METHOD]

It synthesises one MR case as a DICOM series (c2f-med synth, seed 3), uploads it to an Orthanc started on a
loopback port (the test fixture's OrthancServer), audits it with --dicomweb --store-results and prints the
retrieve and explain seconds from per_case.csv.
"""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

import pydicom
from dicomweb_client.api import DICOMwebClient

from c2f_med.cli import main
from tests.pacs.conftest import PASSWORD, USER, OrthancServer, _binary, _plugin


def measure(out: Path, method: str) -> str:
    """Run it; the line it prints."""
    out.mkdir(parents=True, exist_ok=True)
    assert main(["synth", "--out", str(out / "synth"), "--cases", "1", "--seed", "3", "--format", "dicom"]) == 0
    series = next((out / "synth" / "dicom").iterdir())
    server = OrthancServer(out, _binary(), _plugin())
    server.start()
    try:
        DICOMwebClient(server.root, session=server.session()).store_instances(
            [pydicom.dcmread(f) for f in sorted(series.iterdir())])
        os.environ.update(C2F_MED_DICOMWEB_USER=USER, C2F_MED_DICOMWEB_PASSWORD=PASSWORD)
        assert main(["audit", "--dicomweb", server.root, "--query", "Modality=MR", "--method", method,
                     "--out", str(out / "audit"), "--cache", str(out / "cache"), "--store-results"]) == 0
    finally:
        server.stop()
    with open(out / "audit" / "per_case.csv") as fh:
        row = next(csv.DictReader(fh))
    retrieve, explain = float(row["retrieve_seconds"]), float(row["explain_seconds"])
    slices = len(list(series.iterdir()))
    return (f"{slices} slices, method {method}: retrieve {retrieve:.2f} s, explain {explain:.1f} s "
            f"({retrieve / explain:.1%}), stored {row['stored_instances']} instance(s)")


if __name__ == "__main__":
    print(measure(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "c2f"))
