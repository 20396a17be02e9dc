"""Classification protocols (docs/science.md §2): standard (C chosen on a held-out split, then refit) and
few-shot (N-way K-shot episodes, fixed C), on arrays and on feature stores.

Standard protocol (after DINOv2's log_regression): a stratified ``VAL_FRACTION`` of the training split
(``sklearn.model_selection.train_test_split``, seeded) is held out; the hyperplane rule is fitted on the rest
for every C of ``C_GRID`` (each C an independent fit from W = 0, as a loop over scikit-learn fits, so no C's
solution depends on another's), the C with the best held-out accuracy is kept (ties → the smaller C), and the
rule is refitted on the whole training split with it, warm-started from that C's held-out-split solution. A
row's ``converged`` says whether every one of those fits reached its certified optimum. The cosine rule has no
hyper-parameter and is fitted on the whole training split. All token types that share a feature width, at all
the Cs of a rank, are solved together as one batched problem, each token's features read once per pass for all
its Cs (``rules.logistic.fit_logistic_grid``). Under ``torchrun`` (an initialised process
group) the C grid is split round-robin over the ranks (``shard_for_rank``) and the held-out scores and solutions
are merged with ``all_gather_objects``, so every rank chooses the same C; alone, nothing changes.

Few-shot protocol: every episode's rule is fitted on its support set and scored on its queries; the hyperplane
rule uses ``FEWSHOT_C`` (no validation data exists in a 1-shot episode), or with ``C="auto"`` a C chosen on
validation episodes drawn from the training split alone (``protocols.fewshot_c``, beyond the paper (docs/science.md §5)). Episodes
are solved in batches; the same index arrays are used for every token type and rule, so per-episode accuracies
are paired.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from ..errors import FeatureError, RuleError
from ..features.distributed import all_gather_objects, shard_for_rank
from ..rules import class_normals, hyperplane_scores
from ..rules.batched import bmm
from ..rules.checks import as_features, check_C
from ..rules.cosine import EPS as COS_EPS
from ..rules.cosine import cosine_directions, cosine_scores
from ..rules.knn import KNN_K, KNN_T
from ..rules.logistic import (
    balanced_sample_weight,
    check_class_weight,
    default_dtype,
    fit_logistic,
    fit_logistic_grid,
    solve_span,
    span_expand,
    span_reduce,
)
from .evaluation import C_GRID, FEWSHOT_C, VAL_FRACTION, FewshotResult, RuleOptions, StandardResult
from .metrics import mean_ci95

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
#: Few-shot cosine rule: support rows per block of episodes whose class directions are built at once, and
#: query rows gathered per chunk (kept in L2/L3 cache; smaller chunks pay more per-call overhead).
COSINE_SUPPORT_BYTES = 32 * 1024**2
COSINE_QUERY_BYTES = 3 * 1024**2
#: Byte budget of one standard-protocol batch of token types in the solver's dtype.
STANDARD_BATCH_BYTES = 1024**3


def _as_tensor(x: Any, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Features (numpy, memmap or torch) → ``dtype`` on ``device``. Store arrays are read-only memmaps, which
    torch.as_tensor would wrap with a warning; torch.tensor copies (a cast copies anyway)."""
    if isinstance(x, torch.Tensor):
        return x.to(device, dtype)
    return torch.tensor(np.asarray(x), dtype=dtype, device=device)


