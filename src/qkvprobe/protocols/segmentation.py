"""Segmentation protocols (PAPER.md §2) with bounded memory.

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

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import FeatureError, RuleError
from ..rules import class_normals
from ..rules.checks import check_C
from ..rules.cosine import cosine_directions, cosine_scores
from ..rules.logistic import (
    DEFAULT_MAX_ITER,
    DEFAULT_TOL,
    PRECOND_ROWS,
    StreamedLogistic,
    augment,
    balanced_class_weights,
    balanced_sample_weight,
    check_class_weight,
    default_dtype,
    fit_logistic,
    grid_step,
    num_logits,
    solve,
)
from ..vocab import IGNORE_INDEX
from .classification import (
    C_GRID,
    FEWSHOT_C,
    VAL_FRACTION,
    Evaluation,
    ProgressFn,
    Steps,
    as_list,
    row_maker,
    store_block,
)
from .fewshot_c import AUTO, check_fewshot_C, choose_C, validation_episodes
from .metrics import ConfusionMatrix, fb_iou, fewshot_miou, mean_ci95, mean_iou

#: Patches per compute chunk of the streaming solver and of scoring.
CHUNK_ROWS = 65_536
#: Labelled training patches are kept in RAM (solver dtype) only below this size; else streamed per pass.
MEMORY_BUDGET_BYTES = 512 * 1024**2
#: Bytes of gathered support features per few-shot batch of episodes.
EPISODE_BATCH_BYTES = 256 * 1024**2
#: Class weighting of the hyperplane rule: None = plain logistic regression (PAPER.md); "balanced" weighs each
#: class by n / (K · n_k), as scikit-learn. Few-shot supports are mostly background (on the Scenes, ~74 % of the
#: patches), and at a fixed C the plain fit then under-predicts the foreground; see the README's "Class weights".
CLASS_WEIGHT: str | None = None

Masks = Callable[[int], np.ndarray]


@dataclass
class SegmentationResult:
    """Standard protocol outcome: ``miou``, ``pixel_accuracy``, per-class IoU ``[K]``, chosen C (NaN for
    cosine), the held-out patch mIoU per C, the fitted class vectors ``weights [K, D]`` float32 (hyperplane
    normals, or cosine class directions — zero for a class without training patches), and whether every
    hyperplane fit behind it (the C sweep and the refit) reached its certified optimum (None for cosine)."""

    miou: float
    pixel_accuracy: float
    iou: np.ndarray
    C: float
    val_miou: dict[float, float]
    weights: np.ndarray | None = None
    converged: bool | None = None


@dataclass
class FewshotSegmentationResult:
    """Few-shot outcome: ``miou`` (per-class foreground IoU, mean over classes), ``fb_iou``, per episode
    foreground IoU ``[E]`` (for paired tests; its 95 % CI is ``ci95``), and the number of episodes whose hyperplane
    fit was not certified at its optimum (0 for cosine)."""

    miou: float
    fb_iou: float
    per_episode: np.ndarray
    ci95: float
    per_class: np.ndarray
    unconverged: int = 0


class _PatchSource:
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


def _fit_streaming(
    source: _PatchSource,
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


def _patch_scores(X: torch.Tensor, rule: str, params: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``X [m, D]`` → scores ``[m, K]``; ``params`` = W ``[D+1, Kf]`` (hyperplane) or directions ``[K, D]``."""
    if rule == "cosine":
        return cosine_scores(X[None], params[None])[0]
    s = augment(X) @ params
    return torch.cat([torch.zeros_like(s), s], 1) if num_classes == 2 else s


