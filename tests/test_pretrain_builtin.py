"""The built-in pre-trained ViTs shipped in ``qkvprobe/backbones/builtin``: cards match weights, load offline."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qkvprobe.pretrain.card import sha256_file

BUILTIN = Path(__file__).resolve().parents[1] / "src" / "qkvprobe" / "backbones" / "builtin"
CARDS = sorted(p for p in BUILTIN.glob("*.json") if (BUILTIN / f"{p.stem}.safetensors").is_file())
CARD_KEYS = {
    "name",
    "objective",
    "timm_model",
    "model_kwargs",
    "data_config",
    "sha256",
    "params",
    "data",
    "epochs",
    "wall_time_s",
    "hardware",
    "final_loss",
    "command",
    "loss_curve",
}


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a socket fails: loading must be offline."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_one_dino_and_one_mae_model_ship() -> None:
    objectives = sorted(json.loads(p.read_text())["objective"] for p in CARDS)
    assert objectives == ["dino", "mae"], [p.name for p in CARDS]


@pytest.mark.parametrize("card_path", CARDS, ids=lambda p: p.stem)
def test_card_matches_weights(card_path: Path, no_network: None) -> None:
    import timm

    card = json.loads(card_path.read_text())
    weights = card_path.with_suffix(".safetensors")
    assert card.keys() >= CARD_KEYS, CARD_KEYS - card.keys()
    assert card["name"] == card_path.stem
    assert card["sha256"] == sha256_file(weights)
    assert weights.stat().st_size <= 12 * 2**20
    assert (BUILTIN / f"{card_path.stem}.md").is_file()
    state = load_file(str(weights))
    assert all(v.dtype == torch.float16 for v in state.values())
    assert card["params"] == sum(v.numel() for v in state.values()) <= 6_000_000
    kw = card["model_kwargs"]
    assert kw["patch_size"] == 4 and kw["dynamic_img_size"] and kw["num_classes"] == 0
    model = timm.create_model(card["timm_model"], pretrained=False, **kw)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    model.eval()
    C = card["data_config"]["input_size"][0]
    with torch.no_grad():
        for size in (28, 56):  # the garments and the scenes
            out = model.forward_features(torch.randn(2, C, size, size))
            assert out.shape == (2, 1 + (size // 4) ** 2, kw["embed_dim"])
            assert torch.isfinite(out).all()


@pytest.mark.parametrize("card_path", CARDS, ids=lambda p: p.stem)
def test_load_backbone_builtin_offline(card_path: Path, no_network: None) -> None:
    import qkvprobe

    try:
        from qkvprobe.backbones import list_models
    except ImportError:
        pytest.skip("the builtin loader (qkvprobe.backbones) is not there yet")
    bb = qkvprobe.load_backbone(f"builtin:{card_path.stem}")
    assert bb.patch_size == 4 and bb.objective == json.loads(card_path.read_text())["objective"]
    out = bb.extract(torch.randn(1, 1, 28, 28))
    assert out["q"].shape[1] == 50
    assert f"builtin:{card_path.stem}" in {m["spec"] for m in list_models()}
