"""One evaluation driver for both tasks: validate everything, then measure every unit of rules × tokens ×
positions × blocks (× shots) on a train and a test feature store (docs/science.md §2).

What differs between the tasks lives in two adapters, :class:`ClassificationTask` and :class:`SegmentationTask`
(the unit of a sample, the metric, the episode sampler, how labels reach a rule); what differs between the rules
lives in the rule registry (``protocols.registry``). The driver itself is the loop, the few-shot C choice, the
progress callback, the rows, and the typed :class:`~qkvprobe.protocols.evaluation.Evaluation` it returns.

Every argument is checked before any fit: the setting, rules, tokens, positions and blocks against the stores,
the few-shot parameters, the C grid and C, the class weighting, the rules' own parameters, and that the two stores
belong together (:func:`check_matching_stores`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np

from ..errors import ConfigError, RuleError, StoreError
from ..results import C_AUTO
from ..rules.checks import check_C
from ..rules.knn import KNN_K, KNN_T
from ..rules.logistic import check_class_weight
from ..vocab import SETTINGS, split_head
from .evaluation import (
    C_GRID,
    FEWSHOT_C,
    VAL_FRACTION,
    Evaluation,
    ProgressFn,
    RowMaker,
    RuleOptions,
    Steps,
    UnitKey,
    as_list,
    row_maker,
    store_block,
)
from .fewshot_c import check_fewshot_C, choose_C
from .registry import RuleProtocol, check_rules, get_rule
from .tasks import ClassificationTask, Plan, SegmentationTask

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
    """Refuse a train/test pair of stores that do not belong together (StoreError naming the first field that
    differs, both values and the fix); ``allow`` lists fields allowed to differ. Returns the allowed fields that
    do differ (recorded in the rows)."""
    bad = [f for f in allow if f not in MATCH_FIELDS]
    if bad:
        raise ConfigError(f"unknown --allow-mismatch field {bad[0]!r}; choose from {', '.join(MATCH_FIELDS)}")
    a, b = _store_fields(train), _store_fields(test)
    if a is None or b is None:
        return ()
    differing = []
    for field in MATCH_FIELDS:
        if a[field] == b[field]:
            continue
        if field in allow:
            differing.append(field)
            continue
        where = f"{getattr(train, 'path', 'train store')} and {getattr(test, 'path', 'test store')}"
        raise StoreError(
            f"the train and test stores do not match: {field} is {_short(a[field])} in the train store but "
            f"{_short(b[field])} in the test store ({where}); extract both splits with the same model, weights and "
            f"preprocessing, or pass --allow-mismatch {field} if the difference is deliberate"
        )
    return tuple(differing)


def _check_tokens(store: Any, tokens: Sequence[str], positions: Sequence[str], blocks: Sequence[int]) -> None:
    """Tokens, positions and blocks must be in the store (per-head tokens: their token type)."""
    held = getattr(store, "tokens", None)
    if held is not None:
        for t in tokens:
            base, _ = split_head(t)
            if base not in held:
                raise ConfigError(
                    f"token {t!r} is not in the store {getattr(store, 'path', '')} (it holds {', '.join(held)}); "
                    "pass --tokens from those or extract it"
                )
    held_pos = getattr(store, "positions", None)
    if held_pos is not None:
        for p in positions:
            if p not in held_pos:
                raise ConfigError(
                    f"position {p!r} is not in the store {getattr(store, 'path', '')} (it holds "
                    f"{', '.join(held_pos)}); pass --positions from those"
                )
    for b in blocks:
        store_block(store, b)  # the store raises for a block it does not hold


def _positive_ints(values: Any, name: str, minimum: int = 1) -> list[int]:
    out = []
    for v in as_list(values):
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < minimum:
            raise ConfigError(f"{name} must be integers >= {minimum}, got {v!r}")
        out.append(int(v))
    if not out:
        raise ConfigError(f"no {name} given")
    return out


def evaluate(
    train_store: Any,
    test_store: Any,
    *,
    setting: str,
    task: str | None = None,
    rules: Sequence[str] = ("hyperplane", "cosine"),
    tokens: Sequence[str] = ("q", "k", "v", "ffn"),
    positions: Sequence[str] | None = None,
    blocks: Sequence[int] = (-1,),
    ways: int = 5,
    shots: int | Sequence[int] = (1, 5),
    queries: int = 15,
    episodes: int | None = None,
    seed: int = 0,
    model: str | None = None,
    dataset: str | None = None,
    device: str = "cpu",
    Cs: Sequence[float] = C_GRID,
    C: float | str = FEWSHOT_C,
    class_weight: str | None = None,
    k: int = KNN_K,
    T: float = KNN_T,
    max_iter: int | None = None,
    masks: Any = None,
    train_masks: Any = None,
    episode_sampler: Any = None,
    progress: ProgressFn | None = None,
    allow_mismatch: Sequence[str] = (),
) -> Evaluation:
    """Evaluate every (block, position, token, rule) of a train and a test store → an :class:`Evaluation`.

    ``task`` defaults to the stores'; ``positions`` to ``cls`` (classification) / ``patch`` (segmentation);
    ``episodes`` to 2 000 (classification) / 1 000 (segmentation). Standard setting: every rule fitted on the
    whole training split (the hyperplane's C from ``Cs`` on held-out data). Few-shot: ``ways``-way (classification;
    segmentation is 1-way) ``shots``-shot episodes, the same episodes for every unit (paired); the hyperplane's
    ``C`` is fixed, or ``"auto"``: chosen per shots × block × position × token on validation episodes drawn from
    the training split alone (``protocols.fewshot_c``). ``class_weight`` (None or "balanced") weighs the
    hyperplane rule's classes. ``k``, ``T``: the k-NN rule's. ``masks(i)`` / ``train_masks(i)``: full-resolution
    masks of dataset index i (segmentation; default: opened from the stores' datasets). ``progress(label, done,
    total)`` is told of each unit. ``allow_mismatch``: store fields allowed to differ (:data:`MATCH_FIELDS`).
    """
    task = task or getattr(train_store, "task", None)
    if task not in ("classification", "segmentation"):
        raise ConfigError(f"unknown task {task!r}; use classification or segmentation")
    for name, store in (("train", train_store), ("test", test_store)):
        held = getattr(store, "task", task)
        if held != task:
            raise ConfigError(
                f"the {name} store holds a {held} dataset, not {task}; pass matching stores or --task"
            )
    if setting not in SETTINGS:
        raise RuleError(f"unknown setting {setting!r}; use 'standard' or 'fewshot'")
    rule_list = [get_rule(r) for r in check_rules(rules)]
    tokens = list(dict.fromkeys(as_list(tokens)))
    if not tokens:
        raise ConfigError("no token given; pass e.g. --tokens q,k,v,ffn")
    adapter_cls = ClassificationTask if task == "classification" else SegmentationTask
    positions = list(dict.fromkeys(as_list(positions) if positions else adapter_cls.default_positions))
    adapter_cls.check_positions(positions)
    blocks = list(dict.fromkeys(int(b) for b in as_list(blocks)))
    if not blocks:
        raise ConfigError("no block given; pass e.g. --blocks -1")
    for store in (train_store, test_store):
        _check_tokens(store, tokens, positions, blocks)
    allowed = check_matching_stores(train_store, test_store, tuple(allow_mismatch))
    class_weight = check_class_weight(class_weight)
    Cs = tuple(check_C(c) for c in Cs)
    if not Cs:
        raise RuleError("the C grid is empty; pass at least one C value")
    C = check_fewshot_C(C)
    shots_list = _positive_ints(shots, "shots") if setting == "fewshot" else [0]
    if setting == "fewshot":
        if task == "classification":
            ways = _positive_ints(ways, "ways", 2)[0]
            queries = _positive_ints(queries, "queries")[0]
        episodes = _positive_ints(2000 if episodes is None else episodes, "episodes")[0]
    opts = RuleOptions(
        device=device,
        seed=seed,
        Cs=Cs,
        val_fraction=VAL_FRACTION,
        C=FEWSHOT_C if C == C_AUTO else float(C),
        class_weight=class_weight,
        k=k,
        T=T,
        max_iter=max_iter,
    )
    for rule in rule_list:
        rule.check(opts)
    plan = Plan(
        setting,
        rule_list,
        tokens,
        positions,
        blocks,
        shots_list,
        ways,
        queries,
        episodes or 0,
        seed,
        C,
        opts,
        model,
        dataset,
        allowed,
    )
    auto = setting == "fewshot" and C == C_AUTO and any(r.has_C for r in rule_list)
    if task == "segmentation":
        adapter: Any = SegmentationTask(
            train_store,
            test_store,
            masks=masks,
            train_masks=train_masks,
            episode_sampler=episode_sampler,
            need_train_masks=auto,
        )
    else:
        adapter = ClassificationTask(train_store, test_store, episode_sampler)
    make = row_maker(
        train_store,
        model=model,
        dataset=dataset,
        task=task,
        setting=setting,
        seed=seed,
        class_weight=class_weight,
        C=C,
        solver_rules=[r.name for r in rule_list if r.has_C],
        allowed_mismatch=allowed,
    )
    out = Evaluation(allowed_mismatch=allowed)
    if setting == "standard":
        units = len(blocks) * (len(positions) if task == "classification" else len(tokens)) * len(rule_list)
        step = Steps(progress, units)
        adapter.standard(plan, out, step, make)
        step.finish()
        return out
    _fewshot(plan, adapter, out, make, progress, auto)
    return out


def _fewshot(
    plan: Plan, adapter: Any, out: Evaluation, make: RowMaker, progress: ProgressFn | None, auto: bool
) -> None:
    """The few-shot loop: per shots, the episodes (and, for ``C="auto"``, the validation episodes first, so a
    sampler that records what it leaves out ends on the evaluation's), then every unit on the same episodes."""
    per_shot = len(plan.blocks) * len(plan.positions) * len(plan.tokens) * (len(plan.rules) + auto)
    step = Steps(progress, len(plan.shots) * per_shot)
    seg = adapter.name == "segmentation"
    for shots in plan.shots:
        val = adapter.validation(plan, shots) if auto else None
        ep = adapter.episodes(plan, shots)
        head = f"{shots}-shot" if seg else f"{plan.ways}-way {shots}-shot"
        for block in plan.blocks:
            b = store_block(adapter.train, block)
            for position in plan.positions:
                for token in plan.tokens:
                    C_used = FEWSHOT_C if plan.C == C_AUTO else float(plan.C)
                    if auto:
                        step(f"{head} · block {b} · {token}·{position} · choosing C")
                        hyper = next(r for r in plan.rules if r.has_C)
                        chosen = choose_C(
                            partial(_validation_score, adapter, plan, hyper, val, token, position, block)
                        )
                        out.chosen_C[UnitKey(b, token, position, hyper.name, shots)] = chosen
                        C_used = chosen.C
                    for rule in plan.rules:
                        step(f"{head} · block {b} · {token}·{position} · {rule.name}")
                        res = adapter.fewshot_unit(plan, rule, ep, token, position, block, C_used)
                        params = rule.params(plan.opts)
                        common = dict(
                            block=b,
                            token=token,
                            position=position,
                            rule=rule.name,
                            ways=1 if seg else plan.ways,
                            shots=shots,
                            episodes=len(res.per_episode),
                            C=C_used if rule.has_C else math.nan,
                            params=params,
                            converged=(res.unconverged == 0) if rule.has_C else None,
                        )
                        out.rows.extend(adapter.fewshot_rows(res, common, make))
                        key = UnitKey(b, token, position, rule.name, shots, params)
                        out.per_episode[key] = res.per_episode
                        if res.unconverged:
                            out.unconverged.append(
                                f"{key.label}: {res.unconverged} of {len(res.per_episode)} episodes"
                            )
    step.finish()


def _validation_score(
    adapter: Any, plan: Plan, rule: RuleProtocol, val: Any, token: str, position: str, block: int, C: float
) -> float:
    """Mean accuracy / mIoU of ``rule`` at ``C`` on training-split validation episodes (``C="auto"``)."""
    score: float = adapter.score(
        adapter.fewshot_unit(plan, rule, val, token, position, block, C, train_as_test=True)
    )
    return score


def evaluate_classification(train_store: Any, test_store: Any, **kw: Any) -> Evaluation:
    """:func:`evaluate` on classification stores (``positions`` default ``cls``, ``episodes`` 2 000)."""
    return evaluate(train_store, test_store, task="classification", **kw)


def evaluate_segmentation(train_store: Any, test_store: Any, **kw: Any) -> Evaluation:
    """:func:`evaluate` on segmentation stores (``positions`` patch, 1-way episodes, ``episodes`` 1 000)."""
    kw.setdefault("episodes", 1000)
    kw.setdefault("ways", 1)
    kw.setdefault("queries", 1)
    return evaluate(train_store, test_store, task="segmentation", **kw)
