"""The logistic solver (``qkvprobe.rules.logistic``) reaches the optimum on ill-conditioned problems, on every
path (single rule, batched tokens × Cs, few-shot span problems in float32, streamed rows), or says it did not.

The reference is an independent, *converged* solver: scikit-learn's Newton–Cholesky at tol = 1e-12 (exact
Hessians, so it converges where L-BFGS at scikit-learn's defaults stops short), compared through the objective
``C·Σ sw_i·logloss_i + ½‖W‖²``. The problems are the raw digits (0–16 pixels, 1 257 training rows, float64),
as they are and with one column scaled ×300 (an outlier dimension), at C ∈ {1e-2, 1, 1e2, 1e4}. "Within 1e-4"
means ``f_ours ≤ f_ref·(1 + 1e-4)``; and ``f_ours ≥ f_ref·(1 − 1e-6)``, so a wrong objective cannot pass.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from threadpoolctl import threadpool_limits

from qkvprobe.rules import HyperplaneRule
from qkvprobe.rules.logistic import (
    DenseLogistic,
    SpanLogistic,
    StreamedLogistic,
    augment,
    balanced_class_weights,
    fit_logistic,
    fit_logistic_grid,
    gap_bound,
    minimize_lbfgs,
    second_moment,
    solve,
    solve_span,
    span_expand,
    span_reduce,
)

CS = (1e-2, 1.0, 1e2, 1e4)
GAP = 1e-4


def objective(
    coef: np.ndarray, intercept: np.ndarray, X: np.ndarray, y: np.ndarray, C: float, sw=None
) -> float:
    """scikit-learn's objective ``C·Σ sw·logloss + ½‖W‖²`` of a fit (codes ``y`` in 0..K-1)."""
    coef, intercept = np.atleast_2d(coef), np.atleast_1d(intercept)
    z = X @ coef.T + intercept
    sw = np.ones(len(y)) if sw is None else sw
    if coef.shape[0] == 1:
        z1 = z[:, 0]
        loss = np.logaddexp(0, z1) - (y == 1) * z1
    else:
        m = z.max(1)
        loss = m + np.log(np.exp(z - m[:, None]).sum(1)) - z[np.arange(len(y)), y]
    return float(C * (sw * loss).sum() + 0.5 * (coef**2).sum())


def reference(X: np.ndarray, y: np.ndarray, C: float, sw=None) -> float:
    """The optimum's objective: the better of scikit-learn's Newton–Cholesky and L-BFGS solvers at tight
    tolerances (Newton–Cholesky can stop early on separable few-shot problems at very large C)."""
    best = np.inf
    for solver, max_iter in (("newton-cholesky", 2000), ("lbfgs", 100_000)):
        with threadpool_limits(1), warnings.catch_warnings():
            warnings.simplefilter(
                "ignore"
            )  # line-search complaints at the very end: the objective is what counts
            ref = LogisticRegression(C=C, solver=solver, tol=1e-12, max_iter=max_iter)
            ref.fit(X, y, sample_weight=sw)
        best = min(best, objective(ref.coef_, ref.intercept_, X, np.searchsorted(ref.classes_, y), C, sw))
        if solver == "newton-cholesky" and len(X) > 200:
            break  # many rows: Newton's method converges; L-BFGS at 1e-12 would only cost time
    if len(X) <= 200:
        best = min(best, newton_reference(X, np.searchsorted(np.unique(y), y), C, sw))
    return best


