"""Small helpers shared by the dataset loaders: spec parsing, cache directory, atomic writes, hashing."""

from __future__ import annotations

import difflib
import hashlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import parse_qsl

from ..errors import DataError, SpecError

#: Spec names ``open_dataset`` understands; ``*`` marks the ones that need ``:PATH``.
SPEC_NAMES: tuple[str, ...] = (
    "fashion-mnist",
    "fashion-mnist-scenes",
    "imagefolder",
    "voc",
    "ade20k",
    "segfolder",
)
PATH_SPECS: tuple[str, ...] = ("imagefolder", "voc", "ade20k", "segfolder")


def parse_spec(spec: str) -> tuple[str, str | None, dict[str, str]]:
    """Split ``name[:path][?key=value&...]`` into ``(name, path, options)``.

    Options are how a spec string carries everything that changes the data (the feature store re-opens a
    dataset from its spec alone), e.g. ``fashion-mnist-scenes?seed=1&train=500``.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError(
            f"dataset spec must be a non-empty string, got {spec!r}; try one of {', '.join(SPEC_NAMES)}"
        )
    body, _, query = spec.strip().partition("?")
    name, sep, path = body.partition(":")
    name = name.lower()
    if name == "hf":
        raise SpecError(
            f"Hugging Face datasets ({spec!r}) are not supported; export them to an imagefolder or segfolder layout"
        )
    if name not in SPEC_NAMES:
        close = difflib.get_close_matches(name, SPEC_NAMES, n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(close)}?" if close else f"known specs: {', '.join(SPEC_NAMES)}"
        raise SpecError(f"unknown dataset spec {spec!r}; {hint}")
    if name in PATH_SPECS and not path:
        raise SpecError(f"dataset spec {spec!r} needs a directory: write {name}:PATH")
    if name not in PATH_SPECS and sep:
        raise SpecError(
            f"dataset spec {spec!r} takes no path; give the data root with root=... (or --data-root)"
        )
    try:
        options = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
    except ValueError:
        raise SpecError(
            f"malformed options {query!r} in dataset spec {spec!r}; write ?key=value&key=value"
        ) from None
    return name, (path or None), options


def check_options(spec: str, options: dict[str, str], allowed: Iterable[str]) -> None:
    """Refuse options a loader does not know (a typo must not silently fall back to a default)."""
    allowed = tuple(allowed)
    for key in options:
        if key not in allowed:
            valid = ", ".join(allowed) or "none"
            raise SpecError(f"unknown option {key!r} in dataset spec {spec!r}; valid options: {valid}")


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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it, so readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a shared cache must stay readable by others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
