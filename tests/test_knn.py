"""The weighted k-NN rule: a NumPy reference (exact votes and ties), scikit-learn's neighbours on real digits,
the estimator contract, and the rule in all four protocols."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KNeighborsClassifier
from sklearn.utils.estimator_checks import check_estimator

from qkvprobe.errors import RuleError
from qkvprobe.protocols import (
    evaluate_classification,
    evaluate_segmentation,
    fewshot_classification,
    fewshot_segmentation,
    standard_segmentation,
)
from qkvprobe.protocols import knn as knn_protocol
from qkvprobe.rules.knn import KNNRule, knn_topk
from test_protocols import GRID, PATCH, FakeStore, cls_data, episodes, seg_data


def unit(X: np.ndarray) -> np.ndarray:
    return X / np.maximum(np.linalg.norm(X, axis=-1, keepdims=True), 1e-12)


def numpy_knn(Xtr: np.ndarray, ytr: np.ndarray, Xq: np.ndarray, k: int, T: float, K: int) -> np.ndarray:
    """Votes ``[m, K]`` by the definition: cosine similarities, the k largest, Σ exp(s/T) per class."""
    S = unit(Xq) @ unit(Xtr).T
    votes = np.zeros((len(Xq), K))
    for i, row in enumerate(S):
        nn = np.argsort(-row, kind="stable")[: min(k, len(row))]
        np.add.at(votes[i], ytr[nn], np.exp(row[nn] / T))
    return votes


def test_topk_is_exact_with_small_blocks() -> None:
    rng = np.random.default_rng(0)
    M, Q = unit(rng.normal(size=(500, 16))), unit(rng.normal(size=(70, 16)))
    ref = np.sort(Q @ M.T, axis=1)[:, ::-1][:, :7]
    Mt, Qt = torch.as_tensor(M), torch.as_tensor(Q)
    for blocks in (Mt, [Mt[:123], Mt[123:300], Mt[300:]]):
        sims, idx = knn_topk(Qt, blocks, 7, block_bytes=1024)  # many tiny blocks: the merge path
        np.testing.assert_allclose(sims.numpy(), ref, rtol=1e-12)
        np.testing.assert_allclose((Qt[:, None] * Mt[idx]).sum(-1).numpy(), ref, rtol=1e-12)
    sims, idx = knn_topk(Qt, Mt[:3], 7)  # fewer memory rows than k: all of them
    assert sims.shape == (70, 3)
    with pytest.raises(RuleError, match="memory is empty"):
        knn_topk(Qt, Mt[:0], 7)


def test_knn_rule_equals_the_numpy_reference_and_breaks_ties_to_the_smaller_class() -> None:
    X, y = cls_data(120, 3)
    Xq, _ = cls_data(60, 4)
    rule = KNNRule(k=7, T=0.1).fit(X, y)
    ref = numpy_knn(X, y, Xq, 7, 0.1, 6)
    np.testing.assert_allclose(rule.predict_proba(Xq), ref / ref.sum(1, keepdims=True), rtol=1e-4)
    np.testing.assert_array_equal(rule.predict(Xq), ref.argmax(1))
    many = rule.votes_for(Xq, [1, 3, 7])  # several k from one similarity pass
    for v, k in zip(many, [1, 3, 7], strict=True):
        ref_k = numpy_knn(X, y, Xq, k, 0.1, 6)
        np.testing.assert_allclose(
            v / v.sum(1, keepdims=True), ref_k / ref_k.sum(1, keepdims=True), rtol=1e-4
        )
    # An exact tie between classes: two training points at the same angle, one per class.
    Xt = np.array([[1.0, 0.0], [0.0, 1.0]])
    tie = KNNRule(k=2).fit(Xt, np.array(["b", "a"]))
    assert tie.predict(np.array([[1.0, 1.0]]))[0] == "a"  # the smaller class (first in classes_) wins
    with pytest.raises(RuleError, match="k-NN k must be a positive integer"):
        KNNRule(k=0).fit(X, y)
    with pytest.raises(RuleError, match="temperature T must be a positive"):
        KNNRule(T=-1).fit(X, y)


def test_knn_rule_gives_scikit_learns_neighbour_predictions_on_digits() -> None:
    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, _ = train_test_split(X, y, test_size=0.3, random_state=0)
    T = 0.07
    sk = KNeighborsClassifier(
        n_neighbors=20, metric="cosine", algorithm="brute", weights=lambda d: np.exp((1 - d) / T)
    ).fit(Xtr, ytr)
    ours = KNNRule(k=20, T=T).fit(Xtr, ytr)
    agree = np.mean(sk.predict(Xte) == ours.predict(Xte))
    assert agree >= 0.998, agree  # float32 similarities: a near-tie may flip; measured 100 % here


def test_knn_rule_passes_check_estimator() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = check_estimator(KNNRule(), on_fail=None)
    failed = {r["check_name"]: str(r["exception"])[:200] for r in results if r["status"] == "failed"}
    assert not failed and len(results) > 40


def test_fewshot_knn_is_the_1nn_and_cosine_rule_at_one_shot() -> None:
    Xtr, ytr = cls_data(120, 3)
    Xte, yte = cls_data(60, 4)
    ep = episodes(ytr, yte, ways=4, shots=1, queries=5, episodes=20)
    args = (Xtr, Xte, ep.classes, ep.support, ep.support_labels, ep.query, ep.query_labels)
    knn = fewshot_classification(*args, rule="knn")
    cos = fewshot_classification(*args, rule="cosine")
    np.testing.assert_array_equal(knn.per_episode, cos.per_episode)
    ep5 = episodes(ytr, yte, ways=3, shots=5, queries=4, episodes=15)
    res = fewshot_classification(
        Xtr,
        Xte,
        ep5.classes,
        ep5.support,
        ep5.support_labels,
        ep5.query,
        ep5.query_labels,
        rule="knn",
        k=4,
        T=0.2,
    )
    for e in range(15):
        votes = numpy_knn(Xtr[ep5.support[e]], ep5.support_labels[e], Xte[ep5.query[e]], 4, 0.2, 3)
        assert res.per_episode[e] == pytest.approx(np.mean(votes.argmax(1) == ep5.query_labels[e]))


def test_standard_knn_classification_rows() -> None:
    Xtr, ytr = cls_data(120, 3)
    Xte, yte = cls_data(60, 4)
    tr = FakeStore({("q", "cls"): Xtr}, labels=ytr)
    te = FakeStore({("q", "cls"): Xte}, labels=yte)
    ev = evaluate_classification(tr, te, setting="standard", tokens=("q",), rules=("knn",), k=5, T=0.1)
    (row,) = ev.rows
    ref = numpy_knn(Xtr, ytr, Xte, 5, 0.1, 6).argmax(1)
    assert row.value == pytest.approx(np.mean(ref == yte)) and row.params == "k=5,T=0.1"
    assert row.C != row.C and row.class_weight == "" and row.converged == ""
    assert not ev.weights  # k-NN has no class vectors


def patch_votes(ftr, pltr, fq, k, T, K=4) -> np.ndarray:
    keep = pltr != 255
    return numpy_knn(ftr[keep], pltr[keep], fq, k, T, K)


def test_standard_segmentation_knn_equals_a_reference_and_subsamples_reproducibly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ftr, pltr, _ = seg_data(12, 1)
    fte, plte, mte = seg_data(6, 2)
    tr = FakeStore({("q", "patch"): ftr}, patch_labels=pltr, task="segmentation")
    te = FakeStore({("q", "patch"): fte}, patch_labels=plte, task="segmentation")
    res = standard_segmentation(tr, te, token="q", rule="knn", masks=lambda i: mte[i - 100], k=5, T=0.1)
    from qkvprobe.protocols.metrics import ConfusionMatrix
    from qkvprobe.protocols.segmentation import upsample_argmax

    cm = ConfusionMatrix(4)
    D = ftr.shape[-1]
    for j in range(6):
        v = patch_votes(
            ftr.reshape(-1, D).astype(np.float64), pltr.reshape(-1), fte[j].astype(np.float64), 5, 0.1
        )
        share = torch.as_tensor(v / v.sum(1, keepdims=True))
        cm.update(upsample_argmax(share, GRID, (GRID[0] * PATCH, GRID[1] * PATCH)), torch.as_tensor(mte[j]))
    assert res.miou == pytest.approx(cm.compute()["miou"], abs=1e-9)
    assert res.weights is None and res.converged is None
    # A memory above the budget is a seeded sample of the labelled patches, the same on every run.
    from qkvprobe.protocols.segmentation import PatchData

    monkeypatch.setattr(knn_protocol, "KNN_MEMORY_BYTES", 4 * D * 50)
    data = PatchData(tr, "q", -1, pltr, torch.float64, torch.device("cpu"))
    (Ma, ya, seen), (Mb, yb, _) = (knn_protocol.knn_patch_memory(data.source(), 0) for _ in range(2))
    assert seen == int((pltr != 255).sum()) and len(Ma) == 50 and torch.equal(Ma, Mb) and torch.equal(ya, yb)
    a = standard_segmentation(tr, te, token="q", rule="knn", masks=lambda i: mte[i - 100], k=5)
    assert 0 < a.miou <= 1


def test_fewshot_segmentation_knn_never_lets_ignored_patches_vote() -> None:
    ftr, pltr, _ = seg_data(10, 1)
    fte, _, mte = seg_data(6, 2)
    classes, support, query = np.array([1, 2, 3]), np.array([[0, 1], [2, 3], [4, 5]]), np.array([0, 1, 2])
    args = (ftr, pltr, fte, np.arange(6), GRID, classes, support, query)
    res = fewshot_segmentation(*args, rule="knn", masks=lambda i: mte[i], k=3)
    # Poison the ignored patches' features: if they voted, the predictions would change.
    poisoned = ftr.copy()
    poisoned[pltr == 255] = 1e3
    again = fewshot_segmentation(poisoned, *args[1:], rule="knn", masks=lambda i: mte[i], k=3)
    np.testing.assert_array_equal(res.per_episode, again.per_episode)
    assert res.miou > 0.3


def test_knn_segmentation_rows_through_the_driver() -> None:
    ftr, pltr, _ = seg_data(12, 1)
    fte, plte, mte = seg_data(6, 2)
    tr = FakeStore({("q", "patch"): ftr}, patch_labels=pltr, task="segmentation")
    te = FakeStore({("q", "patch"): fte}, patch_labels=plte, task="segmentation")
    std = evaluate_segmentation(
        tr, te, setting="standard", tokens=("q",), rules=("knn", "cosine"), masks=lambda i: mte[i - 100]
    )
    assert {(r.rule, r.metric, r.params) for r in std.rows} >= {("knn", "miou", "k=20,T=0.07")}
