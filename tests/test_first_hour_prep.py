"""A new user's hour with their own checkpoints and data (issue 26): preprocessing they can see and trust, and
failures they can recover from in one step. One test (or more) per defect the hour found."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import write_tiny_builtin
from qkvprobe.cli import get_app
from qkvprobe.errors import QkvprobeError, StoreError
from qkvprobe.features import FeatureStore, extract_features
from qkvprobe.vocab import TOKENS
from test_store import SyntheticDataset, ToyBackbone, single_thread  # noqa: F401

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def invoke(*args: str):
    return CliRunner().invoke(get_app(), list(args))


@pytest.fixture
def builtin(tiny_vit: torch.nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """``builtin:tiny``: the conftest timm ViT (patch 4, 28 px, grey) through the real loader."""
    directory = write_tiny_builtin(tiny_vit, tmp_path / "builtin")
    monkeypatch.setattr("qkvprobe.backbones.builtin_dir", lambda: directory)
    return "builtin:tiny"


def grey_folder(root: Path, size: int = 28, n: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / "train" / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(
                root / "train" / c / f"{i}.png"
            )
    return root


def tiny_timm_weights(path: Path, wrap) -> Path:
    """A random ``vit_tiny_patch16_224`` state dict saved in a checkpoint layout (``wrap``: state → object)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    torch.save(wrap(model.state_dict()), path)
    return path


# 1. Silent wrong normalisation -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "wrap", "mean", "source"),
    [
        (  # DINO / iBOT: teacher, DDP module. and DINO backbone. prefixes both, a projection head
            "dino_official_layout.pth",
            lambda s: {
                "teacher": {
                    **{f"module.backbone.{k}": v for k, v in s.items()},
                    "module.head.last_layer.weight": torch.zeros(4, 192),
                }
            },
            IMAGENET[0],
            "DINO: timm pretrained cfg vit_small_patch16_224.dino, recognised from the weights file name",
        ),
        (
            "ibot_vits_16.pth",
            lambda s: {"state_dict": s},
            IMAGENET[0],
            "iBOT: github.com/bytedance/ibot (ImageNet",
        ),
        (  # MoCo v3: recognised by its layout, whatever the file is called
            "checkpoint_0299.pth.tar",
            lambda s: {"state_dict": {f"module.base_encoder.{k}": v for k, v in s.items()}},
            IMAGENET[0],
            "from the MoCo v3 checkpoint layout",
        ),
        (
            "beit_base_patch16_224_pt22k.pth",
            lambda s: {"model": s},
            (0.5, 0.5, 0.5),
            "BEiT: timm pretrained cfg",
        ),
    ],
)
def test_bare_architecture_takes_the_recognised_family_normalisation(
    tmp_path: Path, name: str, wrap, mean: tuple, source: str
) -> None:
    from qkvprobe.backbones import load_backbone

    weights = tiny_timm_weights(tmp_path / name, wrap)
    bb = load_backbone("timm:vit_tiny_patch16_224", weights=weights)
    assert tuple(bb.data_config["mean"]) == pytest.approx(mean)
    assert source in bb.preprocessing_source
    if mean == IMAGENET[0]:
        assert tuple(bb.data_config["std"]) == pytest.approx(IMAGENET[1])


def test_mean_std_override_and_manifest(tmp_path: Path) -> None:
    from qkvprobe.features.extract import plan_store

    bb, ds = ToyBackbone(), SyntheticDataset(4)
    manifest, _ = plan_store(bb, ds, mean=[0.2], std=[0.4])
    assert manifest["preprocessing"]["mean"] == [0.2] and manifest["preprocessing"]["std"] == [0.4]
    assert manifest["input"]["normalisation"] == "mean and std as given"
    other, _ = plan_store(bb, ds)
    assert other["key"] != manifest["key"]  # another normalisation is another store
    with pytest.raises(QkvprobeError, match=r"--std 0.1,0.2 does not fit toy:vit: give 1 or 1 values > 0"):
        plan_store(bb, ds, std=[0.1, 0.2])


