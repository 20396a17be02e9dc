"""Deterministic preprocessing derived from a backbone's data config (timm keys ``input_size``, ``mean``, ``std``,
optionally ``crop_pct`` and ``interpolation``), and patch labels for segmentation.

- classification: timm's eval transform — resize the shorter side to ``floor(size / crop_pct)`` then centre
  crop to ``size`` (``crop_pct`` default 0.875, interpolation default bicubic, antialiased). An image that
  already has the output size is left as it is (28×28 garments on a 28-px model are only normalised).
- segmentation: resize to exactly the output size, image bilinear (antialiased), mask nearest; scoring
  against the original-resolution mask is the protocol's job (``ds.mask(i)`` gives it).
- the output size is ``image_size`` if given, else the data config's, rounded to the nearest multiple of
  the patch size (never below one patch); channels are repeated (grey → RGB) or merged to luma
  (RGB → grey, ITU-R 601) to ``input_size[0]``; then ``(x / 255 - mean) / std``.

All steps run on uint8 tensors with torchvision.transforms.v2.functional, so the output is bit-for-bit
repeatable; ``Preprocess.batch`` applies the same steps to a stacked batch at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from ..errors import ConfigError, DataError
from ..vocab import IGNORE_INDEX, TASKS

PREPROCESS_VERSION = 1
DEFAULT_CROP_PCT = 0.875
_INTERPOLATIONS = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST_EXACT,
    "lanczos": InterpolationMode.LANCZOS,
}


def _round_to_patch(size: int, patch_size: int) -> int:
    return max(patch_size, round(size / patch_size) * patch_size)


@dataclass(frozen=True)
class Preprocess:
    """Callable ``(image uint8 [C, H, W], target) -> (float32 [C', H', W'], target')``; see module docstring."""

    task: str
    channels: int
    output_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    patch_size: int
    interpolation: str
    crop_pct: float
    #: The size asked for (``image_size``, else the data config's) before rounding to the patch size; not part of
    #: :meth:`describe` (the store's key), which holds the size used.
    asked_size: tuple[int, int] | None = None

    def __call__(self, image: torch.Tensor, target: Any = None) -> tuple[torch.Tensor, Any]:
        """One sample; a segmentation target (mask [H, W]) is resized with it, a class index passes through."""
        images, masks = self.batch(
            image[None],
            None if self.task == "classification" or target is None else torch.as_tensor(target)[None],
        )
        return images[0], (target if masks is None else masks[0])

    def batch(
        self, images: torch.Tensor | Sequence[torch.Tensor], masks: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images uint8 [B, C, H, W] (or a list of same-sized [C, H, W]) → float32 [B, C', H', W'];
        masks [B, H, W] → int64 [B, H', W'] (segmentation), or None."""
        if not isinstance(images, torch.Tensor):
            images = torch.stack(list(images))
        if images.ndim != 4:
            raise DataError(f"preprocess expects images [B, C, H, W], got shape {tuple(images.shape)}")
        if images.dtype != torch.uint8:
            raise DataError(f"preprocess expects uint8 images (as datasets return them), got {images.dtype}")
        images = self._channels(images)
        size = tuple(images.shape[-2:])
        if self.task == "segmentation":
            if size != self.output_size:
                images = F.resize(images, list(self.output_size), InterpolationMode.BILINEAR, antialias=True)
            if masks is not None:
                masks = self._resize_masks(torch.as_tensor(masks))
        elif size != self.output_size:
            images = F.resize(
                images, self._scale_size(size), _INTERPOLATIONS[self.interpolation], antialias=True
            )
            images = F.center_crop(images, list(self.output_size))
        out = F.normalize(images.float() / 255.0, list(self.mean), list(self.std))
        return out, masks

    def _channels(self, images: torch.Tensor) -> torch.Tensor:
        have = images.shape[1]
        if have == self.channels:
            return images
        if have == 1 and self.channels == 3:
            return images.expand(-1, 3, -1, -1).contiguous()
        if have == 3 and self.channels == 1:
            return F.rgb_to_grayscale(images, num_output_channels=1)
        raise DataError(
            f"cannot turn {have}-channel images into the {self.channels} channels the backbone wants"
        )

    def resize_of(self, size: tuple[int, int]) -> tuple[int, int] | None:
        """``(H, W)`` an image of ``size`` is resized to before any crop; None when it is used as it is."""
        if tuple(size) == tuple(self.output_size):
            return None
        if self.task == "segmentation":
            return self.output_size
        h, w = self._scale_size(tuple(size))
        return (h, w)

    def _scale_size(self, size: tuple[int, int]) -> list[int]:
        h, w = self.output_size
        if h == w:  # timm: an int size resizes the shorter side, keeping the aspect ratio
            scale = math.floor(h / self.crop_pct)
            short, long_ = min(size), max(size)
            other = int(scale * long_ / short)
            return [scale, other] if size[0] <= size[1] else [other, scale]
        return [math.floor(h / self.crop_pct), math.floor(w / self.crop_pct)]

    def _resize_masks(self, masks: torch.Tensor) -> torch.Tensor:
        if masks.ndim != 3:
            raise DataError(f"preprocess expects masks [B, H, W], got shape {tuple(masks.shape)}")
        if masks.numel() and (int(masks.min()) < 0 or int(masks.max()) > 255):
            raise DataError(
                f"mask values must lie in 0..255 (255 = ignore), got {int(masks.min())}..{int(masks.max())}"
            )
        if tuple(masks.shape[-2:]) != self.output_size:
            # uint8 because nearest resizing of integer label maps is exact there; labels are <= 255.
            small = F.resize(
                masks.to(torch.uint8)[:, None], list(self.output_size), InterpolationMode.NEAREST_EXACT
            )
            masks = small[:, 0]
        return masks.to(torch.int64)

    def describe(self) -> dict[str, Any]:
        """JSON-able description; the feature store keys on it."""
        steps = (
            "resize shorter side to floor(size/crop_pct), centre crop (skipped when already at size)"
            if self.task == "classification"
            else "resize image bilinear antialias, mask nearest-exact"
        )
        return {
            "version": PREPROCESS_VERSION,
            "task": self.task,
            "input_size": [self.channels, *self.output_size],
            "mean": list(self.mean),
            "std": list(self.std),
            "patch_size": self.patch_size,
            "interpolation": self.interpolation if self.task == "classification" else "bilinear",
            "crop_pct": self.crop_pct if self.task == "classification" else None,
            "steps": steps,
        }


def build_preprocess(
    data_config: dict[str, Any],
    task: str,
    *,
    patch_size: int,
    image_size: int | tuple[int, int] | None = None,
) -> Preprocess:
    """Preprocessing for ``task`` from a backbone's data config; output H', W' are multiples of ``patch_size``."""
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")
    try:
        channels, height, width = (int(v) for v in data_config["input_size"])
        mean = tuple(float(v) for v in data_config["mean"])
        std = tuple(float(v) for v in data_config["std"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(
            f"data_config needs input_size (C, H, W), mean and std; got {data_config!r} ({exc})"
        ) from None
    if channels not in (1, 3):
        raise ConfigError(f"data_config input_size channels must be 1 or 3, got {channels}")
    if len(mean) == 1 and channels == 3:
        mean, std = mean * 3, std * 3
    if len(mean) != channels or len(std) != channels or min(std) <= 0:
        raise ConfigError(
            f"data_config mean/std need {channels} values with std > 0; got mean={mean}, std={std}"
        )
    if int(patch_size) < 1:
        raise ConfigError(f"patch_size must be >= 1, got {patch_size}")
    if image_size is not None:
        height, width = (
            (image_size, image_size)
            if isinstance(image_size, int)
            else (int(image_size[0]), int(image_size[1]))
        )
    interpolation = str(data_config.get("interpolation", "bicubic"))
    if interpolation not in _INTERPOLATIONS:
        raise ConfigError(f"unknown interpolation {interpolation!r}; valid: {', '.join(_INTERPOLATIONS)}")
    crop_pct = float(data_config.get("crop_pct") or DEFAULT_CROP_PCT)
    size = (_round_to_patch(height, patch_size), _round_to_patch(width, patch_size))
    return Preprocess(
        task, channels, size, mean, std, int(patch_size), interpolation, crop_pct, (int(height), int(width))
    )


def patch_majority_labels(
    mask: torch.Tensor | np.ndarray, patch_size: int, ignore_index: int = IGNORE_INDEX
) -> np.ndarray:
    """Majority label per patch of a mask [H, W] (H, W multiples of patch_size) → int64 [h*w], row-major.

    The ignore label is counted like any other, so a patch whose majority is ``ignore_index`` gets it and
    the caller skips it; ties go to the smaller label (half ignore / half class c → c). Also accepts [B, H, W] → [B, h*w].
    """
    array = mask.numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    single = array.ndim == 2
    if single:
        array = array[None]
    if array.ndim != 3:
        raise DataError(f"patch_majority_labels expects a mask [H, W] or [B, H, W], got shape {array.shape}")
    num, height, width = array.shape
    if height % patch_size or width % patch_size:
        raise DataError(
            f"mask size {height}x{width} is not a multiple of the patch size {patch_size}; preprocess it first"
        )
    if array.size and (array.min() < 0 or array.max() > 255):
        raise DataError(f"mask values must lie in 0..255 (255 = ignore), got {array.min()}..{array.max()}")
    if not 0 <= ignore_index <= 255:
        raise DataError(f"ignore_index must lie in 0..255, got {ignore_index}")
    h, w = height // patch_size, width // patch_size
    patches = (
        array.reshape(num, h, patch_size, w, patch_size).transpose(0, 1, 3, 2, 4).reshape(num * h * w, -1)
    )
    offsets = np.arange(len(patches), dtype=np.int64)[:, None] * 256
    counts = np.bincount((patches.astype(np.int64) + offsets).ravel(), minlength=len(patches) * 256).reshape(
        -1, 256
    )
    labels = counts.argmax(1).astype(np.int64).reshape(num, h * w)
    return labels[0] if single else labels
