"""The ``qkvprobe`` command line: a typer app whose commands are thin wrappers over library functions.

Each command lives in ``qkvprobe/commands/<name>.py`` (one owner per file) and is registered here. Domain
errors (:class:`~qkvprobe.errors.QkvprobeError`) are caught at this edge by :func:`edge` and printed as one
line on stderr with exit code 1; usage errors exit with 2 (click's convention).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from .errors import QkvprobeError

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="qkvprobe",
    help="Which token of a self-supervised ViT, with which decision rule? Extract, evaluate, report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def edge(fn: F) -> F:
    """Wrap a command so a QkvprobeError becomes one stderr line and exit code 1 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except QkvprobeError as exc:
            typer.echo(f"qkvprobe: error: {exc}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("qkvprobe: interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _register() -> None:
    # Imported here, not at the top: each module registers its commands on ``app`` via ``edge``.
    from .commands import catalog, evaluate, extract, pretrain, run  # noqa: F401


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    _register()
    app(args=argv if argv is not None else sys.argv[1:], prog_name="qkvprobe")


def get_app() -> typer.Typer:
    """The fully registered app (for typer's CliRunner in tests)."""
    _register()
    return app
