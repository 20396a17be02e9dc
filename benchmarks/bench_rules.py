"""Speed and memory of the rules and protocols against scikit-learn. CPU, one process.

Run: ``nice -n 10 .venv/bin/python benchmarks/bench_rules.py [standard|fewshot|cosine|segmentation|kernels|knn|gap|all]``;
``python benchmarks/bench_rules.py precond [STORE [TOKENS [POSITION]]]`` (the curvature preconditioner on and off);
``python benchmarks/bench_rules.py grid [STORE [TOKENS [POSITION|patch [EVERY]]]]`` (a C grid one C at a time
and as one batch sharing the features);
``python benchmarks/bench_rules.py gpu [N DIM CLASSES MAX_ITER]`` on a CUDA machine (1.28 M × 768, 1 000 classes).

Features are synthetic but shaped like ViT tokens: class means in a low-dimensional subspace, anisotropic
noise with a power-law spectrum, a common offset and a few large-magnitude channels (norms of tens), so
classes overlap (linear accuracy well below 100 %) and accuracy comparisons mean something.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from qkvprobe.protocols.classification import (
    C_GRID,
    FEWSHOT_C,
    fewshot_classification,
)
from qkvprobe.rules import fit_logistic, fit_logistic_grid, fit_logistic_path, hyperplane_scores


def vit_like(
    num: int,
    dim: int,
    num_classes: int,
    *,
    seed: int,
    separation: float = 0.45,
    labels: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``[num, dim]`` float32 features and ``[num]`` labels (seeded; same seed = same class geometry)."""
    geo = np.random.default_rng(seed)
    latent = 32
    means = geo.normal(size=(num_classes, latent)) * separation
    mix = geo.normal(size=(latent, dim)) / np.sqrt(latent) * 2.0
    spectrum = (1.0 + np.arange(dim)) ** -0.5 * 6.0
    basis = np.linalg.qr(geo.normal(size=(dim, dim)))[0]
    offset = geo.normal(size=dim) * 1.0
    offset[geo.choice(dim, 3, replace=False)] = geo.choice([-15.0, 15.0], 3)  # "massive activation" channels
    rng = np.random.default_rng(seed + 1 + num)
    y = rng.integers(0, num_classes, num) if labels is None else labels
    z = means[y] + rng.normal(size=(num, latent))
    X = z @ mix + (rng.normal(size=(num, dim)) * spectrum) @ basis.T + offset
    return X.astype(np.float32), y.astype(np.int64)


def bench_standard(
    num_tokens: int = 4,
    n: int = 60_000,
    n_test: int = 10_000,
    dim: int = 192,
    num_classes: int = 10,
    sk_tokens: int = 1,
) -> None:
    """Ours: all tokens × the C grid as the standard protocol fits them (``fit_logistic_grid``: every C from
    W = 0, one batch sharing each token's features), each fit certified within 1e-4 of its optimum.
    scikit-learn: one ``LogisticRegression`` fit per (token, C) at its defaults on the first ``sk_tokens`` tokens
    (the tokens are statistically alike; time is extrapolated to all of them)."""
    from sklearn.linear_model import LogisticRegression

    data = [vit_like(n + n_test, dim, num_classes, seed=10 * t) for t in range(num_tokens)]
    Cs = list(C_GRID)
    print(f"[standard] {num_tokens} tokens x {len(Cs)} C on {n} x {dim}, {num_classes} classes; C grid {Cs}")
    t0 = time.perf_counter()
    Xtr = torch.stack([torch.from_numpy(X[:n]) for X, _ in data]).double()
    ytr = torch.stack([torch.from_numpy(y[:n]) for _, y in data])
    grid = fit_logistic_grid(Xtr, ytr, num_classes, Cs)
    ours_s = time.perf_counter() - t0
    Xte = torch.stack([torch.from_numpy(X[n:]) for X, _ in data]).double()
    yte = np.stack([y[n:] for _, y in data])
    ours_acc = np.array(
        [
            [(hyperplane_scores(Xte, f.coef, f.intercept).argmax(2).numpy() == yte)[t].mean() for f in grid]
            for t in range(num_tokens)
        ]
    )
    iters = np.array([f.n_iter.numpy() for f in grid]).T
    certified = int(sum(int(f.converged.sum()) for f in grid))
    print(
        f"  ours: {ours_s:.2f} s for {num_tokens * len(Cs)} fits ({certified} certified within 1e-4 of the "
        f"optimum); iterations per C (token 0): {iters[0].tolist()}"
    )

    sk_acc = np.full(ours_acc.shape, np.nan)
    sk_iters = np.zeros_like(iters)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning at max_iter=100 for the larger C values
        for t, (X, y) in enumerate(data[:sk_tokens]):
            for j, C in enumerate(Cs):
                clf = LogisticRegression(C=C).fit(X[:n].astype(np.float64), y[:n])
                sk_acc[t, j] = clf.score(X[n:].astype(np.float64), y[n:])
                sk_iters[t, j] = clf.n_iter_[0]
    sk_s = (time.perf_counter() - t0) * num_tokens / sk_tokens
    print(
        f"  scikit-learn lbfgs (defaults: tol=1e-4, max_iter=100), {sk_tokens * len(Cs)} fits timed, extrapolated "
        f"to {num_tokens * len(Cs)}: {sk_s:.2f} s ({sk_s / ours_acc.size:.2f} s/fit); "
        f"iterations (token 0): {sk_iters[0].tolist()}"
    )
    diff = np.abs(ours_acc - sk_acc)[:sk_tokens] * 100
    print(f"  test accuracy ours (token 0, per C): {np.round(ours_acc[0] * 100, 2).tolist()}")
    print(f"  test accuracy sklearn (token 0):     {np.round(sk_acc[0] * 100, 2).tolist()}")
    best = np.abs(ours_acc.max(1) - sk_acc.max(1))[:sk_tokens].max() * 100
    print(
        f"  max |accuracy difference| over the {diff.size} compared fits: {diff.max():.2f} points; "
        f"at the best C: {best:.2f} points"
    )
    print(f"  SPEED-UP standard: {sk_s / ours_s:.1f}x (target >= 4x)")


