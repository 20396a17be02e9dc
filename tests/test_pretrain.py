"""Pre-training (DINO, MAE): loss falls, exact EMA and masking, exact resume, CLI, errors.

Data are synthetic Fashion-MNIST-format IDX files under tmp_path, so no test needs the real data set.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from qkvprobe.errors import ConfigError, DataError, SpecError
from qkvprobe.pretrain import PretrainConfig, pretrain
from qkvprobe.pretrain.card import sha256_file
from qkvprobe.pretrain.common import load_train_images, scene_crops
from qkvprobe.pretrain.dino import dino_loss, ema_update
from qkvprobe.pretrain.mae import patchify, random_masking


def _write_idx(folder: Path, images: np.ndarray) -> None:
    """A Fashion-MNIST-shaped folder (the four IDX files the data package reads) holding ``images``."""
    folder.mkdir(parents=True, exist_ok=True)
    labels = (np.arange(len(images)) % 10).astype(np.uint8)
    for prefix in ("train", "t10k"):
        for kind, array in (("images-idx3", images.astype(np.uint8)), ("labels-idx1", labels)):
            header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
            with gzip.open(folder / f"{prefix}-{kind}-ubyte.gz", "wb") as fh:
                fh.write(header + array.tobytes())


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    """256 synthetic 28×28 'garments' of four kinds (box, bar, column, ring) with random size, place, grey."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:28, :28]
    images = np.zeros((256, 28, 28), np.float32)
    for i, img in enumerate(images):
        cy, cx, size = *rng.integers(9, 19, size=2), rng.integers(4, 9)
        kind, grey = i % 4, rng.uniform(120, 255)
        if kind == 0:
            img[(abs(yy - cy) < size) & (abs(xx - cx) < size)] = grey
        elif kind == 1:
            img[(abs(yy - cy) < 2) & (abs(xx - cx) < size + 4)] = grey
        elif kind == 2:
            img[(abs(yy - cy) < size + 4) & (abs(xx - cx) < 2)] = grey
        else:
            r = np.hypot(yy - cy, xx - cx)
            img[(r < size + 1) & (r > size - 2)] = grey
    images += rng.normal(0, 10, images.shape)
    root = tmp_path_factory.mktemp("fmnist")
    _write_idx(root, np.clip(images, 0, 255))
    return str(root)


def _cfg(data_root: str, objective: str, **kw: object) -> PretrainConfig:
    base: dict[str, object] = {
        "objective": objective,
        "arch": "vit-micro-p4",
        "data_root": data_root,
        "batch_size": 32,
        "epochs": 1,
        "out_dim": 256,
        "num_local_crops": 2,
        "progress": False,
        "threads": 1,
        "warmup_frac": 0.0,
    }
    base.update(kw)
    return PretrainConfig(**base)  # type: ignore[arg-type]


def test_idx_reader_roundtrip(data_root: str) -> None:
    images = load_train_images(data_root, limit=10)
    assert images.shape == (10, 1, 28, 28) and images.dtype == torch.uint8


@pytest.mark.parametrize("objective", ["dino", "mae"])
def test_one_epoch_runs_and_loss_falls(objective: str, data_root: str, tmp_path: Path) -> None:
    # DINO: a sharp teacher (0.02) so 16 steps show the student fitting it before the centre catches up.
    kw = {"lr": 3e-3} if objective == "mae" else {"lr": 1e-3, "teacher_temp": 0.02, "momentum": 0.99}
    card = pretrain(_cfg(data_root, objective, epochs=2, scene_fraction=0.0, warmup_frac=0.2, **kw), tmp_path)
    losses = card["loss_curve"]
    assert len(losses) == 16  # 2 epochs × 256/32 steps, one point per step (< 100 steps)
    assert np.mean(losses[-4:]) < np.mean(losses[:4]), losses
    for name in ("model.safetensors", "card.json", "card.md", "loss.png", "checkpoint.pt"):
        assert (tmp_path / name).is_file(), name
    on_disk = json.loads((tmp_path / "card.json").read_text())
    assert on_disk["sha256"] == sha256_file(tmp_path / "model.safetensors")
    state = load_file(str(tmp_path / "model.safetensors"))
    assert all(v.dtype == torch.float16 for v in state.values())
    assert not any(k.startswith(("head", "decoder")) for k in state)


def test_scene_crops_match_a_per_cell_roll_loop() -> None:
    """The vectorised canvas builder equals the obvious loop (torch.roll per cell, slice per crop)."""
    images = torch.randint(0, 256, (50, 1, 28, 28), dtype=torch.uint8)
    got = scene_crops(images, 37, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)  # the same draws, in the same order, as scene_crops
    idx = torch.randint(0, 50, (37, 4), generator=gen)
    keep = torch.rand(37, 4, generator=gen) >= 0.25
    shift = torch.randint(-4, 5, (37, 4, 2), generator=gen)
    off = torch.randint(0, 29, (37, 2), generator=gen)
    want = torch.zeros(37, 1, 28, 28, dtype=torch.uint8)
    for i in range(37):
        canvas = torch.zeros(1, 56, 56, dtype=torch.uint8)
        for c in range(4):
            if keep[i, c]:
                r, col = divmod(c, 2)
                g = torch.roll(images[idx[i, c]], shifts=tuple(shift[i, c].tolist()), dims=(1, 2))
                canvas[:, 28 * r : 28 * r + 28, 28 * col : 28 * col + 28] = g
        want[i] = canvas[:, off[i, 0] : off[i, 0] + 28, off[i, 1] : off[i, 1] + 28]
    assert got.dtype == torch.uint8 and torch.equal(got, want)


