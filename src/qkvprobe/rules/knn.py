"""The weighted k-NN rule: the reference every self-supervised ViT paper reports next to linear probes.

DINO's protocol (DINO, DINOv2, DINOv3, solo-learn and lightly use it): features L2-normalised; the ``k`` training
samples of highest cosine similarity ``s`` vote for their class with weight ``exp(s / T)``; the class with the
largest total wins (ties: the smaller class index, so the first class in ``classes_`` order). Defaults ``k = 20``,
``T = 0.07``. It is not a direction rule (docs/science.md §5): it keeps every training sample instead of one
vector per class, which is why the paper's question is asked of the two direction rules and k-NN is reported as
the reference.

With fewer training samples than ``k`` (few-shot episodes) every sample votes; at one shot per class that is the
1-NN rule, which with cosine similarity is also the cosine rule's decision (one unit vector per class).

:func:`knn_topk` is exact and bounded in memory: similarities are formed a block of queries × a block of memory at
a time (``KNN_BLOCK_BYTES``) and merged into a running top-k, so 1.28 M × 768 training features never need the full
similarity matrix. ``benchmarks/bench_rules.py knn`` measures it against scikit-learn's brute-force neighbours.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import RuleError
from ..tables import KNN_K as KNN_K  # DINO's defaults, from the rule table
from ..tables import KNN_T as KNN_T
from .checks import RuleEstimator, check_fitted, validate_features, validate_labels

#: Bytes of one block of similarities (queries × memory rows) in :func:`knn_topk`.
KNN_BLOCK_BYTES = 64 * 1024**2
#: Queries whose neighbours :func:`knn_topk` searches at a time.
KNN_QUERY_ROWS = 4096
#: Guards the normalisation of all-zero features (a zero vector has no direction).
EPS = 1e-12


def check_knn_params(k: Any, T: Any) -> tuple[int, float]:
    """``k`` a positive integer, ``T`` a positive finite temperature."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise RuleError(f"k-NN k must be a positive integer, got {k!r}; e.g. k=20")
    try:
        T = float(T)
    except (TypeError, ValueError):
        raise RuleError(f"k-NN temperature T must be a positive number, got {T!r}; e.g. T=0.07") from None
    if not (T > 0 and np.isfinite(T)):
        raise RuleError(f"k-NN temperature T must be a positive finite number, got {T!r}; e.g. T=0.07")
    return int(k), T


def normalise(X: Tensor) -> Tensor:
    """Rows to unit length (zero rows stay zero)."""
    return torch.nn.functional.normalize(X, dim=-1, eps=EPS)


