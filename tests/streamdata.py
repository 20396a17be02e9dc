"""The same real images (scikit-learn's digits, 8×8 grey) as an image folder / ADE20K tree, a Hugging Face
``save_to_disk`` DatasetDict, Hugging Face Parquet files and WebDataset tar shards; imported by the stream
tests and by their torchrun subprocesses."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

NUM_TRAIN, NUM_TEST = 40, 20
CLASSES = [f"digit{k}" for k in range(10)]


def digits() -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N, 8, 8] images (0..255) and int labels [N] of the first 60 digits."""
    from sklearn.datasets import load_digits

    d = load_digits()
    n = NUM_TRAIN + NUM_TEST
    return (d.images[:n] * 16).clip(0, 255).astype(np.uint8), d.target[:n].astype(np.int64)


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def ade_mask(image: np.ndarray, label: int) -> np.ndarray:
    """An ADE20K-style annotation: 0 ("other", ignored) on the background, label + 1 on the stroke."""
    return np.where(image > 64, label + 1, 0).astype(np.uint8)


def splits(task: str) -> dict[str, list[tuple[str, bytes, int | bytes]]]:
    """``{split: [(key, image png, class index | mask png)]}`` in the order the folder readers list them
    (classification: by class folder, then file name)."""
    images, labels = digits()
    out: dict[str, list[tuple[str, bytes, int | bytes]]] = {}
    for split, lo, hi in (("train", 0, NUM_TRAIN), ("val", NUM_TRAIN, NUM_TRAIN + NUM_TEST)):
        order = list(range(lo, hi))
        if task == "classification":
            order.sort(key=lambda i: (int(labels[i]), i))
            out[split] = [(f"{i:05d}", png(images[i]), int(labels[i])) for i in order]
        else:
            out[split] = [
                (f"{i:05d}", png(images[i]), png(ade_mask(images[i], int(labels[i])))) for i in order
            ]
    return out


def make_folder(root: Path, task: str) -> str:
    """``imagefolder:`` (class folders ``digitK``) or ``ade20k:`` tree; returns the spec."""
    for split, samples in splits(task).items():
        for key, image, target in samples:
            if task == "classification":
                file = root / split / CLASSES[int(target)] / f"{key}.png"  # type: ignore[arg-type]
                file.parent.mkdir(parents=True, exist_ok=True)
                file.write_bytes(image)
            else:
                folder = "training" if split == "train" else "validation"
                for sub, data in (("images", image), ("annotations", target)):
                    file = root / sub / folder / f"{key}.png"
                    file.parent.mkdir(parents=True, exist_ok=True)
                    file.write_bytes(data)  # type: ignore[arg-type]
    return f"imagefolder:{root}" if task == "classification" else f"ade20k:{root}"


def _hf_split(samples: list, task: str) -> Any:  # a datasets.Dataset
    import datasets

    if task == "classification":
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
        data = {
            "image": [{"bytes": i, "path": None} for _, i, _ in samples],
            "label": [t for _, _, t in samples],
        }
    else:
        features = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image()})
        data = {
            "image": [{"bytes": i, "path": None} for _, i, _ in samples],
            "annotation": [{"bytes": t, "path": None} for _, _, t in samples],
        }
    return datasets.Dataset.from_dict(data, features=features)


def make_hf_disk(root: Path, task: str) -> Path:
    """A ``DatasetDict(train=…, validation=…).save_to_disk(root)``."""
    import datasets

    datasets.disable_progress_bars()
    parts = splits(task)
    datasets.DatasetDict(
        train=_hf_split(parts["train"], task), validation=_hf_split(parts["val"], task)
    ).save_to_disk(str(root))
    return root


def make_hf_parquet(root: Path, task: str, cuts: tuple[int, ...] = (15,)) -> Path:
    """The hub's layout: ``root/data/train-0000K-of-0000M.parquet`` (split at ``cuts``) + validation."""
    import datasets

    datasets.disable_progress_bars()
    (root / "data").mkdir(parents=True, exist_ok=True)
    parts = splits(task)
    bounds = [0, *cuts, len(parts["train"])]
    for k in range(len(bounds) - 1):
        chunk = parts["train"][bounds[k] : bounds[k + 1]]
        _hf_split(chunk, task).to_parquet(
            str(root / "data" / f"train-{k:05d}-of-{len(bounds) - 1:05d}.parquet")
        )
    _hf_split(parts["val"], task).to_parquet(str(root / "data" / "validation-00000-of-00001.parquet"))
    return root


def make_wds(root: Path, task: str, per_shard: int = 15) -> Path:
    """``root/train-00000K.tar`` / ``root/val-00000K.tar`` written by webdataset's own ShardWriter, with
    ``classes.txt`` beside them (classification)."""
    import webdataset as wds

    root.mkdir(parents=True, exist_ok=True)
    for split, samples in splits(task).items():
        with wds.ShardWriter(str(root / f"{split}-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
            for key, image, target in samples:
                member = {"cls": target} if task == "classification" else {"seg.png": target}
                sink.write({"__key__": key, "png": image, **member})
    if task == "classification":
        (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return root
