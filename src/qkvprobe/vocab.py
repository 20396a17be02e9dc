"""Names shared by every stage: token types, positions, rules, tasks, settings and metrics (PAPER.md §2)."""

from __future__ import annotations

from typing import Literal

Token = Literal["q", "k", "v", "ffn", "ffn_norm"]
Position = Literal["cls", "avg", "patch"]
RuleName = Literal["hyperplane", "cosine"]
Task = Literal["classification", "segmentation"]
Setting = Literal["standard", "fewshot"]
Metric = Literal["accuracy", "miou", "fb_iou", "pixel_accuracy"]

TOKENS: tuple[str, ...] = ("q", "k", "v", "ffn", "ffn_norm")
#: The paper's grid; ``ffn_norm`` is our extra (off in the paper grid, on in the default study).
PAPER_TOKENS: tuple[str, ...] = ("q", "k", "v", "ffn")
POSITIONS: tuple[str, ...] = ("cls", "avg", "patch")
RULES: tuple[str, ...] = ("hyperplane", "cosine")
TASKS: tuple[str, ...] = ("classification", "segmentation")
SETTINGS: tuple[str, ...] = ("standard", "fewshot")
METRICS: tuple[str, ...] = ("accuracy", "miou", "fb_iou", "pixel_accuracy")

#: Label value ignored by segmentation training and scoring.
IGNORE_INDEX = 255
