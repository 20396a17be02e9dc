"""Hook points → q/k/v/ffn(/ffn_norm) tensors of any set of blocks, from one forward pass (PAPER.md §2).

Every architecture describes, per block, *where* its tokens live (:class:`TapSite`: a module whose forward
output holds q, k or v, and the block whose output is the residual stream). :class:`HookedBackbone` then
registers read-only forward hooks on those modules, runs the model's own forward (fused attention stays on,
outputs are untouched) and stops it right after the deepest requested block by raising :class:`_StopForward`
from that block's hook, so asking for block 0 costs one block, not the whole network.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .backbones.base import Backbone
from .errors import DataError, FeatureError, ModelError
from .vocab import POSITIONS, TOKENS

#: Turns a hooked module's forward output into a [B, T, D] token tensor.
Reader = Callable[[Any], torch.Tensor]


def heads_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, H, T, d] per-head tensor → [B, T, H*d], heads concatenated in head order (a copy)."""
    return x.transpose(1, 2).flatten(2)


def first_output(out: Any) -> torch.Tensor:
    """A module output that may be a tuple (older transformers layers) → its first tensor."""
    return out[0] if isinstance(out, tuple | list) else out


@dataclass(frozen=True)
class TapSite:
    """Where block ``l``'s tokens can be read.

    ``q``/``k``/``v`` are ``(module, reader)``: the reader maps that module's forward output to [B, T, D]
    (after per-head q/k norm, before any rotary embedding). ``block``'s output is the residual stream (``ffn``).
    """

    block: nn.Module
    q: tuple[nn.Module, Reader]
    k: tuple[nn.Module, Reader]
    v: tuple[nn.Module, Reader]


class _StopForward(Exception):
    """Raised from the deepest requested block's hook: the rest of the network is not needed."""


def select_positions(
    x: Any, positions: Sequence[str], num_prefix_tokens: int, has_cls_token: bool
) -> dict[str, Any]:
    """Pick token positions from a tap (torch tensor or NumPy array).

    Args:
        x: [B, T, D] with the ``num_prefix_tokens`` prefix (class + register) tokens first.
    Returns:
        ``{"cls": [B, D], "avg": [B, D], "patch": [B, N, D]}`` restricted to ``positions``; register tokens
        never enter ``patch`` or ``avg``.
    """
    if getattr(x, "ndim", None) != 3:
        raise FeatureError(
            f"select_positions expects a [B, T, D] tensor, got shape {tuple(getattr(x, 'shape', ()))}"
        )
    if x.shape[1] <= num_prefix_tokens:
        raise FeatureError(
            f"tap has {x.shape[1]} tokens but {num_prefix_tokens} prefix tokens: no patch tokens are left; "
            "check num_prefix_tokens"
        )
    out: dict[str, Any] = {}
    for pos in positions:
        if pos not in POSITIONS:
            raise FeatureError(f"unknown position {pos!r}; choose from {', '.join(POSITIONS)}")
        if pos == "cls":
            if not has_cls_token:
                raise FeatureError(
                    "position 'cls' asked from a model without a class token; use 'avg' (mean of patch tokens) "
                    "or 'patch' instead"
                )
            out["cls"] = x[:, 0]
        elif pos == "patch":
            out["patch"] = x[:, num_prefix_tokens:]
        else:
            out["avg"] = x[:, num_prefix_tokens:].mean(1)
    return out


def check_finite(features: dict[Any, torch.Tensor], where: str) -> None:
    """Raise :class:`FeatureError` naming the first tap that holds NaN or Inf."""
    for key, value in features.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise FeatureError(
                f"{where}: tap {key!r} contains NaN/Inf; check the input normalisation and the weights, "
                "or extract in float32 (amp off)"
            )


