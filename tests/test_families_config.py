"""configs/families.yaml: the families side by side validates with the config loader."""

from __future__ import annotations

from pathlib import Path

from qkvprobe.backbones.specs import KNOWN_HF, objective_of, split_spec
from qkvprobe.config import load_config
from qkvprobe.vocab import objective_family

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "families.yaml"


def test_families_config_validates() -> None:
    cfg = load_config(CONFIG)
    objectives = [objective_of(split_spec(m.spec)[1]) for m in cfg.models]
    assert objectives == ["dino", "dino", "mae", "mim", "mim", "jepa"]
    assert {objective_family(o) for o in objectives} == {"joint-embedding", "masked-image-modelling", "other"}
    assert all(m.weights for m in cfg.models if m.spec.startswith("timm:"))
    assert split_spec(cfg.models[-1].spec)[1] in KNOWN_HF
    assert cfg.datasets[0].positions == ["avg"]  # I-JEPA has no class token
    assert "ffn_norm" in cfg.tokens and len({m.name for m in cfg.models}) == 6
