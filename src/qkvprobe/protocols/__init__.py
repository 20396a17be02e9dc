"""Evaluation protocols (classification, segmentation × standard, few-shot) and metrics."""

from __future__ import annotations

from .classification import (
    C_GRID,
    FEWSHOT_C,
    VAL_FRACTION,
    Evaluation,
    FewshotResult,
    StandardResult,
    evaluate_classification,
    fewshot_classification,
    standard_classification,
)
from .metrics import (
    ConfusionMatrix,
    PairedTest,
    accuracy,
    confusion_matrix,
    fb_iou,
    fewshot_miou,
    iou_per_class,
    mcnemar,
    mean_ci95,
    mean_iou,
    paired_test,
    pixel_accuracy,
)
from .segmentation import (
    FewshotSegmentationResult,
    SegmentationResult,
    evaluate_segmentation,
    fewshot_segmentation,
    standard_segmentation,
)

__all__ = [
    "C_GRID",
    "FEWSHOT_C",
    "VAL_FRACTION",
    "ConfusionMatrix",
    "Evaluation",
    "FewshotResult",
    "FewshotSegmentationResult",
    "PairedTest",
    "SegmentationResult",
    "StandardResult",
    "accuracy",
    "confusion_matrix",
    "evaluate_classification",
    "evaluate_segmentation",
    "fb_iou",
    "fewshot_classification",
    "fewshot_miou",
    "fewshot_segmentation",
    "iou_per_class",
    "mcnemar",
    "mean_ci95",
    "mean_iou",
    "paired_test",
    "pixel_accuracy",
    "standard_classification",
    "standard_segmentation",
]
