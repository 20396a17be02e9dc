"""The cosine rule: class directions ``μ_c`` = mean of the L2-normalised training features of class c;
predict ``argmax_c cos(x, μ_c)``. scikit-learn's ``NearestCentroid`` with a fixed cosine metric; no
learned parameters, no temperature."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator
from torch import Tensor

from ._checks import as_features, check_fitted, check_labels_known, check_width, encode_labels

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


class CosineRule(BaseEstimator):
    """Cosine-to-class-direction classifier. Fitted: ``classes_ [K]``, ``directions_ [K, D]`` (unnormalised
    class means of unit vectors), ``n_features_in_``."""

    def fit(self, X: Any, y: Any) -> CosineRule:
        """``X [n, D]``, ``y [n]`` → self."""
        X = as_features(X)
        self.classes_, codes = encode_labels(y, X.shape[0])
        Xt = torch.as_tensor(np.asarray(X.cpu() if isinstance(X, torch.Tensor) else X, dtype=np.float64))
        mu = cosine_directions(Xt[None], torch.as_tensor(codes)[None], len(self.classes_))
        self.directions_ = mu[0].numpy()
        self.n_features_in_ = X.shape[1]
        return self

    def decision_function(self, X: Any) -> np.ndarray:
        """``X [m, D]`` → cosines ``[m, K]``."""
        check_fitted(self, "directions_")
        X = as_features(X)
        check_width(X, self.n_features_in_)
        Xt = torch.as_tensor(np.asarray(X.cpu() if isinstance(X, torch.Tensor) else X, dtype=np.float64))
        return cosine_scores(Xt[None], torch.as_tensor(self.directions_)[None])[0].numpy()

    def predict(self, X: Any) -> np.ndarray:
        """``X [m, D]`` → labels ``[m]``."""
        scores = self.decision_function(X)  # first: raises NotFittedError before classes_ is read
        return self.classes_[scores.argmax(1)]

    def score(self, X: Any, y: Any) -> float:
        """Mean accuracy; labels must be among ``classes_``."""
        check_fitted(self, "directions_")
        check_labels_known(y, self.classes_)
        return float(np.mean(self.predict(X) == np.asarray(y)))
