"""``hfds:PATH_OR_ID`` — Hugging Face ``datasets`` (``pip install 'qkvprobe[hf]'``), read in place.

What ``PATH_OR_ID`` may be (nothing is converted or copied):

- a ``DatasetDict.save_to_disk`` directory (``dataset_dict.json`` + one folder per split) or a folder of
  ``<split>/`` ``save_to_disk`` datasets: memory-mapped Arrow, random access (``datasets.load_from_disk``);
- a folder of Arrow files (``<split>/*.arrow``, ``*-<split>-*.arrow`` as in the ``datasets`` cache):
  memory-mapped (``datasets.Dataset.from_file``);
- a folder of Parquet files (``<split>-*.parquet``, ``data/<split>-*.parquet`` as the hub lays them out,
  ``<split>/*.parquet``; or ``?files=PATTERN``, a brace pattern relative to the folder): streamed, one file
  after the other, in row groups (pyarrow, ``datasets``' own engine: ``datasets.load_dataset("parquet")``
  would first copy every file into an Arrow cache). The store maps its shards onto the files as described
  in :mod:`qkvprobe.data.stream`; row counts come from the Parquet footers;
- a hub id the user's own ``datasets`` cache holds (``datasets.load_dataset(ID, split=…)``;
  ``HF_DATASETS_OFFLINE=1`` keeps it offline).

``--split test`` also finds ``validation``/``val``. Columns: ``?image=`` (default ``image``, else ``img``,
``jpg``, ``png``), ``?label=`` (default ``label``, else ``labels``, ``cls``, ``fine_label``), ``?mask=`` for
segmentation (default ``annotation``, else ``mask``, ``seg``, ``segmentation``, ``label`` as an image);
class names from the label column's ``ClassLabel`` feature, else ``classes.txt`` beside the data (or
``?classes=``), else ``"0"`` … ``"K-1"``. Images are decoded from the stored bytes with the same PIL code as
the folder readers, so the same files give the same pixels. The fingerprint covers the files' names, sizes,
mtimes and row counts (and the split's own ``datasets`` fingerprint for saved datasets), not their bytes.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError
from ._util import sha256_parts
from .base import Dataset
from .stream import (
    STREAM_HINT,
    StreamDataset,
    StreamOptions,
    label_names,
    read_class_file,
    segmentation_classes,
    split_candidates,
)

INSTALL_HINT = "pip install 'qkvprobe[hf]' (or: pip install datasets)"
IMAGE_COLUMNS = ("image", "img", "jpg", "png")
LABEL_COLUMNS = ("label", "labels", "cls", "fine_label")
MASK_COLUMNS = ("annotation", "mask", "seg", "segmentation", "label")
#: Row groups a Parquet reader keeps for random reads (``ds[i]``, ``mask(i)``): sequential reads hit the last
#: one, the few-shot protocol's scattered mask reads a recent one.
ROW_GROUP_CACHE = 8


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError(f"hfds: datasets need the Hugging Face datasets library: {INSTALL_HINT}") from None
    datasets.disable_progress_bars()
    return datasets


def _column(given: str | None, names: list[str], candidates: tuple[str, ...], what: str, where: str) -> str:
    if given is not None:
        if given not in names:
            raise DataError(
                f"{where} has no column {given!r} (columns: {', '.join(names)}); name the {what} column with ?{what}=COLUMN"
            )
        return given
    found = next((c for c in candidates if c in names), None)
    if found is None:
        raise DataError(
            f"{where} has no {what} column ({' or '.join(candidates)}; columns: {', '.join(names)}); "
            f"name it with ?{what}=COLUMN"
        )
    return found


def _check_image_feature(feature: Any, column: str, where: str) -> None:
    import pyarrow as pa

    datasets = _datasets()
    if isinstance(feature, datasets.Image):
        return
    arrow = getattr(feature, "pa_type", None) or (feature if isinstance(feature, pa.DataType) else None)
    if isinstance(feature, datasets.Value) and feature.dtype in ("binary", "large_binary"):
        return
    if arrow is not None and (pa.types.is_binary(arrow) or pa.types.is_large_binary(arrow)):
        return
    kind = getattr(feature, "dtype", None) or type(feature).__name__
    raise DataError(
        f"column {column!r} of {where} holds {kind}, expected images (an Image feature or encoded image bytes); "
        "name the image column with ?image=COLUMN"
    )


def _check_label_feature(feature: Any, column: str, where: str) -> list[str] | None:
    """ClassLabel → its names; an integer Value → None; anything else → DataError."""
    datasets = _datasets()
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    if isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")):
        return None
    kind = getattr(feature, "dtype", None) or type(feature).__name__
    raise DataError(
        f"column {column!r} of {where} holds {kind}, expected integer class indices (a ClassLabel or int column); "
        "name the label column with ?label=COLUMN"
    )


def _image_bytes(value: Any, name: str) -> bytes:
    """The encoded bytes of one image cell (an Image feature's ``{"bytes", "path"}`` or plain bytes)."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return value["bytes"]
        if value.get("path"):
            try:
                return Path(value["path"]).read_bytes()
            except OSError as exc:
                raise DataError(
                    f"{name}: cannot read the image file {value['path']} ({exc.strerror})"
                ) from None
    if isinstance(value, bytes):
        return value
    raise DataError(f"{name} holds no image bytes ({type(value).__name__}); {STREAM_HINT}")


class _Columns:
    """Column choice, task and class names, shared by the Arrow and Parquet readers."""

    spec: str
    task: str
    opts: StreamOptions
    root: Path | None

    def _choose_columns(self, features: Any, where: str) -> list[str] | None:
        names = list(features)
        self.image_column = _column(self.opts.image, names, IMAGE_COLUMNS, "image", where)
        _check_image_feature(features[self.image_column], self.image_column, where)
        if self.task == "classification":
            self.target_column = _column(self.opts.label, names, LABEL_COLUMNS, "label", where)
            feature = features[self.target_column]
            if isinstance(feature, _datasets().Image):
                raise DataError(
                    f"column {self.target_column!r} of {where} holds images: for segmentation write ?task=segmentation"
                )
            return _check_label_feature(feature, self.target_column, where)
        self.target_column = _column(self.opts.mask, names, MASK_COLUMNS, "mask", where)
        _check_image_feature(features[self.target_column], self.target_column, where)
        return None

    def _class_names(self, labels: np.ndarray | None, given: list[str] | None, where: str) -> list[str]:
        if self.task == "segmentation":
            return segmentation_classes(self.spec, self.opts, self.root)
        if given is None and self.opts.classes:
            file = Path(self.opts.classes)
            given = read_class_file(file if file.is_absolute() or self.root is None else self.root / file)
        elif given is None and self.root is not None and (self.root / "classes.txt").is_file():
            given = read_class_file(self.root / "classes.txt")
        assert labels is not None
        return label_names(labels, given, self.spec, f"{where} column {self.target_column!r}")


class HFArrowDataset(_Columns, Dataset):
    """A memory-mapped ``datasets.Dataset`` (saved to disk, Arrow files or a cached hub dataset)."""

    def __init__(
        self,
        table: Any,
        spec: str,
        split: str,
        task: str,
        opts: StreamOptions,
        root: Path | None,
        source: str,
        parts_fp: list[str],
    ) -> None:
        datasets = _datasets()
        self.spec, self.split, self.task, self.opts, self.root = spec, split, task, opts, root
        where = f"{spec} {split}"
        given = self._choose_columns(table.features, where)
        # Raw bytes, decoded below with the folder readers' code (the same file → the same pixels).
        for column in (
            {self.image_column, self.target_column} if task == "segmentation" else {self.image_column}
        ):
            table = table.cast_column(column, datasets.Image(decode=False))
        self.table = table.select_columns([self.image_column, self.target_column])
        if (
            getattr(self.table, "_indices", None) is not None
        ):  # a selection view: make row i the i-th stored row
            self.table = self.table.flatten_indices()
        self._cells: dict[str, tuple[list, np.ndarray]] | None = None
        labels = None
        if task == "classification":
            labels = np.asarray(self.table.with_format("numpy")[self.target_column], dtype=np.int64)
        self._labels = labels
        self.classes = self._class_names(labels, given, where)
        self.source = source
        self.fingerprint = sha256_parts("hfds", split, opts.describe(), "\n".join(self.classes), *parts_fp)
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.table)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cells"] = None  # workers re-map the Arrow files instead of receiving their bytes
        return state

    def _row(self, index: int, columns: tuple[str, ...]) -> dict[str, Any]:
        # Straight to the memory-mapped Arrow chunks: datasets' own row access formats a whole row through
        # its formatter, which made this reader slower than the image folder (benchmarks/bench_extract.py
        # --loading).
        if self._cells is None:
            self._cells = {}
            for name in (self.image_column, self.target_column):
                chunks = self.table.data.table.column(name).chunks
                self._cells[name] = (chunks, np.cumsum([0, *(len(c) for c in chunks)]))
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} is outside {self.spec} {self.split} (0..{len(self) - 1})")
        row = {}
        for name in columns:
            chunks, starts = self._cells[name]
            k = int(np.searchsorted(starts, index, side="right") - 1)
            row[name] = chunks[k][index - int(starts[k])].as_py()
        return row

    def _decode(self, row: dict[str, Any], index: int) -> tuple[torch.Tensor, Any]:
        from .files import check_mask, read_image, read_mask

        name = f"{self.spec} {self.split} row {index}"
        image = read_image(_image_bytes(row[self.image_column], name), name=name, hint=STREAM_HINT)
        if self.task == "classification":
            return image, int(row[self.target_column])
        mask = read_mask(_image_bytes(row[self.target_column], name), name=f"{name} mask", hint=STREAM_HINT)
        return image, check_mask(
            mask,
            num_classes=len(self.classes),
            reduce_zero_label=self.opts.reduce_zero_label,
            size=(image.shape[-1], image.shape[-2]),
            mask_name=f"{name} mask",
            image_name=name,
        )

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        return self._decode(self._row(int(index), (self.image_column, self.target_column)), int(index))

    def mask(self, index: int) -> torch.Tensor:
        """Segmentation: the full-resolution mask int64 [H, W] of row ``index`` (the image is not decoded)."""
        from .files import check_mask, read_mask

        if self.task != "segmentation":
            raise DataError(f"{self.spec} is a {self.task} dataset; it has no masks")
        name = f"{self.spec} {self.split} row {index}"
        raw = read_mask(
            _image_bytes(self._row(int(index), (self.target_column,))[self.target_column], name),
            name=f"{name} mask",
            hint=STREAM_HINT,
        )
        return check_mask(
            raw,
            num_classes=len(self.classes),
            reduce_zero_label=self.opts.reduce_zero_label,
            size=(raw.shape[1], raw.shape[0]),
            mask_name=f"{name} mask",
            image_name=name,
        )

    def targets(self) -> np.ndarray | None:
        """Class index per row, int64 [N] (the label column alone); None for segmentation."""
        return None if self._labels is None else self._labels.copy()


