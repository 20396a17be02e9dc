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
