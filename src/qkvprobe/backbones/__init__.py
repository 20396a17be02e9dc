"""Backbones: load a frozen ViT from a spec string and list the models we know (CONTRACTS.md, Backbones).

Specs: ``timm:<name>`` (pretrained tags allowed), ``hf:<repo id or local dir>``, ``builtin:<name>``; any of them
takes ``weights=PATH`` (safetensors or a torch state dict) instead of its default weights. Loaders are imported
lazily so ``import qkvprobe.backbones`` stays cheap and free of import cycles with :mod:`qkvprobe.taps`.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..vocab import objective_family
from .base import Backbone
from .specs import DETAILS, KNOWN_HF, KNOWN_TIMM, objective_of, split_spec

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
    """Built-in models and the timm / Hugging Face SSL checkpoints we know.

    Returns:
        ``[{spec, objective, family, notes, details}]``: ``family`` is ``vocab.objective_family(objective)``,
        ``notes`` a short line, ``details`` longer text (may be empty).
    """
    rows: list[dict[str, str]] = []
    directory = builtin_dir()
    for card_path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            card = json.loads(card_path.read_text())
        except (OSError, ValueError):
            card = {}
        facts = [f"{card['params'] / 1e6:.1f}M params" if isinstance(card.get("params"), int | float) else ""]
        if isinstance(card.get("epochs"), int | float):
            facts.append(f"{card['epochs']:.0f} epochs")
        data = str(card.get("data", "?"))
        short_data = data.split(" (")[0].split(";")[0].strip()
        objective = str(card.get("objective", "unknown"))
        details = "; ".join(
            f"{key}: {card[key]}"
            for key in ("data", "hardware", "command")
            if card.get(key) not in (None, "")
        )
        rows.append(
            {
                "spec": f"builtin:{card_path.stem}",
                "objective": objective,
                "family": objective_family(objective),
                "notes": ", ".join(["built-in", short_data, *[f for f in facts if f]]),
                "details": details,
            }
        )
    known = [(f"timm:{n}", note) for n, note in KNOWN_TIMM.items()] + [
        (f"hf:{n}", note) for n, note in KNOWN_HF.items()
    ]
    for spec, note in known:
        objective = objective_of(spec.split(":", 1)[1])
        rows.append(
            {
                "spec": spec,
                "objective": objective,
                "family": objective_family(objective),
                "notes": note,
                "details": DETAILS.get(spec, ""),
            }
        )
    return rows
