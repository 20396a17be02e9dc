"""The answer the report opens with, and the table ``qkvprobe run`` / ``evaluate`` / ``report`` print: per model ×
dataset × setting, the best token and rule, every choice statistically tied with it, and how that was decided.

"Tied" means the data cannot separate a choice from the best one:
- a paired test recorded by the study (``paired.json``): Wilcoxon signed-rank on the per-episode scores of the same
  few-shot episodes, or the exact McNemar test on the same test images' predictions (standard classification),
  with the p-values of one best choice's comparisons Holm-adjusted; tied when the adjusted p ≥ ``ALPHA``;
- where no paired test was recorded for a choice: overlapping 95 % intervals (few-shot rows have them);
- otherwise (standard segmentation: one dataset-level mIoU per choice, no interval) the choice is "not tested",
  unless its value equals the best's.

One function, :func:`answer_lines`, turns the answers into the rows both the HTML and the terminal show.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..tables import rank_key as rank_key
from ..tables import rule_order
from ..vocab import SETTINGS, objective_family
from .tables import GROUP, order_present, setting_label

#: Significance level of the tie decision (after the Holm adjustment).
ALPHA = 0.05
TIED, BELOW, UNTESTED = "tied", "below", "not tested"
#: Metric names as the answer table shows them.
METRIC_NAMES = {
    "accuracy": "accuracy",
    "miou": "mIoU",
    "fb_iou": "FB-IoU",
    "pixel_accuracy": "pixel accuracy",
}
#: How a comparison was decided → the words the tables use.
TEST_NAMES = {
    "wilcoxon": "Wilcoxon",
    "mcnemar": "McNemar",
    "intervals": "95 % intervals",
    "equal": "equal values",
}


@dataclass(frozen=True)
class Choice:
    """One measured choice of a table: token type at a position and block, under one rule."""

    token: str
    position: str
    rule: str
    block: int
    value: float
    ci95: float = math.nan
    converged: bool | None = None

    def key(self) -> tuple[str, str, str, int]:
        return (self.token, self.position, self.rule, self.block)

    def name(self, with_block: bool = False) -> str:
        """``"ffn·cls"`` (``"ffn·cls b3"`` where a table holds several blocks); ``†`` when the fit did not converge."""
        text = f"{self.token}·{self.position}" + (f" b{self.block}" if with_block else "")
        return text + ("†" if self.converged is False else "")


@dataclass(frozen=True)
class Comparison:
    """A choice against the best of its table: ``status`` TIED, BELOW or UNTESTED; ``test`` a key of
    ``TEST_NAMES`` (or ""); ``p`` the Holm-adjusted p-value of a paired test (NaN for the others)."""

    choice: Choice
    status: str
    test: str = ""
    p: float = math.nan


@dataclass
class Answer:
    """The answer for one model × dataset × setting (shots)."""

    model: str
    objective: str
    weights: str
    dataset: str
    task: str
    setting: str
    ways: int
    shots: int
    metric: str
    best: Choice
    others: list[Comparison] = field(default_factory=list)
    several_blocks: bool = False
    #: Paired units behind the tests: episodes (few-shot) or test images (McNemar); 0 when unknown.
    pairs: int = 0

    @property
    def family(self) -> str:
        return objective_family(self.objective)

    @property
    def slabel(self) -> str:
        return setting_label(self.setting, self.ways, self.shots)

    @property
    def tied(self) -> list[Comparison]:
        return [c for c in self.others if c.status == TIED]

    def status_of(self, key: tuple) -> str | None:
        """ "best", TIED, BELOW, UNTESTED for a choice key of this table; None when it is not in it."""
        if key == self.best.key():
            return "best"
        return next((c.status for c in self.others if c.choice.key() == key), None)

    def rule_bests(self) -> list[Comparison]:
        """The best choice of every other rule, each with its verdict against the overall best."""
        seen: dict[str, Comparison] = {}
        for c in self.others:  # sorted by value, best first
            if c.choice.rule != self.best.rule and c.choice.rule not in seen:
                seen[c.choice.rule] = c
        return [seen[r] for r in order_present(pd.Series(list(seen)), rule_order())]


def holm(pvalues: Iterable[float]) -> np.ndarray:
    """Holm–Bonferroni adjusted p-values (same order as given). Written here because scipy offers only the
    Benjamini–Hochberg adjustment (``false_discovery_control``), and statsmodels is no dependency for five lines."""
    p = np.asarray(list(pvalues), dtype=np.float64)
    m = len(p)
    if m == 0:
        return p
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return out


def _converged(row: Mapping) -> bool | None:
    """A row's ``converged`` flag, read defensively: False only for an explicit false; None where unknown."""
    value = row.get("converged", None)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        return False if text in ("false", "0", "no") else True if text in ("true", "1", "yes") else None
    return bool(value)


