"""Extraction loop: NaN/overflow errors, a really killed run that resumes, option validation, the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from qkvprobe.errors import ConfigError, DataError, FeatureError, StoreError
from qkvprobe.features import FeatureStore, extract_features
from qkvprobe.features.store import MANIFEST
from test_store import TESTS_DIR, SyntheticDataset, ToyBackbone, single_thread  # noqa: F401


def test_nan_features_raise_and_leave_no_complete_store(tmp_path: Path) -> None:
    bb, ds = ToyBackbone(nan_on_blank=True), SyntheticDataset(8, bad=5)
    with pytest.raises(FeatureError, match=r"NaN/Inf in q features of block 1 for dataset index 5"):
        extract_features(bb, ds, tmp_path / "s", batch_size=2, shard_size=2, progress=False)
    with pytest.raises(StoreError, match=r"incomplete \(2 of 4 shards\)"):
        FeatureStore.open(tmp_path / "s")
    assert not json.loads((tmp_path / "s" / MANIFEST).read_text())["complete"]
    assert not list((tmp_path / "s").glob(".shard-*"))  # the half-built shard was cleaned up


def test_float16_overflow_raises(tmp_path: Path) -> None:
    with pytest.raises(
        FeatureError,
        match=r"ffn avg features of block 1 overflow float16 for dataset index 0; pass --dtype float32",
    ):
        extract_features(
            ToyBackbone(scale=1e7),
            SyntheticDataset(2),
            tmp_path / "s",
            tokens="ffn",
            positions="avg",
            progress=False,
        )
    store = extract_features(
        ToyBackbone(scale=1e7),
        SyntheticDataset(2),
        tmp_path / "t",
        tokens="ffn",
        positions="avg",
        dtype="float32",
        progress=False,
    )
    assert np.abs(store.get("ffn", "avg")).max() > 65504


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tokens": "q,x"}, "unknown token 'x'; choose from q, k, v, ffn, ffn_norm"),
        ({"positions": "cls,middle"}, "unknown position 'middle'"),
        ({"positions": ""}, "no position given"),
        ({"dtype": "bfloat16"}, "unknown dtype 'bfloat16'; choose from float16, float32"),
        ({"amp": "fp8"}, "unknown amp mode 'fp8'"),
        ({"blocks": "last"}, "blocks must be integers"),
        ({"batch_size": 0}, "batch size must be at least 1"),
        ({"num_workers": -1}, "num_workers must be 0 or more"),
    ],
)
def test_bad_options(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        extract_features(ToyBackbone(), SyntheticDataset(2), tmp_path / "s", progress=False, **kwargs)


def test_cls_without_class_token_and_bad_block_and_empty(tmp_path: Path) -> None:
    bb = ToyBackbone()
    bb.has_cls_token = False
    with pytest.raises(ConfigError, match=r"needs a class token but toy:vit has none"):
        extract_features(bb, SyntheticDataset(2), tmp_path / "s", progress=False)
    with pytest.raises(Exception, match=r"block index 5 is out of range"):
        extract_features(ToyBackbone(), SyntheticDataset(2), tmp_path / "s", blocks=(5,), progress=False)
    with pytest.raises(DataError, match=r"has no samples"):
        extract_features(ToyBackbone(), SyntheticDataset(0), tmp_path / "s", progress=False)


def test_not_writable_out(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")  # a path under a regular file cannot be created, even by root
    with pytest.raises(
        StoreError, match=r"cannot write the feature store at .*file/store.*pass a writable --out"
    ):
        extract_features(ToyBackbone(), SyntheticDataset(2), tmp_path / "file" / "store", progress=False)


def test_amp_workers_and_progress(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bb, ds = ToyBackbone(), SyntheticDataset(6)
    plain = extract_features(bb, ds, tmp_path / "a", dtype="float32", batch_size=3, progress=False)
    amp = extract_features(bb, ds, tmp_path / "b", dtype="float32", batch_size=3, amp="bf16", progress=False)
    assert amp.key != plain.key  # bf16 features differ, so they get their own store
    np.testing.assert_allclose(amp.get("q", "cls"), plain.get("q", "cls"), atol=0.1)
    # DataLoader worker processes + a forced-terminal progress bar give the same bytes
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    workers = extract_features(
        bb, ds, tmp_path / "c", dtype="float32", batch_size=3, num_workers=2, progress=True
    )
    np.testing.assert_array_equal(workers.get("v", "avg"), plain.get("v", "avg"))


KILLABLE = """
import sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from test_store import SyntheticDataset, ToyBackbone
from qkvprobe.features import extract_features
extract_features(ToyBackbone(delay={delay}), SyntheticDataset(12), {out!r}, batch_size=2, shard_size=2,
                 dtype="float32", progress=False)
"""


def test_killed_run_resumes_to_identical_store(tmp_path: Path) -> None:
    out = tmp_path / "killed"
    code = KILLABLE.format(tests=str(TESTS_DIR), delay=0.25, out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while len(list(out.glob("shard-*"))) < 2:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "no shard appeared in 60 s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    done_before = len(list(out.glob("shard-*")))
    assert 2 <= done_before < 6
    with pytest.raises(StoreError, match=r"incomplete .* re-run the same extract command to resume"):
        FeatureStore.open(out)

    bb, ds = ToyBackbone(), SyntheticDataset(12)
    resumed = extract_features(bb, ds, out, batch_size=2, shard_size=2, dtype="float32", progress=False)
    assert bb.calls == 6 - done_before  # one batch per missing shard, none for the finished ones
    fresh = extract_features(
        ToyBackbone(), ds, tmp_path / "fresh", batch_size=2, shard_size=2, dtype="float32", progress=False
    )
    for name in (p.name for p in (fresh.path / "shard-00000").iterdir()):
        for i in range(6):
            a = (resumed.path / f"shard-{i:05d}" / name).read_bytes()
            assert a == (fresh.path / f"shard-{i:05d}" / name).read_bytes(), (name, i)
    assert not list(out.glob(".shard-*"))
