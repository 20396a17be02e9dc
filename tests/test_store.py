"""Feature store: exact round trip, content-addressed reuse, mismatch/incomplete refusals, streaming reads.

Also home of the fakes (a tiny pure-torch ViT backbone and a synthetic dataset) that the extract and
distributed tests import, in-process and from subprocesses (``from test_store import ...``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from qkvprobe.backbones.base import Backbone
from qkvprobe.data.base import Dataset
from qkvprobe.errors import StoreError
from qkvprobe.features import FeatureStore, cached_store, extract_features, plan_store
from qkvprobe.features.store import MANIFEST, mark_shards, read_manifest
from qkvprobe.io import write_json

TESTS_DIR = Path(__file__).parent


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    """One intra-op thread: the toy's tiny ops drown in OpenMP hand-offs on a busy 2-core box, and the
    subprocess writers (torchrun ranks) run with one thread too, so bytes compare equal."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- fakes -----------------------------------
class _Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        attn = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)
        x = x + self.proj(attn @ v)
        x = x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(x))))
        return x, {"q": q, "k": k, "v": v, "ffn": x}


class ToyViT(nn.Module):
    """Pure-torch ViT (patch 4, D=16, 2 blocks, 1 channel): cheap to import in subprocesses."""

    def __init__(self, dim: int = 16, depth: int = 2, patch: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.patch_embed = nn.Conv2d(1, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.1)
        self.blocks = nn.ModuleList(_Block(dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)


class ToyBackbone(Backbone):
    """Deterministic fake backbone; counts ``extract`` calls; optional delay / NaN injection / death."""

    def __init__(
        self,
        *,
        delay: float = 0.0,
        nan_on_blank: bool = False,
        scale: float = 1.0,
        die_after_calls: int | None = None,
        spec: str = "toy:vit",
    ) -> None:
        self.spec, self.objective, self.model = spec, "dino", ToyViT().eval()
        self.device = torch.device("cpu")
        self.embed_dim, self.num_blocks, self.num_heads, self.patch_size = 16, 2, 1, 4
        self.num_prefix_tokens, self.num_register_tokens, self.has_cls_token = 1, 0, True
        self.data_config = {"mean": [0.5], "std": [0.25], "input_size": (1, 28, 28)}
        self.weights_digest = hashlib.sha256(b"toy-weights").hexdigest()
        self.calls, self.delay, self.nan_on_blank, self.scale = 0, delay, nan_on_blank, scale
        self.die_after_calls = die_after_calls

    def extract(
        self,
        images: torch.Tensor,
        blocks: Sequence[int] = (-1,),
        tokens: Sequence[str] = ("q", "k", "v", "ffn"),
    ) -> dict[Any, torch.Tensor]:
        if self.die_after_calls is not None and self.calls >= self.die_after_calls:
            os._exit(17)  # a process that dies without cleaning up (like SIGKILL / OOM)
        self.calls += 1
        time.sleep(self.delay)
        m = self.model
        x = m.patch_embed(images * self.scale).flatten(2).transpose(1, 2)
        x = torch.cat([m.cls_token.expand(len(x), -1, -1), x], dim=1)
        taps: dict[int, dict[str, torch.Tensor]] = {}
        for i, blk in enumerate(m.blocks):
            x, taps[i] = blk(x)
            taps[i]["ffn_norm"] = m.norm(x)
        if self.nan_on_blank:
            # a constant image (SyntheticDataset(bad=i)) gives NaN features, like a broken model would
            blank = images.flatten(1).amax(1) == images.flatten(1).amin(1)
            for t in taps.values():
                for v in t.values():
                    v[blank] = float("nan")
        wanted = [self.resolve_block(b) for b in blocks]
        if len(blocks) == 1:
            return {t: taps[wanted[0]][t] for t in tokens}
        return {(b, t): taps[w][t] for b, w in zip(blocks, wanted, strict=True) for t in tokens}


class SyntheticDataset(Dataset):
    """Seeded uint8 28x28 grey images; classification labels ``i % 3`` or segmentation masks with 255s."""

    def __init__(
        self, n: int = 10, task: str = "classification", seed: int = 0, bad: int | None = None
    ) -> None:
        self.spec, self.split, self.task, self.source = f"synthetic-{task}", "train", task, "generated"
        self.classes = ["background", "a", "b"] if task == "segmentation" else ["a", "b", "c"]
        gen = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (n, 1, 28, 28), generator=gen, dtype=torch.uint8)
        masks = torch.randint(0, 3, (n, 7, 7), generator=gen)
        masks[:, 0, 0] = 255
        self.masks = masks.repeat_interleave(4, 1).repeat_interleave(4, 2).long()
        self.fingerprint = hashlib.sha256(f"{n}-{task}-{seed}".encode()).hexdigest()
        self.bad = bad

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Any]:
        image = self.images[i]
        if self.bad is not None and i == self.bad:
            image = torch.full_like(image, 255)
        return image, (self.masks[i] if self.task == "segmentation" else i % 3)


