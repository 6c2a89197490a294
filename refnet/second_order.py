r"""Exact second order by hand: Hessian-vector products (Pearlmutter's R-operator), Gauss-Newton
products, the full Hessian, and the exact Hessian and Gauss-Newton diagonals.

The loss is the mean loss of :meth:`refnet.network.Network.loss_and_grads` (optionally of the
logits divided by a ``temperature`` ``T``, as GraSP uses), and the variables are every parameter
(weights and biases) through the effective parameters ``c * theta``: the Hessian is

.. math:: H = \frac{\partial^2 L(c \odot \theta)}{\partial \theta^2}
            = \operatorname{diag}(c)\, H_{\text{eff}}\, \operatorname{diag}(c),

so rows and columns of pruned entries are exactly zero, and a direction's pruned entries do not
matter (``H v = H (c * v)``). No automatic differentiation anywhere: docs/derivations.md (section
"Second order") derives every formula; each layer owns its rules beside its VJP
(:meth:`refnet.layers.Layer.rop_forward`, :meth:`~refnet.layers.Layer.rop_backward`,
:meth:`~refnet.layers.Layer.hessian_diag_backward`) and each loss its output Hessian
(:func:`refnet.losses.output_hvp`, :func:`refnet.losses.output_hessian_factor`).

The R-operator. For a direction ``V`` of the parameters write ``R{f} = d/dt f(theta + t V)|_0``.
:func:`hvp` runs

1. the forward pass (the trace) and the R-forward pass ``R{x^l}`` layer by layer
   (``R{h} = W R{x} + V_W x + V_b``, ``R{x^l} = D R{h}``);
2. the loss: ``eps = dL/dz`` and ``R{eps} = (d^2L/dz^2) R{z}``;
3. the backward pass of the gradients together with their R-derivatives: each layer maps
   ``(g, R{g})`` to ``(g_x, R{g_x})`` and gives ``R{dL/dtheta} = (H V)_theta``, where
   ``phi''`` enters through ``R{D g} = D R{g} + phi''(h) g R{h}``.

Its cost is about three backward passes; :func:`gnvp` drops every second-derivative term but the
loss's (``J^T H_L J V``). :func:`hessian_diag` and :func:`gn_diag` backpropagate a signed factor of
the per-example output Hessian instead of a vector, which gives the exact diagonal without forming
the matrix; :func:`hessian` forms the matrix, column by column, by :func:`hvp`.

Flat order (:func:`params_to_vector`, :func:`hessian`): layer 0 ``"W"`` (C order), layer 0 ``"b"``,
layer 1 ``"W"``, ... over the layers with parameters, the keys in the order of each layer's
``keys``; the same order as the flat index of :mod:`refnet.pruning` with biases ranked.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import numpy as np

from ._checks import check_array, check_float, check_int
from .losses import get_loss, loss_name, output_hessian_factor, output_hvp
from .network import Trace, check_net

__all__ = [
    "DEFAULT_MAX_ELEMENTS",
    "params_to_vector",
    "vector_to_params",
    "loss_grads_and_hvp",
    "hvp",
    "gnvp",
    "hessian",
    "hessian_diag",
    "gn_diag",
]

#: default budget (elements) for the Hessian matrix of :func:`hessian` and for the factor rows of
#: one chunk of :func:`hessian_diag` / :func:`gn_diag`: 2**27 float64 = 1 GiB
DEFAULT_MAX_ELEMENTS = 2**27


# -------------------------------------------------------------------------------------------
# parameter trees and flat vectors
# -------------------------------------------------------------------------------------------


def _keys(net) -> list[tuple]:
    return [tuple(layer.keys) for layer in net.layers]


def _check_tree(net, tree, name: str) -> list[dict]:
    """``tree`` checked as a list of dicts shaped like ``net.params`` (a missing key is zero;
    an unknown key or a wrong shape is a ValueError naming ``name``); arrays in the net's dtype."""
    shapes = net.param_shapes()
    if not isinstance(tree, (list, tuple)) or len(tree) != net.n_layers:
        got = f"{len(tree)} entries" if isinstance(tree, (list, tuple)) else type(tree).__name__
        raise ValueError(f"{name} must be a list of {net.n_layers} dicts (one per layer, like net.params), got {got}")
    out = []
    for i, (d, s) in enumerate(zip(tree, shapes)):
        if d is None:
            d = {}
        if not isinstance(d, dict) or not set(d) <= set(s):
            got = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"{name}[{i}] must be a dict with keys among {sorted(s)}, got {got}")
        out.append(
            {k: check_array(d[k], f"{name}[{i}][{k!r}]", shape=s[k], allow_int=True).astype(net.dtype, copy=False) for k in d}
        )
    return out


