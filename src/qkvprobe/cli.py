"""The ``qkvprobe`` command line: a typer app whose commands are thin wrappers over library functions.

Each command is a plain function in ``qkvprobe/commands/<name>.py`` (one owner per file); :func:`build_app`
registers them here, explicitly, each wrapped in :func:`edge`. Exit codes: 0 done; 1 a domain error
(:class:`~qkvprobe.errors.QkvprobeError`: a missing file, a bad config, a store that does not hold what was
asked), printed as one ``qkvprobe: error: …`` line on stderr; 2 a usage error (an unknown option, a bad flag
value: see :mod:`qkvprobe.commands._args`), printed in click's style with the usage line; 130 interrupted.

Off a terminal (a pipe, a log file, CliRunner) help and usage errors are click's plain text, and warnings and
log records are plain ``warning: …`` lines (:func:`qkvprobe.feedback.command_output`); on a terminal rich
formats them.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from .errors import QkvprobeError

F = TypeVar("F", bound=Callable[..., Any])

HELP = "Which token of a self-supervised ViT, with which decision rule? Extract, evaluate, report."


def edge(fn: F) -> F:
    """Wrap a command: warnings and log records as plain lines off a terminal, a QkvprobeError as one stderr
    line and exit code 1 (no traceback), Ctrl-C as exit code 130."""
    from .feedback import command_output

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with command_output():
                return fn(*args, **kwargs)
        except QkvprobeError as exc:
            typer.echo(f"qkvprobe: error: {exc}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("qkvprobe: interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _on_terminal() -> bool:
    from rich.console import Console

    return Console(stderr=True).is_terminal and Console().is_terminal


def build_app(*, rich: bool | None = None) -> typer.Typer:
    """The app with every command registered. ``rich``: rich help panels and error boxes (default: when stdout
    and stderr are terminals); otherwise click's plain text, which wraps cleanly in a pipe at any width."""
    from .commands import catalog, evaluate, extract, pretrain, run

    app = typer.Typer(
        name="qkvprobe",
        help=HELP,
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode="rich" if (_on_terminal() if rich is None else rich) else None,
    )
    # short_help: one line each in `qkvprobe --help` at 80 columns (click would cut the docstrings mid-sentence)
    commands: list[tuple[str, Callable[..., Any], str]] = [
        ("run", run.run_command, "Run a study: extract, evaluate, write results and report."),
        ("extract", extract.extract, "Extract token features of a dataset split into a store."),
        ("evaluate", evaluate.evaluate, "Evaluate decision rules on existing feature stores."),
        ("report", run.report_command, "Re-render a run directory's report from its results."),
        ("findings", run.findings_command, "Write a run's findings as Markdown (docs/findings.md)."),
        ("pretrain", pretrain.pretrain_cmd, "Pre-train a small ViT (DINO or MAE) on Fashion-MNIST."),
        ("models", catalog.models_cmd, "List built-in models and known timm / HF checkpoints."),
        ("datasets", catalog.datasets_cmd, "List dataset specs, their sizes and where each was found."),
    ]
    for name, fn, short_help in commands:
        app.command(name, short_help=short_help)(edge(fn))
    return app


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    build_app()(args=argv if argv is not None else sys.argv[1:], prog_name="qkvprobe")


def get_app() -> typer.Typer:
    """The fully registered app (for typer's CliRunner in tests)."""
    return build_app()
