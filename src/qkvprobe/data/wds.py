"""``wds:DIR`` — WebDataset ``.tar`` shards, streamed front to back, with the ``webdataset`` library's conventions
(``pip install 'qkvprobe[wds]'``).

Shards of a split: ``DIR/<split>-*.tar`` or ``DIR/<split>/*.tar`` (``test`` also finds ``validation``/``val``),
or an explicit brace pattern relative to ``DIR``: ``?shards=train-{000000..001281}.tar`` (the split a
command asks for), ``?train_shards=…&test_shards=…`` (per split, for ``qkvprobe run``). Samples follow the
library's conventions: the members of one sample share a key (the file name up to its first dot) and sit
next to each other; each sample's image is the first of ``jpg jpeg png webp ppm bmp tif tiff`` it has (or of
the list ``?image=png`` / ``?image=jpg,png``), so one shard may mix formats;
the label the ``cls`` member (an integer as text) or ``json``'s ``label`` (``?label=cls|json``), the mask of a
segmentation set ``seg.png`` (``?mask=``). Class names: ``classes.txt`` beside the shards (or ``?classes=``),
else ``"0"`` … ``"K-1"``.

Every tar's headers are scanned once (stdlib ``tarfile``, which seeks over member data): the scan gives the
sample count, each sample's member offsets and its label, and is cached in
``$QKVPROBE_CACHE/wds-index/`` keyed by the shard's path, size and mtime. The fingerprint is built from the
shards' names, sizes, mtimes and sample counts. The extraction streams each tar front to back, reading the
members at their indexed offsets (bounded memory: one sample at a time; the members of finished shards are
seeked over, not read); random reads (``ds[i]``, ``mask(i)``) seek the same way. The ``webdataset`` library
provides the sample-key rule the index groups members by and the writer (``ShardWriter``) that makes shards. How store shards map onto tar shards: :mod:`qkvprobe.data.stream`.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError, SpecError
from ..io import write_bytes
from ._util import cache_dir, sha256_parts
from .stream import (
    STREAM_HINT,
    StreamDataset,
    StreamOptions,
    label_names,
    read_class_file,
    segmentation_classes,
    split_candidates,
)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "pbm", "bmp", "gif", "tif", "tiff")
LABEL_KEYS = ("cls", "json")
MASK_KEYS = ("seg.png",)
#: Bumped when the cached index layout changes (old entries are then rebuilt, never misread).
INDEX_VERSION = 1
INSTALL_HINT = "pip install 'qkvprobe[wds]' (or: pip install webdataset)"


def _webdataset() -> Any:
    try:
        import webdataset
    except ImportError:
        raise DataError(f"wds: datasets need the webdataset library: {INSTALL_HINT}") from None
    return webdataset


def _key_split(name: str) -> tuple[str | None, str | None]:
    # The library's own rule for sample keys, so the index groups members as its iterator does.
    from webdataset.tariterators import base_plus_ext

    key, ext = base_plus_ext(name)
    return key, (ext.lower() if ext is not None else None)


def _label_value(ext: str, data: bytes, where: str) -> int:
    try:
        if ext == "cls":
            return int(data.decode().strip())
        value = json.loads(data)
        value = value.get("label", value.get("cls")) if isinstance(value, dict) else value
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"no integer 'label' field ({str(value)[:40]!r})")
        return value
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(
            f"label member {where} is not an integer class index ({exc}); write the class index as text"
        ) from None


class TarIndex:
    """Per sample of one tar: ``keys [n]``, ``offsets``/``sizes`` ``[n, E]`` of the member with extension
    ``exts[e]`` (-1: absent) and ``labels[e] [n]`` for the label extensions (-1: absent)."""

    def __init__(
        self, keys: list[str], exts: list[str], offsets: np.ndarray, sizes: np.ndarray, labels: dict
    ):
        self.keys, self.exts, self.offsets, self.sizes, self.labels = keys, exts, offsets, sizes, labels

    def __len__(self) -> int:
        return len(self.keys)

    def column(self, ext: str) -> int:
        return self.exts.index(ext)

    @classmethod
    def scan(cls, path: Path) -> TarIndex:
        """Read the headers of ``path`` (and the small label members); DataError names a corrupt tar."""
        keys: list[str] = []
        rows: list[dict[str, tuple[int, int]]] = []
        labels: list[dict[str, int]] = []
        try:
            with tarfile.open(path, "r:") as tar:
                for member in tar:
                    if not member.isreg():
                        continue
                    base = os.path.basename(member.name)
                    if base.startswith("__") and base.endswith("__"):
                        continue  # the library's metadata members are no samples
                    key, ext = _key_split(member.name)
                    if key is None or ext is None:
                        continue
                    if not keys or keys[-1] != key:
                        keys.append(key)
                        rows.append({})
                        labels.append({})
                    if ext in rows[-1]:
                        raise DataError(
                            f"WebDataset shard {path} has two members {key}.{ext}; every sample key must be unique"
                        )
                    rows[-1][ext] = (member.offset_data, member.size)
                    if ext in LABEL_KEYS:
                        fh = tar.extractfile(member)
                        assert fh is not None  # a regular member always has a file object
                        labels[-1][ext] = _label_value(ext, fh.read(), f"{path}:{member.name}")
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DataError(
                f"cannot read WebDataset shard {path} ({exc}); the tar is corrupt or truncated: {STREAM_HINT}"
            ) from None
        exts = sorted({e for r in rows for e in r})
        offsets = np.full((len(keys), len(exts)), -1, dtype=np.int64)
        sizes = np.full((len(keys), len(exts)), -1, dtype=np.int64)
        for i, row in enumerate(rows):
            for ext, (offset, size) in row.items():
                offsets[i, exts.index(ext)], sizes[i, exts.index(ext)] = offset, size
        label_arrays = {
            ext: np.asarray([lab.get(ext, -1) for lab in labels], dtype=np.int64)
            for ext in LABEL_KEYS
            if any(ext in lab for lab in labels)
        }
        return cls(keys, exts, offsets, sizes, label_arrays)

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(
            buffer,
            keys=np.asarray(self.keys, dtype=str),
            exts=np.asarray(self.exts, dtype=str),
            offsets=self.offsets,
            sizes=self.sizes,
            **{f"label_{k}": v for k, v in self.labels.items()},
        )
        return buffer.getvalue()

    @classmethod
    def from_file(cls, file: Path) -> TarIndex | None:
        try:
            with np.load(file, allow_pickle=False) as npz:
                labels = {k[6:]: npz[k] for k in npz.files if k.startswith("label_")}
                return cls(
                    [str(k) for k in npz["keys"]],
                    [str(e) for e in npz["exts"]],
                    npz["offsets"],
                    npz["sizes"],
                    labels,
                )
        except (OSError, ValueError, KeyError, EOFError):
            return None  # an unreadable cache entry is rebuilt, never trusted


def tar_index(path: Path) -> tuple[TarIndex, os.stat_result]:
    """The header index of one tar, from the cache when the tar's path, size and mtime are unchanged."""
    try:
        stat = path.stat()
    except OSError as exc:
        raise DataError(f"cannot read WebDataset shard {path}: {exc.strerror or exc}") from None
    digest = sha256_parts(str(INDEX_VERSION), str(path.resolve()), str(stat.st_size), str(stat.st_mtime_ns))
    file = cache_dir() / "wds-index" / f"{digest[:32]}.npz"
    index = TarIndex.from_file(file) if file.is_file() else None
    if index is None:
        index = TarIndex.scan(path)
        write_bytes(file, index.to_bytes())
    return index, stat


