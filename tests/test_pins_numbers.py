"""Numbers that could be wrong without any other test failing (issue 27): each test states a documented behaviour,
checks it against an independent reference (hand computation, NumPy, the model's own forward), and first asserts
that the data tell the right behaviour from the plausible wrong one, so it cannot pass vacuously.

- a single episode's 95 % interval is undefined (NaN), not ± 0;
- the paired Wilcoxon test drops zero differences (episodes where both choices score the same) before ranking;
- a standard hyperplane row is "converged" only if every fit behind it — the C sweep's and the refit — is;
- few-shot segmentation's k-NN lets only the k nearest support patches vote;
- a Hugging Face ``--weights`` file keeps its own ``model.`` names (DINOv3) where they fit better than stripped;
- WebDataset ``?train_shards=`` feeds the train split and ``?test_shards=`` the test split.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import stats

from pins_fixtures import (
    GRID,
    IGNORE,
    INDEX_OFFSET,
    SIZE,
    blobs,
    fewshot_reference,
    seg_images,
    unit,
    upsample,
)
from qkvprobe.protocols import fewshot_segmentation, standard_classification
from qkvprobe.protocols.metrics import mean_ci95, paired_test


# -- episode statistics --------------------------------------------------------------------------------------
def test_single_episode_interval_is_undefined_not_zero() -> None:
    """One episode has no spread to estimate: its 95 % half-width is NaN (the report shows no interval), never
    0 (which would claim a perfectly certain value)."""
    mean, half = mean_ci95(np.array([0.7]))
    assert mean == 0.7
    assert math.isnan(half)
    _, two = mean_ci95(np.array([0.7, 0.9]))  # two episodes: defined, 1.96 · σ/√2 with σ = 0.1·√2
    assert two == pytest.approx(1.96 * 0.1, rel=1e-12)


def test_wilcoxon_drops_zero_differences_before_ranking() -> None:
    """Episodes where A and B score the same carry no sign: the signed-rank statistic and its p-value are those of
    the non-zero differences alone (scipy's zero_method="wilcox"), recomputed here by hand — ranks of |d| over the
    non-zero d, T = min(R+, R−), normal approximation with the tie correction (as scipy uses once zeros occur)."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, 30) / 5.0
    b = a.copy()
    b[:14] = rng.integers(0, 5, 14) / 5.0
    d = a - b
    nz = d[d != 0]
    assert (d == 0).sum() >= 10 and len(nz) >= 8  # many ties at zero: the rule matters here
    ranks = stats.rankdata(np.abs(nz))
    r_plus, r_minus = ranks[nz > 0].sum(), ranks[nz < 0].sum()
    T = min(r_plus, r_minus)
    n = len(nz)
    _, tie_counts = np.unique(np.abs(nz), return_counts=True)
    var = n * (n + 1) * (2 * n + 1) / 24 - (tie_counts**3 - tie_counts).sum() / 48
    p = 2 * stats.norm.sf(abs(T - n * (n + 1) / 4) / math.sqrt(var))
    # Ranking the zeros too (Pratt) gives another statistic: the data tell the two rules apart.
    assert stats.wilcoxon(a, b, zero_method="pratt").statistic != pytest.approx(T)
    res = paired_test(a, b)
    assert res.statistic == pytest.approx(T, abs=0)
    assert res.pvalue == pytest.approx(p, rel=1e-9)
    assert res.num_pairs == 30 and res.mean_difference == pytest.approx(d.mean(), rel=1e-12)


# -- converged flag of a standard row -----------------------------------------------------------------------
def test_standard_row_converged_counts_the_c_sweep() -> None:
    """The held-out C sweep's fits are part of the row: one of them stopping at max_iter makes the row
    unconverged even when the refit at the chosen C certifies. Separable blobs: every C scores 100 % held out, so
    the smallest C (1e-2, an easy, strongly convex fit) is chosen; C = 1e4 cannot certify in 8 iterations."""
    X, y = blobs(120, 0, dim=6, classes=3, spread=0.3)
    X = X.astype(np.float32)
    kw = dict(rule="hyperplane", max_iter=8, tol=1e-4, seed=0)
    alone = standard_classification([X], y, [X], y, Cs=[1e-2], **kw)[0]
    assert alone.C == 1e-2 and alone.converged  # the chosen C's sweep fit and its refit certify
    both = standard_classification([X], y, [X], y, Cs=[1e-2, 1e4], **kw)[0]
    assert both.C == 1e-2 and both.val_accuracy[1e4] == both.val_accuracy[1e-2] == 1.0
    assert both.converged is False


# -- k-NN in few-shot segmentation --------------------------------------------------------------------------
def _knn_fg_scores(X: np.ndarray, fg: np.ndarray, Q: np.ndarray, k: int, T: float) -> np.ndarray:
    """NumPy k-NN of one episode: the k support patches most cosine-similar to each query patch vote with weight
    exp(s/T); the score is the foreground share minus the background share ``[m]``."""
    sims = unit(Q) @ unit(X).T
    out = np.empty(len(Q))
    for i, s in enumerate(sims):
        top = np.argsort(-s, kind="stable")[:k]
        w = np.exp((s[top] - s[top].max()) / T)
        share_fg = w[fg[top]].sum() / w.sum()
        out[i] = share_fg - (1 - share_fg)
    return out


def test_fewshot_segmentation_knn_votes_with_k_nearest_only() -> None:
    """Per episode, each query patch takes the votes of its k nearest labelled support patches (k = 3, T = 0.5,
    a temperature at which far patches still weigh): per-episode foreground IoU equals a NumPy k-NN reference and
    differs from every labelled support patch voting."""
    train, test = seg_images(12, 3, noise=1.6), seg_images(8, 4, noise=1.6)
    rng = np.random.default_rng(0)
    classes = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    support = np.array(
        [rng.choice(np.flatnonzero((train.patch_labels == c).any(1)), 2, replace=False) for c in classes]
    )
    query = np.array([rng.choice(np.flatnonzero((test.patch_labels == c).any(1))) for c in classes])
    ep = SimpleNamespace(classes=classes, support=support, query=query)
    k, T = 3, 0.5

    def reference(kk: int) -> np.ndarray:
        preds = []
        for c, rows, q in zip(ep.classes, ep.support, ep.query, strict=True):
            X = train.feats[rows].reshape(-1, train.feats.shape[-1]).astype(np.float64)
            labels = train.patch_labels[rows].reshape(-1)
            keep = labels != IGNORE
            s = _knn_fg_scores(X[keep], labels[keep] == c, test.feats[q].astype(np.float64), kk, T)
            preds.append(upsample(s, SIZE) > 0)
        return fewshot_reference(preds, [test.masks[q] for q in ep.query], ep.classes).per_episode

    ref, everyone = reference(k), reference(10_000)
    assert np.abs(ref - everyone).max() > 0.05  # the data tell k nearest from all voting
    res = fewshot_segmentation(
        train.feats,
        train.patch_labels,
        test.feats,
        np.arange(len(test.feats)) + INDEX_OFFSET,
        GRID,
        ep.classes,
        ep.support,
        ep.query,
        rule="knn",
        masks=test.mask,
        k=k,
        T=T,
    )
    np.testing.assert_allclose(res.per_episode, ref, rtol=0, atol=1e-12)


# -- Hugging Face --weights prefixes -------------------------------------------------------------------------
def test_hf_dinov3_weights_keep_their_own_model_prefix(tmp_path: Path) -> None:
    """DINOv3's Hugging Face names start with ``model.`` (``model.layer.0…``), which is also its
    ``base_model_prefix``: a file of the model's own state dict loads as it is — stripping ``model.`` would leave
    keys the model does not have — and gives the source model's features."""
    from safetensors.torch import save_file
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    from qkvprobe import load_backbone
    from randomize import randomize_

    config = DINOv3ViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=16,
        patch_size=4,
        num_register_tokens=2,
    )
    DINOv3ViTModel(config).save_pretrained(tmp_path / "arch")
    source = randomize_(DINOv3ViTModel(config), seed=5).eval()
    state = source.state_dict()
    assert source.base_model_prefix == "model" and any(k.startswith("model.") for k in state)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "own.safetensors"))
    bb = load_backbone(f"hf:{tmp_path / 'arch'}", weights=tmp_path / "own.safetensors")
    assert "stripped" not in bb.weights_info
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = source(pixel_values=x).last_hidden_state
    torch.testing.assert_close(bb.extract(x, tokens=("ffn_norm",))["ffn_norm"], ref, atol=1e-5, rtol=0)


