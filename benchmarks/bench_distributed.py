"""1 process vs. N processes under torchrun (gloo, CPU): the whole study (``--study``), or extraction alone.

``--study``: the default study (``qkvprobe run``, configs/default.yaml; ``--set key=value`` changes it) run
cold (its own feature cache and run directory each; the datasets prepared beforehand, outside the timings) as a
plain ``qkvprobe run`` with 1 and with N intra-op threads, and as ``torchrun --nproc-per-node N -m qkvprobe run``
with one thread per process. Prints the wall time of each command (imports and launch included) and the
study's own ``total_s`` (run.json of rank 0), the ratio, and whether results.csv, paired.json and the answer
table are the same bytes as the one-process, one-thread run's.

    nice -n 10 .venv/bin/python benchmarks/bench_distributed.py --study [--procs 2] [--set key=value ...]

Extraction (default): workload timm ``vit_tiny_patch16_224`` (random weights from a local file, through ``load_backbone``) on
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
    parser.add_argument("--study", action="store_true", help="time the whole study (qkvprobe run)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="study config override")
    parser.add_argument("--keep", type=Path, default=None, help="--study: work in DIR and keep it")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.study:
        study(args)
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


def study(args: argparse.Namespace) -> None:
    from qkvprobe.config import load_config
    from qkvprobe.study.data import open_split

    work = args.keep or Path(tempfile.mkdtemp(prefix="qkvprobe-bench-study-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "QKVPROBE_CACHE": str(work / "data-cache")}
    os.environ["QKVPROBE_CACHE"] = env["QKVPROBE_CACHE"]
    cfg = load_config(None, args.overrides)
    for d in cfg.datasets:  # data caches (generated scenes) made once, outside the timings
        for which in ("train", "test"):
            open_split(d, which, cfg.seed, spec=cfg.dataset_spec(d), root=cfg.dataset_root(d))
    sets = [x for o in args.overrides for x in ("--set", o)]
    python = Path(sys.executable)
    runs: dict[str, dict[str, Any]] = {}
    for procs, threads in [(1, 1), (1, args.procs), (args.procs, 1)]:
        name = f"{procs}x{threads}"
        launcher = (
            [str(python), "-m", "qkvprobe"]
            if procs == 1
            else [
                str(python.with_name("torchrun")),
                "--standalone",
                "--nproc-per-node",
                str(procs),
                "-m",
                "qkvprobe",
            ]
        )
        cmd = [
            *launcher,
            "run",
            *sets,
            "--set",
            f"cache_dir={work / f'cache-{name}'}",
            "--out",
            str(work / name),
        ]
        t0 = time.perf_counter()
        run = subprocess.run(
            [*cmd, "--quiet"], capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": str(threads)}
        )
        wall = time.perf_counter() - t0
        if run.returncode:
            raise SystemExit(run.stderr[-3000:])
        info = json.loads((work / name / "run.json").read_text())
        table = run.stdout[: run.stdout.index("\nresults: ")]
        runs[name] = {"wall": wall, "study": info["timings"]["total_s"], "table": table, "cmd": cmd}
        print(f"# {name}: {' '.join(cmd)}  (OMP_NUM_THREADS={threads})", flush=True)

    def same(a: str, b: str) -> bool:
        files = ("results.csv", "paired.json")
        return runs[a]["table"] == runs[b]["table"] and all(
            (work / a / f).read_bytes() == (work / b / f).read_bytes() for f in files
        )

    print(
        f"# default study{' with ' + ' '.join(args.overrides) if args.overrides else ''}, cold; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'processes x threads':>20} {'wall s':>8} {'study s':>8} {'same bytes as 1x1':>18}")
    for name, r in runs.items():
        print(
            f"{name.replace('x', ' x '):>20} {r['wall']:>8.1f} {r['study']:>8.1f} {same('1x1', name)!s:>18}"
        )
    n = f"{args.procs}x1"
    print(
        f"{args.procs} processes vs 1 process x 1 thread: {runs['1x1']['wall'] / runs[n]['wall']:.2f}x (wall); "
        f"vs 1 process x {args.procs} threads: {runs[f'1x{args.procs}']['wall'] / runs[n]['wall']:.2f}x (wall)"
    )


if __name__ == "__main__":
    main()
