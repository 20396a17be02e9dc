"""Fashion-MNIST (Zalando Research, MIT licence): 60 000 train / 10 000 test grey 28×28 images, 10 classes.

Sources, tried in this order (``ds.source`` says which one was used):

1. the directory the user gives (``root=`` / ``--data-root``) — an error if the files are not there;
2. ``$QKVPROBE_DATA`` (the directory itself, its ``fashion-mnist/`` or torchvision's ``FashionMNIST/raw/``);
3. the Debian package ``dataset-fashion-mnist`` at ``/usr/share/datasets/fashion-mnist``;
4. the official download into ``$QKVPROBE_CACHE/fashion-mnist`` (md5 checked against the published sums;
   skipped when ``$QKVPROBE_OFFLINE=1``; base URL overridable with ``$QKVPROBE_FASHION_MNIST_URL``);
5. the subset bundled in the package: the first 600 train and 100 test images of each class
   (``make_bundled.py``), used when nothing above is available — with a warning, never silently.

``fashion-mnist?source=bundled`` (or ``path``, ``env``, ``debian``, ``download``) forces one source.
The fingerprint is the sha256 of the *decompressed* image and label files plus the split name, so the same
data from any source shares features, while the bundled subset (other content) never does.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError, SpecError
from ..io import write_bytes
from ._util import cache_dir, sha256_parts
from .base import Dataset
from .idx import parse_idx, read_idx_bytes

CLASSES: list[str] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
OFFICIAL_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
#: md5 of the published ``.gz`` files (github.com/zalandoresearch/fashion-mnist README; torchvision uses the same).
OFFICIAL_MD5: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
BUNDLED_DIR = Path(__file__).parent / "bundled"
BUNDLED_PER_CLASS = {"train": 600, "test": 100}
SOURCES = ("auto", "path", "env", "debian", "download", "bundled")
SPLIT_ALIASES = {"train": "train", "test": "test", "val": "test"}


@dataclass(frozen=True)
class Located:
    """A directory holding the four Fashion-MNIST files, and how it was found (in words)."""

    files: dict[str, tuple[Path, Path]]
    source: str


def _files_in(directory: Path) -> dict[str, tuple[Path, Path]] | None:
    """The four files in ``directory`` (``.gz`` or already unpacked), or None when any is missing."""
    found: dict[str, tuple[Path, Path]] = {}
    for split, names in FILES.items():
        pair = []
        for name in names:
            for candidate in (directory / name, directory / name.removesuffix(".gz")):
                if candidate.is_file():
                    pair.append(candidate)
                    break
            else:
                return None
        found[split] = (pair[0], pair[1])
    return found


def _search(base: Path) -> tuple[Path, dict[str, tuple[Path, Path]]] | None:
    for directory in (base, base / "fashion-mnist", base / "FashionMNIST" / "raw"):
        files = _files_in(directory)
        if files is not None:
            return directory, files
    return None


def download(
    dest: Path | None = None,
    *,
    base_url: str | None = None,
    checksums: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> Path:
    """Download the four files into ``dest`` (default ``$QKVPROBE_CACHE/fashion-mnist``); returns ``dest``.

    Files already there with the right md5 are kept. Each file is verified before it is renamed into place,
    so an interrupted or corrupt download never leaves a file that looks complete.
    """
    dest = dest or cache_dir() / "fashion-mnist"
    base_url = base_url or os.environ.get("QKVPROBE_FASHION_MNIST_URL") or OFFICIAL_URL
    checksums = checksums or OFFICIAL_MD5
    for name, md5 in checksums.items():
        target = dest / name
        if target.is_file() and hashlib.md5(target.read_bytes()).hexdigest() == md5:
            continue
        url = base_url.rstrip("/") + "/" + name
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                data = response.read()
        except (urllib.error.URLError, OSError) as exc:
            raise DataError(
                f"could not download {url} ({exc}); check the network or give a local copy with --data-root / $QKVPROBE_DATA"
            ) from None
        got = hashlib.md5(data).hexdigest()
        if got != md5:
            raise DataError(
                f"checksum mismatch for {url}: md5 {got}, expected {md5}; the download is corrupt or the mirror changed — retry or set $QKVPROBE_FASHION_MNIST_URL"
            )
        write_bytes(target, data)
    return dest


def locate(root: str | Path | None = None, source: str = "auto", *, allow_download: bool = True) -> Located:
    """Find the Fashion-MNIST files following the documented source order (or the one forced source)."""
    if source not in SOURCES:
        raise SpecError(f"unknown Fashion-MNIST source {source!r}; valid: {', '.join(SOURCES)}")
    if root is not None or source == "path":
        if root is None:
            raise DataError("Fashion-MNIST source=path needs a directory: pass root=PATH (--data-root PATH)")
        base = Path(root).expanduser()
        if not base.is_dir():
            raise DataError(
                f"Fashion-MNIST directory not found: {base}; pass the directory holding train-images-idx3-ubyte.gz and the other three files"
            )
        hit = _search(base)
        if hit is None:
            raise DataError(
                f"no Fashion-MNIST files in {base}: expected {', '.join(n for p in FILES.values() for n in p)} (gzip or unpacked)"
            )
        return Located(hit[1], f"path given {hit[0]}")
    if source in ("auto", "env"):
        env = os.environ.get("QKVPROBE_DATA")
        hit = _search(Path(env).expanduser()) if env else None
        if hit is not None:
            return Located(hit[1], f"$QKVPROBE_DATA={env} ({hit[0]})")
        if source == "env":
            raise DataError(
                f"no Fashion-MNIST files under $QKVPROBE_DATA={env!r}; put the four .gz files in $QKVPROBE_DATA/fashion-mnist"
            )
    if source in ("auto", "debian"):
        files = _files_in(DEBIAN_DIR)
        if files is not None:
            return Located(files, f"Debian package {DEBIAN_DIR}")
        if source == "debian":
            raise DataError(
                f"Debian Fashion-MNIST not found at {DEBIAN_DIR}; install it with: apt install dataset-fashion-mnist"
            )
    if source == "auto":
        cached = _files_in(cache_dir() / "fashion-mnist")
        if cached is not None:
            return Located(cached, f"download cache {cache_dir() / 'fashion-mnist'}")
    if source in ("auto", "download") and allow_download:
        base_url = os.environ.get("QKVPROBE_FASHION_MNIST_URL") or OFFICIAL_URL
        if source == "download" or os.environ.get("QKVPROBE_OFFLINE", "") in ("", "0"):
            try:
                dest = download(base_url=base_url)
                return Located(_files_in(dest) or {}, f"download {base_url} → cache {dest}")
            except DataError as exc:
                if source == "download":
                    raise
                warnings.warn(
                    f"Fashion-MNIST download failed ({exc}); using the bundled subset", stacklevel=3
                )
    files = _files_in(BUNDLED_DIR)
    if files is None:  # pragma: no cover - a packaging bug
        raise DataError(f"bundled Fashion-MNIST subset missing from {BUNDLED_DIR}; reinstall qkvprobe")
    if source == "auto":
        warnings.warn(
            "full Fashion-MNIST not found; using the bundled subset (600+100 per class)", stacklevel=3
        )
    per = BUNDLED_PER_CLASS
    return Located(files, f"bundled subset ({per['train']}+{per['test']} per class)")


_CACHE: dict[tuple, tuple[np.ndarray, np.ndarray, str]] = {}


def load_split(located: Located, split: str) -> tuple[np.ndarray, np.ndarray, str]:
    """Images uint8 [N, 28, 28], labels int64 [N] and the fingerprint of one split (cached per process)."""
    image_path, label_path = located.files[split]
    key = tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in (image_path, label_path))
    if key in _CACHE:
        return _CACHE[key]
    image_bytes, label_bytes = read_idx_bytes(image_path), read_idx_bytes(label_path)
    images = parse_idx(image_bytes, image_path, ndim=3)
    labels = parse_idx(label_bytes, label_path, ndim=1).astype(np.int64)
    if images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise DataError(
            f"corrupt Fashion-MNIST file {image_path}: images are {images.dtype} {images.shape[1:]}, expected uint8 (28, 28)"
        )
    if len(images) != len(labels):
        raise DataError(
            f"Fashion-MNIST count mismatch: {image_path} has {len(images)} images, {label_path} has {len(labels)} labels"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise DataError(
            f"corrupt Fashion-MNIST file {label_path}: label {int(labels.max())} outside 0..{len(CLASSES) - 1}"
        )
    fingerprint = sha256_parts(
        "fashion-mnist",
        split,
        hashlib.sha256(image_bytes).hexdigest(),
        hashlib.sha256(label_bytes).hexdigest(),
    )
    images.flags.writeable = False  # shared by every Dataset of this split: nobody may edit it in place
    labels.flags.writeable = False
    _CACHE[key] = (images, labels, fingerprint)
    return _CACHE[key]


def count_split(located: Located, split: str) -> int:
    """Number of samples of a split from the IDX header alone (for ``qkvprobe datasets``)."""
    path = located.files[split][1]
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        header = fh.read(8)
    return int.from_bytes(header[4:8], "big") if len(header) == 8 else 0


class FashionMNIST(Dataset):
    """One split of Fashion-MNIST held in memory: ``images`` uint8 [N, 28, 28], ``labels`` int64 [N]."""

    task = "classification"

    def __init__(
        self, split: str, *, root: str | Path | None = None, source: str = "auto", spec: str = "fashion-mnist"
    ) -> None:
        if split not in SPLIT_ALIASES:
            raise DataError(f"unknown split {split!r} for {spec}; valid: train, test (val = test)")
        self.spec, self.split = spec, SPLIT_ALIASES[split]
        located = locate(root, source)
        self.images, self.labels, self.fingerprint = load_split(located, self.split)
        self.source = located.source
        self.classes = list(CLASSES)
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """``(uint8 [1, 28, 28], class index)``."""
        return torch.tensor(self.images[index])[None], int(self.labels[index])

    def targets(self) -> np.ndarray:
        """Class index per sample, int64 [N] (no decoding)."""
        return self.labels.copy()


def open_spec(
    spec: str, path: str | None, options: dict[str, str], split: str, *, root: Any = None, **_: Any
) -> FashionMNIST:
    """Registry opener of ``fashion-mnist[?source=...]``."""
    return FashionMNIST(split, root=root, source=options.get("source", "auto"), spec=spec)


def list_entry() -> dict[str, Any]:
    """The ``qkvprobe datasets`` row: sizes from the IDX headers, never a download."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        located = locate(allow_download=False)
    return {
        "spec": "fashion-mnist",
        "task": "classification",
        "num_classes": len(CLASSES),
        "train": count_split(located, "train"),
        "test": count_split(located, "test"),
        "source": located.source,
    }
