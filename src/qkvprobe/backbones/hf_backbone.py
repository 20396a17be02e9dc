"""Hugging Face backbones (``hf:<repo id or local dir>``): ViTModel, ViTMAEModel (masking off), Dinov2Model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelError, SpecError, WeightsError
from ..taps import HookedBackbone, TapSite, first_output
from .specs import KNOWN_HF, objective_of, suggest
from .weights import load_weights, state_dict_digest

SUPPORTED_TYPES: tuple[str, ...] = ("vit", "vit_mae", "dinov2", "dinov2_with_registers")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_PIL_INTERPOLATION = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


def _find(module: nn.Module, *paths: str) -> nn.Module | None:
    """The first attribute path (dotted) that exists on ``module``; covers transformers 4.x and 5.x names."""
    for path in paths:
        obj: Any = module
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None:
            return obj
    return None


def _data_config(source: str, config: Any) -> dict[str, Any]:
    """timm-style data config from the repo's preprocessor_config.json, else ImageNet defaults."""
    size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    out: dict[str, Any] = {
        "input_size": (int(config.num_channels), int(size), int(size)),
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "interpolation": "bicubic",
        "crop_pct": 1.0,
    }
    try:
        from transformers.utils import cached_file

        path = cached_file(source, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
        proc = json.loads(Path(path).read_text()) if path else {}
    except Exception:  # offline / absent: the defaults above stand
        proc = {}
    if "image_mean" in proc and "image_std" in proc:
        out["mean"], out["std"] = tuple(proc["image_mean"]), tuple(proc["image_std"])
    out["interpolation"] = _PIL_INTERPOLATION.get(proc.get("resample"), out["interpolation"])
    crop, resize = proc.get("crop_size") or {}, proc.get("size") or {}
    crop_side = crop.get("height") if isinstance(crop, dict) else crop
    short = resize.get("shortest_edge") if isinstance(resize, dict) else resize
    if proc.get("do_center_crop") and crop_side and short:
        out["crop_pct"] = float(crop_side) / float(short)
    return out


class HfBackbone(HookedBackbone):
    """A transformers ViT: q/k/v from the attention's q/k/v projections, ffn = layer output, final = layernorm."""

    def __init__(
        self, model: nn.Module, *, spec: str, source: str, device: str | torch.device, weights_info: str = ""
    ) -> None:
        config = model.config
        if config.model_type not in SUPPORTED_TYPES:
            raise ModelError(
                f"{spec} is a {config.model_type!r} model; qkvprobe taps Hugging Face {', '.join(SUPPORTED_TYPES)}"
            )
        if getattr(model, "pooler", None) is not None:
            model.pooler = None  # the pooler is a head: not part of the features
        self.layers = _find(model, "layers", "encoder.layer", "encoder.layers")
        self.norm = _find(model, "layernorm", "norm")
        if self.layers is None or self.norm is None:
            raise ModelError(
                f"{spec}: cannot find the transformer layers / final layernorm of {type(model).__name__}"
            )
        self.spec = spec
        self.objective = objective_of(f"{source} {config.model_type}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.model_type = config.model_type
        self.embed_dim = int(config.hidden_size)
        self.num_blocks = len(self.layers)
        self.num_heads = int(config.num_attention_heads)
        patch = config.patch_size
        self.patch_size = int(patch if isinstance(patch, int) else patch[0])
        self.in_chans = int(config.num_channels)
        self.num_register_tokens = int(getattr(config, "num_register_tokens", 0) or 0)
        self.num_prefix_tokens = 1 + self.num_register_tokens
        self.has_cls_token = True
        self.data_config = _data_config(source, config)
        self.weights_info = weights_info
        self.weights_digest = state_dict_digest(self.model.state_dict())
        for i in range(self.num_blocks):
            self.tap_site(i)  # fail at load time, not at the first batch

    def tap_site(self, block: int) -> TapSite:
        layer = self.layers[block]
        attn = _find(layer, "attention")
        q = _find(attn, "q_proj", "attention.query", "query")
        k = _find(attn, "k_proj", "attention.key", "key")
        v = _find(attn, "v_proj", "attention.value", "value")
        if q is None or k is None or v is None:
            raise ModelError(
                f"{self.spec}: layer {block} has no q/k/v projections to tap ({type(attn).__name__})"
            )
        return TapSite(block=layer, q=(q, first_output), k=(k, first_output), v=(v, first_output))

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)

    def run(self, images: torch.Tensor) -> Any:
        kwargs: dict[str, Any] = {}
        if self.model_type in ("vit", "vit_mae"):
            kwargs["interpolate_pos_encoding"] = True
        if self.model_type == "vit_mae":
            # mask_ratio is 0 and sorted noise makes the "shuffle" the identity: every patch, in order, every call.
            num_patches = (images.shape[2] // self.patch_size) * (images.shape[3] // self.patch_size)
            noise = torch.arange(num_patches, device=images.device, dtype=torch.float32)
            kwargs["noise"] = noise.expand(images.shape[0], -1)
        return self.model(pixel_values=images, **kwargs)


def load_hf(source: str, weights: str | Path | None, device: str) -> HfBackbone:
    """``hf:<repo id or dir>``: AutoModel weights, or the architecture from AutoConfig + a local weights file."""
    from transformers import AutoConfig, AutoModel

    label = f"hf:{source}"
    local = Path(source).expanduser()
    if local.is_dir() and not (local / "config.json").is_file():
        raise SpecError(
            f"{label}: directory {local} has no config.json; pass a saved transformers model directory"
        )
    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as exc:  # offline, unknown repo, malformed id: hub errors vary
        hint = suggest(source, KNOWN_HF)
        if source not in KNOWN_HF and hint:
            raise SpecError(f"unknown Hugging Face model {source!r}{hint}") from exc
        raise WeightsError(
            f"could not fetch the config of {label} ({type(exc).__name__}); download it once with internet "
            "access (or pass a local directory) and/or pass --weights PATH"
        ) from exc
    if config.model_type not in SUPPORTED_TYPES:
        raise ModelError(
            f"{label} is a {config.model_type!r} model; qkvprobe taps {', '.join(SUPPORTED_TYPES)}"
        )
    if config.model_type == "vit_mae":
        config.mask_ratio = 0.0  # keep every patch
    if weights is None:
        try:
            model = AutoModel.from_pretrained(source, config=config)
        except Exception as exc:
            raise WeightsError(
                f"could not fetch the weights of {label} ({type(exc).__name__}); download them once or pass "
                "--weights PATH"
            ) from exc
        info = f"transformers from_pretrained({source})"
    else:
        model = AutoModel.from_config(config)
        if getattr(model, "pooler", None) is not None:
            model.pooler = None  # a head: neither in the features nor expected in the file
        prefixes = [f"{model.base_model_prefix}."] if getattr(model, "base_model_prefix", "") else []
        info = load_weights(model, weights, label=label, strip=prefixes)
    return HfBackbone(model, spec=label, source=source, device=device, weights_info=info)
