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

Residual connections (``net.inputs``, :mod:`refnet.layers.residual`). ``x^k`` and ``x^l`` are
nodes of the graph and ``J^{k,l} = dx^l/dx^k`` is the total derivative through every path from
node ``k`` to node ``l``, with the nodes that do not depend on ``x^k`` held fixed. Reverse mode
adds the cotangents of the layers that read a node, forward mode adds the tangents at an
:class:`~refnet.layers.Add`. Through a block ``x^a = phi(main(x^b) + shortcut(x^b))``

.. math:: J^{b,a} = D^a \big(J_{\mathrm{main}}^{b,a} + J_{\mathrm{shortcut}}^{b,a}\big),

with ``J_shortcut = I`` for the identity shortcut, the 0/1 selection matrix of
:class:`~refnet.layers.SubsamplePad` for "option A", and the Jacobian of its layers for a
projection; for a node ``k`` inside the main branch only the main path counts,
``J^{k,a} = D^a J_main^{k,a}``.

Batch normalization in train mode couples the examples: ``dx^l_b/dx^k_a`` is not zero for
``a != b``, so there is no per-example Jacobian. :func:`jacobian`, :func:`layer_jacobians`,
:func:`jacobian_svd` and :func:`jacobian_operator` refuse such a range (ValueError naming the layer
and its mode); :func:`batch_jacobian` gives the ``(B, N_l, B, N_k)`` Jacobian of the batch map,
and :func:`jvp` / :func:`vjp` are then the products of the batch map (one tangent or cotangent
for the whole batch).
"""

from __future__ import annotations

from math import prod

import numpy as np
from scipy.sparse import linalg as spla

from . import kernels
from ._checks import check_choice, check_int, check_memory
from .layers import Dense
from .network import check_net, couples_batch, n_inputs

__all__ = [
    "DEFAULT_MAX_ELEMENTS",
    "batch_jacobian",
    "check_per_example",
    "check_range",
    "element_budget",
    "layer_sizes",
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

#: elements of one chunk's stack in the Dense chain (:func:`_dense_chain`): 2**17 float64 = 1 MiB,
#: about what a core's L2 cache holds; four times that when the chunk's rows go through one GEMM
CHAIN_CHUNK_ELEMENTS = 2**17

#: stacked vectors per example from which the Dense chain multiplies example by example (a
#: GEMM of that many rows is efficient on its own); below it, one GEMM for a chunk's rows
CHAIN_PER_EXAMPLE_ROWS = 64

#: elements of the widest stack of one chunk of examples when :func:`jacobian` runs the layers'
#: own products without a given trace (a forward pass per chunk): 2**20 float64 = 8 MiB
STACK_CHUNK_ELEMENTS = 2**20


def check_range(net, start, end) -> tuple[int, int]:
    """``(start, end)`` checked as a range of layers of ``net``: ``0 <= start < end <= K`` (``end``
    None means K); ValueError naming both otherwise."""
    K = net.n_layers
    start = check_int(start, "start", min_value=0)
    end = K if end is None else check_int(end, "end", min_value=0)
    if not start < end <= K:
        raise ValueError(f"start and end must satisfy 0 <= start < end <= {K} (the number of layers), got start={start}, end={end}")
    return start, end


def check_per_example(net, start: int, end: int, what: str) -> None:
    """ValueError when a layer of ``start..end`` couples the examples (batch norm in train mode),
    naming ``what``, the layer and its mode: such a range has no per-example Jacobian."""
    for l in range(start, end):
        layer = net.layers[l]
        if couples_batch(layer):
            raise ValueError(
                f"{what} needs per-example maps, but layers[{l}] ({type(layer).__name__}) is in "
                f"mode={getattr(layer, 'mode', 'train')!r}: its batch statistics couple the examples, so an "
                "example's Jacobian is not defined. Use net.with_mode('eval') (running statistics) or "
                "refnet.jacobians.batch_jacobian (the Jacobian of the batch map)"
            )


def _chain_range(net, start: int, end: int) -> bool:
    """Whether layers ``start..end-1`` form a chain (each reads the node before it)."""
    return all(net.inputs[l] == (l,) for l in range(start, end))


# the names these checks had before they were public (refnet.spectrum still imports them)
_check_net = check_net
_check_range = check_range


def element_budget(max_elements) -> int:
    """The budget of one dense Jacobian array: ``max_elements`` checked, or :data:`DEFAULT_MAX_ELEMENTS`."""
    return DEFAULT_MAX_ELEMENTS if max_elements is None else check_int(max_elements, "max_elements", min_value=1)


def layer_sizes(net, l: int) -> tuple[int, int]:
    """``(N_l, N_{l-1})``: the output and input sizes of ``J^{l-1,l}`` of ``net.layers[l]`` (for an
    :class:`~refnet.layers.Add`, the size of one of its inputs)."""
    layer = net.layers[l]
    n_in = prod(net.in_shapes[l][0]) if n_inputs(layer) > 1 else prod(net.in_shapes[l])
    return prod(net.shapes[l + 1]), n_in


def _budget(n_elements: int, max_elements, what: str) -> None:
    limit = element_budget(max_elements)
    if n_elements > limit:
        raise ValueError(
            f"{what} needs {n_elements:,} elements, above max_elements={limit:,}; raise max_elements, "
            "use fewer examples per call, or use the matrix-free route: refnet.jacobians.jvp / vjp, "
            "jacobian_operator and extreme_singular_values"
        )
    check_memory(8 * n_elements, what)  # float64: refuse up front what cannot be allocated


# -------------------------------------------------------------------------------------------
# multi-vector products through a range of layers; vectors are rows: G, V are (B, m, n)
# (flattened), and each layer's own Layer.vjp_many / Layer.jvp_many does one layer
# -------------------------------------------------------------------------------------------


def _trace(net, x, trace):
    if trace is not None:
        return trace
    return net.forward(x, return_trace=True)[1]


def pullback(net, trace, G, start: int, end: int) -> np.ndarray:
    """Pull a stack of cotangents ``G`` (B, m, N_end) back to ``x^start``: ``G J^{start,end}``.

    On a graph the stack of every node in ``start..end`` is accumulated over the layers reading it;
    a node before ``start`` is held fixed (its stack is dropped)."""
    if _chain_range(net, start, end):
        for l in range(end - 1, start - 1, -1):
            G = net.layers[l].vjp_many(net.params[l], trace.caches[l], G, net.masks[l], net.shapes[l], net.shapes[l + 1])
        return G
    acc = {end: G}
    for l in range(end - 1, start - 1, -1):
        Gl = acc.pop(l + 1, None)
        if Gl is None:  # x^end does not depend on this node
            continue
        layer = net.layers[l]
        out = layer.vjp_many(net.params[l], trace.caches[l], Gl, net.masks[l], net.in_shapes[l], net.shapes[l + 1])
        for j, Gj in zip(net.inputs[l], out if n_inputs(layer) > 1 else (out,)):
            if j >= start:
                acc[j] = Gj if j not in acc else acc[j] + Gj
    if start not in acc:  # no path from x^start to x^end
        return np.zeros((G.shape[0], G.shape[1], prod(net.shapes[start])), dtype=G.dtype)
    return acc[start]


def pushforward(net, trace, V, start: int, end: int) -> np.ndarray:
    """Push a stack of tangents ``V`` (B, m, N_start) forward to ``x^end``: rows of ``(J^{start,end} V^T)^T``.

    On a graph a layer reading only nodes that do not depend on ``x^start`` has a zero tangent; an
    :class:`~refnet.layers.Add` sums the tangents it gets."""
    if _chain_range(net, start, end):
        for l in range(start, end):
            V = net.layers[l].jvp_many(net.params[l], trace.caches[l], V, net.masks[l], net.shapes[l], net.shapes[l + 1])
        return V
    tan = {start: V}
    for l in range(start, end):
        layer, ins = net.layers[l], net.inputs[l]
        if n_inputs(layer) > 1:
            vs = tuple(tan.get(j) if j >= start else None for j in ins)
            if all(v is None for v in vs):
                continue
        else:
            vs = tan.get(ins[0]) if ins[0] >= start else None
            if vs is None:
                continue
        tan[l + 1] = layer.jvp_many(net.params[l], trace.caches[l], vs, net.masks[l], net.in_shapes[l], net.shapes[l + 1])
    if end not in tan:  # no path from x^start to x^end
        return np.zeros((V.shape[0], V.shape[1], prod(net.shapes[end])), dtype=V.dtype)
    return tan[end]


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
        operator matrix for a Conv2d layer, the identity for Flatten. On a graph, entry ``l-1`` is
        the Jacobian of ``layers[l-1]`` with respect to the node it reads (an
        :class:`~refnet.layers.Add`: with respect to each of its inputs, the same ``D``).

    Raises
    ------
    ValueError
        A batch-normalization layer in train mode (no per-example Jacobian; see
        :func:`batch_jacobian`).
    """
    check_net(net)
    check_per_example(net, 0, net.n_layers, "layer_jacobians")
    trace = _trace(net, x, trace)
    B = trace.x.shape[0]
    out = []
    for l, layer in enumerate(net.layers):
        n_out, n_in = layer_sizes(net, l)
        _budget(B * n_out * n_in, max_elements, f"J^({l},{l + 1}) of {B} examples")
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
    check_per_example(net, start, end, "jacobian")
    n_in, n_out = prod(net.shapes[start]), prod(net.shapes[end])
    if mode == "auto":
        mode = "reverse" if n_out <= n_in else "forward"
    m = n_out if mode == "reverse" else n_in
    widest = max(prod(s) for s in net.shapes[start : end + 1])
    dense = [l for l in range(start, end) if not net.layers[l].flat_identity]
    chain = bool(dense) and all(isinstance(net.layers[l], Dense) for l in dense) and _chain_range(net, start, end)
    if trace is None and not chain:
        x = net.check_input(x, "x")
        step = max(1, STACK_CHUNK_ELEMENTS // (m * widest))
        if x.shape[0] > step:  # a forward pass and the products per chunk of examples (module doc)
            _budget(x.shape[0] * m * widest, max_elements, f"J^({start},{end}) of {x.shape[0]} examples in {mode} mode")
            parts = [jacobian(net, x[b0 : b0 + step], start, end, mode=mode, max_elements=max_elements)
                     for b0 in range(0, x.shape[0], step)]
            return np.concatenate(parts, axis=0)
    trace = _trace(net, x, trace)
    B = trace.x.shape[0]
    _budget(B * m * widest, max_elements, f"J^({start},{end}) of {B} examples in {mode} mode")
    dtype = trace.x.dtype
    if chain:  # the one fast path by layer type
        return _dense_chain(net, trace, dense, mode)
    if mode == "reverse":
        G = np.broadcast_to(np.eye(n_out, dtype=dtype), (B, n_out, n_out))
        return pullback(net, trace, G, start, end)  # (B, N_end, N_start)
    V = np.broadcast_to(np.eye(n_in, dtype=dtype), (B, n_in, n_in))
    return pushforward(net, trace, V, start, end).transpose(0, 2, 1)  # (B, N_end, N_start)


def batch_jacobian(net, x, start: int = 0, end: int | None = None, *, trace=None, max_elements=None) -> np.ndarray:
    r"""The Jacobian of the batch map ``X^start -> X^end``: ``J[b, i, a, j] = dx^end_{b,i} / dx^start_{a,j}``.

    Defined for every network, and the only Jacobian of one whose batch-normalization layers are in
    train mode (the batch statistics make example ``b``'s output depend on example ``a``). For a
    per-example network it is block diagonal, ``J[b, :, b, :] = J^{start,end}_b`` (:func:`jacobian`)
    and zero for ``a != b``. Reverse mode: ``B N_end`` unit cotangents of the whole batch pulled
    back through the layers (each stacked vector is a cotangent of the batch map, as the layers'
    ``vjp_many`` take it).

    Parameters
    ----------
    net, x, start, end, trace, max_elements
        As in :func:`jacobian`.

    Returns
    -------
    ndarray, shape (B, N_end, B, N_start)
    """
    check_net(net)
    start, end = check_range(net, start, end)
    trace = _trace(net, x, trace)
    B = trace.x.shape[0]
    n_in, n_out = prod(net.shapes[start]), prod(net.shapes[end])
    widest = max(prod(s) for s in net.shapes[start : end + 1])
    _budget(B * B * n_out * widest, max_elements, f"the batch Jacobian J^({start},{end}) of {B} examples")
    G = np.zeros((B, B * n_out, n_out), dtype=trace.x.dtype)  # G[a, (b, i), :] = delta_ab e_i
    for b in range(B):
        G[b, b * n_out : (b + 1) * n_out, :] = np.eye(n_out, dtype=G.dtype)
    P = pullback(net, trace, G, start, end)  # (B_start, B_end N_end, N_start)
    return P.reshape(B, B, n_out, n_in).transpose(1, 2, 0, 3).copy()


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
    is a scaling of ``W``; every further layer is one product of the stack with the shared
    weight, the ``D`` scaling applied in place, two buffers taking turns and the last product
    written straight into the result. The examples go through the whole chain
    :data:`CHAIN_CHUNK_ELEMENTS` stack elements at a time (a few examples), so a chunk's stack
    stays in the core's cache from one layer to the next instead of streaming the whole batch's
    stack through memory once per layer (the K = 7 width-100 chain of 100 examples, one thread:
    41 -> 27 ms). Same products as :func:`pullback` / :func:`pushforward`, in the same order,
    but one GEMM fewer."""
    B = trace.x.shape[0]
    # (mask * W (N_{l+1}, N_l), D (B, N_{l+1})) of net.layers[l], whose Jacobian J^{l,l+1} is D W
    factors = {l: net.layers[l].jacobian_factors(net.params[l], trace.caches[l], net.masks[l]) for l in dense}
    order = dense[::-1] if mode == "reverse" else dense
    reverse = mode == "reverse"
    W0, D0 = factors[order[0]]
    m = W0.shape[0] if reverse else W0.shape[1]  # stacked vectors per example: N_end or N_start
    widths = [factors[l][0].shape[1] if reverse else factors[l][0].shape[0] for l in order]  # stack width after each layer
    dt = np.result_type(*[a for l in order for a in factors[l]])
    out = np.empty((B, m, widths[-1]), dtype=dt)
    chunk = CHAIN_CHUNK_ELEMENTS if m >= CHAIN_PER_EXAMPLE_ROWS else 4 * CHAIN_CHUNK_ELEMENTS
    step = max(1, chunk // (m * max(widths)))
    bufs = [np.empty(min(B, step) * m * max(widths), dtype=dt) for _ in range(2)]
    for b0 in range(0, B, step):
        b1 = min(B, b0 + step)
        b = b1 - b0
        J = out[b0:b1] if len(order) == 1 else bufs[0][: b * m * widths[0]].reshape(b, m, widths[0])
        if reverse:  # rows of the Jacobian: G (b, m, N) with m = N_end, starts as D W
            np.multiply(D0[b0:b1, :, None], W0[None, :, :], out=J)
        else:  # V (b, m, N) with m = N_start, (J V^T)^T rows: starts as W^T D
            np.multiply(W0.T[None, :, :], D0[b0:b1, None, :], out=J)
        for i, l in enumerate(order[1:], start=1):
            W, D = factors[l]
            if reverse:  # G <- (G * D) @ W
                np.multiply(J, D[b0:b1, None, :], out=J)
            nxt = out[b0:b1] if i == len(order) - 1 else bufs[i % 2][: b * m * widths[i]].reshape(b, m, widths[i])
            if m >= CHAIN_PER_EXAMPLE_ROWS:  # a GEMM per example, each tall enough on its own
                np.matmul(J, W if reverse else W.T, out=nxt)
            else:  # one GEMM for the chunk's b m rows
                np.matmul(J.reshape(b * m, -1), W if reverse else W.T, out=nxt.reshape(b * m, -1))
            if not reverse:  # V <- (V @ W^T) * D
                np.multiply(nxt, D[b0:b1, None, :], out=nxt)
            J = nxt
    return out if reverse else out.transpose(0, 2, 1)  # (B, N_end, N_start)


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
    check_per_example(net, start, end, "jacobian_operator")
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
