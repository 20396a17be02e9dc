"""Hugging Face DINOv3, BEiT, data2vec, I-JEPA, MSN and AIMv2 backbones (tiny random configs saved with
save_pretrained, loaded through ``hf:<dir>``), checked by recomputation: the attention output rebuilt from the
captured q/k/v (with DINOv3's rotary embedding, BEiT's / data2vec's relative position bias) equals what the output
projection received; ffn equals ``hidden_states``; ffn_norm equals ``last_hidden_state`` or the pooling norm per
token; prefix tokens as the model has them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import (
    Aimv2VisionConfig,
    Aimv2VisionModel,
    BeitConfig,
    BeitModel,
    Data2VecVisionConfig,
    Data2VecVisionModel,
    DINOv3ViTConfig,
    DINOv3ViTModel,
    IJepaConfig,
    IJepaModel,
    ViTMSNConfig,
    ViTMSNModel,
)

from qkvprobe import load_backbone
from qkvprobe.errors import ConfigError, FeatureError, ModelError
from qkvprobe.taps import select_positions
from randomize import randomize_

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=4)
#: name → (model class, config factory, constructor kwargs, (prefix tokens, registers, class token), objective)
FAMILIES = {
    "dinov3": (
        DINOv3ViTModel,
        lambda: DINOv3ViTConfig(**TINY, intermediate_size=64, num_register_tokens=4, layerscale_value=0.5),
        {},
        (5, 4, True),
        "dino",
    ),
    "dinov3_gated": (
        DINOv3ViTModel,
        lambda: DINOv3ViTConfig(**TINY, intermediate_size=64, use_gated_mlp=True, key_bias=True),
        {},
        (1, 0, True),
        "dino",
    ),
    "beit": (
        BeitModel,
        lambda: BeitConfig(**TINY, intermediate_size=64, use_relative_position_bias=True),
        {},
        (1, 0, True),
        "mim",
    ),
    "beit_shared": (
        BeitModel,
        lambda: BeitConfig(
            **TINY, intermediate_size=64, use_shared_relative_position_bias=True, use_mean_pooling=False
        ),
        {},
        (1, 0, True),
        "mim",
    ),
    "data2vec": (
        Data2VecVisionModel,
        lambda: Data2VecVisionConfig(**TINY, intermediate_size=64, use_relative_position_bias=True),
        {"add_pooling_layer": True},
        (1, 0, True),
        "mim",
    ),
    "ijepa": (IJepaModel, lambda: IJepaConfig(**TINY, intermediate_size=64), {}, (0, 0, False), "jepa"),
    "msn": (ViTMSNModel, lambda: ViTMSNConfig(**TINY, intermediate_size=64), {}, (1, 0, True), "msn"),
    "aimv2": (
        Aimv2VisionModel,
        lambda: Aimv2VisionConfig(**TINY, intermediate_size=64),
        {},
        (0, 0, False),
        "aim",
    ),
}
#: families that take one input size only (a learnt position embedding of one grid)
FIXED = {"aimv2"}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each tiny model saved with save_pretrained, as a user's local directory would be."""
    root = tmp_path_factory.mktemp("hf-families")
    out = {}
    for name, (cls, make_config, kwargs, _, _) in FAMILIES.items():
        torch.manual_seed(0)
        randomize_(cls(make_config(), **kwargs), seed=1).save_pretrained(root / name)
        out[name] = root / name
    return out


def attention(q, k, v, num_heads, bias=None) -> torch.Tensor:
    """softmax(q kᵀ/√d + bias) v per head in float64, heads concatenated. q, k, v: [B, T, D] → [B, T, D]."""
    B, T, D = q.shape
    d = D // num_heads
    qh, kh, vh = (t.reshape(B, T, num_heads, d).transpose(1, 2).double() for t in (q, k, v))
    logits = qh @ kh.transpose(-1, -2) / math.sqrt(d)
    if bias is not None:
        logits = logits + bias.double()
    return (torch.softmax(logits, dim=-1) @ vh).transpose(1, 2).reshape(B, T, D).float()


def output_projection(layer: torch.nn.Module) -> torch.nn.Module:
    attn = layer.attention
    for path in ("o_proj", "out_proj", "output.dense"):
        module = attn
        for part in path.split("."):
            module = getattr(module, part, None)
        if module is not None:
            return module
    raise AssertionError(f"no output projection in {type(attn).__name__}")


