r"""The CuPy engine (GPU): cuBLAS for dense products, cuSPARSE through ``cupyx.scipy.sparse``
for CSR products, cuSOLVER for stacked singular values.

Imported only when chosen (``engine="cupy"``, ``set_engine("cupy")``, ``REFNET_ENGINE=cupy``) or
when the data already are CuPy arrays; install with ``pip install refnet[gpu]``. NumPy inputs
are copied to the device and the results copied back (NumPy in, NumPy out); CuPy inputs stay
on the device. Draw random data on the host and move it, so every engine sees the same numbers.

Not measured on a GPU yet, so ``method="auto"`` means the dense cuBLAS path here; the CSR path
(``method="csr"``) is there for very sparse masks and is tested against the oracle on the GPU.
The mask's CSR structure (``indptr``, ``indices``, the row of every entry) is built once per
mask object and kept on the device; the values are gathered from ``W`` on every call (O(nnz)).
"""

from __future__ import annotations

import numpy as np

try:
    import cupy as cp
    import cupyx.scipy.sparse as cpsparse
except ImportError as exc:  # pragma: no cover - exercised only without CuPy
    raise ImportError(f"the 'cupy' engine needs CuPy, which could not be imported ({exc}): pip install refnet[gpu]") from exc

from ._structure import cached
from .numpy_engine import ENGINE_KERNELS, check_method, check_stack  # one kernel list, one list of methods, one stack check

__all__ = list(ENGINE_KERNELS)


def _on_host(*arrays) -> bool:
    """True when no argument is a CuPy array (results then go back to the host)."""
    return not any(isinstance(a, cp.ndarray) for a in arrays if a is not None)


def _dev(a):
    return None if a is None else cp.asarray(a)


def _back(out, host: bool):
    return cp.asnumpy(out) if host else out


def _structure(mask):
    """Device CSR structure of ``mask != 0``: (indptr int32 (n_out+1,), indices int32 (nnz,),
    rows int32 (nnz,), shape, binary)."""

    def build(m):
        md = cp.asarray(m)
        rows, cols = cp.nonzero(md)  # row-major: rows ascending, columns ascending per row
        n_out = md.shape[0]
        indptr = cp.zeros(n_out + 1, dtype=cp.int32)
        indptr[1:] = cp.cumsum(cp.bincount(rows, minlength=n_out))
        binary = bool(md.dtype == cp.bool_ or cp.all((md == 0) | (md == 1)))
        return indptr, cols.astype(cp.int32), rows.astype(cp.int32), md.shape, binary

    count = cp.count_nonzero if isinstance(mask, cp.ndarray) else np.count_nonzero
    return cached(mask, "cupy_csr", build, count_nonzero=lambda m: int(count(m)))


def _csr(W, mask):
    """The effective weight ``mask * W`` as a cupyx CSR matrix (values gathered from W)."""
    indptr, indices, rows, shape, binary = _structure(mask)
    if not binary:
        raise ValueError("method='csr' needs a 0/1 (boolean) mask; use method='dense' for a weighted mask")
    vals = W[rows, indices]  # (nnz,)
    return cpsparse.csr_matrix((vals, indices, indptr), shape=shape), rows, indices


def masked_matmul(x, W, mask=None, *, method: str = "auto"):
    """``x @ (mask * W).T`` on the GPU: cuBLAS (dense) or cuSPARSE SpMM (csr)."""
    return _masked_product(x, W, mask, method, transpose=False)


def masked_matmul_t(g, W, mask=None, *, method: str = "auto"):
    """``g @ (mask * W)`` on the GPU."""
    return _masked_product(g, W, mask, method, transpose=True)


def _masked_product(a, W, mask, method, transpose: bool):
    """``a @ (mask * W).T`` (forward, (B, n_out)) or ``a @ (mask * W)`` (``transpose``, (B, n_in))."""
    check_method(method)
    host = _on_host(a, W, mask)
    a, W = _dev(a), _dev(W)
    if mask is None or method in ("auto", "dense"):
        We = W if mask is None else W * _dev(mask)
        return _back(a @ (We if transpose else We.T), host)
    S, _, _ = _csr(W, mask)
    return _back(((S.T if transpose else S) @ a.T).T, host)


def batched_matmul(A, B):
    host = _on_host(A, B)
    return _back(cp.matmul(_dev(A), _dev(B)), host)


