"""Paired tests between the best choice of an evaluation and every other one (docs/science.md §5): Wilcoxon
signed-rank on the per-episode scores of the same few-shot episodes, the exact McNemar test on the same test
images' predictions (standard classification). The entries are what a run directory's ``paired.json`` holds and
what the answer table reads (``report.answer``), so every door ranks and tests the same way."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..tables import PRIMARY_METRIC, rank_key
from .evaluation import UnitKey
from .metrics import mcnemar, paired_test

#: Significance level of a single paired test's verdict (the answer table Holm-adjusts a best choice's tests).
ALPHA = 0.05


def _side(r: Any) -> dict[str, Any]:
    return {"token": r.token, "position": r.position, "rule": r.rule, "block": r.block, "value": r.value}


def paired_verdicts(
    rows: list[Any], evaluation: Any, test_labels: np.ndarray | None, top: int | None = None
) -> list[dict[str, Any]]:
    """Paired tests between the best primary-metric row of ``rows`` and every other (or the next ``top - 1``),
    from the evaluation's per-episode scores or test predictions; rows without paired data are left out."""
    per_episode = getattr(evaluation, "per_episode", {}) or {}
    predictions = getattr(evaluation, "predictions", {}) or {}
    ranked = sorted(
        (r for r in rows if r.metric == PRIMARY_METRIC.get(r.task)),
        key=lambda r: rank_key(r.value, r.token, r.position, r.rule, r.block),
    )
    out: list[dict[str, Any]] = []
    if len(ranked) < 2:
        return out

    def key(r: Any) -> UnitKey:
        return UnitKey(r.block, r.token, r.position, r.rule, r.shots, r.params)

    best = ranked[0]
    ka = key(best)
    for other in ranked[1:top]:  # top=None: every other choice
        kb = key(other)
        if ka in per_episode and kb in per_episode:
            res = paired_test(per_episode[ka], per_episode[kb])
        elif ka in predictions and kb in predictions and test_labels is not None:
            res = mcnemar(
                np.asarray(predictions[ka]) == test_labels, np.asarray(predictions[kb]) == test_labels
            )
        else:
            continue
        if res.pvalue < ALPHA:
            verdict = f"A better (p < {ALPHA})" if res.mean_difference > 0 else f"B better (p < {ALPHA})"
        else:
            verdict = "no significant difference"
        out.append(
            {
                "model": best.model,
                "dataset": best.dataset,
                "task": best.task,
                "setting": best.setting,
                "ways": best.ways,
                "shots": best.shots,
                "metric": best.metric,
                "a": _side(best),
                "b": _side(other),
                "test": res.test,
                "statistic": res.statistic,
                "p_value": res.pvalue,
                "num_pairs": res.num_pairs,
                "alpha": ALPHA,
                "verdict": verdict,
            }
        )
    return out
