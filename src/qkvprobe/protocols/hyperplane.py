"""The hyperplane rule's protocols, all in one module: multinomial L2 logistic regression on raw features
(docs/science.md §2) in the standard and few-shot classification protocols and the segmentation ones.

Standard classification (after DINOv2's log_regression): a stratified ``VAL_FRACTION`` of the training split
(``sklearn.model_selection.train_test_split``, seeded) is held out; the rule is fitted on the rest for every C of
the grid (each C an independent fit from W = 0, as a loop over scikit-learn fits, so no C's solution depends on
another's), the C with the best held-out accuracy is kept (ties → the smaller C), and the rule is refitted on the
whole training split with it, warm-started from that C's held-out-split solution. A row's ``converged`` says
whether every one of those fits reached its certified optimum. All token types that share a feature width, at
all the Cs of a rank, are solved together as one batched problem (``rules.logistic.fit_logistic_grid``). Under
``torchrun`` (an initialised process group) the C grid is split round-robin over the ranks (``shard_for_rank``)
and the held-out scores and solutions merged with ``all_gather_objects``, so every rank chooses the same C.

Few-shot classification: span-reduced episode problems solved in batches, in float32, re-certified in float64.
Segmentation: the streamed objective over patch chunks (``protocols.segmentation`` explains the memory bound),
C chosen by held-out patch mIoU; few-shot segmentation: a binary fit on each episode's support patches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, cast

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from ..errors import RuleError
from ..features.distributed import all_gather_objects, shard_for_rank
from ..rules import class_normals, hyperplane_scores
from ..rules.checks import check_C
from ..rules.logistic import (
    DEFAULT_MAX_ITER,
    DEFAULT_TOL,
    StreamedLogistic,
    augment,
    balanced_sample_weight,
    fit_logistic,
    fit_logistic_grid,
    grid_step,
    num_logits,
    solve,
    solve_span,
    span_expand,
    span_reduce,
)
from .classification import gather_rows
from .evaluation import FewshotResult, RuleOptions, StandardResult
from .metrics import ConfusionMatrix, mean_ci95, mean_iou
from .registry import PatchScorer, RuleProtocol
from .segmentation import CHUNK_ROWS, PatchData, PatchSource

#: dtype of the few-shot hyperplane's span-reduced solves (CPU and accelerators): float32 halves their memory
#: traffic; an episode float32 rounding keeps from its certified optimum is finished in float64
#: (``rules.logistic.solve_span``).
FEWSHOT_SOLVE_DTYPE = torch.float32


#: Basis of the few-shot hyperplane's span-reduced problems (``rules.logistic.span_reduce``): Cholesky factors
#: cost several times less than eigendecompositions for 25×25 Gram matrices (``bench_rules.py kernels``).
FEWSHOT_BASIS = "cholesky"


#: Episodes whose reduced problems are solved in one batched L-BFGS.
EPISODE_BATCH = 2000


#: Episodes gathered at a time (their support/query features stay in cache).
CACHE_EPISODES = 32


def hyperplane_standard(
    Xtr: torch.Tensor,
    ytr: np.ndarray,
    Xte: torch.Tensor,
    yte: np.ndarray,
    K: int,
    opts: RuleOptions,
) -> list[StandardResult]:
    """The hyperplane rule on G feature sets of one width: C from the grid on a stratified held-out split, then
    the refit on all training rows (module doc); predictions as codes."""
    G, dev = Xtr.shape[0], Xtr.device
    y_all = torch.as_tensor(ytr, device=dev).expand(G, -1)
    Cs = sorted(check_C(C) for C in opts.Cs)
    if not Cs:
        raise RuleError("the C grid is empty; pass at least one C value")
    solver = opts.solver()
    val_fraction = opts.val_fraction
    num_val = math.ceil(val_fraction * len(ytr))
    counts = np.bincount(ytr)
    if num_val < K or counts.min() < 2:
        # sklearn's own message for this case is a multi-line ValueError about test_size; say what to change.
        raise RuleError(
            f"the stratified {val_fraction:.0%} held-out split of {len(ytr)} training samples cannot hold all {K} "
            f"classes (held out: {num_val}, smallest class: {counts.min()} samples); use more training samples "
            f"(at least {math.ceil(K / val_fraction)} and 2 per class)"
        )
    fit_idx, val_idx = train_test_split(
        np.arange(len(ytr)), test_size=val_fraction, stratify=ytr, random_state=opts.seed
    )
    fit_idx, val_idx = (
        torch.as_tensor(np.sort(fit_idx), device=dev),
        torch.as_tensor(np.sort(val_idx), device=dev),
    )
    balanced = opts.class_weight == "balanced"
    # Under torchrun (an initialised process group) every rank sweeps its round-robin share of the grid and the
    # shares are merged: all ranks then hold the whole sweep and make the same choice. Alone: the whole grid.
    if _group_size() > 1:
        parts = all_gather_objects(
            _c_sweep(Xtr, y_all, fit_idx, val_idx, K, shard_for_rank(Cs), solver, balanced)
        )
    else:
        parts = [_c_sweep(Xtr, y_all, fit_idx, val_idx, K, Cs, solver, balanced)]
    sweep = sorted(
        (
            (C, part["val"][:, j], part["coef"][j], part["intercept"][j])
            for part in parts
            for j, C in enumerate(part["Cs"])
        ),
        key=lambda item: item[0],
    )
    # [G]: numpy's stubs type an axis reduction as possibly a scalar; of a 2-d array it is 1-d.
    sweep_ok = cast(np.ndarray, np.concatenate([part["converged"] for part in parts], 1).all(1))
    val_acc = torch.as_tensor(np.stack([v for _, v, _, _ in sweep], 1))  # [G, len(Cs)]
    best = val_acc.argmax(1)  # first maximum = smallest C among ties
    coef0 = torch.stack([sweep[int(j)][2][g] for g, j in enumerate(best)]).to(dev)
    b0 = torch.stack([sweep[int(j)][3][g] for g, j in enumerate(best)]).to(dev)
    C_best = torch.tensor([Cs[int(j)] for j in best], dtype=Xtr.dtype, device=dev)
    refit = fit_logistic(
        Xtr,
        y_all,
        K,
        C_best,
        coef_init=coef0,
        intercept_init=b0,
        reduce=False,
        sample_weight=_balanced(y_all, K, balanced, Xtr),
        **solver,
    )
    pred = hyperplane_scores(Xte, refit.coef, refit.intercept).argmax(2).cpu().numpy()
    va = val_acc.cpu().numpy()
    weights = class_normals(refit.coef).float().cpu().numpy()
    refit_ok = refit.converged.cpu().numpy()
    return [
        StandardResult(
            float(np.mean(pred[g] == yte)),
            Cs[int(best[g])],
            dict(zip(Cs, va[g].tolist(), strict=True)),
            pred[g],
            weights[g],
            bool(sweep_ok[g] and refit_ok[g]),
        )
        for g in range(G)
    ]


def _group_size() -> int:
    """World size of an initialised process group; 1 without one (env vars alone do not spread the sweep)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _balanced(y: torch.Tensor, K: int, balanced: bool, like: torch.Tensor) -> torch.Tensor | None:
    """Sample weights ``[G, n]`` of ``class_weight="balanced"`` (None when not balanced)."""
    if not balanced:
        return None
    return balanced_sample_weight(y, torch.ones(y.shape, dtype=like.dtype, device=like.device), K)


