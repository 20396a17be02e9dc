"""The atomic writers (qkvprobe.io) and the run directory (qkvprobe.rundir): file modes under a umask, failed
writes leave nothing, killed writes leave only a findable temporary, RunDir.clear() removes every run path and
nothing else, and the report and the study take run paths from rundir only."""

from __future__ import annotations

import ast
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import qkvprobe
from qkvprobe import io as qio
from qkvprobe.errors import QkvprobeError
from qkvprobe.results import ResultRow, read_results, write_results
from qkvprobe.rundir import DIRS, FILES, RunDir, load_direction_map, save_direction_map, slug

SRC = Path(qkvprobe.__file__).resolve().parent


@pytest.fixture()
def umask() -> Iterator[Callable[[int], None]]:
    """Set the process umask for one test, restored afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


def _row(value: float) -> ResultRow:
    return ResultRow(
        model="m",
        objective="dino",
        dataset="d",
        task="classification",
        setting="standard",
        block=0,
        token="q",
        position="cls",
        rule="cosine",
        ways=0,
        shots=0,
        episodes=0,
        metric="accuracy",
        value=value,
        ci95=float("nan"),
        seed=0,
        C=float("nan"),
    )


def _savez(path: Path) -> None:
    with qio.atomic_path(path) as tmp:
        np.savez(tmp, a=np.arange(3))


def _csv_writer(path: Path) -> None:
    with qio.atomic_open(path, "w", newline="") as fh:
        fh.write("a,b\r\n1,2\r\n")


def _map(path: Path) -> None:
    save_direction_map(
        path,
        images=np.zeros((1, 4, 4), np.uint8),
        masks=np.zeros((1, 4, 4), np.int64),
        cosine=np.zeros((1, 2, 2, 2)),
        classes=["a", "b"],
        meta={"model": "m"},
    )


WRITERS: dict[str, Callable[[Path], object]] = {
    "bytes": lambda p: qio.write_bytes(p, b"x"),
    "text": lambda p: qio.write_text(p, "é\n"),
    "json": lambda p: qio.write_json(p, {"a": np.float32(0.5), "b": np.arange(2), "p": Path("x")}),
    "json-fsync": lambda p: qio.write_json(p, {"a": 1}, indent=1, fsync=True),
    "atomic_open": _csv_writer,
    "atomic_path-npz": _savez,
    "results.csv": lambda p: write_results(p, [_row(0.5)]),
    "direction-map": _map,
}


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_written_files_get_the_mode_the_umask_gives_new_files(
    tmp_path: Path, umask: Callable[[int], None], writer: str, mask: int
) -> None:
    umask(mask)
    target = tmp_path / "sub" / f"out{'.npz' if 'npz' in writer or 'map' in writer else '.dat'}"
    WRITERS[writer](target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # no temporary left
    # replacing a file created 0600 (as mkstemp did) gives the umask's mode too
    target.chmod(0o600)
    WRITERS[writer](target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask


def test_written_content_round_trips(tmp_path: Path) -> None:
    qio.write_json(tmp_path / "a.json", {"x": np.int64(3), "y": np.array([1.5, 2.0]), "p": Path("q")})
    assert qio.read_json(tmp_path / "a.json") == {"x": 3, "y": [1.5, 2.0], "p": "q"}
    assert (tmp_path / "a.json").read_text().endswith("}\n")
    qio.write_text(tmp_path / "t.txt", "é")
    assert (tmp_path / "t.txt").read_bytes() == "é".encode()
    _savez(tmp_path / "z.npz")
    with np.load(tmp_path / "z.npz") as z:
        assert z["a"].tolist() == [0, 1, 2]
    _map(tmp_path / "m.npz")
    assert load_direction_map(tmp_path / "m.npz").classes == ["a", "b"]
    write_results(tmp_path / "r.csv", [_row(0.25)])
    assert [r.value for r in read_results(tmp_path / "r.csv")] == [0.25]


class Boom(Exception):
    pass


def _fail_atomic_open(path: Path) -> None:
    with qio.atomic_open(path, "wb") as fh:
        fh.write(b"half")
        raise Boom


def _fail_atomic_path(path: Path) -> None:
    with qio.atomic_path(path) as tmp:
        tmp.write_bytes(b"half")
        raise Boom


def _fail_interrupt(path: Path) -> None:
    with qio.atomic_open(path, "w") as fh:
        fh.write("half")
        raise KeyboardInterrupt


def _fail_json(path: Path) -> None:
    qio.write_json(path, {"a": object()})  # not serialisable


class _Unprintable(float):
    """A value the csv writer fails on after the header and earlier rows are written."""

    def __str__(self) -> str:
        raise Boom

    __repr__ = __str__


def _fail_results(path: Path) -> None:
    write_results(path, [replace(_row(0.5), token="k"), replace(_row(0.5), value=_Unprintable(0.5))])


FAILURES: dict[str, tuple[Callable[[Path], None], type[BaseException]]] = {
    "atomic_open": (_fail_atomic_open, Boom),
    "atomic_path": (_fail_atomic_path, Boom),
    "interrupt": (_fail_interrupt, KeyboardInterrupt),
    "json": (_fail_json, TypeError),
    "results": (_fail_results, Boom),
}


@pytest.mark.parametrize("case", sorted(FAILURES))
def test_a_failed_write_leaves_no_target_and_no_temporary(tmp_path: Path, case: str) -> None:
    fail, error = FAILURES[case]
    target = tmp_path / "out.csv"
    with pytest.raises(error):
        fail(target)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", sorted(FAILURES))
def test_a_failed_write_leaves_an_existing_target_unchanged(tmp_path: Path, case: str) -> None:
    fail, error = FAILURES[case]
    target = tmp_path / "out.csv"
    write_results(target, [_row(0.75)])
    before = target.read_bytes()
    with pytest.raises(error):
        fail(target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]


def test_a_killed_write_leaves_only_a_temporary_that_temporaries_finds(tmp_path: Path) -> None:
    target = tmp_path / "results.csv"
    target.write_text("old\n")
    code = textwrap.dedent(
        f"""
        import os
        from qkvprobe.io import atomic_open
        with atomic_open({str(target)!r}, "w") as fh:
            fh.write("half")
            fh.flush()
            os._exit(3)  # killed mid-write: no cleanup runs
        """
    )
    env = {**os.environ, "PYTHONPATH": str(SRC.parent)}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 3
    left = qio.temporaries(target)
    assert len(left) == 1 and left[0].read_text() == "half" and target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, left[0].name])
    # another file's temporaries are not this one's
    assert qio.temporaries(tmp_path / "results.cs") == [] and qio.temporaries(tmp_path / "run.json") == []
    RunDir(tmp_path).clear()
    assert list(tmp_path.iterdir()) == []


def test_fsync_flushes_the_file_and_the_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    qio.write_json(tmp_path / "a.json", {})
    assert synced == []
    qio.write_json(tmp_path / "a.json", {}, fsync=True)
    assert len(synced) == 2  # the file before the rename, the directory after it
    with qio.atomic_path(tmp_path / "b.bin", fsync=True) as tmp:
        tmp.write_bytes(b"x")
    assert len(synced) == 4


def test_atomic_open_refuses_modes_other_than_a_new_file(tmp_path: Path) -> None:
    with (
        pytest.raises(ValueError, match=r"mode must be one of \['w', 'wb', 'wt'\], not 'a'"),
        qio.atomic_open(tmp_path / "x", "a"),
    ):
        pass
    assert list(tmp_path.iterdir()) == []


def test_read_json_names_a_broken_file(tmp_path: Path) -> None:
    assert qio.read_json(tmp_path / "missing.json", {"d": 1}) == {"d": 1}
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(QkvprobeError, match=r"bad\.json: not valid JSON .* delete it or re-run"):
        qio.read_json(tmp_path / "bad.json")


# ---- the run directory ----------------------------------------------------------------------------------------
def _populate(rd: RunDir) -> None:
    """Every path a run writes, with content in the subdirectories and a killed write's temporary."""
    for name in FILES:
        qio.write_text(rd.path / name, "x")
    _savez(rd.fit_file("builtin:m", "fashion-mnist?source=bundled"))
    (rd.fits / "x").write_text("stale fit")
    _map(rd.map_file("m", "d", "q"))
    qio.write_bytes(rd.figures / "fewshot__m__d.svg", b"<svg/>")
    (rd.path / ".results.csv.0123abcd.tmp.csv").write_text("half")


