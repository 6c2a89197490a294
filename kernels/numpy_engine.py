r"""The NumPy engine: the oracle every other engine is tested against.

Every function here is the plain formula on NumPy/BLAS/LAPACK. Two functions also have a SciPy
sparse path (``method="csr"``), kept as the "what SciPy gives you" alternative that the
benchmarks compare against; the default (``"auto"``) is always the dense oracle.

Shapes (batches are rows, weights are ``(n_out, n_in)``, as everywhere in refnet):

``masked_matmul(x, W, mask)``      ``x (B, n_in)`` -> ``x @ (mask * W).T``, ``(B, n_out)``
``masked_matmul_t(g, W, mask)``    ``g (B, n_out)`` -> ``g @ (mask * W)``, ``(B, n_in)``
``batched_matmul(A, B)``           ``np.matmul`` on stacks ``(..., m, k) @ (..., k, n)``
``batched_matmul_chain(mats)``     ``mats[-1] @ ... @ mats[0]`` (later factors on the left)
``batched_svdvals(A)``             ``(..., m, n)`` -> ``(..., min(m, n))``, descending
``batched_svd(A, full_matrices)``  ``(..., m, n)`` -> ``(U, S, Vh)``, ``A = U diag(S) Vh``
``isometry_step(V, mask, lr)``     one approximate-isometry gradient step, see below
``kth_largest(s, k)``              the ``k``-th largest entry of a 1-D array (``np.partition``)
"""

from __future__ import annotations

import numpy as np

from ._structure import mask_structure

#: the kernels every engine provides, with the same signatures (plus engine-specific keywords)
ENGINE_KERNELS = (
    "masked_matmul",
    "masked_matmul_t",
    "batched_matmul",
    "batched_matmul_chain",
    "batched_svdvals",
    "batched_svd",
    "isometry_step",
    "kth_largest",
)

__all__ = [*ENGINE_KERNELS, "isometry_residual"]

METHODS = ("auto", "dense", "csr")


def check_method(method):
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _effective(W: np.ndarray, mask) -> np.ndarray:
    return W if mask is None else W * mask


def _result_dtype(W, mask):
    """dtype of ``mask * W`` (a boolean mask does not promote)."""
    return W.dtype if mask.dtype == np.bool_ else np.result_type(W.dtype, mask.dtype)


def _binary_structure(mask):
    s = mask_structure(mask)
    if not s.binary:
        raise ValueError("method='csr' needs a 0/1 (boolean) mask; use method='dense' for a weighted mask")
    return s


def _scipy_csr(W, mask):
    """The effective weight as a SciPy CSR matrix: cached structure, values gathered from W."""
    from scipy import sparse

    s = _binary_structure(mask)
    W = np.asarray(W)
    data = W[s.rows, s.indices].astype(_result_dtype(W, mask), copy=False)  # (nnz,) O(nnz) gather
    return sparse.csr_matrix((data, s.indices, s.indptr), shape=s.shape)


def masked_matmul(x: np.ndarray, W: np.ndarray, mask=None, *, method: str = "auto") -> np.ndarray:
    """``x @ (mask * W).T``; ``x`` is ``(B, n_in)``, ``W`` and ``mask`` ``(n_out, n_in)``.

    ``method="csr"`` computes the same product with a SciPy CSR matrix of the effective weight.
    """
    check_method(method)
    if method == "csr" and mask is not None:
        return np.asarray((_scipy_csr(W, mask) @ x.T).T)  # (B, n_out)
    return x @ _effective(W, mask).T  # (B, n_out)


def masked_matmul_t(g: np.ndarray, W: np.ndarray, mask=None, *, method: str = "auto") -> np.ndarray:
    """``g @ (mask * W)``; ``g`` is ``(B, n_out)``, result ``(B, n_in)``."""
    check_method(method)
    if method == "csr" and mask is not None:
        return np.asarray((_scipy_csr(W, mask).T @ g.T).T)  # (B, n_in)
    return g @ _effective(W, mask)  # (B, n_in)