def bias_seen(layer: torch.nn.Module) -> tuple[dict[str, torch.Tensor], list]:
    """Hooks (returning None) recording the additive attention bias the model used: BEiT passes it to the
    attention as ``attention_mask``; data2vec's self-attention computes its own table and adds a shared one."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    attn = layer.attention
    if hasattr(attn, "attention") and hasattr(attn.attention, "has_relative_position_bias"):  # data2vec
        self_attn = attn.attention
        handles.append(
            self_attn.register_forward_pre_hook(
                lambda m, a: seen.update(shared=a[2]) if a[2] is not None else None
            )
        )
        if self_attn.has_relative_position_bias:
            handles.append(
                self_attn.relative_position_bias.register_forward_hook(lambda m, a, o: seen.update(own=o))
            )
    else:
        handles.append(
            attn.register_forward_pre_hook(
                lambda m, a, kw: (
                    seen.update(mask=kw["attention_mask"]) if kw.get("attention_mask") is not None else None
                ),
                with_kwargs=True,
            )
        )
    return seen, handles


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_hf_family_attention_rebuilt(dirs, name: str, impl: str) -> None:
    bb = load_backbone(f"hf:{dirs[name]}")
    bb.model.set_attn_implementation(impl)
    width = 16 if name in FIXED else 20
    x = torch.randn(2, 3, 16, width)
    tokens = ("q", "k", "v", "q_rope", "k_rope") if bb.has_rope else ("q", "k", "v")
    for block in (0, -1):
        layer = bb.layers[block]
        proj = output_projection(layer)
        received: dict[str, torch.Tensor] = {}
        handles = [proj.register_forward_hook(lambda m, a, o, seen=received: seen.update(out=o))]
        seen, more = bias_seen(layer)
        try:
            out = bb.extract(x, blocks=(block,), tokens=tokens)
        finally:
            for handle in handles + more:
                handle.remove()
        assert out["q"].shape == (2, bb.num_prefix_tokens + 4 * (width // 4), 32)
        bias = sum(seen.values()) if seen else None
        if name.startswith(("beit", "data2vec")):
            assert bias is not None  # the relative position bias was in play
        q, k = (out["q_rope"], out["k_rope"]) if bb.has_rope else (out["q"], out["k"])
        rebuilt = proj(attention(q, k, out["v"], bb.num_heads, bias))
        torch.testing.assert_close(rebuilt, received["out"], atol=1e-4, rtol=0)
        if bb.has_rope:  # q/k are pre-rotary; prefix tokens are not rotated
            wrong = proj(attention(out["q"], out["k"], out["v"], bb.num_heads, bias))
            assert (wrong - received["out"]).abs().max() > 1e-2
            n = bb.num_prefix_tokens
            torch.testing.assert_close(out["k_rope"][:, :n], out["k"][:, :n], atol=0, rtol=0)


def _find(module: torch.nn.Module, paths: tuple[str, ...]) -> torch.nn.Module:
    for path in paths:
        found: torch.nn.Module | None = module
        for part in path.split("."):
            found = getattr(found, part, None)
        if found is not None:
            return found
    raise AssertionError(f"none of {paths} in {type(module).__name__}")


def hf_projections(layer: torch.nn.Module, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
    """q, k, v [B, T, D] of a Hugging Face layer recomputed from its input ``hidden``: the pre-attention norm,
    then ``F.linear`` with each projection's own weight and bias (None where the model has none, e.g. BEiT's
    key) — written out on the parameters, never through the modules the taps hook."""
    norm = _find(layer, ("norm1", "layernorm_before", "rms_norm1"))
    y = norm(hidden)
    out = {}
    for kind, names in (("q", ("q_proj", "query")), ("k", ("k_proj", "key")), ("v", ("v_proj", "value"))):
        proj = _find(layer, tuple(f"{p}.{n}" for p in ("attention", "attention.attention") for n in names))
        out[kind] = torch.nn.functional.linear(y, proj.weight, proj.bias)
    return out


def check_hf_projections(bb, width: int) -> None:
    """Each of q, k, v equals :func:`hf_projections` of the layer's input, blocks 0 and -1 (atol 1e-5: float32,
    values of order 1-10)."""
    x = torch.randn(2, 3, 16, width)
    seen: dict[str, torch.Tensor] = {}
    for block in (0, -1):
        layer = bb.layers[block]
        handle = layer.register_forward_pre_hook(
            lambda m, a, kw: seen.update(h=a[0] if a else kw["hidden_states"]), with_kwargs=True
        )
        try:
            out = bb.extract(x, blocks=(block,), tokens=("q", "k", "v"))
        finally:
            handle.remove()
        with torch.no_grad():
            ref = hf_projections(layer, seen["h"])
        for kind in ("q", "k", "v"):
            torch.testing.assert_close(out[kind], ref[kind], atol=1e-5, rtol=0, msg=kind)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_hf_family_qkv_taps_equal_projections_of_the_layer_input(dirs, name: str) -> None:
    """Directly, not only through the rebuilt attention (where a vector added to every key is invisible): q, k, v
    are the projections of the normalised layer input with the layer's own (random) weights and biases."""
    check_hf_projections(load_backbone(f"hf:{dirs[name]}"), 16 if name in FIXED else 20)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_hf_family_ffn_ffn_norm_and_prefix(dirs, name: str) -> None:
    bb = load_backbone(f"hf:{dirs[name]}")
    _, _, _, (prefix, registers, cls), objective = FAMILIES[name]
    assert (bb.num_prefix_tokens, bb.num_register_tokens, bb.has_cls_token) == (prefix, registers, cls)
    assert bb.objective == objective and bb.weights_source == f"hf dir: {dirs[name].resolve()}"
    x = torch.randn(2, 3, 16, 16)
    out = bb.extract(x, blocks=(0, -1), tokens=("ffn", "ffn_norm"))
    kwargs = {"interpolate_pos_encoding": True} if bb.tap_family.interpolate else {}
    with torch.no_grad():
        ref = bb.model(pixel_values=x, output_hidden_states=True, **kwargs)
    assert out[(0, "ffn")].shape == (2, prefix + 16, 32)
    torch.testing.assert_close(out[(0, "ffn")], ref.hidden_states[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[(-1, "ffn")], ref.hidden_states[-1], atol=1e-5, rtol=0)
    if bb.ffn_norm_source.startswith("pooler.layernorm"):
        # use_mean_pooling: last_hidden_state is un-normalised; the model normalises the mean of the patch tokens
        torch.testing.assert_close(ref.last_hidden_state, out[(-1, "ffn")], atol=1e-5, rtol=0)
        layernorm = bb.model.pooler.layernorm
        torch.testing.assert_close(out[(-1, "ffn_norm")], layernorm(ref.last_hidden_state), atol=1e-5, rtol=0)
        torch.testing.assert_close(
            bb.model.pooler(ref.last_hidden_state),
            layernorm(ref.last_hidden_state[:, 1:].mean(1)),
            atol=1e-5,
            rtol=0,
        )
    else:
        torch.testing.assert_close(out[(-1, "ffn_norm")], ref.last_hidden_state, atol=1e-5, rtol=0)
    assert (out[(-1, "ffn_norm")] - out[(-1, "ffn")]).abs().max() > 1e-2
    patch = select_positions(out[(-1, "ffn")], ("patch",), bb.num_prefix_tokens, bb.has_cls_token)["patch"]
    assert patch.shape == (2, 16, 32)


def test_ijepa_has_no_class_token(dirs) -> None:
    from qkvprobe.features.extract import plan_store

    bb = load_backbone(f"hf:{dirs['ijepa']}")
    out = bb.extract(torch.randn(1, 3, 16, 16), tokens=("k",))["k"]
    with pytest.raises(FeatureError, match=r"without a class token; use 'avg'"):
        select_positions(out, ("cls",), bb.num_prefix_tokens, bb.has_cls_token)
    got = select_positions(out, ("avg", "patch"), bb.num_prefix_tokens, bb.has_cls_token)
    torch.testing.assert_close(got["avg"], out.mean(1))  # all 16 tokens are patches

    class Data:  # the few attributes plan_store reads before it refuses
        task, spec = "classification", "fake"

    with pytest.raises(ConfigError, match=r"position 'cls' needs a class token but hf:.*ijepa has none"):
        plan_store(bb, Data(), positions=("cls", "avg"))


def test_aimv2_fixed_size_and_no_head(dirs) -> None:
    from qkvprobe.errors import DataError

    bb = load_backbone(f"hf:{dirs['aimv2']}")
    assert bb.model.head is None and bb.fixed_size == (16, 16)
    with pytest.raises(DataError, match=r"takes 16x16 images only"):
        bb.extract(torch.randn(1, 3, 16, 20))


def test_rope_tokens_only_on_dinov3(dirs) -> None:
    assert load_backbone(f"hf:{dirs['dinov3']}").has_rope
    bb = load_backbone(f"hf:{dirs['msn']}")
    with pytest.raises(FeatureError, match="no rotary position embedding"):
        bb.extract(torch.randn(1, 3, 16, 16), tokens=("q_rope",))


def test_aimv2_image_text_model_refused(tmp_path: Path) -> None:
    from transformers import Aimv2Config

    Aimv2Config().save_pretrained(tmp_path)
    with pytest.raises(ModelError, match=r"AIMv2 image-text model; use the vision encoder"):
        load_backbone(f"hf:{tmp_path}")
