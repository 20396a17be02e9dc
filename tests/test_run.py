"""The study end to end on a reduced grid: tiny random-init built-in models, small Fashion-MNIST subsets.

The built-in models are written into a temporary directory (``builtin_dir`` is monkeypatched; the killed-run
test starts a subprocess that patches it the same way), so no test depends on the shipped weights."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from qkvprobe.config import load_config, validate_config
from qkvprobe.errors import ConfigError
from qkvprobe.results import read_results
from qkvprobe.rundir import RunDir, slug
from qkvprobe.study.sides import fitted_direction_cosines
from randomize import randomize_
from test_report import _Collector as _Html

TOKENS = ["q", "ffn"]


def _make_builtin(directory: Path, name: str, objective: str, seed: int) -> None:
    import timm
    import torch
    from safetensors.torch import save_file

    kwargs = {
        "img_size": 28,
        "patch_size": 7,
        "in_chans": 1,
        "embed_dim": 24,
        "depth": 2,
        "num_heads": 2,
        "num_classes": 0,
        "dynamic_img_size": True,
    }
    torch.manual_seed(seed)
    model = randomize_(timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs), seed)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    path = directory / f"{name}.safetensors"
    save_file(state, str(path))
    card = {
        "name": name,
        "objective": objective,
        "timm_model": "vit_tiny_patch16_224",
        "model_kwargs": kwargs,
        "data_config": {"mean": [0.5], "std": [0.5], "input_size": [1, 28, 28]},
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "params": 0,
        "data": "random init (test)",
        "epochs": 0,
        "wall_time_s": 0,
        "hardware": "none",
        "final_loss": 0.0,
        "command": "tests",
        "loss_curve": [],
    }
    (directory / f"{name}.json").write_text(json.dumps(card))


@pytest.fixture(scope="session")
def builtin_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("builtin")
    _make_builtin(directory, "tiny-dino", "dino", 0)
    _make_builtin(directory, "tiny-mae", "mae", 1)
    return directory


def study_config(tmp_path: Path, **changes: object) -> dict:
    """The default study's structure on a reduced grid (small subsets, few episodes)."""
    data = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "default.yaml").read_text())
    data.update(
        {
            "name": "test",
            "out_dir": str(tmp_path / "runs"),
            "cache_dir": str(tmp_path / "cache"),
            "batch_size": 64,
            "models": ["builtin:tiny-dino", "builtin:tiny-mae"],
            "datasets": [
                {"spec": "fashion-mnist?source=bundled", "train_size": 150, "test_size": 60},
                {"spec": "fashion-mnist-scenes?source=bundled", "train_size": 40, "test_size": 20},
            ],
            "tokens": ["q", "ffn"],
            "c_grid": [0.1, 1.0],
            "fewshot": {"ways": 3, "shots": [1, 5], "queries": 3, "episodes": 10, "segmentation_episodes": 6},
            "block_sweep": {"enabled": True, "blocks": "all", "position": "cls"},
            "report": {"direction_map_images": 2, "max_fit_samples": 2000},
        }
    )
    data.update(changes)
    return data


