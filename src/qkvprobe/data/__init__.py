"""Datasets, preprocessing and few-shot episode samplers. Entry point: ``open_dataset(spec, split)``;
``list_datasets()`` says what is where.

Spec strings are ``kind[:PATH][?key=value&...]``; the kinds, their tasks, options and readers are listed once,
in :data:`qkvprobe.data.registry.KINDS`: ``fashion-mnist``, ``fashion-mnist-scenes``, ``imagefolder:PATH``,
``voc:PATH``, ``ade20k:PATH``, ``segfolder:PATH``, ``hfds:PATH_OR_ID`` (Hugging Face ``datasets``) and
``wds:DIR`` (WebDataset tar shards). Options after ``?`` (``fashion-mnist?source=bundled``,
``hfds:/data/in1k?image=jpg&label=cls``).

Names are imported on first use, so that ``qkvprobe.config`` can read the registry without loading torch.
"""

from __future__ import annotations

import importlib
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import QkvprobeError
from .registry import KINDS, DatasetKind, parse_spec, search_paths

if TYPE_CHECKING:
    import numpy as np

    from .base import Dataset

_LAZY: dict[str, str] = {
    "Dataset": "qkvprobe.data.base",
    "Preprocess": "qkvprobe.data.preprocess",
    "build_preprocess": "qkvprobe.data.preprocess",
    "patch_majority_labels": "qkvprobe.data.preprocess",
    "sample_classification_episodes": "qkvprobe.data.episodes",
    "sample_segmentation_episodes": "qkvprobe.data.episodes",
}

__all__ = [
    "Dataset",
    "Preprocess",
    "build_preprocess",
    "class_pixel_counts",
    "list_datasets",
    "open_dataset",
    "patch_majority_labels",
    "sample_classification_episodes",
    "sample_segmentation_episodes",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qkvprobe.data' has no attribute {name!r}")


def open_dataset(
    spec: str,
    split: str,
    *,
    root: str | Path | None = None,
    on_bad_image: str = "fail",
    limit: int | None = None,
    seed: int = 0,
) -> Dataset:
    """Open one split of a dataset by spec string (see module docstring); ``root`` = Fashion-MNIST directory.

    ``on_bad_image="skip"`` leaves unreadable images out and lists them in ``ds.skipped`` (folder layouts).
    ``limit=N``: a seeded (``seed``), class-stratified subset of N samples of a classification split
    (:func:`qkvprobe.data.subset.limit_dataset`; ``qkvprobe extract --limit N``).
    SpecError for an unknown kind, option or a missing path; DataError when the data is not there.
    """
    from .files import check_on_bad_image

    name, path, options = parse_spec(spec)
    check_on_bad_image(on_bad_image)
    dataset = KINDS[name].open(spec, path, options, split, root=root, on_bad_image=on_bad_image)
    if limit is None:
        return dataset
    from .subset import limit_dataset

    return limit_dataset(dataset, limit, seed)


def class_pixel_counts(dataset: Dataset) -> np.ndarray:
    """Pixels of each class in each image, int64 [N, C] (ignore pixels not counted); reads masks only."""
    import numpy as np

    from ..errors import DataError

    if dataset.task != "segmentation":
        raise DataError(f"class_pixel_counts needs a segmentation dataset; {dataset.spec} is {dataset.task}")
    fast = getattr(dataset, "pixel_counts", None)
    if fast is not None:
        return fast()
    num_classes = len(dataset.classes)
    read = getattr(dataset, "mask", None) or (lambda i: dataset[i][1])
    counts = np.zeros((len(dataset), num_classes), dtype=np.int64)
    for i in range(len(dataset)):
        mask = np.asarray(read(i)).ravel()
        counts[i] = np.bincount(mask[mask != 255], minlength=num_classes)[:num_classes]
    return counts


def _path_entry(kind: DatasetKind, candidates: list[Path]) -> dict[str, Any]:
    """The listing row of a kind that needs a path: the first candidate that opens, else where to put it."""
    entry: dict[str, Any] = {
        "spec": f"{kind.name}:PATH",
        "task": kind.task if isinstance(kind.task, str) else "classification|segmentation",
        "num_classes": kind.num_classes if kind.num_classes is not None else "",
        "train": "",
        "test": "",
    }
    for path in candidates:
        if not path.exists():
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                train = open_dataset(f"{kind.name}:{path}", "train")
                test = open_dataset(f"{kind.name}:{path}", "val")
        except QkvprobeError as exc:
            entry["source"] = f"{path}: {exc}"
            return entry
        entry.update(
            spec=f"{kind.name}:{path}",
            task=train.task,
            num_classes=len(train.classes),
            train=len(train),
            test=len(test),
            source=str(path),
        )
        return entry
    entry["source"] = "not found; give the path in the spec" + (
        " or place it under $QKVPROBE_DATA" if candidates else ""
    )
    return entry


def list_datasets() -> list[dict[str, Any]]:
    """What ``open_dataset`` can open here, one row per registry kind: ``spec, task, num_classes, train,
    test, source, options`` (the kind's ``?`` option names, from the registry).

    Never downloads; kinds that need a path are looked for under ``$QKVPROBE_DATA`` (the registry's
    ``where`` names: ``imagenet``, ``VOCdevkit``, ``ADEChallengeData2016``, ``imagenet-1k``, ``imagenet-wds`` …).
    """
    env = os.environ.get("QKVPROBE_DATA")
    base = Path(env).expanduser() if env else None
    entries = []
    for kind in KINDS.values():
        if kind.lister is not None:
            module, _, function = kind.lister.partition(":")
            entry = getattr(importlib.import_module(module), function)()
        else:
            entry = _path_entry(kind, search_paths(kind, base))
        entries.append({**entry, "options": list(kind.options)})
    return entries
