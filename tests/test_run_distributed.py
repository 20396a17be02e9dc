"""`qkvprobe run` under torchrun (2 processes, gloo on CPU): the same results.csv, paired.json and answer table as
one process, each unit done once, a killed rank resumed to the same results, a failing rank named in one line.

The ranks run a script that points ``builtin:`` at the tiny random-init models of tests/test_run.py and calls the
CLI (torchrun → ``main(argv)``); the one-process reference runs in the test's own process (one intra-op thread,
as each torchrun worker with ``OMP_NUM_THREADS=1``: same kernels, same bytes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from qkvprobe.results import read_results
from qkvprobe.rundir import RunDir
from qkvprobe.study.distributed import KILL_AFTER_UNITS_ENV, Unit, assign, estimate_cost, merge_records
from test_run import builtin_models, study_config  # noqa: F401  (fixture)

TORCHRUN = Path(sys.executable).with_name("torchrun")


def tiny_study(tmp_path: Path, **changes: object) -> dict:
    """One model, Fashion-MNIST only: standard, 1- and 5-shot, two rules, a one-value C grid (4 units)."""
    data = study_config(
        tmp_path,
        models=["builtin:tiny-dino"],
        datasets=[{"spec": "fashion-mnist?source=bundled", "train_size": 150, "test_size": 60}],
        rules=["cosine", "hyperplane"],
        c_grid=[1.0],
        block_sweep={"enabled": False},
        report={"enabled": True, "direction_map_images": 0, "max_fit_samples": 500},
    )
    data.update(changes)
    return data


def write_config(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def torchrun(
    tmp_path: Path, builtins: Path, args: list[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    script = tmp_path / "run_script.py"
    script.write_text(
        textwrap.dedent(f"""
            import sys
            from pathlib import Path
            import qkvprobe.backbones as backbones
            backbones.builtin_dir = lambda: Path({str(builtins)!r})
            from qkvprobe.cli import main
            main(sys.argv[1:])
        """)
    )
    full_env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "QKVPROBE_CACHE": str(builtins.parent / "data-cache"),
        **(env or {}),
    }
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "--monitor-interval", "0.1", str(script)]
    return subprocess.run(
        [*cmd, "run", *args], capture_output=True, text=True, timeout=240, env=full_env, cwd=tmp_path
    )


def answer_table(stdout: str) -> str:
    """The printed answer, less the lines that name the run directory (the last ones; a long path wraps)."""
    return stdout[: stdout.index("\nresults: ")]


def run_here(builtins: Path, args: list[str]) -> tuple[int, str]:
    """``qkvprobe run ARGS`` in this process (one process, one thread): exit code and stdout."""
    from typer.testing import CliRunner

    import qkvprobe.backbones as backbones
    from qkvprobe.cli import get_app

    mp = pytest.MonkeyPatch()
    mp.setattr(backbones, "builtin_dir", lambda: builtins)
    mp.setenv("QKVPROBE_CACHE", str(builtins.parent / "data-cache"))
    try:
        result = CliRunner().invoke(get_app(), ["run", *args, "--quiet"])
    finally:
        mp.undo()
    return result.exit_code, result.stdout if result.exit_code == 0 else result.output


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, builtin_models: Path) -> tuple[Path, str]:  # noqa: F811
    """The tiny study in one process (this one): its run directory and printed answer."""
    tmp = tmp_path_factory.mktemp("one-process")
    config = write_config(tmp, tiny_study(tmp))
    code, out = run_here(builtin_models, [str(config), "--out", str(tmp / "run")])
    assert code == 0, out
    return tmp / "run", answer_table(out)


def assert_same_run(a: Path, b: Path) -> None:
    for name in ("results.csv", "paired.json", "directions.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    rows = read_results(b / "results.csv")
    assert [r.key() for r in rows] == sorted(r.key() for r in rows)  # sorted by key
    fits_a, fits_b = sorted((a / "fits").iterdir()), sorted((b / "fits").iterdir())
    assert [p.name for p in fits_a] == [p.name for p in fits_b]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(fits_a, fits_b, strict=True))


def test_two_processes_give_the_bytes_and_answer_of_one(
    tmp_path: Path,
    builtin_models: Path,  # noqa: F811
    reference: tuple[Path, str],
) -> None:
    one, table = reference
    config = write_config(tmp_path, tiny_study(tmp_path, cache_dir=str(tmp_path / "cache-2")))
    run = torchrun(tmp_path, builtin_models, [str(config), "--out", "two"])
    assert run.returncode == 0, run.stderr[-3000:]
    two = tmp_path / "two"
    assert_same_run(one, two)
    assert answer_table(run.stdout) == table and "Which token, with which rule?" in table  # printed once
    # progress lines carry the rank; the answer is rank 0's alone
    lines = [line for line in run.stderr.splitlines() if line.startswith("rank ")]
    assert {line.split()[1] for line in lines} == {"0", "1"} and "features of 150 samples" in run.stderr
    info = json.loads((two / "run.json").read_text())
    units = info["units"]
    assert info["world_size"] == 2 and info["status"] == "complete"
    assert len(units) == 4 and len({u["unit"] for u in units}) == 4  # each unit done once
    assert {u["rank"] for u in units} == {0, 1} and all(u["invocation"] == 0 for u in units)
    assert len(RunDir(two).part_files()) == 4
    # the directions unit went with the standard evaluation whose fits it reads
    rank_of = {u["label"].rsplit(" · ", 1)[1]: u["rank"] for u in units}
    assert rank_of["directions"] == rank_of["standard"]
    # the store was extracted once, its shards shared: one complete store per split in the new cache
    assert len([p for p in (tmp_path / "cache-2").iterdir() if p.is_dir()]) == 2


def test_killed_rank_resumes_to_the_same_results(
    tmp_path: Path,
    builtin_models: Path,  # noqa: F811
    reference: tuple[Path, str],
) -> None:
    one, table = reference
    config = write_config(tmp_path, tiny_study(tmp_path))
    run = torchrun(tmp_path, builtin_models, [str(config), "--out", "run"], {KILL_AFTER_UNITS_ENV: "1:1"})
    assert run.returncode != 0  # rank 1 died (SIGKILL) after its first unit; torchrun stopped rank 0
    rd = RunDir(tmp_path / "run")
    kept = {p.name: p.stat().st_mtime_ns for p in rd.part_files()}
    assert 1 <= len(kept) < 4 and not rd.failed.exists()
    # resumed here, in one process: a run does not depend on the number of processes that made it
    code, out = run_here(builtin_models, [str(config), "--out", str(rd.path)])
    assert code == 0, out
    assert_same_run(one, rd.path)
    assert answer_table(out) == table
    # no unit done twice (the killed run's records untouched), none lost (every unit once in run.json)
    assert all(rd.parts.joinpath(name).stat().st_mtime_ns == ns for name, ns in kept.items())
    units = json.loads(rd.run_json.read_text())["units"]
    assert len(units) == 4 and len({u["unit"] for u in units}) == 4
    assert sum(u["invocation"] == 1 for u in units) == 4 - len(kept)
    assert set(json.loads(rd.progress.read_text())["done"]) == {u["unit"] for u in units}


def test_failing_rank_stops_the_run_with_one_line(tmp_path: Path, builtin_models: Path) -> None:  # noqa: F811
    # 30 training images (3 a class): the standard C sweep's held-out split cannot hold all 10 classes, a
    # failure no check before the units can foresee
    data = tiny_study(tmp_path, report={"enabled": False})
    data["datasets"] = [{"spec": "fashion-mnist?source=bundled", "train_size": 30, "test_size": 60}]
    data["fewshot"] = {**data["fewshot"], "shots": [1]}
    config = write_config(tmp_path, data)
    run = torchrun(tmp_path, builtin_models, [str(config), "--out", "run", "--quiet"])
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("qkvprobe: error:")]
    assert len(errors) == 1, run.stderr[-3000:]
    assert (
        errors[0].startswith("qkvprobe: error: rank ")
        and "· standard: the stratified 10% held-out" in errors[0]
    )
    assert errors[0].endswith("run the same command again to resume")
    failed = json.loads(RunDir(tmp_path / "run").failed.read_text())
    assert f"rank {failed['rank']} failed in" in errors[0] and '"setting":"standard"' in failed["unit"]
    assert "Which token" not in run.stdout  # no answer table from a failed run


def test_an_impossible_setting_stops_every_rank_before_extraction_with_one_line(
    tmp_path: Path,
    builtin_models: Path,  # noqa: F811
) -> None:
    data = tiny_study(tmp_path, report={"enabled": False})
    data["fewshot"] = {**data["fewshot"], "shots": [1, 60]}  # 15 images per class: no 60-shot episode
    config = write_config(tmp_path, data)
    run = torchrun(tmp_path, builtin_models, [str(config), "--out", "run", "--quiet"])
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("qkvprobe: error:")]
    assert len(errors) == 1, run.stderr[-3000:]
    assert errors[0].startswith(
        "qkvprobe: error: rank 0: datasets.0 (fashion-mnist?source=bundled), few-shot"
    )
    assert "3-way 60-shot: 3-way episodes need 3 classes" in errors[0]
    assert not RunDir(tmp_path / "run").failed.exists() and not (tmp_path / "cache").exists()


# ---- the parts that need no process group ---------------------------------------------------------------------
def test_assignment_is_balanced_deterministic_and_keeps_groups() -> None:
    def unit(i: int, cost: float, group: str = "") -> Unit:
        return Unit(f"u{i}", (0, 0, i), f"unit {i}", lambda: None, cost=cost, group=group)

    units = [unit(0, 10.0, "g"), unit(1, 1.0), unit(2, 6.0), unit(3, 5.0), unit(4, 1.0, "g")]
    ranks = assign(units, 2)
    assert ranks == assign(list(reversed(units)), 2)  # the same on every rank, whatever the order given
    assert ranks["u0"] == ranks["u4"] == 0  # a group goes whole: 11 on rank 0
    assert ranks["u2"] == ranks["u3"] == 1  # 6 + 5 on rank 1, then the tie at 11 goes to rank 0
    assert ranks["u1"] == 0
    assert set(assign(units, 1).values()) == {0} and set(assign(units, 8).values()) <= set(range(8))


def test_cost_estimate_ranks_standard_segmentation_and_sweeps_above_fewshot_cosine() -> None:
    fewshot_cosine = estimate_cost(
        "evaluate", task="classification", setting="fewshot", rules=["cosine"], episodes=300, shots=1
    )
    standard_hyperplane = estimate_cost(
        "evaluate", task="classification", rules=["hyperplane"], train=2000, test=500, grid=4
    )
    standard_segmentation = estimate_cost(
        "evaluate", task="segmentation", rules=["hyperplane"], train=120, test=60, patches=49, grid=4
    )
    assert fewshot_cosine < standard_hyperplane < standard_segmentation
    assert estimate_cost(
        "evaluate", task="classification", rules=["cosine"], features=4
    ) == 4 * estimate_cost("evaluate", task="classification", rules=["cosine"])


def test_merge_is_independent_of_which_rank_wrote_what(tmp_path: Path) -> None:
    from dataclasses import asdict

    from qkvprobe.results import ResultRow
    from qkvprobe.study.distributed import read_records, write_record

    def row(token: str, value: float) -> dict:
        return asdict(
            ResultRow("m", "dino", "d", "classification", "standard", 1, token, "cls", "cosine", 0, 0, 0,
                      "accuracy", value)
        )  # fmt: skip

    def record(i: int, rank: int) -> dict:
        return {
            "unit": f"evaluate:{i}",
            "order": [0, 0, i],
            "label": f"unit {i}",
            "rank": rank,
            "world_size": 2,
            "invocation": 0,
            "seconds": 0.1 * rank,
            "rows": [row("ffn" if i else "q", 0.5 + i / 10)],
            "sides": {"paired": [{"model": "m", "dataset": "d", "setting": "x", "shots": i}]},
            "notes": {"unconverged": [f"unit {i}"]},
            "fits": None,
        }

    outs = []
    for ranks in ((0, 0), (1, 0)):
        rd = RunDir(tmp_path / f"r{ranks}")
        for i, rank in enumerate(ranks):
            write_record(rd, record(1 - i, rank))  # written in the other order
        notes = merge_records(rd, read_records(rd))
        assert notes == {"unconverged": ["unit 0", "unit 1"]}
        outs.append((rd.results.read_bytes(), rd.paired.read_bytes()))
    assert outs[0] == outs[1]


def test_alone_and_the_rank_device_from_torchrun_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    from qkvprobe.features.distributed import (
        DistInfo,
        all_gather_objects,
        alone,
        dist_info,
        local_device,
        shard_for_rank,
        world_info,
    )

    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert dist_info() == world_info() == DistInfo(3, 4, 1)
    assert (
        local_device("cuda") == "cuda:1"
        and local_device("cpu") == "cpu"
        and local_device("cuda:0") == "cuda:0"
    )
    with alone():  # a unit of work: the rank acts as one process (a C sweep then takes the whole grid)
        assert dist_info() == DistInfo() and world_info() == DistInfo(3, 4, 1)
        assert shard_for_rank([1, 2, 3]) == [1, 2, 3] and all_gather_objects("x") == ["x"]
    assert shard_for_rank([1, 2, 3, 4, 5]) == [4]
