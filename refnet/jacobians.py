r"""Exact Jacobians of a network, per example (PAPER.md section 1).

The module is ``refnet.jacobians``; its main function is also ``refnet.jacobian``.

For a network with layers ``x^l = f_l(x^{l-1})`` the layer Jacobian is ``J^{l-1,l} = dx^l/dx^{l-1}``
(``= D^l W^l`` for an affine layer), and for ``0 <= k < l <= K``

.. math:: J^{k,l} = \frac{\partial x^l}{\partial x^k} = J^{l-1,l} J^{l-2,l-1} \cdots J^{k,k+1},

the product with later layers on the left; ``J^{0,K}`` is the input-output Jacobian. Inputs and
outputs of convolutional layers are flattened in NCHW order, so every Jacobian is a matrix
``(B, N_l, N_k)``.

Accumulation order. ``J^{k,l}`` is never formed by multiplying explicit layer Jacobians. It is
accumulated as a stack of vector products through the layers' own maps: in reverse mode the
``N_l`` unit cotangents ``e_i^T`` are pulled back through the layers (``N_l`` VJPs per example), in
forward mode the ``N_k`` unit tangents are pushed forward (``N_k`` JVPs). :func:`jacobian` picks
the side with fewer vectors, so the ``10 x 784`` Jacobian of an MNIST classifier costs 10
backward passes, not 784. Each layer does its part through its own multi-vector products
(:meth:`refnet.layers.Layer.vjp_many` / :meth:`~refnet.layers.Layer.jvp_many`): for a dense
layer a batch of ``m`` vectors per example is one matrix product with the shared weight,
``(G * D) W`` (reverse) or ``(V W^T) * D`` (forward), and a range of Dense layers is one chain
of such products from their factors ``W`` and ``D`` (:meth:`refnet.layers.Dense.jacobian_factors`).

:func:`jacobian_svd` decomposes every example's Jacobian, ``J = U diag(s) V^T``: the rows of ``V^T``
are the input directions in order of how much the network stretches them, ``J v_i = s_i u_i``.

For nets too large for dense Jacobians, :func:`jacobian_operator` gives a matrix-free
``scipy.sparse.linalg.LinearOperator`` for one example, and :func:`extreme_singular_values` finds
the largest and smallest singular values through it (ARPACK ``svds`` or LOBPCG).
"""

from __future__ import annotations

from math import prod

import numpy as np
from scipy.sparse import linalg as spla

from . import kernels
from ._checks import check_choice, check_int
from .layers import Dense
from .network import check_net

__all__ = [
    "DEFAULT_MAX_ELEMENTS",
    "check_range",
    "layer_jacobians",
    "jacobian",
    "jacobian_svd",
    "jvp",
    "vjp",
    "jacobian_operator",
    "extreme_singular_values",
]

#: default budget for one dense Jacobian array (elements): 2**27 float64 = 1 GiB
DEFAULT_MAX_ELEMENTS = 2**27


def check_range(net, start, end) -> tuple[int, int]:
    """``(start, end)`` checked as a range of layers of ``net``: ``0 <= start < end <= K`` (``end``
    None means K); ValueError naming both otherwise."""
    K = net.n_layers
    start = check_int(start, "start", min_value=0)
    end = K if end is None else check_int(end, "end", min_value=0)
    if not start < end <= K:
        raise ValueError(f"start and end must satisfy 0 <= start < end <= {K} (the number of layers), got start={start}, end={end}")
    return start, end


# the names these checks had before they were public (refnet.spectrum still imports them)
_check_net = check_net
_check_range = check_range


def _budget(n_elements: int, max_elements, what: str) -> None:
    limit = DEFAULT_MAX_ELEMENTS if max_elements is None else check_int(max_elements, "max_elements", min_value=1)
    if n_elements > limit:
        raise ValueError(
            f"{what} needs {n_elements:,} elements, above max_elements={limit:,}; raise max_elements, "
            "use fewer examples per call, or use the matrix-free route: refnet.jacobians.jvp / vjp, "
            "jacobian_operator and extreme_singular_values"
        )


# -------------------------------------------------------------------------------------------
# multi-vector products through a range of layers; vectors are rows: G, V are (B, m, n)
# (flattened), and each layer's own Layer.vjp_many / Layer.jvp_many does one layer
# -------------------------------------------------------------------------------------------


def _trace(net, x, trace):
    if trace is not None:
        return trace
    return net.forward(x, return_trace=True)[1]


