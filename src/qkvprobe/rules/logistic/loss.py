"""The logistic loss of many problems at once, class weights, and the solver's dtype.

Parameters of one problem are ``W [D1, Kf]``: D feature rows and a last intercept row (features carry a
trailing column of ones, :func:`augment`); ``Kf = K`` classes (multinomial) or 1 for K = 2 (binary, one logit),
as scikit-learn's ``LogisticRegression``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ...errors import RuleError

#: Bytes of X per block of rows in a CPU loss/gradient pass (:func:`logistic_sums`): fits the last-level cache.
CPU_BLOCK_BYTES = 3 * 1024**2 // 2


def num_logits(num_classes: int) -> int:
    """Logits per sample: 1 for a binary problem (scikit-learn's layout), K otherwise."""
    return 1 if num_classes == 2 else num_classes


def augment(X: Tensor) -> Tensor:
    """Append a column of ones (the intercept's feature): ``[..., D]`` → ``[..., D + 1]``."""
    return torch.cat([X, torch.ones(*X.shape[:-1], 1, dtype=X.dtype, device=X.device)], dim=-1)


def default_dtype(device: str | torch.device) -> torch.dtype:
    """float64 on CPU (as scikit-learn); float32 on accelerators, where float64 is slow."""
    return torch.float64 if torch.device(device).type == "cpu" else torch.float32


def check_class_weight(class_weight: Any) -> str | None:
    """The protocols take ``None`` (plain logistic regression, docs/science.md §2) or ``"balanced"``."""
    if class_weight in (None, "none"):
        return None
    if class_weight == "balanced":
        return "balanced"
    raise RuleError(
        f"class_weight must be None or 'balanced', got {class_weight!r}; e.g. class_weight='balanced'"
    )


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


def logistic_sums(
    X: Tensor, y: Tensor, weights: Tensor, W: Tensor, num_classes: int
) -> tuple[Tensor, Tensor]:
    """Weighted data term of G problems: ``X [G, n, D1]``, ``y [G, n]``, ``weights [G, n]``, ``W [G, D1, Kf]``
    → (``Σ_i w_i·logloss_i [G]``, its gradient ``[G, D1, Kf]``). Binary (K = 2) uses one logit.

    ``W [G·R, D1, Kf]`` holds R problems per X (problem ``g·R + r`` reads ``X[g]``; e.g. one token at R values
    of C): their logits and gradients are one product with R·Kf columns, so X is read once for all of them.

    On the CPU, large X is processed in blocks of rows of about ``CPU_BLOCK_BYTES``: the logits and the gradient
    each read X, and with K ≪ D both products are bound by memory bandwidth, so reading each block from DRAM
    once (the gradient's read hits the cache) saves most of the second read. Same sums, another order."""
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


def _softmax_loss(z: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-entropy and residual (softmax − one-hot) over the last axis of logits ``z [..., K]``, target indices
    ``[..., 1]``. ``log Σ exp`` is formed as ``max + log1p(s)``, ``s`` summing every term but the largest: with
    ``log(1 + s)`` the small losses of confidently classified rows would round away (relative error
    ``eps / s``), and the objective the line search and the certificate read would carry that noise."""
    m, top = z.max(-1, keepdim=True)
    e = torch.exp(z - m).scatter_(-1, top, 0.0)
    s = e.sum(-1, keepdim=True)
    loss = ((m - z.gather(-1, target)) + torch.log1p(s))[..., 0]
    resid = e.scatter_(-1, top, 1.0).div_(1 + s)
    resid.scatter_add_(-1, target, torch.full_like(s, -1.0))
    return loss, resid


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
        # With the sign s = 1 − 2t, loss = softplus(s·z) and residual = s·σ(s·z): no cancellation of
        # softplus(z) − z or σ(z) − 1, which lose the small losses of confidently classified rows.
        sign = 1 - 2 * y.to(z.dtype)
        z1 = sign * z[..., 0]
        loss = torch.nn.functional.softplus(z1)
        resid = (sign * torch.sigmoid(z1))[..., None]
    else:
        loss, resid = _softmax_loss(z, y[..., None])
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
        sign = (1 - 2 * y.to(z.dtype))[..., None]  # as in _logistic_block
        z1 = sign * z[..., 0]
        loss = torch.nn.functional.softplus(z1)  # [G, n, R]
        resid = (sign * torch.sigmoid(z1))[..., None]
    else:
        loss, resid = _softmax_loss(z, y[:, :, None, None].expand(G, n, R, 1))
    f = (weights[..., None] * loss).sum(1).reshape(G * R)
    grad = (resid * weights[..., None, None]).view(G, n, R * Kf).transpose(1, 2) @ X  # [G, R·Kf, D1]
    return f, grad.view(G, R, Kf, D1).transpose(2, 3).reshape(G * R, D1, Kf)


def class_shares(y: Tensor, weights: Tensor, num_classes: int) -> Tensor:
    """Weight of each class ``[G, Kf]`` (rows ``weights [G, n]`` summed per class of ``y [G, n]``); for a binary
    problem (one logit) the weight of class 1."""
    shares = torch.zeros(y.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
    shares.scatter_add_(1, y, weights)
    return shares[:, 1:] if num_classes == 2 else shares


def _log_softmax_parts(z: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """``(log p, p)`` of ``softmax(z)`` along ``dim``, accurate where a probability is within rounding of 1:
    ``log Σ exp`` is ``max + log1p(s)`` with ``s`` the sum *without* the largest term, so the small losses and
    entropies of confidently classified rows keep their relative precision (``log(1 + s)`` would round them)."""
    m, top = z.max(dim, keepdim=True)
    e = torch.exp(z - m).scatter(dim, top, 0.0)
    log_norm = torch.log1p(e.sum(dim, keepdim=True))
    logp = z - m - log_norm
    return logp, torch.exp(logp)


def _plogp(p: Tensor, logp: Tensor) -> Tensor:
    """``p·log p`` with ``0·log 0 = 0`` (a class whose probability was moved away entirely has ``log p = −inf``)."""
    return torch.where(p > 0, p * logp, torch.zeros_like(p))


def dual_sums(
    X: Tensor,
    y: Tensor,
    weights: Tensor,
    W: Tensor,
    num_classes: int,
    gbar: Tensor,
    mass: Tensor,
    total: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Row sums of the primal loss and of the dual objective at a dual-feasible point built from the residuals.

    The dual of ``Σ_i w_i·logloss_i + ½·reg·‖W‖²`` (intercept free) is ``Σ_i w_i·H(π_i) − ‖Σ_i w_i x_i u_iᵀ‖² /
    (2·reg)`` over probability vectors ``π_i = u_i + onehot(y_i)`` with ``Σ_i w_i u_i = 0``; the residuals ``u_i =
    softmax(z_i) − onehot(y_i)`` meet the constraint only where the intercept's gradient ``gbar = Σ_i w_i u_i``
    vanishes, so they are moved onto it: the surplus ``gbar_k > 0`` of a class is taken from every row's
    probability of that class in proportion to it, and given to the classes in deficit in proportion to their
    deficit, which keeps every π a probability vector. Any feasible point gives a lower bound of the optimum, so
    ``f(W) − dual`` bounds ``f(W) − f*`` rigorously. Logarithms are formed in log space (:func:`_log_softmax_parts`),
    since near the optimum of a nearly separable problem the primal and dual terms are differences of numbers
    within rounding of 1; the primal loss is recomputed the same way, so both sides of the gap have that precision.

    Args: ``X [G, n, D1]`` (intercept column last), ``y [G, n]``, ``weights [G, n]``, ``W [G·R, D1, Kf]`` (R
    problems per X, as :func:`logistic_sums`), ``gbar [G·R, Kf]`` the intercept rows of the data term's gradient,
    ``mass [G·R, Kf]`` each class's predicted weight ``Σ_i w_i π_ik`` (``gbar`` + the class shares), ``total
    [G]`` the row weight of each whole problem (default: of these rows; a caller that passes the rows in blocks
    or chunks must pass it, since the binary point moves a share of it, like ``gbar`` and ``mass``).
    Returns (``Σ_i w_i·logloss_i [G·R]``, ``Σ_i w_i·H(π_i) [G·R]``, ``Σ_i w_i x_i u_iᵀ [G·R, D1 − 1, Kf]``); sums
    over rows, so chunks add up.
    """
    G, n, D1 = X.shape
    R, Kf = W.shape[0] // G, W.shape[2]
    z = (X @ W.view(G, R, D1, Kf).permute(0, 2, 1, 3).reshape(G, D1, R * Kf)).view(G, n, R, Kf)
    gb, ms = gbar.view(G, 1, R, Kf), mass.view(G, 1, R, Kf)
    tiny = torch.finfo(X.dtype).tiny
    if num_classes == 2:
        z1, t = z[..., 0], y.to(z.dtype)[..., None]  # [G, n, R]
        loss = torch.nn.functional.softplus((1 - 2 * t) * z1)
        logp, logq = -torch.nn.functional.softplus(-z1), -torch.nn.functional.softplus(z1)
        g1, m1 = gb[..., 0], ms[..., 0]
        total = (weights.sum(1) if total is None else total)[:, None, None]  # of the whole problem
        # Surplus on class 1: its probability is scaled down and the rest goes to class 0; deficit: the reverse.
        down = (g1.clamp_min(0) / m1.clamp_min(tiny)).clamp(max=1.0)
        up = ((-g1).clamp_min(0) / (total - m1).clamp_min(tiny)).clamp(max=1.0)
        log_down, log_up = torch.log(down.clamp_min(tiny)), torch.log(up.clamp_min(tiny))
        surplus = g1 > 0
        logp2 = torch.where(surplus, logp + torch.log1p(-down), torch.logaddexp(logp, logq + log_up))
        logq2 = torch.where(surplus, torch.logaddexp(logq, logp + log_down), logq + torch.log1p(-up))
        p2, q2 = torch.exp(logp2), torch.exp(logq2)
        H = -(_plogp(p2, logp2) + _plogp(q2, logq2))
        u = torch.where(t > 0, -q2, p2)[..., None]  # π₁ − y, without cancelling 1 − q against 1
    else:
        logp, p = _log_softmax_parts(z, 3)  # [G, n, R, K]
        idx = y[:, :, None, None].expand(G, n, R, 1)
        loss = -logp.gather(3, idx)[..., 0]
        surplus, deficit = gb.clamp_min(0), (-gb).clamp_min(0)
        take = (surplus / ms.clamp_min(tiny)).clamp(max=1.0)  # share of each class's probability taken
        moved = (p * take).sum(3, keepdim=True)  # [G, n, R, 1] mass taken from each row
        give = deficit / deficit.sum(3, keepdim=True).clamp_min(tiny)
        log_given = torch.log((moved * give).clamp_min(tiny))
        logp2 = torch.where(
            gb > 0, logp + torch.log1p(-take), torch.where(gb < 0, torch.logaddexp(logp, log_given), logp)
        )
        p2 = torch.exp(logp2)
        H = -_plogp(p2, logp2).sum(3)
        # u = π − onehot, with the true class's entry as minus the others' sum (no 1 − π cancellation).
        others = p2.scatter(3, idx, 0.0)
        u = others.scatter(3, idx, -others.sum(3, keepdim=True))
    loss_sum = (weights[..., None] * loss).sum(1).reshape(G * R)
    Hsum = (weights[..., None] * H).sum(1).reshape(G * R)
    V = (u * weights[..., None, None]).reshape(G, n, R * Kf).transpose(1, 2) @ X[..., :-1]  # [G, R·Kf, D]
    return loss_sum, Hsum, V.view(G, R, Kf, D1 - 1).transpose(2, 3).reshape(G * R, D1 - 1, Kf)


def dual_sums_blocked(
    X: Tensor, y: Tensor, weights: Tensor, W: Tensor, num_classes: int, gbar: Tensor, mass: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`dual_sums` over blocks of rows on the CPU (as :func:`logistic_sums`), bounding the temporaries."""
    G, n, D1 = X.shape
    rows = max(64, CPU_BLOCK_BYTES // max(1, G * D1 * X.element_size()))
    if X.device.type != "cpu" or n <= 2 * rows:
        return dual_sums(X, y, weights, W, num_classes, gbar, mass)
    total = weights.sum(1)  # every block's dual point moves shares of the whole problem's weight
    L, H, V = dual_sums(X[:, :rows], y[:, :rows], weights[:, :rows], W, num_classes, gbar, mass, total)
    for a in range(rows, n, rows):
        Lb, Hb, Vb = dual_sums(
            X[:, a : a + rows],
            y[:, a : a + rows],
            weights[:, a : a + rows],
            W,
            num_classes,
            gbar,
            mass,
            total,
        )
        L += Lb
        H += Hb
        V += Vb
    return L, H, V


def duality_gap(W: Tensor, loss: Tensor, entropy: Tensor, V: Tensor, reg: Tensor) -> Tensor:
    """``primal − dual`` per problem: primal ``loss + ½·reg·‖W‖²`` (``W [G, D1, Kf]``, intercept row last, not
    penalised), dual ``entropy − ‖V‖² / (2·reg)`` (:func:`dual_sums`)."""
    Wf = W[:, :-1]
    primal = loss + 0.5 * reg * (Wf * Wf).sum((1, 2))
    return primal - (entropy - (V * V).sum((1, 2)) / (2 * reg))
