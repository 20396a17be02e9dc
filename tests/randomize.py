"""The one way tests randomise a model (imported by tests, not collected; docs/CONTRACTS.md, tests).

A model built for a test keeps many parameters at their init value — zero biases (timm's ``q_bias``/``v_bias``),
unit norm weights, identity layer scales, zero class/register tokens and position embeddings — and a term that
is zero or one can be dropped, doubled or swapped without any number changing. :func:`randomize_` redraws
*every* parameter (``named_parameters()``, so nothing can be forgotten) from a seeded generator:

- matrices and convolution kernels (≥ 2-d ``…weight``): N(0, (2.25/√fan_in)²) — large on purpose (2.25/√32 =
  0.4 at D = 32): sharp attention, so a scaling or ordering error moves outputs visibly;
- 1-d ``…weight`` (norm weights, scales): U(0.5, 1.5) — away from 1 and never near 0 or negative;
- rotary frequencies/periods that are parameters (a name with ``freq`` or ``period``): the init × U(0.5, 1.5),
  so they stay positive;
- everything else — biases (``q_bias``, ``k_bias``, ``v_bias`` included), layer scales (``gamma``, ``ls1``,
  ``lambda1``), class/register/mask tokens, position embeddings, relative position bias tables: N(0, 0.3²).

Buffers are left alone: they are what the architecture fixes (timm Beit's ``k_bias`` is a zero buffer because
BEiT has no key bias; rotary periods computed from the config). Returns the model (for chaining).
"""

from __future__ import annotations

import math

import torch

#: Gain of the ≥ 2-d weights: std = GAIN/√fan_in.
GAIN = 2.25
#: Std of biases, tokens, position embeddings, layer scales and other non-matrix parameters.
OTHER_STD = 0.3


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Redraw every parameter of ``model`` in place from ``torch.Generator().manual_seed(seed)`` (module doc)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            shape, dtype = param.shape, param.dtype
            if "freq" in leaf or "period" in leaf:
                new = param.detach().float().cpu() * (0.5 + torch.rand(shape, generator=gen))
            elif leaf.endswith("weight") and param.ndim >= 2:
                fan_in = math.prod(shape[1:])
                new = torch.randn(shape, generator=gen) * (GAIN / math.sqrt(fan_in))
            elif leaf.endswith("weight"):
                new = 0.5 + torch.rand(shape, generator=gen)
            else:
                new = torch.randn(shape, generator=gen) * OTHER_STD
            param.copy_(new.to(dtype))
    return model


def assert_randomized(model: torch.nn.Module, *, zeros: int = 0) -> None:
    """Every parameter holds distinct random values: none is constant (all zeros, all ones, one repeated value)."""
    for name, param in model.named_parameters():
        if param.numel() > 1:
            assert param.detach().std() > 0, f"{name} is constant"
        assert (param == 0).sum() <= zeros, f"{name} holds zeros"
