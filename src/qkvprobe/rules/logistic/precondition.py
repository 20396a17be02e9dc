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

A preconditioner changes the path, never the optimum.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Rows used to estimate the features' second moments (an approximation is enough).
PRECOND_ROWS = 20_000
#: Rows used to estimate the per-class curvature blocks (K Gram matrices: kept cheaper).
CURVATURE_ROWS = 8_192
#: Use a curvature preconditioner only when its Gram matrices cost at most this many loss/gradient evaluations
#: of the problem, estimated as rows·D1/(7·n) for K blocks (:func:`curvature_cost`).
CURVATURE_MAX_EVALS = 24
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
    X: Tensor, weights: Tensor, W: Tensor, num_classes: int, per_class: bool = True
) -> Tensor:
    """Per-class blocks of the data term's Hessian at ``W [G, D1, Kf]``: ``Σ_i w_i p_ik (1 − p_ik) x_i x_iᵀ``
    ``[G, Kf, D1, D1]`` over ``X [G, n, D1]`` with row weights ``weights [G, n]`` (p: softmax, or sigmoid when
    K = 2); ``per_class=False``: their sum, ``[G, 1, D1, D1]``. Sums over rows, so chunks add up; the caller
    strides or chunks the rows."""
    z = X @ W
    p = torch.sigmoid(z) if num_classes == 2 else torch.softmax(z, dim=2)
    c = weights[..., None] * p * (1 - p)  # [G, n, Kf]
    XT = X.transpose(1, 2)
    if not per_class:
        return (XT @ (X * c.sum(2, keepdim=True)))[:, None]
    # One class at a time: a [G, Kf, n, D1] product of all classes' scaled rows would be Kf times X's memory.
    return torch.stack([XT @ (X * c[..., k : k + 1]) for k in range(c.shape[2])], 1)


def curvature_stride(num_rows: int, width: int) -> int:
    """Row stride for a curvature preconditioner over ``num_rows`` rows of ``width`` columns, or 0 when it would
    cost more than ``CURVATURE_MAX_EVALS`` evaluations of the objective."""
    rows = min(num_rows, CURVATURE_ROWS)
    if rows * width > 7 * CURVATURE_MAX_EVALS * num_rows:
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
    return None if bool((info != 0).any()) else torch.cholesky_inverse(L)


def apply_preconditioner(P: Tensor, v: Tensor, kf: int) -> Tensor:
    """``P`` ``[G, D1, D1]`` or ``[G, 1, D1, D1]`` (one block for every class) or ``[G, Kf, D1, D1]`` (per class)
    times the parameters ``v [G, D1·Kf]`` (layout W ``[G, D1, Kf]``)."""
    V = v.view(v.shape[0], -1, kf)
    if P.dim() == 3 or P.shape[1] == 1:
        return (P.view(P.shape[0], *P.shape[-2:]) @ V).reshape(v.shape)
    return (P @ V.transpose(1, 2)[..., None])[..., 0].transpose(1, 2).reshape(v.shape)
