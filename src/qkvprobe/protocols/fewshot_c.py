"""The few-shot hyperplane's C chosen on training-split episodes (``C="auto"``), an option beyond the paper (docs/science.md §5).

The paper fixes the few-shot C (``FEWSHOT_C``) because a 1-shot episode holds no validation data. The fixed C
is a choice that favours neither rule only by luck: on the Scenes, where background is most of every support
set, C = 1 leaves the hyperplane 10–15 mIoU points behind the cosine rule, and C = 0.01 closes the gap. With
``C="auto"`` the C is chosen the way few-shot work chooses hyper-parameters, on validation episodes that never
touch the evaluation split:

1. the training split's rows are halved at random (``seed``) into a support pool and a query pool;
2. ``FEWSHOT_VAL_EPISODES`` episodes of the evaluation's kind (same ways, shots, queries, sampler) are drawn
   with the support from the first pool and the queries from the second (seed ``seed + 1``);
3. every C of ``FEWSHOT_C_GRID`` is scored on them (mean accuracy / mIoU), and the best C (ties → the smaller
   C) is used on the evaluation episodes. It is chosen per shots × block × position × token, and the result
   row's ``C`` holds it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np

from ..errors import DataError, RuleError
from ..rules.checks import check_C
from ..tables import C_AUTO

#: ``C="auto"``: choose the few-shot C on training-split episodes (the results table's ``C_choice`` word too).
AUTO = C_AUTO
#: The few-shot C grid (ascending): the standard protocol's 1e-5…1e2 and one decade more. Its two ends are
#: the objective's two limits: as C → 0 the hyperplane turns to the (weighted) difference of the class means,
#: as C → ∞ to the max-margin separator of the support set. On the Scenes (built-in DINO model, 300 episodes)
#: the choices sat at those ends (1e-5…1e-2 with balanced class weights, 1e3 without), so a wider grid would
#: change little.
FEWSHOT_C_GRID: tuple[float, ...] = tuple(float(10.0**p) for p in range(-5, 4))
#: Validation episodes per shots (fewer when the evaluation itself asks for fewer episodes).
FEWSHOT_VAL_EPISODES = 300


def check_fewshot_C(C: float | str) -> float | str:
    """A positive finite C, or ``"auto"``."""
    if isinstance(C, str):
        if C.strip().lower() == AUTO:
            return AUTO
        try:
            C = float(C)
        except ValueError:
            raise RuleError(f"few-shot C must be a positive number or 'auto', got {C!r}") from None
    return check_C(C)


class _Episodes(Protocol):
    """What :func:`validation_episodes` rewrites of a sampler's episodes: row indices ``[E, ...]``."""

    support: np.ndarray
    query: np.ndarray


EpisodesT = TypeVar("EpisodesT", bound=_Episodes)


def split_pools(num_rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The training rows halved at random: (support pool, query pool), each sorted."""
    if num_rows < 2:
        raise DataError(f"choosing the few-shot C needs a training split of >= 2 rows, got {num_rows}")
    perm = np.random.default_rng(seed).permutation(num_rows)
    return np.sort(perm[: num_rows // 2]), np.sort(perm[num_rows // 2 :])


def validation_episodes(
    sample: Callable[..., EpisodesT],
    train_part: Callable[[np.ndarray], object],
    num_rows: int,
    *,
    episodes: int,
    seed: int,
    **kw: object,
) -> EpisodesT:
    """Validation episodes from the training split alone, with indices into the training rows.

    ``sample(pool_a, pool_b, episodes=, seed=, **kw)`` is the evaluation's sampler; ``train_part(rows)`` gives
    what it reads of those training rows (labels or pixel counts)."""
    a, b = split_pools(num_rows, seed)
    try:
        ep = sample(
            train_part(a), train_part(b), episodes=min(episodes, FEWSHOT_VAL_EPISODES), seed=seed + 1, **kw
        )
    except DataError as exc:
        raise DataError(
            f"choosing the few-shot C on training-split episodes (half the training rows are the "
            f"queries): {exc}; lower --queries (fewshot.queries) or --shots (fewshot.shots), or pass a fixed C "
            "instead"
        ) from None
    ep.support = a[ep.support]
    ep.query = b[ep.query]
    return ep


@dataclass(frozen=True)
class ChosenC:
    """The chosen C and the validation score of every C of the grid."""

    C: float
    scores: dict[float, float]


def choose_C(score: Callable[[float], float], Cs: Sequence[float] = FEWSHOT_C_GRID) -> ChosenC:
    """The C of ``Cs`` (ascending) with the best ``score(C)``; ties and NaN scores go to the smaller C."""
    if not Cs:
        raise RuleError("the few-shot C grid is empty")
    scores = {float(C): float(score(float(C))) for C in Cs}
    best = max(scores, key=lambda C: (scores[C] if math.isfinite(scores[C]) else -math.inf, -C))
    return ChosenC(best, scores)
