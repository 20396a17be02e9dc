"""The run directory of a study: every path a run writes, the formats shared by writer and reader, and
``clear()`` (``qkvprobe run --fresh``).

The study writes the run directory and the report reads it; both take its paths from here and none from the
other. ``runs/<name>/``:

    results.csv      the long results table (:mod:`qkvprobe.results`)
    run.json         resolved config, versions, timings (``timings_earlier``: interrupted invocations of a resumed
                     run), data sources, episode seed, subsampling, ``main_blocks``
                     (model -> block indices of the main tables; other blocks are the block sweep), ``models``
                     ([{label, spec, weights, weights_source, weights_digest, objective, family}])
    progress.json    ``{"fingerprint": <config fingerprint>, "done": [unit ids]}``: the finished units of work
                     (:mod:`qkvprobe.study.state`); it binds the directory to one config
    directions.json  ``{"entries": [{model, objective, dataset, block, token, position, C, classes: [..],
                     cosine: [..]}]}`` — per class, cos(w_c, μ_c) between the hyperplane normal and the class
                     direction, fitted on the standard training features
    paired.json      ``{"tests": [{model, dataset, task, setting, ways, shots, metric, a: {token, position, rule,
                     value}, b: {...}, test, statistic, p_value, num_pairs, alpha, verdict}]}`` — paired tests
                     of each unit's best choice against every other, on the same episodes (Wilcoxon) or test
                     images (McNemar); the answer table Holm-adjusts the p-values of one best choice
    fits/<model>__<dataset>.npz
                     the standard protocol's class vectors (arrays ``token|position|rule|block`` [K, D] and
                     ``__classes__`` [K]; :func:`qkvprobe.study.sides.save_fits`); read by the study only
    maps/<model>__<dataset>__<token>.npz
                     direction maps (:func:`save_direction_map`): ``images`` uint8 [n,H,W] or [n,H,W,3],
                     ``masks`` int [n,H,W] (255 ignore), ``cosine`` float32 [n,C,h,w] (cos(μ_c, patch token)),
                     ``classes`` str [C], ``meta`` JSON str {model, dataset, token, block}
    parts/<kind>__<16 hex>.json
                     one finished unit of work (:mod:`qkvprobe.study.distributed`): its rows, side entries,
                     run.json notes, rank and seconds; written by the rank that did it, atomically, as the unit's
                     "done" mark. ``parts/<same stem>.fits.npz``: the unit's class vectors, beside it. Rank 0 merges
                     them (in the study's unit order) into results.csv, paired.json, directions.json, fits/,
                     progress.json and run.json, so any number of processes writes the same files
    parts/failed.json
                     ``{rank, unit, label, error}`` of a rank whose unit failed (the other ranks stop); removed when
                     the run starts again
    figures/*.svg    written by the report (direction maps: ``figures/map__*.png``); the report empties it of
                     figures before each rendering
    report.html      written by the report (self-contained: figures are embedded)

Names inside ``fits/`` and ``maps/`` (and the report's figure names) are :func:`slug` s of their parts. Every
file is written through :mod:`qkvprobe.io` (atomic, mode ``0o666 & ~umask``). The subdirectories belong
to the run as a whole: :meth:`RunDir.clear` removes them with everything in them, and the top-level files
above (with any temporary file a killed write left of them), and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import QkvprobeError
from .io import atomic_path, temporaries

__all__ = [
    "DIRECTIONS",
    "FIGURES",
    "FITS",
    "MAPS",
    "PAIRED",
    "PARTS",
    "PROGRESS",
    "REPORT",
    "RESULTS",
    "RUN_JSON",
    "DirectionMap",
    "RunDir",
    "load_direction_map",
    "save_direction_map",
    "slug",
]

RESULTS = "results.csv"
RUN_JSON = "run.json"
PROGRESS = "progress.json"
DIRECTIONS = "directions.json"
PAIRED = "paired.json"
REPORT = "report.html"
FITS = "fits"
MAPS = "maps"
FIGURES = "figures"
PARTS = "parts"

#: Top-level files of a run, and its subdirectories (owned whole by the run).
FILES = (RESULTS, RUN_JSON, PROGRESS, DIRECTIONS, PAIRED, REPORT)
DIRS = (FITS, MAPS, FIGURES, PARTS)


def slug(*parts: object) -> str:
    """A file-name-safe stem of ``parts`` joined by ``__`` (runs of other characters become ``-``; at most 150
    characters, so that a suffix and the temporary name of an atomic write still fit a file name)."""
    text = "__".join(str(p) for p in parts)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:150]


class RunDir:
    """The paths of one run directory (``path`` need not exist yet; nothing is created here)."""

    __slots__ = ("path",)

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunDir) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    @property
    def results(self) -> Path:
        return self.path / RESULTS

    @property
    def run_json(self) -> Path:
        return self.path / RUN_JSON

    @property
    def progress(self) -> Path:
        return self.path / PROGRESS

    @property
    def directions(self) -> Path:
        return self.path / DIRECTIONS

    @property
    def paired(self) -> Path:
        return self.path / PAIRED

    @property
    def report(self) -> Path:
        return self.path / REPORT

    @property
    def fits(self) -> Path:
        return self.path / FITS

    @property
    def maps(self) -> Path:
        return self.path / MAPS

    @property
    def figures(self) -> Path:
        return self.path / FIGURES

    @property
    def parts(self) -> Path:
        return self.path / PARTS

    @property
    def failed(self) -> Path:
        """``parts/failed.json``: the rank and unit that stopped the run (absent while none failed)."""
        return self.parts / "failed.json"

    def part_file(self, unit: str) -> Path:
        """``parts/<kind>__<16 hex of sha256(unit)>.json``: the record of one finished unit (``unit`` its id)."""
        digest = hashlib.sha256(unit.encode()).hexdigest()[:16]
        return self.parts / f"{slug(unit.split(':', 1)[0])}__{digest}.json"

    def part_fits(self, unit: str) -> Path:
        """``parts/<stem of part_file(unit)>.fits.npz``: the class vectors one unit fitted."""
        return self.part_file(unit).with_suffix(".fits.npz")

    def part_partial(self, unit: str) -> Path:
        """``parts/<stem of part_file(unit)>.partial/``: the finished inner units of an unfinished unit
        (``protocols.checkpoint``), removed once the unit's record is written."""
        return self.part_file(unit).with_suffix(".partial")

    def part_files(self) -> list[Path]:
        """The unit records present (``failed.json`` and a killed write's temporaries left out), sorted."""
        if not self.parts.is_dir():
            return []
        return sorted(
            p for p in self.parts.glob("*__*.json") if not p.name.startswith(".") and p != self.failed
        )

    def fit_file(self, model: str, dataset: str) -> Path:
        """``fits/<model>__<dataset>.npz`` (slugged)."""
        return self.fits / (slug(model, dataset) + ".npz")

    def map_file(self, model: str, dataset: str, token: str) -> Path:
        """``maps/<model>__<dataset>__<token>.npz`` (slugged)."""
        return self.maps / (slug(model, dataset, token) + ".npz")

    def map_files(self) -> list[Path]:
        """The direction map files present, sorted (hidden files, such as a killed write's temporary, left out)."""
        if not self.maps.is_dir():
            return []
        return sorted(p for p in self.maps.glob("*.npz") if not p.name.startswith("."))

    def paths(self) -> list[Path]:
        """Every top-level path a run writes (files, then subdirectories), present or not."""
        return [self.path / n for n in (*FILES, *DIRS)]

    def clear(self) -> None:
        """Remove every path a run writes (:meth:`paths`, the subdirectories with their contents, temporary
        files of interrupted writes) and nothing else. QkvprobeError naming the path when one cannot be removed."""
        for name in FILES:
            for p in (self.path / name, *temporaries(self.path / name)):
                _remove(p)
        for name in DIRS:
            _remove(self.path / name)


