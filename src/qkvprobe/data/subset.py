"""Seeded, class-stratified subsets of a classification split: ``extract --limit N`` and a study's
``train_size``/``test_size`` (the same choice for the same seed)."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from .base import Dataset


class Subset(Dataset):
    """A fixed selection of a dataset's samples; the fingerprint covers the parent's and the selection."""

    def __init__(self, parent: Dataset, indices: np.ndarray) -> None:
        self.parent = parent
        self.selection = np.asarray(indices, dtype=np.int64)
        self.spec, self.split, self.task = parent.spec, parent.split, parent.task
        self.classes = list(parent.classes)
        self.source = f"{parent.source}; subset of {len(self.selection)} of {len(parent)}"
        digest = hashlib.sha256(parent.fingerprint.encode() + self.selection.tobytes())
        self.fingerprint = digest.hexdigest()

    def __len__(self) -> int:
        return len(self.selection)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        return self.parent[int(self.selection[index])]

    def targets(self) -> Any:
        t = self.parent.targets()
        return None if t is None else np.asarray(t)[self.selection]


def subset_indices(
    num: int, size: int | None, seed: int, labels: np.ndarray | None = None
) -> np.ndarray | None:
    """Sorted seeded random indices (stratified by ``labels`` when given); None when no subsampling is needed."""
    if size is None or size >= num:
        return None
    rng = np.random.default_rng(seed)
    if labels is None:
        return np.sort(rng.choice(num, size, replace=False))
    # stratified: each class keeps its share, so a small subset still covers every class
    classes, counts = np.unique(labels, return_counts=True)
    quota = np.floor(counts / num * size).astype(int)
    quota[np.argsort(-(counts / num * size - quota))[: size - quota.sum()]] += 1
    picks = [
        rng.choice(np.flatnonzero(labels == c), q, replace=False) for c, q in zip(classes, quota, strict=True)
    ]
    return np.sort(np.concatenate(picks))


def limit_dataset(dataset: Dataset, n: int, seed: int = 0) -> Dataset:
    """``n`` samples of ``dataset`` (seeded, class-stratified; sorted indices); the dataset itself when ``n`` covers
    it. The subset records ``limit = {"n", "seed", "of"}`` (in the store's manifest) and has its own fingerprint,
    so another ``n`` or ``seed`` is another feature store.

    Raises:
        ConfigError: ``n`` < 1, or a segmentation dataset (its protocol re-reads masks by dataset index).
    """
    if n < 1:
        raise ConfigError(f"--limit {n}: give a number of samples >= 1")
    if dataset.task != "classification":
        raise ConfigError(
            f"--limit subsamples classification splits; {dataset.spec} is a {dataset.task} set, whose evaluation "
            "re-reads its masks by index: extract it whole, or point --data at a smaller copy"
        )
    labels = dataset.targets()
    index = subset_indices(len(dataset), n, seed, None if labels is None else labels)
    if index is None:
        return dataset
    subset = Subset(dataset, index)
    subset.limit = {"n": int(n), "seed": int(seed), "of": len(dataset)}  # type: ignore[attr-defined]
    return subset
