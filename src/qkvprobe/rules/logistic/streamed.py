"""The streamed objective: logistic-regression problems over rows that arrive in chunks (segmentation patches
read from a feature store), so memory stays bounded whatever the number of rows."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from ...errors import RuleError
from .loss import dual_sums, duality_gap, logistic_sums, num_logits
from .precondition import (
    CURVATURE_MAX_EVALS,
    apply_preconditioner,
    class_curvature,
    curvature_preconditioner,
    curvature_stride,
    moment_preconditioner,
    per_class_blocks,
)

#: ``chunks()`` → an iterator of ``(X [m, D1] with the trailing column of ones, y [m] int64 codes)``; every call
#: starts a new pass over the same rows in the same order.
Chunks = Callable[[], Iterator[tuple[Tensor, Tensor]]]


class StreamedLogistic:
    """One set of rows, one problem per C of ``Cs``: every chunk is read once per evaluation for all of them
    (``loss.logistic_sums`` with R problems per X), so a whole C sweep costs about as many passes as its slowest C.

    Scaled form as :class:`.dense.DenseLogistic`: row weight ``class_w[y] / n`` (1/n without class weights;
    balanced class weights sum to n, so the scale stays ``C·n``), ``reg = 1/(C·n)``.

    Args:
        chunks: the rows (:data:`Chunks`). num_rows: n, the number of rows over all chunks.
        num_classes: K. Cs: the C of each problem. moment: ``[1, D1, D1]`` second moments of the rows.
        class_w: ``[K]`` class weights, or None. start: the warm start ``w [1, D1·Kf]`` of a single C; its
            curvature then preconditions from the first step (one extra pass).
        class_counts: rows per class ``[K]``, when known (the duality gap needs them; else one pass counts them).
    """

    def __init__(
        self,
        chunks: Chunks,
        num_rows: int,
        num_classes: int,
        Cs: Sequence[float],
        moment: Tensor,
        class_w: Tensor | None = None,
        start: Tensor | None = None,
        class_counts: Tensor | None = None,
    ) -> None:
        self.chunks, self.num_classes, self.num_rows = chunks, num_classes, num_rows
        self.class_counts = class_counts
        self.row_w = None if class_w is None else class_w.to(moment) / num_rows
        self.kf = num_logits(num_classes)
        self.reg = torch.tensor([1.0 / (C * num_rows) for C in Cs], dtype=moment.dtype, device=moment.device)
        self.inv_n = 1.0 / num_rows
        if start is not None and len(Cs) != 1:
            raise RuleError(f"a warm start is for one C, got {len(Cs)}")
        P = None if start is None else self._curvature(start)
        self.P = moment_preconditioner(moment, self.reg, num_classes) if P is None else P

    @property
    def strong_convexity(self) -> Tensor:
        """μ per problem ``[R]``: the penalty's strength in the scaled form."""
        return self.reg

    def _row_weights(self, X: Tensor, y: Tensor) -> Tensor:
        return (
            torch.full(y.shape, self.inv_n, dtype=X.dtype, device=X.device)
            if self.row_w is None
            else self.row_w[y]
        )

    def _curvature(self, w: Tensor, max_evals: float = CURVATURE_MAX_EVALS) -> Tensor | None:
        """Inverse curvature blocks at ``w [R, D1·Kf]`` from strided rows of every chunk (one pass), or None when
        costlier than ``max_evals`` evaluations."""
        width = w.shape[1] // self.kf
        step = curvature_stride(self.num_rows, width, max_evals)
        if not step:
            return None
        R = w.shape[0]
        W = w.view(R, -1, self.kf)
        per_class = per_class_blocks(R, self.kf, width, w.element_size())
        curv: Tensor | None = None
        picked = total = 0.0
        for X, y in self.chunks():
            rw = self._row_weights(X, y)
            Xs, ws = X[::step][None].expand(R, -1, -1), rw[::step][None].expand(R, -1)
            part = class_curvature(Xs, ws, W, self.num_classes, per_class)
            curv = part if curv is None else curv + part
            picked, total = picked + float(rw[::step].sum()), total + float(rw.sum())
        if curv is None:
            return None
        return curvature_preconditioner(
            curv * (total / max(picked, 1e-300)), self.reg
        )  # strided rows stand for all

    def refresh(self, w: Tensor, budget: float = CURVATURE_MAX_EVALS) -> bool:
        """Re-precondition with the curvature at the current iterate ``w [R, D1·Kf]`` (one pass) if it costs at most
        half of ``budget`` evaluations; False when not, or when it is not numerically positive definite."""
        P = self._curvature(w, budget / 2)
        if P is None:
            return False
        self.P = P
        return True

    def select(self, keep: Tensor) -> StreamedLogistic:
        """The problems ``keep``; the Cs share the chunks, so only the per-C tensors are indexed."""
        out = copy.copy(self)
        out.reg, out.P = self.reg.index_select(0, keep), self.P.index_select(0, keep)
        return out

    def precondition(self, v: Tensor) -> Tensor:
        """The preconditioner times ``v [R, D1·Kf]``."""
        return apply_preconditioner(self.P, v, self.kf, self.reg)

    def _shares(self, like: Tensor) -> Tensor:
        """Each class's share of the row weights ``[Kf]`` (class 1's alone for one binary logit)."""
        if self.class_counts is None:
            counts = torch.zeros(self.num_classes, dtype=like.dtype, device=like.device)
            for _, y in self.chunks():
                counts += torch.bincount(y, minlength=self.num_classes)[: self.num_classes].to(like)
            self.class_counts = counts
        counts = self.class_counts.to(like)
        shares = counts * (self.inv_n if self.row_w is None else self.row_w.to(like))
        return shares[1:] if self.num_classes == 2 else shares

    def duality_gap(self, w: Tensor, g: Tensor, f: Tensor) -> Tensor:
        """``f(w) − dual`` ``[R]``: a rigorous upper bound of ``f(w) − f*`` (``loss.dual_sums``), one pass."""
        R = w.shape[0]
        W, gbar = w.view(R, -1, self.kf), g.view(R, -1, self.kf)[:, -1]
        mass = gbar + self._shares(w)
        # the row weight of all chunks (each chunk's dual point moves shares of it, not of its own rows')
        assert self.class_counts is not None  # counted by _shares
        per_class = self.class_counts.to(w) * (self.inv_n if self.row_w is None else self.row_w.to(w))
        total = per_class.sum().reshape(1)
        L = torch.zeros(R, dtype=w.dtype, device=w.device)
        H = torch.zeros_like(L)
        V = torch.zeros(R, W.shape[1] - 1, self.kf, dtype=w.dtype, device=w.device)
        for X, y in self.chunks():
            rw = self._row_weights(X, y)
            Lc, Hc, Vc = dual_sums(X[None], y[None], rw[None], W, self.num_classes, gbar, mass, total)
            L, H, V = L + Lc, H + Hc, V + Vc
        return duality_gap(W, L, H, V, self.reg)

    def value_grad(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """Scaled objective values ``[R]`` and gradients ``[R, D1·Kf]`` at ``w``: one pass over the chunks."""
        W = w.view(w.shape[0], -1, self.kf)
        f = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        grad = torch.zeros_like(W)
        for X, y in self.chunks():
            rw = self._row_weights(X, y)
            fs, gs = logistic_sums(X[None], y[None], rw[None], W, self.num_classes)
            f, grad = f + fs, grad + gs
        Wf = W[:, :-1]
        f = f + 0.5 * self.reg * (Wf * Wf).sum((1, 2))
        grad[:, :-1] += self.reg[:, None, None] * Wf
        return f, grad.reshape(w.shape)