def _c_sweep(
    Xtr: torch.Tensor,
    y_all: torch.Tensor,
    fit_idx: torch.Tensor,
    val_idx: torch.Tensor,
    K: int,
    Cs: Sequence[float],
    opts: dict[str, Any],
    balanced: bool = False,
) -> dict[str, Any]:
    """Independent fits for ``Cs`` (ascending) on the fit rows → held-out accuracy ``val [G, len(Cs)]`` and the
    solutions (on the CPU, so they can be gathered from other ranks)."""
    G = Xtr.shape[0]
    if not Cs:  # more ranks than C values
        return {
            "Cs": [],
            "val": np.zeros((G, 0)),
            "coef": [],
            "intercept": [],
            "converged": np.ones((G, 0), bool),
        }
    y_fit = y_all[:, fit_idx]
    grid = fit_logistic_grid(
        Xtr[:, fit_idx], y_fit, K, Cs, sample_weight=_balanced(y_fit, K, balanced, Xtr), **opts
    )  # independent fits: see the module doc
    yval = y_all[:, val_idx]
    val = torch.stack(
        [
            (hyperplane_scores(Xtr[:, val_idx], f.coef, f.intercept).argmax(2) == yval).double().mean(1)
            for f in grid
        ],
        1,
    )
    return {
        "Cs": list(Cs),
        "val": val.cpu().numpy(),
        "coef": [f.coef.cpu() for f in grid],
        "intercept": [f.intercept.cpu() for f in grid],
        "converged": torch.stack([f.converged for f in grid], 1).cpu().numpy(),
    }


