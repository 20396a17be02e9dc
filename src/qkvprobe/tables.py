"""The task table and the rule table: every default and fact about a task or a decision rule, in one place.

The CLI, the study config, the evaluation spec, the driver, the results and the report read them from here; none
of them writes a default of its own. The module imports nothing heavy (no torch, scikit-learn or scipy): the
rule table holds each built-in rule as a lazy ``"module:Class"`` reference, imported the first time a rule's
protocols run (:meth:`RuleEntry.protocol`), so validating a config or printing ``--help`` stays cheap.

A new rule is one subclass of :class:`qkvprobe.protocols.registry.RuleProtocol` passed to
:func:`register_rule`; its class attributes (``name``, ``summary``, ``has_C`` …) become its entry here.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .errors import RuleError
from .vocab import POSITIONS, TOKENS


# ---- tasks --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskEntry:
    """One task: the positions it evaluates (and which of them by default), the metrics its rows carry per
    setting (the first is the headline metric the answer table ranks by), and its few-shot episode defaults."""

    name: str
    positions: tuple[str, ...]
    default_positions: tuple[str, ...]
    metrics: dict[str, tuple[str, ...]]
    episodes: int
    #: Few-shot classes per episode: None = the spec's ``ways``; segmentation episodes are 1-way.
    ways: int | None = None
    #: Few-shot queries per class: None = the spec's ``queries``; segmentation episodes have one query image.
    queries: int | None = None

    @property
    def primary(self) -> str:
        """The metric the answer table and the paired tests rank by."""
        return self.metrics["fewshot"][0]


TASKS: dict[str, TaskEntry] = {
    "classification": TaskEntry(
        name="classification",
        positions=("cls", "avg"),
        default_positions=("cls", "avg"),
        metrics={"standard": ("accuracy",), "fewshot": ("accuracy",)},
        episodes=2000,
    ),
    "segmentation": TaskEntry(
        name="segmentation",
        positions=("patch",),
        default_positions=("patch",),
        metrics={"standard": ("miou", "pixel_accuracy"), "fewshot": ("miou", "fb_iou")},
        episodes=1000,
        ways=1,
        queries=1,
    ),
}

#: Image-level positions per task (segmentation always works on patch tokens).
TASK_POSITIONS: dict[str, tuple[str, ...]] = {name: t.positions for name, t in TASKS.items()}
#: The headline metric of each task.
PRIMARY_METRIC: dict[str, str] = {name: t.primary for name, t in TASKS.items()}


def setting_text(task: str, setting: str, shots: int, ways: int | None = None) -> str:
    """``standard``, ``5-way 1-shot`` (classification with ``ways``) or ``1-shot``: a setting in words."""
    if setting == "standard":
        return "standard"
    return f"{ways}-way {shots}-shot" if ways and task == "classification" else f"{shots}-shot"


# ---- rules --------------------------------------------------------------------------------------------------
#: The few-shot C that is chosen on validation episodes instead of fixed (``C="auto"``).
C_AUTO = "auto"
#: The few-shot hyperplane's fixed C: scikit-learn's default (docs/science.md §2).
FEWSHOT_C = 1.0
#: The standard protocol's log-spaced C grid 1e-5 … 1e2 (objective C·Σloss + ½‖W‖², as scikit-learn's).
C_GRID: tuple[float, ...] = tuple(float(10.0**p) for p in range(-5, 3))
#: Fraction of the training split held out (stratified) to choose the standard protocol's C.
VAL_FRACTION = 0.1
#: The hyperplane solver's relative optimality tolerance and iteration cap (``rules.logistic``).
SOLVER_TOL = 1e-4
SOLVER_MAX_ITER = 1000
#: The k-NN rule's neighbours and vote temperature (DINO's evaluation).
KNN_K = 20
KNN_T = 0.07


@dataclass(frozen=True)
class RuleEntry:
    """One decision rule as the rest of the toolkit sees it.

    ``has_C``: a solver with a C (the standard protocol chooses C on held-out data, few-shot uses a fixed or
    "auto" C; its rows record ``converged``, ``class_weight`` and ``C_choice``); ``class_weighted``: takes a
    class weighting; ``direction``: one vector per class (the "which direction?" angles use them); ``note``: a
    caveat the report prints under its tables; ``colour`` and ``letter``: how figures draw it. ``impl``: a
    ``"module:Class"`` reference to its protocols (a built-in), or the registered instance itself."""

    name: str
    summary: str
    impl: str | Any
    has_C: bool = False
    class_weighted: bool = False
    direction: bool = False
    note: str = ""
    colour: str = "#777777"
    letter: str = "?"

    @property
    def builtin(self) -> bool:
        return isinstance(self.impl, str)

    def protocol(self) -> Any:
        """The rule's :class:`~qkvprobe.protocols.registry.RuleProtocol` instance (imported on first use)."""
        if not isinstance(self.impl, str):
            return self.impl
        if self.name not in _INSTANCES:
            module, _, name = self.impl.partition(":")
            _INSTANCES[self.name] = getattr(importlib.import_module(module), name)()
        return _INSTANCES[self.name]


#: The built-in rules' protocols, once imported.
_INSTANCES: dict[str, Any] = {}