def test_ema_update_is_exact() -> None:
    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    expected = [
        0.9 * t.detach().clone() + 0.1 * s.detach().clone()
        for t, s in zip(teacher.parameters(), student.parameters(), strict=True)
    ]
    before = [s.detach().clone() for s in student.parameters()]
    ema_update(teacher, student, 0.9)
    for t, e in zip(teacher.parameters(), expected, strict=True):
        torch.testing.assert_close(t, e, rtol=0, atol=1e-7)
    for s, b in zip(student.parameters(), before, strict=True):  # the student is not touched
        assert torch.equal(s, b)


@pytest.mark.parametrize(("num_patches", "ratio"), [(49, 0.75), (196, 0.75), (9, 0.5)])
def test_masking_count_is_exact(num_patches: int, ratio: float) -> None:
    gen = torch.Generator().manual_seed(0)
    keep, restore, mask = random_masking(64, num_patches, ratio, gen)
    num_keep = int(num_patches * (1 - ratio))
    assert keep.shape == (64, num_keep)
    assert torch.all(mask.sum(1) == num_patches - num_keep)
    # the kept indices are exactly the unmasked patches, and restore inverts the shuffle
    assert torch.all(torch.gather(mask, 1, keep) == 0)
    assert all(len(set(row.tolist())) == num_keep for row in keep)
    shuffled = torch.arange(num_patches).expand(64, -1).gather(1, keep)
    assert torch.equal(shuffled, keep)
    assert torch.equal(restore.argsort(1)[:, :num_keep], keep)


def test_patchify_matches_patch_order() -> None:
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8)
    p = patchify(x, 4)
    assert p.shape == (2, 4, 16)
    assert torch.equal(p[0, 1], x[0, 0, 0:4, 4:8].reshape(-1))  # second patch = top-right block


def test_dino_loss_skips_same_view_and_uses_centre() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(4 * 3, 8), torch.randn(2 * 3, 8)
    loss = dino_loss(s, t, torch.zeros(8), 2, 0.1, 0.04)
    ls = (s / 0.1).log_softmax(-1).split(3)
    tp = (t / 0.04).softmax(-1).split(3)
    pairs = [(q, v) for q in range(2) for v in range(4) if q != v]
    ref = sum((-tp[q] * ls[v]).sum(-1).mean() for q, v in pairs) / len(pairs)
    torch.testing.assert_close(loss, ref)
    # a centre shifts the teacher's targets
    assert not torch.allclose(loss, dino_loss(s, t, torch.randn(8), 2, 0.1, 0.04))


@pytest.mark.parametrize("objective", ["dino", "mae"])
def test_resume_equals_uninterrupted(objective: str, data_root: str, tmp_path: Path) -> None:
    kw = {"limit": 96, "scene_fraction": 0.5, "epochs": 2}  # 2 epochs of 3 steps; the stop falls mid-epoch 1
    full = pretrain(_cfg(data_root, objective, **kw), tmp_path / "full")
    pretrain(_cfg(data_root, objective, stop_after_steps=4, **kw), tmp_path / "split")
    split = pretrain(_cfg(data_root, objective, **kw), tmp_path / "split", resume=True)
    assert split["steps"] == full["steps"] == 6
    assert split["loss_curve"] == full["loss_curve"]
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert split["sha256"] == full["sha256"]


def test_resume_with_other_settings_fails(data_root: str, tmp_path: Path) -> None:
    pretrain(_cfg(data_root, "mae", limit=64, stop_after_steps=1), tmp_path)
    with pytest.raises(ConfigError, match=r"other settings.*mask_ratio"):
        pretrain(_cfg(data_root, "mae", limit=64, mask_ratio=0.5), tmp_path, resume=True)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"arch": "vit-nan-p4"}, SpecError, "unknown arch 'vit-nan-p4'; did you mean 'vit-nano-p4'"),
        ({"objective": "simclr"}, ConfigError, "unknown objective 'simclr'"),
        ({"data": "mnist"}, SpecError, "unknown pre-training data 'mnist'"),
        ({"mask_ratio": 1.0}, ConfigError, "mask_ratio=1.0 is outside"),
        ({"amp": "fp8"}, ConfigError, "amp='fp8'"),
        ({"batch_size": 1024}, ConfigError, "batch_size=1024 exceeds the 256 images"),
    ],
)
def test_bad_settings_fail_with_one_line(
    change: dict, error: type, match: str, data_root: str, tmp_path: Path
) -> None:
    with pytest.raises(error, match=match):
        settings = {"objective": "dino", **change}
        pretrain(_cfg(data_root, settings.pop("objective"), **settings), tmp_path)


def test_missing_data_fails(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no Fashion-MNIST files in .*expected train-images-idx3-ubyte.gz"):
        load_train_images(str(tmp_path))


def test_cli_pretrain(data_root: str, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from qkvprobe.cli import get_app

    runner = CliRunner()
    args = [
        "pretrain",
        "--objective",
        "mae",
        "--arch",
        "vit-micro-p4",
        "--data-root",
        data_root,
        "--limit",
        "64",
        "--batch-size",
        "32",
        "--epochs",
        "1",
        "--threads",
        "1",
        "--no-progress",
        "--out",
        str(tmp_path / "m"),
    ]
    result = runner.invoke(get_app(), args)
    assert result.exit_code == 0, result.output
    card = json.loads((tmp_path / "m" / "card.json").read_text())
    assert card["objective"] == "mae" and card["steps"] == 2 and card["model_kwargs"]["patch_size"] == 4
    bad = runner.invoke(get_app(), [*args[:-2], "--mask-ratio", "2", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 1
    assert "mask_ratio=2.0" in bad.output and "Traceback" not in bad.output
