"""Fashion-MNIST Scenes: a small segmentation set built from Fashion-MNIST, deterministically from a seed.

Each scene is a 56×56 grey canvas of 2×2 cells of 28×28 pixels (cells in row-major order). Per cell:

- with probability ``EMPTY_PROB = 0.25`` the cell stays empty (all background);
- otherwise it holds one garment drawn uniformly (with replacement) from the Fashion-MNIST split — train
  scenes from the train split, test scenes from the test split — shifted by ``(dy, dx)``, each uniform in
  ``[-MAX_SHIFT, MAX_SHIFT] = [-4, 4]`` pixels; what moves outside the cell is cut off (cells never overlap);
- pixel label = garment class + 1 where the garment's intensity is ``> THRESHOLD = 32`` (of 255), else 0.

So 11 classes: 0 = background, 1..10 = the Fashion-MNIST classes; no ignore pixels. The random stream is
``numpy.random.default_rng(SeedSequence([seed, 0 for train | 1 for test]))`` drawing, in this order, the
empty flags ``random((N, 4))``, the garment indices ``integers(0, len(split), (N, 4))`` and the shifts
``integers(-4, 5, (N, 4, 2))``. Default sizes: 10 000 train and 2 000 test scenes, seed 0. Spec options:
``fashion-mnist-scenes?seed=1&train=500&test=100&source=bundled`` (``source`` picks the Fashion-MNIST source).

Fingerprint = sha256 of (generator version, parameters, seed, split, the split's size, the Fashion-MNIST
split's fingerprint). Generated arrays are cached in ``$QKVPROBE_CACHE/scenes/<fingerprint[:24]>.npz``
(written atomically) and reused by later runs.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError
from ..io import write_bytes
from ._util import cache_dir, int_option, sha256_parts
from .base import Dataset
from .fashion_mnist import CLASSES as GARMENTS
from .fashion_mnist import SPLIT_ALIASES, load_split, locate

GENERATOR_VERSION = 1
CANVAS, CELL, GRID = 56, 28, 2
MAX_SHIFT = 4
EMPTY_PROB = 0.25
THRESHOLD = 32
DEFAULT_SIZES = {"train": 10_000, "test": 2_000}
CLASSES: list[str] = ["background", *GARMENTS]
_SPLIT_CODE = {"train": 0, "test": 1}


def generate_scenes(
    garments: np.ndarray, garment_labels: np.ndarray, num_scenes: int, seed: int, split: str
) -> dict[str, np.ndarray]:
    """Build scenes from garments uint8 [M, 28, 28] with labels [M] (vectorised; seconds for 10 000).

    Returns ``images`` uint8 [N, 56, 56], ``masks`` uint8 [N, 56, 56] (0..10), ``garment`` int64 [N, 4]
    (source index per cell, -1 = empty) and ``shift`` int64 [N, 4, 2] (dy, dx per cell).
    """
    if len(garments) == 0:
        raise DataError(
            f"cannot build Fashion-MNIST Scenes ({split}): the Fashion-MNIST {split} split is empty"
        )
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _SPLIT_CODE[split]]))
    cells = GRID * GRID
    empty = rng.random((num_scenes, cells)) < EMPTY_PROB
    pick = rng.integers(0, len(garments), (num_scenes, cells))
    shift = rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, (num_scenes, cells, 2))
    flat, dy, dx = pick.reshape(-1), shift[..., 0].reshape(-1), shift[..., 1].reshape(-1)
    # Gather shifted windows from zero-padded garments: out[y, x] = garment[y - dy, x - dx].
    padded = np.pad(garments, ((0, 0), (MAX_SHIFT, MAX_SHIFT), (MAX_SHIFT, MAX_SHIFT)))
    offsets = np.arange(CELL)
    rows = (MAX_SHIFT - dy)[:, None] + offsets
    cols = (MAX_SHIFT - dx)[:, None] + offsets
    tiles = padded[flat[:, None, None], rows[:, :, None], cols[:, None, :]]  # [N*4, 28, 28]
    tiles[empty.reshape(-1)] = 0
    labels = np.where(tiles > THRESHOLD, (garment_labels[flat] + 1).astype(np.uint8)[:, None, None], 0)

    def canvas(x: np.ndarray) -> np.ndarray:
        return (
            x.reshape(num_scenes, GRID, GRID, CELL, CELL)
            .transpose(0, 1, 3, 2, 4)
            .reshape(num_scenes, CANVAS, CANVAS)
        )

    return {
        "images": np.ascontiguousarray(canvas(tiles)).astype(np.uint8),
        "masks": np.ascontiguousarray(canvas(labels)).astype(np.uint8),
        "garment": np.where(empty, -1, pick).astype(np.int64),
        "shift": shift.astype(np.int64),
    }


class FashionMNISTScenes(Dataset):
    """One split of Fashion-MNIST Scenes in memory: ``images``/``masks`` uint8 [N, 56, 56]."""

    task = "segmentation"
    ignore_index = 255

    def __init__(
        self,
        split: str,
        *,
        root: str | Path | None = None,
        seed: int = 0,
        num_scenes: int | None = None,
        source: str = "auto",
        spec: str = "fashion-mnist-scenes",
    ) -> None:
        if split not in SPLIT_ALIASES:
            raise DataError(f"unknown split {split!r} for {spec}; valid: train, test (val = test)")
        self.spec, self.split, self.seed = spec, SPLIT_ALIASES[split], int(seed)
        self.num_scenes = DEFAULT_SIZES[self.split] if num_scenes is None else int(num_scenes)
        located = locate(root, source)
        params = {
            "canvas": CANVAS,
            "cell": CELL,
            "max_shift": MAX_SHIFT,
            "empty_prob": EMPTY_PROB,
            "threshold": THRESHOLD,
        }
        garments, garment_labels, source_fp = load_split(located, self.split)
        self.fingerprint = sha256_parts(
            "fashion-mnist-scenes",
            str(GENERATOR_VERSION),
            json.dumps(params, sort_keys=True),
            str(self.seed),
            self.split,
            str(self.num_scenes),
            source_fp,
        )
        self.cache_path = cache_dir() / "scenes" / f"{self.fingerprint[:24]}.npz"
        arrays = self._load_cached()
        if arrays is None:
            arrays = generate_scenes(garments, garment_labels, self.num_scenes, self.seed, self.split)
            buffer = io.BytesIO()
            np.savez(buffer, **arrays)
            write_bytes(self.cache_path, buffer.getvalue())
            how = "generated"
        else:
            how = "cached"
        self.images, self.masks = arrays["images"], arrays["masks"]
        self.garment, self.shift = arrays["garment"], arrays["shift"]
        self.source = f"{how} (seed {self.seed}, {self.num_scenes} scenes) from Fashion-MNIST {located.source}; cache {self.cache_path}"
        self.classes = list(CLASSES)
        self.skipped: list[str] = []

    def _load_cached(self) -> dict[str, np.ndarray] | None:
        if not self.cache_path.is_file():
            return None
        try:
            with np.load(self.cache_path) as npz:
                arrays = {key: npz[key] for key in ("images", "masks", "garment", "shift")}
        except (OSError, ValueError, KeyError, EOFError):
            return None  # an unreadable cache entry is rebuilt, never trusted
        return arrays if arrays["images"].shape == (self.num_scenes, CANVAS, CANVAS) else None

    def __len__(self) -> int:
        return self.num_scenes

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(uint8 [1, 56, 56], int64 [56, 56])``."""
        return torch.tensor(self.images[index])[None], self.mask(index)

    def mask(self, index: int) -> torch.Tensor:
        """The label mask int64 [56, 56] of scene ``index`` (no image work)."""
        return torch.from_numpy(self.masks[index].astype(np.int64))

    def targets(self) -> None:
        """Segmentation: no per-image class index."""
        return None

    def pixel_counts(self) -> np.ndarray:
        """Pixels per class per scene, int64 [N, 11] (vectorised fast path of ``class_pixel_counts``)."""
        flat = self.masks.reshape(len(self.masks), -1).astype(np.int64)
        offsets = np.arange(len(flat))[:, None] * len(CLASSES)
        return np.bincount((flat + offsets).ravel(), minlength=len(flat) * len(CLASSES)).reshape(
            -1, len(CLASSES)
        )


def open_spec(
    spec: str, path: str | None, options: dict[str, str], split: str, *, root: Any = None, **_: Any
) -> FashionMNISTScenes:
    """Registry opener of ``fashion-mnist-scenes[?seed=&train=&test=&source=]``."""
    split_key = "train" if split == "train" else "test"
    size = (
        int_option(spec, options, split_key, DEFAULT_SIZES[split_key], minimum=1)
        if split in ("train", "test", "val")
        else None
    )
    return FashionMNISTScenes(
        split,
        root=root,
        seed=int_option(spec, options, "seed", 0),
        num_scenes=size,
        source=options.get("source", "auto"),
        spec=spec,
    )


def list_entry() -> dict[str, Any]:
    """The ``qkvprobe datasets`` row (the scenes are generated on first use)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        located = locate(allow_download=False)
    return {
        "spec": "fashion-mnist-scenes",
        "task": "segmentation",
        "num_classes": len(CLASSES),
        "train": DEFAULT_SIZES["train"],
        "test": DEFAULT_SIZES["test"],
        "source": f"generated on first use (seed 0) from Fashion-MNIST {located.source}",
    }
