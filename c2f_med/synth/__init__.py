"""Semi-synthetic lesion scans on real anatomy (the MNI152 template), and their writers.

* :mod:`~c2f_med.synth.anatomy`: random warped T1 / T2 / FLAIR brains, bias field and noise;
* :mod:`~c2f_med.synth.lesions`: soft-edged lesions sampled, rendered and inserted (3-D or per slice);
* :mod:`~c2f_med.synth.dataset`: deterministic cases (scan, mask, lesion-free twin) and the
  ``c2f-med synth`` dataset writer;
* :mod:`~c2f_med.synth.writers`: NIfTI files and DICOM MR series.
"""

from c2f_med.synth.anatomy import CONTRASTS, Anatomy, Template, finalise, load_template, make_anatomy
from c2f_med.synth.dataset import Case, synth_case, write_dataset
from c2f_med.synth.lesions import LesionSpec, insert_lesions, lesion_slice, render_lesion, sample_lesion
from c2f_med.synth.writers import write_dicom_series, write_nifti

__all__ = [
    "CONTRASTS",
    "Anatomy",
    "Case",
    "LesionSpec",
    "Template",
    "finalise",
    "insert_lesions",
    "lesion_slice",
    "load_template",
    "make_anatomy",
    "render_lesion",
    "sample_lesion",
    "synth_case",
    "write_dataset",
    "write_dicom_series",
    "write_nifti",
]
