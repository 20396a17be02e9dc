"""``--weights PATH`` and built-in cards: round trips, checkpoint containers, key diffs, digests, bad files."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import qkvprobe.backbones as backbones
from qkvprobe import load_backbone
from qkvprobe.backbones.weights import load_weights, state_dict_digest
from qkvprobe.errors import WeightsError
from randomize import randomize_

KWARGS = dict(
    img_size=16,
    patch_size=4,
    in_chans=1,
    embed_dim=32,
    depth=2,
    num_heads=2,
    num_classes=0,
    dynamic_img_size=True,
)
X = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))


def tiny(seed: int = 0) -> torch.nn.Module:
    return randomize_(timm.create_model("vit_tiny_patch16_224", pretrained=False, **KWARGS), seed).eval()


def write_card(directory: Path, name: str, state: dict[str, torch.Tensor], **extra) -> Path:
    """A built-in model as CONTRACTS.md describes it: float16 safetensors + JSON card with its sha256."""
    weights = directory / f"{name}.safetensors"
    save_file({k: v.to(torch.float16).contiguous() for k, v in state.items()}, str(weights))
    card = {
        "name": name,
        "objective": "dino",
        "timm_model": "vit_tiny_patch16_224",
        "model_kwargs": KWARGS,
        "data_config": {"mean": [0.286], "std": [0.353], "input_size": [1, 16, 16]},
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "params": 1,
        "data": "fashion-mnist",
        "epochs": 1,
        **extra,
    }
    (directory / f"{name}.json").write_text(json.dumps(card))
    return weights


@pytest.fixture
def builtin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[torch.nn.Module, Path]:
    """``builtin:fmnist_dino`` in a tmp dir, with its source model."""
    source = tiny(seed=3)
    weights = write_card(tmp_path, "fmnist_dino", source.state_dict())
    monkeypatch.setattr(backbones, "builtin_dir", lambda: tmp_path)
    return source, weights


def test_builtin_loads_card(builtin) -> None:
    source, _ = builtin
    bb = load_backbone("builtin:fmnist_dino")
    assert bb.objective == "dino" and bb.spec == "builtin:fmnist_dino"
    assert bb.data_config["input_size"] == (1, 16, 16) and bb.data_config["mean"] == (0.286,)
    with torch.no_grad():  # float16 storage: equal to the source up to half precision
        ref = source.forward_features(X)
    torch.testing.assert_close(bb.extract(X, tokens=("ffn_norm",))["ffn_norm"], ref, atol=2e-2, rtol=1e-2)
    half = tiny(seed=3).half().float()
    assert bb.weights_digest == state_dict_digest(half.state_dict())


def test_builtin_sha_mismatch(builtin) -> None:
    _, weights = builtin
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=r"fmnist_dino\.safetensors has sha256 .* but its card says"):
        load_backbone("builtin:fmnist_dino")


def test_builtin_card_incomplete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "broken.json").write_text(json.dumps({"name": "broken"}))
    monkeypatch.setattr(backbones, "builtin_dir", lambda: tmp_path)
    with pytest.raises(WeightsError, match=r"broken\.json lacks objective, timm_model"):
        load_backbone("builtin:broken")


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_weights_round_trip(builtin, tmp_path: Path, fmt: str) -> None:
    other = tiny(seed=7)  # different from the card's weights, so loading them is observable
    path = tmp_path / f"other.{fmt}"
    if fmt == "safetensors":
        save_file(other.state_dict(), str(path))
    else:
        torch.save(other.state_dict(), path)
    bb = load_backbone("builtin:fmnist_dino", weights=path)
    with torch.no_grad():
        ref = other.forward_features(X)
        ffn = other.forward_intermediates(
            X, indices=[1], output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True
        )[0]
    out = bb.extract(X)
    torch.testing.assert_close(out["ffn_norm"], ref, atol=0, rtol=0)
    torch.testing.assert_close(out["ffn"], torch.cat([ffn[1], ffn[0]], 1), atol=0, rtol=0)
    assert bb.weights_digest == state_dict_digest(other.state_dict())  # format-independent


def test_digest_depends_on_values_not_format() -> None:
    a, b = tiny(seed=1).state_dict(), tiny(seed=1).state_dict()
    assert state_dict_digest(a) == state_dict_digest(b)
    b["norm.bias"] = b["norm.bias"] + 1e-3
    assert state_dict_digest(a) != state_dict_digest(b)
    c = dict(a)
    c["norm.bias"] = c["norm.bias"].double()
    assert state_dict_digest(a) != state_dict_digest(c)


def test_dino_checkpoint_container(tmp_path: Path) -> None:
    """DINO's checkpoint.pth: {"teacher": {"backbone.*", "head.*"}, "student": ..., "epoch": ...}."""
    source = tiny(seed=5)
    state = {f"backbone.{k}": v for k, v in source.state_dict().items()}
    state["head.mlp.0.weight"] = torch.zeros(8, 32)
    state["head.last_layer.weight_g"] = torch.ones(1, 8)
    path = tmp_path / "checkpoint.pth"
    torch.save({"teacher": state, "student": {k: v + 1 for k, v in state.items()}, "epoch": 3}, path)
    target = tiny(seed=0)
    note = load_weights(target, path, label="test")
    assert (
        "container 'teacher'" in note
        and "prefix 'backbone.'" in note
        and "2 pre-training-only keys dropped (head 2)" in note
    )
    for key, value in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value, atol=0, rtol=0)


