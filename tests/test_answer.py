"""The report's answer table: ties by paired tests (Holm-adjusted), by intervals where no test exists, the colour
scale anchored at the best, the defensive ``converged`` column and the weights' source of each model."""

from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from qkvprobe.io import write_json
from qkvprobe.protocols.paired import paired_verdicts
from qkvprobe.report import load_run, main_rows, render_report
from qkvprobe.report.answer import (
    ALPHA,
    BELOW,
    TIED,
    UNTESTED,
    answer_lines,
    answers,
    holm,
    weights_by_model,
)
from qkvprobe.report.tables import HEAT_SPAN, anchored_style, heat_style, heat_tables
from qkvprobe.results import COLUMNS, ResultRow, read_results, write_results
from test_report import make_run


def _holm_reference(p: list[float]) -> list[float]:
    """Holm's step-down procedure written out as in Holm (1979): sort, multiply the i-th smallest by (m - i),
    carry the running maximum, cap at 1."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    out = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def test_holm_matches_the_textbook_procedure() -> None:
    rng = np.random.default_rng(0)
    for m in (1, 2, 5, 17):
        p = rng.uniform(0, 0.2, m).tolist()
        np.testing.assert_allclose(holm(p), _holm_reference(p), rtol=0, atol=1e-15)
    assert holm([]).size == 0


def _frame(rows: list[tuple], setting: str = "fewshot") -> pd.DataFrame:
    """Primary-metric rows of one model × dataset × setting: (token, position, rule, value, ci95)."""
    return pd.DataFrame(
        [
            {
                "model": "m",
                "objective": "dino",
                "dataset": "d",
                "task": "classification",
                "setting": setting,
                "ways": 5 if setting == "fewshot" else 0,
                "shots": 1 if setting == "fewshot" else 0,
                "episodes": 300 if setting == "fewshot" else 0,
                "block": 5,
                "token": t,
                "position": p,
                "rule": r,
                "metric": "accuracy",
                "value": v,
                "ci95": ci,
                "C": math.nan,
                "weights": "builtin: m.safetensors",
            }
            for t, p, r, v, ci in rows
        ]
    )


def _test(b: tuple[str, str, str], p: float, a: tuple[str, str, str] = ("ffn", "cls", "hyperplane")) -> dict:
    side = lambda c: {"token": c[0], "position": c[1], "rule": c[2], "block": 5}  # noqa: E731
    return {
        "model": "m",
        "dataset": "d",
        "setting": "fewshot",
        "shots": 1,
        "a": side(a),
        "b": side(b),
        "test": "wilcoxon",
        "p_value": p,
        "num_pairs": 300,
    }


def test_ties_use_holm_adjusted_paired_tests_then_intervals() -> None:
    main = _frame(
        [
            ("ffn", "cls", "hyperplane", 0.80, 0.01),
            ("q", "cls", "hyperplane", 0.79, 0.01),
            ("k", "cls", "hyperplane", 0.785, 0.01),
            ("v", "cls", "cosine", 0.70, 0.01),
            ("q", "cls", "cosine", 0.775, 0.02),  # no paired test: intervals [0.755, 0.795] and [0.79, 0.81]
            ("k", "cls", "cosine", 0.60, 0.01),  # no paired test, intervals apart
        ]
    )
    # raw p 0.03 and 0.026 are below α; Holm over 3 tests: 1e-6·3, 0.026·2 = 0.052, max(0.052, 0.03) → tied
    paired = [_test(("q", "cls", "hyperplane"), 0.03), _test(("k", "cls", "hyperplane"), 0.026)]
    paired.append(_test(("v", "cls", "cosine"), 1e-6))
    (a,) = answers(main, paired)
    assert a.best.key() == ("ffn", "cls", "hyperplane", 5) and a.pairs == 300
    status = {c.choice.key()[:3]: (c.status, c.test) for c in a.others}
    assert status == {
        ("q", "cls", "hyperplane"): (TIED, "wilcoxon"),
        ("k", "cls", "hyperplane"): (TIED, "wilcoxon"),
        ("v", "cls", "cosine"): (BELOW, "wilcoxon"),
        ("q", "cls", "cosine"): (TIED, "intervals"),
        ("k", "cls", "cosine"): (BELOW, "intervals"),
    }
    adjusted = dict(zip(("q", "k", "v"), _holm_reference([0.03, 0.026, 1e-6]), strict=True))
    for c in a.others:
        if c.test == "wilcoxon":
            assert c.p == pytest.approx(adjusted[c.choice.token], abs=1e-15)
            assert (c.status == TIED) == (adjusted[c.choice.token] >= ALPHA)
    best, cosine = answer_lines([a])
    assert best.best and best.choice == "ffn·cls" and best.value == "80.0 ± 1.0"
    assert best.verdict == "tied: q·cls, k·cls (hyperplane); q·cls (cosine) [Wilcoxon, 95 % intervals]"
    assert (cosine.rule, cosine.choice) == ("cosine", "q·cls")  # the best of the other rule
    assert cosine.verdict == "tied with the best (95 % intervals)"


def test_standard_segmentation_ties_are_not_tested_and_equal_values_tie() -> None:
    main = _frame(
        [
            ("ffn", "patch", "hyperplane", 0.30, math.nan),
            ("q", "patch", "hyperplane", 0.30, math.nan),
            ("v", "patch", "cosine", 0.20, math.nan),
        ],
        setting="standard",
    ).assign(task="segmentation", metric="miou")
    (a,) = answers(main, [])
    assert (
        a.best.token == "q"
    )  # equal values: the vocabulary's token order (q k v ffn ffn_norm), as in the study
    assert [(c.choice.token, c.status, c.test) for c in a.others] == [
        ("ffn", TIED, "equal"),
        ("v", UNTESTED, ""),
    ]
    lines = answer_lines([a])
    assert lines[0].metric == "mIoU" and lines[1].verdict == "not tested"


def test_the_study_tests_the_best_the_answer_names_on_equal_values() -> None:
    """When two choices score exactly the same, paired_verdicts and the answer table pick the same best, so the
    report finds that choice's tests."""
    from qkvprobe.protocols import Evaluation, UnitKey

    rng = np.random.default_rng(0)
    rows = [
        ResultRow(
            "m", "dino", "d", "classification", "fewshot", 5, t, "cls", r, 5, 1, 40, "accuracy", v, 0.02
        )
        for t, r, v in (("q", "cosine", 0.7), ("q", "hyperplane", 0.7), ("k", "cosine", 0.5))
    ]
    per_episode = {UnitKey(5, r.token, "cls", r.rule, 1): rng.uniform(0, 1, 40) for r in rows}
    tests = paired_verdicts(rows, Evaluation(rows, per_episode=per_episode), None)
    frame = pd.DataFrame([r.__dict__ for r in rows], columns=list(COLUMNS))
    (a,) = answers(frame, tests)
    assert (tests[0]["a"]["rule"], a.best.rule) == ("hyperplane", "hyperplane")
    assert {c.test for c in a.others} == {"wilcoxon"}


