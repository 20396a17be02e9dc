"""Fashion-MNIST: IDX validation, every source in the documented order, download against a local server."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from qkvprobe.data import fashion_mnist as fm
from qkvprobe.data import list_datasets, open_dataset
from qkvprobe.data.idx import encode_idx, read_idx, write_idx_gz
from qkvprobe.errors import DataError, SpecError

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
needs_debian = pytest.mark.skipif(
    not (DEBIAN / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed",
)


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QKVPROBE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("QKVPROBE_OFFLINE", "1")  # no test may reach the real download
    monkeypatch.delenv("QKVPROBE_DATA", raising=False)
    monkeypatch.delenv("QKVPROBE_FASHION_MNIST_URL", raising=False)


def make_tiny(directory: Path, per_class: tuple[int, int] = (3, 2), seed: int = 0) -> Path:
    """Write a tiny, valid Fashion-MNIST (per_class train/test images of each of the 10 classes)."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in zip(("train", "test"), per_class, strict=True):
        labels = np.repeat(np.arange(10, dtype=np.uint8), n)
        images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        write_idx_gz(directory / fm.FILES[split][0], images)
        write_idx_gz(directory / fm.FILES[split][1], labels)
    return directory


# --- IDX reader -------------------------------------------------------------------------------------------


def test_idx_roundtrip(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx_gz(tmp_path / "a.gz", array)
    (tmp_path / "a.raw").write_bytes(encode_idx(array))
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz", ndim=3), array)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.raw"), array)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda b: b"\x08\x08" + b[2:], r"bad\.idx: bad magic number 0x08080803"),
        (lambda b: b[:2] + b"\x42" + b[3:], r"bad magic number"),
        (lambda b: b[:-5], r"bad\.idx: truncated: header shape \(2, 3, 4\) needs 24 data bytes, found 19"),
        (lambda b: b + b"xx", r"has trailing bytes"),
        (lambda b: b[:10], r"truncated header"),
        (lambda b: b[:3] + b"\x02" + b[4:], r"2 dimensions in the header, expected 3"),
    ],
)
def test_corrupt_idx(tmp_path: Path, mutate, match: str) -> None:
    good = encode_idx(np.zeros((2, 3, 4), np.uint8))
    (tmp_path / "bad.idx").write_bytes(mutate(good))
    with pytest.raises(DataError, match=match):
        read_idx(tmp_path / "bad.idx", ndim=3)


def test_truncated_gzip(tmp_path: Path) -> None:
    data = gzip.compress(encode_idx(np.arange(5000, dtype=np.uint32).astype(np.uint8).reshape(50, 100)))
    (tmp_path / "cut.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"corrupt IDX file .*cut\.gz: gzip stream is damaged or truncated"):
        read_idx(tmp_path / "cut.gz")


def test_count_mismatch_and_bad_shape(tmp_path: Path) -> None:
    root = make_tiny(tmp_path / "fm")
    write_idx_gz(root / fm.FILES["test"][1], np.zeros(3, np.uint8))
    with pytest.raises(
        DataError, match=r"count mismatch: .*t10k-images.* has 20 images, .*t10k-labels.* has 3 labels"
    ):
        open_dataset("fashion-mnist", "test", root=root)
    write_idx_gz(root / fm.FILES["train"][0], np.zeros((30, 27, 28), np.uint8))
    with pytest.raises(
        DataError,
        match=r"train-images-idx3-ubyte\.gz: images are uint8 \(27, 28\), expected uint8 \(28, 28\)",
    ):
        open_dataset("fashion-mnist", "train", root=root)


# --- sources ----------------------------------------------------------------------------------------------


def test_path_given(tmp_path: Path) -> None:
    root = make_tiny(tmp_path / "fm")
    ds = open_dataset("fashion-mnist", "train", root=root)
    assert ds.source == f"path given {root}"
    assert len(ds) == 30 and ds.task == "classification" and len(ds.classes) == 10
    image, target = ds[4]
    assert image.dtype.is_floating_point is False and tuple(image.shape) == (1, 28, 28)
    assert target == 1 and ds.targets().dtype == np.int64
    np.testing.assert_array_equal(ds.targets(), np.repeat(np.arange(10), 3))
    assert open_dataset("fashion-mnist", "val", root=root).split == "test"


def test_path_given_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"Fashion-MNIST directory not found: .*nowhere"):
        open_dataset("fashion-mnist", "train", root=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        DataError, match=r"no Fashion-MNIST files in .*empty: expected train-images-idx3-ubyte\.gz"
    ):
        open_dataset("fashion-mnist", "train", root=tmp_path / "empty")
    with pytest.raises(DataError, match=r"unknown split 'dev' for fashion-mnist; valid: train, test"):
        open_dataset("fashion-mnist", "dev", root=make_tiny(tmp_path / "fm"))
    with pytest.raises(SpecError, match=r"unknown Fashion-MNIST source 'usb'; valid: auto, path"):
        open_dataset("fashion-mnist?source=usb", "train")
    with pytest.raises(
        SpecError,
        match=r"unknown option 'sauce' in dataset spec 'fashion-mnist\?sauce=x'; valid options: source",
    ):
        open_dataset("fashion-mnist?sauce=x", "train")


