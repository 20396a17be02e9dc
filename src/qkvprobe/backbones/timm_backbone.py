"""timm VisionTransformer backbones (``timm:<name>`` and the ``builtin:`` models, which are timm ViTs)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelError, SpecError, WeightsError
from ..taps import HookedBackbone, TapSite, heads_to_tokens
from .specs import KNOWN_TIMM, objective_of, suggest
from .weights import load_weights, sha256_file, state_dict_digest


def _v_reader(attn_dim: int):
    """qkv output [B, T, 3*A] → v [B, T, A] (a copy, so the fused qkv buffer is not kept alive)."""

    def read(out: torch.Tensor) -> torch.Tensor:
        return out[..., 2 * attn_dim :].contiguous()

    return read


def check_tappable(model: nn.Module, label: str) -> None:
    """Refuse (ModelError) a timm model whose blocks we cannot tap, naming what is missing."""
    from timm.layers import Attention

    name = type(model).__name__
    blocks = getattr(model, "blocks", None)
    if name == "Eva" or (
        blocks is not None and len(blocks) and "rope" in type(blocks[0].attn).__name__.lower()
    ):
        raise ModelError(
            f"{label} is a rotary-embedding model (timm {name}, e.g. DINOv3/EVA-02): its attention applies rope "
            "and may project q/k/v with F.linear inside forward, so no module exposes pre-rotary q/k and v for a "
            "hook; use a DINO/DINOv2/MAE VisionTransformer (see `qkvprobe models`)"
        )
    missing = [
        a
        for a in ("patch_embed", "blocks", "norm", "num_prefix_tokens", "forward_features")
        if not hasattr(model, a)
    ]
    if missing:
        raise ModelError(
            f"{label} (timm {name}) is not a ViT qkvprobe can tap: it lacks {', '.join(missing)}; use a timm "
            "VisionTransformer (see `qkvprobe models`)"
        )
    for i, blk in enumerate(model.blocks):
        attn = getattr(blk, "attn", None)
        if not isinstance(attn, Attention) or not isinstance(getattr(attn, "qkv", None), nn.Linear):
            raise ModelError(
                f"{label}: block {i} has attention {type(attn).__name__}, not timm.layers.Attention with a fused "
                "qkv Linear, so its q/k/v cannot be tapped; use a standard timm VisionTransformer"
            )


class TimmBackbone(HookedBackbone):
    """A timm ``VisionTransformer``: q/k after ``attn.q_norm``/``k_norm``, v from ``attn.qkv``, ffn = block output."""

    def __init__(
        self,
        model: nn.Module,
        *,
        spec: str,
        objective: str,
        device: str | torch.device,
        data_config: dict[str, Any] | None = None,
        weights_info: str = "",
    ) -> None:
        import timm.data

        check_tappable(model, spec)
        self.spec = spec
        self.objective = objective
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.embed_dim = int(model.embed_dim)
        self.num_blocks = len(model.blocks)
        self.num_heads = int(model.blocks[0].attn.num_heads)
        patch = model.patch_embed.patch_size
        self.patch_size = int(patch[0] if isinstance(patch, tuple | list) else patch)
        if isinstance(patch, tuple | list) and patch[0] != patch[1]:
            raise ModelError(f"{spec} has a non-square patch {tuple(patch)}; qkvprobe needs square patches")
        self.in_chans = int(model.patch_embed.proj.in_channels)
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        self.num_register_tokens = int(getattr(model, "num_reg_tokens", 0))
        self.has_cls_token = getattr(model, "cls_token", None) is not None
        config = dict(timm.data.resolve_data_config({}, model=model))
        # The pretrained cfg may describe a default architecture; the built model's own size wins.
        img_size = getattr(model.patch_embed, "img_size", None)
        if img_size:
            config["input_size"] = (self.in_chans, *tuple(img_size))
        config.update(data_config or {})
        config["input_size"] = tuple(config["input_size"])
        config["mean"], config["std"] = tuple(config["mean"]), tuple(config["std"])
        self.data_config = config
        self.weights_info = weights_info
        self.weights_digest = state_dict_digest(self.model.state_dict())

    def tap_site(self, block: int) -> TapSite:
        blk = self.model.blocks[block]
        attn = blk.attn
        return TapSite(
            block=blk,
            q=(attn.q_norm, heads_to_tokens),
            k=(attn.k_norm, heads_to_tokens),
            v=(attn.qkv, _v_reader(attn.num_heads * attn.head_dim)),
        )

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.norm(x)

    def run(self, images: torch.Tensor) -> Any:
        return self.model.forward_features(images)


def _filter_fn(model: nn.Module):
    """timm's own checkpoint filter for this architecture (DINOv2 key names, pos-embed resampling), if any."""
    return getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)