def params_to_vector(net, tree, name: str = "tree") -> np.ndarray:
    """Concatenate a list of dicts shaped like ``net.params`` into one vector, in the flat order
    of the module docstring (a missing key contributes zeros).

    Returns
    -------
    ndarray, shape (net.n_params,)
    """
    net = check_net(net)
    tree = _check_tree(net, tree, name)
    shapes = net.param_shapes()
    parts = [
        (tree[i][k] if k in tree[i] else np.zeros(shapes[i][k], dtype=net.dtype)).reshape(-1)
        for i, keys in enumerate(_keys(net))
        for k in keys
    ]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=net.dtype)


def vector_to_params(net, vec, name: str = "vec") -> list[dict]:
    """The inverse of :func:`params_to_vector`: a flat ``(net.n_params,)`` vector as a list of dicts
    shaped like ``net.params`` (copies)."""
    net = check_net(net)
    vec = check_array(vec, name, shape=(net.n_params,), allow_int=True).astype(net.dtype, copy=False)
    shapes = net.param_shapes()
    out, i0 = [], 0
    for i, keys in enumerate(_keys(net)):
        d = {}
        for k in keys:
            n = prod(shapes[i][k])
            d[k] = vec[i0 : i0 + n].reshape(shapes[i][k]).copy()
            i0 += n
        out.append(d)
    return out


# -------------------------------------------------------------------------------------------
# the point: forward pass and loss
# -------------------------------------------------------------------------------------------


@dataclass
class _Point:
    """The forward pass and the loss at the current parameters: what every product reuses."""

    trace: Trace
    z: np.ndarray  # (B, C) logits divided by the temperature
    y: object
    loss: str  # canonical loss name
    T: float  # temperature
    value: float
    eps: np.ndarray  # (B, C): dL/dx^K (with the 1/T of the temperature)

    def out_hvp(self, z_dot: np.ndarray) -> np.ndarray:
        """``(d^2 L / d x^K 2) z_dot`` (with ``1/T^2``)."""
        if self.T == 1.0:
            return output_hvp(self.loss, self.z, self.y, z_dot)
        return output_hvp(self.loss, self.z, self.y, z_dot / self.T) / self.T

    def out_factor(self) -> tuple[np.ndarray, np.ndarray]:
        """``(A, coef)`` with ``d^2L/d(x^K_i)^2 = sum_r coef A_r A_r^T`` (with ``1/T^2``)."""
        A, coef = output_hessian_factor(self.loss, self.z, self.y)
        return A, (coef if self.T == 1.0 else coef / (self.T * self.T))


def _check_temperature(temperature) -> float:
    return check_float(temperature, "temperature", min_value=0.0, min_inclusive=False)


def _point(net, x, y, loss, temperature) -> _Point:
    name = loss_name(loss)
    T = _check_temperature(temperature)
    out, trace = net.forward(x, return_trace=True)
    if out.ndim != 2:
        raise ValueError(f"the network output must be (B, C) for a loss, got shape {out.shape}")
    if out.shape[0] == 0:
        raise ValueError("x must hold at least one example")
    z = out if T == 1.0 else out / T
    value, eps = get_loss(name)(z, y)
    if T != 1.0:
        eps = eps / T
    return _Point(trace, z, y, name, T, float(value), eps)


# -------------------------------------------------------------------------------------------
# Hessian- and Gauss-Newton-vector products
# -------------------------------------------------------------------------------------------


def _rop_forward(net, trace, v) -> tuple:
    """The R-forward pass: ``R{x^K}`` (zeros when no layer has a direction) and the layers'
    R-caches."""
    xd, rcaches = None, []
    for l, layer in enumerate(net.layers):
        xd, rc = layer.rop_forward(net.params[l], trace.caches[l], xd, net.masks[l], v[l])
        rcaches.append(rc)
    if xd is None:
        xd = np.zeros_like(trace.out)
    return xd, rcaches


