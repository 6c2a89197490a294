"""refnet.kernels side by side with NumPy, SciPy, PyTorch and JAX, in one run.

Cases (float64 unless said; each time is the median of repeated runs, ratios = time / refnet's):

* masked matmul ``x @ (mask * W).T``: N in {1024, 4096} (square W), B in {64, 256},
  sparsity in {0.5, 0.9, 0.95, 0.99}, float32 and float64. refnet = ``kernels.masked_matmul``
  with the automatic engine (Numba CSR at or above the crossover, BLAS on ``mask * W`` below;
  the mask's structure is cached, the values are read from W on every call). Anchors get their
  operands precomputed: NumPy dense BLAS on the effective weight, SciPy CSR (``csr @ x.T``),
  PyTorch dense and CSR (``torch.sparse_csr_tensor @``), JAX ``jit`` dense.
  ``--quick``: N = 1024 (both B) and N = 4096 with B = 256.
* masked matmul transposed ``g @ (mask * W)`` (the input gradient), the same anchors, fewer cases.
  Context row "scipy CSR (values from W each call)": what SciPy costs in training, where W
  changes every step and the CSR values must be refreshed (refnet pays that gather too).
* batched singular values: 100 matrices 100 x 100, float64: ``kernels.batched_svdvals`` vs
  ``np.linalg.svd(compute_uv=False)``, ``torch.linalg.svdvals``, ``jax.jit(jnp.linalg.svd)``;
  and the whole decomposition ``kernels.batched_svd`` vs the same three with the vectors.
* 100 approximate-isometry steps, N = 1024, 90% sparse, float64: ``kernels.isometry_step`` vs a
  dense NumPy step, SciPy CSR, PyTorch (dense) and a JAX ``jit`` of the 100-step loop.

``python -m benchmarks.kernels --crossover`` sweeps the sparsity for the dense-vs-CSR choice
(numbers that went into kernels/_tuning.py); ``--probe`` checks whether both cores are free
(2-thread dgemm rate vs 1-thread). Thread counts: set OMP_NUM_THREADS, OPENBLAS_NUM_THREADS,
MKL_NUM_THREADS and NUMBA_NUM_THREADS before starting Python; PyTorch and JAX are limited to the
same count here.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np

from .common import blas_info, median_time, print_table, settle_allocator, write_json

SPARSITIES = (0.5, 0.9, 0.95, 0.99)


def _threads() -> int:
    v = os.environ.get("OMP_NUM_THREADS") or os.environ.get("OPENBLAS_NUM_THREADS")
    return int(v) if v and v.isdigit() else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())


def pin_one_core() -> None:
    """With one thread asked for (OMP_NUM_THREADS=1), keep the whole process on one core:
    jaxlib 0.10 does not honour XLA's one-thread flags fully (its Jacobian benchmark ran 1.7x
    faster unpinned than under ``taskset -c 0``), so without the pin its "one-thread" figures
    would borrow the second core."""
    if _threads() == 1 and hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[0]})


def torch_or_none():
    """PyTorch limited to this run's thread count, or None when it is not installed."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(_threads())
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
    return torch


def jax_or_none():
    """JAX in float64 on the CPU (one thread when one is asked for), or None when it is not installed."""
    if _threads() == 1 and "XLA_FLAGS" not in os.environ:
        os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    try:
        import jax
    except ImportError:
        return None
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_platforms", "cpu")
    return jax


def _repeats(seconds_per_call: float, quick: bool, least: int = 3) -> int:
    budget = 1.0 if quick else 3.0
    return int(min(20, max(least, budget / max(seconds_per_call, 1e-6))))


def time_call(fn, quick, *, warmup: int | None = None):
    """Median seconds of ``fn()``: one timed call sets the number of repeats (fewer with ``quick``),
    then :func:`benchmarks.common.median_time`. The timer every suite shares.

    ``warmup=n`` (for calls of seconds, such as the CNN Jacobians of benchmarks/jacobian.py): ``n``
    untimed calls, then every call is timed and counts, the first one setting the number of runs
    (the same budget, but at least 3, or 1 with ``quick``); no further warm-up or calibration
    calls, which would otherwise double the cost of a 20 s call. ``warmup=0`` is for a ``fn``
    that has already run on the same inputs (JAX's ``jit`` compiled)."""
    if warmup is not None:
        for _ in range(warmup):
            fn()
        samples = []
        runs = 1
        while len(samples) < runs:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
            if len(samples) == 1:
                runs = _repeats(samples[0], quick, least=1 if quick else 3)
        return float(np.median(samples))
    t0 = time.perf_counter()
    fn()
    one = time.perf_counter() - t0
    r = _repeats(one, quick)
    return median_time(fn, repeat=r, warmup=1 if one > 0.05 else 3, min_time=0.0 if one > 0.05 else 0.2)