def pullback(net, trace, G, start: int, end: int) -> np.ndarray:
    """Pull a stack of cotangents ``G`` (B, m, N_end) back to ``x^start``: ``G J^{start,end}``."""
    for l in range(end - 1, start - 1, -1):
        G = net.layers[l].vjp_many(net.params[l], trace.caches[l], G, net.masks[l], net.shapes[l], net.shapes[l + 1])
    return G


def pushforward(net, trace, V, start: int, end: int) -> np.ndarray:
    """Push a stack of tangents ``V`` (B, m, N_start) forward to ``x^end``: rows of ``(J^{start,end} V^T)^T``."""
    for l in range(start, end):
        V = net.layers[l].jvp_many(net.params[l], trace.caches[l], V, net.masks[l], net.shapes[l], net.shapes[l + 1])
    return V


# -------------------------------------------------------------------------------------------
# public API
# -------------------------------------------------------------------------------------------


def layer_jacobians(net, x, *, trace=None, max_elements=None) -> list[np.ndarray]:
    """Every layer Jacobian ``J^{l-1,l}`` of every example, as dense arrays.

    Parameters
    ----------
    net : Network
    x : ndarray, shape (B, *net.in_shape)
    trace : Trace, optional
        A trace of ``x`` from ``net.forward(x, return_trace=True)``, to save the forward pass.
    max_elements : int, optional
        Budget per Jacobian array (default :data:`DEFAULT_MAX_ELEMENTS`).

    Returns
    -------
    list of ndarray
        Entry ``l-1`` is ``J^{l-1,l}`` with shape ``(B, N_l, N_{l-1})``; ``D^l W^l`` for a Dense
        layer (:meth:`refnet.layers.Dense.jacobian`), ``D^l M^l`` with ``M^l`` the convolution's
        operator matrix for a Conv2d layer, the identity for Flatten.
    """
    check_net(net)
    trace = _trace(net, x, trace)
    B = trace.x.shape[0]
    out = []
    for l, layer in enumerate(net.layers):
        n = B * prod(net.shapes[l + 1]) * prod(net.shapes[l])
        _budget(n, max_elements, f"J^({l},{l + 1}) of {B} examples")
        out.append(layer.jacobian(net.params[l], trace.caches[l], net.masks[l]))
    return out


def jacobian(net, x, start: int = 0, end: int | None = None, *, mode: str = "auto", trace=None, max_elements=None) -> np.ndarray:
    """The Jacobian ``J^{start,end} = dx^end/dx^start`` of every example.

    Parameters
    ----------
    net : Network
    x : ndarray, shape (B, *net.in_shape)
    start, end : int
        ``0 <= start < end <= K``; ``x^0`` is the input, ``x^K`` the output (default end = K).
    mode : {"auto", "reverse", "forward"}
        Accumulation order; "auto" takes reverse mode when ``N_end <= N_start`` (fewer
        cotangents than tangents), forward mode otherwise. Both give the same matrix.
    trace : Trace, optional
    max_elements : int, optional
        Budget for the largest intermediate stack.

    Returns
    -------
    ndarray, shape (B, N_end, N_start)
    """
    check_net(net)
    start, end = check_range(net, start, end)
    mode = check_choice(mode, "mode", ["auto", "reverse", "forward"])
    trace = _trace(net, x, trace)
    B = trace.x.shape[0]
    n_in, n_out = prod(net.shapes[start]), prod(net.shapes[end])
    if mode == "auto":
        mode = "reverse" if n_out <= n_in else "forward"
    m = n_out if mode == "reverse" else n_in
    widest = max(prod(s) for s in net.shapes[start : end + 1])
    _budget(B * m * widest, max_elements, f"J^({start},{end}) of {B} examples in {mode} mode")
    dtype = trace.x.dtype
    dense = [l for l in range(start, end) if not net.layers[l].flat_identity]
    if dense and all(isinstance(net.layers[l], Dense) for l in dense):  # the one fast path by layer type
        return _dense_chain(net, trace, dense, mode)
    if mode == "reverse":
        G = np.broadcast_to(np.eye(n_out, dtype=dtype), (B, n_out, n_out))
        return pullback(net, trace, G, start, end)  # (B, N_end, N_start)
    V = np.broadcast_to(np.eye(n_in, dtype=dtype), (B, n_in, n_in))
    return pushforward(net, trace, V, start, end).transpose(0, 2, 1)  # (B, N_end, N_start)


