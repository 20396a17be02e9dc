"""Hook points → q/k/v/ffn(/ffn_norm, q_rope/k_rope) tensors of any set of blocks, from one forward pass.

Every architecture describes, per block, *where* its tokens live (:class:`TapSite`, docs/science.md §2): a
module whose forward output (or, for values no module outputs, whose input) holds q, k or v, values that are
derived from captured ones after the pass (``q_rope``/``k_rope``: q/k after the model's own rotary embedding),
and the block whose output is the residual stream. :class:`HookedBackbone` registers read-only hooks there, runs
the model's own forward (fused attention stays on, outputs are untouched) and stops it right after the deepest
requested block by raising :class:`_StopForward` from that block's hook, so asking for block 0 costs one block,
not the whole network.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .backbones.base import Backbone
from .errors import DataError, FeatureError, ModelError
from .vocab import EXTRACT_TOKENS, POSITIONS, ROPE_TOKENS, TOKENS

#: Turns a hooked module's forward output into a [B, T, D] token tensor.
Reader = Callable[[Any], torch.Tensor]
#: Turns a hooked module's forward input ``(args, kwargs)`` into a captured value.
InputReader = Callable[[tuple[Any, ...], dict[str, Any]], Any]


def heads_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, H, T, d] per-head tensor → [B, T, H*d], heads concatenated in head order (a copy)."""
    return x.transpose(1, 2).flatten(2)


