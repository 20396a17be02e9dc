"""Batched L-BFGS: minimise G independent smooth, μ-strongly convex objectives at once, each to a certified
relative accuracy.

torch.optim.LBFGS solves one problem; here every problem keeps its own curvature history, step size,
line search and stopping test, so a problem's iterates do not depend on which other problems share the
batch (batched results equal one-at-a-time results up to floating-point summation order). Finished
problems are dropped from the working set (``Objective.select``) once a quarter of it has finished, so
stragglers do not pay for the whole batch.

Stopping: a problem has converged when the distance of its objective from the optimum is *certified* to be at
most ``tol · |f(w)|``. The running test is the **gap bound** ``‖∇f(w)‖² / (2μ)``: for a μ-strongly convex f,
``f(w) − f* ≤ ‖∇f(w)‖² / (2μ)``. Where some parameters are not strongly convex (the logistic objectives' free
intercept), the objective offers ``duality_gap(w, g, f)``, a rigorous bound from a dual-feasible point (one
pass over the data): a problem whose gap bound meets the tolerance is certified by it, and if the duality gap
does not meet it, the problem runs on until its gap bound has shrunk by the observed ratio. A tiny decrease of
the objective never counts as convergence: it counts as a stall.

Line search and recovery: Armijo backtracking from the unit quasi-Newton step; where the objective's values
no longer resolve the progress (differences within rounding), Hager and Zhang's approximate Wolfe condition,
which reads the same test off the slopes. When a problem's backtracking
fails, or its objective stalls (relative decrease ≤ ``ftol``) before the gap bound is met, its curvature
history is dropped and the next step starts from the preconditioned gradient; if that fails or stalls too,
from a steepest-descent step scaled to the objective (``|f| / ‖∇f‖²``); a problem that fails on that as well is
stopped with ``converged = False`` (in practice: floating-point noise, e.g. float32, larger than the tolerance).
``max_iter`` iterations without meeting the bound also end with ``converged = False``.

Cost model (why it is hand-written this way): with thousands of tiny problems (few-shot episodes, P ≈ 100
parameters each) every tensor operation touches only a few hundred kB, so the run time is the number of
operations per iteration, not arithmetic. The history is stored slot-major (``[m, G, P]``, each slot
contiguous); the scaling ``γ = sᵀy / yᵀPy`` of the newest pair is computed once when the pair is stored
rather than in every two-loop; rejected pairs are marked by ``ρ = 0`` (a no-op in the two-loop) instead of
masked copies; and accept/reject blends use a ``[G, 1]`` mask (``torch.where`` with a full ``[G, P]`` bool
mask is several times slower on CPU).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Protocol, cast

import torch
from torch import Tensor

#: Curvature pairs kept per problem (the L-BFGS memory) unless an objective asks for another number.
HISTORY = 10
#: Iterations between two chances to refresh an objective's preconditioner at the current iterate (objectives with
#: a ``refresh`` method; taken when a problem would not converge within the next window at its current rate; the
#: curvature history is dropped then, since it was scaled by the old preconditioner).
REFRESH_EVERY = 10
#: Iterations a problem whose gap bound meets the tolerance waits at most for its one-pass certification.
CERTIFY_WAIT = 10
#: Recovery levels after a failed line search or a stall: 0 = quasi-Newton step, 1 = preconditioned gradient
#: (history dropped), 2 = scaled steepest descent; a failure at the last level stops the problem.
_LAST_LEVEL = 2
#: Armijo's sufficient-decrease constant δ.
_ARMIJO = 1e-4


class Objective(Protocol):
    """G objectives over parameters ``w [G, P]``, each μ-strongly convex."""

    @property
    def strong_convexity(self) -> Tensor:
        """μ of every problem ``[G]`` (a lower bound of the Hessian's eigenvalues)."""
        ...

    def value_grad(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """``w [G, P]`` → (values ``[G]``, gradients ``[G, P]``)."""
        ...

    def precondition(self, v: Tensor) -> Tensor:
        """An SPD approximation of the inverse Hessian applied to ``v [G, P]``."""
        ...

    def select(self, keep: Tensor) -> Objective:
        """The same objective restricted to problems ``keep`` (int64 indices)."""
        ...

    # Optional: ``refresh(w [G, P], budget) -> bool`` re-derives the preconditioner at ``w`` if its cost is worth
    # ``budget`` (the iterations the slow problems still need) (False: kept as it was);
    # ``duality_gap(w, g, f) -> [G]`` a rigorous upper bound of ``f(w) − f*`` (see the module doc);
    # ``shared_passes = False`` when problems do not share their data (each is evaluated on its own rows);
    # ``refresh_horizon``: the further iterations above which a refresh pays (default ``REFRESH_EVERY``).


class _DualityGap(Protocol):
    """The optional part of an :class:`Objective` that certifies convergence (module doc)."""

    def duality_gap(self, w: Tensor, g: Tensor, f: Tensor) -> Tensor:
        """A rigorous upper bound ``[G]`` of ``f(w) − f*``."""
        ...


@dataclass
class LbfgsResult:
    """Per-problem outcome: solutions ``w [G, P]``, values ``f [G]``, iterations ``n_iter [G]`` (int64),
    ``converged [G]`` (certified within ``tol``) and ``gap [G]``, the certified bound of ``f − f*`` (the duality
    gap where the objective has one, else ``‖∇f‖² / 2μ``; same units as f)."""

    w: Tensor
    f: Tensor
    n_iter: Tensor
    converged: Tensor
    gap: Tensor


def gap_bound(g: Tensor, mu: Tensor) -> Tensor:
    """``‖g‖² / (2μ)`` per problem: an upper bound of ``f(w) − f*`` for a μ-strongly convex f. ``g [G, P]``."""
    sq: Tensor = torch.linalg.vecdot(g, g)  # torch's stubs leave linalg.vecdot untyped
    return sq / (2 * mu)


def _acceptable(
    f: Tensor, gd: Tensor, ft: Tensor, gt: Tensor, d: Tensor, t: Tensor | float, band: Tensor
) -> Tensor:
    """Step ``t·d`` from a point with value ``f`` and slope ``gd`` (< 0) to ``(ft, gt)``: Armijo's sufficient
    decrease, or, where the values differ by no more than rounding (``band``), Hager and Zhang's approximate
    Wolfe condition ``φ'(t) ≤ (2δ − 1)·φ'(0)``, which for a quadratic is the same test written with slopes (exact
    where values are not): so steps keep reducing the gradient once the objective no longer resolves progress."""
    armijo = ft <= f + _ARMIJO * t * gd  # NaN compares False → backtrack
    slope: Tensor = torch.linalg.vecdot(gt, d)  # torch's stubs leave linalg.vecdot untyped
    approx = (ft <= f + band) & (slope <= (2 * _ARMIJO - 1) * gd)
    return armijo | approx


def minimize_lbfgs(
    objective: Objective,
    w0: Tensor,
    *,
    max_iter: int = 100,
    tol: float = 1e-4,
    history: int = HISTORY,
    max_ls: int = 50,
    ftol: float | None = None,
    compact_min: int = 16,
    certify: bool = True,
) -> LbfgsResult:
    """Minimise every problem of ``objective`` from ``w0 [G, P]`` until ``gap ≤ tol·|f|`` (module doc).

    ``ftol`` (default ``64·eps`` of ``w0``'s dtype, scipy's L-BFGS-B setting as scikit-learn uses it): a relative
    decrease below it is a stall, answered by a restart, never taken as convergence. ``certify=False``: stop on the
    gap bound alone, for a caller that certifies the results itself (float32 solves re-certified in float64)."""
    if ftol is None:
        ftol = 64 * torch.finfo(w0.dtype).eps
    if hasattr(objective, "refresh"):
        objective = copy.copy(objective)  # refreshes replace its preconditioner: never the caller's object's
    rounding = 64 * torch.finfo(w0.dtype).eps  # relative width of the objective's rounding band
    G, P = w0.shape
    dev, dt = w0.device, w0.dtype
    tiny = torch.finfo(dt).tiny
    out_w, out_f = w0.clone(), torch.zeros(G, dtype=dt, device=dev)
    out_n = torch.zeros(G, dtype=torch.int64, device=dev)
    out_conv = torch.zeros(G, dtype=torch.bool, device=dev)
    out_gap = torch.zeros(G, dtype=dt, device=dev)

    ids = torch.arange(G, device=dev)  # working set → original problem index
    w = w0.clone()
    f, g = objective.value_grad(w)
    mu = objective.strong_convexity.to(dt)
    S = torch.zeros(history, G, P, dtype=dt, device=dev)  # slot-major: S[s] is a contiguous [G, P]
    Yh = torch.zeros_like(S)
    rho = torch.zeros(history, G, dtype=dt, device=dev)  # 1/sᵀy of a valid pair, 0 for an empty/rejected slot
    gam = torch.ones(history, G, dtype=dt, device=dev)  # sᵀy / yᵀPy of the pair (1 where invalid)
    n_iter = torch.zeros(G, dtype=torch.int64, device=dev)
    level = torch.zeros(G, dtype=torch.int64, device=dev)  # recovery level (module doc)
    certifies = certify and hasattr(objective, "duality_gap")
    shared = getattr(objective, "shared_passes", True)  # problems share one pass over the data (module doc)
    # A problem is slow (worth a refresh) when it would need more than this many further iterations.
    horizon = getattr(objective, "refresh_horizon", REFRESH_EVERY)
    # The gap bound with μ is exact for the penalised coefficients but not for the free intercept, whose curvature
    # can be below μ (nearly separable classes at large C): where the objective offers a duality gap, a problem
    # whose bound meets the tolerance is certified by it, and if that fails its bound must first shrink by the
    # observed ratio (``scale``) before the next, one-pass, certification.
    scale = torch.ones(G, dtype=dt, device=dev)

    def certified(
        objective: Objective,
        w: Tensor,
        f: Tensor,
        g: Tensor,
        bound: Tensor,
        scale: Tensor,
        gap: Tensor,
        want: Tensor,
    ) -> Tensor:
        """Problems of ``want`` that are certified; updates ``gap`` and ``scale`` in place."""
        if not certifies or not bool(want.any()):
            return want
        idx = want.nonzero().squeeze(1)
        sub = objective.select(idx) if len(idx) < len(w) else objective
        dual = cast(_DualityGap, sub).duality_gap(w[idx], g[idx], f[idx])  # ``certifies`` checked it has one
        gap[idx] = dual
        ok = dual <= tol * f[idx].abs()
        bad = idx[~ok]
        scale[bad] = torch.maximum(2 * scale[bad], 2 * dual[~ok] / bound[bad].clamp_min(tiny))
        done = want.clone()
        done[bad] = False
        return done

    bound = gap_bound(g, mu)
    gap = bound.clone()
    mark = bound.clone()  # the gap bound at the start of the current refresh window
    waiting = torch.zeros(
        G, dtype=torch.int64, device=dev
    )  # iterations a candidate has waited to be certified
    conv = certified(objective, w, f, g, bound, scale, gap, bound <= tol * f.abs())
    active = ~conv
    num_active = int(active.sum())
    history_start = 0  # the iteration whose pair is the oldest still valid

    def flush(mask: Tensor) -> None:
        out_w[ids[mask]] = w[mask]
        out_f[ids[mask]] = f[mask]
        out_n[ids[mask]] = n_iter[mask]
        out_conv[ids[mask]] = conv[mask]
        out_gap[ids[mask]] = gap[mask]

    for k in range(max_iter):
        if num_active == 0:
            break
        if len(active) >= compact_min and num_active <= 3 * len(active) // 4:
            flush(~active)
            keep = active.nonzero().squeeze(1)
            w, f, g, mu, gap, level = w[keep], f[keep], g[keep], mu[keep], gap[keep], level[keep]
            bound, scale, mark, waiting = bound[keep], scale[keep], mark[keep], waiting[keep]
            S, Yh, rho, gam = S[:, keep], Yh[:, keep], rho[:, keep], gam[:, keep]
            ids, n_iter, conv, active = ids[keep], n_iter[keep], conv[keep], active[keep]
            objective = objective.select(keep)
        if k and k % REFRESH_EVERY == 0:
            # Refresh the preconditioner only where it pays: an active problem is slow when its gap bound, at the rate
            # of the last window, would not reach the tolerance within the next window (a refresh costs K Gram
            # matrices per problem).
            rate = (bound / mark.clamp_min(tiny)).clamp_min(tiny) ** (1.0 / REFRESH_EVERY)
            target = (tol * f.abs() / scale).clamp_min(tiny)
            left = torch.log(target / bound.clamp_min(tiny)) / torch.log(rate.clamp(max=1 - 1e-12))
            slow = active & ((rate >= 1) | (left > horizon))
            mark = bound.clone()
            # The refresh is for the whole working set, so it waits until the slow problems are most of it (the
            # others finish and leave it soon).
            # Its budget: the further iterations the slow problems need at their current rate (at most the rest).
            budget = 0.0
            if bool(slow.any()):
                need = torch.where(rate[slow] >= 1, float(max_iter), left[slow]).clamp(max=max_iter - k)
                budget = float(need.median())
            if (
                2 * int(slow.sum()) >= num_active > 0
                and hasattr(objective, "refresh")
                and objective.refresh(w, budget)
            ):
                # The stored pairs are still curvature of the objective: keep them, rescale with the new metric.
                for s in range(min(k - history_start, history)):
                    y_s = Yh[s]
                    yPy = torch.linalg.vecdot(y_s, objective.precondition(y_s))
                    gam[s] = torch.where((rho[s] > 0) & (yPy > 0), 1.0 / (rho[s] * yPy).clamp_min(tiny), 1.0)
        all_active = num_active == len(active)
        act = active[:, None]

        # Two-loop recursion, newest pair first; invalid slots (empty, or rejected for bad curvature, or dropped
        # by a restart) have ρ = 0, which makes them no-ops.
        num_pairs = min(k - history_start, history)
        slots = [(k - 1 - j) % history for j in range(num_pairs)]
        q = g.clone()
        alphas = []
        for s in slots:
            a = rho[s] * torch.linalg.vecdot(S[s], q)
            q.addcmul_(a[:, None], Yh[s], value=-1.0)
            alphas.append(a)
        r = objective.precondition(q)
        if num_pairs:
            r.mul_(gam[slots[0]][:, None])
        for s, a in zip(reversed(slots), reversed(alphas), strict=True):
            b = rho[s] * torch.linalg.vecdot(Yh[s], r)
            r.addcmul_((a - b)[:, None], S[s])
        d = r.neg_()
        gd = torch.linalg.vecdot(g, d)
        # Not a descent direction, or recovering from a failure: the preconditioned gradient (history dropped),
        # or at the last level a steepest-descent step scaled so that its linear decrease equals |f|.
        plain = (gd >= 0) | (level == 1)
        steep = level >= _LAST_LEVEL
        if bool((plain | steep).any()):
            reset = plain | steep
            d = torch.where(plain[:, None], -objective.precondition(g), d)
            sd_step = f.abs() / torch.linalg.vecdot(g, g).clamp_min(tiny)
            d = torch.where(steep[:, None], -g * sd_step[:, None], d)
            gd = torch.linalg.vecdot(g, d)
            rho[:, reset] = 0.0  # forget the history (and its scaling) of those problems
            gam[:, reset] = 1.0

        # Armijo backtracking from the unit step, per problem (with the approximate condition near rounding).
        band = rounding * f.abs()
        trial = w + d
        ft, gt = objective.value_grad(trial)
        ok = _acceptable(f, gd, ft, gt, d, 1.0, band)
        if not all_active:
            ok &= active
        searching = active & ~ok
        if bool(ok.all()):  # the usual case: no blend needed
            w_new, f_new, g_new = trial, ft, gt
        else:
            okc = ok[:, None]
            w_new, f_new, g_new = torch.where(okc, trial, w), torch.where(ok, ft, f), torch.where(okc, gt, g)
        if bool(searching.any()):
            # Usually few problems backtrack: shorter steps are evaluated on those problems only.
            sub = searching.nonzero().squeeze(1)
            sub_objective = objective.select(sub) if len(sub) < len(w) else objective
            ws, ds, fs, gds, bs = w[sub], d[sub], f[sub], gd[sub], band[sub]
            wn, fn, gn, looking = w_new[sub], f_new[sub], g_new[sub], searching[sub]
            ts = torch.full_like(fs, 0.5)
            for _ in range(max_ls - 1):
                trial = ws + ts[:, None] * ds
                ft, gt = sub_objective.value_grad(trial)
                ok = looking & _acceptable(fs, gds, ft, gt, ds, ts, bs)
                wn = torch.where(ok[:, None], trial, wn)
                fn = torch.where(ok, ft, fn)
                gn = torch.where(ok[:, None], gt, gn)
                looking &= ~ok
                if not bool(looking.any()):
                    break
                ts = torch.where(looking, 0.5 * ts, ts)
            w_new[sub], f_new[sub], g_new[sub], searching[sub] = wn, fn, gn, looking
        failed = searching
        accepted = active & ~failed

        # New curvature pair (s, y) in slot k mod m; a pair failing the curvature test gets ρ = 0 (ignored).
        slot = k % history
        step = torch.sub(w_new, w, out=S[slot])
        dgrad = torch.sub(g_new, g, out=Yh[slot])
        if not all_active:  # finished problems keep w: their pair is zero and must read as invalid
            step.mul_(act)
            dgrad.mul_(act)
        sy = torch.linalg.vecdot(step, dgrad)
        update = accepted & (sy > 1e-10 * torch.linalg.vecdot(dgrad, dgrad))
        rho[slot] = torch.where(update, 1.0 / sy.clamp_min(tiny), 0.0)
        yPy = torch.linalg.vecdot(dgrad, objective.precondition(dgrad))
        gam[slot] = torch.where(update & (yPy > 0), sy / yPy.clamp_min(tiny), 1.0)

        rel_decrease = (f - f_new) / torch.maximum(
            torch.maximum(f.abs(), f_new.abs()), torch.full_like(f, tiny)
        )
        w, f, g = w_new, f_new, g_new
        n_iter += accepted.long()
        bound_old, bound = bound, gap_bound(g, mu)
        gap = torch.where(accepted, bound, gap)
        want = accepted & (bound * scale <= tol * f.abs())
        waiting = torch.where(want, waiting + 1, torch.zeros_like(waiting))
        if certifies and shared:
            # A certificate costs a pass over the data whether it is for one problem or for all that share it, so
            # candidates wait until half the active problems are candidates, or CERTIFY_WAIT iterations.
            ready = 2 * int(want.sum()) >= num_active or bool((waiting >= CERTIFY_WAIT).any())
            want = want if ready else torch.zeros_like(want)
        done = certified(objective, w, f, g, bound, scale, gap, want)
        waiting = torch.where(done, torch.zeros_like(waiting), waiting)
        conv |= done
        # A failed search, or a step that moved neither the objective nor (by half) the gap bound, escalates the
        # recovery level; real progress returns to quasi-Newton steps.
        stalled = active & ~done & (failed | ((rel_decrease <= ftol) & (bound > 0.5 * bound_old)))
        gave_up = stalled & (level >= _LAST_LEVEL)
        if certifies and bool(gave_up.any()):  # its final word: the rigorous gap where it stopped
            conv |= certified(objective, w, f, g, bound, scale, gap, gave_up)
        level = torch.where(stalled, level + 1, torch.where(accepted, torch.zeros_like(level), level))
        active &= ~done & ~gave_up
        num_active = int(active.sum())

    if (
        certifies
    ):  # out of iterations: the rigorous gap where they stopped (certified if it meets tol after all)
        conv |= certified(objective, w, f, g, bound, scale, gap, active & ~conv)
    flush(torch.ones(len(w), dtype=torch.bool, device=dev))
    return LbfgsResult(out_w, out_f, out_n, out_conv, out_gap)
