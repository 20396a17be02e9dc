"""Folder layouts (ImageFolder, segfolder, VOC 2012, ADE20K) on tiny fixture trees, and their bad-input errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qkvprobe.data import class_pixel_counts, open_dataset
from qkvprobe.errors import DataError, SpecError


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QKVPROBE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("QKVPROBE_OFFLINE", "1")


def save_rgb(path: Path, size: tuple[int, int] = (12, 8), value: int = 0, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, format=fmt)
    return path


def save_mask(path: Path, array: np.ndarray, mode: str = "L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array.astype(np.uint8), mode="L")
    if mode == "P":
        image = image.convert("P")
        image.putpalette([v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)])
        image = Image.frombytes("P", image.size, array.astype(np.uint8).tobytes())
        image.putpalette([v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)])
    elif mode == "RGB":
        image = image.convert("RGB")
    image.save(path)
    return path


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:60])


def demo_mask(value: int, size: tuple[int, int] = (12, 8)) -> np.ndarray:
    mask = np.zeros((size[1], size[0]), np.uint8)
    mask[2:6, 3:9] = value
    mask[0, :] = 255
    return mask


# --- ImageFolder ------------------------------------------------------------------------------------------


def image_folder(root: Path) -> Path:
    for split, n in (("train", 3), ("val", 2)):
        for c, name in enumerate(("cat", "dog")):
            for i in range(n):
                save_rgb(root / split / name / f"{i}.png", value=10 * c + i)
    Image.new("L", (5, 7), 9).save(root / "train" / "dog" / "grey.png")
    return root


def test_imagefolder(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "ifo")
    train = open_dataset(f"imagefolder:{root}", "train")
    test = open_dataset(f"imagefolder:{root}", "test")  # test -> val alias
    assert train.classes == ["cat", "dog"] and train.task == "classification" and test.split == "val"
    assert (len(train), len(test)) == (7, 4)
    assert train.targets().tolist() == [0, 0, 0, 1, 1, 1, 1]
    image, label = train[0]
    assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 8, 12) and label == 0
    with pytest.raises(DataError, match=r"imagefolder:.* is a classification dataset; it has no masks"):
        train.mask(0)
    grey, _ = train[6]
    assert tuple(grey.shape) == (1, 7, 5)  # grey stays one channel; preprocessing repeats it
    again = open_dataset(f"imagefolder:{root}", "train")
    assert again.fingerprint == train.fingerprint != test.fingerprint
    (root / "train" / "cat" / "0.png").touch()  # content identity includes mtimes
    assert open_dataset(f"imagefolder:{root}", "train").fingerprint != train.fingerprint


def test_imagefolder_lists_non_images(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "ifo")
    (root / "train" / "cat" / "notes.txt").write_text("x")
    (root / "train" / "cat" / ".DS_Store").write_text("x")
    with pytest.warns(UserWarning, match=r"1 non-image files ignored"):
        ds = open_dataset(f"imagefolder:{root}", "train")
    assert ds.ignored == ["train/cat/notes.txt"] and len(ds) == 7


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"dataset directory not found: .*missing"):
        open_dataset(f"imagefolder:{tmp_path / 'missing'}", "train")
    root = image_folder(tmp_path / "ifo")
    (root / "train" / "bird").mkdir()
    with pytest.raises(DataError, match=r"empty class folder .*train/bird: no image files"):
        open_dataset(f"imagefolder:{root}", "train")
    (root / "train" / "bird").rmdir()
    (root / "val" / "fox").mkdir()
    with pytest.raises(DataError, match=r"class folder .*val/fox has no counterpart"):
        open_dataset(f"imagefolder:{root}", "val")
    with pytest.raises(DataError, match=r"split directory not found: .*ifo/tset"):
        open_dataset(f"imagefolder:{root}", "tset")


def test_bad_image_fail_then_skip(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "ifo")
    truncate(save_rgb(root / "train" / "cat" / "1.png", size=(64, 64)))
    (root / "train" / "dog" / "junk.jpg").write_bytes(b"not an image at all")
    ds = open_dataset(f"imagefolder:{root}", "train")
    with pytest.raises(
        DataError, match=r"unreadable or truncated image .*train/cat/1\.png .*--on-bad-image skip"
    ):
        ds[1]
    skipping = open_dataset(f"imagefolder:{root}", "train", on_bad_image="skip")
    assert skipping.skipped == ["train/cat/1.png", "train/dog/junk.jpg"]
    assert len(skipping) == len(ds) - 2 and all(skipping[i][0].ndim == 3 for i in range(len(skipping)))
    assert skipping.fingerprint != ds.fingerprint
    with pytest.raises(DataError, match=r"on_bad_image must be 'fail' or 'skip', got 'ignore'"):
        open_dataset(f"imagefolder:{root}", "train", on_bad_image="ignore")


def test_unknown_spec_suggests() -> None:
    with pytest.raises(SpecError, match=r"unknown dataset spec 'fashion-minst'; did you mean fashion-mnist"):
        open_dataset("fashion-minst", "train")
    with pytest.raises(
        SpecError, match=r"'hf:beans': hf: names a model; Hugging Face datasets are read with hfds:PATH_OR_ID"
    ):
        open_dataset("hf:beans", "train")
    with pytest.raises(SpecError, match=r"'voc' needs a directory: write voc:PATH"):
        open_dataset("voc", "train")
    with pytest.raises(SpecError, match=r"unknown option 'x' in dataset spec .*valid options: none"):
        open_dataset("voc:/tmp?x=1", "train")


# --- segfolder --------------------------------------------------------------------------------------------


def seg_folder(root: Path, nested: bool = True) -> Path:
    (root).mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("background\nsquare\ncircle\n")
    for split, n in (("train", 2), ("val", 1)):
        images = root / split / "images" if nested else root / "images" / split
        masks = root / split / "masks" if nested else root / "masks" / split
        for i in range(n):
            save_rgb(images / f"im{i}.jpg", value=i)
            save_mask(masks / f"im{i}.png", demo_mask(1 + i % 2), mode="P" if i else "L")
    return root


@pytest.mark.parametrize("nested", [True, False])
def test_segfolder(tmp_path: Path, nested: bool) -> None:
    root = seg_folder(tmp_path / "seg", nested)
    ds = open_dataset(f"segfolder:{root}", "train")
    assert ds.task == "segmentation" and ds.classes == ["background", "square", "circle"] and len(ds) == 2
    image, mask = ds[1]
    assert tuple(image.shape) == (3, 8, 12) and mask.dtype == torch.int64 and tuple(mask.shape) == (8, 12)
    np.testing.assert_array_equal(mask.numpy(), demo_mask(2))  # palette mask decoded by index
    torch.testing.assert_close(ds.mask(1), mask)
    counts = class_pixel_counts(ds)
    assert counts.tolist() == [[96 - 12 - 24, 24, 0], [96 - 12 - 24, 0, 24]]  # 255 not counted
    assert open_dataset(f"segfolder:{root}", "test").split == "val"


def test_segfolder_errors(tmp_path: Path) -> None:
    root = seg_folder(tmp_path / "seg")
    save_mask(root / "train" / "masks" / "im0.png", demo_mask(7))
    with pytest.raises(
        DataError, match=r"mask .*train/masks/im0\.png has value 7 outside the class range 0\.\.2 or 255"
    ):
        open_dataset(f"segfolder:{root}", "train")[0]
    save_mask(root / "train" / "masks" / "im0.png", demo_mask(1, size=(10, 8)))
    with pytest.raises(
        DataError, match=r"1 mask does not have the size of its image .*masks/im0\.png 10x8 \(image 12x8\)"
    ):
        open_dataset(f"segfolder:{root}", "train").mask(0)
    save_mask(root / "train" / "masks" / "im0.png", demo_mask(1), mode="RGB")
    with pytest.raises(
        DataError, match=r"1 mask is saved as colours, not class indices .*train/masks/im0\.png"
    ):
        open_dataset(f"segfolder:{root}", "train")[0]
    with pytest.raises(DataError, match=r"is saved as colours"):  # skip mode must not hide a layout error
        open_dataset(f"segfolder:{root}", "train", on_bad_image="skip")
    (root / "train" / "masks" / "im1.png").unlink()
    with pytest.raises(DataError, match=r"no mask for image .*im1\.jpg: expected .*masks/im1\.png"):
        open_dataset(f"segfolder:{root}", "train")
    (root / "classes.txt").unlink()
    with pytest.raises(DataError, match=r"class list not found: .*classes\.txt"):
        open_dataset(f"segfolder:{root}", "train")


# --- VOC 2012 ---------------------------------------------------------------------------------------------


def voc_tree(base: Path) -> Path:
    root = base / "VOCdevkit" / "VOC2012"
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    for split, ids in (("train", ["2007_000001", "2007_000002"]), ("val", ["2007_000003"])):
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for k, i in enumerate(ids):
            save_rgb(root / "JPEGImages" / f"{i}.jpg", value=k, fmt="JPEG")
            save_mask(root / "SegmentationClass" / f"{i}.png", demo_mask(15 + k), mode="P")
    return base


def test_voc(tmp_path: Path) -> None:
    base = voc_tree(tmp_path / "voc")
    ds = open_dataset(f"voc:{base}", "train")  # the parent of VOCdevkit is found too
    assert len(ds.classes) == 21 and ds.classes[15] == "person" and len(ds) == 2
    _, mask = ds[1]
    assert sorted(np.unique(mask.numpy()).tolist()) == [0, 16, 255]
    val = open_dataset(f"voc:{base}/VOCdevkit/VOC2012", "test")
    assert val.split == "val" and len(val) == 1 and val.targets() is None


def test_voc_errors(tmp_path: Path) -> None:
    base = voc_tree(tmp_path / "voc")
    root = base / "VOCdevkit" / "VOC2012"
    save_mask(root / "SegmentationClass" / "2007_000001.png", demo_mask(15), mode="RGB")
    with pytest.raises(
        DataError,
        match=r"1 VOC mask is saved as colours, not class indices .*2007_000001\.png; save each as a palette",
    ):
        open_dataset(f"voc:{base}", "train").mask(0)
    save_mask(root / "SegmentationClass" / "2007_000001.png", demo_mask(21), mode="P")
    with pytest.raises(
        DataError, match=r"VOC mask .*2007_000001\.png has value 21 outside the class range 0\.\.20"
    ):
        open_dataset(f"voc:{base}", "train").mask(0)
    (root / "JPEGImages" / "2007_000002.jpg").unlink()
    with pytest.raises(DataError, match=r"file listed in voc:.* is missing: .*2007_000002\.jpg"):
        open_dataset(f"voc:{base}", "train")
    assert open_dataset(f"voc:{base}", "train", on_bad_image="skip").skipped == ["JPEGImages/2007_000002.jpg"]
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(DataError, match=r"no JPEGImages directory under .*elsewhere"):
        open_dataset(f"voc:{tmp_path / 'elsewhere'}", "train")
    with pytest.raises(DataError, match=r"split list not found: .*Segmentation/trainval\.txt"):
        open_dataset(f"voc:{base}", "trainval")


# --- ADE20K -----------------------------------------------------------------------------------------------


def ade_tree(base: Path) -> Path:
    root = base / "ADEChallengeData2016"
    for folder, stems in (
        ("training", ["ADE_train_00000001", "ADE_train_00000002"]),
        ("validation", ["ADE_val_00000001"]),
    ):
        for k, stem in enumerate(stems):
            save_rgb(root / "images" / folder / f"{stem}.jpg", value=k, fmt="JPEG")
            mask = np.zeros((8, 12), np.uint8)
            mask[:4] = 1 + k  # wall (or building)
            mask[4:, :6] = 150  # flag
            save_mask(root / "annotations" / folder / f"{stem}.png", mask)
    return base


def test_ade20k_reduce_zero_label(tmp_path: Path) -> None:
    base = ade_tree(tmp_path / "ade")
    ds = open_dataset(f"ade20k:{base}", "train")
    assert len(ds.classes) == 150 and ds.classes[0] == "wall" and ds.classes[149] == "flag" and len(ds) == 2
    mask = ds.mask(1).numpy()
    assert mask[0, 0] == 1 and mask[7, 0] == 149 and mask[7, 11] == 255  # 0 -> ignore, v -> v-1
    assert open_dataset(f"ade20k:{base}/ADEChallengeData2016", "val").split == "val"
    counts = class_pixel_counts(ds)
    assert counts.shape == (2, 150) and counts[0, 0] == 48 and counts[1, 1] == 48 and counts[0, 149] == 24


def test_ade20k_errors(tmp_path: Path) -> None:
    base = ade_tree(tmp_path / "ade")
    save_mask(
        base / "ADEChallengeData2016" / "annotations" / "training" / "ADE_train_00000001.png",
        np.full((8, 12), 151),
    )
    with pytest.raises(
        DataError,
        match=r"ADE20K annotation .*ADE_train_00000001\.png has value 151 outside the class range 0\.\.150",
    ):
        open_dataset(f"ade20k:{base}", "train").mask(0)
    with pytest.raises(DataError, match=r"no images/ and annotations/ directories under"):
        open_dataset(f"ade20k:{tmp_path}", "train")


def test_list_datasets_finds_trees_under_qkvprobe_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qkvprobe.data import list_datasets

    voc_tree(tmp_path / "data")
    ade_tree(tmp_path / "data")
    monkeypatch.setenv("QKVPROBE_DATA", str(tmp_path / "data"))
    entries = {e["spec"].split(":")[0]: e for e in list_datasets()}
    voc = entries["voc"]
    assert voc["spec"] == f"voc:{tmp_path / 'data' / 'VOCdevkit'}" and (voc["train"], voc["test"]) == (2, 1)
    assert (entries["ade20k"]["train"], entries["ade20k"]["num_classes"]) == (2, 150)
    assert entries["imagefolder"]["source"].startswith("not found")
