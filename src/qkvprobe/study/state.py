"""Resumable progress of a study: which units of work are finished (``progress.json`` in the run dir).

A unit is done once its record (``parts/…json``, :mod:`qkvprobe.study.distributed`) is written atomically, so
a killed run (or a killed rank) redoes at most the units it was in; rank 0 copies the finished ids into
``progress.json`` as it merges the records. Results rows are merged by key, so redoing a unit never duplicates
rows.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError
from ..io import read_json, write_json
from ..rundir import RunDir


def unit_id(kind: str, **parts: object) -> str:
    """A stable id for a unit of work (its parameters as sorted JSON)."""
    return kind + ":" + json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)


def changed_keys(old: object, new: object, path: str = "", limit: int = 12) -> list[str]:
    """The dotted keys whose values differ between two resolved configs (``run.json``'s ``config``), with both
    values: ``["fewshot.C: 1.0 → 'auto'"]``; at most ``limit`` of them, then a count."""
    out: list[str] = []

    def walk(a: object, b: object, where: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted({*a, *b}):
                walk(a.get(key), b.get(key), f"{where}.{key}" if where else str(key))
        elif a != b:
            out.append(f"{where}: {a!r} → {b!r}")

    walk(old, new, path)
    return out[:limit] + ([f"and {len(out) - limit} more"] if len(out) > limit else [])


class Progress:
    """The set of finished unit ids of one run directory, bound to the config's fingerprint."""

    def __init__(
        self, run_dir: Path, fingerprint: str, *, fresh: bool = False, config: dict | None = None
    ) -> None:
        rd = RunDir(run_dir)
        self.path = rd.progress
        self.fingerprint = fingerprint
        if fresh:
            rd.clear()
        data = read_json(self.path, None)
        if data is not None and data.get("fingerprint") != fingerprint:
            earlier = (read_json(rd.run_json, {}) or {}).get("config")
            changed = changed_keys(earlier, config) if isinstance(earlier, dict) and config else []
            what = f"these keys changed: {', '.join(changed)}" if changed else "the config changed"
            raise ConfigError(
                f"run directory {run_dir} holds results of a different config ({what}; fingerprint "
                f"{data.get('fingerprint')} there, {fingerprint} now); pass --fresh to discard them, --set "
                "name=NEW (or --out DIR) to keep both, or set the keys back to resume"
            )
        self.done: list[str] = list(data.get("done", [])) if data else []
        self.resumed = data is not None  # an earlier run of this config started here
        if data is None:  # bind the directory to this config before any row is written
            write_json(self.path, {"fingerprint": fingerprint, "done": []})

    def is_done(self, uid: str) -> bool:
        return uid in self.done

    def mark(self, uid: str) -> None:
        self.extend([uid])

    def extend(self, uids: list[str]) -> None:
        """Record ``uids`` as done (in order, after those recorded before); the file is written when it changes."""
        new = [u for u in dict.fromkeys(uids) if u not in set(self.done)]
        if new or not self.path.exists():
            self.done.extend(new)
            write_json(self.path, {"fingerprint": self.fingerprint, "done": self.done})
