"""Fashion-MNIST Scenes: byte-identical from a seed, labels follow the documented rule, cached on disk."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import pytest

from qkvprobe.data import class_pixel_counts, open_dataset
from qkvprobe.data import scenes as sc
from qkvprobe.errors import SpecError
from qkvprobe.io import temporaries

SMALL = "fashion-mnist-scenes?seed=0&train=64&test=16&source=bundled"
DEBIAN = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QKVPROBE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("QKVPROBE_OFFLINE", "1")
    monkeypatch.delenv("QKVPROBE_DATA", raising=False)


def digest(ds) -> str:
    return hashlib.sha256(ds.images.tobytes() + ds.masks.tobytes()).hexdigest()


def test_byte_identical_for_a_seed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = open_dataset(SMALL, "train")
    monkeypatch.setenv("QKVPROBE_CACHE", str(tmp_path / "other-cache"))  # regenerate, do not read the cache
    second = open_dataset(SMALL, "train")
    assert first.source.startswith("generated") and second.source.startswith("generated")
    assert digest(first) == digest(second) and first.fingerprint == second.fingerprint
    # Hard-coded once: a change of the generator or of numpy's stream fails here.
    assert digest(first) == "d42dbf873b16f2bed595a9e181ac1489196f52ecd2b9ffa3b3316400c69fbc5a"
    other = open_dataset(SMALL.replace("seed=0", "seed=1"), "train")
    assert digest(other) != digest(first) and other.fingerprint != first.fingerprint


def test_scene_rule_matches_the_docstring() -> None:
    ds = open_dataset(SMALL, "train")
    source = open_dataset("fashion-mnist?source=bundled", "train")
    assert ds.task == "segmentation" and ds.classes[0] == "background" and len(ds.classes) == 11
    image, mask = ds[3]
    assert tuple(image.shape) == (1, 56, 56) and tuple(mask.shape) == (56, 56)
    assert (ds.garment == -1).any() and (ds.garment >= 0).any() and np.abs(ds.shift).max() <= sc.MAX_SHIFT
    for n in range(len(ds)):
        for cell in range(4):
            r, c = divmod(cell, 2)
            tile = ds.images[n, 28 * r : 28 * r + 28, 28 * c : 28 * c + 28]
            labels = ds.masks[n, 28 * r : 28 * r + 28, 28 * c : 28 * c + 28]
            g = ds.garment[n, cell]
            if g < 0:
                assert not tile.any() and not labels.any()
                continue
            dy, dx = ds.shift[n, cell]
            expected = np.zeros((28, 28), np.uint8)
            src = source.images[g]
            expected[max(dy, 0) : 28 + min(dy, 0), max(dx, 0) : 28 + min(dx, 0)] = src[
                max(-dy, 0) : 28 - max(dy, 0), max(-dx, 0) : 28 - max(dx, 0)
            ]
            np.testing.assert_array_equal(tile, expected)
            np.testing.assert_array_equal(labels, np.where(expected > sc.THRESHOLD, source.labels[g] + 1, 0))


def test_test_scenes_use_the_test_split_and_cache() -> None:
    test = open_dataset(SMALL, "test")
    assert len(test) == 16 and test.garment.max() < 1000  # bundled test split holds 1000 garments
    cached = open_dataset(SMALL, "test")
    assert cached.source.startswith("cached") and digest(cached) == digest(test)
    assert test.cache_path.is_file() and not temporaries(test.cache_path)
    test.cache_path.write_bytes(b"garbage")  # a damaged cache entry is rebuilt, not trusted
    rebuilt = open_dataset(SMALL, "test")
    assert rebuilt.source.startswith("generated") and digest(rebuilt) == digest(test)


def test_pixel_counts_fast_path_matches_masks() -> None:
    ds = open_dataset(SMALL, "test")
    fast = class_pixel_counts(ds)
    slow = np.stack([np.bincount(ds.mask(i).numpy().ravel(), minlength=11) for i in range(len(ds))])
    np.testing.assert_array_equal(fast, slow)


def test_spec_option_errors() -> None:
    with pytest.raises(SpecError, match=r"option seed='x' in dataset spec .* must be an integer"):
        open_dataset("fashion-mnist-scenes?seed=x", "train")
    with pytest.raises(SpecError, match=r"option train=0 in dataset spec .* must be >= 1"):
        open_dataset("fashion-mnist-scenes?train=0", "train")
    with pytest.raises(SpecError, match=r"malformed options 'seed' in dataset spec"):
        open_dataset("fashion-mnist-scenes?seed", "train")


@pytest.mark.skipif(not DEBIAN.is_file(), reason="Debian package dataset-fashion-mnist not installed")
def test_default_sizes_from_full_data_in_seconds() -> None:
    start = time.perf_counter()
    train, test = open_dataset("fashion-mnist-scenes", "train"), open_dataset("fashion-mnist-scenes", "test")
    assert time.perf_counter() - start < 20
    assert (len(train), len(test)) == (10_000, 2_000)
    assert train.fingerprint != open_dataset("fashion-mnist-scenes?source=bundled", "train").fingerprint