class HFParquetDataset(_Columns, StreamDataset):
    """Parquet files of one split, streamed file by file in row groups (see the module docstring)."""

    def __init__(
        self, files: list[Path], spec: str, split: str, task: str, opts: StreamOptions, root: Path
    ) -> None:
        import pyarrow.parquet as pq

        datasets = _datasets()
        self.spec, self.split, self.task, self.opts, self.root = spec, split, task, opts, root
        self.files = files
        where = f"{spec} {split} ({files[0]})"
        try:
            schema = pq.read_schema(files[0])
            meta = [pq.ParquetFile(f).metadata for f in files]
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise DataError(
                f"cannot read Parquet file of {spec}: {str(exc).splitlines()[0]}; {STREAM_HINT}"
            ) from None
        features = datasets.Features.from_arrow_schema(schema)
        given = self._choose_columns(features, where)
        self.parts = [self._name(f) for f in files]
        self.part_sizes = [int(m.num_rows) for m in meta]
        empty = [f for f, n in zip(files, self.part_sizes, strict=True) if n == 0]
        if empty:
            raise DataError(f"Parquet file {empty[0]} of {spec} holds no rows; remove it")
        self._group_starts = [
            np.concatenate([[0], np.cumsum([m.row_group(g).num_rows for g in range(m.num_row_groups)])])
            for m in meta
        ]
        labels = None
        if task == "classification":
            try:
                labels = np.concatenate(
                    [pq.read_table(f, columns=[self.target_column]).column(0).to_numpy() for f in files]
                ).astype(np.int64)
            except (OSError, ValueError) as exc:
                raise DataError(
                    f"cannot read the label column of {spec}: {str(exc).splitlines()[0]}"
                ) from None
        self._labels = labels
        self.classes = self._class_names(labels, given, where)
        self.source = f"{root} ({len(files)} Parquet files)"
        parts_fp = [
            f"{name}|{f.stat().st_size}|{f.stat().st_mtime_ns}|{n}"
            for name, f, n in zip(self.parts, files, self.part_sizes, strict=True)
        ]
        self.fingerprint = sha256_parts("hfds", split, opts.describe(), "\n".join(self.classes), *parts_fp)
        self._cache: OrderedDict[tuple[int, int, bool], Any] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = OrderedDict()  # DataLoader workers start with an empty cache
        return state

    def _name(self, file: Path) -> str:
        try:
            return str(file.relative_to(self.root)) if self.root else str(file)
        except ValueError:
            return str(file)

    def targets(self) -> np.ndarray | None:
        """Class index per row, int64 [N] (the label column alone); None for segmentation."""
        return None if self._labels is None else self._labels.copy()

    def _columns(self, image: bool) -> list[str]:
        return [self.image_column, self.target_column] if image else [self.target_column]

    def _row_group(self, part: int, group: int, image: bool) -> dict[str, list]:
        import pyarrow.parquet as pq

        key = (part, group, image)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        try:
            table = pq.ParquetFile(self.files[part]).read_row_group(group, columns=self._columns(image))
        except (OSError, ValueError) as exc:
            raise DataError(
                f"cannot read row group {group} of {self.files[part]} ({str(exc).splitlines()[0]}); {STREAM_HINT}"
            ) from None
        rows = table.to_pydict()
        self._cache[key] = rows
        while len(self._cache) > ROW_GROUP_CACHE:
            self._cache.popitem(last=False)
        return rows

    def _target_raw(self, value: Any, name: str) -> Any:
        return int(value) if self.task == "classification" else _image_bytes(value, f"{name} mask")

    def _iter_raw(self, part: int, wanted: Callable[[int], bool]) -> Iterator[tuple[int, Any, Any, str]]:
        import pyarrow.parquet as pq

        starts = self._group_starts[part]
        handle = pq.ParquetFile(self.files[part])
        for group in range(len(starts) - 1):
            lo, hi = int(starts[group]), int(starts[group + 1])
            if not any(wanted(i) for i in range(lo, hi)):
                continue  # a row group of finished shards is never read
            try:
                rows = handle.read_row_group(group, columns=self._columns(True)).to_pydict()
            except (OSError, ValueError) as exc:
                raise DataError(
                    f"cannot read row group {group} of {self.files[part]} ({str(exc).splitlines()[0]}); {STREAM_HINT}"
                ) from None
            for j in range(hi - lo):
                if not wanted(lo + j):
                    continue
                name = f"{self.files[part]} row {lo + j}"
                image = _image_bytes(rows[self.image_column][j], name)
                yield lo + j, image, self._target_raw(rows[self.target_column][j], name), name

    def _raw(self, index: int, *, image: bool = True) -> tuple[Any, Any, str]:
        part, local = self.locate(index)
        starts = self._group_starts[part]
        group = int(np.searchsorted(starts, local, side="right") - 1)
        rows = self._row_group(part, group, image)
        j = local - int(starts[group])
        name = f"{self.files[part]} row {local}"
        return (
            _image_bytes(rows[self.image_column][j], name) if image else None,
            self._target_raw(rows[self.target_column][j], name),
            name,
        )


