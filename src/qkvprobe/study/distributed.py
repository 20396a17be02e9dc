"""The study over several processes (``torchrun … -m qkvprobe run``): units of work spread over the ranks, one
record per finished unit, and the merge that makes the run directory the same for any number of processes.

- Extraction: every rank takes part in each store's extraction (:func:`qkvprobe.features.extract_features`
  splits its shards over the ranks, as ``qkvprobe extract`` does); stores are shared through the cache folder.
- Evaluation: the units that are not done yet are assigned to ranks before any runs, by the same rule on every
  rank (:func:`assign`: longest-processing-time first over :func:`estimate_cost`, ties by the study's unit
  order), so no rank waits for another mid-run. A unit that reads another's output (the "directions" unit reads
  the standard evaluation's fits) goes with it (``Unit.group``). A rank evaluates its units alone
  (:func:`qkvprobe.features.distributed.alone`: a standard C sweep runs its whole grid in the rank).
- Output: each finished unit becomes one record, ``parts/<kind>__<16 hex>.json`` (:meth:`RunDir.part_file`,
  written atomically; its presence marks the unit done), plus ``.fits.npz`` beside it where the unit fitted
  class vectors. Rank 0 alone writes the shared files: :func:`merge_records` reads every record in the study's
  unit order and writes results.csv (rows sorted by key), paired.json, directions.json and fits/, so 1 or N
  processes give the same bytes; it runs after each of rank 0's units and once all units are done. (A "maps"
  unit writes its own ``maps/`` files, one per token, which no other unit writes.)
- Failure: a rank whose unit raises writes ``parts/failed.json`` (:func:`write_failed`) and stops with one line
  naming the rank and the unit; the other ranks stop before their next unit (torchrun also tears them down when
  a worker exits non-zero). Finished units keep their records: the same command resumes (any number of
  processes) with the units that have none.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..io import read_json, write_bytes, write_json
from ..results import ResultRow, write_results
from ..rundir import RunDir

#: Test-only hook, ``RANK:COUNT``: the process of that rank kills itself with SIGKILL right after recording its
#: COUNT-th unit (tests/test_run_distributed.py: a rank killed mid-run, then the run resumed). Never set it
#: otherwise.
KILL_AFTER_UNITS_ENV = "QKVPROBE_TEST_KILL_RANK_AFTER_UNITS"

#: Side files merged from the unit records: name -> (RunDir property, top-level key, identity fields).
SIDES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "paired": ("paired", "tests", ("model", "dataset", "setting", "shots")),
    "directions": ("directions", "entries", ("model", "dataset", "token", "position")),
}

#: Relative cost of one fit of a rule against the cosine rule's (class means): the hyperplane rule is an
#: iterative solver (per C of the grid in the standard setting), k-NN a similarity product against the training set.
RULE_COST = {"hyperplane": 20.0, "cosine": 1.0, "knn": 3.0}


class Stopped(Exception):
    """Another rank failed (``parts/failed.json``): this one stops before its next unit, quietly."""


@dataclass
class Unit:
    """One unit of work of the study: its id (``study.state.unit_id``), place in the study's order, words for
    progress lines, estimated cost, assignment group, and the work itself."""

    uid: str
    order: tuple[int, ...]
    label: str
    work: Callable[[], None]
    cost: float = 1.0
    group: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


def estimate_cost(
    kind: str,
    *,
    task: str,
    setting: str = "standard",
    rules: Sequence[str] = (),
    features: int = 1,
    train: int = 1,
    test: int = 1,
    patches: int = 1,
    episodes: int = 0,
    ways: int = 5,
    shots: int = 0,
    queries: int = 15,
    grid: int = 5,
    fit_samples: int = 20000,
) -> float:
    """A rough, deterministic cost of a unit in arbitrary units (only the ratios between units matter): the
    number of feature rows each rule touches, times its :data:`RULE_COST`, times the feature sets (token types ×
    positions × blocks). Standard segmentation counts every training patch, a standard hyperplane fit every C
    of the grid (plus the refit); few-shot units count their episodes' support and query rows."""
    rows = patches if task == "segmentation" else 1
    if kind == "directions":
        return float(min(train * rows, fit_samples) * features * RULE_COST["hyperplane"])
    if kind == "maps":
        return float(min(train * rows, fit_samples) * features)
    total = 0.0
    for rule in rules or ["cosine"]:
        weight = RULE_COST.get(rule, RULE_COST["hyperplane"])
        if setting == "standard":
            n = (train + test) * rows
            if rule == "hyperplane":
                n = train * rows * (grid + 1) + test * rows
            elif rule == "knn":
                n = train * rows * max(1.0, test * rows / 1000)
            total += weight * n
        elif task == "segmentation":
            total += weight * episodes * (shots + 1) * rows
        else:
            total += weight * episodes * ways * (shots + queries)
    return total * max(features, 1)