def reference_features(
    bb: ToyBackbone, ds: SyntheticDataset, token: str, position: str, block: int, batch_size: int
) -> np.ndarray:
    """Direct recomputation (same preprocessing, same batches) for exactness checks."""
    _, preprocess = plan_store(bb, ds, tokens=(token,), positions=(position,), blocks=(block,))
    out = []
    for s in range(0, len(ds), batch_size):
        images = torch.stack([preprocess(*ds[i])[0] for i in range(s, min(s + batch_size, len(ds)))])
        with torch.no_grad():
            x = bb.extract(images, blocks=(block,), tokens=(token,))[token]
        patch = x[:, 1:]
        out.append({"cls": x[:, 0], "avg": patch.mean(1), "patch": patch}[position])
    return torch.cat(out).numpy()


# ---------------------------------------------------------------- tests ------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_round_trip_exact(tmp_path: Path, dtype: str) -> None:
    bb, ds = ToyBackbone(), SyntheticDataset(10)
    store = extract_features(
        bb,
        ds,
        tmp_path / "s",
        tokens="q,k,v,ffn",
        positions="cls,avg,patch",
        dtype=dtype,
        batch_size=4,
        shard_size=4,
        progress=False,
    )
    assert store.num_samples == 10 and store.num_shards == 3 and store.blocks == [1] and store.grid == (7, 7)
    for token in ("q", "k", "v", "ffn"):
        for position in ("cls", "avg", "patch"):
            got = store.get(token, position)
            ref = reference_features(bb, ds, token, position, -1, 4).astype(dtype)
            assert got.dtype == np.dtype(dtype) and got.shape == ref.shape
            np.testing.assert_array_equal(got, ref)
            chunks = list(store.iter_chunks(token, position, chunk_size=3))
            assert [s for s, _ in chunks] == [0, 3, 4, 7, 8]
            np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]), ref)
    assert store.get("q", "patch", block=1).shape == (10, 49, 16)
    np.testing.assert_array_equal(store.labels(), np.arange(10) % 3)
    np.testing.assert_array_equal(store.indices(), np.arange(10))
    m = json.loads((tmp_path / "s" / MANIFEST).read_text())
    assert m["complete"] and all(s["state"] == "complete" for s in m["shards"])
    assert m["dtype"] == dtype and m["dataset"]["fingerprint"] == ds.fingerprint and m["objective"] == "dino"


def test_single_shard_is_memory_mapped_and_several_blocks(tmp_path: Path) -> None:
    bb, ds = ToyBackbone(), SyntheticDataset(6)
    store = extract_features(
        bb,
        ds,
        tmp_path / "s",
        blocks=(0, -1),
        tokens=("k",),
        positions=("cls",),
        dtype="float32",
        progress=False,
    )
    assert store.blocks == [0, 1] and store.num_shards == 1
    assert isinstance(store.get("k", "cls", block=0), np.memmap)
    np.testing.assert_array_equal(
        store.get("k", "cls", block=0), reference_features(bb, ds, "k", "cls", 0, 64)
    )
    np.testing.assert_array_equal(store.get("k", "cls", block=-1), store.get("k", "cls", block=1))
    assert next(iter(store.iter_chunks("k", "cls", shards=[0])))[0] == 0


def test_segmentation_patch_labels(tmp_path: Path) -> None:
    bb, ds = ToyBackbone(), SyntheticDataset(5, task="segmentation")
    store = extract_features(bb, ds, tmp_path / "s", tokens="v", positions="patch", progress=False)
    labels = store.patch_labels()
    assert labels.shape == (5, 49) and labels.dtype == np.int64
    # masks are 4x4 blocks per patch: the majority is the block's value; patch (0, 0) is ignore
    np.testing.assert_array_equal(labels, ds.masks[:, ::4, ::4].reshape(5, 49).numpy())
    assert (labels[:, 0] == 255).all()
    with pytest.raises(StoreError, match=r"segmentation store: use patch_labels"):
        store.labels()


