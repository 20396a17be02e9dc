"""Report figures (matplotlib, Agg): few-shot bars with 95 % CIs, block-sweep and head heatmaps, direction maps.

Bars and heatmaps are SVG (sharp at any zoom; text kept as text, which keeps the files small and lets the browser
draw it in its sans-serif font), direction maps — images by nature — PNG at ``MAP_DPI``. Each figure is saved under ``figures/`` and embedded in the HTML as a
base64 data URI, so the report is one self-contained file. Legends sit outside the plotted data, and heatmap colour
scales span at least ``HEAT_SPAN`` below the best value, so a small difference never fills the whole scale.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..io import write_bytes
from ..rundir import DirectionMap, slug
from ..tables import BALANCED_RULE, rule_colour, rule_order
from ..tables import rule_letter as table_letter
from ..vocab import POSITIONS, TOKENS
from .tables import HEAT_SPAN, order_present, setting_label

# User text (class names, model labels) must never be read as mathtext ("$" in a name would crash). A fixed SVG
# hash salt keeps the element ids, and so the files, the same from one rendering to the next; SVG text stays text
# (not paths): smaller files, written faster.
_RC = {
    "text.parse_math": False,
    "font.size": 8,
    "axes.titlesize": 9,
    "figure.dpi": 100,
    "svg.hashsalt": "qkvprobe",
    "svg.fonttype": "none",
}
#: Resolution of the raster figures (direction maps): sharp on high-density screens and in print.
MAP_DPI = 200


def rule_letter(rule: str) -> str:
    """A rule's letter in the heatmap cells; a hyperplane variant of a mixed table ("hyperplane·C=0.01",
    "hyperplane·balanced·C=auto") keeps its letter and adds what tells it apart ("H C=0.01", "Hb C=auto")."""
    base, _, variant = rule.partition("·C=")
    letter = table_letter(base)
    return f"{letter} C={variant}" if variant else letter


@dataclass
class Figure:
    name: str  # file name under figures/
    caption: str
    data_uri: str
    #: Display width in CSS pixels for a high-DPI PNG (its pixels at 100 per inch); None for SVG (own size).
    width: int | None = None


_MIME = {"svg": "image/svg+xml", "png": "image/png"}


def _save(fig: plt.Figure, figures_dir: Path, name: str, caption: str) -> Figure:
    """Write ``fig`` as ``figures_dir/name`` (SVG or PNG by the name's suffix) and return it as a data URI."""
    kind = name.rsplit(".", 1)[-1]
    buf = io.BytesIO()
    if kind == "svg":
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    else:
        fig.savefig(buf, format="png", bbox_inches="tight", dpi=MAP_DPI)
    plt.close(fig)
    data = buf.getvalue()
    write_bytes(figures_dir / name, data)
    # a PNG's width is bytes 16-19 of its IHDR chunk; shown at 100 px per inch, it keeps its size, sharper
    width = None if kind == "svg" else round(int.from_bytes(data[16:20], "big") * 100 / MAP_DPI)
    uri = f"data:{_MIME[kind]};base64," + base64.b64encode(data).decode("ascii")
    return Figure(name, caption, uri, width)


def _colour_range(values: np.ndarray) -> tuple[float, float]:
    """(vmin, vmax) of a heatmap: vmax the best value, vmin at least ``HEAT_SPAN`` below it."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    hi = float(finite.max())
    return min(float(finite.min()), hi - HEAT_SPAN), hi


def fewshot_bars(main: pd.DataFrame, figures_dir: Path) -> list[Figure]:
    """Per model × dataset: one panel per shot count, bars = token (· position) × rule, 95 % CI error bars."""
    out: list[Figure] = []
    few = main[main["setting"] == "fewshot"]
    with plt.rc_context(_RC):
        for (model, dataset), sub in few.groupby(["model", "dataset"], sort=False):
            shots = sorted(sub["shots"].unique())
            fig, axes = plt.subplots(
                1,
                len(shots),
                figsize=(max(4.0, 3.6 * len(shots)) + 1.4, 3.0),
                squeeze=False,
                sharey=True,
                layout="constrained",
            )
            for ax, k in zip(axes[0], shots, strict=True):
                cur = sub[sub["shots"] == k]
                positions = order_present(cur["position"], POSITIONS)
                xs = [(t, p) for p in positions for t in order_present(cur["token"], TOKENS)]
                rules = order_present(cur["rule"], rule_order())
                width = 0.8 / max(1, len(rules))
                for j, r in enumerate(rules):
                    vals, errs = [], []
                    for t, p in xs:
                        hit = cur[(cur["token"] == t) & (cur["position"] == p) & (cur["rule"] == r)]
                        vals.append(float(hit["value"].iloc[0]) if len(hit) else np.nan)
                        errs.append(float(np.nan_to_num(hit["ci95"].iloc[0])) if len(hit) else 0.0)
                    pos = np.arange(len(xs)) + (j - (len(rules) - 1) / 2) * width
                    ax.bar(pos, vals, width, yerr=errs, capsize=2, label=r, color=rule_colour(r))
                ax.set_xticks(np.arange(len(xs)))
                ax.set_xticklabels(
                    [t if len(positions) == 1 else f"{t}·{p}" for t, p in xs], rotation=45, ha="right"
                )
                ways = int(cur["ways"].iloc[0])
                ax.set_title(setting_label("fewshot", ways, k))
                ax.set_ylim(0, 1)
                ax.grid(axis="y", alpha=0.3)
            axes[0][0].set_ylabel(sub["metric"].iloc[0])
            # outside the axes: a legend inside would cover bars
            fig.legend(*axes[0][-1].get_legend_handles_labels(), loc="outside right upper", title="rule")
            fig.suptitle(f"{model} · {dataset}: few-shot (mean ± 95 % CI)")
            out.append(
                _save(
                    fig,
                    figures_dir,
                    slug("fewshot", model, dataset) + ".svg",
                    f"Few-shot {sub['metric'].iloc[0]} of {model} on {dataset}; error bars are 95 % CIs.",
                )
            )
    return out


def sweep_heatmap(grid: dict, figures_dir: Path) -> Figure:
    """Token × block heatmap of the best rule's score; each cell names the rule (the rule table's letters)."""
    value, tokens, blocks = grid["value"], grid["tokens"], grid["blocks"]
    with plt.rc_context(_RC):
        fig, ax = plt.subplots(figsize=(max(4.0, 0.55 * len(blocks) + 1.5), 0.45 * len(tokens) + 1.2))
        vmin, vmax = _colour_range(value)
        im = ax.imshow(value, cmap="viridis", aspect="auto", vmin=vmin, vmax=vmax)
        for i in range(len(tokens)):
            for j in range(len(blocks)):
                if np.isfinite(value[i, j]):
                    rule = rule_letter(str(grid["rule"][i, j]))
                    colour = "white" if value[i, j] < (vmin + vmax) / 2 else "black"
                    ax.text(
                        j,
                        i,
                        f"{100 * value[i, j]:.0f}{rule}",
                        ha="center",
                        va="center",
                        fontsize=6.5,
                        color=colour,
                    )
        ax.set_xticks(range(len(blocks)), [str(b) for b in blocks])
        ax.set_yticks(range(len(tokens)), tokens)
        ax.set_xlabel("block")
        fig.colorbar(im, ax=ax, fraction=0.04, label=grid["metric"])
        ax.set_title(
            f"{grid['model']} · {grid['dataset']} · {grid['position']}: best rule per token and block"
        )
    return _save(
        fig,
        figures_dir,
        slug("sweep", grid["model"], grid["dataset"], grid["position"]) + ".svg",
        f"Block sweep of {grid['model']} on {grid['dataset']} ({grid['position']}): the best rule's "
        f"{grid['metric']} (×100; H = hyperplane, "
        + ("Hb = balanced hyperplane, " if BALANCED_RULE in set(grid["rule"].ravel()) else "")
        + "C = cosine).",
    )


def head_heatmap(grid: dict, figures_dir: Path) -> Figure:
    """Token type × attention head heatmap of one rule's score, with the whole token type in the last column."""
    value, whole, tokens = grid["value"], grid["whole"], grid["tokens"]
    H = value.shape[1]
    table = np.concatenate([value, whole[:, None]], axis=1)
    with plt.rc_context(_RC):
        fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * (H + 1) + 1.5), 0.45 * len(tokens) + 1.3))
        vmin, vmax = _colour_range(table)
        im = ax.imshow(table, cmap="viridis", aspect="auto", vmin=vmin, vmax=vmax)
        ax.axvline(H - 0.5, color="white", linewidth=2)
        for i in range(len(tokens)):
            best = int(np.nanargmax(value[i])) if np.isfinite(value[i]).any() else -1
            for j in range(H + 1):
                if np.isfinite(table[i, j]):
                    colour = "white" if table[i, j] < (vmin + vmax) / 2 else "black"
                    mark = "*" if j == best else ""
                    ax.text(
                        j,
                        i,
                        f"{100 * table[i, j]:.0f}{mark}",
                        ha="center",
                        va="center",
                        fontsize=6.5,
                        color=colour,
                    )
        ax.set_xticks(range(H + 1), [str(h) for h in range(H)] + ["all"])
        ax.set_yticks(range(len(tokens)), tokens)
        ax.set_xlabel("attention head (all = the whole token type)")
        fig.colorbar(im, ax=ax, fraction=0.04, label=grid["metric"])
        ax.set_title(
            f"{grid['model']} · {grid['dataset']} · {grid['slabel']} · {grid['position']} · {grid['rule']}"
        )
    name = (
        slug("heads", grid["model"], grid["dataset"], grid["slabel"], grid["position"], grid["rule"]) + ".svg"
    )
    return _save(
        fig,
        figures_dir,
        name,
        f"Attention heads of {grid['model']} on {grid['dataset']} ({grid['slabel']}, {grid['position']}, "
        f"{grid['rule']} rule): {grid['metric']} ×100 of each head's D/H columns of q, k and v alone; * = the "
        "best head of the token type; the last column is the whole token type.",
    )


