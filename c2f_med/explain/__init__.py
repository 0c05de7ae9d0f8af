"""Explainers of ViT slice classifiers (C2F and the baselines) and the volume explainer.

``create(name, model, **params)`` builds a registered explainer; ``available()`` lists the names.
"""

from c2f_med.explain.base import Explainer, Explanation, available, create, register
from c2f_med.explain.volume import SlicePrediction, VolumeExplanation, explain_volume

__all__ = ["Explainer", "Explanation", "available", "create", "register", "explain_volume", "SlicePrediction",
           "VolumeExplanation"]
