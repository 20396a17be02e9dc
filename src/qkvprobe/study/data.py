"""Opening a study's datasets, with the seeded subsampling the default study uses to stay fast on CPUs.

Generated datasets (registry kinds with ``size_options``: Fashion-MNIST Scenes) are *generated* at the
requested size (spec options ``train=``/``test=``), so the feature store's recorded spec re-opens exactly the
same data. Classification datasets are subsampled by a
seeded random choice of indices (a :class:`Subset` with its own fingerprint). Other segmentation datasets are
used whole: their protocol re-opens the split from its spec to score full-resolution masks.
"""

from __future__ import annotations

from ..config import DatasetConfig
from ..data.base import Dataset
from ..data.subset import Subset as Subset
from ..data.subset import subset_indices as subset_indices
from ..errors import ConfigError


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
