"""The evaluation driver: a rule added through the registry alone runs end to end; a train/test pair of stores
that do not belong together is refused, field by field; every argument is checked before any fit."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from qkvprobe import tables
from qkvprobe.errors import ConfigError, RuleError, StoreError
from qkvprobe.protocols import (
    MATCH_FIELDS,
    FewshotResult,
    PatchScorer,
    RuleProtocol,
    StandardResult,
    check_matching_stores,
    evaluate_classification,
    evaluate_segmentation,
    register_rule,
    rule_names,
)
from qkvprobe.protocols.metrics import mean_ci95
from test_protocols import FakeStore, cls_data, seg_data


class NearestMean(RuleProtocol):
    """Euclidean nearest class mean: a rule that exists only in this test module."""

    name = "nearest_mean"
    summary = "Euclidean nearest class mean (a test rule)"

    def standard_classification(self, Xtr, ytr, Xte, yte, num_classes, opts):
        out = []
        for g in range(Xtr.shape[0]):
            means = torch.stack([Xtr[g][torch.as_tensor(ytr) == c].mean(0) for c in range(num_classes)])
            pred = torch.cdist(Xte[g], means).argmin(1).numpy()
            out.append(StandardResult(float(np.mean(pred == yte)), float("nan"), {}, pred))
        return out

    def fewshot_classification(self, Ftr, Fte, support, support_labels, query, query_labels, ways, opts):
        acc = []
        for e in range(len(support)):
            S, Q = Ftr[support[e]], Fte[query[e]]
            means = torch.stack([S[support_labels[e] == c].mean(0) for c in range(ways)])
            acc.append(float((torch.cdist(Q, means).argmin(1) == query_labels[e]).double().mean()))
        mean, ci = mean_ci95(np.array(acc))
        return FewshotResult(np.array(acc), mean, ci)

    def segmentation_scorer(self, source, num_classes, opts):
        sums = torch.zeros(num_classes, source.store.embed_dim, dtype=source.dtype)
        counts = torch.zeros(num_classes, dtype=source.dtype)
        for X, y in source.source()():
            sums.index_add_(0, y, X[:, :-1])
            counts.index_add_(0, y, torch.ones_like(y, dtype=source.dtype))
        means = sums / counts.clamp_min(1)[:, None]
        return PatchScorer(lambda X: -torch.cdist(X, means))

    def fewshot_segmentation_scores(self, X, y, valid, Xq, opts):
        w = valid[..., None]
        fg = (X * (w * y[..., None])).sum(1) / (w * y[..., None]).sum(1).clamp_min(1)
        bg = (X * (w * (1 - y[..., None]))).sum(1) / (w * (1 - y[..., None])).sum(1).clamp_min(1)
        return (Xq - bg[:, None]).norm(dim=2) - (Xq - fg[:, None]).norm(dim=2), 0


@pytest.fixture
def nearest_mean(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(tables, "_RULES", dict(tables._RULES))  # leave the registry as it was
    register_rule(NearestMean())
    yield "nearest_mean"


def test_a_rule_added_through_the_registry_alone_runs_end_to_end(nearest_mean: str) -> None:
    assert rule_names()[-1] == nearest_mean
    Xtr, ytr = cls_data(120, 3)
    Xte, yte = cls_data(60, 4)
    tr, te = FakeStore({("q", "cls"): Xtr}, labels=ytr), FakeStore({("q", "cls"): Xte}, labels=yte)
    std = evaluate_classification(tr, te, setting="standard", tokens=("q",), rules=(nearest_mean, "cosine"))
    assert {r.rule for r in std.rows} == {nearest_mean, "cosine"} and all(r.value > 0.5 for r in std.rows)
    few = evaluate_classification(
        tr,
        te,
        setting="fewshot",
        tokens=("q",),
        rules=(nearest_mean,),
        ways=3,
        shots=2,
        queries=3,
        episodes=8,
    )
    assert [(r.rule, r.shots) for r in few.rows] == [(nearest_mean, 2)] and few.rows[0].value > 0.5
    ftr, pltr, _ = seg_data(10, 1)
    fte, plte, mte = seg_data(6, 2)
    str_, ste = (
        FakeStore({("q", "patch"): ftr}, patch_labels=pltr, task="segmentation"),
        FakeStore({("q", "patch"): fte}, patch_labels=plte, task="segmentation"),
    )
    seg = evaluate_segmentation(
        str_, ste, setting="standard", tokens=("q",), rules=(nearest_mean,), masks=lambda i: mte[i - 100]
    )
    assert seg.rows[0].rule == nearest_mean and seg.rows[0].value > 0.5
    from qkvprobe.config import load_config

    cfg = load_config(None, [f"rules=[hyperplane, {nearest_mean}]", "block_sweep.rules=[]"])
    assert cfg.rules == ["hyperplane", nearest_mean]


def manifest_store(**changes: object) -> FakeStore:
    Xtr, ytr = cls_data(60, 3)
    store = FakeStore({("q", "cls"): Xtr}, labels=ytr)
    manifest = {
        "backbone": {"spec": "timm:vit_small_patch16_224.dino", "weights_digest": "aa11"},
        "preprocessing": {"mean": [0.5], "std": [0.25], "interpolation": "bicubic"},
        "image_size": [224, 224],
        "blocks": [11],
        "dataset": {"classes": ["cat", "dog"]},
    }
    for field, value in changes.items():
        target, key = {
            "backbone": (manifest["backbone"], "spec"),
            "weights": (manifest["backbone"], "weights_digest"),
            "mean": (manifest["preprocessing"], "mean"),
            "std": (manifest["preprocessing"], "std"),
            "interpolation": (manifest["preprocessing"], "interpolation"),
            "image_size": (manifest, "image_size"),
            "blocks": (manifest, "blocks"),
            "classes": (manifest["dataset"], "classes"),
        }[field]
        target[key] = value
    store.manifest = copy.deepcopy(manifest)
    return store


CHANGES = {
    "backbone": "timm:vit_base_patch16_224.mae",
    "weights": "bb22",
    "mean": [0.4],
    "std": [0.3],
    "image_size": [448, 448],
    "interpolation": "bilinear",
    "blocks": [5, 11],
    "classes": ["cat", "cow"],
}


@pytest.mark.parametrize("field", MATCH_FIELDS)
def test_stores_that_do_not_match_are_refused_field_by_field(field: str) -> None:
    train, test = manifest_store(), manifest_store(**{field: CHANGES[field]})
    with pytest.raises(
        StoreError, match=rf"{field} is .* in the train store but .* --allow-mismatch {field}"
    ):
        check_matching_stores(train, test)
    assert check_matching_stores(train, test, allow=[field]) == (field,)
    assert check_matching_stores(train, manifest_store()) == ()


def test_an_allowed_mismatch_is_recorded_in_the_rows() -> None:
    train, test = manifest_store(), manifest_store(image_size=[448, 448])
    with pytest.raises(StoreError, match="image_size"):
        evaluate_classification(train, test, setting="standard", tokens=("q",), rules=("cosine",))
    ev = evaluate_classification(
        train, test, setting="standard", tokens=("q",), rules=("cosine",), allow_mismatch=["image_size"]
    )
    assert ev.allowed_mismatch == ("image_size",) and ev.rows[0].allowed_mismatch == "image_size"
    with pytest.raises(ConfigError, match="unknown --allow-mismatch field 'size'"):
        check_matching_stores(train, test, allow=["size"])


@pytest.mark.parametrize(
    ("kw", "error", "message"),
    [
        ({"rules": ("hyperplane", "nearest")}, RuleError, r"unknown rule 'nearest'"),
        ({"rules": ()}, RuleError, "no rule given"),
        ({"setting": "zero-shot"}, ConfigError, "setting: 'zero-shot' is not allowed"),
        ({"tokens": ("q", "ffn")}, ConfigError, "holds no ffn .*extract again with --tokens q,ffn"),
        ({"tokens": ()}, ConfigError, "no tokens given"),
        ({"positions": ("avg",)}, ConfigError, "position 'avg' is not in the stores"),
        ({"positions": ("patch",)}, ConfigError, "classification evaluates positions cls, avg, got 'patch'"),
        ({"blocks": ()}, ConfigError, "no block given"),
        ({"Cs": ()}, ConfigError, "the C grid is empty"),
        ({"Cs": (1.0, -2.0)}, ConfigError, "C values must be positive"),
        ({"C": "sometimes", "setting": "fewshot"}, ConfigError, "fewshot.C"),
        ({"class_weight": "heavy"}, ConfigError, "class_weight: 'heavy' is not allowed"),
        ({"k": 0, "rules": ("knn",)}, ConfigError, "knn.k: Input should be greater than or equal to 1"),
        ({"setting": "fewshot", "shots": (0,)}, ConfigError, "shot counts must be >= 1"),
        (
            {"setting": "fewshot", "ways": 1},
            ConfigError,
            "fewshot.ways: Input should be greater than or equal to 2",
        ),
        (
            {"setting": "fewshot", "episodes": 0},
            ConfigError,
            "fewshot.episodes: Input should be greater than",
        ),
    ],
)
def test_every_argument_is_checked_before_any_fit(
    kw: dict, error: type, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qkvprobe.protocols import tasks

    def no_fit(*a: object, **k: object) -> None:
        raise AssertionError("a fit ran before the arguments were checked")

    monkeypatch.setattr(tasks.ClassificationTask, "standard", no_fit)
    monkeypatch.setattr(tasks.ClassificationTask, "fewshot_unit", no_fit)
    Xtr, ytr = cls_data(60, 3)
    tr, te = FakeStore({("q", "cls"): Xtr}, labels=ytr), FakeStore({("q", "cls"): Xtr}, labels=ytr)
    args = {"setting": "standard", "tokens": ("q",), "rules": ("hyperplane", "cosine"), **kw}
    with pytest.raises(error, match=message):
        evaluate_classification(tr, te, **args)
