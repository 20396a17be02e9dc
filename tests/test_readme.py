"""Every ```python block of README.md runs as written, on small data, in a temporary folder."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def mixed_folder(root: Path) -> None:
    """An image folder whose classes mix PNG and JPEG files, with a stray .txt and a hidden file."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(3):
                pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")
            (folder / "notes.txt").write_text("not an image")
            (folder / ".DS_Store").write_bytes(b"\0")


def test_readme_has_python_blocks() -> None:
    blocks = python_blocks()
    assert len(blocks) >= 2 and any("webdataset" in b for b in blocks)


@pytest.mark.parametrize("number", range(len(python_blocks())))
def test_readme_python_block_runs(number: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    block = python_blocks()[number]
    if "import webdataset" in block and importlib.util.find_spec("webdataset") is None:
        pytest.skip("webdataset is not installed")
    monkeypatch.chdir(tmp_path)
    if "imagenet" in block:
        mixed_folder(tmp_path / "imagenet")
    exec(compile(block, f"README.md python block {number}", "exec"), {"__name__": "__readme__"})
    if "imagenet-wds" in block:
        # the shards the snippet wrote from a mixed PNG/JPEG folder read back as the folder itself reads
        from qkvprobe.data import open_dataset

        for split in ("train", "test"):
            shards = open_dataset("wds:imagenet-wds", split)
            folder = open_dataset("imagefolder:imagenet", split)
            assert len(shards) == len(folder) == 6 and shards.classes == folder.classes == ["cat", "dog"]
            for i in range(len(folder)):
                (a, la), (b, lb) = shards[i], folder[i]
                assert la == lb and np.array_equal(a.numpy(), b.numpy())
