"""One evaluation spec: every option of an evaluation, validated once, typed and immutable.

``qkvprobe evaluate`` builds it from its flags, a study from its config (:func:`qkvprobe.config.StudyConfig`'s
values through :meth:`EvalSpec.from_study`), Python callers from keywords (:meth:`EvalSpec.build`); the one
evaluation pipeline (:func:`qkvprobe.protocols.pipeline.run_evaluation`) takes it and hands it down unchanged.
Every default comes from the task and rule tables (:mod:`qkvprobe.tables`). What the stores decide (the token
types and positions they hold) is left as ``None`` here and resolved against the stores by the pipeline.

Like the config, this module imports no torch: building a spec costs nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError, QkvprobeError
from .tables import (
    C_AUTO,
    C_GRID,
    DEFAULT_RULES,
    FEWSHOT_C,
    KNN_K,
    KNN_T,
    SOLVER_MAX_ITER,
    SOLVER_TOL,
    TASKS,
    VAL_FRACTION,
    check_rules,
    rule_entry,
)


@dataclass(frozen=True)
class RuleOptions:
    """What a rule's protocol functions are told besides the data: the view of an :class:`EvalSpec` they read
    (:meth:`EvalSpec.rule_options`). ``C`` is the few-shot C as a number ("auto" is resolved by the driver)."""

    device: str = "cpu"
    seed: int = 0
    Cs: tuple[float, ...] = C_GRID
    val_fraction: float = VAL_FRACTION
    C: float = FEWSHOT_C
    class_weight: str | None = None
    k: int = KNN_K
    T: float = KNN_T
    max_iter: int | None = None
    tol: float | None = None

    def solver(self) -> dict[str, Any]:
        """The hyperplane solver's keyword arguments that were set."""
        return {k: v for k, v in (("max_iter", self.max_iter), ("tol", self.tol)) if v is not None}


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SolverSpec(_Frozen):
    """The hyperplane solver: the standard protocol's C grid and held-out fraction, the certificate's relative
    tolerance and the iteration cap (a fit that cannot certify within it is marked ``converged=false``)."""

    Cs: tuple[float, ...] = C_GRID
    val_fraction: float = Field(VAL_FRACTION, gt=0, lt=1)
    tol: float = Field(SOLVER_TOL, gt=0, lt=1)
    max_iter: int = Field(SOLVER_MAX_ITER, ge=1)

    @field_validator("Cs")
    @classmethod
    def _check_Cs(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v:
            raise ValueError("the C grid is empty; give at least one C value")
        bad = [c for c in v if not (math.isfinite(c) and c > 0)]
        if bad:
            raise ValueError(f"C values must be positive finite numbers, got {bad[0]!r}")
        return tuple(sorted(dict.fromkeys(float(c) for c in v)))


class FewshotSpec(_Frozen):
    """N-way K-shot episodes (docs/science.md §2). ``episodes`` None = the task's default (task table);
    ``C``: the hyperplane's fixed C, or ``"auto"`` (chosen on validation episodes from the training split)."""

    ways: int = Field(5, ge=2)
    shots: tuple[int, ...] = (1, 5)
    queries: int = Field(15, ge=1)
    episodes: int | None = Field(None, ge=1)
    C: float | Literal["auto"] = FEWSHOT_C

    @field_validator("shots")
    @classmethod
    def _check_shots(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v:
            raise ValueError("at least one shot count is needed")
        if any(s < 1 for s in v):
            raise ValueError(f"shot counts must be >= 1, got {list(v)}")
        return tuple(dict.fromkeys(v))

    @field_validator("C")
    @classmethod
    def _check_C(cls, v: float | str) -> float | str:
        if v != C_AUTO and not (math.isfinite(float(v)) and float(v) > 0):
            raise ValueError(f"C must be a positive finite number or 'auto', got {v!r}")
        return v


class KnnSpec(_Frozen):
    """The k-NN rule: ``k`` neighbours vote with weights ``exp(s/T)``."""

    k: int = Field(KNN_K, ge=1)
    T: float = Field(KNN_T, gt=0)


class EvalSpec(_Frozen):
    """Everything one evaluation is told besides its stores and labels.

    ``tokens``/``positions`` None: every token type both stores hold / every position of the task's defaults
    they hold. ``heads``: every attention head of the q, k, v token types too. ``allow_mismatch``: store fields
    allowed to differ between the train and the test store."""

    setting: Literal["standard", "fewshot"] = "standard"
    task: Literal["classification", "segmentation"] | None = None
    rules: tuple[str, ...] = DEFAULT_RULES
    tokens: tuple[str, ...] | None = None
    positions: tuple[str, ...] | None = None
    blocks: tuple[int, ...] = (-1,)
    heads: bool = False
    class_weight: Literal["balanced"] | None = None
    seed: int = Field(0, ge=0)
    device: str = "cpu"
    solver: SolverSpec = SolverSpec()
    fewshot: FewshotSpec = FewshotSpec()
    knn: KnnSpec = KnnSpec()
    allow_mismatch: tuple[str, ...] = ()

    @field_validator("rules")
    @classmethod
    def _check_rules(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(check_rules(v))

    @field_validator("tokens", "positions")
    @classmethod
    def _non_empty(cls, v: tuple[str, ...] | None, info: Any) -> tuple[str, ...] | None:
        if v is not None and not v:
            raise ValueError(f"no {info.field_name} given")
        return None if v is None else tuple(dict.fromkeys(v))

    @field_validator("blocks")
    @classmethod
    def _check_blocks(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v:
            raise ValueError("no block given; e.g. blocks=(-1,)")
        return tuple(dict.fromkeys(int(b) for b in v))

    @field_validator("class_weight", mode="before")
    @classmethod
    def _none_weight(cls, v: Any) -> Any:
        return None if v in (None, "none") else v

    @model_validator(mode="after")
    def _check_positions(self) -> EvalSpec:
        if self.task is not None and self.positions is not None:
            allowed = TASKS[self.task].positions
            bad = [p for p in self.positions if p not in allowed]
            if bad:
                raise ValueError(
                    f"{self.task} evaluates positions {', '.join(allowed)}, got {bad[0]!r}; "
                    f"pass --positions {','.join(allowed)}"
                )
        return self

    # ---- building ------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, **values: Any) -> EvalSpec:
        """A spec from keywords: the top-level fields, the nested groups as mappings or specs, and the flat
        names older callers use (``Cs``, ``tol``, ``max_iter``, ``val_fraction``; ``ways``, ``shots``,
        ``queries``, ``episodes``, ``C``; ``k``, ``T``), each once. One ConfigError names every bad value."""
        groups = {
            "solver": ("Cs", "val_fraction", "tol", "max_iter"),
            "fewshot": ("ways", "shots", "queries", "episodes", "C"),
            "knn": ("k", "T"),
        }
        data = {k: v for k, v in values.items() if v is not None or k in ("class_weight",)}
        for group, names in groups.items():
            flat = {n: data.pop(n) for n in names if n in data}
            if not flat:
                continue
            base = data.get(group)
            base = base.model_dump() if isinstance(base, BaseModel) else dict(base or {})
            data[group] = {**base, **flat}
        if isinstance(data.get("shots"), int):
            data["shots"] = (data["shots"],)
        fs = data.get("fewshot")
        if isinstance(fs, dict) and isinstance(fs.get("shots"), int):
            fs["shots"] = (fs["shots"],)
        for name in ("rules", "tokens", "positions", "blocks", "allow_mismatch"):
            if isinstance(data.get(name), str | int):
                data[name] = (data[name],)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            errors = exc.errors()
            # A validator that raised one of our errors (an unknown rule: RuleError) keeps its type.
            raised = [e.get("ctx", {}).get("error") for e in errors]
            kind = type(raised[0]) if isinstance(raised[0], QkvprobeError) else ConfigError
            raise kind("evaluation spec: " + "; ".join(_error_text(e) for e in errors)) from None

    def replace(self, **changes: Any) -> EvalSpec:
        """A validated copy with ``changes`` (the same keywords as :meth:`build`)."""
        return EvalSpec.build(**{**self.model_dump(), **changes})

    # ---- derived values -------------------------------------------------------------------------------------
    def episodes_for(self, task: str) -> int:
        """Few-shot episodes: the spec's, else the task table's default."""
        return self.fewshot.episodes or TASKS[task].episodes

    def fixed_C(self) -> float:
        """The few-shot C of a fixed-C evaluation (the table's default while ``C="auto"`` is being chosen)."""
        return FEWSHOT_C if self.fewshot.C == C_AUTO else float(self.fewshot.C)

    def rule_params(self, rule: str) -> str:
        """The rule's own parameters for the results' ``params`` column (``k=20,T=0.07``; "" for none)."""
        params: str = rule_entry(rule).protocol().params(self.rule_options())
        return params

    def rule_options(self, C: float | None = None) -> RuleOptions:
        """The :class:`RuleOptions` view a rule's protocols read (``C``: the few-shot C of this unit)."""
        return RuleOptions(
            device=self.device,
            seed=self.seed,
            Cs=self.solver.Cs,
            val_fraction=self.solver.val_fraction,
            C=self.fixed_C() if C is None else C,
            class_weight=self.class_weight,
            k=self.knn.k,
            T=self.knn.T,
            max_iter=self.solver.max_iter,
            tol=self.solver.tol,
        )


def _error_text(err: Any) -> str:
    path = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and "[" in p)) or "(top level)"
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"{path}: unknown option"
    if "input" in err and err["type"] in ("literal_error", "enum"):
        return f"{path}: {err['input']!r} is not allowed; {msg[0].lower() + msg[1:]}"
    return f"{path}: {msg}"


__all__ = ["C_AUTO", "EvalSpec", "FewshotSpec", "KnnSpec", "RuleOptions", "SolverSpec"]
