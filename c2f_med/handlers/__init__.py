"""MONAI / ignite handlers that run the explanation pipeline inside an evaluator (the bundle's workflows).

Attach them in this order to a ``SupervisedEvaluator`` whose network is a
:class:`~c2f_med.models.vit.TokenViT`, whose data are cases loaded by
:func:`~c2f_med.io.transforms.load_case_transforms` and whose inferer is :func:`no_forward`:

- :class:`ExplainHandler`: saliency volume and per-slice predictions of every case;
- :class:`LesionScoreHandler`: localisation scores against the lesion masks, merged over ranks;
- :class:`SaliencySaver`: the case folders ``OUT/<case>/`` of ``c2f-med explain``.
"""

from c2f_med.handlers.explain import ExplainHandler, case_ids, no_forward
from c2f_med.handlers.save import SaliencySaver
from c2f_med.handlers.score import METRIC_KEYS, LesionScoreHandler, all_gather, is_rank0

__all__ = ["ExplainHandler", "LesionScoreHandler", "SaliencySaver", "METRIC_KEYS", "all_gather", "case_ids",
           "is_rank0", "no_forward"]
