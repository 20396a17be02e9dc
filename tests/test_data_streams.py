"""``hfds:`` and ``wds:`` datasets built here from real images (scikit-learn's digits): the same images as a
folder, a Hugging Face dataset and WebDataset shards give the same feature store; streams resume after a
kill, split over torchrun ranks by part, and refuse bad input with one-line errors."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from qkvprobe.config import DatasetConfig
from qkvprobe.data import class_pixel_counts, list_datasets, open_dataset
from qkvprobe.data.stream import StreamDataset
from qkvprobe.errors import DataError, SpecError
from qkvprobe.features import FeatureStore, extract_features
from streamdata import CLASSES, NUM_TEST, NUM_TRAIN, make_folder, make_hf_disk, make_hf_parquet, make_wds
from test_store import TESTS_DIR, ToyBackbone, single_thread  # noqa: F401

pytest.importorskip("datasets")
pytest.importorskip("webdataset")

TORCHRUN = Path(sys.executable).with_name("torchrun")
TOKENS, POSITIONS = ("q", "ffn"), ("cls", "avg")


@pytest.fixture(scope="module")
def forms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """``{task: {form: spec}}`` for the folder, HF save_to_disk, HF Parquet and WebDataset forms."""
    base = tmp_path_factory.mktemp("forms")
    out: dict[str, dict[str, str]] = {}
    for task in ("classification", "segmentation"):
        t = base / task
        seg = "?task=segmentation&classes=ade20k" if task == "segmentation" else ""
        out[task] = {
            "folder": make_folder(t / "folder", task),
            "hf-disk": f"hfds:{make_hf_disk(t / 'hf-disk', task)}{seg}",
            "hf-parquet": f"hfds:{make_hf_parquet(t / 'hf-parquet', task)}{seg}",
            "wds": f"wds:{make_wds(t / 'wds', task)}{seg}",
        }
    return out


def extract(spec: str, split: str, out: Path, **kwargs: Any) -> FeatureStore:
    ds = open_dataset(spec, split)
    task_positions = ("patch",) if ds.task == "segmentation" else POSITIONS
    options = {
        "batch_size": 4,
        "shard_size": 6,
        "progress": False,
        "tokens": TOKENS,
        "positions": task_positions,
    }
    return extract_features(kwargs.pop("backbone", ToyBackbone()), ds, out, **(options | kwargs))


def same_content(a: FeatureStore, b: FeatureStore) -> None:
    for token in a.tokens:
        for position in a.positions:
            np.testing.assert_array_equal(
                a.get(token, position), b.get(token, position), err_msg=f"{token} {position}"
            )
    labels = (lambda s: s.labels()) if a.task == "classification" else (lambda s: s.patch_labels())
    np.testing.assert_array_equal(labels(a), labels(b))
    np.testing.assert_array_equal(a.indices(), b.indices())


def test_the_three_forms_open_alike(forms: dict[str, dict[str, str]]) -> None:
    cls = {name: open_dataset(spec, "test") for name, spec in forms["classification"].items()}
    ref = cls["folder"]
    for name, ds in cls.items():
        assert (len(ds), ds.task, ds.classes) == (NUM_TEST, "classification", CLASSES), name
        np.testing.assert_array_equal(ds.targets(), ref.targets(), err_msg=name)
        for i in (0, 7, NUM_TEST - 1):
            image, label = ds[i]
            assert torch.equal(image, ref[i][0]) and label == ref[i][1] and image.dtype == torch.uint8, (
                name,
                i,
            )
    assert cls["hf-disk"].split == "validation" and cls["wds"].split == "val"  # test finds validation / val
    assert isinstance(cls["wds"], StreamDataset) and isinstance(cls["hf-parquet"], StreamDataset)
    assert len({ds.fingerprint for ds in cls.values()}) == 4
    seg = {name: open_dataset(spec, "train") for name, spec in forms["segmentation"].items()}
    counts = class_pixel_counts(seg["folder"])
    for name, ds in seg.items():
        assert (len(ds), ds.task, len(ds.classes), ds.targets()) == (NUM_TRAIN, "segmentation", 150, None), (
            name
        )
        for i in (0, 13, NUM_TRAIN - 1):  # reduce-zero-label: annotation 0 -> 255, v -> v-1
            assert torch.equal(ds.mask(i), seg["folder"].mask(i)) and torch.equal(ds[i][1], ds.mask(i)), (
                name,
                i,
            )
            assert set(np.unique(ds.mask(i).numpy())) <= {255, *range(10)}
        np.testing.assert_array_equal(class_pixel_counts(ds), counts, err_msg=name)


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_stores_from_folder_hf_and_wds_are_equal(
    tmp_path: Path, forms: dict[str, dict[str, str]], task: str
) -> None:
    stores = {name: extract(spec, "train", tmp_path / name) for name, spec in forms[task].items()}
    for name, store in stores.items():
        assert store.num_samples == NUM_TRAIN and store.task == task, name
        same_content(stores["folder"], store)
    # Streams: shards never cross a part (tar 15 + 15 + 10, Parquet 15 + 25), each one a range inside it.
    assert stores["wds"].shard_ranges() == [
        (0, 6),
        (6, 12),
        (12, 15),
        (15, 21),
        (21, 27),
        (27, 30),
        (30, 36),
        (36, 40),
    ]
    parts = stores["hf-parquet"].manifest["dataset"]["parts"]
    assert [p["num_samples"] for p in parts] == [15, 25] and parts[0][
        "name"
    ] == "data/train-00000-of-00002.parquet"
    assert (
        stores["folder"].shard_ranges()[2] == (12, 18) and "parts" not in stores["folder"].manifest["dataset"]
    )
    # DataLoader workers take whole parts: same bytes.
    workers = extract(forms[task]["wds"], "train", tmp_path / "workers", num_workers=2)
    same_content(stores["wds"], workers)
    if task == "segmentation":  # the protocol re-opens the evaluation split from the store's spec
        from qkvprobe.protocols.segmentation import dataset_masks

        for name, store in stores.items():
            masks = dataset_masks(store)
            assert np.array_equal(masks(5), dataset_masks(stores["folder"])(5)), name


class _Crash(RuntimeError):
    pass


def test_killed_stream_resumes_at_the_right_part(
    tmp_path: Path, forms: dict[str, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, out = forms["classification"]["wds"], tmp_path / "killed"
    original = StreamDataset.iter_part
    decoded: list[int] = []
    opened: list[int] = []

    def crash_after(limit: int) -> Callable[..., Iterator[tuple[int, torch.Tensor, Any]]]:
        def iter_part(
            self: StreamDataset, part: int, wanted: Callable[[int], bool] | None = None
        ) -> Iterator[tuple[int, torch.Tensor, Any]]:
            opened.append(part)
            for item in original(self, part, wanted):
                if len(decoded) == limit:
                    raise _Crash(f"reader killed after {limit} samples")
                decoded.append(item[0])
                yield item

        return iter_part

    monkeypatch.setattr(StreamDataset, "iter_part", crash_after(20))
    with pytest.raises(_Crash):
        extract(spec, "train", out)
    done = sorted(p.name for p in out.glob("shard-*"))
    assert done == ["shard-00000", "shard-00001", "shard-00002"]  # tar 0 (0..14) finished; tar 1 was mid-way
    with pytest.raises(Exception, match=r"incomplete \(3 of 8 shards\)"):
        FeatureStore.open(out)

    decoded.clear()
    opened.clear()
    monkeypatch.setattr(StreamDataset, "iter_part", crash_after(10**9))
    resumed = extract(spec, "train", out)
    assert opened == [1, 2]  # the finished tar is never read again
    assert decoded == list(range(15, 40))  # nor is any sample of a finished shard decoded
    monkeypatch.setattr(StreamDataset, "iter_part", original)
    same_content(resumed, extract(spec, "train", tmp_path / "fresh"))

    # Half a tar done: its finished shards are passed over undecoded, the rest computed.
    for name in ("shard-00004", "shard-00005", "shard-00007"):
        for f in (out / name).iterdir():
            f.unlink()
        (out / name).rmdir()
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps(manifest | {"complete": False}))
    decoded.clear()
    opened.clear()
    monkeypatch.setattr(StreamDataset, "iter_part", crash_after(10**9))
    again = extract(spec, "train", out)
    assert opened == [1, 2] and decoded == [*range(21, 30), *range(36, 40)]
    same_content(again, resumed)


SCRIPT = """
import json, os, sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from test_store import ToyBackbone
from qkvprobe.data import open_dataset
from qkvprobe.data.stream import StreamDataset
from qkvprobe.features import extract_features
from qkvprobe.features.distributed import all_gather_objects, dist_info
read = []
original = StreamDataset.iter_part
def iter_part(self, part, wanted=None):
    read.append(part)
    yield from original(self, part, wanted)