def test_extract_mean_std_flags(tmp_path: Path, builtin: str) -> None:
    data = grey_folder(tmp_path / "data")
    result = invoke(
        "extract", "--model", builtin, "--data", f"imagefolder:{data}", "--out", str(tmp_path / "s"),
        "--mean", "0.5", "--std", "0.25", "--no-progress",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "mean 0.5 std 0.25 (mean and std as given)" in result.stdout
    assert FeatureStore.open(tmp_path / "s").manifest["preprocessing"]["std"] == [0.25]
    result = invoke("extract", "--model", builtin, "--data", "x", "--out", "y", "--std", "0,1")
    assert result.exit_code == 2 and "std value '0' must be > 0" in result.output


# 2. A failed extract blocks its own fix ----------------------------------------------------------------
def test_a_store_no_shard_of_which_completed_is_replaced(tmp_path: Path, builtin: str) -> None:
    data = grey_folder(tmp_path / "data")
    bad = data / "train" / "dog" / "1.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    out = tmp_path / "s"
    args = [
        "extract",
        "--model",
        builtin,
        "--data",
        f"imagefolder:{data}",
        "--out",
        str(out),
        "--no-progress",
    ]
    result = invoke(*args)
    assert result.exit_code == 1 and "--on-bad-image skip" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]
    result = invoke(*args, "--on-bad-image", "skip")  # the fix the error named, into the same --out
    assert result.exit_code == 0, result.output
    assert "replacing the feature store" in result.stderr and "wrote no shard" in result.stderr
    assert "1 unreadable file left out" in result.stderr and "train/dog/1.png" in result.stderr
    assert FeatureStore.open(out).num_samples == 5


def test_a_partly_written_store_for_other_inputs_is_refused_in_words(tmp_path: Path) -> None:
    bb = ToyBackbone()
    out = tmp_path / "s"
    extract_features(bb, SyntheticDataset(6), out, shard_size=2, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["complete"] = False
    (out / "manifest.json").write_text(json.dumps(manifest))
    import shutil

    shutil.rmtree(out / "shard-00002")
    with pytest.raises(StoreError) as info:
        extract_features(bb, SyntheticDataset(6, seed=1), out, shard_size=2, progress=False)
    message = str(info.value)
    assert "2 of 3 shards written" in message and "the dataset's files or the samples chosen" in message
    assert "pass another --out, or delete" in message
    assert not re.search(r"[0-9a-f]{64}", message)  # digests are cut to 12 hex


def test_a_resumed_extract_says_so(tmp_path: Path) -> None:
    bb, out, said = ToyBackbone(), tmp_path / "s", []
    extract_features(bb, SyntheticDataset(6), out, shard_size=2, progress=False)
    import shutil

    shutil.rmtree(out / "shard-00001")  # as if killed before that shard
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps(manifest | {"complete": False}))
    extract_features(bb, SyntheticDataset(6), out, shard_size=2, progress=False, notify=said.append)
    assert said == [
        f"resuming the feature store {out}: 2 of 3 shards were written by an earlier attempt, 1 to go"
    ]


