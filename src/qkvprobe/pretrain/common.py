"""Shared pieces of pre-training: the run config and its validation, encoder presets, Fashion-MNIST
training images (+ scene-canvas crops), schedules, checkpoints and the objective interface.

Library choice: ``lightly`` has DINO and MAE components, but installing it pulls pytorch-lightning,
hydra-core, omegaconf, aiohttp and seven more packages (checked with ``pip install --dry-run`` against
torch 2.14.1) for roughly 150 lines we need: a DINO head + centred loss, an EMA update, MAE masking and a
light decoder. We write those few pieces here (`dino.py`, `mae.py`) and use timm for the encoder and its
blocks, torch for optimisation, and matplotlib for the curve.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, SpecError, StoreError
from ..io import atomic_path

FMNIST_MEAN = 0.2860
FMNIST_STD = 0.3530
TIMM_MODEL = "vit_tiny_patch16_224"

# Encoder presets: timm VisionTransformer kwargs on top of TIMM_MODEL (patch 4, grey, dynamic size).
ARCHS: dict[str, dict[str, int]] = {
    "vit-micro-p4": {"embed_dim": 32, "depth": 2, "num_heads": 2},  # tests only
    "vit-nano-p4": {"embed_dim": 128, "depth": 6, "num_heads": 4},
    "vit-tiny-p4": {"embed_dim": 192, "depth": 6, "num_heads": 3},
}
DATASETS = ("fashion-mnist", "fashion-mnist+scenes")


@dataclasses.dataclass
class PretrainConfig:
    """Everything that determines a run; a resumed run must match it (except the stopping knobs)."""

    objective: str = "dino"
    data: str = "fashion-mnist+scenes"
    data_root: str | None = None
    arch: str = "vit-tiny-p4"
    epochs: int = 10
    batch_size: int = 256
    lr: float | None = None  # None: objective's base lr × batch/256
    weight_decay: float | None = None
    warmup_frac: float = 0.1
    seed: int = 0
    limit: int | None = None  # use only the first N training images (tests, quick runs)
    scene_fraction: float = 0.2  # share of images that are 28 px crops of 56 px 2×2 garment canvases
    # DINO
    num_local_crops: int = 6
    local_size: int = 12
    out_dim: int = 2048
    teacher_temp: float = 0.04
    student_temp: float = 0.1
    momentum: float = 0.996
    center_momentum: float = 0.9
    # MAE
    mask_ratio: float = 0.75
    decoder_dim: int = 128
    decoder_depth: int = 2
    # stopping / housekeeping (not part of the run's identity)
    name: str | None = None
    device: str = "cpu"
    amp: str | None = None
    threads: int | None = None
    time_budget_min: float | None = None
    stop_after_steps: int | None = None
    progress: bool = True

    IDENTITY_EXCLUDE = ("name", "device", "amp", "threads", "time_budget_min", "stop_after_steps", "progress")

    def identity(self) -> dict[str, Any]:
        """The fields a resumed run must share with the checkpoint."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.IDENTITY_EXCLUDE}


