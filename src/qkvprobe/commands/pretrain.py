"""``qkvprobe pretrain``: DINO-style or MAE pre-training of a small timm ViT on Fashion-MNIST data."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer

from ._args import DEVICE_HELP, device, one_of


def pretrain_cmd(
    objective: str = typer.Option(..., help="dino | mae"),
    out: Path = typer.Option(
        ..., help="Output folder: checkpoint.pt, model.safetensors, card.json/md, loss.png."
    ),
    data: str = typer.Option(
        "fashion-mnist+scenes", help="fashion-mnist | fashion-mnist+scenes (garments + scene crops)."
    ),
    data_root: str | None = typer.Option(None, help="Folder with the Fashion-MNIST *-ubyte.gz files."),
    arch: str = typer.Option(
        "vit-tiny-p4", help="vit-nano-p4 (128-d) | vit-tiny-p4 (192-d); 6 blocks, patch 4."
    ),
    epochs: int = typer.Option(10, help="Epochs (the schedules span them)."),
    batch_size: int = typer.Option(256, help="Images per step."),
    lr: float | None = typer.Option(None, help="Peak learning rate (default: base lr × batch/256)."),
    seed: int = typer.Option(0, help="Seed for init, data order, augmentation and masking."),
    limit: int | None = typer.Option(None, help="Use only the first N training images."),
    scene_fraction: float = typer.Option(
        0.2, help="Share of images replaced by crops of 2×2 garment canvases."
    ),
    num_local_crops: int = typer.Option(6, help="DINO: local crops per image."),
    local_size: int = typer.Option(12, help="DINO: local crop size in pixels."),
    out_dim: int = typer.Option(2048, help="DINO: prototypes of the head."),
    teacher_temp: float = typer.Option(0.04, help="DINO: teacher temperature (sharpening)."),
    momentum: float = typer.Option(0.996, help="DINO: initial EMA momentum (cosine to 1)."),
    mask_ratio: float = typer.Option(0.75, help="MAE: share of patches masked (exact count per image)."),
    name: str | None = typer.Option(None, help="Model name written in the card (default: the folder name)."),
    device_: str = typer.Option("cpu", "--device", help=f"{DEVICE_HELP}."),
    amp: str | None = typer.Option(None, help="bf16 for autocast (CUDA)."),
    threads: int | None = typer.Option(None, help="torch CPU threads."),
    time_budget_min: float | None = typer.Option(
        None, help="Stop (checkpoint + export) after this many minutes."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue exactly from OUT/checkpoint.pt."),
    progress: bool = typer.Option(True, help="Progress bar (log lines when not on a terminal)."),
) -> None:
    """Self-supervised pre-training (DINO or MAE) of a timm ViT; writes a built-in-format model card."""
    from ..pretrain import ARCHS, DATASETS, PretrainConfig, pretrain

    one_of(objective, name="--objective", what="objective", allowed=("dino", "mae"))
    one_of(data, name="--data", what="pre-training data", allowed=DATASETS)
    one_of(arch, name="--arch", what="arch", allowed=tuple(ARCHS))
    if amp is not None:
        one_of(amp, name="--amp", what="amp mode", allowed=("bf16",))
    device(device_)
    cfg = PretrainConfig(
        objective=objective,
        data=data,
        data_root=data_root,
        arch=arch,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        limit=limit,
        scene_fraction=scene_fraction,
        num_local_crops=num_local_crops,
        local_size=local_size,
        out_dim=out_dim,
        teacher_temp=teacher_temp,
        momentum=momentum,
        mask_ratio=mask_ratio,
        name=name,
        device=device_,
        amp=amp,
        threads=threads,
        time_budget_min=time_budget_min,
        progress=progress,
    )
    command = "qkvprobe pretrain " + shlex.join(
        sys.argv[2:] if sys.argv[1:2] == ["pretrain"] else sys.argv[1:]
    )
    card = pretrain(cfg, out, resume=resume, command=command)
    typer.echo(f"wrote {out}/model.safetensors ({card['params']:,} params, final loss {card['final_loss']})")
