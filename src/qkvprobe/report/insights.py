"""Insights computed from the results: best token and rule per task × setting × objective, where the
pre-training objectives disagree, how far the cosine rule trails the hyperplane, and the direction angles."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .tables import setting_label


def _choice(row: pd.Series | dict) -> str:
    return f"{row['token']}·{row['position']} with the {row['rule']} rule"


def _pct(v: float) -> str:
    return f"{100 * v:.1f} %"


def insights(main: pd.DataFrame, directions: list[dict] | None = None) -> list[str]:
    """Plain-text findings (the template escapes them). ``main`` holds the primary-metric rows."""
    out: list[str] = []
    if main.empty:
        return ["No results yet."]
    df = main.assign(
        slabel=[
            setting_label(s, w, k)
            for s, w, k in zip(main["setting"], main["ways"], main["shots"], strict=True)
        ]
    )
    choice_cols = ["token", "position", "rule"]

    # 1. best per task × setting × objective (mean over that objective's models and datasets)
    best: dict[tuple, dict] = {}
    for (task, slabel, objective), sub in df.groupby(["task", "slabel", "objective"], sort=False):
        mean = sub.groupby(choice_cols)["value"].mean()
        (tok, pos, rule), value = mean.idxmax(), float(mean.max())
        best[(task, slabel, objective)] = {"token": tok, "position": pos, "rule": rule, "value": value}
        n_models = sub["model"].nunique()
        out.append(
            f"{task} · {slabel} · {objective}: best is {tok}·{pos} with the {rule} rule "
            f"({_pct(value)} {sub['metric'].iloc[0]}, mean over {n_models} model{'s' * (n_models > 1)})."
        )

    # 2. where objectives disagree
    for (task, slabel), sub in df.groupby(["task", "slabel"], sort=False):
        objectives = list(dict.fromkeys(sub["objective"]))
        if len(objectives) < 2:
            continue
        picks = {o: best[(task, slabel, o)] for o in objectives}
        if len({(p["token"], p["position"], p["rule"]) for p in picks.values()}) > 1:
            what = "; ".join(f"{o} → {_choice(p)}" for o, p in picks.items())
            out.append(f"Objectives disagree on {task} · {slabel}: {what}.")
        else:
            out.append(f"Objectives agree on {task} · {slabel}: {_choice(next(iter(picks.values())))}.")

    # 3. cosine vs hyperplane gap, per task × objective
    if {"hyperplane", "cosine"} <= set(df["rule"]):
        for (task, objective), sub in df.groupby(["task", "objective"], sort=False):
            piv = sub.pivot_table(
                index=["model", "dataset", "slabel", "token", "position", "block"],
                columns="rule",
                values="value",
            )
            piv = piv.dropna(subset=["hyperplane", "cosine"])
            if piv.empty:
                continue
            gap = float((piv["hyperplane"] - piv["cosine"]).mean())
            verb = "trails" if gap > 0 else "beats"
            out.append(
                f"On {objective} features the cosine rule {verb} the hyperplane by {100 * abs(gap):.1f} points "
                f"on {task} (mean over tokens, positions and settings)."
            )

    # 4. does the best token depend on the rule?
    for (task, slabel), sub in df.groupby(["task", "slabel"], sort=False):
        per_rule = {r: s.groupby("token")["value"].mean().idxmax() for r, s in sub.groupby("rule")}
        if len(set(per_rule.values())) > 1:
            what = ", ".join(f"{r}: {t}" for r, t in per_rule.items())
            out.append(f"On {task} · {slabel} the best token depends on the rule ({what}).")

    # 5. ffn vs ffn_norm (our extra token)
    if {"ffn", "ffn_norm"} <= set(df["token"]):
        piv = df.pivot_table(
            index=["model", "dataset", "slabel", "position", "rule", "block"], columns="token", values="value"
        )
        piv = piv.dropna(subset=["ffn", "ffn_norm"])
        if not piv.empty:
            wins = int((piv["ffn_norm"] > piv["ffn"]).sum())
            out.append(
                f"The final normalisation (ffn_norm vs ffn) helps in {wins} of {len(piv)} paired cells "
                f"(mean change {100 * float((piv['ffn_norm'] - piv['ffn']).mean()):+.1f} points)."
            )

    # 6. which direction?
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