def validate(cfg: PretrainConfig) -> None:
    """Fail early, with one line naming the bad value and the fix."""
    if cfg.objective not in ("dino", "mae"):
        raise ConfigError(f"unknown objective {cfg.objective!r}; use 'dino' or 'mae'")
    if cfg.arch not in ARCHS:
        near = difflib.get_close_matches(cfg.arch, ARCHS, n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise SpecError(f"unknown arch {cfg.arch!r}; {hint}choose one of {sorted(ARCHS)}")
    if cfg.data not in DATASETS:
        raise SpecError(f"unknown pre-training data {cfg.data!r}; choose one of {list(DATASETS)}")
    if cfg.epochs < 1 or cfg.batch_size < 2:
        raise ConfigError(
            f"epochs={cfg.epochs}, batch_size={cfg.batch_size}; need epochs >= 1 and batch >= 2"
        )
    if not 0.0 < cfg.mask_ratio < 1.0:
        raise ConfigError(f"mask_ratio={cfg.mask_ratio} is outside (0, 1); use e.g. 0.75")
    if not 0.0 <= cfg.scene_fraction <= 1.0:
        raise ConfigError(f"scene_fraction={cfg.scene_fraction} is outside [0, 1]")
    if cfg.amp not in (None, "bf16"):
        raise ConfigError(f"amp={cfg.amp!r}; use 'bf16' or leave it out")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={cfg.device!r} but CUDA is not available; use --device cpu")


def build_encoder(arch: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A timm VisionTransformer (so the taps are the same as for real checkpoints) and its create kwargs."""
    import timm

    kwargs: dict[str, Any] = {
        "img_size": 28,
        "patch_size": 4,
        "in_chans": 1,
        **ARCHS[arch],
        "dynamic_img_size": True,
        "num_classes": 0,
    }
    return timm.create_model(TIMM_MODEL, pretrained=False, **kwargs), kwargs


# ----------------------------------------------------------------------------------------------- data
def load_train_images(root: str | None = None, limit: int | None = None) -> torch.Tensor:
    """Fashion-MNIST train images as uint8 ``[N, 1, 28, 28]`` (first ``limit`` if given), found the way the
    ``fashion-mnist`` dataset finds them (``root``, ``$QKVPROBE_DATA``, the Debian package, the download, the
    bundled subset; ``qkvprobe.data.fashion_mnist.locate``)."""
    from ..data.fashion_mnist import load_split, locate

    images, _, _ = load_split(locate(root), "train")
    return torch.from_numpy(np.array(images[:limit]))[:, None]


def scene_crops(images: torch.Tensor, num: int, gen: torch.Generator) -> torch.Tensor:
    """``num`` random 28×28 crops of 56×56 canvases of 2×2 cells (garment with a ±4 px shift, or empty).

    Why: the scenes put garments at native scale next to other garments and empty cells; crops of such
    canvases teach the patch tokens about partial garments, edges between cells and background, while the
    encoder keeps one input size per batch. uint8 in, uint8 ``[num, 1, 28, 28]`` out.
    """
    idx = torch.randint(0, len(images), (num, 4), generator=gen)
    keep = torch.rand(num, 4, generator=gen) >= 0.25
    shift = torch.randint(-4, 5, (num, 4, 2), generator=gen)
    off = torch.randint(0, 29, (num, 2), generator=gen)
    # Vectorised (index arithmetic instead of a per-cell torch.roll loop): at GPU batch sizes the loop cost
    # more CPU time per step than the training step itself. Same draws, same pixels as the loop.
    ar = torch.arange(28)
    n4 = num * 4
    rows = (ar[None] - shift[..., 0].reshape(n4, 1)) % 28  # torch.roll: out[y] = in[(y - s) mod 28]
    cols = (ar[None] - shift[..., 1].reshape(n4, 1)) % 28
    cells = images[idx.reshape(n4), 0][torch.arange(n4)[:, None, None], rows[:, :, None], cols[:, None, :]]
    cells = cells * keep.reshape(n4, 1, 1).to(torch.uint8)
    canvas = cells.reshape(num, 2, 2, 28, 28).permute(0, 1, 3, 2, 4).reshape(num, 56, 56)
    r = off[:, :1] + ar[None]
    c = off[:, 1:] + ar[None]
    return canvas[torch.arange(num)[:, None, None], r[:, :, None], c[:, None, :]].unsqueeze(1)


def make_batch(
    images: torch.Tensor, idx: torch.Tensor, cfg: PretrainConfig, gen: torch.Generator
) -> torch.Tensor:
    """Float ``[B, 1, 28, 28]`` in [0, 1]: garments, a ``scene_fraction`` of them replaced by scene crops."""
    batch = images[idx].clone()
    if cfg.data == "fashion-mnist+scenes" and cfg.scene_fraction > 0:
        swap = torch.rand(len(idx), generator=gen) < cfg.scene_fraction
        if swap.any():
            batch[swap] = scene_crops(images, int(swap.sum()), gen)
    return batch.float().div_(255.0)


# ----------------------------------------------------------------------------------------- schedules
def cosine(step: float, total: int, start: float, end: float, warmup: int = 0) -> float:
    """Linear warm-up from 0 to ``start`` over ``warmup`` steps, then cosine from ``start`` to ``end``."""
    if step < warmup:
        return start * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * min(1.0, t)))


# --------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically (:func:`qkvprobe.io.atomic_path`) so a kill never leaves a half checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (plain tensors, numbers, strings, lists, dicts)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt or foreign file: say which and how to recover
        raise StoreError(
            f"cannot read checkpoint {path} ({type(exc).__name__}); delete it or drop --resume"
        ) from None


class Objective:
    """What the loop needs from DINO or MAE: modules, one training step, and per-step schedules."""

    modules: torch.nn.ModuleDict  # trained + EMA parts; saved in checkpoints
    encoder: torch.nn.Module  # the timm ViT exported at the end

    def parameters(self) -> list[torch.nn.Parameter]:
        raise NotImplementedError

    def step(self, x: torch.Tensor, gen: torch.Generator, it: float, total: int) -> torch.Tensor:
        """Loss of one batch ``x`` ([B,1,28,28] in [0,1]); the loop does backward + optimiser step."""
        raise NotImplementedError

    def after_step(self, it: float, total: int) -> None:
        """Hook after the optimiser step (EMA teacher update)."""

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        pass
