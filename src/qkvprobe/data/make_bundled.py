"""Build the Fashion-MNIST subset shipped in ``qkvprobe/data/bundled/`` (run once; the output is committed).

Deterministic: the first 600 train and first 100 test images of each class, in their original order, from
the full files (the Debian package by default), written as gzip IDX files with a fixed header (mtime 0)::

    python -m qkvprobe.data.make_bundled [--source DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from .fashion_mnist import BUNDLED_DIR, BUNDLED_PER_CLASS, DEBIAN_DIR, FILES, load_split, locate
from .idx import write_idx_gz


def first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices [num_classes * per_class] of the first ``per_class`` samples of each class, ascending."""
    picked = [np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)]
    short = [c for c, idx in enumerate(picked) if len(idx) < per_class]
    if short:
        raise SystemExit(
            f"classes {short} have fewer than {per_class} samples; is the source the full data set?"
        )
    return np.sort(np.concatenate(picked))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--source", default=str(DEBIAN_DIR), help="directory with the full Fashion-MNIST files"
    )
    parser.add_argument("--out", default=str(BUNDLED_DIR), help="output directory")
    args = parser.parse_args(argv)
    located = locate(args.source)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split, (image_name, label_name) in FILES.items():
        images, labels, _ = load_split(located, split)
        keep = first_per_class(labels, BUNDLED_PER_CLASS[split])
        write_idx_gz(out / image_name, images[keep])
        write_idx_gz(out / label_name, labels[keep].astype(np.uint8))
        print(f"{split}: {len(keep)} images -> {out / image_name}")


if __name__ == "__main__":
    main()
