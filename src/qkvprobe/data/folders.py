"""Datasets in folder layouts: ImageFolder, segfolder, Pascal VOC 2012 and ADE20K SceneParsing.

- ``imagefolder:PATH`` — ``PATH/train/<class>/…`` and ``PATH/val/<class>/…`` (or ``test``); class names and
  indices come from ``PATH/train`` (sorted), so every split uses the same indices. Hidden files are not
  data; other non-image files are listed in ``ds.ignored`` with a warning.
- ``segfolder:PATH`` — ``PATH/classes.txt`` (one name per line, line i = class i) and either
  ``PATH/<split>/images|masks`` or ``PATH/images|masks/<split>``; mask = same relative path, ``.png``;
  masks are grey or palette PNGs of class indices, 255 = ignore.
- ``voc:PATH`` — ``VOC2012`` (or a parent holding ``VOC2012`` / ``VOCdevkit/VOC2012``): ``JPEGImages``,
  ``SegmentationClass`` palette PNGs decoded by palette index, ``ImageSets/Segmentation/{train,val}.txt``;
  21 classes (0 = background), 255 = the void border (ignored). ``test`` means ``val``.
- ``ade20k:PATH`` — ``ADEChallengeData2016`` (or its parent): ``images|annotations/training|validation``;
  150 classes and no background: the usual reduce-zero-label convention maps annotation 0 ("other") to
  255 (ignore) and annotation v to class v-1. ``train`` = training, ``val``/``test`` = validation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import DataError
from .files import ClassFolderBase, FileDataset, SegmentationBase, check_on_bad_image, list_images

VOC_CLASSES: list[str] = [
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
]
#: ADE20K SceneParsing class names (objectInfo150, first name of each entry), index = reduced label.
ADE20K_CLASSES: list[str] = [
    "wall",
    "building",
    "sky",
    "floor",
    "tree",
    "ceiling",
    "road",
    "bed",
    "windowpane",
    "grass",
    "cabinet",
    "sidewalk",
    "person",
    "earth",
    "door",
    "table",
    "mountain",
    "plant",
    "curtain",
    "chair",
    "car",
    "water",
    "painting",
    "sofa",
    "shelf",
    "house",
    "sea",
    "mirror",
    "rug",
    "field",
    "armchair",
    "seat",
    "fence",
    "desk",
    "rock",
    "wardrobe",
    "lamp",
    "bathtub",
    "railing",
    "cushion",
    "base",
    "box",
    "column",
    "signboard",
    "chest_of_drawers",
    "counter",
    "sand",
    "sink",
    "skyscraper",
    "fireplace",
    "refrigerator",
    "grandstand",
    "path",
    "stairs",
    "runway",
    "case",
    "pool_table",
    "pillow",
    "screen_door",
    "stairway",
    "river",
    "bridge",
    "bookcase",
    "blind",
    "coffee_table",
    "toilet",
    "flower",
    "book",
    "hill",
    "bench",
    "countertop",
    "stove",
    "palm",
    "kitchen_island",
    "computer",
    "swivel_chair",
    "boat",
    "bar",
    "arcade_machine",
    "hovel",
    "bus",
    "towel",
    "light",
    "truck",
    "tower",
    "chandelier",
    "awning",
    "streetlight",
    "booth",
    "television_receiver",
    "airplane",
    "dirt_track",
    "apparel",
    "pole",
    "land",
    "bannister",
    "escalator",
    "ottoman",
    "bottle",
    "buffet",
    "poster",
    "stage",
    "van",
    "ship",
    "fountain",
    "conveyer_belt",
    "canopy",
    "washer",
    "plaything",
    "swimming_pool",
    "stool",
    "barrel",
    "basket",
    "waterfall",
    "tent",
    "bag",
    "minibike",
    "cradle",
    "oven",
    "ball",
    "food",
    "step",
    "tank",
    "trade_name",
    "microwave",
    "pot",
    "animal",
    "bicycle",
    "lake",
    "dishwasher",
    "screen",
    "blanket",
    "sculpture",
    "hood",
    "sconce",
    "vase",
    "traffic_light",
    "tray",
    "ashcan",
    "fan",
    "pier",
    "crt_screen",
    "plate",
    "monitor",
    "bulletin_board",
    "shower",
    "radiator",
    "glass",
    "clock",
    "flag",
]
ADE20K_CLASSES = [name.replace("_", " ") for name in ADE20K_CLASSES]
assert len(ADE20K_CLASSES) == 150

_OTHER_SPLIT = {"val": "test", "test": "val", "train": "train"}


def _split_dir(base: Path, split: str, spec: str, layout: str) -> Path:
    for name in (split, _OTHER_SPLIT.get(split, split)):
        if (base / name).is_dir():
            return base / name
    raise DataError(f"split directory not found: {base / split} (spec {spec}); expected the layout {layout}")


class ImageFolder(ClassFolderBase):
    """``imagefolder:PATH`` — one class per sub-folder of ``PATH/<split>``."""

    def __init__(
        self, path: str | Path, split: str, *, on_bad_image: str = "fail", spec: str | None = None
    ) -> None:
        self.root = Path(path).expanduser()
        self.spec, on_bad_image = spec or f"imagefolder:{path}", check_on_bad_image(on_bad_image)
        layout = "PATH/train/<class>/<image> and PATH/val/<class>/<image>"
        if not self.root.is_dir():
            raise DataError(f"dataset directory not found: {self.root} (spec {self.spec}); expected {layout}")
        split_dir = _split_dir(self.root, split, self.spec, layout)
        self.split = split_dir.name
        class_root = self.root / "train" if (self.root / "train").is_dir() else split_dir
        self.classes = sorted(
            p.name for p in class_root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        if not self.classes:
            raise DataError(f"no class folders in {class_root}; expected {layout}")
        present = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        unknown = [c for c in present if c not in self.classes]
        if unknown:
            raise DataError(
                f"class folder {split_dir / unknown[0]} has no counterpart in {class_root}; every split must use the training classes"
            )
        stray = [p.name for p in split_dir.iterdir() if p.is_file() and not p.name.startswith(".")]
        if stray:
            raise DataError(
                f"file {split_dir / stray[0]} lies outside any class folder; move it into {split_dir}/<class>/"
            )
        self.samples, self.ignored = [], []
        for index, name in enumerate(self.classes):
            if name not in present:
                continue
            images, others = list_images(split_dir / name)
            if not images:
                raise DataError(
                    f"empty class folder {split_dir / name}: no image files ({len(others)} other files); add images or remove the folder"
                )
            self.samples += [(p, index) for p in images]
            self.ignored += [str(p.relative_to(self.root)) for p in others]
        self.source = str(self.root)
        self._finish("imagefolder", on_bad_image)


class SegFolder(SegmentationBase):
    """``segfolder:PATH`` — ``images/`` + ``masks/`` + ``classes.txt``."""

    def __init__(
        self, path: str | Path, split: str, *, on_bad_image: str = "fail", spec: str | None = None
    ) -> None:
        self.root = Path(path).expanduser()
        self.spec, on_bad_image = spec or f"segfolder:{path}", check_on_bad_image(on_bad_image)
        layout = "PATH/classes.txt with PATH/<split>/images|masks or PATH/images|masks/<split>"
        if not self.root.is_dir():
            raise DataError(f"dataset directory not found: {self.root} (spec {self.spec}); expected {layout}")
        names_file = self.root / "classes.txt"
        if not names_file.is_file():
            raise DataError(
                f"class list not found: {names_file}; write one class name per line (line i = class i)"
            )
        self.classes = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
        if not self.classes or len(self.classes) > 255:
            raise DataError(
                f"{names_file} lists {len(self.classes)} classes; expected 1..255 (255 is the ignore label)"
            )
        found = next((c for c in self._candidates(split) if c[0].is_dir() and c[1].is_dir()), None)
        if found is None:
            raise DataError(f"split {split!r} not found in {self.root}; expected {layout}")
        image_dir, mask_dir, self.split = found
        images, others = list_images(image_dir)
        if not images:
            raise DataError(f"empty image folder {image_dir}: no image files; add images")
        self.ignored = [str(p.relative_to(self.root)) for p in others]
        self.samples = []
        for image in images:
            mask = (mask_dir / image.relative_to(image_dir)).with_suffix(".png")
            if not mask.is_file():
                raise DataError(f"no mask for image {image}: expected {mask}")
            self.samples.append((image, mask))
        paired = {m for _, m in self.samples}
        orphans = [m for m in list_images(mask_dir)[0] if m not in paired]
        if orphans:
            raise DataError(
                f"mask {orphans[0]} has no image in {image_dir} ({len(orphans)} such masks); add the images or remove the masks"
            )
        self.source = str(self.root)
        self._finish("segfolder", on_bad_image)

    def _candidates(self, split: str) -> list[tuple[Path, Path, str]]:
        names = (split, _OTHER_SPLIT.get(split, split))
        return [(self.root / n / "images", self.root / n / "masks", n) for n in names] + [
            (self.root / "images" / n, self.root / "masks" / n, n) for n in names
        ]


class VOCSegmentation(SegmentationBase):
    """``voc:PATH`` — Pascal VOC 2012 semantic segmentation (21 classes, 255 = void)."""

    mask_kind = "VOC mask"

    def __init__(
        self, path: str | Path, split: str, *, on_bad_image: str = "fail", spec: str | None = None
    ) -> None:
        given = Path(path).expanduser()
        self.spec, on_bad_image = spec or f"voc:{path}", check_on_bad_image(on_bad_image)
        layout = (
            "VOC2012/JPEGImages, VOC2012/SegmentationClass, VOC2012/ImageSets/Segmentation/{train,val}.txt"
        )
        if not given.is_dir():
            raise DataError(f"dataset directory not found: {given} (spec {self.spec}); expected {layout}")
        for candidate in (given, given / "VOC2012", given / "VOCdevkit" / "VOC2012"):
            if (candidate / "JPEGImages").is_dir():
                self.root = candidate
                break
        else:
            raise DataError(f"no JPEGImages directory under {given}; expected {layout}")
        self.split = "train" if split == "train" else "val" if split in ("val", "test") else split
        list_file = self.root / "ImageSets" / "Segmentation" / f"{self.split}.txt"
        if not list_file.is_file():
            raise DataError(f"split list not found: {list_file}; VOC splits are train and val (test = val)")
        ids = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
        if not ids:
            raise DataError(f"split list {list_file} is empty")
        self.classes = list(VOC_CLASSES)
        self.samples = [
            (self.root / "JPEGImages" / f"{i}.jpg", self.root / "SegmentationClass" / f"{i}.png") for i in ids
        ]
        self.ignored = []
        self.source = str(self.root)
        self._finish("voc", on_bad_image)


class ADE20K(SegmentationBase):
    """``ade20k:PATH`` — ADE20K SceneParsing (ADEChallengeData2016), 150 classes, 0 → ignore."""

    reduce_zero_label = True
    mask_kind = "ADE20K annotation"

    def __init__(
        self, path: str | Path, split: str, *, on_bad_image: str = "fail", spec: str | None = None
    ) -> None:
        given = Path(path).expanduser()
        self.spec, on_bad_image = spec or f"ade20k:{path}", check_on_bad_image(on_bad_image)
        layout = "ADEChallengeData2016/images/{training,validation} and annotations/{training,validation}"
        if not given.is_dir():
            raise DataError(f"dataset directory not found: {given} (spec {self.spec}); expected {layout}")
        for candidate in (given, given / "ADEChallengeData2016"):
            if (candidate / "images").is_dir() and (candidate / "annotations").is_dir():
                self.root = candidate
                break
        else:
            raise DataError(f"no images/ and annotations/ directories under {given}; expected {layout}")
        folder = {"train": "training", "training": "training"}.get(split, "validation")
        if split not in ("train", "training", "val", "test", "validation"):
            raise DataError(f"unknown split {split!r} for {self.spec}; valid: train, val (test = val)")
        self.split = "train" if folder == "training" else "val"
        image_dir, mask_dir = self.root / "images" / folder, self.root / "annotations" / folder
        for d in (image_dir, mask_dir):
            if not d.is_dir():
                raise DataError(f"split directory not found: {d}; expected {layout}")
        images, others = list_images(image_dir)
        if not images:
            raise DataError(f"empty image folder {image_dir}: no image files")
        self.classes = list(ADE20K_CLASSES)
        self.ignored = [str(p.relative_to(self.root)) for p in others]
        self.samples = [(p, mask_dir / f"{p.stem}.png") for p in images]
        self.source = str(self.root)
        self._finish("ade20k", on_bad_image)


_CLASSES = {"imagefolder": ImageFolder, "voc": VOCSegmentation, "ade20k": ADE20K, "segfolder": SegFolder}


def open_spec(
    spec: str, path: str | None, options: dict[str, str], split: str, *, on_bad_image: str = "fail", **_: Any
) -> FileDataset:
    """Registry opener of the folder kinds (``imagefolder:``, ``voc:``, ``ade20k:``, ``segfolder:``)."""
    assert path is not None  # the registry requires a path for these kinds
    kind = spec.partition(":")[0].strip().lower()
    return _CLASSES[kind](path, split, on_bad_image=on_bad_image, spec=spec)
