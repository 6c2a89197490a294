"""The cupy engine against refnet's CPU engines and NumPy, in one run on a machine with a GPU.

Run it there as ``python -m benchmarks gpu`` (or ``refnet bench gpu``); without CuPy or without
a GPU the suite says why and measures nothing. Every GPU time is taken to completion (a device
synchronize after each call) and is the median of repeated runs; the data of the "refnet"
rows are already on the device, as in a GPU training loop, and one host-in/host-out row per
masked-matmul case shows what the transfers add. Ratios in the table are ``time / refnet``,
so a CPU row's ratio is the GPU's speed-up over it.

Cases (float64 unless said):

* masked matmul ``x @ (mask * W).T`` and ``g @ (mask * W)``: the kernels suite's grid (N in
  {1024, 4096}, B in {64, 256}, sparsity in {0.5, 0.9, 0.95, 0.99}, float32 and float64; fewer
  with ``--quick``). refnet = the cupy engine's automatic method (cuBLAS on ``mask * W``), beside
  its CSR method (cuSPARSE), the CPU automatic engine and NumPy dense BLAS with ``mask * W``
  precomputed.
* batched singular values, 100 matrices 100 x 100 and 1,000 Jacobian-sized matrices 256 x 256
  (``--quick``: 100 of 256 x 256): the cupy engine (cuSOLVER) against the CPU engine and
  ``np.linalg.svd(compute_uv=False)``. The project's target, 20x the 2-core CPU engine,
  compares with the CPU rows run on two cores: ``NUMBA_NUM_THREADS=2 OMP_NUM_THREADS=2
  OPENBLAS_NUM_THREADS=2 taskset -c 0,1 python -m benchmarks gpu``. The largest deviation from
  the CPU singular values is recorded (``max_dev_rel``, relative to the largest value). The
  same stacks' whole decompositions (``kernels.batched_svd``), checked by ``U diag(S) Vh = A``.
* the singular values of the Jacobians of the signal-propagation cases (the Jacobians are
  computed on the CPU by refnet's NumPy engine; their singular values on the GPU).
* 100 approximate-isometry steps at N = 1024, 90% sparse: cupy dense and CSR against the CPU
  automatic engine.
* the k-th largest of 10^6 and 10^7 scores (SNIP's threshold), cupy against the CPU engine.
"""

from __future__ import annotations

import numpy as np

from .kernels import matmul_cases, time_call

#: the cases' sizes; tests replace them with tiny ones
SIZES = {
    "matmul": None,  # None: the kernels suite's grid (matmul_cases)
    "svd": [(100, 100), (1000, 256)],  # (count, side)
    "svd_quick": [(100, 100), (100, 256)],
    "jacobian": [([100] * 8, 100), ([784] + [100] * 6 + [10], 1000)],  # (layer sizes, examples)
    "isometry": (1024, 0.9, 100),  # (N, sparsity, steps)
    "select": [10**6, 10**7],
}


def gpu_or_reason():
    """``(cupy, None)`` when CuPy and a GPU are usable, else ``(None, why)``."""
    try:
        import cupy as cp
    except ImportError as exc:
        return None, f"CuPy could not be imported ({exc}); install it with pip install refnet[gpu]"
    try:
        n = cp.cuda.runtime.getDeviceCount()
    except Exception as exc:  # no driver, no device
        return None, f"no usable GPU ({exc})"
    if n < 1:
        return None, "no GPU"
    return cp, None


def _gpu_timer(cp, quick):
    sync = cp.cuda.Device().synchronize

    def t(fn):
        def call():
            fn()
            sync()

        return time_call(call, quick)

    return t


def _close(got, ref, rtol, what):
    got = np.asarray(got)
    scale = max(float(np.abs(ref).max()), 1e-300) if ref.size else 1.0
    err = float(np.abs(got - ref).max()) / scale if ref.size else 0.0
    if not err <= rtol:
        raise AssertionError(f"{what}: the GPU result deviates by {err:.3g} (relative to the largest entry) from the CPU one")
    return err


