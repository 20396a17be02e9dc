"""Outputs of a run: float16 encoder weights, the model card (JSON in the built-in format + Markdown) and the
loss-curve PNG."""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..io import atomic_path, write_json, write_text
from .common import FMNIST_MEAN, FMNIST_STD, TIMM_MODEL, Objective, PretrainConfig, build_encoder


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file (the card's ``sha256``)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def curve(losses: list[float], points: int = 100) -> list[float]:
    """Losses averaged over ``ceil(len/points)``-step windows (the card's ``loss_curve``)."""
    if not losses:
        return []
    w = math.ceil(len(losses) / points)
    return [round(float(np.mean(losses[i : i + w])), 5) for i in range(0, len(losses), w)]


def hardware(device: str) -> str:
    """One line: the device and the thread count used."""
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(torch.device(device))} (CUDA)"
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu} ({os.cpu_count()} cores), {torch.get_num_threads()} torch thread(s)"


def write_outputs(
    out: Path,
    cfg: PretrainConfig,
    obj: Objective,
    losses: list[float],
    wall: float,
    step: int,
    total: int,
    steps_per_epoch: int,
    num_images: int,
    command: str,
    stopped: str | None,
) -> dict[str, Any]:
    """model.safetensors (float16 encoder, head removed), card.json, card.md and loss.png in ``out``."""
    from safetensors.torch import save_file

    enc_state = {
        k: v.detach().to("cpu", torch.float16).contiguous() for k, v in obj.encoder.state_dict().items()
    }
    model_path = out / "model.safetensors"
    with atomic_path(model_path) as tmp:
        save_file(enc_state, str(tmp))
    _, kwargs = build_encoder(cfg.arch)
    data_desc = {
        "fashion-mnist": "Fashion-MNIST train split (60 000 garments, 28×28 grey, labels unused)",
        "fashion-mnist+scenes": (
            f"Fashion-MNIST train split (labels unused); {cfg.scene_fraction:.0%} of the images are replaced by "
            "random 28×28 crops of 56×56 2×2 garment canvases (cells empty with p=0.25, ±4 px shifts) so the "
            "tokens also see garment edges, neighbours and background as in Fashion-MNIST Scenes, at the "
            "garments' native scale"
        ),
    }[cfg.data]
    card: dict[str, Any] = {
        "name": cfg.name or out.name,
        "objective": cfg.objective,
        "timm_model": TIMM_MODEL,
        "model_kwargs": kwargs,
        "data_config": {"mean": [FMNIST_MEAN], "std": [FMNIST_STD], "input_size": [1, 28, 28]},
        "sha256": sha256_file(model_path),
        "params": int(sum(v.numel() for v in enc_state.values())),
        "data": data_desc + (f"; first {num_images} images only" if cfg.limit else ""),
        "epochs": round(step / steps_per_epoch, 3),
        "epochs_planned": cfg.epochs,
        "steps": step,
        "wall_time_s": round(wall, 1),
        "throughput_img_s": round(step * cfg.batch_size / max(wall, 1e-9), 1),
        "hardware": hardware(cfg.device),
        "final_loss": round(float(np.mean(losses[-max(1, steps_per_epoch // 10) :])), 5) if losses else None,
        "command": command,
        "config": cfg.identity(),
        "stopped_early": stopped,
        "loss_curve": curve(losses),
        "loss_curve_window_steps": math.ceil(len(losses) / 100) if losses else 0,
    }
    write_json(out / "card.json", card, indent=2)
    plot_losses(losses, out / "loss.png", f"{card['name']} ({cfg.objective})")
    write_text(out / "card.md", card_markdown(card))
    return card


def plot_losses(losses: list[float], path: Path, title: str) -> None:
    """Per-step loss (faint) and its moving average."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, lw=0.5, alpha=0.4, label="step")
    w = max(1, len(losses) // 50)
    if len(losses) >= w:
        ax.plot(
            np.arange(w - 1, len(losses)), np.convolve(losses, np.ones(w) / w, "valid"), label=f"mean of {w}"
        )
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def card_markdown(card: dict[str, Any]) -> str:
    """The human-readable model card."""
    kw = card["model_kwargs"]
    lines = [
        f"# {card['name']}",
        "",
        f"Self-supervised **{card['objective'].upper()}** pre-training by qkvprobe's own code "
        f"(`qkvprobe pretrain`). Load with `qkvprobe.load_backbone('builtin:{card['name']}')`.",
        "",
        f"- Architecture: timm `{card['timm_model']}` with {json.dumps(kw)} ({card['params']:,} parameters; "
        "float16 weights, head removed)",
        f"- Data: {card['data']}",
        f"- Normalisation: mean {card['data_config']['mean']}, std {card['data_config']['std']}",
        f"- Epochs: {card['epochs']} ({card['steps']} steps, batch {card['config']['batch_size']})",
        f"- Wall time: {card['wall_time_s']} s at {card['throughput_img_s']} img/s",
        f"- Hardware: {card['hardware']}",
        f"- Final loss: {card['final_loss']}",
        f"- SHA-256 of the weights: `{card['sha256']}`",
    ]
    if card.get("stopped_early"):
        lines.append(f"- Note: {card['stopped_early']}")
    lines += ["", "Reproduce:", "", "```", card["command"], "```", ""]
    for key, title in (
        ("gpu_command", "Longer GPU run (to replace these weights)"),
        ("quality_command", "Quality check"),
    ):
        if card.get(key):
            lines += [f"{title}:", "", "```", card[key], "```", ""]
    if card.get("quality"):
        lines += [
            "## Quality (Fashion-MNIST test, standard classification)",
            "",
            card.get("quality_protocol", ""),
            "",
            "| block | token | position | rule | accuracy |",
            "|---|---|---|---|---|",
        ]
        for r in card["quality"]:
            lines.append(
                f"| {r['block']} | {r['token']} | {r['position']} | {r['rule']} | {r['accuracy']:.4f} |"
            )
        lines.append("")
    if card.get("notes"):
        lines += ["## Notes", "", card["notes"], ""]
    lines += ["## Loss curve", "", f"![loss]({card['name']}_loss.png)", ""]
    return "\n".join(lines)
