"""Fixtures of the protocol pins (tests/test_pins_protocols.py, tests/test_error_sites.py): in-memory feature
stores with the FeatureStore read API (docs/CONTRACTS.md), segmentation images whose ignore (255) region is a
whole quarter of every mask, and NumPy references of the few-shot segmentation rules and metrics.

Not a test module (no ``test_`` prefix): the torchrun script of the two-process pin imports it too."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

GRID, PATCH = (4, 4), 4
SIZE = (GRID[0] * PATCH, GRID[1] * PATCH)  # mask size (16 x 16)
IGNORE = 255
#: Dataset index of store row r is r + INDEX_OFFSET: a protocol that confuses rows and dataset indices reads
#: the wrong mask.
INDEX_OFFSET = 100


class MemoryStore:
    """In-memory stand-in for ``qkvprobe.features.FeatureStore`` (its read API only).

    ``feats[(token, position)]`` is ``[N, D]`` (cls/avg) or ``[N, h·w, D]`` (patch); ``labels [N]``
    (classification) or ``patch_labels [N, h·w]`` (segmentation); ``num_classes`` class names c0, c1, ….
    ``iter_chunks`` yields at most ``shard`` rows at a time, as a sharded store does."""

    def __init__(
        self,
        feats: dict[tuple[str, str], np.ndarray],
        *,
        labels: np.ndarray | None = None,
        patch_labels: np.ndarray | None = None,
        num_classes: int = 4,
        shard: int = 7,
    ) -> None:
        self.feats, self._labels, self._patch_labels, self.shard = feats, labels, patch_labels, shard
        self.task = "classification" if patch_labels is None else "segmentation"
        first = next(iter(feats.values()))
        self.num_samples = len(first)
        self.embed_dim = int(first.shape[-1])
        self.tokens = sorted({t for t, _ in feats})
        self.positions = sorted({p for _, p in feats})
        self.blocks, self.grid, self.patch_size, self.image_size = [1], GRID, PATCH, SIZE
        self.classes = [f"c{i}" for i in range(num_classes)]
        self.dataset_spec, self.split, self.backbone_spec, self.objective = (
            "mem-data",
            "train",
            "mem:vit",
            "dino",
        )

    def resolve_block(self, block: int) -> int:
        return block % 2

    def get(self, token: str, position: str, block: int = -1) -> np.ndarray:
        return self.feats[token, position]

    def iter_chunks(
        self,
        token: str,
        position: str,
        block: int = -1,
        *,
        chunk_size: int | None = None,
        shards: object = None,
    ) -> Iterator[tuple[int, np.ndarray]]:
        a = self.feats[token, position]
        step = min(self.shard, chunk_size or self.shard)
        for start in range(0, len(a), step):
            yield start, a[start : start + step]

    def labels(self) -> np.ndarray:
        assert self._labels is not None, "a segmentation store has no image labels"
        return self._labels

    def patch_labels(self) -> np.ndarray:
        assert self._patch_labels is not None, "a classification store has no patch labels"
        return self._patch_labels

    def indices(self) -> np.ndarray:
        return np.arange(self.num_samples) + INDEX_OFFSET


# -- classification data ------------------------------------------------------------------------------------
def blobs(
    n: int,
    seed: int,
    *,
    dim: int = 10,
    classes: int = 4,
    spread: float = 1.0,
    scales: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` rows (n // classes per class) of Gaussian blobs around fixed class means (the same means for every
    ``seed``), offset by +3 as raw ViT features are; ``scales [dim]`` multiplies the columns."""
    means = np.random.default_rng(0).normal(size=(classes, dim)) * 1.5
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), n // classes)
    X = means[y] + spread * rng.normal(size=(len(y), dim)) + 3.0
    return (X if scales is None else X * scales), y


# -- segmentation data --------------------------------------------------------------------------------------
@dataclass
class SegImages:
    """``feats [N, h·w, D]`` float32, ``patch_labels [N, h·w]`` (255 on the ignored quarter), ``masks [N, H, W]``
    (255 on the same quarter), ``quadrant [N]`` (which quarter is ignored) and ``hidden [N]`` (the class whose
    embedding the ignored patches carry: an ignore label hides real content, it does not blank it)."""

    feats: np.ndarray
    patch_labels: np.ndarray
    masks: np.ndarray
    quadrant: np.ndarray
    hidden: np.ndarray

    def mask(self, dataset_index: int) -> np.ndarray:
        """``masks(i)`` of the protocols: full-resolution mask of dataset index i (= row + INDEX_OFFSET)."""
        return self.masks[dataset_index - INDEX_OFFSET]

    def mask_of_row(self, row: int) -> np.ndarray:
        return self.masks[row]


def class_embeddings(dim: int, classes: int = 4) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(classes, dim)) * 2.0


