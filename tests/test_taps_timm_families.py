"""timm Eva (DINOv3, EVA-02) and Beit (BEiT, data2vec) taps checked by recomputation, as tests/test_taps.py does
for VisionTransformer: the attention output rebuilt from the captured q/k/v with the model's own rotary
embedding / relative position bias equals the attention module's output; ffn equals timm's forward_intermediates;
ffn_norm equals forward_features or the pooling norm applied per token; prefix tokens are read from the model."""

from __future__ import annotations

import math

import pytest
import timm
import torch

from qkvprobe.backbones.timm_backbone import TimmBackbone, _create
from qkvprobe.errors import DataError, FeatureError
from qkvprobe.taps import select_positions
from randomize import randomize_

ATOL = 1e-4  # float32 on CPU, outputs of order 1-10: fused SDPA vs a float64 softmax differ by ~1e-5
BASE = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=4, num_classes=0)

#: variant → (timm model, extra kwargs, (prefix tokens, register tokens, class token), final norm)
EVA = {
    # fused qkv without bias: the qkv Linear's forward runs; 4 registers, layer scale, DINOv3 rotary, norm
    "dinov3": ("vit_small_patch16_dinov3", {}, (5, 4, True), "norm"),
    # q_bias / v_bias folded in with F.linear inside forward: v is recomputed from the attention's input
    "dinov3_qkvb": ("vit_small_patch16_dinov3_qkvb", {}, (5, 4, True), "norm"),
    "dinov3_qk_norm": ("vit_small_patch16_dinov3", {"qk_norm": True}, (5, 4, True), "norm"),
    # fused qkv + q_bias/v_bias, SwiGLU, inner attention norm; normalises after pooling: fc_norm per token
    "eva02_fused": ("eva02_tiny_patch14_224", {"scale_attn_inner": True}, (1, 0, True), "fc_norm"),
    # separate q/k/v projections (EVA-02 B/L), SwiGLU with norm
    "eva02_separate": ("eva02_base_patch14_224", {}, (1, 0, True), "fc_norm"),
    # timm's AttentionRope with a per-block (mixed) rotary embedding
    "rope_mixed": ("vit_small_patch16_rope_mixed_224", {}, (1, 0, True), "norm"),
}
BEIT = {
    "beit": ("beit_base_patch16_224", {}),  # a relative position bias table per block
    "beit_shared": ("beit_base_patch16_224", {"use_shared_rel_pos_bias": True, "use_rel_pos_bias": False}),
    "beit_no_qkv_bias": ("beit_base_patch16_224", {"qkv_bias": False}),  # then qkv's own forward runs
}


def eva(variant: str, **extra) -> torch.nn.Module:
    name, kwargs, _, _ = EVA[variant]
    torch.manual_seed(0)
    return randomize_(
        timm.create_model(name, pretrained=False, dynamic_img_size=True, **BASE, **kwargs, **extra)
    ).eval()


def beit(variant: str) -> torch.nn.Module:
    name, kwargs = BEIT[variant]
    torch.manual_seed(0)
    return randomize_(timm.create_model(name, pretrained=False, **BASE, **kwargs)).eval()


def wrap(model: torch.nn.Module) -> TimmBackbone:
    return TimmBackbone(model, spec="timm:tiny-test", objective="unknown", device="cpu")


def attention(q, k, v, num_heads, bias=None) -> torch.Tensor:
    """softmax(q kᵀ/√d + bias) v per head in float64, heads concatenated. q, k, v: [B, T, D] → [B, T, D]."""
    B, T, D = q.shape
    d = D // num_heads
    qh, kh, vh = (t.reshape(B, T, num_heads, d).transpose(1, 2).double() for t in (q, k, v))
    logits = qh @ kh.transpose(-1, -2) / math.sqrt(d)
    if bias is not None:
        logits = logits + bias.double()
    return (torch.softmax(logits, dim=-1) @ vh).transpose(1, 2).reshape(B, T, D).float()


