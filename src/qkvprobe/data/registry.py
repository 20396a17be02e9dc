"""The one list of dataset kinds: spec parsing, task, options, opener, class count, where to look for each.

``config`` (study validation), ``open_dataset``, ``list_datasets`` (``qkvprobe datasets``) and ``study.data``
all read :data:`KINDS`; adding a dataset kind means adding one :class:`DatasetKind` entry here (and its
reader module). This module imports no torch, numpy or reader: a config is validated without loading them.

A spec is ``kind[:path][?key=value&...]``: everything that changes the data is in the string, since a
feature store re-opens its dataset from the recorded spec alone.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from ..errors import SpecError

if TYPE_CHECKING:
    from .base import Dataset

TASKS = ("classification", "segmentation")

#: ``opener(spec, path, options, split, *, root, on_bad_image) -> Dataset``
Opener = Callable[..., "Dataset"]


def _stream_task(options: dict[str, str]) -> str:
    """hfds/wds: segmentation when the spec says ``task=segmentation`` or names a ``mask`` column/key."""
    task = options.get("task", "segmentation" if "mask" in options else "classification")
    if task not in TASKS:
        raise SpecError(f"option task={task!r} must be classification or segmentation")
    return task


@dataclass(frozen=True)
class DatasetKind:
    """One dataset kind (the text before ``:`` or ``?`` in a spec).

    ``task`` is fixed, or a rule on the spec's options; ``opener`` is ``"module:function"``, imported when a
    dataset of this kind is opened; ``num_classes`` is fixed by the kind (None: the data decides);
    ``path`` says whether the spec needs ``:PATH``; ``where`` names folders under ``$QKVPROBE_DATA`` that
    ``list_datasets`` looks into; ``lister`` (``"module:function"``) replaces that search with the kind's
    own entry; ``size_options`` names the spec options that set the train/test sizes of a generated dataset
    (the study passes its ``train_size``/``test_size`` through them instead of subsampling).
    """

    name: str
    task: str | Callable[[dict[str, str]], str]
    opener: str
    options: tuple[str, ...] = ()
    num_classes: int | None = None
    path: bool = False
    where: tuple[str, ...] = ()
    lister: str | None = None
    size_options: tuple[str, str] | None = None
    summary: str = ""

    def task_for(self, options: dict[str, str]) -> str:
        return self.task if isinstance(self.task, str) else self.task(options)

    def open(
        self, spec: str, path: str | None, options: dict[str, str], split: str, **kwargs: Any
    ) -> Dataset:
        return _load(self.opener)(spec, path, options, split, **kwargs)


def _load(target: str) -> Any:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


_STREAM_OPTIONS = ("image", "label", "mask", "task", "classes", "reduce_zero_label")

KINDS: dict[str, DatasetKind] = {
    kind.name: kind
    for kind in (
        DatasetKind(
            "fashion-mnist",
            "classification",
            "qkvprobe.data.fashion_mnist:open_spec",
            options=("source",),
            num_classes=10,
            lister="qkvprobe.data.fashion_mnist:list_entry",
            summary="Fashion-MNIST, 28×28 grey, 10 classes (Debian package, $QKVPROBE_DATA, download or bundled)",
        ),
        DatasetKind(
            "fashion-mnist-scenes",
            "segmentation",
            "qkvprobe.data.scenes:open_spec",
            options=("seed", "train", "test", "source"),
            num_classes=11,
            lister="qkvprobe.data.scenes:list_entry",
            size_options=("train", "test"),
            summary="56×56 2×2 garment canvases generated from Fashion-MNIST, 11 classes with background 0",
        ),
        DatasetKind(
            "imagefolder",
            "classification",
            "qkvprobe.data.folders:open_spec",
            path=True,
            where=("imagenet", "ImageNet", "imagefolder"),
            summary="PATH/train/<class>/<image>, PATH/val/<class>/<image>",
        ),
        DatasetKind(
            "voc",
            "segmentation",
            "qkvprobe.data.folders:open_spec",
            num_classes=21,
            path=True,
            where=("VOCdevkit", "VOC2012"),
            summary="Pascal VOC 2012 segmentation, palette masks, 21 classes",
        ),
        DatasetKind(
            "ade20k",
            "segmentation",
            "qkvprobe.data.folders:open_spec",
            num_classes=150,
            path=True,
            where=("ADEChallengeData2016",),
            summary="ADE20K SceneParsing, 150 classes, label 0 → ignore",
        ),
        DatasetKind(
            "segfolder",
            "segmentation",
            "qkvprobe.data.folders:open_spec",
            path=True,
            summary="PATH/classes.txt with PATH/<split>/images|masks",
        ),
        DatasetKind(
            "hfds",
            _stream_task,
            "qkvprobe.data.hf:open_spec",
            options=(*_STREAM_OPTIONS, "files"),
            path=True,
            where=("imagenet-1k", "scene_parse_150", "hf"),
            summary="Hugging Face datasets: save_to_disk directory, Parquet/Arrow files or a cached hub id",
        ),
        DatasetKind(
            "wds",
            _stream_task,
            "qkvprobe.data.wds:open_spec",
            options=(*_STREAM_OPTIONS, "shards", "train_shards", "test_shards"),
            path=True,
            where=("imagenet-wds", "wds"),
            summary="WebDataset .tar shards: DIR/<split>-*.tar or DIR/<split>/*.tar",
        ),
    )
}

#: Data kinds that need no ``:PATH`` … and those that do (derived; for messages).
SPEC_NAMES: tuple[str, ...] = tuple(KINDS)
PATH_SPECS: tuple[str, ...] = tuple(k for k, v in KINDS.items() if v.path)


def dataset_kind(spec: str) -> str:
    """``"voc:/data/VOC2012"`` -> ``"voc"``; ``"fashion-mnist-scenes?train=500"`` -> ``"fashion-mnist-scenes"``."""
    return spec.partition("?")[0].partition(":")[0].strip().lower()


def get_kind(name: str, spec: str | None = None) -> DatasetKind:
    """The registry entry of ``name``; SpecError with the closest names when unknown."""
    if name in KINDS:
        return KINDS[name]
    if name == "hf":
        raise SpecError(
            f"dataset spec {spec or name!r}: hf: names a model; Hugging Face datasets are read with hfds:PATH_OR_ID"
        )
    close = difflib.get_close_matches(name, SPEC_NAMES, n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(close)}?" if close else f"known specs: {', '.join(SPEC_NAMES)}"
    raise SpecError(f"unknown dataset spec {spec or name!r}; {hint}")


def parse_spec(spec: str) -> tuple[str, str | None, dict[str, str]]:
    """Split ``name[:path][?key=value&...]`` into ``(name, path, options)``; SpecError on a bad spec.

    Checks the kind, that a path is given exactly where the kind needs one, and the option names.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError(
            f"dataset spec must be a non-empty string, got {spec!r}; try one of {', '.join(SPEC_NAMES)}"
        )
    body, _, query = spec.strip().partition("?")
    name, sep, path = body.partition(":")
    kind = get_kind(name.lower(), spec)
    if kind.path and not path:
        raise SpecError(f"dataset spec {spec!r} needs a directory: write {kind.name}:PATH")
    if not kind.path and sep:
        raise SpecError(
            f"dataset spec {spec!r} takes no path; give the data root with root=... (or --data-root)"
        )
    try:
        options = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
    except ValueError:
        raise SpecError(
            f"malformed options {query!r} in dataset spec {spec!r}; write ?key=value&key=value"
        ) from None
    check_options(spec, options, kind.options)
    return kind.name, (path or None), options


def check_options(spec: str, options: dict[str, str], allowed: Iterable[str]) -> None:
    """Refuse options a loader does not know (a typo must not silently fall back to a default)."""
    allowed = tuple(allowed)
    for key in options:
        if key not in allowed:
            valid = ", ".join(allowed) or "none"
            raise SpecError(f"unknown option {key!r} in dataset spec {spec!r}; valid options: {valid}")


def dataset_task(spec: str) -> str:
    """The task a spec's dataset serves, without opening it (``classification`` or ``segmentation``)."""
    name, _, options = parse_spec(spec)
    try:
        return KINDS[name].task_for(options)
    except SpecError as exc:
        raise SpecError(f"dataset spec {spec!r}: {exc}") from None


def search_paths(kind: DatasetKind, base: Path | None) -> list[Path]:
    """Where ``list_datasets`` looks for ``kind`` under ``$QKVPROBE_DATA`` (``base``)."""
    return [base / name for name in kind.where] if base is not None else []


__all__ = [
    "KINDS",
    "PATH_SPECS",
    "SPEC_NAMES",
    "TASKS",
    "DatasetKind",
    "check_options",
    "dataset_kind",
    "dataset_task",
    "get_kind",
    "parse_spec",
]
