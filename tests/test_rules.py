"""Rules: hyperplane vs scikit-learn, cosine vs a NumPy reference, batched vs one-at-a-time, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

import qkvprobe
from qkvprobe.errors import FeatureError, NotFittedError, RuleError
from qkvprobe.rules import CosineRule, HyperplaneRule, fit_logistic, fit_logistic_grid, fit_logistic_path
from qkvprobe.rules.logistic import balanced_sample_weight


def blobs(
    n: int, dim: int, num_classes: int, seed: int = 0, offset: float = 5.0
) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping Gaussian classes with a common offset (raw-feature-like, not separable)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(num_classes, dim))
    y = rng.integers(0, num_classes, n)
    return means[y] + 2.0 * rng.normal(size=(n, dim)) * np.linspace(0.3, 3, dim) + offset, y


@pytest.mark.parametrize(("num_classes", "C"), [(4, 0.05), (4, 2.0), (2, 0.5)])
def test_hyperplane_matches_sklearn(num_classes: int, C: float) -> None:
    X, y = blobs(300, 6, num_classes)
    Xt, yt = blobs(300, 6, num_classes, seed=1)
    with threadpool_limits(1):  # tiny problem: BLAS threads only add contention
        sk = LogisticRegression(C=C, tol=1e-9, max_iter=3000).fit(X, y)
    ours = HyperplaneRule(C=C, tol=1e-10, max_iter=3000).fit(X, y)
    assert ours.coef_.shape == sk.coef_.shape and ours.intercept_.shape == sk.intercept_.shape
    # Same objective and optimum: coefficients agree to 1e-4 of their largest magnitude (both solvers stop on
    # tolerances, scikit-learn also on a relative-decrease test).
    scale = np.abs(sk.coef_).max()
    np.testing.assert_allclose(ours.coef_, sk.coef_, atol=1e-4 * scale)
    sk_b = sk.intercept_ - (
        sk.intercept_.mean() if num_classes > 2 else 0
    )  # intercepts are defined up to a shift
    np.testing.assert_allclose(ours.intercept_, sk_b, atol=1e-4 * max(1, np.abs(sk_b).max()))
    assert abs(ours.score(Xt, yt) - sk.score(Xt, yt)) <= 0.003
    np.testing.assert_array_equal(ours.classes_, sk.classes_)
    assert ours.decision_function(Xt).shape == sk.decision_function(Xt).shape


def test_hyperplane_wide_features_span_reduction_matches_sklearn() -> None:
    # Few-shot shape (n < D): solved in the span of the samples, must still be sklearn's optimum.
    rng = np.random.default_rng(3)
    y = np.repeat(np.arange(5), 3)
    X = rng.normal(size=(5, 40))[y] + 3 * rng.normal(size=(15, 40)) + 10
    with threadpool_limits(1):
        sk = LogisticRegression(C=1.0, tol=1e-9, max_iter=3000).fit(X, y)
    ours = HyperplaneRule(C=1.0, tol=1e-10, max_iter=3000).fit(X, y)
    np.testing.assert_allclose(ours.coef_, sk.coef_, atol=1e-4 * np.abs(sk.coef_).max())
    Xq = rng.normal(size=(5, 40))[y] + 3 * rng.normal(size=(15, 40)) + 10
    np.testing.assert_array_equal(ours.predict(Xq), sk.predict(Xq))


def test_hyperplane_string_labels_and_sklearn_contract() -> None:
    X, y = blobs(200, 5, 3)
    names = np.array(["cat", "dog", "eel"])[y]
    rule = HyperplaneRule(C=0.3).fit(X, names)
    assert set(rule.predict(X)) <= {"cat", "dog", "eel"}
    assert rule.n_iter_.shape == (1,) and rule.n_iter_[0] > 0
    assert clone(rule).get_params()["C"] == 0.3
    assert qkvprobe.HyperplaneRule is HyperplaneRule and qkvprobe.CosineRule is CosineRule


def test_cosine_matches_numpy_reference() -> None:
    X, y = blobs(120, 6, 3)
    Xq, _ = blobs(40, 6, 3, seed=2)
    unit = X / np.linalg.norm(X, axis=1, keepdims=True)
    mu = np.stack([unit[y == c].mean(0) for c in range(3)])
    cos = (Xq / np.linalg.norm(Xq, axis=1, keepdims=True)) @ (
        mu / np.linalg.norm(mu, axis=1, keepdims=True)
    ).T
    rule = CosineRule().fit(X, y)
    np.testing.assert_allclose(rule.directions_, mu, rtol=1e-10)
    np.testing.assert_allclose(rule.decision_function(Xq), cos, rtol=1e-10)
    np.testing.assert_array_equal(rule.predict(Xq), cos.argmax(1))


def test_batched_episodes_equal_one_at_a_time() -> None:
    rng = np.random.default_rng(5)
    E, N, K, D = 6, 4, 3, 24
    means = rng.normal(size=(E, N, D))
    ys = np.tile(np.repeat(np.arange(N), K), (E, 1))
    Xs = np.take_along_axis(means, ys[..., None], 1) + 1.5 * rng.normal(size=(E, N * K, D)) + 4
    Xq = means + 1.5 * rng.normal(size=(E, N, D)) + 4
    fit = fit_logistic(torch.as_tensor(Xs), torch.as_tensor(ys), N, 0.7, tol=1e-10)
    coef, intercept = fit.coef, fit.intercept
    for e in range(E):
        one = HyperplaneRule(C=0.7, tol=1e-10).fit(Xs[e], ys[e])
        np.testing.assert_allclose(coef[e].numpy(), one.coef_, atol=1e-7)
        np.testing.assert_array_equal(
            (Xq[e] @ coef[e].numpy().T + intercept[e].numpy()).argmax(1), one.predict(Xq[e])
        )


def test_warm_started_path_equals_cold_fits() -> None:
    X, y = blobs(150, 4, 3)
    Xt = torch.as_tensor(X)[None].repeat(2, 1, 1)
    Xt[1] *= 2.0  # a second "token type"
    yt = torch.as_tensor(y)[None].repeat(2, 1)
    path = fit_logistic_path(Xt, yt, 3, [0.01, 1.0], tol=1e-10, max_iter=2000)
    for fit, C in zip(path, [0.01, 1.0], strict=True):
        coef = fit.coef
        for g in range(2):
            cold = HyperplaneRule(C=C, tol=1e-10, max_iter=2000).fit(Xt[g].numpy(), y)
            np.testing.assert_allclose(coef[g].numpy(), cold.coef_, atol=1e-4 * np.abs(cold.coef_).max())


@pytest.mark.parametrize("num_classes", [2, 3])
def test_C_grid_of_shared_features_equals_cold_fits(num_classes: int) -> None:
    """All Cs of all feature sets are one batch, each X read once for its Cs; every solution equals
    scikit-learn's fit at that C (as the warm path's test above)."""
    X, y = blobs(150, 4, num_classes)
    Xt = torch.as_tensor(X)[None].repeat(2, 1, 1)
    Xt[1] *= 2.0
    yt = torch.as_tensor(y)[None].repeat(2, 1)
    Cs = [0.01, 1.0, 30.0]
    grid = fit_logistic_grid(Xt, yt, num_classes, Cs, tol=1e-10, max_iter=2000)
    for fit, C in zip(grid, Cs, strict=True):
        coef, n_iter = fit.coef, fit.n_iter
        assert coef.shape == (2, 1 if num_classes == 2 else num_classes, 4) and (n_iter > 0).all()
        for g in range(2):
            with threadpool_limits(1):
                sk = LogisticRegression(C=C, tol=1e-10, max_iter=5000).fit(Xt[g].numpy(), y)
            np.testing.assert_allclose(coef[g].numpy(), sk.coef_, atol=1e-4 * np.abs(sk.coef_).max())


def test_C_grid_batches_follow_the_memory_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    from qkvprobe.rules.logistic import fit as logistic_fit
    from qkvprobe.rules.logistic import grid_step

    cpu, gpu = torch.device("cpu"), torch.device("cuda")  # only the device type is read
    assert grid_step(8, 10, 193 * 10, 54_000, 10, torch.float64, cpu) == 8
    assert grid_step(8, 1, 769 * 1000, 1_281_167, 1000, torch.float64, cpu) == 3
    assert grid_step(8, 1, 769 * 1000, 1_281_167, 1000, torch.float32, gpu) == 1
    # Split into batches of 2 Cs, the grid's fits are the one-batch fits.
    X, y = blobs(150, 4, 3)
    Xt, yt = torch.as_tensor(X)[None], torch.as_tensor(y)[None]
    Cs = [0.01, 0.1, 1.0]
    whole = fit_logistic_grid(Xt, yt, 3, Cs, tol=1e-10, max_iter=2000)
    per_C = (2 * 10 + 6) * 5 * 3 * 8
    monkeypatch.setattr(logistic_fit, "GRID_BYTES", 2 * per_C)
    assert grid_step(3, 1, 5 * 3, 150, 3, torch.float64, cpu) == 2
    split = fit_logistic_grid(Xt, yt, 3, Cs, tol=1e-10, max_iter=2000)
    for a, b in zip(whole, split, strict=True):
        torch.testing.assert_close(a.coef, b.coef, rtol=1e-6, atol=1e-6 * float(a.coef.abs().max()))


def test_objective_of_shared_features_selects_any_problems() -> None:
    """``DenseLogistic`` with R problems per X: any subset (as L-BFGS compaction and the line search pick
    them) gives the values and gradients of those problems alone, and X is dropped only with all its problems."""
    from qkvprobe.rules.logistic import DenseLogistic, augment

    rng = np.random.default_rng(3)
    G, R, n, D, K = 3, 2, 80, 5, 4
    X = augment(torch.as_tensor(rng.normal(size=(G, n, D))))
    y = torch.as_tensor(rng.integers(0, K, (G, n)))
    sw = torch.as_tensor(rng.uniform(0.5, 2.0, (G, n)))
    C = torch.as_tensor(rng.uniform(0.1, 10.0, G * R))
    shared = DenseLogistic(X, y, sw, C, K)
    w = torch.as_tensor(rng.normal(size=(G * R, (D + 1) * K)))
    alone = [
        DenseLogistic(
            X[p // R : p // R + 1], y[p // R : p // R + 1], sw[p // R : p // R + 1], C[p : p + 1], K
        )
        for p in range(G * R)
    ]
    for keep in ([0, 1, 2, 3, 4, 5], [1, 2, 5], [4], [0, 1]):
        sub = shared.select(torch.tensor(keep))
        f, g = sub.value_grad(w[keep])
        assert sub.X.shape[0] == len({p // R for p in keep})  # only the Xs with problems left
        for j, p in enumerate(keep):
            fa, ga = alone[p].value_grad(w[p : p + 1])
            torch.testing.assert_close(f[j], fa[0], rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(g[j], ga[0], rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(sub.precondition(w[keep])[j], alone[p].precondition(w[p : p + 1])[0])
    nested = shared.select(torch.tensor([0, 2, 3, 5])).select(torch.tensor([1, 3]))  # problems 2 and 5
    torch.testing.assert_close(
        nested.value_grad(w[[2, 5]])[0],
        torch.cat([alone[2].value_grad(w[2:3])[0], alone[5].value_grad(w[5:6])[0]]),
    )


@pytest.mark.parametrize("num_classes", [2, 3])
@pytest.mark.parametrize("class_weight", ["balanced", "dict"])
@pytest.mark.parametrize("weighted", [False, True])
def test_class_weight_matches_sklearn(num_classes: int, class_weight: str, weighted: bool) -> None:
    rng = np.random.default_rng(num_classes)
    freq = [0.8, 0.2] if num_classes == 2 else [0.7, 0.2, 0.1]
    y = rng.choice(num_classes, 300, p=freq)
    X = rng.normal(size=(300, 5)) + 0.7 * y[:, None] + 2
    sw = rng.uniform(0.5, 2.0, 300) if weighted else None
    cw = "balanced" if class_weight == "balanced" else {0: 1.0, 1: 3.0}
    with threadpool_limits(1):
        sk = LogisticRegression(C=0.5, class_weight=cw, tol=1e-10, max_iter=5000).fit(X, y, sample_weight=sw)
    ours = HyperplaneRule(C=0.5, class_weight=cw, tol=1e-11, max_iter=5000).fit(X, y, sample_weight=sw)
    np.testing.assert_allclose(ours.coef_, sk.coef_, atol=1e-5 * np.abs(sk.coef_).max())
    plain = HyperplaneRule(C=0.5, tol=1e-11, max_iter=5000).fit(X, y, sample_weight=sw)
    assert np.abs(plain.coef_ - ours.coef_).max() > 0.01 * np.abs(sk.coef_).max()


def test_balanced_sample_weight_is_sklearns_on_the_unpadded_rows() -> None:
    # Batched "balanced" weights of G problems with padding (weight 0) rows = scikit-learn's compute_class_weight
    # on each problem's real rows, times the sample weights.
    from sklearn.utils.class_weight import compute_class_weight

    rng = np.random.default_rng(0)
    y = rng.choice(3, (4, 50), p=[0.6, 0.3, 0.1])
    y[1] = np.where(y[1] == 2, 0, y[1])  # a problem with a class absent
    sw = rng.uniform(0.5, 2.0, (4, 50)) * (rng.uniform(size=(4, 50)) > 0.2)
    got = balanced_sample_weight(torch.as_tensor(y), torch.as_tensor(sw), 3).numpy()
    for g in range(4):
        real = sw[g] > 0
        cls = np.unique(y[g][real])
        cw = compute_class_weight("balanced", classes=cls, y=y[g][real], sample_weight=sw[g][real])
        np.testing.assert_allclose(
            got[g][real], sw[g][real] * cw[np.searchsorted(cls, y[g][real])], rtol=1e-10
        )
        assert (got[g][~real] == 0).all()


def test_bad_class_weight() -> None:
    X, y = blobs(60, 4, 3)
    with pytest.raises(
        RuleError, match=r"class_weight='heavy' is not usable.*pass None, 'balanced' or a dict"
    ):
        HyperplaneRule(class_weight="heavy").fit(X, y)
    with pytest.raises(RuleError, match=r"class_weight=\{7: 2.0\} is not usable.*labels among \[0, 1, 2\]"):
        HyperplaneRule(class_weight={7: 2.0}).fit(X, y)


@pytest.mark.parametrize("make", [HyperplaneRule, CosineRule])
def test_bad_input(make: type) -> None:
    X, y = blobs(60, 4, 3)
    with pytest.raises(RuleError, match="has 1 class"):
        make().fit(X, np.zeros(60))
    with pytest.raises(FeatureError, match=r"0 sample\(s\)"):
        make().fit(np.zeros((0, 4)), np.zeros(0))
    for bad in (np.nan, np.inf):
        Xb = X.copy()
        Xb[3, 1] = bad
        with pytest.raises(FeatureError, match=r"NaN|infinity"):
            make().fit(Xb, y)
    with pytest.raises(FeatureError, match="Expected 2D array"):
        make().fit(X[0], y)
    with pytest.raises(FeatureError, match="Complex data not supported"):
        make().fit(X + 1j, y)
    with pytest.raises(FeatureError, match="dense data is required"):
        from scipy import sparse

        make().fit(sparse.csr_matrix(X), y)
    with pytest.raises(NotFittedError, match="not fitted yet"):
        make().predict(X)
    rule = make().fit(X, y)
    with pytest.raises(FeatureError, match=f"X has 5 features, but {make.__name__} is expecting 4 features"):
        rule.predict(np.zeros((2, 5)))
    with pytest.raises(FeatureError, match="X has 5 features"):
        rule.predict(torch.zeros(2, 5, dtype=torch.float64))
    with pytest.raises(FeatureError, match="NaN"):
        rule.predict(np.full((2, 4), np.nan))
    with pytest.raises(RuleError, match="label 7 is not among the fitted classes_"):
        rule.score(X[:3], np.array([0, 1, 7]))
    with pytest.raises(RuleError, match="one label per sample"):
        make().fit(X, y[:-1])
    with pytest.raises(RuleError, match="requires y to be passed"):
        make().fit(X, None)
    with pytest.raises(RuleError, match="Unknown label type"):
        make().fit(X, X[:, 0])
    with pytest.raises(RuleError, match="at least one non-zero"):
        make().fit(X, y, sample_weight=np.zeros(60))
    with pytest.raises(RuleError, match=r"sample_weight.shape == \(7,\), expected \(60,\)"):
        make().fit(X, y, sample_weight=np.ones(7))
    with pytest.raises(RuleError, match="Negative values in data passed to `sample_weight`"):
        make().fit(X, y, sample_weight=-np.ones(60))


@pytest.mark.parametrize("C", [0, -1.0, float("nan"), "big"])
def test_C_must_be_positive(C: object) -> None:
    X, y = blobs(30, 3, 2)
    with pytest.raises(RuleError, match="C must be a positive"):
        HyperplaneRule(C=C).fit(X, y)
    with pytest.raises(RuleError, match="C must be a positive"):
        fit_logistic_grid(torch.as_tensor(X)[None], torch.as_tensor(y)[None], 2, [1.0, C])


@pytest.mark.gpu
def test_hyperplane_on_gpu_matches_cpu() -> None:
    X, y = blobs(400, 16, 4)
    cpu = HyperplaneRule(C=0.5, tol=1e-6).fit(X, y)
    # float64 on the GPU: the same solver, so the same solution up to summation order.
    gpu64 = HyperplaneRule(C=0.5, tol=1e-6, device="cuda", dtype=torch.float64).fit(X, y)
    np.testing.assert_allclose(gpu64.coef_, cpu.coef_, atol=1e-5 * np.abs(cpu.coef_).max())
    # float32 (the accelerator default) stops earlier on its rounding noise: measured on an H200, the largest
    # coefficient gap was 0.4 % of the largest coefficient, so 1 % is the bound; predictions agree.
    gpu = HyperplaneRule(C=0.5, tol=1e-6, device="cuda").fit(X, y)
    np.testing.assert_allclose(gpu.coef_, cpu.coef_, atol=1e-2 * np.abs(cpu.coef_).max())
    assert np.mean(gpu.predict(X) == cpu.predict(X)) >= 0.99


def test_lbfgs_matches_scipy_on_logistic_problems() -> None:
    """The batched L-BFGS reaches scipy's L-BFGS-B optimum on every problem of a batch (tight tolerances)."""
    from scipy.optimize import minimize

    from qkvprobe.rules.logistic import DenseLogistic, augment, minimize_lbfgs

    rng = np.random.default_rng(11)
    G, n, D, K = 4, 80, 5, 3
    X = torch.as_tensor(rng.normal(size=(G, n, D)) * np.linspace(0.5, 4, D) + 2)
    y = torch.as_tensor(rng.integers(0, K, (G, n)))
    C = torch.tensor([0.01, 0.1, 1.0, 10.0], dtype=torch.float64)
    obj = DenseLogistic(augment(X), y, torch.ones(G, n, dtype=torch.float64), C, K)
    res = minimize_lbfgs(obj, torch.zeros(G, (D + 1) * K, dtype=torch.float64), max_iter=1000, tol=1e-11)
    assert bool(res.converged.all())
    for g in range(G):
        one = obj.select(torch.tensor([g]))

        def fun(w: np.ndarray, one=one) -> tuple[float, np.ndarray]:
            f, grad = one.value_grad(torch.as_tensor(w)[None])
            return float(f[0]), grad[0].numpy()

        ref = minimize(
            fun, np.zeros((D + 1) * K), jac=True, method="L-BFGS-B", options={"gtol": 1e-10, "ftol": 0}
        )
        assert float(res.f[g]) <= ref.fun + 1e-12
        # the multinomial optimum is unique up to a shift shared by the classes' intercepts: compare coefficients
        ours, theirs = res.w[g].view(D + 1, K)[:-1].numpy(), ref.x.reshape(D + 1, K)[:-1]
        np.testing.assert_allclose(ours, theirs, atol=1e-5 * np.abs(theirs).max())