# ---- opening ------------------------------------------------------------------------------------------
def _stat_parts(root: Path, files: list[Path]) -> list[str]:
    out = []
    for f in files:
        st = f.stat()
        try:
            name = str(f.relative_to(root))
        except ValueError:
            name = str(f)
        out.append(f"{name}|{st.st_size}|{st.st_mtime_ns}")
    return out


def _split_files(root: Path, split: str, suffix: str) -> tuple[list[Path], str] | None:
    for name in split_candidates(split):
        for pattern in (
            f"{name}/*.{suffix}",
            f"data/{name}-*.{suffix}",
            f"{name}-*.{suffix}",
            f"*-{name}-*.{suffix}",
            f"*-{name}.{suffix}",
            f"{name}.{suffix}",
        ):
            files = sorted(root.glob(pattern))
            if files:
                return files, name
    return None


def _saved_split(root: Path, split: str) -> tuple[Path, str] | None:
    """The ``save_to_disk`` folder of ``split`` inside a DatasetDict folder (or a folder of saved splits)."""
    names = None
    if (root / "dataset_dict.json").is_file():
        try:
            names = json.loads((root / "dataset_dict.json").read_text())["splits"]
        except (OSError, ValueError, KeyError):
            raise DataError(f"cannot read {root / 'dataset_dict.json'}; re-save the DatasetDict") from None
    for name in split_candidates(split):
        if (names is None or name in names) and (root / name / "state.json").is_file():
            return root / name, name
    return None


