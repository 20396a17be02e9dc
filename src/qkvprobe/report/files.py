"""The run directory's files and their formats — the only input of the report (it never loads a model).

``runs/<name>/``:
    results.csv      the long results table (:mod:`qkvprobe.results`)
    run.json         resolved config, versions, timings (``timings_earlier``: interrupted invocations of a resumed
                     run), data sources, episode seed, subsampling, ``main_blocks``
                     (model -> block indices of the main tables; other blocks are the block sweep), ``models``
                     ([{label, spec, weights, weights_source, weights_digest, objective, family}])
    directions.json  ``{"entries": [{model, objective, dataset, block, token, position, C, classes: [..],
                     cosine: [..]}]}`` — per class, cos(w_c, μ_c) between the hyperplane normal and the class
                     direction, fitted on the standard training features
    paired.json      ``{"tests": [{model, dataset, task, setting, ways, shots, metric, a: {token, position, rule,
                     value}, b: {...}, test, statistic, p_value, num_pairs, alpha, verdict}]}`` — paired tests
                     of each unit's best choice against every other, on the same episodes (Wilcoxon) or test
                     images (McNemar); the answer table Holm-adjusts the p-values of one best choice
    maps/*.npz       direction maps, one file per model × dataset × token: ``images`` uint8 [n,H,W] or [n,H,W,3],
                     ``masks`` int [n,H,W] (255 ignore), ``cosine`` float [n,C,h,w] (cos(μ_c, patch token)),
                     ``classes`` str [C], ``meta`` JSON str {model, dataset, token, block}
    figures/*.svg    written by the report (direction maps: figures/map__*.png)
    report.html      written by the report (self-contained: figures are embedded)
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import QkvprobeError
from ..results import COLUMNS, read_results
from .tables import label_rule_variants

RESULTS = "results.csv"
RUN_JSON = "run.json"
DIRECTIONS = "directions.json"
PAIRED = "paired.json"
MAPS = "maps"
FITS = "fits"  # the standard protocol's class vectors per model × dataset (study side file, not read by the report)
FIGURES = "figures"
REPORT = "report.html"


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON atomically (temporary name, then rename) so a killed run never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + path.stem + "-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=False, default=_json_default)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_json(path: Path, default: Any = None) -> Any:
    if not path.exists():
        return default
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise QkvprobeError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def save_direction_map(
    path: str | os.PathLike,
    *,
    images: np.ndarray,
    masks: np.ndarray,
    cosine: np.ndarray,
    classes: list[str],
    meta: dict,
) -> None:
    """Save one direction map file (format above), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp.npz")
    np.savez_compressed(
        tmp,
        images=images,
        masks=masks,
        cosine=cosine.astype(np.float32),
        classes=np.asarray(classes, dtype=str),
        meta=np.asarray(json.dumps(meta)),
    )
    os.replace(tmp, path)


@dataclass
class DirectionMap:
    images: np.ndarray
    masks: np.ndarray
    cosine: np.ndarray
    classes: list[str]
    meta: dict


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
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise QkvprobeError(f"run directory {str(run_dir)!r} does not exist")
    if not (run_dir / RESULTS).exists():
        raise QkvprobeError(f"{run_dir}: no {RESULTS} found; run `qkvprobe run` first")
    rows = read_results(run_dir / RESULTS)
    df = label_rule_variants(pd.DataFrame([r.__dict__ for r in rows], columns=list(COLUMNS)))
    maps = []
    for p in sorted((run_dir / MAPS).glob("*.npz")) if (run_dir / MAPS).is_dir() else []:
        try:
            with np.load(p, allow_pickle=False) as z:
                maps.append(
                    DirectionMap(
                        z["images"],
                        z["masks"],
                        z["cosine"],
                        [str(c) for c in z["classes"]],
                        json.loads(str(z["meta"])),
                    )
                )
        except (KeyError, ValueError, OSError) as exc:
            raise QkvprobeError(f"{p}: not a direction map file ({exc})") from None
    return RunFiles(
        run_dir=run_dir,
        results=df,
        run_info=read_json(run_dir / RUN_JSON, {}) or {},
        directions=(read_json(run_dir / DIRECTIONS, {}) or {}).get("entries", []),
        paired=(read_json(run_dir / PAIRED, {}) or {}).get("tests", []),
        maps=maps,
    )
