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
    """Read a run directory (results.csv is required; side files are optional), or a results table and the side
    files beside it (``qkvprobe report DIR/results.csv``; ``qkvprobe evaluate --out DIR/mine.csv``)."""
    given = Path(run_dir)
    results = given if given.is_file() else None
    rd = RunDir(given.parent if results is not None else given)
    results = results or rd.results
    if not rd.path.is_dir():
        raise QkvprobeError(
            f"run directory {str(rd.path)!r} does not exist; pass the folder `qkvprobe run` or `qkvprobe evaluate "
            f"--out` wrote, holding {RESULTS}"
        )
    if not results.exists():
        raise QkvprobeError(f"{rd.path}: no {RESULTS} found; run `qkvprobe run` first")
    rows = read_results(results)
    df = label_rule_variants(pd.DataFrame([r.__dict__ for r in rows], columns=list(COLUMNS)))
    return RunFiles(
        run_dir=rd.path,
        results=df,
        run_info=read_json(rd.run_json, {}) or {},
        directions=(read_json(rd.directions, {}) or {}).get("entries", []),
        paired=(read_json(rd.paired, {}) or {}).get("tests", []),
        maps=[load_direction_map(p) for p in rd.map_files()],
    )
