"""timm backbones (``timm:<name>`` and the ``builtin:`` models, which are timm ViTs).

The architectures qkvprobe taps and where their tokens live are described in :mod:`.timm_families`
(VisionTransformer, Eva, Beit); this module loads a model, reads its shape facts from the model itself and
attaches weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelError, SpecError, WeightsError
from ..taps import HookedBackbone, TapSite
from .hub import hub_access
from .published import published_config, recognised_family
from .specs import KNOWN_TIMM, objective_with_weights, suggest
from .timm_families import family_of, final_norm_of
from .weights import file_source, load_weights, sha256_file, state_dict_digest

#: create_model keywords given only to architectures whose constructor takes them (timm Beit has no
#: ``dynamic_img_size``: it takes its native input size only).
OPTIONAL_KWARGS: dict[str, Any] = {"dynamic_img_size": True}


def _fixed_size(model: nn.Module) -> tuple[int, int] | None:
    """(H, W) when the patch embedding accepts one input size only (no dynamic size), else None."""
    patch_embed = model.patch_embed
    if getattr(model, "dynamic_img_size", False) or not getattr(patch_embed, "strict_img_size", True):
        return None
    size = getattr(patch_embed, "img_size", None)
    return (int(size[0]), int(size[1])) if size is not None else None


class TimmBackbone(HookedBackbone):
    """A timm ViT of a family in :mod:`.timm_families`; q/k/v, rotary tokens and the final norm as it describes."""

    def __init__(
        self,
        model: nn.Module,
        *,
        spec: str,
        objective: str,
        device: str | torch.device,
        data_config: dict[str, Any] | None = None,
        weights_info: str = "",
        weights_source: str = "random init",
        preprocessing_source: str = "",
    ) -> None:
        import timm.data

        self.tap_family = family_of(model, spec)
        self.family = self.tap_family.name
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
        reg_token = getattr(model, "reg_token", None)
        self.num_register_tokens = int(
            getattr(model, "num_reg_tokens", reg_token.shape[1] if reg_token is not None else 0)
        )
        self.has_cls_token = getattr(model, "cls_token", None) is not None
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        if self.num_prefix_tokens != int(self.has_cls_token) + self.num_register_tokens:
            raise ModelError(
                f"{spec}: {self.num_prefix_tokens} prefix tokens but {int(self.has_cls_token)} class and "
                f"{self.num_register_tokens} register tokens; qkvprobe cannot tell which tokens are patches"
            )
        self.has_rope = self.tap_family.has_rope(model)
        self._final_norm, self.ffn_norm_source = final_norm_of(model)
        self.fixed_size = _fixed_size(model)
        config = dict(timm.data.resolve_data_config({}, model=model))
        # The pretrained cfg may describe a default architecture; the built model's own size wins.
        img_size = getattr(model.patch_embed, "img_size", None)
        if img_size:
            config["input_size"] = (self.in_chans, *tuple(img_size))
        config.update(data_config or {})
        config["input_size"] = tuple(config["input_size"])
        config["mean"], config["std"] = tuple(config["mean"]), tuple(config["std"])
        self.data_config = config
        cfg = getattr(model, "pretrained_cfg", None) or {}
        cfg_name = ".".join(str(v) for v in (cfg.get("architecture"), cfg.get("tag")) if v)
        self.preprocessing_source = preprocessing_source or (
            f"timm pretrained cfg {cfg_name or spec}" if data_config is None else f"{spec} model card"
        )
        self.weights_info = weights_info
        self.weights_source = weights_source
        self.weights_digest = state_dict_digest(self.model.state_dict())

    def tap_site(self, block: int) -> TapSite:
        return self.tap_family.site(self.model, block)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        if self._final_norm is None:
            raise ModelError(f"{self.spec} has no final norm")
        return self._final_norm(x)

    def run(self, images: torch.Tensor) -> Any:
        return self.model.forward_features(images)


def _filter_fn(model: nn.Module):
    """timm's own checkpoint filter for this architecture (DINOv2 key names, pos-embed resampling), if any."""
    return getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)


