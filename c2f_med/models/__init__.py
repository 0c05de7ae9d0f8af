"""The slice classifier: token-level adapters (:mod:`~c2f_med.models.vit`), bundle loading
(:mod:`~c2f_med.models.bundle`) and training (:mod:`~c2f_med.models.train`).

Only :data:`DEFAULT_BUNDLE` lives here, so that the command line can name it without importing torch.
"""

from pathlib import Path

__all__ = ["DEFAULT_BUNDLE"]

#: the bundle this repository ships
DEFAULT_BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "c2f_lesion_vit"
