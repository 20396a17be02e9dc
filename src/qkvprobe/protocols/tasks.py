"""The two task adapters of the evaluation driver (``protocols.driver``): what differs between classification and
segmentation — the unit of a sample (an image's feature, or its patches), the metric (accuracy; mIoU and pixel
accuracy at full resolution), the episode sampler (N-way K-shot; 1-way K-shot of one class) and how labels and
masks reach a rule — behind one interface: ``check_positions``, ``standard``, ``episodes``, ``validation``,
``fewshot_unit``, ``fewshot_rows`` and ``score``."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from ..results import ResultRow
from .classification import run_fewshot_classification, run_standard_classification
from .evaluation import (
    Evaluation,
    FewshotResult,
    FewshotSegmentationResult,
    RowMaker,
    Steps,
    UnitKey,
)
from .fewshot_c import validation_episodes
from .registry import RuleProtocol
from .segmentation import (
    Masks,
    dataset_masks,
    patch_pixel_counts,
    run_fewshot_segmentation,
    run_standard_segmentation,
)

if TYPE_CHECKING:
    from .driver import Plan

#: ``unit(key, label, compute)``: run one unit of an evaluation (``compute()`` adds to the Evaluation and returns its
#: number of progress steps), or replay it from a checkpoint (``protocols.checkpoint``).
UnitRunner = Callable[[str, str, Callable[[], int]], None]


def _now(key: str, label: str, compute: Callable[[], int]) -> None:
    compute()


class _Sampling:
    """The few-shot class policy every door shares: the samplers leave classes with too few images out of the
    episodes (``leave_out=True``) instead of refusing the setting, and the adapter names them — for the
    evaluation's episodes and, separately, for the validation episodes that choose ``C="auto"`` on halved
    training pools. A custom ``episode_sampler`` takes ``leave_out`` too."""

    sampler: Callable[..., Any]
    class_names: list[str]
    #: Classes the sampler never draws by default (segmentation: background 0).
    base_exclude: tuple[int, ...] = ()
    #: Classes left out on the caller's word (a study: those another model of it had to leave out).
    exclude_classes: tuple[int, ...] = ()

    def sample(
        self, train_part: np.ndarray, test_part: np.ndarray, shots: int, record: list[str], **kw: Any
    ) -> Any:
        if self.exclude_classes:
            kw["exclude"] = (*self.base_exclude, *self.exclude_classes)
        ep = self.sampler(train_part, test_part, shots=shots, leave_out=True, **kw)
        names = self.class_names
        left = sorted({*self.exclude_classes, *(int(c) for c in getattr(ep, "left_out", ()))})
        record.extend(str(names[c]) if 0 <= c < len(names) else str(c) for c in left)
        return ep


class ClassificationTask(_Sampling):
    """Classification: one feature per image (``cls``/``avg``), accuracy; N-way K-shot episodes."""

    name = "classification"

    def __init__(self, train: Any, test: Any, episode_sampler: Any = None) -> None:
        self.train, self.test = train, test
        self.ytr, self.yte = train.labels(), test.labels()
        if episode_sampler is None:
            from ..data.episodes import sample_classification_episodes as episode_sampler
        self.sampler = episode_sampler
        self.class_names = [str(c) for c in getattr(train, "classes", [])]
        self.validation_left_out: dict[int, list[str]] = {}

    def standard(
        self, plan: Plan, out: Evaluation, step: Steps, make: RowMaker, unit: UnitRunner = _now
    ) -> None:
        for b in plan.blocks:
            for position in plan.positions:
                for rule in plan.rules:
                    label = f"block {b} · {position} · {rule.name} ({len(plan.tokens)} tokens)"
                    compute = partial(self._standard_unit, plan, out, step, make, b, position, rule, label)
                    unit(f"standard|{b}|{position}|{rule.name}", label, compute)
        out.classes = np.unique(self.ytr)

    def _standard_unit(
        self,
        plan: Plan,
        out: Evaluation,
        step: Steps,
        make: RowMaker,
        b: int,
        position: str,
        rule: RuleProtocol,
        label: str,
    ) -> int:
        step(label)
        train = [self.train.get(t, position, b) for t in plan.tokens]
        test = [self.test.get(t, position, b) for t in plan.tokens]
        results = run_standard_classification(train, self.ytr, test, self.yte, rule, plan.opts)
        params = plan.spec.rule_params(rule.name)
        for token, res in zip(plan.tokens, results, strict=True):
            key = UnitKey(b, token, position, rule.name, 0, params)
            out.rows.append(
                make(
                    block=b,
                    token=token,
                    position=position,
                    rule=rule.name,
                    ways=0,
                    shots=0,
                    episodes=0,
                    metric="accuracy",
                    value=res.accuracy,
                    C=res.C,
                    params=params,
                    converged=res.converged,
                )
            )
            out.predictions[key] = res.predictions
            if res.weights is not None:
                out.weights[key] = res.weights
            if res.converged is False:
                out.unconverged.append(f"{key.label} (standard)")
        return 1

    def episodes(self, plan: Plan, shots: int) -> tuple[Any, list[str]]:
        """The evaluation's episodes and the classes left out of them."""
        left: list[str] = []
        kw = {"ways": plan.ways, "queries": plan.queries, "episodes": plan.episodes, "seed": plan.seed}
        return self.sample(self.ytr, self.yte, shots, left, **kw), left

    def validation(self, plan: Plan, shots: int) -> Any:
        left = self.validation_left_out.setdefault(shots, [])
        return validation_episodes(
            lambda a, b, **kw: self.sample(a, b, shots, left, **kw),
            lambda rows: self.ytr[rows],
            len(self.ytr),
            episodes=plan.episodes,
            seed=plan.seed,
            ways=plan.ways,
            queries=plan.queries,
        )

    def fewshot_unit(
        self,
        plan: Plan,
        rule: RuleProtocol,
        ep: Any,
        token: str,
        position: str,
        block: int,
        C: float,
        *,
        train_as_test: bool = False,
    ) -> FewshotResult:
        Ftr = self.train.get(token, position, block)
        Fte = Ftr if train_as_test else self.test.get(token, position, block)
        opts = plan.spec.rule_options(C)
        return run_fewshot_classification(
            Ftr, Fte, ep.support, ep.support_labels, ep.query, ep.query_labels, rule, opts
        )

    def fewshot_rows(self, res: FewshotResult, common: dict[str, Any], make: RowMaker) -> list[ResultRow]:
        return [make(**common, metric="accuracy", value=res.mean, ci95=res.ci95)]

    def score(self, res: FewshotResult) -> float:
        return res.mean


