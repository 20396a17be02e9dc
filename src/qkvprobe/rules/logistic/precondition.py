"""Preconditioners of the logistic objectives: approximations of the inverse Hessian that the L-BFGS starts
every two-loop from.

Raw ViT features are far from isotropic (a few dimensions carry most of the variance), so L-BFGS without a
preconditioner needs many times more iterations. Two approximations of the Hessian are used:

- **at W = 0** (:func:`moment_preconditioner`): the softmax weights are all 1/K, so the data term's Hessian is
  the features' second-moment matrix ``Σ̂`` times ``1/K`` (``1/4`` for one binary logit); one block shared by
  every class. It is right at the start and drifts away as samples become confidently classified.
- **at the current W** (:func:`curvature_preconditioner`): the per-class blocks of the Hessian,
  ``Σ_i w_i p_ik (1 − p_ik) x_i x_iᵀ + reg`` (class couplings dropped), from strided rows. A warm start uses it
  from the first step; every solve refreshes it while it runs (:mod:`.lbfgs`, ``REFRESH_EVERY``), which is
  what makes ill-conditioned problems at large C converge. Where K blocks would cost too much memory
  (``CURVATURE_BYTES``), one block with the classes' summed curvature is used instead.

Multinomial problems are invariant to adding one vector to every class's parameters (the softmax does not see
it): along that common direction the objective is the penalty alone, an exact quadratic of curvature ``reg`` (zero
for the intercept, which the objective does not see there at all), and the optimum's W sums to zero over the
classes. A shared block maps the two parts (sum-zero and common) to themselves; per-class blocks mix them, and a
step that leaves the sum-zero subspace is held back only by the weak penalty. Per-class blocks are therefore
applied as ``ΠPΠ`` on the sum-zero part (symmetric positive definite there) plus the exact inverse curvature
``1/reg`` on the common part, so a common component that rounding or a warm start brings in is removed in one
step instead of never.

A preconditioner changes the path, never the optimum.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Rows used to estimate the features' second moments (an approximation is enough).
PRECOND_ROWS = 20_000
#: Rows used to estimate the per-class curvature blocks (K Gram matrices: kept cheaper).
CURVATURE_ROWS = 8_192
#: A warm start uses a curvature preconditioner only when its Gram matrices cost at most this many evaluations of
#: the problem (:func:`curvature_cost`); a refresh while solving weighs the cost against the iterations it saves.
CURVATURE_MAX_EVALS = 24
#: dtype of the curvature Gram matrices and of the curvature preconditioners (the W = 0 one stays in the
#: solver's dtype): an approximation read at every iteration, where float32 halves the memory traffic.
GRAM_DTYPE = torch.float32
#: Memory of the per-class curvature blocks of one batch (G·K·D1² numbers); above it, one summed block.
CURVATURE_BYTES = 256 * 1024**2


def second_moment(X: Tensor, sw: Tensor) -> Tensor:
    """``E_sw[x xᵀ]`` of ``X [G, n, D1]`` over at most ``PRECOND_ROWS`` evenly strided rows → ``[G, D1, D1]``."""
    step = max(1, X.shape[1] // PRECOND_ROWS)
    Xs, ws = X[:, ::step], sw[:, ::step]
    return (Xs * ws[..., None]).transpose(1, 2) @ Xs / ws.sum(1).clamp_min(1e-12)[:, None, None]


def _ridge(D1: int, reg: Tensor) -> Tensor:
    """``diag(reg, …, reg, 0)`` per problem ``[G, D1, D1]``: the penalty's Hessian (the intercept is free)."""
    ridge = torch.ones(D1, dtype=reg.dtype, device=reg.device)
    ridge[-1] = 0.0
    return torch.diag_embed(reg[:, None] * ridge)


def moment_preconditioner(moment: Tensor, reg: Tensor, num_classes: int) -> Tensor:
    """Inverse of ``moment/K + diag(reg, …, reg, 0)`` (the Hessian at W = 0 up to softmax weights) ``[G, D1, D1]``."""
    D1 = moment.shape[-1]
    curvature = 0.25 if num_classes == 2 else 1.0 / num_classes
    H = curvature * moment + _ridge(D1, reg.to(moment.dtype))
    eye = torch.eye(D1, dtype=moment.dtype, device=moment.device)
    H = H + 1e-10 * H.diagonal(dim1=1, dim2=2).amax(1)[:, None, None] * eye  # keeps Cholesky defined
    return torch.cholesky_inverse(torch.linalg.cholesky(H))


