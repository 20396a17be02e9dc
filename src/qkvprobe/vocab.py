"""Names shared by every stage: token types, positions, tasks, settings and metrics (docs/science.md §2). The rules
are the rule table's (``qkvprobe.tables``)."""

from __future__ import annotations

import re
from typing import Literal

Token = Literal["q", "k", "v", "ffn", "ffn_norm"]
#: A token type extraction knows: ``Token`` or a rotary one (``ROPE_TOKENS``).
ExtractToken = Literal["q", "k", "v", "ffn", "ffn_norm", "q_rope", "k_rope"]
Position = Literal["cls", "avg", "patch"]
Task = Literal["classification", "segmentation"]
Setting = Literal["standard", "fewshot"]
Metric = Literal["accuracy", "miou", "fb_iou", "pixel_accuracy"]

TOKENS: tuple[str, ...] = ("q", "k", "v", "ffn", "ffn_norm")
#: The paper's grid; ``ffn_norm`` is our extra (off in the paper grid, on in the default study).
PAPER_TOKENS: tuple[str, ...] = ("q", "k", "v", "ffn")
#: Extra token types of rotary-embedding models (DINOv3, EVA-02): ``q``/``k`` after the rotary embedding, which
#: is what their attention uses; ``q``/``k`` themselves stay pre-rotary (docs/science.md §2). Not in ``TOKENS``:
#: a model without rotary embeddings has none, so no default asks for them.
ROPE_TOKENS: tuple[str, ...] = ("q_rope", "k_rope")
#: Every token type ``Backbone.extract`` knows: ``TOKENS`` plus ``ROPE_TOKENS``.
EXTRACT_TOKENS: tuple[str, ...] = TOKENS + ROPE_TOKENS
POSITIONS: tuple[str, ...] = ("cls", "avg", "patch")
TASKS: tuple[str, ...] = ("classification", "segmentation")
SETTINGS: tuple[str, ...] = ("standard", "fewshot")
METRICS: tuple[str, ...] = ("accuracy", "miou", "fb_iou", "pixel_accuracy")

#: Token types with attention heads: ``q``, ``k`` and ``v`` are the heads' vectors concatenated in head order, so
#: head ``h`` of a ``D``-wide token is its columns ``h·D/H … (h+1)·D/H - 1``.
HEAD_TOKENS: tuple[str, ...] = ("q", "k", "v")
_HEAD = re.compile(r"^(q|k|v)\.h(\d+)$")


def head_token(token: str, head: int) -> str:
    """The name of one head of an attention token type: ``head_token("q", 3) == "q.h3"``."""
    return f"{token}.h{head}"


def split_head(token: str) -> tuple[str, int | None]:
    """``"q.h3"`` → ``("q", 3)``; a whole token type → ``(token, None)``."""
    m = _HEAD.match(token)
    return (m.group(1), int(m.group(2))) if m else (token, None)


#: Label value ignored by segmentation training and scoring.
IGNORE_INDEX = 255

#: Pre-training objectives a backbone records (``Backbone.objective``): ``dino`` (DINO, DINOv2, DINOv3, iBOT,
#: MoCo v3: self-distillation / contrastive), ``msn`` (masked siamese networks), ``mae`` (masked autoencoders),
#: ``mim`` (other masked image modelling: BEiT, EVA-02, data2vec), ``jepa`` (I-JEPA), ``aim`` (AIMv2,
#: autoregressive), ``unknown``.
OBJECTIVES: tuple[str, ...] = ("dino", "msn", "mae", "mim", "jepa", "aim", "unknown")

#: Objective → the family the report groups by (docs/science.md §1): the paper's two families, and ``other``
#: for objectives that are neither.
OBJECTIVE_FAMILIES: dict[str, str] = {
    "dino": "joint-embedding",
    "msn": "joint-embedding",
    "mae": "masked-image-modelling",
    "mim": "masked-image-modelling",
    "jepa": "other",
    "aim": "other",
    "unknown": "other",
}


def objective_family(objective: str) -> str:
    """``"dino"`` → ``"joint-embedding"``, ``"mae"`` → ``"masked-image-modelling"``; unknown names → ``"other"``."""
    return OBJECTIVE_FAMILIES.get(str(objective), "other")
