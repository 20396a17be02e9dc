"""One fit API over the objectives: stacked problems in, typed fits out.

- :func:`fit_logistic`: G problems ``X [G, n, D]`` (token types, C values or few-shot episodes) as one batched
  L-BFGS; wide problems (n ≤ D) are solved in the span of their rows (:mod:`.span`), exactly.
- :func:`fit_logistic_grid`: every C of a grid from W = 0, all Cs one batch sharing each X (a pass reads X once
  for every C); :func:`fit_logistic_path` walks the grid with warm starts instead.
- :func:`solve_span`: already-reduced few-shot problems, in float32 with an exact float64 finish for the
  problems float32 rounding keeps from the tolerance.
- :func:`solve`: any objective of this package (dense, span, streamed) from a start.

Every fit reports ``converged`` per problem: its gap bound (:mod:`.lbfgs`) met ``tol``, so its objective is
within ``tol`` (relative) of the optimum. A problem that is not is never silently dropped: callers carry the
flag to the user (``HyperplaneRule.converged_`` and a ``ConvergenceWarning``; the ``converged`` column of
results).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ...tables import SOLVER_MAX_ITER, SOLVER_TOL
from ..checks import check_C
from .dense import DenseLogistic
from .lbfgs import HISTORY, LbfgsResult, Objective, gap_bound, minimize_lbfgs
from .loss import augment, num_logits
from .span import SpanLogistic, span_expand, span_reduce

#: L-BFGS iterations per fit before it is reported as not converged (the rule table's ``SOLVER_MAX_ITER``).
DEFAULT_MAX_ITER = SOLVER_MAX_ITER
#: Relative accuracy of the objective every fit certifies: ``f(w) − f* ≤ tol · f(w)`` (:mod:`.lbfgs`; the rule
#: table's ``SOLVER_TOL``).
DEFAULT_TOL = SOLVER_TOL
#: Iterations of a float32 span solve (``solve_span``) before its unfinished problems move to float64.
LOWER_MAX_ITER = 200
#: Memory of one batch of a C grid fitted together (solver state; off the CPU also a pass's logits): ``grid_step``.
GRID_BYTES = 512 * 1024**2


@dataclass
class LogisticFit:
    """Fitted problems: ``coef [G, Kf, D]``, ``intercept [G, Kf]`` (Kf = 1 when K = 2; multinomial intercepts
    centred), ``n_iter [G]`` int64, ``converged [G]`` bool and ``gap [G]``, the certified relative distance of
    each objective from its optimum (``gap bound / f``)."""

    coef: Tensor
    intercept: Tensor
    n_iter: Tensor
    converged: Tensor
    gap: Tensor

    def __getitem__(self, index: int | slice | Tensor) -> LogisticFit:
        return LogisticFit(
            self.coef[index],
            self.intercept[index],
            self.n_iter[index],
            self.converged[index],
            self.gap[index],
        )


def solve(
    objective: Objective,
    w0: Tensor,
    *,
    max_iter: int = DEFAULT_MAX_ITER,
    tol: float = DEFAULT_TOL,
    ftol: float | None = None,
    compact_min: int = 2,
    certify: bool = True,
) -> LbfgsResult:
    """Minimise ``objective`` from ``w0 [G, P]`` with the package's L-BFGS (``HISTORY`` curvature pairs, or the
    objective's own ``history``).

    ``compact_min``: the smallest batch that drops finished problems; full-width problems cost a pass over X each
    per evaluation, so even small batches drop them, while thousands of tiny span problems pay for compaction
    only in large batches."""
    history = getattr(objective, "history", HISTORY)
    return minimize_lbfgs(
        objective,
        w0,
        max_iter=max_iter,
        tol=tol,
        history=history,
        ftol=ftol,
        compact_min=compact_min,
        certify=certify,
    )


def _relative_gap(res: LbfgsResult) -> Tensor:
    return res.gap / res.f.abs().clamp_min(torch.finfo(res.f.dtype).tiny)


def _centre_intercept(intercept: Tensor) -> Tensor:
    # Multinomial intercepts are defined up to a shift shared by all classes; report the centred one.
    return intercept - intercept.mean(1, keepdim=True) if intercept.shape[1] > 1 else intercept


def solve_span(
    X: Tensor,
    y: Tensor,
    num_classes: int,
    C: Tensor,
    sw: Tensor,
    *,
    W0: Tensor | None = None,
    max_iter: int = DEFAULT_MAX_ITER,
    tol: float = DEFAULT_TOL,
    finish_dtype: torch.dtype | None = torch.float64,
) -> tuple[Tensor, LbfgsResult]:
    """Span-reduced problems ``X [G, n, n]`` (:func:`.span.span_reduce`), ``y [G, n]``, ``C [G]``, ``sw [G, n]``
    → (``W [G, n+1, Kf]`` with the intercept last, the solver's result), solved in X's dtype.

    float32 halves the memory traffic of these bandwidth-bound solves; a problem whose gap bound float32 rounding
    keeps above ``tol`` is finished in ``finish_dtype`` from where it stopped (None: left as it is, flagged)."""
    G = X.shape[0]
    kf = num_logits(num_classes)
    objective = SpanLogistic(augment(X), y, sw, C, num_classes)
    w0 = (
        torch.zeros(G, kf * (X.shape[2] + 1), dtype=X.dtype, device=X.device)
        if W0 is None
        else W0.to(X.dtype).transpose(1, 2).reshape(G, -1)
    )
    # Tiny problems: the per-kernel-call cost dominates, so compaction pays only in large batches. A float32 solve
    # stops on its gap bound: it is certified in finish_dtype below (a float32 certificate would not be exact).
    lower = finish_dtype is not None and X.dtype != finish_dtype
    # A problem float32 does not solve within LOWER_MAX_ITER iterations is one whose rounding noise keeps it from
    # the tolerance: it is finished in finish_dtype rather than left to wander.
    res = solve(
        objective,
        w0,
        max_iter=min(max_iter, LOWER_MAX_ITER) if lower else max_iter,
        tol=tol,
        compact_min=16,
        certify=not lower,
    )
    if lower:
        # The certificate is only as exact as the gradient it is computed from: float32 residuals of confidently
        # classified rows can hide a gradient of the size the test compares with, so every float32 solution is
        # re-certified with one evaluation in finish_dtype, and the ones that fail are finished there.
        exact = SpanLogistic(
            augment(X.to(finish_dtype)), y, sw.to(finish_dtype), C.to(finish_dtype), num_classes
        )
        f64, g64 = exact.value_grad(res.w.to(finish_dtype))
        bound = gap_bound(g64, exact.strong_convexity)
        res.gap, res.f = bound.to(res.gap.dtype), f64.to(res.f.dtype)
        res.converged = bound <= tol * f64.abs()
        redo = (~res.converged).nonzero().squeeze(1)
        if len(redo):
            again = solve(exact.select(redo), res.w[redo].to(finish_dtype), max_iter=max_iter, tol=tol)
            res.w[redo] = again.w.to(res.w.dtype)
            res.f[redo] = again.f.to(res.f.dtype)
            res.n_iter[redo] += again.n_iter
            res.converged[redo] = again.converged
            res.gap[redo] = again.gap.to(res.gap.dtype)
    return res.w.view(G, kf, -1).transpose(1, 2), res


def fit_logistic(
    X: Tensor,
    y: Tensor,
    num_classes: int,
    C: float | Sequence[float] | Tensor,
    *,
    sample_weight: Tensor | None = None,
    coef_init: Tensor | None = None,
    intercept_init: Tensor | None = None,
    max_iter: int = DEFAULT_MAX_ITER,
    tol: float = DEFAULT_TOL,
    reduce: bool | None = None,
    moment: Tensor | None = None,
) -> LogisticFit:
    """Solve G problems at once: ``X [G, n, D]`` (solver dtype and device), ``y [G, n]`` int64 codes in 0..K-1,
    ``sample_weight [G, n]`` (0 = padding), ``C`` a scalar or ``[G]``; optional warm start ``coef_init
    [G, Kf, D]``, ``intercept_init [G, Kf]``. ``reduce`` (default: when n ≤ D) solves in the span of the training
    rows (exact). ``moment``: the rows' second moments ``[G, D+1, D+1]`` when already computed."""
    G, n, D = X.shape
    sw = torch.ones(G, n, dtype=X.dtype, device=X.device) if sample_weight is None else sample_weight.to(X)
    Cs = torch.as_tensor(C, dtype=X.dtype, device=X.device).expand(G).contiguous()
    kf = num_logits(num_classes)
    W0 = None
    if coef_init is not None or intercept_init is not None:
        W0 = torch.zeros(G, D + 1, kf, dtype=X.dtype, device=X.device)
        W0[:, :-1] = 0 if coef_init is None else coef_init.transpose(1, 2)
        W0[:, -1] = 0 if intercept_init is None else intercept_init
    if not ((n <= D) if reduce is None else reduce):
        objective = DenseLogistic(augment(X), y, sw, Cs, num_classes, moment, start=W0)
        w0 = torch.zeros(G, (D + 1) * kf, dtype=X.dtype, device=X.device) if W0 is None else W0.reshape(G, -1)
        res = solve(objective, w0, max_iter=max_iter, tol=tol)
        W = res.w.view(G, -1, kf)
        return LogisticFit(
            W[:, :-1].transpose(1, 2),
            _centre_intercept(W[:, -1]),
            res.n_iter,
            res.converged,
            _relative_gap(res),
        )
    red = span_reduce(X, sw)
    Wr0 = None
    if W0 is not None:  # warm start: coordinates of coef in the span, intercept of the centred problem
        Xm = (X - red.mean[:, None]) * (sw > 0).to(X.dtype)[..., None]
        basis = (Xm.transpose(1, 2) @ red.proj.to(X.dtype)).to(red.X.dtype)  # [G, D, n] orthonormal columns
        shifted = W0[:, -1] + (red.mean[:, None] @ W0[:, :-1])[:, 0]  # [G, Kf]
        Wr0 = torch.cat(
            [basis.transpose(1, 2) @ W0[:, :-1].to(basis.dtype), shifted.to(basis.dtype)[:, None]], 1
        )
    W, res = solve_span(
        red.X, y, num_classes, Cs.to(red.X.dtype), sw.to(red.X.dtype), W0=Wr0, max_iter=max_iter, tol=tol
    )
    coef, intercept = span_expand(red, X, sw, W)
    return LogisticFit(coef, _centre_intercept(intercept), res.n_iter, res.converged, _relative_gap(res))


def grid_step(
    num_Cs: int,
    problems_per_C: int,
    num_params: int,
    rows: int,
    kf: int,
    dtype: torch.dtype,
    device: torch.device,
) -> int:
    """How many Cs of a grid one batch holds: the L-BFGS state of its problems (``HISTORY`` curvature pairs,
    iterates and gradients, ``num_params`` each) and, off the CPU (where ``loss.logistic_sums`` does not work in
    row blocks), the logits, log-probabilities and residuals of a pass over ``rows`` rows stay within
    ``GRID_BYTES``. Ten 192-d tokens of ten classes take a whole 8-C grid in one batch; 768-d features of 1 000
    classes take 3 Cs per batch on the CPU (float64) and 1 on a GPU (1.28 M rows of logits)."""
    size = torch.finfo(dtype).bits // 8
    per_C = (2 * HISTORY + 6) * problems_per_C * num_params * size
    if device.type != "cpu":
        per_C += 3 * problems_per_C * rows * kf * size
    return max(1, min(num_Cs, GRID_BYTES // max(per_C, 1)))


def fit_logistic_grid(
    X: Tensor,
    y: Tensor,
    num_classes: int,
    Cs: Sequence[float],
    *,
    sample_weight: Tensor | None = None,
    max_iter: int = DEFAULT_MAX_ITER,
    tol: float = DEFAULT_TOL,
) -> list[LogisticFit]:
    """Every C of ``Cs`` from W = 0 on ``X [G, n, D]``: one :class:`LogisticFit` (of G problems) per C, in the
    given order. All Cs are one batch of ``G·len(Cs)`` problems sharing each X (:class:`.dense.DenseLogistic`
    with R Cs per X), so a pass reads X once for all Cs; batches of fewer Cs where memory asks for it
    (:func:`grid_step`). ``benchmarks/bench_rules.py grid`` measures it against one C at a time."""
    Cs = [check_C(C) for C in Cs]
    G, n, D = X.shape
    kf = num_logits(num_classes)
    sw = torch.ones(G, n, dtype=X.dtype, device=X.device) if sample_weight is None else sample_weight.to(X)
    step = grid_step(len(Cs), G, (D + 1) * kf, n, kf, X.dtype, X.device)
    Xa, moment = augment(X), None
    out: list[LogisticFit] = []
    for lo in range(0, len(Cs), step):
        part = Cs[lo : lo + step]
        R = len(part)
        C = torch.tensor(part, dtype=X.dtype, device=X.device).repeat(G)  # problem g·R + r has C = part[r]
        objective = DenseLogistic(Xa, y, sw, C, num_classes, moment)
        moment = objective.moment
        w0 = torch.zeros(G * R, (D + 1) * kf, dtype=X.dtype, device=X.device)
        res = solve(objective, w0, max_iter=max_iter, tol=tol)
        W = res.w.view(G, R, D + 1, kf)
        n_iter, conv, gap = res.n_iter.view(G, R), res.converged.view(G, R), _relative_gap(res).view(G, R)
        out += [
            LogisticFit(
                W[:, r, :-1].transpose(1, 2),
                _centre_intercept(W[:, r, -1]),
                n_iter[:, r],
                conv[:, r],
                gap[:, r],
            )
            for r in range(R)
        ]
    return out


def fit_logistic_path(
    X: Tensor,
    y: Tensor,
    num_classes: int,
    Cs: Sequence[float],
    *,
    sample_weight: Tensor | None = None,
    max_iter: int = DEFAULT_MAX_ITER,
    tol: float = DEFAULT_TOL,
) -> list[LogisticFit]:
    """A regularisation path: each C of ``Cs`` (in the given order) warm-started from the previous C's solution.

    Each solution is certified at its own C like any other fit. To *compare* Cs (choose one on held-out data) the
    standard protocols use :func:`fit_logistic_grid` instead, so that no C's fit depends on another's."""
    out: list[LogisticFit] = []
    prev: LogisticFit | None = None
    for C in Cs:
        fit = fit_logistic(
            X,
            y,
            num_classes,
            check_C(C),
            sample_weight=sample_weight,
            max_iter=max_iter,
            tol=tol,
            coef_init=None if prev is None else prev.coef,
            intercept_init=None if prev is None else prev.intercept,
            reduce=False,
        )
        out.append(fit)
        prev = fit
    return out
