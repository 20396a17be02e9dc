"""The study (``qkvprobe run``): models × datasets × settings × tokens × rules × positions × blocks.

For each model: load the backbone; for each dataset: one cached feature store per split covering every
token, position and block needed; then the protocols per setting (and shot count), the block sweep, and the
side files. Each finished unit of work leaves a record in ``parts/`` that rank 0 merges into results.csv,
the side files and ``progress.json`` (:mod:`qkvprobe.study.distributed`), so a killed run resumes where it
stopped (cached features reused, finished rows kept, no duplicate rows). At the end: ``run.json``, the report
and a terminal summary.

Under ``torchrun`` the stores are extracted by all ranks together and the units are spread over the ranks
(whole units, balanced by an estimated cost); rank 0 alone writes the shared files, the report and the
summary, and results.csv, paired.json and the answer table are the same bytes for any number of processes.

Progress goes to the console as one line per unit of work (and, inside an evaluation, per protocol unit), plain
and unwrapped when the console is not a terminal (:class:`qkvprobe.feedback.Reporter`); while features are
extracted off a terminal, a heartbeat line says how many shards are written. Rows carry the weights' source
(``weights`` column) and ``run.json`` a ``models`` entry per model (label, spec, weights file, source, digest).
"""

from __future__ import annotations

import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console, RenderableType

from .. import __version__
from ..config import DatasetConfig, ModelConfig, StudyConfig, dump_config
from ..errors import ConfigError, QkvprobeError
from ..feedback import Reporter, many_tokens_warning, seconds, shard_progress
from ..io import read_json, write_json
from ..results import ResultRow, read_results
from ..rundir import RunDir, save_direction_map
from ..tables import setting_text
from ..vocab import objective_family
from . import distributed as sdist
from .distributed import Stopped, Unit
from .state import Progress, unit_id

__all__ = ["Stopped", "StudyResult", "run_study"]

SUBSAMPLING_NOTE = (
    "classification splits: seeded stratified random subsets of train_size/test_size images; "
    "Fashion-MNIST Scenes: generated at train_size/test_size scenes; few-shot: fewshot.episodes "
    "(segmentation: fewshot.segmentation_episodes) seeded episodes"
)


@dataclass
class StudyResult:
    """What a run leaves; on ranks other than 0 of a torchrun ``rows`` is empty and ``summary`` None (rank 0
    alone merges, reports and prints)."""

    run_dir: Path
    rows: list[ResultRow]
    summary: RenderableType | None
    report: Path | None
    timings: dict[str, Any] = field(default_factory=dict)
    skipped_units: int = 0
    rank: int = 0
    world_size: int = 1


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    import numpy
    import sklearn
    import torch

    # timm's version from its metadata: importing timm takes seconds, and a run on cached features needs no model.
    return {
        "qkvprobe": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": version("timm"),
        "numpy": numpy.__version__,
        "scikit-learn": sklearn.__version__,
    }


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _qdist() -> Any:
    """:mod:`qkvprobe.features.distributed`, imported when used (``qkvprobe.features`` imports torch)."""
    from ..features import distributed

    return distributed