# -------------------------------------------------------------------------------------------
# masked matmul
# -------------------------------------------------------------------------------------------


def matmul_cases(quick):
    """The masked-matmul grid ``(dtype, N, B, sparsity)`` (see the module docstring)."""
    for dt in (np.float64, np.float32):
        for N in (1024, 4096):
            for B in (64, 256):
                if quick and N == 4096 and B == 64:
                    continue
                for s in SPARSITIES:
                    yield dt, N, B, s


def bench_masked_matmul(quick=False, transpose=False) -> list[dict]:
    from scipy import sparse

    from refnet import kernels

    torch = torch_or_none()
    jax = jax_or_none()
    rows = []
    rng = np.random.default_rng(0)
    cases = list(matmul_cases(quick))
    if transpose:  # the backward product: fewer cases
        cases = [c for c in cases if c[1] == 1024 or (c[2] == 256 and not quick)] if not quick else [c for c in cases if c[1] == 1024]
    last = None
    for dt, N, B, s in cases:
        if last != (dt, N):
            W = rng.standard_normal((N, N)).astype(dt)
            last = (dt, N)
        mask = rng.random((N, N)) >= s
        x = rng.standard_normal((B, N)).astype(dt)
        We = W * mask  # precomputed effective weight for the dense anchors
        csr = sparse.csr_matrix(We)
        name = "g @ (mask*W)" if transpose else "x @ (mask*W).T"
        case = f"{name} N={N} B={B} sparsity={s} {np.dtype(dt).name}"
        meta = {"N": N, "B": B, "sparsity": s, "dtype": np.dtype(dt).name, "kernel": "masked_matmul_t" if transpose else "masked_matmul"}
        kern = kernels.masked_matmul_t if transpose else kernels.masked_matmul
        engine = kernels.resolve_engine("masked_matmul_t" if transpose else "masked_matmul", x, W, mask)
        out = kern(x, W, mask)  # builds and caches the structure (once per mask)
        ref = x @ We if transpose else x @ We.T
        assert np.allclose(out, ref, rtol=1e-4 if dt == np.float32 else 1e-10, atol=1e-3 if dt == np.float32 else 1e-9)
        impls = [("refnet", lambda: kern(x, W, mask), {"engine": engine})]
        impls.append(("numpy dense BLAS (We precomputed)", (lambda: x @ We) if transpose else (lambda: x @ We.T), {}))
        if transpose:
            csrT = csr.T.tocsr()
            impls.append(("scipy CSR (precomputed)", lambda: csrT @ x.T, {}))
        else:
            impls.append(("scipy CSR (precomputed)", lambda: csr @ x.T, {}))
        # what a training step pays with SciPy: the CSR values refreshed from the changing W
        pos = (np.repeat(np.arange(N), np.diff(csr.indptr)) * N + csr.indices).astype(np.int64)
        Wflat = W.reshape(-1)

        def scipy_fresh():
            m = sparse.csr_matrix((Wflat.take(pos), csr.indices, csr.indptr), shape=csr.shape)
            return (m.T @ x.T) if transpose else (m @ x.T)

        impls.append(("scipy CSR (values from W each call)", scipy_fresh, {}))
        if torch is not None:
            tx = torch.from_numpy(x)
            tW = torch.from_numpy(We)
            m = csr.T.tocsr() if transpose else csr
            crow, col = torch.from_numpy(m.indptr.astype(np.int64)), torch.from_numpy(m.indices.astype(np.int64))
            tcsr = torch.sparse_csr_tensor(crow, col, torch.from_numpy(m.data), size=m.shape, check_invariants=False)
            impls.append(("torch dense", (lambda: tx @ tW) if transpose else (lambda: tx @ tW.T), {}))
            impls.append(("torch CSR", lambda: tcsr @ tx.T, {}))  # same input layout as everyone: x is (B, n)
        if jax is not None:
            jx = jax.device_put(x)
            jW = jax.device_put(We)
            f = jax.jit((lambda a, b: a @ b) if transpose else (lambda a, b: a @ b.T))
            impls.append(("jax jit dense", lambda: f(jx, jW).block_until_ready(), {}))
        for impl, fn, extra in impls:
            rows.append({"case": case, "impl": impl, "seconds": time_call(fn, quick), **meta, **extra})
        print(f"  done {case}", flush=True)
    return rows


