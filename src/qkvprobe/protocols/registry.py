"""The rule registry: one entry per decision rule, read by the CLI, the config, the evaluation driver and the
report. Adding a rule means subclassing :class:`RuleProtocol` and calling :func:`register_rule` — nothing else.

A rule implements the four task × setting protocols on data the driver has already validated and gathered:

- ``standard_classification(Xtr [G, n, D], ytr [n], Xte [G, m, D], yte [m], num_classes, opts)``: G feature
  sets of one width (token types) sharing labels (codes 0..K-1) → one :class:`StandardResult` per set
  (predictions as codes);
- ``fewshot_classification(Ftr [Ntr, D], Fte [Nte, D], support [E, N·K], support_labels, query [E, N·Q],
  query_labels, ways, opts)``: indices into the two feature tables, labels 0..N-1 → :class:`FewshotResult`;
- ``segmentation_scorer(source, num_classes, opts)``: the labelled training patches (a
  :class:`~qkvprobe.protocols.segmentation.PatchSource`, read in chunks) → a :class:`PatchScorer` (per-patch class
  scores of any patches, plus what to record);
- ``fewshot_segmentation_scores(X [e, n, D], y [e, n] (1 = foreground), valid [e, n], Xq [e, m, D], opts)``:
  support patches of e episodes (``valid`` = 0 for ignored patches) → foreground scores ``[e, m]`` of their query
  patches (> 0 = foreground) and the number of unconverged episodes.
"""

from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import RuleError
from .evaluation import FewshotResult, RuleOptions, StandardResult


@dataclass
class PatchScorer:
    """A rule fitted on segmentation training patches: ``scores(X [m, D]) → [m, K]`` (argmax = the prediction),
    with the chosen C (NaN without one), held-out mIoU per C, class vectors ``[K, D]`` (None without) and whether
    its solver converged (None without a solver)."""

    scores: Callable[[torch.Tensor], torch.Tensor]
    C: float = float("nan")
    val_miou: dict[float, float] | None = None
    weights: np.ndarray | None = None
    converged: bool | None = None


class RuleProtocol(ABC):
    """One decision rule's protocols (module doc). Class attributes describe it to the rest of the toolkit:

    ``name`` (CLI / config / results), ``summary`` (one line for help texts and the report), ``has_C`` (a solver
    with a C: the standard protocol chooses C on held-out data, few-shot uses a fixed or "auto" C),
    ``class_weighted`` (takes ``class_weight``), ``direction`` (one vector per class: the "which direction?"
    angles use them), ``note`` (a caveat the report prints under its tables, or "")."""

    name: str = ""
    summary: str = ""
    has_C: bool = False
    class_weighted: bool = False
    direction: bool = False
    note: str = ""

    def params(self, opts: RuleOptions) -> str:
        """The rule's own parameters as ``name=value`` text for the results' ``params`` column ("" for none)."""
        return ""

    def check(self, opts: RuleOptions) -> None:  # noqa: B027 - optional hook
        """Validate the rule's options before any work (raise RuleError)."""

    @abstractmethod
    def standard_classification(
        self,
        Xtr: torch.Tensor,
        ytr: np.ndarray,
        Xte: torch.Tensor,
        yte: np.ndarray,
        num_classes: int,
        opts: RuleOptions,
    ) -> list[StandardResult]: ...

    @abstractmethod
    def fewshot_classification(
        self,
        Ftr: torch.Tensor,
        Fte: torch.Tensor,
        support: torch.Tensor,
        support_labels: torch.Tensor,
        query: torch.Tensor,
        query_labels: torch.Tensor,
        ways: int,
        opts: RuleOptions,
    ) -> FewshotResult: ...

    @abstractmethod
    def segmentation_scorer(self, source: Any, num_classes: int, opts: RuleOptions) -> PatchScorer: ...

    @abstractmethod
    def fewshot_segmentation_scores(
        self, X: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, Xq: torch.Tensor, opts: RuleOptions
    ) -> tuple[torch.Tensor, int]: ...


_RULES: dict[str, RuleProtocol] = {}


def register_rule(rule: RuleProtocol) -> RuleProtocol:
    """Add ``rule`` to the registry under ``rule.name`` (a name may be registered once)."""
    _builtins()
    if not rule.name or not rule.name.isidentifier():
        raise RuleError(f"a rule needs a name that is an identifier, got {rule.name!r}")
    if rule.name in _RULES and type(_RULES[rule.name]) is not type(rule):
        raise RuleError(f"a rule named {rule.name!r} is already registered")
    _RULES[rule.name] = rule
    return rule


def _builtins() -> None:
    """Put the built-in rules (hyperplane, cosine, knn) first in the registry if they are not in it."""
    from .rules import BUILTIN_RULES

    if all(r.name in _RULES for r in BUILTIN_RULES):
        return
    others = {n: r for n, r in _RULES.items() if n not in {b.name for b in BUILTIN_RULES}}
    _RULES.clear()
    _RULES.update({r.name: r for r in BUILTIN_RULES})
    _RULES.update(others)


def rule_names() -> tuple[str, ...]:
    """Every registered rule, in registration order (the built-ins first)."""
    _builtins()
    return tuple(_RULES)


def get_rule(name: str) -> RuleProtocol:
    """The registered rule ``name``; RuleError with the close matches and the known names otherwise."""
    _builtins()
    if name not in _RULES:
        close = difflib.get_close_matches(str(name), list(_RULES), n=2, cutoff=0.6)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise RuleError(f"unknown rule {name!r}{hint}; choose from {', '.join(_RULES)}")
    return _RULES[name]


def check_rules(names: Any) -> list[str]:
    """A non-empty list of registered rule names, duplicates dropped (RuleError otherwise)."""
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise RuleError(f"no rule given; choose from {', '.join(rule_names())}")
    return [get_rule(n).name for n in dict.fromkeys(names)]
