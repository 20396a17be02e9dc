"""The one evaluation pipeline: an :class:`~qkvprobe.spec.EvalSpec` and a train and a test feature store → rows,
paired tests, fitted class vectors — the same for ``qkvprobe evaluate``, ``qkvprobe run`` and
``qkvprobe.evaluate`` (docs/science.md §2).

:func:`plan_evaluation` checks the spec against the stores before any fit (tokens, positions and blocks they
hold, that the two stores belong together) and resolves what the stores decide (default tokens and positions);
:func:`evaluate` then measures every unit of rules × tokens × positions × blocks (× shots). What differs between
the tasks lives in two adapters (``protocols.tasks``); what differs between the rules in the rule table
(``qkvprobe.tables``) and one module per rule. Few-shot classes with too few images for the episodes are left
out and named (rows' ``left_out`` column, :attr:`Evaluation.left_out`), by every door alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from ..errors import ConfigError, StoreError
from ..provenance import manifest_weights_source, store_label
from ..spec import C_AUTO, EvalSpec, RuleOptions
from ..tables import TASKS, TaskEntry, rule_entry
from ..vocab import EXTRACT_TOKENS, split_head
from .checkpoint import UnitCheckpoint
from .evaluation import Evaluation, ProgressFn, Steps, UnitKey, row_maker, store_block
from .fewshot_c import choose_C
from .paired import paired_verdicts
from .registry import RuleProtocol, get_rule
from .tasks import ClassificationTask, SegmentationTask

#: Store fields that must agree between a train and a test store (``--allow-mismatch FIELD`` lets one differ).
MATCH_FIELDS: tuple[str, ...] = (
    "backbone",
    "weights",
    "mean",
    "std",
    "image_size",
    "interpolation",
    "blocks",
    "classes",
)


def _store_fields(store: Any) -> dict[str, Any] | None:
    """The :data:`MATCH_FIELDS` of a store's manifest (None for a store without a manifest)."""
    m = getattr(store, "manifest", None)
    if not isinstance(m, dict) or "backbone" not in m:
        return None
    pre = m.get("preprocessing") or {}
    return {
        "backbone": m["backbone"].get("spec"),
        "weights": m["backbone"].get("weights_digest"),
        "mean": pre.get("mean"),
        "std": pre.get("std"),
        "image_size": m.get("image_size"),
        "interpolation": pre.get("interpolation"),
        "blocks": m.get("blocks"),
        "classes": (m.get("dataset") or {}).get("classes"),
    }


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_matching_stores(train: Any, test: Any, allow: Sequence[str] = ()) -> tuple[str, ...]:
    """Refuse a train/test pair of stores that do not belong together: one StoreError naming every field that
    differs with both values, and the fix; ``allow`` lists fields allowed to differ. Returns the allowed fields
    that do differ (recorded in the rows)."""
    bad = [f for f in allow if f not in MATCH_FIELDS]
    if bad:
        raise ConfigError(f"unknown --allow-mismatch field {bad[0]!r}; choose from {', '.join(MATCH_FIELDS)}")
    a, b = _store_fields(train), _store_fields(test)
    if a is None or b is None:
        return ()
    differing = [f for f in MATCH_FIELDS if a[f] != b[f]]
    refused = [f for f in differing if f not in allow]
    if refused:
        where = f"{getattr(train, 'path', 'train store')} and {getattr(test, 'path', 'test store')}"
        what = "; ".join(
            f"{f} is {_short(a[f])} in the train store but {_short(b[f])} in the test store" for f in refused
        )
        raise StoreError(
            f"the train and test stores do not match ({where}): {what}; extract both splits with the same model, "
            f"weights and preprocessing, or pass --allow-mismatch {','.join(refused)} if the difference is "
            "deliberate"
        )
    return tuple(differing)