# -------------------------------------------------------------------------------------------
# batched singular values
# -------------------------------------------------------------------------------------------


def bench_svdvals(quick=False, full=False) -> list[dict]:
    """Singular values (``full``: the whole reduced decomposition U, S, Vh) of 100 matrices 100 x 100."""
    from refnet import kernels

    rng = np.random.default_rng(1)
    A = rng.standard_normal((100, 100, 100))
    ref = np.linalg.svd(A, compute_uv=False)
    if full:
        case, kernel, arg = "full SVD (U, S, Vh) of 100 matrices 100x100 float64", "batched_svd", "full_matrices=False"
        U, S, Vh = kernels.batched_svd(A)
        assert np.abs(S - ref).max() <= 1e-13 * ref.max() and np.abs((U * S[:, None, :]) @ Vh - A).max() <= 1e-12 * ref.max()
    else:
        case, kernel, arg = "singular values of 100 matrices 100x100 float64", "batched_svdvals", "compute_uv=False"
        assert np.abs(kernels.batched_svdvals(A) - ref).max() <= 1e-13 * ref.max()
    kw = {"full_matrices": False} if full else {"compute_uv": False}
    ours = getattr(kernels, kernel)
    rows = [
        {"case": case, "impl": "refnet", "seconds": time_call(lambda: ours(A), quick), "engine": kernels.resolve_engine(kernel, A)},
        {"case": case, "impl": f"np.linalg.svd({arg})", "seconds": time_call(lambda: np.linalg.svd(A, **kw), quick)},
    ]
    torch = torch_or_none()
    if torch is not None:
        tA = torch.from_numpy(A)
        tf, tname = (lambda: torch.linalg.svd(tA, full_matrices=False), "svd(full_matrices=False)") if full else (lambda: torch.linalg.svdvals(tA), "svdvals")
        rows.append({"case": case, "impl": f"torch.linalg.{tname}", "seconds": time_call(tf, quick)})
    jax = jax_or_none()
    if jax is not None:
        jA = jax.device_put(A)
        f = jax.jit(lambda a: jax.numpy.linalg.svd(a, **kw))
        rows.append({"case": case, "impl": f"jax jit svd({arg})", "seconds": time_call(lambda: jax.block_until_ready(f(jA)), quick)})
    return rows


def bench_svd(quick=False) -> list[dict]:
    """The whole decomposition of the same stack as :func:`bench_svdvals`."""
    return bench_svdvals(quick, full=True)


# -------------------------------------------------------------------------------------------
# approximate isometry
# -------------------------------------------------------------------------------------------


def _iso_numpy_dense(V, mask, lr, steps):
    for _ in range(steps):
        U = V * mask
        A = U.T @ U - np.eye(U.shape[1])
        r = np.linalg.norm(A)
        V = V - lr * mask * (2.0 * (U @ A) / r)
    return V


