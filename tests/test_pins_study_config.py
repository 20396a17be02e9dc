"""Pins of the study config (``qkvprobe run``): every key the study hands to the protocols, set to a non-default
value, must reach the rows of ``results.csv`` — as a column, or as a value only that setting could give. A study
that silently dropped a key (and used its default) fails one of these tests.

Three small studies are shared by all tests, all through the public door: ``all`` (every key non-default, run
with :func:`qkvprobe.study.run_study`), and the same config through the CLI (``qkvprobe run CONFIG --set …``)
with another seed: ``auto`` (the few-shot setting alone, ``fewshot.C: auto``) and ``standard`` (the standard
setting alone), each with its own feature cache. Their rows are read with :func:`qkvprobe.results.read_results`.
One reference goes past the rows: the k-NN few-shot values are recomputed in NumPy from the ``all`` run's cached
feature stores (``FeatureStore.open``) on episodes of the public sampler, so the few-shot keys and ``knn`` must
reach the computation, not just the labels.

Each test was checked against a planted break of ``qkvprobe/study`` (the key dropped, its default used)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import write_tiny_builtin
from qkvprobe.results import ResultRow, read_results

MODEL = "builtin:tiny"
FMNIST = "fashion-mnist?source=bundled"
SCENES = "fashion-mnist-scenes?source=bundled"
#: The non-default value of every key the pins check (the defaults: config.py).
WAYS, SHOTS, QUERIES, EPISODES, SEG_EPISODES = 3, [2], 2, 5, 3
FEWSHOT_C = 0.01
K, T = 3, 0.5
C_GRID = [0.037]
SEED, OTHER_SEED = 7, 3
TOKENS = ["k", "ffn"]
BLOCK = 0  # the tiny model has blocks 0 and 1; the default -1 is block 1
RULES = ["hyperplane", "knn"]  # the default is hyperplane and cosine
#: The few-shot C="auto" grid (README, "Few-shot C": 1e-5 … 1e3).
AUTO_GRID = {10.0**p for p in range(-5, 4)}
RUNS = ("all", "auto", "standard")
FEWSHOT_RUNS = ("all", "auto")


def config(tmp: Path) -> dict:
    return {
        "name": "pins",
        "out_dir": str(tmp / "runs"),
        "cache_dir": str(tmp / "cache"),
        "batch_size": 256,
        "seed": SEED,
        "models": [MODEL],
        "datasets": [
            # 20 training and 16 test images per class: the default 15 queries would fit too.
            {"spec": FMNIST, "train_size": 200, "test_size": 160, "positions": ["avg"]},
            {"spec": SCENES, "train_size": 40, "test_size": 20},
        ],
        "settings": ["standard", "fewshot"],
        "tokens": TOKENS,
        "rules": RULES,
        "blocks": [BLOCK],
        "c_grid": C_GRID,
        "class_weight": "balanced",
        "heads": True,
        "fewshot": {
            "ways": WAYS,
            "shots": SHOTS,
            "queries": QUERIES,
            "episodes": EPISODES,
            "segmentation_episodes": SEG_EPISODES,
            "C": FEWSHOT_C,
        },
        "knn": {"k": K, "T": T},
        "report": {"enabled": False},
    }


@pytest.fixture(scope="module")
def study_file(tmp_path_factory: pytest.TempPathFactory, tiny_vit: torch.nn.Module) -> Iterator[Path]:
    """The ``all`` study's config file, with ``builtin:tiny`` (conftest's tiny ViT) among the built-in models."""
    import qkvprobe.backbones as backbones

    tmp = tmp_path_factory.mktemp("pins-study")
    models = write_tiny_builtin(tiny_vit, tmp / "builtin")
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(config(tmp)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(backbones, "builtin_dir", lambda: models)
        yield path


def cli_run(path: Path, name: str, overrides: list[str]) -> list[ResultRow]:
    """``qkvprobe run PATH --out DIR --quiet --set …`` → the rows of its results.csv."""
    from qkvprobe.cli import get_app

    out = path.parent / name
    overrides = [*overrides, f"cache_dir={path.parent / ('cache-' + name)}"]  # the all run's cache: its own
    args = ["run", str(path), "--out", str(out), "--quiet"] + [a for o in overrides for a in ("--set", o)]
    result = CliRunner().invoke(get_app(), args)
    assert result.exit_code == 0, result.output
    return read_results(out / "results.csv")


@pytest.fixture(scope="module")
def all_rows(study_file: Path) -> list[ResultRow]:
    """Every key non-default, through :func:`qkvprobe.study.run_study`."""
    from qkvprobe.config import load_config
    from qkvprobe.study import run_study

    result = run_study(load_config(study_file), progress=False)
    return read_results(result.run_dir / "results.csv")


@pytest.fixture(scope="module")
def auto_rows(study_file: Path) -> list[ResultRow]:
    """The same study through the CLI with another seed, the few-shot setting alone and C chosen on episodes."""
    return cli_run(study_file, "auto", [f"seed={OTHER_SEED}", "fewshot.C=auto", "settings=[fewshot]"])


@pytest.fixture(scope="module")
def standard_rows(study_file: Path) -> list[ResultRow]:
    """The same study through the CLI with another seed and the standard setting alone."""
    return cli_run(study_file, "standard", [f"seed={OTHER_SEED}", "settings=[standard]"])


RowsOf = Callable[[str], list[ResultRow]]


@pytest.fixture()
def rows_of(request: pytest.FixtureRequest) -> RowsOf:
    """``rows_of("auto")``: the rows of that study (its module fixture, run on first use)."""
    return lambda run: request.getfixturevalue(f"{run}_rows")


def pick(rows: list[ResultRow], **where: object) -> list[ResultRow]:
    """The rows whose columns equal ``where``; at least one (a pin on no rows would pass vacuously)."""
    out = [r for r in rows if all(getattr(r, k) == v for k, v in where.items())]
    assert out, f"no rows with {where}"
    return out


def test_class_weight_balanced_reaches_every_hyperplane_row(all_rows: list[ResultRow]) -> None:
    rows = pick(all_rows, rule="hyperplane")
    assert {(r.setting, r.task) for r in rows} == {
        (s, t) for s in ("standard", "fewshot") for t in ("classification", "segmentation")
    }
    assert {r.class_weight for r in rows} == {"balanced"}


def test_fixed_fewshot_C_is_the_rows_C_and_C_choice(all_rows: list[ResultRow]) -> None:
    rows = pick(all_rows, rule="hyperplane", setting="fewshot")
    assert {r.task for r in rows} == {"classification", "segmentation"}
    assert {r.C for r in rows} == {FEWSHOT_C}
    assert {r.C_choice for r in rows} == {"0.01"}


def test_auto_fewshot_C_is_chosen_from_the_auto_grid(auto_rows: list[ResultRow]) -> None:
    rows = pick(auto_rows, rule="hyperplane", setting="fewshot")
    assert {r.task for r in rows} == {"classification", "segmentation"}
    assert {r.C_choice for r in rows} == {"auto"}
    assert {r.C for r in rows} <= AUTO_GRID


def test_c_grid_is_the_standard_hyperplane_C(all_rows: list[ResultRow]) -> None:
    rows = pick(all_rows, rule="hyperplane", setting="standard")
    assert {r.task for r in rows} == {"classification", "segmentation"}
    assert {r.C for r in rows} == set(C_GRID)  # 0.037 is on no default grid


@pytest.mark.parametrize("run", FEWSHOT_RUNS)
def test_ways_reach_the_fewshot_classification_rows(rows_of: RowsOf, run: str) -> None:
    assert {r.ways for r in pick(rows_of(run), setting="fewshot", task="classification")} == {WAYS}


@pytest.mark.parametrize("run", FEWSHOT_RUNS)
def test_shots_reach_the_fewshot_rows(rows_of: RowsOf, run: str) -> None:
    for task in ("classification", "segmentation"):
        assert {r.shots for r in pick(rows_of(run), setting="fewshot", task=task)} == set(SHOTS)


@pytest.mark.parametrize("run", FEWSHOT_RUNS)
def test_episodes_and_segmentation_episodes_reach_the_rows(rows_of: RowsOf, run: str) -> None:
    rows = rows_of(run)
    assert {r.episodes for r in pick(rows, setting="fewshot", task="classification")} == {EPISODES}
    assert {r.episodes for r in pick(rows, setting="fewshot", task="segmentation")} == {SEG_EPISODES}


def test_queries_set_the_grain_of_the_fewshot_accuracies(all_rows: list[ResultRow]) -> None:
    """An episode's accuracy is a count over its ways·queries queries, so a mean over the episodes is a multiple
    of 1/(episodes·ways·queries): 1/30 here. With the default 15 queries the grain is 1/225, and a mean on the
    1/30 grain has a 1-in-15 chance per row."""
    rows = pick(all_rows, setting="fewshot", task="classification")
    grain = EPISODES * WAYS * QUERIES
    off = [(r.token, r.rule, r.value) for r in rows if abs(r.value * grain - round(r.value * grain)) > 1e-6]
    assert not off, off
    # Not a grain every value meets: some accuracies lie strictly between 0 and 1.
    assert sum(0 < r.value < 1 for r in rows) >= 3


@pytest.mark.parametrize("run", RUNS)
def test_knn_k_and_T_reach_the_knn_rows(rows_of: RowsOf, run: str) -> None:
    rows = rows_of(run)
    assert {r.params for r in pick(rows, rule="knn")} == {f"k={K},T={T}"}
    assert {r.params for r in pick(rows, rule="hyperplane")} == {""}


def knn_fewshot_reference(
    train: np.ndarray, ytr: np.ndarray, test: np.ndarray, yte: np.ndarray, k: int, T: float
) -> float:
    """Mean accuracy of DINO's weighted k-NN (votes Σ exp(s/T) of the k most cosine-similar support samples) over
    the episodes the few-shot keys describe, drawn with the public sampler: NumPy, float64."""
    from qkvprobe.data.episodes import sample_classification_episodes

    ep = sample_classification_episodes(
        ytr, yte, ways=WAYS, shots=SHOTS[0], queries=QUERIES, episodes=EPISODES, seed=SEED
    )
    S, Q = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (train.astype(float), test.astype(float)))
    acc = []
    for e in range(EPISODES):
        sims = Q[ep.query[e]] @ S[ep.support[e]].T  # [ways·queries, ways·shots]
        top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        votes = np.zeros((len(sims), WAYS))
        for i, row in enumerate(top):
            np.add.at(votes[i], ep.support_labels[e][row], np.exp((sims[i, row] - sims[i, row[0]]) / T))
        acc.append(np.mean(votes.argmax(1) == ep.query_labels[e]))
    return float(np.mean(acc))


def test_knn_fewshot_accuracy_is_that_of_the_configured_k_T_and_episodes(
    all_rows: list[ResultRow], study_file: Path
) -> None:
    """The k-NN few-shot rows of Fashion-MNIST recomputed from the run's cached features: k, T, ways, shots,
    queries, episodes, the seed, the position and the block all change the value. The default k and T give
    another value on these episodes (checked first, so the test cannot pass vacuously)."""
    from qkvprobe.features import FeatureStore

    stores = {}
    for manifest in (study_file.parent / "cache").rglob("manifest.json"):
        store = FeatureStore.open(manifest.parent)
        if store.dataset_spec.startswith(FMNIST) and store.task == "classification":
            stores[store.split] = store
    assert sorted(stores) == ["test", "train"], sorted(stores)
    train, test = stores["train"], stores["test"]
    rows = pick(all_rows, rule="knn", setting="fewshot", dataset=FMNIST)
    differs = False
    for r in rows:
        if "." in r.token:
            continue  # whole token types only
        args = (
            train.get(r.token, r.position, r.block),
            train.labels(),
            test.get(r.token, r.position, r.block),
            test.labels(),
        )
        assert r.value == pytest.approx(knn_fewshot_reference(*args, K, T), abs=1e-9), r.token
        differs |= knn_fewshot_reference(*args, 20, 0.07) != pytest.approx(r.value, abs=1e-9)
    assert differs, "the default k and T give the same values here: the test could not tell them apart"


def test_seed_reaches_the_rows(rows_of: RowsOf) -> None:
    assert {r.seed for r in rows_of("all")} == {SEED}
    assert {r.seed for r in rows_of("auto")} == {r.seed for r in rows_of("standard")} == {OTHER_SEED}


def values(rows: list[ResultRow]) -> dict[tuple, float]:
    return {(r.dataset, r.token, r.position, r.rule, r.shots, r.metric): r.value for r in rows}


def test_seed_draws_other_fewshot_episodes(all_rows: list[ResultRow], auto_rows: list[ResultRow]) -> None:
    """``all`` and ``auto`` differ in the seed, C and settings only: their k-NN few-shot rows (no C) measure the
    same tokens on other episodes (and subsets), so their values differ."""
    a = values(pick(all_rows, rule="knn", setting="fewshot"))
    b = values(pick(auto_rows, rule="knn", setting="fewshot"))
    assert a.keys() == b.keys()
    assert any(a[key] != b[key] for key in a)


def test_seed_draws_other_classification_subsets(
    all_rows: list[ResultRow], standard_rows: list[ResultRow]
) -> None:
    """``all`` and ``standard`` differ in the seed and settings only. The standard k-NN rows of Fashion-MNIST
    depend on the seed through the seeded train/test subsets alone (k-NN draws nothing), so their values differ
    only if the subsets do."""
    a = values(pick(all_rows, setting="standard", dataset=FMNIST, rule="knn"))
    b = values(pick(standard_rows, setting="standard", dataset=FMNIST, rule="knn"))
    assert a.keys() == b.keys()
    assert any(a[key] != b[key] for key in a)


@pytest.mark.parametrize("run", RUNS)
def test_positions_per_dataset(rows_of: RowsOf, run: str) -> None:
    rows = rows_of(run)
    assert {r.position for r in pick(rows, dataset=FMNIST)} == {"avg"}  # the default: cls and avg
    assert {r.position for r in pick(rows, dataset=SCENES)} == {"patch"}


@pytest.mark.parametrize("run", RUNS)
def test_tokens_and_heads_reach_the_rows(rows_of: RowsOf, run: str) -> None:
    heads = {"k.h0", "k.h1"}  # the tiny model's 2 heads of k; ffn has none
    rows = rows_of(run)
    for dataset in (FMNIST, SCENES):
        for setting in {r.setting for r in rows}:
            tokens = {r.token for r in pick(rows, dataset=dataset, setting=setting)}
            assert tokens == set(TOKENS) | heads, (dataset, setting)


@pytest.mark.parametrize("run", RUNS)
def test_blocks_reach_the_rows(rows_of: RowsOf, run: str) -> None:
    assert {r.block for r in rows_of(run)} == {BLOCK}


@pytest.mark.parametrize("run", RUNS)
def test_rules_reach_the_rows(rows_of: RowsOf, run: str) -> None:
    for dataset in (FMNIST, SCENES):
        assert {r.rule for r in pick(rows_of(run), dataset=dataset)} == set(RULES)


def test_settings_reach_the_rows(rows_of: RowsOf) -> None:
    assert {r.setting for r in rows_of("all")} == {"standard", "fewshot"}
    assert {r.setting for r in rows_of("auto")} == {"fewshot"}  # --set settings=[fewshot]
    assert {r.setting for r in rows_of("standard")} == {"standard"}  # --set settings=[standard]
