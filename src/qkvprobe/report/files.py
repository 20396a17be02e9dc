"""What the report reads from a run directory (paths and formats: :mod:`qkvprobe.rundir`) — the only input
of the report (it never loads a model)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..errors import QkvprobeError
from ..io import read_json
from ..results import COLUMNS, read_results
from ..rundir import RESULTS, DirectionMap, RunDir, load_direction_map
from .tables import label_rule_variants


@dataclass
class RunFiles:
    """Everything the report reads from a run directory."""

    run_dir: Path
    results: pd.DataFrame
    run_info: dict = field(default_factory=dict)
    directions: list[dict] = field(default_factory=list)
    paired: list[dict] = field(default_factory=list)
    maps: list[DirectionMap] = field(default_factory=list)


def load_run(run_dir: str | os.PathLike) -> RunFiles:
    """Read a run directory (results.csv is required; side files are optional)."""
    rd = RunDir(run_dir)
    if rd.path.is_file():
        hint = (
            f"; pass the run directory holding it: {rd.path.parent}"
            if rd.path.name == RESULTS
            else f"; pass the run directory holding {RESULTS} (e.g. {rd.path.parent})"
        )
        raise QkvprobeError(f"{str(rd.path)!r} is a file, not a run directory{hint}")
    if not rd.path.is_dir():
        raise QkvprobeError(
            f"run directory {str(rd.path)!r} does not exist; pass the folder `qkvprobe run` wrote, holding {RESULTS}"
        )
    if not rd.results.exists():
        raise QkvprobeError(f"{rd.path}: no {RESULTS} found; run `qkvprobe run` first")
    rows = read_results(rd.results)
    df = label_rule_variants(pd.DataFrame([r.__dict__ for r in rows], columns=list(COLUMNS)))
    return RunFiles(
        run_dir=rd.path,
        results=df,
        run_info=read_json(rd.run_json, {}) or {},
        directions=(read_json(rd.directions, {}) or {}).get("entries", []),
        paired=(read_json(rd.paired, {}) or {}).get("tests", []),
        maps=[load_direction_map(p) for p in rd.map_files()],
    )
