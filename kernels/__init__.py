"""refnet.kernels: the small kernel API behind refnet's hot paths.

Installed as ``refnet.kernels`` (the folder is ``kernels/`` in the repository). The NumPy engine
in :mod:`refnet.kernels.numpy_engine` is the oracle and is always present; accelerated engines
(Numba on CPU, CuPy on GPU) implement the same functions and are tested against it.

Functions (batches are rows, weights are ``(n_out, n_in)`` as everywhere in refnet):

``masked_matmul(x, W, mask)``
    ``x @ (mask * W).T``: the pre-activation of a masked dense layer, ``(B, n_out)``.
``masked_matmul_t(g, W, mask)``
    ``g @ (mask * W)``: the input gradient of a masked dense layer, ``(B, n_in)``.
``batched_svdvals(A)``
    Singular values of a stack ``(..., m, n)``, in descending order.
"""

from .numpy_engine import batched_svdvals, masked_matmul, masked_matmul_t

__all__ = ["masked_matmul", "masked_matmul_t", "batched_svdvals"]
