"""The command line's contract (README "Command line"): commands registered explicitly, exit code 2 for a bad flag
value on every command (naming the flag, the value and what is allowed), 1 for a missing input file, plain
warning lines off a terminal, one spelling per flag; and the rotary tokens q_rope / k_rope through ``extract``."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import write_tiny_builtin
from qkvprobe.cli import build_app, get_app
from qkvprobe.errors import StoreError
from qkvprobe.features import FeatureStore
from test_extract_cli import folder, toy  # noqa: F401  (fixtures)
from test_protocols import fake_cli_stores
from test_store import ToyBackbone

BUILTIN = "builtin:fmnist-dino-vit-tiny"


def invoke(*args: str):
    return CliRunner().invoke(get_app(), list(args))


def flat(text: str) -> str:
    return " ".join(text.split())


def test_command_modules_do_not_import_the_cli() -> None:
    """The commands are plain functions: importing them leaves ``qkvprobe.cli`` unimported (no registration by
    import side effect), and the app built from them lists every command."""
    code = (
        "import sys\n"
        "from qkvprobe.commands import catalog, evaluate, extract, pretrain, run\n"
        "assert 'qkvprobe.cli' not in sys.modules, 'a command module imports qkvprobe.cli'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    names = [c.name for c in build_app(rich=False).registered_commands]
    assert names == ["run", "extract", "evaluate", "report", "findings", "pretrain", "models", "datasets"]


@pytest.mark.parametrize(
    ("args", "flag", "message"),
    [
        (["--tokens", "q,,z"], "--tokens", "unknown token 'z'; choose from q, k, v, ffn, ffn_norm, q_rope"),
        (["--tokens", " , "], "--tokens", "no token given; pass a comma-separated list; choose from q, k"),
        (["--positions", "cls,head"], "--positions", "unknown position 'head'; choose from cls, avg, patch"),
        (["--blocks", "-1,x"], "--blocks", "block 'x' is not an integer; pass e.g. --blocks -1"),
        (["--device", "cuda:x"], "--device", "unknown device 'cuda:x'; choose from cpu, cuda, cuda:N or mps"),
    ],
)
def test_extract_bad_flag_value_is_usage_error(
    tmp_path: Path, args: list[str], flag: str, message: str
) -> None:
    result = invoke("extract", "--model", "toy", "--data", "x", "--out", str(tmp_path / "s"), *args)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("Usage: qkvprobe extract")
    assert f"Invalid value for '{flag}': {message}" in flat(result.output)


@pytest.mark.parametrize(
    ("args", "flag", "message"),
    [
        (["--tokens", "q,zz"], "--tokens", "unknown token 'zz'; choose from q (the stores' token types)"),
        (
            ["--positions", "patch"],
            "--positions",
            "unknown position 'patch'; choose from cls (what the stores",
        ),
        (
            ["--rules", "cosine,nearest"],
            "--rules",
            "unknown rule 'nearest'; choose from hyperplane, cosine, knn",
        ),
        (["--blocks", "3"], "--blocks", "block 3 is not in the store"),
        (["--shots", "1,0", "--setting", "fewshot"], "--shots", "shot count 0 is below 1"),
        (
            ["--allow-mismatch", "dtype"],
            "--allow-mismatch",
            "unknown field 'dtype'; choose from backbone, weights",
        ),
        (["--setting", "oneshot"], "--setting", "unknown setting 'oneshot'; choose from standard, fewshot"),
        (
            ["--task", "detection"],
            "--task",
            "unknown task 'detection'; choose from classification, segmentation",
        ),
        (["--device", "gpu"], "--device", "unknown device 'gpu'"),
    ],
)
def test_evaluate_bad_flag_value_is_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], flag: str, message: str
) -> None:
    """Every list flag of ``evaluate`` (and its choices) exits 2 like ``extract``'s, before any evaluation."""
    fake = fake_cli_stores(tmp_path, monkeypatch, 20, 10)

    def only_block_0(block: int) -> int:
        if block not in (0, -1):
            raise StoreError(f"block {block} is not held")
        return 0

    for store in (tmp_path / "tr", tmp_path / "te"):
        stored = FeatureStore.open(store)
        stored.resolve_block, stored.path, stored.blocks = only_block_0, store, [0]
    base = [a for a in fake if a not in ("--tokens", "q")]
    result = invoke(*base, "--out", str(tmp_path / "r.csv"), *args)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("Usage: qkvprobe evaluate")
    assert f"Invalid value for '{flag}': {message}" in flat(result.output)
    assert not (tmp_path / "r.csv").exists()


