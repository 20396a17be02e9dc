"""Results → report tables: grouping, the primary metric of each task, token × rule heatmap tables."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.colors import to_hex

from ..tables import BALANCED_RULE as BALANCED_RULE
from ..tables import PRIMARY_METRIC, rule_order
from ..vocab import HEAD_TOKENS, POSITIONS, TOKENS, split_head

GROUP = ["model", "objective", "dataset", "task", "setting", "ways", "shots"]


def setting_label(setting: str, ways: int, shots: int) -> str:
    return "standard" if setting == "standard" else f"{int(ways)}-way {int(shots)}-shot"


def label_rule_variants(df: pd.DataFrame) -> pd.DataFrame:
    """Show hyperplane variants as their own rules when the table mixes them: balanced fits beside plain ones
    (rule ``BALANCED_RULE``), and few-shot rows of one token fitted with different C choices (a fixed C beside
    ``auto`` or another fixed C: rule ``hyperplane·C=<choice>``).

    Every table, figure and summary of the report groups by ``rule``; without this, a token's variants would
    fall into one cell and one would hide the other. A table of one variant keeps the rule's name (the run table
    says which weighting and C it used). Standard rows always choose C (``C_choice`` "auto"), so only few-shot
    rows can mix C choices."""
    hyper = df["rule"] == "hyperplane"
    balanced = (
        hyper & (df["class_weight"] == "balanced") if df.loc[hyper, "class_weight"].nunique() > 1 else None
    )
    fewshot = hyper & (df["setting"] == "fewshot")
    mixed_C = "C_choice" in df and df.loc[fewshot, "C_choice"].nunique() > 1
    if balanced is None and not mixed_C:
        return df
    df = df.copy()
    if balanced is not None:
        df.loc[balanced, "rule"] = BALANCED_RULE
    if mixed_C:
        df.loc[fewshot, "rule"] = df.loc[fewshot, "rule"] + "·C=" + df.loc[fewshot, "C_choice"].astype(str)
    return df


def order_present(values: pd.Series, canon: tuple[str, ...]) -> list[str]:
    """The distinct ``values`` in ``canon``'s order, unknown ones after them in order of appearance."""
    present = list(dict.fromkeys(values))
    return [v for v in canon if v in present] + [v for v in present if v not in canon]


def main_rows(df: pd.DataFrame, run_info: dict) -> pd.DataFrame:
    """Rows of the main tables: the primary metric at each model's main block(s) (the rest is the block sweep).

    ``run.json``'s ``main_blocks`` names them; without it, the last block measured for a model is the main one."""
    if df.empty:
        return df
    df = df[df["metric"] == df["task"].map(PRIMARY_METRIC)]
    blocks = run_info.get("main_blocks") or {}
    keep = pd.Series(False, index=df.index)
    for model, sub in df.groupby("model"):
        wanted = blocks.get(model) or [int(sub["block"].max())]
        keep[sub.index] = sub["block"].isin(wanted)
    return df[keep]


@dataclass
class Cell:
    text: str
    style: str = ""
    best: bool = False
    tip: str = ""
    #: Statistically tied with the table's best (:mod:`qkvprobe.report.answer`): shaded like the best, marked ≈.
    tied: bool = False
    #: The hyperplane fit of this cell did not converge (a ``converged`` column that says False): marked †.
    unconverged: bool = False


@dataclass
class HeatTable:
    """A table coloured as a heatmap; ``best`` marks the highest cell."""

    title: str
    metric: str
    col_headers: list[str]
    rows: list[tuple[str, list[Cell]]] = field(default_factory=list)
    group: dict = field(default_factory=dict)


#: Colour span of the token × rule tables, as a fraction of the metric: the best cell (and every cell tied with it)
#: gets the darkest colour, a cell HEAT_SPAN or more below it the lightest. A fixed span anchored at the best keeps
#: a 0.3-point difference a 0.3-point shade, where a min-to-max scale would paint it as the whole range.
HEAT_SPAN = 0.20


def heat_style(value: float, lo: float, hi: float, cmap: str = "YlGn") -> str:
    """Inline CSS background for ``value`` on [lo, hi] (text turns white on dark cells)."""
    if not math.isfinite(value):
        return ""
    t = 0.5 if hi - lo < 1e-12 else (value - lo) / (hi - lo)
    rgba = colormaps[cmap](0.08 + 0.8 * t)
    luminance = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2]
    return f"background:{to_hex(rgba)};color:{'#fff' if luminance < 0.5 else '#111'}"


def anchored_style(value: float, best: float, span: float = HEAT_SPAN) -> str:
    """:func:`heat_style` on the fixed span [best − span, best] (values below it get the lightest colour)."""
    if not math.isfinite(value):
        return ""
    return heat_style(max(value, best - span), best - span, best)


def fmt(value: float, ci: float = math.nan, pct: bool = True) -> str:
    if not math.isfinite(value):
        return "–"
    s = f"{100 * value:.1f}" if pct else f"{value:.3f}"
    if math.isfinite(ci):
        s += f" ± {100 * ci:.1f}" if pct else f" ± {ci:.3f}"
    return s


def _is_false(value: object) -> bool:
    """A ``converged`` cell that says the fit did not converge (absent, empty or NaN: unknown, not False)."""
    if isinstance(value, str):
        return value.strip().lower() in ("false", "0", "no")
    return value is False or (isinstance(value, (bool, np.bool_)) and not value)