# 3. WebDataset shards mixing PNG and JPEG (the README snippet: tests/test_readme.py) --------------------
def _encoded(fmt: str, value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


def test_wds_mixed_formats_and_a_list_in_image(tmp_path: Path) -> None:
    pytest.importorskip("webdataset")
    from qkvprobe.data import open_dataset

    members = [
        ("a.jpg", _encoded("JPEG", 10)), ("a.cls", b"0"),
        ("b.png", _encoded("PNG", 20)), ("b.cls", b"1"),
        ("c.webp", _encoded("WEBP", 30)), ("c.cls", b"0"),
    ]  # fmt: skip
    with tarfile.open(tmp_path / "train-0.tar", "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    ds = open_dataset(f"wds:{tmp_path}", "train")
    assert [int(ds[i][0].float().mean().round()) for i in range(3)] == [10, 20, 30]
    assert len(open_dataset(f"wds:{tmp_path}?image=png,jpg,webp", "train")) == 3
    with pytest.raises(QkvprobeError, match=r"sample a .* has no image member \(\.png; it has \.cls \.jpg\)"):
        open_dataset(f"wds:{tmp_path}?image=png", "train")


# 4. --device that does not exist ------------------------------------------------------------------------
def test_device_that_does_not_exist_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = invoke("extract", "--model", "builtin:x", "--data", "x", "--out", "y", "--device", "cuda")
    assert result.exit_code == 2
    assert (
        "device 'cuda' is not available: this machine has no CUDA device; devices here: cpu" in result.output
    )
    assert "Traceback" not in result.output


# 5. Sizes changed silently ------------------------------------------------------------------------------
def test_extract_prints_one_preprocessing_line(tmp_path: Path, builtin: str) -> None:
    data = grey_folder(tmp_path / "data")
    args = ["extract", "--model", builtin, "--data", f"imagefolder:{data}", "--no-progress"]
    result = invoke(*args, "--out", str(tmp_path / "s"), "--image-size", "30")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.startswith("preprocessing:")]
    assert lines == [
        "preprocessing: 32x32 px (asked 30: rounded to a multiple of the patch size 4), 8x8 patches of 4 px; "
        "mean 0.286 std 0.353 (builtin:tiny model card); images 28x28 resized (shorter side) to 35x35 bicubic, "
        "centre crop 32x32"
    ]
    notes = FeatureStore.open(tmp_path / "s").manifest["input"]
    assert notes["asked_size"] == [30, 30] and notes["rounded"] and notes["crop"] == [32, 32]


def test_segmentation_resize_is_shown_and_a_large_one_warned(tmp_path: Path, builtin: str) -> None:
    root = tmp_path / "seg"
    (root / "train/images").mkdir(parents=True)
    (root / "train/masks").mkdir(parents=True)
    (root / "classes.txt").write_text("background\nthing\n")
    for i in range(2):
        Image.fromarray(np.full((56, 56), 40 * i, np.uint8)).save(root / "train/images" / f"{i}.png")
        Image.fromarray(np.full((56, 56), i, np.uint8)).save(root / "train/masks" / f"{i}.png")
    args = ["extract", "--model", builtin, "--data", f"segfolder:{root}", "--no-progress"]
    result = invoke(*args, "--out", str(tmp_path / "s"))
    assert result.exit_code == 0, result.output
    assert "images 56x56 resized to 28x28 bilinear (masks nearest), no crop" in result.stdout
    assert "warning" not in result.stderr  # 2x is not more than 2x
    result = invoke(*args, "--out", str(tmp_path / "s2"), "--image-size", "12")
    assert "warning: images of 56x56 px are shrunk 4.7x to 12x12" in result.stderr


# 6. Small things that cost a step each -------------------------------------------------------------------
def test_report_of_a_results_file_reads_its_run_directory(tmp_path: Path) -> None:
    from qkvprobe.results import ResultRow, write_results

    row = ResultRow(
        "m", "dino", "d", "classification", "standard", 0, "q", "cls", "cosine", 0, 0, 0, "accuracy", 0.5
    )
    write_results(tmp_path / "run" / "results.csv", [row])
    result = invoke("report", str(tmp_path / "run" / "results.csv"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "report.html").is_file() and "Which token, with which rule?" in result.stdout
    result = invoke("report", str(tmp_path / "nowhere"))
    assert result.exit_code == 1
    assert (
        "does not exist; pass the folder `qkvprobe run` or `qkvprobe evaluate --out` wrote" in result.stderr
    )


def test_every_colour_mask_is_listed_at_once(tmp_path: Path) -> None:
    from qkvprobe.data import open_dataset

    root = tmp_path / "seg"
    (root / "train/images").mkdir(parents=True)
    (root / "train/masks").mkdir(parents=True)
    (root / "classes.txt").write_text("background\nthing\n")
    for i in range(25):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "train/images" / f"{i:02d}.png")
        Image.fromarray(np.zeros((8, 8), np.uint8)).convert("RGB" if i >= 2 else "L").save(
            root / "train/masks" / f"{i:02d}.png"
        )
    for on_bad_image in ("fail", "skip"):
        with pytest.raises(QkvprobeError) as info:
            ds = open_dataset(f"segfolder:{root}", "train", on_bad_image=on_bad_image)
            ds[2]
        message = str(info.value)
        assert message.startswith("23 masks are saved as colours, not class indices")
        assert "train/masks/02.png, train/masks/03.png" in message and "and 3 more" in message
    for i in range(25):  # colours fixed; three masks of the wrong size, listed together
        Image.fromarray(np.zeros((8, 6 if i in (4, 7, 9) else 8), np.uint8)).save(
            root / "train/masks" / f"{i:02d}.png"
        )
    with pytest.raises(QkvprobeError) as info:
        open_dataset(f"segfolder:{root}", "train")[4]
    assert str(info.value).startswith("3 masks do not have the size of their images")
    assert (
        "train/masks/04.png 6x8 (image 8x8), train/masks/07.png 6x8 (image 8x8), train/masks/09.png"
        in str(info.value)
    )


def test_extract_default_tokens_are_the_study_tokens(tmp_path: Path, builtin: str) -> None:
    data = grey_folder(tmp_path / "data")
    result = invoke(
        "extract", "--model", builtin, "--data", f"imagefolder:{data}", "--out", str(tmp_path / "s"),
        "--no-progress",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert FeatureStore.open(tmp_path / "s").tokens == list(TOKENS)


def test_dropped_keys_are_shown_at_load_time(tmp_path: Path, tiny_vit: torch.nn.Module, builtin: str) -> None:
    """A DDP-trained DINO teacher: ``module.backbone.`` prefixes and a projection head, dropped and counted."""
    data = grey_folder(tmp_path / "data")
    state = {f"module.backbone.{k}": v for k, v in tiny_vit.state_dict().items()}
    state["module.head.mlp.0.weight"] = torch.zeros(4, 32)
    state["module.head.last_layer.weight_g"] = torch.ones(1, 4)
    torch.save({"teacher": state, "student": state}, tmp_path / "teacher.pth")
    result = invoke(
        "extract", "--model", builtin, "--weights", str(tmp_path / "teacher.pth"), "--no-progress",
        "--data", f"imagefolder:{data}", "--out", str(tmp_path / "s"),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("weights: ")]
    assert len(lines) == 1
    assert (
        "container 'teacher'" in lines[0]
        and "prefix 'module.' stripped, prefix 'backbone.' stripped" in lines[0]
    )
    assert "2 pre-training-only keys dropped (head 2)" in lines[0]


# 8. Small data and what each kind takes ------------------------------------------------------------------
def test_extract_limit_is_a_seeded_stratified_subset(tmp_path: Path, builtin: str) -> None:
    data = grey_folder(tmp_path / "data", n=6)
    args = ["extract", "--model", builtin, "--data", f"imagefolder:{data}", "--no-progress"]
    result = invoke(*args, "--out", str(tmp_path / "s4"), "--limit", "4")
    assert result.exit_code == 0, result.output
    assert "4 samples (of 12, --limit 4 seed 0)" in result.stdout
    store = FeatureStore.open(tmp_path / "s4")
    assert np.bincount(store.labels()).tolist() == [2, 2]
    assert store.manifest["dataset"]["limit"] == {"n": 4, "seed": 0, "of": 12}
    result = invoke(*args, "--out", str(tmp_path / "s4"), "--limit", "6")
    assert result.exit_code == 1 and "the samples chosen" in result.stderr  # another N: another store


def test_datasets_lists_each_kinds_options() -> None:
    from qkvprobe.data.registry import KINDS

    result = invoke("datasets")
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    for kind in KINDS.values():
        if kind.options:
            assert "options: " + " ".join(f"?{o}=" for o in kind.options) in text


# 9. What a log and a report show -------------------------------------------------------------------------
def test_no_transformers_progress_bar_off_a_terminal(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    transformers = pytest.importorskip("transformers")
    from qkvprobe.backbones import load_backbone

    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=28,
        patch_size=4, num_channels=3,
    )  # fmt: skip
    transformers.ViTModel(config).save_pretrained(tmp_path / "vit")
    capfd.readouterr()
    load_backbone(f"hf:{tmp_path / 'vit'}")
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "\r" not in err


def test_ignored_files_are_named_not_attributes(tmp_path: Path) -> None:
    from qkvprobe.data import open_dataset

    data = grey_folder(tmp_path / "data")
    (data / "train" / "cat" / "notes.txt").write_text("x")
    with pytest.warns(UserWarning) as record:
        open_dataset(f"imagefolder:{data}", "train")
    message = str(record[0].message)
    assert "train/cat/notes.txt" in message and "ds." not in message


def test_answer_table_fits_or_scrolls_at_800_px() -> None:
    """The answer table's key column was cut off at 800 px (looked at with chromium --headless --screenshot at
    800 and 1400 px): it now wraps its cells on narrow pages and scrolls inside its own box if still too wide."""
    from importlib import resources

    template = (resources.files("qkvprobe.report") / "templates" / "report.html.j2").read_text()
    assert "div.scroll { overflow-x: auto" in template
    assert '<div class="scroll"><table class="answer"' in template
    narrow = template[template.index("@media (max-width:") :]
    assert narrow.index("table.answer td { white-space: normal; }") < narrow.index("</style>")


def test_piped_tables_and_logs_have_no_trailing_spaces() -> None:
    """The answer table ``run``/``evaluate``/``report`` print, and the Reporter's lines, in a pipe."""
    from rich.console import Console
    from rich.table import Table

    from qkvprobe.feedback import Reporter, Trimmed
    from qkvprobe.report.summary import summary_table

    table = Table("choice", "%", "ties / vs. the best")
    table.add_row("q·cls cosine", "73.4", "below the best (McNemar, p < 0.001)")
    table.add_row("k", "1", "")
    piped = Console(file=io.StringIO(), width=80, force_terminal=False)
    piped.print(Trimmed(table))
    Reporter(piped).log("evaluate 1/2 block 5 · q·cls · cosine")
    Reporter(piped).warn("a warning")
    lines = piped.file.getvalue().splitlines()
    assert any("q·cls cosine" in line for line in lines)
    assert [line for line in lines if line != line.rstrip()] == []
    assert isinstance(summary_table(__import__("pandas").DataFrame(columns=["model"])), Trimmed)
    on_terminal = Console(file=io.StringIO(), width=80, force_terminal=True)
    on_terminal.print(Trimmed(table))  # a terminal gets the table as rich draws it
    assert "q·cls cosine" in on_terminal.file.getvalue()


def test_every_published_family_resolves() -> None:
    """Every family in backbones/published.py has its preprocessing (the timm tags ship with timm)."""
    from qkvprobe.backbones.published import PUBLISHED, published_config, recognised_family

    for fragment, _, what in PUBLISHED:
        found = published_config(fragment)
        assert (found is None) == (not what)
        if found is not None:
            config, source = found
            assert len(config["mean"]) == len(config["std"]) == 3 and 0 < config["crop_pct"] <= 1
            assert source.startswith(what.split(":")[0])
    assert recognised_family("dinov2_vits14_pretrain.pth") == "dinov2"
    assert recognised_family("vit-b-300ep.pth.tar") is None
