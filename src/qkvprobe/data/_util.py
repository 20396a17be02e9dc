"""Small helpers shared by the dataset loaders: option parsing, cache directory, hashing.

Spec parsing lives in :mod:`qkvprobe.data.registry` (re-exported here for the loaders).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..errors import DataError, SpecError
from .registry import PATH_SPECS, SPEC_NAMES, check_options, parse_spec

__all__ = [
    "PATH_SPECS",
    "SPEC_NAMES",
    "cache_dir",
    "check_options",
    "int_option",
    "parse_spec",
    "require_dir",
    "sha256_parts",
]


def int_option(spec: str, options: dict[str, str], key: str, default: int, minimum: int = 0) -> int:
    """An integer option of a spec string, validated."""
    if key not in options:
        return default
    try:
        value = int(options[key])
    except ValueError:
        raise SpecError(
            f"option {key}={options[key]!r} in dataset spec {spec!r} must be an integer"
        ) from None
    if value < minimum:
        raise SpecError(f"option {key}={value} in dataset spec {spec!r} must be >= {minimum}")
    return value


def cache_dir() -> Path:
    """``$QKVPROBE_CACHE`` or ``~/.cache/qkvprobe`` (created on demand by the writers)."""
    env = os.environ.get("QKVPROBE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qkvprobe"


def sha256_parts(*parts: bytes | str) -> str:
    """Hex sha256 over length-prefixed parts (prefixing keeps ``("ab","c")`` and ``("a","bc")`` apart)."""
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def require_dir(path: Path, what: str, hint: str) -> Path:
    """Return ``path`` if it is a directory, else a DataError naming it."""
    if not path.is_dir():
        raise DataError(f"{what} directory not found: {path}; {hint}")
    return path