@dataclass(frozen=True)
class Plan:
    """A spec checked against its stores: everything the loops read, resolved (stored block indices, the task's
    episode counts), and the rules' protocols."""

    spec: EvalSpec
    task: TaskEntry
    rules: tuple[RuleProtocol, ...]
    tokens: tuple[str, ...]
    positions: tuple[str, ...]
    blocks: tuple[int, ...]
    shots: tuple[int, ...]
    ways: int
    queries: int
    episodes: int
    model: str
    objective: str
    dataset: str
    weights: str
    allowed: tuple[str, ...]

    @property
    def seed(self) -> int:
        return self.spec.seed

    @property
    def opts(self) -> RuleOptions:
        """The rules' options at the spec's fixed few-shot C."""
        return self.spec.rule_options()

    @property
    def auto_C(self) -> bool:
        return (
            self.spec.setting == "fewshot"
            and self.spec.fewshot.C == C_AUTO
            and any(rule_entry(r.name).has_C for r in self.rules)
        )


def _held(store: Any, attr: str) -> list[str] | None:
    held = getattr(store, attr, None)
    return None if held is None else list(held)


def _resolve_tokens(train: Any, test: Any, spec: EvalSpec) -> tuple[str, ...]:
    """The spec's tokens (default: every token type both stores hold), checked against the stores, plus every
    head of q/k/v when ``spec.heads``."""
    held_tr, held_te = _held(train, "tokens"), _held(test, "tokens")
    both = [t for t in held_tr if held_te is None or t in held_te] if held_tr is not None else held_te
    tokens = list(spec.tokens) if spec.tokens is not None else list(both or ())
    if not tokens:
        raise ConfigError("no token given and the stores list none; pass e.g. tokens=('q', 'k', 'v', 'ffn')")
    for store in (train, test):
        held = _held(store, "tokens")
        if held is None:
            continue
        for t in tokens:
            base, _ = split_head(t)
            if base in held:
                continue
            path = getattr(store, "path", "")
            if base in EXTRACT_TOKENS:
                raise ConfigError(
                    f"the store {path} holds no {base} (it holds {', '.join(held)}); evaluate from those, or "
                    f"extract again with --tokens {','.join([*held, base])}"
                )
            raise ConfigError(f"unknown token {t!r}; the store {path} holds {', '.join(held)}")
    if spec.heads and hasattr(train, "head_tokens"):
        tokens += [t for t in train.head_tokens(tokens) if t not in tokens]
    return tuple(tokens)


def _resolve_positions(train: Any, test: Any, spec: EvalSpec, task: TaskEntry) -> tuple[str, ...]:
    """The spec's positions (default: every default position of the task both stores hold)."""
    held_tr, held_te = _held(train, "positions"), _held(test, "positions")
    held = [p for p in (held_tr or task.positions) if held_te is None or p in held_te]
    if spec.positions is not None:
        positions = list(spec.positions)
        bad = [p for p in positions if p not in task.positions]
        if bad:
            raise ConfigError(
                f"{task.name} evaluates positions {', '.join(task.positions)}, got {bad[0]!r}; pass --positions "
                f"{','.join(task.positions)}"
            )
        for p in positions:
            if p not in held:
                raise ConfigError(
                    f"position {p!r} is not in the stores {getattr(train, 'path', '')} (they hold "
                    f"{', '.join(held) or 'none'}); pass --positions from those, or extract with --positions {p}"
                )
        return tuple(positions)
    usable = [p for p in held if p in task.default_positions]
    if not usable:
        raise ConfigError(
            f"the stores hold positions {','.join(held) or 'none'} but {task.name} evaluates "
            f"{' or '.join(task.positions)}; extract again with --positions {','.join(task.default_positions)}"
        )
    return tuple(usable)


