"""The dense objective: G (× R) logistic-regression problems on feature matrices held in memory."""

from __future__ import annotations

import torch
from torch import Tensor

from ...errors import RuleError
from .loss import class_shares, dual_sums_blocked, duality_gap, logistic_sums, num_logits
from .precondition import (
    CURVATURE_MAX_EVALS,
    apply_preconditioner,
    class_curvature,
    curvature_preconditioner,
    curvature_stride,
    moment_preconditioner,
    per_class_blocks,
    second_moment,
)


class DenseLogistic:
    """Logistic-regression problems over features in memory, in the scaled form the solver minimises:
    ``Σ_i w_i·logloss_i + ½·reg·‖W‖²`` with ``w_i = sw_i / Σsw`` and ``reg = 1/(C·Σsw)`` (scikit-learn's
    objective ``C·Σ sw_i·logloss_i + ½‖W‖²`` divided by ``C·Σsw``: the same optimum).

    Args:
        X: ``[G, n, D1]`` features with a trailing column of ones (``loss.augment``).
        y: ``[G, n]`` int64 class codes in 0..K-1. sw: ``[G, n]`` sample weights (0 = padding).
        C: ``[G·R]`` inverse regularisation strengths: R problems per X (problem ``g·R + r`` reads ``X[g]``, e.g.
            one token at R values of C), whose logits and gradients are one product per X.
        num_classes: K. moment: ``[G, D1, D1]`` second moments of X, when already known (another C's).
        start: the warm start W ``[G, D1, Kf]`` (R = 1); its curvature then preconditions from the first step.

    Parameters ``w [Ga, D1·Kf]`` = W ``[Ga, D1, Kf]`` with the intercept row last (``Kf = 1`` when K = 2).
    ``strong_convexity`` is ``reg`` (the penalty's; the solver's gap bound uses it). After :meth:`select`,
    ``slots [Ga]`` names the problems still solved among the ``G·R`` of X; the others ride along at W = 0 until a
    whole X is done and leaves (copying X for a few problems would cost more than their columns).
    """

    def __init__(
        self,
        X: Tensor,
        y: Tensor,
        sw: Tensor,
        C: Tensor,
        num_classes: int,
        moment: Tensor | None = None,
        start: Tensor | None = None,
    ) -> None:
        G = X.shape[0]
        if C.shape[0] % G:
            raise RuleError(f"{C.shape[0]} values of C for {G} feature sets; pass R per set")
        self.R = C.shape[0] // G
        if start is not None and self.R != 1:
            raise RuleError(f"a warm start is for one C per feature set, got {self.R}")
        self.X, self.y, self.sw, self.C = X, y, sw, C
        self.num_classes = num_classes
        self.kf = num_logits(num_classes)
        self.sw_sum = sw.sum(1)  # [G]
        self.reg = 1.0 / (C * self.sw_sum.repeat_interleave(self.R))  # [G·R] l2 strength of the scaled form
        self.weights = sw / self.sw_sum[:, None]
        self.slots: Tensor | None = None
        self._moment = moment
        P = None if start is None else self._curvature(start)
        self.P = (
            moment_preconditioner(self.moment.repeat_interleave(self.R, 0), self.reg, num_classes)
            if P is None
            else P
        )

    @property
    def strong_convexity(self) -> Tensor:
        """μ per problem ``[Ga]``: the penalty's strength in the scaled form."""
        return self.reg

    @property
    def moment(self) -> Tensor:
        """Second moments of each X's rows ``[G, D1, D1]`` (the W = 0 preconditioner's), computed when first
        needed: a solve preconditioned with curvature never needs them, another C reuses them."""
        if self._moment is None:
            self._moment = second_moment(self.X, self.sw)
        return self._moment

    def _rows_of_problems(self) -> Tensor:
        """Index of each working problem's X ``[Ga]``."""
        slots = (
            torch.arange(self.X.shape[0] * self.R, device=self.X.device) if self.slots is None else self.slots
        )
        return slots // self.R

    def _curvature(self, W: Tensor, max_evals: float = CURVATURE_MAX_EVALS) -> Tensor | None:
        """Inverse curvature blocks at ``W [Ga, D1, Kf]`` from strided rows, or None when costlier than
        ``max_evals`` evaluations."""
        step = curvature_stride(self.X.shape[1], self.X.shape[2], max_evals)
        if not step:
            return None
        rows = self._rows_of_problems()
        per_class = per_class_blocks(len(rows), self.kf, self.X.shape[2], self.X.element_size())
        blocks = []
        for g in torch.unique(rows).tolist():  # one X at a time: its problems share the strided rows
            idx = (rows == g).nonzero().squeeze(1)
            w = self.weights[g, ::step]
            w = (w * (self.weights[g].sum() / w.sum().clamp_min(1e-300)))[None].expand(len(idx), -1)
            X = self.X[g, ::step][None].expand(len(idx), -1, -1)  # strided rows stand for all
            blocks.append((idx, class_curvature(X, w, W[idx], self.num_classes, per_class)))
        curvature = W.new_empty(len(rows), *blocks[0][1].shape[1:])
        for idx, block in blocks:
            curvature[idx] = block
        return curvature_preconditioner(curvature, self.reg)

    def refresh(self, w: Tensor, budget: float = CURVATURE_MAX_EVALS) -> bool:
        """Re-precondition with the curvature at the current iterate ``w [Ga, D1·Kf]`` if it costs at most half of
        ``budget`` evaluations (the iterations it is expected to save); False when not, or when it is not
        numerically positive definite (the preconditioner is kept)."""
        P = self._curvature(w.view(w.shape[0], -1, self.kf), budget / 2)
        if P is None:
            return False
        self.P = P
        return True

    def select(self, keep: Tensor) -> DenseLogistic:
        """The problems ``keep`` (indices into the working set). Indexes the per-problem tensors rather than
        re-deriving them (the preconditioner's Cholesky); X is indexed (copied) only when a whole X has no problem
        left."""
        out = object.__new__(DenseLogistic)
        out.num_classes, out.kf, out.R = self.num_classes, self.kf, self.R
        for name in ("C", "reg", "P"):
            setattr(out, name, getattr(self, name).index_select(0, keep))
        slots = keep if self.slots is None else self.slots.index_select(0, keep)
        groups = torch.unique(slots // self.R)  # sorted
        if len(groups) < self.X.shape[0]:
            for name in ("X", "y", "sw", "sw_sum", "weights"):
                setattr(out, name, getattr(self, name).index_select(0, groups))
            out._moment = None if self._moment is None else self._moment.index_select(0, groups)
            remap = torch.empty(self.X.shape[0], dtype=torch.int64, device=slots.device)
            remap[groups] = torch.arange(len(groups), device=slots.device)
            slots = remap[slots // self.R] * self.R + slots % self.R
        else:
            out.X, out.y, out.sw, out.sw_sum, out.weights = self.X, self.y, self.sw, self.sw_sum, self.weights
            out._moment = self._moment
        full = len(slots) == out.X.shape[0] * out.R and bool(
            (slots == torch.arange(len(slots), device=slots.device)).all()
        )
        out.slots = None if full else slots
        return out

    def precondition(self, v: Tensor) -> Tensor:
        """The preconditioner times ``v [Ga, D1·Kf]``."""
        return apply_preconditioner(self.P, v, self.kf, self.reg)

    def _full(self, W: Tensor) -> Tensor:
        """Parameters of every problem of X ``[G·R, D1, Kf]``: the working problems', zeros for those that left."""
        if self.slots is None:
            return W
        full = W.new_zeros(self.X.shape[0] * self.R, *W.shape[1:])
        full[self.slots] = W
        return full

    def duality_gap(self, w: Tensor, g: Tensor, f: Tensor) -> Tensor:
        """``f(w) − dual`` ``[Ga]`` at a dual-feasible point built from the residuals (``loss.dual_sums``): a
        rigorous upper bound of ``f(w) − f*``, one pass over X (the primal value is recomputed there in log space, see
        ``loss.dual_sums``). ``g``, ``f``: the gradient and value at ``w``."""
        Ga = w.shape[0]
        W, gbar = w.view(Ga, -1, self.kf), g.view(Ga, -1, self.kf)[:, -1]
        shares = class_shares(self.y, self.weights, self.num_classes)[self._rows_of_problems()]
        full_g = gbar.new_zeros(self.X.shape[0] * self.R, self.kf)
        full_m = full_g.clone()
        slots = torch.arange(Ga, device=w.device) if self.slots is None else self.slots
        full_g[slots], full_m[slots] = gbar, gbar + shares
        L, H, V = dual_sums_blocked(
            self.X, self.y, self.weights, self._full(W), self.num_classes, full_g, full_m
        )
        if self.slots is not None:
            L, H, V = L[self.slots], H[self.slots], V[self.slots]
        return duality_gap(W, L, H, V, self.reg)

    def value_grad(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """Scaled objective values ``[Ga]`` and gradients ``[Ga, D1·Kf]`` at ``w [Ga, D1·Kf]``."""
        W = w.view(w.shape[0], -1, self.kf)
        if self.slots is None:
            f, grad = logistic_sums(self.X, self.y, self.weights, W, self.num_classes)
        else:  # problems that left ride along at W = 0
            full = W.new_zeros(self.X.shape[0] * self.R, *W.shape[1:])
            full[self.slots] = W
            f, grad = logistic_sums(self.X, self.y, self.weights, full, self.num_classes)
            f, grad = f[self.slots], grad[self.slots]
        Wf = W[:, :-1]
        f = f + 0.5 * self.reg * (Wf * Wf).sum((1, 2))
        grad[:, :-1] += self.reg[:, None, None] * Wf
        return f, grad.reshape(w.shape)