def test_small_bmm_equals_torch_matmul() -> None:
    """The numpy-backed batched product (few-shot shapes) equals torch.matmul, for transposed and strided views,
    broadcast batches, float64, and falls back to torch for integer tensors and autograd."""
    from qkvprobe.rules.batched import bmm

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 7, 9, generator=g), torch.randn(6, 5, 9, generator=g)
    cases = [
        (a, b.transpose(1, 2)),  # transposed right operand (BLAS-ready view)
        (a[:, ::2, ::3], torch.randn(6, 3, 4, generator=g)),  # strides with no unit stride: copied first
        (a.double(), b.double().transpose(1, 2)),
        (a, torch.randn(9, 2, generator=g)),  # broadcast right operand
    ]
    for x, y in cases:
        out = bmm(x, y)
        assert out.dtype == x.dtype and out.shape == torch.matmul(x, y).shape
        torch.testing.assert_close(out, torch.matmul(x, y), rtol=1e-5, atol=1e-5)
    ints = torch.arange(24).view(2, 3, 4)
    assert torch.equal(bmm(ints, ints.transpose(1, 2)), torch.matmul(ints, ints.transpose(1, 2)))
    w = a.clone().requires_grad_(True)
    bmm(w, b.transpose(1, 2)).sum().backward()  # autograd path: torch.matmul
    assert w.grad is not None