# -- WebDataset splits ---------------------------------------------------------------------------------------
def test_wds_train_and_test_shards_feed_their_own_split(tmp_path: Path) -> None:
    """``?train_shards=`` names the train split's tars and ``?test_shards=`` the test split's: here the train
    split is the first 15-sample tar and the test split the other two (25 samples), so a swap changes both the
    sizes and the images."""
    pytest.importorskip("webdataset")
    from PIL import Image

    from qkvprobe.data import open_dataset
    from streamdata import make_wds

    root = make_wds(tmp_path / "wds", "classification")
    spec = f"wds:{root}?train_shards=train-000000.tar&test_shards=train-{{000001..000002}}.tar"
    train, test = open_dataset(spec, "train"), open_dataset(spec, "test")
    assert (len(train), len(test)) == (15, 25)
    import tarfile

    def first_png(tar: Path) -> np.ndarray:
        with tarfile.open(tar) as tf:
            member = next(m for m in tf.getmembers() if m.name.endswith(".png"))  # the tar's order
            return np.asarray(Image.open(tf.extractfile(member)))  # type: ignore[arg-type]

    np.testing.assert_array_equal(train[0][0][0].numpy(), first_png(root / "train-000000.tar"))
    np.testing.assert_array_equal(test[0][0][0].numpy(), first_png(root / "train-000001.tar"))
