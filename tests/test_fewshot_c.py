"""Few-shot C chosen on training-split episodes (C="auto"): pools, choice, rows, and the evaluation split's
independence from the choice."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from qkvprobe.data.episodes import sample_classification_episodes, sample_segmentation_episodes
from qkvprobe.errors import DataError, RuleError
from qkvprobe.protocols import UnitKey, evaluate_classification, evaluate_segmentation, fewshot_classification
from qkvprobe.protocols.fewshot_c import FEWSHOT_C_GRID, check_fewshot_C, choose_C, split_pools
from qkvprobe.protocols.segmentation import fewshot_segmentation
from qkvprobe.report.tables import label_rule_variants
from qkvprobe.results import COLUMNS, read_results, write_results
from test_protocols import FakeStore, cls_data, fake_cli_stores, seg_data


def test_choose_C_best_score_ties_and_nan_go_to_the_smaller_C() -> None:
    assert choose_C(lambda C: -abs(math.log10(C) + 1)).C == 0.1
    assert FEWSHOT_C_GRID[0] == choose_C(lambda C: 0.5).C
    assert choose_C(lambda C: math.nan if C < 1 else 1.0 / C, (0.01, 1.0, 10.0)).C == 1.0
    got = choose_C(lambda C: C, (0.5, 2.0))
    assert got.scores == {0.5: 0.5, 2.0: 2.0} and got.C == 2.0
    with pytest.raises(RuleError, match="grid is empty"):
        choose_C(lambda C: C, ())


def test_check_fewshot_C() -> None:
    assert check_fewshot_C("auto") == check_fewshot_C(" AUTO ") == "auto"
    assert check_fewshot_C("0.25") == 0.25 and check_fewshot_C(3) == 3.0
    with pytest.raises(RuleError, match="positive number or 'auto', got 'big'"):
        check_fewshot_C("big")
    with pytest.raises(RuleError, match="C must be a positive finite number"):
        check_fewshot_C("-1")


def test_split_pools_halve_the_training_rows() -> None:
    a, b = split_pools(11, seed=3)
    assert len(a) == 5 and len(b) == 6 and not set(a) & set(b) and sorted([*a, *b]) == list(range(11))
    assert all(np.array_equal(x, y) for x, y in zip(split_pools(11, 3), (a, b), strict=True))
    with pytest.raises(DataError, match=">= 2 rows"):
        split_pools(1, 0)


class Spy:
    """Wraps an episode sampler and keeps every call's inputs and output."""

    def __init__(self, sampler) -> None:
        self.sampler, self.calls = sampler, []

    def __call__(self, a, b, **kw):
        ep = self.sampler(a, b, **kw)
        self.calls.append((a, b, kw, ep))
        return ep


