"""Batched L-BFGS: minimise G independent smooth convex objectives at once.

torch.optim.LBFGS solves one problem; here every problem keeps its own curvature history, step size,
line search and stopping test, so a problem's iterates do not depend on which other problems share the
batch (batched results equal one-at-a-time results up to floating-point summation order). Finished
problems are dropped from the working set (``Objective.select``) once a quarter of it has finished, so
stragglers do not pay for the whole batch.

Stopping mirrors scipy's L-BFGS-B as scikit-learn calls it: ``max|grad| <= tol`` (gtol), or a relative
decrease of the objective below ``ftol``, or ``max_iter`` iterations; a problem whose Armijo backtracking
fails stops where it is.

Cost model (why it is hand-written this way): with thousands of tiny problems (few-shot episodes, P ≈ 100
parameters each) every tensor operation touches only a few hundred kB, so the run time is the number of
operations per iteration, not arithmetic. The history is stored slot-major (``[m, G, P]``, each slot
contiguous); the scaling ``γ = sᵀy / yᵀPy`` of the newest pair is computed once when the pair is stored
rather than in every two-loop; rejected pairs are marked by ``ρ = 0`` (a no-op in the two-loop) instead of
masked copies; and accept/reject blends use a ``[G, 1]`` mask (``torch.where`` with a full ``[G, P]`` bool
mask is several times slower on CPU).
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
    """Minimise every problem of ``objective`` from ``w0 [G, P]``; returns per-problem results.

    ``ftol`` defaults to ``64·eps`` of ``w0``'s dtype (scikit-learn's choice for scipy's L-BFGS-B)."""
    if ftol is None:
        ftol = 64 * torch.finfo(w0.dtype).eps
    G, P = w0.shape
    dev, dt = w0.device, w0.dtype
    tiny = torch.finfo(dt).tiny
    out_w, out_f = w0.clone(), torch.zeros(G, dtype=dt, device=dev)
    out_n = torch.zeros(G, dtype=torch.int64, device=dev)
    out_conv = torch.zeros(G, dtype=torch.bool, device=dev)

    ids = torch.arange(G, device=dev)  # working set → original problem index
    w = w0.clone()
    f, g = objective.value_grad(w)
    S = torch.zeros(history, G, P, dtype=dt, device=dev)  # slot-major: S[s] is a contiguous [G, P]
    Yh = torch.zeros_like(S)
    rho = torch.zeros(history, G, dtype=dt, device=dev)  # 1/sᵀy of a valid pair, 0 for an empty/rejected slot
    gam = torch.ones(history, G, dtype=dt, device=dev)  # sᵀy / yᵀPy of the pair (1 where invalid)
    n_iter = torch.zeros(G, dtype=torch.int64, device=dev)
    conv = g.abs().amax(1) <= tol
    active = ~conv
    num_active = int(active.sum())

    def flush(mask: Tensor) -> None:
        out_w[ids[mask]] = w[mask]
        out_f[ids[mask]] = f[mask]
        out_n[ids[mask]] = n_iter[mask]
        out_conv[ids[mask]] = conv[mask]

    for k in range(max_iter):
        if num_active == 0:
            break
        if len(active) >= compact_min and num_active <= 3 * len(active) // 4:
            flush(~active)
            keep = active.nonzero().squeeze(1)
            w, f, g = w[keep], f[keep], g[keep]
            S, Yh, rho, gam = S[:, keep], Yh[:, keep], rho[:, keep], gam[:, keep]
            ids, n_iter, conv, active = ids[keep], n_iter[keep], conv[keep], active[keep]
            objective = objective.select(keep)
        all_active = num_active == len(active)
        act = active[:, None]

        # Two-loop recursion, newest pair first; invalid slots (empty, or rejected for bad curvature) have ρ = 0,
        # which makes them no-ops.
        num_pairs = min(k, history)
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
        bad = gd >= 0  # not a descent direction: restart from the preconditioned gradient
        if bool(bad.any()):
            d[bad] = -objective.precondition(g)[bad]
            gd = torch.linalg.vecdot(g, d)
            rho[:, bad] = 0.0  # forget the history (and its scaling) of those problems
            gam[:, bad] = 1.0

        # Armijo backtracking from the unit (quasi-Newton) step, per problem.
        trial = w + d
        ft, gt = objective.value_grad(trial)
        ok = ft <= f + 1e-4 * gd  # NaN compares False → backtrack
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

        rel_decrease = (f - f_new) / torch.maximum(torch.maximum(f.abs(), f_new.abs()), torch.ones_like(f))
        w, f, g = w_new, f_new, g_new
        n_iter += accepted.long()
        done = accepted & ((g.abs().amax(1) <= tol) | (rel_decrease <= ftol))
        conv |= done
        active &= ~done & ~failed
        num_active = int(active.sum())

    flush(torch.ones(len(w), dtype=torch.bool, device=dev))
    return LbfgsResult(out_w, out_f, out_n, out_conv)
