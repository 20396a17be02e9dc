"""Parts of the study that need no model: progress state, subsampling, side-file maths, paired verdicts."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from qkvprobe.config import DatasetConfig
from qkvprobe.errors import ConfigError
from qkvprobe.protocols.paired import paired_verdicts
from qkvprobe.results import ResultRow
from qkvprobe.study.data import scenes_spec, subset_indices
from qkvprobe.study.sides import (
    direction_cosines,
    fitted_direction_cosines,
    lookup_C,
    save_fits,
)
from qkvprobe.study.state import Progress, unit_id


def test_progress_binds_run_dir_to_config(tmp_path: Path) -> None:
    p = Progress(tmp_path, "aaa")
    assert not p.resumed and (tmp_path / "progress.json").exists()
    assert Progress(tmp_path, "aaa").resumed  # bound before any unit finished: a restart resumes
    uid = unit_id("evaluate", model="m", shots=1)
    assert uid == unit_id("evaluate", shots=1, model="m")  # order-independent
    p.mark(uid)
    p.mark(uid)
    again = Progress(tmp_path, "aaa")
    assert again.resumed and again.done == [uid] and again.is_done(uid)
    with pytest.raises(
        ConfigError,
        match=r"holds results of a different config \(the config changed; fingerprint aaa there, bbb now",
    ):
        Progress(tmp_path, "bbb")
    (tmp_path / "results.csv").write_text("x")
    (tmp_path / "notes.txt").write_text("mine")
    fresh = Progress(tmp_path, "bbb", fresh=True)
    assert not fresh.resumed and not (tmp_path / "results.csv").exists() and (tmp_path / "notes.txt").exists()


def test_stratified_subset_is_seeded_and_balanced() -> None:
    labels = np.repeat(np.arange(10), 600)
    a = subset_indices(len(labels), 1000, 0, labels)
    assert a is not None and len(a) == 1000 and len(np.unique(a)) == 1000 and (np.diff(a) > 0).all()
    assert (np.bincount(labels[a]) == 100).all()
    assert np.array_equal(a, subset_indices(len(labels), 1000, 0, labels))
    assert not np.array_equal(a, subset_indices(len(labels), 1000, 1, labels))
    uneven = np.array([0] * 7 + [1] * 3)
    assert len(subset_indices(10, 5, 0, uneven)) == 5
    assert subset_indices(100, None, 0) is None and subset_indices(100, 100, 0) is None


def test_scenes_are_generated_at_the_configured_size() -> None:
    cfg = DatasetConfig(spec="fashion-mnist-scenes", train_size=100, test_size=20)
    assert scenes_spec(cfg) == "fashion-mnist-scenes?train=100&test=20"
    cfg = DatasetConfig(spec="fashion-mnist-scenes?source=bundled&test=5", train_size=100, test_size=20)
    assert scenes_spec(cfg) == "fashion-mnist-scenes?source=bundled&test=5&train=100"
    assert scenes_spec(DatasetConfig(spec="fashion-mnist-scenes")) == "fashion-mnist-scenes"


def test_direction_cosines_match_a_numpy_reference() -> None:
    from qkvprobe.rules import CosineRule, HyperplaneRule

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 120)
    X = rng.normal(size=(2, 120, 8)) + 3 * np.eye(8)[y][None]
    classes, cos = direction_cosines(X.astype(np.float32), y, [1.0, 0.1])
    assert classes.tolist() == [0, 1, 2] and cos.shape == (2, 3)
    for g, C in enumerate([1.0, 0.1]):
        w = HyperplaneRule(C=C).fit(X[g], y).coef_
        mu = CosineRule().fit(X[g], y).directions_
        ref = np.sum(w * mu, 1) / np.linalg.norm(w, axis=1) / np.linalg.norm(mu, axis=1)
        assert np.allclose(cos[g], ref, atol=2e-2)
    assert (cos > 0.5).all()  # well-separated classes: both rules look the same way
    # Imbalanced classes and class_weight="balanced": the normals are HyperplaneRule(class_weight="balanced")'s.
    keep = rng.uniform(size=120) < 1.0 / (y + 1)
    classes, cos = direction_cosines(
        X[:, keep].astype(np.float32), y[keep], [0.1, 0.1], class_weight="balanced"
    )
    w = HyperplaneRule(C=0.1, class_weight="balanced").fit(X[0, keep], y[keep]).coef_
    mu = CosineRule().fit(X[0, keep], y[keep]).directions_
    ref = np.sum(w * mu, 1) / np.linalg.norm(w, axis=1) / np.linalg.norm(mu, axis=1)
    assert np.allclose(cos[0], ref, atol=1e-4)  # the plain fit is 8e-3 away here


def test_saved_fits_give_the_direction_cosines(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    W, mu = rng.normal(size=(2, 4, 6)), rng.normal(size=(2, 4, 6))
    mu[:, 2] = 0  # a class without training samples (segmentation) has no direction: left out
    from qkvprobe.protocols import UnitKey

    weights = {
        UnitKey(5, t, "cls", r): (W if r == "hyperplane" else mu)[g]
        for g, t in enumerate(["q", "k"])
        for r in ("hyperplane", "cosine")
    }
    path = tmp_path / "fits" / "m__d.npz"
    save_fits(path, weights, np.array([3, 4, 7, 9]))
    classes, cos = fitted_direction_cosines(path, ["q", "k"], "cls", 5)
    assert classes.tolist() == [3, 4, 9] and cos.shape == (2, 3)
    for g in range(2):
        for j, c in enumerate([0, 1, 3]):
            ref = W[g, c] @ mu[g, c] / np.linalg.norm(W[g, c]) / np.linalg.norm(mu[g, c])
            assert cos[g, j] == pytest.approx(ref, abs=1e-12)
    assert fitted_direction_cosines(path, ["q", "v"], "cls", 5) is None  # a token that was not fitted
    assert fitted_direction_cosines(path, ["q"], "avg", 5) is None
    assert fitted_direction_cosines(tmp_path / "missing.npz", ["q"], "cls", 5) is None


def _row(token: str, rule: str, value: float, C: float = math.nan) -> ResultRow:
    return ResultRow(
        "m",
        "dino",
        "d",
        "classification",
        "fewshot",
        1,
        token,
        "cls",
        rule,
        5,
        1,
        50,
        "accuracy",
        value,
        0.01,
        0,
        C,
    )


def test_paired_verdicts_between_top_choices() -> None:
    rng = np.random.default_rng(0)
    rows = [_row("v", "cosine", 0.9), _row("q", "cosine", 0.89), _row("k", "cosine", 0.5)]

    from qkvprobe.protocols import Evaluation, UnitKey

    per_episode = {
        UnitKey(1, "v", "cls", "cosine", 1): rng.uniform(0.8, 1.0, 50),
        UnitKey(1, "q", "cls", "cosine", 1): rng.uniform(0.8, 1.0, 50),
        UnitKey(1, "k", "cls", "cosine", 1): rng.uniform(0.3, 0.6, 50),
    }

    tests = paired_verdicts(rows, Evaluation(rows, per_episode=per_episode), None)
    assert [(t["a"]["token"], t["b"]["token"]) for t in tests] == [("v", "q"), ("v", "k")]
    assert tests[0]["verdict"] == "no significant difference" and tests[1]["verdict"].startswith("A better")
    assert tests[1]["test"] == "wilcoxon" and tests[1]["p_value"] < 0.05
    assert paired_verdicts(rows[:1], Evaluation(rows[:1]), None) == []


def test_lookup_C_takes_the_protocols_choice() -> None:
    rows = [
        ResultRow(
            "m",
            "dino",
            "d",
            "classification",
            "standard",
            1,
            "v",
            "cls",
            "hyperplane",
            0,
            0,
            0,
            "accuracy",
            0.8,
            math.nan,
            0,
            0.01,
        )
    ]
    assert lookup_C(rows, "m", "d", "v", "cls", 1) == 0.01
    assert lookup_C(rows, "m", "d", "q", "cls", 1) == 1.0


def test_segmentation_classes_without_enough_images_are_left_out_and_named_per_call() -> None:
    """The class policy of every door: a class present in too few images for the episodes is left out of them
    and named — separately for the validation episodes that choose C on halved training pools."""
    from qkvprobe.protocols.tasks import SegmentationTask

    rng = np.random.default_rng(0)
    counts = rng.integers(100, 200, size=(40, 4))  # 4 classes, class 0 is background (never drawn)
    counts[:, 3] = 0
    counts[:2, 3] = 100  # class 3 in 2 training images: enough for 1 shot, not for 1 shot in both halves
    task = SegmentationTask.__new__(SegmentationTask)
    from qkvprobe.data.episodes import sample_segmentation_episodes

    task.sampler, task.class_names = sample_segmentation_episodes, ["bg", "a", "b", "c"]
    half = counts[::2]  # a halved pool holding one of the two class-3 images
    val_left: list[str] = []
    val = task.sample(half[:10], half[10:], 1, val_left, episodes=20, seed=0)
    assert 3 not in set(val.classes) and val_left == ["c"]
    left: list[str] = []
    ev = task.sample(counts, counts, 1, left, episodes=60, seed=0)
    assert 3 in set(ev.classes) and left == []
    left = []
    ev = task.sample(counts, counts, 3, left, episodes=60, seed=0)  # 3 shots: class 3 lacks images
    assert 3 not in set(ev.classes) and left == ["c"]


def test_mcnemar_verdict_compares_the_best_with_the_others() -> None:
    """Pin: the standard setting's McNemar test takes the best choice's and the other choice's own predictions
    (a test of the best against itself would always say "no significant difference")."""
    from scipy.stats import binomtest

    from qkvprobe.protocols import Evaluation, UnitKey

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 200)
    best_pred = labels.copy()
    best_pred[:20] = (labels[:20] + 1) % 3  # 180 right
    other_pred = labels.copy()
    other_pred[100:170] = (labels[100:170] + 1) % 3  # 130 right
    rows = [
        replace(
            _row("v", "hyperplane", 0.9, 1.0), setting="standard", ways=0, shots=0, episodes=0, ci95=math.nan
        ),
        replace(
            _row("q", "hyperplane", 0.65, 1.0), setting="standard", ways=0, shots=0, episodes=0, ci95=math.nan
        ),
    ]
    predictions = {
        UnitKey(1, "v", "cls", "hyperplane"): best_pred,
        UnitKey(1, "q", "cls", "hyperplane"): other_pred,
    }
    tests = paired_verdicts(rows, Evaluation(rows, predictions=predictions), labels)
    assert len(tests) == 1 and (tests[0]["a"]["token"], tests[0]["b"]["token"]) == ("v", "q")
    a_only = int(np.sum((best_pred == labels) & (other_pred != labels)))
    b_only = int(np.sum((best_pred != labels) & (other_pred == labels)))
    assert (a_only, b_only) == (70, 20)
    assert tests[0]["test"] == "mcnemar" and tests[0]["statistic"] == a_only
    assert tests[0]["p_value"] == pytest.approx(binomtest(a_only, a_only + b_only, 0.5).pvalue, rel=1e-12)
    assert tests[0]["verdict"].startswith("A better")


class _FakeStore:
    """The few FeatureStore reads :func:`class_direction_map` makes, over in-memory patch features."""

    task = "segmentation"

    def __init__(self, feats: np.ndarray, patch_labels: np.ndarray, classes: list[str], grid: tuple) -> None:
        self.feats, self._labels, self.classes, self.grid = feats, patch_labels, classes, grid

    def patch_labels(self) -> np.ndarray:
        return self._labels

    def get(self, token: str, position: str, block: int) -> np.ndarray:
        assert position == "patch"
        return self.feats


def test_direction_maps_are_cosines_of_normalised_patch_tokens() -> None:
    """Pin: a direction map is cos(μ_c, patch token) — both sides L2-normalised — checked against NumPy."""
    from qkvprobe.study.sides import class_direction_map

    rng = np.random.default_rng(0)
    n, h, w, D, K = 6, 2, 3, 5, 4
    labels = rng.integers(0, 3, (n, h * w))  # class 3 has no training patches
    labels[0, 0] = 255
    scale = rng.uniform(0.5, 30.0, (n, h * w, 1))  # patch norms far from 1
    feats = (rng.normal(size=(n, h * w, D)) + 2 * np.eye(D)[labels % D]) * scale
    train = _FakeStore(feats.astype(np.float32), labels, ["a", "b", "c", "d"], (h, w))
    test_feats = rng.normal(size=(3, h * w, D)) * rng.uniform(0.5, 30.0, (3, h * w, 1))
    test = _FakeStore(test_feats.astype(np.float32), labels[:3], ["a", "b", "c", "d"], (h, w))
    cos = class_direction_map(train, test, "q", 1, 3, 10_000, 0)
    assert cos.shape == (3, K, h, w)
    keep = labels.reshape(-1) != 255
    X, y = feats.reshape(-1, D)[keep], labels.reshape(-1)[keep]
    unit = X / np.linalg.norm(X, axis=1, keepdims=True)
    for c in range(3):
        mu = unit[y == c].mean(0)
        ref = test_feats @ mu / np.linalg.norm(test_feats, axis=-1) / np.linalg.norm(mu)
        np.testing.assert_allclose(cos[:, c].reshape(3, -1), ref, atol=1e-5)
    assert np.isnan(cos[:, 3]).all()
