"""Few-shot episode samplers (docs/science.md §2), seeded with an explicit numpy Generator and exportable to JSON.

Classification (``N``-way ``K``-shot, ``Q`` queries): per episode draw ``N`` distinct classes uniformly from
the classes present; for each (in drawn order) ``K`` distinct support images from the training split and
``Q`` distinct query images from the evaluation split. Support/query are class-major; labels are the
class's position in the episode (0..N-1). Every class must have at least ``K`` training and ``Q``
evaluation images, else a DataError names the class and the counts — or, with ``leave_out=True`` (what the
evaluation pipeline passes, so every door follows one class policy), the class is left out of the episodes and
named in ``left_out``; then only fewer than ``N`` remaining classes are refused.

Segmentation (1-way ``K``-shot, PASCAL-5i style): a class ``c`` is *present* in an image when it covers at
least ``min_pixels`` pixels (default 64). Per episode draw ``c`` uniformly from the classes not excluded
(``exclude=(0,)`` drops background; pass ``()`` for ADE20K, where 0 is "wall"), ``K`` distinct training
images where ``c`` is present and one evaluation image where ``c`` is present; a class without them is refused,
or with ``leave_out=True`` left out and named in ``left_out``.

Generator: ``numpy.random.default_rng(seed)`` (PCG64, the same stream on every platform); draws use
``Generator.choice(..., replace=False)`` / ``Generator.integers`` in the order described.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import DataError

SAMPLER_VERSION = 1
DEFAULT_MIN_PIXELS = 64


def _arrays_to_json(kind: str, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> str:
    payload = {"kind": kind, "version": SAMPLER_VERSION, **meta, **{k: v.tolist() for k, v in arrays.items()}}
    return json.dumps(payload, separators=(",", ":"))


def _load_json(text: str, kind: str) -> dict[str, Any]:
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"episodes JSON is not valid JSON ({exc})") from None
    if not isinstance(payload, dict) or payload.get("kind") != kind:
        got = payload.get("kind") if isinstance(payload, dict) else type(payload).__name__
        raise DataError(f"episodes JSON holds kind {got!r}, expected {kind!r}")
    if payload.get("version") != SAMPLER_VERSION:
        raise DataError(
            f"episodes JSON has sampler version {payload.get('version')!r}, this qkvprobe reads {SAMPLER_VERSION}"
        )
    return payload


@dataclass(eq=False)  # numpy fields: compare with np.array_equal, not ==
class ClassificationEpisodes:
    """``E`` episodes of ``N``-way ``K``-shot: int64 ``classes [E, N]``, ``support``/``support_labels [E, N*K]``
    (indices into the training split, labels 0..N-1), ``query``/``query_labels [E, N*Q]`` (into the eval split)."""

    classes: np.ndarray
    support: np.ndarray
    support_labels: np.ndarray
    query: np.ndarray
    query_labels: np.ndarray
    ways: int
    shots: int
    queries: int
    seed: int
    #: Classes left out for too few images (``leave_out=True``), ascending.
    left_out: tuple[int, ...] = ()
    _arrays = ("classes", "support", "support_labels", "query", "query_labels")

    def __len__(self) -> int:
        return len(self.classes)

    def to_json(self) -> str:
        """A JSON string holding everything needed to re-evaluate exactly these episodes."""
        meta = {"ways": self.ways, "shots": self.shots, "queries": self.queries, "seed": self.seed}
        return _arrays_to_json("classification", meta, {k: getattr(self, k) for k in self._arrays})

    @classmethod
    def from_json(cls, text: str) -> ClassificationEpisodes:
        """Inverse of :meth:`to_json`."""
        p = _load_json(text, "classification")
        try:
            e, n, k, q = len(p["classes"]), int(p["ways"]), int(p["shots"]), int(p["queries"])
            arrays = {a: np.asarray(p[a], dtype=np.int64).reshape(e, -1) for a in cls._arrays}
        except (KeyError, ValueError, TypeError) as exc:
            raise DataError(f"classification episodes JSON is malformed ({exc!r})") from None
        for name, width in (
            ("classes", n),
            ("support", n * k),
            ("support_labels", n * k),
            ("query", n * q),
            ("query_labels", n * q),
        ):
            if arrays[name].shape != (e, width):
                raise DataError(
                    f"classification episodes JSON: {name} has shape {arrays[name].shape}, expected {(e, width)}"
                )
        return cls(**arrays, ways=n, shots=k, queries=q, seed=int(p["seed"]))


@dataclass(eq=False)  # numpy fields: compare with np.array_equal, not ==
class SegmentationEpisodes:
    """``E`` 1-way ``K``-shot episodes: int64 ``classes [E]``, ``support [E, K]`` (training indices), ``query [E]``."""

    classes: np.ndarray
    support: np.ndarray
    query: np.ndarray
    shots: int
    seed: int
    min_pixels: int
    exclude: tuple[int, ...] = field(default=(0,))
    #: Classes left out for too few images (``leave_out=True``), ascending.
    left_out: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self.classes)

    def to_json(self) -> str:
        """A JSON string holding everything needed to re-evaluate exactly these episodes."""
        meta = {
            "shots": self.shots,
            "seed": self.seed,
            "min_pixels": self.min_pixels,
            "exclude": list(self.exclude),
        }
        return _arrays_to_json(
            "segmentation", meta, {"classes": self.classes, "support": self.support, "query": self.query}
        )

    @classmethod
    def from_json(cls, text: str) -> SegmentationEpisodes:
        """Inverse of :meth:`to_json`."""
        p = _load_json(text, "segmentation")
        try:
            e, k = len(p["classes"]), int(p["shots"])
            out = cls(
                np.asarray(p["classes"], dtype=np.int64),
                np.asarray(p["support"], dtype=np.int64).reshape(e, k),
                np.asarray(p["query"], dtype=np.int64),
                k,
                int(p["seed"]),
                int(p["min_pixels"]),
                tuple(int(c) for c in p["exclude"]),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise DataError(f"segmentation episodes JSON is malformed ({exc!r})") from None
        if out.query.shape != (e,):
            raise DataError(f"segmentation episodes JSON: query has shape {out.query.shape}, expected {(e,)}")
        return out


def _check_counts(ways: int, shots: int, queries: int, episodes: int) -> None:
    for name, value, low in (
        ("ways", ways, 1),
        ("shots", shots, 1),
        ("queries", queries, 1),
        ("episodes", episodes, 0),
    ):
        if int(value) < low:
            raise DataError(f"{name} must be >= {low}, got {value}")


def sample_classification_episodes(
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    *,
    ways: int = 5,
    shots: int = 1,
    queries: int = 15,
    episodes: int = 2000,
    seed: int = 0,
    exclude: tuple[int, ...] = (),
    leave_out: bool = False,
) -> ClassificationEpisodes:
    """Sample ``episodes`` ``ways``-way ``shots``-shot episodes from train labels [Ntr] and eval labels [Nte];
    classes in ``exclude`` are never drawn; ``leave_out``: classes with too few images are left out (named in
    ``left_out``) instead of refused."""
    _check_counts(ways, shots, queries, episodes)
    train_labels, test_labels = (
        np.asarray(train_labels, dtype=np.int64),
        np.asarray(test_labels, dtype=np.int64),
    )
    classes = np.setdiff1d(np.union1d(np.unique(train_labels), np.unique(test_labels)), np.asarray(exclude))
    train_pool = {int(c): np.flatnonzero(train_labels == c) for c in classes}
    test_pool = {int(c): np.flatnonzero(test_labels == c) for c in classes}
    if len(classes) < ways:
        raise DataError(
            f"{ways}-way episodes need {ways} classes, the labels hold {len(classes)}; lower --ways (fewshot.ways)"
        )
    lacking = [c for c in classes.tolist() if len(train_pool[c]) < shots or len(test_pool[c]) < queries]
    if lacking and not leave_out:
        c = lacking[0]
        raise DataError(
            f"class {c} has {len(train_pool[c])} training and {len(test_pool[c])} evaluation images; "
            f"{shots}-shot episodes with {queries} queries need >= {shots} and >= {queries}"
        )
    classes = np.setdiff1d(classes, np.asarray(lacking, dtype=np.int64))
    if len(classes) < ways:
        raise DataError(
            f"{ways}-way episodes need {ways} classes, {len(classes)} remain once {len(lacking)} with too few "
            f"images are left out ({lacking}); lower --ways (fewshot.ways), --shots (fewshot.shots) or --queries "
            "(fewshot.queries), or add images"
        )
    rng = np.random.default_rng(seed)
    n_sup, n_qry = ways * shots, ways * queries
    out_classes = np.empty((episodes, ways), np.int64)
    support, query = np.empty((episodes, n_sup), np.int64), np.empty((episodes, n_qry), np.int64)
    for e in range(episodes):
        chosen = rng.choice(classes, ways, replace=False)
        out_classes[e] = chosen
        for j, c in enumerate(chosen.tolist()):
            support[e, j * shots : (j + 1) * shots] = rng.choice(train_pool[c], shots, replace=False)
            query[e, j * queries : (j + 1) * queries] = rng.choice(test_pool[c], queries, replace=False)
    support_labels = np.broadcast_to(np.repeat(np.arange(ways), shots), (episodes, n_sup)).copy()
    query_labels = np.broadcast_to(np.repeat(np.arange(ways), queries), (episodes, n_qry)).copy()
    return ClassificationEpisodes(
        out_classes,
        support,
        support_labels,
        query,
        query_labels,
        ways,
        shots,
        queries,
        int(seed),
        tuple(lacking),
    )


def sample_segmentation_episodes(
    train_pixel_counts: np.ndarray,
    test_pixel_counts: np.ndarray,
    *,
    shots: int = 1,
    episodes: int = 1000,
    seed: int = 0,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    exclude: tuple[int, ...] = (0,),
    leave_out: bool = False,
) -> SegmentationEpisodes:
    """Sample 1-way ``shots``-shot episodes from per-image class pixel counts [Ntr, C] and [Nte, C];
    ``leave_out``: classes present in too few images are left out (named in ``left_out``) instead of refused."""
    _check_counts(1, shots, 1, episodes)
    train, test = np.asarray(train_pixel_counts), np.asarray(test_pixel_counts)
    if train.ndim != 2 or test.ndim != 2 or train.shape[1] != test.shape[1]:
        raise DataError(f"pixel counts must be [N, C] with the same C, got {train.shape} and {test.shape}")
    classes = [c for c in range(train.shape[1]) if c not in set(exclude)]
    if not classes:
        raise DataError(f"no class left after exclude={tuple(exclude)} out of {train.shape[1]} classes")
    train_pool = {c: np.flatnonzero(train[:, c] >= min_pixels) for c in classes}
    test_pool = {c: np.flatnonzero(test[:, c] >= min_pixels) for c in classes}
    lacking = [c for c in classes if len(train_pool[c]) < shots or len(test_pool[c]) < 1]
    if lacking and not leave_out:
        c = lacking[0]
        raise DataError(
            f"class {c} is present (>= {min_pixels} pixels) in {len(train_pool[c])} training and "
            f"{len(test_pool[c])} evaluation images; {shots}-shot episodes need >= {shots} and >= 1: "
            f"lower --shots or add images of that class"
        )
    classes = [c for c in classes if c not in lacking]
    if not classes:
        raise DataError(
            f"no class is present (>= {min_pixels} pixels) in {shots} training and 1 evaluation image; lower "
            "--shots (fewshot.shots) or add images"
        )
    rng = np.random.default_rng(seed)
    out_classes = np.empty(episodes, np.int64)
    support, query = np.empty((episodes, shots), np.int64), np.empty(episodes, np.int64)
    for e in range(episodes):
        c = classes[int(rng.integers(len(classes)))]
        out_classes[e] = c
        support[e] = rng.choice(train_pool[c], shots, replace=False)
        query[e] = test_pool[c][int(rng.integers(len(test_pool[c])))]
    return SegmentationEpisodes(
        out_classes,
        support,
        query,
        int(shots),
        int(seed),
        int(min_pixels),
        tuple(int(c) for c in exclude),
        tuple(int(c) for c in lacking),
    )