def _build(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """``timm.create_model`` with the :data:`OPTIONAL_KWARGS` the architecture's constructor does not take dropped."""
    import timm

    kwargs = dict(kwargs)
    while True:
        try:
            return timm.create_model(name, **kwargs)
        except TypeError as exc:
            rejected = next(
                (k for k in OPTIONAL_KWARGS if k in kwargs and f"keyword argument '{k}'" in str(exc)), None
            )
            if rejected is None:
                raise
            del kwargs[rejected]


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
    kwargs = {"num_classes": 0, **OPTIONAL_KWARGS, **kwargs}
    if not kwargs.get("pretrained"):
        return _build(name, kwargs)
    with hub_access() as offline:
        try:
            return _build(name, kwargs)
        except Exception as exc:  # hub / URL download errors come in many types
            why = f"offline: {offline}; " if offline else ""
            raise WeightsError(
                f"could not fetch pretrained weights for {label} ({why}{type(exc).__name__}); download them once "
                "with internet access or pass --weights PATH"
            ) from exc


def _attach(model: nn.Module, weights: str | Path | None, label: str) -> str:
    if weights is None:
        return ""
    return load_weights(model, weights, label=label, adapt=_filter_fn(model))


def _hub_source(name: str, model: nn.Module) -> str:
    """``"timm hub: <arch>.<tag>"`` with the default tag timm resolved when the name had none."""
    if "." in name:
        return f"timm hub: {name}"
    tag = (getattr(model, "pretrained_cfg", None) or {}).get("tag")
    return f"timm hub: {name}.{tag}" if tag else f"timm hub: {name}"


def published_preprocessing(
    name: str, weights: str | Path | None, note: str, in_chans: int
) -> tuple[dict[str, Any] | None, str]:
    """For a bare architecture (no pretrained tag) with local weights: the recognised family's published
    mean/std/interpolation/crop (:mod:`.published`) and a line saying where it comes from; ``(None, "")`` when
    the architecture's defaults stand (a tagged spec, no weights, weights not recognised, or a 1-channel model)."""
    if weights is None or "." in name or in_chans != 3:
        return None, ""
    file = str(weights).replace("\\", "/").rsplit("/", 1)[-1]
    family, why = recognised_family(name), f"from the spec {name}"
    if family is None and "MoCo v3" in note:
        family, why = "moco", "from the MoCo v3 checkpoint layout"
    if family is None:
        family, why = recognised_family(file), f"recognised from the weights file name {file}"
    found = published_config(family) if family else None
    if found is None:
        return None, ""
    config, source = found
    return config, f"{source}, {why}"


def load_timm(name: str, weights: str | Path | None, device: str) -> TimmBackbone:
    """``timm:<name>``: pretrained download when ``weights`` is None, else the local file into the architecture.

    A bare architecture whose weights are recognised as a self-supervised family takes that family's published
    normalisation (:func:`published_preprocessing`), not the architecture's default."""
    label = f"timm:{name}"
    model = _create(name, label, pretrained=weights is None)
    info = _attach(model, weights, label) or "timm pretrained"
    source = file_source(weights) if weights is not None else _hub_source(name, model)
    in_chans = int(model.patch_embed.proj.in_channels)
    data_config, preprocessing_source = published_preprocessing(name, weights, info, in_chans)
    if weights is not None and data_config is None and "." not in name:
        preprocessing_source = (
            f"timm pretrained cfg of the bare architecture {name} (weights not recognised as a known family: "
            "pass --mean/--std if they were trained with other values)"
        )
    return TimmBackbone(
        model,
        spec=label,
        objective=objective_with_weights(name, weights, info),
        device=device,
        data_config=data_config,
        weights_info=info,
        weights_source=source,
        preprocessing_source=preprocessing_source,
    )


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
        source = f"builtin: {weights.name}"
    else:
        source = file_source(weights)
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
        weights_source=source,
    )
