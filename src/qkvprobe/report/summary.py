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
from .answer import ANSWER_LEGEND, answer_lines, answers

TITLE = "Which token, with which rule?"


def summary_table(
    main: pd.DataFrame,
    paired: list[dict] | None = None,
    weights: Mapping[str, str] | None = None,
    title: str = TITLE,
) -> Trimmed:
    """``main`` holds the primary-metric rows (:func:`qkvprobe.report.tables.main_rows`); ``paired`` the paired
    tests and ``weights`` the models' weight sources, as :func:`qkvprobe.report.answer.answers` takes them. Off a
    terminal its lines carry no trailing spaces (:class:`qkvprobe.feedback.Trimmed`)."""
    lines = answer_lines(answers(main, paired, weights))
    parts: list = [Text(title, style="bold")]
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
