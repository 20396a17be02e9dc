"""Hugging Face architecture families as data: where each ``model_type``'s layers, q/k/v, rotary embedding and
final norm live (docs/CONTRACTS.md, Backbones).

Every family here projects q, k and v with three ``nn.Linear`` modules whose forward runs, so their outputs are
the tokens (no Hugging Face vision model of these families has a q/k norm). DINOv3 applies a rotary embedding
after the projections: ``q_rope``/``k_rope`` are the captured q/k passed through the modeling module's own
``apply_rotary_pos_emb`` with the ``position_embeddings`` the attention was given. Paths list the attribute
names of transformers 5.x first and 4.x second.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ModelError
from ..taps import Derived, Tap, heads_to_tokens, tokens_to_heads

_Q = ("q_proj", "attention.query", "query")
_K = ("k_proj", "attention.key", "key")
_V = ("v_proj", "attention.value", "value")


@dataclass(frozen=True)
class HfFamily:
    """How one transformers ``model_type`` is tapped.

    ``layers``: paths to the layer list; ``attention``: path inside a layer to the module holding the q/k/v
    projections ``q``/``k``/``v``; ``norms``: paths of the final norm, the first that exists and is not Identity
    wins (a pooling norm last); ``objective``: the pre-training objective (None: read from the repo name, for
    plain ``ViTModel`` weights); ``rope``: builds the derived q_rope/k_rope of an attention module;
    ``interpolate``: pass ``interpolate_pos_encoding=True`` (any input size); ``heads``: attributes holding heads
    that are not part of the features (ViT's pooler, a dense layer + tanh; AIMv2's attention-pooling head), set to
    None before weights are compared (BEiT's and data2vec's pooler holds the pooling norm and stays);
    ``init_kwargs``: model constructor arguments; ``prepare``: edits the config before the model is built.
    """

    model_type: str
    objective: str | None
    layers: tuple[str, ...]
    attention: tuple[str, ...] = ("attention",)
    q: tuple[str, ...] = _Q
    k: tuple[str, ...] = _K
    v: tuple[str, ...] = _V
    norms: tuple[str, ...] = ("layernorm",)
    rope: Callable[[nn.Module, int], tuple[Tap, dict[str, Derived]]] | None = None
    interpolate: bool = True
    heads: tuple[str, ...] = ("pooler",)
    init_kwargs: dict[str, Any] = field(default_factory=dict)
    prepare: Callable[[Any], None] | None = None

    @property
    def name(self) -> str:
        return f"hf {self.model_type}"


def find(module: nn.Module, *paths: str) -> Any:
    """The first attribute path (dotted) that exists on ``module`` and is not None, else None."""
    for path in paths:
        obj: Any = module
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None:
            return obj
    return None


def _dinov3_rope(attention: nn.Module, num_heads: int) -> tuple[Tap, dict[str, Derived]]:
    """The ``position_embeddings`` (cos, sin) tap of a DINOv3 attention and q_rope/k_rope derived from it."""
    apply_rotary_pos_emb = sys.modules[type(attention).__module__].apply_rotary_pos_emb

    def read(args: tuple, kwargs: dict) -> Any:
        return kwargs["position_embeddings"] if "position_embeddings" in kwargs else args[2]

    def rotate(x: torch.Tensor, position: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        cos, sin = position
        heads = tokens_to_heads(x, num_heads)
        rotated, _ = apply_rotary_pos_emb(heads, heads, cos, sin)
        return heads_to_tokens(rotated)

    derived = {"q_rope": Derived(("q", "rope"), rotate), "k_rope": Derived(("k", "rope"), rotate)}
    return Tap(attention, read, before=True), derived


def _no_mask(config: Any) -> None:
    config.mask_ratio = 0.0  # keep every patch (ViTMAE)


FAMILIES: dict[str, HfFamily] = {
    f.model_type: f
    for f in (
        HfFamily("vit", None, ("layers", "encoder.layer")),
        HfFamily("vit_mae", "mae", ("layers", "encoder.layer"), prepare=_no_mask),
        HfFamily("dinov2", "dino", ("layers", "encoder.layer"), interpolate=False),
        HfFamily("dinov2_with_registers", "dino", ("layers", "encoder.layer"), interpolate=False),
        HfFamily(
            "dinov3_vit",
            "dino",
            ("model.layer", "layer"),
            norms=("norm",),
            rope=_dinov3_rope,
            interpolate=False,
        ),
        HfFamily(
            "beit", "mim", ("layers", "encoder.layer"), norms=("layernorm", "pooler.layernorm"), heads=()
        ),
        HfFamily(
            "data2vec-vision",
            "mim",
            ("encoder.layer",),
            attention=("attention.attention",),
            norms=("layernorm", "pooler.layernorm"),
            heads=(),
            init_kwargs={"add_pooling_layer": True},
        ),
        HfFamily("ijepa", "jepa", ("layers", "encoder.layer")),
        HfFamily("vit_msn", "msn", ("layers", "encoder.layer")),
        HfFamily(
            "aimv2_vision_model",
            "aim",
            ("encoder.layers",),
            norms=("rms_norm",),
            interpolate=False,
            heads=("head",),
        ),
    )
}

#: model_type → why qkvprobe does not tap it and what to use instead.
REFUSED: dict[str, str] = {
    "aimv2": "an AIMv2 image-text model; use the vision encoder: timm:aimv2_large_patch14_224.apple_pt or a "
    "directory saved from transformers' Aimv2VisionModel",
}


def drop_heads(model: nn.Module, family: HfFamily) -> None:
    """Remove ``family.heads`` from ``model`` (its forward skips a head that is None or switched off)."""
    for name in family.heads:
        if getattr(model, name, None) is not None:
            setattr(model, name, None)
    if "head" in family.heads and hasattr(model, "use_head"):
        model.use_head = False


def norm_of(model: nn.Module, family: HfFamily) -> tuple[nn.Module | None, str | None]:
    """(module, description) of the norm ``ffn_norm`` applies (see :class:`HfFamily`), or (None, None)."""
    for i, path in enumerate(family.norms):
        module = find(model, path)
        if module is not None and not isinstance(module, nn.Identity):
            pooling = i > 0
            return module, f"{path} (the pooling norm, applied to every token)" if pooling else path
    return None, None


def family_of(model_type: str, label: str) -> HfFamily:
    """The :class:`HfFamily` of a ``model_type`` (ModelError naming the supported ones otherwise)."""
    if model_type in REFUSED:
        raise ModelError(f"{label} is {REFUSED[model_type]}")
    if model_type not in FAMILIES:
        raise ModelError(
            f"{label} is a {model_type!r} model; qkvprobe taps Hugging Face {', '.join(FAMILIES)}"
        )
    return FAMILIES[model_type]
