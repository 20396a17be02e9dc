"""Batched L-BFGS: minimise G independent smooth convex objectives at once.

torch.optim.LBFGS solves one problem; here every problem keeps its own curvature history, step size,
line search and stopping test, so a problem's iterates do not depend on which other problems share the
batch (batched results equal one-at-a-time results up to floating-point summation order). Finished
problems are dropped from the working set (``Objective.select``) once at most half remain, so stragglers
do not pay for the whole batch.

Stopping mirrors scipy's L-BFGS-B as scikit-learn calls it: ``max|grad| <= tol`` (gtol), or a relative
decrease of the objective below ``ftol``, or ``max_iter`` iterations; a problem whose Armijo backtracking
fails stops where it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


class Objective(Protocol):
    """G objectives over parameters ``w [G, P]``."""

    def value_grad(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """``w [G, P]`` → (values ``[G]``, gradients ``[G, P]``)."""
        ...

    def precondition(self, v: Tensor) -> Tensor:
        """An SPD approximation of the inverse Hessian applied to ``v [G, P]``."""
        ...

    def select(self, keep: Tensor) -> Objective:
        """The same objective restricted to problems ``keep`` (int64 indices)."""
        ...


@dataclass
class LbfgsResult:
    w: Tensor  # [G, P] solutions
    f: Tensor  # [G] objective values
    n_iter: Tensor  # [G] int64 iterations taken
    converged: Tensor  # [G] bool: gradient or objective-decrease test met


def minimize_lbfgs(
    objective: Objective,
    w0: Tensor,
    *,
    max_iter: int = 100,
    tol: float = 1e-4,
    history: int = 10,
    max_ls: int = 50,
    ftol: float | None = None,
    compact_min: int = 16,
) -> LbfgsResult:
    """Minimise every problem of ``objective`` from ``w0 [G, P]``; returns per-problem results."""
    if ftol is None:
        ftol = 64 * torch.finfo(w0.dtype).eps  # scikit-learn's choice for scipy's L-BFGS-B
    G, P = w0.shape
    dev, dt = w0.device, w0.dtype
    out_w, out_f = w0.clone(), torch.zeros(G, dtype=dt, device=dev)
    out_n = torch.zeros(G, dtype=torch.int64, device=dev)
    out_conv = torch.zeros(G, dtype=torch.bool, device=dev)

    ids = torch.arange(G, device=dev)  # working set → original problem index
    w = w0.clone()
    f, g = objective.value_grad(w)
    S = torch.zeros(G, history, P, dtype=dt, device=dev)
    Yh = torch.zeros_like(S)
    rho = torch.zeros(G, history, dtype=dt, device=dev)
    n_iter = torch.zeros(G, dtype=torch.int64, device=dev)
    conv = g.abs().amax(1) <= tol
    active = ~conv

    def flush(mask: Tensor) -> None:
        out_w[ids[mask]] = w[mask]
        out_f[ids[mask]] = f[mask]
        out_n[ids[mask]] = n_iter[mask]
        out_conv[ids[mask]] = conv[mask]

    for k in range(max_iter):
        if not bool(active.any()):
            break
        if len(active) >= compact_min and int(active.sum()) <= len(active) // 2:
            flush(~active)
            keep = active.nonzero().squeeze(1)
            w, f, g, S, Yh, rho = w[keep], f[keep], g[keep], S[keep], Yh[keep], rho[keep]
            ids, n_iter, conv, active = ids[keep], n_iter[keep], conv[keep], active[keep]
            objective = objective.select(keep)

        # Two-loop recursion, newest pair first; invalid slots (empty, or skipped for bad curvature) are no-ops.
        num_pairs = min(k, history)
        slots = [(k - 1 - j) % history for j in range(num_pairs)]
        q = g.clone()
        alphas = []
        for s in slots:  # rho is 0 on invalid slots, which makes them no-ops
            a = rho[:, s] * torch.linalg.vecdot(S[:, s], q)
            q.addcmul_(a[:, None], Yh[:, s], value=-1.0)
            alphas.append(a)
        r = objective.precondition(q)
        if num_pairs:
            s = slots[0]
            yPy = torch.linalg.vecdot(Yh[:, s], objective.precondition(Yh[:, s]))
            gamma = torch.where((rho[:, s] > 0) & (yPy > 0), 1.0 / (rho[:, s] * yPy).clamp_min(1e-300), 1.0)
            r.mul_(gamma[:, None])
        for s, a in zip(reversed(slots), reversed(alphas), strict=True):
            b = rho[:, s] * torch.linalg.vecdot(Yh[:, s], r)
            r.addcmul_((a - b)[:, None], S[:, s])
        d = -r
        gd = (g * d).sum(1)
        bad = gd >= 0  # not a descent direction: restart from the preconditioned gradient
        if bool(bad.any()):
            d[bad] = -objective.precondition(g)[bad]
            gd = (g * d).sum(1)
            rho[bad] = 0.0

        # Armijo backtracking from the unit (quasi-Newton) step, per problem.
        searching = active.clone()
        trial = w + d
        ft, gt = objective.value_grad(trial)
        ok = searching & (ft <= f + 1e-4 * gd)  # NaN compares False → backtrack
        # torch.where, not masked assignment: index_put with a boolean mask costs several times more here.
        w_new = torch.where(ok[:, None], trial, w)
        f_new = torch.where(ok, ft, f)
        g_new = torch.where(ok[:, None], gt, g)
        searching &= ~ok
        if bool(searching.any()):
            # Usually few problems backtrack: shorter steps are evaluated on those problems only.
            sub = searching.nonzero().squeeze(1)
            sub_objective = objective.select(sub) if len(sub) < len(w) else objective
            ws, ds, fs, gds = w[sub], d[sub], f[sub], gd[sub]
            wn, fn, gn, looking = w_new[sub], f_new[sub], g_new[sub], searching[sub]
            ts = torch.full_like(fs, 0.5)
            for _ in range(max_ls - 1):
                trial = ws + ts[:, None] * ds
                ft, gt = sub_objective.value_grad(trial)
                ok = looking & (ft <= fs + 1e-4 * ts * gds)
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

        step, dgrad = w_new - w, g_new - g
        sy = (step * dgrad).sum(1)
        slot = k % history
        update = accepted & (sy > 1e-10 * (dgrad * dgrad).sum(1))
        S[:, slot] = torch.where(update[:, None], step, S[:, slot])
        Yh[:, slot] = torch.where(update[:, None], dgrad, Yh[:, slot])
        rho[:, slot] = torch.where(update, 1.0 / sy.clamp_min(1e-300), 0.0)

        rel_decrease = (f - f_new) / torch.maximum(torch.maximum(f.abs(), f_new.abs()), torch.ones_like(f))
        w, f, g = w_new, f_new, g_new
        n_iter += accepted.long()
        done = accepted & ((g.abs().amax(1) <= tol) | (rel_decrease <= ftol))
        conv |= done
        active = active & ~done & ~failed

    flush(torch.ones(len(w), dtype=torch.bool, device=dev))
    return LbfgsResult(out_w, out_f, out_n, out_conv)