def bench_isometry(quick=False, steps=100, N=1024, sparsity=0.9) -> list[dict]:
    from refnet import kernels
    from refnet.kernels import numpy_engine

    rng = np.random.default_rng(2)
    V0 = rng.standard_normal((N, N)) / np.sqrt(N * (1 - sparsity))
    mask = rng.random((N, N)) >= sparsity
    lr = 0.1
    case = f"{steps} isometry steps N={N} sparsity={sparsity} float64"

    def refnet_loop():
        V = V0
        for _ in range(steps):
            V, _r = kernels.isometry_step(V, mask, lr)
        return V

    def scipy_loop():
        V = V0
        for _ in range(steps):
            V, _r = numpy_engine.isometry_step(V, mask, lr, method="csr")
        return V

    ref = _iso_numpy_dense(V0, mask, lr, 3)
    V = V0
    for _ in range(3):
        V, _r = kernels.isometry_step(V, mask, lr)
    assert np.abs(V - ref).max() <= 1e-10 * np.abs(ref).max()
    repeat = 1 if quick else 3
    t = lambda fn: median_time(fn, repeat=repeat, warmup=0, min_time=0.0)  # noqa: E731
    rows = [
        {"case": case, "impl": "refnet", "seconds": t(refnet_loop), "engine": kernels.resolve_engine("isometry_step", V0, mask)},
        {"case": case, "impl": "numpy dense", "seconds": t(lambda: _iso_numpy_dense(V0, mask, lr, steps))},
        {"case": case, "impl": "scipy CSR", "seconds": t(scipy_loop)},
    ]
    torch = torch_or_none()
    if torch is not None:
        tV0, tm = torch.from_numpy(V0), torch.from_numpy(mask.astype(np.float64))
        eye = torch.eye(N, dtype=torch.float64)

        def torch_loop():
            V = tV0
            for _ in range(steps):
                U = V * tm
                A = U.T @ U - eye
                V = V - lr * tm * (2.0 * (U @ A) / torch.linalg.norm(A))
            return V

        rows.append({"case": case, "impl": "torch dense", "seconds": t(torch_loop)})
    jax = jax_or_none()
    if jax is not None:
        jnp = jax.numpy
        jm = jax.device_put(mask.astype(np.float64))

        @jax.jit
        def jax_loop(V):
            def body(_, V):
                U = V * jm
                A = U.T @ U - jnp.eye(N, dtype=V.dtype)
                return V - lr * jm * (2.0 * (U @ A) / jnp.linalg.norm(A))

            return jax.lax.fori_loop(0, steps, body, V)

        jV0 = jax.device_put(V0)
        jax_loop(jV0).block_until_ready()  # compile
        rows.append({"case": case, "impl": "jax jit dense (fori_loop)", "seconds": t(lambda: jax_loop(jV0).block_until_ready())})
    return rows


# -------------------------------------------------------------------------------------------
# batched matmul (does a Numba kernel earn its place?)
# -------------------------------------------------------------------------------------------


def bench_batched_matmul(quick=False) -> list[dict]:
    from refnet import kernels

    rng = np.random.default_rng(3)
    A = rng.standard_normal((100, 100, 100))
    Bm = rng.standard_normal((100, 100, 100))
    case = "batched matmul 100 x (100x100 @ 100x100) float64"
    rows = [
        {"case": case, "impl": "refnet", "seconds": time_call(lambda: kernels.batched_matmul(A, Bm), quick), "engine": kernels.resolve_engine("batched_matmul", A, Bm)},
        {"case": case, "impl": "np.matmul", "seconds": time_call(lambda: np.matmul(A, Bm), quick)},
    ]
    try:
        from refnet.kernels import numba_engine

        rows.append({"case": case, "impl": "refnet numba (threaded np.matmul)", "seconds": time_call(lambda: numba_engine.batched_matmul(A, Bm), quick)})
        naive = _naive_batched_matmul()
        naive(A, Bm)
        assert np.allclose(naive(A, Bm), A @ Bm)
        rows.append({"case": case, "impl": "numba prange triple loop", "seconds": time_call(lambda: naive(A, Bm), quick)})
    except ImportError:
        pass
    return rows


def _naive_batched_matmul():
    from numba import njit, prange

    @njit(parallel=True, fastmath={"contract"})
    def mm(A, B):  # pragma: no cover - compiled
        n, m, k = A.shape
        p = B.shape[2]
        out = np.zeros((n, m, p))
        for s in prange(n):
            for i in range(m):
                for l in range(k):
                    a = A[s, i, l]
                    for j in range(p):
                        out[s, i, j] += a * B[s, l, j]
        return out

    return mm


# -------------------------------------------------------------------------------------------
# crossover sweep and core probe
# -------------------------------------------------------------------------------------------