def test_mae_and_ddp_containers(tmp_path: Path) -> None:
    """MAE's {"model": {... "decoder_*", "mask_token"}} and DDP's {"state_dict": {"module.*"}}."""
    source = tiny(seed=6)
    mae = dict(source.state_dict(), decoder_embed=torch.zeros(3), mask_token=torch.zeros(1, 1, 32))
    torch.save({"model": mae}, tmp_path / "mae.pth")
    ddp = {f"module.{k}": v for k, v in source.state_dict().items()}
    torch.save({"state_dict": ddp}, tmp_path / "ddp.pth")
    for name, expect in [("mae.pth", "container 'model'"), ("ddp.pth", "prefix 'module.'")]:
        target = tiny(seed=0)
        assert expect in load_weights(target, tmp_path / name, label="test")
        torch.testing.assert_close(target.pos_embed, source.pos_embed, atol=0, rtol=0)


def test_timm_spec_with_weights(tmp_path: Path) -> None:
    """``timm:<arch>`` + a DINO-style teacher checkpoint of that architecture (no network)."""
    torch.manual_seed(0)
    source = randomize_(
        timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=1), 0
    ).eval()
    path = tmp_path / "dino_teacher.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in source.state_dict().items()}}, path)
    # a 12-block architecture vs a 1-block file
    with pytest.raises(WeightsError, match=r"132 missing \(blocks\.1\.attn"):
        load_backbone("timm:vit_tiny_patch16_224", weights=path)
    full = randomize_(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0), 1).eval()
    torch.save({"teacher": {f"backbone.{k}": v for k, v in full.state_dict().items()}}, path)
    bb = load_backbone("timm:vit_tiny_patch16_224", weights=path)
    assert "teacher" in bb.weights_info and bb.weights_digest == state_dict_digest(full.state_dict())


def test_hf_weights_with_prefix(tmp_path: Path) -> None:
    """A ViTForImageClassification-style file (``vit.`` prefix + classifier) into ``hf:<dir>``."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=16,
        patch_size=4,
    )
    ViTModel(config, add_pooling_layer=False).save_pretrained(tmp_path / "arch")
    torch.manual_seed(1)
    source = randomize_(ViTModel(config, add_pooling_layer=False), 1).eval()
    state = {f"vit.{k}": v for k, v in source.state_dict().items()}
    state["classifier.weight"] = torch.zeros(10, 32)
    save_file(state, str(tmp_path / "cls.safetensors"))
    bb = load_backbone(f"hf:{tmp_path / 'arch'}", weights=tmp_path / "cls.safetensors")
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        ref = source(pixel_values=x).last_hidden_state
    torch.testing.assert_close(bb.extract(x, tokens=("ffn_norm",))["ffn_norm"], ref, atol=1e-6, rtol=0)


def test_missing_and_unexpected_keys(tmp_path: Path) -> None:
    state = tiny().state_dict()
    del state["blocks.1.mlp.fc2.weight"], state["norm.weight"]
    state["blocks.9.extra"] = torch.zeros(1)
    save_file(state, str(tmp_path / "partial.safetensors"))
    with pytest.raises(
        WeightsError,
        match=r"partial\.safetensors does not fit test: 2 missing \(blocks\.1\.mlp\.fc2\.weight, norm\.weight\); "
        r"1 unexpected \(blocks\.9\.extra\)",
    ) as info:
        load_weights(tiny(), tmp_path / "partial.safetensors", label="test")
    assert "\n" not in str(info.value)


def test_wrong_shape(tmp_path: Path) -> None:
    state = tiny().state_dict()
    state["pos_embed"] = torch.zeros(1, 17, 48)  # other width: no resampling can fix it
    state["blocks.0.attn.qkv.weight"] = torch.zeros(48, 32)
    torch.save(state, tmp_path / "wide.pth")
    with pytest.raises(
        WeightsError,
        match=r"2 wrong shape \(blocks\.0\.attn\.qkv\.weight file \[48, 32\] vs model \[96, 32\]",
    ):
        load_weights(tiny(), tmp_path / "wide.pth", label="test")


@pytest.mark.parametrize(
    ("name", "content"),
    [("noise.pth", bytes(range(256)) * 8), ("notes.safetensors", b"just some text\n"), ("empty.bin", b"")],
)
def test_not_a_checkpoint(tmp_path: Path, name: str, content: bytes) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(WeightsError, match=f"weights file .*{re.escape(name)} is not a checkpoint"):
        load_weights(tiny(), tmp_path / name, label="test")


def test_not_a_state_dict(tmp_path: Path) -> None:
    torch.save({"epoch": 3, "args": [1, 2]}, tmp_path / "meta.pth")
    with pytest.raises(
        WeightsError, match=r"meta\.pth has no state dict: top-level keys \['args', 'epoch'\]"
    ):
        load_weights(tiny(), tmp_path / "meta.pth", label="test")
    with pytest.raises(WeightsError, match=r"missing\.pth does not exist"):
        load_weights(tiny(), tmp_path / "missing.pth", label="test")
