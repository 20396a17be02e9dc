"""Spec strings (``timm:``, ``hf:``, ``builtin:``), the SSL checkpoints we know, objectives and suggestions."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from ..errors import SpecError

PREFIXES: tuple[str, ...] = ("timm", "hf", "builtin")

#: timm pretrained tags of self-supervised ViTs (spec → notes).
KNOWN_TIMM: dict[str, str] = {
    "vit_small_patch16_224.dino": "DINO ViT-S/16 (ImageNet-1k)",
    "vit_base_patch16_224.dino": "DINO ViT-B/16 (ImageNet-1k)",
    "vit_small_patch8_224.dino": "DINO ViT-S/8 (ImageNet-1k)",
    "vit_base_patch8_224.dino": "DINO ViT-B/8 (ImageNet-1k)",
    "vit_small_patch14_dinov2.lvd142m": "DINOv2 ViT-S/14 (LVD-142M)",
    "vit_base_patch14_dinov2.lvd142m": "DINOv2 ViT-B/14 (LVD-142M)",
    "vit_large_patch14_dinov2.lvd142m": "DINOv2 ViT-L/14 (LVD-142M)",
    "vit_giant_patch14_dinov2.lvd142m": "DINOv2 ViT-g/14 (LVD-142M)",
    "vit_small_patch14_reg4_dinov2.lvd142m": "DINOv2 ViT-S/14, 4 registers",
    "vit_base_patch14_reg4_dinov2.lvd142m": "DINOv2 ViT-B/14, 4 registers",
    "vit_large_patch14_reg4_dinov2.lvd142m": "DINOv2 ViT-L/14, 4 registers",
    "vit_giant_patch14_reg4_dinov2.lvd142m": "DINOv2 ViT-g/14, 4 registers",
    "vit_base_patch16_224.mae": "MAE ViT-B/16 (ImageNet-1k, pre-trained only)",
    "vit_large_patch16_224.mae": "MAE ViT-L/16 (ImageNet-1k, pre-trained only)",
    "vit_huge_patch14_224.mae": "MAE ViT-H/14 (ImageNet-1k, pre-trained only)",
}

#: Hugging Face repos of self-supervised ViTs (ViTModel, ViTMAEModel, Dinov2Model).
KNOWN_HF: dict[str, str] = {
    "facebook/dino-vits16": "DINO ViT-S/16 (ViTModel)",
    "facebook/dino-vits8": "DINO ViT-S/8 (ViTModel)",
    "facebook/dino-vitb16": "DINO ViT-B/16 (ViTModel)",
    "facebook/dino-vitb8": "DINO ViT-B/8 (ViTModel)",
    "facebook/vit-mae-base": "MAE ViT-B/16 (ViTMAEModel, masking off)",
    "facebook/vit-mae-large": "MAE ViT-L/16 (ViTMAEModel, masking off)",
    "facebook/vit-mae-huge": "MAE ViT-H/14 (ViTMAEModel, masking off)",
    "facebook/dinov2-small": "DINOv2 ViT-S/14 (Dinov2Model)",
    "facebook/dinov2-base": "DINOv2 ViT-B/14 (Dinov2Model)",
    "facebook/dinov2-large": "DINOv2 ViT-L/14 (Dinov2Model)",
    "facebook/dinov2-giant": "DINOv2 ViT-g/14 (Dinov2Model)",
    "facebook/dinov2-with-registers-small": "DINOv2 ViT-S/14, 4 registers (Dinov2WithRegistersModel)",
    "facebook/dinov2-with-registers-base": "DINOv2 ViT-B/14, 4 registers (Dinov2WithRegistersModel)",
}

#: Name fragments → objective family (PAPER.md §1); checked in order, so "dinov2" wins over "dino".
_FAMILIES: tuple[tuple[str, str], ...] = (
    ("dinov2", "dino"),
    ("dinov3", "dino"),
    ("dino", "dino"),
    ("ibot", "dino"),
    ("mocov3", "dino"),
    ("moco", "dino"),
    ("simmim", "mae"),
    ("data2vec", "mae"),
    ("beit", "mae"),
    ("mae", "mae"),
)


def objective_of(name: str) -> str:
    """Objective family of a model from its name/tag: ``"dino"``, ``"mae"`` or ``"unknown"``."""
    low = name.lower().replace("-", "").replace("_", "")
    for fragment, family in _FAMILIES:
        if fragment in low:
            return family
    return "unknown"


def split_spec(spec: str) -> tuple[str, str]:
    """``"timm:vit_small_patch16_224.dino"`` → ``("timm", "vit_small_patch16_224.dino")``; SpecError if malformed."""
    prefix, sep, name = str(spec).partition(":")
    if not sep or prefix not in PREFIXES or not name:
        if sep and prefix not in PREFIXES:
            hint = suggest(prefix, PREFIXES)
            raise SpecError(
                f"unknown backbone prefix {prefix!r} in {spec!r}; use one of timm:, hf:, builtin:{hint}"
            )
        guess = f"timm:{spec}" if spec in KNOWN_TIMM else f"hf:{spec}" if spec in KNOWN_HF else ""
        raise SpecError(
            f"backbone spec {spec!r} needs a prefix and a name: timm:<name>, hf:<repo or dir> or builtin:<name>"
            + (f" (did you mean {guess!r}?)" if guess else "")
        )
    return prefix, name


def suggest(name: str, candidates: Iterable[str], n: int = 3) -> str:
    """`` (did you mean a, b?)`` or ``""`` — close matches by difflib, for error messages."""
    matches = difflib.get_close_matches(name, list(dict.fromkeys(candidates)), n=n, cutoff=0.6)
    return f" (did you mean {', '.join(matches)}?)" if matches else ""