def test_reuse_does_not_recompute(tmp_path: Path) -> None:
    bb, ds = ToyBackbone(), SyntheticDataset(6)
    first = extract_features(bb, ds, tmp_path / "s", batch_size=4, progress=False)
    calls = bb.calls
    assert calls == 2
    again = extract_features(bb, ds, tmp_path / "s", batch_size=2, blocks=(1,), progress=False)
    assert bb.calls == calls and again.key == first.key  # block 1 == -1 for 2 blocks: same key


def test_cached_store_is_content_addressed(tmp_path: Path) -> None:
    bb, ds = ToyBackbone(), SyntheticDataset(4)
    a = cached_store(tmp_path, bb, ds, tokens=("q",), positions=("cls",), progress=False)
    b = cached_store(tmp_path, bb, ds, tokens=("q",), positions=("cls",), progress=False)
    c = cached_store(tmp_path, bb, ds, tokens=("q",), positions=("cls",), dtype="float32", progress=False)
    assert a.path == b.path == tmp_path / a.key[:16] and c.path != a.path and bb.calls == 2


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"dtype": "float32"}, "dtype is 'float16' there but 'float32' now"),
        ({"tokens": ("q", "k")}, "tokens is"),
        ({"image_size": 32}, "preprocessing"),
    ],
)
def test_mismatched_store_refused(tmp_path: Path, change: dict, field: str) -> None:
    bb, ds = ToyBackbone(), SyntheticDataset(4)
    extract_features(bb, ds, tmp_path / "s", tokens=("q",), progress=False)
    with pytest.raises(StoreError, match=rf"made for other inputs: .*\({field}.*pass another --out"):
        extract_features(bb, ds, tmp_path / "s", **{"tokens": ("q",), **change}, progress=False)


def test_other_dataset_refused(tmp_path: Path) -> None:
    bb = ToyBackbone()
    extract_features(bb, SyntheticDataset(4), tmp_path / "s", progress=False)
    with pytest.raises(StoreError, match=r"dataset_fingerprint is"):
        extract_features(bb, SyntheticDataset(4, seed=1), tmp_path / "s", progress=False)


def test_open_errors(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"is not a feature store \(no manifest.json\)"):
        FeatureStore.open(tmp_path)
    (tmp_path / "junk.txt").write_text("x")
    with pytest.raises(StoreError, match=r"not empty and is not a feature store.*junk.txt"):
        extract_features(ToyBackbone(), SyntheticDataset(2), tmp_path, progress=False)
    store = extract_features(
        ToyBackbone(),
        SyntheticDataset(4),
        tmp_path / "s",
        shard_size=2,
        tokens="q",
        positions="cls",
        progress=False,
    )
    with pytest.raises(StoreError, match=r"token 'k' is not in feature store.*--tokens"):
        store.get("k", "cls")
    with pytest.raises(StoreError, match=r"position 'patch' is not in.*--positions"):
        store.get("q", "patch")
    with pytest.raises(StoreError, match=r"block 0 is not in.*--blocks 0"):
        store.get("q", "cls", block=0)
    with pytest.raises(StoreError, match=r"classification store: use labels"):
        store.patch_labels()
    m = json.loads((store.path / MANIFEST).read_text())
    # a shard lost from a store marked complete
    for f in (store.path / "shard-00001").iterdir():
        f.unlink()
    (store.path / "shard-00001").rmdir()
    with pytest.raises(StoreError, match=r"marked complete but shard shard-00001 is missing"):
        FeatureStore.open(store.path)
    write_json(store.path / MANIFEST, m | {"complete": False}, indent=1, fsync=True)
    with pytest.raises(StoreError, match=r"incomplete \(1 of 2 shards\), re-run the same extract command"):
        FeatureStore.open(store.path)
    write_json(store.path / MANIFEST, m | {"schema_version": 99}, indent=1, fsync=True)
    with pytest.raises(StoreError, match=r"schema version 99"):
        FeatureStore.open(store.path)
    (store.path / MANIFEST).write_text("{not json")
    with pytest.raises(StoreError, match=r"cannot read .*manifest.json"):
        FeatureStore.open(store.path)


