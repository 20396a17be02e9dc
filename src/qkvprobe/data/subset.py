"""``extract --limit N``: a seeded, class-stratified subset of a classification split."""

from __future__ import annotations

from ..errors import ConfigError
from .base import Dataset


def limit_dataset(dataset: Dataset, n: int, seed: int = 0) -> Dataset:
    """``n`` samples of ``dataset`` (seeded, class-stratified; sorted indices); the dataset itself when ``n`` covers
    it. The subset records ``limit = {"n", "seed", "of"}`` (in the store's manifest) and has its own fingerprint,
    so another ``n`` or ``seed`` is another feature store.

    Raises:
        ConfigError: ``n`` < 1, or a segmentation dataset (its protocol re-reads masks by dataset index).
    """
    # the study's subsampling: the same choice for the same seed
    from ..study.data import Subset, subset_indices

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