def assign(units: Sequence[Unit], world_size: int) -> dict[str, int]:
    """unit id -> rank: whole groups, longest first (estimated cost, ties by unit order) to the least loaded rank
    (ties to the lower rank). The same on every rank for the same units."""
    groups: dict[str, list[Unit]] = {}
    for u in units:
        groups.setdefault(u.group or u.uid, []).append(u)
    ranked = sorted(groups.values(), key=lambda g: (-sum(u.cost for u in g), min(u.order for u in g)))
    load = [0.0] * max(world_size, 1)
    out: dict[str, int] = {}
    for g in ranked:
        rank = min(range(len(load)), key=lambda r: (load[r], r))
        load[rank] += sum(u.cost for u in g)
        out.update({u.uid: rank for u in g})
    return out


# ---- unit records -------------------------------------------------------------------------------------------
def new_record(unit: Unit, rank: int, world_size: int, invocation: int) -> dict[str, Any]:
    """The record a unit fills while it runs (rows, side entries, run.json notes)."""
    return {
        "unit": unit.uid,
        "order": list(unit.order),
        "label": unit.label,
        "rank": rank,
        "world_size": world_size,
        "invocation": invocation,
        "seconds": 0.0,
        "rows": [],
        "sides": {},
        "notes": {},
        "fits": None,
    }


def write_record(rd: RunDir, record: dict[str, Any]) -> None:
    """Write a finished unit's record (atomically): from now on the unit is done."""
    out = dict(record, rows=[asdict(r) if isinstance(r, ResultRow) else r for r in record["rows"]])
    write_json(rd.part_file(record["unit"]), out)


def read_records(rd: RunDir, cache: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every unit record present, in the study's unit order. ``cache`` (file name -> ((mtime_ns, size),
    record)), kept by the caller across calls, spares re-reading the records that did not change."""
    records = []
    for p in rd.part_files():
        stat = p.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        if cache is not None and p.name in cache and cache[p.name][0] == stamp:
            record = cache[p.name][1]
        else:
            record = read_json(p, None)
            if cache is not None:
                cache[p.name] = (stamp, record)
        if isinstance(record, dict) and "unit" in record:
            records.append(record)
    return sorted(records, key=lambda r: (r["order"], r["unit"]))


def record_rows(record: dict[str, Any]) -> list[ResultRow]:
    return [ResultRow(**row) for row in record["rows"]]


def add_note(notes: dict[str, Any], key: str, value: Any) -> None:
    """Add a run.json note: lists are extended, dicts updated (merged the same way over the records)."""
    if isinstance(value, dict):
        notes.setdefault(key, {}).update(value)
    else:
        notes.setdefault(key, []).extend(value)


def merge_records(rd: RunDir, records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Write the shared files from the unit records (in the order given): results.csv (old rows kept unless a
    record replaces them; all sorted by key), paired.json and directions.json (entries no record names kept
    first, then the records' in order), fits/ (copied from the records' ``.fits.npz`` where they differ).
    Returns the merged run.json notes."""
    records = list(records)
    rows = [row for rec in records for row in record_rows(rec)]
    if rows or rd.results.exists():
        write_results(rd.results, rows, sort=True)
    for name, (prop, key, ident) in SIDES.items():
        entries = [e for rec in records for e in rec["sides"].get(name, [])]
        path = getattr(rd, prop)
        if not entries:
            continue
        ids = {tuple(e.get(k) for k in ident) for e in entries}
        old = (read_json(path, {}) or {}).get(key, [])
        kept = [e for e in old if tuple(e.get(k) for k in ident) not in ids]
        write_json(path, {key: kept + entries})
    for rec in records:
        if rec.get("fits"):
            model, dataset = rec["fits"]
            source, target = rd.part_fits(rec["unit"]), rd.fit_file(model, dataset)
            data = source.read_bytes()
            if not target.is_file() or target.read_bytes() != data:
                target.parent.mkdir(parents=True, exist_ok=True)
                write_bytes(target, data)
    notes: dict[str, Any] = {}
    for rec in records:
        for k, v in rec.get("notes", {}).items():
            add_note(notes, k, v)
    return notes


# ---- failure ------------------------------------------------------------------------------------------------
def write_failed(rd: RunDir, rank: int, unit: Unit, error: str) -> None:
    if not rd.failed.exists():  # the first failure is the one to name
        write_json(rd.failed, {"rank": rank, "unit": unit.uid, "label": unit.label, "error": error})


def read_failed(rd: RunDir) -> dict[str, Any] | None:
    failed = read_json(rd.failed, None)
    return failed if isinstance(failed, dict) else None


def failure_line(rank: int, label: str, error: str) -> str:
    return f"rank {rank} failed in {label}: {error}; run the same command again to resume"


def kill_hook(rank: int, finished: int) -> None:
    """:data:`KILL_AFTER_UNITS_ENV` (tests only)."""
    spec = os.environ.get(KILL_AFTER_UNITS_ENV, "")
    if spec and spec.split(":") == [str(rank), str(finished)]:
        os.kill(os.getpid(), signal.SIGKILL)
