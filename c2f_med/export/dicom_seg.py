"""The region a saliency map highlights, as a DICOM SEG a viewer outlines on the source images.

:func:`saliency_segmentation` thresholds the saliency frames (``saliency >= threshold``; the maps are
in [0, 1], so 0.5 keeps what is at least half as salient as the most salient voxel of its slice) and
writes one binary segment, "salient region", with highdicom. Frames are the source's (same plane
positions, orientation and pixel spacing, same Frame of Reference, references to the source images);
frames with no salient voxel are left out, as highdicom does by default.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

import c2f_med
from c2f_med.export.dicom_equipment import accepting_short_person_names, new_instance

__all__ = ["SEG_FILENAME", "DEFAULT_THRESHOLD", "saliency_segmentation"]

#: Name of the SEG file inside the DICOM output folder.
SEG_FILENAME = "saliency_seg.dcm"
#: Saliency at or above which a pixel belongs to the salient region.
DEFAULT_THRESHOLD = 0.5


def saliency_segmentation(
    frames: NDArray[np.floating],
    sources: Sequence[Dataset],
    *,
    threshold: float = DEFAULT_THRESHOLD,
    series_number: int = 1001,
    plane_positions: Sequence[hd.PlanePositionSequence] | None = None,
    plane_orientation: hd.PlaneOrientationSequence | None = None,
    pixel_measures: hd.PixelMeasuresSequence | None = None,
) -> hd.seg.Segmentation:
    """A binary SEG of ``frames >= threshold`` (``n x Rows x Columns``, one frame per source frame).

    ``sources`` are the source images (one per frame), or one multi-frame source image with the frames'
    ``plane_positions``, ``plane_orientation`` and ``pixel_measures``.
    """
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="salient region",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="c2f_med saliency threshold", family=codes.cid7162.ArtificialIntelligence,
            version=c2f_med.__version__, parameters={"threshold": f"{threshold:g}"}),
    )
    mask = (np.asarray(frames) >= threshold).astype(np.uint8)
    with accepting_short_person_names():
        seg = hd.seg.Segmentation(
            source_images=list(sources),
            pixel_array=mask,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[description],
            **new_instance(series_number),
            content_label="SALIENT",
            content_description=f"saliency >= {threshold:g}",
            plane_positions=plane_positions,
            plane_orientation=plane_orientation,
            pixel_measures=pixel_measures,
            omit_empty_frames=bool(mask.any()),
        )
    seg.SeriesDescription = f"c2f_med salient region (saliency >= {threshold:g})"
    return seg