def newton_reference(X: np.ndarray, y: np.ndarray, C: float, sw=None, iters: int = 500) -> float:
    """A damped Newton method on the multinomial objective, in NumPy (exact Hessian, backtracking), for small
    problems: separable few-shot episodes at very large C, where scikit-learn's solvers stop early."""
    n, D = X.shape
    K = int(y.max()) + 1
    sw = np.ones(n) if sw is None else sw
    Xa = np.hstack([X, np.ones((n, 1))])
    binary = K == 2  # scikit-learn's binary form: one logit, class 0's fixed at 0 (and not penalised)
    Y = np.eye(K)[y]
    pen = np.ones(D + 1)
    pen[-1] = 0.0
    pen_k = np.array([0.0, 1.0]) if binary else np.ones(K)  # penalised classes

    def f_g_h(W: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        Z = Xa @ W
        if binary:
            Z[:, 0] = 0.0
        Z = Z - Z.max(1, keepdims=True)
        P = np.exp(Z)
        P /= P.sum(1, keepdims=True)
        loss = -(Y * np.log(np.clip(P, 1e-300, None))).sum(1)
        mask = pen[:, None] * pen_k[None, :]
        f = C * (sw * loss).sum() + 0.5 * ((W * mask) ** 2).sum()
        g = (C * Xa.T @ (sw[:, None] * (P - Y)) + W * mask) * (pen_k[None, :] if binary else 1.0)
        H = np.zeros((D + 1, K, D + 1, K))
        for k in range(K):
            for j in range(K):
                c = C * sw * P[:, k] * ((k == j) - P[:, j])
                H[:, k, :, j] = (Xa * c[:, None]).T @ Xa
        H = H.reshape((D + 1) * K, -1) + np.diag(mask.ravel())
        if binary:  # class 0's column is fixed at zero: keep it out of the Newton system
            fixed = np.zeros((D + 1, K), bool)
            fixed[:, 0] = True
            H[fixed.ravel(), :] = 0.0
            H[:, fixed.ravel()] = 0.0
            H[fixed.ravel(), fixed.ravel()] = 1.0
        return float(f), g, H

    W = np.zeros((D + 1, K))
    f, g, H = f_g_h(W)
    for _ in range(iters):
        step = -np.linalg.lstsq(H, g.ravel(), rcond=None)[0].reshape(D + 1, K)
        t, slope = 1.0, float((g * step).sum())
        while t > 1e-12:
            f_new, g_new, H_new = f_g_h(W + t * step)
            if f_new <= f + 1e-4 * t * slope:
                break
            t /= 2
        if t <= 1e-12 or f - f_new <= 1e-15 * abs(f):
            break
        W, f, g, H = W + t * step, f_new, g_new, H_new
    return f


def assert_at_optimum(f: float, f_ref: float, what: str) -> None:
    assert f <= f_ref * (1 + GAP), (
        f"{what}: objective {f:.8g} is {f / f_ref - 1:.1e} above the optimum {f_ref:.8g}"
    )
    assert f >= f_ref * (1 - 1e-6), (
        f"{what}: objective {f:.8g} below the optimum {f_ref:.8g}: wrong objective"
    )


@pytest.fixture(scope="module")
def digits() -> dict[bool, tuple[np.ndarray, np.ndarray]]:
    """The raw digits training split, plain and with column 10 scaled ×300."""
    X, y = load_digits(return_X_y=True)
    Xtr, _, ytr, _ = train_test_split(X, y, test_size=0.3, random_state=0)
    scaled = Xtr.copy()
    scaled[:, 10] *= 300
    return {False: (Xtr, ytr), True: (scaled, ytr)}


@pytest.fixture(scope="module")
def optimum(digits) -> dict[tuple[bool, float], float]:
    return {(s, C): reference(*digits[s], C) for s in (False, True) for C in CS}


@pytest.mark.parametrize("scaled", [False, True])
def test_single_rule_reaches_the_optimum(digits, optimum, scaled: bool) -> None:
    X, y = digits[scaled]
    for C in CS:
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConvergenceWarning)
            rule = HyperplaneRule(C=C).fit(X, y)
        assert rule.converged_ and rule.gap_ <= GAP
        assert_at_optimum(objective(rule.coef_, rule.intercept_, X, y, C), optimum[(scaled, C)], f"C={C:g}")