def crossover(sparsities=(0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9), sizes=((1024, 64), (1024, 256), (4096, 64), (4096, 256)), dtypes=(np.float64, np.float32)) -> list[dict]:
    """Numba CSR vs dense BLAS on ``mask * W`` (both as the engine runs them, mask product
    included) for the forward and the transposed product."""
    from refnet.kernels import numba_engine

    rng = np.random.default_rng(4)
    rows = []
    for dt in dtypes:
        for N, B in sizes:
            W = rng.standard_normal((N, N)).astype(dt)
            x = rng.standard_normal((B, N)).astype(dt)
            g = rng.standard_normal((B, N)).astype(dt)
            for s in sparsities:
                mask = rng.random((N, N)) >= s
                r = {"N": N, "B": B, "sparsity": s, "dtype": np.dtype(dt).name}
                for kname, a in (("masked_matmul", x), ("masked_matmul_t", g)):
                    k = getattr(numba_engine, kname)
                    k(a, W, mask, method="csr")
                    for method in ("csr", "dense"):
                        r[f"{kname} {method}"] = time_call(lambda: k(a, W, mask, method=method), True)
                rows.append(r)
                print(
                    f"{r['dtype']:8} N={N:5} B={B:4} s={s:.2f}  fwd csr/dense {r['masked_matmul csr'] * 1e3:9.2f} / {r['masked_matmul dense'] * 1e3:9.2f} ms"
                    f"   bwd csr/dense {r['masked_matmul_t csr'] * 1e3:9.2f} / {r['masked_matmul_t dense'] * 1e3:9.2f} ms",
                    flush=True,
                )
    return rows


def probe_cores(n=2048, repeat=7) -> dict:
    """dgemm rate with 1 and 2 BLAS threads; a ratio near 2 means both cores are free."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(5)
    a = rng.standard_normal((n, n))
    b = rng.standard_normal((n, n))
    out = {}
    for t in (1, 2, 1, 2):
        with threadpool_limits(t, user_api="blas"):
            sec = median_time(lambda: a @ b, repeat=repeat, warmup=1, min_time=0.0)
        out.setdefault(t, []).append(2 * n**3 / sec / 1e9)
    res = {"gflops_1thread": max(out[1]), "gflops_2threads": max(out[2])}
    res["speedup_2_over_1"] = res["gflops_2threads"] / res["gflops_1thread"]
    try:
        res["loadavg"] = os.getloadavg()
    except OSError:  # pragma: no cover
        pass
    return res


def run(quick: bool = False) -> list[dict]:
    pin_one_core()
    rows = []
    rows += bench_masked_matmul(quick)
    rows += bench_masked_matmul(quick, transpose=True)
    rows += bench_svdvals(quick)
    rows += bench_svd(quick)
    rows += bench_batched_matmul(quick)
    rows += bench_isometry(quick)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--crossover", action="store_true", help="sparsity sweep dense vs CSR")
    ap.add_argument("--probe", action="store_true", help="are both cores free? (2-thread vs 1-thread dgemm)")
    ap.add_argument("--only", nargs="*", choices=["matmul", "matmul_t", "svdvals", "svd", "batched_matmul", "isometry"], help="run only these cases")
    ap.add_argument("--out", default=None, help="JSON file to write")
    args = ap.parse_args(argv)
    if not args.probe:
        pin_one_core()
    settle_allocator()
    info = blas_info()
    info["affinity"] = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    print("environment:", {k: v for k, v in info.items() if k != "threadpools"})
    if info.get("threadpools"):
        print("threadpools:", info["threadpools"])
    payload = {"environment": info}
    if args.probe:
        payload["probe"] = probe_cores()
        print("core probe:", payload["probe"])
    if args.crossover:
        payload["crossover"] = crossover()
    if not args.probe and not args.crossover or args.only:
        only = args.only or ["matmul", "matmul_t", "svdvals", "svd", "batched_matmul", "isometry"]
        rows = []
        if "matmul" in only:
            rows += bench_masked_matmul(args.quick)
        if "matmul_t" in only:
            rows += bench_masked_matmul(args.quick, transpose=True)
        if "svdvals" in only:
            rows += bench_svdvals(args.quick)
        if "svd" in only:
            rows += bench_svd(args.quick)
        if "batched_matmul" in only:
            rows += bench_batched_matmul(args.quick)
        if "isometry" in only:
            rows += bench_isometry(args.quick)
        print_table(rows)
        payload["results"] = rows
    if args.out:
        write_json(args.out, payload)
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
