"""DINO-style and MAE pre-training of small timm ViTs (``qkvprobe pretrain``; the built-in models)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import ARCHS, DATASETS, PretrainConfig

__all__ = ["ARCHS", "DATASETS", "PretrainConfig", "pretrain"]

# Objective defaults: (base lr per 256 images, weight decay start/end, AdamW betas). DINO's and MAE's papers.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "dino": {"base_lr": 5e-4, "wd": (0.04, 0.4), "betas": (0.9, 0.999), "clip": 3.0},
    "mae": {"base_lr": 1e-3, "wd": (0.05, 0.05), "betas": (0.9, 0.95), "clip": None},
}


def pretrain(
    cfg: PretrainConfig, out: str | Path, *, resume: bool = False, command: str = ""
) -> dict[str, Any]:
    """Pre-train (or resume) into ``out``; returns the model card written there (card.json)."""
    from .common import validate
    from .loop import train

    validate(cfg)
    if cfg.objective == "dino":
        from .dino import DINO as make
    else:
        from .mae import MAE as make
    return train(cfg, Path(out), make, resume=resume, command=command, **_DEFAULTS[cfg.objective])