StreamDataset.iter_part = iter_part
store = extract_features(ToyBackbone(), open_dataset({spec!r}, "train"), {out!r}, batch_size=4, shard_size=6,
                         tokens=("q", "ffn"), positions=("cls", "avg"), progress=False)
parts = all_gather_objects(read)
if dist_info().is_main:
    json.dump({{"parts": parts, "complete": store.manifest["complete"]}}, open({report!r}, "w"))
"""


def test_two_process_torchrun_over_shards_equals_one(
    tmp_path: Path, forms: dict[str, dict[str, str]]
) -> None:
    spec, out, report = forms["classification"]["wds"], tmp_path / "ddp", tmp_path / "report.json"
    script = tmp_path / "ddp.py"
    script.write_text(SCRIPT.format(tests=str(TESTS_DIR), spec=spec, out=str(out), report=str(report)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "--monitor-interval", "0.1", str(script)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(report.read_text())
    assert result == {"parts": [[0, 2], [1]], "complete": True}  # disjoint tar shards, none read twice
    single = extract(spec, "train", tmp_path / "single")
    shards = sorted(p.name for p in single.path.glob("shard-*"))
    assert shards == sorted(p.name for p in out.glob("shard-*")) and len(shards) == 8
    for shard in shards:
        for file in (single.path / shard).iterdir():
            assert file.read_bytes() == (out / shard / file.name).read_bytes(), (shard, file.name)
    assert FeatureStore.open(out).indices().tolist() == list(range(NUM_TRAIN))


# ---- bad input ----------------------------------------------------------------------------------------------
def test_hf_bad_columns_and_dtypes(tmp_path: Path, forms: dict[str, dict[str, str]]) -> None:
    import datasets

    disk = forms["classification"]["hf-disk"]
    with pytest.raises(
        DataError,
        match=r"has no column 'fine' \(columns: image, label\); name the label column with \?label=COLUMN",
    ):
        open_dataset(f"{disk}?label=fine", "train")
    with pytest.raises(
        DataError, match=r"has no image column \(image or img or jpg or png; columns: picture, label\)"
    ):
        table = datasets.Dataset.from_dict({"picture": [b"x"], "label": [0]})
        datasets.DatasetDict(train=table).save_to_disk(str(tmp_path / "noimage"))
        open_dataset(f"hfds:{tmp_path / 'noimage'}", "train")
    words = datasets.Dataset.from_dict(
        {"image": [{"bytes": b"x", "path": None}], "label": ["cat"]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")}),
    )
    words.to_parquet(str(tmp_path / "words" / "train-0.parquet"))
    with pytest.raises(DataError, match=r"column 'label' of .* holds string, expected integer class indices"):
        open_dataset(f"hfds:{tmp_path / 'words'}", "train")
    with pytest.raises(DataError, match=r"column 'label' of .* holds int64, expected images"):
        open_dataset(f"{disk}?image=label", "train")
    with pytest.raises(
        DataError, match=r"column 'image' of .* holds images: for segmentation write \?task=segmentation"
    ):
        open_dataset(f"{disk}?label=image", "train")
    seg = forms["segmentation"]["hf-disk"].partition("?")[0]
    with pytest.raises(DataError, match=r"name the classes of .*: add \?classes=ade20k"):
        open_dataset(f"{seg}?task=segmentation", "train")
    with pytest.raises(DataError, match=r"no split 'test' .* in .*: expected a DatasetDict"):
        open_dataset(f"hfds:{tmp_path / 'noimage'}", "test")
    with pytest.raises(DataError, match=r"Hugging Face dataset directory not found: /nonexistent/x"):
        open_dataset("hfds:/nonexistent/x", "train")
    with pytest.raises(
        SpecError, match=r"unknown option 'colour' in dataset spec .*valid options: image, label"
    ):
        open_dataset(f"{disk}?colour=1", "train")
    with pytest.raises(DataError, match=r"--on-bad-image skip is not available for hfds: datasets"):
        open_dataset(disk, "train", on_bad_image="skip")
    with pytest.raises(SpecError, match=r"option task='depth' must be classification or segmentation"):
        open_dataset(f"{disk}?task=depth", "train")


def test_hf_hub_id_not_cached_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        DataError,
        match=r"hfds:someone/no-such-set is neither a local folder nor a dataset your datasets cache holds",
    ):
        open_dataset("hfds:someone/no-such-set", "train")


def test_missing_libraries_give_the_install_hint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    monkeypatch.setitem(sys.modules, "webdataset", None)
    with pytest.raises(
        DataError,
        match=r"hfds: datasets need the Hugging Face datasets library: pip install 'qkvprobe\[hf\]'",
    ):
        open_dataset(f"hfds:{tmp_path}", "train")
    with pytest.raises(
        DataError, match=r"wds: datasets need the webdataset library: pip install 'qkvprobe\[wds\]'"
    ):
        open_dataset(f"wds:{tmp_path}", "train")


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_wds_bad_shards(tmp_path: Path, forms: dict[str, dict[str, str]]) -> None:
    good = Path(forms["classification"]["wds"].removeprefix("wds:"))
    png = (good / "train-000000.tar").read_bytes()
    with tarfile.open(good / "train-000000.tar") as tar:
        image = tar.extractfile(tar.getmember("00000.png")).read()  # type: ignore[union-attr]
    with pytest.raises(
        DataError, match=r"no WebDataset shards for split 'test' in .*empty: expected .*/test-\*\.tar or"
    ):
        (tmp_path / "empty").mkdir()
        open_dataset(f"wds:{tmp_path / 'empty'}", "test")
    with pytest.raises(
        DataError, match=r"shard .*train-000003\.tar of the pattern 'train-\{000000\.\.000009\}\.tar'"
    ):
        open_dataset(f"wds:{good}?shards=train-{{000000..000009}}.tar", "train")
    bad = tmp_path / "bad"
    _tar(
        bad / "train-0.tar",
        [("a.png", image), ("a.cls", b"1"), ("b.png", b"not a png at all"), ("b.cls", b"2")],
    )
    ds = open_dataset(f"wds:{bad}", "train")
    with pytest.raises(DataError, match=r"unreadable or truncated image .*train-0\.tar:b \(image\)"):
        ds[1]
    with pytest.raises(DataError, match=r"unreadable or truncated image .*train-0\.tar:b \(image\)"):
        extract(f"wds:{bad}", "train", tmp_path / "s")
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "train-0.tar").write_bytes(png[:700])  # a header, then the data ends
    with pytest.raises(
        DataError, match=r"cannot read WebDataset shard .*cut/train-0\.tar .*corrupt or truncated"
    ):
        open_dataset(f"wds:{tmp_path / 'cut'}", "train")
    _tar(tmp_path / "nolabel" / "train-0.tar", [("a.png", image), ("a.cls", b"1"), ("b.png", image)])
    with pytest.raises(DataError, match=r"sample b of WebDataset shard .*train-0\.tar has no \.cls member"):
        open_dataset(f"wds:{tmp_path / 'nolabel'}", "train")
    _tar(tmp_path / "word" / "train-0.tar", [("a.png", image), ("a.cls", b"cat")])
    with pytest.raises(DataError, match=r"label member .*train-0\.tar:a\.cls is not an integer class index"):
        open_dataset(f"wds:{tmp_path / 'word'}", "train")
    _tar(tmp_path / "void" / "train-0.tar", [("__meta__", b"{}")])
    with pytest.raises(DataError, match=r"WebDataset shard .*void/train-0\.tar holds no samples"):
        open_dataset(f"wds:{tmp_path / 'void'}", "train")
    cut = tmp_path / "cut-later"
    cut.mkdir()
    (cut / "train-0.tar").write_bytes(png)
    opened = open_dataset(f"wds:{cut}", "train")
    (cut / "train-0.tar").write_bytes(png[: len(png) // 2])  # truncated after it was indexed
    with pytest.raises(DataError, match=r"WebDataset shard .*cut-later/train-0\.tar ends inside sample 000"):
        list(opened.iter_part(0))
    with pytest.raises(DataError, match=r"--on-bad-image skip is not available for wds: datasets"):
        open_dataset(f"wds:{good}", "train", on_bad_image="skip")
    with pytest.raises(
        DataError,
        match=r"has no image member \(\.jpg; it has \.cls \.png\); name its extension with \?image=EXT",
    ):
        open_dataset(f"wds:{good}?image=jpg", "train")


# ---- registry, config, listing -------------------------------------------------------------------------------
def test_registry_drives_config_and_listing(
    tmp_path: Path, forms: dict[str, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert DatasetConfig(spec="wds:/data/in1k").task == "classification"
    assert DatasetConfig(spec="hfds:/data/ade?task=segmentation&classes=ade20k").positions == ["patch"]
    assert DatasetConfig(spec="wds:/data/x?mask=seg.png&classes=voc").task == "segmentation"
    with pytest.raises(ValueError, match=r"unknown option 'shard' in dataset spec 'wds:/d\?shard=x'"):
        DatasetConfig(spec="wds:/d?shard=x")
    with pytest.raises(ValueError, match=r"needs a path: hfds:PATH"):
        DatasetConfig(spec="hfds")
    data = tmp_path / "data"
    make_wds(data / "imagenet-wds", "classification")
    make_hf_parquet(data / "imagenet-1k", "classification")
    monkeypatch.setenv("QKVPROBE_DATA", str(data))
    entries = {e["spec"].split(":")[0]: e for e in list_datasets()}
    assert (entries["wds"]["train"], entries["wds"]["test"], entries["wds"]["num_classes"]) == (40, 20, 10)
    assert (entries["hfds"]["train"], entries["hfds"]["test"]) == (40, 20)
    assert entries["hfds"]["spec"] == f"hfds:{data / 'imagenet-1k'}"
    assert set(entries) >= {
        "fashion-mnist",
        "fashion-mnist-scenes",
        "imagefolder",
        "voc",
        "ade20k",
        "segfolder",
    }


def test_a_changed_stream_is_refused_by_its_store(tmp_path: Path) -> None:
    from qkvprobe.errors import StoreError

    wds_dir = make_wds(tmp_path / "wds", "classification")
    parquet = make_hf_parquet(tmp_path / "pq", "classification")
    for spec, changed in ((f"wds:{wds_dir}", wds_dir / "train-000002.tar"), (f"hfds:{parquet}", None)):
        store = extract(spec, "train", tmp_path / f"store-{spec[:3]}")
        again = extract(spec, "train", store.path)  # same data: reused
        assert again.key == store.key
        if changed is None:  # rewrite the last Parquet file with one row fewer
            import pyarrow.parquet as pq

            file = parquet / "data" / "train-00001-of-00002.parquet"
            table = pq.read_table(file)
            pq.write_table(table.slice(0, table.num_rows - 1), file)
        else:  # one sample fewer in the last tar
            with tarfile.open(changed) as tar:
                members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
            _tar(changed, [(m.name, data) for m, data in members[:-2]])
        with pytest.raises(
            StoreError, match=r"was made for other inputs: the dataset.s files .*dataset_fingerprint is"
        ):
            extract(spec, "train", store.path)
