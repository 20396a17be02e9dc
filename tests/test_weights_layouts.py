"""``--weights`` in the official checkpoint layouts of the families (no downloads): a small random model's state
dict renamed to each layout, loaded, and the loaded model's tokens compared with the source model's own outputs.
Also the weights source every loader records."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from qkvprobe import load_backbone
from qkvprobe.backbones.timm_backbone import TimmBackbone, _filter_fn
from qkvprobe.backbones.weights import load_weights
from qkvprobe.errors import WeightsError
from randomize import randomize_

BASE = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=4, num_classes=0)
X = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))


def timm_model(name: str, seed: int, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomize_(timm.create_model(name, pretrained=False, **BASE, **kwargs), seed).eval()


def load_into(target: torch.nn.Module, path: Path) -> tuple[TimmBackbone, str]:
    """``--weights`` as load_timm does it (timm's own filter as ``adapt``), wrapped as a backbone."""
    note = load_weights(target, path, label="test", adapt=_filter_fn(target))
    return TimmBackbone(target, spec="timm:test", objective="unknown", device="cpu"), note


def reference(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(last block output incl. prefix tokens, forward_features) of the source model."""
    with torch.no_grad():
        patches, prefix = model.forward_intermediates(
            x,
            indices=[len(model.blocks) - 1],
            output_fmt="NLC",
            intermediates_only=True,
            return_prefix_tokens=True,
        )[0]
        return torch.cat([prefix, patches], 1), model.forward_features(x)


def test_dinov3_official_layout(tmp_path: Path) -> None:
    """facebookresearch/dinov3: storage_tokens, ls1/ls2.gamma, one qkv.bias (+ bias_mask), rope periods, mask_token."""
    source = timm_model("vit_small_patch16_dinov3_qkvb", seed=3, dynamic_img_size=True)
    official = {}
    for key, value in source.state_dict().items():
        key = (
            key.replace("reg_token", "storage_tokens")
            .replace("gamma_1", "ls1.gamma")
            .replace("gamma_2", "ls2.gamma")
        )
        if key.endswith("attn.q_bias"):
            attn = key[: -len("q_bias")]
            v_bias = source.state_dict()[attn + "v_bias"]
            official[attn + "qkv.bias"] = torch.cat([value, torch.zeros_like(value), v_bias])
            official[attn + "qkv.bias_mask"] = torch.ones(3 * value.numel())
        elif not key.endswith("attn.v_bias"):
            official[key] = value
    official.update({"mask_token": torch.zeros(1, 32), "rope_embed.periods": torch.ones(4)})
    torch.save(official, tmp_path / "dinov3_vits16_pretrain.pth")
    bb, _ = load_into(
        timm_model("vit_small_patch16_dinov3_qkvb", seed=0, dynamic_img_size=True),
        tmp_path / "dinov3_vits16_pretrain.pth",
    )
    ffn, features = reference(source, X)
    out = bb.extract(X, tokens=("ffn", "ffn_norm", "q_rope"))
    torch.testing.assert_close(out["ffn"], ffn, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["ffn_norm"], features, atol=1e-5, rtol=0)


def eva02_original(source: torch.nn.Module) -> dict[str, torch.Tensor]:
    """EVA-02's own names (baaivision/EVA): q_bias/v_bias, mlp.w1/w2/w3 + ffn_ln, the MIM final norm, lm_head."""
    out = {}
    for key, value in source.state_dict().items():
        key = (
            key.replace("attn.q_proj.bias", "attn.q_bias")
            .replace("attn.v_proj.bias", "attn.v_bias")
            .replace("mlp.fc1_g", "mlp.w1")
            .replace("mlp.fc1_x", "mlp.w2")
            .replace("mlp.fc2", "mlp.w3")
            .replace("mlp.norm", "mlp.ffn_ln")
            .replace("fc_norm", "norm")
        )
        out[key] = value
    out.update(
        mask_token=torch.zeros(1, 1, 32),
        **{
            "lm_head.weight": torch.zeros(8, 32),
            "lm_head.bias": torch.zeros(8),
            "rope.freqs_cos": torch.ones(3, 2),
        },
    )
    return out


def test_eva02_module_layout(tmp_path: Path) -> None:
    source = timm_model("eva02_base_patch14_224", seed=4)
    torch.save({"module": eva02_original(source)}, tmp_path / "eva02_B_pt_in21k_p14.pt")
    bb, note = load_into(timm_model("eva02_base_patch14_224", seed=0), tmp_path / "eva02_B_pt_in21k_p14.pt")
    assert "container 'module'" in note and "final norm 'norm.' → pooling norm 'fc_norm.'" in note
    ffn, features = reference(source, X)
    out = bb.extract(X, tokens=("ffn", "ffn_norm"))
    torch.testing.assert_close(out["ffn"], ffn, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["ffn_norm"], source.fc_norm(features), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shared", [True, False], ids=["shared-bias", "per-block-bias"])
def test_beit_codebase_pretraining_layout(tmp_path: Path, shared: bool) -> None:
    """BEiT (shared relative position bias) and data2vec vision (trained with the BEiT code base) pre-training
    checkpoints: {"model": {..., "norm.*", "mask_token", "lm_head.*"}} → timm Beit with per-block bias + fc_norm."""
    bias = (
        {"use_shared_rel_pos_bias": True, "use_rel_pos_bias": False} if shared else {"use_rel_pos_bias": True}
    )
    source = timm_model("beit_base_patch16_224", seed=5, use_fc_norm=False, **bias)
    state = dict(source.state_dict(), mask_token=torch.zeros(1, 1, 32))
    state.update({"lm_head.weight": torch.zeros(8, 32), "lm_head.bias": torch.zeros(8)})
    torch.save({"model": state, "epoch": 799}, tmp_path / "pt22k.pth")
    bb, note = load_into(timm_model("beit_base_patch16_224", seed=0), tmp_path / "pt22k.pth")
    assert ("shared relative position bias copied into 2 blocks" in note) == shared
    assert (
        "pooling norm 'fc_norm.'" in note
        and "3 pre-training-only keys dropped (mask_token 1, lm_head 2)" in note
    )
    ffn, features = reference(source, X)  # source.norm is the pre-training final norm
    out = bb.extract(X, tokens=("ffn", "ffn_norm"))
    torch.testing.assert_close(out["ffn"], ffn, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["ffn_norm"], features, atol=1e-5, rtol=0)


def test_moco_v3_layout_keeps_base_encoder(tmp_path: Path) -> None:
    """facebookresearch/moco-v3: {"state_dict": {"module.base_encoder.*", "module.momentum_encoder.*",
    "module.predictor.*"}}; the online base_encoder is the model (its projection head is dropped)."""
    base, momentum = timm_model("vit_tiny_patch16_224", seed=6), timm_model("vit_tiny_patch16_224", seed=7)
    state = {f"module.base_encoder.{k}": v for k, v in base.state_dict().items()}
    state.update({f"module.momentum_encoder.{k}": v for k, v in momentum.state_dict().items()})
    state.update(
        {
            "module.base_encoder.head.0.weight": torch.zeros(8, 32),
            "module.predictor.0.weight": torch.zeros(8, 8),
        }
    )
    torch.save({"epoch": 300, "arch": "vit_base", "state_dict": state}, tmp_path / "vit-b-300ep.pth.tar")
    bb, note = load_into(timm_model("vit_tiny_patch16_224", seed=0), tmp_path / "vit-b-300ep.pth.tar")
    assert "MoCo v3 base_encoder kept" in note
    _, features = reference(base, X)
    torch.testing.assert_close(bb.extract(X, tokens=("ffn_norm",))["ffn_norm"], features, atol=1e-6, rtol=0)
    del state["module.base_encoder.blocks.1.mlp.fc2.bias"]
    torch.save({"state_dict": state}, tmp_path / "broken.pth.tar")
    with pytest.raises(
        WeightsError,
        match=r"broken\.pth\.tar does not fit test after .*MoCo v3 .*1 missing \(blocks\.1\.mlp\.fc2\.bias\)",
    ):
        load_weights(timm_model("vit_tiny_patch16_224", seed=0), tmp_path / "broken.pth.tar", label="test")


@pytest.mark.parametrize("layout", ["full", "teacher-file"])
def test_ibot_layouts(tmp_path: Path, layout: str) -> None:
    """bytedance/ibot: checkpoint.pth {"teacher": {"backbone.*", "head.*"}, "student": {..., "masked_embed"}}
    and checkpoint_teacher.pth {"state_dict": {...}}."""
    teacher = timm_model("vit_tiny_patch16_224", seed=8)
    backbone = {f"backbone.{k}": v for k, v in teacher.state_dict().items()}
    if layout == "full":
        student = {f"module.{k}": v + 1 for k, v in backbone.items()}
        student["module.backbone.masked_embed"] = torch.zeros(32)
        checkpoint = {
            "teacher": dict(backbone, **{"head.mlp.0.weight": torch.zeros(8, 32)}),
            "student": student,
        }
    else:
        checkpoint = {"state_dict": dict(teacher.state_dict(), masked_embed=torch.zeros(32))}
    torch.save(checkpoint, tmp_path / "ibot.pth")
    bb, note = load_into(timm_model("vit_tiny_patch16_224", seed=0), tmp_path / "ibot.pth")
    assert ("container 'teacher'" if layout == "full" else "container 'state_dict'") in note
    _, features = reference(teacher, X)
    torch.testing.assert_close(bb.extract(X, tokens=("ffn_norm",))["ffn_norm"], features, atol=1e-6, rtol=0)


def test_hf_beit_mim_layout(tmp_path: Path) -> None:
    """A BeitForMaskedImageModeling state dict (``beit.`` prefix, embeddings.mask_token, top-level MIM layernorm,
    lm_head) into ``hf:<BeitModel dir>`` with mean pooling: the MIM layernorm becomes pooler.layernorm."""
    from transformers import BeitConfig, BeitForMaskedImageModeling, BeitModel

    config = BeitConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=16,
        patch_size=4,
        use_relative_position_bias=True,
        use_mean_pooling=True,
    )
    BeitModel(config).save_pretrained(tmp_path / "arch")
    torch.manual_seed(9)
    source = randomize_(BeitForMaskedImageModeling(config), 9).eval()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "mim.safetensors"))
    bb = load_backbone(f"hf:{tmp_path / 'arch'}", weights=tmp_path / "mim.safetensors")
    assert "pooling norm 'pooler.layernorm.'" in bb.weights_info
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = source.layernorm(source.beit(pixel_values=x).last_hidden_state)
    torch.testing.assert_close(bb.extract(x, tokens=("ffn_norm",))["ffn_norm"], expected, atol=1e-5, rtol=0)


