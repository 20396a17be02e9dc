"""Metrics as pure functions over predictions or confusion matrices, paired significance tests, and a
torchmetrics-style confusion-matrix accumulator for segmentation (mIoU over the whole split, not a mean of
per-image IoUs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict

import numpy as np
import torch
from scipy import stats

from ..errors import FeatureError
from ..vocab import IGNORE_INDEX


def accuracy(pred: np.ndarray, target: np.ndarray) -> float:
    """Top-1 accuracy of ``pred [n]`` against ``target [n]`` (fraction)."""
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape or pred.size == 0:
        raise FeatureError(
            f"accuracy needs predictions and targets of the same non-empty shape, got {pred.shape} and "
            f"{target.shape}; pass one prediction per target"
        )
    return float(np.mean(pred == target))


def confusion_matrix(
    pred: np.ndarray | torch.Tensor,
    target: np.ndarray | torch.Tensor,
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
) -> np.ndarray:
    """``[K, K]`` int64 counts, rows = true class, columns = predicted; targets equal to ``ignore_index``
    are skipped (torch.bincount over ``K·t + p``)."""
    p = torch.as_tensor(pred).reshape(-1).long()
    t = torch.as_tensor(target).reshape(-1).long()
    keep = t != ignore_index
    p, t = p[keep], t[keep]
    if len(t) and (
        int(t.min()) < 0 or int(t.max()) >= num_classes or int(p.min()) < 0 or int(p.max()) >= num_classes
    ):
        raise FeatureError(
            f"labels must lie in 0..{num_classes - 1} (or be {ignore_index}), got targets in "
            f"[{int(t.min())}, {int(t.max())}] and predictions in [{int(p.min())}, {int(p.max())}]; check num_classes"
        )
    return (
        torch.bincount(t * num_classes + p, minlength=num_classes**2)
        .reshape(num_classes, num_classes)
        .numpy()
    )


def iou_per_class(cm: np.ndarray) -> np.ndarray:
    """``cm [K, K]`` → IoU ``[K]`` = TP / (TP + FP + FN); NaN for a class absent from targets and predictions."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def mean_iou(cm: np.ndarray) -> float:
    """Mean IoU over the classes present (in targets or predictions) of a dataset-level confusion matrix."""
    iou = iou_per_class(cm)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0


def pixel_accuracy(cm: np.ndarray) -> float:
    """Fraction of non-ignored pixels predicted correctly."""
    cm = np.asarray(cm)
    total = cm.sum()
    return float(np.trace(cm) / total) if total else 0.0


def fb_iou(cm2: np.ndarray) -> float:
    """FB-IoU: mean of background and foreground IoU of a ``[2, 2]`` confusion matrix accumulated over all
    few-shot episodes (class 0 = background, 1 = foreground)."""
    cm2 = np.asarray(cm2)
    if cm2.shape != (2, 2):
        raise FeatureError(f"fb_iou needs a 2x2 (background, foreground) confusion matrix, got {cm2.shape}")
    return float(np.nanmean(iou_per_class(cm2)))


def fewshot_miou(
    classes: np.ndarray, intersections: np.ndarray, unions: np.ndarray
) -> tuple[float, np.ndarray]:
    """Few-shot segmentation mIoU: foreground IoU per class = Σ intersections / Σ unions over that class's
    episodes, then the mean over classes. ``classes/intersections/unions [E]`` → (mIoU, per-class IoU [C'])."""
    classes = np.asarray(classes)
    labels, inv = np.unique(classes, return_inverse=True)
    inter = np.bincount(inv, weights=np.asarray(intersections, dtype=np.float64), minlength=len(labels))
    union = np.bincount(inv, weights=np.asarray(unions, dtype=np.float64), minlength=len(labels))
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)  # empty union: nothing to miss
    return float(iou.mean()) if len(iou) else 0.0, iou


def mean_ci95(values: np.ndarray) -> tuple[float, float]:
    """Mean and 95 % half-width ``1.96 · σ/√E`` (σ with ddof = 1, i.e. scipy.stats.sem) of ``values [E]``."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise FeatureError("mean_ci95 needs at least one value (episode), got none; run at least one episode")
    half = 1.96 * float(stats.sem(values)) if values.size > 1 else float("nan")
    return float(values.mean()), half


@dataclass(frozen=True)
class PairedTest:
    """Outcome of a paired comparison of A and B: ``mean_difference`` = mean(A − B)."""

    test: str
    statistic: float
    pvalue: float
    mean_difference: float
    num_pairs: int


def paired_test(a: np.ndarray, b: np.ndarray) -> PairedTest:
    """Wilcoxon signed-rank test on per-episode scores ``a [E]``, ``b [E]`` of two token types / rules on
    the *same* episodes (scipy.stats.wilcoxon; zero differences dropped). p = 1 when A and B never differ."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise FeatureError(
            f"paired_test needs two 1-d score arrays over the same episodes, got shapes {a.shape} and {b.shape}; "
            "evaluate both on the same episodes (same seed)"
        )
    d = a - b
    if not np.any(d != 0):
        return PairedTest("wilcoxon", 0.0, 1.0, 0.0, int(a.size))
    res = stats.wilcoxon(a, b, zero_method="wilcox")
    return PairedTest("wilcoxon", float(res.statistic), float(res.pvalue), float(d.mean()), int(a.size))


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> PairedTest:
    """Exact McNemar test for two classifiers on the same test samples (``correct_* [n]`` bool): a binomial
    test (scipy.stats.binomtest) on the discordant pairs. ``statistic`` = #(A right, B wrong)."""
    ca, cb = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if ca.shape != cb.shape or ca.ndim != 1 or ca.size == 0:
        raise FeatureError(
            f"mcnemar needs two 1-d boolean arrays over the same samples, got shapes {ca.shape} and {cb.shape}"
        )
    a_only, b_only = int(np.sum(ca & ~cb)), int(np.sum(~ca & cb))
    pvalue = 1.0 if a_only + b_only == 0 else float(stats.binomtest(a_only, a_only + b_only, 0.5).pvalue)
    return PairedTest("mcnemar", float(a_only), pvalue, float(ca.mean() - cb.mean()), int(ca.size))


class MaskScores(TypedDict):
    """:meth:`ConfusionMatrix.compute`'s result: mean IoU, pixel accuracy and IoU per class ``[K]``."""

    miou: float
    pixel_accuracy: float
    iou: np.ndarray


class ConfusionMatrix:
    """Dataset-level confusion-matrix accumulator: ``update(pred, target)`` per image, ``compute()`` →
    ``{"miou", "pixel_accuracy", "iou"}``, ``reset()``."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> None:
        """Add ``pred``/``target`` of any equal shape (e.g. ``[H, W]``)."""
        if tuple(pred.shape) != tuple(target.shape):
            raise FeatureError(
                f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}; "
                "upsample the prediction to the mask's size first"
            )
        self.matrix += confusion_matrix(pred, target, self.num_classes, self.ignore_index)

    def compute(self) -> MaskScores:
        return {
            "miou": mean_iou(self.matrix),
            "pixel_accuracy": pixel_accuracy(self.matrix),
            "iou": iou_per_class(self.matrix),
        }
