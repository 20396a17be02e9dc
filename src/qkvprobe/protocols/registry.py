"""What a decision rule implements: :class:`RuleProtocol`. The registry itself is the rule table
(:mod:`qkvprobe.tables`: one entry per rule, read by the CLI, the config, the evaluation driver, the results and
the report; the built-ins are lazy references, so it imports no rule). Adding a rule means subclassing
:class:`RuleProtocol` and calling :func:`register_rule` — nothing else. Each built-in rule's protocols live in
one module: :mod:`.hyperplane`, :mod:`.cosine`, :mod:`.knn`.

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

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..tables import check_rules, register_rule, rule_entry, rule_names
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


def get_rule(name: str) -> RuleProtocol:
    """The registered rule ``name``'s protocols (the rule table's entry, imported on first use); RuleError with
    the close matches and the known names otherwise."""
    impl: RuleProtocol = rule_entry(name).protocol()
    return impl


__all__ = [
    "PatchScorer",
    "RuleProtocol",
    "check_rules",
    "get_rule",
    "register_rule",
    "rule_names",
]
