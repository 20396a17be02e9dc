"""Few-shot episode samplers: fixed expected draws (a change of sampling fails here), JSON round-trip, errors."""

from __future__ import annotations

import numpy as np
import pytest

from qkvprobe.data.episodes import (
    ClassificationEpisodes,
    SegmentationEpisodes,
    sample_classification_episodes,
    sample_segmentation_episodes,
)
from qkvprobe.errors import DataError

TRAIN = np.repeat(np.arange(4), 5)  # 4 classes × 5 training images
TEST = np.repeat(np.arange(4), 3)  # 4 classes × 3 evaluation images
COUNTS_TRAIN = np.array(
    [[900, 0, 70, 10], [800, 100, 0, 0], [500, 65, 300, 0], [0, 0, 64, 200], [700, 200, 0, 90]]
)
COUNTS_TEST = np.array([[100, 80, 0, 0], [0, 0, 100, 70], [50, 0, 0, 300]])


def test_classification_expected_draws() -> None:
    # Computed once with numpy's PCG64 and hard-coded: identical on every run and machine.
    ep = sample_classification_episodes(TRAIN, TEST, ways=2, shots=2, queries=2, episodes=3, seed=7)
    assert ep.classes.tolist() == [[2, 3], [2, 0], [1, 2]]
    assert ep.support.tolist() == [[13, 12, 16, 19], [10, 12, 2, 1], [8, 9, 12, 13]]
    assert ep.query.tolist() == [[6, 7, 9, 10], [7, 6, 0, 1], [5, 4, 7, 6]]
    assert ep.support_labels.tolist() == [[0, 0, 1, 1]] * 3 and ep.query_labels.tolist() == [[0, 0, 1, 1]] * 3


def test_classification_invariants_and_json() -> None:
    ep = sample_classification_episodes(TRAIN, TEST, ways=3, shots=2, queries=3, episodes=50, seed=1)
    assert ep.support.shape == (50, 6) and ep.query.shape == (50, 9) and ep.support.dtype == np.int64
    for e in range(50):
        assert len(set(ep.classes[e].tolist())) == 3 and len(set(ep.support[e].tolist())) == 6
        np.testing.assert_array_equal(TRAIN[ep.support[e]], ep.classes[e][ep.support_labels[e]])
        np.testing.assert_array_equal(TEST[ep.query[e]], ep.classes[e][ep.query_labels[e]])
    back = ClassificationEpisodes.from_json(ep.to_json())
    for name in ("classes", "support", "support_labels", "query", "query_labels"):
        np.testing.assert_array_equal(getattr(back, name), getattr(ep, name))
    assert (back.ways, back.shots, back.queries, back.seed) == (3, 2, 3, 1)
    again = sample_classification_episodes(TRAIN, TEST, ways=3, shots=2, queries=3, episodes=50, seed=1)
    assert again.to_json() == ep.to_json()
    other = sample_classification_episodes(TRAIN, TEST, ways=3, shots=2, queries=3, episodes=50, seed=2)
    assert other.to_json() != ep.to_json()


def test_classification_errors() -> None:
    with pytest.raises(
        DataError,
        match=r"class 3 has 1 training and 3 evaluation images; 2-shot episodes with 2 queries need >= 2 and >= 2",
    ):
        sample_classification_episodes(np.array([0, 0, 1, 1, 2, 2, 3]), TEST, ways=2, shots=2, queries=2)
    with pytest.raises(DataError, match=r"class 1 has 5 training and 0 evaluation images"):
        sample_classification_episodes(TRAIN, np.array([0, 0, 2, 2, 3, 3]), ways=2, shots=1, queries=2)
    with pytest.raises(DataError, match=r"5-way episodes need 5 classes, the labels hold 4"):
        sample_classification_episodes(TRAIN, TEST, ways=5)
    with pytest.raises(DataError, match=r"shots must be >= 1, got 0"):
        sample_classification_episodes(TRAIN, TEST, ways=2, shots=0)
    with pytest.raises(
        DataError, match=r"episodes JSON holds kind 'segmentation', expected 'classification'"
    ):
        ClassificationEpisodes.from_json(
            sample_segmentation_episodes(COUNTS_TRAIN, COUNTS_TEST, episodes=2).to_json()
        )
    with pytest.raises(DataError, match=r"episodes JSON is not valid JSON"):
        ClassificationEpisodes.from_json("{nope")


def test_segmentation_expected_draws_and_json() -> None:
    ep = sample_segmentation_episodes(COUNTS_TRAIN, COUNTS_TEST, shots=2, episodes=4, seed=3)
    assert ep.classes.tolist() == [3, 1, 1, 2]
    assert ep.support.tolist() == [[4, 3], [2, 4], [4, 1], [3, 0]]
    assert ep.query.tolist() == [1, 0, 0, 1]
    for c, support, query in zip(ep.classes, ep.support, ep.query, strict=True):
        assert (COUNTS_TRAIN[support, c] >= 64).all() and COUNTS_TEST[query, c] >= 64
    back = SegmentationEpisodes.from_json(ep.to_json())
    np.testing.assert_array_equal(back.support, ep.support)
    assert (back.shots, back.seed, back.min_pixels, back.exclude) == (2, 3, 64, (0,))


def test_segmentation_errors() -> None:
    with pytest.raises(
        DataError,
        match=r"class 1 is present \(>= 64 pixels\) in 3 training and 1 evaluation images; 4-shot episodes need >= 4",
    ):
        sample_segmentation_episodes(COUNTS_TRAIN, COUNTS_TEST, shots=4)
    with pytest.raises(DataError, match=r"class 0 is present \(>= 64 pixels\) in 4 training and 1"):
        sample_segmentation_episodes(COUNTS_TRAIN, COUNTS_TEST, shots=5, exclude=())
    with pytest.raises(DataError, match=r"pixel counts must be \[N, C\] with the same C"):
        sample_segmentation_episodes(COUNTS_TRAIN, COUNTS_TEST[:, :3])
    with pytest.raises(DataError, match=r"no class left after exclude=\(0, 1, 2, 3\)"):
        sample_segmentation_episodes(COUNTS_TRAIN, COUNTS_TEST, exclude=(0, 1, 2, 3))
