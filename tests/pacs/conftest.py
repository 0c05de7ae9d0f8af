"""A real Orthanc PACS with its DICOMweb plugin on a loopback port, loaded with tiny synthetic studies.

The session fixture :func:`orthanc` writes an Orthanc configuration (a free 127.0.0.1 port, no DICOM
port, storage in a temporary folder, HTTP basic authentication with a test user), starts the
server, waits for it (at most :data:`START_TIMEOUT` seconds), uploads the studies of :data:`CASES`
(c2f_med's DICOM series writer), a DICOM SEG of each lesion (highdicom) and, for one, an RTSTRUCT
as well, and stops the server at
the end. Tests are skipped, with the reason, only where the Orthanc binary or its DICOMweb plugin
is not installed (Debian packages ``orthanc`` and ``orthanc-dicomweb``).
"""

from __future__ import annotations

import glob
import json
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import requests
from pydicom.sr.codedict import codes

from c2f_med.synth.writers import write_dicom_series

START_TIMEOUT = 30.0
USER, PASSWORD = "c2f-tester", "not-a-real-secret-7f3a"
PLUGIN_GLOBS = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so*", "/usr/lib/orthanc/libOrthancDicomWeb.so*",
                "/usr/lib/x86_64-linux-gnu/orthanc/libOrthancDicomWeb.so*")

#: tiny cases: name -> (shape, lesion box, StudyDate, SEG segment labels)
CASES = {
    "pacs_a": ((24, 22, 8), (slice(6, 12), slice(5, 11), slice(2, 5)), "20240105", ("lesion",)),
    "pacs_b": ((22, 24, 7), (slice(10, 16), slice(12, 18), slice(3, 5)), "20240620", ("lesion", "oedema")),
    "pacs_old": ((20, 20, 6), (slice(5, 9), slice(5, 9), slice(2, 4)), "20230101", ("lesion",)),
}


def _binary() -> str | None:
    return shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc",) if Path(p).is_file()), None)


def _plugin() -> str | None:
    return next((p for pattern in PLUGIN_GLOBS for p in sorted(glob.glob(pattern))), None)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OrthancServer:
    """One Orthanc process on 127.0.0.1; :meth:`stop` and :meth:`start` again keep its storage and port."""

    def __init__(self, folder: Path, binary: str, plugin: str):
        self.folder, self.binary = folder, binary
        self.port = _free_port()
        self.config = folder / "orthanc.json"
        self.log = folder / "orthanc.log"
        self.config.write_text(json.dumps({
            "Name": "c2f_med_test", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
            "HttpPort": self.port, "DicomServerEnabled": False, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD}, "Plugins": [plugin],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
            "HttpThreadsCount": 8, "ConcurrentJobs": 1, "StorageCompression": False,
        }))
        self.process: subprocess.Popen | None = None

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}/dicom-web"

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([self.binary, str(self.config)], stdout=log, stderr=subprocess.STDOUT,
                                            cwd=self.folder)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}: {self.log.read_text()[-2000:]}")
            try:
                if requests.get(f"http://127.0.0.1:{self.port}/system", auth=(USER, PASSWORD), timeout=1).ok:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {START_TIMEOUT} s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self.process = None

    def session(self) -> requests.Session:
        session = requests.Session()
        session.auth = (USER, PASSWORD)
        return session


@dataclass
class Study:
    """A case uploaded to the server: its series URL, the local series folder and its lesion mask."""

    name: str
    url: str
    study: str
    series: str
    folder: Path
    mask: np.ndarray  # X x Y x Z on the written volume's grid
    seg_series: list[str] = field(default_factory=list)


def write_case(folder: Path, name: str, shape, lesion, date: str) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    grid = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    head = sum(g**2 / r**2 for g, r in zip(grid, (0.9, 0.9, 1.4))) <= 1
    image = np.where(head, 600 + 20 * rng.standard_normal(shape), 0)
    mask = np.zeros(shape, dtype=np.uint8)
    mask[lesion] = 1
    image[lesion] += 600
    series = write_dicom_series(folder / name, image.astype(np.int16), np.diag([1.5, 1.5, 3.0, 1.0]), case_id=name)
    for file in series.iterdir():
        ds = pydicom.dcmread(file)
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
        ds.save_as(file, enforce_file_format=True)
    return series, mask


