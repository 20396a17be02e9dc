"""Input checks shared by the rules, on scikit-learn's own validation (``validate_data``, ``_check_sample_weight``,
``check_classification_targets``), so the rules keep scikit-learn's estimator contract, with one-line
qkvprobe errors that say how to fix the input.

Torch tensors are accepted as features and stay torch (no copy to the host); everything else goes through
scikit-learn's validation (lists, pandas, memmaps; sparse input is refused: the rules need dense features).
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import NotFittedError as SklearnNotFittedError
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import _check_sample_weight, validate_data

from ..errors import FeatureError, NotFittedError, RuleError


class RuleNotFittedError(NotFittedError, SklearnNotFittedError):  # type: ignore[misc]  # sklearn: no type stubs
    """A rule used before ``fit``: a qkvprobe error (one line at the CLI) and scikit-learn's ``NotFittedError``."""


class FeatureTypeError(FeatureError, TypeError):
    """Features of a type that cannot be numbers (scikit-learn raises TypeError there, and its checks expect it)."""


def _one_line(exc: Exception) -> str:
    # scikit-learn's messages can append the offending array ("array=[...]"): keep what was wrong, drop the dump.
    lines = [line for line in str(exc).splitlines() if line.strip() and not line.startswith("array=")]
    return " ".join(lines)


def validate_features(estimator: Any, X: Any, *, reset: bool) -> np.ndarray | torch.Tensor:
    """``X [n, D]`` checked (2-d, numeric, finite, not empty, dense) → float numpy or torch.

    ``reset=True`` (``fit``): records ``n_features_in_``; ``reset=False`` (``predict``): the width must equal it."""
    if isinstance(X, torch.Tensor):
        return _validate_tensor(estimator, X, reset=reset)
    try:
        checked: np.ndarray = validate_data(
            estimator, X, reset=reset, dtype=[np.float64, np.float32], ensure_min_samples=1, ensure_2d=True
        )
    except TypeError as exc:
        raise FeatureTypeError(f"{_one_line(exc)} ({_hint(exc)})") from None
    except ValueError as exc:
        raise FeatureError(f"{_one_line(exc)} ({_hint(exc)})") from None
    return checked


def _hint(exc: Exception) -> str:
    text = str(exc)
    if "features, but" in text:
        return "use features of the same token/block/model as in fit"
    if "parse" in text or "sparse" in text.lower():
        return "pass a dense float array [n_samples, n_features]"
    return "pass X as a finite float array [n_samples, n_features]"


def _validate_tensor(estimator: Any, X: torch.Tensor, *, reset: bool) -> torch.Tensor:
    if X.ndim != 2:
        raise FeatureError(
            f"Expected a 2D tensor [n_samples, n_features], got shape {tuple(X.shape)}; reshape it"
        )
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise FeatureError(
            f"Found an empty tensor of shape {tuple(X.shape)}; pass at least one sample and feature"
        )
    if X.is_complex() or not (X.is_floating_point() or X.dtype in (torch.int32, torch.int64)):
        raise FeatureError(f"X must be a real-valued tensor, got dtype {X.dtype}; pass float features")
    if not X.is_floating_point():
        X = X.double()
    if not bool(torch.isfinite(X).all()):
        raise FeatureError(
            "X contains NaN or inf values; re-extract the features (e.g. without fp16 overflow) or drop those rows"
        )
    if reset:
        estimator.n_features_in_ = int(X.shape[1])
    elif X.shape[1] != estimator.n_features_in_:
        raise FeatureError(
            f"X has {X.shape[1]} features, but {type(estimator).__name__} is expecting "
            f"{estimator.n_features_in_} features as input; use features of the same token/block/model as in fit"
        )
    return X.detach()  # features straight from a model: the rules never differentiate through them


def validate_labels(estimator: Any, y: Any, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """``y [n]`` (one label per sample, at least two classes) → (``classes_ [K]`` sorted, codes ``[n]`` int64)."""
    if y is None:
        raise RuleError(
            f"{type(estimator).__name__} requires y to be passed, but the target y is None; pass the labels"
        )
    y = np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y)
    if y.ndim == 2 and y.shape[1] == 1:
        from sklearn.utils.validation import column_or_1d

        y = column_or_1d(y, warn=True)  # scikit-learn's DataConversionWarning for a column vector
    if y.ndim != 1 or len(y) != num_samples:
        raise RuleError(
            f"y must be 1-d with one label per sample ({num_samples}), got shape {y.shape}; pass y as [n_samples]"
        )
    try:
        check_classification_targets(y)
    except ValueError as exc:
        raise RuleError(
            f"{_one_line(exc)}; pass class labels (integers or strings), not continuous values"
        ) from None
    classes, codes = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise RuleError(
            f"the training set has 1 class ({classes[0].tolist()!r}); a decision rule needs at least 2 classes"
        )
    return classes, codes.astype(np.int64).ravel()


