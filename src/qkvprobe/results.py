"""The results table (``results.csv``): one row per measurement, long format (docs/CONTRACTS.md).

Columns added after the first release (``class_weight``, ``C_choice``, ``params``, ``converged``,
``allowed_mismatch``, ``weights``, ``left_out``) are filled in when an older table is read, so tables written by earlier
versions stay readable and mergeable.

Rows are appended atomically (the whole file is rewritten to a temporary name and renamed), and a row whose
key columns equal an existing row's replaces it, so a resumed run never duplicates measurements.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .errors import QkvprobeError
from .io import atomic_open
from .tables import C_AUTO, solver_rules

COLUMNS: tuple[str, ...] = (
    "model",
    "objective",
    "dataset",
    "task",
    "setting",
    "block",
    "token",
    "position",
    "rule",
    "ways",
    "shots",
    "episodes",
    "metric",
    "value",
    "ci95",
    "seed",
    "C",
    "class_weight",
    "C_choice",
    "params",
    "converged",
    "allowed_mismatch",
    "weights",
    "left_out",
)
#: The hyperplane rule's class weighting ("none" = the paper's plain fit, "balanced" = scikit-learn's
#: n / (K·n_class)); "" for the cosine rule, which has no weights. A key column: plain and balanced fits of the
#: same token are different measurements and live side by side in one table.
CLASS_WEIGHTS: tuple[str, ...] = ("none", "balanced", "")
#: How a hyperplane row's C was set, a key column: "auto" where the protocol chose it (the standard setting's
#: held-out sweep, few-shot ``C="auto"``), the fixed value as text ("1", "0.01") where the caller set it, "" for
#: the cosine rule. The C column holds the C used. A fixed-C and an auto few-shot run of one token are different
#: measurements and live side by side in one table.
#: Whether every hyperplane fit behind a row reached its certified optimum (``rules.logistic``): "true" or
#: "false" ("" for the cosine rule, and for rows of tables written before the column existed). An outcome column.
CONVERGED: tuple[str, ...] = ("true", "false", "")
#: A rule's own parameters other than C, as ``name=value`` pairs (the k-NN rule's ``k=20,T=0.07``; "" for rules
#: without any), a key column: two k of one token are different measurements.
#: ``allowed_mismatch``: the store fields an evaluation was told to let differ between its train and test stores
#: (``--allow-mismatch``), comma-separated; "" normally. An outcome column.
#: ``weights``: where the model's weights came from (``Backbone.weights_source``: a hub tag, a built-in file, or a
#: local file with the start of its sha256), so a row never passes a local checkpoint off as the hub's; "" where
#: not recorded. An outcome column: the model label names the run (a model loaded with local weights gets a label
#: that says so), and a label measured again replaces its rows.
#: ``left_out``: few-shot classes the episodes left out because the splits hold too few images of them (class
#: names joined by ";"; "" normally): every door leaves them out and says so (docs/CONTRACTS.md). An outcome column.
OUTCOME_COLUMNS: tuple[str, ...] = (
    "value",
    "ci95",
    "C",
    "converged",
    "allowed_mismatch",
    "weights",
    "left_out",
)
#: Columns that identify a measurement; the rest are its outcome.
KEY_COLUMNS: tuple[str, ...] = tuple(c for c in COLUMNS if c not in OUTCOME_COLUMNS)


@dataclass(frozen=True)
class ResultRow:
    """One measurement. ``value``/``ci95`` are fractions in [0, 1]; ``ways``/``shots``/``episodes`` are 0 in
    the standard setting; ``ci95`` is NaN where no interval exists; ``C`` is NaN and ``class_weight`` and
    ``C_choice`` are "" for the cosine rule. A hyperplane row's ``C_choice`` defaults to "auto" in the standard
    setting and to its C as text in the few-shot one (see ``C_AUTO``). ``weights`` names the weights' source
    (the comment above ``KEY_COLUMNS``)."""

    model: str
    objective: str
    dataset: str
    task: str
    setting: str
    block: int
    token: str
    position: str
    rule: str
    ways: int
    shots: int
    episodes: int
    metric: str
    value: float
    ci95: float = math.nan
    seed: int = 0
    C: float = math.nan
    class_weight: str = ""
    C_choice: str = ""
    params: str = ""
    converged: str = ""
    allowed_mismatch: str = ""
    weights: str = ""
    left_out: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.converged, bool) or self.converged is None:
            text = "" if self.converged is None else str(self.converged).lower()
            object.__setattr__(self, "converged", text)  # frozen: True/False/None given as such
        if self.converged not in CONVERGED:
            raise QkvprobeError(f"result converged {self.converged!r} is not one of {list(CONVERGED)}")
        if self.class_weight not in CLASS_WEIGHTS:
            raise QkvprobeError(
                f"result class_weight {self.class_weight!r} is not one of {list(CLASS_WEIGHTS)}"
            )
        solved = self.rule in solver_rules()  # the rule table: rules with a solver and a C
        if solved and not self.class_weight:
            object.__setattr__(self, "class_weight", "none")  # frozen: the default of a solver rule's row
        elif not solved and self.class_weight:
            raise QkvprobeError(
                f"result class_weight {self.class_weight!r} given for rule {self.rule!r}; only rules with a "
                "solver are weighted"
            )
        if solved and not self.C_choice:
            chosen = self.setting == "standard" or math.isnan(self.C)
            object.__setattr__(self, "C_choice", C_AUTO if chosen else fixed_C_text(self.C))
        elif not solved and self.C_choice:
            raise QkvprobeError(
                f"result C_choice {self.C_choice!r} given for rule {self.rule!r}; only rules with a solver "
                "have a C"
            )
        if not (0.0 <= self.value <= 1.0):
            raise QkvprobeError(f"result value {self.value!r} for metric {self.metric!r} is outside [0, 1]")

    def key(self) -> tuple:
        return tuple(getattr(self, c) for c in KEY_COLUMNS)


def fixed_C_text(C: float) -> str:
    """A fixed C as the ``C_choice`` key text: ``1.0`` → "1", ``0.01`` → "0.01"."""
    return f"{float(C):g}"


_TYPES = {f.name: f.type for f in fields(ResultRow)}
#: Columns newer than the first tables, and the value an older row gets ("" → a hyperplane row's "none": its
#: fits were plain; and its C_choice default: "auto" in the standard setting, the recorded C in the few-shot one;
#: weights "": not recorded).
_ADDED: dict[str, object] = {
    "class_weight": "",
    "C_choice": "",
    "params": "",
    "converged": "",
    "allowed_mismatch": "",
    "weights": "",
    "left_out": "",
}


def _parse(name: str, text: str) -> object:
    kind = _TYPES[name]
    if kind == "int":
        return int(text)
    if kind == "float":
        return float(text) if text != "" else math.nan
    return text


def read_results(path: str | os.PathLike) -> list[ResultRow]:
    """Read ``results.csv``; a missing file is an empty table."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        present = set(reader.fieldnames or [])
        missing = [c for c in COLUMNS if c not in present and c not in _ADDED]
        if missing:
            raise QkvprobeError(f"{path}: not a qkvprobe results table, columns {missing} are missing")
        fill = {c: v for c, v in _ADDED.items() if c not in present}
        return [
            ResultRow(**{c: _parse(c, rec[c]) for c in COLUMNS if c not in fill}, **fill) for rec in reader
        ]


def write_results(
    path: str | os.PathLike, rows: Iterable[ResultRow], *, sort: bool = False
) -> list[ResultRow]:
    """Merge ``rows`` into the table at ``path`` (new rows replace old ones with the same key), atomically;
    ``sort``: the whole table in key order (the study's results.csv), else old rows first, then new ones.

    Returns the merged table."""
    path = Path(path)
    merged = {r.key(): r for r in read_results(path)}
    for r in rows:
        merged[r.key()] = r
    table = [merged[k] for k in sorted(merged)] if sort else list(merged.values())
    with atomic_open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        for r in table:
            rec = asdict(r)
            writer.writerow(
                {k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in rec.items()}
            )
    return table
