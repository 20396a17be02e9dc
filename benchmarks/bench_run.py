"""Time the default study (`qkvprobe run`) cold and warm.

cold: fresh feature cache, fresh data cache (scenes generated), fresh run directory.
warm: the same feature cache, a fresh run directory (features reused, every rule and protocol re-run).
resume: the warm run directory again (every unit already done: only the report is re-rendered).

Targets (issue 6): cold <= 5 min and warm <= 30 s on a 2-core CPU machine.

    python benchmarks/bench_run.py [--set key=value ...] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="config override (repeatable)"
    )
    parser.add_argument(
        "--keep", type=Path, default=None, help="work in DIR and keep it (default: a temp dir)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument(
        "--builtin-dir",
        type=Path,
        default=None,
        help="load builtin: models from DIR (model cards + safetensors), e.g. stand-ins",
    )
    args = parser.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="qkvprobe-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["QKVPROBE_CACHE"] = str(work / "data-cache")  # cold also means: scenes generated afresh
    if args.builtin_dir is not None:
        import qkvprobe.backbones

        qkvprobe.backbones.builtin_dir = lambda: (
            args.builtin_dir
        )  # loaders look the directory up at call time
    from qkvprobe.config import load_config
    from qkvprobe.study import run_study

    base = [f"cache_dir={work / 'features'}", f"out_dir={work / 'runs'}", *args.overrides]
    times: dict[str, float] = {}
    for label, name in (("cold", "bench-cold"), ("warm", "bench-warm"), ("resume", "bench-warm")):
        cfg = load_config(None, [*base, f"name={name}"])
        t0 = time.perf_counter()
        result = run_study(cfg, fresh=label != "resume", progress=not args.quiet)
        times[label] = time.perf_counter() - t0
        print(
            f"{label:>6}: {times[label]:7.1f} s  ({len(result.rows)} rows, {result.skipped_units} units skipped)",
            flush=True,
        )
    print(
        f"cold {times['cold']:.1f} s (target 300 s) · warm {times['warm']:.1f} s (target 30 s) · "
        f"resume {times['resume']:.1f} s · cpus {os.cpu_count()} · work dir {work}"
    )
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
