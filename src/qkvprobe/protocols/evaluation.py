"""The typed values every protocol shares: what a rule is given (:class:`RuleOptions`), what it returns
(:class:`StandardResult`, :class:`FewshotResult`, :class:`SegmentationResult`, :class:`FewshotSegmentationResult`),
how a measured unit is named (:class:`UnitKey`) and what one evaluation returns (:class:`Evaluation`); plus the
:class:`FeatureSource` protocol the driver reads stores through."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np

from ..results import ResultRow

# The protocol constants live in the rule table, the rules' options in the spec; re-exported for the protocols.
from ..spec import RuleOptions as RuleOptions
from ..tables import C_AUTO, rule_entry
from ..tables import C_GRID as C_GRID
from ..tables import FEWSHOT_C as FEWSHOT_C
from ..tables import VAL_FRACTION as VAL_FRACTION

#: ``progress(label, done, total)``: called before each unit of an evaluation, and with ``done == total`` at the end.
ProgressFn = Callable[[str, int, int], None]
#: :func:`row_maker`'s factory: the row's own columns as keywords → a ``ResultRow``.
RowMaker = Callable[..., ResultRow]


class Steps:
    """Counts the units of one evaluation for an optional progress callback (``qkvprobe evaluate``'s output)."""

    def __init__(self, progress: ProgressFn | None, total: int) -> None:
        self.progress, self.total, self.done = progress, total, 0

    def __call__(self, label: str) -> None:
        if self.progress is not None:
            self.progress(label, self.done, self.total)
        self.done += 1

    def finish(self) -> None:
        if self.progress is not None:
            self.progress("done", self.total, self.total)


@dataclass
class StandardResult:
    """One feature set under the standard classification protocol: test accuracy, chosen C (NaN without one),
    held-out accuracy per C of the grid, test predictions ``[m]`` (for McNemar), the fitted rule's class vectors
    ``weights [K, D]`` float32 (rows in the order of the sorted training labels; hyperplane normals ``w_c``, two
    classes ``-w, w``, or the cosine rule's directions ``μ_c``; None for rules without class vectors), and
    ``converged``: every solver fit behind it reached its certified optimum (None for rules without a solver)."""

    accuracy: float
    C: float
    val_accuracy: dict[float, float]
    predictions: np.ndarray
    weights: np.ndarray | None = None
    converged: bool | None = None


@dataclass
class FewshotResult:
    """Few-shot accuracy: ``per_episode [E]``, mean and 95 % half-width, and the number of episodes whose
    solver fit was not certified at its optimum (0 for rules without a solver)."""

    per_episode: np.ndarray
    mean: float
    ci95: float
    unconverged: int = 0


@dataclass
class SegmentationResult:
    """Standard segmentation outcome: ``miou``, ``pixel_accuracy``, per-class IoU ``[K]``, chosen C (NaN without
    one), the held-out patch mIoU per C, the fitted class vectors ``weights [K, D]`` float32 (hyperplane normals,
    or cosine class directions — zero for a class without training patches; None for rules without class
    vectors), and whether every solver fit behind it reached its certified optimum (None without a solver)."""

    miou: float
    pixel_accuracy: float
    iou: np.ndarray
    C: float
    val_miou: dict[float, float]
    weights: np.ndarray | None = None
    converged: bool | None = None


@dataclass
class FewshotSegmentationResult:
    """Few-shot segmentation outcome: ``miou`` (per-class foreground IoU, mean over classes), ``fb_iou``, per
    episode foreground IoU ``[E]`` (for paired tests; its 95 % CI is ``ci95``), per-class IoU, and the number of
    episodes whose solver fit was not certified at its optimum."""

    miou: float
    fb_iou: float
    per_episode: np.ndarray
    ci95: float
    per_class: np.ndarray
    unconverged: int = 0


class UnitKey(NamedTuple):
    """One measured unit of an evaluation: the key of its per-episode scores, predictions and class vectors."""

    block: int
    token: str
    position: str
    rule: str
    shots: int = 0
    params: str = ""

    @property
    def label(self) -> str:
        """``q·cls hyperplane`` (with the shots and parameters when set), for messages."""
        extra = "".join(
            p for p in (f" {self.shots}-shot" if self.shots else "", f" {self.params}" if self.params else "")
        )
        return f"block {self.block} · {self.token}·{self.position} · {self.rule}{extra}"


@dataclass
class Evaluation:
    """What one evaluation returns.

    ``rows``: the results table's rows. ``per_episode`` (few-shot scores per episode) and ``predictions``
    (standard test predictions): for the paired tests. ``weights``: standard setting's fitted class vectors
    ``[K, D]`` (for the "which direction?" angles), rows labelled by ``classes``. ``chosen_C``: few-shot
    ``C="auto"`` choices (key rule "hyperplane"). ``unconverged``: units whose solver fits were not all certified,
    in words. ``allowed_mismatch``: store fields allowed to differ between the train and test stores."""

    rows: list[ResultRow] = field(default_factory=list)
    per_episode: dict[UnitKey, np.ndarray] = field(default_factory=dict)
    predictions: dict[UnitKey, np.ndarray] = field(default_factory=dict)
    weights: dict[UnitKey, np.ndarray] = field(default_factory=dict)
    classes: np.ndarray | None = None
    chosen_C: dict[UnitKey, Any] = field(default_factory=dict)
    unconverged: list[str] = field(default_factory=list)
    allowed_mismatch: tuple[str, ...] = ()
    #: The paired tests between each shot count's best choice and every other whole token type
    #: (``protocols.paired``; the entries of a run directory's ``paired.json``).
    paired: list[dict[str, Any]] = field(default_factory=list)
    #: Few-shot classes left out of the episodes for too few images: shots → class names.
    left_out: dict[int, list[str]] = field(default_factory=dict)
    #: The same for the validation episodes that choose the few-shot C (``C="auto"``: halved training pools).
    validation_left_out: dict[int, list[str]] = field(default_factory=dict)
    #: The stored block indices measured (non-negative): a run directory's ``main_blocks`` of the model.
    blocks: list[int] = field(default_factory=list)
    #: The labels and the setting the rows share.
    model: str = ""
    dataset: str = ""
    task: str = ""
    setting: str = ""


class FeatureSource(Protocol):
    """What the evaluation driver reads of a feature store (``qkvprobe.features.FeatureStore`` is one)."""

    classes: list[str]
    task: str
    tokens: list[str]
    positions: list[str]
    blocks: list[int]
    grid: tuple[int, int]
    patch_size: int
    dataset_spec: str
    split: str
    backbone_spec: str
    objective: str
    manifest: dict[str, Any]

    def get(self, token: str, position: str, block: int = -1) -> np.ndarray: ...

    def iter_chunks(
        self, token: str, position: str, block: int = -1, **kw: Any
    ) -> Iterator[tuple[int, np.ndarray]]: ...

    def labels(self) -> np.ndarray: ...

    def patch_labels(self) -> np.ndarray: ...

    def indices(self) -> np.ndarray: ...

    def resolve_block(self, block: int) -> int: ...


def as_list(value: Any) -> list[Any]:
    """A scalar or a sequence → list (CLI and Python callers pass either)."""
    return list(value) if isinstance(value, list | tuple) else [value]


def store_block(store: Any, block: int) -> int:
    """The stored non-negative block index (rows carry it, so -1 and L-1 are one measurement)."""
    return int(store.resolve_block(block)) if hasattr(store, "resolve_block") else int(block)


def row_maker(plan: Any) -> RowMaker:
    """A ``ResultRow`` factory with the columns one evaluation shares filled in from its plan
    (:class:`~qkvprobe.protocols.driver.Plan`): rows of rules with a solver (the rule table's ``has_C``) record
    ``class_weight`` ("none" or "balanced") and ``C_choice`` ("auto", or the few-shot setting's fixed C); the
    others leave both empty."""
    spec = plan.spec
    common: dict[str, Any] = {
        "model": plan.model,
        "objective": plan.objective,
        "dataset": plan.dataset,
        "task": plan.task.name,
        "setting": spec.setting,
        "seed": spec.seed,
        "weights": plan.weights,
    }
    if plan.allowed:
        common["allowed_mismatch"] = ",".join(plan.allowed)
    weighting = "balanced" if spec.class_weight == "balanced" else "none"
    choice = (
        C_AUTO if spec.fewshot.C == C_AUTO else ""
    )  # "": ResultRow's default, "auto" or the fixed C as text
    solved = {r.name for r in plan.rules if rule_entry(r.name).has_C}

    def make(**kw: Any) -> ResultRow:
        has_solver = kw["rule"] in solved
        if not has_solver:
            kw.setdefault("C", math.nan)
        return ResultRow(
            **common,
            **kw,
            class_weight=weighting if has_solver else "",
            C_choice=choice if has_solver and spec.setting == "fewshot" else "",
        )

    return make
