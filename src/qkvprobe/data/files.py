"""Reading image and mask files (PIL), and the base class of datasets backed by files on disk.

Images decode to uint8 [C, H, W]: grey modes (``1``, ``L``, ``LA``, ``I``, ``I;16``) to one channel, all others
(``RGB``, ``P``, ``RGBA``, ``CMYK`` …) to RGB — preprocessing later repeats or merges channels to what the
backbone wants. Masks decode to class indices: palette PNGs by palette *index* (never by colour), grey PNGs
by value; an RGB mask is refused, since colours are not indices.
"""

from __future__ import annotations

import io
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from ._util import sha256_parts
from .base import Dataset

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
ON_BAD_IMAGE = ("fail", "skip")
_GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L"})
IGNORE = 255
_BAD_FILE = (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError)


class MaskFormatError(DataError):
    """A mask stored as colours instead of class indices: a layout error that ``skip`` must not hide."""


_SKIP_HINT = "replace it, or pass --on-bad-image skip to leave it out (listed in the run record)"
#: How many files a message lists before "and N more".
LISTED = 20
_COLOUR_MODES = ("RGB", "RGBA", "CMYK", "YCbCr", "LA", "PA")


def listed(names: list[str], limit: int = LISTED) -> str:
    """``"a, b, c"``, or the first ``limit`` names and ``"and N more"``."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def read_image(path: Path | bytes, *, name: str | None = None, hint: str = _SKIP_HINT) -> torch.Tensor:
    """Decode an image file (a path, or the file's bytes named ``name``) to uint8 [C, H, W] (C = 1 for grey
    files, else 3); DataError names a bad file."""
    try:
        with Image.open(io.BytesIO(path) if isinstance(path, bytes) else path) as im:
            im.load()  # forces the full decode, so a truncated file fails here and not later
            im = im.convert("L" if im.mode in _GREY_MODES else "RGB")
            array = np.asarray(im)
    except _BAD_FILE as exc:
        raise DataError(f"unreadable or truncated image {name or path} ({exc}); {hint}") from None
    tensor = torch.from_numpy(array.copy())
    return tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1).contiguous()


def image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` from the file header only."""
    try:
        with Image.open(path) as im:
            return im.size
    except _BAD_FILE as exc:
        raise DataError(f"unreadable image {path} ({exc}); replace it, or pass --on-bad-image skip") from None


def read_mask(
    path: Path | bytes,
    *,
    kind: str = "mask",
    name: str | None = None,
    hint: str = "replace it, or pass --on-bad-image skip to leave it out",
) -> np.ndarray:
    """Decode a label PNG (a path, or its bytes named ``name``) to an integer array [H, W] of indices
    (palette index or grey value)."""
    name = name or str(path)
    try:
        with Image.open(io.BytesIO(path) if isinstance(path, bytes) else path) as im:
            im.load()
            mode = im.mode
            if mode in _COLOUR_MODES:
                raise MaskFormatError(
                    f"{kind} {name} is saved as {mode} colours, not class indices; save it as a palette (P) or grey (L) PNG whose pixel values are the class indices"
                )
            array = np.asarray(im)
    except _BAD_FILE as exc:
        raise DataError(f"unreadable or truncated mask {name} ({exc}); {hint}") from None
    return array.astype(np.int64)


def check_mask(
    mask: np.ndarray,
    *,
    num_classes: int,
    reduce_zero_label: bool,
    size: tuple[int, int],
    mask_name: str,
    image_name: str,
    kind: str = "mask",
) -> torch.Tensor:
    """Validate a decoded mask [H, W] against its image ``size`` (W, H) and the class range, then apply the
    reduce-zero-label convention (0 → 255, v → v-1) when asked; int64 tensor [H, W], 255 = ignore."""
    if (mask.shape[1], mask.shape[0]) != tuple(size):
        raise DataError(
            f"{kind} {mask_name} is {mask.shape[1]}x{mask.shape[0]} but image {image_name} is {size[0]}x{size[1]}; masks must have the image's size"
        )
    num = num_classes + (1 if reduce_zero_label else 0)
    bad = (mask >= num) & (mask != (IGNORE if not reduce_zero_label else -1))
    bad |= mask < 0
    if bad.any():
        value = int(mask[bad][0])
        allowed = f"0..{num - 1}" + ("" if reduce_zero_label else " or 255 (ignore)")
        raise DataError(
            f"{kind} {mask_name} has value {value} outside the class range {allowed}; fix the mask or the class list"
        )
    if reduce_zero_label:
        mask = np.where(mask == 0, IGNORE, mask - 1)
    return torch.from_numpy(np.ascontiguousarray(mask, dtype=np.int64))


