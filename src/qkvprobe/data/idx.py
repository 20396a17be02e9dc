"""Reader and writer of the IDX format (the container of MNIST and Fashion-MNIST), gzip or raw.

Layout: two zero bytes, a dtype code, the number of dimensions ``n``, ``n`` big-endian uint32 sizes, then
the data in C order. Every structural property is checked, because a truncated download otherwise turns
into a silently short dataset.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..io import atomic_open

_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx_bytes(path: Path) -> bytes:
    """The decompressed bytes of an IDX file (``.gz`` is decompressed; CRC and length are checked by gzip)."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            return gzip.decompress(raw)
        return raw
    except FileNotFoundError:
        raise DataError(f"IDX file not found: {path}") from None
    except (EOFError, OSError, zlib.error) as exc:
        raise DataError(
            f"corrupt IDX file {path}: gzip stream is damaged or truncated ({exc}); delete it and fetch it again"
        ) from None


def parse_idx(data: bytes, path: Path | str, *, ndim: int | None = None) -> np.ndarray:
    """Decode IDX bytes into an array; ``ndim`` if given must match. Raises DataError naming ``path``."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        magic = data[:4].hex() or "<empty>"
        raise DataError(
            f"corrupt IDX file {path}: bad magic number 0x{magic} (expected 0x0000<dtype><ndim>, e.g. 0x00000803); the file is not IDX"
        )
    dims_count = data[3]
    if ndim is not None and dims_count != ndim:
        raise DataError(f"corrupt IDX file {path}: {dims_count} dimensions in the header, expected {ndim}")
    header = 4 + 4 * dims_count
    if len(data) < header:
        raise DataError(
            f"corrupt IDX file {path}: truncated header ({len(data)} bytes); fetch the file again"
        )
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims_count))
    dtype = _DTYPES[data[2]]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    found = len(data) - header
    if found != expected:
        state = "truncated" if found < expected else "has trailing bytes"
        raise DataError(
            f"corrupt IDX file {path}: {state}: header shape {shape} needs {expected} data bytes, found {found}; fetch the file again"
        )
    return (
        np.frombuffer(data, dtype=dtype, offset=header)
        .reshape(shape)
        .astype(dtype.newbyteorder("="), copy=False)
    )


def read_idx(path: Path, *, ndim: int | None = None) -> np.ndarray:
    """Read an IDX file (gzip or raw) into a numpy array."""
    return parse_idx(read_idx_bytes(path), path, ndim=ndim)


def encode_idx(array: np.ndarray) -> bytes:
    """IDX bytes of a uint8 array (the inverse of :func:`parse_idx` for the dtype Fashion-MNIST uses)."""
    if array.dtype != np.uint8:
        raise ValueError(f"encode_idx writes uint8 arrays only, got {array.dtype}")
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    return header + np.ascontiguousarray(array).tobytes()


def write_idx_gz(path: Path, array: np.ndarray) -> None:
    """Write a gzip IDX file reproducibly (mtime 0, no file name in the header), atomically."""
    with (
        atomic_open(path, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as fh,
    ):
        fh.write(encode_idx(array))