def _choice(row: Mapping) -> Choice:
    return Choice(
        str(row["token"]),
        str(row["position"]),
        str(row["rule"]),
        int(row["block"]),
        float(row["value"]),
        float(row["ci95"]) if row["ci95"] is not None else math.nan,
        _converged(row),
    )


def _side_key(side: Mapping) -> tuple:
    return (side.get("token"), side.get("position"), side.get("rule"), side.get("block"))


def _matches(side: Mapping, choice: Choice) -> bool:
    """Whether a paired test's side names ``choice`` (files written before tests recorded the block match any)."""
    token, position, rule, block = _side_key(side)
    return (token, position, rule) == choice.key()[:3] and (block is None or int(block) == choice.block)


def _tests_for(paired: list[dict], g: Mapping, best: Choice) -> list[dict]:
    return [
        t
        for t in paired
        if t.get("model") == g["model"]
        and t.get("dataset") == g["dataset"]
        and t.get("setting") == g["setting"]
        and int(t.get("shots", 0)) == int(g["shots"])
        and _matches(t.get("a", {}), best)
    ]


def _compare(best: Choice, others: list[Choice], tests: list[dict]) -> list[Comparison]:
    found: dict[tuple, dict] = {}
    for other in others:
        hit = next((t for t in tests if _matches(t.get("b", {}), other)), None)
        if hit is not None:
            found[other.key()] = hit
    adjusted = dict(zip(found, holm(float(t.get("p_value", math.nan)) for t in found.values()), strict=True))
    out = []
    for other in others:
        if other.key() in found:
            p = float(adjusted[other.key()])
            status = TIED if not p < ALPHA or other.value >= best.value else BELOW
            out.append(Comparison(other, status, str(found[other.key()].get("test", "")), p))
        elif other.value >= best.value:
            out.append(Comparison(other, TIED, "equal"))
        elif math.isfinite(best.ci95) and math.isfinite(other.ci95):
            overlap = other.value + other.ci95 >= best.value - best.ci95
            out.append(Comparison(other, TIED if overlap else BELOW, "intervals"))
        else:
            out.append(Comparison(other, UNTESTED))
    return out


def answers(
    main: pd.DataFrame, paired: list[dict] | None = None, weights: Mapping[str, str] | None = None
) -> list[Answer]:
    """One :class:`Answer` per model × dataset × setting (shots) of the primary-metric rows ``main``
    (:func:`qkvprobe.report.tables.main_rows`, single heads left out), in the table's order. ``paired`` are the
    study's paired tests (``paired.json``'s ``tests``); ``weights`` maps a model label to its weights' source
    (default: the rows' ``weights`` column)."""
    out: list[Answer] = []
    if main.empty:
        return out
    weights = dict(weights or {})
    # One order whatever the order of the rows (a study writes them sorted by key, evaluate as measured): models
    # and datasets as they first appear, the standard setting before the few-shot ones, fewer shots first.
    first = {c: {v: i for i, v in enumerate(dict.fromkeys(main[c]))} for c in ("model", "dataset")}
    groups = sorted(
        main.groupby(GROUP, sort=False),
        key=lambda item: (
            first["model"][item[0][0]],
            first["dataset"][item[0][2]],
            SETTINGS.index(item[0][4]) if item[0][4] in SETTINGS else len(SETTINGS),
            int(item[0][5]),
            int(item[0][6]),
        ),
    )
    for key, sub in groups:
        g = dict(zip(GROUP, key, strict=True))
        choices = sorted(
            (_choice(r) for r in sub.to_dict("records")),
            key=lambda c: rank_key(c.value, c.token, c.position, c.rule, c.block),
        )
        best, others = choices[0], choices[1:]
        tests = _tests_for(paired or [], g, best)
        pairs = max((int(t.get("num_pairs", 0) or 0) for t in tests), default=0)
        if not pairs and g["setting"] == "fewshot":
            pairs = int(sub["episodes"].max())
        model_weights = weights.get(g["model"]) or next(
            (str(w) for w in sub.get("weights", pd.Series(dtype=str)) if isinstance(w, str) and w), ""
        )
        out.append(
            Answer(
                model=str(g["model"]),
                objective=str(g["objective"]),
                weights=model_weights,
                dataset=str(g["dataset"]),
                task=str(g["task"]),
                setting=str(g["setting"]),
                ways=int(g["ways"]),
                shots=int(g["shots"]),
                metric=str(sub["metric"].iloc[0]),
                best=best,
                others=_compare(best, others, tests),
                several_blocks=sub["block"].nunique() > 1,
                pairs=pairs,
            )
        )
    return out


