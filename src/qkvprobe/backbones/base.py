"""The backbone contract every loader (timm, Hugging Face, builtin, local file) returns (docs/CONTRACTS.md)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch

from ..vocab import ROPE_TOKENS, TOKENS


class Backbone(ABC):
    """A frozen, head-less ViT whose last-block (or any block's) tokens can be tapped in one forward pass.

    Attributes (all set by the loader):
        spec: the spec string it was loaded from, e.g. ``"timm:vit_small_patch16_224.dino"``.
        objective: the pre-training objective (``vocab.OBJECTIVES``: ``dino``, ``msn``, ``mae``, ``mim``,
            ``jepa``, ``aim`` or ``unknown``).
        family: the architecture family whose tap description is used (e.g. ``"timm Eva"``, ``"hf beit"``).
        model: the underlying ``torch.nn.Module`` (eval mode, no head).
        device: where it runs.
        embed_dim: D. num_blocks: L. num_heads: H. patch_size: P (pixels).
        num_prefix_tokens: class + register tokens in front of the patch tokens, read from the model.
        num_register_tokens: register tokens among them. has_cls_token: whether token 0 is a class token.
        has_rope: whether the attention applies rotary position embeddings (then ``q_rope``/``k_rope`` exist).
        ffn_norm_source: which module ``ffn_norm`` applies (e.g. ``"norm"``, ``"fc_norm (pooling norm, per
            token)"``); None when the model has no final norm (then ``ffn_norm`` is refused).
        data_config: dict with timm's keys ``mean``, ``std``, ``input_size`` = (C, H, W), and
            ``interpolation``/``crop_pct`` where known.
        weights_digest: sha256 of the weights (hex) — part of the feature store's key.
        weights_source: where the weights came from, for labels: ``"timm hub: <name.tag>"``, ``"hf hub: <repo>"``,
            ``"hf dir: <path>"``, ``"builtin: <file>"`` or ``"file: <name> (sha256 <first 12 hex>)"``.
    """

    spec: str
    objective: str
    family: str
    model: torch.nn.Module
    device: torch.device
    embed_dim: int
    num_blocks: int
    num_heads: int
    patch_size: int
    num_prefix_tokens: int
    num_register_tokens: int
    has_cls_token: bool
    has_rope: bool
    ffn_norm_source: str | None
    data_config: dict[str, Any]
    weights_digest: str
    weights_source: str

    def resolve_block(self, block: int) -> int:
        """Map a block index (negative counts from the end) to ``0..num_blocks-1``; raise if out of range."""
        from ..errors import QkvprobeError

        if not -self.num_blocks <= block < self.num_blocks:
            raise QkvprobeError(
                f"block index {block} is out of range for {self.spec} with {self.num_blocks} blocks "
                f"(valid: {-self.num_blocks}..{self.num_blocks - 1})"
            )
        return block % self.num_blocks

    def offered_tokens(self) -> tuple[str, ...]:
        """The token types this model gives: ``vocab.TOKENS`` (less ``ffn_norm`` without a final norm), plus
        ``vocab.ROPE_TOKENS`` when its attention has rotary embeddings."""
        base = tuple(t for t in TOKENS if t != "ffn_norm" or getattr(self, "ffn_norm_source", None))
        return base + (ROPE_TOKENS if getattr(self, "has_rope", False) else ())

    @abstractmethod
    def extract(
        self, images: torch.Tensor, blocks: Sequence[int] = (-1,), tokens: Sequence[str] = TOKENS
    ) -> dict[Any, torch.Tensor]:
        """Tap ``tokens`` of ``blocks`` in one forward pass (no grad).

        Args:
            images: [B, C, H, W] float, already normalised; H and W divisible by ``patch_size``.
            tokens: names from ``vocab.EXTRACT_TOKENS`` (default ``vocab.TOKENS``).
        Returns:
            With one block: ``{"q"|"k"|"v"|"ffn"|"ffn_norm"|"q_rope"|"k_rope": [B, T, D]}``; with several:
            ``{(block, kind): [B, T, D]}`` with ``block`` as given. T includes the prefix tokens.
        """