def _hvp_at(net, pt: _Point, v, param_grads: bool = True) -> tuple[list, list]:
    """``(grads, H v)`` at a point, by the R-forward and the R-backward pass (``grads`` are
    ``{}`` per layer with ``param_grads`` False)."""
    z_dot, rcaches = _rop_forward(net, pt.trace, v)
    g, g_dot = pt.eps, pt.out_hvp(z_dot)  # dL/dz, R{dL/dz}
    grads, hv = [None] * net.n_layers, [None] * net.n_layers
    for l in range(net.n_layers - 1, -1, -1):
        g, g_dot, grads[l], hv[l] = net.layers[l].rop_backward(
            net.params[l], pt.trace.caches[l], rcaches[l], g, g_dot, net.masks[l], v[l], input_grad=l > 0,
            param_grads=param_grads,
        )
    return grads, hv


def loss_grads_and_hvp(net, x, y, v, loss="cross_entropy", *, temperature=1.0) -> tuple:
    r"""The mean loss, its gradient and the Hessian-vector product ``H v``, in one pass.

    Parameters
    ----------
    net : Network
    x : ndarray, shape (B, *net.in_shape)
    y : ndarray, shape (B,) int labels or (B, C) targets
    v : list of dict
        The direction, shaped like ``net.params`` (a missing key is zero; pruned entries are
        ignored).
    loss : "cross_entropy" or "mse" (or :func:`refnet.losses.cross_entropy` / ``mse`` themselves)
    temperature : float
        ``T > 0``: the loss of the logits divided by ``T`` (``L(z / T)``, GraSP's temperature);
        1 is the plain loss.

    Returns
    -------
    loss : float
    grads : list of dict
        ``dL/dtheta``, as :meth:`refnet.network.Network.loss_and_grads` (pruned entries zero).
    hv : list of dict
        ``H v`` shaped like ``net.params`` (pruned entries exactly zero).
    """
    net = check_net(net)
    v = _check_tree(net, v, "v")
    pt = _point(net, x, y, loss, temperature)
    grads, hv = _hvp_at(net, pt, v)
    return pt.value, grads, hv


def hvp(net, x, y, v, loss="cross_entropy", *, temperature=1.0) -> list[dict]:
    r"""``H v``: the Hessian of the mean loss with respect to every parameter times ``v``, exact,
    by Pearlmutter's R-operator (see the module docstring; arguments as in
    :func:`loss_grads_and_hvp`).

    ``H`` is taken with respect to the stored parameters through the effective ones
    (``c * theta``), so ``(H v)`` is zero at pruned entries and does not depend on ``v`` there.
    The cost is one forward pass, one R-forward pass and one backward pass that carries the
    gradients and their R-derivatives: about three times a ``loss_and_grads``.

    Returns
    -------
    list of dict, shaped like ``net.params``
    """
    net = check_net(net)
    v = _check_tree(net, v, "v")
    pt = _point(net, x, y, loss, temperature)
    return _hvp_at(net, pt, v, param_grads=False)[1]


def gnvp(net, x, y, v, loss="cross_entropy", *, temperature=1.0) -> list[dict]:
    r"""``G v = J^T H_L J v``: the Gauss-Newton matrix of the mean loss times ``v``.

    ``J = dz/dtheta`` is the Jacobian of the logits (per example) with respect to the parameters
    (through ``c * theta``) and ``H_L = d^2L/dz^2`` the loss's output Hessian
    (:func:`refnet.losses.output_hvp`): ``G = sum_i J_i^T H_{L,i} J_i`` is ``H`` without the terms
    of the network's own curvature (``phi''`` and the products of two parameter directions).
    For softmax cross-entropy with one-hot (or normalised) targets
    ``H_{L,i} = (diag p_i - p_i p_i^T) / B`` is the covariance of the one-hot label under the
    model's own prediction, so ``G`` equals the Fisher information matrix of the model's predictive
    distribution (the "true" Fisher, not the empirical one). ``G`` is positive semi-definite
    for both losses.

    Computed as one JVP (the R-forward pass, which has no second-order terms), the output
    Hessian product and one ordinary backward pass. Arguments as in :func:`loss_grads_and_hvp`.

    Returns
    -------
    list of dict, shaped like ``net.params`` (pruned entries exactly zero)
    """
    net = check_net(net)
    v = _check_tree(net, v, "v")
    pt = _point(net, x, y, loss, temperature)
    z_dot, _ = _rop_forward(net, pt.trace, v)  # J v
    return net.backward(pt.trace, pt.out_hvp(z_dot))  # J^T H_L J v