def hyperplane_fewshot(
    Ftr: torch.Tensor,
    Fte: torch.Tensor,
    s_idx: torch.Tensor,
    ys: torch.Tensor,
    q_idx: torch.Tensor,
    yq: torch.Tensor,
    ways: int,
    opts: RuleOptions,
) -> FewshotResult:
    """The hyperplane rule's episodes: span-reduced problems solved in batches of ``EPISODE_BATCH`` episodes."""
    E, batch = len(s_idx), EPISODE_BATCH
    acc = np.empty(E)
    unconverged = 0
    solver = opts.solver()
    # Gathered episode features are touched in cache-sized slices of `CACHE_EPISODES` (gathering all queries
    # of 10 000 episodes at once would write ~1 GB); the L-BFGS runs on all reduced problems of a batch. Gather
    # buffers are reused by every slice: a fresh multi-MB tensor per slice costs page faults on CPU.
    sbuf = Ftr.new_empty(CACHE_EPISODES * s_idx.shape[1], Ftr.shape[1])
    qbuf = Fte.new_empty(CACHE_EPISODES * q_idx.shape[1], Fte.shape[1])
    for lo in range(0, E, batch):
        hi = min(E, lo + batch)
        slices = [slice(a, min(hi, a + CACHE_EPISODES)) for a in range(lo, hi, CACHE_EPISODES)]
        reds = [
            span_reduce(
                gather_rows(Ftr, s_idx[sl], out=sbuf),
                None,
                FEWSHOT_SOLVE_DTYPE,
                overwrite=True,
                basis=FEWSHOT_BASIS,
            )
            for sl in slices
        ]
        W, ok = _solve_episodes(torch.cat([r.X for r in reds]), ys[lo:hi], ways, opts.C, solver)
        unconverged += int((~ok).sum())
        for sl, r in zip(slices, reds, strict=True):
            part = slice(sl.start - lo, sl.stop - lo)
            coef, intercept = span_expand(r, gather_rows(Ftr, s_idx[sl], out=sbuf), None, W[part])
            scores = hyperplane_scores(gather_rows(Fte, q_idx[sl], out=qbuf), coef, intercept)
            acc[sl] = (scores.argmax(2) == yq[sl]).to(torch.float64).mean(1).cpu().numpy()
    mean, ci = mean_ci95(acc)
    return FewshotResult(acc, mean, ci, unconverged)


