"""Edges of the episode samplers that the mutation run (``make mutation MODULE=data/episodes.py``,
docs/testing.md) found unpinned: the documented defaults, boundaries (exactly ``ways`` classes, exactly
``min_pixels`` pixels, zero episodes), dtypes, every field of a JSON round trip, and whole error messages."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from qkvprobe.data.episodes import (
    ClassificationEpisodes,
    SegmentationEpisodes,
    sample_classification_episodes,
    sample_segmentation_episodes,
)
from qkvprobe.errors import DataError

TRAIN = np.repeat(np.arange(4), 5)
TEST = np.repeat(np.arange(4), 3)
COUNTS_TRAIN = np.array([[900, 0, 70, 10], [800, 100, 0, 0], [500, 65, 300, 0], [0, 0, 64, 200]])
COUNTS_TEST = np.array([[100, 64, 0, 0], [0, 0, 100, 70], [50, 0, 0, 64]])


def test_classification_defaults_are_the_documented_ones() -> None:
    """``ways=5, shots=1, queries=15, episodes=2000, seed=0`` (docs/CONTRACTS.md)."""
    train, test = np.repeat(np.arange(6), 3), np.repeat(np.arange(6), 15)
    ep = sample_classification_episodes(train, test)
    assert (ep.ways, ep.shots, ep.queries, ep.seed, len(ep)) == (5, 1, 15, 0, 2000)
    assert ep.support.shape == (2000, 5) and ep.query.shape == (2000, 75)
    explicit = sample_classification_episodes(train, test, ways=5, shots=1, queries=15, episodes=2000, seed=0)
    assert explicit.to_json() == ep.to_json()
    for name in ("classes", "support", "support_labels", "query", "query_labels"):
        assert getattr(ep, name).dtype == np.int64, name


def test_classification_boundaries() -> None:
    """Exactly ``ways`` classes suffice; zero episodes give empty arrays; zero ways, shots or queries and negative
    episodes are refused, each by name."""
    ep = sample_classification_episodes(TRAIN, TEST, ways=4, shots=5, queries=3, episodes=2, seed=0)
    assert sorted(ep.classes[0].tolist()) == [0, 1, 2, 3]
    none = sample_classification_episodes(TRAIN, TEST, ways=2, episodes=0, queries=3)
    assert none.classes.shape == (0, 2) and none.query.shape == (0, 6) and len(none) == 0
    for kw, message in (
        ({"ways": 0}, "ways must be >= 1, got 0"),
        ({"shots": 0}, "shots must be >= 1, got 0"),
        ({"queries": 0}, "queries must be >= 1, got 0"),
        ({"episodes": -1}, "episodes must be >= 0, got -1"),
    ):
        with pytest.raises(DataError, match="^" + re.escape(message) + "$"):
            sample_classification_episodes(TRAIN, TEST, **{"ways": 2, "queries": 2, **kw})


def test_classification_json_is_compact_and_its_errors_name_the_problem() -> None:
    ep = sample_classification_episodes(TRAIN, TEST, ways=2, shots=2, queries=2, episodes=3, seed=7)
    text = ep.to_json()
    assert ", " not in text and ": " not in text  # compact: thousands of episodes stay small
    payload = json.loads(text)
    with pytest.raises(DataError, match=r"^episodes JSON holds kind 'list', expected 'classification'$"):
        ClassificationEpisodes.from_json("[1, 2]")
    with pytest.raises(DataError, match=r"^episodes JSON has sampler version 99, this qkvprobe reads 1$"):
        ClassificationEpisodes.from_json(json.dumps({**payload, "version": 99}))
    with pytest.raises(
        DataError, match=r"^classification episodes JSON is malformed \(KeyError\('queries'\)\)$"
    ):
        ClassificationEpisodes.from_json(json.dumps({k: v for k, v in payload.items() if k != "queries"}))
    with pytest.raises(
        DataError, match=r"^classification episodes JSON: support has shape \(3, 3\), expected \(3, 4\)$"
    ):
        ClassificationEpisodes.from_json(json.dumps({**payload, "support": [[1, 2, 3]] * 3}))


def test_segmentation_defaults_boundaries_and_round_trip() -> None:
    """Defaults ``shots=1, episodes=1000, seed=0``; an image with exactly ``min_pixels`` of a class holds it (test
    image 0 is the only one with class 1, at 64 pixels); ``exclude=()`` keeps class 0; every field survives JSON."""
    ep = sample_segmentation_episodes(COUNTS_TRAIN, COUNTS_TEST, exclude=())
    assert (ep.shots, ep.seed, ep.min_pixels, ep.exclude, len(ep)) == (1, 0, 64, (), 1000)
    assert ep.support.shape == (1000, 1) and ep.classes.dtype == np.int64
    explicit = sample_segmentation_episodes(
        COUNTS_TRAIN, COUNTS_TEST, shots=1, episodes=1000, seed=0, min_pixels=64, exclude=()
    )
    assert explicit.to_json() == ep.to_json()
    assert set(ep.classes.tolist()) == {0, 1, 2, 3}
    assert set(ep.query[ep.classes == 1].tolist()) == {0}
    back = SegmentationEpisodes.from_json(ep.to_json())
    for name in ("classes", "support", "query"):
        np.testing.assert_array_equal(getattr(back, name), getattr(ep, name))
    assert (back.shots, back.seed, back.min_pixels, back.exclude) == (1, 0, 64, ())


def test_segmentation_errors_name_the_problem() -> None:
    with pytest.raises(
        DataError, match=r"^pixel counts must be \[N, C\] with the same C, got \(4,\) and \(3, 4\)$"
    ):
        sample_segmentation_episodes(np.zeros(4), COUNTS_TEST)
    payload = json.loads(sample_segmentation_episodes(COUNTS_TRAIN, COUNTS_TEST, episodes=2).to_json())
    with pytest.raises(DataError, match=r"^segmentation episodes JSON is malformed \(KeyError\('seed'\)\)$"):
        SegmentationEpisodes.from_json(json.dumps({k: v for k, v in payload.items() if k != "seed"}))
    with pytest.raises(
        DataError, match=r"^segmentation episodes JSON: query has shape \(1,\), expected \(2,\)$"
    ):
        SegmentationEpisodes.from_json(json.dumps({**payload, "query": [1]}))
