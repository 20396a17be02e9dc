"""User-facing error sites that no other test raised (issue 21): each is reached through a public API with bad
input a user could give, and must raise its one-line ``QkvprobeError`` subclass with a message that names the
problem and the fix. Grouped by the module that raises."""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pins_fixtures import GRID, INDEX_OFFSET, MemoryStore, blobs, seg_images, seg_store
from qkvprobe.errors import (
    ConfigError,
    DataError,
    FeatureError,
    ModelError,
    QkvprobeError,
    RuleError,
    StoreError,
)
from qkvprobe.protocols import (
    evaluate_classification,
    evaluate_segmentation,
    fewshot_classification,
    fewshot_segmentation,
    standard_classification,
    standard_segmentation,
)
from qkvprobe.results import COLUMNS, ResultRow, read_results
from qkvprobe.rules import CosineRule, HyperplaneRule
from qkvprobe.taps import Derived, HookedBackbone, Tap, TapSite, first_input, select_positions


def raises_one_line(error: type[QkvprobeError], match: str, call: Callable[[], object]) -> None:
    """``call()`` raises ``error`` (a QkvprobeError) whose one-line message matches ``match``."""
    with pytest.raises(error, match=match) as info:
        call()
    assert isinstance(info.value, QkvprobeError) and "\n" not in str(info.value)


# -- protocols: classification -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cls_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    Xtr, ytr = blobs(80, 1, dim=6)
    Xte, yte = blobs(40, 2, dim=6)
    return Xtr, ytr, Xte, yte


def test_standard_classification_errors(cls_split) -> None:
    Xtr, ytr, Xte, yte = cls_split
    raises_one_line(
        RuleError,
        r"training split has a single class \(0\); classification needs at least 2",
        lambda: standard_classification([Xtr], np.zeros_like(ytr), [Xte], np.zeros_like(yte), rule="cosine"),
    )
    raises_one_line(
        FeatureError,
        r"need one test array per train array, got 1 and 0",
        lambda: standard_classification([Xtr], ytr, [], yte, rule="cosine"),
    )
    raises_one_line(
        FeatureError,
        r"feature set #0: 79/40 rows but 80/40 labels; pass one label per row",
        lambda: standard_classification([Xtr[:-1]], ytr, [Xte], yte, rule="cosine"),
    )
    raises_one_line(
        RuleError,
        r"unknown rule 'nearest'; choose from hyperplane, cosine, knn",
        lambda: standard_classification([Xtr], ytr, [Xte], yte, rule="nearest"),
    )
    raises_one_line(
        RuleError,
        r"the C grid is empty; pass at least one C value",
        lambda: standard_classification([Xtr], ytr, [Xte], yte, rule="hyperplane", Cs=()),
    )
    raises_one_line(
        FeatureError,
        r"train features #0 must be real numbers, got dtype <U\d+; pass a float array",
        lambda: standard_classification([Xtr.astype(str)], ytr, [Xte], yte, rule="cosine"),
    )
    raises_one_line(
        FeatureError,
        r"train features #0 must have 2 dimensions, got shape \(1, 80, 6\); reshape it to \[n_samples, n_features\]",
        lambda: standard_classification([Xtr[None]], ytr, [Xte], yte, rule="cosine"),
    )


def test_fewshot_classification_malformed_episodes(cls_split) -> None:
    Xtr, _, Xte, _ = cls_split
    support, support_labels = np.array([[0, 20], [1, 21]]), np.array([[0, 1], [0, 1]])
    query, query_labels = np.array([[0, 10], [1, 11]]), np.array([[0, 1], [0, 1]])
    raises_one_line(
        RuleError,
        r"episode arrays must be \[E, N\*K\] and \[E, N\*Q\] with the same E, got \(4,\) and \(2, 2\)",
        lambda: fewshot_classification(
            Xtr, Xte, None, support.ravel(), support_labels.ravel(), query, query_labels, rule="cosine"
        ),
    )
    raises_one_line(
        RuleError,
        r"labels \(2, 1\)/\(2, 2\) do not match indices \(2, 2\)/\(2, 2\); pass one label per index",
        lambda: fewshot_classification(
            Xtr, Xte, None, support, support_labels[:, :1], query, query_labels, rule="cosine"
        ),
    )


