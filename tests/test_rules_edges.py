"""Edges of the cosine and k-NN rules that the mutation run (``make mutation MODULE=rules/cosine.py`` and
``MODULE=rules/knn.py``, docs/testing.md) found unpinned."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qkvprobe.errors import RuleError
from qkvprobe.rules import CosineRule


def test_cosine_rule_takes_a_tensor_that_requires_grad() -> None:
    """Features straight from a model (a tensor still attached to autograd) fit like their NumPy copy."""
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(12, 4)), np.repeat([0, 1, 2], 4)
    Xt = torch.tensor(X, requires_grad=True)
    a, b = CosineRule().fit(Xt, y), CosineRule().fit(X, y)
    np.testing.assert_allclose(a.directions_, b.directions_, rtol=1e-15)
    np.testing.assert_allclose(a.cosines(Xt), b.cosines(X), rtol=1e-15)


def test_cosine_rule_without_labels_names_itself() -> None:
    with pytest.raises(RuleError, match=r"^CosineRule requires y to be passed, but the target y is None"):
        CosineRule().fit(np.ones((3, 2)), None)


def test_knn_rule_takes_a_tensor_that_requires_grad() -> None:
    """Memory and queries straight from a model (attached to autograd) vote like their NumPy copies (k-NN and
    the hyperplane raised a RuntimeError on such a tensor before)."""
    from qkvprobe.rules import KNNRule

    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(15, 4)), np.repeat([0, 1, 2], 5)
    Xt = torch.tensor(X, requires_grad=True)
    a, b = KNNRule(k=3, T=0.1).fit(Xt, y), KNNRule(k=3, T=0.1).fit(X, y)
    np.testing.assert_array_equal(a.memory_, b.memory_)
    np.testing.assert_array_equal(a.predict(Xt), b.predict(X))
    np.testing.assert_allclose(a.predict_proba(Xt), b.predict_proba(X), rtol=1e-6)
    with pytest.raises(RuleError, match=r"^KNNRule requires y to be passed, but the target y is None"):
        KNNRule().fit(X, None)


def test_knn_topk_of_an_empty_memory_says_so() -> None:
    from qkvprobe.rules.knn import knn_topk

    with pytest.raises(RuleError, match=r"^k-NN memory is empty; fit on at least one sample$"):
        knn_topk(torch.ones(2, 3), torch.empty(0, 3), 5)


def test_hyperplane_rule_takes_a_tensor_that_requires_grad() -> None:
    from qkvprobe.rules import HyperplaneRule

    rng = np.random.default_rng(2)
    X, y = rng.normal(size=(20, 3)), np.repeat([0, 1], 10)
    a = HyperplaneRule(C=0.5, tol=1e-10).fit(torch.tensor(X, requires_grad=True), y)
    b = HyperplaneRule(C=0.5, tol=1e-10).fit(X, y)
    np.testing.assert_allclose(a.coef_, b.coef_, rtol=1e-12)


@pytest.mark.parametrize(
    ("k", "T", "message"),
    [
        (True, 0.07, r"^k-NN k must be a positive integer, got True; e\.g\. k=20$"),
        (2.5, 0.07, r"^k-NN k must be a positive integer, got 2\.5; e\.g\. k=20$"),
        (0, 0.07, r"^k-NN k must be a positive integer, got 0; e\.g\. k=20$"),
        (3, "warm", r"^k-NN temperature T must be a positive number, got 'warm'; e\.g\. T=0\.07$"),
        (3, 0.0, r"^k-NN temperature T must be a positive finite number, got 0\.0; e\.g\. T=0\.07$"),
        (3, float("inf"), r"^k-NN temperature T must be a positive finite number, got inf; e\.g\. T=0\.07$"),
    ],
)
def test_knn_parameters_refused_at_their_boundaries(k: object, T: object, message: str) -> None:
    from qkvprobe.rules.knn import check_knn_params

    with pytest.raises(RuleError, match=message):
        check_knn_params(k, T)
    assert check_knn_params(np.int64(1), "0.5") == (1, 0.5)


def test_knn_votes_do_not_overflow_at_a_small_temperature_and_keep_float64() -> None:
    """Weights are exp((s − s_max)/T): at T = 0.005 exp(s/T) alone would overflow float32 (and float64 at
    s/T > 709); the shares stay finite, the nearest neighbour dominates, and float64 similarities give float64
    votes."""
    from qkvprobe.rules.knn import knn_votes

    sims = torch.tensor([[[0.99, 0.98, 0.5]]], dtype=torch.float32)
    labels = torch.tensor([[[1, 0, 0]]])
    votes = knn_votes(sims, labels, 2, T=0.005)
    assert torch.isfinite(votes).all()
    share = votes / votes.sum(-1, keepdim=True)
    expected_1 = 1 / (1 + np.exp(-0.01 / 0.005) + np.exp(-0.49 / 0.005))
    assert float(share[0, 0, 1]) == pytest.approx(expected_1, rel=1e-5)
    v64 = knn_votes(sims.double() * 4, labels, 2, T=0.005)  # s/T = 792: exp would overflow float64 too
    assert v64.dtype == torch.float64 and torch.isfinite(v64).all()
