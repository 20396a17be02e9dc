"""The hyperplane rule: L2-penalised logistic regression on raw features (docs/science.md §2), as a
scikit-learn classifier over the solver package :mod:`qkvprobe.rules.logistic`."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from torch import Tensor

from ..errors import RuleError
from .batched import bmm
from .checks import (
    RuleEstimator,
    check_C,
    check_fitted,
    validate_features,
    validate_labels,
    validate_sample_weight,
)
from .logistic import DEFAULT_MAX_ITER, DEFAULT_TOL, default_dtype, fit_logistic


def hyperplane_scores(X: Tensor, coef: Tensor, intercept: Tensor) -> Tensor:
    """``X [G, m, D]``, ``coef [G, Kf, D]``, ``intercept [G, Kf]`` → class scores ``[G, m, K]`` (K = 2 gets
    the scores ``(0, s)``, so argmax works for every K)."""
    s = bmm(X, coef.transpose(1, 2)).add_(intercept[:, None, :])
    return torch.cat([torch.zeros_like(s), s], dim=2) if coef.shape[1] == 1 else s


def class_normals(coef: Tensor) -> Tensor:
    """Hyperplane ``coef [..., Kf, D]`` → one normal per class ``[..., K, D]``: binary logistic regression has
    the single normal w of class 1; its softmax-equivalent form gives class 0 the normal -w."""
    return torch.cat([-coef, coef], dim=-2) if coef.shape[-2] == 1 else coef


class HyperplaneRule(RuleEstimator):
    """Multinomial (K > 2) / binary (K = 2) logistic regression with an L2 penalty on raw features.

    The objective is ``LogisticRegression(C=C)``'s, ``C·Σ sw_i·logloss_i + ½‖W‖²`` (intercept unpenalised), and
    so is the optimum; the stopping rule is not: a fit ends when the objective is certified within ``tol``
    (relative) of its minimum (:mod:`qkvprobe.rules.logistic`), where scikit-learn's ``max|grad| ≤ tol`` can stop
    far from it at large C on raw features. A fit that is not certified within ``max_iter`` iterations warns with
    scikit-learn's ``ConvergenceWarning`` and sets ``converged_ = False``.

    Parameters (keyword-only): ``C`` (> 0), ``max_iter``, ``tol`` (relative objective accuracy), ``device``
    (where the fit runs), ``dtype`` (solver dtype; default float64 on CPU, float32 elsewhere), ``class_weight``
    (None, ``"balanced"`` or ``{label: weight}``, scikit-learn's).

    Fitted attributes: ``classes_ [K]``, ``coef_ [K, D]`` (``[1, D]`` for K = 2), ``intercept_ [K]`` (``[1]``),
    ``n_iter_ [1]``, ``converged_`` (bool), ``gap_`` (the certified relative distance of the objective from its
    optimum), ``n_features_in_``.

    ``sample_weight`` follows scikit-learn: one non-negative weight per sample, weight k ≡ k copies of the row,
    zero drops it, all zero is an error. scikit-learn's ``check_estimator`` passes except where the tags opt out
    on purpose: sparse input (``input_tags.sparse = False``; refused with a message saying so — the rules act on
    dense feature arrays).
    """

    _fitted_attribute = "coef_"

    def __init__(
        self,
        *,
        C: float = 1.0,
        max_iter: int = DEFAULT_MAX_ITER,
        tol: float = DEFAULT_TOL,
        device: str = "cpu",
        dtype: Any = None,
        class_weight: Any = None,
    ) -> None:
        self.C = C
        self.class_weight = class_weight
        self.max_iter = max_iter
        self.tol = tol
        self.device = device
        self.dtype = dtype

    def _torch_dtype(self) -> torch.dtype:
        return self.dtype or default_dtype(self.device)

    def fit(self, X: Any, y: Any, sample_weight: Any = None) -> HyperplaneRule:
        """``X [n, D]``, ``y [n]``, ``sample_weight [n]`` (optional) → self."""
        C = check_C(self.C)
        if not (isinstance(self.max_iter, int | np.integer) and self.max_iter >= 1):
            raise RuleError(f"max_iter must be a positive integer, got {self.max_iter!r}")
        if not (float(self.tol) > 0):
            raise RuleError(f"tol must be a positive number, got {self.tol!r}; e.g. tol=1e-4")
        X = validate_features(self, X, reset=True)
        self.classes_, codes = validate_labels(self, y, X.shape[0])
        sw = validate_sample_weight(sample_weight, X.shape[0])
        if self.class_weight is not None:
            cw = self._class_weights(codes, sw)[codes]
            sw = cw if sw is None else sw * cw
        keep = None if sw is None else np.flatnonzero(sw > 0)  # zero weight: the row is not in the problem
        if keep is not None and len(np.unique(codes[keep])) < 2:
            raise RuleError(
                "the samples with non-zero weight have 1 class; a decision rule needs at least 2 classes"
            )
        dt, dev = self._torch_dtype(), torch.device(self.device)
        Xt = torch.as_tensor(X).to(dev, dt)
        if keep is not None and sw is not None:  # keep is None exactly when sw is
            Xt, codes, sw = Xt[torch.as_tensor(keep, device=dev)], codes[keep], sw[keep]
        fit = fit_logistic(
            Xt[None],
            torch.as_tensor(codes, device=dev)[None],
            len(self.classes_),
            C,
            sample_weight=None if sw is None else torch.as_tensor(sw).to(dev, dt)[None],
            max_iter=int(self.max_iter),
            tol=float(self.tol),
        )
        self.coef_ = fit.coef[0].cpu().numpy()
        self.intercept_ = fit.intercept[0].cpu().numpy()
        self.n_iter_ = fit.n_iter.cpu().numpy()
        self.converged_ = bool(fit.converged[0])
        self.gap_ = float(fit.gap[0])
        if not self.converged_:
            warnings.warn(
                f"HyperplaneRule(C={C:g}) did not certify its optimum: relative gap {self.gap_:.1e} > "
                f"tol={self.tol:g} after {int(self.n_iter_[0])} iterations (max_iter={self.max_iter}); raise "
                "max_iter, or tol if the gap is already at floating-point precision",
                ConvergenceWarning,
                stacklevel=2,
            )
        return self

    def _class_weights(self, codes: np.ndarray, sample_weight: np.ndarray | None) -> np.ndarray:
        """Weight of each class of ``classes_`` ``[K]``, from scikit-learn's own ``compute_class_weight``."""
        from sklearn.utils.class_weight import compute_class_weight

        try:
            weights: np.ndarray = compute_class_weight(
                self.class_weight, classes=self.classes_, y=self.classes_[codes], sample_weight=sample_weight
            )
        except (ValueError, TypeError) as e:  # scikit-learn names the bad value; we add what is accepted
            raise RuleError(
                f"class_weight={self.class_weight!r} is not usable ({e}); pass None, 'balanced' or a dict "
                f"mapping labels among {self.classes_.tolist()} to weights"
            ) from None
        return weights

    def decision_function(self, X: Any) -> np.ndarray:
        """``X [m, D]`` → scores ``[m, K]`` (``[m]`` for K = 2, as scikit-learn)."""
        check_fitted(self, "coef_")
        X = validate_features(self, X, reset=False)
        Xn = X.detach().cpu().numpy() if isinstance(X, torch.Tensor) else X
        s: np.ndarray = Xn.astype(self.coef_.dtype, copy=False) @ self.coef_.T + self.intercept_
        return s[:, 0] if s.shape[1] == 1 else s

    def predict(self, X: Any) -> np.ndarray:
        """``X [m, D]`` → labels ``[m]`` from ``classes_``."""
        s = self.decision_function(X)
        labels: np.ndarray = self.classes_[(s > 0).astype(np.int64) if s.ndim == 1 else s.argmax(1)]
        return labels

    def predict_log_proba(self, X: Any) -> np.ndarray:
        """``X [m, D]`` → log class probabilities ``[m, K]`` (softmax; sigmoid for K = 2)."""
        s = self.decision_function(X)
        if s.ndim == 1:
            s = np.stack([np.zeros_like(s), s], axis=1)
        log_proba: np.ndarray = s - np.logaddexp.reduce(s, axis=1, keepdims=True)
        return log_proba

    def predict_proba(self, X: Any) -> np.ndarray:
        """``X [m, D]`` → class probabilities ``[m, K]``."""
        proba: np.ndarray = np.exp(self.predict_log_proba(X))
        return proba
