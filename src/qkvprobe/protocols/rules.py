"""The built-in rules of the registry: hyperplane, cosine and k-NN (``protocols.registry`` says what a rule is)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..rules import class_normals
from ..rules.knn import check_knn_params
from . import classification as cls
from . import knn
from . import segmentation as seg
from .evaluation import FewshotResult, RuleOptions, StandardResult
from .registry import PatchScorer, RuleProtocol


class Hyperplane(RuleProtocol):
    name = "hyperplane"
    summary = "L2 logistic regression on raw features (C chosen on held-out data; a fixed C in few-shot)"
    has_C = True
    class_weighted = True
    direction = True

    def standard_classification(
        self,
        Xtr: torch.Tensor,
        ytr: np.ndarray,
        Xte: torch.Tensor,
        yte: np.ndarray,
        num_classes: int,
        opts: RuleOptions,
    ) -> list[StandardResult]:
        return cls.hyperplane_standard(Xtr, ytr, Xte, yte, num_classes, opts)

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
    ) -> FewshotResult:
        return cls.hyperplane_fewshot(Ftr, Fte, support, support_labels, query, query_labels, ways, opts)

    def segmentation_scorer(self, source: Any, num_classes: int, opts: RuleOptions) -> PatchScorer:
        W, C, val, converged = seg.hyperplane_patch_fit(source, num_classes, opts)
        weights = class_normals(W[:-1].T).float().cpu().numpy()
        return PatchScorer(seg.linear_scores(W, num_classes), C, val, weights, converged)

    def fewshot_segmentation_scores(
        self, X: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, Xq: torch.Tensor, opts: RuleOptions
    ) -> tuple[torch.Tensor, int]:
        return seg.hyperplane_support_scores(X, y, valid, Xq, opts)


class Cosine(RuleProtocol):
    name = "cosine"
    summary = "cosine similarity to each class's direction (mean of L2-normalised training features)"
    direction = True

    def standard_classification(
        self,
        Xtr: torch.Tensor,
        ytr: np.ndarray,
        Xte: torch.Tensor,
        yte: np.ndarray,
        num_classes: int,
        opts: RuleOptions,
    ) -> list[StandardResult]:
        return cls.cosine_standard(Xtr, ytr, Xte, yte, num_classes)

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
    ) -> FewshotResult:
        acc = cls.cosine_fewshot(Ftr, Fte, support, support_labels, query, query_labels, ways)
        return cls.episode_result(acc)

    def segmentation_scorer(self, source: Any, num_classes: int, opts: RuleOptions) -> PatchScorer:
        sums, scores = seg.cosine_patch_scorer(source)
        return PatchScorer(scores, weights=F.normalize(sums, dim=1).float().cpu().numpy())

    def fewshot_segmentation_scores(
        self, X: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, Xq: torch.Tensor, opts: RuleOptions
    ) -> tuple[torch.Tensor, int]:
        return seg.cosine_support_scores(X, y, valid, Xq, opts)


class KNN(RuleProtocol):
    name = "knn"
    summary = "weighted k-NN on cosine similarity (DINO's evaluation: k = 20, votes exp(s/T), T = 0.07)"
    note = (
        "k-NN is the reference peers report, not a direction rule; with fewer training samples than k every "
        "sample votes, so at 1 shot per class it is the 1-NN rule (the cosine rule's decision too)."
    )

    def params(self, opts: RuleOptions) -> str:
        return f"k={opts.k},T={opts.T:g}"

    def check(self, opts: RuleOptions) -> None:
        check_knn_params(opts.k, opts.T)

    def standard_classification(
        self,
        Xtr: torch.Tensor,
        ytr: np.ndarray,
        Xte: torch.Tensor,
        yte: np.ndarray,
        num_classes: int,
        opts: RuleOptions,
    ) -> list[StandardResult]:
        return knn.knn_standard(Xtr, ytr, Xte, yte, num_classes, opts)

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
    ) -> FewshotResult:
        return knn.knn_fewshot(Ftr, Fte, support, support_labels, query, query_labels, ways, opts)

    def segmentation_scorer(self, source: Any, num_classes: int, opts: RuleOptions) -> PatchScorer:
        # float32 throughout: the similarities are float32 (rules.knn), so a float64 copy of each chunk is waste.
        memory, labels, _ = knn.knn_patch_memory(
            dataclasses.replace(source, dtype=torch.float32).source(), opts.seed
        )
        return PatchScorer(knn.knn_patch_scores(memory, labels, num_classes, opts))

    def fewshot_segmentation_scores(
        self, X: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, Xq: torch.Tensor, opts: RuleOptions
    ) -> tuple[torch.Tensor, int]:
        return knn.knn_support_scores(X, y, valid, Xq, opts)


#: The registry's built-in rules, in the order the CLI, the config and the report list them.
BUILTIN_RULES: tuple[RuleProtocol, ...] = (Hyperplane(), Cosine(), KNN())

__all__ = ["BUILTIN_RULES", "KNN", "Cosine", "Hyperplane"]
