"""Atomic file writes: the one way qkvprobe writes a file that someone may read (a feature-store shard, several
files published together, is written into a temporary folder renamed whole: :func:`qkvprobe.features.store.write_shard`).

Every writer here creates a temporary file beside the target (same directory, hence same file system), writes
it, optionally fsyncs it, and renames it over the target with :func:`os.replace`. Readers see the old file or
the new one, never half of one; on any failure (an exception, ``KeyboardInterrupt``) the temporary file is
removed and an existing target is left unchanged. A process killed outright (SIGKILL) can leave a temporary
file behind, never a truncated target; :func:`temporaries` finds such leftovers. Across a power loss only
``fsync=True`` writes are guaranteed to hold their new content.

File mode: the temporary file is created with ``os.open(..., 0o666)``, so the kernel applies the process umask
(and a directory's default ACL) exactly as for any newly created file: ``0o666 & ~umask``, ``0644`` under
umask 022. :func:`tempfile.mkstemp` is not used because it creates ``0600`` files, which colleagues on a shared
cluster cannot read; reading the umask to ``chmod`` afterwards would need ``os.umask`` set/restore, which is
process-global and races with other threads creating files.

Temporary names: ``.<name>.<8 hex>.tmp<suffix>`` (the target's suffix kept last, since writers such as
``np.savez`` and matplotlib's ``savefig`` pick or append an extension by it).

Durability: ``fsync=True`` flushes the file to disk before the rename and the directory entry after it (the
feature store's manifest); the other writers rely on the rename's atomicity alone.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np

from .errors import QkvprobeError

__all__ = [
    "atomic_open",
    "atomic_path",
    "fsync_dir",
    "read_json",
    "temporaries",
    "write_bytes",
    "write_json",
    "write_text",
]

_TMP = ".tmp"
_NAME_CHARS = 100  # of the target's name kept in the temporary's, so the latter stays under NAME_MAX (255)
_MODES = {"w": "w", "wt": "w", "wb": "wb"}


def _temp_prefix(path: Path) -> str:
    return f".{path.name[:_NAME_CHARS]}."


def _create_temp(path: Path) -> tuple[int, Path]:
    """A new, empty temporary file beside ``path`` (created exclusively, mode ``0o666 & ~umask``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = path.parent / f"{_temp_prefix(path)}{secrets.token_hex(4)}{_TMP}{path.suffix}"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def temporaries(path: str | os.PathLike) -> list[Path]:
    """The temporary files of ``path`` that this module's writers left behind (killed mid-write)."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    prefix, tail = _temp_prefix(path), f"{_TMP}{path.suffix}"
    found = []
    for p in path.parent.iterdir():
        middle = p.name[len(prefix) : len(p.name) - len(tail)]
        if p.name.startswith(prefix) and p.name.endswith(tail) and len(middle) == 8:
            found.append(p)
    return sorted(found)


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory, so that a rename inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for a writer that wants a file name (``torch.save``,
    ``np.savez``, safetensors' ``save_file``, ``savefig``); on leaving the block without an exception, rename it
    over ``path``. The temporary file exists (empty) when yielded and ends with ``path``'s suffix."""
    path = Path(path)
    fd, tmp = _create_temp(path)
    os.close(fd)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(path.parent)


@contextmanager
def atomic_open(
    path: str | os.PathLike,
    mode: str = "w",
    *,
    encoding: str | None = "utf-8",
    newline: str | None = None,
    fsync: bool = False,
) -> Iterator[IO[Any]]:
    """Yield a file object (``mode`` ``"w"``/``"wt"`` text, default UTF-8, or ``"wb"``) on a temporary file
    beside ``path``; on leaving the block without an exception, rename it over ``path``.

    Raises ValueError for any other mode."""
    if mode not in _MODES:
        raise ValueError(f"atomic_open writes a new file: mode must be one of {sorted(_MODES)}, not {mode!r}")
    binary = mode == "wb"
    with (
        atomic_path(path, fsync=fsync) as tmp,
        open(
            tmp, _MODES[mode], encoding=None if binary else encoding, newline=None if binary else newline
        ) as fh,
    ):
        yield fh


def write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` atomically (parent directories created)."""
    with atomic_open(path, "wb", fsync=fsync) as fh:
        fh.write(data)


def write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8", fsync: bool = False) -> None:
    """Write ``text`` to ``path`` atomically (parent directories created)."""
    with atomic_open(path, "w", encoding=encoding, fsync=fsync) as fh:
        fh.write(text)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json(path: str | os.PathLike, data: Any, *, indent: int = 2, fsync: bool = False) -> None:
    """Write ``data`` as JSON (NumPy scalars and arrays as numbers and lists, paths as strings, a final
    newline) to ``path`` atomically. Raises TypeError, before anything is written, for other objects."""
    write_text(path, json.dumps(data, indent=indent, default=_json_default) + "\n", fsync=fsync)


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    """The JSON in ``path``, or ``default`` when there is no such file; QkvprobeError naming the file when it
    is not valid JSON."""
    path = Path(path)
    if not path.exists():
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise QkvprobeError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); delete it or re-run the command that wrote it"
        ) from None
