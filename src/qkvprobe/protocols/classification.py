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

from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import torch

from ..errors import FeatureError, RuleError
from ..rules.checks import as_features, check_C
from ..rules.knn import KNN_K, KNN_T
from ..rules.logistic import (
    check_class_weight,
    default_dtype,
)
from ..tables import rule_entry
from .evaluation import C_GRID, FEWSHOT_C, VAL_FRACTION, FewshotResult, RuleOptions, StandardResult
from .metrics import mean_ci95
from .registry import RuleProtocol, get_rule

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
    return run_standard_classification(train, y_train, test, y_test, get_rule(rule), opts)


def run_standard_classification(
    train: Sequence[Any],
    y_train: np.ndarray,
    test: Sequence[Any],
    y_test: np.ndarray,
    impl: RuleProtocol,
    opts: RuleOptions,
) -> list[StandardResult]:
    """:func:`standard_classification` with the rule's protocols and options as the driver holds them."""
    if len(train) != len(test) or not train:
        raise FeatureError(f"need one test array per train array, got {len(train)} and {len(test)}")
    classes, ytr, yte = _encode(y_train, np.asarray(y_test))
    K = len(classes)
    _check_sets(train, test, ytr, yte)
    impl.check(opts)
    dev, dt = torch.device(opts.device), default_dtype(opts.device)
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


def _check_sets(train: Sequence[Any], test: Sequence[Any], ytr: np.ndarray, yte: np.ndarray) -> None:
    """Every feature set is a finite 2-d array with one row per label and the same width in both splits."""
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
    impl = get_rule(rule)
    opts = RuleOptions(
        device=device,
        C=check_C(C) if rule_entry(rule).has_C else FEWSHOT_C,
        max_iter=max_iter,
        tol=tol,
        k=k,
        T=T,
    )
    return run_fewshot_classification(
        train_features, test_features, support, support_labels, query, query_labels, impl, opts, dtype=dtype
    )


def run_fewshot_classification(
    train_features: Any,
    test_features: Any,
    support: np.ndarray,
    support_labels: np.ndarray,
    query: np.ndarray,
    query_labels: np.ndarray,
    impl: RuleProtocol,
    opts: RuleOptions,
    *,
    dtype: torch.dtype | None = None,
) -> FewshotResult:
    """:func:`fewshot_classification` with the rule's protocols and options as the driver holds them."""
    support, support_labels = np.asarray(support, np.int64), np.asarray(support_labels, np.int64)
    query, query_labels = np.asarray(query, np.int64), np.asarray(query_labels, np.int64)
    _check_episodes(support, support_labels, query, query_labels, len(train_features), len(test_features))
    impl.check(opts)
    as_features(train_features, name="train features")
    as_features(test_features, name="test features")
    if train_features.shape[1] != test_features.shape[1]:
        raise FeatureError(
            f"test features have width {test_features.shape[1]} but train features "
            f"{train_features.shape[1]}; use the same token/block/model for both"
        )
    dev = torch.device(opts.device)
    # Features are gathered and projected in float32 (CPU and GPU): only argmaxes of scores depend on them,
    # and the hyperplane's reduced n×n problems are formed in float64 anyway (rules.logistic.span_reduce).
    dt = dtype or torch.float32
    Ftr = _as_tensor(train_features, dev, dt)
    Fte = _as_tensor(test_features, dev, dt)
    ways = int(support_labels.max()) + 1
    s_idx, q_idx = torch.as_tensor(support, device=dev), torch.as_tensor(query, device=dev)
    ys, yq = torch.as_tensor(support_labels, device=dev), torch.as_tensor(query_labels, device=dev)
    return impl.fewshot_classification(Ftr, Fte, s_idx, ys, q_idx, yq, ways, opts)


def episode_result(acc: torch.Tensor) -> FewshotResult:
    """Per-episode accuracies ``[E]`` → :class:`FewshotResult` (mean and 95 % half-width)."""
    values = acc.cpu().numpy()
    mean, ci = mean_ci95(values)
    return FewshotResult(values, mean, ci)


def gather_rows(F: torch.Tensor, idx: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``F[idx]`` for ``idx [E, m]`` → ``[E, m, D]``; index_select on the flat indices is several times faster
    than advanced indexing on CPU. ``out``: a ``[≥ E·m, D]`` buffer to gather into (reused across chunks)."""
    if out is None:
        return F.index_select(0, idx.reshape(-1)).view(*idx.shape, F.shape[1])
    return torch.index_select(F, 0, idx.reshape(-1), out=out[: idx.numel()]).view(*idx.shape, F.shape[1])
