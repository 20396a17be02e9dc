"""The hyperplane rule: L2-penalised logistic regression on raw features, solved in torch, batched.

Objective (scikit-learn's, so results are comparable): ``C · Σ_i sw_i · logloss_i + ½‖W‖²`` with the
intercept unpenalised; multinomial for K > 2 classes, binary (one weight vector, ``coef_ [1, D]``) for
K = 2, as ``sklearn.linear_model.LogisticRegression`` does. Like scikit-learn we minimise it divided by
``C · Σ sw`` (same optimum, gradient scale independent of n) and stop when ``max|grad| <= tol``.

Batching: ``fit_hyperplane_batched`` solves G problems (token types, C values or few-shot episodes) stacked
as ``X [G, n, D]`` with one batched L-BFGS (:mod:`.lbfgs`); ``fit_hyperplane_path`` walks a C grid with warm
starts. The L-BFGS is preconditioned with ``(Σ̂ / K + diag(1/(C·Σsw)))⁻¹`` where ``Σ̂`` is the second-moment
matrix of the (intercept-augmented) features — the Hessian at W = 0 up to the softmax weights — computed on
at most ``PRECOND_ROWS`` rows. Raw ViT features are far from isotropic; without it L-BFGS needs many times
more iterations. The preconditioner changes the path, never the optimum.

A warm-started solve (the next C of a path, the refit at the chosen C) starts where many samples are already
classified with confidence and barely curve the loss, so the Hessian is far from its W = 0 form. There, when
the data are large enough for it to be cheap (``CURVATURE_MAX_EVALS``), the preconditioner is instead the inverse
of the per-class blocks of the Hessian at the starting point, ``Σ_i w_i p_ik (1 − p_ik) x_i x_iᵀ + reg`` (class
couplings dropped), from at most ``CURVATURE_ROWS`` strided rows. Measured on a 2-core CPU, along warm-started C
paths: the built-in DINO model's ``ffn`` patch tokens of 2 000 Scenes (98 000 rows), C = 0.01, 0.1, 1 after the
previous C, 69, 95, 25 → 10, 8, 10 iterations; ``benchmarks/bench_rules.py precond`` (synthetic, 2 × 60 000 × 192)
39.4 → 25.2 s. The standard protocols fit each C from W = 0 and warm-start only the refit; there
``bench_rules.py precond STORE`` (all of Fashion-MNIST, DINO ``q`` and ``ffn`` at cls, one thread) ran 87.5 →
72.1 s. At tolerances far below the protocol's (1e-7) it can need more iterations than the W = 0 preconditioner
near the optimum (121 → 192 on a synthetic 64-d problem); the protocol's 1e-4 is where it pays.

Few samples, wide features (few-shot: n = N·K ≤ D): the optimal W lies in the span of the training features
(representer theorem — every gradient of the loss and of the penalty does), so we solve exactly the same
problem in an orthonormal basis of that span (from the eigen-decomposition of the n×n Gram matrix of the
centred rows; the mean goes into the unpenalised intercept): n instead of D unknowns per class,
``‖W‖ = ‖Z‖``, W = Q·Z afterwards, and a diagonal preconditioner because the reduced columns are uncorrelated.

Class weights (``class_weight="balanced"`` or a ``{label: weight}`` dict) multiply the sample weights as in
scikit-learn: "balanced" gives class k the weight ``Σsw / (K · Σ_{y_i=k} sw_i)`` (scikit-learn ≥ 1.6 also counts
classes by sample weight), so every class carries the same total weight whatever its number of samples.

``max_iter`` defaults to 300 (scikit-learn: 100): the stopping rule is the same, and a fit that converges
stops long before; scikit-learn often stops at 100 unconverged for large C on raw features.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator
from torch import Tensor

from ..errors import RuleError
from ._checks import as_features, check_C, check_fitted, check_labels_known, check_width, encode_labels
from ._matmul import bmm
from .lbfgs import minimize_lbfgs

#: Rows used to estimate the preconditioner's feature second moments (an approximation is enough).
PRECOND_ROWS = 20_000
#: Rows used to estimate a warm start's per-class curvature blocks (K Gram matrices: kept cheaper).
CURVATURE_ROWS = 4_096
#: Use the curvature preconditioner when its K Gram matrices cost at most this many loss/gradient evaluations,
#: estimated as rows·D / (7·n) (measured on a 2-core CPU, D = 193, K = 10–11: 21–30 evaluations for
#: 1 800–5 300 rows). Measured in the default study, then with warm-started C sweeps: the Scenes sweeps (5 300
#: patch rows, estimate 21) ran 19.2 → 11.0 s with it, the batched Fashion-MNIST sweeps (1 800 rows, estimate 28)
#: 10.0 → 12.7 s, so the line is between; with many rows (all of Fashion-MNIST: estimate 2) it costs a few
#: evaluations for hundreds saved.
CURVATURE_MAX_EVALS = 24
DEFAULT_MAX_ITER = 300
DEFAULT_TOL = 1e-4
#: Bytes of X per block of rows in a CPU loss/gradient pass (see ``logistic_sums``): fits the last-level cache.
CPU_BLOCK_BYTES = 3 * 1024**2 // 2
#: Memory of one batch of a C grid fitted together (solver state; off the CPU also a pass's logits): ``grid_step``.
GRID_BYTES = 512 * 1024**2
#: L-BFGS curvature pairs kept for span-reduced (few-shot) problems, see ``solve_logistic``.
SPAN_HISTORY = 5


def balanced_class_weights(counts: Tensor) -> Tensor:
    """scikit-learn's "balanced" weights from (weighted) class counts ``[..., K]``: ``Σcounts / (K' · count_k)``,
    K' = classes present; absent classes get 0 (they have no rows to weigh)."""
    present = (counts > 0).sum(-1, keepdim=True).clamp(min=1)
    w = counts.sum(-1, keepdim=True) / (present * counts.clamp(min=torch.finfo(counts.dtype).tiny))
    return torch.where(counts > 0, w, torch.zeros_like(w))