def jacobian_svd(net, x, start: int = 0, end: int | None = None, *, full_matrices: bool = False, engine=None,
                 trace=None, max_elements=None) -> tuple:
    r"""The singular value decomposition of every example's Jacobian ``J^{start,end}``:

    .. math:: J_b = U_b \,\mathrm{diag}(s_b)\, V_b^\top, \qquad J_b v_{b,i} = s_{b,i}\, u_{b,i},

    with ``s`` descending: ``Vh[b, i]`` (the ``i``-th row of ``V_b^T``) is the input direction at
    ``x^start`` (flattened in NCHW order) that the network stretches by ``s[b, i]``, and
    ``U[b, :, i]`` the direction of ``x^end`` it is mapped to. A singular vector is determined
    up to its sign (and within a repeated singular value up to a rotation).

    Parameters
    ----------
    net, x, start, end, trace, max_elements
        As in :func:`jacobian`.
    full_matrices : bool
        Square ``U`` ``(B, N_end, N_end)`` and ``Vh`` ``(B, N_start, N_start)`` instead of the
        reduced ``(B, N_end, k)`` and ``(B, k, N_start)``, ``k = min(N_end, N_start)``.
    engine : str, optional
        Kernel engine of the decomposition (:func:`refnet.kernels.batched_svd`).

    Returns
    -------
    U, s, Vh : ndarrays ``(B, N_end, k)``, ``(B, k)``, ``(B, k, N_start)``
    """
    J = jacobian(net, x, start, end, trace=trace, max_elements=max_elements)
    return kernels.batched_svd(J, full_matrices=full_matrices, engine=engine)


def _dense_chain(net, trace, dense: list, mode: str) -> np.ndarray:
    r"""``J = D^{l_k} W^{l_k} \cdots D^{l_1} W^{l_1}`` of every example for a range of Dense
    layers (Flatten layers between them are identities), without multiplying by an identity:
    the first factor ``D W`` (reverse mode: the last layer's, forward mode: the first layer's)
    is a scaling of ``W``; every further layer is one GEMM of the whole stack, with the ``D``
    scaling applied in place and the previous stack's storage reused for the next product
    instead of a new array per layer (the K = 7 width-100 chain of 100 examples: 47 -> 34 ms on
    one thread). Same products as
    :func:`pullback` / :func:`pushforward`, in the same order, but one GEMM fewer."""
    B = trace.x.shape[0]
    # (mask * W (N_{l+1}, N_l), D (B, N_{l+1})) of net.layers[l], whose Jacobian J^{l,l+1} is D W
    factors = {l: net.layers[l].jacobian_factors(net.params[l], trace.caches[l], net.masks[l]) for l in dense}
    order = dense[::-1] if mode == "reverse" else dense
    W0, D0 = factors[order[0]]
    if mode == "reverse":  # rows of J^T... : G (B, m, N) with m = N_end
        J = D0[:, :, None] * W0[None, :, :]  # (B, N_out, N_in) = D W
    else:  # V (B, m, N) with m = N_start: (J V^T)^T rows, starts as W^T D
        J = W0.T[None, :, :] * D0[:, None, :]  # (B, N_in, N_out)
    m = J.shape[1]
    spare = None  # the storage of the stack before the last one, reused for the next product
    for l in order[1:]:
        W, D = factors[l]
        if mode == "reverse":  # G <- (G * D) @ W
            np.multiply(J, D[:, None, :], out=J)
            n_next = W.shape[1]
        else:  # V <- (V @ W^T) * D
            n_next = W.shape[0]
        size = B * m * n_next
        dt = np.result_type(J, W)
        if spare is None or spare.size < size or spare.dtype != dt:
            spare = np.empty(size, dtype=dt)
        out = spare[:size].reshape(B, m, n_next)
        np.matmul(J.reshape(B * m, -1), W if mode == "reverse" else W.T, out=out.reshape(B * m, n_next))
        if mode == "forward":
            np.multiply(out, D[:, None, :], out=out)
        spare, J = J.reshape(-1), out
    if J.base is not None and J.base.size > J.size:  # do not hand out a larger buffer's view
        J = J.copy()
    return J if mode == "reverse" else J.transpose(0, 2, 1)  # (B, N_end, N_start)


def _one_vector_product(net, x, vec, name: str, start, end, trace, forward: bool) -> np.ndarray:
    """The body of :func:`jvp` (``forward``: ``vec`` a tangent at ``x^start``, pushed forward) and
    :func:`vjp` (a cotangent at ``x^end``, pulled back): one vector per example, checked, then
    sent through the layers as a stack of one."""
    check_net(net)
    start, end = check_range(net, start, end)
    trace = _trace(net, x, trace)
    B = trace.x.shape[0]
    vec = np.asarray(vec, dtype=trace.x.dtype)
    shape = net.shapes[start if forward else end]
    if vec.shape[0] != B or vec[0].size != prod(shape):
        alt = f" or ({B}, *{shape})" if forward else ""
        raise ValueError(f"{name} must have shape ({B}, {prod(shape)}){alt}, got {vec.shape}")
    product = pushforward if forward else pullback
    return product(net, trace, vec.reshape(B, 1, -1), start, end)[:, 0]