def make_seg(sources: list[pydicom.Dataset], masks: list[np.ndarray], labels: tuple[str, ...], number: int):
    """A binary SEG (highdicom) of ``masks`` (each slices x rows x columns, in ``sources`` order)."""
    descriptions = [hd.seg.SegmentDescription(
        segment_number=i + 1, segment_label=label,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
        for i, label in enumerate(labels)]
    pixels = np.stack(masks, axis=-1).astype(np.uint8)
    return hd.seg.Segmentation(
        source_images=sources, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=50 + number,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="c2f_med tests",
        manufacturer_model_name="tests", software_versions="1", device_serial_number="1",
        series_description=f"annotation {number}")


def make_rtstruct(sources: list[pydicom.Dataset], roi_name: str) -> pydicom.Dataset:
    """A minimal RT Structure Set referencing the series of ``sources``: one closed square contour
    on the middle slice, ROI 1 named ``roi_name`` (what the server search needs, not a full contour set)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, RTStructureSetStorage, generate_uid

    first, middle = sources[0], sources[len(sources) // 2]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RTStructureSetStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = RTStructureSetStorage, generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                    "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName"):
        setattr(ds, keyword, getattr(first, keyword))
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "RTSTRUCT", generate_uid(), 60
    ds.SeriesDescription, ds.StructureSetLabel, ds.Manufacturer = "contours", "contours", "c2f_med tests"
    ds.StructureSetDate, ds.StructureSetTime, ds.OperatorsName = first.StudyDate, "000000", ""
    image = Dataset()
    image.ReferencedSOPClassUID, image.ReferencedSOPInstanceUID = middle.SOPClassUID, middle.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID, series.ContourImageSequence = first.SeriesInstanceUID, [image]
    study = Dataset()
    study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management (retired, as customary)
    study.ReferencedSOPInstanceUID, study.RTReferencedSeriesSequence = first.StudyInstanceUID, [series]
    frame = Dataset()
    frame.FrameOfReferenceUID, frame.RTReferencedStudySequence = first.FrameOfReferenceUID, [study]
    ds.ReferencedFrameOfReferenceSequence = [frame]
    roi = Dataset()
    roi.ROINumber, roi.ReferencedFrameOfReferenceUID = 1, first.FrameOfReferenceUID
    roi.ROIName, roi.ROIGenerationAlgorithm = roi_name, "MANUAL"
    ds.StructureSetROISequence = [roi]
    x, y, z = (float(v) for v in middle.ImagePositionPatient)
    contour = Dataset()
    contour.ContourGeometricType, contour.NumberOfContourPoints = "CLOSED_PLANAR", 4
    contour.ContourData = [x, y, z, x + 6, y, z, x + 6, y + 6, z, x, y + 6, z]
    contour.ContourImageSequence = [image]
    roi_contour = Dataset()
    roi_contour.ReferencedROINumber, roi_contour.ROIDisplayColor = 1, [255, 0, 0]
    roi_contour.ContourSequence = [contour]
    ds.ROIContourSequence = [roi_contour]
    observation = Dataset()
    observation.ObservationNumber, observation.ReferencedROINumber = 1, 1
    observation.RTROIInterpretedType, observation.ROIInterpreter = "ORGAN", ""
    ds.RTROIObservationsSequence = [observation]
    return ds


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory):
    """A running :class:`OrthancServer` loaded with :data:`CASES`; yields ``(server, {name: Study})``."""
    binary, plugin = _binary(), _plugin()
    if binary is None or plugin is None:
        pytest.skip("Orthanc or its DICOMweb plugin is not installed (Debian packages orthanc, orthanc-dicomweb)")
    from dicomweb_client.api import DICOMwebClient

    folder = tmp_path_factory.mktemp("orthanc")
    server = OrthancServer(folder, binary, plugin)
    server.start()
    try:
        client = DICOMwebClient(server.root, session=server.session())
        studies = {}
        for name, (shape, lesion, date, labels) in CASES.items():
            series, mask = write_case(folder / "series", name, shape, lesion, date)
            sources = sorted((pydicom.dcmread(f) for f in series.iterdir()), key=lambda d: int(d.InstanceNumber))
            client.store_instances(sources)
            # the writer stores volume[:, :, k].T in file k, maybe flipped in-plane: take the mask from the pixels
            planes = [(ds.pixel_array > 1000) for ds in sources]
            extra = [np.zeros_like(p) for p in planes]
            extra[len(extra) // 2][:3, :3] = True  # a second, different segment for the selection tests
            seg = make_seg(sources, [np.stack(planes)] + ([np.stack(extra)] if len(labels) > 1 else []), labels, 1)
            client.store_instances([seg])
            if name == "pacs_old":  # an RTSTRUCT as well: two kinds of annotation to choose from
                client.store_instances([make_rtstruct(sources, "GTV")])
            study = Study(name, f"{server.root}/studies/{sources[0].StudyInstanceUID}/series/"
                                f"{sources[0].SeriesInstanceUID}", sources[0].StudyInstanceUID,
                          sources[0].SeriesInstanceUID, series, mask, [seg.SeriesInstanceUID])
            studies[name] = study
        yield server, studies
    finally:
        server.stop()


@pytest.fixture
def credentials(monkeypatch):
    """The test user's credentials in the environment, as a user would give them."""
    monkeypatch.setenv("C2F_MED_DICOMWEB_USER", USER)
    monkeypatch.setenv("C2F_MED_DICOMWEB_PASSWORD", PASSWORD)
    for name in ("C2F_MED_DICOMWEB_TOKEN", "C2F_MED_DICOMWEB_CREDENTIALS"):
        monkeypatch.delenv(name, raising=False)
