"""Hugging Face backbones (``hf:<repo id or local dir>``): the ``model_type`` s in :mod:`.hf_families`."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelError, SpecError, WeightsError
from ..taps import HookedBackbone, Tap, TapSite, first_output
from .hf_families import HfFamily, drop_heads, family_of, find, norm_of
from .hub import hub_access
from .specs import KNOWN_HF, objective_with_weights, suggest
from .weights import file_source, load_weights, state_dict_digest

log = logging.getLogger("qkvprobe")

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_PIL_INTERPOLATION = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


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
    out["source"] = "ImageNet mean/std (no preprocessor_config.json found)"
    if "image_mean" in proc and "image_std" in proc:
        out["mean"], out["std"] = tuple(proc["image_mean"]), tuple(proc["image_std"])
        out["source"] = f"{source} preprocessor_config.json"
    out["interpolation"] = _PIL_INTERPOLATION.get(proc.get("resample"), out["interpolation"])
    crop, resize = proc.get("crop_size") or {}, proc.get("size") or {}
    crop_side = crop.get("height") if isinstance(crop, dict) else crop
    short = resize.get("shortest_edge") if isinstance(resize, dict) else resize
    if proc.get("do_center_crop") and crop_side and short:
        out["crop_pct"] = float(crop_side) / float(short)
    return out


class HfBackbone(HookedBackbone):
    """A transformers ViT of a family in :mod:`.hf_families`: q/k/v from its projections, ffn = layer output."""

    def __init__(
        self,
        model: nn.Module,
        *,
        spec: str,
        source: str,
        device: str | torch.device,
        weights: str | Path | None = None,
        weights_info: str = "",
        weights_source: str = "random init",
    ) -> None:
        config = model.config
        self.tap_family: HfFamily = family_of(config.model_type, spec)
        self.family = self.tap_family.name
        drop_heads(model, self.tap_family)
        self.layers = find(model, *self.tap_family.layers)
        if self.layers is None:
            raise ModelError(f"{spec}: cannot find the transformer layers of {type(model).__name__}")
        self._final_norm, self.ffn_norm_source = norm_of(model, self.tap_family)
        self.spec = spec
        self.objective = self.tap_family.objective or objective_with_weights(source, weights, weights_info)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.model_type = config.model_type
        self.embed_dim = int(config.hidden_size)
        self.num_blocks = len(self.layers)
        self.num_heads = int(config.num_attention_heads)
        patch = config.patch_size
        self.patch_size = int(patch if isinstance(patch, int) else patch[0])
        self.in_chans = int(config.num_channels)
        embeddings = getattr(model, "embeddings", None)
        registers = getattr(embeddings, "register_tokens", None)
        self.num_register_tokens = int(registers.shape[1]) if registers is not None else 0
        self.has_cls_token = getattr(embeddings, "cls_token", None) is not None
        self.num_prefix_tokens = int(self.has_cls_token) + self.num_register_tokens
        self.has_rope = self.tap_family.rope is not None
        size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        if self.model_type == "aimv2_vision_model" and not getattr(config, "is_native", False):
            self.fixed_size = (int(size), int(size))  # a learnt position embedding of one grid size
        with nullcontext() if Path(source).expanduser().is_dir() else hub_access():
            self.data_config = _data_config(source, config)
        self.preprocessing_source = str(self.data_config.pop("source"))
        self.weights_info = weights_info
        self.weights_source = weights_source
        self.weights_digest = state_dict_digest(self.model.state_dict())
        for i in range(self.num_blocks):
            self.tap_site(i)  # fail at load time, not at the first batch

    def tap_site(self, block: int) -> TapSite:
        family = self.tap_family
        layer = self.layers[block]
        attention = find(layer, *family.attention)
        projections = {kind: find(attention, *getattr(family, kind)) for kind in ("q", "k", "v")}
        if attention is None or any(p is None for p in projections.values()):
            raise ModelError(
                f"{self.spec}: layer {block} has no q/k/v projections to tap ({type(attention).__name__})"
            )
        taps = {kind: Tap(module, first_output) for kind, module in projections.items()}
        derived = {}
        if family.rope is not None:
            taps["rope"], derived = family.rope(attention, self.num_heads)
        return TapSite(block=layer, taps=taps, derived=derived)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        if self._final_norm is None:
            raise ModelError(f"{self.spec} has no final norm")
        return self._final_norm(x)

    def run(self, images: torch.Tensor) -> Any:
        kwargs: dict[str, Any] = {}
        if self.tap_family.interpolate:
            kwargs["interpolate_pos_encoding"] = True
        if self.model_type == "vit_mae":
            # mask_ratio is 0 and sorted noise makes the "shuffle" the identity: every patch, in order, every call.
            num_patches = (images.shape[2] // self.patch_size) * (images.shape[3] // self.patch_size)
            noise = torch.arange(num_patches, device=images.device, dtype=torch.float32)
            kwargs["noise"] = noise.expand(images.shape[0], -1)
        return self.model(pixel_values=images, **kwargs)


def _fetch_error(label: str, what: str, exc: Exception, offline: str | None) -> WeightsError:
    why = f"offline: {offline}; " if offline else ""
    return WeightsError(
        f"could not fetch the {what} of {label} ({why}{type(exc).__name__}); download it once with internet "
        "access (or pass a local directory) and/or pass --weights PATH"
    )


@contextmanager
def _quiet_bars() -> Iterator[None]:
    """Off a terminal (a pipe, a log file), transformers' and the hub's progress bars ("Loading weights: 100%|…")
    would only fill the log with carriage returns: they are turned off while a model loads, then restored."""
    if sys.stderr.isatty():
        yield
        return
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    bars, hub_bars = hf_logging.is_progress_bar_enabled(), not hub_utils.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    hub_utils.disable_progress_bars()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        if hub_bars:
            hub_utils.enable_progress_bars()


def load_hf(source: str, weights: str | Path | None, device: str) -> HfBackbone:
    """``hf:<repo id or dir>``: AutoModel weights, or the architecture from AutoConfig + a local weights file;
    no progress bars off a terminal."""
    with _quiet_bars():
        return _load_hf(source, weights, device)


def _load_hf(source: str, weights: str | Path | None, device: str) -> HfBackbone:
    """``hf:<repo id or dir>``: AutoModel weights, or the architecture from AutoConfig + a local weights file."""
    from transformers import AutoConfig, AutoModel

    label = f"hf:{source}"
    local = Path(source).expanduser()
    is_dir = local.is_dir()
    if is_dir and not (local / "config.json").is_file():
        raise SpecError(
            f"{label}: directory {local} has no config.json; pass a saved transformers model directory"
        )
    with nullcontext() if is_dir else hub_access() as offline:
        try:
            config = AutoConfig.from_pretrained(source)
        except Exception as exc:  # offline, unknown repo, malformed id: hub errors vary
            hint = suggest(source, KNOWN_HF)
            if source not in KNOWN_HF and hint:
                raise SpecError(f"unknown Hugging Face model {source!r}{hint}") from exc
            raise _fetch_error(label, "config", exc, offline) from exc
    family = family_of(config.model_type, label)
    if family.prepare is not None:
        family.prepare(config)
    if weights is None:
        with nullcontext() if is_dir else hub_access() as offline:
            try:
                model, loading = AutoModel.from_pretrained(
                    source, config=config, output_loading_info=True, **family.init_kwargs
                )
            except Exception as exc:
                raise _fetch_error(label, "weights", exc, offline) from exc
        drop_heads(model, family)
        kept = set(model.state_dict())
        missing = sorted(k for k in loading.get("missing_keys") or () if k in kept)
        info = f"transformers from_pretrained({source})"
        if missing:
            # e.g. a pooling norm the checkpoint does not hold: transformers initialises it (weight 1, bias 0)
            info += f" ({len(missing)} keys newly initialised: {', '.join(missing[:3])}{', …' if len(missing) > 3 else ''})"
            log.warning("%s: %s", label, info)
        weights_source = f"hf dir: {local.resolve()}" if is_dir else f"hf hub: {source}"
    else:
        model = AutoModel.from_config(config, **family.init_kwargs)
        drop_heads(model, family)  # heads are neither in the features nor expected in the file
        prefixes = [f"{model.base_model_prefix}."] if getattr(model, "base_model_prefix", "") else []
        info = load_weights(model, weights, label=label, strip=prefixes)
        weights_source = file_source(weights)
    return HfBackbone(
        model,
        spec=label,
        source=source,
        device=device,
        weights=weights,
        weights_info=info,
        weights_source=weights_source,
    )
