"""``qkvprobe models`` and ``qkvprobe datasets``: what can be loaded, and from where."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ..cli import app, edge


@app.command("models")
@edge
def models_cmd() -> None:
    """List built-in models (``builtin:<name>``) and the timm / Hugging Face SSL checkpoints we know."""
    from ..backbones import list_models

    table = Table("spec", "objective", "notes")
    for entry in list_models():
        table.add_row(entry["spec"], entry.get("objective", ""), entry.get("notes", ""))
    Console().print(table)


@app.command("datasets")
@edge
def datasets_cmd() -> None:
    """List dataset specs, their sizes and where each was found on this machine."""
    from ..data import list_datasets

    table = Table("spec", "task", "classes", "train", "test", "source")
    for entry in list_datasets():
        table.add_row(
            entry["spec"],
            entry.get("task", ""),
            str(entry.get("num_classes", "")),
            str(entry.get("train", "")),
            str(entry.get("test", "")),
            entry.get("source", ""),
        )
    Console().print(table)
