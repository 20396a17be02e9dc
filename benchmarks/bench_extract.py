"""Cost of tapping q/k/v/ffn in one forward pass vs a plain forward and vs one pass per token type.

Modes (timm ``vit_small_patch16_224``, random weights, CPU unless --device):
  (a) plain ``forward_features``;
  (b) our ``extract`` of q, k, v, ffn of the last block, then cls + avg;
  (c) the same for every block;
  (d) one forward pass per token type (the per-facet way of dino-vit-features), last block, cls + avg;
  (e) q, k, v, ffn of block 0 only (shows the forward stopping after the deepest requested block).
Targets: (b)/(a) ≥ 0.95 and (b)/(d) ≥ 3.5. Modes are interleaved round by round; the median and the best-of-rounds ratios are
reported, so load from other processes on a shared machine hits every mode alike.

    nice -n 10 .venv/bin/python benchmarks/bench_extract.py --batch 16 --rounds 5

Data-loading mode (``--loading``): images/s of decode + preprocessing (the model's eval resize and crop)
through the extraction's own loaders, for the same JPEGs held as an image folder, a Hugging Face
``save_to_disk`` dataset, Hugging Face Parquet files and WebDataset tar shards, with 0 and 2 DataLoader
workers, beside the model's forward rate (tapped forward, last block) — whichever is lower is the ceiling.
Readers are interleaved round by round; the median and the best of rounds (timeit's convention: the least
disturbed run, since interference only adds time) are reported.
The images are Fashion-MNIST garments upscaled to ``--jpeg-size`` px RGB JPEGs (quality 90), written once to
``--data-dir``. Target: every stream reader at least as fast as the folder reader (ratio ≥ 1, within noise).

    nice -n 10 .venv/bin/python benchmarks/bench_extract.py --loading --images 2000 --rounds 3
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch

from qkvprobe.backbones.timm_backbone import TimmBackbone
from qkvprobe.taps import select_positions

PAPER = ("q", "k", "v", "ffn")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--loading", action="store_true", help="data-loading mode (see the module docstring)")
    parser.add_argument("--images", type=int, default=2000, help="loading mode: images per form")
    parser.add_argument("--jpeg-size", type=int, default=320, help="loading mode: side of the JPEGs")
    parser.add_argument("--data-dir", default="", help="loading mode: where the forms are written (temp dir)")
    parser.add_argument("--workers", default="0,2", help="loading mode: DataLoader workers to time")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.loading:
        loading(args)
        return

    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=0, dynamic_img_size=True)
    bb = TimmBackbone(model, spec=f"timm:{args.model}", objective="unknown", device=args.device)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=bb.device)
    every = tuple(range(bb.num_blocks))

    def pool(out: dict, keys) -> None:
        for key in keys:
            select_positions(out[key], ("cls", "avg"), bb.num_prefix_tokens, bb.has_cls_token)

    def plain() -> None:
        with torch.no_grad():
            bb.model.forward_features(x)

    def ours_last() -> None:
        pool(bb.extract(x, blocks=(-1,), tokens=PAPER), PAPER)

    def ours_all() -> None:
        out = bb.extract(x, blocks=every, tokens=PAPER)
        pool(out, out.keys())

    def per_facet() -> None:
        for token in PAPER:
            pool(bb.extract(x, blocks=(-1,), tokens=(token,)), (token,))

    def ours_first() -> None:
        pool(bb.extract(x, blocks=(0,), tokens=PAPER), PAPER)

    modes: dict[str, Callable[[], None]] = {
        "(a) forward_features": plain,
        "(b) ours, last block": ours_last,
        "(c) ours, every block": ours_all,
        "(d) one pass per token": per_facet,
        "(e) ours, block 0 only": ours_first,
    }

    def sync() -> None:
        if bb.device.type == "cuda":
            torch.cuda.synchronize()

    for fn in modes.values():
        for _ in range(args.warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(args.rounds):
        for name, fn in modes.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)

    median = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"{args.model}, {args.image_size}px, batch {args.batch}, device {args.device}, "
        f"torch threads {torch.get_num_threads()}, {args.rounds} rounds (median; min..max in brackets)"
    )
    for name, value in median.items():
        lo, hi = min(times[name]), max(times[name])
        print(
            f"  {name:26s} {args.batch / value:8.1f} img/s   {value * 1e3:8.1f} ms  [{lo * 1e3:.0f}..{hi * 1e3:.0f}]"
        )
    a, b = median["(a) forward_features"], median["(b) ours, last block"]
    d, e = median["(d) one pass per token"], median["(e) ours, block 0 only"]
    print(f"  throughput (b)/(a) = {a / b:.3f}   (target >= 0.95)")
    print(f"  throughput (b)/(d) = {d / b:.2f}    (target >= 3.5)")
    # Best-of-rounds is timeit's convention: the least disturbed run of each mode, since interference only adds time.
    best = {name: min(t) for name, t in times.items()}
    print(
        f"  best-of-rounds: (b)/(a) = {best['(a) forward_features'] / best['(b) ours, last block']:.3f}, "
        f"(b)/(d) = {best['(d) one pass per token'] / best['(b) ours, last block']:.2f}"
    )
    print(
        f"  throughput (e)/(b) = {b / e:.2f}    (early stop; ~{bb.num_blocks} if the forward were all blocks)"
    )


def write_forms(root: Path, num: int, size: int) -> dict[str, str]:
    """The same ``num`` JPEGs as an image folder, HF save_to_disk, HF Parquet and WebDataset shards."""
    import datasets
    import webdataset as wds
    from PIL import Image

    from qkvprobe.data import open_dataset

    specs = {
        "image folder": f"imagefolder:{root / 'folder'}",
        "hfds save_to_disk": f"hfds:{root / 'hf-disk'}",
        "hfds Parquet": f"hfds:{root / 'hf-parquet'}",
        "wds tar shards": f"wds:{root / 'wds'}",
    }
    if (root / "done").is_file():
        return specs
    garments = open_dataset("fashion-mnist", "train")
    names = [c.replace("/", "-") for c in garments.classes]
    samples = []
    for i in range(num):
        image, label = garments[i]
        grey = Image.fromarray(image[0].numpy()).resize((size, size), Image.BILINEAR)
        rgb = Image.merge("RGB", (grey, grey.point(lambda v: 255 - v), grey))
        buffer = io.BytesIO()
        rgb.save(buffer, format="JPEG", quality=90)
        samples.append((f"{i:07d}", buffer.getvalue(), int(label)))
    samples.sort(key=lambda s: (s[2], s[0]))  # the folder reader's order: by class, then name
    for key, data, label in samples:
        file = root / "folder" / "train" / names[label] / f"{key}.jpg"
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(data)
    datasets.disable_progress_bars()
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    table = datasets.Dataset.from_dict(
        {"image": [{"bytes": d, "path": None} for _, d, _ in samples], "label": [lab for *_, lab in samples]},
        features=features,
    )
    datasets.DatasetDict(train=table, test=table.select(range(10))).save_to_disk(str(root / "hf-disk"))
    (root / "hf-parquet" / "data").mkdir(parents=True)
    step = 500
    for k, lo in enumerate(range(0, num, step)):
        part = table.select(range(lo, min(lo + step, num)))
        part.to_parquet(str(root / "hf-parquet" / "data" / f"train-{k:05d}.parquet"))
    (root / "wds").mkdir()
    with wds.ShardWriter(str(root / "wds" / "train-%06d.tar"), maxcount=step, verbose=0) as sink:
        for key, data, label in samples:
            sink.write({"__key__": key, "jpg": data, "cls": label})
    (root / "wds" / "classes.txt").write_text("\n".join(names) + "\n")
    (root / "done").write_text("")
    return specs


def loader_for(spec: str, preprocess: Any, patch_size: int, batch: int, workers: int) -> Any:
    """The loader ``extract_features`` builds for this dataset (every sample, shards of 256)."""
    from qkvprobe.data import open_dataset
    from qkvprobe.data.stream import StreamDataset
    from qkvprobe.features.extract import _dataloader, _Prepared, _stream_loader, _StreamBatches

    ds = open_dataset(spec, "train")
    prepared = _Prepared(ds, preprocess, patch_size, ds.task)
    if isinstance(ds, StreamDataset):
        units = [
            (p, [(s, min(s + 256, p0 + n)) for s in range(p0, p0 + n, 256)])
            for p, (p0, n) in enumerate(zip(ds.part_starts(), ds.part_sizes, strict=True))
        ]
        return _stream_loader(_StreamBatches(prepared, units, batch), workers, False)
    batches = [list(range(b, min(b + batch, len(ds)))) for b in range(0, len(ds), batch)]
    return _dataloader(prepared, batches, workers, False)


def read_bytes(ds: Any) -> int:
    """Read every sample's encoded bytes the way the extraction does, without decoding; the sample count."""
    from qkvprobe.data.stream import StreamDataset

    if isinstance(ds, StreamDataset):
        return sum(1 for p in range(len(ds.parts)) for _ in ds._iter_raw(p, lambda _: True))
    if hasattr(ds, "samples"):  # image folder
        return sum(1 for path, _ in ds.samples if path.read_bytes())
    return sum(1 for i in range(len(ds)) if ds._row(i, (ds.image_column, ds.target_column)))