class _Study:
    """One invocation of a study; methods are the units of work."""

    def __init__(self, cfg: StudyConfig, *, fresh: bool, progress: bool, console: Console) -> None:
        self.cfg = cfg
        self.rd = RunDir(cfg.run_dir())
        self.run_dir = self.rd.path
        # Under torchrun: each rank on its own GPU (cuda -> cuda:LOCAL_RANK) for extraction and every protocol.
        self.device = _qdist().local_device(_device(cfg.device))
        world = _qdist().init_distributed(self.device)
        self.rank, self.world_size = world.rank, world.world_size
        self.is_main = world.is_main
        self.console = console
        self.verbose = progress
        self.reporter = Reporter(
            console, enabled=progress, prefix=f"rank {self.rank} " if world.distributed else ""
        )
        if world.distributed:  # ranks share one terminal: plain lines, no live bars
            self.reporter.plain = True
        # --fresh, binding the directory to the config and reading what earlier runs left: rank 0 alone, before
        # any rank writes; the other ranks get the same state (the same units are then left to assign on every
        # rank).
        state: tuple[bool, list[str], dict[str, Any]] | None = None
        self.progress: Progress | None = None
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.progress = Progress(self.run_dir, cfg.fingerprint(), fresh=fresh, config=dump_config(cfg))
            self.rd.failed.unlink(missing_ok=True)
            records = [r["unit"] for r in sdist.read_records(self.rd)]
            state = (
                self.progress.resumed,
                [*self.progress.done, *records],
                read_json(self.rd.run_json, {}) or {},
            )
        self.resumed, done, previous = _qdist().broadcast_object(state)
        self.done_before = set(done)
        self.record: dict[str, Any] | None = None  # the running unit's record (the emit_* seams fill it)
        self.record_cache: dict[str, Any] = {}  # records read so far (sdist.read_records)
        self.standard_units: dict[tuple[str, str], str] = {}  # (model, dataset) -> its standard evaluate unit
        self.splits: dict[tuple[str, str], Any] = {}  # (dataset, train|test) -> the split, opened once
        self.timings: dict[str, float] = {}
        self.skipped = 0
        self.sources: dict[str, str] = {}  # model label -> weights source (the rows' weights column)
        self.info: dict[str, Any] = {
            "name": cfg.name,
            "fingerprint": cfg.fingerprint(),
            "status": "running",
            "started": previous.get("started") if self.resumed else time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "resumed": self.resumed,
            "config": dump_config(cfg),
            "versions": _versions(),
            "device": self.device,
            "world_size": self.world_size,
            "host": {"cpus": __import__("os").cpu_count(), "platform": platform.platform()},
            "episodes_seed": cfg.seed,
            "subsampling": self._subsampling(),
            "data_sources": previous.get("data_sources", {}),
            "models": previous.get("models", []) if self.resumed else [],
            "main_blocks": previous.get("main_blocks", {}),
            # dataset -> shots -> model -> classes its few-shot episodes lack (the union is left out for all)
            "fewshot_class_sets": previous.get("fewshot_class_sets", {}) if self.resumed else {},
            "timings": {},
            # A resumed run's "timings" are this invocation's; the interrupted ones' (partial) timings are kept.
            "timings_earlier": [*previous.get("timings_earlier", []), previous.get("timings") or {}]
            if self.resumed
            else [],
        }

    # ---- helpers ----------------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        self.reporter.log(msg)

    def _subsampling(self) -> dict[str, Any]:
        sizes = {d.spec: {"train": d.train_size, "test": d.test_size} for d in self.cfg.datasets}
        return {
            "how": SUBSAMPLING_NOTE,
            "sizes": sizes,
            "fewshot_episodes": self.cfg.fewshot.episodes,
            "segmentation_episodes": self.cfg.fewshot.segmentation_episodes,
        }

    def save_info(self, **updates: Any) -> None:
        """Update run.json (written by rank 0 alone; the other ranks keep their copy in memory)."""
        self.info.update(updates)
        if not self.is_main:
            return
        self.info["timings"] = {
            **self.info.get("timings", {}),
            **{k: round(v, 3) for k, v in self.timings.items()},
        }
        write_json(self.rd.run_json, self.info)

    def timed(self, key: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        out = fn()
        self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - t0
        return out

    # ---- the study --------------------------------------------------------------------------------------
    def split(self, d: DatasetConfig, which: str) -> Any:
        """The train or test split of ``d`` as the study uses it (subsampled as configured), opened once."""
        from .data import open_split

        key = (d.spec, which)
        if key not in self.splits:
            self.splits[key] = open_split(
                d, which, self.cfg.seed, spec=self.cfg.dataset_spec(d), root=self.cfg.dataset_root(d)
            )
        return self.splits[key]

    def preflight(self) -> None:
        """Before the first extraction: every few-shot classification setting can draw its episodes (its
        classes' image counts, from the labels alone), and so can the validation episodes of ``fewshot.C: auto``
        on the halved training split — else one ConfigError naming the dataset, the setting and the config keys
        that fix it, instead of a failure after minutes of work. (Segmentation classes are counted on each model's
        patch grid: checked right after its extraction, :meth:`note_class_sets`.)"""
        if "fewshot" not in self.cfg.settings:
            return
        from ..data.episodes import sample_classification_episodes
        from ..errors import DataError
        from ..protocols.fewshot_c import split_pools
        from ..tables import rule_entry

        fs = self.cfg.fewshot
        auto = fs.C == "auto" and any(rule_entry(r).has_C for r in self.cfg.rules)
        for i, d in enumerate(self.cfg.datasets):
            if d.task != "classification":
                continue
            ytr, yte = (self.split(d, which).targets() for which in ("train", "test"))
            if ytr is None or yte is None:
                continue
            ytr, yte = np.asarray(ytr), np.asarray(yte)
            kw = {"ways": fs.ways, "queries": fs.queries, "episodes": 0, "leave_out": True}
            for shots in fs.shots:
                where = f"datasets.{i} ({d.spec}), few-shot {fs.ways}-way {shots}-shot"
                try:
                    sample_classification_episodes(ytr, yte, shots=shots, **kw)
                except DataError as exc:
                    raise ConfigError(f"{where}: {exc}") from None
                if not auto:
                    continue
                a, b = split_pools(len(ytr), self.cfg.seed)
                try:
                    sample_classification_episodes(ytr[a], ytr[b], shots=shots, **kw)
                except DataError as exc:
                    raise ConfigError(
                        f"{where}: the validation episodes of fewshot.C: auto (half the training images as "
                        f"queries) cannot be drawn: {exc}; or set fewshot.C to a number"
                    ) from None

    def run(self) -> None:
        t0 = time.perf_counter()
        try:
            self.preflight()
        except ConfigError:
            if self.is_main:  # every rank finds the same: rank 0 says it, the others stop quietly
                raise
            raise Stopped() from None
        self.save_info()
        pending: list[Unit] = []
        for mi, m in enumerate(self.cfg.models):
            pending += self.run_model(mi, m)
        self.run_units(pending)
        if self.is_main:
            self.wait_for_others(pending)
            self.merge()
        self.timings["total_s"] = time.perf_counter() - t0
        self.save_info(status="complete", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def run_model(self, mi: int, m: ModelConfig) -> list[Unit]:
        """Load the model, extract its stores (all ranks together); its units not done yet."""
        from ..backbones import load_backbone
        from ..provenance import weights_source

        weights = self.cfg.weights_path(m)
        what = m.spec + (f" with weights {weights}" if weights else "")
        self.log(f"loading {m.name}" + (f" ({what})" if what != m.name else ""))
        bb = self.timed(
            f"load {m.name}", lambda: load_backbone(self.cfg.model_spec(m), weights, device=self.device)
        )
        main_blocks = sorted({bb.resolve_block(b) for b in self.cfg.blocks})
        self.info["main_blocks"][m.name] = main_blocks
        self.sources[m.name] = weights_source(bb, weights)
        entry = {
            "label": m.name,
            "spec": m.spec,
            "weights": None if weights is None else str(weights),
            "weights_source": self.sources[m.name],
            "weights_digest": bb.weights_digest,
            "objective": bb.objective,
            "family": objective_family(bb.objective),
        }
        self.info["models"] = [e for e in self.info["models"] if e.get("label") != m.name] + [entry]
        self.save_info()
        sweep_models = {s.name for s in self.cfg.sweep_models()}
        sweep_sets = {d.spec for d in self.cfg.sweep_datasets()} if m.name in sweep_models else set()
        units: list[Unit] = []
        for di, d in enumerate(self.cfg.datasets):
            units += self.run_dataset((mi, di), m, bb, d, main_blocks, sweep=d.spec in sweep_sets)
        return units

    def run_dataset(
        self,
        where: tuple[int, int],
        m: ModelConfig,
        bb: Any,
        d: DatasetConfig,
        main_blocks: list[int],
        *,
        sweep: bool,
    ) -> list[Unit]:
        """The stores of one model × dataset (extracted by all ranks together), and its units not done yet."""
        from ..features import cached_store
        from ..features.extract import plan_store

        sweep_blocks: list[int] = []
        if sweep:
            wanted = (
                range(bb.num_blocks) if self.cfg.block_sweep.blocks == "all" else self.cfg.block_sweep.blocks
            )
            sweep_blocks = sorted({bb.resolve_block(b) for b in wanted} - set(main_blocks))
        positions = list(d.positions or [])
        if sweep and self.cfg.block_sweep.position not in positions:
            positions.append(self.cfg.block_sweep.position)
        stores: dict[str, Any] = {}
        planned = self.plan_units(m, d, main_blocks, sweep_blocks)
        units = [
            Unit(uid, (*where, i), f"{m.name} · {d.spec} · {what}", lambda w=work: w(stores, bb), meta=meta)
            for i, (uid, work, what, meta) in enumerate(planned)
        ]
        done = [u for u in units if u.uid in self.done_before]
        self.skipped += len(done)
        if len(done) == len(units):
            self.log(f"{m.name} · {d.spec}: done earlier, skipped")
            return []
        for which in ("train", "test"):
            ds = self.timed(f"open {d.spec} {which}", lambda which=which: self.split(d, which))
            self.info["data_sources"][f"{d.spec} ({which})"] = f"{ds.source}; {len(ds)} samples"
            plan = {
                "blocks": sorted(set(main_blocks) | set(sweep_blocks)),
                "tokens": list(self.cfg.tokens),
                "positions": positions,
                "dtype": self.cfg.dtype,
                "image_size": d.image_size,
                "mean": m.mean,
                "std": m.std,
            }
            manifest, _ = plan_store(bb, ds, **plan)
            warning = many_tokens_warning(manifest)
            if warning and self.is_main:
                self.reporter.warn(f"{m.name} · {d.spec} · {which}: {warning}")
            path = self.cfg.cache_root() / manifest["key"][:16]
            self.log(f"{m.name} · {d.spec} · {which}: features of {len(ds)} samples")
            t0 = time.perf_counter()
            before = shard_progress(path)  # every shard already written: the cache serves this store
            cached = before is not None and before[0] == before[1] > 0
            # every rank takes part: the store's missing shards are split over the ranks (as `extract` does)
            with self.reporter.heartbeat(path, f"{m.name} · {d.spec} · {which}: extracting"):
                stores[which] = self.timed(
                    f"extract {m.name} {d.spec} {which}",
                    lambda ds=ds, plan=plan: cached_store(
                        self.cfg.cache_root(),
                        bb,
                        ds,
                        **plan,
                        batch_size=self.cfg.batch_size,
                        progress=self.verbose and self.world_size == 1,
                    ),
                )
            how = "from the cache" if cached else f"extracted in {seconds(time.perf_counter() - t0)}"
            self.log(f"{m.name} · {d.spec} · {which}: features {how} ({path})")
            if which == "test":
                stores["test_dataset"] = ds
        self.note_class_sets(m, d, stores)
        self.save_info()
        for u in units:
            u.cost = self.unit_cost(d, stores, u.meta)
            if u.meta.get("kind") == "directions":  # reads the standard evaluation's fits: same rank
                u.group = self.standard_units.get((m.name, d.spec), "")
            elif u.uid in self.standard_units.values():
                u.group = u.uid
        return [u for u in units if u.uid not in self.done_before]

    def note_class_sets(self, m: ModelConfig, d: DatasetConfig, stores: dict) -> None:
        """Record the classes ``m``'s few-shot episodes on ``d`` would leave out (too few images), before any unit
        runs: every model's few-shot units then leave out the union, so the study compares its models on one
        class set per dataset (a segmentation class can lack images at one model's patch grid only). A setting
        no episode can be drawn for fails here, before the first evaluation."""
        if "fewshot" not in self.cfg.settings:
            return
        from ..protocols import fewshot_left_out

        lacking = fewshot_left_out(stores["train"], stores["test"], self.cfg.eval_spec(d, "fewshot"))
        sets = self.info["fewshot_class_sets"].setdefault(d.spec, {})
        for shots, classes in lacking.items():
            sets.setdefault(str(shots), {})[m.name] = list(classes)

    def shared_left_out(self, d: DatasetConfig, shots: int) -> list[int]:
        """The union, over the study's models, of the classes their ``shots``-shot episodes on ``d`` lack."""
        per_model = self.info["fewshot_class_sets"].get(d.spec, {}).get(str(shots), {})
        return sorted({int(c) for classes in per_model.values() for c in classes})

    def unit_cost(self, d: DatasetConfig, stores: dict, meta: dict[str, Any]) -> float:
        """:func:`sdist.estimate_cost` of a unit from its plan and its stores' sizes."""
        cfg, fs = self.cfg, self.cfg.fewshot
        train, test = stores["train"], stores["test"]
        h, w = train.grid if d.task == "segmentation" else (1, 1)
        episodes = fs.episodes if d.task == "classification" else fs.segmentation_episodes
        tokens = len(cfg.tokens) + (
            len(train.head_tokens(list(cfg.tokens))) if cfg.heads and meta["kind"] == "evaluate" else 0
        )
        return sdist.estimate_cost(
            meta["kind"],
            task=d.task,
            setting=meta.get("setting", "standard"),
            rules=meta.get("rules", cfg.rules),
            features=tokens * len(meta.get("positions") or ["patch"]) * len(meta.get("blocks", [0])),
            train=train.num_samples,
            test=test.num_samples,
            patches=h * w,
            episodes=episodes,
            ways=fs.ways,
            shots=meta.get("shots", 0),
            queries=fs.queries,
            grid=len(cfg.c_grid) if cfg.c_grid is not None else 8,
            fit_samples=cfg.report.max_fit_samples,
        )

    def run_units(self, pending: list[Unit]) -> None:
        """This rank's share of the pending units (the same assignment on every rank), each alone."""
        ranks = sdist.assign(pending, self.world_size)
        mine = [u for u in pending if ranks[u.uid] == self.rank]
        if self.world_size > 1:
            self.log(f"{len(mine)} of {len(pending)} units of work on this rank")
        total = sum(u.cost for u in pending) or 1.0
        if self.is_main and len(pending) > 1:  # where the time will go, before it goes
            dearest = sorted(pending, key=lambda u: -u.cost)[:3]
            shares = "; ".join(f"{u.label} {100 * u.cost / total:.0f} %" for u in dearest)
            self.log(f"{len(pending)} units of work; the largest by estimated cost: {shares}")
        done_cost = 0.0
        for k, u in enumerate(mine, 1):
            self.check_failed()
            # the study-level counter: units and the estimated share of this rank's work done before this one
            share = 100 * done_cost / (sum(v.cost for v in mine) or 1.0)
            self.log(f"unit {k}/{len(mine)} ({share:.0f} % of the estimated work done): {u.label}")
            self.run_unit(u)
            done_cost += u.cost
            sdist.kill_hook(self.rank, k)
            if self.is_main:
                self.merge()

    def checkpoint(self) -> Any:
        """The running unit's :class:`~qkvprobe.protocols.checkpoint.UnitCheckpoint`: an interrupted unit
        resumes at its first unfinished inner unit (block × position × token of a setting)."""
        from ..protocols.checkpoint import UnitCheckpoint

        return UnitCheckpoint(self.rd.part_partial(self._unit_record()["unit"]))

    def run_unit(self, u: Unit) -> None:
        invocation = len(self.info.get("timings_earlier", []))
        self.record = sdist.new_record(u, self.rank, self.world_size, invocation)
        t0 = time.perf_counter()
        try:
            with _qdist().alone():  # a unit is one rank's: no collective inside it
                key = " ".join([str(u.meta.get("kind", "unit")), *u.label.split(" · ")[:2]])
                self.timed(key, u.work)  # "evaluate <model> <dataset>", as before units had records
        except Exception as exc:
            if self.world_size == 1:
                raise
            error = str(exc) if isinstance(exc, QkvprobeError) else f"{type(exc).__name__}: {exc}"
            sdist.write_failed(self.rd, self.rank, u, error)
            raise QkvprobeError(sdist.failure_line(self.rank, u.label, error)) from exc
        finally:
            record, self.record = self.record, None
        record["seconds"] = round(time.perf_counter() - t0, 3)
        sdist.write_record(self.rd, record)
        shutil.rmtree(self.rd.part_partial(u.uid), ignore_errors=True)  # the record holds it all now

    def check_failed(self) -> None:
        failed = sdist.read_failed(self.rd)
        if failed is not None:
            line = sdist.failure_line(
                failed.get("rank", -1), failed.get("label", "?"), failed.get("error", "?")
            )
            self.log(f"stopping: {line}")
            raise Stopped(line)

    def wait_for_others(self, pending: list[Unit]) -> None:
        """Rank 0: wait until every pending unit has its record (merging as they come), or a rank failed."""
        if self.world_size == 1:
            return
        missing = [u for u in pending if not self.rd.part_file(u.uid).exists()]
        if missing:
            self.log(f"waiting for {len(missing)} units of the other ranks")
        last = time.perf_counter()
        while missing:
            self.check_failed()
            time.sleep(0.2)
            missing = [u for u in missing if not self.rd.part_file(u.uid).exists()]
            if time.perf_counter() - last > 10:  # show what arrived every so often
                self.merge()
                last = time.perf_counter()

    def merge(self) -> None:
        """Rank 0: the unit records into results.csv, the side files, fits/, progress.json and run.json."""
        records = sdist.read_records(self.rd, self.record_cache)
        notes = sdist.merge_records(self.rd, records)
        for key in {k for r in records for k in r.get("notes", {})}:
            self.info.pop(key, None)
        self.info.update(notes)
        if "unconverged" in notes:
            self.info["unconverged_units"] = len(notes["unconverged"])
        self.info["units"] = [
            {k: r[k] for k in ("unit", "label", "rank", "seconds", "invocation", "world_size")}
            for r in records
        ]
        if self.progress is not None:
            self.progress.extend([r["unit"] for r in records])
        self.save_info()

    def known_rows(self) -> list[ResultRow]:
        """Rows of the unit records present, then of results.csv (a run directory from before records)."""
        records = sdist.read_records(self.rd, self.record_cache)
        rows = [row for rec in records for row in sdist.record_rows(rec)]
        return rows + read_results(self.rd.results)

    def fits_path(self, m: ModelConfig, d: DatasetConfig) -> Path:
        """The standard evaluation's saved class vectors of ``m`` on ``d``: its record's, else fits/."""
        uid = self.standard_units.get((m.name, d.spec))
        if uid is not None and self.rd.part_fits(uid).is_file():
            return self.rd.part_fits(uid)
        return self.rd.fit_file(m.name, d.spec)

    # ---- where a unit's output goes (its record; rank 0 merges the records) ------------------------------
    def _unit_record(self) -> dict[str, Any]:
        if self.record is None:
            raise RuntimeError("a unit's output is emitted outside a unit of work")
        return self.record

    def emit_rows(self, rows: list[ResultRow]) -> None:
        """Result rows of the running unit."""
        self._unit_record()["rows"].extend(rows)

    def emit_fits(self, model: str, dataset: str, weights: dict[Any, Any], classes: Any) -> None:
        """The standard protocol's class vectors of ``model`` on ``dataset`` (fits/ once merged)."""
        from .sides import save_fits

        record = self._unit_record()
        save_fits(self.rd.part_fits(record["unit"]), weights, classes)
        record["fits"] = [model, dataset]

    def emit_side(self, name: str, entries: list[dict]) -> None:
        """Entries of a side file (``"paired"``, ``"directions"``: :data:`sdist.SIDES`)."""
        self._unit_record()["sides"].setdefault(name, []).extend(entries)

    def emit_note(self, key: str, value: list | dict) -> None:
        """A run.json note (a list extended, or a dict updated, over the units in order)."""
        sdist.add_note(self._unit_record()["notes"], key, value)

    def plan_units(
        self, m: ModelConfig, d: DatasetConfig, main_blocks: list[int], sweep_blocks: list[int]
    ) -> list[tuple[str, Callable[[dict, Any], None], str, dict[str, Any]]]:
        """The units of one model × dataset in order: (id, work(stores, backbone), words, plan facts)."""
        cfg, fs = self.cfg, self.cfg.fewshot
        units: list[tuple[str, Callable[[dict, Any], None], str, dict[str, Any]]] = []
        common = {"model": m.name, "dataset": d.spec, "tokens": cfg.tokens, "rules": cfg.rules}
        for setting in cfg.settings:
            for shots in [0] if setting == "standard" else fs.shots:
                uid = unit_id(
                    "evaluate",
                    **common,
                    setting=setting,
                    shots=shots,
                    blocks=main_blocks,
                    positions=d.positions,
                )
                if setting == "standard":
                    self.standard_units[(m.name, d.spec)] = uid
                units.append(
                    (
                        uid,
                        lambda st, bb, s=setting, k=shots: self.evaluate(
                            m, d, st, s, k, main_blocks, d.positions
                        ),
                        "standard" if setting == "standard" else f"{shots}-shot",
                        {
                            "kind": "evaluate",
                            "setting": setting,
                            "shots": shots,
                            "blocks": main_blocks,
                            "positions": d.positions,
                        },
                    )
                )
        if sweep_blocks:
            pos = [cfg.block_sweep.position]
            uid = unit_id(
                "sweep", **{**common, "rules": cfg.sweep_rules()}, blocks=sweep_blocks, positions=pos
            )
            units.append(
                (
                    uid,
                    lambda st, bb: self.evaluate(
                        m, d, st, "standard", 0, sweep_blocks, pos, paired=False, rules=cfg.sweep_rules()
                    ),
                    f"block sweep {sweep_blocks}",
                    {"kind": "sweep", "rules": cfg.sweep_rules(), "blocks": sweep_blocks, "positions": pos},
                )
            )
        if cfg.report.enabled and "standard" in cfg.settings:
            uid = unit_id("directions", **common, blocks=main_blocks[-1:])
            units.append(
                (
                    uid,
                    lambda st, bb: self.directions(m, bb, d, st, main_blocks[-1]),
                    "directions",
                    {"kind": "directions", "positions": ["patch"]},
                )
            )
            if d.task == "segmentation" and cfg.report.direction_map_images:
                uid = unit_id(
                    "maps", **common, blocks=main_blocks[-1:], images=cfg.report.direction_map_images
                )
                units.append(
                    (
                        uid,
                        lambda st, bb: self.maps(m, bb, d, st, main_blocks[-1]),
                        "direction maps",
                        {"kind": "maps", "positions": ["patch"]},
                    )
                )
        return units

    # ---- units ------------------------------------------------------------------------------------------
    def evaluate(
        self,
        m: ModelConfig,
        d: DatasetConfig,
        stores: dict,
        setting: str,
        shots: int,
        blocks: list[int],
        positions: list[str] | None,
        *,
        paired: bool = True,
        rules: list[str] | None = None,
    ) -> None:
        """One evaluation unit: the study config's spec for this dataset × setting (× shots) through the one
        pipeline (``protocols.evaluate``), its outputs written as ``qkvprobe evaluate`` writes them."""
        from ..protocols import evaluate
        from .outputs import left_out_info

        spec = self.cfg.eval_spec(
            d,
            setting,
            shots=shots or None,
            blocks=blocks,
            positions=positions,
            rules=rules,
            heads=self.cfg.heads and paired,  # single heads at the main block(s), not in the block sweep
            device=self.device,
        )
        label = setting_text(d.task, setting, shots, spec.fewshot.ways)
        tokens = "" if not spec.heads else " (and their heads)"
        self.log(
            f"{m.name} · {d.spec} · {label}: blocks {blocks}, {len(spec.tokens or ())} tokens{tokens} × "
            f"{len(spec.rules)} rules ({', '.join(spec.rules)})"
        )
        with self.reporter.units("  evaluate") as tell:
            evaluation = evaluate(
                stores["train"],
                stores["test"],
                spec,
                model=m.name,
                dataset=d.spec,
                weights=self.sources.get(m.name, ""),
                progress=tell,
                paired=paired,
                exclude_classes=self.shared_left_out(d, shots) if setting == "fewshot" else (),
                checkpoint=self.checkpoint(),
            )
        for field_name, entries in left_out_info(evaluation).items():
            self.emit_note(field_name, entries)
            for where, names in entries.items():
                what = "the episodes" if field_name == "left_out" else "the validation episodes that choose C"
                self.log(f"{where}: classes with too few images left out of {what}: {', '.join(names)}")
        if evaluation.unconverged:
            units = [f"{m.name} · {d.spec} · {u}" for u in evaluation.unconverged]
            self.log(f"not converged (results marked converged=false): {'; '.join(units)}")
            self.emit_note("unconverged", units)
        if not evaluation.rows:
            raise QkvprobeError(f"protocol returned no results for {m.name} on {d.spec} ({label})")
        self.emit_rows(evaluation.rows)  # the pipeline's rows name the weights already
        if setting == "standard" and paired and evaluation.weights and evaluation.classes is not None:
            self.emit_fits(m.name, d.spec, evaluation.weights, evaluation.classes)
        if evaluation.paired:  # the block sweep (paired=False) is a map, not a contest: no tests there
            self.emit_side("paired", evaluation.paired)

    def directions(self, m: ModelConfig, bb: Any, d: DatasetConfig, stores: dict, block: int) -> None:
        import numpy as np

        from .sides import (
            direction_cosines,
            fitted_direction_cosines,
            lookup_C,
            sample_rows,
            training_features,
        )

        train = stores["train"]
        position = (d.positions or ["patch"])[0]
        rows = self.known_rows()
        tokens = list(self.cfg.tokens)
        Cs = [lookup_C(rows, m.name, d.spec, t, position, block) for t in tokens]
        # The standard protocol's own fits when saved (no second fit); otherwise refit on a subsample.
        fitted = fitted_direction_cosines(self.fits_path(m, d), tokens, position, block)
        if fitted is not None:
            classes, cos = fitted
        else:
            keep, y = sample_rows(train, self.cfg.report.max_fit_samples, self.cfg.seed)
            X = np.stack([training_features(train, t, position, block, keep) for t in tokens])
            classes, cos = direction_cosines(X, y, Cs, self.device, self.cfg.class_weight)
        entries = [
            {
                "model": m.name,
                "objective": bb.objective,
                "dataset": d.spec,
                "block": block,
                "token": t,
                "position": position,
                "C": C,
                "classes": [str(train.classes[int(c)]) for c in classes],
                "cosine": cos[g].tolist(),
            }
            for g, (t, C) in enumerate(zip(tokens, Cs, strict=True))
        ]
        self.emit_side("directions", entries)

    def maps(self, m: ModelConfig, bb: Any, d: DatasetConfig, stores: dict, block: int) -> None:
        from .sides import class_direction_map, map_images

        train, test = stores["train"], stores["test"]
        n = min(self.cfg.report.direction_map_images, test.num_samples)
        images, masks = map_images(stores["test_dataset"], test.indices()[:n])
        for token in self.cfg.tokens:
            cos = class_direction_map(
                train, test, token, block, n, self.cfg.report.max_fit_samples, self.cfg.seed
            )
            save_direction_map(
                self.rd.map_file(m.name, d.spec, token),
                images=images,
                masks=masks,
                cosine=cos,
                classes=list(test.classes),
                meta={"model": m.name, "dataset": d.spec, "token": token, "block": block},
            )


def run_study(
    cfg: StudyConfig, *, fresh: bool = False, progress: bool = True, console: Console | None = None
) -> StudyResult:
    """Run (or resume) a study; write results.csv, run.json, side files and the report into ``cfg.run_dir()``.

    Under torchrun every rank calls it: ranks other than 0 do their share of the units and return a result
    without rows or summary. :class:`Stopped` when another rank failed."""
    from ..report import load_run, render_report, run_summary

    console = console or Console(stderr=True)
    try:
        study = _Study(cfg, fresh=fresh, progress=progress, console=console)
        study.run()
    except QkvprobeError as exc:  # under torchrun the one line says which rank failed
        world = _qdist().world_info()
        if world.distributed and not str(exc).startswith(f"rank {world.rank} "):
            raise QkvprobeError(f"rank {world.rank}: {exc}") from exc
        raise
    if not study.is_main:
        return StudyResult(
            study.run_dir, [], None, None, dict(study.timings), study.skipped, study.rank, study.world_size
        )
    report = None
    if cfg.report.enabled:
        study.log("writing the report")
        report = study.timed("report", lambda: render_report(study.run_dir))
        study.save_info()
    summary = run_summary(load_run(study.run_dir))
    return StudyResult(
        study.run_dir,
        read_results(study.rd.results),
        summary,
        report,
        dict(study.info["timings"]),
        study.skipped,
        study.rank,
        study.world_size,
    )