def heat_tables(main: pd.DataFrame, answers: list | None = None) -> list[HeatTable]:
    """One token × (position, rule) table per model × dataset × setting: the best cell marked ★, the cells
    statistically tied with it (``answers``, :func:`qkvprobe.report.answer.answers`) marked ≈ and shaded like it,
    the others shaded on ``HEAT_SPAN`` below the best; cells whose fit did not converge (an optional ``converged``
    column) marked †."""
    tables: list[HeatTable] = []
    if main.empty:
        return tables
    by_group = {(a.model, a.dataset, a.setting, a.shots): a for a in answers or []}
    for key, sub in main.groupby(GROUP, sort=False):
        g = dict(zip(GROUP, key, strict=True))
        answer = by_group.get((g["model"], g["dataset"], g["setting"], g["shots"]))
        positions = order_present(sub["position"], POSITIONS)
        rules = order_present(sub["rule"], rule_order())
        tokens = order_present(sub["token"], TOKENS)
        blocks = sorted(sub["block"].unique())
        cols = [(p, r) for p in positions for r in rules]
        best_value = float(sub["value"].max())
        table = HeatTable(
            title=f"{g['model']} · {g['dataset']} · {setting_label(g['setting'], g['ways'], g['shots'])}",
            metric=PRIMARY_METRIC.get(g["task"], sub["metric"].iloc[0]),
            col_headers=[f"{r} · {p}" if len(positions) > 1 else r for p, r in cols],
            group=g,
        )
        for b in blocks:
            for tok in tokens:
                cells = []
                for p, r in cols:
                    hit = sub[
                        (sub["block"] == b)
                        & (sub["token"] == tok)
                        & (sub["position"] == p)
                        & (sub["rule"] == r)
                    ]
                    if hit.empty:
                        cells.append(Cell("–"))
                        continue
                    v, ci = float(hit["value"].iloc[0]), float(hit["ci95"].iloc[0])
                    status = answer.status_of((tok, p, r, int(b))) if answer is not None else None
                    best = status == "best" if answer is not None else bool(np.isclose(v, best_value))
                    tied = status == "tied"
                    tip = f"C={hit['C'].iloc[0]:g}" if math.isfinite(float(hit["C"].iloc[0])) else ""
                    style = anchored_style(best_value if (best or tied) else v, best_value)
                    unconverged = "converged" in hit and _is_false(hit["converged"].iloc[0])
                    cells.append(Cell(fmt(v, ci), style, best, tip, tied, unconverged))
                label = tok if len(blocks) == 1 else f"{tok} (block {b})"
                table.rows.append((label, cells))
        tables.append(table)
    return tables


def best_choices(main: pd.DataFrame) -> pd.DataFrame:
    """Best token/position per model × dataset × task × setting × rule (for the terminal summary)."""
    if main.empty:
        return main
    idx = main.groupby([*GROUP, "rule"], sort=False)["value"].idxmax()
    best = main.loc[idx].copy()
    best["setting_label"] = [
        setting_label(s, w, k) for s, w, k in zip(best["setting"], best["ways"], best["shots"], strict=True)
    ]
    return best.reset_index(drop=True)


def sweep_grids(df: pd.DataFrame) -> list[dict]:
    """Block sweeps: per model × dataset × position with several blocks in the standard setting, a
    token × block grid of the best rule's score (and which rule it was)."""
    out: list[dict] = []
    if df.empty:
        return out
    std = df[(df["setting"] == "standard") & (df["metric"] == df["task"].map(PRIMARY_METRIC))]
    for (model, dataset, position), sub in std.groupby(["model", "dataset", "position"], sort=False):
        blocks = sorted(sub["block"].unique())
        if len(blocks) < 2:
            continue
        tokens = order_present(sub["token"], TOKENS)
        value = np.full((len(tokens), len(blocks)), np.nan)
        rule = np.full((len(tokens), len(blocks)), "", dtype=object)
        for (tok, b), cell in sub.groupby(["token", "block"]):
            i = cell["value"].idxmax()
            value[tokens.index(tok), blocks.index(b)] = cell.at[i, "value"]
            rule[tokens.index(tok), blocks.index(b)] = cell.at[i, "rule"]
        out.append(
            {
                "model": model,
                "dataset": dataset,
                "position": position,
                "metric": sub["metric"].iloc[0],
                "tokens": tokens,
                "blocks": [int(b) for b in blocks],
                "value": value,
                "rule": rule,
            }
        )
    return out


def is_head(tokens: pd.Series) -> pd.Series:
    """Which rows' tokens are single attention heads (``q.h3``)."""
    return tokens.map(lambda t: split_head(str(t))[1] is not None)


def head_grids(main: pd.DataFrame) -> list[dict]:
    """Per model × dataset × task × setting × position × rule with per-head rows: a token type (q, k, v) × head
    grid of the primary metric, and beside it the whole token type's value (``whole``, NaN when not measured)."""
    out: list[dict] = []
    heads = main[is_head(main["token"])]
    if heads.empty:
        return out
    parts = heads["token"].map(lambda t: split_head(str(t)))
    heads = heads.assign(base=parts.map(lambda p: p[0]), head=parts.map(lambda p: p[1]))
    keys = [*GROUP, "position", "rule"]
    whole_of = {
        (*key, token): float(v) for *key, token, v in main[[*keys, "token", "value"]].itertuples(index=False)
    }
    for key, sub in heads.groupby(keys, sort=False):
        g = dict(zip(keys, key, strict=True))
        bases = [t for t in HEAD_TOKENS if t in set(sub["base"])]
        value = np.full((len(bases), int(sub["head"].max()) + 1), np.nan)
        for row in sub.itertuples():
            value[bases.index(row.base), int(row.head)] = row.value
        whole = np.array([whole_of.get((*key, t), np.nan) for t in bases])
        out.append(
            {
                **g,
                "metric": PRIMARY_METRIC[g["task"]],
                "tokens": bases,
                "value": value,
                "whole": whole,
                "slabel": setting_label(g["setting"], g["ways"], g["shots"]),
            }
        )
    return out
