"""The slice classifier: token-level adapters (:mod:`~c2f_med.models.vit`), bundle loading
(:mod:`~c2f_med.models.bundle`) and training (:mod:`~c2f_med.models.train`).

Only :data:`DEFAULT_BUNDLE` lives here, so that the command line can name it without importing torch.
"""

import os
from pathlib import Path

__all__ = ["BUNDLE_ENV", "DEFAULT_BUNDLE", "TARGET_ENV", "PRESET_ENV", "BACKBONE_ENV"]

#: environment variable naming the bundle to use when ``--bundle`` is not given
BUNDLE_ENV = "C2F_MED_BUNDLE"
#: environment variables that override the bundle's ``target_class``, ``preset`` and ``backbone_attr``
#: (``--target-class``, ``--preset`` and ``--backbone-attr`` set them for the command they run)
TARGET_ENV, PRESET_ENV, BACKBONE_ENV = "C2F_MED_TARGET_CLASS", "C2F_MED_PRESET", "C2F_MED_BACKBONE_ATTR"

#: the bundle used without ``--bundle``: ``$C2F_MED_BUNDLE`` if set, else the one this source tree ships
#: (``bundles/c2f_lesion_vit`` of a clone; an installed package without the clone has none, and
#: loading it names the missing folder and these two ways to give one)
DEFAULT_BUNDLE = Path(os.environ.get(BUNDLE_ENV) or Path(__file__).resolve().parents[2] / "bundles" / "c2f_lesion_vit")