def knn_topk(
    queries: Tensor, memory: Tensor | Iterable[Tensor], k: int, *, block_bytes: int = KNN_BLOCK_BYTES
) -> tuple[Tensor, Tensor]:
    """Exact top-``k`` cosine neighbours of unit-length ``queries [m, D]`` among unit-length ``memory [n, D]`` (or
    a list of row blocks of it) → (similarities ``[m, k']``, memory row indices ``[m, k']``), sorted by decreasing
    similarity, ``k' = min(k, n)``.

    Memory is bounded: ``KNN_QUERY_ROWS`` queries × as many memory rows as ``block_bytes`` allow at a time, merged
    into a running top-k. Which of several neighbours at exactly equal similarity fills the last place is
    ``torch.topk``'s choice; equal votes between classes are settled by :func:`knn_predict` (the smaller class)."""
    blocks = [memory] if isinstance(memory, Tensor) else list(memory)
    n = sum(len(b) for b in blocks)
    if n == 0:
        raise RuleError("k-NN memory is empty; fit on at least one sample")
    k = min(k, n)
    m = queries.shape[0]
    sims = torch.empty(m, k, dtype=queries.dtype, device=queries.device)
    idx = torch.empty(m, k, dtype=torch.int64, device=queries.device)
    for lo in range(0, m, KNN_QUERY_ROWS):
        Q = queries[lo : lo + KNN_QUERY_ROWS]
        step = max(k, block_bytes // (len(Q) * queries.element_size()))
        best_s: Tensor | None = None
        best_i: Tensor | None = None
        offset = 0
        for B in blocks:
            for a in range(0, len(B), step):
                S = Q @ B[a : a + step].T  # [q, b]
                s, i = torch.topk(S, min(k, S.shape[1]), dim=1)
                i += offset + a
                if best_s is None or best_i is None:
                    best_s, best_i = s, i
                else:
                    best_s, j = torch.topk(torch.cat([best_s, s], 1), k, dim=1)
                    best_i = torch.cat([best_i, i], 1).gather(1, j)
            offset += len(B)
        assert best_s is not None and best_i is not None  # n > 0: some memory block filled them
        sims[lo : lo + len(Q)], idx[lo : lo + len(Q)] = best_s, best_i
    return sims, idx


def knn_predict(votes: Tensor) -> Tensor:
    """The winning class of votes ``[..., K]``: the largest total; equal totals go to the smaller class index."""
    return votes.argmax(-1)  # torch.argmax returns the first of equal maxima


def knn_votes(sims: Tensor, labels: Tensor, num_classes: int, T: float, k: int | None = None) -> Tensor:
    """Class votes ``[..., m, K]`` of the first ``k`` neighbours (all when None): ``Σ exp(s/T)`` per class.

    ``sims [..., m, k']`` sorted by decreasing similarity, ``labels [..., m, k']`` their class codes. The weights
    are shifted by the largest similarity of each query before exponentiation (``exp((s − s_max)/T)``): the same
    argmax, and no overflow at small T."""
    if k is not None:
        sims, labels = sims[..., :k], labels[..., :k]
    w = torch.exp((sims - sims[..., :1]) / T)
    votes = torch.zeros(*sims.shape[:-1], num_classes, dtype=w.dtype, device=w.device)
    return votes.scatter_add_(-1, labels, w)


class KNNRule(RuleEstimator):
    """Weighted k-NN on cosine similarity (DINO's evaluation; module doc), with scikit-learn's classifier contract.

    Parameters: ``k`` (neighbours; fewer training samples → all of them), ``T`` (vote temperature), ``device``.
    Fitted: ``classes_ [K]``, ``memory_ [n, D]`` (the unit-length training features, float32),
    ``memory_labels_ [n]`` (codes into ``classes_``), ``n_features_in_``. ``predict_proba`` gives the normalised
    votes. Sparse input is refused (tags), as for the other rules."""

    _fitted_attribute = "memory_"

    def __init__(self, *, k: int = KNN_K, T: float = KNN_T, device: str = "cpu") -> None:
        self.k = k
        self.T = T
        self.device = device

    def fit(self, X: Any, y: Any) -> KNNRule:
        """``X [n, D]``, ``y [n]`` → self (stores the normalised training features)."""
        check_knn_params(self.k, self.T)
        X = validate_features(self, X, reset=True)
        self.classes_, codes = validate_labels(self, y, X.shape[0])
        Xt = torch.as_tensor(np.asarray(X) if not isinstance(X, Tensor) else X).to(self.device, torch.float32)
        self.memory_ = normalise(Xt).cpu().numpy()
        self.memory_labels_ = codes
        return self

    def _votes(self, X: Any, ks: Sequence[int] | None = None) -> list[np.ndarray]:
        check_fitted(self, "memory_")
        X = validate_features(self, X, reset=False)
        k, T = check_knn_params(self.k, self.T)
        ks = [k] if ks is None else [check_knn_params(int(v), T)[0] for v in ks]
        Q = normalise(
            torch.as_tensor(np.asarray(X) if not isinstance(X, Tensor) else X).to(self.device, torch.float32)
        )
        M = torch.as_tensor(self.memory_, device=self.device)
        sims, idx = knn_topk(Q, M, max(ks))
        labels = torch.as_tensor(self.memory_labels_, device=self.device)[idx]
        return [knn_votes(sims, labels, len(self.classes_), T, kk).cpu().numpy() for kk in ks]

    def votes_for(self, X: Any, ks: Sequence[int]) -> list[np.ndarray]:
        """Class votes ``[m, K]`` for each ``k`` of ``ks``, from one similarity pass (the largest k's)."""
        return self._votes(X, ks)

    def predict_proba(self, X: Any) -> np.ndarray:
        """``X [m, D]`` → normalised votes ``[m, K]``."""
        votes = self._votes(X)[0]
        proba: np.ndarray = votes / votes.sum(1, keepdims=True)
        return proba

    def decision_function(self, X: Any) -> np.ndarray:
        """``X [m, D]`` → normalised votes ``[m, K]``; for K = 2 the second class's minus the first's ``[m]``."""
        p = self.predict_proba(X)
        return p[:, 1] - p[:, 0] if p.shape[1] == 2 else p

    def predict(self, X: Any) -> np.ndarray:
        """``X [m, D]`` → labels ``[m]`` (vote ties: the first class of ``classes_``)."""
        best = knn_predict(torch.as_tensor(self._votes(X)[0])).numpy()
        labels: np.ndarray = self.classes_[best]
        return labels
