"""The terminal summary of ``qkvprobe run`` / ``evaluate`` / ``report``: the report's answer table
(:func:`qkvprobe.report.answer.answer_lines`), one rich table per model."""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd
from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from ..feedback import Trimmed
from .answer import ANSWER_LEGEND, Answer, answer_lines, answers, weights_by_model
from .files import RunFiles
from .tables import is_head, main_rows, setting_label

TITLE = "Which token, with which rule?"


def run_answers(run: RunFiles) -> tuple[pd.DataFrame, list[Answer]]:
    """The primary-metric rows of a run's main tables (whole token types: single heads get their own figures)
    and the answers they give — the one source of the answer table of ``run``, ``evaluate``, ``report``, the
    HTML report and the findings."""
    main = main_rows(run.results, run.run_info)
    if not main.empty:
        main = main[~is_head(main["token"])]
    return main, answers(main, run.paired, weights_by_model(run.run_info))


def answer_notes(run: RunFiles, main: pd.DataFrame) -> list[str]:
    """What the answer table's reader must know beside it: ties decided without paired data, and few-shot
    classes left out of the episodes (from the rows' ``left_out`` column), per model × dataset × setting."""
    notes = []
    pairable = (
        main[(main["setting"] == "fewshot") | (main["task"] == "classification")] if not main.empty else main
    )
    if not run.paired and not pairable.empty:
        notes.append(
            "no paired tests recorded beside these results (paired.json): ties are decided by overlapping "
            "95 % intervals, which miss differences a paired test finds"
        )
    df = run.results
    if "left_out" in df and not df.empty:
        left = df[df["left_out"].astype(str) != ""]
        # one line per dataset and class list: which models and settings left them out
        for (dataset, names), sub in left.groupby(["dataset", "left_out"], sort=False):
            models = ", ".join(dict.fromkeys(sub["model"].astype(str)))
            settings = ", ".join(
                dict.fromkeys(
                    setting_label("fewshot", int(w), int(k))
                    for w, k in zip(sub["ways"], sub["shots"], strict=True)
                )
            )
            notes.append(
                f"{dataset} ({settings}; {models}): classes left out of the episodes (too few images): "
                + str(names).replace(";", ", ")
            )
    return notes


def run_summary(run: RunFiles, title: str = TITLE) -> Trimmed:
    """The answer table of a run directory as the terminal shows it (``run``, ``evaluate`` and ``report`` print
    this, byte for byte the same for the same files)."""
    main, items = run_answers(run)
    return _table(items, answer_notes(run, main), title)


def summary_table(
    main: pd.DataFrame,
    paired: list[dict] | None = None,
    weights: Mapping[str, str] | None = None,
    title: str = TITLE,
) -> Trimmed:
    """``main`` holds the primary-metric rows (:func:`qkvprobe.report.tables.main_rows`); ``paired`` the paired
    tests and ``weights`` the models' weight sources, as :func:`qkvprobe.report.answer.answers` takes them. Off a
    terminal its lines carry no trailing spaces (:class:`qkvprobe.feedback.Trimmed`)."""
    return _table(answers(main, paired, weights), [], title)


def _table(items: list[Answer], notes: list[str], title: str) -> Trimmed:
    lines = answer_lines(items)
    parts: list = [Text(title, style="bold")]
    parts += [Text(note, style="yellow") for note in notes]
    if not lines:
        parts.append(Text("No results."))
    for model in dict.fromkeys(line.model for line in lines):
        mine = [line for line in lines if line.model == model]
        head = mine[0]
        table = Table(
            title=Text(
                f"{model} ({head.objective}, {head.family})\nweights: {head.weights or 'not recorded'}"
            ),
            title_justify="left",
            box=box.SIMPLE_HEAD,
            pad_edge=False,
        )
        table.add_column("dataset · setting / choice", overflow="fold", ratio=3)
        table.add_column("%", justify="right", no_wrap=True)
        table.add_column("ties / vs. the best", overflow="fold", ratio=4)
        for line in mine:
            if line.best:
                table.add_row(Text(f"{line.dataset} · {line.setting} ({line.metric})", style="bold"), "", "")
            table.add_row(
                Text(("★ " if line.best else "  ") + f"{line.choice} {line.rule}"),
                line.value,
                Text(line.verdict),
            )
        parts.append(table)
    parts.append(Text(ANSWER_LEGEND, style="dim"))
    return Trimmed(Group(*parts))
