"""The study (``qkvprobe run``): models × datasets × settings × tokens × rules × positions × blocks.

For each model: load the backbone; for each dataset: one cached feature store per split covering every
token, position and block needed; then the protocols per setting (and shot count), the block sweep, and the
side files. Rows are written after each unit of work, and finished units are recorded in
``progress.json``, so a killed run resumes where it stopped (cached features reused, finished rows kept, no
duplicate rows). At the end: ``run.json``, the report and a terminal summary.

Progress goes to the console as one line per unit of work (and, inside an evaluation, per protocol unit), plain
and unwrapped when the console is not a terminal (:class:`qkvprobe.feedback.Reporter`); while features are
extracted off a terminal, a heartbeat line says how many shards are written. Rows carry the weights' source
(``weights`` column) and ``run.json`` a ``models`` entry per model (label, spec, weights file, source, digest).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, RenderableType

from .. import __version__
from ..config import DatasetConfig, ModelConfig, StudyConfig, dump_config
from ..errors import QkvprobeError
from ..feedback import Reporter, many_tokens_warning, seconds, shard_progress
from ..io import read_json, write_json
from ..results import ResultRow, read_results
from ..rundir import RunDir, save_direction_map
from ..tables import setting_text
from ..vocab import objective_family
from .state import Progress, unit_id

__all__ = ["StudyResult", "run_study"]

SUBSAMPLING_NOTE = (
    "classification splits: seeded stratified random subsets of train_size/test_size images; "
    "Fashion-MNIST Scenes: generated at train_size/test_size scenes; few-shot: fewshot.episodes "
    "(segmentation: fewshot.segmentation_episodes) seeded episodes"
)


@dataclass
class StudyResult:
    run_dir: Path
    rows: list[ResultRow]
    summary: RenderableType
    report: Path | None
    timings: dict[str, Any] = field(default_factory=dict)
    skipped_units: int = 0


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


class _Study:
    """One invocation of a study; methods are the units of work."""

    def __init__(self, cfg: StudyConfig, *, fresh: bool, progress: bool, console: Console) -> None:
        self.cfg = cfg
        self.rd = RunDir(cfg.run_dir())
        self.run_dir = self.rd.path
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.console = console
        self.verbose = progress
        self.reporter = Reporter(console, enabled=progress)
        self.device = _device(cfg.device)
        self.progress = Progress(self.run_dir, cfg.fingerprint(), fresh=fresh)
        self.timings: dict[str, float] = {}
        self.skipped = 0
        self.sources: dict[str, str] = {}  # model label -> weights source (the rows' weights column)
        previous = read_json(self.rd.run_json, {}) or {}
        self.info: dict[str, Any] = {
            "name": cfg.name,
            "fingerprint": cfg.fingerprint(),
            "status": "running",
            "started": previous.get("started")
            if self.progress.resumed
            else time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "resumed": self.progress.resumed,
            "config": dump_config(cfg),
            "versions": _versions(),
            "device": self.device,
            "host": {"cpus": __import__("os").cpu_count(), "platform": platform.platform()},
            "episodes_seed": cfg.seed,
            "subsampling": self._subsampling(),
            "data_sources": previous.get("data_sources", {}),
            "models": previous.get("models", []) if self.progress.resumed else [],
            "main_blocks": previous.get("main_blocks", {}),
            "timings": {},
            # A resumed run's "timings" are this invocation's; the interrupted ones' (partial) timings are kept.
            "timings_earlier": [*previous.get("timings_earlier", []), previous.get("timings") or {}]
            if self.progress.resumed
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
        self.info.update(updates)
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

    def rows_present(self, model: str, dataset: str, setting: str, shots: int) -> bool:
        return any(
            (r.model, r.dataset, r.setting, r.shots) == (model, dataset, setting, shots)
            for r in read_results(self.rd.results)
        )

    # ---- the study --------------------------------------------------------------------------------------
    def run(self) -> None:
        t0 = time.perf_counter()
        self.save_info()
        for m in self.cfg.models:
            self.run_model(m)
        self.timings["total_s"] = time.perf_counter() - t0
        self.save_info(status="complete", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def run_model(self, m: ModelConfig) -> None:
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
        for d in self.cfg.datasets:
            self.run_dataset(m, bb, d, main_blocks, sweep=d.spec in sweep_sets)

    def run_dataset(
        self, m: ModelConfig, bb: Any, d: DatasetConfig, main_blocks: list[int], *, sweep: bool
    ) -> None:
        from ..features import cached_store
        from ..features.extract import plan_store
        from .data import open_split

        sweep_blocks: list[int] = []
        if sweep:
            wanted = (
                range(bb.num_blocks) if self.cfg.block_sweep.blocks == "all" else self.cfg.block_sweep.blocks
            )
            sweep_blocks = sorted({bb.resolve_block(b) for b in wanted} - set(main_blocks))
        positions = list(d.positions or [])
        if sweep and self.cfg.block_sweep.position not in positions:
            positions.append(self.cfg.block_sweep.position)
        units = self.plan_units(m, d, main_blocks, sweep_blocks)
        if all(self.progress.is_done(u) for u, _ in units) and (self.rd.results).exists():
            self.skipped += len(units)
            self.log(f"{m.name} · {d.spec}: done earlier, skipped")
            return
        stores = {}
        for which in ("train", "test"):
            ds = self.timed(
                f"open {d.spec} {which}",
                lambda which=which: open_split(
                    d,
                    which,
                    self.cfg.seed,
                    spec=self.cfg.dataset_spec(d),
                    root=self.cfg.dataset_root(d),
                ),
            )
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
            if warning:
                self.reporter.warn(f"{m.name} · {d.spec} · {which}: {warning}")
            path = self.cfg.cache_root() / manifest["key"][:16]
            self.log(f"{m.name} · {d.spec} · {which}: features of {len(ds)} samples")
            t0 = time.perf_counter()
            before = shard_progress(path)  # every shard already written: the cache serves this store
            cached = before is not None and before[0] == before[1] > 0
            with self.reporter.heartbeat(path, f"{m.name} · {d.spec} · {which}: extracting"):
                stores[which] = self.timed(
                    f"extract {m.name} {d.spec} {which}",
                    lambda ds=ds, plan=plan: cached_store(
                        self.cfg.cache_root(),
                        bb,
                        ds,
                        **plan,
                        batch_size=self.cfg.batch_size,
                        progress=self.verbose,
                    ),
                )
            how = "from the cache" if cached else f"extracted in {seconds(time.perf_counter() - t0)}"
            self.log(f"{m.name} · {d.spec} · {which}: features {how} ({path})")
            if which == "test":
                stores["test_dataset"] = ds
        self.save_info()
        for uid, work in units:
            if self.progress.is_done(uid):
                self.skipped += 1
                continue
            self.timed(uid.split(":")[0] + f" {m.name} {d.spec}", lambda work=work: work(stores, bb))
            self.progress.mark(uid)
            self.save_info()

    def plan_units(
        self, m: ModelConfig, d: DatasetConfig, main_blocks: list[int], sweep_blocks: list[int]
    ) -> list[tuple[str, Callable[[dict, Any], None]]]:
        cfg, fs = self.cfg, self.cfg.fewshot
        units: list[tuple[str, Callable[[dict, Any], None]]] = []
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
                units.append(
                    (
                        uid,
                        lambda st, bb, s=setting, k=shots: self.evaluate(
                            m, d, st, s, k, main_blocks, d.positions
                        ),
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
                )
            )
        if cfg.report.enabled and "standard" in cfg.settings:
            uid = unit_id("directions", **common, blocks=main_blocks[-1:])
            units.append((uid, lambda st, bb: self.directions(m, bb, d, st, main_blocks[-1])))
            if d.task == "segmentation" and cfg.report.direction_map_images:
                uid = unit_id(
                    "maps", **common, blocks=main_blocks[-1:], images=cfg.report.direction_map_images
                )
                units.append((uid, lambda st, bb: self.maps(m, bb, d, st, main_blocks[-1])))
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
        from .outputs import left_out_info, save_evaluation

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
            )
        for field_name, entries in left_out_info(evaluation).items():
            self.info.setdefault(field_name, {}).update(entries)
            for where, names in entries.items():
                what = "the episodes" if field_name == "left_out" else "the validation episodes that choose C"
                self.log(f"{where}: classes with too few images left out of {what}: {', '.join(names)}")
        if evaluation.unconverged:
            units = [f"{m.name} · {d.spec} · {u}" for u in evaluation.unconverged]
            self.log(f"not converged (results marked converged=false): {'; '.join(units)}")
            self.info.setdefault("unconverged", []).extend(units)
            self.info["unconverged_units"] = len(self.info["unconverged"])
        if not evaluation.rows:
            raise QkvprobeError(f"protocol returned no results for {m.name} on {d.spec} ({label})")
        save_evaluation(self.run_dir, evaluation, fits=paired)

    def _merge_side(self, path: Path, key: str, entries: list[dict], ident: tuple[str, ...]) -> None:
        from .outputs import merge_entries

        merge_entries(path, key, entries, ident)

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
        rows = read_results(self.rd.results)
        tokens = list(self.cfg.tokens)
        Cs = [lookup_C(rows, m.name, d.spec, t, position, block) for t in tokens]
        # The standard protocol's own fits when saved (no second fit); otherwise refit on a subsample.
        fitted = fitted_direction_cosines(self.rd.fit_file(m.name, d.spec), tokens, position, block)
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
        self._merge_side(self.rd.directions, "entries", entries, ("model", "dataset", "token", "position"))

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
    """Run (or resume) a study; write results.csv, run.json, side files and the report into ``cfg.run_dir()``."""
    from ..report import load_run, render_report, run_summary

    console = console or Console(stderr=True)
    study = _Study(cfg, fresh=fresh, progress=progress, console=console)
    study.run()
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
    )
