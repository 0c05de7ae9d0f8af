"""Saliency over the scan as DICOM Secondary Capture images: a colour series any PACS viewer shows.

Most viewers do not render a Parametric Map; :func:`overlay_images` makes one RGB Secondary Capture
image per chosen source slice: the scan's slice in grey (the intensities the model saw, in [0, 1]) with
the saliency blended over it in the "inferno" colour map, opacity ``0.6 x saliency``. The images form
one new series in the source's study, in the order of the slices along the source's normal; each keeps
the source's pixel spacing and names its patient orientation (the directions of its rows and columns).
:func:`choose_slices` picks the slices: those holding most saliency (the lesion slices the classifier
flagged), at most ``max_slices``.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from matplotlib import colormaps
from numpy.typing import NDArray
from pydicom.dataset import Dataset

import c2f_med

__all__ = ["SC_FOLDER", "MAX_SLICES", "choose_slices", "patient_orientation", "overlay_rgb", "overlay_images"]

#: Sub-folder of the DICOM output folder holding the Secondary Capture series.
SC_FOLDER = "overlay"
#: Most slices put in the overlay series.
MAX_SLICES = 8
_OPACITY = 0.6


def choose_slices(saliency_frames: NDArray[np.floating], max_slices: int = MAX_SLICES) -> list[int]:
    """Indices of the frames with the largest saliency sum (none when all are 0), at most ``max_slices``, sorted."""
    mass = np.asarray(saliency_frames, dtype=np.float64).reshape(len(saliency_frames), -1).sum(axis=1)
    ranked = [int(i) for i in np.argsort(-mass, kind="stable") if mass[i] > 0][:max_slices]
    return sorted(ranked)


def patient_orientation(orientation: Sequence[float]) -> tuple[str, str]:
    """PatientOrientation of a frame from its ImageOrientationPatient: the main direction of rows and columns."""
    letters = (("R", "L"), ("A", "P"), ("F", "H"))

    def letter(vector: np.ndarray) -> str:
        axis = int(np.argmax(np.abs(vector)))
        return letters[axis][int(vector[axis] > 0)]

    cosines = np.asarray(orientation, dtype=float).reshape(2, 3)
    return letter(cosines[0]), letter(cosines[1])


def overlay_rgb(grey: NDArray[np.floating], saliency: NDArray[np.floating]) -> NDArray[np.uint8]:
    """``Rows x Columns x 3`` uint8: ``grey`` (in [0, 1]) with the saliency (in [0, 1]) blended in colour."""
    grey = np.clip(np.asarray(grey, dtype=np.float64), 0.0, 1.0)[..., None].repeat(3, axis=-1)
    saliency = np.clip(np.asarray(saliency, dtype=np.float64), 0.0, 1.0)
    colour = colormaps["inferno"](saliency)[..., :3]
    alpha = (_OPACITY * saliency)[..., None]
    return np.rint(255 * ((1 - alpha) * grey + alpha * colour)).astype(np.uint8)


def overlay_images(
    grey_frames: NDArray[np.floating],
    saliency_frames: NDArray[np.floating],
    frames: Sequence[Dataset],
    reference: Sequence[Dataset],
    *,
    max_slices: int = MAX_SLICES,
    series_number: int = 1002,
) -> list[hd.sc.SCImage]:
    """Secondary Capture images of the chosen slices (:func:`choose_slices`).

    Args:
        grey_frames, saliency_frames: ``n x Rows x Columns`` in [0, 1], one per source frame.
        frames: per-frame geometry (ImageOrientationPatient, PixelSpacing), one per frame.
        reference: the datasets whose patient and study the images belong to, one per frame (the same
            dataset repeated for a multi-frame source).
    """
    series_uid = hd.UID()
    images = []
    for number, n in enumerate(choose_slices(saliency_frames, max_slices), start=1):
        image = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=reference[n],
            pixel_array=overlay_rgb(grey_frames[n], saliency_frames[n]),
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=hd.UID(),
            instance_number=number,
            manufacturer="c2f_med",
            pixel_spacing=tuple(float(s) for s in frames[n].PixelSpacing),
            patient_orientation=patient_orientation(frames[n].ImageOrientationPatient),
        )
        image.SeriesDescription = "c2f_med saliency overlay"
        image.ImageComments = f"saliency over source frame {n + 1} (inferno, opacity 0.6 x saliency)"
        image.ManufacturerModelName = "C2F-Explainer"
        image.SoftwareVersions = c2f_med.__version__
        image.BurnedInAnnotation = "NO"
        image.Laterality = reference[n].get("Laterality", "")  # type 2C: present (empty when unknown)
        images.append(image)
    return images
