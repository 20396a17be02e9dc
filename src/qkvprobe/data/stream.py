"""Datasets stored as ordered parts that are read front to back: WebDataset tar shards, Parquet files.

A stream has no cheap random access, so the feature store maps its fixed sample ranges onto the parts:

- The parts and their sample counts are known when the dataset is opened (Parquet footers; tar headers,
  scanned once and cached), and make up the fingerprint with each part's name, size and mtime — no image
  byte is read for it. Sample ``i`` is sample ``i - start[p]`` of part ``p``, parts in sorted order.
- A store shard never crosses a part: the store's shards are each part's samples cut into ranges of at
  most the shard size (``plan_store``), so every shard is a range inside one part.
- The extraction's unit of work is a part: a DataLoader worker (or the main process) reads one part front to
  back and yields the batches of its missing shards; samples of finished shards are never decoded (a tar's
  members are seeked over forward, a Parquet row group of finished shards is not read). torchrun ranks take
  the parts with missing shards round-robin, so every part is read by one rank only and no rank gets padded
  duplicates.
- Batches start at each shard's first sample, as for map-style datasets, so the bytes of a shard do not
  depend on the number of processes or workers; a killed extraction resumes with the parts whose shards
  are missing and never re-reads a finished part.

Random access (``ds[i]``, ``ds.mask(i)``), which subsets and the segmentation protocol's full-resolution
masks need, is served per reader: tar members by their offsets from the cached header index (one seek and
read each), Parquet rows by row group (a small cache of recently read row groups).

Spec options shared by ``hfds:`` and ``wds:``: ``image``/``label``/``mask`` name the column or member
extension; ``task=segmentation`` (implied by ``mask=``); ``classes=FILE|ade20k|voc`` (segmentation class
names; ``ade20k`` implies ``reduce_zero_label=1``: mask 0 → 255, v → v-1); ``reduce_zero_label=0|1``.
"""

from __future__ import annotations

from abc import abstractmethod
from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError, SpecError
from .base import Dataset
from .files import check_mask, read_image, read_mask

#: ``test`` also finds ``validation``/``val`` (and vice versa), as the folder readers do.
SPLIT_NAMES: dict[str, tuple[str, ...]] = {
    "train": ("train", "training"),
    "test": ("test", "validation", "val"),
    "val": ("val", "validation", "test"),
    "validation": ("validation", "val", "test"),
}
STREAM_HINT = "replace the file (a stream has no --on-bad-image skip)"


def refuse_skip(spec: str, on_bad_image: str) -> None:
    """``--on-bad-image skip`` decodes every image when a dataset is opened: not for datasets of this size."""
    if on_bad_image != "fail":
        raise DataError(
            f"--on-bad-image {on_bad_image} is not available for {spec.partition(':')[0]}: datasets; a bad image "
            "stops the extraction with its file and sample named: replace it, then re-run (the store resumes)"
        )


def split_candidates(split: str) -> tuple[str, ...]:
    return SPLIT_NAMES.get(split, (split,))


@dataclass(frozen=True)
class StreamOptions:
    """The shared spec options, parsed: column / member names, task, class names, label convention."""

    task: str
    image: str | None
    label: str | None
    mask: str | None
    classes: str | None
    reduce_zero_label: bool

    @classmethod
    def parse(cls, spec: str, options: dict[str, str], task: str) -> StreamOptions:
        classes = options.get("classes")
        flag = options.get("reduce_zero_label", "1" if classes == "ade20k" else "0")
        if flag not in ("0", "1"):
            raise SpecError(f"option reduce_zero_label={flag!r} in dataset spec {spec!r} must be 0 or 1")
        if task == "classification" and ("reduce_zero_label" in options or classes in ("ade20k", "voc")):
            raise SpecError(
                f"dataset spec {spec!r}: reduce_zero_label and classes=ade20k|voc are for segmentation; add task=segmentation"
            )
        return cls(
            task=task,
            image=options.get("image"),
            label=options.get("label"),
            mask=options.get("mask"),
            classes=classes,
            reduce_zero_label=flag == "1",
        )

    def describe(self) -> str:
        return (
            f"{self.task}|{self.image}|{self.label}|{self.mask}|{self.classes}|{int(self.reduce_zero_label)}"
        )


def segmentation_classes(spec: str, opts: StreamOptions, root: Path | None) -> list[str]:
    """Class names of a segmentation stream: ``classes=ade20k|voc|FILE`` or ``classes.txt`` beside the data."""
    from .folders import ADE20K_CLASSES, VOC_CLASSES

    if opts.classes == "ade20k":
        return list(ADE20K_CLASSES)
    if opts.classes == "voc":
        return list(VOC_CLASSES)
    file = Path(opts.classes).expanduser() if opts.classes else (root / "classes.txt" if root else None)
    if file is not None and not file.is_absolute() and root is not None and opts.classes:
        file = root / file
    if file is None or not file.is_file():
        where = f"{file} not found; " if file is not None else ""
        raise DataError(
            f"{where}name the classes of {spec}: add ?classes=ade20k, ?classes=voc or ?classes=FILE "
            "(one name per line, line i = class i)"
        )
    return read_class_file(file)


