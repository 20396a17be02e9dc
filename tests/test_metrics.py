"""Metrics against hand-worked confusion matrices; paired tests; the confusion-matrix accumulator."""

from __future__ import annotations

import numpy as np
import pytest

from qkvprobe.errors import FeatureError
from qkvprobe.protocols.metrics import (
    ConfusionMatrix,
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


def test_confusion_matrix_and_miou_hand_worked() -> None:
    target = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [1, 1, 0]])
    cm = confusion_matrix(pred, target, 3)
    # rows = truth: class 0 → (0, 1); class 1 → (1, 1); class 2 → (1); the 255 pixel is ignored.
    np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 2, 0], [0, 1, 0]])
    # IoU: c0 = 1/(1+0+1) = 0.5; c1 = 2/(2+2+0) = 0.5; c2 = 0/(0+0+1) = 0.
    np.testing.assert_allclose(iou_per_class(cm), [0.5, 0.5, 0.0])
    assert mean_iou(cm) == pytest.approx(1 / 3)
    assert pixel_accuracy(cm) == pytest.approx(3 / 5)


def test_miou_skips_absent_classes() -> None:
    cm = np.array([[3, 1, 0], [0, 2, 0], [0, 0, 0]])  # class 2 in neither targets nor predictions
    assert np.isnan(iou_per_class(cm)[2])
    assert mean_iou(cm) == pytest.approx((3 / 4 + 2 / 3) / 2)


def test_fb_iou_and_fewshot_miou_hand_worked() -> None:
    cm2 = np.array([[6, 2], [1, 3]])  # bg: 6/(6+2+1) ; fg: 3/(3+2+1)
    assert fb_iou(cm2) == pytest.approx((6 / 9 + 3 / 6) / 2)
    # class 5: episodes (I, U) = (2, 4), (1, 4) → 3/8; class 9: (3, 3) → 1.
    miou, per_class = fewshot_miou(np.array([5, 9, 5]), np.array([2, 3, 1]), np.array([4, 3, 4]))
    np.testing.assert_allclose(per_class, [3 / 8, 1.0])
    assert miou == pytest.approx((3 / 8 + 1) / 2)
    with pytest.raises(FeatureError, match="2x2"):
        fb_iou(np.eye(3))


def test_accumulator_equals_one_shot_matrix() -> None:
    rng = np.random.default_rng(0)
    preds, targets = rng.integers(0, 4, (5, 6, 7)), rng.integers(0, 4, (5, 6, 7))
    targets[0, 0, :3] = 255
    acc = ConfusionMatrix(4)
    for p, t in zip(preds, targets, strict=True):
        acc.update(p, t)
    whole = confusion_matrix(preds, targets, 4)
    np.testing.assert_array_equal(acc.matrix, whole)
    assert acc.compute()["miou"] == pytest.approx(mean_iou(whole))
    acc.reset()
    assert acc.matrix.sum() == 0
    with pytest.raises(FeatureError, match="upsample the prediction"):
        acc.update(np.zeros((2, 2)), np.zeros((3, 3)))
    with pytest.raises(FeatureError, match=r"labels must lie in 0\.\.3"):
        acc.update(np.zeros((2, 2)), np.full((2, 2), 7))


def test_accuracy_and_ci() -> None:
    assert accuracy(np.array([1, 2, 3]), np.array([1, 0, 3])) == pytest.approx(2 / 3)
    with pytest.raises(FeatureError, match="same non-empty shape"):
        accuracy(np.array([1]), np.array([1, 2]))
    v = np.array([0.5, 0.7, 0.9, 0.6])
    mean, ci = mean_ci95(v)
    assert mean == pytest.approx(0.675)
    assert ci == pytest.approx(1.96 * v.std(ddof=1) / 2)
    with pytest.raises(FeatureError, match="at least one value"):
        mean_ci95(np.array([]))


def test_paired_tests() -> None:
    rng = np.random.default_rng(1)
    a = rng.uniform(0.5, 0.9, 200)
    assert paired_test(a, a).pvalue == 1.0
    better = paired_test(a + 0.05 + rng.normal(0, 0.01, 200), a)
    assert better.pvalue < 1e-6 and better.mean_difference > 0
    with pytest.raises(FeatureError, match="same episodes"):
        paired_test(a, a[:-1])
    # McNemar: 10 discordant pairs all won by A → exact two-sided p = 2 · 0.5^10.
    ca = np.array([True] * 10 + [True] * 5 + [False] * 5)
    cb = np.array([False] * 10 + [True] * 5 + [False] * 5)
    res = mcnemar(ca, cb)
    assert res.statistic == 10 and res.pvalue == pytest.approx(2 * 0.5**10)
    assert mcnemar(ca, ca).pvalue == 1.0
    with pytest.raises(FeatureError, match="same samples"):
        mcnemar(ca, cb[:3])
