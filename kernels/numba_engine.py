r"""The Numba engine (CPU): CSR kernels for masked products, sparse isometry steps, and a
thread pool for stacked LAPACK calls.

Imported only when chosen (``engine="numba"``, ``set_engine``, ``REFNET_ENGINE`` or the
automatic choice), so ``import refnet`` never pays Numba's import time. Every ``@njit`` has
``cache=True``: the first call per dtype (float32, float64) compiles, later processes load
the machine code from ``__pycache__``. Numba's thread count (``NUMBA_NUM_THREADS``,
``numba.set_num_threads``) sets the parallelism of every kernel here, the SVD pool included.

Kernels and their costs (``nnz`` kept weights of an ``(n_out, n_in)`` mask, batch ``B``):

masked_matmul (CSR, rows in parallel)
    ``out^T[i, :] = sum_{j in row i} W[i, j] x^T[j, :]``: ``2 nnz B`` flops, vectorised over
    the batch (``x`` is transposed once, ``O(B n_in)``; the result is returned as the
    transpose of a C-ordered ``(n_out, B)`` array, i.e. Fortran-ordered, which is what the next
    layer's product wants). The values are read from ``W`` on every call (``W`` changes every
    training step; the structure is cached per mask, see ``_structure.py``).
masked_matmul_t (CSC, input features in parallel)
    ``out^T[j, :] = sum_{i in column j} W[i, j] g^T[i, :]``: the values are read in row order
    (cache-friendly) and stored in column order, then a race-free column kernel runs.
isometry_step (sparse Gram and masked gradient, ``d`` = density, ``n`` the smaller side)
    Gram ``A = U^T U`` by scattering each sparse row's outer product into one dense row of
    ``A`` at a time (upper triangle, ``d^2 n^3 / 2`` flops instead of ``n^3``), then the
    gradient only at the mask's entries: ``(U A)_{ij} = sum_{k in row i} U_{ik} A_{jk}``
    (``A`` symmetric), ``d^2 n^3`` flops instead of ``2 n^3``, tiled over rows of ``A`` so
    the rows being read stay in L2. No BLAS call inside a step (``||A||_F`` is summed in the
    mirror pass): OpenBLAS worker threads left spinning after a BLAS call took the cores the
    next Numba region needed (N=1024, 90%, two threads: 28 ms per step with ``np.vdot``, 9 ms
    without; one thread 17 ms).
batched_svdvals
    ``np.linalg.svd(compute_uv=False)`` (LAPACK gesdd) on chunks of the stack, one chunk per
    thread, BLAS pinned to one thread meanwhile (see ``_threads.py``). Numba's own
    ``np.linalg.svd`` always computes the singular vectors, which costs more than the
    parallelism gains, so LAPACK is called through NumPy (which releases the GIL).
batched_matmul
    NumPy's ``matmul`` (one BLAS gemm per matrix) on chunks of the stack in the same pool: a
    Numba triple loop loses to BLAS per matrix (2.0x slower than ``np.matmul`` on 100 stacked
    100 x 100 products, one thread), so there is no Numba kernel; the pool gives 1.8x on two
    free cores (``benchmarks/kernels.py``).
"""

from __future__ import annotations

import math
import threading

import numpy as np

try:
    import numba
    from numba import njit, prange
except ImportError as exc:  # pragma: no cover - numba is a core dependency
    raise ImportError(
        "the 'numba' engine needs Numba, a core dependency of refnet: pip install numba "
        "(or reinstall refnet: pip install refnet)"
    ) from exc

from . import _threads
from . import numpy_engine as _np_engine
from ._structure import mask_structure
from ._tuning import GATHER_DENSITY, ISOMETRY_CROSSOVER, MATMUL_CROSSOVER, MATMUL_T_CROSSOVER, MIN_SPARSE_SIZE, MIN_SPARSE_WORK