def _solve_episodes(
    X: torch.Tensor, y: torch.Tensor, ways: int, C: float, opts: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Span-reduced episode problems ``X [E, n, n]`` → (``W [E, n+1, Kf]``, converged ``[E]``), solved in X's dtype
    (float32) with a float64 finish where float32 rounding keeps an episode from its certified optimum."""
    C_t = torch.full((len(X),), C, dtype=X.dtype, device=X.device)
    W, res = solve_span(X, y, ways, C_t, torch.ones_like(X[..., 0]), **opts)
    return W, res.converged


def _fit_streaming(
    source: PatchSource,
    num_classes: int,
    Cs: Sequence[float],
    W0: torch.Tensor | None,
    moment: torch.Tensor,
    max_iter: int,
    tol: float,
    class_weight: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent fits of every C of ``Cs`` from W = 0 (or one C from ``W0``) → (``[len(Cs), (D+1)·Kf]``,
    converged ``[len(Cs)]``)."""
    kf = num_logits(num_classes)
    class_w = source.balanced_weights(num_classes) if class_weight == "balanced" else None
    step = grid_step(len(Cs), 1, moment.shape[-1] * kf, CHUNK_ROWS, kf, moment.dtype, moment.device)
    out, converged = [], []
    for lo in range(0, len(Cs), step):
        part = list(Cs[lo : lo + step])
        objective = StreamedLogistic(source, source.num_rows, num_classes, part, moment, class_w, start=W0)
        w0 = (
            torch.zeros(len(part), moment.shape[-1] * kf, dtype=moment.dtype, device=moment.device)
            if W0 is None
            else W0
        )
        # A C that has finished leaves the batch (its columns); the chunks are still read once per pass.
        res = solve(objective, w0, max_iter=max_iter, tol=tol)
        out.append(res.w)
        converged.append(res.converged)
    return torch.cat(out), torch.cat(converged)


def linear_scores(W: torch.Tensor, num_classes: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Patch scores of a hyperplane ``W [D+1, Kf]``: ``X [m, D]`` → ``[m, K]`` (K = 2: ``(0, s)``)."""

    def scores(X: torch.Tensor) -> torch.Tensor:
        s = augment(X) @ W
        return torch.cat([torch.zeros_like(s), s], 1) if num_classes == 2 else s

    return scores


def hyperplane_patch_fit(
    data: PatchData, num_classes: int, opts: RuleOptions
) -> tuple[torch.Tensor, float, dict[float, float], bool]:
    """The hyperplane rule on patches: every C of the grid from W = 0 on the fit images (one batch), C chosen by
    patch mIoU on the held-out images (ties → the smaller C), refit on all images from that C's solution →
    (W ``[D+1, Kf]``, chosen C, held-out mIoU per C, converged)."""

    Cs = sorted(check_C(C) for C in opts.Cs)
    if not Cs:
        raise RuleError("the C grid is empty; pass at least one C value")
    max_iter = opts.max_iter or DEFAULT_MAX_ITER
    tol = opts.tol or DEFAULT_TOL
    n = len(data.labels)
    perm = np.random.default_rng(opts.seed).permutation(n)
    num_val = max(1, round(opts.val_fraction * n)) if n > 1 else 0
    val_rows, fit_rows = np.sort(perm[:num_val]), np.sort(perm[num_val:])
    fit_src, val_src = data.source(fit_rows), data.source(val_rows)
    moment = fit_src.moment()
    val: dict[float, float] = {}
    best: tuple[float, float | None, torch.Tensor | None] = (-1.0, None, None)
    # Every C an independent fit from W = 0, all Cs in one batch (one read of the patches per iteration).
    sweep, sweep_ok = _fit_streaming(fit_src, num_classes, Cs, None, moment, max_iter, tol, opts.class_weight)
    for C, W in zip(Cs, torch.split(sweep, 1), strict=True):
        score = linear_scores(W.view(moment.shape[-1], -1), num_classes)
        cm = ConfusionMatrix(num_classes)
        for X, y in val_src():
            cm.update(score(X[:, :-1]).argmax(1).cpu(), y.cpu())
        val[C] = mean_iou(cm.matrix)
        if val[C] > best[0]:  # ascending Cs, strict: ties keep the smaller C
            best = (val[C], C, W)
    del fit_src, val_src  # drop their cached patches before caching the full training set
    best_C = best[1]
    assert best_C is not None  # mean_iou is never below 0, so the first C already replaced the -1.0 start
    W, refit_ok = _fit_streaming(
        data.source(), num_classes, [best_C], best[2], moment, max_iter, tol, opts.class_weight
    )
    return W.view(moment.shape[-1], -1), best_C, val, bool(sweep_ok.all()) and bool(refit_ok.all())


def hyperplane_support_scores(
    X: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, Xq: torch.Tensor, opts: RuleOptions
) -> tuple[torch.Tensor, int]:
    """The binary hyperplane rule on support patches ``X [e, n, D]`` (``y`` 1 = foreground, ``valid`` 0 for
    ignored patches) → foreground logits of the query patches ``Xq [e, m, D]`` and the unconverged count."""
    from ..rules.logistic import fit_logistic

    sw = balanced_sample_weight(y, valid, 2) if opts.class_weight == "balanced" else valid
    fit = fit_logistic(X, y, 2, opts.C, sample_weight=sw, **opts.solver())
    return (Xq @ fit.coef.transpose(1, 2))[..., 0] + fit.intercept, int((~fit.converged).sum())


class Hyperplane(RuleProtocol):
    """The hyperplane rule's four protocols; what the toolkit knows of it (summary, C, directions, note, colour) is
    its entry in the rule table (``qkvprobe.tables``)."""

    name = "hyperplane"

    def standard_classification(
        self,
        Xtr: torch.Tensor,
        ytr: np.ndarray,
        Xte: torch.Tensor,
        yte: np.ndarray,
        num_classes: int,
        opts: RuleOptions,
    ) -> list[StandardResult]:
        return hyperplane_standard(Xtr, ytr, Xte, yte, num_classes, opts)

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
        return hyperplane_fewshot(Ftr, Fte, support, support_labels, query, query_labels, ways, opts)

    def segmentation_scorer(self, source: Any, num_classes: int, opts: RuleOptions) -> PatchScorer:
        W, C, val, converged = hyperplane_patch_fit(source, num_classes, opts)
        weights = class_normals(W[:-1].T).float().cpu().numpy()
        return PatchScorer(linear_scores(W, num_classes), C, val, weights, converged)

    def fewshot_segmentation_scores(
        self, X: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, Xq: torch.Tensor, opts: RuleOptions
    ) -> tuple[torch.Tensor, int]:
        return hyperplane_support_scores(X, y, valid, Xq, opts)