def open_spec(
    spec: str, path: str | None, options: dict[str, str], split: str, *, on_bad_image: str = "fail", **_: Any
) -> Dataset:
    """Registry opener of ``hfds:PATH_OR_ID[?image=…&label=…&mask=…&task=…&classes=…&files=…]``."""
    from .registry import KINDS
    from .stream import refuse_skip

    refuse_skip(spec, on_bad_image)

    assert path is not None  # the registry requires a path for hfds
    datasets = _datasets()
    task = KINDS["hfds"].task_for(options)
    opts = StreamOptions.parse(spec, options, task)
    root = Path(path).expanduser()
    tried = ", ".join(split_candidates(split))
    if root.is_dir():
        if "files" in options:
            try:
                import braceexpand  # a dependency of webdataset, installed by the same extra
            except ImportError:
                raise DataError(f"?files= patterns need braceexpand: {INSTALL_HINT}") from None

            files = [root / p for p in braceexpand.braceexpand(options["files"])]
            missing = [f for f in files if not f.is_file()]
            if missing:
                raise DataError(f"file {missing[0]} of ?files={options['files']} ({spec}) does not exist")
            return _from_files(files, root, spec, split, task, opts, datasets)
        saved = _saved_split(root, split)
        if saved is not None:
            table = datasets.load_from_disk(str(saved[0]))
            parts_fp = [
                *_stat_parts(root, sorted(saved[0].glob("*.arrow"))),
                getattr(table, "_fingerprint", ""),
            ]
            return HFArrowDataset(
                table, spec, saved[1], task, opts, root, f"{saved[0]} (save_to_disk)", parts_fp
            )
        if (root / "state.json").is_file():
            raise DataError(
                f"{root} holds one saved split, not a DatasetDict; save the splits with "
                "DatasetDict({'train': ..., 'test': ...}).save_to_disk(DIR) and give DIR"
            )
        for suffix in ("parquet", "arrow"):
            found = _split_files(root, split, suffix)
            if found is not None:
                return _from_files(found[0], root, spec, found[1], task, opts, datasets)
        raise DataError(
            f"no split {split!r} ({tried}) in {root} ({spec}): expected a DatasetDict saved with save_to_disk, "
            f"<split>-*.parquet, data/<split>-*.parquet or <split>/*.parquet|arrow files; or name them with ?files=PATTERN"
        )
    if path.startswith(("/", ".", "~")):
        raise DataError(f"Hugging Face dataset directory not found: {root} (spec {spec})")
    return _from_hub(path, spec, split, task, opts, datasets)