__all__ = [
    "masked_matmul",
    "masked_matmul_t",
    "batched_matmul",
    "batched_matmul_chain",
    "batched_svdvals",
    "isometry_step",
]

_FM = {"contract"}  # allow fused multiply-add only; no reassociation, IEEE semantics otherwise
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))

# -------------------------------------------------------------------------------------------
# kernels. Inner loops live in small serial functions: inside a prange body LLVM does not
# vectorise them (measured: scalar vfmadd*sd only), in their own function it does (zmm FMAs).
# Indices are read as unsigned (np.uint32) so that Numba drops its negative-index wraparound
# test from the inner loops (the Gram kernel: 13.3 -> 11.5 ms at N=1024, 90% sparse).
# -------------------------------------------------------------------------------------------


@njit(cache=True, fastmath=_FM)
def _row_axpy_w(Wr, indices, k0, k1, xT, acc):  # pragma: no cover - compiled
    """acc[:] = sum_{k0 <= k < k1} Wr[indices[k]] * xT[indices[k], :]."""
    B = acc.shape[0]
    for b in range(B):
        acc[b] = 0
    for k in range(k0, k1):
        j = np.uint32(indices[k])
        v = Wr[j]
        for b in range(B):
            acc[b] += v * xT[j, b]


@njit(cache=True, fastmath=_FM)
def _row_axpy_v(vals, indices, k0, k1, xT, acc):  # pragma: no cover - compiled
    """acc[:] = sum_{k0 <= k < k1} vals[k] * xT[indices[k], :]."""
    B = acc.shape[0]
    for b in range(B):
        acc[b] = 0
    for k in range(k0, k1):
        j = np.uint32(indices[k])
        v = vals[k]
        for b in range(B):
            acc[b] += v * xT[j, b]


@njit(parallel=True, cache=True)
def _spmm_fused(W, indptr, indices, xT, outT):  # pragma: no cover - compiled
    """outT[i, :] = sum_{k in row i} W[i, indices[k]] * xT[indices[k], :]  (values read from W)."""
    for i in prange(indptr.shape[0] - 1):
        _row_axpy_w(W[i], indices, indptr[i], indptr[i + 1], xT, outT[i])


@njit(parallel=True, cache=True)
def _spmm(vals, indptr, indices, xT, outT):  # pragma: no cover - compiled
    """outT[i, :] = sum_{k in row i} vals[k] * xT[indices[k], :]  (a CSR or CSC structure)."""
    for i in prange(indptr.shape[0] - 1):
        _row_axpy_v(vals, indices, indptr[i], indptr[i + 1], xT, outT[i])


@njit(parallel=True, cache=True)
def _gather(W, indptr, indices, vals):  # pragma: no cover - compiled
    """vals[k] = W[i, indices[k]] for the CSR entries of row i (row order: streams W)."""
    for i in prange(indptr.shape[0] - 1):
        Wr = W[i]
        for k in range(indptr[i], indptr[i + 1]):
            vals[k] = Wr[np.uint32(indices[k])]


@njit(parallel=True, cache=True)
def _gather_to(W, indptr, indices, pos, vals):  # pragma: no cover - compiled
    """vals[pos[k]] = W[i, indices[k]] for the CSR entries of row i: a gather in row order
    (streams W) written straight to another order (pos = CSR -> CSC positions)."""
    for i in prange(indptr.shape[0] - 1):
        Wr = W[i]
        for k in range(indptr[i], indptr[i + 1]):
            vals[pos[k]] = Wr[np.uint32(indices[k])]


@njit(parallel=True, cache=True)
def _permute(src, perm, dst):  # pragma: no cover - compiled
    """dst[k] = src[perm[k]]."""
    for k in prange(perm.shape[0]):
        dst[k] = src[perm[k]]