def plan_evaluation(
    train_store: Any,
    test_store: Any,
    spec: EvalSpec,
    *,
    model: str | None = None,
    dataset: str | None = None,
    weights: str | None = None,
) -> Plan:
    """Check ``spec`` against the two stores (every refusal before any fit) → a :class:`Plan`."""
    task_name = spec.task or getattr(train_store, "task", None)
    if task_name not in TASKS:
        raise ConfigError(f"unknown task {task_name!r}; use {' or '.join(TASKS)}")
    held = {n: getattr(s, "task", task_name) for n, s in (("train", train_store), ("test", test_store))}
    if any(t != task_name for t in held.values()):
        if spec.task is None:
            raise ConfigError(
                f"the train store holds a {held['train']} dataset and the test store a {held['test']} one; "
                "pass a train and a test store extracted from the two splits of one dataset"
            )
        wrong = next(n for n, t in held.items() if t != task_name)
        raise ConfigError(
            f"the {wrong} store holds a {held[wrong]} dataset, not {task_name}; leave the task out (the stores "
            "say which) or pass stores of that task"
        )
    task = TASKS[task_name]
    rules = tuple(get_rule(r) for r in spec.rules)
    tokens = _resolve_tokens(train_store, test_store, spec)
    positions = _resolve_positions(train_store, test_store, spec, task)
    for store in (train_store, test_store):
        for b in spec.blocks:
            store_block(store, b)  # the store raises for a block it does not hold
    blocks = tuple(dict.fromkeys(store_block(train_store, b) for b in spec.blocks))
    allowed = check_matching_stores(train_store, test_store, spec.allow_mismatch)
    opts = spec.rule_options()
    for rule in rules:
        rule.check(opts)
    manifest = getattr(train_store, "manifest", None) or {}
    return Plan(
        spec=spec,
        task=task,
        rules=rules,
        tokens=tokens,
        positions=positions,
        blocks=blocks,
        shots=spec.fewshot.shots if spec.setting == "fewshot" else (0,),
        ways=task.ways or spec.fewshot.ways,
        queries=task.queries or spec.fewshot.queries,
        episodes=spec.episodes_for(task.name),
        model=str(model or store_label(manifest) or getattr(train_store, "backbone_spec", "model")),
        objective=str(getattr(train_store, "objective", "unknown")),
        dataset=str(dataset or getattr(train_store, "dataset_spec", "dataset")),
        weights=manifest_weights_source(manifest) if weights is None else weights,
        allowed=allowed,
    )


def fewshot_left_out(
    train_store: Any, test_store: Any, spec: EvalSpec, *, episode_sampler: Any = None
) -> dict[int, tuple[int, ...]]:
    """The classes the few-shot episodes of ``spec`` would leave out for too few images, per shot count, without
    drawing an episode (a study takes their union over its models, so it compares them on one class set; a
    setting no episode can be drawn for raises the sampler's DataError naming the keys that fix it)."""
    task = spec.task or getattr(train_store, "task", "classification")
    out: dict[int, tuple[int, ...]] = {}
    for shots in spec.fewshot.shots:
        if task == "segmentation":
            adapter: Any = SegmentationTask(
                train_store, test_store, masks=lambda i: np.zeros(0), episode_sampler=episode_sampler
            )
            tr, te = adapter._pixel_counts()
            ep = adapter.sampler(tr, te, shots=shots, episodes=0, leave_out=True)
        else:
            adapter = ClassificationTask(train_store, test_store, episode_sampler)
            kw = {"ways": spec.fewshot.ways, "queries": spec.fewshot.queries}
            ep = adapter.sampler(adapter.ytr, adapter.yte, shots=shots, episodes=0, leave_out=True, **kw)
        out[shots] = tuple(int(c) for c in getattr(ep, "left_out", ()))
    return out


