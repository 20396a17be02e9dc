"""Render ``report.html`` (jinja2, autoescaped, self-contained) from the files of a run directory."""

from __future__ import annotations

import math
import os
from pathlib import Path

import jinja2
import numpy as np
import pandas as pd

from .. import __version__
from ..io import write_text
from ..rundir import RESULTS, RunDir
from ..tables import rule_names, rule_note
from ..vocab import TOKENS
from . import figures as figs
from .answer import ANSWER_LEGEND, answer_lines
from .files import RunFiles, load_run
from .insights import insights
from .summary import answer_notes, run_answers
from .tables import (
    BALANCED_RULE,
    HEAT_SPAN,
    Cell,
    HeatTable,
    fmt,
    head_grids,
    heat_style,
    heat_tables,
    is_head,
    main_rows,
    setting_label,
    sweep_grids,
)


def _env() -> jinja2.Environment:
    # autoescape everything: class names, model labels and paths are user text
    return jinja2.Environment(
        loader=jinja2.PackageLoader("qkvprobe.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=False,
    )


def direction_tables(directions: list[dict]) -> list[HeatTable]:
    """Per model × dataset (× position): class × token table of cos(w_c, μ_c), with a mean row."""
    out: list[HeatTable] = []
    if not directions:
        return out
    df = pd.DataFrame(directions)
    for (model, dataset, position), sub in df.groupby(["model", "dataset", "position"], sort=False):
        tokens = [t for t in TOKENS if t in set(sub["token"])] + [
            t for t in dict.fromkeys(sub["token"]) if t not in TOKENS
        ]
        by_token = {t: sub[sub["token"] == t].iloc[0] for t in tokens}
        classes = list(next(iter(by_token.values()))["classes"])
        table = HeatTable(title=f"{model} · {dataset} · {position}", metric="cosine", col_headers=tokens)
        values = {t: np.asarray(by_token[t]["cosine"], dtype=float) for t in tokens}
        for i, name in enumerate(classes):
            cells = []
            for t in tokens:
                v = float(values[t][i]) if i < len(values[t]) else math.nan
                cells.append(Cell(fmt(v, pct=False), heat_style(v, -1.0, 1.0, "RdBu_r")))
            table.rows.append((str(name), cells))
        means = {t: float(np.nanmean(values[t])) for t in tokens}
        top = max(means.values())
        table.rows.append(
            (
                "mean",
                [
                    Cell(
                        fmt(means[t], pct=False),
                        heat_style(means[t], -1.0, 1.0, "RdBu_r"),
                        best=bool(np.isclose(means[t], top)),
                    )
                    for t in tokens
                ],
            )
        )
        out.append(table)
    return out


def _paired_rows(tests: list[dict]) -> list[dict]:
    rows = []
    for t in tests:
        a, b = t.get("a", {}), t.get("b", {})
        diff = float(a.get("value", math.nan)) - float(b.get("value", math.nan))
        p = float(t.get("p_value", math.nan))
        rows.append(
            {
                "model": t.get("model", ""),
                "dataset": t.get("dataset", ""),
                "slabel": setting_label(t.get("setting", "fewshot"), t.get("ways", 0), t.get("shots", 0)),
                "a_label": f"{a.get('token')}·{a.get('position')} / {a.get('rule')}",
                "b_label": f"{b.get('token')}·{b.get('position')} / {b.get('rule')}",
                "diff": f"{100 * diff:+.1f}" if math.isfinite(diff) else "–",
                "test": t.get("test", ""),
                "p_text": f"{p:.3g}" if math.isfinite(p) else "–",
                "verdict": t.get("verdict", ""),
            }
        )
    return rows


def run_details(info: dict, df: pd.DataFrame) -> list[tuple[str, str]]:
    """(label, text) rows describing a run (models, weights, options, data, subsampling, timings, versions) from
    its ``run.json`` and its rows ``df``: the report's "About this run" table and the findings' header."""
    cfg = info.get("config", {})
    rows: list[tuple[str, str]] = []
    for m in info.get("models") or []:
        what = f"{m.get('spec', '')}" + (f", weights file {m['weights']}" if m.get("weights") else "")
        rows.append((f"model: {m.get('label', '')}", f"{what}; {m.get('weights_source', '')}"))
    if cfg and not info.get("models"):
        rows.append(
            ("models", ", ".join(str(m.get("label") or m.get("spec")) for m in cfg.get("models", [])))
        )
        rows.append(
            ("tokens / rules", f"{', '.join(cfg.get('tokens', []))} / {', '.join(cfg.get('rules', []))}")
        )
    # The rows' own class_weight column says which weightings the table holds; a run's config says it when there
    # are no hyperplane rows yet.
    used = [w for w in ("none", "balanced") if w in set(df.get("class_weight", ()))]
    if not used and cfg and "hyperplane" in cfg.get("rules", []):
        used = ["balanced" if cfg.get("class_weight") == "balanced" else "none"]
    if used:
        label = {"none": "none", "balanced": "balanced (n / (K·n_class) per class)"}
        note = f" (balanced rows shown as rule {BALANCED_RULE})" if len(used) > 1 else ""
        rows.append(("hyperplane class weights", " and ".join(label[w] for w in used) + note))
    if cfg and "fewshot" in cfg.get("settings", []) and "hyperplane" in cfg.get("rules", []):
        C = (cfg.get("fewshot") or {}).get("C", 1.0)
        rows.append(
            (
                "few-shot hyperplane C",
                "chosen per token on training-split episodes (the rows' C column)"
                if C == "auto"
                else f"{C:g} (fixed)",
            )
        )
    for name, src in (info.get("data_sources") or {}).items():
        rows.append((f"data: {name}", str(src)))
    sub = info.get("subsampling") or {}
    if sub:
        sizes = "; ".join(
            f"{name}: {v.get('train') or 'all'} train / {v.get('test') or 'all'} test"
            for name, v in (sub.get("sizes") or {}).items()
        )
        episodes = f"few-shot: {sub.get('fewshot_episodes')} episodes (segmentation {sub.get('segmentation_episodes')})"
        rows.append(("subsampling", f"{sizes}; {episodes} — {sub.get('how', '')}"))
    if "episodes_seed" in info:
        rows.append(("episodes' seed", str(info["episodes_seed"])))
    timings = info.get("timings") or {}
    if "total_s" in timings:
        earlier = len(info.get("timings_earlier") or [])
        note = f" (this invocation; {earlier} earlier interrupted one(s) in run.json)" if earlier else ""
        rows.append(("wall time", f"{timings['total_s']:.1f} s{note}"))
    versions = info.get("versions") or {}
    if versions:
        rows.append(("versions", ", ".join(f"{k} {v}" for k, v in versions.items())))
    rows.append(("measurements", str(len(df))))
    return rows


def render_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Render ``report.html`` (and ``figures/*.png``) from the saved files of ``run_dir`` alone."""
    run = load_run(run_dir)
    return render_run(run, Path(out) if out else RunDir(run.run_dir).report)


def _answer_models(lines: list) -> list[dict]:
    """The answer table's rows grouped by model (one heading per model, with its weights)."""
    out: list[dict] = []
    for line in lines:
        if not out or out[-1]["model"] != line.model:
            out.append(
                {
                    "model": line.model,
                    "objective": line.objective,
                    "family": line.family,
                    "weights": line.weights or "not recorded",
                    "lines": [],
                }
            )
        out[-1]["lines"].append(line)
    return out


def rule_notes(main: pd.DataFrame) -> list[tuple[str, str]]:
    """(rule, caveat) for each registered rule in the rows that carries one (:attr:`RuleProtocol.note`)."""
    present = {str(r).partition("·")[0] for r in main.get("rule", pd.Series(dtype=str)).unique()}
    return [(name, rule_note(name)) for name in rule_names() if name in present and rule_note(name)]


def render_run(run: RunFiles, out: Path) -> Path:
    fig_dir = RunDir(run.run_dir).figures
    # figures/ belongs to the report: drop the previous rendering's files, so none outlives its section
    for stale in fig_dir.glob("*") if fig_dir.is_dir() else []:
        if stale.is_file() and stale.suffix in (".png", ".svg"):
            stale.unlink()
    every = main_rows(run.results, run.run_info)
    heads = every[is_head(every["token"])]  # single heads get their own figures, not rows in every table
    main, found = run_answers(run)
    tables = heat_tables(main, found)
    context = {
        "title": run.run_info.get("name") or run.run_dir.name,
        "created": run.run_info.get("finished", ""),
        "meta": run_details(run.run_info, run.results),
        "answer_models": _answer_models(answer_lines(found)),
        "answer_legend": ANSWER_LEGEND,
        "answer_notes": answer_notes(run, main),
        "heat_span": f"{100 * HEAT_SPAN:.0f}",
        "any_unconverged": any(c.unconverged for t in tables for _, row in t.rows for c in row),
        "insights": insights(main, run.directions, found),
        "tables": tables,
        "rule_notes": rule_notes(main),
        "fewshot_figures": figs.fewshot_bars(main, fig_dir),
        "paired": _paired_rows(run.paired),
        "direction_tables": direction_tables(run.directions),
        "map_figures": figs.direction_maps(run.maps, fig_dir),
        "sweep_figures": [figs.sweep_heatmap(g, fig_dir) for g in sweep_grids(run.results)],
        "head_figures": [figs.head_heatmap(g, fig_dir) for g in head_grids(pd.concat([heads, main]))],
        "version": __version__,
        "results_file": RESULTS,
    }
    html = _env().get_template("report.html.j2").render(**context)
    write_text(out, html)
    return out
