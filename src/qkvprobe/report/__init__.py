"""The report: tables, figures and one self-contained HTML file, built from a run directory's saved files
only (``results.csv`` plus the side files described in :mod:`qkvprobe.rundir`)."""

from __future__ import annotations

from .files import RunFiles, load_run
from .html import render_report
from .summary import run_answers, run_summary, summary_table
from .tables import main_rows

__all__ = [
    "RunFiles",
    "load_run",
    "main_rows",
    "render_report",
    "run_answers",
    "run_summary",
    "summary_table",
]
