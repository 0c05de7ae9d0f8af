"""The slice classifier: token-level adapters (:mod:`~c2f_med.models.vit`), bundle loading
(:mod:`~c2f_med.models.bundle`) and training (:mod:`~c2f_med.models.train`).

Only :data:`DEFAULT_BUNDLE` lives here, so that the command line can name it without importing torch.
"""

import os
import sys
from pathlib import Path

__all__ = ["BUNDLE_ENV", "DEFAULT_BUNDLE", "TARGET_ENV", "PRESET_ENV", "BACKBONE_ENV"]

#: environment variable naming the bundle to use when ``--bundle`` is not given
BUNDLE_ENV = "C2F_MED_BUNDLE"
#: environment variables that override the bundle's ``target_class``, ``preset`` and ``backbone_attr``
#: (``--target-class``, ``--preset`` and ``--backbone-attr`` set them for the command they run)
TARGET_ENV, PRESET_ENV, BACKBONE_ENV = "C2F_MED_TARGET_CLASS", "C2F_MED_PRESET", "C2F_MED_BACKBONE_ATTR"


def _default_bundle() -> Path:
    """``$C2F_MED_BUNDLE`` if set; else the bundle of this source tree (``bundles/c2f_lesion_vit`` of a
    clone); else the copy a non-editable install puts in ``<prefix>/share/c2f_med/bundles``. When none
    exists, the source tree's path, which loading then names as missing, with the ways to give one."""
    if os.environ.get(BUNDLE_ENV):
        return Path(os.environ[BUNDLE_ENV])
    source = Path(__file__).resolve().parents[2] / "bundles" / "c2f_lesion_vit"
    installed = Path(sys.prefix) / "share" / "c2f_med" / "bundles" / "c2f_lesion_vit"
    return next((p for p in (source, installed) if (p / "configs").is_dir()), source)


#: the bundle used without ``--bundle`` (see :func:`_default_bundle`)
DEFAULT_BUNDLE = _default_bundle()