@njit(cache=True, fastmath=_FM)
def _gram_row(j, vals, indptr, indices, cptr, cidx, cperm, acc):  # pragma: no cover - compiled
    """acc[k] = sum_i U[i, j] U[i, k] for k >= j (entries below j are left at zero)."""
    for k in range(acc.shape[0]):
        acc[k] = 0
    for p in range(cptr[j], cptr[j + 1]):
        i = cidx[p]
        kp = cperm[p]  # position of (i, j) in row i
        v = vals[kp]
        for q in range(kp, indptr[i + 1]):
            acc[np.uint32(indices[q])] += v * vals[q]


@njit(parallel=True, cache=True)
def _gram_minus_identity(vals, indptr, indices, cptr, cidx, cperm, A):  # pragma: no cover - compiled
    """A = U^T U - I for a sparse U (CSR vals/indptr/indices, CSC twin cptr/cidx/cperm);
    returns ||A||_F^2 (summed in float64 here rather than by a BLAS dot, whose worker threads
    would then spin on the cores the next Numba region needs)."""
    n = A.shape[0]
    for t in prange(n):
        # zig-zag order: row j costs ~ (n - j), so pair cheap and dear rows in each chunk
        j = t // 2 if t % 2 == 0 else n - 1 - t // 2
        _gram_row(j, vals, indptr, indices, cptr, cidx, cperm, A[j])
    nb = (n + 31) // 32
    total = 0.0
    for bj in prange(nb):  # mirror the upper triangle in 32 x 32 blocks, subtract I, sum squares
        j0 = bj * 32
        j1 = min(n, j0 + 32)
        part = 0.0
        for bk in range(bj + 1):
            k0 = bk * 32
            for j in range(j0, j1):
                for k in range(k0, min(j, k0 + 32)):
                    a = A[k, j]
                    A[j, k] = a
                    part += 2.0 * float(a) * float(a)
        for j in range(j0, j1):
            A[j, j] -= 1
            part += float(A[j, j]) * float(A[j, j])
        total += part
    return total


@njit(cache=True, fastmath=_FM)
def _masked_grad_row(i, j1, ptr, indptr, vals, indices, A, out):  # pragma: no cover - compiled
    """out[q] = sum_{p in row i} vals[p] A[indices[q], indices[p]] for row i's entries q with
    column < j1, continuing from ptr[i]. Four entries at a time: four independent sums (each
    still added in order of p) hide the latency of the add chain and share the loads."""
    k0 = indptr[i]
    k1 = indptr[i + 1]
    q = ptr[i]
    qe = q
    while qe < k1 and indices[qe] < j1:
        qe += 1
    ptr[i] = qe
    while q + 4 <= qe:
        A0 = A[indices[q]]
        A1 = A[indices[q + 1]]
        A2 = A[indices[q + 2]]
        A3 = A[indices[q + 3]]
        s0 = 0.0
        s1 = 0.0
        s2 = 0.0
        s3 = 0.0
        for p in range(k0, k1):
            c = np.uint32(indices[p])
            v = vals[p]
            s0 += v * A0[c]
            s1 += v * A1[c]
            s2 += v * A2[c]
            s3 += v * A3[c]
        out[q] = s0
        out[q + 1] = s1
        out[q + 2] = s2
        out[q + 3] = s3
        q += 4
    while q < qe:
        Aj = A[indices[q]]
        s = 0.0
        for p in range(k0, k1):
            s += vals[p] * Aj[np.uint32(indices[p])]
        out[q] = s
        q += 1


@njit(parallel=True, cache=True)
def _masked_grad(vals, indptr, indices, A, out, tile, chunks):  # pragma: no cover - compiled
    """out[q] = (U A)[i, j] at every CSR entry q = (i, j) of U, with A symmetric; rows of A
    are visited in tiles of ``tile`` rows so that the ones being read stay in cache. One
    parallel region (each thread walks all tiles for its share of the rows): a barrier per
    tile costs a scheduler time slice whenever another process holds a core."""
    n_r = indptr.shape[0] - 1
    n = A.shape[0]
    ptr = indptr[:-1].copy()
    for c in prange(chunks):
        i0 = c * n_r // chunks
        i1 = (c + 1) * n_r // chunks
        for j0 in range(0, n, tile):
            j1 = min(n, j0 + tile)
            for i in range(i0, i1):
                _masked_grad_row(i, j1, ptr, indptr, vals, indices, A, out)


