"""The cosine rule: class directions ``μ_c`` = mean of the L2-normalised training features of class c;
predict ``argmax_c cos(x, μ_c)``. scikit-learn's ``NearestCentroid`` with a fixed cosine metric; no
learned parameters, no temperature (docs/science.md §2)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from .checks import (
    RuleEstimator,
    check_fitted,
    validate_features,
    validate_labels,
    validate_sample_weight,
)

#: Guards the division for all-zero features (a zero vector has no direction; its cosines are 0).
EPS = 1e-12


def cosine_directions(X: Tensor, y: Tensor, num_classes: int, sample_weight: Tensor | None = None) -> Tensor:
    """``X [G, n, D]``, ``y [G, n]`` codes, ``sample_weight [G, n]`` (0 = padding) → ``μ [G, K, D]``."""
    Xn = torch.nn.functional.normalize(X, dim=-1, eps=EPS)
    onehot = torch.nn.functional.one_hot(y, num_classes).to(X.dtype)  # [G, n, K]
    if sample_weight is not None:
        onehot = onehot * sample_weight[..., None].to(X.dtype)
    counts = onehot.sum(1).clamp_min(EPS)  # [G, K]
    return (onehot.transpose(1, 2) @ Xn) / counts[..., None]


def cosine_scores(X: Tensor, directions: Tensor) -> Tensor:
    """``X [G, m, D]``, ``directions [G, K, D]`` → cosines ``[G, m, K]``."""
    Xn = torch.nn.functional.normalize(X, dim=-1, eps=EPS)
    mu = torch.nn.functional.normalize(directions, dim=-1, eps=EPS)
    return Xn @ mu.transpose(1, 2)


def _float64(X: np.ndarray | Tensor) -> Tensor:
    return torch.as_tensor(np.asarray(X.detach().cpu() if isinstance(X, Tensor) else X, dtype=np.float64))


class CosineRule(RuleEstimator):
    """Cosine-to-class-direction classifier (scikit-learn's estimator contract; ``check_estimator`` passes except
    for sparse input, which the tags opt out of: the rules act on dense feature arrays).

    Fitted: ``classes_ [K]``, ``directions_ [K, D]`` (unnormalised class means of unit vectors; with
    ``sample_weight`` the weighted means, so weight k ≡ k copies of the row), ``n_features_in_``."""

    _fitted_attribute = "directions_"

    def fit(self, X: Any, y: Any, sample_weight: Any = None) -> CosineRule:
        """``X [n, D]``, ``y [n]``, ``sample_weight [n]`` (optional) → self."""
        X = validate_features(self, X, reset=True)
        self.classes_, codes = validate_labels(self, y, X.shape[0])
        sw = validate_sample_weight(sample_weight, X.shape[0])
        mu = cosine_directions(
            _float64(X)[None],
            torch.as_tensor(codes)[None],
            len(self.classes_),
            sample_weight=None if sw is None else torch.as_tensor(sw)[None],
        )
        self.directions_ = mu[0].numpy()
        return self

    def cosines(self, X: Any) -> np.ndarray:
        """``X [m, D]`` → cosines to every class direction ``[m, K]``."""
        check_fitted(self, "directions_")
        X = validate_features(self, X, reset=False)
        return cosine_scores(_float64(X)[None], torch.as_tensor(self.directions_)[None])[0].numpy()

    def decision_function(self, X: Any) -> np.ndarray:
        """``X [m, D]`` → the cosines ``[m, K]``; for K = 2, ``cos(x, μ_1) − cos(x, μ_0)`` ``[m]`` (scikit-learn's
        binary convention: positive means the second class)."""
        cos = self.cosines(X)
        return cos[:, 1] - cos[:, 0] if cos.shape[1] == 2 else cos

    def predict(self, X: Any) -> np.ndarray:
        """``X [m, D]`` → labels ``[m]``."""
        best = self.cosines(X).argmax(1)  # first: raises NotFittedError before classes_ is read
        labels: np.ndarray = self.classes_[best]
        return labels