def test_auto_C_classification() -> None:
    Xtr, ytr = cls_data(180, 5)
    Xtr = Xtr * 4  # larger norms: the grid's C values then give different validation accuracies
    Xte, yte = cls_data(60, 6)
    tr = FakeStore({("q", "cls"): Xtr}, labels=ytr)
    te = FakeStore({("q", "cls"): Xte * 4}, labels=yte)
    spy = Spy(sample_classification_episodes)
    told: list[tuple[str, int, int]] = []
    kw = dict(setting="fewshot", tokens=("q",), ways=3, shots=2, queries=4, episodes=40, seed=2, C="auto")
    out = evaluate_classification(tr, te, episode_sampler=spy, progress=lambda *a: told.append(a), **kw)
    assert [t[0] for t in told] == [
        "3-way 2-shot · block 1 · q·cls · choosing C",
        "3-way 2-shot · block 1 · q·cls · hyperplane",
        "3-way 2-shot · block 1 · q·cls · cosine",
        "done",
    ]
    (pool_a, pool_b, val_kw, val), (test_labels, _, _, ep) = spy.calls
    assert np.array_equal(test_labels, ytr) and val_kw["seed"] == 3 and val_kw["episodes"] == 40
    # Validation episodes: support and queries are disjoint training rows, labelled as the sampler saw them.
    assert not set(val.support.ravel()) & set(val.query.ravel())
    assert len(pool_a) + len(pool_b) == len(ytr)
    for e in range(len(val.classes)):
        assert np.array_equal(ytr[val.support[e]], val.classes[e][val.support_labels[e]])
        assert np.array_equal(ytr[val.query[e]], val.classes[e][val.query_labels[e]])
    chosen = out.chosen_C[UnitKey(1, "q", "cls", "hyperplane", 2)]
    ref = {
        C: fewshot_classification(
            Xtr,
            Xtr,
            val.classes,
            val.support,
            val.support_labels,
            val.query,
            val.query_labels,
            rule="hyperplane",
            C=C,
        ).mean
        for C in FEWSHOT_C_GRID
    }
    assert chosen.scores == pytest.approx(ref, abs=1e-12) and len(set(ref.values())) > 1
    assert max(ref, key=lambda C: (ref[C], -C)) == chosen.C
    hyper = next(r for r in out.rows if r.rule == "hyperplane")
    test = fewshot_classification(
        Xtr,
        Xte * 4,
        ep.classes,
        ep.support,
        ep.support_labels,
        ep.query,
        ep.query_labels,
        rule="hyperplane",
        C=chosen.C,
    )
    assert (
        hyper.C == chosen.C
        and hyper.value == pytest.approx(test.mean, abs=1e-12)
        and hyper.C_choice == "auto"
    )
    assert math.isnan(next(r for r in out.rows if r.rule == "cosine").C)
    # The evaluation split plays no part in the choice.
    noise = FakeStore({("q", "cls"): np.random.default_rng(0).normal(size=Xte.shape)}, labels=yte)
    again = evaluate_classification(tr, noise, **kw)
    assert again.chosen_C[UnitKey(1, "q", "cls", "hyperplane", 2)] == chosen


def test_auto_C_classification_needs_enough_training_rows() -> None:
    Xtr, ytr = cls_data(30, 5)  # 5 per class: half of them cannot hold 2 shots + 4 queries per class
    tr, te = FakeStore({("q", "cls"): Xtr}, labels=ytr), FakeStore({("q", "cls"): Xtr}, labels=ytr)
    with pytest.raises(
        DataError, match=r"choosing the few-shot C on training-split episodes.*pass a fixed C"
    ):
        evaluate_classification(
            tr, te, setting="fewshot", tokens=("q",), ways=3, shots=2, queries=4, episodes=5, C="auto"
        )
    # Cosine alone has no C to choose: nothing is sampled for it.
    rows = evaluate_classification(
        tr,
        te,
        setting="fewshot",
        tokens=("q",),
        ways=3,
        shots=1,
        queries=2,
        episodes=5,
        rules=("cosine",),
        C="auto",
    )
    assert not rows.chosen_C and [r.rule for r in rows.rows] == ["cosine"]