@njit(parallel=True, cache=True)
def _update(V, indptr, indices, g, step):  # pragma: no cover - compiled
    """V[i, indices[k]] -= step * g[k] over the CSR entries."""
    for i in prange(indptr.shape[0] - 1):
        Vr = V[i]
        for k in range(indptr[i], indptr[i + 1]):
            Vr[indices[k]] -= step * g[k]


# -------------------------------------------------------------------------------------------
# helpers
# -------------------------------------------------------------------------------------------


def _float_dtype(*arrays):
    """The result dtype NumPy would give (a boolean mask does not promote); None unless it is
    float32 or float64."""
    dt = np.result_type(*[a.dtype for a in arrays if a is not None and a.dtype != np.bool_])
    return dt if dt in _FLOATS else None


def _sparse_ok(W, mask, crossover, batch=None) -> bool:
    """Whether the CSR path should run for this mask (method="auto")."""
    if mask is None or W.size < MIN_SPARSE_SIZE or (batch is not None and batch * W.size < MIN_SPARSE_WORK):
        return False
    s = mask_structure(mask)
    return s.binary and 1.0 - s.density >= crossover


def _transposed_rows(x, dt):
    """``x.T`` as a C-contiguous ``(n, B)`` array of dtype ``dt`` (free when x is F-ordered)."""
    xT = x.T
    if xT.dtype == dt and xT.flags.c_contiguous:
        return xT
    return np.ascontiguousarray(xT, dtype=dt)


def _check_method(method):
    _np_engine._check_method(method)


_local = threading.local()
_WORKSPACE_MAX_BYTES = 64 << 20


def _workspace(shape, dtype):
    """An uninitialised scratch array, reused between calls of the same thread (saves the page
    faults of a fresh large allocation: ~1.5 ms per 8 MiB here); kept only up to 64 MiB."""
    buf = getattr(_local, "buf", None)
    if buf is not None and buf.shape == shape and buf.dtype == dtype:
        return buf
    buf = np.empty(shape, dtype=dtype)
    _local.buf = buf if buf.nbytes <= _WORKSPACE_MAX_BYTES else None
    return buf


# -------------------------------------------------------------------------------------------
# public kernels
# -------------------------------------------------------------------------------------------


def masked_matmul(x, W, mask=None, *, method: str = "auto"):
    """``x @ (mask * W).T`` (see :func:`refnet.kernels.masked_matmul`).

    method "dense": BLAS on ``mask * W``; "csr": the CSR kernel; "auto": CSR at or above
    ``MATMUL_CROSSOVER`` sparsity (``kernels/_tuning.py``), dense below.
    """
    _check_method(method)
    dt = _float_dtype(x, W, mask)
    if mask is None or dt is None or method == "dense" or (method == "auto" and not _sparse_ok(W, mask, MATMUL_CROSSOVER, x.shape[0])):
        return _np_engine.masked_matmul(x, W, mask)
    s = mask_structure(mask)
    if not s.binary:
        raise ValueError("method='csr' needs a 0/1 (boolean) mask; use method='dense' for a weighted mask")
    n_out, n_in = W.shape
    B = x.shape[0]
    outT = np.empty((n_out, B), dtype=dt)  # (n_out, B)
    if B == 0 or n_out == 0:
        return outT.T
    if s.nnz == 0:
        outT[...] = 0
        return outT.T
    Wc = np.ascontiguousarray(W, dtype=dt)
    xT = _transposed_rows(x, dt)  # (n_in, B)
    if s.density > GATHER_DENSITY:
        _spmm_fused(Wc, s.indptr, s.indices, xT, outT)
    else:
        vals = np.empty(s.nnz, dtype=dt)
        _gather(Wc, s.indptr, s.indices, vals)
        _spmm(vals, s.indptr, s.indices, xT, outT)
    return outT.T  # (B, n_out), Fortran-ordered