def _fits(size: int, patch: int) -> str:
    lower, upper = (size // patch) * patch, (size // patch + 1) * patch
    return f"{lower} or {upper}" if lower > 0 else f"{upper}"


class HookedBackbone(Backbone):
    """A :class:`Backbone` whose ``extract`` is built from per-block :class:`TapSite` s.

    Subclasses set the attributes of :class:`Backbone` plus ``in_chans`` and implement
    ``tap_site(block)``, ``final_norm(x)`` and ``run(images)`` (the model's own forward).
    """

    in_chans: int

    def tap_site(self, block: int) -> TapSite:
        """The tap points of block ``block`` (0-based)."""
        raise NotImplementedError

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The model's final normalisation. [B, T, D] → [B, T, D]."""
        raise NotImplementedError

    def run(self, images: torch.Tensor) -> Any:
        """The model's own forward pass on [B, C, H, W] (hooks interrupt it)."""
        raise NotImplementedError

    def check_images(self, images: torch.Tensor) -> None:
        """Refuse input the patch embedding cannot take, saying which size would work."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            raise DataError(
                f"{self.spec}: images must be a float tensor [B, C, H, W], got "
                f"{type(images).__name__} of shape {tuple(getattr(images, 'shape', ()))}"
            )
        _, chans, height, width = images.shape
        if chans != self.in_chans:
            raise DataError(
                f"{self.spec} takes {self.in_chans}-channel images, got {chans} channels; preprocess with the "
                f"backbone's data_config (input_size {tuple(self.data_config.get('input_size', ()))})"
            )
        if height % self.patch_size or width % self.patch_size:
            raise DataError(
                f"image size {height}x{width} is not divisible by the patch size {self.patch_size} of "
                f"{self.spec}; resize to a multiple of {self.patch_size} (height {_fits(height, self.patch_size)}, "
                f"width {_fits(width, self.patch_size)})"
            )

    def extract(
        self, images: torch.Tensor, blocks: Sequence[int] = (-1,), tokens: Sequence[str] = TOKENS
    ) -> dict[Any, torch.Tensor]:
        """Tap ``tokens`` of ``blocks`` in one forward pass (no grad); see :meth:`Backbone.extract`.

        Args:
            images: [B, C, H, W] float, normalised; H, W divisible by ``patch_size``.
        Returns:
            One block: ``{token: [B, T, D]}``; several: ``{(block, token): [B, T, D]}`` with ``block`` as given.
        """
        tokens = tuple(tokens)
        bad = [t for t in tokens if t not in TOKENS]
        if bad or not tokens:
            raise FeatureError(f"unknown token type(s) {bad or '(none)'}; choose from {', '.join(TOKENS)}")
        blocks = list(blocks)
        if not blocks:
            raise FeatureError("no block asked for; pass e.g. blocks=(-1,) for the last block")
        resolved = [self.resolve_block(b) for b in blocks]
        self.check_images(images)
        images = images.to(device=self.device, dtype=next(self.model.parameters()).dtype)

        deepest = max(resolved)
        captured: dict[tuple[int, str], torch.Tensor] = {}
        readers: dict[nn.Module, list[tuple[tuple[int, str], Reader]]] = defaultdict(list)
        for blk in sorted(set(resolved)):
            site = self.tap_site(blk)
            for kind in ("q", "k", "v"):
                if kind in tokens:
                    module, reader = getattr(site, kind)
                    readers[module].append(((blk, kind), reader))
            if "ffn" in tokens or "ffn_norm" in tokens or blk == deepest:
                readers[site.block].append(((blk, "ffn"), first_output))
        stop_module = self.tap_site(deepest).block

        def make_hook(entries: list[tuple[tuple[int, str], Reader]], stop: bool) -> Callable[..., None]:
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                for key, reader in entries:
                    captured[key] = reader(output)
                if stop:
                    raise _StopForward

            return hook

        handles = [m.register_forward_hook(make_hook(e, m is stop_module)) for m, e in readers.items()]
        try:
            with torch.no_grad():
                self.run(images)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()

        out: dict[Any, torch.Tensor] = {}
        with torch.no_grad():
            for given, blk in zip(blocks, resolved, strict=True):
                for kind in tokens:
                    src = "ffn" if kind == "ffn_norm" else kind
                    if (blk, src) not in captured:
                        raise ModelError(f"{self.spec}: the hook for {src!r} of block {blk} never fired")
                    value = captured[(blk, src)]
                    if kind == "ffn_norm":
                        value = self.final_norm(value)
                    out[kind if len(blocks) == 1 else (given, kind)] = value
        check_finite(out, self.spec)
        return out