def evaluate(
    train_store: Any,
    test_store: Any,
    spec: EvalSpec | None = None,
    *,
    model: str | None = None,
    dataset: str | None = None,
    weights: str | None = None,
    progress: ProgressFn | None = None,
    paired: bool = True,
    masks: Callable[[int], np.ndarray] | None = None,
    train_masks: Callable[[int], np.ndarray] | None = None,
    episode_sampler: Any = None,
    exclude_classes: Sequence[int] = (),
    checkpoint: UnitCheckpoint | None = None,
    **options: Any,
) -> Evaluation:
    """Evaluate every (block, position, token, rule) of a train and a test store → an :class:`Evaluation`: rows,
    paired tests (``paired=False``: none), the standard setting's fitted class vectors, left-out classes.

    ``spec``: an :class:`~qkvprobe.spec.EvalSpec`; keyword ``options`` build or amend one
    (:meth:`EvalSpec.build`'s keywords: ``setting``, ``rules``, ``tokens``, ``positions``, ``blocks``,
    ``shots``, ``ways``, ``episodes``, ``C``, ``Cs``, ``tol``, ``max_iter``, ``class_weight``, ``k``, ``T`` …).
    ``model``/``dataset``/``weights``: the rows' labels (default: what the extraction recorded in the store).
    ``masks(i)``/``train_masks(i)``: full-resolution masks of dataset index i (segmentation; default: opened from
    the stores' datasets). ``progress(label, done, total)`` is told of each unit. ``episode_sampler``: the task's
    episode sampler in place of ``qkvprobe.data.episodes``'s (tests; it takes ``leave_out`` and ``exclude``).
    ``exclude_classes``: class indices the few-shot episodes leave out besides those with too few images (a
    study compares its models on one class set); both are named in the rows' ``left_out``. ``checkpoint``: a
    :class:`~qkvprobe.protocols.checkpoint.UnitCheckpoint` that keeps each finished unit, so an interrupted
    evaluation resumes at its first unfinished one."""
    if spec is None:
        spec = EvalSpec.build(**options)
    elif options:
        spec = spec.replace(**options)
    plan = plan_evaluation(train_store, test_store, spec, model=model, dataset=dataset, weights=weights)
    if plan.task.name == "segmentation":
        adapter: Any = SegmentationTask(
            train_store,
            test_store,
            masks=masks,
            train_masks=train_masks,
            episode_sampler=episode_sampler,
            need_train_masks=plan.auto_C,
        )
    else:
        adapter = ClassificationTask(train_store, test_store, episode_sampler)
    adapter.exclude_classes = tuple(sorted({int(c) for c in exclude_classes}))
    make = row_maker(plan)
    out = Evaluation(
        allowed_mismatch=plan.allowed,
        model=plan.model,
        dataset=plan.dataset,
        task=plan.task.name,
        setting=spec.setting,
        blocks=list(plan.blocks),
    )
    if spec.setting == "standard":
        per_block = len(plan.positions) if plan.task.name == "classification" else len(plan.tokens)
        step = Steps(progress, len(plan.blocks) * per_block * len(plan.rules))
        adapter.standard(plan, out, step, make, partial(_unit, checkpoint, out, step))
        step.finish()
    else:
        _fewshot(plan, adapter, out, make, progress, checkpoint)
    if paired:
        labels = test_store.labels() if plan.task.name == "classification" else None
        whole = [r for r in out.rows if split_head(r.token)[1] is None]  # the answer table ranks whole tokens
        for shots in plan.shots:  # one best choice per shot count
            out.paired += paired_verdicts([r for r in whole if r.shots == shots], out, labels)
    return out


def _unit(
    checkpoint: UnitCheckpoint | None,
    out: Evaluation,
    step: Steps,
    key: str,
    label: str,
    compute: Callable[[], int],
) -> None:
    """Run one unit of an evaluation, or replay it from ``checkpoint`` (its progress steps told as done)."""
    if checkpoint is None:
        compute()
        return

    def replayed(steps: int) -> None:
        for _ in range(steps):
            step(f"{label} (done earlier)")

    checkpoint.run(key, out, replayed, compute)