def read_class_file(file: Path) -> list[str]:
    names = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    if not names or len(names) > 255:
        raise DataError(f"{file} lists {len(names)} classes; expected 1..255 (255 is the ignore label)")
    return names


def label_names(labels: np.ndarray, given: list[str] | None, spec: str, where: str) -> list[str]:
    """Class names of a classification stream: ``given`` (ClassLabel, classes.txt) or ``"0"`` … ``"K-1"``."""
    top = int(labels.max()) if len(labels) else -1
    if len(labels) and int(labels.min()) < 0:
        raise DataError(f"{where} holds the negative class index {int(labels.min())}; labels must be 0..K-1")
    if given is not None:
        if top >= len(given):
            raise DataError(
                f"{where} holds class index {top} but {spec} names only {len(given)} classes; fix the labels or the class list"
            )
        return list(given)
    return [str(i) for i in range(top + 1)]


class StreamDataset(Dataset):
    """A dataset whose samples live in ordered parts (``parts``: names relative to ``root``, ``part_sizes``).

    Subclasses implement :meth:`_iter_raw` (one part front to back) and :meth:`_raw` (one sample by index),
    both giving ``(image bytes, target raw)`` where the target is an int (classification) or mask bytes.
    """

    root: Path | None
    parts: list[str]
    part_sizes: list[int]
    opts: StreamOptions
    reduce_zero_label: bool = False
    skipped: list[str] = []  # noqa: RUF012 - streams never skip

    # -- layout ------------------------------------------------------------------------------------------
    def part_starts(self) -> list[int]:
        """First global index of every part (``len(parts)`` entries)."""
        return [int(s) for s in np.concatenate([[0], np.cumsum(self.part_sizes)[:-1]])]

    def locate(self, index: int) -> tuple[int, int]:
        """``(part, index within the part)`` of global sample ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} is outside {self.spec} {self.split} (0..{len(self) - 1})")
        starts = self.part_starts()
        part = bisect_right(starts, index) - 1
        return part, index - starts[part]

    def __len__(self) -> int:
        return int(sum(self.part_sizes))

    def describe_parts(self) -> list[dict[str, Any]]:
        """``[{"name", "num_samples"}]`` per part, for the feature store's manifest."""
        return [{"name": n, "num_samples": int(s)} for n, s in zip(self.parts, self.part_sizes, strict=True)]

    # -- reading -----------------------------------------------------------------------------------------
    @abstractmethod
    def _iter_raw(self, part: int, wanted: Callable[[int], bool]) -> Iterator[tuple[int, Any, Any, str]]:
        """``(index within part, image raw, target raw, sample name)`` of the wanted samples, in order."""

    @abstractmethod
    def _raw(self, index: int, *, image: bool = True) -> tuple[Any, Any, str]:
        """``(image raw or None, target raw, sample name)`` of one sample by global index."""

    def iter_part(
        self, part: int, wanted: Callable[[int], bool] | None = None
    ) -> Iterator[tuple[int, torch.Tensor, Any]]:
        """``(global index, image uint8 [C,H,W], target)`` of part ``part`` in order; samples whose index within
        the part fails ``wanted`` are passed over without decoding."""
        start = self.part_starts()[part]
        for local, image_raw, target_raw, name in self._iter_raw(part, wanted or (lambda _: True)):
            yield start + local, *self._decode(image_raw, target_raw, name)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        image_raw, target_raw, name = self._raw(int(index))
        return self._decode(image_raw, target_raw, name)

    def mask(self, index: int) -> torch.Tensor:
        """Segmentation: the full-resolution mask int64 [H, W] of sample ``index`` (one random read)."""
        if self.task != "segmentation":
            raise DataError(f"{self.spec} is a {self.task} dataset; it has no masks")
        _, target_raw, name = self._raw(int(index), image=False)
        raw = read_mask(target_raw, kind="mask", name=f"{name} (mask)", hint=STREAM_HINT)
        return self._check(raw, (raw.shape[1], raw.shape[0]), name)

    def _decode(self, image_raw: Any, target_raw: Any, name: str) -> tuple[torch.Tensor, Any]:
        image = read_image(image_raw, name=f"{name} (image)", hint=STREAM_HINT)
        if self.task == "classification":
            return image, int(target_raw)
        raw = read_mask(target_raw, kind="mask", name=f"{name} (mask)", hint=STREAM_HINT)
        return image, self._check(raw, (image.shape[-1], image.shape[-2]), name)

    def _check(self, raw: np.ndarray, size: tuple[int, int], name: str) -> torch.Tensor:
        return check_mask(
            raw,
            num_classes=len(self.classes),
            reduce_zero_label=self.opts.reduce_zero_label,
            size=size,
            mask_name=f"{name} (mask)",
            image_name=f"{name} (image)",
        )


def batches_of(ranges: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """The batches of shard ranges ``[(start, stop)]``: each shard cut from its first sample on, so a batch never
    crosses a shard and its samples are the same whoever reads it."""
    return [
        list(range(b, min(b + batch_size, stop)))
        for start, stop in ranges
        for b in range(start, stop, batch_size)
    ]