def test_dinov3_official_file_into_eva02_reports_keys(tmp_path: Path) -> None:
    source = timm_model("vit_small_patch16_dinov3", seed=3, dynamic_img_size=True)
    torch.save(
        {k.replace("reg_token", "storage_tokens"): v for k, v in source.state_dict().items()},
        tmp_path / "d3.pth",
    )
    with pytest.raises(
        WeightsError,
        match=r"d3\.pth does not fit test after .*: 23 missing .*; 11 unexpected .*; 2 wrong shape",
    ):
        load_weights(
            timm_model("eva02_base_patch14_224", seed=0), tmp_path / "d3.pth", label="test", adapt=None
        )


# --- weights_source ----------------------------------------------------------------------------------------


def test_weights_source_of_a_file_spec(tmp_path: Path) -> None:
    source = randomize_(timm.create_model("eva02_tiny_patch14_224", pretrained=False, num_classes=0), 0)
    path = tmp_path / "ckpt.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    bb = load_backbone("timm:eva02_tiny_patch14_224", weights=path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert bb.weights_source == f"file: ckpt.safetensors (sha256 {digest})"
    assert bb.objective == "mim" and bb.has_rope and bb.family == "timm Eva"


def test_weights_source_of_timm_hub_and_builtin(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import qkvprobe.backbones as backbones
    from conftest import write_tiny_builtin

    real = timm.create_model

    def cached(name, **kwargs):  # what a download from the hub cache returns, without the download
        kwargs["pretrained"] = False
        return randomize_(real(name, **kwargs), 0)

    monkeypatch.setattr(timm, "create_model", cached)
    assert (
        load_backbone("timm:vit_small_patch16_224.dino").weights_source
        == "timm hub: vit_small_patch16_224.dino"
    )
    default_tag = real("vit_tiny_patch16_224", pretrained=False).pretrained_cfg["tag"]
    assert (
        load_backbone("timm:vit_tiny_patch16_224").weights_source
        == f"timm hub: vit_tiny_patch16_224.{default_tag}"
    )
    model = randomize_(
        timm.create_model(
            "vit_tiny_patch16_224",
            img_size=28,
            patch_size=4,
            in_chans=1,
            embed_dim=32,
            depth=2,
            num_heads=2,
            num_classes=0,
        ),
        0,
    )
    monkeypatch.setattr(backbones, "builtin_dir", lambda: write_tiny_builtin(model, tmp_path))
    assert load_backbone("builtin:tiny").weights_source == "builtin: tiny.safetensors"


def test_weights_source_in_store_manifest_not_in_key(tiny_vit, tmp_path: Path) -> None:
    from qkvprobe.features.extract import plan_store

    class Data:  # what plan_store reads of a dataset
        task, spec, split, fingerprint, classes, source = "classification", "fake", "train", "f0", ["a"], ""

        def __len__(self) -> int:
            return 3

    bb = TimmBackbone(
        tiny_vit,
        spec="timm:t",
        objective="dino",
        device="cpu",
        data_config={"mean": [0.5], "std": [0.5], "input_size": [1, 28, 28]},
        weights_source="file: a.pth (sha256 0)",
    )
    manifest, _ = plan_store(bb, Data(), positions=("cls",))
    assert manifest["backbone"]["weights_source"] == "file: a.pth (sha256 0)"
    assert "weights_source" not in manifest["key_fields"]
    bb.weights_source = "file: b.pth (sha256 1)"
    assert plan_store(bb, Data(), positions=("cls",))[0]["key"] == manifest["key"]


@pytest.mark.parametrize(
    ("name", "weights", "note", "objective"),
    [
        ("vit_base_patch16_224.dino", "/w/mae_pretrain_vit_base.pth", "", "dino"),  # the spec name decides
        ("vit_base_patch16_224", "/w/dino_vitbase16_pretrain.pth", "", "dino"),
        ("vit_base_patch16_224", "/w/mae_pretrain_vit_base.pth", "", "mae"),
        ("vit_base_patch16_224", "/w/vit-b-300ep.pth.tar", "loaded (MoCo v3 base_encoder kept …)", "dino"),
        ("vit_base_patch16_224", "/w/checkpoint.pth", "", "unknown"),
        ("vit_base_patch16_224", None, "", "unknown"),
    ],
)
def test_objective_of_a_bare_architecture_from_its_weights(name, weights, note, objective) -> None:
    from qkvprobe.backbones.specs import objective_with_weights

    assert objective_with_weights(name, weights, note) == objective


def test_moco_file_into_a_timm_architecture_is_labelled_dino(tmp_path: Path) -> None:
    base = randomize_(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0), 0)
    state = {f"module.base_encoder.{k}": v for k, v in base.state_dict().items()}
    state.update({f"module.momentum_encoder.{k}": v for k, v in base.state_dict().items()})
    torch.save({"state_dict": state}, tmp_path / "vit-t-300ep.pth.tar")
    bb = load_backbone("timm:vit_tiny_patch16_224", weights=tmp_path / "vit-t-300ep.pth.tar")
    assert bb.objective == "dino" and "MoCo v3 base_encoder kept" in bb.weights_info