def _fewshot(
    plan: Plan,
    adapter: Any,
    out: Evaluation,
    make: Callable[..., Any],
    progress: ProgressFn | None,
    checkpoint: UnitCheckpoint | None = None,
) -> None:
    """The few-shot loop: per shots, the episodes (and, for ``C="auto"``, the validation episodes first), then
    every unit — one block × position × token, its C choice and every rule — on the same episodes."""
    auto = plan.auto_C
    per_shot = len(plan.blocks) * len(plan.positions) * len(plan.tokens) * (len(plan.rules) + auto)
    step = Steps(progress, len(plan.shots) * per_shot)
    seg = plan.task.name == "segmentation"
    for shots in plan.shots:
        val = adapter.validation(plan, shots) if auto else None
        ep, left_out = adapter.episodes(plan, shots)
        if left_out:
            out.left_out[shots] = left_out
        if auto and adapter.validation_left_out.get(shots):
            out.validation_left_out[shots] = adapter.validation_left_out[shots]
        head = f"{shots}-shot" if seg else f"{plan.ways}-way {shots}-shot"
        for b in plan.blocks:
            for position in plan.positions:
                for token in plan.tokens:
                    label = f"{head} · block {b} · {token}·{position}"
                    compute = partial(
                        _fewshot_unit,
                        plan,
                        adapter,
                        out,
                        make,
                        step,
                        val,
                        ep,
                        left_out,
                        shots,
                        b,
                        position,
                        token,
                    )
                    _unit(checkpoint, out, step, f"fewshot|{shots}|{b}|{position}|{token}", label, compute)
    step.finish()


def _fewshot_unit(
    plan: Plan,
    adapter: Any,
    out: Evaluation,
    make: Callable[..., Any],
    step: Steps,
    val: Any,
    ep: Any,
    left_out: list[str],
    shots: int,
    b: int,
    position: str,
    token: str,
) -> int:
    """One few-shot unit: the C choice (``C="auto"``) and every rule on one block × position × token → the number of
    progress steps it took."""
    seg = plan.task.name == "segmentation"
    head = f"{shots}-shot" if seg else f"{plan.ways}-way {shots}-shot"
    taken = 0
    C_used = plan.spec.fixed_C()
    if plan.auto_C:
        step(f"{head} · block {b} · {token}·{position} · choosing C")
        taken += 1
        hyper = next(r for r in plan.rules if rule_entry(r.name).has_C)
        chosen = choose_C(partial(_validation_score, adapter, plan, hyper, val, token, position, b))
        out.chosen_C[UnitKey(b, token, position, hyper.name, shots)] = chosen
        C_used = chosen.C
    for rule in plan.rules:
        step(f"{head} · block {b} · {token}·{position} · {rule.name}")
        taken += 1
        res = adapter.fewshot_unit(plan, rule, ep, token, position, b, C_used)
        solved = rule_entry(rule.name).has_C
        params = plan.spec.rule_params(rule.name)
        common = dict(
            block=b,
            token=token,
            position=position,
            rule=rule.name,
            ways=1 if seg else plan.ways,
            shots=shots,
            episodes=len(res.per_episode),
            C=C_used if solved else math.nan,
            params=params,
            converged=(res.unconverged == 0) if solved else None,
            left_out=";".join(left_out),
        )
        out.rows.extend(adapter.fewshot_rows(res, common, make))
        key = UnitKey(b, token, position, rule.name, shots, params)
        out.per_episode[key] = res.per_episode
        if res.unconverged:
            out.unconverged.append(f"{key.label}: {res.unconverged} of {len(res.per_episode)} episodes")
    return taken


def _validation_score(
    adapter: Any, plan: Plan, rule: RuleProtocol, val: Any, token: str, position: str, block: int, C: float
) -> float:
    """Mean accuracy / mIoU of ``rule`` at ``C`` on training-split validation episodes (``C="auto"``)."""
    score: float = adapter.score(
        adapter.fewshot_unit(plan, rule, val, token, position, block, C, train_as_test=True)
    )
    return score


def evaluate_classification(
    train_store: Any, test_store: Any, spec: EvalSpec | None = None, **kw: Any
) -> Evaluation:
    """:func:`evaluate` on classification stores."""
    return evaluate(train_store, test_store, spec, task="classification", **kw)


def evaluate_segmentation(
    train_store: Any, test_store: Any, spec: EvalSpec | None = None, **kw: Any
) -> Evaluation:
    """:func:`evaluate` on segmentation stores (1-way episodes with one query image)."""
    return evaluate(train_store, test_store, spec, task="segmentation", **kw)
