"""The weighted k-NN rule's protocols, all in one module (``rules.knn`` is its estimator).

- Standard classification: the training split is the memory; exact neighbours, bounded memory (``knn_topk``).
- Few-shot classification: each episode's support set is the memory (every support sample votes when there are
  fewer than k: at one shot per class that is the 1-NN rule, the cosine rule's decision too).
- Standard segmentation: each query patch takes the vote of its k nearest labelled training patches (patches
  labelled 255 are not in the memory). The memory holds at most ``KNN_MEMORY_BYTES`` of float32 features: above
  that, a seeded uniform sample of the labelled training patches (as open-hummingbird-eval subsamples its memory
  bank). The per-patch vote shares are upsampled and scored like the other rules' class scores.
- Few-shot segmentation: the K support images' labelled patches are the memory, foreground or background.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..errors import RuleError
from ..rules.batched import bmm
from ..rules.knn import check_knn_params, knn_predict, knn_topk, knn_votes, normalise
from .classification import episode_result, gather_rows
from .evaluation import FewshotResult, RuleOptions, StandardResult
from .registry import PatchScorer, RuleProtocol
from .segmentation import PatchSource

#: Bytes of float32 training-patch features the standard segmentation k-NN keeps as its memory; beyond it, a
#: seeded uniform sample of the labelled patches (``benchmarks/bench_rules.py knn`` measures its peak memory).
KNN_MEMORY_BYTES = 512 * 1024**2
#: Few-shot episodes whose neighbour searches run as one batch.
KNN_EPISODE_BATCH = 256


def knn_standard(
    Xtr: torch.Tensor, ytr: np.ndarray, Xte: torch.Tensor, yte: np.ndarray, K: int, opts: RuleOptions
) -> list[StandardResult]:
    """k-NN on G feature sets of one width ``Xtr [G, n, D]``, ``Xte [G, m, D]`` (predictions as codes)."""
    labels = torch.as_tensor(ytr, device=Xtr.device)
    out = []
    for g in range(Xtr.shape[0]):
        M, Q = normalise(Xtr[g].float()), normalise(Xte[g].float())
        sims, idx = knn_topk(Q, M, opts.k)
        pred = knn_predict(knn_votes(sims, labels[idx], K, opts.T)).cpu().numpy()
        out.append(StandardResult(float(np.mean(pred == yte)), float("nan"), {}, pred))
    return out


def knn_fewshot(
    Ftr: torch.Tensor,
    Fte: torch.Tensor,
    s_idx: torch.Tensor,
    ys: torch.Tensor,
    q_idx: torch.Tensor,
    yq: torch.Tensor,
    ways: int,
    opts: RuleOptions,
) -> FewshotResult:
    """k-NN episodes: the support set of each episode is its memory."""
    Ftr, Fte = normalise(Ftr.float()), normalise(Fte.float())
    E = len(s_idx)
    acc = torch.empty(E, dtype=torch.float64, device=Ftr.device)
    k = min(opts.k, s_idx.shape[1])
    for lo in range(0, E, KNN_EPISODE_BATCH):
        hi = min(E, lo + KNN_EPISODE_BATCH)
        S, Q = gather_rows(Ftr, s_idx[lo:hi]), gather_rows(Fte, q_idx[lo:hi])  # [e, N·K, D], [e, N·Q, D]
        sims, idx = torch.topk(bmm(Q, S.transpose(1, 2)), k, dim=2)
        labels = ys[lo:hi, None, :].expand(-1, Q.shape[1], -1).gather(2, idx)
        pred = knn_predict(knn_votes(sims, labels, ways, opts.T))
        acc[lo:hi] = (pred == yq[lo:hi]).double().mean(1)
    return episode_result(acc)


def memory_rows(num_rows: int, width: int, seed: int) -> np.ndarray | None:
    """Which of ``num_rows`` labelled patches the standard segmentation memory keeps (sorted; None = all)."""
    budget = max(1, KNN_MEMORY_BYTES // (4 * max(width, 1)))
    if num_rows <= budget:
        return None
    return np.sort(np.random.default_rng(seed).choice(num_rows, budget, replace=False))


def knn_patch_memory(source: PatchSource, seed: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The memory bank of a :class:`~qkvprobe.protocols.segmentation.PatchSource`: (unit-length float32 features
    ``[n', D]``, labels ``[n']``, number of labelled patches before subsampling). Filled in place, chunk by chunk:
    the bank is the only full-size array (no list of chunks to concatenate)."""
    memory: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    keep = None
    seen = filled = 0
    for X, y in source():
        if memory is None or labels is None:
            keep = memory_rows(source.num_rows, X.shape[1] - 1, seed)
            size = source.num_rows if keep is None else len(keep)
            memory = torch.empty(size, X.shape[1] - 1, dtype=torch.float32, device=X.device)
            labels = torch.empty(size, dtype=torch.int64, device=X.device)
        if keep is None:
            rows = torch.arange(len(y), device=X.device)
        else:
            rows = torch.as_tensor(keep[(keep >= seen) & (keep < seen + len(y))] - seen, device=X.device)
        seen += len(y)
        memory[filled : filled + len(rows)] = normalise(X[rows, :-1].float())
        labels[filled : filled + len(rows)] = y[rows]
        filled += len(rows)
    if memory is None or labels is None or filled == 0:
        raise RuleError("no labelled training patches (all patch labels are 255); check the training store")
    return memory[:filled], labels[:filled], seen