def jvp(net, x, v, start: int = 0, end: int | None = None, *, trace=None) -> np.ndarray:
    """``J^{start,end} v`` for every example: ``v`` is (B, *shape of x^start), returns (B, N_end)."""
    return _one_vector_product(net, x, v, "v", start, end, trace, forward=True)


def vjp(net, x, u, start: int = 0, end: int | None = None, *, trace=None) -> np.ndarray:
    """``u^T J^{start,end}`` for every example: ``u`` is (B, N_end), returns (B, N_start)."""
    return _one_vector_product(net, x, u, "u", start, end, trace, forward=False)


def jacobian_operator(net, x, start: int = 0, end: int | None = None) -> spla.LinearOperator:
    """A matrix-free ``LinearOperator`` of shape ``(N_end, N_start)`` for ONE example.

    ``x`` is a single example ``(*net.in_shape)`` or a batch of one. ``matvec`` is a JVP and
    ``rmatvec`` a VJP through the layers; nothing of size ``N_end x N_start`` is formed.
    """
    check_net(net)
    start, end = check_range(net, start, end)
    x = np.asarray(x)
    if x.shape == tuple(net.in_shape):
        x = x[None]
    if x.shape[0] != 1:
        raise ValueError(f"x must be one example of shape {net.in_shape} or (1, *in_shape), got {x.shape}")
    _, trace = net.forward(x, return_trace=True)
    n_in, n_out = prod(net.shapes[start]), prod(net.shapes[end])
    dtype = trace.x.dtype

    def matvec(v):
        v = np.asarray(v, dtype=dtype).reshape(1, 1, n_in)
        return pushforward(net, trace, v, start, end).reshape(n_out)

    def rmatvec(u):
        u = np.asarray(u, dtype=dtype).reshape(1, 1, n_out)
        return pullback(net, trace, u, start, end).reshape(n_in)

    def matmat(V):
        V = np.asarray(V, dtype=dtype).reshape(n_in, -1)
        return pushforward(net, trace, V.T[None], start, end)[0].T

    def rmatmat(U):
        U = np.asarray(U, dtype=dtype).reshape(n_out, -1)
        return pullback(net, trace, U.T[None], start, end)[0].T

    return spla.LinearOperator((n_out, n_in), matvec=matvec, rmatvec=rmatvec, matmat=matmat, rmatmat=rmatmat, dtype=dtype)


def extreme_singular_values(net, x, k: int = 1, *, start: int = 0, end: int | None = None, method: str = "arpack", seed=0, tol: float = 0.0, maxiter: int | None = None) -> dict:
    """The ``k`` largest and ``k`` smallest singular values of ``J^{start,end}`` of one example,
    matrix-free (:func:`jacobian_operator`).

    Parameters
    ----------
    method : {"arpack", "lobpcg"}
        ``scipy.sparse.linalg.svds`` with that solver. The smallest singular values are the
        ``min(N_end, N_start)``-th ones (zeros of the rank-deficient side are not counted).
    seed : int
        Seeds the starting vector, so results are reproducible.
    tol, maxiter
        Passed to ``svds``. LOBPCG works on the Gram matrix, whose condition number is the
        square of J's, so its smallest values converge slowly: maxiter defaults to
        ``max(1000, 20 n)`` for it (ARPACK's own default otherwise). A solver that stops
        short of ``tol`` warns (scipy's warning is passed on, not hidden).

    Returns
    -------
    dict with "largest" (descending) and "smallest" (ascending) arrays of length ``k``.
    """
    method = check_choice(method, "method", ["arpack", "lobpcg"])
    k = check_int(k, "k", min_value=1)
    op = jacobian_operator(net, x, start, end)
    n = min(op.shape)
    if k >= n:
        raise ValueError(f"k must be < min(N_end, N_start) = {n} for the iterative solver, got {k}; use jacobian() and an SVD")
    rng = np.random.default_rng(seed)
    v0 = rng.standard_normal(n)
    if maxiter is None and method == "lobpcg":
        maxiter = max(1000, 20 * n)
    kw = dict(k=k, solver=method, v0=v0, tol=tol, maxiter=maxiter, return_singular_vectors=False, random_state=rng)
    large = spla.svds(op, which="LM", **kw)
    small = spla.svds(op, which="SM", **kw)
    return {"largest": np.sort(large)[::-1], "smallest": np.sort(small)}