# -------------------------------------------------------------------------------------------
# the matrix and its diagonal
# -------------------------------------------------------------------------------------------


def _limit(max_elements) -> int:
    return DEFAULT_MAX_ELEMENTS if max_elements is None else check_int(max_elements, "max_elements", min_value=1)


def hessian(net, x, y, loss="cross_entropy", *, temperature=1.0, max_elements=None) -> np.ndarray:
    r"""The full Hessian of the mean loss, ``(n, n)`` with ``n = net.n_params``, in the flat order
    of :func:`params_to_vector` (layer 0 ``W`` in C order, layer 0 ``b``, layer 1 ``W``, ...).

    Column ``j`` is ``H e_j`` by :func:`hvp` (one R-operator pass per kept entry, reusing one
    forward pass); columns and rows of pruned entries are exactly zero. Exact, but ``n`` HVPs:
    meant for small networks, checks and teaching; the diagonal alone is :func:`hessian_diag`.

    Parameters
    ----------
    net, x, y, loss, temperature
        As in :func:`loss_grads_and_hvp`.
    max_elements : int, optional
        Refuse (ValueError naming it) when ``n * n`` exceeds it; default
        :data:`DEFAULT_MAX_ELEMENTS`.

    Returns
    -------
    ndarray, shape (n, n)
    """
    net = check_net(net)
    n = net.n_params
    limit = _limit(max_elements)
    if n * n > limit:
        raise ValueError(
            f"the Hessian of {n:,} parameters needs {n * n:,} elements, above max_elements={limit:,}; raise "
            "max_elements, or use the matrix-free routes: hvp, gnvp, hessian_diag, gn_diag"
        )
    pt = _point(net, x, y, loss, temperature)
    kept = params_to_vector(net, [{k: m[k].astype(net.dtype) for k in m} for m in net.masks], "masks") != 0
    H = np.zeros((n, n), dtype=net.dtype)
    e = np.zeros(n, dtype=net.dtype)
    for j in np.flatnonzero(kept):
        e[j] = 1.0
        _, hv = _hvp_at(net, pt, vector_to_params(net, e), param_grads=False)
        H[:, j] = params_to_vector(net, hv)
        e[j] = 0.0
    return H


def _factor_rows(net, exact: bool) -> list[int]:
    """Upper bound on the number of factor rows (per example) that reach each layer's input."""
    r = prod(net.out_shape)  # the output Hessian factor has C rows
    rows = [0] * net.n_layers
    for l in range(net.n_layers - 1, -1, -1):
        layer = net.layers[l]
        if exact and layer.keys and not layer.is_affine_map:
            r += prod(net.shapes[l + 1])  # one residual row per unit of a nonlinear activation
        rows[l] = r
    return rows


def _diag_chunk(net, x, y, loss, temperature, exact: bool) -> list[dict]:
    pt = _point(net, x, y, loss, temperature)
    A, coef = pt.out_factor()  # (B, R, C), (B, R)
    Q, g = A, pt.eps
    diag = [None] * net.n_layers
    for l in range(net.n_layers - 1, -1, -1):
        layer, p, c, m = net.layers[l], net.params[l], pt.trace.caches[l], net.masks[l]
        Q, coef, diag[l] = layer.hessian_diag_backward(p, c, Q, coef, g if exact else None, m, input_rows=l > 0)
        if l > 0 and exact:
            g, _ = layer.vjp(p, c, g, m)
    return diag