def _remove(p: Path) -> None:
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
    except OSError as exc:
        raise QkvprobeError(
            f"cannot remove {p} from the run directory ({exc.strerror or exc}); remove it by hand or run "
            "without --fresh"
        ) from None


# ---- direction maps: written by the study, read by the report -----------------------------------------------
@dataclass
class DirectionMap:
    """One direction map file: ``images`` uint8 [n,H,W] or [n,H,W,3], ``masks`` [n,H,W], ``cosine`` float32
    [n,C,h,w], ``classes`` [C], ``meta`` {model, dataset, token, block}."""

    images: np.ndarray
    masks: np.ndarray
    cosine: np.ndarray
    classes: list[str]
    meta: dict


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
    with atomic_path(path) as tmp:
        np.savez_compressed(
            tmp,
            images=images,
            masks=masks,
            cosine=cosine.astype(np.float32),
            classes=np.asarray(classes, dtype=str),
            meta=np.asarray(json.dumps(meta)),
        )


def load_direction_map(path: str | os.PathLike) -> DirectionMap:
    """Read a :func:`save_direction_map` file; QkvprobeError naming it when it is not one."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return DirectionMap(
                z["images"],
                z["masks"],
                z["cosine"],
                [str(c) for c in z["classes"]],
                json.loads(str(z["meta"])),
            )
    except (KeyError, ValueError, OSError) as exc:
        raise QkvprobeError(f"{path}: not a direction map file ({exc})") from None
