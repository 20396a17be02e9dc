"""Backbone specs, catalogue and the Hugging Face loaders (tiny random-init configs saved under tmp_path)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import timm
import torch
from transformers import (
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    ViTConfig,
    ViTMAEConfig,
    ViTMAEModel,
    ViTModel,
)

import qkvprobe.backbones as backbones
from qkvprobe import load_backbone
from qkvprobe.backbones import list_models
from qkvprobe.backbones.specs import objective_of
from qkvprobe.errors import ModelError, SpecError, WeightsError
from qkvprobe.vocab import objective_family
from randomize import randomize_
from test_backbones_hf_families import check_hf_projections

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=4)
HF_MODELS = {
    "vit": (ViTModel, lambda: ViTConfig(**TINY, intermediate_size=64)),
    "vit_mae": (ViTMAEModel, lambda: ViTMAEConfig(**TINY, intermediate_size=64, mask_ratio=0.75)),
    "dinov2": (Dinov2Model, lambda: Dinov2Config(**TINY, mlp_ratio=2, layerscale_value=0.5)),
    "dinov2_reg": (
        Dinov2WithRegistersModel,
        lambda: Dinov2WithRegistersConfig(**TINY, mlp_ratio=2, num_register_tokens=4),
    ),
}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each tiny HF model saved with save_pretrained, as a user's local directory would be."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, (cls, make_config) in HF_MODELS.items():
        torch.manual_seed(0)
        model = randomize_(cls(make_config()), seed=1)
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


def rebuild_attention(q, k, v, num_heads, proj):
    """softmax(q kᵀ/√d) v per head, heads concatenated, through the output projection. [B, T, D] → [B, T, D]."""
    B, T, D = q.shape
    d = D // num_heads
    qh, kh, vh = (t.reshape(B, T, num_heads, d).transpose(1, 2).double() for t in (q, k, v))
    attn = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return proj((attn @ vh).transpose(1, 2).reshape(B, T, D).float())


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(HF_MODELS))
def test_hf_attention_rebuilt(hf_dirs, name: str, impl: str) -> None:
    bb = load_backbone(f"hf:{hf_dirs[name]}")
    bb.model.set_attn_implementation(impl)
    x = torch.randn(2, 3, 16, 20)
    for block in (0, -1):
        attention = bb.layers[block].attention
        seen: dict[str, torch.Tensor] = {}

        def hook(module, args, output, seen=seen) -> None:  # returns None: the output stays the model's
            seen["out"] = output[0]

        handle = attention.register_forward_hook(hook)
        try:
            out = bb.extract(x, blocks=(block,), tokens=("q", "k", "v"))
        finally:
            handle.remove()
        assert out["q"].shape == (2, bb.num_prefix_tokens + 20, 32)
        rebuilt = rebuild_attention(out["q"], out["k"], out["v"], bb.num_heads, attention.o_proj)
        torch.testing.assert_close(rebuilt, seen["out"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_hf_ffn_norm_is_last_hidden_state(hf_dirs, name: str) -> None:
    bb = load_backbone(f"hf:{hf_dirs[name]}")
    x = torch.randn(2, 3, 16, 16)
    out = bb.extract(x, blocks=(0, -1), tokens=("ffn", "ffn_norm"))
    kwargs = {"noise": torch.arange(16.0).expand(2, -1)} if name == "vit_mae" else {}
    with torch.no_grad():
        ref = bb.model(pixel_values=x, output_hidden_states=True, **kwargs)
    torch.testing.assert_close(out[(-1, "ffn_norm")], ref.last_hidden_state, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[(0, "ffn")], ref.hidden_states[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_hf_qkv_taps_equal_projections_of_the_layer_input(hf_dirs, name: str) -> None:
    """ViT, ViT-MAE, DINOv2 (with registers): q, k, v directly equal the projections of the normalised layer
    input with the layer's own random weights and biases (tests/test_backbones_hf_families.py)."""
    check_hf_projections(load_backbone(f"hf:{hf_dirs[name]}"), 20)


def test_hf_prefix_tokens(hf_dirs) -> None:
    reg = load_backbone(f"hf:{hf_dirs['dinov2_reg']}")
    assert (reg.num_prefix_tokens, reg.num_register_tokens, reg.has_cls_token) == (5, 4, True)
    assert reg.objective == "dino" and load_backbone(f"hf:{hf_dirs['vit_mae']}").objective == "mae"
    vit = load_backbone(f"hf:{hf_dirs['vit']}")
    assert vit.model.pooler is None and vit.num_prefix_tokens == 1
    assert (vit.embed_dim, vit.num_blocks, vit.num_heads, vit.patch_size) == (32, 2, 4, 4)