def test_evaluate_classification_refuses_an_unknown_rule_before_any_fit(cls_split) -> None:
    Xtr, ytr, Xte, yte = cls_split
    tr = MemoryStore({("q", "cls"): Xtr}, labels=ytr)
    te = MemoryStore({("q", "cls"): Xte}, labels=yte)
    fitted: list[tuple[str, int, int]] = []
    raises_one_line(
        RuleError,
        r"unknown rule 'nearest'; choose from hyperplane, cosine, knn",
        lambda: evaluate_classification(
            tr,
            te,
            setting="standard",
            tokens=("q",),
            rules=("cosine", "nearest"),
            progress=lambda *a: fitted.append(a),
        ),
    )
    assert fitted == []  # refused before the cosine rule ran


# -- protocols: segmentation ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def seg_split():
    return seg_images(8, 1), seg_images(4, 2)


@pytest.mark.parametrize("rule", ["hyperplane", "cosine"])
def test_standard_segmentation_refuses_nan_patch_features(rule: str, seg_split) -> None:
    train, test = seg_split
    feats = train.feats.copy()
    row, patch = 3, int(np.flatnonzero(train.patch_labels[3] != 255)[0])  # a labelled patch
    feats[row, patch, 0] = np.nan
    tr = MemoryStore({("q", "patch"): feats}, patch_labels=train.patch_labels)
    raises_one_line(
        FeatureError,
        r"patch features of images \d+\.\.\d+ contain NaN/Inf; re-extract them",
        lambda: standard_segmentation(tr, seg_store(test), token="q", rule=rule, masks=test.mask, Cs=(1.0,)),
    )


@pytest.mark.parametrize("rule", ["hyperplane", "cosine"])
def test_standard_segmentation_refuses_training_patches_all_ignored(rule: str, seg_split) -> None:
    train, test = seg_split
    tr = MemoryStore({("q", "patch"): train.feats}, patch_labels=np.full_like(train.patch_labels, 255))
    raises_one_line(
        RuleError,
        r"no labelled training patches \(all patch labels are 255\); check the training store",
        lambda: standard_segmentation(tr, seg_store(test), token="q", rule=rule, masks=test.mask, Cs=(1.0,)),
    )


def test_segmentation_unknown_rule_and_setting(seg_split) -> None:
    train, test = seg_split
    raises_one_line(
        RuleError,
        r"unknown rule 'nearest'; choose from hyperplane, cosine, knn",
        lambda: standard_segmentation(
            seg_store(train), seg_store(test), token="q", rule="nearest", masks=test.mask
        ),
    )
    raises_one_line(
        RuleError,
        r"unknown rule 'nearest'; choose from hyperplane, cosine, knn",
        lambda: fewshot_segmentation(
            train.feats,
            train.patch_labels,
            test.feats,
            np.arange(4) + INDEX_OFFSET,
            GRID,
            np.array([1]),
            np.array([[0]]),
            np.array([0]),
            rule="nearest",
            masks=test.mask,
        ),
    )
    raises_one_line(
        ConfigError,
        r"setting: 'zero-shot' is not allowed; input should be 'standard' or 'fewshot'",
        lambda: evaluate_segmentation(
            seg_store(train), seg_store(test), setting="zero-shot", masks=test.mask
        ),
    )


def test_fewshot_segmentation_refuses_nan_support_features(seg_split) -> None:
    train, test = seg_split
    feats = train.feats.copy()
    feats[0, 5, 2] = np.inf
    raises_one_line(
        FeatureError,
        r"support patch features contain NaN/Inf; re-extract the features",
        lambda: fewshot_segmentation(
            feats,
            train.patch_labels,
            test.feats,
            np.arange(4) + INDEX_OFFSET,
            GRID,
            np.array([1]),
            np.array([[0]]),
            np.array([0]),
            rule="cosine",
            masks=test.mask,
        ),
    )


# -- rules ---------------------------------------------------------------------------------------------------
def test_rule_hyperparameters_and_weights() -> None:
    X, y = blobs(20, 1, dim=3, classes=2)
    raises_one_line(
        RuleError, r"max_iter must be a positive integer, got 0", lambda: HyperplaneRule(max_iter=0).fit(X, y)
    )
    raises_one_line(
        RuleError,
        r"tol must be a positive number, got -1.0; e.g. tol=1e-4",
        lambda: HyperplaneRule(tol=-1.0).fit(X, y),
    )
    raises_one_line(
        RuleError,
        r"the samples with non-zero weight have 1 class; a decision rule needs at least 2 classes",
        lambda: HyperplaneRule().fit(X, y, sample_weight=(y == 0).astype(float)),
    )


