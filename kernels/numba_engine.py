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
    the batch, four or eight entries per pass over the row's accumulator (``x`` is transposed
    once by a tiled copy, ``O(B n_in)``; the result is returned as the transpose of a C-ordered
    ``(n_out, B)`` array, i.e. Fortran-ordered, which is what the next layer's product wants).
    The values are read from ``W`` on every call (``W`` changes every training step; the
    structure is cached per mask, see ``_structure.py``). Below the crossover sparsity: BLAS on
    ``mask * W`` formed block by block (:func:`_dense_masked`).
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
batched_svdvals, batched_svd
    ``np.linalg.svd(compute_uv=False)`` (or with the vectors) (LAPACK gesdd) on chunks of the
    stack, one chunk per thread, BLAS pinned to one thread meanwhile (see ``_threads.py``). Numba's own
    ``np.linalg.svd`` always computes the singular vectors, which costs more than the
    parallelism gains, so LAPACK is called through NumPy (which releases the GIL).
kth_largest
    A radix select on the bit patterns of non-negative scores (one histogram pass over the top
    16 bits, then a partition of the entries sharing the winning digit).
Threads
    Every parallel kernel has a serial twin compiled from the same source; ``threads=1`` (what
    the automatic engine passes for masked products, and for isometry steps below
    ``MIN_THREADED_ISOMETRY``) runs the twins and never touches the pool.
batched_matmul
    NumPy's ``matmul`` (one BLAS gemm per matrix) on chunks of the stack in the same pool: a
    Numba triple loop loses to BLAS per matrix (2.0x slower than ``np.matmul`` on 100 stacked
    100 x 100 products, one thread), so there is no Numba kernel; the pool gives 1.8x on two
    free cores (``benchmarks/kernels.py``).
