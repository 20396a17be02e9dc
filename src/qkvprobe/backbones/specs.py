"""Spec strings (``timm:``, ``hf:``, ``builtin:``), the SSL checkpoints we know, objectives and suggestions."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from ..errors import SpecError

PREFIXES: tuple[str, ...] = ("timm", "hf", "builtin")

#: timm pretrained tags of self-supervised ViTs (spec → short notes; ``qkvprobe models`` lists them).
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
    "vit_small_patch16_dinov3.lvd1689m": "DINOv3 ViT-S/16, 4 registers, rotary",
    "vit_small_plus_patch16_dinov3.lvd1689m": "DINOv3 ViT-S+/16, 4 registers, rotary",
    "vit_base_patch16_dinov3.lvd1689m": "DINOv3 ViT-B/16, 4 registers, rotary",
    "vit_large_patch16_dinov3.lvd1689m": "DINOv3 ViT-L/16, 4 registers, rotary",
    "vit_huge_plus_patch16_dinov3.lvd1689m": "DINOv3 ViT-H+/16, 4 registers, rotary",
    "vit_7b_patch16_dinov3.lvd1689m": "DINOv3 ViT-7B/16, 4 registers, rotary",
    "vit_large_patch16_dinov3.sat493m": "DINOv3 ViT-L/16, satellite images",
    "vit_small_patch16_dinov3_qkvb.lvd1689m": "DINOv3 ViT-S/16, q/v biases as params",
    "vit_base_patch16_dinov3_qkvb.lvd1689m": "DINOv3 ViT-B/16, q/v biases as params",
    "vit_base_patch16_224.mae": "MAE ViT-B/16 (ImageNet-1k)",
    "vit_large_patch16_224.mae": "MAE ViT-L/16 (ImageNet-1k)",
    "vit_huge_patch14_224.mae": "MAE ViT-H/14 (ImageNet-1k)",
    "eva02_tiny_patch14_224.mim_in22k": "EVA-02 Ti/14 MIM (ImageNet-22k)",
    "eva02_small_patch14_224.mim_in22k": "EVA-02 S/14 MIM (ImageNet-22k)",
    "eva02_base_patch14_224.mim_in22k": "EVA-02 B/14 MIM (ImageNet-22k)",
    "eva02_large_patch14_224.mim_in22k": "EVA-02 L/14 MIM (ImageNet-22k)",
    "eva02_large_patch14_224.mim_m38m": "EVA-02 L/14 MIM (Merged-38M)",
    "beit_base_patch16_224.in22k_ft_in22k": "BEiT-B/16, fine-tuned on IN-22k labels",
    "beit_large_patch16_224.in22k_ft_in22k": "BEiT-L/16, fine-tuned on IN-22k labels",
    "beitv2_base_patch16_224.in1k_ft_in22k": "BEiT v2-B/16, fine-tuned on IN-22k labels",
    "aimv2_large_patch14_224.apple_pt": "AIMv2 L/14, no class token",
    "aimv2_huge_patch14_224.apple_pt": "AIMv2 H/14, no class token",
    "aimv2_1b_patch14_224.apple_pt": "AIMv2 1B/14, no class token",
}

#: Hugging Face repos of self-supervised ViTs (repo → short notes).
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
    "facebook/dinov2-with-registers-small": "DINOv2 ViT-S/14, 4 registers",
    "facebook/dinov2-with-registers-base": "DINOv2 ViT-B/14, 4 registers",
    "facebook/dinov3-vits16-pretrain-lvd1689m": "DINOv3 ViT-S/16 (DINOv3ViTModel, gated)",
    "facebook/dinov3-vitb16-pretrain-lvd1689m": "DINOv3 ViT-B/16 (DINOv3ViTModel, gated)",
    "facebook/dinov3-vitl16-pretrain-lvd1689m": "DINOv3 ViT-L/16 (DINOv3ViTModel, gated)",
    "microsoft/beit-base-patch16-224-pt22k": "BEiT-B/16 MIM only (BeitModel)",
    "microsoft/beit-large-patch16-224-pt22k": "BEiT-L/16 MIM only (BeitModel)",
    "facebook/data2vec-vision-base": "data2vec ViT-B/16 (Data2VecVisionModel)",
    "facebook/data2vec-vision-large": "data2vec ViT-L/16 (Data2VecVisionModel)",
    "facebook/vit-msn-small": "MSN ViT-S/16 (ViTMSNModel)",
    "facebook/vit-msn-base": "MSN ViT-B/16 (ViTMSNModel)",
    "facebook/vit-msn-large": "MSN ViT-L/16 (ViTMSNModel)",
    "facebook/ijepa_vith14_1k": "I-JEPA ViT-H/14, no class token",
    "facebook/ijepa_vith16_1k": "I-JEPA ViT-H/16, no class token",
    "facebook/ijepa_vitg16_22k": "I-JEPA ViT-g/16 (IN-22k), no class token",
}

#: Longer notes for ``qkvprobe models --long`` (spec → text).
DETAILS: dict[str, str] = {
    "timm:beit_base_patch16_224.in22k_ft_in22k": (
        "timm's BEiT weights were fine-tuned with labels after MIM pre-training; for the self-supervised weights "
        "use hf:microsoft/beit-base-patch16-224-pt22k, or timm:beit_base_patch16_224 --weights "
        "beit_base_patch16_224_pt22k.pth (the official file; its shared relative position bias is copied into "
        "every block and its final norm becomes fc_norm)"
    ),
    "timm:vit_base_patch16_dinov3.lvd1689m": (
        "q/k are taken after q/k norm and before the rotary embedding; q_rope/k_rope give them after it. "
        "The official checkpoint (dinov3_vitb16_pretrain_lvd1689m-*.pth) loads with --weights"
    ),
    "timm:eva02_base_patch14_224.mim_in22k": (
        "normalises after pooling: ffn_norm applies fc_norm (the pre-training checkpoint's final norm) to every "
        "token. The official eva02_B_pt_in21k_p14.pt ({'module': ...}) loads with --weights"
    ),
    "hf:facebook/ijepa_vith14_1k": (
        "no class token: positions avg and patch only (cls is refused); no ViT-B I-JEPA was released"
    ),
    "hf:facebook/data2vec-vision-base": (
        "normalises after pooling: ffn_norm applies pooler.layernorm to every token (newly initialised, weight 1 "
        "and bias 0, when the checkpoint holds none; transformers and qkvprobe then say so)"
    ),
}

#: Name fragments → objective (``vocab.OBJECTIVES``); checked in order, so "clip" (image-text, not
#: self-supervised) wins over "eva02" and "dinov2" over "dino". Names are compared without "-" and "_".
_OBJECTIVE_FRAGMENTS: tuple[tuple[str, str], ...] = (
    ("clip", "unknown"),
    ("dinov2", "dino"),
    ("dinov3", "dino"),
    ("dino", "dino"),
    ("ibot", "dino"),
    ("moco", "dino"),
    ("msn", "msn"),
    ("jepa", "jepa"),
    ("aimv2", "aim"),
    ("simmim", "mim"),
    ("data2vec", "mim"),
    ("beit", "mim"),
    ("eva02", "mim"),
    ("mae", "mae"),
)


def objective_of(name: str) -> str:
    """Pre-training objective of a model from its name/tag (``vocab.OBJECTIVES``), ``"unknown"`` when unclear.

    DINO/DINOv2/DINOv3/iBOT/MoCo → ``dino``, MSN → ``msn``, MAE → ``mae``, BEiT/EVA-02/data2vec/SimMIM → ``mim``,
    I-JEPA → ``jepa``, AIMv2 → ``aim``.
    """
    low = name.lower().replace("-", "").replace("_", "")
    for fragment, objective in _OBJECTIVE_FRAGMENTS:
        if fragment in low:
            return objective
    return "unknown"


def objective_with_weights(name: str, weights: object | None, note: str = "") -> str:
    """Objective from the spec name; for a bare architecture (``"unknown"``) from the weights file's name or,
    for MoCo v3, from its checkpoint layout (``note`` is what the weights loader did)."""
    objective = objective_of(name)
    if objective != "unknown" or weights is None:
        return objective
    if "MoCo v3" in note:
        return "dino"
    return objective_of(str(weights).replace("\\", "/").rsplit("/", 1)[-1])


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
