"""What one evaluation leaves in a run directory — the same files whichever door ran it (``qkvprobe run``,
``qkvprobe evaluate --out``): its rows merged into ``results.csv``, its paired tests into ``paired.json``, the
standard setting's fitted class vectors under ``fits/``, and what ``run.json`` says of it (the model's weights,
its main blocks, left-out classes). ``qkvprobe report`` reads exactly these, so it prints the answer table the
evaluation printed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..io import read_json, write_json
from ..protocols.evaluation import Evaluation
from ..results import write_results
from ..rundir import RunDir
from ..tables import setting_text

#: The fields that identify one evaluation's paired tests in ``paired.json`` (a re-run replaces them).
PAIRED_KEY: tuple[str, ...] = ("model", "dataset", "setting", "shots")


def merge_entries(path: Path, key: str, entries: list[dict[str, Any]], ident: tuple[str, ...]) -> None:
    """Merge ``entries`` into the list ``key`` of the JSON file at ``path``: an entry with the same ``ident``
    fields as an old one replaces it (atomically)."""
    old = (read_json(path, {}) or {}).get(key, [])
    new_ids = {tuple(e.get(k) for k in ident) for e in entries}
    kept = [e for e in old if tuple(e.get(k) for k in ident) not in new_ids]
    write_json(path, {key: kept + list(entries)})


def save_evaluation(
    run_dir: str | Path, ev: Evaluation, *, results: Path | None = None, fits: bool = True
) -> None:
    """Write an evaluation's rows (into ``results``, default ``run_dir/results.csv``), paired tests and
    standard-setting fits (``fits=False``: none — a block sweep's would replace the main blocks') into
    ``run_dir``."""
    rd = RunDir(run_dir)
    rd.path.mkdir(parents=True, exist_ok=True)
    write_results(results or rd.results, ev.rows, sort=True)  # key order, as a study writes the table
    if ev.paired:
        merge_entries(rd.paired, "tests", ev.paired, PAIRED_KEY)
    if fits and ev.setting == "standard" and ev.weights and ev.classes is not None:
        from .sides import save_fits

        save_fits(rd.fit_file(ev.model, ev.dataset), ev.weights, ev.classes)


def left_out_info(ev: Evaluation) -> dict[str, dict[str, list[str]]]:
    """``run.json``'s record of the classes an evaluation left out: ``{"left_out": {where: names}}`` and the
    same for the validation episodes of ``C="auto"`` (``"validation_left_out"``), ``where`` naming the model,
    dataset and setting."""
    out: dict[str, dict[str, list[str]]] = {}
    for field, found in (("left_out", ev.left_out), ("validation_left_out", ev.validation_left_out)):
        for shots, names in sorted(found.items()):
            if names:
                where = f"{ev.model} · {ev.dataset} · {setting_text(ev.task, ev.setting, shots)}"
                out.setdefault(field, {})[where] = list(names)
    return out


def record_evaluation(run_dir: str | Path, ev: Evaluation, model_entry: dict[str, Any]) -> None:
    """Merge into ``run_dir``'s ``run.json`` what the answer table reads of an evaluation run outside a study
    (``qkvprobe evaluate``): the model's entry (label, weights' source and digest), its main blocks (every block
    evaluated) and the left-out classes."""
    rd = RunDir(run_dir)
    info = read_json(rd.run_json, {}) or {}
    models = [m for m in info.get("models", []) if m.get("label") != model_entry.get("label")]
    info["models"] = [*models, model_entry]
    blocks = info.setdefault("main_blocks", {})
    blocks[ev.model] = sorted({*blocks.get(ev.model, []), *ev.blocks})
    for field, entries in left_out_info(ev).items():
        info.setdefault(field, {}).update(entries)
    write_json(rd.run_json, info)
