"""Insights computed from the results, each about one model — or, where the sentence says so, a comparison between
models: how often each rule and token wins for a model, whether the models of one objective family agree and where
the families differ, how far the cosine rule trails the hyperplane, and the direction angles.

Values of unrelated models are never averaged together: a mean over models would blend checkpoints that answer
the question differently (and hide which one does what)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd

from .answer import Answer
from .tables import setting_label


def _counts(counter: Counter, template: str) -> str:
    """``Counter({"hyperplane": 4, "cosine": 2})``, ``"{} in {}"`` → ``"hyperplane in 4 and cosine in 2"``."""
    parts = [template.format(name, n) for name, n in counter.most_common()]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def insights(
    main: pd.DataFrame, directions: list[dict] | None = None, answers: list[Answer] | None = None
) -> list[str]:
    """Plain-text findings (the template escapes them). ``main`` holds the primary-metric rows, ``answers`` the
    answer table's entries (:func:`qkvprobe.report.answer.answers`) for the same rows."""
    out: list[str] = []
    if main.empty:
        return ["No results yet."]
    answers = answers or []
    df = main.assign(
        slabel=[
            setting_label(s, w, k)
            for s, w, k in zip(main["setting"], main["ways"], main["shots"], strict=True)
        ]
    )

    # 1. per model: which rules and tokens win its tables
    for model in dict.fromkeys(a.model for a in answers):
        mine = [a for a in answers if a.model == model]
        rules = Counter(a.best.rule for a in mine)
        tokens = Counter(f"{a.best.token}·{a.best.position}" for a in mine)
        out.append(
            f"{model}: of its {len(mine)} dataset × setting tables, the best rule is "
            f"{_counts(rules, '{} in {}')}; the best token {_counts(tokens, '{} in {}')}."
        )

    # 2. comparisons between models, explicitly: within an objective family, and between families (one line each
    # per dataset, a clause per setting)
    for dataset, by_setting in _by_dataset(answers).items():
        models = list(dict.fromkeys(a.model for group in by_setting.values() for a in group))
        if len(models) < 2:
            continue
        families = list(dict.fromkeys(a.family for group in by_setting.values() for a in group))
        for family in families:
            members = [
                m
                for m in models
                if any(a.model == m and a.family == family for g in by_setting.values() for a in g)
            ]
            if len(members) < 2:
                continue
            clauses = [
                _clause(slabel, {a.model: _short(a) for a in group if a.family == family})
                for slabel, group in by_setting.items()
            ]
            out.append(
                f"The {len(members)} {family} models ({', '.join(members)}) on {dataset}: {'; '.join(clauses)}."
            )
        if len(families) > 1:
            members = "; ".join(
                f"{family}: {', '.join(dict.fromkeys(a.model for g in by_setting.values() for a in g if a.family == family))}"
                for family in families
            )
            clauses = [
                _clause(
                    slabel,
                    {
                        family: " / ".join(dict.fromkeys(_short(a) for a in group if a.family == family))
                        for family in dict.fromkeys(a.family for a in group)
                    },
                )
                for slabel, group in by_setting.items()
            ]
            out.append(f"Objective families on {dataset} ({members}) — {'; '.join(clauses)}.")

    # 3. cosine vs hyperplane gap, per model × task
    if {"hyperplane", "cosine"} <= set(df["rule"]):
        for (model, task), sub in df.groupby(["model", "task"], sort=False):
            piv = sub.pivot_table(
                index=["dataset", "slabel", "token", "position", "block"], columns="rule", values="value"
            )
            if not {"hyperplane", "cosine"} <= set(piv.columns):
                continue
            piv = piv.dropna(subset=["hyperplane", "cosine"])
            if piv.empty:
                continue
            gap = float((piv["hyperplane"] - piv["cosine"]).mean())
            verb = "trails" if gap > 0 else "beats"
            out.append(
                f"{model} on {task}: the cosine rule {verb} the hyperplane by {100 * abs(gap):.1f} points "
                f"(mean over this model's {len(piv)} token × position × setting pairs)."
            )

    # 4. does the best token depend on the rule? per model × dataset
    for (model, dataset), sub in df.groupby(["model", "dataset"], sort=False):
        differs = []
        for slabel, cell in sub.groupby("slabel", sort=False):
            per_rule = {r: s.loc[s["value"].idxmax(), "token"] for r, s in cell.groupby("rule", sort=False)}
            if len(set(per_rule.values())) > 1:
                differs.append(f"{slabel}: " + ", ".join(f"{r} → {t}" for r, t in per_rule.items()))
        if differs:
            out.append(f"{model} · {dataset}: the best token depends on the rule ({'; '.join(differs)}).")

    # 5. ffn vs ffn_norm (our extra token), per model
    if {"ffn", "ffn_norm"} <= set(df["token"]):
        for model, sub in df.groupby("model", sort=False):
            piv = sub.pivot_table(
                index=["dataset", "slabel", "position", "rule", "block"], columns="token", values="value"
            )
            if not {"ffn", "ffn_norm"} <= set(piv.columns):
                continue
            piv = piv.dropna(subset=["ffn", "ffn_norm"])
            if piv.empty:
                continue
            wins = int((piv["ffn_norm"] > piv["ffn"]).sum())
            out.append(
                f"{model}: the final normalisation (ffn_norm vs ffn) helps in {wins} of {len(piv)} paired cells "
                f"(mean change {100 * float((piv['ffn_norm'] - piv['ffn']).mean()):+.1f} points)."
            )

    # 6. which direction? per model
    if directions:
        d = pd.DataFrame(
            [
                {"model": e["model"], "token": e["token"], "cos": float(np.mean(e["cosine"]))}
                for e in directions
            ]
        )
        for model, sub in d.groupby("model", sort=False):
            top = sub.loc[sub["cos"].idxmax()]
            out.append(
                f"{model}: the hyperplane normals w_c are closest to the class directions μ_c for token "
                f"{top['token']} (mean cosine {top['cos']:.2f})."
            )
    return out


def _short(a: Answer) -> str:
    return f"{a.best.token}·{a.best.position} {a.best.rule}"


def _clause(slabel: str, picks: dict[str, str]) -> str:
    """``"5-way 1-shot: all → q·cls hyperplane"`` or ``"standard: A → x, B → y"``."""
    if len(set(picks.values())) == 1:
        return f"{slabel}: all → {next(iter(picks.values()))}"
    return f"{slabel}: " + ", ".join(f"{who} → {what}" for who, what in picks.items())


def _by_dataset(answers: list[Answer]) -> dict[str, dict[str, list[Answer]]]:
    """Answers grouped by dataset, then setting (the tables several models share), in order."""
    out: dict[str, dict[str, list[Answer]]] = {}
    for a in answers:
        out.setdefault(a.dataset, {}).setdefault(a.slabel, []).append(a)
    return out
