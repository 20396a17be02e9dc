"""Backbones: load a frozen ViT from a spec string and list the models we know (CONTRACTS.md, Backbones).

Specs: ``timm:<name>`` (pretrained tags allowed), ``hf:<repo id or local dir>``, ``builtin:<name>``; any of them
takes ``weights=PATH`` (safetensors or a torch state dict) instead of its default weights. Loaders are imported
lazily so ``import qkvprobe.backbones`` stays cheap and free of import cycles with :mod:`qkvprobe.taps`.
"""

from __future__ import annotations

import json
from pathlib import Path

from .base import Backbone
from .specs import KNOWN_HF, KNOWN_TIMM, objective_of, split_spec

__all__ = ["Backbone", "builtin_dir", "list_models", "load_backbone"]


def builtin_dir() -> Path:
    """Directory of the built-in model cards and weights (tests monkeypatch this function)."""
    return Path(__file__).resolve().parent / "builtin"


def load_backbone(spec: str, weights: str | Path | None = None, device: str = "cpu") -> Backbone:
    """Load a backbone in eval mode, frozen, on ``device``.

    Raises:
        SpecError: unknown prefix / name (with close matches). WeightsError: weights cannot be fetched, read,
        verified or do not fit. ModelError: an architecture whose tokens cannot be tapped.
    """
    prefix, name = split_spec(spec)
    if prefix == "timm":
        from .timm_backbone import load_timm

        return load_timm(name, weights, device)
    if prefix == "hf":
        from .hf_backbone import load_hf

        return load_hf(name, weights, device)
    from .timm_backbone import load_builtin

    return load_builtin(builtin_dir(), name, weights, device)


def list_models() -> list[dict[str, str]]:
    """Built-in models and the timm / Hugging Face SSL checkpoints we know: ``[{spec, objective, notes}]``."""
    rows: list[dict[str, str]] = []
    directory = builtin_dir()
    for card_path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            card = json.loads(card_path.read_text())
        except (OSError, ValueError):
            card = {}
        facts = [f"{card[k]} {k}" for k in ("params", "epochs") if k in card]
        notes = ", ".join([f"built-in, {card.get('data', '?')}", *facts])
        rows.append(
            {
                "spec": f"builtin:{card_path.stem}",
                "objective": str(card.get("objective", "unknown")),
                "notes": notes,
            }
        )
    rows += [
        {"spec": f"timm:{n}", "objective": objective_of(n), "notes": note} for n, note in KNOWN_TIMM.items()
    ]
    rows += [{"spec": f"hf:{n}", "objective": objective_of(n), "notes": note} for n, note in KNOWN_HF.items()]
    return rows
