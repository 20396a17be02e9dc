"""Input checks shared by the rules: finite features, matching widths, usable labels, fitted state."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import FeatureError, NotFittedError, RuleError


def as_features(X: Any, *, name: str = "X", ndim: int = 2) -> np.ndarray | torch.Tensor:
    """Return ``X`` (numpy or torch, ``ndim`` dims, float) after checking shape and finiteness.

    Torch tensors stay torch (no copy to host); anything else becomes a numpy float array."""
    if not isinstance(X, torch.Tensor):
        X = np.asarray(X)
        if not np.issubdtype(X.dtype, np.number):
            raise FeatureError(f"{name} must be numeric, got dtype {X.dtype}; pass a float array")
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
            f"{name} contains NaN or Inf values; re-extract the features (e.g. without fp16 overflow) or drop those rows"
        )
    return X


def check_width(X: Any, expected: int, *, name: str = "X") -> None:
    """A query's feature width must equal the training width."""
    if X.shape[-1] != expected:
        raise FeatureError(
            f"{name} has {X.shape[-1]} features per sample but the rule was fitted on {expected}; "
            "use features of the same token/block/model as in fit"
        )


def check_C(C: float) -> float:
    """The inverse regularisation strength must be a positive finite number."""
    try:
        value = float(C)
    except (TypeError, ValueError):
        raise RuleError(f"C must be a positive number, got {C!r}; use e.g. C=1.0") from None
    if not (value > 0 and np.isfinite(value)):
        raise RuleError(f"C must be a positive finite number, got {C!r}; use e.g. C=1.0")
    return value


def encode_labels(y: Any, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """``y [n]`` → (``classes_ [K]`` sorted, codes ``[n]`` int64 in 0..K-1); at least two classes."""
    y = np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y)
    if y.ndim != 1 or len(y) != num_samples:
        raise RuleError(
            f"y must be 1-d with one label per sample ({num_samples}), got shape {y.shape}; pass y as [n_samples]"
        )
    if num_samples == 0:
        raise RuleError("the training set is empty (0 samples); pass at least one sample of two classes")
    classes, codes = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise RuleError(
            f"the training set has a single class ({classes[0].tolist()!r}); a decision rule needs at least 2 classes"
        )
    return classes, codes.astype(np.int64)


def check_labels_known(y: Any, classes: np.ndarray) -> np.ndarray:
    """Map ``y`` onto indices of ``classes``; a label the rule never saw is an error (for ``score``)."""
    y = np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y)
    pos = np.searchsorted(classes, y)
    pos = np.clip(pos, 0, len(classes) - 1)
    unknown = classes[pos] != y
    if unknown.any():
        raise RuleError(
            f"label {y[unknown][0].tolist()!r} is not among the fitted classes_ {classes.tolist()}; "
            "score only on labels seen in fit"
        )
    return pos


def check_fitted(rule: Any, attribute: str) -> None:
    """``predict`` before ``fit`` is an error (sklearn's check_is_fitted, with our error class)."""
    if not hasattr(rule, attribute):
        raise NotFittedError(
            f"this {type(rule).__name__} is not fitted yet (no {attribute}); call fit(X, y) before using it"
        )
