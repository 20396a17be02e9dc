"""Protocols on arrays and on a fake feature store (the FeatureStore read API of docs/CONTRACTS.md)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from qkvprobe.errors import ConfigError, FeatureError, RuleError
from qkvprobe.protocols import (
    UnitKey,
    evaluate_classification,
    evaluate_segmentation,
    fewshot_classification,
    fewshot_segmentation,
    standard_classification,
    standard_segmentation,
)
from qkvprobe.protocols import segmentation as seg
from qkvprobe.results import read_results
from qkvprobe.rules import CosineRule, HyperplaneRule, fit_logistic, fit_logistic_path

GRID, PATCH = (4, 4), 4


class FakeStore:
    """In-memory stand-in for qkvprobe.features.store.FeatureStore (read API only)."""

    def __init__(
        self, feats: dict, *, labels=None, patch_labels=None, task="classification", shard=7
    ) -> None:
        self.feats, self._labels, self._patch_labels, self.task, self.shard = (
            feats,
            labels,
            patch_labels,
            task,
            shard,
        )
        self.num_samples = len(next(iter(feats.values())))
        self.tokens = sorted({t for t, _ in feats})
        self.positions = sorted({p for _, p in feats})
        self.blocks, self.grid, self.patch_size, self.image_size = [1], GRID, PATCH, (16, 16)
        self.classes = [f"c{i}" for i in range(4)]
        self.dataset_spec, self.split, self.backbone_spec, self.objective = (
            "fake-data",
            "train",
            "fake:vit",
            "dino",
        )
        self.embed_dim = next(iter(feats.values())).shape[-1]

    def resolve_block(self, block: int) -> int:
        return block % 2

    def get(self, token: str, position: str, block: int = -1) -> np.ndarray:
        return self.feats[token, position]

    def iter_chunks(self, token: str, position: str, block: int = -1, *, chunk_size=None, shards=None):
        a = self.feats[token, position]
        step = min(self.shard, chunk_size or self.shard)
        for s in range(0, len(a), step):
            yield s, a[s : s + step]

    def labels(self) -> np.ndarray:
        return self._labels

    def patch_labels(self) -> np.ndarray:
        return self._patch_labels

    def indices(self) -> np.ndarray:
        return np.arange(self.num_samples) + 100  # dataset indices differ from rows on purpose


def cls_data(n: int, seed: int, dim: int = 12) -> tuple[np.ndarray, np.ndarray]:
    geo, rng = np.random.default_rng(0), np.random.default_rng(seed)
    means = geo.normal(size=(6, dim)) * 1.5
    y = np.repeat(np.arange(6), n // 6)
    return means[y] + rng.normal(size=(len(y), dim)) + 3, y


def episodes(ytr, yte, *, ways=3, shots=2, queries=4, episodes=12, seed=0, leave_out=False):
    """A tiny N-way K-shot sampler with the qkvprobe.data.episodes layout."""
    rng = np.random.default_rng(seed)
    cl = np.stack([rng.choice(np.unique(ytr), ways, replace=False) for _ in range(episodes)])
    sup = np.stack(
        [np.concatenate([rng.choice(np.flatnonzero(ytr == c), shots, replace=False) for c in r]) for r in cl]
    )
    qry = np.stack(
        [
            np.concatenate([rng.choice(np.flatnonzero(yte == c), queries, replace=False) for c in r])
            for r in cl
        ]
    )
    return SimpleNamespace(
        classes=cl,
        support=sup,
        query=qry,
        support_labels=np.tile(np.repeat(np.arange(ways), shots), (episodes, 1)),
        query_labels=np.tile(np.repeat(np.arange(ways), queries), (episodes, 1)),
    )


def test_standard_classification_batched_matches_single_rules() -> None:
    Xtr, ytr = cls_data(240, 1)
    Xte, yte = cls_data(120, 2)
    feats_tr, feats_te = [Xtr, 2.0 * Xtr + 1], [Xte, 2.0 * Xte + 1]
    hyp = standard_classification(feats_tr, ytr, feats_te, yte, rule="hyperplane", Cs=(0.01, 1.0))
    for g in range(2):
        ref = HyperplaneRule(C=hyp[g].C).fit(feats_tr[g], ytr)
        assert hyp[g].C in (0.01, 1.0) and set(hyp[g].val_accuracy) == {0.01, 1.0}
        assert abs(hyp[g].accuracy - ref.score(feats_te[g], yte)) <= 0.01
    cos = standard_classification(feats_tr, ytr, feats_te, yte, rule="cosine")
    np.testing.assert_array_equal(cos[0].predictions, CosineRule().fit(Xtr, ytr).predict(Xte))
    assert np.isnan(cos[0].C)
    # The fitted class vectors come back with each result: the refit rule's normals and the class means. Both
    # solved tightly: at the default tol the refit (warm-started from the held-out split's solution) and a fit
    # from W = 0 stop up to a few % apart.
    np.testing.assert_allclose(cos[1].weights, CosineRule().fit(feats_tr[1], ytr).directions_, atol=1e-5)
    tight = dict(tol=1e-12, max_iter=5000)
    hyp = standard_classification(feats_tr, ytr, feats_te, yte, rule="hyperplane", Cs=(0.01, 1.0), **tight)
    for g in range(2):
        ref = HyperplaneRule(C=hyp[g].C, **tight).fit(feats_tr[g], ytr).coef_
        np.testing.assert_allclose(hyp[g].weights, ref, atol=1e-4 * np.abs(ref).max())
    binary = standard_classification(
        [Xtr[ytr < 2]], ytr[ytr < 2], [Xte[yte < 2]], yte[yte < 2], rule="hyperplane", **tight
    )
    w = HyperplaneRule(C=binary[0].C, **tight).fit(Xtr[ytr < 2], ytr[ytr < 2]).coef_[0]
    np.testing.assert_allclose(binary[0].weights, np.stack([-w, w]), atol=1e-3 * np.abs(w).max())
    with pytest.raises(RuleError, match="does not occur in the training split"):
        standard_classification([Xtr], ytr, [Xte], yte + 10, rule="cosine")
    with pytest.raises(FeatureError, match="test width 5 != train width 12"):
        standard_classification([Xtr], ytr, [Xte[:, :5]], yte, rule="cosine")


def test_standard_classification_balanced_equals_balanced_rules() -> None:
    # Imbalanced training split (class k keeps 1/(k+1) of its rows): both the C sweep and the refit must be
    # HyperplaneRule(class_weight="balanced") fits, i.e. scikit-learn's weighting.
    from sklearn.model_selection import train_test_split

    Xtr, ytr = cls_data(240, 7)
    keep = np.random.default_rng(0).uniform(size=len(ytr)) < 1.0 / (ytr + 1)
    Xtr, ytr = Xtr[keep], ytr[keep]
    Xte, yte = cls_data(120, 8)
    res = standard_classification(
        [Xtr],
        ytr,
        [Xte],
        yte,
        rule="hyperplane",
        Cs=(0.001, 0.1),
        tol=1e-12,
        max_iter=2000,
        class_weight="balanced",
    )[0]
    fit, val = train_test_split(np.arange(len(ytr)), test_size=0.1, stratify=ytr, random_state=0)
    fit, val = np.sort(fit), np.sort(val)
    for C, acc in res.val_accuracy.items():
        ref = HyperplaneRule(C=C, tol=1e-12, max_iter=2000, class_weight="balanced").fit(Xtr[fit], ytr[fit])
        assert acc == pytest.approx(ref.score(Xtr[val], ytr[val]))
    ref = HyperplaneRule(C=res.C, tol=1e-12, max_iter=2000, class_weight="balanced").fit(Xtr, ytr)
    np.testing.assert_allclose(res.weights, ref.coef_, atol=1e-4 * np.abs(ref.coef_).max())
    plain = HyperplaneRule(C=res.C, tol=1e-12, max_iter=2000).fit(Xtr, ytr)
    assert np.abs(plain.coef_ - ref.coef_).max() > 0.05 * np.abs(ref.coef_).max()
    with pytest.raises(RuleError, match="class_weight must be None or 'balanced'"):
        standard_classification([Xtr], ytr, [Xte], yte, rule="hyperplane", class_weight={0: 2.0})


@pytest.mark.parametrize("rule", ["hyperplane", "cosine"])
def test_fewshot_batched_equals_per_episode_rules(rule: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from qkvprobe.protocols import hyperplane

    monkeypatch.setattr(hyperplane, "EPISODE_BATCH", 5)  # several batches of episodes
    Xtr, ytr = cls_data(120, 3)
    Xte, yte = cls_data(60, 4)
    ep = episodes(ytr, yte)
    args = (Xtr, Xte, ep.classes, ep.support, ep.support_labels, ep.query, ep.query_labels)
    res = fewshot_classification(*args, rule=rule)
    ref = []
    for e in range(len(ep.support)):
        r = (HyperplaneRule(C=1.0) if rule == "hyperplane" else CosineRule()).fit(
            Xtr[ep.support[e]], ep.support_labels[e]
        )
        ref.append(r.score(Xte[ep.query[e]], ep.query_labels[e]))
    np.testing.assert_allclose(res.per_episode, ref)
    assert res.mean == pytest.approx(np.mean(ref)) and res.ci95 > 0


def test_fewshot_bad_episodes() -> None:
    Xtr, ytr = cls_data(60, 3)
    ep = episodes(ytr, ytr)
    ok = (ep.classes, ep.support, ep.support_labels, ep.query, ep.query_labels)
    with pytest.raises(RuleError, match="empty episode"):
        fewshot_classification(
            Xtr,
            Xtr,
            ep.classes,
            ep.support[:, :0],
            ep.support_labels[:, :0],
            ep.query,
            ep.query_labels,
            rule="cosine",
        )
    with pytest.raises(RuleError, match="out of range"):
        fewshot_classification(Xtr[:5], Xtr, *ok, rule="cosine")
    with pytest.raises(RuleError, match="N >= 2 ways"):
        fewshot_classification(
            Xtr,
            Xtr,
            ep.classes,
            ep.support,
            0 * ep.support_labels,
            ep.query,
            0 * ep.query_labels,
            rule="cosine",
        )
    with pytest.raises(RuleError, match="unknown rule 'nearest'"):
        fewshot_classification(Xtr, Xtr, *ok, rule="nearest")
    with pytest.raises(RuleError, match="C must be a positive"):
        fewshot_classification(Xtr, Xtr, *ok, rule="hyperplane", C=0)
    with pytest.raises(FeatureError, match="width 4 but train features 12"):
        fewshot_classification(Xtr, Xtr[:, :4], *ok, rule="cosine")
    bad = Xtr.copy()
    bad[0, 0] = np.nan
    with pytest.raises(FeatureError, match="NaN or Inf"):
        fewshot_classification(bad, Xtr, *ok, rule="cosine")


def test_evaluate_classification_on_store_rows() -> None:
    Xtr, ytr = cls_data(120, 5)
    Xte, yte = cls_data(60, 6)
    tr = FakeStore({("q", "cls"): Xtr, ("k", "cls"): Xtr * 3}, labels=ytr)
    te = FakeStore({("q", "cls"): Xte, ("k", "cls"): Xte * 3}, labels=yte)
    told: list[tuple[str, int, int]] = []
    std = evaluate_classification(
        tr, te, setting="standard", tokens=("q", "k"), Cs=(0.1, 1.0), progress=lambda *a: told.append(a)
    )
    # One unit per block × position × rule (the token types are fitted together), then the end.
    assert told == [
        ("block 1 · cls · hyperplane (2 tokens)", 0, 2),
        ("block 1 · cls · cosine (2 tokens)", 1, 2),
        ("done", 2, 2),
    ]
    assert len(std.rows) == 4 and all(r.ways == r.shots == r.episodes == 0 and r.block == 1 for r in std.rows)
    assert {(r.token, r.rule) for r in std.rows} == {(t, r) for t in "qk" for r in ("hyperplane", "cosine")}
    assert std.rows[0].model == "fake:vit" and std.predictions[UnitKey(1, "q", "cls", "cosine")].shape == (
        60,
    )
    told.clear()
    fs = evaluate_classification(
        tr,
        te,
        setting="fewshot",
        tokens=("q",),
        ways=3,
        shots=2,
        queries=4,
        episodes=10,
        episode_sampler=episodes,
        progress=lambda *a: told.append(a),
    )
    assert [d for _, d, _ in told] == [0, 1, 2] and {t for _, _, t in told} == {2}
    assert told[0][0] == "3-way 2-shot · block 1 · q·cls · hyperplane"
    assert [(r.rule, r.ways, r.shots, r.episodes) for r in fs.rows] == [
        ("hyperplane", 3, 2, 10),
        ("cosine", 3, 2, 10),
    ]
    assert all(r.ci95 >= 0 for r in fs.rows) and fs.per_episode[
        UnitKey(1, "q", "cls", "cosine", 2)
    ].shape == (10,)
    with pytest.raises(ConfigError, match="setting: 'zero-shot' is not allowed"):
        evaluate_classification(tr, te, setting="zero-shot")


# -- segmentation -------------------------------------------------------------------------------------------
def seg_data(num: int, seed: int, dim: int = 8, probs: list[float] | None = None):
    """Patch features = class embedding + noise; masks = patch labels upsampled ×PATCH (nearest). ``probs``:
    class frequencies (default uniform)."""
    geo, rng = np.random.default_rng(0), np.random.default_rng(seed)
    emb = geo.normal(size=(4, dim)) * 2
    shape = (num, GRID[0] * GRID[1])
    pl = rng.integers(0, 4, shape) if probs is None else rng.choice(4, shape, p=probs)
    feats = (emb[pl] + 0.7 * rng.normal(size=(num, pl.shape[1], dim)) + 2).astype(np.float32)
    masks = np.kron(pl.reshape(num, *GRID), np.ones((PATCH, PATCH), dtype=np.int64))
    pl = pl.copy()
    pl[:, 0] = 255  # ignored patches must not be trained on
    masks[:, :2, :2] = 255
    return feats, pl, masks


def test_upsampling_is_bilinear_then_argmax() -> None:
    scores = torch.randn(16, 3, dtype=torch.float64)
    ref = F.interpolate(scores.T.reshape(1, 3, 4, 4), size=(10, 13), mode="bilinear", align_corners=False)[
        0
    ].argmax(0)
    assert torch.equal(seg.upsample_argmax(scores, (4, 4), (10, 13)), ref)


@pytest.mark.parametrize("rule", ["hyperplane", "cosine"])
def test_standard_segmentation_streaming_equals_in_memory(rule: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ftr, pltr, _ = seg_data(20, 1)
    fte, plte, mte = seg_data(10, 2)
    tr = FakeStore({("q", "patch"): ftr}, patch_labels=pltr, task="segmentation")
    te = FakeStore({("q", "patch"): fte}, patch_labels=plte, task="segmentation")
    masks = lambda i: mte[i - 100]  # noqa: E731  (dataset index = row + 100)
    kw = dict(token="q", rule=rule, masks=masks, Cs=(1.0,))
    in_ram = standard_segmentation(tr, te, **kw)
    monkeypatch.setattr(seg, "MEMORY_BUDGET_BYTES", 0)  # force re-reading the store every pass
    monkeypatch.setattr(seg, "CHUNK_ROWS", 100)
    streamed = standard_segmentation(tr, te, **kw)
    assert in_ram.miou > 0.8 and 0 <= in_ram.pixel_accuracy <= 1
    assert streamed.miou == pytest.approx(in_ram.miou, abs=1e-3)
    assert (rule == "cosine") == np.isnan(in_ram.C)
    # Fitted class vectors, against an in-memory fit on the labelled training patches (both solved tightly:
    # at the default tol the two L-BFGS paths, warm-started differently, stop ~1 % apart).
    X, y = ftr.reshape(-1, ftr.shape[-1]).astype(np.float64), pltr.reshape(-1)
    X, y = X[y != 255], y[y != 255]
    if rule == "cosine":
        got = in_ram.weights
        ref = CosineRule().fit(X, y).directions_
        ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    else:
        got = standard_segmentation(tr, te, **kw, tol=1e-12, max_iter=2000).weights
        ref = HyperplaneRule(C=1.0, tol=1e-12, max_iter=2000).fit(X, y).coef_
    assert got.shape == (len(tr.classes), X.shape[1])
    np.testing.assert_allclose(got[np.unique(y)], ref, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("rule", ["hyperplane", "cosine"])
def test_fewshot_segmentation(rule: str) -> None:
    ftr, pltr, _ = seg_data(12, 3)
    fte, _, mte = seg_data(6, 4)
    classes, support, query = (
        np.array([1, 2, 1, 3]),
        np.array([[0, 1], [2, 3], [4, 5], [6, 7]]),
        np.array([0, 1, 2, 3]),
    )
    res = fewshot_segmentation(
        ftr, pltr, fte, np.arange(6), GRID, classes, support, query, rule=rule, masks=lambda i: mte[i]
    )
    assert res.per_episode.shape == (4,) and res.miou > 0.5 and res.fb_iou > 0.7
    # Hand check of episode 0's foreground IoU from the full-resolution prediction is implied by miou's
    # definition; here: a class absent from the support set predicts background everywhere → IoU 0.
    none = fewshot_segmentation(
        ftr,
        np.zeros_like(pltr),
        fte,
        np.arange(6),
        GRID,
        classes[:1],
        support[:1],
        query[:1],
        rule=rule,
        masks=lambda i: mte[i],
    )
    assert none.per_episode[0] == 0.0
    with pytest.raises(RuleError, match="empty or malformed episodes"):
        fewshot_segmentation(
            ftr,
            pltr,
            fte,
            np.arange(6),
            GRID,
            classes[:0],
            support[:0],
            query[:0],
            rule=rule,
            masks=lambda i: mte[i],
        )
    with pytest.raises(FeatureError, match="width 3 but train 8"):
        fewshot_segmentation(
            ftr,
            pltr,
            fte[..., :3],
            np.arange(6),
            GRID,
            classes,
            support,
            query,
            rule=rule,
            masks=lambda i: mte[i],
        )


def test_balanced_segmentation_equals_balanced_rule_fits() -> None:
    # Imbalanced classes (class 0 = "background" on 70 % of the patches): the protocols' class_weight="balanced"
    # must be scikit-learn's, i.e. HyperplaneRule(class_weight="balanced") on the labelled (non-255) patches.
    probs = [0.7, 0.2, 0.07, 0.03]
    ftr, pltr, _ = seg_data(20, 1, probs=probs)
    fte, plte, mte = seg_data(10, 2, probs=probs)
    tr = FakeStore({("q", "patch"): ftr}, patch_labels=pltr, task="segmentation")
    te = FakeStore({("q", "patch"): fte}, patch_labels=plte, task="segmentation")
    masks = lambda i: mte[i - 100]  # noqa: E731
    X, y = ftr.reshape(-1, ftr.shape[-1]).astype(np.float64), pltr.reshape(-1)
    X, y = X[y != 255], y[y != 255]
    kw = dict(token="q", rule="hyperplane", masks=masks, Cs=(0.01,), tol=1e-12, max_iter=2000)
    got = standard_segmentation(tr, te, **kw, class_weight="balanced").weights
    ref = HyperplaneRule(C=0.01, tol=1e-12, max_iter=2000, class_weight="balanced").fit(X, y).coef_
    np.testing.assert_allclose(got, ref, atol=1e-4 * np.abs(ref).max())
    plain = HyperplaneRule(C=0.01, tol=1e-12, max_iter=2000).fit(X, y).coef_
    assert np.abs(plain - ref).max() > 0.05 * np.abs(ref).max()  # the weighting does change this problem
    with pytest.raises(RuleError, match="class_weight must be None or 'balanced'"):
        standard_segmentation(tr, te, **kw, class_weight="auto")

    # Few-shot: each episode's foreground IoU equals a balanced binary HyperplaneRule on its support patches.
    classes = np.array([1, 2, 3, 1])
    support = np.stack([np.flatnonzero((pltr == c).any(1))[[j, j + 1]] for j, c in enumerate(classes)])
    query = np.array([np.flatnonzero((plte == c).any(1))[j] for j, c in enumerate(classes)])
    res = fewshot_segmentation(
        ftr,
        pltr,
        fte,
        np.arange(10),
        GRID,
        classes,
        support,
        query,
        rule="hyperplane",
        masks=lambda i: mte[i],
        C=0.1,
        tol=1e-13,
        max_iter=3000,
        class_weight="balanced",
    )
    for e, c in enumerate(classes):
        Xs, ys = ftr[support[e]].reshape(-1, ftr.shape[-1]).astype(np.float64), pltr[support[e]].reshape(-1)
        keep = ys != 255
        rule = HyperplaneRule(C=0.1, tol=1e-13, max_iter=3000, class_weight="balanced").fit(
            Xs[keep], ys[keep] == c
        )
        s = torch.as_tensor(rule.decision_function(fte[query[e]].astype(np.float64)))
        up = F.interpolate(s.reshape(1, 1, *GRID), size=mte[0].shape, mode="bilinear", align_corners=False)[
            0, 0
        ]
        pred, gt, valid = up.numpy() > 0, mte[query[e]] == c, mte[query[e]] != 255
        assert res.per_episode[e] == pytest.approx(((pred & gt & valid).sum()) / ((pred | gt) & valid).sum())
    with pytest.raises(RuleError, match="class_weight must be None or 'balanced'"):
        fewshot_segmentation(
            ftr,
            pltr,
            fte,
            np.arange(10),
            GRID,
            classes,
            support,
            query,
            rule="hyperplane",
            masks=lambda i: mte[i],
            class_weight="Balanced",
        )


def test_evaluate_segmentation_rows() -> None:
    ftr, pltr, _ = seg_data(12, 5)
    fte, plte, mte = seg_data(6, 6)
    tr = FakeStore({("v", "patch"): ftr}, patch_labels=pltr, task="segmentation")
    te = FakeStore({("v", "patch"): fte}, patch_labels=plte, task="segmentation")
    masks = lambda i: mte[i - 100]  # noqa: E731
    told: list[tuple[str, int, int]] = []
    std = evaluate_segmentation(
        tr,
        te,
        setting="standard",
        tokens=("v",),
        rules=("cosine",),
        masks=masks,
        progress=lambda *a: told.append(a),
    )
    assert told == [("block 1 · v·patch · cosine", 0, 1), ("done", 1, 1)]
    assert [r.metric for r in std.rows] == ["miou", "pixel_accuracy"] and std.rows[0].task == "segmentation"

    def sampler(tr_counts, te_counts, *, shots, episodes, seed, **_):
        assert tr_counts.shape == (12, 4) and tr_counts.sum() == (pltr != 255).sum() * PATCH**2
        return SimpleNamespace(
            classes=np.array([1, 2]), support=np.array([[0] * shots, [1] * shots]), query=np.array([0, 1])
        )

    told.clear()
    fs = evaluate_segmentation(
        tr,
        te,
        setting="fewshot",
        tokens=("v",),
        rules=("cosine", "hyperplane"),
        shots=1,
        masks=masks,
        episode_sampler=sampler,
        progress=lambda *a: told.append(a),
    )
    assert told == [
        ("1-shot · block 1 · v·patch · cosine", 0, 2),
        ("1-shot · block 1 · v·patch · hyperplane", 1, 2),
        ("done", 2, 2),
    ]
    cosine_rows = fs.rows[:2]  # the cosine rule's rows
    assert [(r.metric, r.ways, r.shots, r.episodes) for r in cosine_rows] == [
        ("miou", 1, 1, 2),
        ("fb_iou", 1, 1, 2),
    ]
    with pytest.raises(ConfigError, match="segmentation evaluates positions patch, got 'cls'"):
        evaluate_segmentation(tr, te, setting="standard", positions=("cls",), masks=masks)


def fake_cli_stores(tmp_path, monkeypatch: pytest.MonkeyPatch, n_train: int, n_test: int) -> list[str]:
    """``FeatureStore.open`` of ``tmp_path/tr`` and ``tmp_path/te`` gives in-memory classification stores (token q·cls);
    returns the ``evaluate`` arguments naming them."""
    from qkvprobe.features import store as store_mod

    Xtr, ytr = cls_data(n_train, 7)
    Xte, yte = cls_data(n_test, 8)
    stores = {
        "tr": FakeStore({("q", "cls"): Xtr}, labels=ytr),
        "te": FakeStore({("q", "cls"): Xte}, labels=yte),
    }
    monkeypatch.setattr(
        store_mod.FeatureStore, "open", classmethod(lambda cls, p: stores[str(p).rsplit("/", 1)[-1]])
    )
    return [
        "evaluate",
        "--train-store",
        str(tmp_path / "tr"),
        "--test-store",
        str(tmp_path / "te"),
        "--tokens",
        "q",
    ]


def test_cli_evaluate_writes_results(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from qkvprobe.cli import get_app

    out = tmp_path / "results.csv"
    args = [
        *fake_cli_stores(tmp_path, monkeypatch, 60, 30),
        "--rules",
        "cosine",
        "--blocks",
        "-1",
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(get_app(), args)
    assert result.exit_code == 0, result.output
    rows = read_results(out)
    assert len(rows) == 1 and rows[0].rule == "cosine" and rows[0].setting == "standard"
    bad = CliRunner().invoke(get_app(), [*args, "--setting", "oneshot"])
    assert bad.exit_code == 2
    assert (
        "Invalid value for '--setting': unknown setting 'oneshot'; choose from standard, fewshot"
        in bad.output
    )
    bad = CliRunner().invoke(get_app(), [*args, "--task", "segmentation"])
    assert bad.exit_code == 1 and "holds a classification dataset, not segmentation" in bad.output
    bad = CliRunner().invoke(get_app(), [*args, "--blocks", "last"])
    assert bad.exit_code == 2 and "Invalid value for '--blocks': block 'last' is not an integer" in bad.output
    bad = CliRunner().invoke(get_app(), ["evaluate", "--test-store", str(tmp_path / "te")])
    assert bad.exit_code == 2 and "--train-store and --test-store" in bad.output
    hyp = [*args[:-6], "--rules", "hyperplane", "--blocks", "-1", "--out", str(tmp_path / "balanced.csv")]
    ok = CliRunner().invoke(get_app(), [*hyp, "--class-weight", "balanced"])
    assert ok.exit_code == 0, ok.output
    assert "hyperplane (balanced)" in ok.output
    assert "Which token, with which rule?" in ok.output and "q·cls" in ok.output  # the closing answer table
    ok = CliRunner().invoke(get_app(), hyp)  # plain rows join the balanced ones instead of replacing them
    assert ok.exit_code == 0, ok.output
    assert sorted((r.rule, r.class_weight) for r in read_results(tmp_path / "balanced.csv")) == [
        ("hyperplane", "balanced"),
        ("hyperplane", "none"),
    ]
    bad = CliRunner().invoke(get_app(), [*hyp, "--class-weight", "auto"])
    assert bad.exit_code == 2 and "unknown class weight 'auto'; choose from none, balanced" in bad.output
    few = [*hyp, "--setting", "fewshot", "--ways", "3", "--shots", "1", "--queries", "2", "--episodes", "5"]
    ok = CliRunner().invoke(get_app(), [*few, "--fewshot-c", "0.25"])
    assert ok.exit_code == 0, ok.output
    assert {r.C for r in read_results(tmp_path / "balanced.csv") if r.setting == "fewshot"} == {0.25}
    assert {r.class_weight for r in read_results(tmp_path / "balanced.csv") if r.setting == "fewshot"} == {
        "none"
    }
    bad = CliRunner().invoke(get_app(), [*hyp, "--fewshot-c", "0.1"])
    assert bad.exit_code == 2 and "--fewshot-c sets the few-shot C" in bad.output
    bad = CliRunner().invoke(get_app(), [*hyp, "--setting", "fewshot", "--fewshot-c", "-1"])
    assert bad.exit_code == 2 and "C must be a positive finite number" in bad.output


def test_standard_C_sweep_spread_over_ranks(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The C grid split round-robin over ranks and merged gives the single-process choice and accuracy."""
    import torch.distributed as dist

    Xtr, ytr = cls_data(240, 1)
    Xte, yte = cls_data(120, 2)
    Cs = (1e-4, 1e-3, 0.01, 0.1, 1.0)
    alone = standard_classification([Xtr, 2 * Xtr], ytr, [Xte, 2 * Xte], yte, rule="hyperplane", Cs=Cs)
    # A real (gloo, one-process) group: the sweep goes through shard_for_rank and all_gather_objects.
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        grouped = standard_classification([Xtr, 2 * Xtr], ytr, [Xte, 2 * Xte], yte, rule="hyperplane", Cs=Cs)
    finally:
        dist.destroy_process_group()
    # Two ranks, simulated: this process is rank 0; rank 1's share is swept here when rank 0 gathers.
    sweeps, shares = [], []
    from qkvprobe.protocols import hyperplane as hp

    real_sweep, real_shard = hp._c_sweep, hp.shard_for_rank

    def sweep(*args):
        sweeps.append(args)
        return real_sweep(*args)

    def gather(obj):
        args = sweeps[-1]
        return [obj, real_sweep(*args[:5], real_shard(Cs, 1, 2), args[6])]

    monkeypatch.setattr(hp, "_group_size", lambda: 2)
    monkeypatch.setattr(hp, "_c_sweep", sweep)
    monkeypatch.setattr(hp, "all_gather_objects", gather)
    monkeypatch.setattr(hp, "shard_for_rank", lambda items: shares.append(list(items)) or list(items)[0::2])
    spread = standard_classification([Xtr, 2 * Xtr], ytr, [Xte, 2 * Xte], yte, rule="hyperplane", Cs=Cs)
    assert shares == [list(Cs)] and [a[5] for a in sweeps] == [[1e-4, 0.01, 1.0]]
    for a, b, c in zip(alone, grouped, spread, strict=True):
        assert a.C == b.C == c.C and a.accuracy == b.accuracy
        assert abs(a.accuracy - c.accuracy) <= 1 / len(
            yte
        )  # other warm starts: equal up to the solver tolerance
        assert list(c.val_accuracy) == list(Cs)
        np.testing.assert_allclose(list(c.val_accuracy.values()), list(a.val_accuracy.values()), atol=1 / 24)