class SegmentationTask(_Sampling):
    """Segmentation: one feature per patch, mIoU (and pixel accuracy) at full resolution; 1-way K-shot episodes
    of one class each (foreground vs. not)."""

    name = "segmentation"
    base_exclude = (0,)

    def __init__(
        self,
        train: Any,
        test: Any,
        *,
        masks: Any = None,
        train_masks: Any = None,
        episode_sampler: Any = None,
        need_train_masks: bool = False,
    ) -> None:
        self.train, self.test = train, test
        self.masks: Masks = masks or dataset_masks(test)
        self.train_masks: Masks | None = train_masks or (dataset_masks(train) if need_train_masks else None)
        if episode_sampler is None:
            from ..data.episodes import sample_segmentation_episodes as episode_sampler
        self.sampler = episode_sampler
        self._counts: tuple[np.ndarray, np.ndarray] | None = None
        self.class_names = [str(c) for c in getattr(train, "classes", [])]
        self.validation_left_out: dict[int, list[str]] = {}

    def _pixel_counts(self) -> tuple[np.ndarray, np.ndarray]:
        if self._counts is None:
            K = len(self.train.classes)
            self.tr_labels, self.te_labels = self.train.patch_labels(), self.test.patch_labels()
            self._counts = (
                patch_pixel_counts(self.tr_labels, K, self.train.patch_size),
                patch_pixel_counts(self.te_labels, K, self.test.patch_size),
            )
        return self._counts

    def standard(
        self, plan: Plan, out: Evaluation, step: Steps, make: RowMaker, unit: UnitRunner = _now
    ) -> None:
        for b in plan.blocks:
            for token in plan.tokens:
                for rule in plan.rules:
                    label = f"block {b} · {token}·patch · {rule.name}"
                    compute = partial(self._standard_unit, plan, out, step, make, b, token, rule, label)
                    unit(f"standard|{b}|{token}|{rule.name}", label, compute)
        out.classes = np.arange(len(self.train.classes))

    def _standard_unit(
        self,
        plan: Plan,
        out: Evaluation,
        step: Steps,
        make: RowMaker,
        b: int,
        token: str,
        rule: RuleProtocol,
        label: str,
    ) -> int:
        step(label)
        res = run_standard_segmentation(self.train, self.test, token, b, rule, plan.opts, self.masks)
        params = plan.spec.rule_params(rule.name)
        key = UnitKey(b, token, "patch", rule.name, 0, params)
        for metric in ("miou", "pixel_accuracy"):
            out.rows.append(
                make(
                    block=b,
                    token=token,
                    position="patch",
                    rule=rule.name,
                    ways=0,
                    shots=0,
                    episodes=0,
                    metric=metric,
                    value=getattr(res, metric),
                    C=res.C,
                    params=params,
                    converged=res.converged,
                )
            )
        if res.weights is not None:
            out.weights[key] = res.weights
        if res.converged is False:
            out.unconverged.append(f"{key.label} (standard)")
        return 1

    def episodes(self, plan: Plan, shots: int) -> tuple[Any, list[str]]:
        """The evaluation's episodes and the classes left out of them."""
        tr, te = self._pixel_counts()
        left: list[str] = []
        return self.sample(tr, te, shots, left, episodes=plan.episodes, seed=plan.seed), left

    def validation(self, plan: Plan, shots: int) -> Any:
        tr, _ = self._pixel_counts()
        left = self.validation_left_out.setdefault(shots, [])
        return validation_episodes(
            lambda a, b, **kw: self.sample(a, b, shots, left, **kw),
            lambda rows: tr[rows],
            len(tr),
            episodes=plan.episodes,
            seed=plan.seed,
        )

    def fewshot_unit(
        self,
        plan: Plan,
        rule: RuleProtocol,
        ep: Any,
        token: str,
        position: str,
        block: int,
        C: float,
        *,
        train_as_test: bool = False,
    ) -> FewshotSegmentationResult:
        self._pixel_counts()
        Ftr = self.train.get(token, "patch", block)
        if train_as_test:
            Fte, indices, masks = Ftr, self.train.indices(), self.train_masks
            assert masks is not None  # need_train_masks is set whenever validation episodes run (C="auto")
        else:
            Fte, indices, masks = self.test.get(token, "patch", block), self.test.indices(), self.masks
        opts = plan.spec.rule_options(C)
        return run_fewshot_segmentation(
            Ftr,
            self.tr_labels,
            Fte,
            indices,
            self.test.grid,
            ep.classes,
            ep.support,
            ep.query,
            rule,
            opts,
            masks,
        )

    def fewshot_rows(
        self, res: FewshotSegmentationResult, common: dict[str, Any], make: RowMaker
    ) -> list[ResultRow]:
        return [
            make(**common, metric="miou", value=res.miou, ci95=res.ci95),
            make(**common, metric="fb_iou", value=res.fb_iou),
        ]

    def score(self, res: FewshotSegmentationResult) -> float:
        return res.miou
