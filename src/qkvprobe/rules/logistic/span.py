"""Few-shot problems in the span of their training rows: the exact same optimum with n instead of D unknowns.

Few samples, wide features (few-shot: n = N·K ≤ D): the optimal W lies in the span of the training features
(representer theorem — every gradient of the loss and of the penalty does), so the problem is solved exactly in
an orthonormal basis of that span (from a factorisation of the n×n Gram matrix of the centred rows; the mean goes
into the unpenalised intercept): n instead of D unknowns per class, ``‖W‖ = ‖Z‖``, ``W = Q·Z`` afterwards, and a
diagonal preconditioner because the reduced columns are uncorrelated (eigen basis) or nearly so (Cholesky basis).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..batched import bmm
from .loss import class_shares, default_dtype, dual_sums, duality_gap, num_logits
from .precondition import class_curvature, curvature_preconditioner, per_class_step


class SpanLogistic:
    """G span-reduced logistic-regression problems (few-shot episodes): ``X [G, n, D1]`` with centred, mutually
    orthogonal columns and a trailing column of ones, so the preconditioner is diagonal.

    Same scaled objective as :class:`.dense.DenseLogistic` (equal values and gradients, tested), written for
    thousands of tiny problems, where the cost is the number and shape of kernel calls rather than arithmetic:
    parameters ``w [G, Kf·D1]`` are laid out class-major (W ``[G, Kf, D1]``) and ``Xᵀ`` is kept contiguous, so
    both products are ``[Kf, ·] @ [·, ·]`` batched matmuls with contiguous operands (``X @ W`` with a
    ``[D1, Kf]`` right operand is several times slower in float32 on CPU); the softmax reuses its exponentials,
    and the penalty is one fused multiply-add. ``benchmarks/bench_rules.py fewshot`` measures the whole path.

    Args:
        X: ``[G, n, D1]`` reduced features (:func:`span_reduce`, then ``loss.augment``). y: ``[G, n]`` codes.
        sw: ``[G, n]`` sample weights. C: ``[G]``. num_classes: K. XT: ``Xᵀ`` contiguous, when already made."""

    #: Every episode has its own rows: certifying some of them costs only theirs (``lbfgs`` certifies at once).
    shared_passes = False
    #: Block preconditioners make every later iteration of these tiny problems several times dearer: refresh only
    #: for problems that would otherwise need many more iterations (nearly separable episodes at large C).
    refresh_horizon = 100
    #: L-BFGS curvature pairs: these small, well-preconditioned problems take about as many iterations with 5 pairs
    #: as with 10, at half the two-loop's cost (``benchmarks/bench_rules.py fewshot``).
    history = 5

    def __init__(
        self, X: Tensor, y: Tensor, sw: Tensor, C: Tensor, num_classes: int, XT: Tensor | None = None
    ) -> None:
        D1 = X.shape[2]
        self.X, self.y, self.sw, self.C, self.num_classes = X, y, sw, C, num_classes
        self.kf = num_logits(num_classes)
        self.XT = X.transpose(1, 2).contiguous() if XT is None else XT  # [G, D1, n]
        sw_sum = sw.sum(1)
        self.reg = 1.0 / (C * sw_sum)  # [G] l2 strength of the scaled objective
        self.weights = (sw / sw_sum[:, None])[:, None, :]  # [G, 1, n]
        moment = bmm(self.weights, X * X)[:, 0]  # [G, D1]: diagonal second moment (orthogonal columns)
        ridge = torch.ones(D1, dtype=X.dtype, device=X.device)
        ridge[-1] = 0.0  # the intercept is not penalised
        curvature = 0.25 if num_classes == 2 else 1.0 / num_classes
        tiny = torch.finfo(X.dtype).tiny
        P = 1.0 / (curvature * moment + self.reg[:, None] * ridge).clamp_min(tiny)
        self.P = P.repeat(1, self.kf)  # [G, Kf·D1], the parameters' layout
        self.ridge = (self.reg[:, None] * ridge).repeat(1, self.kf)
        if num_classes == 2:
            self.target = y.to(X.dtype)
            self.sign = 1 - 2 * self.target
        else:  # weighted one-hot targets [G, Kf, n]: loss and residual need no gather/scatter
            self.target = (
                torch.nn.functional.one_hot(y, num_classes).to(X.dtype).transpose(1, 2) * self.weights
            )
        self.yidx = y[:, None, :]  # [G, 1, n]

    def select(self, keep: Tensor) -> SpanLogistic:
        # Index every per-problem tensor rather than re-deriving them: the line search selects every iteration.
        out = object.__new__(SpanLogistic)
        out.num_classes, out.kf = self.num_classes, self.kf
        names = ("X", "XT", "y", "sw", "C", "reg", "weights", "P", "ridge", "yidx", "target")
        for name in names + (("sign",) if self.num_classes == 2 else ()):
            setattr(out, name, getattr(self, name).index_select(0, keep))
        return out

    @property
    def strong_convexity(self) -> Tensor:
        """μ per problem ``[G]``: the penalty's strength in the scaled form."""
        return self.reg

    def precondition(self, v: Tensor) -> Tensor:
        if self.P.dim() == 2:  # diagonal
            return self.P * v
        # per-class blocks [G, Kf, D1, D1] after a refresh (class-major layout)
        return per_class_step(self.P, v.view(v.shape[0], self.kf, -1), self.reg).reshape(v.shape)

    def refresh(self, w: Tensor, budget: float = 0.0) -> bool:
        """Re-precondition with the per-class curvature blocks of the Hessian at ``w`` (class-major layout):
        nearly separable episodes at large C curve far from the diagonal of their start. False when a block is
        not numerically positive definite (the preconditioner is kept)."""
        G = w.shape[0]
        W = w.view(G, self.kf, -1).transpose(1, 2)
        H = class_curvature(self.X, self.weights[:, 0], W, self.num_classes)  # [G, Kf, D1, D1]
        P = curvature_preconditioner(H, self.reg)
        if P is None:
            return False
        self.P = P
        return True

    def duality_gap(self, w: Tensor, g: Tensor, f: Tensor) -> Tensor:
        """``f(w) − dual`` ``[G]``: a rigorous upper bound of ``f(w) − f*`` (``loss.dual_sums``)."""
        G = w.shape[0]
        W = w.view(G, self.kf, -1).transpose(1, 2)
        gbar = g.view(G, self.kf, -1)[:, :, -1]
        weights = self.weights[:, 0]
        mass = gbar + class_shares(self.y, weights, self.num_classes)
        L, H, V = dual_sums(self.X, self.y, weights, W, self.num_classes, gbar, mass)
        return duality_gap(W, L, H, V, self.reg)

    def value_grad(self, w: Tensor) -> tuple[Tensor, Tensor]:
        G = w.shape[0]
        z = bmm(w.view(G, self.kf, -1), self.XT)  # [G, Kf, n]
        if self.num_classes == 2:
            z1 = self.sign * z[:, 0]  # sign 1 − 2t: no cancellation (see loss._logistic_block)
            f = torch.linalg.vecdot(self.weights[:, 0], torch.nn.functional.softplus(z1))
            resid = (self.sign * torch.sigmoid(z1))[:, None] * self.weights
        else:
            # Softmax over the short class axis, by hand: torch's (log_)softmax/logsumexp/amax over it cost
            # several times more here. Shifting by the max keeps each sample's loss accurate (lse − z_y would
            # cancel in float32 and stall the line search near the optimum).
            if self.kf <= 8:
                zmax = z[:, :1]
                for k in range(1, self.kf):
                    zmax = torch.maximum(zmax, z[:, k : k + 1])
            else:
                zmax = z.amax(1, keepdim=True)
            z = z - zmax
            resid = z.exp()
            # log Σ exp = log1p(s), s summing all but the largest term (which is exactly 1; ties add 1 each):
            # log(total) would round the small losses of confidently classified rows away.
            at_max = z == 0
            total = resid.sum(1, keepdim=True)  # [G, 1, n]
            s = torch.where(at_max, 0.0, resid).sum(1, keepdim=True) + (at_max.sum(1, keepdim=True) - 1)
            loss = torch.log1p(s) - z.gather(1, self.yidx)
            f = torch.linalg.vecdot(self.weights[:, 0], loss[:, 0])
            resid.mul_(self.weights / total).sub_(self.target)  # w_i · (softmax − one-hot)
        penalty = self.ridge * w
        f = f + 0.5 * torch.linalg.vecdot(penalty, w)
        grad = bmm(resid, self.X).view(G, -1).add_(penalty)
        return f, grad


