"""``qkvprobe run [CONFIG] [--set key=value ...]`` (the study), ``qkvprobe report RUN_DIR`` and ``qkvprobe findings
RUN_DIR``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

#: The RUN_DIR argument of ``report`` and ``findings``.
RunDirArgument = Annotated[
    Path,
    typer.Argument(
        metavar="RUN_DIR", help="A run directory (holding results.csv) written by `qkvprobe run`."
    ),
]


def run_command(
    config: Annotated[
        Path | None,
        typer.Argument(
            metavar="CONFIG",
            help="Study config (YAML). Omitted: the embedded default study (configs/default.yaml).",
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            metavar="KEY=VALUE",
            help="Override a config key, e.g. --set fewshot.episodes=100 (repeatable; YAML values).",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Run directory (default: the config's out_dir/name; relative to the working directory).",
        ),
    ] = None,
    fresh: Annotated[
        bool, typer.Option("--fresh", help="Discard the run directory's earlier results instead of resuming.")
    ] = False,
    progress: Annotated[
        bool,
        typer.Option(
            "--progress/--no-progress",
            help="Progress on stderr: a bar on a terminal, else one line per unit of work with the elapsed time.",
        ),
    ] = True,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Same as --no-progress.")] = False,
) -> None:
    """Run a study: extract (cached) features, evaluate every token × rule × setting, write results and report.

    Progress goes to stderr (plain lines, one per unit of work, when stderr is not a terminal); the answer table
    to stdout. A killed run resumes where it stopped when started again with the same config. Relative paths in
    a config file resolve against that file's folder. Under torchrun (`torchrun --nproc-per-node N -m qkvprobe
    run …`) the ranks extract each store together and share the units of work; rank 0 writes the results and
    prints the answer, the other ranks only their progress."""
    from rich.console import Console

    from ..config import load_config
    from ..study import Stopped, run_study

    cfg = load_config(config, set_ or []).with_run_dir(out)
    try:
        result = run_study(cfg, fresh=fresh, progress=progress and not quiet, console=Console(stderr=True))
    except Stopped:  # another rank failed and said so in one line: this one stops quietly
        raise typer.Exit(1) from None
    if result.summary is None:  # a torchrun rank other than 0: rank 0 prints the answer
        return
    console = Console()
    console.print(result.summary)
    console.print(f"results: {result.run_dir / 'results.csv'}")
    if result.report is not None:
        console.print(f"report:  {result.report}")


def report_command(
    run_dir: RunDirArgument,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Where to write the HTML (default RUN_DIR/report.html)."),
    ] = None,
) -> None:
    """Re-render report.html and figures/ from a run directory's saved results alone (no model is loaded)."""
    from rich.console import Console

    from ..report import load_run, render_report, run_summary

    path = render_report(run_dir, out)
    console = Console()
    console.print(run_summary(load_run(run_dir)))
    console.print(f"report: {path}")


def findings_command(
    run_dir: RunDirArgument,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Where to write the Markdown (default: print it)."),
    ] = None,
    reproduce: Annotated[
        str,
        typer.Option(
            "--reproduce",
            help="The command that made the run, printed at the top (default: `qkvprobe run`).",
        ),
    ] = "qkvprobe run",
) -> None:
    """Write the run's findings as Markdown (docs/findings.md): the answer table, the insights and every token ×
    rule table, each number read from RUN_DIR/results.csv."""
    from ..report.findings import findings_markdown, write_findings

    if out is None:
        from ..report import load_run

        typer.echo(findings_markdown(load_run(run_dir), reproduce), nl=False)
        return
    typer.echo(f"findings: {write_findings(run_dir, out, reproduce)}")
