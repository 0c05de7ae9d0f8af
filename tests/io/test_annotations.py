"""Lesion masks as NIfTI, NRRD, .seg.nrrd, DICOM SEG (highdicom) and RTSTRUCT (rt-utils, and a hand-made
polygon): all land on the scan's grid as the same mask and give the same scores."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes

from c2f_med.errors import InputError, find_input_error
from c2f_med.io.annotations import ReadMask, mask_kind
from c2f_med.io.transforms import ReadScan, load_case_transforms
from c2f_med.synth.writers import write_dicom_series, write_nifti

SHAPE = (12, 10, 6)
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def oblique_affine() -> np.ndarray:
    """Voxel to RAS: rotated off the axes, axes permuted and mirrored, square pixels (rt-utils needs them)."""
    angle = 0.35
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
    axes = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, 1.0], [-1.0, 0.0, 0.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ axes @ np.diag([1.5, 1.5, 2.5])
    affine[:3, 3] = (12.5, -30.0, 7.25)
    return affine


def lesion_mask() -> np.ndarray:
    """A box and a ball on the scan's file grid (X x Y x Z), bool."""
    mask = np.zeros(SHAPE, dtype=bool)
    mask[3:8, 2:6, 2:4] = True
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij"), -1)
    mask |= np.linalg.norm((grid - (8, 6, 4)) / (2.2, 2.2, 1.0), axis=-1) <= 1.0
    return mask


def other_mask() -> np.ndarray:
    mask = np.zeros(SHAPE, dtype=bool)
    mask[0:2, 0:2, 0:2] = True
    return mask


def write_sitk(path: Path, array: np.ndarray, affine_ras: np.ndarray, meta: dict[str, str] | None = None) -> Path:
    """An ITK image (NRRD, MHA) of an X x Y x Z array with a RAS affine."""
    lps = RAS_TO_LPS @ affine_ras
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.T))
    image.SetSpacing(spacing.tolist())
    image.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    for key, value in (meta or {}).items():
        image.SetMetaData(key, value)
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


def write_seg(path: Path, sources: list[Dataset], masks: dict[str, np.ndarray], fractional: bool = False) -> Path:
    """A DICOM SEG (highdicom) with one segment per ``masks`` item; sources in InstanceNumber order (= Z)."""
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=n, segment_label=label,
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Lesion, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
        for n, label in enumerate(masks, start=1)]
    pixels = np.stack([m.transpose(2, 1, 0) for m in masks.values()], axis=-1)  # Z x rows x columns x segments
    pixels = pixels.astype(np.float32) * 0.8 if fractional else pixels.astype(np.uint8)
    kind = hd.seg.SegmentationTypeValues.FRACTIONAL if fractional else hd.seg.SegmentationTypeValues.BINARY
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=pixels, segmentation_type=kind, segment_descriptions=descriptions,
            series_instance_uid=hd.UID(), series_number=77, sop_instance_uid=hd.UID(), instance_number=1,
            manufacturer="test", manufacturer_model_name="test", software_versions="0", device_serial_number="0")
    seg.save_as(path)
    return path