@dataclass
class SpanReduction:
    """Few-shot problems rewritten in coordinates of their (centred) training rows.

    ``X [G, n, n]`` reduced features (solver dtype, centred columns), ``proj [G, n, n]`` (float64) maps reduced
    coefficients to row weights (``coef = (proj·Z)ᵀ·(X − mean)``), ``mean [G, D]``. The eigen basis
    (``proj`` = U·Λ^-½) also makes the columns uncorrelated; the Cholesky basis (``proj`` = L^-ᵀ) does not."""

    X: Tensor
    proj: Tensor
    mean: Tensor


def _centred(X: Tensor, sw: Tensor | None, mean: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Rows minus the mean of the valid rows (``sw > 0``; ``sw=None``: all rows), invalid rows zeroed."""
    if sw is None:
        mean = X.mean(1) if mean is None else mean
        return X - mean[:, None], mean
    mask = (sw > 0).to(X.dtype)[..., None]
    if mean is None:
        mean = (X * mask).sum(1) / mask.sum(1).clamp_min(1)
    return (X - mean[:, None]) * mask, mean


# Cholesky basis: a problem whose smallest pivot² is below this share of its largest goes to the eigen basis
# (nearly dependent support rows: duplicates, more rows than feature dimensions).
CHOLESKY_MIN_PIVOT = 1e-4


def _eigen_basis(gram: Tensor, rel: float) -> tuple[Tensor, Tensor]:
    evals, U = torch.linalg.eigh(gram)
    tiny = torch.finfo(evals.dtype).tiny
    keep = evals > evals.amax(1, keepdim=True).clamp_min(tiny) * rel
    root = torch.where(keep, evals.clamp_min(0).sqrt(), 0.0)
    inv_root = torch.where(keep, 1.0 / root.clamp_min(tiny), 0.0)
    return U * root[:, None, :], U * inv_root[:, None, :]


def _cholesky_basis(gram: Tensor, rel: float) -> tuple[Tensor, Tensor]:
    """Coordinates of the centred rows from a Cholesky factor instead of an eigendecomposition (several times
    cheaper for many 25×25 problems, ``benchmarks/bench_rules.py kernels``; the L-BFGS then takes about one more
    iteration, since the columns are correlated).

    The centred Gram matrix is singular (its rows sum to zero), so the factor is of ``gram + s·11ᵀ``: the Gram
    matrix of the rows with an extra constant coordinate √s. Its rows are coordinates in an orthonormal basis
    of that (D+1)-dimensional row space; centring them removes the constant coordinate from every logit, so
    the extra direction only meets the penalty and is 0 at the optimum — the reduced problem is the original
    one. ``proj = L⁻ᵀ`` maps coordinates back to row weights."""
    n = gram.shape[1]
    s = gram.diagonal(dim1=1, dim2=2).sum(1) / (n * max(n - 1, 1))
    L, info = torch.linalg.cholesky_ex(gram + s[:, None, None])
    pivots = L.diagonal(dim1=1, dim2=2).square()
    bad = (info != 0) | ~(pivots.amin(1) > pivots.amax(1) * CHOLESKY_MIN_PIVOT)  # NaN counts as bad
    eye = torch.eye(n, dtype=L.dtype, device=L.device)
    L = torch.where(bad[:, None, None], eye, L)  # placeholders, replaced below
    Z = L - L.mean(1, keepdim=True)
    proj = torch.linalg.solve_triangular(L.mT, eye.expand_as(L), upper=True)
    if bool(bad.any()):
        Z[bad], proj[bad] = _eigen_basis(gram[bad], rel)
    return Z, proj


def span_reduce(
    X: Tensor,
    sw: Tensor | None,
    solve_dtype: torch.dtype | None = None,
    *,
    overwrite: bool = False,
    basis: str = "eigen",
) -> SpanReduction:
    """``X [G, n, D]`` (any float dtype) → :class:`SpanReduction`. Centring moves the mean into the unpenalised
    intercept. ``basis="eigen"``: the reduced columns are uncorrelated (diagonal preconditioner exact) and
    directions with (numerically) zero variance get a zero column; ``"cholesky"``: see :func:`_cholesky_basis`
    (problems with nearly dependent rows fall back to the eigen basis). The Gram matrix is accumulated and
    factorised in float64 whatever X's dtype: with float32 features of very unequal column scales (an outlier
    dimension), a float32 Gram matrix loses the small-variance directions, and with them the problem; the reduced
    features come back in ``solve_dtype``. ``sw=None``: every row is a training row (no padding; required for
    ``"cholesky"``).
    ``overwrite``: X is a scratch buffer and may be centred in place (saves a pass and an allocation per call
    in the few-shot loop)."""
    solve_dtype = solve_dtype or default_dtype(X.device)
    if overwrite and sw is None:
        mean = X.mean(1)
        Xm = X.sub_(mean[:, None])
    else:
        Xm, mean = _centred(X, sw)
    if basis not in ("eigen", "cholesky"):
        raise ValueError(f"basis={basis!r}; use 'eigen' or 'cholesky'")
    X64 = Xm.to(torch.float64)
    gram = bmm(X64, X64.transpose(1, 2))
    rel = X.shape[1] * torch.finfo(torch.float64).eps * 10
    Z, proj = _cholesky_basis(gram, rel) if basis == "cholesky" and sw is None else _eigen_basis(gram, rel)
    return SpanReduction(Z.to(solve_dtype), proj, mean)


def span_expand(red: SpanReduction, X: Tensor, sw: Tensor | None, W: Tensor) -> tuple[Tensor, Tensor]:
    """Reduced solution ``W [G, n+1, Kf]`` → (``coef [G, Kf, D]``, ``intercept [G, Kf]``) in X's dtype.

    Computed in float64: ``Aᵀ·X − (ΣA)·meanᵀ`` subtracts large, nearly equal terms where a feature's mean is
    large next to its spread, which float32 cannot resolve."""
    A = bmm(red.proj.to(torch.float64), W[:, :-1].to(torch.float64))  # [G, n, Kf] weight of every centred row
    if sw is not None:
        A = A * (sw > 0).to(A.dtype)[..., None]
    X64, mean = X.to(torch.float64), red.mean.to(torch.float64)
    # Aᵀ·(X − 1·meanᵀ) without materialising the centred rows (a pass over [G, n, D] saved).
    coef = bmm(A.transpose(1, 2), X64) - A.sum(1)[..., None] * mean[:, None, :]
    intercept = W[:, -1].to(torch.float64) - torch.linalg.vecdot(coef, mean[:, None, :])  # undo the centring
    return coef.to(X.dtype), intercept.to(X.dtype)