def masked_matmul_t(g, W, mask=None, *, method: str = "auto"):
    """``g @ (mask * W)`` (see :func:`refnet.kernels.masked_matmul_t`)."""
    _check_method(method)
    dt = _float_dtype(g, W, mask)
    if mask is None or dt is None or method == "dense" or (method == "auto" and not _sparse_ok(W, mask, MATMUL_T_CROSSOVER, g.shape[0])):
        return _np_engine.masked_matmul_t(g, W, mask)
    s = mask_structure(mask)
    if not s.binary:
        raise ValueError("method='csr' needs a 0/1 (boolean) mask; use method='dense' for a weighted mask")
    n_out, n_in = W.shape
    B = g.shape[0]
    outT = np.empty((n_in, B), dtype=dt)  # (n_in, B)
    if B == 0 or n_in == 0:
        return outT.T
    if s.nnz == 0:
        outT[...] = 0
        return outT.T
    cptr, cidx, _, iperm = s.csc()
    Wc = np.ascontiguousarray(W, dtype=dt)
    vals_c = np.empty(s.nnz, dtype=dt)
    _gather_to(Wc, s.indptr, s.indices, iperm, vals_c)  # read in row order, stored in column order
    gT = _transposed_rows(g, dt)  # (n_out, B)
    _spmm(vals_c, cptr, cidx, gT, outT)
    return outT.T  # (B, n_in), Fortran-ordered


