"""Decision rules on raw features (docs/science.md §2): the hyperplane rule (L2 logistic regression, over the
solver package :mod:`.logistic`) the cosine rule (class directions) and weighted k-NN, with the scikit-learn
estimator contract."""

from __future__ import annotations

from .cosine import CosineRule, cosine_directions, cosine_scores
from .hyperplane import HyperplaneRule, class_normals, hyperplane_scores
from .knn import KNNRule
from .logistic import LogisticFit, fit_logistic, fit_logistic_grid, fit_logistic_path

__all__ = [
    "CosineRule",
    "HyperplaneRule",
    "KNNRule",
    "LogisticFit",
    "class_normals",
    "cosine_directions",
    "cosine_scores",
    "fit_logistic",
    "fit_logistic_grid",
    "fit_logistic_path",
    "hyperplane_scores",
]
