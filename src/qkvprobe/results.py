"""The results table (``results.csv``): one row per measurement, long format (DESIGN.md §3).

Rows are appended atomically (the whole file is rewritten to a temporary name and renamed), and a row whose
key columns equal an existing row's replaces it, so a resumed run never duplicates measurements.
"""

from __future__ import annotations

import csv
import math
import os
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .errors import QkvprobeError

COLUMNS: tuple[str, ...] = (
    "model", "objective", "dataset", "task", "setting", "block", "token", "position", "rule",
    "ways", "shots", "episodes", "metric", "value", "ci95", "seed", "C",
)  # fmt: skip
#: Columns that identify a measurement; the rest (value, ci95, C) are its outcome.
KEY_COLUMNS: tuple[str, ...] = tuple(c for c in COLUMNS if c not in ("value", "ci95", "C"))


@dataclass(frozen=True)
class ResultRow:
    """One measurement. ``value``/``ci95`` are fractions in [0, 1]; ``ways``/``shots``/``episodes`` are 0 in
    the standard setting; ``ci95`` is NaN where no interval exists; ``C`` is NaN for the cosine rule."""

    model: str
    objective: str
    dataset: str
    task: str
    setting: str
    block: int
    token: str
    position: str
    rule: str
    ways: int
    shots: int
    episodes: int
    metric: str
    value: float
    ci95: float = math.nan
    seed: int = 0
    C: float = math.nan

    def __post_init__(self) -> None:
        if not (0.0 <= self.value <= 1.0):
            raise QkvprobeError(f"result value {self.value!r} for metric {self.metric!r} is outside [0, 1]")

    def key(self) -> tuple:
        return tuple(getattr(self, c) for c in KEY_COLUMNS)


_TYPES = {f.name: f.type for f in fields(ResultRow)}


def _parse(name: str, text: str) -> object:
    kind = _TYPES[name]
    if kind == "int":
        return int(text)
    if kind == "float":
        return float(text) if text != "" else math.nan
    return text


def read_results(path: str | os.PathLike) -> list[ResultRow]:
    """Read ``results.csv``; a missing file is an empty table."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise QkvprobeError(f"{path}: not a qkvprobe results table, columns {missing} are missing")
        return [ResultRow(**{c: _parse(c, rec[c]) for c in COLUMNS}) for rec in reader]


def write_results(path: str | os.PathLike, rows: Iterable[ResultRow]) -> list[ResultRow]:
    """Merge ``rows`` into the table at ``path`` (new rows replace old ones with the same key), atomically.

    Returns the merged table."""
    path = Path(path)
    merged = {r.key(): r for r in read_results(path)}
    for r in rows:
        merged[r.key()] = r
    table = list(merged.values())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".results-", suffix=".csv", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=COLUMNS)
            writer.writeheader()
            for r in table:
                rec = asdict(r)
                writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in rec.items()})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return table
