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


class Progress:
    """The set of finished unit ids of one run directory, bound to the config's fingerprint."""

    def __init__(self, run_dir: Path, fingerprint: str, *, fresh: bool = False) -> None:
        rd = RunDir(run_dir)
        self.path = rd.progress
        self.fingerprint = fingerprint
        if fresh:
            rd.clear()
        data = read_json(self.path, None)
        if data is not None and data.get("fingerprint") != fingerprint:
            raise ConfigError(
                f"run directory {run_dir} holds results of a different config (fingerprint "
                f"{data.get('fingerprint')} vs {fingerprint}); pass --fresh to discard them or --set name=NEW"
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