def _diag(net, x, y, loss, temperature, max_elements, exact: bool) -> list[dict]:
    net = check_net(net)
    loss_name(loss)
    _check_temperature(temperature)
    x = net.check_input(x)
    B = x.shape[0]
    if B == 0:
        raise ValueError("x must hold at least one example")
    limit = _limit(max_elements)
    rows = _factor_rows(net, exact)
    per_example = max(rows[l] * max(prod(net.shapes[l]), prod(net.shapes[l + 1])) for l in range(net.n_layers))
    if per_example > limit:
        what = "hessian_diag" if exact else "gn_diag"
        raise ValueError(
            f"{what} needs {per_example:,} elements of factor rows for one example, above "
            f"max_elements={limit:,}; raise max_elements"
        )
    chunk = max(1, limit // per_example)
    if chunk >= B:
        return _diag_chunk(net, x, y, loss, temperature, exact)
    y = np.asarray(y)
    total = None
    for i0 in range(0, B, chunk):
        d = _diag_chunk(net, x[i0 : i0 + chunk], y[i0 : i0 + chunk], loss, temperature, exact)
        w = (min(B, i0 + chunk) - i0) / B  # the chunk's mean loss is weighted by its share
        d = [{k: w * a for k, a in di.items()} for di in d]
        total = d if total is None else [{k: t[k] + di[k] for k in t} for t, di in zip(total, d)]
    return total


def hessian_diag(net, x, y, loss="cross_entropy", *, temperature=1.0, max_elements=None) -> list[dict]:
    r"""The exact diagonal of the Hessian of the mean loss, without forming the matrix.

    Backpropagates a signed factor of the per-example Hessian with respect to each layer's output
    (:meth:`refnet.layers.Layer.hessian_diag_backward`): it starts from the loss's
    ``d^2L/dz^2 = coef A^T A`` (:func:`refnet.losses.output_hessian_factor`, ``C`` rows) and every
    nonlinear affine layer adds one row per unit for its curvature term
    ``diag(phi''(h) * dL/dx^l)``. Since ``h^l`` is linear in ``W^l``, the weight block is
    ``sum_i (dh/dW)^T (d^2L/dh_i^2) (dh/dW)`` and its diagonal a sum of squares of the rows'
    weight gradients. Exact, with no matrix of size ``n x n``: the cost is a backward pass of
    ``C + sum_l N_l`` vectors per example (the units of the nonlinear layers above), so for the
    papers' 784-100x6-10 MLP about 610 vectors instead of the ~80,000 HVPs of a column-by-column
    diagonal. Conv2d layers pull the rows back through their explicit operator matrix
    (:func:`refnet.conv.conv_matrix`), so this suits small convolutional networks.

    Parameters
    ----------
    net, x, y, loss, temperature
        As in :func:`loss_grads_and_hvp`.
    max_elements : int, optional
        Budget for the factor rows of one chunk of examples (the diagonal of the mean loss is
        accumulated over chunks of examples that fit); ValueError naming it when one example does
        not fit. Default :data:`DEFAULT_MAX_ELEMENTS`.

    Returns
    -------
    list of dict, shaped like ``net.params``
        ``H_jj`` for every parameter (zero at pruned entries). It may be negative: ``H`` is not
        positive semi-definite away from a minimum.
    """
    return _diag(net, x, y, loss, temperature, max_elements, exact=True)


def gn_diag(net, x, y, loss="cross_entropy", *, temperature=1.0, max_elements=None) -> list[dict]:
    r"""The exact diagonal of the Gauss-Newton matrix ``G = sum_i J_i^T H_{L,i} J_i`` (see
    :func:`gnvp`): the curvature OBD uses (LeCun et al. 1990 drop the off-diagonal terms and
    the terms in the second derivative of the network; what is left is this diagonal).

    With the output Hessian factored as ``H_{L,i} = coef_i A_i^T A_i``
    (:func:`refnet.losses.output_hessian_factor`; for cross-entropy
    ``A_i = diag(sqrt p_i)(I - 1 p_i^T)``, so that ``A_i^T A_i = diag p_i - p_i p_i^T``),

    .. math:: G_{jj} = \sum_i coef_i \sum_{a} \big((A_i J_i)_{a j}\big)^2 ,

    a backward pass of the ``C`` rows of ``A_i`` per example in which each row's parameter gradient
    is squared before the sum over examples and rows (:meth:`~refnet.layers.Layer.hessian_diag_backward`
    with no curvature term). Non-negative (for targets with non-negative rows); arguments and
    return as in :func:`hessian_diag`.
    """
    return _diag(net, x, y, loss, temperature, max_elements, exact=False)
