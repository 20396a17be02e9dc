"""Resuming inside one evaluation: what each of its units added to the :class:`Evaluation` (rows, per-episode
scores, predictions, class vectors, chosen C, unconverged units), saved as the unit finishes, so an interrupted
evaluation (Ctrl-C, a killed job) restarts at its first unfinished unit instead of its first unit.

A unit's delta is two files named by a digest of the unit's key: ``<digest>.json`` (rows and the small values;
written last, its presence marks the unit done) and ``<digest>.npz`` (the arrays, read with
``allow_pickle=False``). Both are written atomically (:mod:`qkvprobe.io`). The study keeps one folder per
study unit and removes it once that unit's record is written.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

import numpy as np

from ..io import atomic_path, write_text
from ..results import ResultRow
from .evaluation import Evaluation, UnitKey
from .fewshot_c import ChosenC

_ARRAYS = ("per_episode", "predictions", "weights")


class UnitCheckpoint:
    """The finished units of one evaluation, in ``directory``."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def _paths(self, key: str) -> tuple[Path, Path]:
        digest = hashlib.sha256(key.encode()).hexdigest()[:20]
        return self.directory / f"{digest}.json", self.directory / f"{digest}.npz"

    def run(
        self, key: str, out: Evaluation, steps: Callable[[int], None], compute: Callable[[], int]
    ) -> None:
        """Apply unit ``key``'s saved delta to ``out`` (telling ``steps`` how many progress steps it had), or run
        ``compute()`` (which adds to ``out`` and returns its number of steps) and save what it added."""
        meta, arrays = self._paths(key)
        if meta.is_file() and arrays.is_file():
            saved = json.loads(meta.read_text(encoding="utf-8"))
            if saved.get("key") == key:
                with np.load(arrays, allow_pickle=False) as data:
                    _apply(out, saved, {name: data[name] for name in data.files})
                steps(int(saved["steps"]))
                return
        before = _sizes(out)
        taken = compute()
        delta, data = _delta(out, before)
        self.directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(arrays) as tmp:
            np.savez(tmp, **cast(dict[str, Any], data))  # numpy's stub reads ** as its allow_pickle keyword
        write_text(meta, json.dumps({"key": key, "steps": taken, **delta}, allow_nan=True))

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def _sizes(out: Evaluation) -> dict[str, Any]:
    return {
        "rows": len(out.rows),
        "unconverged": len(out.unconverged),
        **{name: set(getattr(out, name)) for name in (*_ARRAYS, "chosen_C")},
    }


def _delta(out: Evaluation, before: dict[str, Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    data: dict[str, np.ndarray] = {}
    keys: dict[str, list[list[Any]]] = {}
    for name in _ARRAYS:
        new = [k for k in getattr(out, name) if k not in before[name]]
        keys[name] = [list(k) for k in new]
        for i, k in enumerate(new):
            data[f"{name}_{i}"] = np.asarray(getattr(out, name)[k])
    chosen = [
        [list(k), c.C, [[C, s] for C, s in c.scores.items()]]
        for k, c in out.chosen_C.items()
        if k not in before["chosen_C"]
    ]
    return {
        "rows": [asdict(r) for r in out.rows[before["rows"] :]],
        "unconverged": out.unconverged[before["unconverged"] :],
        "keys": keys,
        "chosen_C": chosen,
    }, data


def _apply(out: Evaluation, saved: dict[str, Any], data: dict[str, np.ndarray]) -> None:
    out.rows.extend(ResultRow(**{k: _nan(v) for k, v in r.items()}) for r in saved["rows"])
    out.unconverged.extend(saved["unconverged"])
    for name in _ARRAYS:
        target = getattr(out, name)
        for i, k in enumerate(saved["keys"][name]):
            target[UnitKey(*k)] = data[f"{name}_{i}"]
    for k, C, scores in saved["chosen_C"]:
        out.chosen_C[UnitKey(*k)] = ChosenC(float(C), {float(a): float(b) for a, b in scores})


def _nan(value: Any) -> Any:
    return math.nan if value is None else value