def _create(name: str, label: str, **kwargs: Any) -> nn.Module:
    import timm

    base, _, tag = name.partition(".")
    if not timm.is_model(base):
        known = list(KNOWN_TIMM) + timm.list_models() + timm.list_pretrained()
        raise SpecError(
            f"unknown timm model {name!r}{suggest(name, known)}; see `qkvprobe models` or timm.list_models()"
        )
    if tag and name not in timm.list_pretrained():
        raise SpecError(
            f"unknown timm pretrained tag {name!r}{suggest(name, timm.list_pretrained(f'{base}.*'))}; "
            "see timm.list_pretrained()"
        )
    kwargs = {"num_classes": 0, "dynamic_img_size": True, **kwargs}
    if not kwargs.get("pretrained"):
        return timm.create_model(name, **kwargs)
    try:
        return timm.create_model(name, **kwargs)
    except Exception as exc:  # hub / URL download errors come in many types
        raise WeightsError(
            f"could not fetch pretrained weights for {label} ({type(exc).__name__}); download them once with "
            "internet access or pass --weights PATH"
        ) from exc


def _attach(model: nn.Module, weights: str | Path | None, label: str) -> str:
    if weights is None:
        return ""
    return load_weights(model, weights, label=label, adapt=_filter_fn(model))


def load_timm(name: str, weights: str | Path | None, device: str) -> TimmBackbone:
    """``timm:<name>``: pretrained download when ``weights`` is None, else the local file into the architecture."""
    label = f"timm:{name}"
    model = _create(name, label, pretrained=weights is None)
    info = _attach(model, weights, label) or "timm pretrained"
    return TimmBackbone(model, spec=label, objective=objective_of(name), device=device, weights_info=info)


CARD_KEYS: tuple[str, ...] = ("name", "objective", "timm_model", "model_kwargs", "data_config", "sha256")


def read_card(directory: Path, name: str) -> dict[str, Any]:
    """The JSON model card of ``builtin:<name>`` (WeightsError if unreadable or incomplete)."""
    path = directory / f"{name}.json"
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(
            f"model card {path} is unreadable ({type(exc).__name__}); reinstall qkvprobe"
        ) from exc
    missing = [k for k in CARD_KEYS if k not in card]
    if missing:
        raise WeightsError(
            f"model card {path} lacks {', '.join(missing)}; regenerate it with `qkvprobe pretrain`"
        )
    return card


def load_builtin(directory: Path, name: str, weights: str | Path | None, device: str) -> TimmBackbone:
    """``builtin:<name>``: the card's timm architecture + its float16 safetensors (sha256-checked)."""
    names = sorted(p.stem for p in directory.glob("*.json"))
    if name not in names:
        raise SpecError(
            f"unknown built-in model {name!r}{suggest(name, names)}; available: {', '.join(names) or 'none'}"
        )
    card = read_card(directory, name)
    label = f"builtin:{name}"
    if weights is None:
        weights = directory / f"{name}.safetensors"
        if not weights.is_file():
            raise WeightsError(
                f"weights file {weights} of {label} is missing; reinstall qkvprobe or re-run pretrain"
            )
        actual = sha256_file(weights)
        if actual != card["sha256"]:
            raise WeightsError(
                f"weights file {weights} has sha256 {actual[:12]}… but its card says {str(card['sha256'])[:12]}…; "
                "the file is corrupt or was replaced: reinstall qkvprobe or re-run the card's command"
            )
    kwargs = {**card["model_kwargs"], "num_classes": 0, "dynamic_img_size": True, "pretrained": False}
    model = _create(card["timm_model"], label, **kwargs)
    info = _attach(model, weights, label)
    return TimmBackbone(
        model,
        spec=label,
        objective=str(card["objective"]),
        device=device,
        data_config=dict(card["data_config"]),
        weights_info=info,
    )
