"""The on-disk feature store: a directory of ``.npy`` shards plus a ``manifest.json``.

Layout::

    DIR/manifest.json                      written first (pending) and rewritten last (complete)
    DIR/shard-00000/indices.npy            [n] int64 dataset indices of the shard's samples
    DIR/shard-00000/labels.npy             [n] int64 (classification) or
    DIR/shard-00000/patch_labels.npy       [n, h*w] int64 majority label per patch, 255 = ignore
    DIR/shard-00000/b{block}.{token}.{position}.npy   cls/avg [n, D], patch [n, h*w, D]

Shard ``i`` holds the sample range ``[start, stop)`` recorded for it in the manifest: ``[i*S, min((i+1)*S, N))`` for
the shard size ``S`` fixed there, or, for a streamed dataset, a range of at most ``S`` samples inside one part (tar
shard, Parquet file; see :mod:`qkvprobe.data.stream`). Its bytes do not depend on how many processes wrote the
store nor in which order. A shard is written into
``.shard-XXXXX.tmp-<host>-<pid>/``, every file fsynced, then renamed into place: a shard directory that exists is
complete. The manifest is only marked complete after every shard directory has been checked.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StoreError
from ..vocab import HEAD_TOKENS, head_token, split_head

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
#: Fields whose values make up the content key (and are compared, one by one, on a mismatch).
KEY_FIELDS = (
    "backbone_spec",
    "weights_digest",
    "dataset_fingerprint",
    "preprocessing",
    "blocks",
    "tokens",
    "positions",
    "dtype",
    "amp",
)
DTYPES = ("float16", "float32")


def store_key(fields: Mapping[str, Any]) -> str:
    """sha256 hex of the canonical JSON of the :data:`KEY_FIELDS` (same inputs → same key → reuse)."""
    payload = {name: fields[name] for name in KEY_FIELDS}
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def array_name(block: int, token: str, position: str) -> str:
    """File stem of one (block, token, position) array inside a shard."""
    return f"b{block}.{token}.{position}"


def label_names(task: str) -> tuple[str, ...]:
    return ("indices", "patch_labels") if task == "segmentation" else ("indices", "labels")


def shard_files(manifest: Mapping[str, Any]) -> list[str]:
    """Every ``.npy`` file a complete shard of this manifest holds."""
    names = [
        array_name(b, t, p)
        for b in manifest["blocks"]
        for t in manifest["tokens"]
        for p in manifest["positions"]
    ]
    return [f"{n}.npy" for n in (*label_names(manifest["dataset"]["task"]), *names)]


def _fsync_dir(path: Path) -> None:
    # A rename is only durable once the directory entry is on disk.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of the store at ``path``; StoreError if missing, unreadable or of another schema."""
    path = Path(path)
    file = path / MANIFEST
    if not file.is_file():
        raise StoreError(f"{path} is not a feature store (no {MANIFEST}); create it with `qkvprobe extract`")
    try:
        manifest: dict[str, Any] = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise StoreError(f"cannot read {file}: {exc}; delete {path} and re-run the extract command") from None
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise StoreError(
            f"{file} has schema version {manifest.get('schema_version')!r}, this qkvprobe reads "
            f"{SCHEMA_VERSION}; delete {path} and re-run the extract command"
        )
    return manifest


def completed_shards(path: Path, manifest: Mapping[str, Any]) -> list[bool]:
    """Per shard: does its directory exist with every expected file (the rename makes this all-or-nothing)."""
    expected = shard_files(manifest)
    done = []
    for shard in manifest["shards"]:
        d = path / shard["name"]
        done.append(d.is_dir() and all((d / f).is_file() for f in expected))
    return done


def write_shard(path: Path, index: int, arrays: Mapping[str, np.ndarray]) -> None:
    """Write one shard atomically: files into a temporary directory, fsync each, rename the directory."""
    final = path / shard_name(index)
    tmp = path / f".{shard_name(index)}.tmp-{socket.gethostname()}-{os.getpid()}"
    tmp.mkdir(parents=False, exist_ok=True)
    try:
        for name, array in arrays.items():
            with open(tmp / f"{name}.npy", "wb") as fh:
                np.save(fh, np.ascontiguousarray(array), allow_pickle=False)
                fh.flush()
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():
            # A previous run's shard (e.g. finished by a rank that was thought dead): same bytes by
            # construction, so keep the existing one and drop ours.
            _remove_tree(tmp)
            return
        os.rename(tmp, final)
    except BaseException:
        _remove_tree(tmp)
        raise
    _fsync_dir(path)


def _remove_tree(path: Path) -> None:
    if not path.exists():
        return
    for child in path.iterdir():
        child.unlink(missing_ok=True)
    path.rmdir()


