"""Preprocessing from a backbone data config (checked against timm's eval transform) and patch labels."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from qkvprobe.data import build_preprocess, patch_majority_labels
from qkvprobe.errors import ConfigError, DataError

GREY = {"input_size": (1, 28, 28), "mean": (0.5,), "std": (0.25,)}
RGB = {
    "input_size": (3, 32, 32),
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "crop_pct": 0.875,
    "interpolation": "bicubic",
}


def smooth_image(height: int, width: int, channels: int = 3) -> torch.Tensor:
    y, x = np.mgrid[0:height, 0:width]
    planes = [127 + 120 * np.sin(x / (3 + c) + y / (5 + c)) for c in range(channels)]
    return torch.from_numpy(np.stack(planes).round().astype(np.uint8))


def test_image_at_model_size_is_only_normalised() -> None:
    pre = build_preprocess(GREY, "classification", patch_size=4)
    image = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out, target = pre(image, 3)
    assert target == 3 and out.dtype == torch.float32 and pre.output_size == (28, 28)
    torch.testing.assert_close(out, (image.float() / 255 - 0.5) / 0.25)


def test_classification_matches_timm_eval_transform() -> None:
    from timm.data import create_transform

    image = smooth_image(48, 64)
    pre = build_preprocess(RGB, "classification", patch_size=16)
    ours, _ = pre(image, 0)
    timm_tf = create_transform(
        input_size=RGB["input_size"],
        mean=RGB["mean"],
        std=RGB["std"],
        crop_pct=RGB["crop_pct"],
        interpolation="bicubic",
    )
    reference = timm_tf(Image.fromarray(image.permute(1, 2, 0).numpy()))
    assert ours.shape == reference.shape == (3, 32, 32)
    # PIL and torch bicubic kernels differ by a grey level or two; a wrong resize or crop differs by far more.
    assert (ours - reference).abs().mean() < 0.01


def test_channels_grey_to_rgb_and_back() -> None:
    grey = torch.arange(28 * 28, dtype=torch.int64).reshape(1, 28, 28).remainder(256).to(torch.uint8)
    out, _ = build_preprocess({**RGB, "input_size": (3, 28, 28)}, "classification", patch_size=4)(grey, 0)
    assert out.shape == (3, 28, 28)
    mean, std = torch.tensor(RGB["mean"])[:, None, None], torch.tensor(RGB["std"])[:, None, None]
    torch.testing.assert_close(out * std + mean, (grey.float() / 255).expand(3, -1, -1))
    rgb = smooth_image(28, 28)
    merged, _ = build_preprocess(GREY, "classification", patch_size=4)(rgb, 0)
    luma = np.asarray(Image.fromarray(rgb.permute(1, 2, 0).numpy()).convert("L"), dtype=np.float32)
    assert np.abs((merged[0].numpy() * 0.25 + 0.5) * 255 - luma).max() <= 1.01


def test_segmentation_resize_and_batch() -> None:
    pre = build_preprocess(GREY, "segmentation", patch_size=8, image_size=30)  # 30 rounds to 32
    assert pre.output_size == (32, 32)
    image = smooth_image(56, 56, channels=1)
    mask = torch.zeros(56, 56, dtype=torch.int64)
    mask[:28, :28], mask[28:, 28:], mask[0] = 3, 7, 255
    out, small = pre(image, mask)
    assert out.shape == (1, 32, 32) and small.shape == (32, 32) and small.dtype == torch.int64
    assert set(small.unique().tolist()) <= {0, 3, 7, 255}  # nearest: no invented labels
    assert small[4, 4] == 3 and small[30, 30] == 7 and small[4, 30] == 0
    images, masks = pre.batch(torch.stack([image, image.flip(-1)]), torch.stack([mask, mask.flip(-1)]))
    torch.testing.assert_close(images[0], out)
    torch.testing.assert_close(masks[0], small)
    assert pre(image)[1] is None  # images alone (extraction of unlabeled data)
    again, _ = pre(image, mask)
    assert torch.equal(again, out)  # deterministic
    described = pre.describe()
    assert json.loads(json.dumps(described)) == described and described["input_size"] == [1, 32, 32]
    assert build_preprocess(RGB, "segmentation", patch_size=14).output_size == (28, 28)


def test_preprocess_errors() -> None:
    with pytest.raises(ConfigError, match=r"data_config needs input_size \(C, H, W\), mean and std"):
        build_preprocess({"mean": (0.5,)}, "classification", patch_size=4)
    with pytest.raises(ConfigError, match=r"unknown task 'detection'"):
        build_preprocess(GREY, "detection", patch_size=4)
    with pytest.raises(ConfigError, match=r"mean/std need 3 values"):
        build_preprocess({**RGB, "mean": (0.5, 0.5)}, "classification", patch_size=4)
    with pytest.raises(DataError, match=r"cannot turn 4-channel images into the 1 channels"):
        build_preprocess(GREY, "classification", patch_size=4)(torch.zeros(4, 28, 28, dtype=torch.uint8), 0)
    with pytest.raises(DataError, match=r"expects uint8 images"):
        build_preprocess(GREY, "classification", patch_size=4)(torch.zeros(1, 28, 28), 0)


def test_patch_majority_labels_by_hand() -> None:
    mask = np.array(
        [
            [1, 1, 2, 2, 255, 255],
            [1, 2, 2, 2, 255, 3],
            [0, 0, 255, 4, 5, 5],
            [0, 255, 255, 4, 6, 6],
        ]
    )
    labels = patch_majority_labels(torch.from_numpy(mask), 2)
    assert labels.dtype == np.int64
    # ties go to the smaller label: (4,255) -> 4, (5,6) -> 5
    assert labels.tolist() == [1, 2, 255, 0, 4, 5]
    batched = patch_majority_labels(np.stack([mask, mask]), 2)
    assert batched.shape == (2, 6)
    with pytest.raises(DataError, match=r"mask size 4x6 is not a multiple of the patch size 4"):
        patch_majority_labels(mask, 4)
    with pytest.raises(DataError, match=r"mask values must lie in 0\.\.255"):
        patch_majority_labels(mask + 1, 2)
