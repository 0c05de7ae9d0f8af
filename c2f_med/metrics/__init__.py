"""Scores of saliency maps: localisation against lesion masks, faithfulness to the model, bootstrap CIs."""

from c2f_med.metrics.bootstrap import bootstrap_ci, paired_bootstrap
from c2f_med.metrics.faithfulness import (
    Predict,
    auc,
    deletion_auc,
    insertion_auc,
    negative_perturbation_auc,
    perturbation_curve,
    positive_perturbation_auc,
)
from c2f_med.metrics.localisation import (
    IoUAccumulator,
    average_precision,
    dice,
    dice_topk,
    iou,
    iou_topk,
    localisation_scores,
    pixel_auroc,
    pointing_game,
    relevance_mass,
    saliency_order,
    threshold_mean,
    topk_binarise,
)

__all__ = [
    "IoUAccumulator",
    "Predict",
    "auc",
    "average_precision",
    "bootstrap_ci",
    "deletion_auc",
    "dice",
    "dice_topk",
    "insertion_auc",
    "iou",
    "iou_topk",
    "localisation_scores",
    "negative_perturbation_auc",
    "paired_bootstrap",
    "perturbation_curve",
    "pixel_auroc",
    "pointing_game",
    "positive_perturbation_auc",
    "relevance_mass",
    "saliency_order",
    "threshold_mean",
    "topk_binarise",
]