def write_polygon_rtstruct(path: Path, frame_of_reference: str, polygons_lps: list[np.ndarray]) -> Path:
    """A minimal RTSTRUCT with one ROI ("triangle", number 7) made of the given closed planar contours."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = hd.UID()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.Modality = "RTSTRUCT"
    roi = Dataset()
    roi.ROINumber, roi.ROIName, roi.ReferencedFrameOfReferenceUID = 7, "triangle", frame_of_reference
    ds.StructureSetROISequence = Sequence([roi])
    contours = []
    for points in polygons_lps:
        contour = Dataset()
        contour.ContourGeometricType = "CLOSED_PLANAR"
        contour.NumberOfContourPoints = len(points)
        contour.ContourData = [f"{v:.6f}" for v in points.ravel()]
        contours.append(contour)
    item = Dataset()
    item.ReferencedROINumber = 7
    item.ContourSequence = Sequence(contours)
    ds.ROIContourSequence = Sequence([item])
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def case(tmp_path) -> dict[str, Path]:
    """A classic series and the same lesion annotation in every format."""
    volume = (100 + 400 * lesion_mask() + np.random.default_rng(0).integers(0, 50, SHAPE)).astype(np.int16)
    series = write_dicom_series(tmp_path / "series", volume, oblique_affine(), case_id="annotations-test")
    sources = [pydicom.dcmread(f) for f in sorted(series.iterdir())]
    sources.sort(key=lambda ds: int(ds.InstanceNumber))
    scan = ReadScan()(series)
    affine = scan.affine.numpy()
    mask = lesion_mask()
    paths = {"series": series, "nifti": write_nifti(tmp_path / "lesion.nii.gz", mask.astype(np.uint8), affine)}
    paths["nrrd"] = write_sitk(tmp_path / "lesion.nrrd", mask.astype(np.uint8), affine)
    paths["mha"] = write_sitk(tmp_path / "lesion.mha", mask.astype(np.uint8), affine)
    labels = mask.astype(np.uint8) + 2 * other_mask()
    slicer = {"Segment0_ID": "Segment_1", "Segment0_Name": "lesion", "Segment0_LabelValue": "1",
              "Segment0_Layer": "0", "Segment1_ID": "Segment_2", "Segment1_Name": "other",
              "Segment1_LabelValue": "2", "Segment1_Layer": "0"}
    paths["seg_nrrd"] = write_sitk(tmp_path / "lesion.seg.nrrd", labels, affine, slicer)
    paths["seg"] = write_seg(tmp_path / "lesion_seg.dcm", sources, {"lesion": mask, "other": other_mask()})
    paths["seg_fractional"] = write_seg(tmp_path / "lesion_fseg.dcm", sources, {"lesion": mask}, fractional=True)
    paths["rtstruct"] = write_rtutils(tmp_path / "lesion_rt.dcm", series, sources, mask)
    return paths


def write_rtutils(path: Path, series: Path, sources: list[Dataset], mask: np.ndarray) -> Path:
    """An RTSTRUCT made by rt-utils from the mask (rt-utils indexes rows x columns x slices by position)."""
    rt_utils = pytest.importorskip("rt_utils")
    normal = np.cross(*np.asarray(sources[0].ImageOrientationPatient, dtype=float).reshape(2, 3))
    order = np.argsort([np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=float)) for ds in sources])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rtstruct = rt_utils.RTStructBuilder.create_new(dicom_series_path=str(series))
        rtstruct.add_roi(mask=mask.transpose(1, 0, 2)[:, :, order], name="lesion", approximate_contours=False)
        rtstruct.add_roi(mask=other_mask().transpose(1, 0, 2)[:, :, order], name="other", approximate_contours=False)
        rtstruct.save(str(path))
    return path


def test_every_format_gives_the_mask_on_the_scan_grid(case):
    scan = ReadScan()(case["series"])
    expected = lesion_mask()
    choices = {"seg": {"segment": "lesion"}, "seg_nrrd": {"segment": "1"}, "rtstruct": {"roi": "lesion"}}
    for kind in ("nifti", "nrrd", "mha", "seg_nrrd", "seg", "seg_fractional", "rtstruct"):
        mask = ReadMask(**choices.get(kind, {}))(case[kind], scan)
        assert tuple(mask.shape) == (1, *SHAPE), kind
        np.testing.assert_allclose(mask.affine.numpy(), scan.affine.numpy(), atol=1e-4, err_msg=kind)
        np.testing.assert_array_equal(mask[0].numpy() > 0, expected, err_msg=kind)
    assert mask_kind(case["seg"]) == "seg" and mask_kind(case["rtstruct"]) == "rtstruct"
    folder = case["seg_fractional"].parent / "seg_folder"  # a PACS export: a folder holding the one SEG file
    folder.mkdir()
    (folder / "IM0001").write_bytes(case["seg_fractional"].read_bytes())
    np.testing.assert_array_equal(ReadMask()(folder, scan)[0].numpy() > 0, expected)


def test_segments_and_rois_are_listed_and_chosen_by_number_or_name(case):
    scan = ReadScan()(case["series"])
    with pytest.raises(InputError, match=r"2 segments in this file, choose one with --segment .*: 1 'lesion'; 2 'oth"):
        ReadMask()(case["seg"], scan)
    with pytest.raises(InputError, match=r"2 ROIs in this file, choose one with --roi .*'lesion'.*'other'"):
        ReadMask()(case["rtstruct"], scan)
    with pytest.raises(InputError, match=r"no segment 'liver' in this file; found: 1 'lesion'; 2 'other'"):
        ReadMask(segment="liver")(case["seg"], scan)
    np.testing.assert_array_equal(ReadMask(segment=2)(case["seg"], scan)[0].numpy() > 0, other_mask())
    np.testing.assert_array_equal(ReadMask(segment="other")(case["seg_nrrd"], scan)[0].numpy() > 0, other_mask())
    np.testing.assert_array_equal(ReadMask(roi="Other")(case["rtstruct"], scan)[0].numpy() > 0, other_mask())


def test_a_known_polygon_is_rasterised_with_its_boundary(case, tmp_path):
    scan = ReadScan()(case["series"])
    lps = RAS_TO_LPS @ scan.affine.numpy()
    vertices = np.array([(2, 1), (9, 1), (2, 8)], dtype=float)  # voxel (i, j) on slice k = 3
    points = np.c_[vertices, np.full(3, 3.0), np.ones(3)] @ lps.T
    frame = pydicom.dcmread(next(case["series"].iterdir())).FrameOfReferenceUID
    path = write_polygon_rtstruct(tmp_path / "triangle.dcm", frame, [points[:, :3]])
    mask = ReadMask()(path, scan)[0].numpy() > 0
    i, j = np.meshgrid(np.arange(SHAPE[0]), np.arange(SHAPE[1]), indexing="ij")
    expected = np.zeros(SHAPE, dtype=bool)
    expected[..., 3] = (i >= 2) & (j >= 1) & ((i - 2) + (j - 1) <= 7)
    np.testing.assert_array_equal(mask, expected)
    # the same polygon half a voxel off the slices is refused, naming both files
    shifted = np.c_[vertices, np.full(3, 3.5), np.ones(3)] @ lps.T
    path = write_polygon_rtstruct(tmp_path / "between.dcm", frame, [shifted[:, :3]])
    with pytest.raises(InputError, match=r"between.dcm: contour 1 of ROI 7 does not lie on a slice of .*series"):
        ReadMask()(path, scan)


def test_another_frame_of_reference_or_grid_is_refused_naming_both_files(case, tmp_path):
    scan = ReadScan()(case["series"])
    other = write_dicom_series(tmp_path / "other", np.ones(SHAPE, np.int16), oblique_affine(), case_id="other-case")
    sources = sorted((pydicom.dcmread(f) for f in other.iterdir()), key=lambda ds: int(ds.InstanceNumber))
    seg = write_seg(tmp_path / "other_seg.dcm", sources, {"lesion": lesion_mask()})
    with pytest.raises(InputError, match=r"other_seg.dcm: its Frame of Reference differs from that of .*series"):
        ReadMask()(seg, scan)
    shifted = oblique_affine()
    shifted[:3, 3] += 0.5 * shifted[:3, 0]  # half a voxel along i: same frame of reference, another grid
    other = write_dicom_series(tmp_path / "shifted", np.ones(SHAPE, np.int16), shifted, case_id="annotations-test")
    sources = sorted((pydicom.dcmread(f) for f in other.iterdir()), key=lambda ds: int(ds.InstanceNumber))
    for ds in sources:
        ds.FrameOfReferenceUID = pydicom.dcmread(next(case["series"].iterdir())).FrameOfReferenceUID
    seg = write_seg(tmp_path / "shifted_seg.dcm", sources, {"lesion": lesion_mask()})
    with pytest.raises(InputError, match=r"shifted_seg.dcm: its frames are not on the voxel grid of .*series"):
        ReadMask()(seg, scan)


def test_seg_is_placed_on_a_multiframe_or_nifti_scan_too(case, tmp_path):
    sources = sorted((pydicom.dcmread(f) for f in case["series"].iterdir()), key=lambda ds: int(ds.InstanceNumber))
    enhanced = hd.legacy.LegacyConvertedEnhancedMRImage(sources, hd.UID(), 5, hd.UID(), 1)
    enhanced.save_as(tmp_path / "enhanced.dcm")
    scan = ReadScan()(case["series"])
    nifti = write_nifti(tmp_path / "scan.nii.gz", scan[0].numpy().astype(np.int16), scan.affine.numpy())
    for path in (tmp_path / "enhanced.dcm", nifti):
        data = load_case_transforms(keys=("image", "label"))({"image": str(path), "label": str(case["seg"]),
                                                              "segment": "lesion"})
        reference = load_case_transforms(keys=("image", "label"))({"image": str(path), "label": str(case["nifti"])})
        np.testing.assert_array_equal(data["label"].numpy(), reference["label"].numpy())
        assert int(data["label"].sum()) == int(lesion_mask().sum())


def test_the_same_annotation_in_every_format_gives_identical_scores(case, tiny_bundle, tmp_path):
    from c2f_med.case import explain_case
    from c2f_med.models.bundle import load_bundle

    bundle = load_bundle(tiny_bundle, "cpu")
    options = {"seg": {"segment": "lesion"}, "seg_nrrd": {"segment": "lesion"}, "rtstruct": {"roi": "lesion"}}
    scores = {}
    for kind in ("nifti", "seg", "rtstruct", "nrrd", "seg_nrrd"):
        result = explain_case(bundle, case["series"], tmp_path / "out", mask=case[kind], method="rollout",
                              case_id=kind, progress=False, dicom_export=False, **options.get(kind, {}))
        scores[kind] = json.loads((result.folder / "scores.json").read_text())
    assert scores["nifti"]["lesion_slices"] > 0
    for kind, value in scores.items():
        assert value == scores["nifti"], kind


def test_a_missing_choice_in_a_pipeline_surfaces_as_one_input_error(case):
    with pytest.raises(Exception) as err:
        load_case_transforms(keys=("image", "label"))({"image": str(case["series"]), "label": str(case["seg"])})
    found = find_input_error(err.value)
    assert found is not None and "choose one with --segment" in str(found)


def test_cli_explain_takes_a_multiframe_scan_a_seg_mask_and_a_segment(case, tiny_bundle, tmp_path, capsys):
    from c2f_med.cli import main

    sources = sorted((pydicom.dcmread(f) for f in case["series"].iterdir()), key=lambda ds: int(ds.InstanceNumber))
    hd.legacy.LegacyConvertedEnhancedMRImage(sources, hd.UID(), 5, hd.UID(), 1).save_as(tmp_path / "enhanced.dcm")
    args = ["explain", "--bundle", str(tiny_bundle), "--input", str(tmp_path / "enhanced.dcm"), "--method", "rollout",
            "--mask", str(case["seg"])]
    assert main([*args, "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "lesion_seg.dcm: 2 segments" in err and "--segment" in err
    assert main([*args, "--segment", "lesion", "--out", str(tmp_path / "out")]) == 0
    folder = tmp_path / "out" / "enhanced"
    assert json.loads((folder / "scores.json").read_text())["lesion_slices"] > 0
    written = sorted(p.relative_to(folder / "dicom").as_posix() for p in (folder / "dicom").rglob("*.dcm"))
    assert written[-2:] == ["saliency_parametric_map.dcm", "saliency_seg.dcm"] and written[0].startswith("overlay/")


def test_evaluate_and_audit_take_the_choice_from_the_flags_or_the_item(case, tiny_bundle, tmp_path, capsys):
    from c2f_med.cli import main
    from c2f_med.io.manifest import write_datalist

    bare, keyed = tmp_path / "bare.json", tmp_path / "keyed.json"
    item = {"image": str(case["series"]), "label": str(case["seg"])}
    write_datalist(bare, testing=[item])
    write_datalist(keyed, testing=[{**item, "segment": "lesion"}])
    common = ["--bundle", str(tiny_bundle)]
    assert main(["evaluate", *common, "--datalist", str(bare), "--methods", "rollout", "--out", str(tmp_path / "e")]) \
        == 2
    assert "choose one with --segment" in capsys.readouterr().err
    assert main(["evaluate", *common, "--datalist", str(bare), "--methods", "rollout", "--segment", "1",
                 "--out", str(tmp_path / "e1")]) == 0
    assert main(["audit", *common, "--datalist", str(keyed), "--method", "rollout", "--segment", "other",
                 "--out", str(tmp_path / "a1")]) == 0  # the item's own "segment" wins over the flag
    scores = json.loads(next((tmp_path / "a1").rglob("scores.json")).read_text())
    assert scores["lesion_slices"] > 0
