"""Side files of a run: "which direction?" angles between w_c and μ_c, and direction maps over images.

The angles come from the class vectors the standard protocol fitted (saved by the evaluate unit in
``fits/<model>__<dataset>.npz``); only when those are missing (a run without one of the two rules, or a run
directory from an older version) are the two rules refit on a seeded subsample of the standard training
features of the main block. Direction maps fit the cosine rule on such a subsample. The report only reads
the outputs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ..data.base import Dataset
from ..features import FeatureStore
from ..io import atomic_path
from ..vocab import IGNORE_INDEX


def sample_rows(store: FeatureStore, max_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (patches flattened, ignore label dropped) of a seeded subsample of at most ``max_samples``
    training samples, and their labels."""
    labels = store.patch_labels().reshape(-1) if store.task == "segmentation" else store.labels()
    keep = np.flatnonzero(labels != IGNORE_INDEX)
    if len(keep) > max_samples:
        keep = np.sort(np.random.default_rng(seed).choice(keep, max_samples, replace=False))
    return keep, labels[keep]


def training_features(
    store: FeatureStore, token: str, position: str, block: int, keep: np.ndarray
) -> np.ndarray:
    """``[n, D]`` float32 features of the rows ``keep`` (:func:`sample_rows`)."""
    if store.task == "segmentation":
        feats = store.get(token, "patch", block)
        return np.asarray(feats.reshape(-1, feats.shape[-1])[keep], dtype=np.float32)
    return np.asarray(store.get(token, position, block)[keep], dtype=np.float32)


#: L-BFGS iterations of the direction fits: an angle needs far less precision than a reported accuracy, and
#: nearly separable patch sets (rare classes, weak penalty) otherwise run to the solver's default cap.
DIRECTION_MAX_ITER = 100


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)


def direction_cosines(
    X: np.ndarray, y: np.ndarray, Cs: list[float], device: str = "cpu", class_weight: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per feature set g and class c: cos(w_c, μ_c) between the hyperplane normal and the cosine rule's class
    direction. ``X [G, n, D]`` (G token types on the same samples), ``y [n]``, ``Cs [G]``, ``class_weight`` of
    the hyperplane fit (None or "balanced", as the study's protocols).

    Returns ``(classes [K], cosine [G, K])``. All G problems are solved as one batched L-BFGS. For two
    classes the single logistic normal w is class 1's and -w class 0's (the softmax-equivalent form)."""
    import torch

    from ..rules.cosine import cosine_directions
    from ..rules.logistic import balanced_sample_weight, default_dtype, fit_logistic

    classes, codes = np.unique(y, return_inverse=True)
    G, K = X.shape[0], len(classes)
    dt = default_dtype(device)
    Xt = torch.as_tensor(X).to(device, dt)
    yt = torch.as_tensor(codes.astype(np.int64), device=device).expand(G, -1).contiguous()
    sw = (
        balanced_sample_weight(yt, torch.ones(yt.shape, dtype=dt, device=device), K)
        if class_weight == "balanced"
        else None
    )
    fit = fit_logistic(
        Xt, yt, K, torch.as_tensor(Cs, dtype=dt, device=device), sample_weight=sw, max_iter=DIRECTION_MAX_ITER
    )
    W = fit.coef.cpu().numpy()
    if W.shape[1] == 1:
        W = np.concatenate([-W, W], axis=1)
    mu = cosine_directions(Xt, yt, K).cpu().numpy()
    return classes, np.sum(_unit(W) * _unit(mu), axis=-1)


def save_fits(path: Path, weights: dict[Any, np.ndarray], classes: np.ndarray) -> None:
    """Save the standard protocol's class vectors (``Evaluation.weights``, keyed by ``UnitKey``) and their class
    labels to one ``.npz`` (array names ``token|position|rule|block``), atomically."""
    arrays = {f"{k.token}|{k.position}|{k.rule}|{k.block}": w for k, w in weights.items()}
    with atomic_path(path) as tmp:
        np.savez(tmp, __classes__=np.asarray(classes), **arrays)


def fitted_direction_cosines(
    path: Path, tokens: list[str], position: str, block: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """cos(w_c, μ_c) per token from a :func:`save_fits` file → ``(classes [K'], cosine [G, K'])``, over the
    classes that had training samples; ``None`` when the file or one of the needed fits is missing."""
    if not path.is_file():
        return None
    with np.load(path) as saved:
        keys = [(f"{t}|{position}|hyperplane|{block}", f"{t}|{position}|cosine|{block}") for t in tokens]
        if any(h not in saved or c not in saved for h, c in keys):
            return None
        W = np.stack([saved[h] for h, _ in keys])  # [G, K, D]
        mu = np.stack([saved[c] for _, c in keys])
        classes = saved["__classes__"]
    present = np.linalg.norm(mu, axis=-1).min(0) > 0  # a class without training samples has no direction
    return classes[present], np.sum(_unit(W) * _unit(mu), axis=-1)[:, present]


def class_direction_map(
    train: FeatureStore,
    test: FeatureStore,
    token: str,
    block: int,
    num_images: int,
    max_samples: int,
    seed: int,
) -> np.ndarray:
    """cos(μ_c, patch token) for the first ``num_images`` test images: ``[n, C, h, w]`` over all C classes
    of the dataset (NaN for classes without training patches)."""
    from ..rules import CosineRule

    keep, y = sample_rows(train, max_samples, seed)
    rule = CosineRule().fit(training_features(train, token, "patch", block, keep), y)
    h, w = test.grid
    feats = np.asarray(test.get(token, "patch", block)[:num_images], dtype=np.float32)  # [n, h*w, D]
    n = feats.shape[0]
    cos = _unit(feats.reshape(-1, feats.shape[-1])) @ _unit(rule.directions_).T  # [n*h*w, K]
    full = np.full((n, len(test.classes), h * w), np.nan, dtype=np.float32)
    full[:, rule.classes_.astype(int), :] = cos.reshape(n, h * w, -1).transpose(0, 2, 1)
    return full.reshape(n, len(test.classes), h, w)


def map_images(dataset: Dataset, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raw images ``[n, H, W]`` (grey) or ``[n, H, W, 3]`` uint8 and masks ``[n, H, W]`` for the maps."""
    images, masks = [], []
    for i in indices:
        image, target = dataset[int(i)]
        img = np.asarray(image)
        images.append(img[0] if img.shape[0] == 1 else img[:3].transpose(1, 2, 0))
        masks.append(np.asarray(target, dtype=np.int64))
    return np.stack(images), np.stack(masks)


def lookup_C(rows: list[Any], model: str, dataset: str, token: str, position: str, block: int) -> float:
    """The C the standard protocol chose for this token (1.0 when it is not known)."""
    for r in rows:
        if (r.model, r.dataset, r.setting, r.token, r.position, r.rule, r.block) == (
            model,
            dataset,
            "standard",
            token,
            position,
            "hyperplane",
            block,
        ) and math.isfinite(r.C):
            return float(r.C)
    return 1.0