@pytest.mark.parametrize("scaled", [False, True])
def test_batched_tokens_times_Cs_reach_the_optimum(digits, optimum, scaled: bool) -> None:
    """The standard protocol's batch: two feature sets (token types) × all Cs, one L-BFGS problem each."""
    X, y = digits[scaled]
    Xt = torch.as_tensor(np.stack([X, X[:, ::-1].copy()]))  # a second "token": the columns reversed
    yt = torch.as_tensor(y)[None].repeat(2, 1)
    for fit, C in zip(fit_logistic_grid(Xt, yt, 10, CS), CS, strict=True):
        assert bool(fit.converged.all()), (C, fit.gap)
        for g in range(2):
            f = objective(fit.coef[g].numpy(), fit.intercept[g].numpy(), Xt[g].numpy(), y, C)
            assert_at_optimum(f, optimum[(scaled, C)], f"token {g}, C={C:g}")


@pytest.mark.parametrize("scaled", [False, True])
def test_binary_and_class_weighted_fits_reach_the_optimum(digits, scaled: bool) -> None:
    """Binary (3 vs 8, the hardest pair) and balanced-class-weighted multinomial fits (classes 0–4 with class 0
    over-represented), against the reference with the same weights."""
    X, y = digits[scaled]
    pair = np.isin(y, (3, 8))
    Xb, yb = X[pair], (y[pair] == 8).astype(np.int64)
    keep = (y < 5) & ((y == 0) | (np.arange(len(y)) % 3 == 0))
    Xw, yw = X[keep], y[keep]
    counts = np.bincount(yw)
    sw = (len(yw) / (len(counts) * counts))[yw]  # scikit-learn's "balanced"
    for C in (1.0, 1e4):
        rule = HyperplaneRule(C=C).fit(Xb, yb)
        assert rule.converged_ and rule.coef_.shape == (1, 64)
        assert_at_optimum(
            objective(rule.coef_, rule.intercept_, Xb, yb, C), reference(Xb, yb, C), f"binary C={C:g}"
        )
        rule = HyperplaneRule(C=C, class_weight="balanced").fit(Xw, yw)
        assert rule.converged_
        f = objective(rule.coef_, rule.intercept_, Xw, yw, C, sw)
        assert_at_optimum(f, reference(Xw, yw, C, sw), f"balanced C={C:g}")


@pytest.mark.parametrize("num_classes", [2, 5])
def test_fewshot_span_problems_in_float32_reach_the_optimum(digits, num_classes: int) -> None:
    """Few-shot episodes (5 shots of raw, ×300-scaled digits): span-reduced, solved in float32, finished in
    float64 where float32 rounding cannot certify the optimum; every episode at its optimum, at every C."""
    X, y = digits[True]
    rng = np.random.default_rng(0)
    episodes = []
    for _ in range(6):
        classes = rng.choice(10, num_classes, replace=False)
        rows = np.concatenate([rng.choice(np.flatnonzero(y == c), 5, replace=False) for c in classes])
        episodes.append((X[rows], np.repeat(np.arange(num_classes), 5)))
    Xe = torch.as_tensor(np.stack([e[0] for e in episodes]), dtype=torch.float32)
    ye = torch.as_tensor(np.stack([e[1] for e in episodes]))
    for C in CS:
        red = span_reduce(Xe, None, torch.float32, basis="cholesky")
        W, res = solve_span(red.X, ye, num_classes, torch.full((len(Xe),), C), torch.ones(ye.shape))
        assert bool(res.converged.all()), (C, res.gap / res.f)
        coef, intercept = span_expand(red, Xe, None, W)
        for e, (Xs, ys) in enumerate(episodes):
            f = objective(coef[e].double().numpy(), intercept[e].double().numpy(), Xs, ys, C)
            # float32 features: the objective is evaluated in float64 on float32-rounded coefficients
            assert_at_optimum(f, reference(Xs, ys, C), f"episode {e}, C={C:g}")


