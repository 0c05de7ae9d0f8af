"""c2f_med: C2F-Explainer for Vision Transformers on CT/MR scans, built on MONAI."""

import logging
import warnings

__version__ = "0.1.0"

# MONAI 1.6 announces on every DICOM reader construction that the optional GPU decoder
# (nvImageCodec) is absent; pydicom's own decoders are used, which is what this project wants.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
