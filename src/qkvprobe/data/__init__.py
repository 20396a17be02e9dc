"""Datasets (Fashion-MNIST, Fashion-MNIST Scenes, ImageFolder, segfolder, VOC 2012, ADE20K), preprocessing and
few-shot episode samplers. Entry point: ``open_dataset(spec, split)``; ``list_datasets()`` says what is where.

Spec strings: ``fashion-mnist``, ``fashion-mnist-scenes``, ``imagefolder:PATH``, ``voc:PATH``, ``ade20k:PATH``,
``segfolder:PATH``; options after ``?`` (``fashion-mnist?source=bundled``,
``fashion-mnist-scenes?seed=1&train=500&test=100``). Hugging Face ``hf:NAME`` datasets are not supported
(the ``datasets`` library is not a dependency); export them to ``imagefolder``/``segfolder`` layouts.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError, QkvprobeError
from ._util import check_options, int_option, parse_spec
from .base import Dataset
from .episodes import sample_classification_episodes, sample_segmentation_episodes
from .fashion_mnist import FashionMNIST
from .fashion_mnist import count_split as _count_fashion_mnist
from .fashion_mnist import locate as _locate_fashion_mnist
from .files import check_on_bad_image
from .folders import ADE20K, ImageFolder, SegFolder, VOCSegmentation
from .preprocess import Preprocess, build_preprocess, patch_majority_labels
from .scenes import DEFAULT_SIZES as SCENE_SIZES
from .scenes import FashionMNISTScenes

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

_FOLDERS = {"imagefolder": ImageFolder, "voc": VOCSegmentation, "ade20k": ADE20K, "segfolder": SegFolder}


def open_dataset(
    spec: str, split: str, *, root: str | Path | None = None, on_bad_image: str = "fail"
) -> Dataset:
    """Open one split of a dataset by spec string (see module docstring); ``root`` = Fashion-MNIST directory.

    ``on_bad_image="skip"`` leaves unreadable images out and lists them in ``ds.skipped`` (folder layouts).
    """
    name, path, options = parse_spec(spec)
    check_on_bad_image(on_bad_image)
    if name == "fashion-mnist":
        check_options(spec, options, ("source",))
        return FashionMNIST(split, root=root, source=options.get("source", "auto"), spec=spec)
    if name == "fashion-mnist-scenes":
        check_options(spec, options, ("seed", "train", "test", "source"))
        split_key = "train" if split == "train" else "test"
        size = (
            int_option(spec, options, split_key, SCENE_SIZES[split_key], minimum=1)
            if split in ("train", "test", "val")
            else None
        )
        return FashionMNISTScenes(
            split,
            root=root,
            seed=int_option(spec, options, "seed", 0),
            num_scenes=size,
            source=options.get("source", "auto"),
            spec=spec,
        )
    check_options(spec, options, ())
    assert path is not None  # parse_spec guarantees a path for folder specs
    return _FOLDERS[name](path, split, on_bad_image=on_bad_image, spec=spec)


def class_pixel_counts(dataset: Dataset) -> np.ndarray:
    """Pixels of each class in each image, int64 [N, C] (ignore pixels not counted); reads masks only."""
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


def _folder_entry(kind: str, candidates: list[Path]) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "spec": f"{kind}:PATH",
        "task": "segmentation" if kind != "imagefolder" else "classification",
        "num_classes": {"voc": 21, "ade20k": 150}.get(kind, ""),
        "train": "",
        "test": "",
    }
    for path in candidates:
        if not path.is_dir():
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                train = open_dataset(f"{kind}:{path}", "train")
                test = open_dataset(f"{kind}:{path}", "val")
        except QkvprobeError as exc:
            entry["source"] = f"{path}: {exc}"
            return entry
        entry.update(
            spec=f"{kind}:{path}",
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
    """What ``open_dataset`` can open here: dicts with ``spec, task, num_classes, train, test, source``.

    Never downloads; folder layouts are looked for under ``$QKVPROBE_DATA`` (``imagenet``, ``VOCdevkit``,
    ``ADEChallengeData2016``).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        located = _locate_fashion_mnist(allow_download=False)
    train, test = (_count_fashion_mnist(located, s) for s in ("train", "test"))
    entries = [
        {
            "spec": "fashion-mnist",
            "task": "classification",
            "num_classes": 10,
            "train": train,
            "test": test,
            "source": located.source,
        },
        {
            "spec": "fashion-mnist-scenes",
            "task": "segmentation",
            "num_classes": 11,
            "train": SCENE_SIZES["train"],
            "test": SCENE_SIZES["test"],
            "source": f"generated on first use (seed 0) from Fashion-MNIST {located.source}",
        },
    ]
    env = os.environ.get("QKVPROBE_DATA")
    base = Path(env).expanduser() if env else None
    where = {
        "imagefolder": ["imagenet", "ImageNet", "imagefolder"],
        "voc": ["VOCdevkit", "VOC2012"],
        "ade20k": ["ADEChallengeData2016"],
        "segfolder": [],
    }
    for kind, names in where.items():
        entries.append(_folder_entry(kind, [base / n for n in names] if base else []))
    return entries