def seg_images(
    num: int,
    seed: int,
    *,
    dim: int = 8,
    classes: int = 4,
    noise: float = 0.7,
    hidden: np.ndarray | int | None = None,
    labels: np.ndarray | None = None,
) -> SegImages:
    """Images of ``GRID`` patches: patch features = class embedding + noise + 2; masks = patch labels upsampled
    ×PATCH (nearest). A quarter of every image (a 2×2 block of patches, 8×8 pixels, at a random quadrant) is
    ignored: patch label 255 and mask 255, with features of class ``hidden`` (random per image by default).
    ``labels [num, h·w]`` fixes the patch labels (before the ignored quarter is stamped on)."""
    rng = np.random.default_rng(seed)
    emb = class_embeddings(dim, classes)
    hw = GRID[0] * GRID[1]
    pl = rng.integers(0, classes, (num, hw)) if labels is None else np.array(labels, dtype=np.int64)
    quadrant = rng.integers(0, 4, num)
    if hidden is None:
        hidden = rng.integers(0, classes, num)
    hidden = np.broadcast_to(np.asarray(hidden, dtype=np.int64), (num,)).copy()
    content = pl.copy()  # the class each patch looks like
    masks = np.kron(pl.reshape(num, *GRID), np.ones((PATCH, PATCH), dtype=np.int64))
    grid_rows = np.arange(hw) // GRID[1]
    grid_cols = np.arange(hw) % GRID[1]
    for i in range(num):
        r0, c0 = 2 * (quadrant[i] // 2), 2 * (quadrant[i] % 2)
        quarter = (grid_rows // 2 == r0 // 2) & (grid_cols // 2 == c0 // 2)
        pl[i, quarter] = IGNORE
        content[i, quarter] = hidden[i]
        masks[i, r0 * PATCH : (r0 + 2) * PATCH, c0 * PATCH : (c0 + 2) * PATCH] = IGNORE
    feats = (emb[content] + noise * rng.normal(size=(num, hw, dim)) + 2.0).astype(np.float32)
    return SegImages(feats, pl, masks, quadrant, hidden)


def seg_store(data: SegImages, token: str = "q", num_classes: int = 4) -> MemoryStore:
    return MemoryStore(
        {(token, "patch"): data.feats}, patch_labels=data.patch_labels, num_classes=num_classes
    )


# -- NumPy references of few-shot segmentation (docs/science.md §2) -----------------------------------------
def upsample(scores: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Patch scores ``[h·w]`` → bilinear (align_corners=False, the protocols' documented upsampling) ``[H, W]``."""
    s = torch.as_tensor(scores, dtype=torch.float64).reshape(1, 1, *GRID)
    return F.interpolate(s, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def unit(X: np.ndarray) -> np.ndarray:
    return X / np.linalg.norm(X, axis=-1, keepdims=True)


def cosine_fg_scores(
    support_feats: np.ndarray,
    support_labels: np.ndarray,
    query_feats: np.ndarray,
    c: int,
    *,
    ignore_counts_as_background: bool = False,
) -> np.ndarray:
    """One episode of the few-shot cosine rule: ``support_feats [n, D]`` with labels ``[n]`` (255 = ignored),
    ``query_feats [h·w, D]`` → foreground score ``cos(x, μ_fg) − cos(x, μ_bg)`` ``[h·w]``, μ = mean of the unit
    vectors of the foreground (label c) / background (any other label but 255) patches; ±1 everywhere when a side
    is empty. ``ignore_counts_as_background`` gives the wrong rule, to show that a test can tell them apart."""
    X = unit(np.asarray(support_feats, dtype=np.float64))
    labelled = np.ones(len(X), bool) if ignore_counts_as_background else support_labels != IGNORE
    fg, bg = (support_labels == c) & labelled, (support_labels != c) & labelled
    if not fg.any():
        return -np.ones(len(query_feats))
    if not bg.any():
        return np.ones(len(query_feats))
    Q = unit(np.asarray(query_feats, dtype=np.float64))
    return Q @ unit(X[fg].mean(0)) - Q @ unit(X[bg].mean(0))


@dataclass
class FewshotReference:
    """What the few-shot segmentation metrics should be, from predicted masks: per episode foreground
    ``inter``/``union`` ``[E]`` and IoU, per-class mIoU (Σ inter / Σ union per class, mean over classes), the
    mean of per-episode IoUs (the wrong aggregate), and FB-IoU from the 2×2 confusion matrix of all episodes."""

    inter: np.ndarray
    union: np.ndarray
    per_episode: np.ndarray
    miou: float
    mean_of_episodes: float
    fb_iou: float


def fewshot_reference(
    preds: list[np.ndarray], masks: list[np.ndarray], classes: np.ndarray, *, score_ignored: bool = False
) -> FewshotReference:
    """Metrics of predicted binary masks ``preds[e] [H, W]`` against ``masks[e]`` for episode classes ``[E]``;
    pixels labelled 255 are not scored (``score_ignored`` scores them as background: the wrong metric)."""
    E = len(preds)
    inter, union = np.zeros(E), np.zeros(E)
    cm = np.zeros((2, 2))
    for e, (pred, mask) in enumerate(zip(preds, masks, strict=True)):
        valid = np.ones(mask.shape, bool) if score_ignored else mask != IGNORE
        gt = mask == classes[e]
        inter[e] = (pred & gt & valid).sum()
        union[e] = ((pred | gt) & valid).sum()
        for g in (0, 1):
            for p in (0, 1):
                cm[g, p] += ((gt == g) & (pred == p) & valid).sum()
    per_episode = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    per_class = []
    for c in np.unique(classes):
        u = union[classes == c].sum()
        per_class.append(inter[classes == c].sum() / u if u > 0 else 1.0)  # empty union: nothing to miss
    tp = np.diag(cm)
    fb = np.mean(tp / (cm.sum(0) + cm.sum(1) - tp))
    return FewshotReference(
        inter, union, per_episode, float(np.mean(per_class)), float(per_episode.mean()), fb
    )
