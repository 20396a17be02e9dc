"""The results table: the class_weight column, tables written before it, merging by key."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from qkvprobe.errors import QkvprobeError
from qkvprobe.results import COLUMNS, ResultRow, read_results, write_results

OLD_COLUMNS = [c for c in COLUMNS if c != "class_weight"]  # the table before class_weight existed


def row(rule: str, value: float, class_weight: str = "", **kw) -> ResultRow:
    base = dict(model="m", objective="dino", dataset="d", task="classification", setting="standard", block=5,
                token="ffn", position="cls", rule=rule, ways=0, shots=0, episodes=0, metric="accuracy",
                value=value, C=1.0 if rule == "hyperplane" else math.nan, class_weight=class_weight)  # fmt: skip
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
        ("balanced", 0.85), ("none", 0.82)]


def test_table_from_before_the_class_weight_column(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=OLD_COLUMNS)
        writer.writeheader()
        for r in (row("hyperplane", 0.80), row("cosine", 0.70)):
            writer.writerow({c: ("" if isinstance(v, float) and math.isnan(v) else v)
                             for c, v in r.__dict__.items() if c in OLD_COLUMNS})  # fmt: skip
    old = read_results(path)
    assert sorted((r.rule, r.class_weight) for r in old) == [("cosine", ""), ("hyperplane", "none")]
    # Merging new rows rewrites the table with the column; the old plain row is replaced by the new plain one.
    write_results(path, [row("hyperplane", 0.81, "none"), row("hyperplane", 0.86, "balanced")])
    with path.open(newline="") as fh:
        assert next(csv.reader(fh)) == list(COLUMNS)
    assert sorted((r.rule, r.class_weight, r.value) for r in read_results(path)) == [
        ("cosine", "", 0.70), ("hyperplane", "balanced", 0.86), ("hyperplane", "none", 0.81)]


def test_a_table_missing_an_original_column_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    path.write_text(",".join(c for c in OLD_COLUMNS if c != "token") + "\n")
    with pytest.raises(QkvprobeError, match=r"not a qkvprobe results table, columns \['token'\] are missing"):
        read_results(path)
