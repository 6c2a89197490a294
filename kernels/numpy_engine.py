"""The NumPy engine: the oracle every other engine is tested against."""

from __future__ import annotations

import numpy as np

__all__ = ["masked_matmul", "masked_matmul_t", "batched_svdvals"]


def _effective(W: np.ndarray, mask) -> np.ndarray:
    return W if mask is None else W * mask


def masked_matmul(x: np.ndarray, W: np.ndarray, mask=None) -> np.ndarray:
    """``x @ (mask * W).T``; ``x`` is ``(B, n_in)``, ``W`` and ``mask`` ``(n_out, n_in)``."""
    return x @ _effective(W, mask).T  # (B, n_out)


def masked_matmul_t(g: np.ndarray, W: np.ndarray, mask=None) -> np.ndarray:
    """``g @ (mask * W)``; ``g`` is ``(B, n_out)``, result ``(B, n_in)``."""
    return g @ _effective(W, mask)  # (B, n_in)


def batched_svdvals(A: np.ndarray) -> np.ndarray:
    """Singular values of every matrix of a stack ``(..., m, n)``, descending (LAPACK gesdd)."""
    A = np.asarray(A)
    if A.ndim < 2:
        raise ValueError(f"A must have at least 2 dimensions, got shape {A.shape}")
    if A.size == 0:
        return np.zeros(A.shape[:-2] + (min(A.shape[-2:]),), dtype=A.dtype)
    return np.linalg.svd(A, compute_uv=False)
