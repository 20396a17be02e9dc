"""Evaluation protocols (classification, segmentation × standard, few-shot), one driver over both tasks, the rule
registry, and metrics (docs/science.md §2)."""

from __future__ import annotations

from ..tables import rank_key
from .classification import fewshot_classification, standard_classification
from .driver import (
    MATCH_FIELDS,
    Plan,
    check_matching_stores,
    evaluate,
    evaluate_classification,
    evaluate_segmentation,
    fewshot_left_out,
    plan_evaluation,
)
from .evaluation import (
    C_GRID,
    FEWSHOT_C,
    VAL_FRACTION,
    Evaluation,
    FeatureSource,
    FewshotResult,
    FewshotSegmentationResult,
    RuleOptions,
    SegmentationResult,
    StandardResult,
    UnitKey,
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
from .paired import paired_verdicts
from .registry import PatchScorer, RuleProtocol, check_rules, get_rule, register_rule, rule_names
from .segmentation import fewshot_segmentation, standard_segmentation
from .tasks import ClassificationTask, SegmentationTask

__all__ = [
    "C_GRID",
    "FEWSHOT_C",
    "MATCH_FIELDS",
    "VAL_FRACTION",
    "ClassificationTask",
    "ConfusionMatrix",
    "Evaluation",
    "FeatureSource",
    "FewshotResult",
    "FewshotSegmentationResult",
    "PairedTest",
    "PatchScorer",
    "Plan",
    "RuleOptions",
    "RuleProtocol",
    "SegmentationResult",
    "SegmentationTask",
    "StandardResult",
    "UnitKey",
    "accuracy",
    "check_matching_stores",
    "check_rules",
    "confusion_matrix",
    "evaluate",
    "evaluate_classification",
    "evaluate_segmentation",
    "fb_iou",
    "fewshot_classification",
    "fewshot_left_out",
    "fewshot_miou",
    "fewshot_segmentation",
    "get_rule",
    "iou_per_class",
    "mcnemar",
    "mean_ci95",
    "mean_iou",
    "paired_test",
    "paired_verdicts",
    "pixel_accuracy",
    "plan_evaluation",
    "rank_key",
    "register_rule",
    "rule_names",
    "standard_classification",
    "standard_segmentation",
]