def _encode(y_train: np.ndarray, y_test: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    classes, ytr = np.unique(np.asarray(y_train), return_inverse=True)
    if len(classes) < 2:
        raise RuleError(
            f"the training split has a single class ({classes[0].tolist()!r}); classification needs at least 2"
        )
    yte = np.searchsorted(classes, y_test).clip(0, len(classes) - 1)
    unknown = classes[yte] != y_test
    if unknown.any():
        raise RuleError(
            f"test label {y_test[unknown][0].tolist()!r} does not occur in the training split (classes "
            f"{classes.tolist()[:10]}...); evaluate on a split with the training classes"
        )
    return classes, ytr.astype(np.int64), yte.astype(np.int64)


def standard_classification(
    train: Sequence[Any],
    y_train: np.ndarray,
    test: Sequence[Any],
    y_test: np.ndarray,
    *,
    rule: str,
    Cs: Sequence[float] = C_GRID,
    val_fraction: float = VAL_FRACTION,
    seed: int = 0,
    device: str = "cpu",
    max_iter: int | None = None,
    tol: float | None = None,
    class_weight: str | None = None,
    k: int = KNN_K,
    T: float = KNN_T,
) -> list[StandardResult]:
    """Standard protocol for G feature sets sharing labels: ``train[g] [n, D_g]``, ``test[g] [m, D_g]`` →
    one :class:`StandardResult` per feature set (same order), with any registered ``rule``.
    ``class_weight="balanced"`` weighs the hyperplane rule's classes by n / (K · n_k) (scikit-learn's) in the C
    sweep and the refit; None = plain (docs/science.md). ``k``, ``T``: the k-NN rule's."""
    class_weight = check_class_weight(class_weight)
    if len(train) != len(test) or not train:
        raise FeatureError(f"need one test array per train array, got {len(train)} and {len(test)}")
    classes, ytr, yte = _encode(y_train, np.asarray(y_test))
    K = len(classes)
    for g in range(len(train)):
        as_features(train[g], name=f"train features #{g}")
        as_features(test[g], name=f"test features #{g}")
        if train[g].shape[0] != len(ytr) or test[g].shape[0] != len(yte):
            raise FeatureError(
                f"feature set #{g}: {train[g].shape[0]}/{test[g].shape[0]} rows but "
                f"{len(ytr)}/{len(yte)} labels; pass one label per row"
            )
        if test[g].shape[1] != train[g].shape[1]:
            raise FeatureError(
                f"feature set #{g}: test width {test[g].shape[1]} != train width {train[g].shape[1]}; "
                "use the same token/block/model for both splits"
            )
    from .registry import get_rule

    impl = get_rule(rule)
    opts = RuleOptions(
        device=device,
        seed=seed,
        Cs=tuple(Cs),
        val_fraction=val_fraction,
        class_weight=class_weight,
        max_iter=max_iter,
        tol=tol,
        k=k,
        T=T,
    )
    impl.check(opts)
    dev, dt = torch.device(device), default_dtype(device)
    results: list[StandardResult | None] = [None] * len(train)
    # Group feature sets of equal width into batches that fit STANDARD_BATCH_BYTES.
    groups: dict[int, list[int]] = {}
    for g, X in enumerate(train):
        groups.setdefault(X.shape[1], []).append(g)
    for width, members in groups.items():  # whole token types and per-head ones differ in width
        per_set_bytes = len(ytr) * (width + 1) * torch.finfo(dt).bits // 8
        batch = max(1, STANDARD_BATCH_BYTES // max(per_set_bytes, 1))
        for lo in range(0, len(members), batch):
            ids = members[lo : lo + batch]
            Xtr = torch.stack([_as_tensor(train[g], dev, dt) for g in ids])
            Xte = torch.stack([_as_tensor(test[g], dev, dt) for g in ids])
            for g, res in zip(ids, impl.standard_classification(Xtr, ytr, Xte, yte, K, opts), strict=True):
                res.predictions = classes[res.predictions]
                results[g] = res
    return cast(list[StandardResult], results)  # every feature set is in one width group: no slot left None


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


def _check_episodes(
    support: np.ndarray,
    support_labels: np.ndarray,
    query: np.ndarray,
    query_labels: np.ndarray,
    num_train: int,
    num_test: int,
) -> None:
    if support.ndim != 2 or query.ndim != 2 or support.shape[0] != query.shape[0]:
        raise RuleError(
            f"episode arrays must be [E, N*K] and [E, N*Q] with the same E, got {support.shape} "
            f"and {query.shape}; use qkvprobe.data.episodes.sample_classification_episodes"
        )
    if support.shape[0] == 0 or support.shape[1] == 0 or query.shape[1] == 0:
        raise RuleError(
            f"empty episode: support {support.shape}, query {query.shape}; "
            "sample episodes with shots >= 1 and queries >= 1"
        )
    if support_labels.shape != support.shape or query_labels.shape != query.shape:
        raise RuleError(
            f"labels {support_labels.shape}/{query_labels.shape} do not match indices "
            f"{support.shape}/{query.shape}; pass one label per index"
        )
    if support.min() < 0 or support.max() >= num_train or query.min() < 0 or query.max() >= num_test:
        raise RuleError(
            f"episode indices out of range (train has {num_train} rows, test {num_test}); "
            "sample episodes from these stores' labels"
        )
    ways = int(support_labels.max()) + 1
    if ways < 2 or support_labels.min() < 0 or query_labels.min() < 0 or query_labels.max() >= ways:
        raise RuleError(
            f"episode labels must lie in 0..N-1 with N >= 2 ways, got support labels in "
            f"[{support_labels.min()}, {support_labels.max()}] and query labels in "
            f"[{query_labels.min()}, {query_labels.max()}]"
        )


def fewshot_classification(
    train_features: Any,
    test_features: Any,
    classes: np.ndarray | None,
    support: np.ndarray,
    support_labels: np.ndarray,
    query: np.ndarray,
    query_labels: np.ndarray,
    *,
    rule: str,
    C: float = FEWSHOT_C,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    max_iter: int | None = None,
    tol: float | None = None,
    k: int = KNN_K,
    T: float = KNN_T,
) -> FewshotResult:
    """Few-shot protocol on index arrays (``qkvprobe.data.episodes`` layout): ``train_features [Ntr, D]``,
    ``test_features [Nte, D]``, ``support/support_labels [E, N·K]``, ``query/query_labels [E, N·Q]``
    (``classes [E, N]`` is informational), with any registered ``rule``. Returns per-episode accuracies
    ``[E]``, mean and CI."""
    from .registry import get_rule

    impl = get_rule(rule)
    support, support_labels = np.asarray(support, np.int64), np.asarray(support_labels, np.int64)
    query, query_labels = np.asarray(query, np.int64), np.asarray(query_labels, np.int64)
    _check_episodes(support, support_labels, query, query_labels, len(train_features), len(test_features))
    opts = RuleOptions(
        device=device, C=check_C(C) if impl.has_C else FEWSHOT_C, max_iter=max_iter, tol=tol, k=k, T=T
    )
    impl.check(opts)
    as_features(train_features, name="train features")
    as_features(test_features, name="test features")
    if train_features.shape[1] != test_features.shape[1]:
        raise FeatureError(
            f"test features have width {test_features.shape[1]} but train features "
            f"{train_features.shape[1]}; use the same token/block/model for both"
        )
    dev = torch.device(device)
    # Features are gathered and projected in float32 (CPU and GPU): only argmaxes of scores depend on them,
    # and the hyperplane's reduced n×n problems are formed in float64 anyway (rules.logistic.span_reduce).
    dt = dtype or torch.float32
    Ftr = _as_tensor(train_features, dev, dt)
    Fte = _as_tensor(test_features, dev, dt)
    ways = int(support_labels.max()) + 1
    s_idx, q_idx = torch.as_tensor(support, device=dev), torch.as_tensor(query, device=dev)
    ys, yq = torch.as_tensor(support_labels, device=dev), torch.as_tensor(query_labels, device=dev)
    return impl.fewshot_classification(Ftr, Fte, s_idx, ys, q_idx, yq, ways, opts)


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


def episode_result(acc: torch.Tensor) -> FewshotResult:
    """Per-episode accuracies ``[E]`` → :class:`FewshotResult` (mean and 95 % half-width)."""
    values = acc.cpu().numpy()
    mean, ci = mean_ci95(values)
    return FewshotResult(values, mean, ci)


def _solve_episodes(
    X: torch.Tensor, y: torch.Tensor, ways: int, C: float, opts: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Span-reduced episode problems ``X [E, n, n]`` → (``W [E, n+1, Kf]``, converged ``[E]``), solved in X's dtype
    (float32) with a float64 finish where float32 rounding keeps an episode from its certified optimum."""
    C_t = torch.full((len(X),), C, dtype=X.dtype, device=X.device)
    W, res = solve_span(X, y, ways, C_t, torch.ones_like(X[..., 0]), **opts)
    return W, res.converged


def gather_rows(F: torch.Tensor, idx: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``F[idx]`` for ``idx [E, m]`` → ``[E, m, D]``; index_select on the flat indices is several times faster
    than advanced indexing on CPU. ``out``: a ``[≥ E·m, D]`` buffer to gather into (reused across chunks)."""
    if out is None:
        return F.index_select(0, idx.reshape(-1)).view(*idx.shape, F.shape[1])
    return torch.index_select(F, 0, idx.reshape(-1), out=out[: idx.numel()]).view(*idx.shape, F.shape[1])


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
