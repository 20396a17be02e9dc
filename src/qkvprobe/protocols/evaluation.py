"""The typed values every protocol shares: what a rule is given (:class:`RuleOptions`), what it returns
(:class:`StandardResult`, :class:`FewshotResult`, :class:`SegmentationResult`, :class:`FewshotSegmentationResult`),
how a measured unit is named (:class:`UnitKey`) and what one evaluation returns (:class:`Evaluation`); plus the
:class:`FeatureSource` protocol the driver reads stores through."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np

from ..results import C_AUTO, ResultRow

#: Log-spaced C grid of the standard protocol (objective C·Σloss + ½‖W‖² on raw features, as scikit-learn).
C_GRID: tuple[float, ...] = tuple(float(10.0**p) for p in range(-5, 3))
#: Fraction of the training split held out (stratified) to choose C.
VAL_FRACTION = 0.1
#: Fixed C of the few-shot hyperplane rule. scikit-learn's default. Raw ViT features have norms of tens,
#: so with n = N·K ≤ 100 support samples the ½‖W‖² term is weak next to C·Σloss: the rule is close to the
#: max-margin separator of the (always separable) support set and its predictions change little with C.
FEWSHOT_C = 1.0

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


@dataclass(frozen=True)
class RuleOptions:
    """Everything a rule's protocol functions are told besides the data.

    ``Cs``: the standard protocol's C grid; ``C``: the few-shot C (a number here: "auto" is resolved by the
    driver); ``class_weight``: None or "balanced"; ``k``/``T``: the k-NN rule's; ``max_iter``: the hyperplane
    solver's cap (None: its default)."""

    device: str = "cpu"
    seed: int = 0
    Cs: tuple[float, ...] = C_GRID
    val_fraction: float = VAL_FRACTION
    C: float = FEWSHOT_C
    class_weight: str | None = None
    k: int = 20
    T: float = 0.07
    max_iter: int | None = None
    tol: float | None = None

    def solver(self) -> dict[str, Any]:
        """The hyperplane solver's keyword arguments that were set."""
        return {k: v for k, v in (("max_iter", self.max_iter), ("tol", self.tol)) if v is not None}


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


def row_maker(
    store: Any,
    *,
    model: str | None,
    dataset: str | None,
    task: str,
    setting: str,
    seed: int,
    class_weight: str | None = None,
    C: float | str = C_AUTO,
    solver_rules: Sequence[str] = ("hyperplane",),
    allowed_mismatch: Sequence[str] = (),
) -> RowMaker:
    """A ``ResultRow`` factory with the columns shared by one evaluation filled in: rows of rules with a solver
    (``solver_rules``) record ``class_weight`` ("none" or "balanced") and ``C_choice`` (``C``: "auto", or the
    few-shot setting's fixed C); the others leave both empty."""
    common: dict[str, Any] = {
        "model": model or store.backbone_spec,
        "objective": getattr(store, "objective", "unknown"),
        "dataset": dataset or store.dataset_spec,
        "task": task,
        "setting": setting,
        "seed": seed,
    }
    if allowed_mismatch:
        common["allowed_mismatch"] = ",".join(allowed_mismatch)
    weighting = "balanced" if class_weight == "balanced" else "none"
    choice = (
        C_AUTO if C == C_AUTO else ""
    )  # "" → ResultRow's default: "auto" (standard) or the fixed C as text

    def make(**kw: Any) -> ResultRow:
        solved = kw["rule"] in solver_rules
        if not solved:
            kw.setdefault("C", math.nan)
        return ResultRow(
            **common, **kw, class_weight=weighting if solved else "", C_choice=choice if solved else ""
        )

    return make