def bench_masked_matmul(cp, quick, transpose=False) -> list[dict]:
    from refnet import kernels

    gt = _gpu_timer(cp, quick)
    rng = np.random.default_rng(0)
    kname = "masked_matmul_t" if transpose else "masked_matmul"
    kern = getattr(kernels, kname)
    cases = SIZES["matmul"] or list(matmul_cases(quick))
    if transpose and SIZES["matmul"] is None:
        cases = [c for c in cases if c[2] == 256]
    rows = []
    for dt, N, B, s in cases:
        W = rng.standard_normal((N, N)).astype(dt)
        mask = rng.random((N, N)) >= s
        a = rng.standard_normal((B, N)).astype(dt)
        We = W * mask
        ref = a @ We if transpose else a @ We.T
        dW, dmask, da = cp.asarray(W), cp.asarray(mask), cp.asarray(a)
        tol = 1e-4 if dt == np.float32 else 1e-10
        for method in ("auto", "csr"):
            _close(cp.asnumpy(kern(da, dW, dmask, engine="cupy", method=method)), ref, tol, f"{kname} {method}")
        case = f"{'g @ (mask*W)' if transpose else 'x @ (mask*W).T'} N={N} B={B} sparsity={s} {np.dtype(dt).name}"
        meta = {"N": N, "B": B, "sparsity": s, "dtype": np.dtype(dt).name, "kernel": kname}
        rows += [
            {"case": case, "impl": "refnet", "engine": "cupy", "method": "auto", "seconds": gt(lambda: kern(da, dW, dmask, engine="cupy")), **meta},
            {"case": case, "impl": "refnet cupy csr (cuSPARSE)", "seconds": gt(lambda: kern(da, dW, dmask, engine="cupy", method="csr")), **meta},
            {"case": case, "impl": "refnet cupy, host in and out", "seconds": gt(lambda: kern(a, W, mask, engine="cupy")), **meta},
            {"case": case, "impl": "refnet CPU (automatic engine)", "engine": kernels.resolve_engine(kname, a, W, mask), "seconds": time_call(lambda: kern(a, W, mask), quick), **meta},
            {"case": case, "impl": "numpy dense BLAS (We precomputed)", "seconds": time_call((lambda: a @ We) if transpose else (lambda: a @ We.T), quick), **meta},
        ]
        print(f"  done {case}", flush=True)
    return rows


def bench_svdvals(cp, quick) -> list[dict]:
    from refnet import kernels

    gt = _gpu_timer(cp, quick)
    rng = np.random.default_rng(1)
    rows = []
    for count, n in SIZES["svd_quick" if quick else "svd"]:
        A = rng.standard_normal((count, n, n))
        case = f"singular values of {count} matrices {n}x{n} float64"
        ref = kernels.batched_svdvals(A)
        dA = cp.asarray(A)
        dev = _close(cp.asnumpy(kernels.batched_svdvals(dA)), ref, 1e-10, case)
        rows += [
            {"case": case, "impl": "refnet", "engine": "cupy", "max_dev_rel": dev, "seconds": gt(lambda: kernels.batched_svdvals(dA))},
            {"case": case, "impl": "refnet CPU engine", "engine": kernels.resolve_engine("batched_svdvals", A), "seconds": time_call(lambda: kernels.batched_svdvals(A), quick)},
            {"case": case, "impl": "np.linalg.svd(compute_uv=False)", "seconds": time_call(lambda: np.linalg.svd(A, compute_uv=False), quick)},
        ]
        full = f"full SVD (U, S, Vh) of {count} matrices {n}x{n} float64"
        U, S, Vh = (cp.asnumpy(p) for p in kernels.batched_svd(dA))
        _close(S, ref, 1e-10, full)
        dev = _close((U * S[:, None, :]) @ Vh, A, 1e-10, f"{full}: U diag(S) Vh against A")
        rows += [
            {"case": full, "impl": "refnet", "engine": "cupy", "max_dev_rel": dev, "seconds": gt(lambda: kernels.batched_svd(dA))},
            {"case": full, "impl": "refnet CPU engine", "engine": kernels.resolve_engine("batched_svd", A), "seconds": time_call(lambda: kernels.batched_svd(A), quick)},
            {"case": full, "impl": "np.linalg.svd(full_matrices=False)", "seconds": time_call(lambda: np.linalg.svd(A, full_matrices=False), quick)},
        ]
        print(f"  done {case}", flush=True)
    return rows


