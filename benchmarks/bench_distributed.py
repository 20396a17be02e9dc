"""Extraction throughput: 1 process vs. N processes under torchrun (gloo, CPU), and a bitwise store check.

Workload: timm ``vit_tiny_patch16_224`` (random weights from a local file, through ``load_backbone``) on
synthetic 224x224 RGB images, tokens q,k,v,ffn at cls,avg, float16 store. Each configuration is launched with
``torchrun --standalone``; the time reported is the extraction itself (rank 0, from just before
``extract_features`` until every rank has finished), launch/import time shown separately.

    nice -n 10 .venv/bin/python benchmarks/bench_distributed.py [--images 192] [--procs 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from qkvprobe.data.base import Dataset


class SyntheticImages(Dataset):
    """Seeded uint8 RGB images [3, 224, 224], 10 classes."""

    def __init__(self, n: int) -> None:
        self.spec, self.split, self.task, self.source = (
            f"synthetic-{n}",
            "train",
            "classification",
            "generated",
        )
        self.classes = [str(i) for i in range(10)]
        self.fingerprint = hashlib.sha256(f"bench-{n}".encode()).hexdigest()
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Any]:
        gen = torch.Generator().manual_seed(i)
        return torch.randint(0, 256, (3, 224, 224), generator=gen, dtype=torch.uint8), i % 10


def worker(args: argparse.Namespace) -> None:
    from qkvprobe.backbones import load_backbone
    from qkvprobe.features import extract_features
    from qkvprobe.features.distributed import barrier, dist_info, init_distributed

    torch.set_num_threads(args.threads)
    init_distributed("cpu")
    bb = load_backbone("timm:vit_tiny_patch16_224", weights=args.weights)
    ds = SyntheticImages(args.images)
    barrier()
    t0 = time.perf_counter()
    extract_features(bb, ds, args.out, batch_size=32, shard_size=32, progress=False, num_workers=0)
    barrier()
    if dist_info().is_main:
        Path(args.report).write_text(json.dumps({"seconds": time.perf_counter() - t0}))


def launch(procs: int, threads: int, images: int, weights: Path, out: Path, report: Path) -> dict[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [
        str(Path(sys.executable).with_name("torchrun")),
        "--standalone",
        "--nproc-per-node",
        str(procs),
        __file__,
        "--worker",
        "--images",
        str(images),
        "--threads",
        str(threads),
        "--weights",
        str(weights),
        "--out",
        str(out),
        "--report",
        str(report),
    ]
    t0 = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if run.returncode:
        raise SystemExit(run.stderr[-3000:])
    seconds = json.loads(report.read_text())["seconds"]
    return {"extract_s": seconds, "wall_s": wall, "images_per_s": images / seconds}


def same_bytes(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.glob("shard-*/*.npy"))
    return files == sorted(p.relative_to(b) for p in b.glob("shard-*/*.npy")) and all(
        (a / f).read_bytes() == (b / f).read_bytes() for f in files
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    import timm
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "w.safetensors"))
        configs = [(1, 1), (1, args.procs), (args.procs, 1)]  # (processes, threads per process)
        results = {}
        for procs, threads in configs:
            out = root / f"store-{procs}x{threads}"
            results[(procs, threads)] = launch(
                procs, threads, args.images, root / "w.safetensors", out, root / "report.json"
            )
        print(
            f"# {args.images} images, vit_tiny_patch16_224 @224, q,k,v,ffn x cls,avg, float16; "
            f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
        )
        print(f"{'processes x threads':>20} {'extract s':>10} {'images/s':>9} {'wall s (incl. launch)':>22}")
        for (procs, threads), r in results.items():
            print(
                f"{f'{procs} x {threads}':>20} {r['extract_s']:>10.2f} {r['images_per_s']:>9.1f} {r['wall_s']:>22.1f}"
            )
        base = results[(1, 1)]["extract_s"]
        print(
            f"speed-up of {args.procs} processes over 1 process (1 thread each): "
            f"{base / results[(args.procs, 1)]['extract_s']:.2f}x"
        )
        print(
            f"store bitwise identical, {args.procs} processes vs 1: "
            f"{same_bytes(root / 'store-1x1', root / f'store-{args.procs}x1')}"
        )


if __name__ == "__main__":
    main()
