from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from qkvprobe.cli import get_app


def test_python_m_help_smoke() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "qkvprobe", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    for command in ("run", "extract", "evaluate", "report", "pretrain", "models", "datasets"):
        assert command in out.stdout


def test_unknown_command_is_usage_error() -> None:
    result = CliRunner().invoke(get_app(), ["no-such-command"])
    assert result.exit_code == 2