def list_images(directory: Path) -> tuple[list[Path], list[Path]]:
    """Image files under ``directory`` (recursive, sorted) and the other non-hidden files found there."""
    images: list[Path] = []
    others: list[Path] = []
    for current, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue  # .DS_Store and editor files are not data
            path = Path(current) / name
            (images if path.suffix.lower() in IMAGE_EXTENSIONS else others).append(path)
    return images, others


def check_on_bad_image(value: str) -> str:
    if value not in ON_BAD_IMAGE:
        raise DataError(f"on_bad_image must be 'fail' or 'skip', got {value!r}")
    return value


class FileDataset(Dataset):
    """A dataset whose samples are files under ``root``; subclasses fill ``samples`` then call ``_finish``.

    ``samples`` holds ``(image_path, target)`` with target an int (classification) or a mask path
    (segmentation). With ``on_bad_image="skip"`` every file is decoded once when the dataset is opened
    (threads) and unreadable ones are left out and listed in ``skipped``; with ``"fail"`` a bad file raises
    a DataError naming it when it is read. Fingerprint: sha256 over the spec kind, split, class names and the
    sorted relative paths + sizes + mtimes of every file of the selection (and the skipped list).
    """

    root: Path
    samples: list[tuple[Path, Any]]
    ignored: list[str]

    def _finish(self, kind: str, on_bad_image: str) -> None:
        self.skipped: list[str] = []
        if not hasattr(self, "ignored"):
            self.ignored = []
        if self.ignored:
            warnings.warn(
                f"{self.spec} {self.split}: {len(self.ignored)} non-image files ignored (under {self.root}): "
                f"{listed(self.ignored, 5)}",
                stacklevel=3,
            )
        if on_bad_image == "skip":
            with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
                bad = list(pool.map(self._check_sample, self.samples))
            colours = [b[1:] for b in bad if b is not None and b.startswith("\0")]
            if colours:
                kind = str(getattr(self, "mask_kind", "mask"))
                raise MaskFormatError(_colour_masks_message(colours, self.root, kind))
            self.skipped = [b for b in bad if b is not None]
            self.samples = [s for s, b in zip(self.samples, bad, strict=True) if b is None]
        parts = [kind, self.split, "\n".join(self.classes), "\n".join(self.skipped)]
        for image_path, target in self.samples:
            files = [image_path, target] if isinstance(target, Path) else [image_path]
            for path in files:
                try:
                    stat = path.stat()
                except OSError:
                    raise DataError(
                        f"file listed in {self.spec} is missing: {path}; restore it, or pass --on-bad-image skip"
                    ) from None
                parts.append(
                    f"{path.relative_to(self.root)}|{stat.st_size}|{stat.st_mtime_ns}|{target if isinstance(target, int) else ''}"
                )
        self.fingerprint = sha256_parts(*parts)

    def _check_sample(self, sample: tuple[Path, Any]) -> str | None:
        """None when the sample's files decode, else the relative path of the bad file."""
        image_path, target = sample
        for path, reader in ((image_path, read_image), (target, read_mask)):
            if not isinstance(path, Path):
                continue
            try:
                if not path.is_file():
                    return str(path.relative_to(self.root))
                reader(path)
            except MaskFormatError:
                # an RGB mask is a layout error, not a damaged file: skipping would hide it (marked with \0:
                # every such mask is listed in one error)
                return "\0" + str(path.relative_to(self.root))
            except DataError:
                return str(path.relative_to(self.root))
        return None

    def __len__(self) -> int:
        return len(self.samples)

    def paths(self) -> list[str]:
        """Image path per sample, relative to the dataset root."""
        return [str(p.relative_to(self.root)) for p, _ in self.samples]