def loading(args: argparse.Namespace) -> None:
    import tempfile

    from qkvprobe.data import build_preprocess

    root = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="qkvprobe-loading-"))
    root.mkdir(parents=True, exist_ok=True)
    specs = write_forms(root, args.images, args.jpeg_size)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=0, dynamic_img_size=True)
    bb = TimmBackbone(model, spec=f"timm:{args.model}", objective="unknown", device=args.device)
    preprocess = build_preprocess(bb.data_config, "classification", patch_size=bb.patch_size)
    workers = [int(w) for w in args.workers.split(",")]
    runs = [(name, w) for name in specs for w in workers]
    times: dict[tuple[str, int], list[float]] = {run: [] for run in runs}
    for _ in range(args.rounds):  # interleaved: load from other processes hits every reader alike
        for name, w in runs:
            start, seen = time.perf_counter(), 0
            for _indices, images, _targets in loader_for(
                specs[name], preprocess, bb.patch_size, args.batch, w
            ):
                seen += len(images)
            times[(name, w)].append(time.perf_counter() - start)
            assert seen == args.images, (name, seen)
    # Bytes alone (no decode): each reader's own cost per sample, which the decode otherwise hides.
    from qkvprobe.data import open_dataset

    opened = {name: open_dataset(spec, "train") for name, spec in specs.items()}
    read_only: dict[str, list[float]] = {name: [] for name in specs}
    for _ in range(args.rounds):
        for name, ds in opened.items():
            start = time.perf_counter()
            assert read_bytes(ds) == args.images, name
            read_only[name].append(time.perf_counter() - start)
    x = torch.randn(args.batch, 3, *preprocess.output_size, device=bb.device)
    bb.extract(x, blocks=(-1,), tokens=PAPER)
    forward = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        bb.extract(x, blocks=(-1,), tokens=PAPER)
        forward.append(time.perf_counter() - start)
    print(
        f"{args.images} JPEGs of {args.jpeg_size}x{args.jpeg_size} px -> {preprocess.output_size} ({args.model} eval "
        f"transform), batch {args.batch}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
        f"{args.rounds} rounds (images/s: median and best of rounds)"
    )
    print(f"  {'reader':20s} {'workers':>7s} {'median':>8s} {'best':>7s}   vs folder (median / best)")
    for name, w in runs:
        rates = [args.images / t for t in times[(name, w)]]
        folder = [args.images / t for t in times[("image folder", w)]]
        med, best = statistics.median(rates), max(rates)
        print(
            f"  {name:20s} {w:7d} {med:8.1f} {best:7.1f}   {med / statistics.median(folder):5.2f} / "
            f"{best / max(folder):4.2f}"
        )
    print(
        "  bytes only, no decode (best of rounds, samples/s): "
        + ", ".join(f"{name} {args.images / min(t):.0f}" for name, t in read_only.items())
    )
    rate = args.batch / statistics.median(forward)
    print(f"  forward ({args.model}, taps q,k,v,ffn, last block, {args.device}): {rate:.1f} images/s")


if __name__ == "__main__":
    main()
