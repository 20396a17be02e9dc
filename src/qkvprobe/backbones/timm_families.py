"""timm architecture families as data: where each family's q/k/v, rotary embedding and final norm live.

One :class:`TimmFamily` per model class qkvprobe taps (docs/CONTRACTS.md, Backbones):

- ``VisionTransformer`` (DINO, DINOv2, MAE, AIMv2, the built-in models): q/k are the outputs of
  ``attn.q_norm``/``attn.k_norm`` (Identity without q/k norm), v the last third of the fused ``attn.qkv`` output.
- ``Eva`` (DINOv3, EVA-02): q/k are the outputs of ``attn.q_norm``/``attn.k_norm``, which the attention calls
  after projecting and before its rotary embedding; v is the ``v_proj`` or ``qkv`` output, or, where the
  attention folds ``q_bias``/``v_bias`` in with ``F.linear`` inside its forward (so no module outputs v), the
  same projection recomputed from the attention's input with the model's own weight and bias (a forward
  pre-hook). ``q_rope``/``k_rope`` apply the model's own ``apply_rot_embed_cat`` with the rotary embedding the
  attention was given to the captured q/k, leaving the prefix tokens unrotated as the attention does.
- ``Beit`` (BEiT, BEiT v2, data2vec): its ``qkv`` Linear never runs (the forward calls ``F.linear`` on its
  weight), so q, k and v are that projection recomputed from the attention's input (a pre-hook). The relative
  position bias is added to the attention logits, not to q or k: the tokens are the projections.

The final norm (``ffn_norm``) is ``model.norm``; where that is Identity because the model normalises after
pooling (timm Beit and EVA-02 with ``fc_norm``), it is ``fc_norm`` applied to every token.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError
from ..taps import (
    Derived,
    InputReader,
    Tap,
    TapSite,
    first_input,
    first_output,
    heads_to_tokens,
    tokens_to_heads,
)


@dataclass(frozen=True)
class TimmFamily:
    """How one timm model class is tapped: ``check(model, label)`` refuses what cannot be tapped (ModelError);
    ``site(model, block)`` is block ``block``'s :class:`TapSite`; ``has_rope(model)`` whether q_rope/k_rope exist."""

    name: str
    check: Callable[[nn.Module, str], None]
    site: Callable[[nn.Module, int], TapSite]
    has_rope: Callable[[nn.Module], bool]