def test_vit_mae_keeps_every_patch_in_order(hf_dirs) -> None:
    bb = load_backbone(f"hf:{hf_dirs['vit_mae']}")
    assert bb.model.config.mask_ratio == 0.0
    x = torch.randn(2, 3, 16, 16)
    emb = bb.model.embeddings
    seen = {}
    handle = emb.register_forward_hook(lambda m, a, o: seen.update(emb=o[0]))  # returns None
    try:
        first = bb.extract(x)
    finally:
        handle.remove()
    second = bb.extract(x)
    for token in first:
        torch.testing.assert_close(first[token], second[token], atol=0, rtol=0)
    assert first["ffn"].shape[1] == 1 + 16
    with torch.no_grad():  # independent: patch projection + position embedding, in raster order
        expected = emb.patch_embeddings(x) + emb.position_embeddings[:, 1:]
    torch.testing.assert_close(seen["emb"][:, 1:], expected, atol=1e-6, rtol=0)


def test_hf_data_config_from_preprocessor(hf_dirs, tmp_path: Path) -> None:
    import shutil

    target = tmp_path / "withproc"
    shutil.copytree(hf_dirs["dinov2"], target)
    (target / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_mean": [0.1, 0.2, 0.3],
                "image_std": [0.4, 0.5, 0.6],
                "resample": 3,
                "do_center_crop": True,
                "crop_size": {"height": 224, "width": 224},
                "size": {"shortest_edge": 256},
            }
        )
    )
    config = load_backbone(f"hf:{target}").data_config
    assert config["mean"] == (0.1, 0.2, 0.3) and config["std"] == (0.4, 0.5, 0.6)
    assert config["input_size"] == (3, 16, 16) and config["interpolation"] == "bicubic"
    assert config["crop_pct"] == pytest.approx(0.875)
    default = load_backbone(f"hf:{hf_dirs['vit']}").data_config
    assert default["mean"] == (0.485, 0.456, 0.406)


def test_hf_dir_without_config(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"has no config\.json"):
        load_backbone(f"hf:{tmp_path}")


def test_hf_unsupported_type(tmp_path: Path) -> None:
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="'bert' model; qkvprobe taps"):
        load_backbone(f"hf:{tmp_path}")


def test_hf_unknown_repo_suggests(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SpecError, match="did you mean facebook/dino-vits16"):
        load_backbone("hf:facebook/dino-vits61")


@pytest.mark.parametrize(
    ("spec", "error", "pattern"),
    [
        (
            "timm:vit_smal_patch16_224.dino",
            SpecError,
            "unknown timm model.*did you mean vit_small_patch16_224.dino",
        ),
        (
            "timm:vit_small_patch16_224.dinoo",
            SpecError,
            "unknown timm pretrained tag.*vit_small_patch16_224.dino",
        ),
        ("tim:vit_small_patch16_224", SpecError, "unknown backbone prefix 'tim'.*did you mean timm"),
        (
            "vit_small_patch16_224.dino",
            SpecError,
            "needs a prefix.*did you mean 'timm:vit_small_patch16_224.dino'",
        ),
        ("timm:", SpecError, "needs a prefix and a name"),
        ("builtin:fmnist_dnio", SpecError, "unknown built-in model 'fmnist_dnio'.*did you mean fmnist_dino"),
    ],
)
def test_spec_errors(spec, error, pattern, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "fmnist_dino.json").write_text("{}")
    monkeypatch.setattr(backbones, "builtin_dir", lambda: tmp_path)
    with pytest.raises(error, match=pattern):
        load_backbone(spec)