def bench_fewshot(
    episodes: int = 2000,
    ways: int = 5,
    shots: int = 5,
    queries: int = 15,
    dim: int = 384,
    sk_episodes: int = 100,
) -> None:
    from sklearn.linear_model import LogisticRegression

    num_classes, per_class_tr, per_class_te = 64, 100, 60
    ytr = np.repeat(np.arange(num_classes), per_class_tr)
    yte = np.repeat(np.arange(num_classes), per_class_te)
    Xtr, _ = vit_like(len(ytr), dim, num_classes, seed=7, separation=0.4, labels=ytr)
    Xte, _ = vit_like(len(yte), dim, num_classes, seed=7, separation=0.4, labels=yte)
    ep = _episodes(ytr, yte, ways, shots, queries, episodes, seed=0)
    print(
        f"[fewshot] {episodes} episodes {ways}-way {shots}-shot, {queries} queries/class, D = {dim}, C = {FEWSHOT_C}"
    )
    # Warm-up (one-time library initialisation: LAPACK/BLAS kernels, thread pools), as for the cosine rule below;
    # scikit-learn's loop is timed after its own first fits too.
    fewshot_classification(Xtr, Xte, *[a[:10] for a in ep], rule="hyperplane")
    res, ours_s, runs = _timed(lambda: fewshot_classification(Xtr, Xte, *ep, rule="hyperplane"))
    print(
        f"  ours hyperplane: {ours_s:.3f} s ({runs}; {ours_s / episodes * 1e3:.3f} ms/episode), "
        f"accuracy {res.mean * 100:.2f} ± {res.ci95 * 100:.2f}"
    )
    _, support, support_labels, query, query_labels = ep
    sk_acc = []
    t0 = time.perf_counter()
    for e in range(sk_episodes):
        clf = LogisticRegression(C=FEWSHOT_C).fit(Xtr[support[e]].astype(np.float64), support_labels[e])
        sk_acc.append(clf.score(Xte[query[e]].astype(np.float64), query_labels[e]))
    sk_per = (time.perf_counter() - t0) / sk_episodes
    same = np.mean(np.abs(np.array(sk_acc) - res.per_episode[:sk_episodes]) < 1e-9)
    print(
        f"  scikit-learn per-episode loop: {sk_per * 1e3:.2f} ms/episode (timed on {sk_episodes} episodes, "
        f"extrapolated {sk_per * episodes:.1f} s); mean accuracy on those episodes: scikit-learn "
        f"{np.mean(sk_acc) * 100:.2f}, ours {np.mean(res.per_episode[:sk_episodes]) * 100:.2f}; identical on "
        f"{same * 100:.0f} % of them (scikit-learn's default tol stops short of the optimum on these problems)"
    )
    print(f"  SPEED-UP fewshot hyperplane: {sk_per * episodes / ours_s:.0f}x (target >= 50x)")
    ep = _episodes(ytr, yte, ways, shots, queries, 10_000, seed=1)
    fewshot_classification(Xtr, Xte, *[a[:10] for a in ep], rule="cosine")  # warm-up (thread pools)
    res, cos_s, runs = _timed(lambda: fewshot_classification(Xtr, Xte, *ep, rule="cosine"))
    Fte, q = torch.from_numpy(Xte), torch.from_numpy(ep[3])
    t0 = time.perf_counter()
    Fte[q].sum()  # materialising every query's features once (what the old implementation did)
    floor = time.perf_counter() - t0
    # Plain memory-bandwidth reference: the machine is shared, so report what it delivers now.
    src = torch.ones(32 * 2**20)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t0 = time.perf_counter()
    dst.copy_(src)
    bandwidth = 2 * src.numel() * src.element_size() / (time.perf_counter() - t0) / 1e9
    query_gb = q.numel() * Fte.shape[1] * Fte.element_size() / 1e9
    print(
        f"  COSINE 10000 episodes: {cos_s:.3f} s ({runs}; target <= 0.2 s on an idle core), accuracy {res.mean * 100:.2f} "
        f"± {res.ci95 * 100:.2f}; reference now: materialising the {q.numel()} query vectors takes {floor:.3f} s, "
        f"memory copy bandwidth {bandwidth:.1f} GB/s (reading the {query_gb:.2f} GB of query features once at "
        f"that rate: {query_gb / bandwidth:.3f} s)"
    )


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB: Linux's VmHWM, the high-water mark of the current address space
    (``ru_maxrss`` would also count the parent's memory at fork: Linux carries it across exec); ``ru_maxrss``
    elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_knn(n: int = 60_000, n_test: int = 10_000, dim: int = 384, num_classes: int = 10) -> None:
    """Standard weighted k-NN (k = 20, T = 0.07) on ViT-like features: ours (exact top-k in blocks, float32)
    against scikit-learn's brute-force ``KNeighborsClassifier(metric="cosine")`` with the same vote weights, side by
    side, and how many predictions agree."""
    from sklearn.neighbors import KNeighborsClassifier

    from qkvprobe.rules.knn import KNN_T, KNNRule

    X, y = vit_like(n + n_test, dim, num_classes, seed=3)
    Xtr, ytr, Xte, yte = X[:n], y[:n], X[n:], y[n:]
    print(f"[knn] {n} x {dim} train, {n_test} test, {num_classes} classes, k = 20, T = {KNN_T}")
    ours = KNNRule(k=20, T=KNN_T).fit(Xtr, ytr)
    t0 = time.perf_counter()
    pred = ours.predict(Xte)
    ours_s = time.perf_counter() - t0
    sk = KNeighborsClassifier(
        n_neighbors=20, metric="cosine", algorithm="brute", weights=lambda d: np.exp((1 - d) / KNN_T)
    ).fit(Xtr, ytr)
    t0 = time.perf_counter()
    sk_pred = sk.predict(Xte)
    sk_s = time.perf_counter() - t0
    print(
        f"  ours {ours_s:.2f} s, accuracy {np.mean(pred == yte) * 100:.2f}; scikit-learn {sk_s:.2f} s, accuracy "
        f"{np.mean(sk_pred == yte) * 100:.2f}; same prediction on {np.mean(pred == sk_pred) * 100:.2f} % of the test set"
    )
    # The floor of any exact float32 method: the query x memory similarity products alone, in the same blocks.
    Q = torch.nn.functional.normalize(torch.as_tensor(Xte, dtype=torch.float32), dim=1)
    M = torch.nn.functional.normalize(torch.as_tensor(Xtr, dtype=torch.float32), dim=1)
    t0 = time.perf_counter()
    for a in range(0, len(Q), 4096):
        Q[a : a + 4096] @ M.T
    gemm_s = time.perf_counter() - t0
    print(
        f"  the similarity products alone (float32, one thread): {gemm_s:.2f} s, so no exact float32 method can be "
        f"more than {sk_s / gemm_s:.1f}x faster than scikit-learn here"
    )
    print(f"  SPEED-UP knn: {sk_s / ours_s:.1f}x (target >= 5x)")


def bench_knn_segmentation(num_patches: int = 5_000_000, dim: int = 384) -> None:
    """Peak resident memory of the standard segmentation k-NN with a ``num_patches`` training-patch store (the
    memory bank is the budgeted seeded sample, ``protocols.knn.KNN_MEMORY_BYTES``), in this process."""
    from qkvprobe.protocols import segmentation as seg
    from qkvprobe.protocols.knn import KNN_MEMORY_BYTES

    base = peak_rss_mb()
    root = (
        Path(os.environ.get("QKV_BENCH_DIR", tempfile.gettempdir()))
        / f"qkvprobe_bench_seg_{num_patches}_{dim}"
    )
    train = DiskStore(root / "train", num_patches // 1024, dim)
    test = DiskStore(root / "test", 64, dim, seed=1)
    t0 = time.perf_counter()
    res = seg.standard_segmentation(train, test, token="q", rule="knn", masks=test.mask)
    took = time.perf_counter() - t0
    peak = peak_rss_mb()
    print(
        f"[knn-segmentation] {train.num_samples * 1024} training patches x {dim}, memory budget "
        f"{KNN_MEMORY_BYTES / 2**20:.0f} MiB: {took:.0f} s, mIoU {res.miou * 100:.1f}; RSS after imports {base:.0f} "
        f"MB, PEAK RSS {peak:.0f} MB (target <= 2048 MB)"
    )


def bench_gap() -> None:
    """The hyperplane fit's distance from the optimum on an ill-conditioned problem: scikit-learn's digits (raw
    0–16 pixels, the 1 257-row training split of ``train_test_split(test_size=0.3, random_state=0)``), as they are
    and with column 10 scaled ×300, at C ∈ {1e-2, 1, 1e2, 1e4}. Objective ``C·Σ logloss + ½‖W‖²`` of
    ``HyperplaneRule(C=C)`` at its defaults and of scikit-learn's ``LogisticRegression(C=C)`` at its defaults,
    against the optimum: the better of scikit-learn's Newton–Cholesky and L-BFGS at tol = 1e-12."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    from qkvprobe.rules import HyperplaneRule

    def objective(coef: np.ndarray, intercept: np.ndarray, X: np.ndarray, y: np.ndarray, C: float) -> float:
        z = X @ coef.T + intercept
        m = z.max(1)
        loss = m + np.log(np.exp(z - m[:, None]).sum(1)) - z[np.arange(len(y)), y]
        return float(C * loss.sum() + 0.5 * (coef**2).sum())

    X, y = load_digits(return_X_y=True)
    Xtr, _, ytr, _ = train_test_split(X, y, test_size=0.3, random_state=0)
    print("[gap] digits 1257 x 64, float64; relative distance of each fit's objective from the optimum")
    print(
        f"  {'features':<9} {'C':>6} {'optimum':>10} {'qkvprobe':>10} {'rel.':>8} {'it.':>5} {'certified':>9}  sklearn defaults"
    )
    for scaled in (False, True):
        Xs = Xtr.copy()
        if scaled:
            Xs[:, 10] *= 300
        for C in (1e-2, 1.0, 1e2, 1e4):
            refs = []
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for solver, it in (("newton-cholesky", 2000), ("lbfgs", 100_000)):
                    ref = LogisticRegression(C=C, solver=solver, tol=1e-12, max_iter=it).fit(Xs, ytr)
                    refs.append(objective(ref.coef_, ref.intercept_, Xs, ytr, C))
                sk = LogisticRegression(C=C).fit(Xs, ytr)
                ours = HyperplaneRule(C=C).fit(Xs, ytr)
            f_opt = min(refs)
            f_ours = objective(ours.coef_, ours.intercept_, Xs, ytr, C)
            f_sk = objective(sk.coef_, sk.intercept_, Xs, ytr, C)
            print(
                f"  {'x300 col' if scaled else 'raw':<9} {C:>6g} {f_opt:>10.6g} {f_ours:>10.6g} "
                f"{(f_ours - f_opt) / f_opt:>8.1e} {int(ours.n_iter_[0]):>5} {ours.converged_!s:>9}  "
                f"{f_sk:.6g} ({(f_sk - f_opt) / f_opt:.1e})"
            )


def bench_kernels(repeats: int = 62) -> None:
    """The few-shot building blocks behind two design choices: numpy's batched matmul against torch.bmm at the
    few-shot shapes (``rules.batched``), and the n×n Cholesky factor against the eigendecomposition
    (``span_reduce(basis="cholesky")``)."""
    from qkvprobe.rules.batched import bmm

    g = torch.Generator().manual_seed(0)
    print("[kernels] ms for the calls of 2 000 episodes (5-way 5-shot, 15 queries, D = 384)")
    shapes = [
        ((32, 75, 384), (32, 5, 384), True, 62),
        ((32, 25, 384), (32, 25, 384), True, 62),
        ((2000, 5, 26), (2000, 26, 25), False, 18),
    ]
    for a_shape, b_shape, transposed, calls in shapes:
        a, b = torch.randn(*a_shape, generator=g), torch.randn(*b_shape, generator=g)
        b = b.transpose(1, 2) if transposed else b
        times = {}
        for name, fn in (("torch.bmm", torch.bmm), ("numpy", bmm)):
            fn(a, b)
            t0 = time.perf_counter()
            for _ in range(calls):
                fn(a, b)
            times[name] = (time.perf_counter() - t0) * 1e3
        print(
            f"  {list(a.shape)} @ {list(b.shape)} x{calls}: torch.bmm {times['torch.bmm']:.1f}, "
            f"numpy {times['numpy']:.1f}"
        )
    x = torch.randn(2000, 25, 384, generator=g)
    x = x - x.mean(1, keepdim=True)
    gram = x @ x.transpose(1, 2)
    for name, fn in (("eigh", torch.linalg.eigh), ("cholesky", lambda m: torch.linalg.cholesky_ex(m + 1.0))):
        fn(gram)
        t0 = time.perf_counter()
        fn(gram)
        print(f"  {name} of 2000 centred 25x25 Gram matrices: {(time.perf_counter() - t0) * 1e3:.1f}")


def _timed(run, repeats: int = 3):
    """(result, median wall seconds, "median of N; CPU x s" label): the machine is shared, so one timing can be a
    neighbour's burst; the process's CPU time leaves out the time a virtual machine's core was taken away."""
    wall, cpu, out = [], [], None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = run()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return out, float(np.median(wall)), f"median of {repeats}; CPU {np.median(cpu):.3f} s"


def _episodes(
    ytr: np.ndarray, yte: np.ndarray, ways: int, shots: int, queries: int, episodes: int, seed: int
):
    """A plain N-way K-shot sampler (the project's sampler lives in qkvprobe.data.episodes)."""
    rng = np.random.default_rng(seed)
    labels = np.unique(ytr)
    by_tr = {c: np.flatnonzero(ytr == c) for c in labels}
    by_te = {c: np.flatnonzero(yte == c) for c in labels}
    classes = np.stack([rng.choice(labels, ways, replace=False) for _ in range(episodes)])
    sup = np.stack(
        [np.concatenate([rng.choice(by_tr[c], shots, replace=False) for c in cl]) for cl in classes]
    )
    qry = np.stack(
        [np.concatenate([rng.choice(by_te[c], queries, replace=False) for c in cl]) for cl in classes]
    )
    return (
        classes,
        sup,
        np.tile(np.repeat(np.arange(ways), shots), (episodes, 1)),
        qry,
        np.tile(np.repeat(np.arange(ways), queries), (episodes, 1)),
    )


class DiskStore:
    """A patch store on disk with FeatureStore's read API: one memory-mapped ``.npy`` per shard, opened per
    read (as qkvprobe.features.store does), so pages of finished shards are unmapped."""

    def __init__(
        self,
        root: Path,
        num_images: int,
        dim: int,
        *,
        grid: int = 32,
        shard_images: int = 128,
        num_classes: int = 11,
        seed: int = 0,
    ) -> None:
        self.root, self.grid, self.patch_size = root, (grid, grid), 16
        self.classes, self.embed_dim, self.num_samples = (
            [f"c{i}" for i in range(num_classes)],
            dim,
            num_images,
        )
        rng, geo = np.random.default_rng(seed), np.random.default_rng(0)
        emb = geo.normal(size=(num_classes, dim)) * 1.0
        block = 8  # 8×8-patch regions of one class: structured label maps
        labels = rng.integers(0, num_classes, (num_images, grid // block, grid // block))
        labels = np.kron(labels, np.ones((block, block), dtype=np.int64)).reshape(num_images, -1)
        labels[rng.random(labels.shape) < 0.02] = 255
        self._labels = labels
        self.shards = []
        root.mkdir(parents=True, exist_ok=True)
        for s in range(0, num_images, shard_images):
            path = root / f"shard{s:07d}.npy"
            n = min(shard_images, num_images - s)
            if not path.exists():
                arr = np.lib.format.open_memmap(
                    path, mode="w+", dtype=np.float16, shape=(n, grid * grid, dim)
                )
                for j in range(n):
                    lab = np.where(labels[s + j] == 255, 0, labels[s + j])
                    arr[j] = emb[lab] + 2.5 * rng.standard_normal((grid * grid, dim), dtype=np.float32)
                arr.flush()
                del arr
            self.shards.append((s, path))

    def resolve_block(self, block: int) -> int:
        return 0

    def iter_chunks(self, token: str, position: str, block: int = -1, *, chunk_size=None, shards=None):
        for start, path in self.shards:
            arr = np.load(path, mmap_mode="r")
            step = chunk_size or len(arr)
            for o in range(0, len(arr), step):
                yield start + o, arr[o : o + step]
            del arr

    def patch_labels(self) -> np.ndarray:
        return self._labels

    def indices(self) -> np.ndarray:
        return np.arange(self.num_samples)

    def mask(self, i: int) -> np.ndarray:
        return np.kron(self._labels[i].reshape(self.grid), np.ones((16, 16), dtype=np.int64))


def bench_segmentation(num_patches: int = 2_000_000, dim: int = 384, max_iter: int = 2) -> None:
    """Peak resident memory of the standard segmentation protocol (hyperplane, streamed), in this process."""
    from qkvprobe.protocols import segmentation as seg

    base = peak_rss_mb()
    root = (
        Path(os.environ.get("QKV_BENCH_DIR", tempfile.gettempdir()))
        / f"qkvprobe_bench_seg_{num_patches}_{dim}"
    )
    t0 = time.perf_counter()
    train = DiskStore(root / "train", num_patches // 1024, dim)
    test = DiskStore(root / "test", 64, dim, seed=1)
    on_disk = sum(p.stat().st_size for _, p in train.shards) / 1e9
    print(
        f"[segmentation] train store {train.num_samples} images x 1024 patches x {dim} fp16 = {on_disk:.2f} GB "
        f"on disk (built/reused in {time.perf_counter() - t0:.0f} s); RSS after imports {base:.0f} MB"
    )
    from qkvprobe.rules.logistic import StreamedLogistic

    passes = {"n": 0}
    original = StreamedLogistic.value_grad

    def counting(self, w):
        passes["n"] += 1
        return original(self, w)

    StreamedLogistic.value_grad = counting
    t0 = time.perf_counter()
    res = seg.standard_segmentation(
        train, test, token="q", rule="hyperplane", masks=test.mask, Cs=(1.0,), max_iter=max_iter
    )
    took = time.perf_counter() - t0
    peak = peak_rss_mb()
    print(
        f"  hyperplane (streamed, C=1, max_iter={max_iter} per fit): {took:.0f} s, {passes['n']} passes over the "
        f"data ({took / max(passes['n'], 1):.1f} s per pass incl. val/test scoring), mIoU {res.miou * 100:.1f}"
    )
    print(f"  PEAK RSS {peak:.0f} MB (target <= 2048 MB; data {on_disk * 1000:.0f} MB)")


def bench_gpu(
    n: int = 1_280_000, dim: int = 768, num_classes: int = 1000, max_iter: int = 30, device: str = "cuda"
) -> None:
    """One C on ImageNet-sized features (n × dim, 1 000 classes), float32 on the accelerator: seconds per
    loss+gradient evaluation, and a ``max_iter``-iteration fit. Features are drawn on the device (class
    means + noise) so the host never holds them."""
    from qkvprobe.rules.logistic import DenseLogistic, augment

    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    gen = torch.Generator(device=dev).manual_seed(0)
    y = torch.randint(0, num_classes, (1, n), device=dev, generator=gen)
    means = torch.randn(num_classes, dim, device=dev, generator=gen) * 0.1  # overlapping classes
    X = means[y] + torch.randn(1, n, dim, device=dev, generator=gen)
    sw = torch.ones(1, n, device=dev)
    C = torch.ones(1, device=dev)
    print(
        f"[gpu] {n} x {dim} float32, {num_classes} classes on {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else dev}"
    )
    t0 = time.perf_counter()
    obj = DenseLogistic(augment(X), y, sw, C, num_classes)
    sync()
    print(
        f"  objective set-up (ones column, second moment, {dim + 1}-d preconditioner): {time.perf_counter() - t0:.2f} s"
    )
    w = torch.zeros(1, (dim + 1) * num_classes, device=dev)
    times = []
    for _ in range(6):
        sync()
        t0 = time.perf_counter()
        obj.value_grad(w)
        sync()
        times.append(time.perf_counter() - t0)
    print(
        f"  loss+gradient evaluation: median {np.median(times[1:]):.3f} s (first {times[0]:.3f} s; issue's H100 "
        f"reference ~0.1 s)"
    )
    del obj
    sync()
    t0 = time.perf_counter()
    fit = fit_logistic(X, y, num_classes, 1.0, max_iter=max_iter, reduce=False)
    coef, intercept, n_iter = fit.coef, fit.intercept, fit.n_iter
    sync()
    took = time.perf_counter() - t0
    acc = float(
        (hyperplane_scores(X[:, :100_000], coef, intercept).argmax(2) == y[:, :100_000]).float().mean()
    )
    print(
        f"  fit C=1, max_iter={max_iter}: {took:.1f} s, {int(n_iter[0])} iterations, train accuracy (first "
        f"100 000) {acc:.3f}; peak GPU memory {torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == 'cuda' else 0:.1f} GiB"
    )


def bench_precond(store: str | None = None, tokens: str = "q,ffn", position: str = "cls") -> None:
    """The hyperplane solver with and without the curvature preconditioner (a warm start's, and the refreshes at
    the current iterate; everything else equal), side by side: the standard classification protocol (C grid,
    held-out 10 %, refit) on a feature store's ``STORE/train`` and ``STORE/test`` (e.g. ``qkvprobe extract …
    --out STORE/train``), or, without a store, a warm-started C path on synthetic ViT-like features (60 000 × 192,
    10 classes, 2 tokens)."""
    from qkvprobe.protocols.classification import standard_classification
    from qkvprobe.rules.logistic import dense

    with_curvature = dense.curvature_stride
    for label in ("moments only", "curvature"):
        dense.curvature_stride = with_curvature if label == "curvature" else (lambda num_rows, width: 0)
        if store is None:
            data = [vit_like(60_000, 192, 10, seed=10 * t) for t in range(2)]
            X = torch.stack([torch.from_numpy(x) for x, _ in data]).double()
            y = torch.stack([torch.from_numpy(t) for _, t in data])
            t0 = time.perf_counter()
            path = fit_logistic_path(X, y, 10, list(C_GRID))
            took = time.perf_counter() - t0
            iters = [[int(i) for i in f.n_iter] for f in path]
            print(
                f"[precond] synthetic 2 x 60000 x 192, C path {list(C_GRID)}, {label}: {took:.1f} s; iterations "
                f"per C (token 0): {[it[0] for it in iters]}"
            )
            continue
        from qkvprobe.features.store import FeatureStore

        train, test = FeatureStore.open(Path(store) / "train"), FeatureStore.open(Path(store) / "test")
        names = tokens.split(",")
        tr = [np.asarray(train.get(t, position)) for t in names]
        te = [np.asarray(test.get(t, position)) for t in names]
        t0 = time.perf_counter()
        res = standard_classification(tr, train.labels(), te, test.labels(), rule="hyperplane")
        took = time.perf_counter() - t0
        accs = ", ".join(
            f"{t}·{position} {r.accuracy:.4f} (C {r.C:g})" for t, r in zip(names, res, strict=True)
        )
        print(
            f"[precond] {store}: {len(tr[0])} train rows, standard protocol, C grid {list(C_GRID)}, {label}: "
            f"{took:.1f} s; test accuracy {accs}"
        )
    dense.curvature_stride = with_curvature


def bench_grid(
    store: str | None = None, tokens: str = "q,ffn", position: str = "cls", every: str = "5"
) -> None:
    """The standard protocol's C grid, every C from W = 0, fitted one C at a time and as one batch of all Cs
    sharing each X (``fit_logistic_grid``), side by side.
    Without a store: synthetic ViT-like features, 2 tokens × 60 000 × 192, 10 classes. With ``STORE`` (a
    classification store's parent, ``STORE/train``): its training split's tokens at ``POSITION``. With
    ``POSITION`` = patch (a segmentation store's ``STORE/train``): the labelled patches of every ``EVERY``-th
    image, one token at a time, through the streaming objective."""
    from qkvprobe.rules.logistic import (
        DEFAULT_MAX_ITER,
        DEFAULT_TOL,
        DenseLogistic,
        StreamedLogistic,
        augment,
    )

    Cs = list(C_GRID)
    if position == "patch":
        from qkvprobe.features.store import FeatureStore
        from qkvprobe.protocols import hyperplane as seg
        from qkvprobe.protocols.segmentation import PatchSource

        train = FeatureStore.open(Path(store) / "train")
        labels = train.patch_labels()
        rows = np.arange(0, len(labels), int(every))
        for token in tokens.split(","):
            src = PatchSource(train, token, -1, rows, labels, torch.float64, torch.device("cpu"))
            moment, K = src.moment(), len(train.classes)
            t0 = time.perf_counter()
            fit = (DEFAULT_MAX_ITER, DEFAULT_TOL)
            one = torch.cat([seg._fit_streaming(src, K, [C], None, moment, *fit)[0] for C in Cs])
            t1 = time.perf_counter()
            batch = seg._fit_streaming(src, K, Cs, None, moment, *fit)[0]
            t2 = time.perf_counter()
            obj = StreamedLogistic(src, src.num_rows, K, Cs, moment)
            f1, fb = obj.value_grad(one)[0], obj.value_grad(batch)[0]
            print(
                f"[grid] {store} {token}·patch, {src.num_rows} patches, C grid {Cs}: one C at a time {t1 - t0:.1f} s, "
                f"one batch {t2 - t1:.1f} s (x{(t1 - t0) / (t2 - t1):.2f}); objective max rel. difference "
                f"{float(((fb - f1) / f1).abs().max()):.1e}"
            )
        return
    if store is None:
        data = [vit_like(60_000, 192, 10, seed=10 * t) for t in range(2)]
        X = torch.stack([torch.from_numpy(x) for x, _ in data]).double()
        y = torch.stack([torch.from_numpy(t) for _, t in data])
        what = "synthetic 2 x 60000 x 192"
    else:
        from qkvprobe.features.store import FeatureStore

        train = FeatureStore.open(Path(store) / "train")
        names = tokens.split(",")
        X = torch.stack([torch.from_numpy(np.asarray(train.get(t, position), np.float64)) for t in names])
        y = torch.from_numpy(train.labels()).expand(len(names), -1)
        what = f"{store} {tokens}·{position}, {X.shape[1]} rows"
    K = int(y.max()) + 1
    t0 = time.perf_counter()
    one = [fit_logistic(X, y, K, C, reduce=False) for C in Cs]
    t1 = time.perf_counter()
    batch = fit_logistic_grid(X, y, K, Cs)
    t2 = time.perf_counter()
    G = X.shape[0]
    obj = DenseLogistic(
        augment(X), y, torch.ones(y.shape, dtype=X.dtype), torch.tensor(Cs, dtype=X.dtype).repeat(G), K
    )

    def as_w(fits):
        return torch.stack(
            [torch.cat([f.coef.transpose(1, 2), f.intercept[:, None]], 1) for f in fits], 1
        ).reshape(G * len(Cs), -1)

    f1, fb = obj.value_grad(as_w(one))[0], obj.value_grad(as_w(batch))[0]
    iters = [[int(f.n_iter[0]) for f in fits] for fits in (one, batch)]
    print(
        f"[grid] {what}, C grid {Cs}: one C at a time {t1 - t0:.1f} s, one batch {t2 - t1:.1f} s "
        f"(x{(t1 - t0) / (t2 - t1):.2f}); iterations per C (token 0) {iters[0]} / {iters[1]}; objective max rel. "
        f"difference {float(((fb - f1) / f1).abs().max()):.1e}"
    )


def main(argv: list[str]) -> None:
    which = argv[1] if len(argv) > 1 else "all"
    # The benchmark machine is shared: one thread for torch and for scikit-learn/BLAS keeps the ratio fair.
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpus {os.cpu_count()}")
    if which in ("standard", "all"):
        bench_standard()
    if which in ("fewshot", "cosine", "all"):
        bench_fewshot()
    if which == "kernels":
        bench_kernels()
    if which == "gap":
        bench_gap()
    if which == "knn":
        bench_knn()
        # own process, so its peak RSS is the segmentation k-NN's alone
        subprocess.run([sys.executable, __file__, "knn-segmentation"], check=True)
    if which == "knn-segmentation":
        bench_knn_segmentation(*(int(a) for a in argv[2:4]))
    if which == "gpu":  # needs CUDA; not part of "all"
        bench_gpu(*(int(a) for a in argv[2:6]))
    if which == "precond":  # not part of "all"
        bench_precond(*argv[2:5])
    if which == "grid":  # not part of "all"
        bench_grid(*argv[2:6])
    if which == "segmentation":
        bench_segmentation(*(int(a) for a in argv[2:4]))
    elif which == "all":  # own process, so its peak RSS is the protocol's alone
        subprocess.run([sys.executable, __file__, "segmentation"], check=True)


if __name__ == "__main__":
    main(sys.argv)