def tokens_to_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, T, H*d] → [B, H, T, d]: the inverse of :func:`heads_to_tokens` (a view)."""
    return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)


def first_output(out: Any) -> torch.Tensor:
    """A module output that may be a tuple (older transformers layers) → its first tensor."""
    return out[0] if isinstance(out, tuple | list) else out


def first_input(args: tuple[Any, ...], kwargs: dict[str, Any], name: str = "hidden_states") -> torch.Tensor:
    """The first positional input of a module call, or the keyword ``name`` when it was passed by keyword."""
    return args[0] if args else kwargs[name]


@dataclass(frozen=True)
class Tap:
    """One capture point: a forward hook on ``module`` whose ``read(output)`` gives the value, or, with
    ``before=True``, a forward pre-hook whose ``read(args, kwargs)`` does (for values that only the module's input
    holds, e.g. q/k/v projected with ``F.linear`` inside an attention's forward, or the rotary embedding it is
    given)."""

    module: nn.Module
    read: Reader | InputReader
    before: bool = False


@dataclass(frozen=True)
class Derived:
    """A token computed after the pass from captured values: ``compute(*[value of n for n in needs])`` → [B, T, D]."""

    needs: tuple[str, ...]
    compute: Callable[..., torch.Tensor]


@dataclass(frozen=True)
class TapSite:
    """Where block ``l``'s tokens can be read.

    ``taps`` maps ``q``/``k``/``v`` (after per-head q/k norm, before any rotary embedding, heads concatenated:
    [B, T, D]) and any auxiliary value a derived token needs (e.g. ``"rope"``, the rotary embedding the attention
    was given) to a :class:`Tap`. ``derived`` maps ``q_rope``/``k_rope`` to a :class:`Derived` on models with
    rotary embeddings. ``block``'s output is the residual stream (``ffn``).
    """

    block: nn.Module
    taps: Mapping[str, Tap]
    derived: Mapping[str, Derived] = field(default_factory=dict)


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

    Subclasses set the attributes of :class:`Backbone` plus ``in_chans`` (and ``fixed_size`` for models that
    take one input size only) and implement ``tap_site(block)``, ``final_norm(x)`` and ``run(images)`` (the
    model's own forward).
    """

    in_chans: int
    #: (H, W) for models whose position embedding / relative position bias fixes the input size; None = any size.
    fixed_size: tuple[int, int] | None = None

    def tap_site(self, block: int) -> TapSite:
        """The tap points of block ``block`` (0-based)."""
        raise NotImplementedError

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The model's final normalisation (``ffn_norm_source`` says which). [B, T, D] → [B, T, D]."""
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
        if self.fixed_size is not None and (height, width) != tuple(self.fixed_size):
            fixed_h, fixed_w = self.fixed_size
            raise DataError(
                f"{self.spec} takes {fixed_h}x{fixed_w} images only (its position embedding or relative position "
                f"bias has a fixed size), got {height}x{width}; resize to {fixed_h}x{fixed_w} (--image-size {fixed_h})"
            )
        if height % self.patch_size or width % self.patch_size:
            raise DataError(
                f"image size {height}x{width} is not divisible by the patch size {self.patch_size} of "
                f"{self.spec}; resize to a multiple of {self.patch_size} (height {_fits(height, self.patch_size)}, "
                f"width {_fits(width, self.patch_size)})"
            )

    def _plan(self, site: TapSite, tokens: Sequence[str], block: int) -> set[str]:
        """The tap names block ``block`` needs for ``tokens``; a rotary token on a model without rotary raises."""
        names: set[str] = set()
        for kind in tokens:
            if kind in ("ffn", "ffn_norm"):
                continue
            if kind in site.taps:
                names.add(kind)
            elif kind in site.derived:
                names.update(site.derived[kind].needs)
            elif kind in ROPE_TOKENS:
                raise FeatureError(
                    f"{self.spec} has no rotary position embedding, so it has no {kind!r}; ask for "
                    f"{kind.split('_')[0]!r} (what its attention uses)"
                )
            else:
                raise ModelError(f"{self.spec}: block {block} describes no tap for {kind!r}")
        return names

    def extract(
        self, images: torch.Tensor, blocks: Sequence[int] = (-1,), tokens: Sequence[str] = TOKENS
    ) -> dict[Any, torch.Tensor]:
        """Tap ``tokens`` of ``blocks`` in one forward pass (no grad); see :meth:`Backbone.extract`.

        Args:
            images: [B, C, H, W] float, normalised; H, W divisible by ``patch_size``.
            tokens: from ``vocab.EXTRACT_TOKENS``; ``q_rope``/``k_rope`` only on rotary models.
        Returns:
            One block: ``{token: [B, T, D]}``; several: ``{(block, token): [B, T, D]}`` with ``block`` as given.
        Raises:
            FeatureError: unknown token, a rotary token on a model without rotary embeddings, NaN/Inf taps.
            DataError: images of the wrong shape, channel count or size.
        """
        tokens = tuple(tokens)
        bad = [t for t in tokens if t not in EXTRACT_TOKENS]
        if bad or not tokens:
            raise FeatureError(
                f"unknown token type(s) {bad or '(none)'}; choose from {', '.join(EXTRACT_TOKENS)}"
            )
        blocks = list(blocks)
        if not blocks:
            raise FeatureError("no block asked for; pass e.g. blocks=(-1,) for the last block")
        resolved = [self.resolve_block(b) for b in blocks]
        if "ffn_norm" in tokens and self.ffn_norm_source is None:
            raise FeatureError(
                f"{self.spec} has no final norm, so 'ffn_norm' would equal 'ffn'; drop ffn_norm from the tokens"
            )
        self.check_images(images)
        images = images.to(device=self.device, dtype=next(self.model.parameters()).dtype)

        deepest = max(resolved)
        sites = {blk: self.tap_site(blk) for blk in sorted(set(resolved))}
        captured: dict[tuple[int, str], Any] = {}
        after: dict[nn.Module, list[tuple[tuple[int, str], Reader]]] = defaultdict(list)
        before: dict[nn.Module, list[tuple[tuple[int, str], InputReader]]] = defaultdict(list)
        for blk, site in sites.items():
            for name in sorted(self._plan(site, tokens, blk)):
                tap = site.taps[name]
                (before if tap.before else after)[tap.module].append(((blk, name), tap.read))
            if "ffn" in tokens or "ffn_norm" in tokens or blk == deepest:
                after[site.block].append(((blk, "ffn"), first_output))
        stop_module = sites[deepest].block

        def after_hook(entries: list[tuple[tuple[int, str], Reader]], stop: bool) -> Callable[..., None]:
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                for key, read in entries:
                    captured[key] = read(output)
                if stop:
                    raise _StopForward

            return hook

        def before_hook(entries: list[tuple[tuple[int, str], InputReader]]) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                for key, read in entries:
                    captured[key] = read(args, kwargs)

            return hook

        handles = [m.register_forward_pre_hook(before_hook(e), with_kwargs=True) for m, e in before.items()]
        handles += [m.register_forward_hook(after_hook(e, m is stop_module)) for m, e in after.items()]
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
                site = sites[blk]
                for kind in tokens:
                    src = "ffn" if kind == "ffn_norm" else kind
                    if src in site.derived and src not in site.taps:
                        needs = site.derived[src].needs
                        missing = [n for n in needs if (blk, n) not in captured]
                        if missing:
                            raise ModelError(
                                f"{self.spec}: the hook for {missing[0]!r} of block {blk} never fired"
                            )
                        value = site.derived[src].compute(*[captured[(blk, n)] for n in needs])
                    elif (blk, src) in captured:
                        value = captured[(blk, src)]
                    else:
                        raise ModelError(f"{self.spec}: the hook for {src!r} of block {blk} never fired")
                    if kind == "ffn_norm":
                        value = self.final_norm(value)
                    out[kind if len(blocks) == 1 else (given, kind)] = value
        check_finite(out, self.spec)
        return out