def batched_matmul(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``A @ B`` on stacks (NumPy broadcasting rules of ``np.matmul``)."""
    return np.matmul(A, B)


def batched_matmul_chain(mats) -> np.ndarray:
    """``mats[-1] @ ... @ mats[1] @ mats[0]``: a Jacobian chain ``J^{k,l}`` from the layer
    Jacobians ``[J^{k,k+1}, ..., J^{l-1,l}]``, each a stack ``(B, N_{i+1}, N_i)``."""
    mats = list(mats)
    if not mats:
        raise ValueError("mats must hold at least one matrix stack")
    P = np.asarray(mats[0])
    for J in mats[1:]:
        P = np.matmul(J, P)  # later layers on the left
    return P


def check_stack(A):
    """``A`` itself (a NumPy or CuPy array) when it is a stack of matrices ``(..., m, n)``."""
    if A.ndim < 2:
        raise ValueError(f"A must have at least 2 dimensions, got shape {A.shape}")
    return A


def batched_svdvals(A: np.ndarray) -> np.ndarray:
    """Singular values of every matrix of a stack ``(..., m, n)``, descending (LAPACK gesdd)."""
    A = check_stack(np.asarray(A))
    if A.size == 0:
        dt = A.dtype if A.dtype.kind in "fc" else np.float64
        return np.zeros(A.shape[:-2] + (min(A.shape[-2:]),), dtype=np.finfo(dt).dtype)
    return np.linalg.svd(A, compute_uv=False)


def batched_svd(A: np.ndarray, full_matrices: bool = False) -> tuple:
    """Singular value decomposition of every matrix of a stack ``(..., m, n)`` (LAPACK gesdd):
    ``(U, S, Vh)`` with ``A[i] = U[i] @ diag(S[i]) @ Vh[i]``, ``S`` descending, ``U``
    ``(..., m, k)`` and ``Vh`` ``(..., k, n)``, ``k = min(m, n)`` (``full_matrices``: ``U``
    ``(..., m, m)``, ``Vh`` ``(..., n, n)``). Each singular vector is determined up to its sign
    (and within a repeated singular value up to a rotation)."""
    A = check_stack(np.asarray(A))
    U, S, Vh = np.linalg.svd(A, full_matrices=full_matrices)
    return U, S, Vh


def isometry_residual(V: np.ndarray, mask=None) -> float:
    """``||A||_F`` with ``A`` the Gram residual of ``mask * V`` on its smaller side."""
    U = _effective(V, mask)
    G = U.T @ U if U.shape[0] >= U.shape[1] else U @ U.T
    return float(np.linalg.norm(G - np.eye(G.shape[0], dtype=G.dtype)))


def isometry_step(V: np.ndarray, mask, lr: float, squared: bool = False, *, method: str = "auto"):
    r"""One approximate-isometry gradient step on the kept entries of ``V``.

    With ``U = mask * V`` of shape ``(n_out, n_in)`` and the Gram residual on the smaller side,

    .. math::
        A = U^\top U - I \;(n_{out} \ge n_{in}), \qquad A = U U^\top - I \;(n_{out} < n_{in}),

    the loss is ``||A||_F`` (or ``||A||_F^2`` when ``squared``) and its gradient is

    .. math::
        \nabla = \frac{2\,U A}{\|A\|_F} \;\text{or}\; 4\,U A \quad(\text{tall}),\qquad
        \nabla = \frac{2\,A U}{\|A\|_F} \;\text{or}\; 4\,A U \quad(\text{wide}),

    taken times the mask (pruned entries get exactly zero gradient; a zero residual gives a zero
    gradient). Returns ``(V - lr * mask * grad, ||A||_F)``: the new weight (a new array; pruned
    entries keep their values) and the residual *before* the step.

    Parameters
    ----------
    V : ndarray (n_out, n_in)
    mask : ndarray (n_out, n_in) or None (no pruning)
    lr : float
    squared : bool
    method : {"auto", "dense", "csr"}
        "auto"/"dense": dense BLAS (the oracle); "csr": SciPy sparse products (``U^T U`` as a
        sparse-sparse product, then ``U A`` sparse-dense, read at the mask's entries).
    """
    check_method(method)
    V = np.asarray(V)
    if method == "csr" and mask is not None:
        return _isometry_step_scipy(V, mask, lr, squared)
    U = _effective(V, mask)  # (n_out, n_in)
    tall = U.shape[0] >= U.shape[1]
    G = U.T @ U if tall else U @ U.T  # (n, n), n = min(n_out, n_in)
    A = G - np.eye(G.shape[0], dtype=G.dtype)
    res = float(np.linalg.norm(A))
    if squared:
        scale = 4.0
    else:
        scale = 2.0 / res if res > 0 else 0.0
    grad = scale * (U @ A if tall else A @ U)  # (n_out, n_in)
    if mask is not None:
        grad = mask * grad
    return V - lr * grad, res


def _isometry_step_scipy(V, mask, lr, squared):
    from scipy import sparse

    s = _binary_structure(mask)
    dt = _result_dtype(V, mask)
    vals = V[s.rows, s.indices].astype(dt, copy=False)  # (nnz,)
    U = sparse.csr_matrix((vals, s.indices, s.indptr), shape=s.shape)
    tall = U.shape[0] >= U.shape[1]
    Ut = U.T.tocsr()
    A = (Ut @ U if tall else U @ Ut).toarray()  # sparse-sparse, dense result (n, n)
    A[np.diag_indices_from(A)] -= 1
    res = float(np.linalg.norm(A))
    scale = 4.0 if squared else (2.0 / res if res > 0 else 0.0)
    P = U @ A if tall else (Ut @ A).T  # (n_out, n_in) dense; A symmetric so (A U) = (U^T A)^T
    out = V.astype(dt, copy=True)
    out[s.rows, s.indices] -= lr * scale * np.asarray(P)[s.rows, s.indices]
    return out, res


def kth_largest(s: np.ndarray, k: int):
    """The ``k``-th largest entry of the 1-D array ``s`` (``1 <= k <= s.size``; NaN counts as
    the largest, as in ``np.partition``)."""
    s = np.asarray(s)
    return np.partition(s, s.size - k)[s.size - k]