@pytest.mark.parametrize("rule", [HyperplaneRule, CosineRule])
def test_rules_refuse_bad_tensors(rule: type) -> None:
    y = [0, 1, 0]
    raises_one_line(
        FeatureError,
        r"Expected a 2D tensor \[n_samples, n_features\], got shape \(3, 2, 2\); reshape it",
        lambda: rule().fit(torch.zeros(3, 2, 2), y),
    )
    raises_one_line(
        FeatureError,
        r"Found an empty tensor of shape \(0, 2\); pass at least one sample and feature",
        lambda: rule().fit(torch.zeros(0, 2), []),
    )
    raises_one_line(
        FeatureError,
        r"X must be a real-valued tensor, got dtype torch.complex64; pass float features",
        lambda: rule().fit(torch.zeros(3, 2, dtype=torch.complex64), y),
    )
    raises_one_line(
        FeatureError,
        r"X contains NaN or inf values; re-extract the features",
        lambda: rule().fit(torch.tensor([[float("nan"), 1.0], [0.0, 1.0], [2.0, 0.0]]), y),
    )


# -- feature store -------------------------------------------------------------------------------------------
def test_store_refuses_an_unreadable_array(tmp_path: Path) -> None:
    from qkvprobe.features import FeatureStore, extract_features
    from test_store import SyntheticDataset, ToyBackbone

    store = extract_features(
        ToyBackbone(), SyntheticDataset(4), tmp_path / "s", tokens="q", positions="cls", progress=False
    )
    array = next(store.path.glob("shard-*/*q*cls*.npy"))
    array.write_bytes(b"not an npy file")
    store = FeatureStore.open(store.path)  # complete: every file exists
    raises_one_line(
        StoreError,
        rf"cannot read .*{array.name}: .*; delete .* and re-run the extract command",
        lambda: store.get("q", "cls"),
    )


# -- taps ----------------------------------------------------------------------------------------------------
class _ToyBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.fused = nn.Linear(
            dim, dim
        )  # what a model might hold but not call (e.g. a fused path taken instead)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.q(x) + self.k(x) + self.v(x)


class _ToyNet(nn.Module):
    def __init__(self, dim: int = 8, depth: int = 2, patch: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Conv2d(1, dim, patch, patch)
        self.blocks = nn.ModuleList(_ToyBlock(dim) for _ in range(depth))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed(images).flatten(2).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        return x


class ToyHooked(HookedBackbone):
    """A two-block architecture described through the public tap API; ``taps`` maps a tap name to the attribute
    of the block it hooks (a wrong one is an architecture description whose hook never fires), ``rope`` adds a
    ``q_rope`` derived from ``q`` and a ``rope`` input of ``rope_module``."""

    def __init__(
        self, taps: dict[str, str], *, rope_module: str | None = None, final_norm: bool = True
    ) -> None:
        self.spec, self.objective, self.family = "toy:hooked", "unknown", "toy"
        self.model, self.device = _ToyNet().eval(), torch.device("cpu")
        self.embed_dim, self.num_blocks, self.num_heads, self.patch_size, self.in_chans = 8, 2, 2, 4, 1
        self.num_prefix_tokens, self.num_register_tokens, self.has_cls_token = 0, 0, False
        self.has_rope = rope_module is not None
        self.ffn_norm_source = "identity" if final_norm else None
        self.data_config = {"mean": [0.5], "std": [0.25], "input_size": (1, 8, 8)}
        self.weights_digest, self.weights_source = "0" * 64, "toy"
        self.taps, self.rope_module = taps, rope_module

    def tap_site(self, block: int) -> TapSite:
        blk = self.model.blocks[block]
        taps = {name: Tap(getattr(blk, attr), read=lambda out: out) for name, attr in self.taps.items()}
        derived = {}
        if self.rope_module is not None:
            taps["rope"] = Tap(getattr(blk, self.rope_module), read=first_input, before=True)
            derived["q_rope"] = Derived(("q", "rope"), lambda q, rope: q)
        return TapSite(blk, taps, derived)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def run(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)


QKV = {"q": "q", "k": "k", "v": "v"}
IMAGES = torch.zeros(2, 1, 8, 8)


def test_toy_hooked_backbone_extracts() -> None:
    """The toy architecture is a valid one: the errors below come from what each test breaks, not the toy."""
    out = ToyHooked(QKV, rope_module="k").extract(IMAGES, tokens=("q", "v", "ffn", "ffn_norm", "q_rope"))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        t: (2, 4, 8) for t in ("q", "v", "ffn", "ffn_norm", "q_rope")
    }


