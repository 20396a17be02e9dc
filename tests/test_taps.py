"""Taps checked by independent recomputation: attention rebuilt from q/k/v, ffn vs timm's own intermediates."""

from __future__ import annotations

import math

import pytest
import timm
import torch

from qkvprobe.backbones.timm_backbone import TimmBackbone
from qkvprobe.errors import DataError, FeatureError, ModelError, QkvprobeError
from qkvprobe.taps import select_positions
from randomize import randomize_

ATOL = 1e-4  # float32 on CPU, outputs of order 1: fused SDPA vs explicit softmax differ by ~1e-6


def tiny_timm(**kwargs) -> torch.nn.Module:
    """A 2-block, D=32, 4-head timm ViT on 1×16×16 images; ``kwargs`` switch on the variant under test."""
    torch.manual_seed(0)
    base = dict(
        img_size=16,
        patch_size=4,
        in_chans=1,
        embed_dim=32,
        depth=2,
        num_heads=4,
        num_classes=0,
        dynamic_img_size=True,
    )
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**base, **kwargs}).eval()
    return randomize_(model, seed=0)


def wrap(model: torch.nn.Module) -> TimmBackbone:
    return TimmBackbone(model, spec="timm:tiny-test", objective="unknown", device="cpu")


def rebuild_attention(q, k, v, num_heads, proj, norm=None):
    """softmax(q kᵀ/√d) v per head → concat heads → (norm) → proj. q, k, v: [B, T, D] → [B, T, D]."""
    B, T, D = q.shape
    d = D // num_heads
    qh, kh, vh = (t.reshape(B, T, num_heads, d).transpose(1, 2).double() for t in (q, k, v))
    attn = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)
    out = (attn @ vh).transpose(1, 2).reshape(B, T, D).float()
    if norm is not None:
        out = norm(out)
    return proj(out)


def capture(module: torch.nn.Module, fn, *args):
    """Run ``fn(*args)`` and return (result, ``module``'s first output) via a separate hook."""
    seen = {}

    def hook(m, a, o) -> None:  # returns None: a hook that returns a value would replace the output
        seen["out"] = o[0] if isinstance(o, tuple) else o

    handle = module.register_forward_hook(hook)
    try:
        result = fn(*args)
    finally:
        handle.remove()
    return result, seen["out"]


VARIANTS = {
    "cls": {},
    "no_cls": {"class_token": False, "global_pool": "avg"},
    "registers": {"reg_tokens": 4},
    "qk_norm": {"qk_norm": True},
    "layer_scale": {"init_values": 0.5},
}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_attention_rebuilt_from_qkv(variant: str, fused: bool) -> None:
    model = tiny_timm(**VARIANTS[variant])
    for blk in model.blocks:
        blk.attn.fused_attn = fused
    bb = wrap(model)
    x = torch.randn(2, 1, 16, 12)
    for block in (0, 1):
        attn = model.blocks[block].attn
        out, attn_out = capture(attn, bb.extract, x, (block,), ("q", "k", "v"))
        norm = None if isinstance(attn.norm, torch.nn.Identity) else attn.norm
        rebuilt = rebuild_attention(out["q"], out["k"], out["v"], bb.num_heads, attn.proj, norm)
        assert out["q"].shape == (2, bb.num_prefix_tokens + 12, 32)
        torch.testing.assert_close(rebuilt, attn_out, atol=ATOL, rtol=0)
    # an unscaled q is what attention uses: scaling it by 1/sqrt(d) must break the rebuild
    scaled = rebuild_attention(out["q"] / math.sqrt(8), out["k"], out["v"], bb.num_heads, attn.proj, norm)
    assert (scaled - attn_out).abs().max() > 1e-2