def isometry_step(V, mask, lr: float, squared: bool = False, *, method: str = "auto"):
    """One approximate-isometry step (see :func:`refnet.kernels.numpy_engine.isometry_step`);
    "csr"/"auto" at or above ``ISOMETRY_CROSSOVER`` sparsity: the sparse kernels."""
    _check_method(method)
    V = np.asarray(V)
    dt = _float_dtype(V, mask)
    if mask is None or dt is None or method == "dense" or (method == "auto" and not _sparse_ok(V, mask, ISOMETRY_CROSSOVER)):
        return _np_engine.isometry_step(V, mask, lr, squared)
    s = mask_structure(mask)
    if not s.binary:
        raise ValueError("method='csr' needs a 0/1 (boolean) mask; use method='dense' for a weighted mask")
    n_out, n_in = V.shape
    Vc = np.ascontiguousarray(V, dtype=dt)
    cptr, cidx, perm, iperm = s.csc()
    vals = np.empty(s.nnz, dtype=dt)
    tall = n_out >= n_in
    if tall:  # U = V: rows of U are rows of V
        if s.nnz:
            _gather(Vc, s.indptr, s.indices, vals)
        u = (vals, s.indptr, s.indices, cptr, cidx, perm)
    else:  # U = V^T: rows of U are columns of V; the CSR <-> CSC roles swap
        if s.nnz:
            _gather_to(Vc, s.indptr, s.indices, iperm, vals)  # V's values in column order
        u = (vals, cptr, cidx, s.indptr, s.indices, iperm)
    n = min(n_out, n_in)
    A = _workspace((n, n), dt)  # the Gram residual, internal to this call
    res = float(np.sqrt(_gram_minus_identity(*u, A))) if n else 0.0
    scale = 4.0 if squared else (2.0 / res if res > 0 else 0.0)
    out = Vc.copy()
    if s.nnz == 0 or scale == 0.0:
        return out, res
    g_u = np.empty(s.nnz, dtype=dt)
    tile = max(8, (1 << 20) // max(1, n * dt.itemsize))  # rows of A per tile: ~1 MiB
    _masked_grad(u[0], u[1], u[2], A, g_u, tile, max(1, min(numba.get_num_threads(), u[1].shape[0] - 1)))
    if tall:
        g = g_u
    else:  # back to V's row order
        g = np.empty_like(g_u)
        _permute(g_u, iperm, g)
    _update(out, s.indptr, s.indices, g, dt.type(lr * scale))
    return out, res


def _workers() -> int:
    return max(1, min(numba.get_num_threads(), _threads.usable_cores()))


def _chunked(fn, n_items: int, workers: int):
    """Run ``fn(lo, hi)`` on ``workers`` contiguous chunks of ``range(n_items)`` in the pool,
    with BLAS pinned to one thread."""
    bounds = np.linspace(0, n_items, workers + 1).round().astype(int)
    with _threads.blas_single_thread():
        futs = [_threads.pool(workers).submit(fn, int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]
        for f in futs:
            f.result()


def _svd_dtype(dt: np.dtype):
    """The dtype ``np.linalg.svd`` returns for input ``dt`` (None: leave it to NumPy)."""
    if dt in _FLOATS:
        return dt
    if dt == np.complex64:
        return np.dtype(np.float32)
    if dt == np.complex128:
        return np.dtype(np.float64)
    if dt.kind in "biu":
        return np.dtype(np.float64)
    return None


def batched_svdvals(A):
    """Singular values of a stack ``(..., m, n)``, descending: LAPACK gesdd per matrix, the
    stack split over Numba's thread count in a pool of Python threads."""
    from ._tuning import SVD_MIN_SIDE, SVD_MIN_STACK

    A = np.asarray(A)
    if A.ndim < 2:
        raise ValueError(f"A must have at least 2 dimensions, got shape {A.shape}")
    batch = A.shape[:-2]
    count = math.prod(batch)
    workers = min(_workers(), count)
    dt = _svd_dtype(A.dtype)
    if (A.size == 0 or dt is None or workers < 2 or count < SVD_MIN_STACK or min(A.shape[-2:]) < SVD_MIN_SIDE
            or not _threads.blas_pinnable()):
        return _np_engine.batched_svdvals(A)
    flat = A.reshape((count,) + A.shape[-2:])
    k = min(A.shape[-2:])
    out = np.empty((count, k), dtype=dt)

    def work(lo, hi):
        out[lo:hi] = np.linalg.svd(flat[lo:hi], compute_uv=False)

    _chunked(work, count, workers)
    return out.reshape(batch + (k,))


def batched_matmul(A, B):
    """``A @ B`` on stacks: NumPy matmul on chunks of the leading axis, one per thread.
    Stacks of equal leading shape, or a stack times one shared matrix; anything else (other
    broadcasting) goes to ``np.matmul`` as it is."""
    A = np.asarray(A)
    B = np.asarray(B)
    same = B.ndim == A.ndim and B.shape[:-2] == A.shape[:-2]
    if A.ndim < 3 or not (same or B.ndim == 2) or A.shape[-1] != B.shape[-2] or _workers() < 2 or not _threads.blas_pinnable():
        return np.matmul(A, B)
    count = math.prod(A.shape[:-2])
    if count < 2:
        return np.matmul(A, B)
    Af = A.reshape((count,) + A.shape[-2:])
    Bf = B.reshape((count,) + B.shape[-2:]) if same else B
    out = np.empty((count, A.shape[-2], B.shape[-1]), dtype=np.result_type(A, B))

    def work(lo, hi):
        np.matmul(Af[lo:hi], Bf[lo:hi] if same else Bf, out=out[lo:hi])

    _chunked(work, count, min(_workers(), count))
    return out.reshape(A.shape[:-2] + out.shape[-2:])


def batched_matmul_chain(mats):
    """``mats[-1] @ ... @ mats[0]`` with :func:`batched_matmul`."""
    mats = list(mats)
    if not mats:
        raise ValueError("mats must hold at least one matrix stack")
    P = np.asarray(mats[0])
    for J in mats[1:]:
        P = batched_matmul(J, P)
    return P