def test_evaluate_head_tokens_are_valid_list_items(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``q.h0`` passes the --tokens check when q is held (the store then decides whether the head exists)."""
    fake = fake_cli_stores(tmp_path, monkeypatch, 20, 10)
    base = [a for a in fake if a not in ("--tokens", "q")]
    result = invoke(*base, "--tokens", "k.h0", "--rules", "cosine", "--out", str(tmp_path / "r.csv"))
    assert result.exit_code == 2 and "unknown token 'k.h0'" in flat(result.output)


@pytest.mark.parametrize(
    ("args", "flag", "message"),
    [
        (["--objective", "byol"], "--objective", "unknown objective 'byol'; choose from dino, mae"),
        (
            ["--objective", "mae", "--arch", "vit-huge"],
            "--arch",
            "unknown arch 'vit-huge'; choose from vit-micro",
        ),
        (["--objective", "mae", "--device", "tpu"], "--device", "unknown device 'tpu'"),
    ],
)
def test_pretrain_bad_flag_value_is_usage_error(
    tmp_path: Path, args: list[str], flag: str, message: str
) -> None:
    result = invoke("pretrain", "--out", str(tmp_path / "m"), *args)
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{flag}': {message}" in flat(result.output)
    assert not (tmp_path / "m").exists()


def test_unknown_option_is_usage_error() -> None:
    result = invoke("evaluate", "--no-such-flag", "1")
    assert result.exit_code == 2 and "No such option: --no-such-flag" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "{tmp}/missing.yaml"], "config file '{tmp}/missing.yaml' does not exist"),
        (["report", "{tmp}/no-run"], "{tmp}/no-run"),
        (["evaluate", "--store", "{tmp}/no-stores"], "{tmp}/no-stores/train"),
        (["extract", "--model", BUILTIN, "--weights", "{tmp}/w.safetensors"], "{tmp}/w.safetensors"),
        (["extract", "--model", "builtin:nope"], "unknown built-in model 'nope'"),
        (["extract", "--model", BUILTIN, "--data", "imagefolder:{tmp}/no-images"], "{tmp}/no-images"),
    ],
)
def test_missing_input_is_a_domain_error(tmp_path: Path, args: list[str], message: str) -> None:
    """A missing file or directory is not a usage error: exit 1, one ``qkvprobe: error:`` line naming it."""
    if args[0] == "extract":
        args = [*args, "--out", "{tmp}/s"] + ([] if "--data" in args else ["--data", "imagefolder:{tmp}"])
    result = invoke(*(a.format(tmp=tmp_path) for a in args))
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("qkvprobe: error: ") and len(result.stderr.strip().splitlines()) == 1
    assert message.format(tmp=tmp_path) in result.stderr


def test_plain_warning_and_log_lines_off_a_terminal(
    tmp_path: Path,
    folder: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Off a terminal (CliRunner), Python warnings and the qkvprobe logger print ``warning: message``: no
    ``file.py:LINE`` location, no logger name."""
    (folder / "train" / "cat" / "notes.txt").write_text("not an image")  # the folder dataset warns about it
    bb = ToyBackbone()

    def load(spec: str, weights: object = None, device: str = "cpu") -> ToyBackbone:
        logging.getLogger("qkvprobe").warning("weights note for %s", spec)
        warnings.warn("a library's deprecation", DeprecationWarning, stacklevel=1)
        return bb

    monkeypatch.setattr("qkvprobe.backbones.load_backbone", load)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        result = invoke(
            "extract", "--model", "toy", "--data", f"imagefolder:{folder}", "--out", str(tmp_path / "s")
        )
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert "warning: weights note for toy" in lines
    assert "warning: DeprecationWarning: a library's deprecation" in lines
    assert any(
        line.startswith("warning: imagefolder:") and "non-image files ignored" in line for line in lines
    )
    assert ".py:" not in result.output and "UserWarning" not in result.output
    assert logging.getLogger("qkvprobe").handlers == []  # restored after the command


def test_data_root_flag_and_its_old_spelling(
    tmp_path: Path,
    folder: Path,  # noqa: F811
    toy: ToyBackbone,  # noqa: F811
) -> None:
    """``extract --data-root`` (the spelling ``pretrain`` and the error messages use); ``--root`` still works
    (hidden), and the two disagreeing is a usage error."""
    spec = ["--model", "toy", "--data", "fashion-mnist", "--split", "test", "--no-progress"]
    empty = tmp_path / "empty"
    empty.mkdir()
    for flag in ("--data-root", "--root"):
        result = invoke("extract", *spec, flag, str(empty), "--out", str(tmp_path / flag))
        assert result.exit_code == 1 and str(empty) in result.stderr  # the root was used: nothing there
    both = invoke(
        "extract", *spec, "--data-root", str(empty), "--root", str(folder), "--out", str(tmp_path / "b")
    )
    assert both.exit_code == 2 and "--root is the old spelling of --data-root" in flat(both.output)
    assert "--root" not in flat(invoke("extract", "--help").output).replace("--data-root", "")


def test_help_fits_80_columns_off_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Off a terminal, help is click's plain text: no box drawing, no line over 80 columns."""
    monkeypatch.setenv("COLUMNS", "80")
    for command in (
        [],
        ["run"],
        ["extract"],
        ["evaluate"],
        ["report"],
        ["pretrain"],
        ["models"],
        ["datasets"],
    ):
        result = CliRunner().invoke(get_app(), [*command, "--help"], terminal_width=80)
        assert result.exit_code == 0, result.output
        assert "╭" not in result.output and "│" not in result.output
        assert max(len(line) for line in result.output.splitlines()) <= 80, command


# ------------------------------------------------------------------------------------------------ rotary tokens


def test_extract_q_rope_of_an_eva_model(
    tmp_path: Path,
    folder: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A tiny DINOv3-style timm Eva (4 registers, rotary embedding) extracts q_rope/k_rope into a store: the
    prefix tokens are not rotated (q_rope = q there), patch tokens are (values differ) by a rotation (the norm of
    every token's every head's vector is kept)."""
    from qkvprobe.backbones.timm_backbone import TimmBackbone
    from test_taps_timm_families import eva

    bb = TimmBackbone(eva("dinov3"), spec="timm:tiny-eva", objective="dino", device="cpu")
    bb.data_config.update(mean=(0.5,), std=(0.25,))  # one grey channel, as the model's in_chans
    assert bb.has_rope and bb.offered_tokens()[-2:] == ("q_rope", "k_rope")
    monkeypatch.setattr("qkvprobe.backbones.load_backbone", lambda spec, weights=None, device="cpu": bb)
    out = tmp_path / "s"
    result = invoke(
        "extract",
        *("--model", "timm:tiny-eva", "--data", f"imagefolder:{folder}", "--out", str(out)),
        *("--tokens", "q,q_rope,k_rope", "--positions", "cls,patch", "--dtype", "float32", "--no-progress"),
    )
    assert result.exit_code == 0, result.output
    assert "tokens q,q_rope,k_rope" in result.stdout
    store = FeatureStore.open(out)
    assert store.tokens == ["q", "q_rope", "k_rope"]
    q, q_rope = store.get("q", "patch"), store.get("q_rope", "patch")
    assert q_rope.shape == q.shape and q.shape[0] == 6 and q.shape[2] == 32
    np.testing.assert_array_equal(store.get("q_rope", "cls"), store.get("q", "cls"))
    assert np.abs(q_rope - q).max() > 1e-2  # rotated
    heads = bb.num_heads

    def head_norms(x: np.ndarray) -> np.ndarray:
        return np.linalg.norm(x.reshape(*x.shape[:2], heads, -1), axis=-1)

    np.testing.assert_allclose(head_norms(q_rope), head_norms(q), rtol=1e-4, atol=1e-5)


def test_extract_refuses_rope_tokens_without_rotary_embedding(
    tmp_path: Path,
    folder: Path,  # noqa: F811
    tiny_vit: torch.nn.Module,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    models = write_tiny_builtin(tiny_vit, tmp_path / "builtin", mean=0.5, std=0.25)
    monkeypatch.setattr("qkvprobe.backbones.builtin_dir", lambda: models)
    result = invoke(
        "extract",
        *("--model", "builtin:tiny", "--data", f"imagefolder:{folder}", "--out", str(tmp_path / "s")),
        *("--tokens", "q,k_rope"),
    )
    assert result.exit_code == 1
    assert result.stderr == (
        "qkvprobe: error: builtin:tiny has no rotary position embedding, so no k_rope; it offers q, k, v, ffn, "
        "ffn_norm\n"
    )
    assert not (tmp_path / "s").exists()


def test_study_config_takes_rope_tokens() -> None:
    import typing

    from qkvprobe.config import StudyConfig
    from qkvprobe.vocab import EXTRACT_TOKENS, ExtractToken

    assert typing.get_args(ExtractToken) == EXTRACT_TOKENS
    cfg = StudyConfig(models=["timm:x"], datasets=["fashion-mnist"], tokens=["q", "q_rope"])
    assert cfg.tokens == ["q", "q_rope"]


def test_missing_weights_file_is_a_weights_error(tmp_path: Path) -> None:
    from qkvprobe.backbones.weights import file_source
    from qkvprobe.errors import WeightsError

    with pytest.raises(WeightsError, match=r"weights file .*w.pth does not exist; pass an existing"):
        file_source(tmp_path / "w.pth")