def weights_text(source: str, digest: str = "") -> str:
    """A model's weights as the answer table names them: the source, and the start of the weights' digest
    (``Backbone.weights_digest``, part of every feature store's key) where the source does not show it."""
    short = str(digest)[:12]
    if short and short not in source:
        return f"{source} · weights digest {short}" if source else f"weights digest {short}"
    return source


def weights_by_model(run_info: Mapping) -> dict[str, str]:
    """Model label → :func:`weights_text`, from ``run.json``'s ``models`` entries (empty for runs without them)."""
    return {
        str(m.get("label")): weights_text(
            str(m.get("weights_source") or ""), str(m.get("weights_digest") or "")
        )
        for m in run_info.get("models") or []
        if m.get("label")
    }


def _pct(c: Choice) -> str:
    text = f"{100 * c.value:.1f}"
    return text + (f" ± {100 * c.ci95:.1f}" if math.isfinite(c.ci95) else "")


#: Tied choices an answer line names before it counts the rest ("… and 21 more"): a table where everything
#: ties would otherwise list every token × position × rule.
MAX_TIES_NAMED = 8


def _grouped(comparisons: list[Comparison], with_block: bool) -> str:
    """``"q·cls, ffn·cls (hyperplane); q·cls (cosine)"``: the choices grouped by rule, the first
    ``MAX_TIES_NAMED`` of them (best first) named and the rest counted."""
    by_rule: dict[str, list[str]] = {}
    for c in comparisons[:MAX_TIES_NAMED]:
        by_rule.setdefault(c.choice.rule, []).append(c.choice.name(with_block))
    text = "; ".join(f"{', '.join(names)} ({rule})" for rule, names in by_rule.items())
    rest = len(comparisons) - MAX_TIES_NAMED
    return text + (f"; and {rest} more" if rest > 0 else "")


def _p_text(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.2g}" if p < 0.01 else f"p = {p:.2f}"


def _verdict(c: Comparison) -> str:
    if c.status == UNTESTED:
        return "not tested"
    name = TEST_NAMES.get(c.test, c.test)
    detail = f"{name}, {_p_text(c.p)}" if math.isfinite(c.p) else name
    return f"tied with the best ({detail})" if c.status == TIED else f"below the best ({detail})"


@dataclass(frozen=True)
class AnswerLine:
    """One row of the answer table: the best choice of a model × dataset × setting (``best=True``) or the best of
    another rule. ``verdict`` lists the ties (best rows) or says how the rule's best compares."""

    model: str
    weights: str
    family: str
    objective: str
    dataset: str
    task: str
    setting: str
    metric: str
    rule: str
    choice: str
    value: str
    verdict: str
    best: bool


def answer_lines(items: list[Answer]) -> list[AnswerLine]:
    """The rows of the answer table — the one source of the report's first table and of the terminal summary."""
    lines: list[AnswerLine] = []
    for a in items:
        common = {
            "model": a.model,
            "weights": a.weights,
            "family": a.family,
            "objective": a.objective,
            "dataset": a.dataset,
            "task": a.task,
            "setting": a.slabel,
            "metric": METRIC_NAMES.get(a.metric, a.metric),
        }
        tied = a.tied
        tested = [c for c in a.others if c.status != UNTESTED]
        if tied:
            how = ", ".join(dict.fromkeys(TEST_NAMES.get(c.test, c.test) for c in tied))
            verdict = f"tied: {_grouped(tied, a.several_blocks)} [{how}]"
        elif tested:
            how = ", ".join(dict.fromkeys(TEST_NAMES.get(c.test, c.test) for c in tested))
            verdict = f"no choice tied [{how}]"
        elif a.others:
            verdict = "ties not tested (one value per choice, no interval)"
        else:
            verdict = "the only choice measured"
        lines.append(
            AnswerLine(
                **common,
                rule=a.best.rule,
                choice=a.best.name(a.several_blocks),
                value=_pct(a.best),
                verdict=verdict,
                best=True,
            )
        )
        for c in a.rule_bests():
            lines.append(
                AnswerLine(
                    **common,
                    rule=c.choice.rule,
                    choice=c.choice.name(a.several_blocks),
                    value=_pct(c.choice),
                    verdict=_verdict(c),
                    best=False,
                )
            )
    return lines


#: The legend of the answer table (report and terminal).
ANSWER_LEGEND = (
    "best = the highest value of the model × dataset × setting; tied = not separable from it by a paired test on "
    f"the same episodes (Wilcoxon) or test images (exact McNemar), Holm-adjusted, α = {ALPHA}, or, where no "
    "paired test was recorded, by overlapping 95 % intervals; value ± 95 % CI over episodes; † = the hyperplane "
    "fit did not converge"
)
