"""``qkvprobe models`` and ``qkvprobe datasets``: what can be loaded, and from where.

Plain text, not a table widget: a spec string is always printed whole on one line, so it can be copied in any
terminal width or pipe; text that does not fit beside it goes to the next line, indented and wrapped.
"""

from __future__ import annotations

import json
import shutil
import textwrap
from collections.abc import Sequence
from typing import Any

import typer

from ..vocab import OBJECTIVE_FAMILIES, OBJECTIVES
from ._args import one_of

#: Indent of continuation lines (notes and details under their spec).
INDENT = "      "


def terminal_width() -> int:
    """Columns to format for: the terminal's, ``$COLUMNS`` when set, 80 in a pipe."""
    return max(40, shutil.get_terminal_size((80, 24)).columns)


def _wrapped(text: str, width: int) -> list[str]:
    return textwrap.wrap(
        text,
        width,
        initial_indent=INDENT,
        subsequent_indent=INDENT,
        break_long_words=False,
        break_on_hyphens=False,
    )


def _row(head: str, tail: str, width: int, below: bool) -> list[str]:
    """``head  tail`` on one line, or with ``below`` ``head`` then ``tail`` wrapped under it."""
    if not tail:
        return [head.rstrip()]
    if not below:
        return [f"{head}  {tail}"]
    return [head.rstrip(), *_wrapped(tail, width)]


def _fits(heads: Sequence[str], tails: Sequence[str], width: int) -> bool:
    """Whether every ``head  tail`` fits in ``width`` (one layout for the whole listing keeps it readable)."""
    return all(len(h) + 2 + len(t) <= width for h, t in zip(heads, tails, strict=True))


def render_models(rows: Sequence[dict[str, str]], width: int, long: bool = False) -> list[str]:
    """Lines of ``qkvprobe models``: rows grouped by objective family, ``spec  objective  notes``."""
    if not rows:
        return []
    spec_width = max(len(r["spec"]) for r in rows)
    objective_width = max(len(r["objective"]) for r in rows)

    def head(r: dict[str, str]) -> str:
        return f"  {r['spec']:<{spec_width}}  {r['objective']:<{objective_width}}"

    below = not _fits([head(r) for r in rows], [r["notes"] for r in rows], width)
    lines: list[str] = []
    for family in dict.fromkeys([*OBJECTIVE_FAMILIES.values(), *(r["family"] for r in rows)]):
        group = [r for r in rows if r["family"] == family]
        if not group:
            continue
        objectives = ", ".join(dict.fromkeys(r["objective"] for r in group))
        if lines:
            lines.append("")
        lines.append(f"{family} ({objectives}):")
        for r in group:
            lines += _row(head(r), r["notes"], width, below)
            if long and r.get("details"):
                lines += _wrapped(r["details"], width)
    return lines


def filter_models(rows: list[dict[str, str]], family: str | None) -> list[dict[str, str]]:
    """Rows whose objective or objective family is ``family`` (all when None); typer.BadParameter (a usage
    error) for other names."""
    if family is None:
        return rows
    choices = [*OBJECTIVES, *dict.fromkeys(OBJECTIVE_FAMILIES.values())]
    one_of(family, name="--family", what="objective or family", allowed=choices)
    return [r for r in rows if family in (r["objective"], r["family"])]


def models_cmd(
    family: str | None = typer.Option(
        None,
        "--family",
        help="Only this objective (dino, msn, mae, mim, jepa, aim) or family (e.g. joint-embedding).",
    ),
    long: bool = typer.Option(False, "--long", help="Also print the longer notes under each model."),
    as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON."),
) -> None:
    """List built-in models (builtin:NAME) and the timm / Hugging Face SSL checkpoints we know."""
    from ..backbones import list_models

    rows = filter_models(list_models(), family)
    if as_json:
        typer.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    for line in render_models(rows, terminal_width(), long=long):
        typer.echo(line)


DATASET_COLUMNS: tuple[str, ...] = ("spec", "task", "num_classes", "train", "test")


def render_datasets(rows: Sequence[dict[str, Any]], width: int) -> list[str]:
    """Lines of ``qkvprobe datasets``: ``spec task classes train test`` aligned, then the source; under each
    row the kind's spec options (``options: ?source= …``, from the registry)."""
    headers = {"spec": "spec", "task": "task", "num_classes": "classes", "train": "train", "test": "test"}
    cells = [{c: str(r.get(c, "")) for c in DATASET_COLUMNS} for r in rows]
    widths = {c: max([len(headers[c]), *(len(cell[c]) for cell in cells)]) for c in DATASET_COLUMNS}

    def head(values: dict[str, str]) -> str:
        return "  ".join(values[c].ljust(widths[c]) for c in DATASET_COLUMNS)

    sources = [str(r.get("source", "")) for r in rows]
    below = not _fits([head(c) for c in cells], sources, width)
    lines = _row(head(headers), "source", width, below)
    for row, cell, source in zip(rows, cells, sources, strict=True):
        lines += _row(head(cell), source, width, below)
        if row.get("options"):
            lines += _wrapped("options: " + " ".join(f"?{o}=" for o in row["options"]), width)
    return lines


def datasets_cmd(as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON.")) -> None:
    """List dataset specs, their sizes and where each was found on this machine."""
    from ..data import list_datasets

    rows = list_datasets()
    if as_json:
        typer.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    for line in render_datasets(rows, terminal_width()):
        typer.echo(line)
