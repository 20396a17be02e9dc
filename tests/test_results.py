"""The results table: the class_weight and C_choice columns, tables written before them, merging by key."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from qkvprobe.errors import QkvprobeError
from qkvprobe.results import COLUMNS, ResultRow, read_results, write_results

OLD_COLUMNS = [
    c for c in COLUMNS if c not in ("class_weight", "C_choice")
]  # the table before class_weight existed
BEFORE_C_CHOICE = [c for c in COLUMNS if c != "C_choice"]


def row(rule: str, value: float, class_weight: str = "", **kw) -> ResultRow:
    base = dict(
        model="m",
        objective="dino",
        dataset="d",
        task="classification",
        setting="standard",
        block=5,
        token="ffn",
        position="cls",
        rule=rule,
        ways=0,
        shots=0,
        episodes=0,
        metric="accuracy",
        value=value,
        C=1.0 if rule == "hyperplane" else math.nan,
        class_weight=class_weight,
    )
    return ResultRow(**{**base, **kw})


def test_hyperplane_rows_default_to_plain_and_cosine_rows_are_unweighted() -> None:
    assert row("hyperplane", 0.5).class_weight == "none"
    assert row("cosine", 0.5).class_weight == ""
    with pytest.raises(QkvprobeError, match=r"class_weight 'balanced' given for rule 'cosine'"):
        row("cosine", 0.5, "balanced")
    with pytest.raises(QkvprobeError, match=r"class_weight 'auto' is not one of"):
        row("hyperplane", 0.5, "auto")


def test_plain_and_balanced_rows_are_separate_measurements(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    write_results(path, [row("hyperplane", 0.80, "none"), row("cosine", 0.70)])
    table = write_results(path, [row("hyperplane", 0.85, "balanced"), row("cosine", 0.71)])
    got = sorted((r.rule, r.class_weight, r.value) for r in table)
    assert got == [("cosine", "", 0.71), ("hyperplane", "balanced", 0.85), ("hyperplane", "none", 0.80)]
    assert sorted((r.rule, r.class_weight, r.value) for r in read_results(path)) == got
    write_results(path, [row("hyperplane", 0.82, "none")])  # same key as the plain row: replaces it
    assert sorted((r.class_weight, r.value) for r in read_results(path) if r.rule == "hyperplane") == [
        ("balanced", 0.85),
        ("none", 0.82),
    ]


def test_table_from_before_the_class_weight_column(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=OLD_COLUMNS)
        writer.writeheader()
        for r in (row("hyperplane", 0.80), row("cosine", 0.70)):
            writer.writerow(
                {
                    c: ("" if isinstance(v, float) and math.isnan(v) else v)
                    for c, v in r.__dict__.items()
                    if c in OLD_COLUMNS
                }
            )
    old = read_results(path)
    assert sorted((r.rule, r.class_weight) for r in old) == [("cosine", ""), ("hyperplane", "none")]
    # Merging new rows rewrites the table with the column; the old plain row is replaced by the new plain one.
    write_results(path, [row("hyperplane", 0.81, "none"), row("hyperplane", 0.86, "balanced")])
    with path.open(newline="") as fh:
        assert next(csv.reader(fh)) == list(COLUMNS)
    assert sorted((r.rule, r.class_weight, r.value) for r in read_results(path)) == [
        ("cosine", "", 0.70),
        ("hyperplane", "balanced", 0.86),
        ("hyperplane", "none", 0.81),
    ]


def test_a_table_missing_an_original_column_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    path.write_text(",".join(c for c in OLD_COLUMNS if c != "token") + "\n")
    with pytest.raises(QkvprobeError, match=r"not a qkvprobe results table, columns \['token'\] are missing"):
        read_results(path)


def test_C_choice_defaults_and_checks() -> None:
    assert row("hyperplane", 0.5).C_choice == "auto"  # the standard setting always chooses C
    assert row("hyperplane", 0.5, setting="fewshot", C=0.01).C_choice == "0.01"
    assert row("hyperplane", 0.5, setting="fewshot", C=1.0).C_choice == "1"
    assert row("hyperplane", 0.5, setting="fewshot", C=0.1, C_choice="auto").C_choice == "auto"
    assert row("cosine", 0.5).C_choice == ""
    with pytest.raises(QkvprobeError, match=r"C_choice '1' given for rule 'cosine'"):
        row("cosine", 0.5, C_choice="1")


def test_fixed_and_auto_C_rows_are_separate_measurements(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    fewshot = dict(setting="fewshot", ways=5, shots=1, episodes=100)
    write_results(path, [row("hyperplane", 0.60, **fewshot, C=1.0), row("cosine", 0.62, **fewshot)])
    # An auto run that happens to choose C = 1 is still another measurement than the fixed C = 1 one.
    write_results(path, [row("hyperplane", 0.64, **fewshot, C=1.0, C_choice="auto")])
    write_results(path, [row("hyperplane", 0.61, **fewshot, C=0.01)])
    got = sorted((r.rule, r.C_choice, r.value) for r in read_results(path))
    assert got == [
        ("cosine", "", 0.62),
        ("hyperplane", "0.01", 0.61),
        ("hyperplane", "1", 0.60),
        ("hyperplane", "auto", 0.64),
    ]
    write_results(path, [row("hyperplane", 0.59, **fewshot, C=1.0)])  # same fixed C: replaces its row
    assert sorted((r.C_choice, r.value) for r in read_results(path) if r.rule == "hyperplane") == [
        ("0.01", 0.61),
        ("1", 0.59),
        ("auto", 0.64),
    ]


def test_table_from_before_the_C_choice_column(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    fewshot = dict(setting="fewshot", ways=5, shots=1, episodes=100)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=BEFORE_C_CHOICE)
        writer.writeheader()
        for r in (row("hyperplane", 0.80), row("hyperplane", 0.60, **fewshot, C=0.1), row("cosine", 0.70)):
            writer.writerow(
                {
                    c: ("" if isinstance(v, float) and math.isnan(v) else v)
                    for c, v in r.__dict__.items()
                    if c in BEFORE_C_CHOICE
                }
            )
    old = read_results(path)
    assert sorted((r.rule, r.setting, r.C_choice) for r in old) == [
        ("cosine", "standard", ""),
        ("hyperplane", "fewshot", "0.1"),
        ("hyperplane", "standard", "auto"),
    ]
    write_results(path, [row("hyperplane", 0.62, **fewshot, C=0.1)])  # the old few-shot row's key: replaced
    with path.open(newline="") as fh:
        assert next(csv.reader(fh)) == list(COLUMNS)
    assert sorted((r.setting, r.value) for r in read_results(path) if r.rule == "hyperplane") == [
        ("fewshot", 0.62),
        ("standard", 0.80),
    ]


def test_table_from_before_the_weights_column(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    before = [c for c in COLUMNS if c != "weights"]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=before)
        writer.writeheader()
        for r in (row("hyperplane", 0.80), row("cosine", 0.70)):
            writer.writerow(
                {
                    c: ("" if isinstance(v, float) and math.isnan(v) else v)
                    for c, v in r.__dict__.items()
                    if c in before
                }
            )
    assert [(r.rule, r.weights) for r in read_results(path)] == [("hyperplane", ""), ("cosine", "")]
    # The weights' source is provenance, not part of the key: a new measurement of the same row replaces the old.
    write_results(path, [row("cosine", 0.71, weights="builtin: m.safetensors")])
    with path.open(newline="") as fh:
        assert next(csv.reader(fh)) == list(COLUMNS)
    assert sorted((r.rule, r.value, r.weights) for r in read_results(path)) == [
        ("cosine", 0.71, "builtin: m.safetensors"),
        ("hyperplane", 0.80, ""),
    ]
