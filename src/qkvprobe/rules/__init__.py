"""Decision rules on raw features (PAPER.md §2): the hyperplane rule (L2 logistic regression) and the
cosine rule (class directions), with the scikit-learn estimator contract and batched solvers."""

from __future__ import annotations

from .cosine import CosineRule, cosine_directions, cosine_scores
from .hyperplane import (
    HyperplaneRule,
    fit_hyperplane_batched,
    fit_hyperplane_path,
    hyperplane_scores,
)

__all__ = [
    "CosineRule",
    "HyperplaneRule",
    "cosine_directions",
    "cosine_scores",
    "fit_hyperplane_batched",
    "fit_hyperplane_path",
    "hyperplane_scores",
]