def test_qk_norm_taps_after_norm() -> None:
    model = tiny_timm(qk_norm=True)
    with torch.no_grad():  # non-trivial norm weights so "before" and "after" differ
        for blk in model.blocks:
            blk.attn.q_norm.weight.uniform_(0.5, 2.0)
            blk.attn.k_norm.weight.uniform_(0.5, 2.0)
    bb = wrap(model)
    x = torch.randn(2, 1, 16, 16)
    out = bb.extract(x, blocks=(0,), tokens=("q", "k"))
    # independent: norm1 → qkv → per-head LayerNorm, starting from timm's own block-0 input
    with torch.no_grad():
        h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        qkv = model.blocks[0].attn.qkv(model.blocks[0].norm1(h)).reshape(2, h.shape[1], 3, 4, 8)
        q = model.blocks[0].attn.q_norm(qkv[:, :, 0]).flatten(2)
        k = model.blocks[0].attn.k_norm(qkv[:, :, 1]).flatten(2)
    torch.testing.assert_close(out["q"], q, atol=1e-6, rtol=0)
    torch.testing.assert_close(out["k"], k, atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", ["cls", "registers", "layer_scale", "no_cls"])
def test_ffn_equals_forward_intermediates(variant: str) -> None:
    model = tiny_timm(**VARIANTS[variant])
    bb = wrap(model)
    x = torch.randn(2, 1, 16, 20)
    out = bb.extract(x, blocks=(0, 1, -1), tokens=("ffn", "ffn_norm"))
    with torch.no_grad():
        inter = model.forward_intermediates(
            x, indices=[0, 1], output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True
        )
        features = model.forward_features(x)
    for block, item in enumerate(inter):
        full = torch.cat([item[1], item[0]], dim=1) if bb.num_prefix_tokens else item
        torch.testing.assert_close(out[(block, "ffn")], full, atol=1e-6, rtol=0)
    if isinstance(model.norm, torch.nn.Identity):  # global_pool="avg": the model normalises after pooling
        assert bb.ffn_norm_source.startswith("fc_norm")
        with torch.no_grad():
            features = model.fc_norm(features)
        assert (out[(-1, "ffn_norm")] - out[(-1, "ffn")]).abs().max() > 1e-2
    torch.testing.assert_close(out[(-1, "ffn_norm")], features, atol=1e-6, rtol=0)
    torch.testing.assert_close(out[(1, "ffn")], out[(-1, "ffn")], atol=0, rtol=0)


def test_one_forward_stops_after_deepest_block_and_leaves_no_hooks(tiny_vit) -> None:
    bb = wrap(tiny_vit)
    calls = []
    handle = tiny_vit.blocks[1].register_forward_hook(lambda *a: calls.append(1))  # returns None
    try:
        bb.extract(torch.randn(1, 1, 28, 28), blocks=(0,))
        assert calls == []  # block 1 never ran
        bb.extract(torch.randn(1, 1, 28, 28), blocks=(-1,))
        assert calls == [1]  # exactly one pass
    finally:
        handle.remove()
    for module in tiny_vit.modules():
        assert not module._forward_hooks
    # the model's own forward is unchanged after extraction
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        ref = tiny_vit.forward_features(x)
    torch.testing.assert_close(bb.extract(x, tokens=("ffn_norm",))["ffn_norm"], ref, atol=0, rtol=0)


def test_several_blocks_keyed_as_given(tiny_vit) -> None:
    bb = wrap(tiny_vit)
    x = torch.randn(2, 1, 28, 28)
    many = bb.extract(x, blocks=(0, -1))
    assert set(many) == {(b, t) for b in (0, -1) for t in ("q", "k", "v", "ffn", "ffn_norm")}
    for block in (0, -1):
        single = bb.extract(x, blocks=(block,))
        for token, value in single.items():
            torch.testing.assert_close(many[(block, token)], value, atol=0, rtol=0)


def test_select_positions_keeps_registers_out() -> None:
    x = torch.arange(2 * 9 * 3, dtype=torch.float32).reshape(2, 9, 3)  # 1 cls + 4 registers + 4 patches
    got = select_positions(x, ("cls", "avg", "patch"), num_prefix_tokens=5, has_cls_token=True)
    torch.testing.assert_close(got["cls"], x[:, 0])
    torch.testing.assert_close(got["patch"], x[:, 5:])
    torch.testing.assert_close(got["avg"], x[:, 5:].mean(1))
    np_got = select_positions(x.numpy(), ("avg",), num_prefix_tokens=5, has_cls_token=True)
    assert abs(float(np_got["avg"][1, 2]) - float(x[1, 5:, 2].mean())) < 1e-6


def test_registers_model_positions() -> None:
    bb = wrap(tiny_timm(reg_tokens=4))
    assert (bb.num_prefix_tokens, bb.num_register_tokens, bb.has_cls_token) == (5, 4, True)
    out = bb.extract(torch.randn(1, 1, 16, 16), tokens=("ffn",))["ffn"]
    patch = select_positions(out, ("patch",), bb.num_prefix_tokens, bb.has_cls_token)["patch"]
    assert patch.shape == (1, 16, 32)


def test_cls_from_model_without_class_token() -> None:
    bb = wrap(tiny_timm(class_token=False, global_pool="avg"))
    assert (bb.num_prefix_tokens, bb.has_cls_token) == (0, False)
    out = bb.extract(torch.randn(1, 1, 16, 16), tokens=("k",))["k"]
    with pytest.raises(FeatureError, match=r"without a class token.*'avg'"):
        select_positions(out, ("cls",), bb.num_prefix_tokens, bb.has_cls_token)


def test_unknown_position_and_bad_shape() -> None:
    with pytest.raises(FeatureError, match="unknown position 'mean'"):
        select_positions(torch.zeros(1, 3, 2), ("mean",), 1, True)
    with pytest.raises(FeatureError, match=r"\[B, T, D\]"):
        select_positions(torch.zeros(3, 2), ("avg",), 1, True)


def test_block_out_of_range(tiny_vit) -> None:
    bb = wrap(tiny_vit)
    with pytest.raises(QkvprobeError, match=r"block index 2 is out of range.*valid: -2\.\.1"):
        bb.extract(torch.randn(1, 1, 28, 28), blocks=(2,))
    with pytest.raises(QkvprobeError, match=r"block index -3 is out of range"):
        bb.extract(torch.randn(1, 1, 28, 28), blocks=(0, -3))


def test_indivisible_size_says_what_works(tiny_vit) -> None:
    bb = wrap(tiny_vit)
    with pytest.raises(DataError, match=r"30x28 is not divisible by the patch size 4.*height 28 or 32"):
        bb.extract(torch.randn(1, 1, 30, 28))


def test_wrong_channels_and_unknown_token(tiny_vit) -> None:
    bb = wrap(tiny_vit)
    with pytest.raises(DataError, match="takes 1-channel images, got 3"):
        bb.extract(torch.randn(1, 3, 28, 28))
    with pytest.raises(FeatureError, match="unknown token type"):
        bb.extract(torch.randn(1, 1, 28, 28), tokens=("query",))


def test_nan_features_raise() -> None:
    model = tiny_timm()
    with torch.no_grad():
        model.blocks[1].mlp.fc2.bias[0] = float("nan")
    bb = wrap(model)
    assert torch.isfinite(bb.extract(torch.randn(1, 1, 16, 16), blocks=(0,))["ffn"]).all()
    with pytest.raises(FeatureError, match="'ffn' contains NaN/Inf"):
        bb.extract(torch.randn(1, 1, 16, 16), tokens=("q", "ffn"))


def test_rotary_token_refused_without_rotary(tiny_vit) -> None:
    bb = wrap(tiny_vit)
    assert not bb.has_rope
    with pytest.raises(
        FeatureError, match=r"has no rotary position embedding, so it has no 'q_rope'; ask for 'q'"
    ):
        bb.extract(torch.randn(1, 1, 28, 28), tokens=("q", "q_rope"))


def test_non_vit_refused() -> None:
    with pytest.raises(ModelError, match="not a ViT qkvprobe can tap: it lacks"):
        wrap(timm.create_model("resnet10t", pretrained=False, num_classes=0))