_BUILTIN: tuple[RuleEntry, ...] = (
    RuleEntry(
        name="hyperplane",
        summary="L2 logistic regression on raw features (C chosen on held-out data; a fixed C in few-shot)",
        impl="qkvprobe.protocols.hyperplane:Hyperplane",
        has_C=True,
        class_weighted=True,
        direction=True,
        colour="#3b6ea8",
        letter="H",
    ),
    RuleEntry(
        name="cosine",
        summary="cosine similarity to each class's direction (mean of L2-normalised training features)",
        impl="qkvprobe.protocols.cosine:Cosine",
        direction=True,
        colour="#e08a2c",
        letter="C",
    ),
    RuleEntry(
        name="knn",
        summary="weighted k-NN on cosine similarity (DINO's evaluation: k = 20, votes exp(s/T), T = 0.07)",
        impl="qkvprobe.protocols.knn:KNN",
        note=(
            "k-NN is the reference peers report, not a direction rule; with fewer training samples than k every "
            "sample votes, so at 1 shot per class it is the 1-NN rule (the cosine rule's decision too)."
        ),
        colour="#4d9a5a",
        letter="N",
    ),
)
#: The rules an evaluation uses when none are named: the paper's two direction rules (the default study names
#: k-NN too, in its config).
DEFAULT_RULES: tuple[str, ...] = ("hyperplane", "cosine")

_RULES: dict[str, RuleEntry] = {r.name: r for r in _BUILTIN}


def register_rule(rule: Any) -> Any:
    """Add a :class:`~qkvprobe.protocols.registry.RuleProtocol` instance under ``rule.name`` (a name may be
    registered once; registering another instance of the same class replaces it). Returns ``rule``."""
    name = getattr(rule, "name", "")
    if not name or not str(name).isidentifier():
        raise RuleError(f"a rule needs a name that is an identifier, got {name!r}")
    old = _RULES.get(name)
    if old is not None:
        same = old.impl.endswith(":" + type(rule).__name__) if old.builtin else type(old.impl) is type(rule)
        if not same:
            raise RuleError(f"a rule named {name!r} is already registered")
        if old.builtin:  # a built-in's instance: its facts stay the table's
            _INSTANCES[name] = rule
            return rule
    _RULES[name] = RuleEntry(
        name=name,
        summary=getattr(rule, "summary", ""),
        impl=rule,
        has_C=bool(getattr(rule, "has_C", False)),
        class_weighted=bool(getattr(rule, "class_weighted", False)),
        direction=bool(getattr(rule, "direction", False)),
        note=getattr(rule, "note", ""),
        colour=getattr(rule, "colour", "#777777"),
        letter=getattr(rule, "letter", name[:1].upper()),
    )
    return rule


def rule_names() -> tuple[str, ...]:
    """Every registered rule, in registration order (the built-ins first)."""
    return tuple(_RULES)


def rule_entry(name: str) -> RuleEntry:
    """The rule table's entry ``name``; RuleError with the close matches and the known names otherwise."""
    if name not in _RULES:
        close = difflib.get_close_matches(str(name), list(_RULES), n=2, cutoff=0.6)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise RuleError(f"unknown rule {name!r}{hint}; choose from {', '.join(_RULES)}")
    return _RULES[name]


def check_rules(names: str | Iterable[str]) -> list[str]:
    """A non-empty list of registered rule names, duplicates dropped (RuleError otherwise)."""
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise RuleError(f"no rule given; choose from {', '.join(rule_names())}")
    return [rule_entry(n).name for n in dict.fromkeys(names)]


#: The report's label of class-balanced hyperplane rows beside plain ones, and how figures draw it.
BALANCED_RULE = "hyperplane·balanced"
_VARIANTS: dict[str, tuple[str, str]] = {BALANCED_RULE: ("#7fa7d4", "Hb")}


def rule_colour(rule: str) -> str | None:
    """A rule's (or the balanced variant's) colour in figures; None for a name the table does not know."""
    if rule in _VARIANTS:
        return _VARIANTS[rule][0]
    return _RULES[rule].colour if rule in _RULES else None


def rule_letter(rule: str) -> str:
    """A rule's (or the balanced variant's) letter in the sweep heatmap ("?" for a name the table does not know)."""
    if rule in _VARIANTS:
        return _VARIANTS[rule][1]
    return _RULES[rule].letter if rule in _RULES else "?"


def rule_note(rule: str) -> str:
    return _RULES[rule].note if rule in _RULES else ""


def solver_rules() -> tuple[str, ...]:
    """The rules with a solver and a C (their rows record ``converged``, ``class_weight`` and ``C_choice``)."""
    return tuple(n for n, r in _RULES.items() if r.has_C)


def rule_order() -> tuple[str, ...]:
    """The rules in the order tables and rankings show them: the rule table's, the hyperplane's balanced
    variant right after it."""
    names = list(rule_names())
    if "hyperplane" in names:
        names.insert(names.index("hyperplane") + 1, BALANCED_RULE)
    return tuple(names)


def _index(value: str, canon: tuple[str, ...]) -> int:
    return canon.index(value) if value in canon else len(canon)


def rank_key(value: float, token: str, position: str, rule: str, block: int) -> tuple[Any, ...]:
    """The order in which choices are ranked — highest value first, equal values in the vocabulary's order of
    token, position and rule, then by block — shared by the paired tests and the answer table, so both name the
    same best choice when two choices score exactly the same."""
    base = token.split(".h", 1)[0]
    return (
        -float(value),
        _index(base, TOKENS),
        token,
        _index(position, POSITIONS),
        _index(rule, rule_order()),
        rule,
        int(block),
    )