def test_clear_removes_every_run_path_and_keeps_the_users_files(tmp_path: Path) -> None:
    rd = RunDir(tmp_path / "run")
    _populate(rd)
    mine = [
        rd.path / "notes.txt",
        rd.path / "my-results.csv",
        rd.path / "results.csv.bak",
        rd.path / ".results.csv.keep",  # hidden, but not a temporary of the writers
        rd.path / "mine" / "fits" / "x",
    ]
    for p in mine:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("mine")
    rd.clear()
    left = sorted(str(p.relative_to(rd.path)) for p in rd.path.rglob("*") if p.is_file())
    assert left == sorted(str(p.relative_to(rd.path)) for p in mine)
    assert not any(p.exists() for p in rd.paths())
    rd.clear()  # nothing left to remove: no error
    RunDir(tmp_path / "never-created").clear()


def test_paths_name_every_file_and_directory_of_the_layout(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    named = [rd.results, rd.run_json, rd.progress, rd.directions, rd.paired, rd.report, rd.fits, rd.maps]
    assert set(rd.paths()) == {*named, rd.figures, rd.parts} == {tmp_path / n for n in (*FILES, *DIRS)}
    uid = 'evaluate:{"model":"m"}'
    assert rd.part_file(uid).parent == rd.parts and rd.part_file(uid).name.startswith("evaluate__")
    assert rd.part_fits(uid).name == rd.part_file(uid).name[: -len(".json")] + ".fits.npz"
    assert rd.failed.parent == rd.parts
    assert rd.fit_file("builtin:a b", "fashion-mnist?source=bundled") == (
        tmp_path / "fits" / "builtin-a-b__fashion-mnist-source-bundled.npz"
    )
    assert rd.map_file("m", "d", "q").parent == rd.maps and slug("a/b", "c") == "a-b__c"
    assert RunDir(str(tmp_path)) == rd and len(slug("x" * 400)) == 150


def test_map_files_leave_out_a_killed_writes_temporary(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    _map(rd.map_file("m", "d", "q"))
    shutil.copy(rd.map_file("m", "d", "q"), rd.maps / ".m__d__q.npz.0123abcd.tmp.npz")
    assert rd.map_files() == [rd.map_file("m", "d", "q")]


def test_clear_names_a_path_it_cannot_remove(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rd = RunDir(tmp_path)
    _populate(rd)

    def refuse(path: object, *args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(shutil, "rmtree", refuse)
    with pytest.raises(
        QkvprobeError, match=r"cannot remove .*fits from the run directory \(Permission denied\)"
    ):
        rd.clear()


def test_load_direction_map_names_a_foreign_file(tmp_path: Path) -> None:
    np.savez(tmp_path / "x.npz", a=np.zeros(2))
    with pytest.raises(QkvprobeError, match=r"x\.npz: not a direction map file"):
        load_direction_map(tmp_path / "x.npz")


def _imports(package: Path) -> set[str]:
    """Absolute names of the qkvprobe modules the files under ``package`` import (relative imports resolved)."""
    out = set()
    for file in package.rglob("*.py"):
        parts = ["qkvprobe", *file.relative_to(SRC).with_suffix("").parts]
        here = parts[:-1]  # the package a module (or an __init__) is in
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = here[: len(here) - node.level + 1] if node.level else []
                module = ".".join([*base, *([node.module] if node.module else [])])
                out.update([module] if node.module else [f"{module}.{a.name}" for a in node.names])
            elif isinstance(node, ast.Import):
                out.update(a.name for a in node.names)
    return {n for n in out if n.startswith("qkvprobe")}


def test_the_report_never_imports_the_study_and_the_study_takes_no_paths_from_the_report() -> None:
    report = _imports(SRC / "report")
    assert not [n for n in report if n.startswith("qkvprobe.study")], report
    study = _imports(SRC / "study")
    assert "qkvprobe.rundir" in study and "qkvprobe.io" in study
    # what the study takes from the report: building it (render, summary, load_run) and the answer's ranking
    assert {n for n in study if n.startswith("qkvprobe.report")} <= {
        "qkvprobe.report",
        "qkvprobe.report.answer",
    }
    assert "qkvprobe.report.files" not in study and "qkvprobe.report.figures" not in study