def _slice(start: int, stop: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """[B, T, 3A] fused qkv output → columns ``start:stop`` (a copy, so the fused buffer is not kept alive)."""

    def read(out: torch.Tensor) -> torch.Tensor:
        return out[..., start:stop].contiguous()

    return read


def _projection(attn: nn.Module, part: int) -> InputReader:
    """Recompute part ``part`` (0 = q, 1 = k, 2 = v) of a fused projection from the attention's input.

    The attention computes ``F.linear(x, qkv.weight, cat(q_bias, k_bias, v_bias))`` inside its forward; this is
    the same product restricted to one third of the weight, with the model's own parameters: [B, T, D] → [B, T, A].
    """
    width = attn.qkv.weight.shape[0] // 3

    def read(args: tuple, kwargs: dict) -> torch.Tensor:
        x = first_input(args, kwargs, "x")
        weight = attn.qkv.weight[part * width : (part + 1) * width]
        q_bias = getattr(attn, "q_bias", None)
        if q_bias is not None:
            bias = (q_bias, attn.k_bias, attn.v_bias)[part]
        elif attn.qkv.bias is not None:
            bias = attn.qkv.bias[part * width : (part + 1) * width]
        else:
            bias = None
        return F.linear(x, weight, bias)

    return read


def final_norm_of(model: nn.Module) -> tuple[nn.Module | None, str | None]:
    """(module, description) of the norm ``ffn_norm`` applies: ``norm``, else the pooling norm ``fc_norm`` per
    token where ``norm`` is Identity, else (None, None)."""
    norm = getattr(model, "norm", None)
    if norm is not None and not isinstance(norm, nn.Identity):
        return norm, "norm"
    fc_norm = getattr(model, "fc_norm", None)
    if fc_norm is not None and not isinstance(fc_norm, nn.Identity):
        return fc_norm, "fc_norm (the pooling norm, applied to every token)"
    return None, None


# --- VisionTransformer -------------------------------------------------------------------------------------


def _vit_check(model: nn.Module, label: str) -> None:
    from timm.layers import Attention

    for i, blk in enumerate(model.blocks):
        attn = getattr(blk, "attn", None)
        if not isinstance(attn, Attention) or not isinstance(getattr(attn, "qkv", None), nn.Linear):
            raise ModelError(
                f"{label}: block {i} has attention {type(attn).__name__}, not timm.layers.Attention with a fused "
                "qkv Linear, so its q/k/v cannot be tapped; use a standard timm VisionTransformer"
            )


def _vit_site(model: nn.Module, block: int) -> TapSite:
    blk = model.blocks[block]
    attn = blk.attn
    width = attn.num_heads * attn.head_dim
    return TapSite(
        block=blk,
        taps={
            "q": Tap(attn.q_norm, heads_to_tokens),
            "k": Tap(attn.k_norm, heads_to_tokens),
            "v": Tap(attn.qkv, _slice(2 * width, 3 * width)),
        },
    )


# --- Eva (DINOv3, EVA-02) ----------------------------------------------------------------------------------


def _eva_check(model: nn.Module, label: str) -> None:
    from timm.layers import AttentionRope
    from timm.models.eva import EvaAttention

    for i, blk in enumerate(model.blocks):
        attn = getattr(blk, "attn", None)
        if not isinstance(attn, EvaAttention | AttentionRope):
            raise ModelError(
                f"{label}: block {i} has attention {type(attn).__name__}, not timm's EvaAttention or "
                "AttentionRope, so its q/k/v cannot be tapped"
            )
        if getattr(attn, "num_kv_groups", 1) != 1:
            raise ModelError(
                f"{label}: block {i} uses grouped-query attention (fewer key/value heads than query heads), so "
                "k and v are not D-wide token vectors; qkvprobe taps multi-head attention only"
            )
    if getattr(model, "attn_pool", None) is not None:
        raise ModelError(
            f"{label} pools with an attention head (global_pool='map'); qkvprobe taps the block tokens of "
            "models without one (DINOv3, EVA-02)"
        )


def _rope_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    return kwargs["rope"] if "rope" in kwargs else (args[1] if len(args) > 1 else None)


def _eva_rotate(attn: nn.Module) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """q or k [B, T, D] + the rotary embedding the attention received → after rotary, as the attention computes
    it: the model module's own ``apply_rot_embed_cat`` on the patch tokens, prefix tokens untouched."""
    apply_rot_embed_cat = sys.modules[type(attn).__module__].apply_rot_embed_cat
    num_prefix, half, heads = (
        int(attn.num_prefix_tokens),
        bool(getattr(attn, "rotate_half", False)),
        attn.num_heads,
    )

    def rotate(x: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
        if rope is None:
            raise ModelError(
                "the attention was called without its rotary embedding; cannot compute q_rope/k_rope"
            )
        xh = tokens_to_heads(x, heads)
        rotated = apply_rot_embed_cat(xh[:, :, num_prefix:], rope, half=half)
        return heads_to_tokens(torch.cat([xh[:, :, :num_prefix], rotated.to(xh.dtype)], dim=2))

    return rotate


def _eva_site(model: nn.Module, block: int) -> TapSite:
    blk = model.blocks[block]
    attn = blk.attn
    width = attn.num_heads * attn.head_dim
    if attn.qkv is None:
        v = Tap(attn.v_proj, first_output)
    elif getattr(attn, "q_bias", None) is None:
        v = Tap(attn.qkv, _slice(2 * width, 3 * width))
    else:  # F.linear with the concatenated biases inside forward: no module outputs v
        v = Tap(attn, _projection(attn, 2), before=True)
    taps = {"q": Tap(attn.q_norm, heads_to_tokens), "k": Tap(attn.k_norm, heads_to_tokens), "v": v}
    derived: dict[str, Derived] = {}
    if getattr(model, "rope", None) is not None:
        taps["rope"] = Tap(attn, _rope_input, before=True)
        rotate = _eva_rotate(attn)
        derived = {"q_rope": Derived(("q", "rope"), rotate), "k_rope": Derived(("k", "rope"), rotate)}
    return TapSite(block=blk, taps=taps, derived=derived)


# --- Beit (BEiT, BEiT v2, data2vec) ------------------------------------------------------------------------


def _beit_check(model: nn.Module, label: str) -> None:
    from timm.models.beit import Attention as BeitAttention

    for i, blk in enumerate(model.blocks):
        attn = getattr(blk, "attn", None)
        if not isinstance(attn, BeitAttention):
            raise ModelError(
                f"{label}: block {i} has attention {type(attn).__name__}, not timm's Beit Attention, so its "
                "q/k/v cannot be tapped"
            )


def _beit_site(model: nn.Module, block: int) -> TapSite:
    blk = model.blocks[block]
    attn = blk.attn
    return TapSite(
        block=blk,
        taps={kind: Tap(attn, _projection(attn, part), before=True) for part, kind in enumerate("qkv")},
    )


def _no_rope(model: nn.Module) -> bool:
    return False


def _eva_has_rope(model: nn.Module) -> bool:
    return getattr(model, "rope", None) is not None


VISION_TRANSFORMER = TimmFamily("timm VisionTransformer", _vit_check, _vit_site, _no_rope)
EVA = TimmFamily("timm Eva", _eva_check, _eva_site, _eva_has_rope)
BEIT = TimmFamily("timm Beit", _beit_check, _beit_site, _no_rope)


def family_of(model: nn.Module, label: str) -> TimmFamily:
    """The :class:`TimmFamily` of a timm model (ModelError naming what is missing when there is none)."""
    from timm.models.beit import Beit
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer

    for cls, family in ((Eva, EVA), (Beit, BEIT), (VisionTransformer, VISION_TRANSFORMER)):
        if isinstance(model, cls):
            missing = [a for a in ("patch_embed", "blocks", "forward_features") if not hasattr(model, a)]
            if missing:
                break
            family.check(model, label)
            return family
    missing = [
        a for a in ("patch_embed", "blocks", "num_prefix_tokens", "forward_features") if not hasattr(model, a)
    ]
    raise ModelError(
        f"{label} (timm {type(model).__name__}) is not a ViT qkvprobe can tap"
        + (f": it lacks {', '.join(missing)}" if missing else "")
        + "; qkvprobe taps timm VisionTransformer, Eva (DINOv3, EVA-02) and Beit (see `qkvprobe models`)"
    )