def test_auto_C_segmentation() -> None:
    probs = [0.7, 0.15, 0.1, 0.05]
    ftr, pltr, mtr = seg_data(40, 1, probs=probs)
    fte, plte, mte = seg_data(10, 2, probs=probs)
    tr = FakeStore({("v", "patch"): ftr * 3}, patch_labels=pltr, task="segmentation")
    te = FakeStore({("v", "patch"): fte * 3}, patch_labels=plte, task="segmentation")
    spy = Spy(lambda a, b, **kw: sample_segmentation_episodes(a, b, min_pixels=16, **kw))
    train_masks = lambda i: mtr[i - 100]  # noqa: E731
    out = evaluate_segmentation(
        tr,
        te,
        setting="fewshot",
        tokens=("v",),
        rules=("hyperplane",),
        shots=1,
        episodes=30,
        masks=lambda i: mte[i - 100],
        train_masks=train_masks,
        episode_sampler=spy,
        C="auto",
        class_weight="balanced",
    )
    (_, _, val_kw, val), (_, _, _, ep) = spy.calls
    assert val_kw["seed"] == 1 and not set(val.support.ravel()) & set(val.query)
    ref = {
        C: fewshot_segmentation(
            ftr * 3,
            pltr,
            ftr * 3,
            tr.indices(),
            tr.grid,
            val.classes,
            val.support,
            val.query,
            rule="hyperplane",
            masks=train_masks,
            C=C,
            class_weight="balanced",
        ).miou
        for C in FEWSHOT_C_GRID
    }
    chosen = out.chosen_C[UnitKey(1, "v", "patch", "hyperplane", 1)]
    assert chosen.scores == pytest.approx(ref, abs=1e-12) and max(ref, key=lambda C: (ref[C], -C)) == chosen.C
    test = fewshot_segmentation(
        ftr * 3,
        pltr,
        fte * 3,
        te.indices(),
        te.grid,
        ep.classes,
        ep.support,
        ep.query,
        rule="hyperplane",
        masks=lambda i: mte[i - 100],
        C=chosen.C,
        class_weight="balanced",
    )
    miou = next(r for r in out.rows if r.metric == "miou")
    assert miou.C == chosen.C and miou.value == pytest.approx(test.miou, abs=1e-12)


def test_cli_fewshot_c_auto(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from qkvprobe.cli import get_app

    out = tmp_path / "results.csv"
    args = [
        *fake_cli_stores(tmp_path, monkeypatch, 120, 60),
        "--rules",
        "hyperplane",
        "--setting",
        "fewshot",
        "--ways",
        "3",
        "--shots",
        "1",
        "--queries",
        "3",
        "--episodes",
        "20",
        "--out",
        str(out),
    ]
    ok = CliRunner().invoke(get_app(), [*args, "--fewshot-c", "auto"])
    assert ok.exit_code == 0, ok.output
    (row,) = read_results(out)
    assert row.C in FEWSHOT_C_GRID and f"(C {row.C:g})" in ok.output
    bad = CliRunner().invoke(get_app(), [*args, "--fewshot-c", "tuned"])
    assert bad.exit_code == 2
    assert "Invalid value for '--fewshot-c': few-shot C must be a positive number or 'auto', got 'tuned'" in (
        " ".join(bad.output.split())
    )


def test_fixed_and_auto_C_runs_share_one_table(tmp_path) -> None:
    """A fixed-C and an auto few-shot evaluation of one token are kept apart in results.csv and in the report."""
    Xtr, ytr = cls_data(180, 5)
    Xte, yte = cls_data(60, 6)
    tr, te = FakeStore({("q", "cls"): Xtr * 4}, labels=ytr), FakeStore({("q", "cls"): Xte * 4}, labels=yte)
    kw = dict(setting="fewshot", tokens=("q",), ways=3, shots=2, queries=4, episodes=20, seed=2)
    path = tmp_path / "results.csv"
    fixed = evaluate_classification(tr, te, C=0.5, **kw)
    assert {(r.rule, r.C_choice) for r in fixed.rows} == {("hyperplane", "0.5"), ("cosine", "")}
    write_results(path, fixed.rows)
    write_results(path, evaluate_classification(tr, te, C="auto", **kw).rows)
    rows = read_results(path)
    assert sorted((r.rule, r.C_choice) for r in rows) == [
        ("cosine", ""),
        ("hyperplane", "0.5"),
        ("hyperplane", "auto"),
    ]
    frame = label_rule_variants(pd.DataFrame([r.__dict__ for r in rows], columns=list(COLUMNS)))
    assert sorted(frame["rule"]) == ["cosine", "hyperplane·C=0.5", "hyperplane·C=auto"]
    # One C choice in the table: the rule keeps its name.
    one = label_rule_variants(pd.DataFrame([r.__dict__ for r in fixed.rows], columns=list(COLUMNS)))
    assert sorted(one["rule"]) == ["cosine", "hyperplane"]
