"""Segmentation protocols (docs/science.md §2) with bounded memory.

Standard: training label of a patch = its majority pixel label (patches labelled 255 are skipped). The
cosine rule needs one streaming pass (per-class sums of unit vectors). The hyperplane rule is full-batch
L-BFGS (:mod:`qkvprobe.rules.lbfgs`) on the exact objective, whose loss and gradient are accumulated over
chunks of ``CHUNK_ROWS`` patches: if the labelled training patches fit ``MEMORY_BUDGET_BYTES`` (in the
solver's dtype) they are converted once and kept in RAM, otherwise every evaluation re-reads the store
shard by shard, so memory stays at one chunk + the label matrix + ``[D+1, K]`` parameters whatever the
store size. C is chosen from ``C_GRID`` (each C an independent fit from W = 0; see ``protocols.classification``
for why not warm-started from the previous C; all Cs are one batch, so each pass reads the patches once for all
of them) by patch-level mIoU on the patches of a seeded ``VAL_FRACTION`` of
the training images, then the rule is refitted on all training images, warm-started from that C's solution.
At ADE20K / ViT-B / 512 px scale (~20 M patches × 768, fp16 ≈ 30 GB) one evaluation is one pass over
the store (~2·20M·769·150 ≈ 4.6 TFLOP of matmul plus the read); with ~20–50 L-BFGS iterations per C
expect hours on CPU, minutes on a GPU: pass ``device="cuda"``.
Scoring: per-patch scores ``[K, h, w]`` → bilinear upsampling (align_corners=False) to the mask's
``H × W`` → argmax → a dataset-level confusion matrix (ignore 255) → mIoU and pixel accuracy.

``class_weight="balanced"`` (default ``CLASS_WEIGHT`` = None) weighs the hyperplane rule's patches by
n / (K · n_class), as scikit-learn; the cosine rule's class means do not depend on class counts.

Few-shot (1-way K-shot): per episode, support patches are labelled foreground (majority = class c),
background (any other label) or ignored (255); the binary hyperplane rule (``FEWSHOT_C``; ``C="auto"``
chooses it on training-split episodes, see ``protocols.fewshot_c``) or the cosine rule with a foreground and a
background direction is fitted on them and predicts the query's binary mask at full resolution. Foreground
IoU per class accumulated over its episodes → mIoU; FB-IoU from a 2×2 confusion matrix accumulated over all
episodes. A support set without foreground (or background) patches predicts
background (foreground) everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import FeatureError, RuleError
from ..rules.checks import check_C
from ..rules.knn import KNN_K, KNN_T
from ..rules.logistic import (
    PRECOND_ROWS,
    augment,
    balanced_class_weights,
    check_class_weight,
    default_dtype,
)
from ..tables import rule_entry
from ..vocab import IGNORE_INDEX
from .evaluation import (
    C_GRID,
    FEWSHOT_C,
    VAL_FRACTION,
    FewshotSegmentationResult,
    RuleOptions,
    SegmentationResult,
)
from .metrics import ConfusionMatrix, fb_iou, fewshot_miou, mean_ci95
from .registry import RuleProtocol, get_rule

#: Patches per compute chunk of the streaming solver and of scoring.
CHUNK_ROWS = 65_536
#: Labelled training patches are kept in RAM (solver dtype) only below this size; else streamed per pass.
MEMORY_BUDGET_BYTES = 512 * 1024**2
#: Bytes of gathered support features per few-shot batch of episodes.
EPISODE_BATCH_BYTES = 256 * 1024**2
#: Class weighting of the hyperplane rule: None = plain logistic regression (the paper's); "balanced" weighs each
#: class by n / (K · n_k), as scikit-learn. Few-shot supports are mostly background (on the Scenes, ~74 % of the
#: patches), and at a fixed C the plain fit then under-predicts the foreground; see the README's "Class weights".
CLASS_WEIGHT: str | None = None

Masks = Callable[[int], np.ndarray]


class PatchSource:
    """Labelled patches of a subset of a store's images as ``(X [m, D+1] augmented, y [m])`` chunks."""

    def __init__(
        self,
        store: Any,
        token: str,
        block: int,
        rows: np.ndarray,
        patch_labels: np.ndarray,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.store, self.token, self.block, self.dtype, self.device = store, token, block, dtype, device
        self.in_subset = np.zeros(len(patch_labels), dtype=bool)
        self.in_subset[rows] = True
        self.patch_labels = patch_labels
        self.num_rows = int(((patch_labels != IGNORE_INDEX) & self.in_subset[:, None]).sum())
        D = int(store.embed_dim) if hasattr(store, "embed_dim") else None
        self.cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        if D is not None and self.num_rows * (D + 1) * torch.finfo(dtype).bits // 8 <= MEMORY_BUDGET_BYTES:
            self.cache = list(self._read())

    def _read(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        hw = self.patch_labels.shape[1]
        images_per_chunk = max(1, CHUNK_ROWS // hw)
        for start, array in self.store.iter_chunks(
            self.token, "patch", self.block, chunk_size=images_per_chunk
        ):
            stop = start + len(array)
            labels = self.patch_labels[start:stop]
            keep = (labels != IGNORE_INDEX) & self.in_subset[start:stop, None]
            if not keep.any():
                continue
            X = np.asarray(array)[keep]  # [m, D] copy of the labelled patches only
            if not np.isfinite(X).all():
                raise FeatureError(
                    f"patch features of images {start}..{stop - 1} contain NaN/Inf; re-extract them"
                )
            yield (
                augment(torch.as_tensor(X).to(self.device, self.dtype)),
                torch.as_tensor(labels[keep], device=self.device),
            )

    def __call__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self.cache) if self.cache is not None else self._read()

    def balanced_weights(self, num_classes: int) -> torch.Tensor:
        """scikit-learn's "balanced" class weights of the labelled patches ``[K]`` (absent classes: 0)."""
        labels = self.patch_labels[self.in_subset]
        counts = np.bincount(labels[labels != IGNORE_INDEX].ravel(), minlength=num_classes)[:num_classes]
        return balanced_class_weights(torch.as_tensor(counts, dtype=self.dtype, device=self.device))

    def moment(self) -> torch.Tensor:
        """Second moments of the first ``PRECOND_ROWS`` patches (preconditioner) ``[1, D+1, D+1]``."""
        acc, count = None, 0
        for X, _ in self():
            part = X[: PRECOND_ROWS - count]
            acc = part.T @ part if acc is None else acc + part.T @ part
            count += len(part)
            if count >= PRECOND_ROWS:
                break
        if acc is None:
            raise RuleError(
                "no labelled training patches (all patch labels are 255); check the training store"
            )
        return (acc / count)[None]


@dataclass
class PatchData:
    """The labelled training patches of one token and block of a store: what a rule fits a segmentation scorer on.
    ``source(rows)`` streams the patches of the images ``rows`` (all images by default) as augmented chunks."""

    store: Any
    token: str
    block: int
    labels: np.ndarray  # [N, h·w] majority labels, 255 = ignore
    dtype: torch.dtype
    device: torch.device

    def source(self, rows: np.ndarray | None = None) -> PatchSource:
        rows = np.arange(len(self.labels)) if rows is None else rows
        return PatchSource(self.store, self.token, self.block, rows, self.labels, self.dtype, self.device)

    def class_counts(self) -> np.ndarray:
        """Labelled patches per class ``[K]`` of the whole training split."""
        lab = self.labels[self.labels != IGNORE_INDEX]
        return np.bincount(lab.ravel(), minlength=len(self.store.classes))[: len(self.store.classes)]


def upsample_argmax(scores: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Patch scores ``[h·w, K]`` → bilinear (align_corners=False) to ``size`` → argmax ``[H, W]`` int64."""
    s = scores.T.reshape(1, -1, *grid)
    return F.interpolate(s, size=size, mode="bilinear", align_corners=False)[0].argmax(0)


def score_store(
    store: Any,
    token: str,
    block: int,
    scores_of: Callable[[torch.Tensor], torch.Tensor],
    num_classes: int,
    masks: Masks,
    dtype: torch.dtype,
    device: torch.device,
) -> ConfusionMatrix:
    """Stream a store's images, score their patches (``scores_of(X [m, D]) → [m, K]``), predict full-resolution
    masks and accumulate a confusion matrix."""
    cm = ConfusionMatrix(num_classes)
    indices = store.indices()
    hw = store.grid[0] * store.grid[1]
    for start, array in store.iter_chunks(token, "patch", block, chunk_size=max(1, CHUNK_ROWS // hw)):
        X = torch.as_tensor(np.array(array)).to(device, dtype)  # [b, h·w, D]; copy: memmaps are read-only
        if not bool(torch.isfinite(X).all()):
            raise FeatureError(
                f"patch features of evaluation images {start}..{start + len(X) - 1} contain NaN/Inf; re-extract them"
            )
        scores = scores_of(X.reshape(-1, X.shape[-1])).reshape(len(X), hw, -1)
        for j in range(len(X)):
            mask = torch.as_tensor(np.asarray(masks(int(indices[start + j]))))
            pred = upsample_argmax(scores[j], store.grid, cast(tuple[int, int], tuple(mask.shape)))  # [H, W]
            cm.update(pred.cpu(), mask)
    return cm


def standard_segmentation(
    train_store: Any,
    test_store: Any,
    *,
    token: str,
    block: int = -1,
    rule: str,
    masks: Masks,
    Cs: Sequence[float] = C_GRID,
    val_fraction: float = VAL_FRACTION,
    seed: int = 0,
    device: str = "cpu",
    max_iter: int | None = None,
    tol: float | None = None,
    class_weight: str | None = CLASS_WEIGHT,
    k: int = KNN_K,
    T: float = KNN_T,
) -> SegmentationResult:
    """Standard protocol for one (token, block) of two patch stores with any registered ``rule``; see the module
    docstring."""
    opts = RuleOptions(
        device=device,
        seed=seed,
        Cs=tuple(Cs),
        val_fraction=val_fraction,
        class_weight=check_class_weight(class_weight),
        max_iter=max_iter,
        tol=tol,
        k=k,
        T=T,
    )
    return run_standard_segmentation(train_store, test_store, token, block, get_rule(rule), opts, masks)


def run_standard_segmentation(
    train_store: Any,
    test_store: Any,
    token: str,
    block: int,
    impl: RuleProtocol,
    opts: RuleOptions,
    masks: Masks,
) -> SegmentationResult:
    """:func:`standard_segmentation` with the rule's protocols and options as the driver holds them."""
    impl.check(opts)
    num_classes = len(train_store.classes)
    dev, dt = torch.device(opts.device), default_dtype(opts.device)
    data = PatchData(train_store, token, block, train_store.patch_labels(), dt, dev)
    scorer = impl.segmentation_scorer(data, num_classes, opts)
    cm = score_store(test_store, token, block, scorer.scores, num_classes, masks, dt, dev)
    out = cm.compute()
    return SegmentationResult(
        out["miou"],
        out["pixel_accuracy"],
        out["iou"],
        scorer.C,
        scorer.val_miou or {},
        scorer.weights,
        scorer.converged,
    )


def fewshot_segmentation(
    train_patches: Any,
    train_patch_labels: np.ndarray,
    test_patches: Any,
    test_indices: np.ndarray,
    grid: tuple[int, int],
    classes: np.ndarray,
    support: np.ndarray,
    query: np.ndarray,
    *,
    rule: str,
    masks: Masks,
    C: float = FEWSHOT_C,
    device: str = "cpu",
    max_iter: int | None = None,
    tol: float | None = None,
    class_weight: str | None = CLASS_WEIGHT,
    k: int = KNN_K,
    T: float = KNN_T,
) -> FewshotSegmentationResult:
    """1-way K-shot protocol with any registered ``rule``. ``train_patches [Ntr, h·w, D]`` and ``test_patches
    [Nte, h·w, D]`` (memmaps are fine: only episode rows are read), ``train_patch_labels [Ntr, h·w]``,
    ``test_indices [Nte]`` dataset indices for ``masks``, episodes ``classes [E]``, ``support [E, K]`` (train
    rows), ``query [E]`` (test rows)."""
    classes, support, query = np.asarray(classes), np.asarray(support, np.int64), np.asarray(query, np.int64)
    if (
        support.ndim != 2
        or support.shape[0] == 0
        or support.shape[1] == 0
        or query.shape != classes.shape
        or query.shape != (support.shape[0],)
    ):
        raise RuleError(
            f"empty or malformed episodes: classes {classes.shape}, support {support.shape}, query "
            f"{query.shape}; expected [E], [E, K], [E] with E, K >= 1"
        )
    impl = get_rule(rule)
    opts = RuleOptions(
        device=device,
        C=check_C(C) if rule_entry(rule).has_C else FEWSHOT_C,
        class_weight=check_class_weight(class_weight),
        max_iter=max_iter,
        tol=tol,
        k=k,
        T=T,
    )
    return run_fewshot_segmentation(
        train_patches,
        train_patch_labels,
        test_patches,
        test_indices,
        grid,
        classes,
        support,
        query,
        impl,
        opts,
        masks,
    )


def run_fewshot_segmentation(
    train_patches: Any,
    train_patch_labels: np.ndarray,
    test_patches: Any,
    test_indices: np.ndarray,
    grid: tuple[int, int],
    classes: np.ndarray,
    support: np.ndarray,
    query: np.ndarray,
    impl: RuleProtocol,
    opts: RuleOptions,
    masks: Masks,
) -> FewshotSegmentationResult:
    """:func:`fewshot_segmentation` with the rule's protocols and options as the driver holds them."""
    classes, support, query = np.asarray(classes), np.asarray(support, np.int64), np.asarray(query, np.int64)
    impl.check(opts)
    if train_patches.shape[-1] != test_patches.shape[-1]:
        raise FeatureError(
            f"test patch features have width {test_patches.shape[-1]} but train "
            f"{train_patches.shape[-1]}; use the same token/block/model"
        )
    dev, dt = torch.device(opts.device), default_dtype(opts.device)
    E, K = support.shape
    hw, D = train_patches.shape[1], train_patches.shape[2]
    batch = max(1, EPISODE_BATCH_BYTES // (K * hw * (D + 1) * 8))
    inter, union = np.zeros(E), np.zeros(E)
    fb = np.zeros((2, 2), dtype=np.int64)
    unconverged = 0
    for lo in range(0, E, batch):
        sl = slice(lo, min(E, lo + batch))
        s_rows = support[sl]
        Xs = np.array(train_patches[np.sort(np.unique(s_rows))])  # read each support image once
        pos = np.searchsorted(np.sort(np.unique(s_rows)), s_rows)
        X = torch.as_tensor(Xs).to(dev, dt)[torch.as_tensor(pos)].reshape(len(s_rows), K * hw, D)
        if not torch.isfinite(X).all():
            raise FeatureError("support patch features contain NaN/Inf; re-extract the features")
        pl = torch.as_tensor(train_patch_labels[s_rows].reshape(len(s_rows), K * hw), device=dev)
        c = torch.as_tensor(classes[sl], device=dev)[:, None]
        y = (pl == c).long()
        sw = (pl != IGNORE_INDEX).to(dt)
        num_fg, num_bg = (y * sw).sum(1), ((1 - y) * sw).sum(1)
        Xq = torch.as_tensor(np.array(test_patches[query[sl]])).to(dev, dt)  # [e, h·w, D]
        if not bool(torch.isfinite(Xq).all()):
            raise FeatureError("query patch features contain NaN/Inf; re-extract the features")
        s, failed = impl.fewshot_segmentation_scores(X, y, sw, Xq, opts)  # [e, h·w] foreground scores
        unconverged += failed
        # Degenerate support sets: no foreground → background everywhere, and vice versa.
        s = torch.where((num_fg == 0)[:, None], -1.0, torch.where((num_bg == 0)[:, None], 1.0, s))
        for j, e in enumerate(range(sl.start, sl.stop)):
            mask = torch.as_tensor(np.asarray(masks(int(test_indices[query[e]]))))
            up = F.interpolate(
                s[j].reshape(1, 1, *grid), size=tuple(mask.shape), mode="bilinear", align_corners=False
            )[0, 0].cpu()
            pred, valid = up > 0, mask != IGNORE_INDEX
            gt = mask == int(classes[e])
            inter[e] = float((pred & gt & valid).sum())
            union[e] = float(((pred | gt) & valid).sum())
            fb += np.bincount((2 * gt[valid].long() + pred[valid].long()).numpy(), minlength=4).reshape(2, 2)
    miou, per_class = fewshot_miou(classes, inter, union)
    per_episode = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    _, ci = mean_ci95(per_episode)
    return FewshotSegmentationResult(miou, fb_iou(fb), per_episode, ci, per_class, unconverged)


def dataset_masks(store: Any) -> Masks:
    """``masks(i)`` reading full-resolution masks of the dataset a store was extracted from."""
    from ..data import open_dataset

    ds = open_dataset(store.dataset_spec, store.split)
    if hasattr(ds, "mask"):
        return lambda i: np.asarray(ds.mask(i), dtype=np.int64)
    return lambda i: np.asarray(ds[i][1], dtype=np.int64)


def patch_pixel_counts(patch_labels: np.ndarray, num_classes: int, patch_size: int) -> np.ndarray:
    """Approximate per-image pixel counts ``[N, C]`` from majority patch labels ``[N, h·w]`` (× patch area),
    for the few-shot episode sampler without re-reading the dataset."""
    N = len(patch_labels)
    rows = np.repeat(np.arange(N), patch_labels.shape[1])
    flat = patch_labels.reshape(-1)
    keep = flat != IGNORE_INDEX
    counts = np.zeros((N, num_classes), dtype=np.int64)
    np.add.at(counts, (rows[keep], flat[keep]), 1)
    return counts * patch_size * patch_size