def bench_jacobian_svdvals(cp, quick) -> list[dict]:
    import refnet as rn
    from refnet import kernels
    from refnet.jacobians import jacobian

    gt = _gpu_timer(cp, quick)
    rows = []
    for sizes, n_examples in SIZES["jacobian"]:
        net = rn.mlp(sizes, activation="tanh", init="orthogonal", seed=0)
        X = np.random.default_rng(0).standard_normal((n_examples, sizes[0]))
        J = jacobian(net, X)
        ref = kernels.batched_svdvals(J)
        dJ = cp.asarray(J)
        case = f"singular values of the Jacobians J {J.shape} of the {'-'.join(map(str, sizes))} tanh MLP"
        dev = _close(cp.asnumpy(kernels.batched_svdvals(dJ)), ref, 1e-10, case)
        rows += [
            {"case": case, "impl": "refnet", "engine": "cupy", "max_dev_rel": dev, "seconds": gt(lambda: kernels.batched_svdvals(dJ))},
            {"case": case, "impl": "refnet CPU engine", "engine": kernels.resolve_engine("batched_svdvals", J), "seconds": time_call(lambda: kernels.batched_svdvals(J), quick)},
            {"case": case, "impl": "refnet Jacobians (CPU, for scale)", "seconds": time_call(lambda: jacobian(net, X), quick)},
        ]
    return rows


def bench_isometry(cp, quick) -> list[dict]:
    from refnet import kernels

    N, sparsity, steps = SIZES["isometry"]
    rng = np.random.default_rng(2)
    V0 = rng.standard_normal((N, N)) / np.sqrt(N * (1 - sparsity))
    mask = rng.random((N, N)) >= sparsity
    lr = 0.1
    dV0, dmask = cp.asarray(V0), cp.asarray(mask)
    sync = cp.cuda.Device().synchronize

    def loop(V, m, **kw):
        for _ in range(steps):
            V, _r = kernels.isometry_step(V, m, lr, **kw)
        sync()
        return V

    ref = V0
    for _ in range(3):
        ref, _r = kernels.isometry_step(ref, mask, lr, engine="numpy")
    for method in ("auto", "csr"):
        V = dV0
        for _ in range(3):
            V, _r = kernels.isometry_step(V, dmask, lr, engine="cupy", method=method)
        _close(cp.asnumpy(V), ref, 1e-10, f"isometry steps, cupy {method}")
    case = f"{steps} isometry steps N={N} sparsity={sparsity} float64"
    t = lambda fn: time_call(fn, True)  # noqa: E731 - each call is a whole loop
    return [
        {"case": case, "impl": "refnet", "engine": "cupy", "method": "auto", "seconds": t(lambda: loop(dV0, dmask, engine="cupy"))},
        {"case": case, "impl": "refnet cupy csr (cuSPARSE)", "seconds": t(lambda: loop(dV0, dmask, engine="cupy", method="csr"))},
        {"case": case, "impl": "refnet CPU (automatic engine)", "engine": kernels.resolve_engine("isometry_step", V0, mask), "seconds": t(lambda: loop(V0, mask))},
    ]


def bench_select(cp, quick) -> list[dict]:
    from refnet import kernels

    gt = _gpu_timer(cp, quick)
    rng = np.random.default_rng(3)
    rows = []
    for n in SIZES["select"]:
        s = np.abs(rng.standard_normal(n))
        k = max(1, n // 10)
        ref = np.partition(s, n - k)[n - k]
        ds = cp.asarray(s)
        if float(kernels.kth_largest(ds, k)) != ref:
            raise AssertionError(f"kth_largest on the GPU differs from np.partition (n={n})")
        case = f"k-th largest of {n} scores (k = n/10) float64"
        rows += [
            {"case": case, "impl": "refnet", "engine": "cupy", "seconds": gt(lambda: kernels.kth_largest(ds, k))},
            {"case": case, "impl": "refnet CPU engine", "engine": kernels.resolve_engine("kth_largest", s), "seconds": time_call(lambda: kernels.kth_largest(s, k), quick)},
            {"case": case, "impl": "np.partition", "seconds": time_call(lambda: np.partition(s, n - k)[n - k], quick)},
        ]
    return rows


def run(quick: bool = False) -> list[dict]:
    cp, why = gpu_or_reason()
    if cp is None:
        print(f"gpu suite skipped: {why}", flush=True)
        return []
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = props["name"].decode() if isinstance(props.get("name"), bytes) else props.get("name")
    print(f"GPU: {name}, CuPy {cp.__version__}", flush=True)
    rows = []
    rows += bench_masked_matmul(cp, quick)
    rows += bench_masked_matmul(cp, quick, transpose=True)
    rows += bench_svdvals(cp, quick)
    rows += bench_jacobian_svdvals(cp, quick)
    rows += bench_isometry(cp, quick)
    rows += bench_select(cp, quick)
    for r in rows:
        r["gpu"] = name
    return rows
