"""``qkvprobe models`` / ``qkvprobe datasets``: spec strings whole on one line at 80 columns and in a pipe,
notes below them when they do not fit, ``--long``, ``--family``, ``--json``."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from qkvprobe.backbones import list_models
from qkvprobe.cli import get_app
from qkvprobe.commands.catalog import render_models

runner = CliRunner()


def spec_lines(text: str) -> dict[str, str]:
    """First word of each indented row line → the line."""
    return {
        line.split()[0]: line
        for line in text.splitlines()
        if line.startswith("  ") and not line.startswith("   ")
    }


@pytest.mark.parametrize("columns", ["80", "200"])
def test_models_never_wrap_or_cut_a_spec(monkeypatch: pytest.MonkeyPatch, columns: str) -> None:
    monkeypatch.setenv("COLUMNS", columns)
    result = runner.invoke(get_app(), ["models"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= int(columns)
    assert "…" not in result.output
    rows = spec_lines(result.output)
    for row in list_models():
        assert row["spec"] in rows and row["objective"] in rows[row["spec"]].split()
        assert row["notes"] in result.output.replace("\n      ", " ")  # wrapped notes read back whole
    for family in ("joint-embedding", "masked-image-modelling", "other"):
        assert any(line.startswith(family) for line in lines)


def test_builtin_notes_are_short_and_long_has_details(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [r for r in list_models() if r["spec"].startswith("builtin:")]
    assert rows
    short = render_models(rows, 80)
    assert len([line for line in short if line.startswith("      ")]) == len(rows)  # one line of notes each
    long = render_models(rows, 80, long=True)
    assert len(long) > len(short) and max(len(line) for line in long) <= 80
    assert all(r["details"] in " ".join(x.strip() for x in long) for r in rows)


@pytest.mark.parametrize(
    ("family", "objectives"),
    [
        ("mim", {"mim"}),
        ("masked-image-modelling", {"mae", "mim"}),
        ("other", {"jepa", "aim"}),
        ("dino", {"dino"}),
    ],
)
def test_models_family_filter(family: str, objectives: set[str]) -> None:
    result = runner.invoke(get_app(), ["models", "--family", family, "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert rows and {r["objective"] for r in rows} == objectives


def test_models_unknown_family() -> None:
    result = runner.invoke(get_app(), ["models", "--family", "contrastive"])
    assert result.exit_code == 2
    assert (
        "Invalid value for '--family': unknown objective or family 'contrastive'; choose from dino, msn"
        in result.output
    )


def test_models_json_is_the_catalogue() -> None:
    result = runner.invoke(get_app(), ["models", "--json"])
    assert result.exit_code == 0
    assert json.loads(result.output) == list_models()


def test_datasets_json_and_plain(monkeypatch: pytest.MonkeyPatch) -> None:
    from qkvprobe.data import list_datasets

    result = runner.invoke(get_app(), ["datasets", "--json"])
    assert result.exit_code == 0
    rows = json.loads(result.output)
    assert rows == json.loads(json.dumps(list_datasets()))
    monkeypatch.setenv("COLUMNS", "80")
    plain = runner.invoke(get_app(), ["datasets"]).output
    assert max(len(line) for line in plain.splitlines()) <= 80 and "…" not in plain
    firsts = [line.split()[0] for line in plain.splitlines() if line and not line.startswith(" ")]
    assert firsts == ["spec", *(r["spec"] for r in rows)]
