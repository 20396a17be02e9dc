"""Opening a study's datasets, with the seeded subsampling the default study uses to stay fast on CPUs.

Generated datasets (registry kinds with ``size_options``: Fashion-MNIST Scenes) are *generated* at the
requested size (spec options ``train=``/``test=``), so the feature store's recorded spec re-opens exactly the
same data. Classification datasets are subsampled by a
seeded random choice of indices (a :class:`Subset` with its own fingerprint). Other segmentation datasets are
used whole: their protocol re-opens the split from its spec to score full-resolution masks.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

from ..config import DatasetConfig
from ..data.base import Dataset
from ..errors import ConfigError


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


def sized_spec(cfg: DatasetConfig, size_options: tuple[str, str] = ("train", "test")) -> str:
    """The spec with the configured sizes as generator options (explicit options win)."""
    spec = cfg.spec
    options = dict(part.split("=", 1) for part in spec.partition("?")[2].split("&") if "=" in part)
    sizes = zip(size_options, (cfg.train_size, cfg.test_size), strict=True)
    extra = [f"{k}={v}" for k, v in sizes if v and k not in options]
    if not extra:
        return spec
    return spec + ("&" if "?" in spec else "?") + "&".join(extra)


def open_split(
    cfg: DatasetConfig, which: str, seed: int, *, spec: str | None = None, root: str | None = None
) -> Dataset:
    """Open the train (``which="train"``) or test split of a configured dataset, subsampled as configured.
    ``spec``/``root``: the config's own with relative paths resolved (``StudyConfig.dataset_spec``/``dataset_root``);
    default ``cfg.spec``/``cfg.root`` as written."""
    from ..data import open_dataset
    from ..data.registry import KINDS, dataset_kind

    split = cfg.train_split if which == "train" else cfg.test_split
    size = cfg.train_size if which == "train" else cfg.test_size
    spec = spec or cfg.spec
    root = root if root is not None else cfg.root
    kind = KINDS[dataset_kind(cfg.spec)]
    if kind.size_options is not None:
        return open_dataset(sized_spec(cfg, kind.size_options), split, root=root)
    ds = open_dataset(spec, split, root=root)
    if size is None:
        return ds
    if ds.task != "classification":
        raise ConfigError(
            f"datasets: train_size/test_size subsample only classification sets and generated ones (fashion-mnist-scenes), not {cfg.spec}"
        )
    labels = ds.targets()
    idx = subset_indices(len(ds), size, seed + (0 if which == "train" else 1), labels)
    return ds if idx is None else Subset(ds, idx)


#: The name the study's tests and callers know for :func:`sized_spec` on Fashion-MNIST Scenes.
scenes_spec = sized_spec
