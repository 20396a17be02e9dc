"""A new user's first hour through the CLI: defaults that fit the task, honest labels, no silent minute."""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from qkvprobe import feedback
from qkvprobe.cli import get_app
from qkvprobe.errors import ConfigError
from qkvprobe.features import FeatureStore
from qkvprobe.feedback import MAX_PATCHES, Reporter, many_tokens_warning, store_bytes
from qkvprobe.provenance import manifest_weights_source, model_label, store_label
from qkvprobe.results import read_results
from test_store import ToyBackbone, single_thread  # noqa: F401


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> ToyBackbone:
    bb = ToyBackbone()
    monkeypatch.setattr("qkvprobe.backbones.load_backbone", lambda spec, weights=None, device="cpu": bb)
    return bb


@pytest.fixture
def segfolder(tmp_path: Path) -> Path:
    """segfolder layout: classes.txt, <split>/images/*.png and <split>/masks/*.png (grey class indices)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "seg"
    root.mkdir()
    (root / "classes.txt").write_text("background\nsquare\ndisc\n")
    for split, n in (("train", 6), ("test", 3)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for i in range(n):
            mask = np.zeros((28, 28), dtype=np.uint8)
            mask[4:16, 4:16] = 1
            yy, xx = np.mgrid[:28, :28]
            mask[(yy - 20) ** 2 + (xx - 20) ** 2 < 30] = 2
            mask[0, :] = 255  # an ignored border row
            image = (mask * 90 + rng.integers(0, 40, (28, 28))).clip(0, 255).astype(np.uint8)
            Image.fromarray(image).save(root / split / "images" / f"{i}.png")
            Image.fromarray(mask).save(root / split / "masks" / f"{i}.png")
    return root


def run(*args: str):
    return CliRunner().invoke(get_app(), list(args))


def test_segmentation_extract_defaults_to_patch_and_evaluate_takes_every_held_position(
    tmp_path: Path, segfolder: Path, toy: ToyBackbone
) -> None:
    for split in ("train", "test"):
        result = run(
            "extract", "--model", "toy", "--data", f"segfolder:{segfolder}", "--split", split,
            "--out", str(tmp_path / "st" / split), "--label", "my toy", "--dtype", "float32",
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        assert "positions patch" in result.stdout  # not cls,avg, which evaluate would refuse
    store = FeatureStore.open(tmp_path / "st" / "train")
    assert store.positions == ["patch"] and store_label(store.manifest) == "my toy"
    assert manifest_weights_source(store.manifest) == f"sha256 {toy.weights_digest[:12]}"
    out = tmp_path / "results.csv"
    result = run("evaluate", "--store", str(tmp_path / "st"), "--out", str(out))
    assert result.exit_code == 0, result.output
    rows = read_results(out)
    assert {r.position for r in rows} == {"patch"} and {r.token for r in rows} == set(store.tokens)
    assert {r.model for r in rows} == {"my toy"}  # the label the extract command recorded
    assert {r.weights for r in rows} == {f"sha256 {toy.weights_digest[:12]}"}
    # No silent minute off a terminal: one plain line per unit with the elapsed seconds, on stderr.
    lines = [line for line in result.stderr.splitlines() if "] evaluate " in line]
    assert re.match(r"\[\s*\d+\.\d s\] evaluate 1/\d+ ", lines[1]), lines
    assert lines[-1].split("] ", 1)[1].startswith("evaluate ") and " done in " in lines[-1]
    assert "Which token, with which rule?" in result.stdout
    # --label names the rows explicitly
    result = run(
        "evaluate", "--store", str(tmp_path / "st"), "--out", str(out), "--label", "other", "--no-progress"
    )
    assert result.exit_code == 0 and {r.model for r in read_results(out)} == {"my toy", "other"}
    assert "evaluate 1/" not in result.stderr


def test_evaluate_refuses_stores_without_the_tasks_positions(
    tmp_path: Path, segfolder: Path, toy: ToyBackbone
) -> None:
    for split in ("train", "test"):
        result = run(
            "extract", "--model", "toy", "--data", f"segfolder:{segfolder}", "--split", split,
            "--positions", "cls,avg", "--out", str(tmp_path / "st" / split), "--no-progress",
        )  # fmt: skip
        assert result.exit_code == 0, result.output
    result = run("evaluate", "--store", str(tmp_path / "st"), "--no-progress")
    assert result.exit_code == 1
    assert (
        "the stores hold positions cls,avg but segmentation evaluates patch; extract again with --positions patch"
        in (result.stderr)
    )


def test_classification_defaults_follow_the_store(tmp_path: Path, toy: ToyBackbone) -> None:
    from types import SimpleNamespace

    from qkvprobe.commands.extract import default_positions as extract_positions
    from qkvprobe.protocols import plan_evaluation
    from qkvprobe.spec import EvalSpec

    def default_positions(held: list[str], task: str, where: str) -> list[str]:
        store = SimpleNamespace(positions=held, tokens=["q"], task=task, resolve_block=lambda b: 0)
        return list(plan_evaluation(store, store, EvalSpec()).positions)

    assert extract_positions("classification", True) == ["cls", "avg"]
    assert extract_positions("classification", False) == ["avg"]  # no class token: cls would be refused
    assert extract_positions("segmentation", True) == ["patch"]
    assert default_positions(["cls", "avg", "patch"], "classification", "the stores") == ["cls", "avg"]
    assert default_positions(["avg", "patch"], "classification", "the stores") == ["avg"]
    with pytest.raises(ConfigError, match=r"hold positions patch but classification evaluates cls or avg"):
        default_positions(["patch"], "classification", "the stores")


def test_local_weights_never_carry_the_hubs_label() -> None:
    assert (
        model_label("timm:vit_small_patch16_224.dino", "/x/ckpt.pth")
        == "timm:vit_small_patch16_224.dino + ckpt.pth"
    )
    assert model_label("timm:vit_small_patch16_224.dino") == "timm:vit_small_patch16_224.dino"
    assert model_label("timm:vit_small_patch16_224.dino", "/x/ckpt.pth", "mine") == "mine"
    manifest = {
        "backbone": {
            "spec": "timm:vit_small_patch16_224.dino",
            "weights_source": "file: ckpt.pth (sha256 1a2b)",
        }
    }
    assert store_label(manifest) == "timm:vit_small_patch16_224.dino + ckpt.pth"
    assert (
        store_label({"backbone": {"spec": "builtin:x", "weights_source": "builtin: x.safetensors"}})
        == "builtin:x"
    )
    assert manifest_weights_source({"backbone": {"weights_digest": "ab" * 32}}) == "sha256 " + "ab" * 6


def test_extract_warns_about_many_patches_with_the_store_size(
    tmp_path: Path, toy: ToyBackbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "imgs" / "train" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(
                tmp_path / "imgs" / "train" / c / f"{i}.png"
            )
    args = ["extract", "--model", "toy", "--data", f"imagefolder:{tmp_path / 'imgs'}", "--no-progress"]
    small = run(*args, "--out", str(tmp_path / "small"))
    assert small.exit_code == 0 and "warning" not in small.stderr  # 28 px / patch 4: 49 patches
    result = run(*args, "--out", str(tmp_path / "big"), "--image-size", "68", "--positions", "avg,patch")
    assert result.exit_code == 0, result.output
    assert f"68x68 px images give 17x17 = 289 patches per image (more than {MAX_PATCHES})" in result.stderr
    store = FeatureStore.open(tmp_path / "big")
    # the stated size is the size of the feature arrays written
    written = sum(np.load(f, mmap_mode="r").nbytes for f in (tmp_path / "big").glob("shard-*/b*.npy"))
    assert store_bytes(store.manifest) == written
    assert f"will take {feedback.size_text(written)}" in result.stderr


def test_segmentation_warning_names_the_patch_rows() -> None:
    manifest = {
        "grid": [28, 28],
        "image_size": [112, 112],
        "num_samples": 120,
        "positions": ["patch"],
        "tokens": ["q", "k", "v", "ffn", "ffn_norm"],
        "blocks": [5],
        "dtype": "float16",
        "backbone": {"embed_dim": 192},
        "dataset": {"split": "train", "task": "segmentation"},
    }
    text = many_tokens_warning(manifest)
    assert text is not None and "28x28 = 784 patches per image" in text
    assert (
        f"will take {feedback.size_text(120 * 784 * 192 * 2 * 5)}" in text
        and "fit or score 94,080 patch rows per token" in text
    )
    assert many_tokens_warning({**manifest, "grid": [16, 16]}) is None  # 256 is the limit, not above it


def test_reporter_off_a_terminal_writes_plain_lines_and_a_heartbeat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    buf = io.StringIO()
    reporter = Reporter(Console(file=buf, width=40))  # a StringIO is not a terminal
    assert reporter.plain
    with reporter.units("evaluate") as tell:
        for i, label in enumerate(("block 5 · cls · hyperplane (5 tokens)", "block 5 · cls · cosine")):
            tell(label, i, 2)
        tell("done", 2, 2)
    lines = buf.getvalue().splitlines()
    assert [line.split("] ", 1)[1] for line in lines[:2]] == [
        "evaluate 1/2 block 5 · cls · hyperplane (5 tokens)",  # one line, however narrow the console
        "evaluate 2/2 block 5 · cls · cosine",
    ]
    assert re.fullmatch(r"\[\s*\d+\.\d s\] evaluate 2/2 done in \d+\.\d s", lines[2])
    # the heartbeat reads the shard folders an extraction has renamed into place
    store = tmp_path / "store"
    store.mkdir()
    shards = [{"name": f"shard-{i:05d}", "start": 4 * i, "stop": min(4 * i + 4, 10)} for i in range(3)]
    (store / "manifest.json").write_text(json.dumps({"num_samples": 10, "shards": shards}))
    (store / "shard-00000").mkdir()
    monkeypatch.setattr(feedback, "HEARTBEAT_S", 0.02)
    buf.truncate(0)
    buf.seek(0)
    with reporter.heartbeat(store, "extract x train"):
        time.sleep(0.2)
    assert "extract x train: 1/3 shards written, 4/10 samples" in buf.getvalue()
    quiet = io.StringIO()
    with Reporter(Console(file=quiet), enabled=False).units("evaluate") as tell:
        tell("a", 0, 1)
    assert quiet.getvalue() == ""


def test_a_long_unit_says_it_is_still_running(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(feedback, "HEARTBEAT_S", 0.02)
    buf = io.StringIO()
    with Reporter(Console(file=buf)).units("evaluate") as tell:
        tell("block 5 · q·patch · hyperplane", 0, 1)
        time.sleep(0.2)
        tell("done", 1, 1)
        time.sleep(0.1)  # finished: no more heartbeats
    lines = [line.split("] ", 1)[1] for line in buf.getvalue().splitlines()]
    assert lines[0] == "evaluate 1/1 block 5 · q·patch · hyperplane"
    assert lines[1].startswith("evaluate 1/1 block 5 · q·patch · hyperplane: still running after 0.")
    assert lines[-1].startswith("evaluate 1/1 done in ")
