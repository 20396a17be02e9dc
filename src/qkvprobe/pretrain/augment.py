"""Batched, on-tensor augmentation for small grey images (random resized crop + flip, brightness/contrast,
Gaussian blur, solarisation) and the normalisation of the built-in models."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .common import FMNIST_MEAN, FMNIST_STD


# Batched, on-tensor augmentation (affine grids) rather than per-image torchvision/PIL transforms: with one
# CPU core per run the per-image path costs more than the tiny ViT's forward; batching also makes every
# random draw come from one CPU generator, which keeps --resume exact on any device; the pixel maths
# runs on the batch's device (GPU runs augment on the GPU).
def to_device(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Move a small CPU tensor of random draws to ``device`` without waiting for the GPU's queue.

    A plain copy from pageable memory synchronises the stream, so the CPU could not queue the next kernels
    while the GPU works; a pinned copy with ``non_blocking`` does not (torch's pinned-memory cache keeps
    the buffer alive until the copy is done).
    """
    if device.type != "cuda":
        return t if dtype is None else t.to(dtype)
    return t.pin_memory().to(device, dtype, non_blocking=True)


def random_resized_crop(
    x: torch.Tensor,
    size: int,
    scale: tuple[float, float],
    gen: torch.Generator,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """Per-sample random resized crop + horizontal flip of ``[B, C, H, W]`` to ``[B, C, size, size]``."""
    B = x.shape[0]
    area = torch.empty(B).uniform_(*scale, generator=gen)
    log_r = torch.empty(B).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen)
    w = torch.sqrt(area * torch.exp(log_r)).clamp(max=1.0)
    h = torch.sqrt(area / torch.exp(log_r)).clamp(max=1.0)
    cx = (torch.rand(B, generator=gen) * 2 - 1) * (1 - w)
    cy = (torch.rand(B, generator=gen) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(B, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * flip, cx, h, cy
    grid = F.affine_grid(
        to_device(theta, x.device, x.dtype), [B, x.shape[1], size, size], align_corners=False
    )
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def color_jitter(
    x: torch.Tensor, gen: torch.Generator, p: float = 0.8, strength: float = 0.4
) -> torch.Tensor:
    """Brightness and contrast jitter for grey images in [0, 1] (applied with probability ``p``)."""
    B = x.shape[0]
    on = (torch.rand(B, 1, 1, 1, generator=gen) < p).float()
    bright = to_device(
        1 + on * torch.empty(B, 1, 1, 1).uniform_(-strength, strength, generator=gen), x.device
    )
    contrast = to_device(
        1 + on * torch.empty(B, 1, 1, 1).uniform_(-strength, strength, generator=gen), x.device
    )
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * contrast + mean).mul(bright).clamp(0, 1)


def gaussian_blur(
    x: torch.Tensor, gen: torch.Generator, p: float, sigma: tuple[float, float] = (0.1, 1.0)
) -> torch.Tensor:
    """Per-sample 5-tap Gaussian blur with probability ``p`` (small sigmas: 28 px images)."""
    B, C, H, W = x.shape
    s = torch.empty(B).uniform_(*sigma, generator=gen)
    on = torch.rand(B, generator=gen) < p
    taps = torch.arange(-2, 3, dtype=x.dtype)
    k = torch.exp(-(taps[None] ** 2) / (2 * s[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)
    k = to_device(torch.where(on[:, None], k, torch.tensor([0, 0, 1.0, 0, 0])), x.device, x.dtype)
    y = x.reshape(1, B * C, H, W)
    kc = k.repeat_interleave(C, 0)
    y = F.conv2d(F.pad(y, (2, 2, 0, 0), mode="replicate"), kc[:, None, None, :], groups=B * C)
    y = F.conv2d(F.pad(y, (0, 0, 2, 2), mode="replicate"), kc[:, None, :, None], groups=B * C)
    return y.reshape(B, C, H, W)


def solarize(x: torch.Tensor, gen: torch.Generator, p: float) -> torch.Tensor:
    """Invert pixels >= 0.5 with probability ``p`` per sample."""
    on = to_device(torch.rand(x.shape[0], 1, 1, 1, generator=gen) < p, x.device)
    return torch.where(on & (x >= 0.5), 1 - x, x)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] → the card's data_config normalisation."""
    return (x - FMNIST_MEAN) / FMNIST_STD