def test_timm_pretrained_unavailable_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    real = timm.create_model

    def offline(name, **kwargs):
        if kwargs.get("pretrained"):
            raise OSError("offline")  # what the hub client raises without network
        return real(name, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(
        WeightsError,
        match=r"could not fetch pretrained weights for timm:vit_small_patch16_224\.dino.*--weights PATH",
    ):
        load_backbone("timm:vit_small_patch16_224.dino")


@pytest.mark.parametrize(
    ("name", "family"),
    [
        ("vit_small_patch16_224.dino", "dino"),
        ("vit_small_patch14_reg4_dinov2.lvd142m", "dino"),
        ("facebook/dinov2-small", "dino"),
        ("ibot_vit_b16", "dino"),
        ("vit_base_patch16_224.mae", "mae"),
        ("facebook/vit-mae-base", "mae"),
        ("beit_base_patch16_224", "mim"),
        ("microsoft/beit-base-patch16-224-pt22k", "mim"),
        ("data2vec-vision", "mim"),
        ("simmim_vit", "mim"),
        ("eva02_base_patch14_224.mim_in22k", "mim"),
        ("eva02_base_patch16_clip_224.merged2b", "unknown"),
        ("vit_base_patch16_dinov3.lvd1689m", "dino"),
        ("facebook/dinov3-vitb16-pretrain-lvd1689m", "dino"),
        ("mocov3_vit_base", "dino"),
        ("facebook/vit-msn-base", "msn"),
        ("facebook/ijepa_vith14_1k", "jepa"),
        ("aimv2_large_patch14_224.apple_pt", "aim"),
        ("vit_small_patch16_224.augreg_in21k", "unknown"),
    ],
)
def test_objective_of(name: str, family: str) -> None:
    assert objective_of(name) == family


def test_list_models(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    card = {"name": "fmnist_mae", "objective": "mae", "data": "fashion-mnist", "epochs": 3, "params": 1234}
    (tmp_path / "fmnist_mae.json").write_text(json.dumps(card))
    monkeypatch.setattr(backbones, "builtin_dir", lambda: tmp_path)
    rows = list_models()
    assert all(set(r) == {"spec", "objective", "family", "notes", "details"} for r in rows)
    specs = {r["spec"]: r for r in rows}
    assert (
        specs["builtin:fmnist_mae"]["objective"] == "mae"
        and "3 epochs" in specs["builtin:fmnist_mae"]["notes"]
    )
    for spec, family in [
        ("timm:vit_small_patch16_224.dino", "dino"),
        ("timm:vit_base_patch16_224.mae", "mae"),
        ("timm:vit_small_patch14_reg4_dinov2.lvd142m", "dino"),
        ("hf:facebook/vit-mae-base", "mae"),
        ("hf:facebook/dino-vits16", "dino"),
        ("hf:facebook/dinov2-small", "dino"),
        ("timm:vit_base_patch16_dinov3.lvd1689m", "dino"),
        ("timm:eva02_base_patch14_224.mim_in22k", "mim"),
        ("timm:beit_base_patch16_224.in22k_ft_in22k", "mim"),
        ("timm:aimv2_large_patch14_224.apple_pt", "aim"),
        ("hf:facebook/dinov3-vitb16-pretrain-lvd1689m", "dino"),
        ("hf:microsoft/beit-base-patch16-224-pt22k", "mim"),
        ("hf:facebook/data2vec-vision-base", "mim"),
        ("hf:facebook/vit-msn-base", "msn"),
        ("hf:facebook/ijepa_vith14_1k", "jepa"),
    ]:
        assert specs[spec]["objective"] == family
        assert specs[spec]["family"] == objective_family(family)
    assert {r["family"] for r in rows} == {"joint-embedding", "masked-image-modelling", "other"}
    pretrained = set(timm.list_pretrained())
    assert all(s.split(":", 1)[1] in pretrained for s in specs if s.startswith("timm:"))


def test_timm_data_config_and_attributes(tmp_path: Path) -> None:
    from qkvprobe.backbones.timm_backbone import TimmBackbone

    torch.manual_seed(0)
    model = timm.create_model(
        "vit_small_patch16_224.dino", pretrained=False, depth=1, num_classes=0, dynamic_img_size=True
    )
    randomize_(model, seed=0)
    bb = TimmBackbone(model, spec="timm:vit_small_patch16_224.dino", objective="dino", device="cpu")
    assert bb.data_config["input_size"] == (3, 224, 224)
    assert bb.data_config["mean"] == pytest.approx((0.485, 0.456, 0.406))
    assert {"interpolation", "crop_pct"} <= set(bb.data_config)
    assert (bb.embed_dim, bb.num_heads, bb.patch_size, bb.num_prefix_tokens) == (384, 6, 16, 1)
    assert len(bb.weights_digest) == 64