def balanced_sample_weight(y: Tensor, sample_weight: Tensor, num_classes: int) -> Tensor:
    """``class_weight="balanced"`` for G problems at once: ``y [G, n]`` codes, ``sample_weight [G, n]`` (0 = padding
    or ignored, so not counted) → ``sample_weight · Σsw / (K_g · Σ_{y=k} sw)`` ``[G, n]``, K_g = classes present."""
    counts = torch.zeros(y.shape[0], num_classes, dtype=sample_weight.dtype, device=sample_weight.device)
    counts.scatter_add_(1, y, sample_weight)
    return sample_weight * balanced_class_weights(counts).gather(1, y)


def check_class_weight(class_weight: Any) -> str | None:
    """The protocols take ``None`` (plain logistic regression, PAPER.md) or ``"balanced"``."""
    if class_weight in (None, "none"):
        return None
    if class_weight == "balanced":
        return "balanced"
    raise RuleError(
        f"class_weight must be None or 'balanced', got {class_weight!r}; e.g. class_weight='balanced'"
    )


def default_dtype(device: str | torch.device) -> torch.dtype:
    """float64 on CPU (as scikit-learn); float32 on accelerators, where float64 is slow."""
    return torch.float64 if torch.device(device).type == "cpu" else torch.float32


def logistic_sums(
    X: Tensor, y: Tensor, weights: Tensor, W: Tensor, num_classes: int
) -> tuple[Tensor, Tensor]:
    """Weighted data term of G problems: ``X [G, n, D1]``, ``y [G, n]``, ``weights [G, n]``, ``W [G, D1, Kf]``
    → (``Σ_i w_i·logloss_i [G]``, its gradient ``[G, D1, Kf]``). Binary (K = 2) uses one logit.

    ``W [G·R, D1, Kf]`` holds R problems per X (problem ``g·R + r`` reads ``X[g]``; e.g. one token at R values
    of C): their logits and gradients are one product with R·Kf columns, so X is read once for all of them.

    On the CPU, large X is processed in blocks of rows of about ``CPU_BLOCK_BYTES``: the logits and the gradient
    each read X, and with K ≪ D both products are bound by memory bandwidth, so reading each block from DRAM
    once (the gradient's read hits the cache) nearly halves the time of a pass. Same sums, other order."""
    G, n, D1 = X.shape
    rows = max(64, CPU_BLOCK_BYTES // max(1, G * D1 * X.element_size()))
    if X.device.type != "cpu" or n <= 2 * rows:
        return _logistic_block(X, y, weights, W, num_classes)
    f, grad = _logistic_block(X[:, :rows], y[:, :rows], weights[:, :rows], W, num_classes)
    for a in range(rows, n, rows):
        fb, gb = _logistic_block(
            X[:, a : a + rows], y[:, a : a + rows], weights[:, a : a + rows], W, num_classes
        )
        f += fb
        grad += gb
    return f, grad


def _logistic_block(
    X: Tensor, y: Tensor, weights: Tensor, W: Tensor, num_classes: int
) -> tuple[Tensor, Tensor]:
    """:func:`logistic_sums` on one block of rows."""
    G, _, D1 = X.shape
    R, Kf = W.shape[0] // G, W.shape[2]
    if R > 1:
        return _shared_block(X, y, weights, W.view(G, R, D1, Kf), num_classes)
    z = X @ W  # [G, n, Kf]
    if num_classes == 2:
        z1 = z[..., 0]
        t = y.to(z.dtype)
        loss = torch.nn.functional.softplus(z1) - t * z1
        resid = (torch.sigmoid(z1) - t)[..., None]
    else:
        # z − logsumexp: log_softmax over a short last dim (K classes) is several times slower on CPU.
        logp = z - torch.logsumexp(z, dim=2, keepdim=True)
        loss = -logp.gather(2, y[..., None])[..., 0]
        resid = logp.exp_()
        resid.scatter_add_(2, y[..., None], torch.full_like(loss[..., None], -1.0))  # softmax − one-hot
    # (Rᵀ·X)ᵀ rather than Xᵀ·R: bmm with a transposed [n, D] operand is several times slower on CPU.
    return (weights * loss).sum(1), ((resid * weights[..., None]).transpose(1, 2) @ X).transpose(1, 2)


def _shared_block(
    X: Tensor, y: Tensor, weights: Tensor, W: Tensor, num_classes: int
) -> tuple[Tensor, Tensor]:
    """:func:`_logistic_block` for R problems per X: ``W [G, R, D1, Kf]`` → (``[G·R]``, ``[G·R, D1, Kf]``).

    X ``[n, D1]`` times all their ``R·Kf`` columns at once, and the residuals of all of them times X once, so X is
    read once for all R. One C's products are bound by reading X (K ≪ D); with R·Kf columns they become bound by
    arithmetic, so R problems cost less than R passes, but more than one (``benchmarks/bench_rules.py grid``
    measures a whole grid)."""
    G, R, D1, Kf = W.shape
    n = X.shape[1]
    z = (X @ W.permute(0, 2, 1, 3).reshape(G, D1, R * Kf)).view(G, n, R, Kf)
    if num_classes == 2:
        z1 = z[..., 0]
        t = y.to(z.dtype)[..., None]
        loss = torch.nn.functional.softplus(z1) - t * z1  # [G, n, R]
        resid = (torch.sigmoid(z1) - t)[..., None]
    else:
        logp = z - torch.logsumexp(z, dim=3, keepdim=True)
        idx = y[:, :, None, None].expand(G, n, R, 1)
        loss = -logp.gather(3, idx)[..., 0]
        resid = logp.exp_()
        resid.scatter_add_(3, idx, torch.full_like(loss[..., None], -1.0))  # softmax − one-hot
    f = (weights[..., None] * loss).sum(1).reshape(G * R)
    grad = (resid * weights[..., None, None]).view(G, n, R * Kf).transpose(1, 2) @ X  # [G, R·Kf, D1]
    return f, grad.view(G, R, Kf, D1).transpose(2, 3).reshape(G * R, D1, Kf)


def second_moment(X: Tensor, sw: Tensor) -> Tensor:
    """``E_sw[x xᵀ]`` of ``X [G, n, D1]`` over at most ``PRECOND_ROWS`` evenly strided rows → ``[G, D1, D1]``."""
    step = max(1, X.shape[1] // PRECOND_ROWS)
    Xs, ws = X[:, ::step], sw[:, ::step]
    return (Xs * ws[..., None]).transpose(1, 2) @ Xs / ws.sum(1).clamp_min(1e-12)[:, None, None]


def preconditioner(moment: Tensor, reg: Tensor, num_classes: int) -> Tensor:
    """Inverse of ``moment/K + diag(reg, …, reg, 0)`` (the Hessian at W = 0 up to softmax weights) ``[G, D1, D1]``."""
    D1 = moment.shape[-1]
    curvature = 0.25 if num_classes == 2 else 1.0 / num_classes
    ridge = torch.ones(D1, dtype=moment.dtype, device=moment.device)
    ridge[-1] = 0.0  # the intercept is not penalised
    H = curvature * moment + torch.diag_embed(reg[:, None] * ridge)
    eye = torch.eye(D1, dtype=moment.dtype, device=moment.device)
    H = H + 1e-10 * H.diagonal(dim1=1, dim2=2).amax(1)[:, None, None] * eye  # keeps Cholesky defined
    return torch.cholesky_inverse(torch.linalg.cholesky(H))


def class_curvature(X: Tensor, weights: Tensor, W: Tensor, num_classes: int) -> Tensor:
    """Per-class blocks of the data term's Hessian at ``W [G, D1, Kf]``: ``Σ_i w_i p_ik (1 − p_ik) x_i x_iᵀ``
    ``[G, Kf, D1, D1]`` over ``X [G, n, D1]`` with row weights ``weights [G, n]`` (p: softmax, or sigmoid when
    K = 2). The caller strides or chunks the rows; sums, so chunks add up. (One block with the classes' mean
    curvature, K times cheaper, saved few iterations on the built-in models' tokens: per-class it is.)"""
    z = X @ W
    p = torch.sigmoid(z) if num_classes == 2 else torch.softmax(z, dim=2)
    c = weights[..., None] * p * (1 - p)  # [G, n, Kf]
    # One class at a time: a [G, Kf, n, D1] product of all classes' scaled rows would be Kf times X's memory.
    XT = X.transpose(1, 2)
    return torch.stack([XT @ (X * c[..., k : k + 1]) for k in range(c.shape[2])], 1)


def curvature_stride(num_rows: int, width: int) -> int:
    """Row stride for a warm start's curvature preconditioner over ``num_rows`` rows of ``width`` columns, or 0
    when it would cost more than ``CURVATURE_MAX_EVALS`` evaluations (then the W = 0 preconditioner is kept)."""
    rows = min(num_rows, CURVATURE_ROWS)
    if rows * width > 7 * CURVATURE_MAX_EVALS * num_rows:
        return 0
    return max(1, num_rows // CURVATURE_ROWS)


def curvature_preconditioner(curvature: Tensor, reg: Tensor) -> Tensor | None:
    """Inverse of ``curvature [G, Kf, D1, D1] + diag(reg, …, reg, 0)`` (see :func:`class_curvature`); None when a
    block is not numerically positive definite (the caller keeps the W = 0 preconditioner)."""
    D1 = curvature.shape[-1]
    ridge = torch.ones(D1, dtype=curvature.dtype, device=curvature.device)
    ridge[-1] = 0.0  # the intercept is not penalised
    H = curvature + torch.diag_embed(reg[:, None] * ridge)[:, None]
    scale = H.diagonal(dim1=2, dim2=3).amax(2, keepdim=True)[..., None]
    H = H + 1e-10 * scale * torch.eye(D1, dtype=H.dtype, device=H.device)
    L, info = torch.linalg.cholesky_ex(H)
    return None if bool((info != 0).any()) else torch.cholesky_inverse(L)


def apply_preconditioner(P: Tensor, v: Tensor, kf: int) -> Tensor:
    """``P`` ``[G, D1, D1]`` (one block for every class) or ``[G, Kf, D1, D1]`` (per class) times the parameters
    ``v [G, D1·Kf]`` (layout W ``[G, D1, Kf]``)."""
    V = v.view(v.shape[0], -1, kf)
    if P.dim() == 3 or P.shape[1] == 1:
        return (P.view(P.shape[0], *P.shape[-2:]) @ V).reshape(v.shape)
    return (P @ V.transpose(1, 2)[..., None])[..., 0].transpose(1, 2).reshape(v.shape)


class _LogisticObjective:
    """Logistic-regression problems; parameters ``w [Ga, D1·Kf]`` = W ``[Ga, D1, Kf]``, last row intercept.

    ``X [G, n, D1]`` has a trailing column of ones; ``Kf`` = K (multinomial) or 1 (binary). ``C [G·R]``: R
    problems per X (``g·R + r`` reads ``X[g]``, e.g. one token at R values of C), whose logits and gradients
    are one product per X (:func:`logistic_sums`). ``start``: the warm start W ``[G, D1, Kf]`` (R = 1), whose
    per-class curvature then preconditions (module doc). After :meth:`select`, ``slots [Ga]`` names the problems
    still solved among the ``G·R`` of ``X``; the others ride along at W = 0 until a whole X is done and leaves
    (copying X for a few problems would cost more than their columns)."""

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
        self.kf = 1 if num_classes == 2 else num_classes
        self.sw_sum = sw.sum(1)  # [G]
        self.reg = 1.0 / (
            C * self.sw_sum.repeat_interleave(self.R)
        )  # [G·R] l2 strength of the scaled objective
        self.weights = sw / self.sw_sum[:, None]
        self.slots: Tensor | None = None
        self._moment = moment
        P = None
        step = 0 if start is None else curvature_stride(X.shape[1], X.shape[2])
        if step:
            w = self.weights[:, ::step]
            w = w * (self.weights.sum(1) / w.sum(1).clamp_min(1e-300))[:, None]  # strided rows stand for all
            P = curvature_preconditioner(class_curvature(X[:, ::step], w, start, num_classes), self.reg)
        self.P = (
            preconditioner(self.moment.repeat_interleave(self.R, 0), self.reg, num_classes)
            if P is None
            else P
        )

    @property
    def moment(self) -> Tensor:
        """Second moments of each X's rows ``[G, D1, D1]`` (the W = 0 preconditioner's), computed when first
        needed: a solve preconditioned with curvature never needs them, a later C of a path reuses them."""
        if self._moment is None:
            self._moment = second_moment(self.X, self.sw)
        return self._moment

    def select(self, keep: Tensor) -> _LogisticObjective:
        # Index the per-problem tensors rather than re-deriving them (the preconditioner's Cholesky): the line
        # search selects its backtracking problems in many iterations. X is indexed (copied) only when a whole
        # X has no problem left.
        out = object.__new__(_LogisticObjective)
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
        return apply_preconditioner(self.P, v, self.kf)

    def value_grad(self, w: Tensor) -> tuple[Tensor, Tensor]:
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


class _SpanLogistic:
    """G span-reduced logistic-regression problems (few-shot episodes): ``X [G, n, D1]`` with centred, mutually
    orthogonal columns and a trailing column of ones, so the preconditioner is diagonal.

    Same objective as :class:`_LogisticObjective`, written for thousands of tiny problems, where the cost is
    the number and shape of kernel calls rather than arithmetic: parameters ``w [G, Kf·D1]`` are laid out
    class-major (W ``[G, Kf, D1]``) and ``Xᵀ`` is kept contiguous, so both products are ``[Kf, ·] @ [·, ·]``
    batched matmuls with contiguous operands (``X @ W`` with a ``[D1, Kf]`` right operand is ~4× slower in
    float32 on CPU); the softmax reuses its exponentials, and the penalty is one fused multiply-add."""

    def __init__(
        self, X: Tensor, y: Tensor, sw: Tensor, C: Tensor, num_classes: int, XT: Tensor | None = None
    ) -> None:
        D1 = X.shape[2]
        self.X, self.y, self.sw, self.C, self.num_classes = X, y, sw, C, num_classes
        self.kf = 1 if num_classes == 2 else num_classes
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
        else:  # weighted one-hot targets [G, Kf, n]: loss and residual need no gather/scatter
            self.target = (
                torch.nn.functional.one_hot(y, num_classes).to(X.dtype).transpose(1, 2) * self.weights
            )
        self.yidx = y[:, None, :]  # [G, 1, n]

    def select(self, keep: Tensor) -> _SpanLogistic:
        # Index every per-problem tensor rather than re-deriving them: the line search selects every iteration.
        out = object.__new__(_SpanLogistic)
        out.num_classes, out.kf = self.num_classes, self.kf
        for name in ("X", "XT", "y", "sw", "C", "reg", "weights", "P", "ridge", "yidx", "target"):
            setattr(out, name, getattr(self, name).index_select(0, keep))
        return out

    def precondition(self, v: Tensor) -> Tensor:
        return self.P * v

    def value_grad(self, w: Tensor) -> tuple[Tensor, Tensor]:
        G = w.shape[0]
        z = bmm(w.view(G, self.kf, -1), self.XT)  # [G, Kf, n]
        if self.num_classes == 2:
            z1 = z[:, 0]
            loss = torch.nn.functional.softplus(z1) - self.target * z1
            f = torch.linalg.vecdot(self.weights[:, 0], loss)
            resid = (torch.sigmoid(z1) - self.target)[:, None] * self.weights
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
            total = resid.sum(1, keepdim=True)  # [G, 1, n]
            loss = total.log() - z.gather(1, self.yidx)
            f = torch.linalg.vecdot(self.weights[:, 0], loss[:, 0])
            resid.mul_(self.weights / total).sub_(self.target)  # w_i · (softmax − one-hot)
        penalty = self.ridge * w
        f = f + 0.5 * torch.linalg.vecdot(penalty, w)
        grad = bmm(resid, self.X).view(G, -1).add_(penalty)
        return f, grad


def augment(X: Tensor) -> Tensor:
    """Append a column of ones (the intercept's feature): ``[..., D]`` → ``[..., D + 1]``."""
    return torch.cat([X, torch.ones(*X.shape[:-1], 1, dtype=X.dtype, device=X.device)], dim=-1)


@dataclass
class SpanReduction:
    """Few-shot problems rewritten in coordinates of their (centred) training rows.

    ``X [G, n, n]`` reduced features (solver dtype, centred columns), ``proj [G, n, n]`` maps reduced
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
    """Coordinates of the centred rows from a Cholesky factor instead of an eigendecomposition (12 against 76 ms
    for 2 000 25×25 problems, ``benchmarks/bench_rules.py kernels``; the L-BFGS then takes about one more
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
    (problems with nearly dependent rows fall back to the eigen basis). The n×n factorisation runs in
    ``solve_dtype``. ``sw=None``: every row is a training row (no padding; required for ``"cholesky"``).
    ``overwrite``: X is a scratch buffer and may be centred in place (saves a pass and an allocation per call
    in the few-shot loop)."""
    solve_dtype = solve_dtype or default_dtype(X.device)
    if overwrite and sw is None:
        mean = X.mean(1)
        Xm = X.sub_(mean[:, None])
    else:
        Xm, mean = _centred(X, sw)
    gram = bmm(Xm, Xm.transpose(1, 2)).to(solve_dtype)
    rel = X.shape[1] * torch.finfo(X.dtype).eps * 10
    if basis == "cholesky" and sw is None:
        Z, proj = _cholesky_basis(gram, rel)
    elif basis in ("eigen", "cholesky"):
        Z, proj = _eigen_basis(gram, rel)
    else:
        raise ValueError(f"basis={basis!r}; use 'eigen' or 'cholesky'")
    return SpanReduction(Z, proj, mean)


def span_expand(red: SpanReduction, X: Tensor, sw: Tensor | None, W: Tensor) -> tuple[Tensor, Tensor]:
    """Reduced solution ``W [G, n+1, Kf]`` → (``coef [G, Kf, D]``, ``intercept [G, Kf]``) in X's dtype."""
    A = bmm(red.proj, W[:, :-1]).to(X.dtype)  # [G, n, Kf] weight of every (centred) training row
    if sw is not None:
        A = A * (sw > 0).to(X.dtype)[..., None]
    # Aᵀ·(X − 1·meanᵀ) without materialising the centred rows (a pass over [G, n, D] saved).
    coef = bmm(A.transpose(1, 2), X) - A.sum(1)[..., None] * red.mean[:, None, :]
    intercept = W[:, -1].to(X.dtype) - torch.linalg.vecdot(coef, red.mean[:, None, :])  # undo the centring
    return coef, intercept


def solve_logistic(
    X: Tensor,
    y: Tensor,
    num_classes: int,
    C: Tensor,
    sw: Tensor,
    *,
    W0: Tensor | None = None,
    max_iter: int = DEFAULT_MAX_ITER,
    tol: float = DEFAULT_TOL,
    diagonal: bool = False,
    objective: _LogisticObjective | None = None,
    ftol: float | None = None,
) -> tuple[Tensor, Tensor, _LogisticObjective | _SpanLogistic, Tensor]:
    """Batched L-BFGS on ``X [G, n, D]`` → (``W [G, D+1, Kf]`` with the intercept last, ``n_iter [G]``, the
    objective, reusable for another C so its second moments are not recomputed, ``converged [G]``).

    ``diagonal``: X's columns are centred and orthogonal (:func:`span_reduce`), so the preconditioner is
    diagonal and the objective is :class:`_SpanLogistic`. ``ftol`` as in :func:`.lbfgs.minimize_lbfgs`."""
    G = X.shape[0]
    kf = 1 if num_classes == 2 else num_classes
    start = None if W0 is None else W0.to(X.dtype)  # a warm start (W = 0 has the moment preconditioner)
    if W0 is None:
        W0 = torch.zeros(G, X.shape[2] + 1, kf, dtype=X.dtype, device=X.device)
    if diagonal:
        span = _SpanLogistic(augment(X), y, sw, C, num_classes)
        # Span-reduced problems (few-shot) are small and well preconditioned: 5 curvature pairs take as many
        # iterations as 10 (measured on 2 000 5-way 5-shot episodes) at half the two-loop's cost.
        res = minimize_lbfgs(
            span,
            W0.transpose(1, 2).reshape(G, -1).to(X.dtype),
            max_iter=max_iter,
            tol=tol,
            history=SPAN_HISTORY,
            ftol=ftol,
        )
        return res.w.view(G, kf, -1).transpose(1, 2), res.n_iter, span, res.converged
    if objective is None:
        objective = _LogisticObjective(augment(X), y, sw, C, num_classes, start=start)
    else:
        objective = _LogisticObjective(objective.X, y, sw, C, num_classes, objective.moment, start=start)
    # Full-width problems cost a pass over [n, D] each per evaluation, so finished ones are dropped from the batch
    # even when it is small (the standard protocol batches ~10 token types; without this, one slow token kept
    # all ten in every pass: 6.5 → 3.0 s for one C of the MAE model's default-study Fashion-MNIST fits).
    res = minimize_lbfgs(
        objective,
        W0.reshape(G, -1).to(X.dtype),
        max_iter=max_iter,
        tol=tol,
        history=10,
        ftol=ftol,
        compact_min=2,
    )
    return res.w.view(G, -1, kf), res.n_iter, objective, res.converged


def _centre_intercept(intercept: Tensor) -> Tensor:
    # Multinomial intercepts are defined up to a shift shared by all classes; report the centred one.
    return intercept - intercept.mean(1, keepdim=True) if intercept.shape[1] > 1 else intercept


def fit_hyperplane_batched(
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
    _objective: _LogisticObjective | None = None,
) -> tuple[Tensor, Tensor, Tensor, _LogisticObjective | _SpanLogistic]:
    """Solve G problems at once. ``X [G, n, D]`` (solver dtype/device), ``y [G, n]`` int64 codes in 0..K-1,
    ``sample_weight [G, n]`` (0 = padding), ``C`` scalar or ``[G]``.

    Returns ``coef [G, Kf, D]``, ``intercept [G, Kf]`` (Kf = 1 when K = 2), ``n_iter [G]`` and the objective
    (reusable for other C values via ``_objective``). ``reduce`` (default: when D ≥ n) solves in the span of
    the training rows (exact, see module doc)."""
    G, n, D = X.shape
    sw = torch.ones(G, n, dtype=X.dtype, device=X.device) if sample_weight is None else sample_weight.to(X)
    Cs = torch.as_tensor(C, dtype=X.dtype, device=X.device).expand(G).contiguous()
    kf = 1 if num_classes == 2 else num_classes
    W0 = None
    if coef_init is not None or intercept_init is not None:
        W0 = torch.zeros(G, D + 1, kf, dtype=X.dtype, device=X.device)
        W0[:, :-1] = 0 if coef_init is None else coef_init.transpose(1, 2)
        W0[:, -1] = 0 if intercept_init is None else intercept_init
    if not ((n <= D) if reduce is None else reduce):
        W, n_iter, objective, _ = solve_logistic(
            X, y, num_classes, Cs, sw, W0=W0, max_iter=max_iter, tol=tol, objective=_objective
        )
        return W[:, :-1].transpose(1, 2), _centre_intercept(W[:, -1]), n_iter, objective
    red = span_reduce(X, sw)
    Wr0 = None
    if W0 is not None:  # warm start: coordinates of coef in the span, intercept of the centred problem
        Xm, _ = _centred(X, sw, red.mean)
        basis = (Xm.transpose(1, 2) @ red.proj.to(X.dtype)).to(red.X.dtype)  # [G, D, n] orthonormal columns
        shifted = W0[:, -1] + (red.mean[:, None] @ W0[:, :-1])[:, 0]  # [G, Kf]
        Wr0 = torch.cat(
            [basis.transpose(1, 2) @ W0[:, :-1].to(basis.dtype), shifted.to(basis.dtype)[:, None]], 1
        )
    Cs = Cs.to(red.X.dtype)
    W, n_iter, objective, _ = solve_logistic(
        red.X, y, num_classes, Cs, sw.to(red.X.dtype), W0=Wr0, max_iter=max_iter, tol=tol, diagonal=True
    )
    coef, intercept = span_expand(red, X, sw, W)
    return coef, _centre_intercept(intercept), n_iter, objective


def fit_hyperplane_path(
    X: Tensor,
    y: Tensor,
    num_classes: int,
    Cs: Sequence[float],
    *,
    sample_weight: Tensor | None = None,
    max_iter: int = DEFAULT_MAX_ITER,
    tol: float = DEFAULT_TOL,
    warm_start: bool = True,
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Fit ``X [G, n, D]`` for every C of ``Cs`` (in the given order), each solve warm-started from the
    previous C's solution (``warm_start=False``: each from W = 0). Returns ``[(coef [G, Kf, D],
    intercept [G, Kf], n_iter [G])]`` per C.

    A warm path is a regularisation path: each solution meets ``tol`` at its own C, but with many rows the
    previous C's solution can already meet the (1/(C·n)-scaled) gradient rule at the next C, so that solve stops
    at once, as scikit-learn's own warm-started path would. To *compare* Cs (choose one on held-out data), use
    ``warm_start=False``, as the standard protocols do; see ``protocols.classification``."""
    if not warm_start:
        return _fit_grid(X, y, num_classes, [check_C(C) for C in Cs], sample_weight, max_iter, tol)
    out: list[tuple[Tensor, Tensor, Tensor]] = []
    coef = intercept = objective = None
    for C in Cs:
        check_C(C)
        coef, intercept, n_iter, objective = fit_hyperplane_batched(
            X,
            y,
            num_classes,
            C,
            sample_weight=sample_weight,
            max_iter=max_iter,
            tol=tol,
            coef_init=coef if warm_start else None,
            intercept_init=intercept if warm_start else None,
            reduce=False,
            _objective=objective,
        )
        out.append((coef, intercept, n_iter))
    return out


def grid_step(
    num_Cs: int,
    problems_per_C: int,
    num_params: int,
    rows: int,
    kf: int,
    dtype: torch.dtype,
    device: torch.device,
) -> int:
    """How many Cs of a grid one batch holds: the L-BFGS state of its problems (10 curvature pairs, iterates and
    gradients, ``num_params`` each) and, off the CPU (where :func:`logistic_sums` does not work in row blocks),
    the logits, log-probabilities and residuals of a pass over ``rows`` rows stay within ``GRID_BYTES``. Ten
    192-d tokens of Fashion-MNIST take the whole grid in one batch; 768-d features of ImageNet's 1 000 classes
    take 3 Cs per batch on the CPU (float64) and 1 on a GPU (1.28 M rows of logits)."""
    size = torch.finfo(dtype).bits // 8
    per_C = (2 * 10 + 6) * problems_per_C * num_params * size
    if device.type != "cpu":
        per_C += 3 * problems_per_C * rows * kf * size
    return max(1, min(num_Cs, GRID_BYTES // max(per_C, 1)))


def _fit_grid(
    X: Tensor,
    y: Tensor,
    num_classes: int,
    Cs: list[float],
    sample_weight: Tensor | None,
    max_iter: int,
    tol: float,
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """:func:`fit_hyperplane_path` with ``warm_start=False``: every C from W = 0, all of them one batch of
    ``G·len(Cs)`` problems sharing each X (:class:`_LogisticObjective` with R = len(Cs)), so a pass reads X once
    for all Cs; batches of fewer Cs where memory asks for it (:func:`grid_step`)."""
    G, n, D = X.shape
    kf = 1 if num_classes == 2 else num_classes
    sw = torch.ones(G, n, dtype=X.dtype, device=X.device) if sample_weight is None else sample_weight.to(X)
    step = grid_step(len(Cs), G, (D + 1) * kf, n, kf, X.dtype, X.device)
    Xa, moment = augment(X), None
    out: list[tuple[Tensor, Tensor, Tensor]] = []
    for lo in range(0, len(Cs), step):
        part = Cs[lo : lo + step]
        R = len(part)
        C = torch.tensor(part, dtype=X.dtype, device=X.device).repeat(G)  # problem g·R + r has C = part[r]
        objective = _LogisticObjective(Xa, y, sw, C, num_classes, moment)
        moment = objective.moment
        w0 = torch.zeros(G * R, (D + 1) * kf, dtype=X.dtype, device=X.device)
        res = minimize_lbfgs(objective, w0, max_iter=max_iter, tol=tol, history=10, compact_min=2)
        W, n_iter = res.w.view(G, R, D + 1, kf), res.n_iter.view(G, R)
        out += [
            (W[:, r, :-1].transpose(1, 2), _centre_intercept(W[:, r, -1]), n_iter[:, r]) for r in range(R)
        ]
    return out


def hyperplane_scores(X: Tensor, coef: Tensor, intercept: Tensor) -> Tensor:
    """``X [G, m, D]``, ``coef [G, Kf, D]``, ``intercept [G, Kf]`` → class scores ``[G, m, K]`` (K = 2 gets
    the scores ``(0, s)``, so argmax works for every K)."""
    s = bmm(X, coef.transpose(1, 2)).add_(intercept[:, None, :])
    return torch.cat([torch.zeros_like(s), s], dim=2) if coef.shape[1] == 1 else s


class HyperplaneRule(BaseEstimator):
    """Multinomial (K > 2) / binary (K = 2) logistic regression with an L2 penalty on raw features.

    Same objective and stopping rule as ``LogisticRegression(C=C, tol=tol)`` (lbfgs). Fitted attributes:
    ``classes_ [K]``, ``coef_ [K, D]`` (``[1, D]`` for K = 2), ``intercept_ [K]`` (``[1]``), ``n_iter_ [1]``,
    ``n_features_in_``. ``class_weight``: None, ``"balanced"`` or ``{label: weight}``, as scikit-learn's."""

    def __init__(
        self,
        *,
        C: float = 1.0,
        max_iter: int = DEFAULT_MAX_ITER,
        tol: float = DEFAULT_TOL,
        device: str = "cpu",
        dtype: Any = None,
        class_weight: Any = None,
    ) -> None:
        self.C = C
        self.class_weight = class_weight
        self.max_iter = max_iter
        self.tol = tol
        self.device = device
        self.dtype = dtype

    def _torch_dtype(self) -> torch.dtype:
        return self.dtype or default_dtype(self.device)

    def fit(self, X: Any, y: Any, sample_weight: Any = None) -> HyperplaneRule:
        """``X [n, D]``, ``y [n]`` → self."""
        C = check_C(self.C)
        X = as_features(X)
        self.classes_, codes = encode_labels(y, X.shape[0])
        dt, dev = self._torch_dtype(), torch.device(self.device)
        Xt = torch.as_tensor(X).to(dev, dt)[None]
        sw = None if sample_weight is None else torch.as_tensor(np.asarray(sample_weight)).to(dev, dt)[None]
        if self.class_weight is not None:
            cw = torch.as_tensor(self._class_weights(y, sample_weight)[codes], device=dev, dtype=dt)[None]
            sw = cw if sw is None else sw * cw
        coef, intercept, n_iter, _ = fit_hyperplane_batched(
            Xt,
            torch.as_tensor(codes, device=dev)[None],
            len(self.classes_),
            C,
            sample_weight=sw,
            max_iter=self.max_iter,
            tol=self.tol,
        )
        self.coef_ = coef[0].cpu().numpy()
        self.intercept_ = intercept[0].cpu().numpy()
        self.n_iter_ = n_iter.cpu().numpy()
        self.n_features_in_ = X.shape[1]
        return self

    def _class_weights(self, y: Any, sample_weight: Any) -> np.ndarray:
        """Weight of each class of ``classes_`` ``[K]``, from scikit-learn's own ``compute_class_weight``."""
        from sklearn.utils.class_weight import compute_class_weight

        y = np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y)
        sw = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        try:
            return compute_class_weight(self.class_weight, classes=self.classes_, y=y, sample_weight=sw)
        except (ValueError, TypeError) as e:  # scikit-learn names the bad value; we add what is accepted
            raise RuleError(
                f"class_weight={self.class_weight!r} is not usable ({e}); pass None, 'balanced' or a dict "
                f"mapping labels among {self.classes_.tolist()} to weights"
            ) from None

    def decision_function(self, X: Any) -> np.ndarray:
        """``X [m, D]`` → scores ``[m, K]`` (``[m]`` for K = 2, as scikit-learn)."""
        check_fitted(self, "coef_")
        X = as_features(X)
        check_width(X, self.n_features_in_)
        Xn = X.detach().cpu().numpy() if isinstance(X, torch.Tensor) else X
        s = Xn.astype(self.coef_.dtype, copy=False) @ self.coef_.T + self.intercept_
        return s[:, 0] if s.shape[1] == 1 else s

    def predict(self, X: Any) -> np.ndarray:
        """``X [m, D]`` → labels ``[m]`` from ``classes_``."""
        s = self.decision_function(X)
        return self.classes_[(s > 0).astype(np.int64) if s.ndim == 1 else s.argmax(1)]

    def score(self, X: Any, y: Any) -> float:
        """Mean accuracy on ``(X [m, D], y [m])``; labels must be among ``classes_``."""
        check_fitted(self, "coef_")
        check_labels_known(y, self.classes_)
        return float(np.mean(self.predict(X) == np.asarray(y)))
