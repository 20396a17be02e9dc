"""Extraction under torchrun (2 processes, gloo on CPU): same bytes as one process, resumable after a rank dies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from qkvprobe.errors import StoreError
from qkvprobe.features import FeatureStore, extract_features
from qkvprobe.features.distributed import DistInfo, all_gather_objects, dist_info, shard_for_rank
from qkvprobe.features.store import MANIFEST
from test_store import TESTS_DIR, SyntheticDataset, ToyBackbone, single_thread  # noqa: F401

TORCHRUN = Path(sys.executable).with_name("torchrun")
NUM, SHARD = 11, 2  # 6 shards, the last one short: no rank gets padded duplicates

SCRIPT = """
import json, os, sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from test_store import SyntheticDataset, ToyBackbone
from qkvprobe.features import extract_features
from qkvprobe.features.distributed import all_gather_objects, dist_info
rank = int(os.environ["RANK"])
bb = ToyBackbone(delay=0.05, die_after_calls={die_after} if rank == {die_rank} else None)
store = extract_features(bb, SyntheticDataset({num}), {out!r}, batch_size=2, shard_size={shard}, progress=False)
calls = all_gather_objects(bb.calls)
if dist_info().is_main:
    json.dump({{"calls": calls, "complete": store.manifest["complete"]}}, open({report!r}, "w"))
"""


def torchrun(
    tmp_path: Path, out: Path, *, die_rank: int = -1, die_after: int = 0
) -> subprocess.CompletedProcess:
    report = tmp_path / f"report-{out.name}.json"
    script = tmp_path / "extract_script.py"
    script.write_text(
        SCRIPT.format(
            tests=str(TESTS_DIR),
            die_after=die_after,
            die_rank=die_rank,
            num=NUM,
            out=str(out),
            shard=SHARD,
            report=str(report),
        )
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "--monitor-interval", "0.1", str(script)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


def single_process_reference(out: Path) -> FeatureStore:
    # one intra-op thread here (autouse fixture) as in the ranks: same kernels, same bytes
    return extract_features(
        ToyBackbone(), SyntheticDataset(NUM), out, batch_size=2, shard_size=SHARD, progress=False
    )


def assert_same_bytes(a: Path, b: Path) -> None:
    shards = sorted(p.name for p in a.glob("shard-*"))
    assert shards == sorted(p.name for p in b.glob("shard-*")) and len(shards) == 6
    for shard in shards:
        files = sorted(p.name for p in (a / shard).iterdir())
        assert files == sorted(p.name for p in (b / shard).iterdir())
        for name in files:
            assert (a / shard / name).read_bytes() == (b / shard / name).read_bytes(), (shard, name)


def test_shard_for_rank_is_disjoint_and_unpadded() -> None:
    parts = [shard_for_rank(range(7), r, 3) for r in range(3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    assert shard_for_rank([1, 2], 2, 4) == [] and shard_for_rank("ab") == ["a", "b"]
    with pytest.raises(ValueError, match=r"rank 2 is outside a world of size 2"):
        shard_for_rank(range(3), 2, 2)
    assert dist_info() == DistInfo() and all_gather_objects(5) == [5]


def test_two_process_gloo_equals_single_process(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    seen_early: list[str] = []
    stop = threading.Event()

    def watch() -> None:  # the manifest must never say complete while a shard is still missing
        while not stop.wait(0.02):  # poll, without stealing a core from the ranks
            try:
                m = json.loads((out / MANIFEST).read_text())
            except (OSError, ValueError):
                continue
            if m["complete"] and len(list(out.glob("shard-*"))) < len(m["shards"]):
                seen_early.append("complete before all shards")

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        run = torchrun(tmp_path, out)
    finally:
        stop.set()
        watcher.join()
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "report-ddp.json").read_text())
    assert report == {"calls": [3, 3], "complete": True}  # 6 shards, one batch each, split 3 / 3
    assert not seen_early
    assert_same_bytes(out, single_process_reference(tmp_path / "single").path)
    store = FeatureStore.open(out)
    assert store.indices().tolist() == list(range(NUM))  # no duplicates, no padding


def test_killed_rank_then_rerun_recomputes_only_missing(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    run = torchrun(tmp_path, out, die_rank=1, die_after=1)  # rank 1 writes one shard, then dies
    assert run.returncode != 0  # torchrun saw the dead rank and stopped the group
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["complete"] is False
    with pytest.raises(StoreError, match="incomplete"):
        FeatureStore.open(out)
    done = sorted(p.name for p in out.glob("shard-*"))
    assert 1 <= len(done) < 6 and "shard-00001" in done  # rank 1's first shard survived its death

    # Re-run the same extraction (here in one process: a store does not depend on the world size).
    bb = ToyBackbone()
    store = extract_features(bb, SyntheticDataset(NUM), out, batch_size=2, shard_size=SHARD, progress=False)
    assert bb.calls == 6 - len(done)  # only the missing shards were computed
    assert store.manifest["complete"] and not list(out.glob(".shard-*"))
    assert_same_bytes(out, single_process_reference(tmp_path / "single").path)
