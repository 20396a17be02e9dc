"""Edge cases and exact values of ``protocols.metrics`` that the mutation run (``make mutation
MODULE=protocols/metrics.py``, docs/testing.md) showed no test pinned: empty and degenerate inputs, range checks
at the boundary, the fields of every returned test, warnings-free degenerate cases, whole error messages."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest

from qkvprobe.errors import FeatureError
from qkvprobe.protocols.metrics import (
    ConfusionMatrix,
    PairedTest,
    accuracy,
    confusion_matrix,
    fewshot_miou,
    iou_per_class,
    mcnemar,
    mean_ci95,
    mean_iou,
    paired_test,
    pixel_accuracy,
)


def test_accuracy_of_a_single_prediction() -> None:
    assert accuracy(np.array([3]), np.array([3])) == 1.0
    assert accuracy(np.array([3]), np.array([2])) == 0.0
    with pytest.raises(FeatureError, match="same non-empty shape"):
        accuracy(np.array([]), np.array([]))


@pytest.mark.parametrize(
    ("pred", "target"),
    [([0, 3], [0, 1]), ([0, 1], [0, 3]), ([0, -1], [0, 1]), ([0, 1], [-1, 1])],
    ids=["pred=K", "target=K", "pred<0", "target<0"],
)
def test_confusion_matrix_refuses_each_out_of_range_label(pred: list[int], target: list[int]) -> None:
    """Every label must lie in 0..K-1: one bad prediction or target alone is refused, at the boundary K too."""
    with pytest.raises(FeatureError, match=r"labels must lie in 0\.\.2 \(or be 255\)"):
        confusion_matrix(np.array(pred), np.array(target), 3)


def test_degenerate_segmentation_scores_without_warnings() -> None:
    """An absent class has IoU NaN, a matrix with no pixel scores 0 (mIoU and pixel accuracy), and none of it
    emits a RuntimeWarning (0/0 is expected, not a user's problem)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        iou = iou_per_class(np.array([[2, 0, 0], [1, 3, 0], [0, 0, 0]]))
        np.testing.assert_allclose(iou, [2 / 3, 3 / 4, np.nan])
        empty = np.zeros((3, 3), dtype=np.int64)
        assert mean_iou(empty) == 0.0
        assert pixel_accuracy(empty) == 0.0
        assert np.isnan(mean_ci95(np.array([0.4]))[1])  # one episode: no interval, and no warning either


def test_fewshot_miou_unions_of_zero_and_one() -> None:
    """A class whose episodes all have an empty union scores 1 (nothing to miss); a union of one pixel is
    divided by one; no episodes at all give 0."""
    miou, per_class = fewshot_miou(np.array([4, 7, 9, 9]), np.array([0, 1, 0, 0]), np.array([0, 1, 1, 0]))
    np.testing.assert_array_equal(per_class, [1.0, 1.0, 0.0])
    assert miou == pytest.approx(2 / 3)
    miou, per_class = fewshot_miou(np.array([], dtype=np.int64), np.array([]), np.array([]))
    assert miou == 0.0 and per_class.shape == (0,)


def test_paired_test_fields_and_shapes() -> None:
    """The early return for identical scores carries every field; a single pair is a valid input; 2-d or empty
    scores are refused with the whole message."""
    assert paired_test(np.full(4, 0.5), np.full(4, 0.5)) == PairedTest("wilcoxon", 0.0, 1.0, 0.0, 4)
    one = paired_test(np.array([0.6]), np.array([0.4]))
    assert (one.test, one.num_pairs, one.pvalue) == ("wilcoxon", 1, 1.0)
    assert one.mean_difference == pytest.approx(0.2)
    message = (
        "paired_test needs two 1-d score arrays over the same episodes, got shapes {} and {}; evaluate both on "
        "the same episodes (same seed)"
    )
    for a in (np.ones((2, 3)), np.array([])):
        with pytest.raises(FeatureError, match="^" + re.escape(message.format(a.shape, a.shape)) + "$"):
            paired_test(a, a)


def test_mcnemar_fields_and_input_types() -> None:
    """Correctness given as 0/1 floats counts like booleans; every field of the result; 2-d or empty refused."""
    ca = np.array([1, 1, 1, 0, 1, 0, 0, 1], dtype=np.float64)
    cb = np.array([0, 0, 1, 0, 1, 1, 0, 1], dtype=np.float64)
    res = mcnemar(ca, cb)
    assert res == mcnemar(ca.astype(bool), cb.astype(bool))
    assert res.test == "mcnemar" and res.statistic == 2.0 and res.num_pairs == 8
    assert res.mean_difference == pytest.approx(5 / 8 - 4 / 8)
    assert res.pvalue == pytest.approx(1.0)  # 2 of 3 discordant pairs: exact two-sided binomial p = 1
    for a in (np.ones((2, 3), bool), np.array([], bool)):
        with pytest.raises(
            FeatureError, match=r"^mcnemar needs two 1-d boolean arrays over the same samples"
        ):
            mcnemar(a, a)
    assert mcnemar(np.array([True]), np.array([False])).num_pairs == 1


def test_accumulator_counts_its_own_ignore_index_in_integers() -> None:
    acc = ConfusionMatrix(3, ignore_index=9)
    acc.update(np.array([[0, 1], [2, 2]]), np.array([[0, 9], [2, 1]]))
    np.testing.assert_array_equal(acc.matrix, [[1, 0, 0], [0, 0, 1], [0, 0, 1]])
    assert acc.matrix.dtype == np.int64
    scores = acc.compute()
    assert scores["pixel_accuracy"] == pytest.approx(2 / 3)
    assert scores["miou"] == pytest.approx(np.nanmean([1.0, 0.0, 0.5]))
    acc.reset()
    assert acc.matrix.dtype == np.int64 and not acc.matrix.any()
    with pytest.raises(
        FeatureError,
        match=r"^prediction shape \(2, 2\) differs from target shape \(3, 3\); upsample the prediction to the "
        r"mask's size first$",
    ):
        acc.update(np.zeros((2, 2)), np.zeros((3, 3)))
    with pytest.raises(
        FeatureError,
        match=r"^mean_ci95 needs at least one value \(episode\), got none; run at least one episode$",
    ):
        mean_ci95(np.array([]))