def test_env_var_then_unpacked_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_tiny(tmp_path / "data" / "fashion-mnist")
    for path in root.glob("*.gz"):  # unpacked copies are accepted too
        (root / path.stem).write_bytes(gzip.decompress(path.read_bytes()))
        path.unlink()
    monkeypatch.setenv("QKVPROBE_DATA", str(tmp_path / "data"))
    ds = open_dataset("fashion-mnist", "test")
    assert ds.source.startswith(f"$QKVPROBE_DATA={tmp_path / 'data'}") and len(ds) == 20


@needs_debian
def test_debian_package() -> None:
    train, test = open_dataset("fashion-mnist", "train"), open_dataset("fashion-mnist", "test")
    assert train.source == f"Debian package {DEBIAN}"
    assert (len(train), len(test)) == (60000, 10000)
    assert np.bincount(train.targets()).tolist() == [6000] * 10
    assert train.images.shape == (60000, 28, 28) and train.images.dtype == np.uint8
    assert train.fingerprint != test.fingerprint and len(train.fingerprint) == 64


@needs_debian
def test_bundled_subset_is_first_per_class_of_full_data() -> None:
    full = open_dataset("fashion-mnist", "test")
    ds = open_dataset("fashion-mnist?source=bundled", "test")
    assert ds.source == "bundled subset (600+100 per class)"
    assert np.bincount(ds.targets()).tolist() == [100] * 10
    first = np.sort(np.concatenate([np.flatnonzero(full.targets() == c)[:100] for c in range(10)]))
    np.testing.assert_array_equal(ds.images, full.images[first])
    assert ds.fingerprint != full.fingerprint


def test_bundled_subset_size_and_balance() -> None:
    total = sum(p.stat().st_size for p in fm.BUNDLED_DIR.glob("*.gz"))
    assert total <= 5 * 2**20
    ds = open_dataset("fashion-mnist?source=bundled", "train")
    assert np.bincount(ds.targets()).tolist() == [600] * 10


def test_bundled_fallback_warns(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "no-debian")
    with pytest.warns(UserWarning, match="using the bundled subset"):
        ds = open_dataset("fashion-mnist", "test")
    assert ds.source.startswith("bundled subset")


def test_list_datasets_reports_sources() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # listing must not warn or download
        entries = {e["spec"]: e for e in list_datasets()}
    assert entries["fashion-mnist"]["num_classes"] == 10 and entries["fashion-mnist"]["source"]
    assert entries["fashion-mnist-scenes"]["train"] == 10_000
    assert entries["voc:PATH"]["source"].startswith("not found")


# --- download ---------------------------------------------------------------------------------------------


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An http.server on 127.0.0.1 serving ``tmp_path/served``."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", served
    finally:
        server.shutdown()
        server.server_close()


def test_download_from_local_server(
    file_server: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, served = file_server
    make_tiny(served)
    sums = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in served.glob("*.gz")}
    monkeypatch.setattr(fm, "OFFICIAL_MD5", sums)
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "no-debian")
    monkeypatch.setenv("QKVPROBE_FASHION_MNIST_URL", url)
    ds = open_dataset("fashion-mnist?source=download", "train")
    cache = tmp_path / "cache" / "fashion-mnist"
    assert ds.source == f"download {url} → cache {cache}" and len(ds) == 30
    assert sorted(p.name for p in cache.iterdir()) == sorted(sums)  # no temporary files left behind
    # Auto mode now finds the cached copy without the network.
    monkeypatch.setenv("QKVPROBE_FASHION_MNIST_URL", "http://127.0.0.1:9/")
    assert open_dataset("fashion-mnist", "test").source == f"download cache {cache}"


def test_download_checksum_mismatch(file_server: tuple[str, Path], tmp_path: Path) -> None:
    url, served = file_server
    make_tiny(served)
    # The official checksums do not match the fixture files: the download must be refused, not kept.
    with pytest.raises(
        DataError,
        match=r"checksum mismatch for http://127\.0\.0\.1:\d+/train-images-idx3-ubyte\.gz: md5 [0-9a-f]{32}, expected 8d4fb7e6",
    ):
        fm.download(tmp_path / "dl", base_url=url)
    assert not (tmp_path / "dl" / "train-images-idx3-ubyte.gz").exists()


def test_download_unreachable(file_server: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = file_server  # nothing served: 404
    with pytest.raises(
        DataError, match=r"could not download http://127\.0\.0\.1:\d+/train-images-idx3-ubyte\.gz"
    ):
        fm.download(tmp_path / "dl", base_url=url)


def test_cli_datasets_lists_specs() -> None:
    from typer.testing import CliRunner

    from qkvprobe.cli import get_app

    result = CliRunner().invoke(get_app(), ["datasets"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "fashion-mnist-scenes" in result.output and "voc:PATH" in result.output