def attention_output(model: torch.nn.Module, bb: TimmBackbone, x: torch.Tensor, block: int, tokens):
    """(taps of ``block``, the attention module's own output) from one extract with an extra hook."""
    seen = {}
    handle = model.blocks[block].attn.register_forward_hook(
        lambda m, a, o: seen.update(out=o)
    )  # returns None
    try:
        out = bb.extract(x, blocks=(block,), tokens=tokens)
    finally:
        handle.remove()
    return out, seen["out"]


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "explicit"])
@pytest.mark.parametrize("variant", list(EVA))
def test_eva_attention_rebuilt_with_rotary(variant: str, fused: bool) -> None:
    model = eva(variant)
    for blk in model.blocks:
        blk.attn.fused_attn = fused
    bb = wrap(model)
    assert bb.has_rope and bb.family == "timm Eva"
    x = torch.randn(2, 1, 16, 12)
    for block in (0, 1):
        attn = model.blocks[block].attn
        out, seen = attention_output(model, bb, x, block, ("q", "k", "v", "q_rope", "k_rope"))
        assert out["q"].shape == (2, bb.num_prefix_tokens + 12, 32)
        rebuilt = attn.proj(attn.norm(attention(out["q_rope"], out["k_rope"], out["v"], bb.num_heads)))
        torch.testing.assert_close(rebuilt, seen, atol=ATOL, rtol=0)
        # q/k are pre-rotary: attention from them is not the model's, and rotary leaves the prefix tokens alone
        wrong = attn.proj(attn.norm(attention(out["q"], out["k"], out["v"], bb.num_heads)))
        assert (wrong - seen).abs().max() > 1e-2
        prefix = bb.num_prefix_tokens
        torch.testing.assert_close(out["q_rope"][:, :prefix], out["q"][:, :prefix], atol=0, rtol=0)
        assert (out["q_rope"][:, prefix:] - out["q"][:, prefix:]).abs().max() > 1e-2