def _from_files(
    files: list[Path], root: Path, spec: str, split: str, task: str, opts: StreamOptions, datasets: Any
) -> Dataset:
    if not files:
        raise DataError(f"no files for split {split!r} of {spec}")
    if all(f.suffix == ".parquet" for f in files):
        return HFParquetDataset(files, spec, split, task, opts, root)
    if all(f.suffix == ".arrow" for f in files):
        try:
            tables = [datasets.Dataset.from_file(str(f)) for f in files]
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read Arrow files of {spec}: {str(exc).splitlines()[0]}") from None
        table = tables[0] if len(tables) == 1 else datasets.concatenate_datasets(tables)
        return HFArrowDataset(
            table,
            spec,
            split,
            task,
            opts,
            root,
            f"{root} ({len(files)} Arrow files)",
            _stat_parts(root, files),
        )
    raise DataError(
        f"the files of {spec} {split} mix formats ({files[0].name}, …); give .parquet or .arrow files"
    )


def _from_hub(name: str, spec: str, split: str, task: str, opts: StreamOptions, datasets: Any) -> Dataset:
    last: Exception | None = None
    for candidate in split_candidates(split):
        try:
            table = datasets.load_dataset(name, split=candidate)
        except ValueError as exc:  # an unknown split
            last = exc
            continue
        except Exception as exc:  # datasets raises many types for "not there" and "offline"
            raise DataError(
                f"hfds:{name} is neither a local folder nor a dataset your datasets cache holds "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); download it once with "
                f"datasets.load_dataset({name!r}) or give a local folder"
            ) from None
        files = [Path(c["filename"]) for c in table.cache_files]
        parts_fp = [*(f"{f.name}|{f.stat().st_size}" for f in files), getattr(table, "_fingerprint", "")]
        return HFArrowDataset(table, spec, candidate, task, opts, None, f"datasets cache ({name})", parts_fp)
    raise DataError(
        f"hfds:{name} has no split {split!r} ({', '.join(split_candidates(split))} tried): {last}"
    )


__all__ = ["HFArrowDataset", "HFParquetDataset", "open_spec"]