@pytest.mark.parametrize("tiny_blocks", [False, True])
def test_fewshot_cosine_any_support_order_and_unequal_shots(
    tiny_blocks: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cosine fast path (label-sorted support, K rows per class) and the general path (unequal counts)
    both equal per-episode CosineRule fits, also when the episodes are split into many support blocks and
    query chunks (with remainders)."""
    Xtr, ytr = cls_data(120, 3)
    Xte, yte = cls_data(60, 4)
    ep = episodes(ytr, yte, shots=3)
    if tiny_blocks:  # blocks of 5 episodes, query chunks of 2 (float32 rows of width D)
        from qkvprobe.protocols import cosine as cos_mod

        row = 4 * Xtr.shape[1]
        monkeypatch.setattr(cos_mod, "COSINE_SUPPORT_BYTES", 5 * ep.support.shape[1] * row)
        monkeypatch.setattr(cos_mod, "COSINE_QUERY_BYTES", 2 * ep.query.shape[1] * row)
        assert len(ep.support) % 5 and len(ep.support) > 10
    rng = np.random.default_rng(1)
    perm = np.stack([rng.permutation(ep.support.shape[1]) for _ in ep.support])  # shuffled support rows
    support, labels = np.take_along_axis(ep.support, perm, 1), np.take_along_axis(ep.support_labels, perm, 1)
    unequal = labels.copy()
    unequal[:, 0] = (unequal[:, 0] + 1) % 3  # one row relabelled: 4 + 2 rows for two classes
    for lab in (labels, unequal):
        res = fewshot_classification(
            Xtr, Xte, ep.classes, support, lab, ep.query, ep.query_labels, rule="cosine"
        )
        ref = [
            CosineRule().fit(Xtr[support[e]], lab[e]).score(Xte[ep.query[e]], ep.query_labels[e])
            for e in range(len(support))
        ]
        np.testing.assert_allclose(res.per_episode, ref)


def test_standard_held_out_split_too_small_for_classes() -> None:
    Xtr, ytr = cls_data(240, 1)
    Xte, yte = cls_data(120, 2)
    few = np.concatenate([np.flatnonzero(ytr == c)[:3] for c in np.unique(ytr)])  # 3 per class: 10 % < K
    with pytest.raises(RuleError, match=r"held-out split of .* cannot hold all"):
        standard_classification([Xtr[few]], ytr[few], [Xte], yte, rule="hyperplane", Cs=(1.0,))


def test_fewshot_float32_solves_equal_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    """The few-shot hyperplane's float32 span-reduced solves give float64's per-episode accuracies, also when some
    episodes miss the stopping test in float32 and are finished in float64."""

    Xtr, ytr = cls_data(240, 3, dim=40)
    Xte, yte = cls_data(120, 4, dim=40)
    ep = episodes(ytr, yte, ways=4, shots=3, queries=5, episodes=40)
    args = (Xtr, Xte, ep.classes, ep.support, ep.support_labels, ep.query, ep.query_labels)
    f32 = fewshot_classification(*args, rule="hyperplane")
    from qkvprobe.protocols import hyperplane as hp

    monkeypatch.setattr(hp, "FEWSHOT_SOLVE_DTYPE", torch.float64)
    f64 = fewshot_classification(*args, rule="hyperplane")
    np.testing.assert_array_equal(f32.per_episode, f64.per_episode)
    monkeypatch.setattr(hp, "FEWSHOT_SOLVE_DTYPE", torch.float32)
    from qkvprobe.rules.logistic import fit as logistic_fit

    real, dtypes = logistic_fit.solve, []

    def short(objective, w0, **k):  # float32 stops after 3 iterations → every episode is finished in float64
        dtypes.append(w0.dtype)
        if w0.dtype == torch.float32:
            k["max_iter"] = 3
        return real(objective, w0, **k)

    monkeypatch.setattr(logistic_fit, "solve", short)
    redone = fewshot_classification(*args, rule="hyperplane")
    assert dtypes == [torch.float32, torch.float64]
    np.testing.assert_array_equal(redone.per_episode, f64.per_episode)
    assert redone.unconverged == 0


@pytest.mark.gpu
@pytest.mark.parametrize("rule", ["hyperplane", "cosine"])
def test_fewshot_on_gpu_matches_cpu(rule: str) -> None:
    """The few-shot protocol on CUDA (torch products instead of numpy's, Cholesky basis on the device) gives the
    CPU's per-episode accuracies, up to rare float32 ties (at most one episode in 40 differs)."""
    Xtr, ytr = cls_data(240, 3, dim=40)
    Xte, yte = cls_data(120, 4, dim=40)
    ep = episodes(ytr, yte, ways=4, shots=5, queries=5, episodes=40)
    args = (Xtr, Xte, ep.classes, ep.support, ep.support_labels, ep.query, ep.query_labels)
    cpu = fewshot_classification(*args, rule=rule)
    gpu = fewshot_classification(*args, rule=rule, device="cuda")
    assert np.sum(np.abs(gpu.per_episode - cpu.per_episode) > 1e-9) <= 1
    assert gpu.mean == pytest.approx(cpu.mean, abs=0.01)


@pytest.mark.parametrize("gram", ["float64", "float32"])
@pytest.mark.parametrize("balanced", [False, True])
def test_streaming_curvature_preconditioner_equals_in_memory(
    balanced: bool, gram: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A warm start's curvature preconditioner summed over streamed chunks equals the in-memory objective's
    (the refit and every C after the first of a segmentation sweep use it): exactly with float64 Gram products,
    and up to float32 rounding (amplified by the curvature's conditioning) with the default float32 ones."""
    from qkvprobe.rules.logistic import (
        DenseLogistic,
        StreamedLogistic,
        augment,
        balanced_sample_weight,
        precondition,
        second_moment,
    )

    rng = np.random.default_rng(4)
    n, D, K = 300, 6, 3
    X = augment(torch.as_tensor(rng.normal(size=(n, D)) + 3.0))
    y = torch.as_tensor(rng.choice(K, n, p=[0.6, 0.3, 0.1]))
    start = torch.as_tensor(rng.normal(size=(1, (D + 1) * K)) * 0.2)
    sw = torch.ones(1, n, dtype=torch.float64)
    class_w = None
    if balanced:
        sw = balanced_sample_weight(y[None], sw, K)
        class_w = torch.as_tensor([float(sw[0][y == k][0]) for k in range(K)], dtype=torch.float64)
    moment = second_moment(X[None], torch.ones(1, n, dtype=torch.float64))
    monkeypatch.setattr(precondition, "GRAM_DTYPE", getattr(torch, gram))
    chunks = lambda: iter([(X[a : a + 70], y[a : a + 70]) for a in range(0, n, 70)])  # noqa: E731
    streamed = StreamedLogistic(chunks, n, K, [0.5], moment, class_w, start=start)
    in_ram = DenseLogistic(
        X[None],
        y[None],
        sw,
        torch.tensor([0.5], dtype=torch.float64),
        K,
        moment,
        start=start.view(1, D + 1, K),
    )
    assert streamed.P.shape == (1, K, D + 1, D + 1) and streamed.P.dtype == getattr(torch, gram)
    v = torch.as_tensor(rng.normal(size=(1, (D + 1) * K)))
    if gram == "float64":
        torch.testing.assert_close(streamed.P, in_ram.P)
        torch.testing.assert_close(streamed.precondition(v), in_ram.precondition(v))
    else:
        a, b = streamed.precondition(v), in_ram.precondition(v)
        assert float((a - b).norm() / b.norm()) < 1e-3


def test_standard_C_sweep_fits_every_C_independently() -> None:
    """Every C of the standard protocol's grid is its own fit from W = 0 (as a loop over scikit-learn fits), so
    no C's solution depends on another's; each is certified, and equals its cold fit."""
    from qkvprobe.protocols import hyperplane as classification
    from qkvprobe.rules.logistic import DenseLogistic, augment

    X, y = cls_data(1200, 3)
    Xt = torch.as_tensor(X)[None]
    yt = torch.as_tensor(y)[None]
    fit, val = torch.arange(0, 1200, 2), torch.arange(1, 1200, 2)
    Cs = [0.01, 100.0]
    # All Cs are one batch sharing X; each solution is its own cold fit's, up to the stopping rule. (W itself is
    # compared only at the small C: at C = 100 the optimum is flat, and two fits whose products sum in another
    # order stop at different points within the certified tolerance; the objectives agree within it.)
    sweep = classification._c_sweep(Xt, yt, fit, val, 6, Cs, {})
    assert sweep["converged"].all()
    for j, C in enumerate(Cs):
        cold = fit_logistic(Xt[:, fit], yt[:, fit], 6, C, reduce=False)
        coef, intercept = cold.coef, cold.intercept
        if C < 1:
            torch.testing.assert_close(sweep["coef"][j], coef, rtol=1e-6, atol=1e-6 * float(coef.abs().max()))
        objective = DenseLogistic(
            augment(Xt[:, fit]),
            yt[:, fit],
            torch.ones(1, len(fit), dtype=Xt.dtype),
            torch.tensor([C], dtype=Xt.dtype),
            6,
        )
        values = [
            float(objective.value_grad(torch.cat([c.transpose(1, 2), b[:, None]], 1).reshape(1, -1))[0])
            for c, b in ((sweep["coef"][j], sweep["intercept"][j]), (coef, intercept))
        ]
        assert values[0] == pytest.approx(values[1], rel=2e-4)
    # A warm-started path is certified at each C too, so it reaches the same objective as the independent fit.
    warm = fit_logistic_path(Xt[:, fit], yt[:, fit], 6, Cs)[1]
    assert bool(warm.converged.all())
    wv = float(
        objective.value_grad(
            torch.cat([warm.coef.transpose(1, 2), warm.intercept[:, None]], 1).reshape(1, -1)
        )[0]
    )
    assert wv == pytest.approx(values[1], rel=2e-4)


def test_standard_segmentation_sweep_fits_every_C_from_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    """As in classification: every C of the segmentation sweep starts from W = 0; only the refit on all training
    images starts from the chosen C's solution."""
    ftr, pltr, _ = seg_data(20, 1)
    fte, plte, mte = seg_data(10, 2)
    tr = FakeStore({("q", "patch"): ftr}, patch_labels=pltr, task="segmentation")
    te = FakeStore({("q", "patch"): fte}, patch_labels=plte, task="segmentation")
    starts: list[tuple[float, bool]] = []
    from qkvprobe.protocols import hyperplane as hp

    fit = hp._fit_streaming

    def spy(
        source: object,
        num_classes: int,
        Cs: list[float],
        W0: torch.Tensor | None,
        *args: object,
        **kwargs: object,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        starts.append((tuple(Cs), W0 is not None))
        out, ok = fit(source, num_classes, Cs, W0, *args, **kwargs)
        assert bool(ok.all())
        if W0 is None:  # the batched sweep equals one cold fit per C
            for C, w in zip(Cs, out, strict=True):
                alone = fit(source, num_classes, [C], None, *args, **kwargs)[0][0]
                # within the certified tolerance, W is determined only up to its flat directions at large C
                torch.testing.assert_close(w, alone, rtol=1e-2, atol=1e-2 * float(alone.abs().max()))
        return out, ok

    monkeypatch.setattr(hp, "_fit_streaming", spy)
    res = standard_segmentation(
        tr,
        te,
        token="q",
        rule="hyperplane",
        masks=lambda i: mte[i - 100],
        Cs=(0.01, 1.0, 100.0),
        tol=1e-10,  # so that batched and single fits agree in W, not only in the objective
    )
    assert starts == [((0.01, 1.0, 100.0), False), ((res.C,), True)]