def remove_stale_temporaries(path: Path) -> None:
    """Delete ``.shard-*.tmp-*`` directories left by killed writers on this host (only call before writing)."""
    for tmp in path.glob(".shard-*.tmp-*"):
        if tmp.is_dir():
            _remove_tree(tmp)


def mark_shards(path: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Refresh per-shard states from the shard directories; mark complete only when every shard is there."""
    done = completed_shards(path, manifest)
    for shard, ok in zip(manifest["shards"], done, strict=True):
        shard["state"] = "complete" if ok else "pending"
    manifest["num_complete_shards"] = int(sum(done))
    manifest["complete"] = all(done)
    if manifest["complete"]:
        manifest.setdefault("completed_at", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    return manifest


class FeatureStore:
    """A complete feature store opened for reading; arrays are memory-mapped ``.npy`` files.

    Attributes: ``path, manifest, key, num_samples, blocks`` (non-negative), ``tokens, positions, grid`` (h, w),
    ``classes, task, dataset_spec, split, backbone_spec, objective, image_size`` (H', W'), ``patch_size,
    embed_dim, dtype, num_shards``.
    """

    def __init__(self, path: str | Path, manifest: dict[str, Any]) -> None:
        self.path = Path(path)
        self.manifest = manifest
        m = manifest
        self.key: str = m["key"]
        self.num_samples: int = int(m["num_samples"])
        self.blocks: list[int] = [int(b) for b in m["blocks"]]
        self.tokens: list[str] = list(m["tokens"])
        self.positions: list[str] = list(m["positions"])
        self.grid: tuple[int, int] = (int(m["grid"][0]), int(m["grid"][1]))
        self.classes: list[str] = list(m["dataset"]["classes"])
        self.task: str = m["dataset"]["task"]
        self.dataset_spec: str = m["dataset"]["spec"]
        self.split: str = m["dataset"]["split"]
        self.backbone_spec: str = m["backbone"]["spec"]
        self.objective: str = m["backbone"]["objective"]
        self.image_size: tuple[int, int] = (int(m["image_size"][0]), int(m["image_size"][1]))
        self.patch_size: int = int(m["patch_size"])
        self.embed_dim: int = int(m["backbone"]["embed_dim"])
        #: Attention heads (None in stores extracted before it was recorded: no per-head tokens there).
        self.num_heads: int | None = m["backbone"].get("num_heads")
        self.dtype: str = m["dtype"]
        self.num_shards: int = len(m["shards"])

    @classmethod
    def open(cls, path: str | Path) -> FeatureStore:
        """Open a complete store; StoreError if it is missing, incomplete or has lost a shard."""
        path = Path(path)
        manifest = read_manifest(path)
        if not manifest.get("complete"):
            done = sum(completed_shards(path, manifest))
            raise StoreError(
                f"feature store {path} is incomplete ({done} of {len(manifest['shards'])} shards), "
                "re-run the same extract command to resume"
            )
        missing = [
            s["name"]
            for s, ok in zip(manifest["shards"], completed_shards(path, manifest), strict=True)
            if not ok
        ]
        if missing:
            raise StoreError(
                f"feature store {path} is marked complete but shard {missing[0]} is missing or partial; "
                f"delete {path} and re-run the extract command"
            )
        return cls(path, manifest)

    def __repr__(self) -> str:
        return (
            f"FeatureStore({str(self.path)!r}, {self.backbone_spec}, {self.dataset_spec}:{self.split}, "
            f"n={self.num_samples}, blocks={self.blocks}, tokens={self.tokens}, positions={self.positions})"
        )

    # -- addressing -------------------------------------------------------------------------------------
    def resolve_block(self, block: int) -> int:
        """Map ``block`` (negative counts from the backbone's last block) to the stored non-negative index."""
        num_blocks = int(self.manifest["backbone"]["num_blocks"])
        resolved = block % num_blocks if -num_blocks <= block < 0 else block
        if resolved not in self.blocks:
            raise StoreError(
                f"block {block} is not in feature store {self.path} (it holds blocks {self.blocks}); "
                f"re-extract with --blocks {block}"
            )
        return resolved

    def _array_stem(self, token: str, position: str, block: int) -> str:
        base, head = split_head(token)
        if head is None and ".h" in token:
            raise StoreError(
                f"token {token!r}: per-head tokens exist for {', '.join(HEAD_TOKENS)} only, e.g. q.h0"
            )
        token = base  # a head's columns live in its token type's array
        if token not in self.tokens:
            raise StoreError(
                f"token {token!r} is not in feature store {self.path} (it holds {self.tokens}); "
                f"re-extract with --tokens including {token}"
            )
        if position not in self.positions:
            raise StoreError(
                f"position {position!r} is not in feature store {self.path} (it holds {self.positions}); "
                f"re-extract with --positions including {position}"
            )
        return array_name(self.resolve_block(block), token, position)

    def _load(self, shard: int, stem: str) -> np.ndarray:
        file = self.path / self.manifest["shards"][shard]["name"] / f"{stem}.npy"
        try:
            array: np.ndarray = np.load(file, mmap_mode="r", allow_pickle=False)
            return array
        except (OSError, ValueError) as exc:
            raise StoreError(
                f"cannot read {file}: {exc}; delete {self.path} and re-run the extract command"
            ) from None

    def _concat(self, stem: str) -> np.ndarray:
        parts = [self._load(i, stem) for i in range(self.num_shards)]
        # One shard: the memmap itself (no copy). Several: one in-memory array; use iter_chunks to stream.
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

    # -- reads ------------------------------------------------------------------------------------------
    def get(self, token: str, position: str, block: int = -1) -> np.ndarray:
        """Features of one (token, position, block): cls/avg ``[N, D]``, patch ``[N, h*w, D]``, store dtype.

        Memory-mapped (read-only) when the store has one shard; with several shards the shards are
        concatenated in memory — use :meth:`iter_chunks` for bounded memory. A per-head token (``"q.h3"``,
        see :meth:`head_tokens`) is its head's ``D/H`` columns of the stored token type.
        """
        stem, cols = self._array_stem(token, position, block), self._head_columns(token)
        if cols is not None and self.num_shards == 1:
            return self._load(0, stem)[..., cols]  # a strided view of the memmap, no copy
        full = self._concat(stem)
        return full if cols is None else np.ascontiguousarray(full[..., cols])

    def head_tokens(self, tokens: Sequence[str] | None = None) -> list[str]:
        """The per-head tokens (``q.h0`` … ``v.h{H-1}``) of the stored attention token types among ``tokens``."""
        wanted = [
            t for t in (self.tokens if tokens is None else tokens) if t in HEAD_TOKENS and t in self.tokens
        ]
        if wanted:
            self._require_heads("per-head tokens")
        return [head_token(t, h) for t in wanted for h in range(self.num_heads or 0)]

    def _require_heads(self, what: str) -> None:
        if not self.num_heads:
            raise StoreError(
                f"feature store {self.path} does not record the number of attention heads (it was "
                f"extracted before per-head tokens existed); re-run its extract command (it records "
                f"them without recomputing) to use {what}"
            )

    def _head_columns(self, token: str) -> slice | None:
        head = split_head(token)[1]
        if head is None:
            return None
        self._require_heads(repr(token))
        assert self.num_heads is not None
        if head >= self.num_heads:
            raise StoreError(
                f"token {token!r}: the model has {self.num_heads} heads (h0 … h{self.num_heads - 1}); "
                f"pick a head below {self.num_heads}"
            )
        d = self.embed_dim // self.num_heads
        return slice(head * d, (head + 1) * d)

    def iter_chunks(
        self,
        token: str,
        position: str,
        block: int = -1,
        *,
        chunk_size: int | None = None,
        shards: Sequence[int] | None = None,
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Stream ``(start, array)`` pieces in sample order; each is a memmap of at most one shard.

        ``chunk_size`` splits shards further (rows); ``shards`` restricts to some shard ids (e.g.
        ``shard_for_rank(range(store.num_shards), rank, world)`` to spread a read over ranks).
        """
        stem, cols = self._array_stem(token, position, block), self._head_columns(token)
        for i in range(self.num_shards) if shards is None else shards:
            start = int(self.manifest["shards"][i]["start"])
            array = self._load(i, stem)
            if cols is not None:
                array = array[..., cols]
            step = len(array) if chunk_size is None else max(1, int(chunk_size))
            for offset in range(0, len(array), max(step, 1)):
                yield start + offset, array[offset : offset + step]

    def shard_ranges(self) -> list[tuple[int, int]]:
        """``[(start, stop)]`` sample range of every shard."""
        return [(int(s["start"]), int(s["stop"])) for s in self.manifest["shards"]]

    def labels(self) -> np.ndarray:
        """Class index per sample ``[N]`` int64 (classification stores)."""
        if self.task != "classification":
            raise StoreError(
                f"feature store {self.path} is a {self.task} store: use patch_labels() instead of labels()"
            )
        return np.asarray(self._concat("labels"), dtype=np.int64)

    def patch_labels(self) -> np.ndarray:
        """Majority label per patch ``[N, h*w]`` int64, 255 = ignore (segmentation stores)."""
        if self.task != "segmentation":
            raise StoreError(
                f"feature store {self.path} is a {self.task} store: use labels() instead of patch_labels()"
            )
        return np.asarray(self._concat("patch_labels"), dtype=np.int64)

    def indices(self) -> np.ndarray:
        """Dataset index of each stored sample ``[N]`` int64."""
        return np.asarray(self._concat("indices"), dtype=np.int64)
