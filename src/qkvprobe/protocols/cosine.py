"""The cosine rule's protocols, all in one module: each class's direction is the mean of its L2-normalised
training features, a sample goes to the class of highest cosine (docs/science.md §2) — in the standard and
few-shot classification protocols and the segmentation ones (few-shot: a foreground and a background
direction per episode)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import RuleError
from ..rules.batched import bmm
from ..rules.cosine import EPS as COS_EPS
from ..rules.cosine import cosine_directions, cosine_scores
from .classification import episode_result, gather_rows
from .evaluation import FewshotResult, RuleOptions, StandardResult
from .registry import PatchScorer, RuleProtocol
from .segmentation import PatchData

#: Few-shot cosine rule: support rows per block of episodes whose class directions are built at once, and
#: query rows gathered per chunk (kept in L2/L3 cache; smaller chunks pay more per-call overhead).
COSINE_SUPPORT_BYTES = 32 * 1024**2


COSINE_QUERY_BYTES = 3 * 1024**2


def cosine_standard(
    Xtr: torch.Tensor, ytr: np.ndarray, Xte: torch.Tensor, yte: np.ndarray, K: int
) -> list[StandardResult]:
    """The cosine rule on G feature sets of one width (predictions as codes)."""
    y_all = torch.as_tensor(ytr, device=Xtr.device).expand(Xtr.shape[0], -1)
    mu = cosine_directions(Xtr, y_all, K)
    pred = cosine_scores(Xte, mu).argmax(2).cpu().numpy()
    weights = mu.float().cpu().numpy()
    return [
        StandardResult(float(np.mean(p == yte)), math.nan, {}, p, w)
        for p, w in zip(pred, weights, strict=True)
    ]


def cosine_fewshot(
    Ftr: torch.Tensor,
    Fte: torch.Tensor,
    s_idx: torch.Tensor,
    ys: torch.Tensor,
    q_idx: torch.Tensor,
    yq: torch.Tensor,
    ways: int,
) -> torch.Tensor:
    """Per-episode accuracy ``[E]`` of the cosine rule. Both splits are normalised once; the class directions are
    built for a block of episodes at a time, and the queries are gathered a cache-sized chunk at a time (gathering
    the queries of all episodes at once would write ~1 GB for 10 000 episodes and dominate the run)."""
    Ftr = torch.nn.functional.normalize(Ftr, dim=1, eps=COS_EPS)
    Fte = torch.nn.functional.normalize(Fte, dim=1, eps=COS_EPS)
    E, NK = s_idx.shape
    NQ, D = q_idx.shape[1], Ftr.shape[1]
    # With K rows of every class (the samplers' layout, up to order), a class sum is a reshape + sum over a
    # label-sorted support: several times faster than the one-hot matmul that handles unequal counts.
    order = torch.sort(ys, dim=1, stable=True).indices
    s_sorted, ys_sorted = s_idx.gather(1, order), ys.gather(1, order)
    equal = NK % ways == 0 and bool(
        (ys_sorted == torch.arange(ways, device=ys.device).repeat_interleave(NK // ways)).all()
    )
    block = max(1, COSINE_SUPPORT_BYTES // (NK * D * Fte.element_size()))
    step = max(1, COSINE_QUERY_BYTES // (NQ * D * Fte.element_size()))
    q_flat = q_idx.reshape(-1)
    pred = torch.empty(E, NQ, dtype=torch.int64, device=Fte.device)
    # One gather buffer for every chunk: a fresh multi-MB tensor per chunk costs page faults (the allocator
    # returns it to the system on free), ~25 % of the whole run on CPU. The loop body is four torch calls: at
    # ~30 episodes per chunk, per-call overhead is a sizeable share of the run.
    qbuf = Fte.new_empty(step * NQ, D)
    for b_lo in range(0, E, block):
        b_hi = min(E, b_lo + block)
        if equal:
            # embedding_bag sums every class's K rows straight from the table, without materialising them.
            mu = torch.nn.functional.embedding_bag(
                s_sorted[b_lo:b_hi].reshape(-1, NK // ways), Ftr, mode="sum"
            )
            mu = mu.view(b_hi - b_lo, ways, D)
        else:
            S = gather_rows(Ftr, s_sorted[b_lo:b_hi])
            mu = torch.nn.functional.one_hot(ys_sorted[b_lo:b_hi], ways).to(S.dtype).transpose(1, 2) @ S
        # The mean's 1/K does not change a cosine.
        mu_t = mu.div_(torch.linalg.vector_norm(mu, dim=2, keepdim=True).clamp_min_(COS_EPS)).transpose(1, 2)
        for lo in range(b_lo, b_hi, step):
            hi = min(b_hi, lo + step)
            Q = torch.index_select(Fte, 0, q_flat[lo * NQ : hi * NQ], out=qbuf[: (hi - lo) * NQ])
            torch.argmax(bmm(Q.view(hi - lo, NQ, D), mu_t[lo - b_lo : hi - b_lo]), 2, out=pred[lo:hi])
    return (pred == yq).sum(1).double() / NQ


def cosine_patch_scorer(data: PatchData) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """The cosine rule's class sums of unit patch vectors ``[K, D]`` (unnormalised means: only their directions
    matter) and its scorer."""
    sums = None
    for X, y in data.source()():
        if sums is None:
            sums = torch.zeros(len(data.store.classes), X.shape[1] - 1, dtype=data.dtype, device=data.device)
        sums.index_add_(0, y, F.normalize(X[:, :-1], dim=1))
    if sums is None:
        raise RuleError("no labelled training patches (all patch labels are 255); check the training store")
    return sums, lambda X: cosine_scores(X[None], sums[None])[0]


def cosine_support_scores(
    X: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, Xq: torch.Tensor, opts: RuleOptions
) -> tuple[torch.Tensor, int]:
    """The cosine rule with a foreground and a background direction (ignored patches excluded) → cos to the
    foreground direction minus cos to the background one, per query patch."""
    from ..rules.cosine import cosine_directions

    cs = cosine_scores(Xq, cosine_directions(X, y, 2, sample_weight=valid))
    return cs[..., 1] - cs[..., 0], 0


class Cosine(RuleProtocol):
    """The cosine rule's four protocols; what the toolkit knows of it (summary, C, directions, note, colour) is
    its entry in the rule table (``qkvprobe.tables``)."""

    name = "cosine"

    def standard_classification(
        self,
        Xtr: torch.Tensor,
        ytr: np.ndarray,
        Xte: torch.Tensor,
        yte: np.ndarray,
        num_classes: int,
        opts: RuleOptions,
    ) -> list[StandardResult]:
        return cosine_standard(Xtr, ytr, Xte, yte, num_classes)

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
        acc = cosine_fewshot(Ftr, Fte, support, support_labels, query, query_labels, ways)
        return episode_result(acc)

    def segmentation_scorer(self, source: Any, num_classes: int, opts: RuleOptions) -> PatchScorer:
        sums, scores = cosine_patch_scorer(source)
        return PatchScorer(scores, weights=F.normalize(sums, dim=1).float().cpu().numpy())

    def fewshot_segmentation_scores(
        self, X: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, Xq: torch.Tensor, opts: RuleOptions
    ) -> tuple[torch.Tensor, int]:
        return cosine_support_scores(X, y, valid, Xq, opts)