def _upsample(cos: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest upsampling of a [h, w] patch grid to [H, W] (each patch drawn as a block)."""
    h, w = cos.shape
    rows = (np.arange(size[0]) * h // size[0]).clip(0, h - 1)
    cols = (np.arange(size[1]) * w // size[1]).clip(0, w - 1)
    return cos[np.ix_(rows, cols)]


def direction_maps(maps: list[DirectionMap], figures_dir: Path, max_classes: int = 4) -> list[Figure]:
    """Per model × dataset × image: rows = token types, columns = the image and the classes it contains
    (largest first); each panel shows cos(μ_c, patch token) over the image."""
    out: list[Figure] = []
    groups: dict[tuple, list[DirectionMap]] = {}
    for m in maps:
        groups.setdefault((m.meta.get("model", "?"), m.meta.get("dataset", "?")), []).append(m)
    with plt.rc_context(_RC):
        for (model, dataset), items in groups.items():
            items.sort(
                key=lambda m: TOKENS.index(m.meta.get("token")) if m.meta.get("token") in TOKENS else 99
            )
            ref = items[0]
            for n in range(ref.images.shape[0]):
                img, mask = ref.images[n], ref.masks[n]
                labels, counts = np.unique(mask[(mask != 255)], return_counts=True)
                present = [
                    int(c)
                    for c, _ in sorted(zip(labels, counts, strict=True), key=lambda t: -t[1])
                    if c != 0 or len(labels) == 1
                ]
                shown = present[:max_classes] or [0]
                fig, axes = plt.subplots(
                    len(items),
                    1 + len(shown),
                    figsize=(1.6 * (1 + len(shown)), 1.6 * len(items)),
                    squeeze=False,
                )
                for r, m in enumerate(items):
                    # per-token colour range: raw cosines share a large common component, so a fixed ±1 scale
                    # would paint every patch the same; the range is printed on the row label instead
                    vals = m.cosine[n][shown]
                    lo, hi = (
                        (float(np.nanmin(vals)), float(np.nanmax(vals)))
                        if np.isfinite(vals).any()
                        else (0.0, 1.0)
                    )
                    axes[r][0].imshow(img, cmap="gray" if img.ndim == 2 else None)
                    axes[r][0].set_ylabel(f"{m.meta.get('token', '?')}\n{lo:.2f}…{hi:.2f}", fontsize=8)
                    for c, cls in enumerate(shown, start=1):
                        ax = axes[r][c]
                        ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
                        ax.imshow(
                            _upsample(m.cosine[n, cls], img.shape[:2]),
                            cmap="inferno",
                            vmin=lo,
                            vmax=hi + 1e-9,
                            alpha=0.65,
                        )
                        if r == 0:
                            ax.set_title(m.classes[cls] if cls < len(m.classes) else str(cls), fontsize=8)
                    for ax in axes[r]:
                        ax.set_xticks([])
                        ax.set_yticks([])
                axes[0][0].set_title("image", fontsize=8)
                fig.suptitle(f"{model} · {dataset} · image {n}: cos(class direction, patch token)")
                out.append(
                    _save(
                        fig,
                        figures_dir,
                        slug("map", model, dataset, n) + ".png",
                        f"Direction maps of {model} on {dataset}, image {n}: cos(μ_c, patch token) per class "
                        "(columns) and token type (rows); bright = along the class direction. Each row has its "
                        "own colour range (printed under the token name).",
                    )
                )
    return out