class ClassFolderBase(FileDataset):
    """Classification over files: ``ds[i] = (uint8 [C, H, W], class index)``."""

    task = "classification"

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return read_image(path), int(label)

    def targets(self) -> np.ndarray:
        """Class index per sample, int64 [N], from the folder names (no decoding)."""
        return np.asarray([label for _, label in self.samples], dtype=np.int64)


class SegmentationBase(FileDataset):
    """Segmentation over image/mask file pairs: ``ds[i] = (uint8 [C, H, W], int64 [H, W])``, 255 = ignore.

    Subclasses set ``reduce_zero_label`` (label 0 → 255, others shifted down by one; ADE20K) and
    ``mask_kind`` (a word for messages, e.g. "VOC mask").
    """

    task = "segmentation"
    ignore_index = 255
    reduce_zero_label = False
    mask_kind = "mask"

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = read_image(self.samples[index][0])
        return image, self._mask(index, (image.shape[-1], image.shape[-2]))

    def mask(self, index: int) -> torch.Tensor:
        """The full-resolution label mask int64 [H, W] of sample ``index`` (the image is not decoded)."""
        return self._mask(index, image_size(self.samples[index][0]))

    def targets(self) -> None:
        """Segmentation: no per-image class index."""
        return None

    def colour_masks(self) -> list[str]:
        """Masks (relative paths) saved as colours, from the file headers alone (no decoding)."""

        def is_colour(path: Path) -> bool:
            try:
                with Image.open(path) as im:
                    return im.mode in _COLOUR_MODES
            except _BAD_FILE:
                return False

        masks = [m for _, m in self.samples]
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            flags = list(pool.map(is_colour, masks))
        return [str(m.relative_to(self.root)) for m, bad in zip(masks, flags, strict=True) if bad]

    def missized_masks(self) -> list[str]:
        """Masks whose size differs from their image's, as ``"masks/a.png 10x8 (image 12x8)"``, from the file
        headers alone."""

        def check(sample: tuple[Path, Any]) -> str | None:
            image, mask = sample
            try:
                with Image.open(mask) as im:
                    have = im.size
                want = image_size(image)
            except (DataError, *_BAD_FILE):
                return None  # an unreadable file is reported on its own
            if have == want:
                return None
            return f"{mask.relative_to(self.root)} {have[0]}x{have[1]} (image {want[0]}x{want[1]})"

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            return [m for m in pool.map(check, self.samples) if m is not None]

    def _mask(self, index: int, size: tuple[int, int]) -> torch.Tensor:
        image_path, mask_path = self.samples[index]
        try:
            raw = read_mask(mask_path, kind=self.mask_kind)
        except MaskFormatError:
            # one colour mask rarely comes alone: list them all (headers only), so one fix covers every file
            raise MaskFormatError(
                _colour_masks_message(self.colour_masks(), self.root, self.mask_kind)
            ) from None
        if (raw.shape[1], raw.shape[0]) != tuple(size):
            # as for colours: every mask of the wrong size in one message
            bad = self.missized_masks() or [
                f"{mask_path.relative_to(self.root)} {raw.shape[1]}x{raw.shape[0]} (image {size[0]}x{size[1]})"
            ]
            raise DataError(
                f"{len(bad)} {self.mask_kind + (' does' if len(bad) == 1 else 's do')} not have the size of "
                f"{'its image' if len(bad) == 1 else 'their images'} (under {self.root}): {listed(bad)}; "
                "masks must have the image's size"
            )
        return check_mask(
            raw,
            num_classes=len(self.classes),
            reduce_zero_label=self.reduce_zero_label,
            size=size,
            mask_name=str(mask_path),
            image_name=str(image_path),
            kind=self.mask_kind,
        )


def _colour_masks_message(names: list[str], root: Path, kind: str = "mask") -> str:
    return (
        f"{len(names)} {kind + ' is' if len(names) == 1 else kind + 's are'} saved as colours, not class indices "
        f"(under {root}): {listed(names)}; save each as a palette (P) or grey (L) PNG whose pixel values are the "
        "class indices"
    )