def test_cholesky_basis_gives_the_eigen_basis_solution() -> None:
    """Few-shot problems solved in the Cholesky basis reach the eigen basis's (exact) solution, including problems
    with duplicated support rows and with more rows than dimensions, which fall back to the eigen basis."""
    from qkvprobe.rules.logistic import solve_span, span_expand, span_reduce
    from qkvprobe.rules.logistic.span import _cholesky_basis, _eigen_basis

    rng = np.random.default_rng(3)
    G, n, D, K = 5, 12, 30, 3
    X = rng.normal(size=(G, n, D)) * np.linspace(0.5, 3, D) + 4
    X[1, 6:] = X[1, :6]  # duplicated rows: rank-deficient Gram matrix
    X[2, :, 10:] = 4.0  # rows that vary in 10 < n - 1 dimensions only
    X = torch.as_tensor(X)
    y = torch.as_tensor(np.tile(np.arange(K), (G, n // K)))
    sw, C = torch.ones(G, n, dtype=torch.float64), torch.full((G,), 0.7, dtype=torch.float64)
    fits = {}
    for basis in ("eigen", "cholesky"):
        red = span_reduce(X, None, torch.float64, basis=basis)
        W, res = solve_span(red.X, y, K, C, sw, tol=1e-11, max_iter=2000)
        assert bool(res.converged.all())
        fits[basis] = span_expand(red, X, None, W)
    for ref, got in zip(fits["eigen"], fits["cholesky"], strict=True):
        torch.testing.assert_close(
            got - got.mean(1, keepdim=True),
            ref - ref.mean(1, keepdim=True),
            rtol=1e-6,
            atol=1e-6 * float(ref.abs().max()),
        )
    # The rank-deficient problems took the eigen basis; the others the Cholesky factor.
    Xm = X - X.mean(1, keepdim=True)
    gram = Xm @ Xm.transpose(1, 2)
    Z, _ = _cholesky_basis(gram, 1e-12)
    Ze, _ = _eigen_basis(gram, 1e-12)
    assert [bool(torch.allclose(Z[g], Ze[g])) for g in range(G)] == [False, True, True, False, False]
    with pytest.raises(ValueError, match="basis='qr'"):
        span_reduce(X, None, basis="qr")


def test_full_width_batch_drops_finished_problems_and_equals_one_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Standard-protocol batches (a few full-width problems) drop finished problems from the working set, so
    the evaluations cost about the sum of the problems' iterations, not the batch size times the slowest one's;
    the survivors' objective is indexed, not rebuilt; and every solution equals its one-at-a-time fit."""
    from qkvprobe.rules.logistic import DenseLogistic, augment

    X, y = blobs(300, 12, 4)
    Cs = [0.001, 0.01, 1.0, 100.0]  # larger C: more iterations, so problems finish at different times
    evaluated = [0]  # problems evaluated, summed over value_grad calls
    value_grad, select = DenseLogistic.value_grad, DenseLogistic.select

    def count(self: DenseLogistic, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        evaluated[0] += w.shape[0]
        return value_grad(self, w)

    def checked(self: DenseLogistic, keep: torch.Tensor) -> DenseLogistic:
        sub = select(self, keep)
        fresh = DenseLogistic(self.X[keep], self.y[keep], self.sw[keep], self.C[keep], self.num_classes)
        w = torch.randn(len(keep), sub.X.shape[2] * sub.kf, dtype=sub.X.dtype)
        for a, b in zip(value_grad(sub, w), value_grad(fresh, w), strict=True):
            torch.testing.assert_close(a, b)
        torch.testing.assert_close(sub.P, self.P[keep])  # the preconditioner is indexed, not recomputed
        return sub

    monkeypatch.setattr(DenseLogistic, "value_grad", count)
    monkeypatch.setattr(DenseLogistic, "select", checked)
    G = len(Cs)
    fit = fit_logistic(
        torch.as_tensor(X)[None].repeat(G, 1, 1),
        torch.as_tensor(y)[None].repeat(G, 1),
        4,
        Cs,
        tol=1e-9,
        max_iter=2000,
        reduce=False,
    )
    n_iter = fit.n_iter
    slowest, total = int(n_iter.max()), int(n_iter.sum())
    assert total < 0.75 * G * slowest, n_iter  # the problems do finish at very different times
    assert evaluated[0] < (total + G * slowest) / 2, (evaluated[0], n_iter)  # nearer Σ n_iter than G · max
    monkeypatch.undo()
    Xa, yt, sw = (
        augment(torch.as_tensor(X)[None]),
        torch.as_tensor(y)[None],
        torch.ones(1, len(y), dtype=torch.float64),
    )
    for g, C in enumerate(Cs):
        one = HyperplaneRule(C=C, tol=1e-9, max_iter=2000).fit(X, y)
        objective = DenseLogistic(Xa, yt, sw, torch.tensor([C], dtype=torch.float64), 4)
        f_batch, f_one = (
            float(
                objective.value_grad(
                    torch.cat([torch.as_tensor(c).T, torch.as_tensor(b)[None]], 0)[None].reshape(1, -1)
                )[0]
            )
            for c, b in ((fit.coef[g], fit.intercept[g]), (one.coef_, one.intercept_))
        )
        assert f_batch == pytest.approx(f_one, rel=2e-9)  # both certified within 1e-9 of the optimum


@pytest.mark.parametrize("num_classes", [2, 3])
def test_class_curvature_is_the_hessians_diagonal_blocks(num_classes: int) -> None:
    """The warm-start preconditioner's blocks equal the per-class diagonal blocks of the data term's Hessian,
    computed by autograd from a plain softmax / sigmoid cross-entropy."""
    from qkvprobe.rules.logistic import augment, class_curvature

    X, y = blobs(40, 3, num_classes)
    Xa = augment(torch.as_tensor(X))
    kf = 1 if num_classes == 2 else num_classes
    W = torch.as_tensor(np.random.default_rng(3).normal(size=(4, kf)) * 0.3)
    weights = torch.full((len(y),), 1.0 / len(y), dtype=torch.float64)

    def data_term(w: torch.Tensor) -> torch.Tensor:
        z = Xa @ w.view(4, kf)
        if num_classes == 2:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                z[:, 0], torch.as_tensor(y, dtype=z.dtype), reduction="none"
            )
        else:
            loss = torch.nn.functional.cross_entropy(z, torch.as_tensor(y), reduction="none")
        return (weights * loss).sum()

    H = torch.autograd.functional.hessian(data_term, W.reshape(-1)).view(4, kf, 4, kf)
    exact = class_curvature(Xa[None], weights[None], W[None], num_classes, gram_dtype=torch.float64)[0]
    fast = class_curvature(Xa[None], weights[None], W[None], num_classes)[0]  # float32 Gram products
    for k in range(kf):
        torch.testing.assert_close(exact[k], H[:, k, :, k], atol=1e-10, rtol=1e-8)
        torch.testing.assert_close(fast[k], H[:, k, :, k], atol=1e-6, rtol=1e-5)


def test_curvature_preconditioner_saves_iterations(monkeypatch: pytest.MonkeyPatch) -> None:
    """A warm start on many rows preconditions with the curvature at its start, and every solve refreshes it at its
    current iterate while it runs: far fewer iterations than with the W = 0 preconditioner alone, and the same
    certified optimum."""
    from qkvprobe.protocols.classification import C_GRID
    from qkvprobe.rules.logistic import DenseLogistic, augment, dense

    X, y = blobs(8000, 64, 10, seed=1)
    Xt, yt = torch.as_tensor(X)[None], torch.as_tensor(y)[None]
    assert dense.curvature_stride(len(X), 65) == 1
    Xa, sw = augment(Xt), torch.ones(1, len(y), dtype=torch.float64)
    C = torch.tensor([1.0], dtype=torch.float64)
    cold = DenseLogistic(Xa, yt, sw, C, 10)
    warm = DenseLogistic(Xa, yt, sw, C, 10, start=torch.full((1, 65, 10), 0.01, dtype=torch.float64))
    assert cold.P.shape == (1, 65, 65) and warm.P.shape == (1, 10, 65, 65)  # moments at W = 0, else curvature
    assert warm._moment is None  # not computed: the curvature solve does not need them
    torch.testing.assert_close(warm.moment, cold.moment)  # computed when asked for
    its = [int(f.n_iter[0]) for f in fit_logistic_path(Xt, yt, 10, C_GRID)]
    monkeypatch.setattr(dense, "curvature_stride", lambda *args: 0)
    plain = [int(f.n_iter[0]) for f in fit_logistic_path(Xt, yt, 10, C_GRID)]
    assert sum(its) < 0.75 * sum(plain), (its, plain)
    monkeypatch.undo()
    (path,) = fit_logistic_path(Xt, yt, 10, [1.0])
    (grid,) = fit_logistic_grid(Xt, yt, 10, [1.0])
    assert bool(path.converged[0]) and bool(grid.converged[0])

    def objective(w: torch.Tensor, b: torch.Tensor) -> float:  # scikit-learn's, scaled by 1/(C·n), C = 1
        z = Xt[0] @ w[0].T + b[0]
        return float(torch.nn.functional.cross_entropy(z, yt[0]) + 0.5 * (w * w).sum() / len(y))

    assert objective(path.coef, path.intercept) == pytest.approx(
        objective(grid.coef, grid.intercept), rel=2e-4
    )