def knn_patch_scores(
    memory: torch.Tensor, labels: torch.Tensor, K: int, opts: RuleOptions
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Scorer ``X [m, D]`` → vote shares ``[m, K]`` of the k nearest memory patches."""

    def scores(X: torch.Tensor) -> torch.Tensor:
        sims, idx = knn_topk(normalise(X.float()), memory, opts.k)
        votes = knn_votes(sims, labels[idx], K, opts.T)
        return (votes / votes.sum(1, keepdim=True)).to(X.dtype)

    return scores


def knn_support_scores(
    X: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, Xq: torch.Tensor, opts: RuleOptions
) -> tuple[torch.Tensor, int]:
    """Few-shot segmentation: support patches ``X [e, n, D]`` (``y`` 1 = foreground, ``valid`` 0 for ignored
    patches, which never vote) → foreground minus background vote share of each query patch ``[e, m]``."""
    S, Q = normalise(X.float()), normalise(Xq.float())
    sims = bmm(Q, S.transpose(1, 2))  # [e, m, n]
    sims = sims.masked_fill(~(valid > 0)[:, None, :], float("-inf"))
    k = min(opts.k, S.shape[1])
    top, idx = torch.topk(sims, k, dim=2)
    labels = y[:, None, :].expand(-1, Q.shape[1], -1).gather(2, idx)
    # exp((s − s_max)/T) of a −inf (ignored) neighbour is 0: it does not vote; rows without any valid support
    # patch have no votes at all and are handled by the caller's degenerate-support rule.
    top = torch.where(torch.isfinite(top), top, torch.full_like(top, -1e30))
    w = torch.exp((top - top[..., :1]) / opts.T) * torch.isfinite(sims.gather(2, idx)).to(top.dtype)
    votes = torch.zeros(*top.shape[:2], 2, dtype=w.dtype, device=w.device).scatter_add_(2, labels, w)
    share = votes / votes.sum(2, keepdim=True).clamp_min(1e-30)
    return (share[..., 1] - share[..., 0]).to(Xq.dtype), 0


class KNN(RuleProtocol):
    """The knn rule's four protocols; what the toolkit knows of it (summary, C, directions, note, colour) is
    its entry in the rule table (``qkvprobe.tables``)."""

    name = "knn"

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
        return knn_standard(Xtr, ytr, Xte, yte, num_classes, opts)

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
        return knn_fewshot(Ftr, Fte, support, support_labels, query, query_labels, ways, opts)

    def segmentation_scorer(self, source: Any, num_classes: int, opts: RuleOptions) -> PatchScorer:
        # float32 throughout: the similarities are float32 (rules.knn), so a float64 copy of each chunk is waste.
        memory, labels, _ = knn_patch_memory(
            dataclasses.replace(source, dtype=torch.float32).source(), opts.seed
        )
        return PatchScorer(knn_patch_scores(memory, labels, num_classes, opts))

    def fewshot_segmentation_scores(
        self, X: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, Xq: torch.Tensor, opts: RuleOptions
    ) -> tuple[torch.Tensor, int]:
        return knn_support_scores(X, y, valid, Xq, opts)