def class_curvature(
    X: Tensor,
    weights: Tensor,
    W: Tensor,
    num_classes: int,
    per_class: bool = True,
    gram_dtype: torch.dtype | None = None,
) -> Tensor:
    """Per-class blocks of the data term's Hessian at ``W [G, D1, Kf]``: ``Σ_i w_i p_ik (1 − p_ik) x_i x_iᵀ``
    ``[G, Kf, D1, D1]`` over ``X [G, n, D1]`` with row weights ``weights [G, n]`` (p: softmax, or sigmoid when
    K = 2); ``per_class=False``: their sum, ``[G, 1, D1, D1]``. Sums over rows, so chunks add up; the caller
    strides or chunks the rows. The Gram products run in ``gram_dtype`` (default ``GRAM_DTYPE``; returned in X's
    dtype)."""
    z = X @ W
    p = torch.sigmoid(z) if num_classes == 2 else torch.softmax(z, dim=2)
    c = weights[..., None] * p * (1 - p)  # [G, n, Kf]
    # The Gram products run in GRAM_DTYPE: a preconditioner is an approximation, and these K products are the
    # costliest part of a refresh.
    gram_dtype = GRAM_DTYPE if gram_dtype is None else gram_dtype
    Xg, c = X.to(gram_dtype), c.to(gram_dtype)
    XT = Xg.transpose(1, 2)
    if not per_class:
        return (XT @ (Xg * c.sum(2, keepdim=True)))[:, None].to(X.dtype)
    # One class at a time: a [G, Kf, n, D1] product of all classes' scaled rows would be Kf times X's memory.
    return torch.stack([XT @ (Xg * c[..., k : k + 1]) for k in range(c.shape[2])], 1).to(X.dtype)


def curvature_cost(num_rows: int, width: int) -> float:
    """The cost of a curvature preconditioner over ``num_rows`` rows of ``width`` columns, in evaluations of the
    objective: rows·width/(7·n) with rows = min(n, ``CURVATURE_ROWS``) (K Gram matrices of K·rows·width²
    multiply-adds against an evaluation's 2·K·n·width, which runs slower per multiply-add)."""
    return min(num_rows, CURVATURE_ROWS) * width / (7 * max(num_rows, 1))


def curvature_stride(num_rows: int, width: int, max_evals: float = CURVATURE_MAX_EVALS) -> int:
    """Row stride for a curvature preconditioner over ``num_rows`` rows of ``width`` columns, or 0 when it would
    cost more than ``max_evals`` evaluations of the objective (:func:`curvature_cost`)."""
    if curvature_cost(num_rows, width) > max_evals:
        return 0
    return max(1, num_rows // CURVATURE_ROWS)


def per_class_blocks(num_problems: int, num_logits: int, width: int, itemsize: int) -> bool:
    """Whether K curvature blocks of ``width²`` fit ``CURVATURE_BYTES`` for ``num_problems`` problems."""
    return num_problems * num_logits * width * width * itemsize <= CURVATURE_BYTES


def curvature_preconditioner(curvature: Tensor, reg: Tensor) -> Tensor | None:
    """Inverse of ``curvature [G, Kf|1, D1, D1] + diag(reg, …, reg, 0)`` (see :func:`class_curvature`); None when
    a block is not numerically positive definite (the caller keeps its preconditioner)."""
    D1 = curvature.shape[-1]
    H = curvature + _ridge(D1, reg.to(curvature.dtype))[:, None]
    scale = H.diagonal(dim1=2, dim2=3).amax(2, keepdim=True)[..., None]
    H = H + 1e-10 * scale * torch.eye(D1, dtype=H.dtype, device=H.device)
    L, info = torch.linalg.cholesky_ex(H)
    # Stored in GRAM_DTYPE: per-class blocks are read at every iteration (twice), K·D1² numbers per problem.
    return None if bool((info != 0).any()) else torch.cholesky_inverse(L).to(GRAM_DTYPE)


def apply_preconditioner(P: Tensor, v: Tensor, kf: int, reg: Tensor) -> Tensor:
    """``P`` ``[G, D1, D1]`` or ``[G, 1, D1, D1]`` (one block for every class) or ``[G, Kf, D1, D1]`` (per class)
    times the parameters ``v [G, D1·Kf]`` (layout W ``[G, D1, Kf]``); ``reg [G]`` the penalty's strength."""
    V = v.view(v.shape[0], -1, kf)
    if P.dim() == 3 or P.shape[1] == 1:
        out = P.view(P.shape[0], *P.shape[-2:]) @ V.to(P.dtype)
        return out.reshape(v.shape).to(v.dtype)
    return per_class_step(P, V.transpose(1, 2), reg).transpose(1, 2).reshape(v.shape)


def per_class_step(P: Tensor, V: Tensor, reg: Tensor) -> Tensor:
    """Per-class blocks ``P [G, Kf, D1, D1]`` applied to class-major parameters ``V [G, Kf, D1]`` (the intercept
    last): ``ΠPΠ`` on the classes' sum-zero part and the exact Newton step ``1/reg`` on their common part, zero for
    the intercept, which the objective does not see along it (module doc). ``reg [G]``: the penalty's strength."""
    if V.shape[1] == 1:  # one class block (binary): no common direction to treat apart
        return (P @ V.to(P.dtype)[..., None])[..., 0].to(V.dtype)
    common = V.mean(1, keepdim=True)
    out = (P @ (V - common).to(P.dtype)[..., None])[..., 0]
    out = out - out.mean(1, keepdim=True)
    step = common / reg.to(V.dtype).view(-1, 1, 1)
    step[..., -1] = 0.0
    return out.to(V.dtype) + step