def batched_matmul_chain(mats):
    mats = list(mats)
    if not mats:
        raise ValueError("mats must hold at least one matrix stack")
    host = _on_host(*mats)
    P = _dev(mats[0])
    for J in mats[1:]:
        P = cp.matmul(_dev(J), P)
    return _back(P, host)


def _stacked_svd(A, **kw):
    """``cupy.linalg.svd(A, **kw)`` on a stack, or one call per matrix where this CuPy does not
    take stacks: the values (``compute_uv=False``) or ``(U, S, Vh)``."""
    try:
        return cp.linalg.svd(A, **kw)
    except (ValueError, NotImplementedError, cp.linalg.LinAlgError):
        if A.ndim == 2:
            raise
    each = [cp.linalg.svd(a, **kw) for a in A.reshape((-1,) + A.shape[-2:])]
    if kw.get("compute_uv", True) is False:
        return cp.stack(each).reshape(A.shape[:-2] + each[0].shape)
    return tuple(cp.stack([e[j] for e in each]).reshape(A.shape[:-2] + each[0][j].shape) for j in range(3))


def batched_svdvals(A):
    """Singular values of a stack ``(..., m, n)``, descending: ``cupy.linalg.svd`` on the whole
    stack (cuSOLVER; batched gesvdj for small matrices), one call per matrix on CuPy versions
    without stacked SVD."""
    host = _on_host(A)
    A = check_stack(_dev(A))
    k = min(A.shape[-2:])
    if A.size == 0:
        dt = np.finfo(A.dtype if A.dtype.kind in "fc" else np.float64).dtype
        return _back(cp.zeros(A.shape[:-2] + (k,), dtype=dt), host)
    return _back(_stacked_svd(A, compute_uv=False), host)


def batched_svd(A, full_matrices: bool = False):
    """``(U, S, Vh)`` of every matrix of a stack (``cupy.linalg.svd``: cuSOLVER; one call per
    matrix on CuPy versions without stacked SVD). Empty stacks: NumPy's answer, on the device."""
    host = _on_host(A)
    A = check_stack(_dev(A))
    if A.size == 0:
        return tuple(_back(_dev(part), host) for part in np.linalg.svd(cp.asnumpy(A), full_matrices=full_matrices))
    return tuple(_back(part, host) for part in _stacked_svd(A, full_matrices=full_matrices))


def isometry_step(V, mask, lr: float, squared: bool = False, *, method: str = "auto"):
    """One approximate-isometry step (formulas in :func:`refnet.kernels.numpy_engine.isometry_step`):
    dense cuBLAS, or with ``method="csr"`` a cuSPARSE Gram ``U^T U`` and the gradient read at
    the mask's entries of ``U A``."""
    check_method(method)
    host = _on_host(V, mask)
    V = _dev(V)
    tall = V.shape[0] >= V.shape[1]
    if mask is None or method in ("auto", "dense"):
        m = None if mask is None else _dev(mask)
        U = V if m is None else V * m
        G = U.T @ U if tall else U @ U.T
        A = G - cp.eye(G.shape[0], dtype=G.dtype)
        res = float(cp.linalg.norm(A))
        scale = 4.0 if squared else (2.0 / res if res > 0 else 0.0)
        grad = scale * (U @ A if tall else A @ U)
        if m is not None:
            grad = m * grad
        return _back(V - lr * grad, host), res
    S, rows, cols = _csr(V, mask)
    St = S.T.tocsr()
    A = (St @ S if tall else S @ St).toarray()  # (n, n) dense
    A[cp.arange(A.shape[0]), cp.arange(A.shape[0])] -= 1
    res = float(cp.linalg.norm(A))
    scale = 4.0 if squared else (2.0 / res if res > 0 else 0.0)
    P = S @ A if tall else (St @ A).T  # (n_out, n_in); A symmetric so A U = (U^T A)^T
    out = V.copy()
    out[rows, cols] -= lr * scale * P[rows, cols]
    return _back(out, host), res


def kth_largest(s, k: int):
    """The ``k``-th largest entry of a 1-D array (``cupy.partition``; a host scalar for NumPy
    input, a 0-d device array for CuPy input)."""
    host = _on_host(s)
    sd = _dev(s)
    out = cp.partition(sd, sd.size - k)[sd.size - k]
    return out.get()[()] if host else out
