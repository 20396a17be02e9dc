"""Shared fixtures. No test touches the network: models are built with random weights, data is synthetic."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("QKVPROBE_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep every cache (Scenes arrays, feature stores, downloads) of a test session out of the user's home."""
    os.environ["QKVPROBE_CACHE"] = str(tmp_path_factory.mktemp("qkvprobe-cache"))


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread for the whole session: the tests' problems are tiny, and on a shared 2-core machine
    spinning torch/BLAS threads made single solver steps and forward passes 10-80x slower."""
    from threadpoolctl import threadpool_limits

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_vit() -> torch.nn.Module:
    """A 2-block timm ViT (patch 4, 28 px, dynamic image size), every parameter random (``randomize_``), eval
    mode."""
    import timm

    from randomize import randomize_

    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=28,
        patch_size=4,
        in_chans=1,
        embed_dim=32,
        depth=2,
        num_heads=2,
        num_classes=0,
        dynamic_img_size=True,
    )
    return randomize_(model, seed=0).eval()


def write_tiny_builtin(
    model: torch.nn.Module, directory: Path, *, name: str = "tiny", mean: float = 0.286, std: float = 0.353
) -> Path:
    """Save the ``tiny_vit`` fixture as a ``builtin:`` card + float16 safetensors in ``directory`` (the format of
    ``src/qkvprobe/backbones/builtin``), so tests load it through the real loader."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / f"{name}.safetensors"
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, str(weights))
    card = {
        "name": name,
        "objective": "dino",
        "timm_model": "vit_tiny_patch16_224",
        "model_kwargs": {
            "img_size": 28,
            "patch_size": 4,
            "in_chans": 1,
            "embed_dim": 32,
            "depth": 2,
            "num_heads": 2,
        },
        "data_config": {"mean": [mean], "std": [std], "input_size": [1, 28, 28]},
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
    }
    (directory / f"{name}.json").write_text(json.dumps(card))
    return directory


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
