"""The published preprocessing of each self-supervised family, for a bare architecture given ``--weights``.

``timm:vit_small_patch16_224 --weights dino_deitsmall16_pretrain.pth`` builds timm's bare architecture, whose
default pretrained cfg normalises with mean/std 0.5 — not what DINO was trained with. When the weights are
recognised (from the spec name, the weights file's name or the MoCo v3 layout: :func:`recognised_family`), the
family's own mean, std, interpolation and crop fraction replace the architecture's defaults. They are read from
timm's pretrained cfg of that family's checkpoint where timm has one (:data:`PUBLISHED`), else from the family's
official repository, which all use timm's ImageNet constants. The input size stays the built model's own.
"""

from __future__ import annotations

from typing import Any

#: name fragment → (timm pretrained tag whose cfg holds the family's preprocessing, or None; where it comes from).
#: Checked in order ("dinov2" before "dino"); names are compared without "-" and "_".
PUBLISHED: tuple[tuple[str, str | None, str], ...] = (
    ("clip", None, ""),  # image-text, not self-supervised: leave the architecture's defaults
    ("dinov2", "vit_small_patch14_dinov2.lvd142m", "DINOv2"),
    ("dinov3", "vit_small_patch16_dinov3.lvd1689m", "DINOv3"),
    ("dino", "vit_small_patch16_224.dino", "DINO"),
    ("ibot", None, "iBOT: github.com/bytedance/ibot (ImageNet mean/std, resize 256, crop 224)"),
    ("moco", None, "MoCo v3: github.com/facebookresearch/moco-v3 (ImageNet mean/std, resize 256, crop 224)"),
    ("msn", None, "MSN: github.com/facebookresearch/msn (ImageNet mean/std, resize 256, crop 224)"),
    ("jepa", None, "I-JEPA: github.com/facebookresearch/ijepa (ImageNet mean/std, resize 256, crop 224)"),
    ("aimv2", "aimv2_large_patch14_224.apple_pt", "AIMv2"),
    ("simmim", None, "SimMIM: github.com/microsoft/SimMIM (ImageNet mean/std, resize 256, crop 224)"),
    # data2vec's vision code is the BEiT code base, with BEiT's mean/std 0.5
    ("data2vec", "beit_base_patch16_224.in22k_ft_in22k", "data2vec"),
    ("beit", "beit_base_patch16_224.in22k_ft_in22k", "BEiT"),
    ("eva02", "eva02_base_patch14_224.mim_in22k", "EVA-02"),
    ("mae", "vit_base_patch16_224.mae", "MAE"),
)
#: Crop fraction of the official linear evaluations without a timm cfg: resize 256, centre crop 224.
OFFICIAL_CROP_PCT = 0.875


def recognised_family(name: str) -> str | None:
    """The :data:`PUBLISHED` fragment a spec name or weights file name contains (``"ibot"``), else None."""
    low = name.lower().replace("-", "").replace("_", "")
    return next((fragment for fragment, _, _ in PUBLISHED if fragment in low), None)


def published_config(family: str) -> tuple[dict[str, Any], str] | None:
    """``(data config keys mean/std/interpolation/crop_pct, where they come from)`` of a recognised family;
    None for a family whose defaults stand (``clip``) or an unknown one."""
    entry = next((e for e in PUBLISHED if e[0] == family), None)
    if entry is None or not entry[2]:
        return None
    _, tag, what = entry
    if tag is None:
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        config = {
            "mean": tuple(IMAGENET_DEFAULT_MEAN),
            "std": tuple(IMAGENET_DEFAULT_STD),
            "interpolation": "bicubic",
            "crop_pct": OFFICIAL_CROP_PCT,
        }
        return config, what
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(tag)
    assert cfg is not None, tag  # the tags above ship with timm (a test checks every one)
    config = {
        "mean": tuple(cfg.mean),
        "std": tuple(cfg.std),
        "interpolation": cfg.interpolation,
        "crop_pct": float(cfg.crop_pct),
    }
    return config, f"{what}: timm pretrained cfg {tag}"