def find_shards(root: Path, split: str, options: dict[str, str], spec: str) -> tuple[list[Path], str]:
    """The split's tar files (sorted, or in brace-pattern order) and the split name as found."""
    own = options.get("train_shards" if split in ("train", "training") else "test_shards")
    pattern = own or options.get("shards")
    if pattern is not None:
        import braceexpand  # a dependency of webdataset

        files = [Path(p) if Path(p).is_absolute() else root / p for p in braceexpand.braceexpand(pattern)]
        missing = [f for f in files if not f.is_file()]
        if not files or missing:
            raise DataError(
                f"shard {missing[0] if missing else pattern} of the pattern {pattern!r} ({spec}) does not exist; "
                f"fix the pattern (relative to {root})"
            )
        return files, split
    for name in split_candidates(split):
        files = sorted(root.glob(f"{name}-*.tar")) or sorted((root / name).glob("*.tar"))
        if files:
            return files, name
    raise DataError(
        f"no WebDataset shards for split {split!r} in {root}: expected {root}/{split}-*.tar or "
        f"{root}/{split}/*.tar ({', '.join(split_candidates(split))} tried), or name them with ?shards=PATTERN"
    )


class WebDatasetShards(StreamDataset):
    """``wds:DIR`` — one split of WebDataset tar shards (see the module docstring)."""

    def __init__(self, path: str | Path, split: str, options: dict[str, str], spec: str, task: str) -> None:
        _webdataset()
        self.spec, self.task = spec, task
        self.root = Path(path).expanduser()
        if not self.root.is_dir():
            raise DataError(
                f"WebDataset directory not found: {self.root} (spec {spec}); give the shards' folder"
            )
        self.opts = StreamOptions.parse(spec, options, task)
        files, self.split = find_shards(self.root, split, options, spec)
        self.files = files
        self.indexes: list[TarIndex] = []
        parts_fp: list[str] = []
        for file in files:
            index, stat = tar_index(file)
            if len(index) == 0:
                raise DataError(f"WebDataset shard {file} holds no samples; remove it or rebuild it")
            self.indexes.append(index)
            parts_fp.append(f"{self._name(file)}|{stat.st_size}|{stat.st_mtime_ns}|{len(index)}")
        self.parts = [self._name(f) for f in files]
        self.part_sizes = [len(i) for i in self.indexes]
        self.image_keys = self._image_keys(self.opts.image)
        if task == "classification":
            self.target_key = self._member_key(self.opts.label, LABEL_KEYS, "label")
            if self.target_key not in LABEL_KEYS:
                raise SpecError(
                    f"option label={self.target_key!r} in {spec}: labels are read from cls or json"
                )
            self._labels = np.concatenate([self._part_labels(i) for i in range(len(files))])
            names_file = Path(self.opts.classes) if self.opts.classes else self.root / "classes.txt"
            if self.opts.classes and not names_file.is_absolute():
                names_file = self.root / names_file
            given = read_class_file(names_file) if names_file.is_file() else None
            if self.opts.classes and given is None:
                raise DataError(f"class list {names_file} not found ({spec}); one class name per line")
            self.classes = label_names(self._labels, given, spec, f"{spec} {self.split} ({self.target_key})")
        else:
            self.target_key = self._member_key(self.opts.mask, MASK_KEYS, "mask")
            self.classes = segmentation_classes(spec, self.opts, self.root)
        self.source = f"{self.root} ({len(files)} shards)"
        self.fingerprint = sha256_parts(
            "wds", self.split, self.opts.describe(), "\n".join(self.classes), *parts_fp
        )

    def _name(self, file: Path) -> str:
        try:
            return str(file.relative_to(self.root))
        except ValueError:
            return str(file)

    def _member_key(self, given: str | None, candidates: tuple[str, ...], what: str) -> str:
        exts = set(self.indexes[0].exts)
        key = given or next((c for c in candidates if c in exts), None)
        if key is None or key not in exts:
            raise DataError(
                f"WebDataset shard {self.files[0]} has no {what} member "
                f"{'.' + key if key else '(' + ' '.join(candidates) + ')'} (members: {' '.join(sorted(exts))}); "
                f"name it with ?{what}=EXT"
            )
        for file, index in zip(self.files, self.indexes, strict=True):
            if key not in index.exts or (index.offsets[:, index.column(key)] < 0).any():
                row = 0 if key not in index.exts else int(np.argmax(index.offsets[:, index.column(key)] < 0))
                raise DataError(
                    f"sample {index.keys[row]} of WebDataset shard {file} has no .{key} member; every sample needs its {what}"
                )
        return key

    def _image_keys(self, given: str | None) -> tuple[str, ...]:
        """The image extensions to look for, in order (``?image=png`` or a list ``?image=jpg,png``; default
        :data:`IMAGE_KEYS`); DataError naming the first sample that has none of them."""
        keys = (
            tuple(dict.fromkeys(k.strip().lower().lstrip(".") for k in given.split(",") if k.strip()))
            if given
            else IMAGE_KEYS
        )
        if not keys:
            raise SpecError(f"option image= in {self.spec} names no extension; write e.g. ?image=jpg,png")
        for file, index in zip(self.files, self.indexes, strict=True):
            columns = [index.column(k) for k in keys if k in index.exts]
            present = (index.offsets[:, columns] >= 0).any(1) if columns else np.zeros(len(index), dtype=bool)
            if not present.all():
                row = int(np.argmax(~present))
                members = [e for j, e in enumerate(index.exts) if index.offsets[row, j] >= 0]
                raise DataError(
                    f"sample {index.keys[row]} of WebDataset shard {file} has no image member "
                    f"({' '.join('.' + k for k in keys)}; it has {' '.join('.' + m for m in members) or 'none'}); "
                    "name its extension with ?image=EXT (a list: ?image=jpg,png)"
                )
        return keys

    def _image_column(self, index: TarIndex, local: int) -> int:
        """The column of sample ``local``'s image: the first of :attr:`image_keys` it has."""
        for key in self.image_keys:
            if key in index.exts:
                col = index.column(key)
                if index.offsets[local, col] >= 0:
                    return col
        raise DataError(f"sample {index.keys[local]} has no image member ({' '.join(self.image_keys)})")

    def _part_labels(self, part: int) -> np.ndarray:
        return self.indexes[part].labels[self.target_key]

    def targets(self) -> np.ndarray | None:
        """Class index per sample, int64 [N], from the header index (no image read); None for segmentation."""
        return self._labels.copy() if self.task == "classification" else None

    # -- reading -----------------------------------------------------------------------------------------
    def _target_raw(self, part: int, local: int, member: bytes | None) -> Any:
        if self.task == "classification":
            return int(self._part_labels(part)[local])
        return member

    def _iter_raw(self, part: int, wanted: Callable[[int], bool]) -> Iterator[tuple[int, Any, Any, str]]:
        # Front to back through the tar with plain reads at the indexed member offsets: webdataset's own
        # iterator parses every header again in Python's streaming tarfile, about 190 µs a sample against
        # about 20 µs here (benchmarks/bench_extract.py --loading shows the effect on whole-pipeline rates),
        # and it cannot skip the members of finished shards without reading them.
        file, index = self.files[part], self.indexes[part]
        target_col = index.column(self.target_key) if self.task == "segmentation" else None
        local = -1
        try:
            with open(file, "rb") as fh:
                for local in range(len(index)):
                    if not wanted(local):
                        continue
                    image = self._read(fh, file, index, local, self._image_column(index, local))
                    member = (
                        self._read(fh, file, index, local, target_col) if target_col is not None else None
                    )
                    yield local, image, self._target_raw(part, local, member), f"{file}:{index.keys[local]}"
        except OSError as exc:
            raise DataError(
                f"cannot read WebDataset shard {file} at sample {local} ({exc.strerror or exc}); {STREAM_HINT}"
            ) from None

    @staticmethod
    def _read(fh: Any, file: Path, index: TarIndex, local: int, col: int) -> bytes:
        offset, size = int(index.offsets[local, col]), int(index.sizes[local, col])
        fh.seek(offset)
        data = fh.read(size)
        if len(data) != size:
            raise DataError(
                f"WebDataset shard {file} ends inside sample {index.keys[local]} (truncated since it was "
                f"indexed); {STREAM_HINT}"
            )
        return data

    def _raw(self, index: int, *, image: bool = True) -> tuple[Any, Any, str]:
        part, local = self.locate(index)
        file, idx = self.files[part], self.indexes[part]
        try:
            with open(file, "rb") as fh:
                data = self._read(fh, file, idx, local, self._image_column(idx, local)) if image else None
                target = (
                    self._read(fh, file, idx, local, idx.column(self.target_key))
                    if self.task == "segmentation"
                    else None
                )
        except OSError as exc:
            raise DataError(
                f"cannot read WebDataset shard {file} ({exc.strerror or exc}); {STREAM_HINT}"
            ) from None
        return data, self._target_raw(part, local, target), f"{file}:{idx.keys[local]}"


def open_spec(
    spec: str, path: str | None, options: dict[str, str], split: str, *, on_bad_image: str = "fail", **_: Any
) -> WebDatasetShards:
    """Registry opener of ``wds:DIR[?shards=…&image=…&label=…&mask=…&task=…&classes=…]``."""
    from .registry import KINDS
    from .stream import refuse_skip

    refuse_skip(spec, on_bad_image)

    assert path is not None  # the registry requires a path for wds
    return WebDatasetShards(path, split, options, spec, KINDS["wds"].task_for(options))