def upsample_argmax(scores: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Patch scores ``[h·w, K]`` → bilinear (align_corners=False) to ``size`` → argmax ``[H, W]`` int64."""
    s = scores.T.reshape(1, -1, *grid)
    return F.interpolate(s, size=size, mode="bilinear", align_corners=False)[0].argmax(0)


def score_store(
    store: Any,
    token: str,
    block: int,
    rule: str,
    params: torch.Tensor,
    num_classes: int,
    masks: Masks,
    dtype: torch.dtype,
    device: torch.device,
) -> ConfusionMatrix:
    """Stream a store's images, predict full-resolution masks and accumulate a confusion matrix."""
    cm = ConfusionMatrix(num_classes)
    indices = store.indices()
    hw = store.grid[0] * store.grid[1]
    for start, array in store.iter_chunks(token, "patch", block, chunk_size=max(1, CHUNK_ROWS // hw)):
        X = torch.as_tensor(np.array(array)).to(device, dtype)  # [b, h·w, D]; copy: memmaps are read-only
        scores = _patch_scores(X.reshape(-1, X.shape[-1]), rule, params, num_classes).reshape(len(X), hw, -1)
        for j in range(len(X)):
            mask = torch.as_tensor(np.asarray(masks(int(indices[start + j]))))
            pred = upsample_argmax(scores[j], store.grid, tuple(mask.shape))
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
    max_iter: int = DEFAULT_MAX_ITER,
    tol: float = DEFAULT_TOL,
    class_weight: str | None = CLASS_WEIGHT,
) -> SegmentationResult:
    """Standard protocol for one (token, block) of two patch stores; see the module docstring."""
    class_weight = check_class_weight(class_weight)
    num_classes = len(train_store.classes)
    dev, dt = torch.device(device), default_dtype(device)
    labels = train_store.patch_labels()
    rows = np.arange(len(labels))
    if rule == "cosine":
        source = _PatchSource(train_store, token, block, rows, labels, dt, dev)
        sums = None
        for X, y in source():
            if sums is None:
                sums = torch.zeros(num_classes, X.shape[1] - 1, dtype=dt, device=dev)
            sums.index_add_(0, y, F.normalize(X[:, :-1], dim=1))
        if sums is None:
            raise RuleError(
                "no labelled training patches (all patch labels are 255); check the training store"
            )
        params = sums  # unnormalised class means: the cosine only needs their directions
        C_best, val, converged = math.nan, {}, None
    elif rule == "hyperplane":
        Cs = sorted(check_C(C) for C in Cs)
        perm = np.random.default_rng(seed).permutation(len(labels))
        num_val = max(1, round(val_fraction * len(labels))) if len(labels) > 1 else 0
        val_rows, fit_rows = np.sort(perm[:num_val]), np.sort(perm[num_val:])
        fit_src = _PatchSource(train_store, token, block, fit_rows, labels, dt, dev)
        val_src = _PatchSource(train_store, token, block, val_rows, labels, dt, dev)
        moment = fit_src.moment()
        val, best = {}, (-1.0, None, None)
        # Every C an independent fit from W = 0, all Cs in one batch (one read of the patches per iteration).
        sweep, sweep_ok = _fit_streaming(fit_src, num_classes, Cs, None, moment, max_iter, tol, class_weight)
        for C, W in zip(Cs, sweep.split(1), strict=True):
            Wm = W.view(moment.shape[-1], -1)
            cm = ConfusionMatrix(num_classes)
            for X, y in val_src():
                cm.update(_patch_scores(X[:, :-1], "hyperplane", Wm, num_classes).argmax(1).cpu(), y.cpu())
            val[C] = mean_iou(cm.matrix)
            if val[C] > best[0]:
                best = (val[C], C, W)
        C_best = best[1]
        del fit_src, val_src  # drop their cached patches before caching the full training set
        all_src = _PatchSource(train_store, token, block, rows, labels, dt, dev)
        W, refit_ok = _fit_streaming(
            all_src, num_classes, [C_best], best[2], moment, max_iter, tol, class_weight
        )
        params = W.view(moment.shape[-1], -1)
        converged = bool(sweep_ok.all()) and bool(refit_ok.all())
    else:
        raise RuleError(f"unknown rule {rule!r}; use 'hyperplane' or 'cosine'")
    cm = score_store(test_store, token, block, rule, params, num_classes, masks, dt, dev)
    out = cm.compute()
    weights = F.normalize(params, dim=1) if rule == "cosine" else class_normals(params[:-1].T)
    return SegmentationResult(
        out["miou"], out["pixel_accuracy"], out["iou"], C_best, val, weights.float().cpu().numpy(), converged
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
) -> FewshotSegmentationResult:
    """1-way K-shot protocol. ``train_patches [Ntr, h·w, D]`` and ``test_patches [Nte, h·w, D]`` (memmaps are
    fine: only episode rows are read), ``train_patch_labels [Ntr, h·w]``, ``test_indices [Nte]`` dataset
    indices for ``masks``, episodes ``classes [E]``, ``support [E, K]`` (train rows), ``query [E]`` (test rows)."""
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
    if rule not in ("hyperplane", "cosine"):
        raise RuleError(f"unknown rule {rule!r}; use 'hyperplane' or 'cosine'")
    if rule == "hyperplane":
        C = check_C(C)
    class_weight = check_class_weight(class_weight)
    if train_patches.shape[-1] != test_patches.shape[-1]:
        raise FeatureError(
            f"test patch features have width {test_patches.shape[-1]} but train "
            f"{train_patches.shape[-1]}; use the same token/block/model"
        )
    dev, dt = torch.device(device), default_dtype(device)
    E, K = support.shape
    hw, D = train_patches.shape[1], train_patches.shape[2]
    batch = max(1, EPISODE_BATCH_BYTES // (K * hw * (D + 1) * 8))
    opts = {k: v for k, v in (("max_iter", max_iter), ("tol", tol)) if v is not None}
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
        if rule == "hyperplane":
            fit_sw = balanced_sample_weight(y, sw, 2) if class_weight == "balanced" else sw
            fit = fit_logistic(X, y, 2, C, sample_weight=fit_sw, **opts)
            unconverged += int((~fit.converged).sum())
            s = (Xq @ fit.coef.transpose(1, 2))[..., 0] + fit.intercept  # [e, h·w] foreground logit
        else:
            mu = cosine_directions(X, y, 2, sample_weight=sw)
            cs = cosine_scores(Xq, mu)
            s = cs[..., 1] - cs[..., 0]
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
    from .. import open_dataset

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


def _validation_miou(
    train_patches: Any,
    train_patch_labels: np.ndarray,
    train_store: Any,
    val: Any,
    train_masks: Masks,
    device: str,
    class_weight: str | None,
    C: float,
) -> float:
    """Few-shot mIoU of the hyperplane rule at ``C`` on training-split validation episodes."""
    return fewshot_segmentation(
        train_patches,
        train_patch_labels,
        train_patches,
        train_store.indices(),
        train_store.grid,
        val.classes,
        val.support,
        val.query,
        rule="hyperplane",
        masks=train_masks,
        C=C,
        device=device,
        class_weight=class_weight,
    ).miou


def evaluate_segmentation(
    train_store: Any,
    test_store: Any,
    *,
    setting: str,
    rules: Sequence[str] = ("hyperplane", "cosine"),
    tokens: Sequence[str] = ("q", "k", "v", "ffn"),
    positions: Sequence[str] = ("patch",),
    blocks: Sequence[int] = (-1,),
    ways: int = 1,
    shots: int | Sequence[int] = (1, 5),
    queries: int = 1,
    episodes: int = 1000,
    seed: int = 0,
    model: str | None = None,
    dataset: str | None = None,
    device: str = "cpu",
    Cs: Sequence[float] = C_GRID,
    C: float | str = FEWSHOT_C,
    masks: Masks | None = None,
    episode_sampler: Any = None,
    class_weight: str | None = CLASS_WEIGHT,
    progress: ProgressFn | None = None,
    train_masks: Masks | None = None,
) -> Evaluation:
    """Evaluate every (block, token, rule) of two segmentation stores → rows (standard: ``miou`` and
    ``pixel_accuracy``; few-shot: ``miou`` with the CI of per-episode foreground IoU, and ``fb_iou``).
    ``masks(i)`` gives the test split's full-resolution mask of dataset index i (default: opened from the
    store's dataset); ``episode_sampler`` defaults to ``qkvprobe.data.episodes.sample_segmentation_episodes``;
    ``class_weight`` (None or "balanced") weighs the hyperplane rule's classes (see the module docstring);
    ``progress(label, done, total)`` is told of each (shots ×) block × token × rule. Few-shot ``C="auto"``
    chooses the hyperplane's C on training-split episodes (``protocols.fewshot_c``), scored against
    ``train_masks(i)``, the training split's full-resolution masks (default: opened from the store's dataset)."""
    if setting not in ("standard", "fewshot"):
        raise RuleError(f"unknown setting {setting!r}; use 'standard' or 'fewshot'")
    if any(p != "patch" for p in positions):
        raise RuleError(
            f"segmentation uses patch tokens, got positions {list(positions)}; pass --positions patch"
        )
    class_weight = check_class_weight(class_weight)
    C = check_fewshot_C(C)
    masks = masks or dataset_masks(test_store)
    make = row_maker(
        train_store,
        model=model,
        dataset=dataset,
        task="segmentation",
        setting=setting,
        seed=seed,
        class_weight=class_weight,
        C=C,
    )
    out = Evaluation()
    if setting == "standard":
        step = Steps(progress, len(blocks) * len(tokens) * len(rules))
        for block in blocks:
            b = store_block(train_store, block)
            for token in tokens:
                for rule in rules:
                    step(f"block {b} · {token}·patch · {rule}")
                    res = standard_segmentation(
                        train_store,
                        test_store,
                        token=token,
                        block=block,
                        rule=rule,
                        masks=masks,
                        Cs=Cs,
                        seed=seed,
                        device=device,
                        class_weight=class_weight,
                    )
                    for metric in ("miou", "pixel_accuracy"):
                        out.append(
                            make(
                                block=b,
                                token=token,
                                position="patch",
                                rule=rule,
                                ways=0,
                                shots=0,
                                episodes=0,
                                metric=metric,
                                value=getattr(res, metric),
                                C=res.C,
                                converged=res.converged,
                            )
                        )
                    if res.converged is False:
                        out.unconverged.append(f"block {b} · {token}·patch · hyperplane (standard)")
                    if res.weights is not None:
                        out.weights[(token, "patch", rule, b)] = res.weights
        out.classes = np.arange(len(train_store.classes))
        step.finish()
        return out
    if episode_sampler is None:
        from ..data.episodes import sample_segmentation_episodes as episode_sampler
    num_classes = len(train_store.classes)
    tr_labels, te_labels = train_store.patch_labels(), test_store.patch_labels()
    tr_counts = patch_pixel_counts(tr_labels, num_classes, train_store.patch_size)
    te_counts = patch_pixel_counts(te_labels, num_classes, test_store.patch_size)
    auto = C == AUTO and "hyperplane" in rules
    if auto:
        train_masks = train_masks or dataset_masks(train_store)
    step = Steps(progress, len(as_list(shots)) * len(blocks) * len(tokens) * (len(rules) + auto))
    for k in as_list(shots):
        if (
            auto
        ):  # before the evaluation's episodes: a sampler that records what it left out then ends on those
            val = validation_episodes(
                episode_sampler,
                lambda rows: tr_counts[rows],
                len(tr_counts),
                episodes=episodes,
                seed=seed,
                shots=k,
            )
        ep = episode_sampler(tr_counts, te_counts, shots=k, episodes=episodes, seed=seed)
        for block in blocks:
            b = store_block(train_store, block)
            for token in tokens:
                Ftr, Fte = train_store.get(token, "patch", block), test_store.get(token, "patch", block)
                C_used = FEWSHOT_C if C == AUTO else C
                if auto:
                    step(f"{k}-shot · block {b} · {token}·patch · choosing C")
                    chosen = choose_C(
                        partial(
                            _validation_miou,
                            Ftr,
                            tr_labels,
                            train_store,
                            val,
                            train_masks,
                            device,
                            class_weight,
                        )
                    )
                    out.chosen_C[(token, "patch", b, k)] = chosen
                    C_used = chosen.C
                for rule in rules:
                    step(f"{k}-shot · block {b} · {token}·patch · {rule}")
                    res = fewshot_segmentation(
                        Ftr,
                        tr_labels,
                        Fte,
                        test_store.indices(),
                        test_store.grid,
                        ep.classes,
                        ep.support,
                        ep.query,
                        rule=rule,
                        masks=masks,
                        C=C_used,
                        device=device,
                        class_weight=class_weight,
                    )
                    Cv = C_used if rule == "hyperplane" else math.nan
                    common = dict(
                        block=b,
                        token=token,
                        position="patch",
                        rule=rule,
                        ways=1,
                        shots=k,
                        episodes=len(res.per_episode),
                        C=Cv,
                        converged=(res.unconverged == 0) if rule == "hyperplane" else None,
                    )
                    if res.unconverged:
                        out.unconverged.append(
                            f"{k}-shot · block {b} · {token}·patch · hyperplane: {res.unconverged} of "
                            f"{len(res.per_episode)} episodes"
                        )
                    out.append(make(**common, metric="miou", value=res.miou, ci95=res.ci95))
                    out.append(make(**common, metric="fb_iou", value=res.fb_iou))
                    key = (
                        (token, "patch", rule, b)
                        if len(as_list(shots)) == 1
                        else (token, "patch", rule, b, k)
                    )
                    out.per_episode[key] = res.per_episode
    step.finish()
    return out