@pytest.mark.parametrize("balanced", [False, True])
def test_streamed_rows_reach_the_optimum(digits, optimum, balanced: bool) -> None:
    """The segmentation protocol's objective: rows in chunks, every C of the grid one problem."""
    X, y = digits[True]
    Xa = augment(torch.as_tensor(X))
    yt = torch.as_tensor(y)
    chunks = lambda: iter([(Xa[a : a + 300], yt[a : a + 300]) for a in range(0, len(y), 300)])  # noqa: E731
    counts = torch.as_tensor(np.bincount(y, minlength=10), dtype=torch.float64)
    class_w = balanced_class_weights(counts) if balanced else None
    moment = second_moment(Xa[None], torch.ones(1, len(y), dtype=torch.float64))
    obj = StreamedLogistic(chunks, len(y), 10, list(CS), moment, class_w)
    res = solve(obj, torch.zeros(len(CS), 65 * 10, dtype=torch.float64))
    assert bool(res.converged.all()), res.gap / res.f
    sw = None if class_w is None else class_w.numpy()[y]
    for r, C in enumerate(CS):
        W = res.w[r].view(65, 10).numpy()
        f = objective(W[:-1].T, W[-1], X, y, C, sw)
        f_ref = optimum[(True, C)] if sw is None else reference(X, y, C, sw)
        assert_at_optimum(f, f_ref, f"streamed C={C:g}")


def test_a_fit_that_cannot_converge_warns_and_says_so(digits) -> None:
    X, y = digits[True]
    with pytest.warns(ConvergenceWarning, match=r"did not certify its optimum.*max_iter=5"):
        rule = HyperplaneRule(C=1e4, max_iter=5).fit(X, y)
    assert rule.converged_ is False and rule.gap_ > 1e-4 and rule.n_iter_[0] <= 5
    fit = fit_logistic(torch.as_tensor(X)[None], torch.as_tensor(y)[None], 10, 1e4, max_iter=5)
    assert not bool(fit.converged[0]) and float(fit.gap[0]) > 1e-4


def test_gap_bound_bounds_the_distance_to_the_optimum() -> None:
    """The certificate itself: along the iterates of a solve, ``‖∇f‖²/2μ`` is never below ``f − f*``."""
    rng = np.random.default_rng(1)
    X = augment(torch.as_tensor(rng.normal(size=(1, 200, 6)) * np.geomspace(0.1, 50, 6) + 3))
    y = torch.as_tensor(rng.integers(0, 3, (1, 200)))
    obj = DenseLogistic(
        X, y, torch.ones(1, 200, dtype=torch.float64), torch.tensor([50.0], dtype=torch.float64), 3
    )
    f_star = float(solve(obj, torch.zeros(1, 21, dtype=torch.float64), tol=1e-14).f[0])
    for iters in (0, 2, 5, 10, 20, 40):
        res = minimize_lbfgs(obj, torch.zeros(1, 21, dtype=torch.float64), max_iter=iters, tol=1e-14)
        f, g = obj.value_grad(res.w)
        assert float(gap_bound(g, obj.strong_convexity)[0]) >= float(f[0]) - f_star - 1e-15