def test_tap_hook_that_never_fired() -> None:
    raises_one_line(
        ModelError,
        r"toy:hooked: the hook for 'v' of block 1 never fired",
        lambda: ToyHooked({**QKV, "v": "fused"}).extract(IMAGES, tokens=("q", "v")),
    )
    raises_one_line(
        ModelError,
        r"toy:hooked: the hook for 'rope' of block 1 never fired",
        lambda: ToyHooked(QKV, rope_module="fused").extract(IMAGES, tokens=("q_rope",)),
    )


def test_tap_description_and_request_errors() -> None:
    raises_one_line(
        ModelError,
        r"toy:hooked: block 1 describes no tap for 'k'",
        lambda: ToyHooked({"q": "q", "v": "v"}).extract(IMAGES, tokens=("k",)),
    )
    raises_one_line(
        FeatureError,
        r"toy:hooked has no final norm, so 'ffn_norm' would equal 'ffn'; drop ffn_norm from the tokens",
        lambda: ToyHooked(QKV, final_norm=False).extract(IMAGES, tokens=("ffn_norm",)),
    )
    raises_one_line(
        FeatureError,
        r"no block asked for; pass e\.g\. blocks=\(-1,\) for the last block",
        lambda: ToyHooked(QKV).extract(IMAGES, blocks=()),
    )
    raises_one_line(
        DataError,
        r"toy:hooked: images must be a float tensor \[B, C, H, W\], got Tensor of shape \(1, 8, 8\)",
        lambda: ToyHooked(QKV).extract(IMAGES[0]),
    )


def test_select_positions_without_patch_tokens() -> None:
    raises_one_line(
        FeatureError,
        r"tap has 1 tokens but 1 prefix tokens: no patch tokens are left; check num_prefix_tokens",
        lambda: select_positions(torch.zeros(2, 1, 8), ["patch"], num_prefix_tokens=1, has_cls_token=True),
    )


# -- results table -------------------------------------------------------------------------------------------
def a_row(**kw: object) -> ResultRow:
    base = dict(
        model="m",
        objective="dino",
        dataset="d",
        task="classification",
        setting="standard",
        block=1,
        token="q",
        position="cls",
        rule="cosine",
        ways=0,
        shots=0,
        episodes=0,
        metric="accuracy",
        value=0.5,
    )
    return ResultRow(**{**base, **kw})


def test_result_row_refuses_bad_values() -> None:
    raises_one_line(
        QkvprobeError,
        r"result converged 'maybe' is not one of \['true', 'false', ''\]",
        lambda: a_row(converged="maybe"),
    )
    raises_one_line(
        QkvprobeError, r"result value 1.5 for metric 'accuracy' is outside \[0, 1\]", lambda: a_row(value=1.5)
    )


def test_results_table_with_an_edited_value_is_refused(tmp_path: Path) -> None:
    """A results.csv edited by hand to a percentage is refused when read, not averaged into a report."""
    path = tmp_path / "results.csv"
    rec = {k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(a_row()).items()}
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerow({**rec, "value": "50"})
    raises_one_line(
        QkvprobeError,
        r"result value 50.0 for metric 'accuracy' is outside \[0, 1\]",
        lambda: read_results(path),
    )


@pytest.mark.parametrize("rule", ["hyperplane", "cosine", "knn"])
def test_segmentation_refuses_nan_evaluation_patch_features(rule: str, seg_split) -> None:
    """NaN in the evaluation split's patches (standard) or a query's (few-shot) is an error, not a silent score."""
    train, test = seg_split
    feats = test.feats.copy()
    feats[2, 4, 1] = np.nan
    te = MemoryStore({("q", "patch"): feats}, patch_labels=test.patch_labels)
    raises_one_line(
        FeatureError,
        r"patch features of evaluation images \d+\.\.\d+ contain NaN/Inf; re-extract them",
        lambda: standard_segmentation(seg_store(train), te, token="q", rule=rule, masks=test.mask, Cs=(1.0,)),
    )
    raises_one_line(
        FeatureError,
        r"query patch features contain NaN/Inf; re-extract the features",
        lambda: fewshot_segmentation(
            train.feats,
            train.patch_labels,
            feats,
            np.arange(4) + INDEX_OFFSET,
            GRID,
            np.array([1]),
            np.array([[0]]),
            np.array([2]),
            rule=rule,
            masks=test.mask,
        ),
    )