def test_eva_q_is_projection_after_qk_norm_before_rotary() -> None:
    """Independent: norm1 → F.linear with the concatenated biases → per-head q/k LayerNorm, from timm's block input."""
    model = eva("dinov3_qkvb", qk_norm=True)
    bb = wrap(model)
    x = torch.randn(2, 1, 16, 16)
    out = bb.extract(x, blocks=(0,), tokens=("q", "k", "v"))
    with torch.no_grad():
        h, _ = model._pos_embed(model.patch_embed(x))
        attn = model.blocks[0].attn
        bias = torch.cat([attn.q_bias, attn.k_bias, attn.v_bias])
        qkv = torch.nn.functional.linear(model.blocks[0].norm1(model.norm_pre(h)), attn.qkv.weight, bias)
        q, k, v = qkv.reshape(2, h.shape[1], 3, 4, 8).unbind(2)
    torch.testing.assert_close(out["q"], attn.q_norm(q).flatten(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(out["k"], attn.k_norm(k).flatten(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(out["v"], v.flatten(2), atol=1e-6, rtol=0)


#: timm VisionTransformer variants for the direct projection check (test_taps.py checks them through attention).
VIT = {
    "vit": ("vit_tiny_patch16_224", {"dynamic_img_size": True}),
    "vit_qk_norm_registers": (
        "vit_tiny_patch16_224",
        {"dynamic_img_size": True, "qk_norm": True, "reg_tokens": 2, "init_values": 0.5},
    ),
}
PROJECTION_ATOL = 1e-5  # float32: one third of a fused product vs the product alone, values of order 1-10


def timm_model(family: str, variant: str) -> torch.nn.Module:
    if family == "eva":
        return eva(variant)
    if family == "beit":
        return beit(variant)
    name, kwargs = VIT[variant]
    torch.manual_seed(0)
    return randomize_(timm.create_model(name, pretrained=False, **BASE, **kwargs), seed=0).eval()


def projections(attn: torch.nn.Module, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """q, k, v [B, T, D] recomputed from the normalised block input ``y`` with the attention's own parameters,
    as the architecture defines them: one fused weight and either its bias or BEiT's ``cat(q_bias, k_bias,
    v_bias)`` (``k_bias`` a zero buffer: BEiT has no key bias), or separate projections; then the per-head q/k
    norm where the model has one. Written out with ``F.linear`` on the weights, never through the modules the
    taps hook."""
    F = torch.nn.functional
    if getattr(attn, "qkv", None) is not None:
        width = attn.qkv.weight.shape[0] // 3
        weights = attn.qkv.weight.split(width)
        if getattr(attn, "q_bias", None) is not None:
            biases = (attn.q_bias, attn.k_bias, attn.v_bias)
            assert not attn.k_bias.any() and attn.q_bias.abs().min() > 0 and attn.v_bias.abs().min() > 0
        elif attn.qkv.bias is not None:
            biases = attn.qkv.bias.split(width)
        else:
            biases = (None, None, None)
    else:
        mods = (attn.q_proj, attn.k_proj, attn.v_proj)
        weights, biases = tuple(m.weight for m in mods), tuple(m.bias for m in mods)
    q, k, v = (F.linear(y, w, b) for w, b in zip(weights, biases, strict=True))
    heads = attn.num_heads
    out = {"v": v}
    for name, x, norm in (("q", q, getattr(attn, "q_norm", None)), ("k", k, getattr(attn, "k_norm", None))):
        xh = x.unflatten(-1, (heads, -1))
        out[name] = (xh if norm is None else norm(xh)).flatten(2)
    return out


CASES = [("vit", v) for v in VIT] + [("eva", v) for v in EVA] + [("beit", v) for v in BEIT]


@pytest.mark.parametrize(("family", "variant"), CASES, ids=[f"{f}-{v}" for f, v in CASES])
def test_qkv_taps_equal_projections_of_the_block_input(family: str, variant: str) -> None:
    """Each of q, k, v directly (not only through the rebuilt attention output, where a vector added to every key
    shifts each query's logits by a constant the softmax ignores): the projection of ``norm1(block input)`` with
    the block's own weights and biases, per-head q/k norm applied. Every parameter is random (``randomize_``), so
    a swapped or missing bias — q's bias on k, v's on q — shows."""
    model = timm_model(family, variant)
    bb = wrap(model)
    x = torch.randn(2, 1, 16, 16)
    seen: dict[str, torch.Tensor] = {}
    for block in (0, 1):
        handle = model.blocks[block].register_forward_pre_hook(lambda m, a: seen.update(h=a[0]))
        try:
            out = bb.extract(x, blocks=(block,), tokens=("q", "k", "v"))
        finally:
            handle.remove()
        blk = model.blocks[block]
        with torch.no_grad():
            ref = projections(blk.attn, blk.norm1(seen["h"]))
        for kind in ("q", "k", "v"):
            torch.testing.assert_close(out[kind], ref[kind], atol=PROJECTION_ATOL, rtol=0, msg=kind)


@pytest.mark.parametrize("variant", list(EVA))
def test_eva_ffn_norm_and_prefix_tokens(variant: str) -> None:
    model = eva(variant)
    bb = wrap(model)
    _, _, (prefix, registers, cls), norm = EVA[variant]
    assert (bb.num_prefix_tokens, bb.num_register_tokens, bb.has_cls_token) == (prefix, registers, cls)
    assert bb.ffn_norm_source.split()[0] == norm
    x = torch.randn(2, 1, 16, 20)
    out = bb.extract(x, blocks=(0, 1), tokens=("ffn", "ffn_norm"))
    with torch.no_grad():
        inter = model.forward_intermediates(
            x, indices=[0, 1], output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True
        )
        features = model.forward_features(x)
        expected_norm = model.fc_norm(features) if norm == "fc_norm" else features
    for block, (patches, prefix_tokens) in enumerate(inter):
        assert out[(block, "ffn")].shape == (2, prefix + 4 * 5, 32)
        torch.testing.assert_close(
            out[(block, "ffn")], torch.cat([prefix_tokens, patches], 1), atol=1e-5, rtol=0
        )
    torch.testing.assert_close(out[(1, "ffn_norm")], expected_norm, atol=1e-5, rtol=0)
    assert (out[(1, "ffn_norm")] - out[(1, "ffn")]).abs().max() > 1e-2  # never silently the un-normalised ffn
    patch = select_positions(out[(1, "ffn")], ("patch",), bb.num_prefix_tokens, bb.has_cls_token)["patch"]
    torch.testing.assert_close(patch, inter[1][0], atol=1e-5, rtol=0)  # registers stay out of patch


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "explicit"])
@pytest.mark.parametrize("variant", list(BEIT))
def test_beit_attention_rebuilt_with_relative_position_bias(variant: str, fused: bool) -> None:
    model = beit(variant)
    for blk in model.blocks:
        blk.attn.fused_attn = fused
    bb = wrap(model)
    assert bb.family == "timm Beit" and not bb.has_rope and bb.fixed_size == (16, 16)
    x = torch.randn(2, 1, 16, 16)
    for block in (0, 1):
        attn = model.blocks[block].attn
        out, seen = attention_output(model, bb, x, block, ("q", "k", "v"))
        with torch.no_grad():
            bias = torch.zeros(1)
            if attn.relative_position_bias_table is not None:
                bias = bias + attn._get_rel_pos_bias()
            if model.rel_pos_bias is not None:
                bias = bias + model.rel_pos_bias()
        rebuilt = attn.proj(attention(out["q"], out["k"], out["v"], bb.num_heads, bias))
        torch.testing.assert_close(rebuilt, seen, atol=ATOL, rtol=0)
        without_bias = attn.proj(attention(out["q"], out["k"], out["v"], bb.num_heads))
        assert (without_bias - seen).abs().max() > 1e-2  # the bias matters: the rebuild is not vacuous


def test_beit_ffn_norm_is_fc_norm_per_token() -> None:
    model = beit("beit")
    bb = wrap(model)
    assert (bb.num_prefix_tokens, bb.num_register_tokens, bb.has_cls_token) == (1, 0, True)
    assert bb.ffn_norm_source.startswith("fc_norm")
    x = torch.randn(2, 1, 16, 16)
    out = bb.extract(x, blocks=(0, -1), tokens=("ffn", "ffn_norm"))
    with torch.no_grad():
        inter = model.forward_intermediates(
            x, indices=[0, 1], output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True
        )
        features = model.forward_features(x)  # norm is Identity: the last block's output
        pooled = model.forward_head(features, pre_logits=True)  # fc_norm(mean of patch tokens)
    torch.testing.assert_close(out[(0, "ffn")], torch.cat([inter[0][1], inter[0][0]], 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[(-1, "ffn")], features, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[(-1, "ffn_norm")], model.fc_norm(features), atol=1e-5, rtol=0)
    assert (out[(-1, "ffn_norm")] - out[(-1, "ffn")]).abs().max() > 1e-2
    torch.testing.assert_close(model.fc_norm(out[(-1, "ffn")][:, 1:].mean(1)), pooled, atol=1e-5, rtol=0)


def test_beit_takes_its_native_size_only() -> None:
    bb = wrap(beit("beit"))
    with pytest.raises(
        DataError, match=r"takes 16x16 images only .* got 16x20; resize to 16x16 \(--image-size 16\)"
    ):
        bb.extract(torch.randn(1, 1, 16, 20))


def test_beit_created_from_its_name_without_dynamic_img_size() -> None:
    """timm Beit has no dynamic_img_size: the loader must not pass it (a raw TypeError before)."""
    model = _create("beit_base_patch16_224", "timm:beit_base_patch16_224", pretrained=False, depth=1)
    assert type(model).__name__ == "Beit" and wrap(model).fixed_size == (224, 224)
    with pytest.raises(TypeError, match="unexpected keyword argument 'no_such_option'"):
        _create("beit_base_patch16_224", "timm:beit_base_patch16_224", pretrained=False, no_such_option=1)


def test_rotary_tokens_only_where_rotary() -> None:
    bb = wrap(beit("beit"))
    with pytest.raises(
        FeatureError, match=r"no rotary position embedding, so it has no 'k_rope'; ask for 'k'"
    ):
        bb.extract(torch.randn(1, 1, 16, 16), tokens=("k_rope",))
    no_rope = wrap(eva("eva02_fused", use_rot_pos_emb=False))
    assert not no_rope.has_rope
    with pytest.raises(FeatureError, match="has no 'q_rope'"):
        no_rope.extract(torch.randn(1, 1, 16, 16), tokens=("q_rope",))


def test_aimv2_is_a_vision_transformer_without_class_token() -> None:
    """timm AIMv2 (VisionTransformer: RMSNorm, SwiGLU, no class token): taps as any timm ViT, cls refused."""
    torch.manual_seed(0)
    model = randomize_(
        timm.create_model("aimv2_large_patch14_224", pretrained=False, dynamic_img_size=True, **BASE)
    )
    bb = wrap(model)
    assert (bb.family, bb.num_prefix_tokens, bb.has_cls_token, bb.ffn_norm_source) == (
        "timm VisionTransformer",
        0,
        False,
        "norm",
    )
    x = torch.randn(2, 1, 16, 12)
    attn = model.blocks[1].attn
    out, seen = attention_output(model, bb, x, 1, ("q", "k", "v", "ffn_norm"))
    torch.testing.assert_close(
        attn.proj(attention(out["q"], out["k"], out["v"], bb.num_heads)), seen, atol=ATOL, rtol=0
    )
    with torch.no_grad():
        torch.testing.assert_close(out["ffn_norm"], model.forward_features(x), atol=1e-5, rtol=0)
    with pytest.raises(FeatureError, match="without a class token"):
        select_positions(out["ffn_norm"], ("cls",), bb.num_prefix_tokens, bb.has_cls_token)