def validate_sample_weight(sample_weight: Any, num_samples: int) -> np.ndarray | None:
    """``sample_weight [n]`` (non-negative, not all zero) as float64, or None. A weight of k counts as k copies
    of the row; zero drops it."""
    if sample_weight is None:
        return None
    if isinstance(sample_weight, torch.Tensor):
        sample_weight = sample_weight.detach().cpu().numpy()
    try:
        sw: np.ndarray = _check_sample_weight(
            sample_weight, np.empty((num_samples, 0)), dtype=np.float64, ensure_non_negative=True
        )
    except ValueError as exc:
        raise RuleError(
            f"{_one_line(exc).rstrip('.')}; pass one non-negative weight per sample, at least one of them positive"
        ) from None
    if not np.isfinite(sw).all():
        raise RuleError("sample_weight contains NaN or inf; pass finite non-negative weights")
    return sw


def check_C(C: Any) -> float:
    """The inverse regularisation strength must be a positive finite number."""
    try:
        value = float(C)
    except (TypeError, ValueError):
        raise RuleError(f"C must be a positive number, got {C!r}; use e.g. C=1.0") from None
    if not (value > 0 and np.isfinite(value)):
        raise RuleError(f"C must be a positive finite number, got {C!r}; use e.g. C=1.0")
    return value


def as_features(X: Any, *, name: str = "X", ndim: int = 2) -> np.ndarray | torch.Tensor:
    """Features for the protocols (no estimator): ``X`` (numpy, memmap or torch, ``ndim`` dims) after checking
    shape and finiteness. Torch tensors stay torch; anything else becomes a numpy float array."""
    if not isinstance(X, torch.Tensor):
        X = np.asarray(X)
        if not np.issubdtype(X.dtype, np.number) or np.iscomplexobj(X):
            raise FeatureError(f"{name} must be real numbers, got dtype {X.dtype}; pass a float array")
        if not np.issubdtype(X.dtype, np.floating):
            X = X.astype(np.float64)
    if X.ndim != ndim:
        raise FeatureError(
            f"{name} must have {ndim} dimensions, got shape {tuple(X.shape)}; "
            + (
                "reshape it to [n_samples, n_features]"
                if ndim == 2
                else "stack it as [groups, n_samples, n_features]"
            )
        )
    finite = torch.isfinite(X).all().item() if isinstance(X, torch.Tensor) else np.isfinite(X).all()
    if not finite:
        raise FeatureError(
            f"{name} contains NaN or Inf values; re-extract the features (e.g. without fp16 overflow) or drop "
            "those rows"
        )
    return cast("np.ndarray | torch.Tensor", X)  # a tensor, or the numpy array made above


def check_labels_known(y: Any, classes: np.ndarray) -> np.ndarray:
    """Map ``y`` onto indices of ``classes``; a label the rule never saw is an error (for ``score``)."""
    y = np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y)
    pos: np.ndarray = np.searchsorted(classes, y)
    pos = np.clip(pos, 0, len(classes) - 1)
    unknown = classes[pos] != y
    if unknown.any():
        raise RuleError(
            f"label {y[unknown][0].tolist()!r} is not among the fitted classes_ {classes.tolist()}; "
            "score only on labels seen in fit"
        )
    return pos


def check_fitted(rule: Any, attribute: str) -> None:
    """``predict`` before ``fit`` is an error (scikit-learn's ``check_is_fitted``, with a qkvprobe error)."""
    if not hasattr(rule, attribute):
        raise RuleNotFittedError(
            f"this {type(rule).__name__} is not fitted yet (no {attribute}); call fit(X, y) before using it"
        )


class RuleEstimator(ClassifierMixin, BaseEstimator):  # type: ignore[misc]  # scikit-learn ships no type stubs
    """What the three rules' estimators share: ``score`` with a label check, and dense input only (the estimator
    tags). ``_fitted_attribute`` names the attribute ``fit`` sets."""

    _fitted_attribute = ""

    def score(self, X: Any, y: Any, sample_weight: Any = None) -> float:
        """Mean accuracy on ``(X [m, D], y [m])`` (weighted by ``sample_weight``); labels must be among
        ``classes_``."""
        check_fitted(self, self._fitted_attribute)
        check_labels_known(y, self.classes_)
        correct = (self.predict(X) == np.asarray(y)).astype(np.float64)
        return float(np.average(correct, weights=sample_weight))

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = False
        return tags