class Quadratic:
    """``offset + ½‖w‖²`` (μ = 1); ``sign = -1`` gives a gradient that points the wrong way (no descent possible)."""

    def __init__(self, offset: float, sign: float = 1.0) -> None:
        self.offset, self.sign = offset, sign
        self.strong_convexity = torch.tensor([1.0], dtype=torch.float64)

    def value_grad(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.offset + 0.5 * (w * w).sum(1), self.sign * w.clone()

    def precondition(self, v: torch.Tensor) -> torch.Tensor:
        return v

    def select(self, keep: torch.Tensor) -> Quadratic:
        return self


def test_a_decrease_below_rounding_is_not_convergence() -> None:
    """Far below the objective's rounding (``½‖w‖²`` is 1e-14 of ``f``), steps still follow the gradient (the
    approximate Wolfe test reads progress off the slopes) until the certificate holds, instead of stopping at the
    first tiny decrease as a relative-decrease rule does."""
    w0 = torch.full((1, 3), 1e-3, dtype=torch.float64)
    res = minimize_lbfgs(Quadratic(1e8), w0, max_iter=50, tol=1e-24)
    assert bool(res.converged[0]) and float(res.w.abs().max()) < 1e-7, res.w


def test_a_problem_that_cannot_descend_ends_unconverged() -> None:
    """No descent direction exists (the gradient is wrong): the solver restarts (preconditioned gradient, then
    scaled steepest descent) and then stops with converged = False, never True."""
    res = minimize_lbfgs(
        Quadratic(1.0, sign=-1.0), torch.ones(1, 3, dtype=torch.float64), max_iter=100, tol=1e-8
    )
    assert not bool(res.converged[0])


@pytest.mark.parametrize("num_classes", [2, 4])
def test_span_objective_equals_dense_objective(num_classes: int) -> None:
    """The few-shot objective (class-major parameters, hand-written softmax) gives the dense objective's value
    and gradient, in float64 and (to float32 rounding) in float32."""
    rng = np.random.default_rng(7)
    G, n, D = 3, 9, 20
    X = torch.as_tensor(rng.normal(size=(G, n, D)) * 3 + 5)
    y = torch.as_tensor(rng.integers(0, num_classes, (G, n)))
    red = augment(span_reduce(X, None, torch.float64).X)
    sw, C = torch.ones(G, n, dtype=torch.float64), torch.tensor([0.3, 1.0, 5.0], dtype=torch.float64)
    kf = 1 if num_classes == 2 else num_classes
    W = torch.as_tensor(rng.normal(size=(G, n + 1, kf)) * 0.5)
    dense = DenseLogistic(red, y, sw, C, num_classes)
    f_ref, g_ref = dense.value_grad(W.reshape(G, -1))
    torch.testing.assert_close(dense.strong_convexity, 1.0 / (C * n))
    for dt, rtol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        span = SpanLogistic(red.to(dt), y, sw.to(dt), C.to(dt), num_classes)
        f, g = span.value_grad(W.transpose(1, 2).reshape(G, -1).to(dt))  # class-major layout
        np.testing.assert_allclose(f.double().numpy(), f_ref.numpy(), rtol=rtol)
        g = g.double().view(G, kf, n + 1).transpose(1, 2).reshape(G, -1)
        np.testing.assert_allclose(g.numpy(), g_ref.numpy(), rtol=rtol, atol=rtol * float(g_ref.abs().max()))
        sub = span.select(torch.tensor([2, 0]))
        np.testing.assert_allclose(
            sub.value_grad(W.transpose(1, 2).reshape(G, -1).to(dt)[[2, 0]])[0].double().numpy(),
            f_ref.numpy()[[2, 0]],
            rtol=rtol,
        )


def test_streamed_objective_equals_dense_objective() -> None:
    rng = np.random.default_rng(2)
    n, D, K = 500, 7, 3
    X = augment(torch.as_tensor(rng.normal(size=(n, D)) * 4 + 1))
    y = torch.as_tensor(rng.integers(0, K, n))
    Cs = [0.1, 10.0]
    moment = second_moment(X[None], torch.ones(1, n, dtype=torch.float64))
    streamed = StreamedLogistic(lambda: iter([(X[:200], y[:200]), (X[200:], y[200:])]), n, K, Cs, moment)
    dense = DenseLogistic(
        X[None], y[None], torch.ones(1, n, dtype=torch.float64), torch.tensor(Cs, dtype=torch.float64), K
    )
    w = torch.as_tensor(rng.normal(size=(2, (D + 1) * K)))
    for a, b in zip(streamed.value_grad(w), dense.value_grad(w), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(streamed.strong_convexity, dense.strong_convexity)
