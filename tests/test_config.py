"""The study config: shipped configs load, overrides apply, and every documented error names its key."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from qkvprobe.config import default_config_text, load_config, validate_config
from qkvprobe.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))
PATH_KINDS = ("imagefolder", "voc", "ade20k", "segfolder")


def test_configs_are_shipped() -> None:
    assert {p.name for p in SHIPPED} >= {"default.yaml", "paper.yaml", "custom-folder.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path, tmp_path: Path) -> None:
    data = yaml.safe_load(path.read_text())
    # paths replaced by fixtures so the check does not depend on the author's disks
    for i, d in enumerate(data["datasets"]):
        kind = d["spec"].split(":", 1)[0]
        if kind in PATH_KINDS:
            folder = tmp_path / f"data{i}"
            folder.mkdir()
            d["spec"] = f"{kind}:{folder}"
    data["out_dir"] = str(tmp_path / "runs")
    cfg = validate_config(data, path.name)
    assert cfg.models and cfg.datasets
    assert cfg.run_dir() == tmp_path / "runs" / cfg.name


def test_default_config_is_the_embedded_one() -> None:
    assert yaml.safe_load((ROOT / "configs" / "default.yaml").read_text()) == yaml.safe_load(
        default_config_text()
    )
    cfg = load_config()
    assert [d.task for d in cfg.datasets] == ["classification", "segmentation"]
    assert cfg.datasets[0].positions == ["cls", "avg"] and cfg.datasets[1].positions == ["patch"]
    assert cfg.tokens == ["q", "k", "v", "ffn", "ffn_norm"] and cfg.rules == ["hyperplane", "cosine", "knn"]
    assert cfg.fewshot.shots == [1, 5] and len(cfg.models) == 2


def test_paper_config_is_the_papers_grid() -> None:
    cfg = load_config(ROOT / "configs" / "paper.yaml")
    assert [m.spec for m in cfg.models] == [
        "timm:vit_small_patch16_224.dino",
        "timm:vit_base_patch16_224.dino",
        "timm:vit_base_patch16_224.mae",
    ]
    assert [d.spec.split(":")[0] for d in cfg.datasets] == ["imagefolder", "ade20k", "voc"]
    assert cfg.tokens == ["q", "k", "v", "ffn"] and cfg.settings == ["standard", "fewshot"]


def test_overrides_parse_yaml_scalars_and_revalidate() -> None:
    cfg = load_config(
        None,
        [
            "fewshot.episodes=50",
            "tokens=[q, ffn]",
            "name=quick",
            "datasets.0.train_size=100",
            "models.1.label=mae",
            "block_sweep.enabled=false",
            "cache_dir=/tmp/x",
        ],
    )
    assert cfg.fewshot.episodes == 50 and cfg.tokens == ["q", "ffn"] and cfg.name == "quick"
    assert cfg.datasets[0].train_size == 100 and cfg.models[1].name == "mae"
    assert cfg.sweep_models() == [] and str(cfg.cache_root()) == "/tmp/x"


def test_fingerprint_ignores_cosmetic_keys() -> None:
    base = load_config()
    assert (
        load_config(None, ["device=cuda", "batch_size=8", "cache_dir=/x"]).fingerprint() == base.fingerprint()
    )
    assert load_config(None, ["seed=1"]).fingerprint() != base.fingerprint()
    # class_weight, fewshot.C, heads and solver came later: their defaults leave earlier runs' fingerprints alone; other values
    # change it.
    old = base.model_dump(
        exclude={"device", "batch_size", "cache_dir", "out_dir", "report", "name", "class_weight"}
    )
    del old["fewshot"]["C"], old["heads"], old["solver"]
    assert base.fingerprint() == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    assert load_config(None, ["class_weight=balanced"]).fingerprint() != base.fingerprint()
    with pytest.raises(ConfigError, match="class_weight"):
        load_config(None, ["class_weight=heavy"])
    auto, small = load_config(None, ["fewshot.C=auto"]), load_config(None, ["fewshot.C=0.01"])
    assert (auto.fewshot.C, small.fewshot.C) == ("auto", 0.01)
    heads = load_config(None, ["heads=true"])
    tol, cap = load_config(None, ["solver.tol=1e-6"]), load_config(None, ["solver.max_iter=50"])
    prints = {c.fingerprint() for c in (base, auto, small, heads, tol, cap)}
    assert len(prints) == 6
    for bad in ("-1", "tuned"):
        with pytest.raises(ConfigError, match=r"fewshot\.C"):
            load_config(None, [f"fewshot.C={bad}"])


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["tokenz=[q]"], r"tokenz: unknown key \(did you mean 'tokens'\?\); allowed: name, "),
        (["fewshot.wayz=3"], r"fewshot.wayz: unknown key \(did you mean 'ways'\?\); allowed: ways, shots"),
        (
            ["tokens=[q, x]"],
            r"tokens.1: 'x' is not allowed; input should be 'q', 'k', 'v', 'ffn', 'ffn_norm', 'q_rope' or 'k_rope'",
        ),
        (["rules=[nearest]"], r"rules: unknown rule 'nearest'; choose from hyperplane, cosine, knn"),
        (
            ["settings=[zero-shot]"],
            r"settings.0: 'zero-shot' is not allowed; input should be 'standard' or 'fewshot'",
        ),
        (["tokens=[q, q]"], r"tokens: token listed twice: q"),
        (["tokens=[]"], r"tokens: tokens must not be empty"),
        (["fewshot.shots=[0]"], r"fewshot.shots: shot counts must be >= 1"),
        (["fewshot.ways=1"], r"fewshot.ways: Input should be greater than or equal to 2"),
        (["datasets.0.train_size=0"], r"datasets.0.train_size: Input should be greater than 0"),
        (
            ["datasets.0.positions=[patch]"],
            r"datasets.0.positions: position 'patch' is not available for classification .*allowed: cls, avg",
        ),
        (["datasets.1.positions=[cls]"], r"datasets.1.positions: .*allowed: patch"),
        (
            ["datasets.0.spec=fashin-mnist"],
            r"datasets.0.spec: unknown dataset kind 'fashin-mnist' \(did you mean 'fashion-mnist'\?\)",
        ),
        (
            ["datasets.0.spec=imagefolder"],
            r"datasets.0.spec: dataset spec 'imagefolder' needs a path: imagefolder:PATH",
        ),
        (
            ["models.0.spec=vit_small"],
            r"models.0.spec: model spec 'vit_small' must be one of timm:<name>, hf:<name>, builtin:<name>",
        ),
        (["models.1.spec=builtin:fmnist-dino-vit-tiny"], r"model label listed twice"),
        (["models=[]"], r"models: List should have at least 1 item"),
        (["name=../evil"], r"name: run name '../evil' must be letters"),
        (["device=tpu"], r"device: device 'tpu' is not one of cpu, auto, mps, cuda, cuda:N"),
        (["dtype=int8"], r"dtype: 'int8' is not allowed; input should be 'float16' or 'float32'"),
        (
            ["block_sweep.models=[nope]"],
            r"block_sweep.models: 'nope' is not a model of this study; allowed: ",
        ),
        (["block_sweep.datasets=[voc:/x]"], r"block_sweep.datasets: 'voc:/x' is not a dataset of this study"),
        (
            ["block_sweep.position=patch"],
            r"block_sweep.position: 'patch' is not allowed; input should be 'cls' or 'avg'",
        ),
        (["c_grid=[0.1, -1]"], r"c_grid: C values must be > 0"),
        (["c_grid=[]"], r"c_grid: C values must be > 0 and at least one is needed"),
        (
            ["rules=[cosine]", "block_sweep.rules=[hyperplane]"],
            r"block_sweep.rules: 'hyperplane' is not a rule of this study",
        ),
        (["batch_size=abc"], r"batch_size: Input should be a valid integer"),
    ],
)
def test_config_errors_name_key_and_allowed_values(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


@pytest.mark.parametrize(
    ("item", "match"),
    [
        ("fewshot.episodes", r"--set 'fewshot.episodes': expected KEY=VALUE"),
        ("fewshot..x=1", r"empty key segment"),
        ("models.9.spec=timm:x", r"--set models.9.spec: 'models.9' needs a list index in 0..1"),
        ("models.x.spec=timm:x", r"needs a list index"),
        ("seed.x=1", r"--set seed.x: 'seed' is a value, not a mapping"),
        ("tokens=[q", r"value is not valid YAML"),
    ],
)
def test_override_syntax_errors(item: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, [item])


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file .* does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [a\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: expected a mapping of keys at the top level, got list"):
        load_config(bad)
    bad.write_text("name: x\n")
    with pytest.raises(
        ConfigError, match=r"bad.yaml: models: required key is missing; datasets: required key is missing"
    ):
        load_config(bad)
    with pytest.raises(ConfigError, match="expected a mapping"):
        validate_config([1, 2])


def test_errors_are_one_line() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["tokens=[x]", "fewshot.ways=0", "nope=1"])
    assert "\n" not in str(info.value) and str(info.value).count(";") >= 2


def test_cli_run_reports_config_errors_in_one_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from qkvprobe.cli import get_app

    result = CliRunner().invoke(get_app(), ["run", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 1
    assert result.output.strip().startswith("qkvprobe: error: config file") and result.output.count("\n") == 1
    result = CliRunner().invoke(get_app(), ["run", "--set", "tokens=[x]"])
    assert result.exit_code == 1 and "tokens.0: 'x' is not allowed" in result.output
    assert "Traceback" not in result.output


def test_relative_paths_resolve_against_the_config_files_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "project" / "configs"
    folder.mkdir(parents=True)
    data = {
        "out_dir": "../runs",
        "cache_dir": "cache",
        "models": [
            {"spec": "timm:vit_small_patch16_224.dino", "weights": "ckpt/dino.pth"},
            {"spec": "hf:./models/mae", "label": "mae"},
            "hf:facebook/dino-vits16",
        ],
        "datasets": [
            {"spec": "imagefolder:data/imgs"},
            {"spec": "fashion-mnist", "root": "fm"},
            {"spec": f"segfolder:{tmp_path / 'abs'}"},
            {"spec": "wds:shards?image=png"},
            {"spec": "hfds:./parquet"},
            {"spec": "hfds:org/name"},
        ],
    }
    (folder / "study.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.chdir(tmp_path)  # anywhere but the config's folder
    cfg = load_config(Path("project/configs/study.yaml"))
    base = folder.resolve()
    assert cfg.run_dir() == base / "../runs" / "default" and cfg.cache_root() == base / "cache"
    dino, mae, hub = cfg.models
    assert cfg.weights_path(dino) == base / "ckpt" / "dino.pth" and cfg.weights_path(mae) is None
    assert cfg.model_spec(mae) == f"hf:{base / 'models' / 'mae'}"
    assert cfg.model_spec(hub) == "hf:facebook/dino-vits16"  # a hub id, not a folder
    imgs, fm, seg, shards, parquet, hub_id = cfg.datasets
    assert cfg.dataset_spec(imgs) == f"imagefolder:{base / 'data' / 'imgs'}"
    assert imgs.spec == "imagefolder:data/imgs"  # the label (results' dataset column) stays as written
    assert cfg.dataset_spec(shards) == f"wds:{base / 'shards'}?image=png"  # options kept
    assert cfg.dataset_spec(parquet) == f"hfds:{base / 'parquet'}"
    assert cfg.dataset_spec(hub_id) == "hfds:org/name"  # a hub id, not a folder
    assert cfg.dataset_root(fm) == str(base / "fm") and cfg.dataset_spec(fm) == "fashion-mnist"
    assert cfg.dataset_spec(seg) == seg.spec
    # The fingerprint does not depend on where the config lies; --set values resolve the same way.
    copy = tmp_path / "elsewhere" / "study.yaml"
    copy.parent.mkdir()
    copy.write_text((folder / "study.yaml").read_text())
    assert load_config(copy).fingerprint() == cfg.fingerprint()
    moved = load_config(Path("project/configs/study.yaml"), ["out_dir=out"])
    assert moved.run_dir() == base / "out" / "default"
    assert moved.with_run_dir("here").run_dir() == Path("here")  # qkvprobe run --out: the working directory's
    # The embedded default has no file: its paths are the working directory's.
    assert load_config().run_dir() == Path("runs") / "default"


def test_a_model_with_local_weights_is_not_labelled_as_the_hubs_checkpoint() -> None:
    cfg = validate_config(
        {
            "models": [
                {"spec": "timm:vit_small_patch16_224.dino", "weights": "/ckpt/random.pth"},
                "timm:vit_small_patch16_224.dino",
                {"spec": "builtin:fmnist-dino-vit-tiny", "weights": "w.safetensors", "label": "mine"},
            ],
            "datasets": ["fashion-mnist"],
        }
    )
    assert [m.name for m in cfg.models] == [
        "timm:vit_small_patch16_224.dino + random.pth",
        "timm:vit_small_patch16_224.dino",
        "mine",
    ]
