"""The compact terminal summary: best token/position per model × task × setting × rule (a rich table)."""

from __future__ import annotations

import math

import pandas as pd
from rich.table import Table

from .tables import best_choices, fmt


def summary_table(main: pd.DataFrame, title: str = "Best choice per model × task × setting × rule") -> Table:
    """``main`` holds the primary-metric rows (:func:`qkvprobe.report.tables.main_rows`)."""
    table = Table(title=title, show_lines=False, pad_edge=False)
    for col, kw in (
        ("model", {"overflow": "fold"}),
        ("task · setting", {}),
        ("rule", {}),
        ("best token", {}),
        ("%", {"justify": "right", "no_wrap": True}),
    ):
        table.add_column(col, **kw)
    best = best_choices(main)
    for _, r in best.iterrows():
        ci = float(r["ci95"]) if r["ci95"] is not None else math.nan
        task = {"classification": "cls", "segmentation": "seg"}.get(str(r["task"]), str(r["task"]))
        table.add_row(
            str(r["model"]).removeprefix("builtin:"),
            f"{task} · {r['setting_label']}",
            str(r["rule"]),
            f"{r['token']}·{r['position']}",
            fmt(float(r["value"]), ci),
        )
    table.caption = "cls = classification (accuracy), seg = segmentation (mIoU); value ± 95 % CI"
    return table