"""

from __future__ import annotations

import math
import threading
import types

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
from ._tuning import DENSE_BLOCK_BYTES, DENSE_BLOCK_ROWS, DENSE_BLOCK_ROWS_T, GATHER_DENSITY, ISOMETRY_CROSSOVER, MATMUL_CROSSOVER, MATMUL_T_CROSSOVER, MIN_SPARSE_SIZE, MIN_SPARSE_WORK

__all__ = list(_np_engine.ENGINE_KERNELS)

_FM = {"contract"}  # allow fused multiply-add only; no reassociation, IEEE semantics otherwise
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))

# -------------------------------------------------------------------------------------------
# kernels. Inner loops live in small serial functions: inside a prange body LLVM does not
# vectorise them (measured: scalar vfmadd*sd only), in their own function it does (zmm FMAs).
# Indices are read as unsigned (np.uint32) so that Numba drops its negative-index wraparound
# test from the inner loops (the Gram kernel: 13.3 -> 11.5 ms at N=1024, 90% sparse).
# -------------------------------------------------------------------------------------------


def _parallel(fn):
    """``njit(parallel=True, cache=True)`` of ``fn``, with a serial twin (``prange`` runs as
    ``range``) compiled from the same source as ``.serial``: a one-thread call runs the twin and
    never touches Numba's thread pool (a parallel launch costs microseconds, and setting the
    thread count around a call another ~3 us each way, as much as a small product)."""
    par = njit(parallel=True, cache=True)(fn)
    twin = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__, fn.__closure__)
    twin.__qualname__ = fn.__qualname__ + "_serial"  # its own on-disk cache entry
    twin.__doc__ = fn.__doc__
    par.serial = njit(cache=True)(twin)
    return par


def _run(kernel, serial: bool):
    """The parallel kernel or its serial twin."""
    return kernel.serial if serial else kernel


def _serial(threads) -> bool:
    """Whether a call with ``threads`` (None: Numba's thread count) runs the serial twins."""
    if threads is None:
        return numba.get_num_threads() == 1
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise ValueError(f"threads must be None or an int >= 1, got {threads!r}")
    return int(threads) == 1


@njit(cache=True, fastmath=_FM, inline="always")
def _val(vals, by_col, indices, k):  # pragma: no cover - compiled
    """The value of entry k: ``vals[indices[k]]`` (vals = a row of W) or ``vals[k]``."""
    return vals[np.uint32(indices[k])] if by_col else vals[k]


@njit(cache=True, fastmath=_FM)
def _row_axpy(vals, by_col, indices, k0, k1, xT, acc):  # pragma: no cover - compiled
    """acc[:] = sum_{k0 <= k < k1} v_k * xT[indices[k], :], added in order of k, with v_k from
    :func:`_val` (``by_col``: read from a row of W; else the gathered values).

    Several entries per pass over ``acc``, each lane still adding them one after another (the
    rounding of the plain loop): the first pass takes the ``(k1 - k0) % 4`` odd entries (four
    when none) and starts from zero, the others take eight while eight are left, then four. One
    entry per pass made the kernel load/store bound (N=4096 B=256 float64, 95% sparse: 59 ->
    34 ms with four, 33 ms with eight)."""
    L = acc.shape[0]
    n = k1 - k0
    r = n % 4
    if r == 0:
        r = 4 if n else 0
    k = k0
    if r == 0:
        for b in range(L):
            acc[b] = 0
    elif r == 1:
        v0 = _val(vals, by_col, indices, k)
        x0 = xT[np.uint32(indices[k])]
        for b in range(L):
            acc[b] = 0
            acc[b] = acc[b] + v0 * x0[b]
    elif r == 2:
        v0, v1 = _val(vals, by_col, indices, k), _val(vals, by_col, indices, k + 1)
        x0, x1 = xT[np.uint32(indices[k])], xT[np.uint32(indices[k + 1])]
        for b in range(L):
            acc[b] = 0
            acc[b] = (acc[b] + v0 * x0[b]) + v1 * x1[b]
    elif r == 3:
        v0, v1, v2 = _val(vals, by_col, indices, k), _val(vals, by_col, indices, k + 1), _val(vals, by_col, indices, k + 2)
        x0, x1, x2 = xT[np.uint32(indices[k])], xT[np.uint32(indices[k + 1])], xT[np.uint32(indices[k + 2])]
        for b in range(L):
            acc[b] = 0
            acc[b] = ((acc[b] + v0 * x0[b]) + v1 * x1[b]) + v2 * x2[b]
    else:
        v0, v1 = _val(vals, by_col, indices, k), _val(vals, by_col, indices, k + 1)
        v2, v3 = _val(vals, by_col, indices, k + 2), _val(vals, by_col, indices, k + 3)
        x0, x1 = xT[np.uint32(indices[k])], xT[np.uint32(indices[k + 1])]
        x2, x3 = xT[np.uint32(indices[k + 2])], xT[np.uint32(indices[k + 3])]
        for b in range(L):
            acc[b] = 0
            acc[b] = (((acc[b] + v0 * x0[b]) + v1 * x1[b]) + v2 * x2[b]) + v3 * x3[b]
    k += r
    while k + 8 <= k1:  # eight entries per pass where a row has them (95% sparse N=4096: -10%)
        v0, v1 = _val(vals, by_col, indices, k), _val(vals, by_col, indices, k + 1)
        v2, v3 = _val(vals, by_col, indices, k + 2), _val(vals, by_col, indices, k + 3)
        v4, v5 = _val(vals, by_col, indices, k + 4), _val(vals, by_col, indices, k + 5)
        v6, v7 = _val(vals, by_col, indices, k + 6), _val(vals, by_col, indices, k + 7)
        x0, x1 = xT[np.uint32(indices[k])], xT[np.uint32(indices[k + 1])]
        x2, x3 = xT[np.uint32(indices[k + 2])], xT[np.uint32(indices[k + 3])]
        x4, x5 = xT[np.uint32(indices[k + 4])], xT[np.uint32(indices[k + 5])]
        x6, x7 = xT[np.uint32(indices[k + 6])], xT[np.uint32(indices[k + 7])]
        for b in range(L):
            a = (((acc[b] + v0 * x0[b]) + v1 * x1[b]) + v2 * x2[b]) + v3 * x3[b]
            acc[b] = (((a + v4 * x4[b]) + v5 * x5[b]) + v6 * x6[b]) + v7 * x7[b]
        k += 8
    while k < k1:
        v0, v1 = _val(vals, by_col, indices, k), _val(vals, by_col, indices, k + 1)
        v2, v3 = _val(vals, by_col, indices, k + 2), _val(vals, by_col, indices, k + 3)
        x0, x1 = xT[np.uint32(indices[k])], xT[np.uint32(indices[k + 1])]
        x2, x3 = xT[np.uint32(indices[k + 2])], xT[np.uint32(indices[k + 3])]
        for b in range(L):
            acc[b] = (((acc[b] + v0 * x0[b]) + v1 * x1[b]) + v2 * x2[b]) + v3 * x3[b]
        k += 4


@_parallel
def _spmm_fused(W, indptr, indices, xT, outT):  # pragma: no cover - compiled
    """outT[i, :] = sum_{k in row i} W[i, indices[k]] * xT[indices[k], :]  (values read from W)."""
    for i in prange(indptr.shape[0] - 1):
        _row_axpy(W[i], True, indices, indptr[i], indptr[i + 1], xT, outT[i])


@_parallel
def _spmm(vals, indptr, indices, xT, outT):  # pragma: no cover - compiled
    """outT[i, :] = sum_{k in row i} vals[k] * xT[indices[k], :]  (a CSR or CSC structure)."""
    for i in prange(indptr.shape[0] - 1):
        _row_axpy(vals, False, indices, indptr[i], indptr[i + 1], xT, outT[i])


@_parallel
def _gather(W, indptr, indices, vals):  # pragma: no cover - compiled
    """vals[k] = W[i, indices[k]] for the CSR entries of row i (row order: streams W)."""
    for i in prange(indptr.shape[0] - 1):
        Wr = W[i]
        for k in range(indptr[i], indptr[i + 1]):
            vals[k] = Wr[np.uint32(indices[k])]


@_parallel
def _gather_to(W, indptr, indices, pos, vals):  # pragma: no cover - compiled
    """vals[pos[k]] = W[i, indices[k]] for the CSR entries of row i: a gather in row order
    (streams W) written straight to another order (pos = CSR -> CSC positions)."""
    for i in prange(indptr.shape[0] - 1):
        Wr = W[i]
        for k in range(indptr[i], indptr[i + 1]):
            vals[pos[k]] = Wr[np.uint32(indices[k])]


@_parallel
def _transpose_into(x, out):  # pragma: no cover - compiled
    """out[j, b] = x[b, j] (cast to out's dtype), eight rows of x at a time: the eight stores
    of each j fill one stretch of a row of out, the eight reads stream (one thread, float64:
    256 x 1024 0.14 ms, 256 x 4096 0.78 ms; ``np.ascontiguousarray(x.T)`` 0.74 / 3.0 ms)."""
    B, n = x.shape
    full = B // 8
    for t in prange(full):
        b0 = t * 8
        r0, r1, r2, r3 = x[b0], x[b0 + 1], x[b0 + 2], x[b0 + 3]
        r4, r5, r6, r7 = x[b0 + 4], x[b0 + 5], x[b0 + 6], x[b0 + 7]
        for j in range(n):
            o = out[j]
            o[b0] = r0[j]
            o[b0 + 1] = r1[j]
            o[b0 + 2] = r2[j]
            o[b0 + 3] = r3[j]
            o[b0 + 4] = r4[j]
            o[b0 + 5] = r5[j]
            o[b0 + 6] = r6[j]
            o[b0 + 7] = r7[j]
    for b in range(full * 8, B):
        xr = x[b]
        for j in range(n):
            out[j, b] = xr[j]


@_parallel
def _mask_rows(W, m, r0, out):  # pragma: no cover - compiled
    """out[i, :] = W[r0 + i, :] * m[r0 + i, :] (NumPy's ``W * mask``: a 0 of the mask gives
    -0 for a negative weight and NaN for an infinite one, as in the oracle)."""
    for i in prange(out.shape[0]):
        Wr = W[r0 + i]
        mr = m[r0 + i]
        o = out[i]
        for j in range(o.shape[0]):
            o[j] = Wr[j] * mr[j]


@_parallel
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


@_parallel
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


@_parallel
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


@_parallel
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


def _transposed_rows(x, dt, serial=False):
    """``x.T`` as a C-contiguous ``(n, B)`` array of dtype ``dt`` (free when x is F-ordered;
    otherwise a transposed copy in this thread's workspace, valid until the next call)."""
    xT = x.T
    if xT.dtype == dt and xT.flags.c_contiguous:
        return xT
    if x.ndim != 2 or x.dtype not in _FLOATS or x.size == 0:
        return np.ascontiguousarray(xT, dtype=dt)
    out = _workspace(xT.shape, dt, "xT")
    _run(_transpose_into, serial)(x, out)
    return out


def _check_method(method):
    _np_engine.check_method(method)


_local = threading.local()
_WORKSPACE_MAX_BYTES = 64 << 20


def _workspace(shape, dtype, slot: str = "gram"):
    """An uninitialised scratch array for internal use within one call, reused between calls
    of the same thread (saves the page faults of a fresh large allocation: ~1.5 ms per 8 MiB
    here); one per ``slot``, kept only up to 64 MiB. Never returned to a caller."""
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    buf = bufs.get(slot)
    if buf is not None and buf.shape == shape and buf.dtype == dtype:
        return buf
    buf = np.empty(shape, dtype=dtype)
    bufs[slot] = buf if buf.nbytes <= _WORKSPACE_MAX_BYTES else None
    return buf


def _dense_masked(a, W, mask, dt, transpose: bool, serial: bool):
    """BLAS on ``mask * W`` formed block by block (blocks of rows of W) in a bounded scratch
    buffer that BLAS then reads from cache: the forward ``a @ (mask*W).T`` fills the output's
    columns block by block (returned Fortran-ordered, like the CSR path); the transposed
    ``a @ (mask*W)`` sums the blocks' products (row blocks of W are its inner dimension;
    column blocks, read with a stride, were 1.3x slower). NumPy's ``W * mask`` allocates and
    writes a full matrix instead (N=4096 float64: 27 ms against 9 ms for the masking)."""
    n_out, n_in = W.shape
    B = a.shape[0]
    Wc = np.ascontiguousarray(W)
    mc = np.ascontiguousarray(mask)
    ad = a if a.dtype == dt else a.astype(dt)
    rows = DENSE_BLOCK_ROWS_T if transpose else DENSE_BLOCK_ROWS
    step = max(1, min(n_out, rows, DENSE_BLOCK_BYTES // max(1, n_in * dt.itemsize)))
    if transpose:
        out = np.empty((B, n_in), dtype=dt)
        if n_out == 0 or B == 0:
            out[...] = 0
            return out
        tmp = None
        for r0 in range(0, n_out, step):
            r1 = min(n_out, r0 + step)
            buf = _workspace((r1 - r0, n_in), dt, "masked")
            _run(_mask_rows, serial)(Wc, mc, r0, buf)
            if r0 == 0:
                np.matmul(ad[:, r0:r1], buf, out=out)
            else:
                if tmp is None:
                    tmp = np.empty_like(out)
                np.matmul(ad[:, r0:r1], buf, out=tmp)
                out += tmp
        return out
    out = np.empty((B, n_out), dtype=dt, order="F")
    if B == 0 or n_out == 0:
        return out
    for r0 in range(0, n_out, step):
        r1 = min(n_out, r0 + step)
        buf = _workspace((r1 - r0, n_in), dt, "masked")
        _run(_mask_rows, serial)(Wc, mc, r0, buf)
        np.matmul(ad, buf.T, out=out[:, r0:r1])
    return out


# -------------------------------------------------------------------------------------------
# public kernels
# -------------------------------------------------------------------------------------------


def masked_matmul(x, W, mask=None, *, method: str = "auto", threads=None):
    """``x @ (mask * W).T`` (see :func:`refnet.kernels.masked_matmul`).

    method "dense": BLAS on ``mask * W``; "csr": the CSR kernel; "auto": CSR at or above
    ``MATMUL_CROSSOVER`` sparsity (``kernels/_tuning.py``), dense below. threads: None (Numba's
    thread count) or 1 (the serial kernels; any larger count means Numba's thread count).
    """
    return _masked_product(x, W, mask, method, threads, transpose=False)


def masked_matmul_t(g, W, mask=None, *, method: str = "auto", threads=None):
    """``g @ (mask * W)`` (see :func:`refnet.kernels.masked_matmul_t`; the crossover is
    ``MATMUL_T_CROSSOVER``; threads as in :func:`masked_matmul`)."""
    return _masked_product(g, W, mask, method, threads, transpose=True)


def _masked_product(a, W, mask, method, threads, transpose: bool):
    """``a @ (mask * W).T`` (forward) or ``a @ (mask * W)`` (``transpose``): the oracle for
    unmasked, non-float or small problems, else the blocked dense path or the CSR kernel (rows
    of W for the forward product; its CSC twin, values gathered in row order and stored in column
    order, for the transposed one). CSR results are Fortran-ordered."""
    _check_method(method)
    serial = _serial(threads)
    oracle = _np_engine.masked_matmul_t if transpose else _np_engine.masked_matmul
    dt = _float_dtype(a, W, mask)
    if mask is None or dt is None:
        return oracle(a, W, mask)
    crossover = MATMUL_T_CROSSOVER if transpose else MATMUL_CROSSOVER
    if method == "dense" or (method == "auto" and not _sparse_ok(W, mask, crossover, a.shape[0])):
        if W.size < MIN_SPARSE_SIZE:
            return oracle(a, W, mask)
        return _dense_masked(a, W, mask, dt, transpose, serial)
    s = mask_structure(mask)
    if not s.binary:
        raise ValueError("method='csr' needs a 0/1 (boolean) mask; use method='dense' for a weighted mask")
    n = W.shape[1] if transpose else W.shape[0]  # output columns
    B = a.shape[0]
    outT = np.empty((n, B), dtype=dt)  # (n, B)
    if B == 0 or n == 0:
        return outT.T
    if s.nnz == 0:
        outT[...] = 0
        return outT.T
    Wc = np.ascontiguousarray(W, dtype=dt)
    aT = _transposed_rows(a, dt, serial)  # (n_in, B) forward, (n_out, B) transposed
    if transpose:
        cptr, cidx, _, iperm = s.csc()
        vals = _workspace((s.nnz,), dt, "vals")
        _run(_gather_to, serial)(Wc, s.indptr, s.indices, iperm, vals)  # read in row order, stored in column order
        _run(_spmm, serial)(vals, cptr, cidx, aT, outT)
    elif s.density > GATHER_DENSITY:
        _run(_spmm_fused, serial)(Wc, s.indptr, s.indices, aT, outT)
    else:
        vals = _workspace((s.nnz,), dt, "vals")
        _run(_gather, serial)(Wc, s.indptr, s.indices, vals)
        _run(_spmm, serial)(vals, s.indptr, s.indices, aT, outT)
    return outT.T  # (B, n), Fortran-ordered


def isometry_step(V, mask, lr: float, squared: bool = False, *, method: str = "auto", threads=None):
    """One approximate-isometry step (see :func:`refnet.kernels.numpy_engine.isometry_step`);
    "csr"/"auto" at or above ``ISOMETRY_CROSSOVER`` sparsity: the sparse kernels (threads as
    in :func:`masked_matmul`)."""
    _check_method(method)
    serial = _serial(threads)
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
            _run(_gather, serial)(Vc, s.indptr, s.indices, vals)
        u = (vals, s.indptr, s.indices, cptr, cidx, perm)
    else:  # U = V^T: rows of U are columns of V; the CSR <-> CSC roles swap
        if s.nnz:
            _run(_gather_to, serial)(Vc, s.indptr, s.indices, iperm, vals)  # V's values in column order
        u = (vals, cptr, cidx, s.indptr, s.indices, iperm)
    n = min(n_out, n_in)
    A = _workspace((n, n), dt)  # the Gram residual, internal to this call
    res = float(np.sqrt(_run(_gram_minus_identity, serial)(*u, A))) if n else 0.0
    scale = 4.0 if squared else (2.0 / res if res > 0 else 0.0)
    out = Vc.copy()
    if s.nnz == 0 or scale == 0.0:
        return out, res
    g_u = np.empty(s.nnz, dtype=dt)
    tile = max(8, (1 << 20) // max(1, n * dt.itemsize))  # rows of A per tile: ~1 MiB
    chunks = 1 if serial else max(1, min(numba.get_num_threads(), u[1].shape[0] - 1))
    _run(_masked_grad, serial)(u[0], u[1], u[2], A, g_u, tile, chunks)
    if tall:
        g = g_u
    else:  # back to V's row order
        g = np.empty_like(g_u)
        _run(_permute, serial)(g_u, iperm, g)
    _run(_update, serial)(out, s.indptr, s.indices, g, dt.type(lr * scale))
    return out, res


@njit(cache=True)
def _radix_bucket(bits, shift, k, inf):  # pragma: no cover - compiled
    """One pass of a most-significant-digit radix select on the bit patterns of non-negative
    floats (ordered like the values): the 16-bit digit ``bits >> shift`` that holds the k-th
    largest, the entries with that digit, and the rank of the k-th largest among them. Returns
    an empty candidate array and -1 when an entry's bits exceed those of +inf (``inf``): a NaN,
    or anything with the sign bit set (negatives and -0.0)."""
    hist = np.zeros(65536, dtype=np.int64)
    for i in range(bits.shape[0]):
        v = bits[i]
        if v > inf:
            return np.empty(0, dtype=bits.dtype), -1
        hist[np.intp((v >> np.uint32(shift)) & 0xFFFF)] += 1
    need = k
    d = 65535
    while hist[d] < need:
        need -= hist[d]
        d -= 1
    cand = np.empty(hist[d], dtype=bits.dtype)
    j = 0
    for i in range(bits.shape[0]):
        v = bits[i]
        if np.intp((v >> np.uint32(shift)) & 0xFFFF) == d:
            cand[j] = v
            j += 1
    return cand, need


def kth_largest(s, k: int):
    """The ``k``-th largest entry of a 1-D float array (see
    :func:`refnet.kernels.numpy_engine.kth_largest`): for non-negative, non-NaN float32/float64
    data (SNIP, magnitude and SynFlow scores) a radix select on the bit patterns, whose order is
    the values' order: one histogram pass over the top 16 bits, then ``np.partition`` of the
    entries that share the winning digit (129,400 SNIP scores: 0.2 ms against 1.0 ms). Other
    data, and candidates that stay many, go to the oracle."""
    s = np.asarray(s)
    if s.ndim != 1 or s.dtype not in _FLOATS or s.size < 2:
        return _np_engine.kth_largest(s, k)
    if s.dtype.itemsize == 8:
        bits, inf = np.ascontiguousarray(s).view(np.uint64), np.uint64(0x7FF << 52)
    else:
        bits, inf = np.ascontiguousarray(s).view(np.uint32), np.uint32(0xFF << 23)
    cand, need = _radix_bucket(bits, bits.dtype.itemsize * 8 - 16, k, inf)
    if need < 0:  # negative or NaN entries: the oracle's ordering rules
        return _np_engine.kth_largest(s, k)
    i = cand.size - need
    return np.partition(cand, i)[i : i + 1].view(s.dtype)[0]


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


def _pooled(A, full_matrices=None):
    """The pool's share of :func:`batched_svdvals` (``full_matrices`` None) and :func:`batched_svd`:
    None where the oracle should run (no pool, small or odd input), else the results."""
    from ._tuning import SVD_MIN_SIDE, SVD_MIN_STACK

    batch, (m, n) = A.shape[:-2], A.shape[-2:]
    count = math.prod(batch)
    workers = min(_workers(), count)
    dt = _svd_dtype(A.dtype) if full_matrices is None else (A.dtype if A.dtype in _FLOATS else None)
    if (A.size == 0 or dt is None or workers < 2 or count < SVD_MIN_STACK or min(m, n) < SVD_MIN_SIDE
            or not _threads.blas_pinnable()):
        return None
    flat = A.reshape((count, m, n))
    k = min(m, n)
    if full_matrices is None:
        outs = (np.empty((count, k), dtype=dt),)
    else:
        mu, nv = (m, n) if full_matrices else (k, k)
        outs = (np.empty((count, m, mu), dtype=dt), np.empty((count, k), dtype=dt), np.empty((count, nv, n), dtype=dt))

    def work(lo, hi):
        if full_matrices is None:
            outs[0][lo:hi] = _svdvals_block(flat[lo:hi])
        else:
            for out, part in zip(outs, np.linalg.svd(flat[lo:hi], full_matrices=full_matrices)):
                out[lo:hi] = part

    _chunked(work, count, workers)
    return tuple(o.reshape(batch + o.shape[1:]) for o in outs)


#: a side at least this many times the other is reduced by a QR of the stack first
SVD_REDUCE_RATIO = 2


def _svdvals_block(A):
    r"""Singular values of a float stack ``(c, m, n)``. A wide (``n >= 2m``) or tall (``m >= 2n``)
    stack is first reduced to the square ``R`` of ``A^T = Q R`` (``A = Q R``): ``A`` and ``R``
    have the same singular values (``Q`` has orthonormal columns) and Householder QR is
    backward stable, so the values keep gesdd's accuracy (checked against the oracle to
    1e-13 of the largest), while one batched QR and gesdd on ``k x k`` matrices cost half of
    gesdd on the full stack (1,000 Jacobians 10 x 784: 43 against 95 ms, one thread)."""
    m, n = A.shape[-2:]
    k = min(m, n)
    if k >= 1 and max(m, n) >= SVD_REDUCE_RATIO * k:
        A = np.linalg.qr(A.swapaxes(-1, -2) if n > m else A, mode="r")  # (c, k, k)
    return np.linalg.svd(A, compute_uv=False)


def batched_svdvals(A):
    """Singular values of a stack ``(..., m, n)``, descending: LAPACK gesdd per matrix (after a
    batched QR of a wide or tall stack, :func:`_svdvals_block`), the stack split over Numba's
    thread count in a pool of Python threads."""
    A = _np_engine.check_stack(np.asarray(A))
    out = _pooled(A)
    if out is not None:
        return out[0]
    if A.size == 0 or _svd_dtype(A.dtype) is None or A.ndim < 3:
        return _np_engine.batched_svdvals(A)
    flat = A.reshape((-1,) + A.shape[-2:])
    if flat.dtype.kind in "biu":
        flat = flat.astype(np.float64)  # what np.linalg.svd computes them in
    return _svdvals_block(flat).reshape(A.shape[:-2] + (min(A.shape[-2:]),))


def batched_svd(A, full_matrices: bool = False):
    """``(U, S, Vh)`` of every matrix of a stack (see :func:`refnet.kernels.numpy_engine.batched_svd`):
    LAPACK gesdd per matrix on chunks of the stack, one chunk per thread, as
    :func:`batched_svdvals`; float32/float64 input (other dtypes: the oracle)."""
    A = _np_engine.check_stack(np.asarray(A))
    out = _pooled(A, bool(full_matrices))
    return _np_engine.batched_svd(A, full_matrices) if out is None else out


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