def test_heat_colours_are_anchored_at_the_best_and_ties_look_like_it() -> None:
    main = _frame(
        [
            ("ffn", "cls", "hyperplane", 0.800, 0.01),
            ("q", "cls", "hyperplane", 0.797, 0.01),  # 0.3 points below and tied
            ("k", "cls", "hyperplane", 0.785, 0.001),  # 1.5 points below, intervals apart
            ("v", "cls", "hyperplane", 0.500, 0.01),
        ]
    )
    found = answers(main, [])
    (table,) = heat_tables(main, found)
    cells = {label: row[0] for label, row in table.rows}
    assert cells["ffn"].best and cells["q"].tied and not cells["k"].tied
    assert cells["q"].style == cells["ffn"].style  # a tie is shaded like the best
    assert cells["k"].style == heat_style(0.785, 0.8 - HEAT_SPAN, 0.8)
    assert cells["k"].style != heat_style(0.785, 0.5, 0.8)  # not a min-to-max scale over the table
    assert (
        cells["v"].style == anchored_style(0.8 - HEAT_SPAN, 0.8) == heat_style(0.0, 0.0, 1.0)
    )  # the lightest


def test_unconverged_cells_are_marked(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    text = render_report(run).read_text()
    assert "†" not in text.replace("† = the hyperplane fit did not converge", "")  # all converged: no marks
    rows = read_results(run / "results.csv")
    key = ("mae-m", "fashion-mnist", "standard", "q", "avg", "hyperplane")
    (hit,) = [r for r in rows if (r.model, r.dataset, r.setting, r.token, r.position, r.rule) == key]
    write_results(run / "results.csv", [replace(hit, converged="false")])
    files = load_run(run)
    tables = heat_tables(main_rows(files.results, files.run_info))
    marked = [
        (t.title, label, h)
        for t in tables
        for label, row in t.rows
        for h, c in zip(t.col_headers, row, strict=True)
        if c.unconverged
    ]
    assert marked == [("mae-m · fashion-mnist · standard", "q", "hyperplane · avg")]
    text = render_report(run).read_text()
    assert "†: the\nhyperplane fit did not converge (converged = false in results.csv)" in text
    assert len(re.findall(r"\d†( [★≈])?</td>", text)) == 1  # the one cell, in the token × rule table


def test_the_answer_names_each_models_weights(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    info = load_run(run).run_info
    info["models"] = [
        {
            "label": "dino-m",
            "spec": "timm:vit_small_patch16_224.dino",
            "weights": "/ckpt/dino.pth",
            "weights_source": "file: dino.pth (sha256 1a2b3c4d5e6f)",
            "weights_digest": "ffeeddccbbaa99887766",
        },
        {
            "label": "mae-m",
            "spec": "builtin:mae",
            "weights_source": "builtin: mae.safetensors",
            "weights_digest": "",
        },
    ]
    write_json(run / "run.json", info)
    assert weights_by_model(info) == {
        "dino-m": "file: dino.pth (sha256 1a2b3c4d5e6f) · weights digest ffeeddccbbaa",
        "mae-m": "builtin: mae.safetensors",
    }
    text = render_report(run).read_text()
    assert "weights: file: dino.pth (sha256 1a2b3c4d5e6f) · weights digest ffeeddccbbaa" in text
    assert "weights: builtin: mae.safetensors" in text
    # Without run.json's models, the rows' weights column names them.
    rows = [r for r in load_run(run).results.to_dict("records")]
    assert all(r["weights"] == "" for r in rows)
    write_results(
        run / "results.csv",
        [ResultRow(**{**{c: r[c] for c in COLUMNS}, "weights": "timm hub: x"}) for r in rows[:3]],
    )
    del info["models"]
    write_json(run / "run.json", info)
    files = load_run(run)
    (first, *_) = answers(main_rows(files.results, files.run_info), files.paired)
    assert first.weights == "timm hub: x"


def test_a_tie_list_names_the_first_choices_and_counts_the_rest() -> None:
    from qkvprobe.report.answer import MAX_TIES_NAMED, TIED, Choice, Comparison, _grouped

    ties = [Comparison(Choice(f"t{i}", "cls", "cosine", 0, 0.5), TIED, "intervals") for i in range(29)]
    text = _grouped(ties, False)
    assert text.endswith(f"; and {29 - MAX_TIES_NAMED} more") and "t7·cls" in text and "t8·cls" not in text
    assert "more" not in _grouped(ties[:MAX_TIES_NAMED], False)
