"""The two task adapters of the evaluation driver (``protocols.driver``): what differs between classification and
segmentation — the unit of a sample (an image's feature, or its patches), the metric (accuracy; mIoU and pixel
accuracy at full resolution), the episode sampler (N-way K-shot; 1-way K-shot of one class) and how labels and
masks reach a rule — behind one interface: ``check_positions``, ``standard``, ``episodes``, ``validation``,
``fewshot_unit``, ``fewshot_rows`` and ``score``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError, RuleError
from ..results import ResultRow
from .evaluation import (
    Evaluation,
    FewshotResult,
    FewshotSegmentationResult,
    RowMaker,
    RuleOptions,
    Steps,
    UnitKey,
    store_block,
)
from .fewshot_c import validation_episodes
from .registry import RuleProtocol

if TYPE_CHECKING:
    from .segmentation import Masks


@dataclass(frozen=True)
class Plan:
    """A validated evaluation: everything the loops read."""

    setting: str
    rules: list[RuleProtocol]
    tokens: list[str]
    positions: list[str]
    blocks: list[int]
    shots: list[int]
    ways: int
    queries: int
    episodes: int
    seed: int
    C: float | str
    opts: RuleOptions
    model: str | None
    dataset: str | None
    allowed_mismatch: tuple[str, ...]


class ClassificationTask:
    """Classification: one feature per image (``cls``/``avg``), accuracy; N-way K-shot episodes."""

    name = "classification"
    default_positions = ("cls",)

    def __init__(self, train: Any, test: Any, episode_sampler: Any = None) -> None:
        self.train, self.test = train, test
        self.ytr, self.yte = train.labels(), test.labels()
        if episode_sampler is None:
            from ..data.episodes import sample_classification_episodes as episode_sampler
        self.sampler = episode_sampler

    @staticmethod
    def check_positions(positions: Sequence[str]) -> None:
        bad = [p for p in positions if p not in ("cls", "avg")]
        if bad:
            raise ConfigError(
                f"classification uses image-level tokens, got position {bad[0]!r}; pass --positions cls,avg"
            )

    def standard(self, plan: Plan, out: Evaluation, step: Steps, make: RowMaker) -> None:
        from .classification import standard_classification

        for block in plan.blocks:
            b = store_block(self.train, block)
            for position in plan.positions:
                train = [self.train.get(t, position, block) for t in plan.tokens]
                test = [self.test.get(t, position, block) for t in plan.tokens]
                for rule in plan.rules:
                    step(f"block {b} · {position} · {rule.name} ({len(plan.tokens)} tokens)")
                    opts = plan.opts
                    results = standard_classification(
                        train,
                        self.ytr,
                        test,
                        self.yte,
                        rule=rule.name,
                        Cs=opts.Cs,
                        seed=opts.seed,
                        device=opts.device,
                        class_weight=opts.class_weight,
                        max_iter=opts.max_iter,
                        tol=opts.tol,
                        k=opts.k,
                        T=opts.T,
                    )
                    params = rule.params(opts)
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
        out.classes = np.unique(self.ytr)

    def episodes(self, plan: Plan, shots: int) -> Any:
        return self.sampler(
            self.ytr,
            self.yte,
            ways=plan.ways,
            shots=shots,
            queries=plan.queries,
            episodes=plan.episodes,
            seed=plan.seed,
        )

    def validation(self, plan: Plan, shots: int) -> Any:
        return validation_episodes(
            self.sampler,
            lambda rows: self.ytr[rows],
            len(self.ytr),
            episodes=plan.episodes,
            seed=plan.seed,
            ways=plan.ways,
            shots=shots,
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
        from .classification import fewshot_classification

        Ftr = self.train.get(token, position, block)
        Fte = Ftr if train_as_test else self.test.get(token, position, block)
        o = plan.opts
        return fewshot_classification(
            Ftr,
            Fte,
            ep.classes,
            ep.support,
            ep.support_labels,
            ep.query,
            ep.query_labels,
            rule=rule.name,
            C=C,
            device=o.device,
            max_iter=o.max_iter,
            tol=o.tol,
            k=o.k,
            T=o.T,
        )

    def fewshot_rows(self, res: FewshotResult, common: dict[str, Any], make: RowMaker) -> list[ResultRow]:
        return [make(**common, metric="accuracy", value=res.mean, ci95=res.ci95)]

    def score(self, res: FewshotResult) -> float:
        return res.mean


class SegmentationTask:
    """Segmentation: one feature per patch, mIoU (and pixel accuracy) at full resolution; 1-way K-shot episodes
    of one class each (foreground vs. not)."""

    name = "segmentation"
    default_positions = ("patch",)

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
        from .segmentation import dataset_masks

        self.train, self.test = train, test
        self.masks: Masks = masks or dataset_masks(test)
        self.train_masks: Masks | None = train_masks or (dataset_masks(train) if need_train_masks else None)
        if episode_sampler is None:
            from ..data.episodes import sample_segmentation_episodes as episode_sampler
        self.sampler = episode_sampler
        self._counts: tuple[np.ndarray, np.ndarray] | None = None

    @staticmethod
    def check_positions(positions: Sequence[str]) -> None:
        if any(p != "patch" for p in positions):
            raise RuleError(
                f"segmentation uses patch tokens, got positions {list(positions)}; pass --positions patch"
            )

    def _pixel_counts(self) -> tuple[np.ndarray, np.ndarray]:
        from .segmentation import patch_pixel_counts

        if self._counts is None:
            K = len(self.train.classes)
            self.tr_labels, self.te_labels = self.train.patch_labels(), self.test.patch_labels()
            self._counts = (
                patch_pixel_counts(self.tr_labels, K, self.train.patch_size),
                patch_pixel_counts(self.te_labels, K, self.test.patch_size),
            )
        return self._counts

    def standard(self, plan: Plan, out: Evaluation, step: Steps, make: RowMaker) -> None:
        from .segmentation import standard_segmentation

        for block in plan.blocks:
            b = store_block(self.train, block)
            for token in plan.tokens:
                for rule in plan.rules:
                    step(f"block {b} · {token}·patch · {rule.name}")
                    o = plan.opts
                    res = standard_segmentation(
                        self.train,
                        self.test,
                        token=token,
                        block=block,
                        rule=rule.name,
                        masks=self.masks,
                        Cs=o.Cs,
                        seed=o.seed,
                        device=o.device,
                        class_weight=o.class_weight,
                        max_iter=o.max_iter,
                        tol=o.tol,
                        k=o.k,
                        T=o.T,
                    )
                    params = rule.params(o)
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
        out.classes = np.arange(len(self.train.classes))

    def episodes(self, plan: Plan, shots: int) -> Any:
        tr, te = self._pixel_counts()
        return self.sampler(tr, te, shots=shots, episodes=plan.episodes, seed=plan.seed)

    def validation(self, plan: Plan, shots: int) -> Any:
        tr, _ = self._pixel_counts()
        return validation_episodes(
            self.sampler, lambda rows: tr[rows], len(tr), episodes=plan.episodes, seed=plan.seed, shots=shots
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
        from .segmentation import fewshot_segmentation

        self._pixel_counts()
        Ftr = self.train.get(token, "patch", block)
        if train_as_test:
            Fte, indices, masks = Ftr, self.train.indices(), self.train_masks
            assert masks is not None  # need_train_masks is set whenever validation episodes run (C="auto")
        else:
            Fte, indices, masks = self.test.get(token, "patch", block), self.test.indices(), self.masks
        o = plan.opts
        return fewshot_segmentation(
            Ftr,
            self.tr_labels,
            Fte,
            indices,
            self.test.grid,
            ep.classes,
            ep.support,
            ep.query,
            rule=rule.name,
            masks=masks,
            C=C,
            device=o.device,
            class_weight=o.class_weight,
            max_iter=o.max_iter,
            tol=o.tol,
            k=o.k,
            T=o.T,
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
