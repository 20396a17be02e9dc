"""``qkvprobe extract`` through typer's CliRunner on an image folder under tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import write_tiny_builtin
from qkvprobe.cli import get_app
from qkvprobe.features import FeatureStore
from test_store import ToyBackbone, single_thread  # noqa: F401


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """imagefolder layout: 2 classes x 3 grey 28x28 PNGs in train/."""
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / "data" / "train" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(
                tmp_path / "data" / "train" / c / f"{i}.png"
            )
    return tmp_path / "data"


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> ToyBackbone:
    bb = ToyBackbone()
    monkeypatch.setattr("qkvprobe.backbones.load_backbone", lambda spec, weights=None, device="cpu": bb)
    return bb


def invoke(*args: str):
    return CliRunner().invoke(get_app(), ["extract", *args])


def test_cli_extract_then_reuse(tmp_path: Path, folder: Path, toy: ToyBackbone) -> None:
    args = [
        "--model",
        "toy",
        "--data",
        f"imagefolder:{folder}",
        "--split",
        "train",
        "--blocks",
        "-1",
        "--tokens",
        "q,ffn",
        "--positions",
        "cls,patch",
        "--out",
        str(tmp_path / "s"),
        "--dtype",
        "float32",
        "--batch-size",
        "4",
        "--no-progress",
    ]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "6 samples" in result.stdout and "tokens q,ffn" in result.stdout
    store = FeatureStore.open(tmp_path / "s")
    assert store.get("ffn", "patch").shape == (6, 49, 16) and store.get("q", "cls").dtype == np.float32
    np.testing.assert_array_equal(store.labels(), [0, 0, 0, 1, 1, 1])
    assert store.classes == ["cat", "dog"] and store.dataset_spec == f"imagefolder:{folder}"
    calls = toy.calls
    assert invoke(*args).exit_code == 0 and toy.calls == calls  # same inputs: reused, not recomputed
    # same directory, other inputs: one line, exit 1
    result = invoke(*args[:-5], "--dtype", "float16", "--no-progress")
    assert result.exit_code == 1
    assert "(dtype is 'float32' there but 'float16' now); pass another --out" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--tokens", "q,z", "unknown token 'z'; choose from q, k, v, ffn, ffn_norm, q_rope, k_rope"),
        ("--positions", "head", "unknown position 'head'"),
        ("--blocks", "x", "block 'x' is not an integer"),
        ("--device", "tpu", "unknown device 'tpu'"),
        ("--dtype", "int8", "unknown dtype 'int8'"),
        ("--amp", "fp16", "unknown amp mode 'fp16'"),
        ("--on-bad-image", "ignore", "unknown --on-bad-image value 'ignore'"),
    ],
)
def test_cli_usage_errors(tmp_path: Path, option: str, value: str, message: str) -> None:
    result = invoke("--model", "toy", "--data", "x", "--out", str(tmp_path / "s"), option, value)
    assert result.exit_code == 2
    assert f"Invalid value for '{option}': {message}" in " ".join(result.output.split())


def test_cli_unwritable_out(tmp_path: Path, folder: Path, toy: ToyBackbone) -> None:
    (tmp_path / "afile").write_text("x")
    result = invoke(
        "--model", "toy", "--data", f"imagefolder:{folder}", "--out", str(tmp_path / "afile" / "s")
    )
    assert result.exit_code == 1
    assert result.stderr.startswith("qkvprobe: error: cannot write the feature store at ")
    assert "pass a writable --out" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_cli_real_builtin_backbone(
    tmp_path: Path, folder: Path, tiny_vit: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    """End to end with the real loader: a ``builtin:`` card + float16 safetensors of the tiny timm ViT."""

    models = write_tiny_builtin(tiny_vit, tmp_path / "builtin", mean=0.5, std=0.25)
    monkeypatch.setattr("qkvprobe.backbones.builtin_dir", lambda: models)
    result = invoke(
        "--model",
        "builtin:tiny",
        "--data",
        f"imagefolder:{folder}",
        "--tokens",
        "k,ffn_norm",
        "--positions",
        "avg,patch",
        "--blocks",
        "0,-1",
        "--out",
        str(tmp_path / "s"),
        "--batch-size",
        "4",
    )
    assert result.exit_code == 0, result.output
    store = FeatureStore.open(tmp_path / "s")
    assert store.blocks == [0, 1] and store.grid == (7, 7) and store.image_size == (28, 28)
    assert store.objective == "dino" and store.backbone_spec == "builtin:tiny"
    feats = store.get("ffn_norm", "patch", block=0)
    assert feats.shape == (6, 49, 32) and feats.dtype == np.float16 and np.isfinite(feats).all()
    np.testing.assert_allclose(
        store.get("k", "avg", block=-1),
        store.get("k", "patch", block=1).astype(np.float32).mean(1),
        atol=2e-3,
    )


@pytest.fixture
def jpeg_folder(tmp_path: Path) -> Path:
    """imagefolder with grey and RGB JPEGs and one PNG (decoded in the worker even with device decoding)."""
    rng = np.random.default_rng(1)
    for c in ("a", "b"):
        (tmp_path / "jpg" / "train" / c).mkdir(parents=True)
        for i in range(3):
            shape = (32, 40) if i == 0 else (36, 30, 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(
                tmp_path / "jpg" / "train" / c / f"{i}.jpg"
            )
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(
        tmp_path / "jpg" / "train" / "a" / "p.png"
    )
    return tmp_path / "jpg"


def _decode_matches(tmp_path: Path, jpeg_folder: Path, device: str) -> None:
    from qkvprobe.data import open_dataset
    from qkvprobe.features import extract_features

    bb, ds = ToyBackbone(), open_dataset(f"imagefolder:{jpeg_folder}", "train")
    bb.model.to(device)
    bb.device = torch.device(device)
    kw = {"dtype": "float32", "batch_size": 3, "progress": False, "tokens": "q", "positions": "avg,patch"}
    cpu = extract_features(bb, ds, tmp_path / "cpu", **kw)
    dev = extract_features(bb, ds, tmp_path / "dev", device_decode=True, **kw)
    assert dev.key != cpu.key and dev.manifest["preprocessing"]["decode"].startswith(
        "torchvision.io.decode_jpeg"
    )
    np.testing.assert_array_equal(dev.labels(), cpu.labels())
    # the same libjpeg-turbo on CPU gives the same pixels; nvJPEG may differ by a grey level or so
    np.testing.assert_allclose(
        dev.get("q", "avg"), cpu.get("q", "avg"), atol=1e-6 if device == "cpu" else 0.05
    )


def test_device_decode_on_cpu_matches_worker_decode(tmp_path: Path, jpeg_folder: Path) -> None:
    _decode_matches(tmp_path, jpeg_folder, "cpu")


@pytest.mark.gpu
def test_device_decode_on_cuda(tmp_path: Path, jpeg_folder: Path) -> None:
    _decode_matches(tmp_path, jpeg_folder, "cuda")


def test_device_decode_needs_file_classification_and_cuda(
    tmp_path: Path, folder: Path, toy: ToyBackbone
) -> None:
    from qkvprobe.errors import ConfigError
    from qkvprobe.features import extract_features
    from test_store import SyntheticDataset

    with pytest.raises(ConfigError, match=r"needs a file-backed classification dataset .*drop --gpu-decode"):
        extract_features(toy, SyntheticDataset(2), tmp_path / "s", device_decode=True, progress=False)
    result = invoke(
        "--model", "toy", "--data", f"imagefolder:{folder}", "--out", str(tmp_path / "s"), "--gpu-decode"
    )
    assert result.exit_code == 2 and "--gpu-decode needs --device cuda" in result.stderr
