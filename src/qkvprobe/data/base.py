"""The dataset contract every loader returns (``qkvprobe.open_dataset(spec, split)``)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch


class Dataset(ABC):
    """A split of a classification or segmentation dataset, indexable like a torch map-style dataset.

    Attributes:
        spec: the spec string it was opened from (``"fashion-mnist"``, ``"voc:/data/VOC2012"`` …).
        split: ``"train"`` or ``"test"``/``"val"`` (as the layout names it).
        task: ``"classification"`` or ``"segmentation"``.
        classes: class names; for segmentation index 0 is background where the dataset has one.
        source: where the data was found, in words (a path, "Debian package", "bundled subset" …).
        fingerprint: stable hex digest of the exact contents/selection — the feature store keys on it.
        skipped: files left out by ``on_bad_image="skip"`` (paths relative to the dataset root), else ``[]``;
            a run records them so nothing is dropped silently.
    ``ds[i]`` returns ``(image, target)``: image is a uint8 tensor [C, H, W] (C = 1 or 3); target is an
    ``int`` class index (classification) or an int64 tensor [H, W] with 255 = ignore (segmentation).
    """

    spec: str
    split: str
    task: str
    classes: list[str]
    source: str
    fingerprint: str
    skipped: list[str] = []  # noqa: RUF012 - read-only default; loaders assign their own list

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]: ...

    def targets(self) -> Any:
        """Class index per sample as an int64 numpy array [N] (classification); for segmentation datasets,
        loaders may return None. Loaders override this with a fast path (no image decoding)."""
        import numpy as np

        return np.asarray([int(self[i][1]) for i in range(len(self))], dtype=np.int64)

    def mask(self, index: int) -> torch.Tensor:
        """Segmentation: the full-resolution label mask int64 [H, W] of sample ``index`` (255 = ignore).

        Loaders override this so that evaluation can re-read masks without decoding images."""
        if self.task != "segmentation":
            from ..errors import DataError

            raise DataError(f"{self.spec} is a {self.task} dataset; it has no masks")
        return self[index][1]