def test_resume_after_lost_shard_recomputes_only_it(tmp_path: Path) -> None:
    bb, ds = ToyBackbone(), SyntheticDataset(6)
    ref = extract_features(bb, ds, tmp_path / "s", shard_size=2, batch_size=2, progress=False)
    before = ref.get("q", "cls").copy()
    m = json.loads((ref.path / MANIFEST).read_text())
    for f in (ref.path / "shard-00002").iterdir():
        f.unlink()
    (ref.path / "shard-00002").rmdir()
    write_json(ref.path / MANIFEST, m | {"complete": False}, indent=1, fsync=True)
    bb.calls = 0
    again = extract_features(bb, ds, tmp_path / "s", shard_size=2, batch_size=2, progress=False)
    assert bb.calls == 1
    np.testing.assert_array_equal(again.get("q", "cls"), before)


def test_manifest_complete_only_when_every_shard_is_on_disk(tmp_path: Path) -> None:
    store = extract_features(ToyBackbone(), SyntheticDataset(6), tmp_path / "s", shard_size=2, progress=False)
    (store.path / "shard-00002" / "b1.q.cls.npy").unlink()  # one file short = shard not complete
    m = mark_shards(store.path, read_manifest(store.path))
    assert m["complete"] is False and m["num_complete_shards"] == 2 and m["shards"][2]["state"] == "pending"


@pytest.mark.parametrize("shard_size", [4, 100])  # several shards (concatenated) and one (a memmap view)
def test_per_head_tokens_are_column_slices(tmp_path: Path, shard_size: int) -> None:
    bb, ds = ToyBackbone(), SyntheticDataset(10)
    bb.num_heads = (
        4  # D = 16: heads of 4 columns, concatenated in head order (test_taps rebuilds attention so)
    )
    store = extract_features(
        bb,
        ds,
        tmp_path / "s",
        tokens="q,v,ffn",
        positions="cls,patch",
        dtype="float32",
        shard_size=shard_size,
        progress=False,
    )
    assert store.num_heads == 4
    assert store.head_tokens() == [f"{t}.h{h}" for t in ("q", "v") for h in range(4)]
    assert store.head_tokens(["ffn", "v", "k"]) == ["v.h0", "v.h1", "v.h2", "v.h3"]
    for position in ("cls", "patch"):
        whole = reference_features(bb, ds, "v", position, -1, 4)
        for h in range(4):
            got = store.get(f"v.h{h}", position)
            assert got.shape == (*whole.shape[:-1], 4)
            np.testing.assert_array_equal(got, whole[..., 4 * h : 4 * h + 4])
            chunks = np.concatenate([c for _, c in store.iter_chunks(f"v.h{h}", position, chunk_size=3)])
            np.testing.assert_array_equal(chunks, whole[..., 4 * h : 4 * h + 4])
    with pytest.raises(StoreError, match=r"'q.h4': the model has 4 heads \(h0 … h3\)"):
        store.get("q.h4", "cls")
    with pytest.raises(StoreError, match=r"'ffn.h0': per-head tokens exist for q, k, v only"):
        store.get("ffn.h0", "cls")
    with pytest.raises(StoreError, match=r"token 'k' is not in feature store"):
        store.get("k.h0", "cls")


def test_per_head_tokens_need_a_store_that_records_heads(tmp_path: Path) -> None:
    store = extract_features(
        ToyBackbone(), SyntheticDataset(4), tmp_path / "s", tokens="q", positions="cls", progress=False
    )
    m = json.loads((tmp_path / "s" / MANIFEST).read_text())
    del m["backbone"]["num_heads"]  # as written before per-head tokens existed
    write_json(tmp_path / "s" / MANIFEST, m, indent=1, fsync=True)
    old = FeatureStore.open(tmp_path / "s")
    assert old.num_heads is None and old.get("q", "cls").shape == store.get("q", "cls").shape
    with pytest.raises(
        StoreError, match=r"does not record the number of attention heads.*re-run its extract"
    ):
        old.get("q.h0", "cls")
    with pytest.raises(StoreError, match="does not record the number of attention heads"):
        old.head_tokens()
    # Re-running the extract command reuses the store (nothing recomputed) and records the heads.
    bb = ToyBackbone()
    again = extract_features(
        bb, SyntheticDataset(4), tmp_path / "s", tokens="q", positions="cls", progress=False
    )
    assert bb.calls == 0 and again.num_heads == 1 and again.head_tokens() == ["q.h0"]
    np.testing.assert_array_equal(again.get("q.h0", "cls"), store.get("q", "cls"))
