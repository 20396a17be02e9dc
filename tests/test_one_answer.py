"""One answer from every door: the same stores give the byte-identical answer table from ``qkvprobe run``,
``qkvprobe evaluate`` and ``qkvprobe report`` — and the same rows from ``qkvprobe.evaluate`` in Python."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from qkvprobe.cli import get_app
from qkvprobe.results import read_results

DATASET = "fashion-mnist?source=bundled"


def _rows(rows: list) -> dict:
    """Rows by key, NaN as None (NaN never equals itself)."""
    return {
        r.key(): tuple(None if isinstance(v, float) and math.isnan(v) else v for v in dataclasses.astuple(r))
        for r in rows
    }


def _table(output: str) -> str:
    """The answer table as printed: from its title through the legend's last line."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Which token, with which rule?"))
    end = next(i for i in range(start, len(lines)) if "did not converge" in lines[i])
    return "\n".join(lines[start : end + 1])


@pytest.fixture(scope="module")
def doors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A small study through ``qkvprobe run``, then its own stores through ``qkvprobe evaluate`` (both settings
    into one folder) and ``qkvprobe report`` of that folder."""
    base = tmp_path_factory.mktemp("doors")
    cache = base / "cache"
    config = {
        "name": "doors",
        "cache_dir": str(cache),
        "models": ["builtin:fmnist-dino-vit-tiny"],
        "datasets": [{"spec": DATASET, "train_size": 300, "test_size": 150}],
        "settings": ["standard", "fewshot"],
        "tokens": ["q", "ffn"],
        "rules": ["hyperplane", "cosine", "knn"],
        "c_grid": [0.01, 1.0],
        "fewshot": {"shots": [1, 5], "episodes": 40, "queries": 10},
        "block_sweep": {"enabled": False},
        "report": {"enabled": False},
    }
    (base / "study.yaml").write_text(yaml.safe_dump(config))
    runner = CliRunner()
    run = runner.invoke(get_app(), ["run", str(base / "study.yaml"), "--out", str(base / "run"), "--quiet"])
    assert run.exit_code == 0, run.output
    stores = {json.loads((p / "manifest.json").read_text())["dataset"]["split"]: p for p in cache.iterdir()}
    common = ["--train-store", str(stores["train"]), "--test-store", str(stores["test"])]
    common += [
        "--rules",
        "hyperplane,cosine,knn",
        "--tokens",
        "q,ffn",
        "--out",
        str(base / "ev" / "results.csv"),
    ]
    std = runner.invoke(get_app(), ["evaluate", *common, "--setting", "standard", "--c-grid", "0.01,1"])
    assert std.exit_code == 0, std.output
    few = runner.invoke(
        get_app(),
        [
            "evaluate",
            *common,
            "--setting",
            "fewshot",
            "--shots",
            "1,5",
            "--episodes",
            "40",
            "--queries",
            "10",
        ],
    )
    assert few.exit_code == 0, few.output
    report = runner.invoke(get_app(), ["report", str(base / "ev")])
    assert report.exit_code == 0, report.output
    return {
        "base": base,
        "run": run.output,
        "evaluate": few.output,
        "report": report.output,
        "stores": stores,
    }


def test_run_evaluate_and_report_print_the_same_answer_table(doors: dict) -> None:
    run, evaluate, report = (_table(str(doors[k])) for k in ("run", "evaluate", "report"))
    assert "Wilcoxon" in run and "McNemar" in run  # paired tests decided the ties, in both settings
    assert evaluate == run
    assert report == run


def test_run_and_evaluate_write_the_same_rows_and_paired_tests(doors: dict) -> None:
    base = Path(str(doors["base"]))
    assert _rows(read_results(base / "run" / "results.csv")) == _rows(
        read_results(base / "ev" / "results.csv")
    )
    paired = [json.loads((base / d / "paired.json").read_text())["tests"] for d in ("run", "ev")]
    order = sorted(paired[0], key=lambda t: (t["setting"], t["shots"], t["b"]["token"], t["b"]["rule"]))
    assert order == sorted(
        paired[1], key=lambda t: (t["setting"], t["shots"], t["b"]["token"], t["b"]["rule"])
    )


def test_the_python_api_gives_the_same_rows(doors: dict) -> None:
    import qkvprobe

    stores = doors["stores"]
    train, test = (qkvprobe.FeatureStore.open(stores[s]) for s in ("train", "test"))  # type: ignore[index]
    ev = qkvprobe.evaluate(
        train,
        test,
        setting="fewshot",
        rules=("hyperplane", "cosine", "knn"),
        tokens=("q", "ffn"),
        shots=(1, 5),
        episodes=40,
        queries=10,
    )
    base = Path(str(doors["base"]))
    run = [r for r in read_results(base / "run" / "results.csv") if r.setting == "fewshot"]
    assert _rows(ev.rows) == _rows(run)  # weights column included: Python rows name the weights too
    assert all(r.weights.startswith("builtin:") for r in ev.rows)


def test_a_report_without_paired_data_says_so(doors: dict, tmp_path: Path) -> None:
    base = Path(str(doors["base"]))
    (tmp_path / "results.csv").write_bytes((base / "ev" / "results.csv").read_bytes())
    out = CliRunner().invoke(get_app(), ["report", str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert "no paired tests recorded" in _table(out.output)
    assert "no paired tests recorded" not in _table(str(doors["report"]))


def test_classes_with_too_few_images_are_left_out_and_named_by_every_door(tmp_path: Path) -> None:
    """The class policy: a class without enough evaluation images for the queries is left out of the episodes
    (not the whole setting refused), named in the rows and under the answer table; `exclude_classes` adds more."""
    import numpy as np

    from pins_fixtures import MemoryStore, blobs
    from qkvprobe.protocols import evaluate
    from qkvprobe.report import load_run, run_summary
    from qkvprobe.study.outputs import save_evaluation

    Xtr, ytr = blobs(80, 0, classes=4)
    Xte, yte = blobs(80, 1, classes=4)
    keep = (yte != 3) | (
        np.arange(len(yte)) % 20 < 3
    )  # class 3 ("c3"): 3 evaluation images, fewer than 5 queries
    train = MemoryStore({("q", "cls"): Xtr}, labels=ytr)
    test = MemoryStore({("q", "cls"): Xte[keep]}, labels=yte[keep])
    kw = {"setting": "fewshot", "ways": 2, "shots": (1,), "queries": 5, "episodes": 30, "rules": ("cosine",)}
    ev = evaluate(train, test, **kw)
    assert ev.left_out == {1: ["c3"]} and {r.left_out for r in ev.rows} == {"c3"}
    assert len(ev.rows) == 1
    more = evaluate(train, test, exclude_classes=(0,), **kw)
    assert more.left_out == {1: ["c0", "c3"]} and {r.left_out for r in more.rows} == {"c0;c3"}
    with pytest.raises(Exception, match=r"2-way episodes need 2 classes, 1 remain"):
        evaluate(train, test, exclude_classes=(0, 1), **kw)
    save_evaluation(tmp_path, ev)
    from rich.console import Console

    console = Console(record=True, width=100)
    console.print(run_summary(load_run(tmp_path)))
    assert "classes left out of the episodes (too few images): c3" in console.export_text()