@pytest.fixture()
def patched_builtins(builtin_models: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import qkvprobe.backbones as backbones

    monkeypatch.setattr(backbones, "builtin_dir", lambda: builtin_models)
    monkeypatch.setenv("QKVPROBE_CACHE", str(builtin_models.parent / "data-cache"))
    return builtin_models


def expected_keys(cfg) -> set[tuple]:
    """(model, dataset, setting, shots, token, position, rule, block, metric) of every expected row."""
    keys = set()
    for m in cfg.models:
        for d in cfg.datasets:
            metrics = {
                "classification": {"standard": ["accuracy"], "fewshot": ["accuracy"]},
                "segmentation": {"standard": ["miou", "pixel_accuracy"], "fewshot": ["miou", "fb_iou"]},
            }[d.task]
            for setting in cfg.settings:
                for shots in [0] if setting == "standard" else cfg.fewshot.shots:
                    for tok in cfg.tokens:
                        for pos in d.positions:
                            for rule in cfg.rules:
                                for metric in metrics[setting]:
                                    keys.add((m.name, d.spec, setting, shots, tok, pos, rule, 1, metric))
    return keys


def test_study_end_to_end(tmp_path: Path, patched_builtins: Path) -> None:
    from qkvprobe.study import run_study

    cfg = validate_config(study_config(tmp_path))
    result = run_study(cfg, progress=False)
    run_dir = result.run_dir
    rows = read_results(run_dir / "results.csv")
    keys = {
        (r.model, r.dataset, r.setting, r.shots, r.token, r.position, r.rule, r.block, r.metric) for r in rows
    }
    missing = expected_keys(cfg) - keys
    assert not missing, sorted(missing)[:5]
    assert all(0.0 <= r.value <= 1.0 for r in rows)
    # every row names its weights: the built-in file, not just the spec
    assert {r.weights for r in rows if r.model == "builtin:tiny-dino"} == {"builtin: tiny-dino.safetensors"}
    assert len({r.key() for r in rows}) == len(rows)
    # block sweep: the first model, cls, blocks 0 and 1 for every token and rule
    sweep = {(r.token, r.rule) for r in rows if r.model == "builtin:tiny-dino" and r.block == 0}
    assert sweep == {(t, ru) for t in TOKENS for ru in cfg.rules}
    assert not any(r.model == "builtin:tiny-mae" and r.block == 0 for r in rows)

    info = json.loads((run_dir / "run.json").read_text())
    assert [(e["label"], e["weights_source"], e["family"]) for e in info["models"]] == [
        ("builtin:tiny-dino", "builtin: tiny-dino.safetensors", "joint-embedding"),
        ("builtin:tiny-mae", "builtin: tiny-mae.safetensors", "masked-image-modelling"),
    ]
    assert all(len(e["weights_digest"]) == 64 and e["weights"] is None for e in info["models"])
    assert info["status"] == "complete" and info["episodes_seed"] == 0
    assert info["config"]["fewshot"]["episodes"] == 10 and info["versions"]["torch"]
    assert info["main_blocks"] == {"builtin:tiny-dino": [1], "builtin:tiny-mae": [1]}
    assert any("bundled" in s for s in info["data_sources"].values()) and info["timings"]["total_s"] > 0
    directions = json.loads((run_dir / "directions.json").read_text())["entries"]
    assert {(e["model"], e["dataset"], e["token"]) for e in directions} == {
        (m, d, t)
        for m in ("builtin:tiny-dino", "builtin:tiny-mae")
        for d in ("fashion-mnist?source=bundled", "fashion-mnist-scenes?source=bundled")
        for t in TOKENS
    }
    assert all(-1.0 <= c <= 1.0 for e in directions for c in e["cosine"])
    # The angles are those of the standard protocol's own fits, saved per model × dataset (no second fit).
    assert len(list((run_dir / "fits").glob("*.npz"))) == 2 * 2
    for e in directions:
        fits = run_dir / "fits" / (slug(e["model"], e["dataset"]) + ".npz")
        classes, cos = fitted_direction_cosines(fits, [e["token"]], e["position"], e["block"])
        assert e["cosine"] == pytest.approx(cos[0].tolist(), abs=1e-6) and len(classes) == len(e["classes"])
    assert len(list((run_dir / "maps").glob("*.npz"))) == 2 * len(TOKENS)
    assert json.loads((run_dir / "paired.json").read_text())["tests"]

    html = _Html()
    html.feed((run_dir / "report.html").read_text())
    assert (
        len([t for t in html.tables if "heatmap" in t.get("class", "") and "directions" not in t["class"]])
        == 2 * 2 * 3
    )
    assert html.imgs and all(
        (run_dir / i["data-file"]).is_file() and i["src"].startswith("data:image/") for i in html.imgs
    )
    assert any("sweep" in i["data-file"] for i in html.imgs) and any(
        "map__" in i["data-file"] for i in html.imgs
    )
    # The answer table (report and terminal): per model, its weights; per dataset × setting, the best choice
    # and the best of the other rule, ties decided by the paired tests of the best against every other choice.
    text = (run_dir / "report.html").read_text()
    assert text.count("weights: builtin: tiny-dino.safetensors") == 1
    assert text.index('class="answer"') < text.index('class="heatmap"')
    tests = json.loads((run_dir / "paired.json").read_text())["tests"]
    unit = [
        t
        for t in tests
        if t["model"] == "builtin:tiny-dino" and t["setting"] == "fewshot" and t["shots"] == 1
    ]
    classification = [t for t in unit if t["task"] == "classification"]
    assert (
        len(classification) == len(TOKENS) * 2 * len(cfg.rules) - 1
    )  # tokens × positions × rules, less the best
    assert {t["test"] for t in classification} == {"wilcoxon"}
    assert {t["test"] for t in tests if t["setting"] == "standard"} == {"mcnemar"}

    # a second run resumes: every unit is skipped, the table is unchanged
    again = run_study(cfg, progress=False)
    assert again.skipped_units > 0 and len(read_results(run_dir / "results.csv")) == len(rows)

    # RunDir knows every path the run wrote; every file has the mode the umask gives new files
    assert {p.name for p in run_dir.iterdir()} == {p.name for p in RunDir(run_dir).paths()}
    mask = os.umask(0o022)
    os.umask(mask)
    modes = {stat.S_IMODE(p.stat().st_mode) for p in run_dir.rglob("*") if p.is_file()}
    assert modes == {0o666 & ~mask}


def test_changed_config_is_refused_without_fresh(tmp_path: Path, patched_builtins: Path) -> None:
    from qkvprobe.study import run_study

    small = study_config(
        tmp_path,
        datasets=[{"spec": "fashion-mnist?source=bundled", "train_size": 150, "test_size": 30}],
        settings=["standard"],
        tokens=["ffn"],
        rules=["cosine"],
        models=["builtin:tiny-dino"],
        block_sweep={"enabled": False},
        report={"enabled": False},
    )
    run_study(validate_config(small), progress=False)
    small["seed"] = 3
    with pytest.raises(
        ConfigError, match=r"different config \(these keys changed: seed: 0 → 3; .* pass --fresh"
    ):
        run_study(validate_config(small), progress=False)
    # --fresh removes every path of the old run: fits/ and figures/ too (stale files planted), not the user's
    run_dir = RunDir(validate_config(small).run_dir())
    stale = [
        run_dir.fits / "x",
        run_dir.figures / "fewshot__old.svg",
        run_dir.maps / "old.npz",
        run_dir.report,
    ]
    for p in stale:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("stale")
    (run_dir.path / "notes.txt").write_text("mine")
    result = run_study(validate_config(small), fresh=True, progress=False)
    assert {r.seed for r in result.rows} == {3}
    assert not [p for p in stale if p.exists()] and (run_dir.path / "notes.txt").read_text() == "mine"
    assert {p.name for p in run_dir.path.iterdir()} <= {p.name for p in run_dir.paths()} | {"notes.txt"}


def test_killed_run_resumes_without_duplicate_rows(tmp_path: Path, builtin_models: Path) -> None:
    config = tmp_path / "study.yaml"
    # one model, no sweep, no report: resuming is about units and rows, and the test must stay quick
    data = study_config(
        tmp_path, models=["builtin:tiny-dino"], block_sweep={"enabled": False}, report={"enabled": False}
    )
    data["datasets"] = data["datasets"][:1]
    config.write_text(yaml.safe_dump(data))
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        import qkvprobe.backbones as backbones
        backbones.builtin_dir = lambda: Path({str(builtin_models)!r})
        from qkvprobe.cli import main
        main(sys.argv[1:])
    """)
    env = {**os.environ, "QKVPROBE_CACHE": str(builtin_models.parent / "data-cache")}
    cmd = [sys.executable, "-c", script, "run", str(config), "--quiet"]
    results = tmp_path / "runs" / "test" / "results.csv"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and not results.exists() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert results.exists(), "the run ended before writing its first rows"
    first = read_results(results)
    progress = (
        json.loads((tmp_path / "runs" / "test" / "progress.json").read_text())["done"]
        if (tmp_path / "runs" / "test" / "progress.json").exists()
        else []
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
    assert len(progress) < 3, progress  # killed before its last unit
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = read_results(results)
    assert len({r.key() for r in rows}) == len(rows)  # no duplicates
    assert {r.key() for r in first} <= {r.key() for r in rows}  # finished rows kept
    cfg = load_config(config)
    keys = {
        (r.model, r.dataset, r.setting, r.shots, r.token, r.position, r.rule, r.block, r.metric) for r in rows
    }
    assert expected_keys(cfg) <= keys
    info = json.loads((tmp_path / "runs" / "test" / "run.json").read_text())
    assert info["resumed"] is True and info["timings"]["total_s"] > 0
    assert len(info["timings_earlier"]) == 1 and "total_s" not in info["timings_earlier"][0]  # the killed one


def test_cli_run_paths_progress_and_answer(
    tmp_path: Path, patched_builtins: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`qkvprobe run CONFIG` from another working directory: the config's relative paths resolve against its
    folder, `--out` against the working directory; progress lines on stderr, the answer table on stdout."""
    from typer.testing import CliRunner

    from qkvprobe.cli import get_app

    folder = tmp_path / "project"
    folder.mkdir()
    data = study_config(
        tmp_path,
        datasets=[{"spec": "fashion-mnist?source=bundled", "train_size": 60, "test_size": 30}],
        settings=["standard"],
        tokens=["ffn"],
        rules=["cosine"],
        models=["builtin:tiny-dino"],
        block_sweep={"enabled": False},
        report={"enabled": False},
    )
    data.update(out_dir="runs", cache_dir="cache")
    (folder / "study.yaml").write_text(yaml.safe_dump(data))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = CliRunner().invoke(get_app(), ["run", "../project/study.yaml"])
    assert result.exit_code == 0, result.output
    assert (folder / "runs" / "test" / "results.csv").is_file() and (folder / "cache").is_dir()
    assert not (elsewhere / "runs").exists()
    assert "Which token, with which rule?" in result.stdout and "weights: builtin: tiny-dino" in result.stdout
    assert (
        "] builtin:tiny-dino · fashion-mnist?source=bundled · train: features of 60 samples" in result.stderr
    )
    assert "]   evaluate 1/2 block 1 · cls · cosine (1 tokens)" in result.stderr
    assert "· train: features extracted in " in result.stderr
    result = CliRunner().invoke(get_app(), ["run", "../project/study.yaml", "--out", "here", "--quiet"])
    assert result.exit_code == 0, result.output
    assert (elsewhere / "here" / "results.csv").is_file() and result.stderr == ""
    again = CliRunner().invoke(get_app(), ["run", "../project/study.yaml", "--out", "again"])
    assert again.exit_code == 0 and "· train: features from the cache (" in again.stderr


def test_study_warns_before_extracting_many_patches(tmp_path: Path, patched_builtins: Path) -> None:
    import io

    from rich.console import Console

    from qkvprobe.study import run_study

    cfg = validate_config(
        study_config(
            tmp_path,
            datasets=[
                {
                    "spec": "fashion-mnist-scenes?source=bundled",
                    "train_size": 12,
                    "test_size": 6,
                    "image_size": 119,
                }
            ],
            settings=["standard"],
            tokens=["q"],
            rules=["cosine"],
            models=["builtin:tiny-dino"],
            block_sweep={"enabled": False},
            report={"enabled": False},
        )
    )
    buf = io.StringIO()
    run_study(cfg, progress=False, console=Console(file=buf, width=80))  # a warning is shown even when quiet
    text = buf.getvalue()
    assert (
        "warning: builtin:tiny-dino · fashion-mnist-scenes?source=bundled · train: 119x119 px images give "
        in text
    )
    assert "17x17 = 289 patches per image (more than 256)" in text and "fit or score 3,468 patch rows" in text


def test_a_study_compares_its_models_on_one_class_set(
    tmp_path: Path, patched_builtins: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A class one model's episodes must leave out (e.g. too few images at its patch grid) is left out of every
    model's episodes of that dataset × shots, named in each one's rows and in run.json."""
    import qkvprobe.protocols as protocols
    from qkvprobe.study import run_study

    real = protocols.fewshot_left_out
    seen: list[str] = []

    def one_model_lacks_class_2(train, test, spec, **kw):  # as if tiny-mae's grid lost class 2
        seen.append(train.backbone_spec)
        out = real(train, test, spec, **kw)
        return {s: (*c, 2) if "tiny-mae" in train.backbone_spec else c for s, c in out.items()}

    monkeypatch.setattr(protocols, "fewshot_left_out", one_model_lacks_class_2)
    data = study_config(
        tmp_path,
        datasets=[{"spec": "fashion-mnist?source=bundled", "train_size": 150, "test_size": 60}],
        settings=["fewshot"],
        rules=["cosine"],
        fewshot={"ways": 3, "shots": [1], "queries": 3, "episodes": 10},
        block_sweep={"enabled": False},
        report={"enabled": False},
    )
    result = run_study(validate_config(data), progress=False)
    assert sorted(seen) == ["builtin:tiny-dino", "builtin:tiny-mae"]
    class_2 = json.loads((result.run_dir / "run.json").read_text())["fewshot_class_sets"]
    assert class_2["fashion-mnist?source=bundled"]["1"] == {"builtin:tiny-dino": [], "builtin:tiny-mae": [2]}
    names = {r.model: r.left_out for r in result.rows}
    assert set(names) == {"builtin:tiny-dino", "builtin:tiny-mae"} and len(set(names.values())) == 1
    assert names["builtin:tiny-dino"] != ""  # the model that lacked nothing left class 2 out too
    left = json.loads((result.run_dir / "run.json").read_text())["left_out"]
    assert len(left) == 2 and all(v == [names["builtin:tiny-dino"]] for v in left.values())


def test_a_study_refuses_an_impossible_fewshot_setting_before_extracting(
    tmp_path: Path, patched_builtins: Path
) -> None:
    """C: auto draws validation episodes with half the training images as queries: with 10 queries and 60 training
    images (6 a class) none can be drawn. The study says so, naming the keys, before any extraction."""
    from qkvprobe.study import run_study

    data = study_config(
        tmp_path,
        models=["builtin:tiny-dino"],
        datasets=[{"spec": "fashion-mnist?source=bundled", "train_size": 60, "test_size": 150}],
        settings=["fewshot"],
        rules=["hyperplane"],
        fewshot={"ways": 3, "shots": [1], "queries": 10, "episodes": 5, "C": "auto"},
        block_sweep={"enabled": False},
        report={"enabled": False},
    )
    with pytest.raises(ConfigError) as err:
        run_study(validate_config(data), progress=False)
    text = str(err.value)
    assert text.startswith("datasets.0 (fashion-mnist?source=bundled), few-shot 3-way 1-shot: the validation")
    assert "fewshot.queries" in text and "fewshot.C to a number" in text
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())  # nothing extracted
    data["fewshot"]["C"] = 1.0  # a fixed C needs no validation episodes: the same study runs
    assert run_study(validate_config(data), fresh=True, progress=False).rows


def test_a_study_counts_its_units_and_names_the_largest_first(tmp_path: Path, patched_builtins: Path) -> None:
    import io

    from rich.console import Console

    from qkvprobe.study import run_study

    data = study_config(
        tmp_path,
        models=["builtin:tiny-dino"],
        datasets=[{"spec": "fashion-mnist?source=bundled", "train_size": 150, "test_size": 60}],
        rules=["cosine", "hyperplane"],
        fewshot={"ways": 3, "shots": [1], "queries": 3, "episodes": 5},
        block_sweep={"enabled": False},
        report={"enabled": False},
    )
    buf = io.StringIO()
    run_study(validate_config(data), progress=True, console=Console(file=buf, width=200))
    lines = [line.split("] ", 1)[-1] for line in buf.getvalue().splitlines()]
    largest = next(line for line in lines if " units of work; the largest by estimated cost: " in line)
    assert largest.startswith("2 units of work") and "standard" in largest.split(": ", 1)[1].split(";")[0]
    counted = [line for line in lines if line.startswith("unit ")]
    assert [c.split(" (")[0] for c in counted] == ["unit 1/2", "unit 2/2"]
    assert counted[0].startswith("unit 1/2 (0 % of the estimated work done): ")


def test_an_interrupted_setting_resumes_at_its_first_unfinished_unit(
    tmp_path: Path, patched_builtins: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C in the middle of one setting: the rerun replays the inner units (block × position × token) finished
    before it and computes only the rest, to the bytes of an uninterrupted run."""
    from qkvprobe.protocols import driver
    from qkvprobe.study import run_study

    data = study_config(
        tmp_path,
        models=["builtin:tiny-dino"],
        datasets=[{"spec": "fashion-mnist?source=bundled", "train_size": 150, "test_size": 60}],
        settings=["fewshot"],
        rules=["cosine", "hyperplane"],
        fewshot={"ways": 3, "shots": [1], "queries": 3, "episodes": 8},
        block_sweep={"enabled": False},
        report={"enabled": False},
    )
    real, calls = driver._fewshot_unit, []

    def unit(*args: object) -> int:
        calls.append(args[-2:])  # (position, token)
        if len(calls) == 3 and stop:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(driver, "_fewshot_unit", unit)
    stop = True
    with pytest.raises(KeyboardInterrupt):
        run_study(validate_config(data), progress=False)
    assert len(calls) == 3  # 2 inner units finished, the 3rd interrupted
    stop, first = False, list(calls[:2])
    calls.clear()
    resumed = run_study(validate_config(data), progress=False)
    assert len(calls) == 2 and not set(calls) & set(
        first
    )  # only the 2 unfinished of the 4 (cls, avg) × (q, ffn)
    assert not list(RunDir(resumed.run_dir).parts.glob("*.partial"))  # removed with the unit's record
    data["name"] = "whole"
    whole = run_study(validate_config(data), progress=False)
    for name in ("results.csv", "paired.json"):
        assert (resumed.run_dir / name).read_bytes() == (whole.run_dir / name).read_bytes()
