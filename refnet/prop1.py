r"""Proposition 1 of [SPP], computed literally from explicit Jacobians, and dL/dc through the mask.

PAPER.md section 2. For one example with error signal ``eps = dL/dx^K`` (a row vector) and an
affine layer ``l`` (1-based as in the paper; ``net.layers[l-1]`` in code):

.. math::

    \frac{\partial L}{\partial W^l}
        = \big(D^l\, (J^{l,K})^T \varepsilon^T\big)\, (x^{l-1})^T,
    \qquad
    \frac{\partial L}{\partial b^l} = D^l\, (J^{l,K})^T \varepsilon^T,

an ``(N_l x N_{l-1})`` outer product (``J^{K,K} = I``). For a linear network (every ``phi`` the
identity) ``D^l = I`` and ``x^{l-1} = J^{0,l-1} x^0 + a^{l-1}``, with ``a^{l-1}`` the bias
contributions (``x^{l-1}`` at ``x^0 = 0``): the paper's eq. (10).

:func:`prop1_gradients` evaluates these formulas with ``J^{l,K}`` and ``J^{0,l-1}`` formed as
dense matrices by :func:`refnet.jacobians.jacobian`; it never runs the backward pass, so
comparing it with :meth:`refnet.network.Network.loss_and_grads` (:func:`prop1_report`) is an
independent check of backprop. :func:`mask_gradients` is connection sensitivity by its own route:
the derivative of ``L(c * W)`` with respect to the mask ``c``.

Residual connections and batch normalization (docs/derivations.md, "Residual networks and batch
normalization"). On a graph (``net.inputs``) layer ``l`` reads the node ``x^{in(l)}`` (``x^{l-1}`` in
a chain) and ``J^{l,K} = dx^K/dx^l`` is the total derivative through every path from node ``l``
to the output (:mod:`refnet.jacobians`), so form (i) reads

.. math:: \frac{\partial L}{\partial W^l} = \sum_i \big(D^l_i (J^{l,K}_i)^T \varepsilon_i^T\big)
          (x^{in(l)}_i)^T .

A batch-normalization layer ``h = gamma xhat + beta`` is affine in its parameters with the
normalised input ``xhat`` in the role of ``x^{in(l)}`` and a diagonal "weight":
``dL/dgamma = sum_{i,positions} (D^l J^{l,K,T} eps^T) * xhat``, ``dL/dbeta = sum (D^l J^{l,K,T} eps^T)``.
With batch normalization in train mode (batch statistics) downstream of ``l``, ``J^{l,K}`` couples
the examples and ``(J^{l,K}_i)^T eps_i^T`` becomes ``sum_j (J^{l,K}_{ji})^T eps_j^T`` with
``J_{ji} = dx^K_j / dx^l_i`` (:func:`refnet.jacobians.batch_jacobian`); the outer products with
``x^{in(l)}_i`` are unchanged. Form (ii) holds for graphs of linear layers (identity activations,
eval-mode batch normalization, additions, "option A" shortcuts), with
``x^{in(l)} = J^{0,in(l)} x^0 + a^{in(l)}``.

Batches are rows in code: ``x^{l-1}`` of a batch is ``(B, N_{l-1})``, ``eps`` is ``(B, N_K)``.
The losses of :mod:`refnet.losses` are batch means, so the ``eps`` they return is already
``eps_i / B`` per row; the gradient of the mean loss, "the mean over examples of the per-example
outer products", is then the plain sum over rows of the outer products built from that ``eps``.
See docs/derivations.md for every step.
"""

from __future__ import annotations

from math import prod

import numpy as np

from ._checks import check_choice
from .conv import im2col
from .jacobians import batch_jacobian, jacobian
from .layers import Conv2d, Dense
from .losses import get_loss
from .network import check_net, couples_batch

__all__ = ["prop1_gradients", "prop1_report", "format_prop1_report", "mask_gradients", "FORMS"]

#: the two forms of Proposition 1
FORMS = ("general", "linear")


# -------------------------------------------------------------------------------------------
# validation
# -------------------------------------------------------------------------------------------


def _is_affine(layer) -> bool:
    """Whether the layer owns parameters (an affine map ``W x + b`` before its activation)."""
    return bool(layer.keys)


def _check_linear(net) -> None:
    """Raise ValueError unless the network is an affine map of its input (form="linear"): every
    layer's :attr:`~refnet.layers.Layer.is_affine_map` (so MaxPool2d, only piecewise linear, is
    refused)."""
    for i, layer in enumerate(net.layers):
        if layer.is_affine_map:
            continue
        if _is_affine(layer):
            raise ValueError(
                f'form="linear" needs every activation to be the identity (paper eq. 10 has D^l = I '
                f"and x^(l-1) = J^(0,l-1) x^0 + a), but layers[{i}] ({type(layer).__name__}) uses "
                f'{layer.activation.name!r}; use form="general"'
            )
        raise ValueError(
            f'form="linear" needs a linear network, but layers[{i}] is {type(layer).__name__}, which '
            f"is not a linear map (x^(l-1) is then not J^(0,l-1) x^0 + a); use form=\"general\""
        )


def _forward_and_eps(net, x, y, loss):
    """Validated input, trace, and the batch error signal ``eps`` ``(B, N_K)`` of the mean loss."""
    check_net(net)
    loss_fn = get_loss(loss)
    x = net.check_input(x, "x")
    if x.shape[0] == 0:
        raise ValueError(f"x must hold at least one example, got shape {x.shape}")
    out, trace = net.forward(x, return_trace=True)
    if out.ndim != 2:
        raise ValueError(f"the network output must be (B, C) for a loss, got per-example shape {net.out_shape}")
    _, eps = loss_fn(out, y)  # eps_i / B in row i: the 1/B of the batch mean is in here
    eps = np.asarray(eps)
    if eps.shape != out.shape:
        raise ValueError(f"loss must return eps shaped like the output {out.shape}, got {eps.shape}")
    return x, trace, eps


def _rows(a: np.ndarray) -> np.ndarray:
    return a.reshape(a.shape[0], -1)


# -------------------------------------------------------------------------------------------
# Proposition 1
# -------------------------------------------------------------------------------------------


def _outer_grads(layer, delta, inp, in_shape) -> dict:
    r"""The outer-product gradient of one affine layer from ``delta`` and its input.

    ``delta`` (B, N_l) is ``D^l J^{l,K}^T eps^T`` per example (rows), ``inp`` (B, N_{l-1}) the
    vector the paper multiplies it with (``x^{l-1}``, or ``J^{0,l-1} x^0 + a`` in the linear form).

    Dense: ``dL/dW = sum_i delta_i inp_i^T`` (an (n_out, n_in) sum of outer products),
    ``dL/db = sum_i delta_i``.
    Conv2d: ``delta`` is ``(B, c_out, P)`` over the output positions and ``cols = im2col(inp)``
    ``(B, P, K)``: ``dL/dW_f = sum_{i,p} delta_{i,:,p} cols_{i,p}^T`` reshaped to
    ``(c_out, c_in, kh, kw)``, ``dL/db = sum_{i,p} delta_{i,:,p}``.
    """
    B = delta.shape[0]
    # this oracle derives each layer type's gradient itself, on purpose (not the layers' code)
    if "gamma" in layer.keys:  # batch norm, by its parameters (the layer protocol's names)
        # h = gamma * xhat + beta: the "outer product" with a diagonal weight is its diagonal;
        # ``inp`` is xhat, summed over the examples and the positions of each channel
        d = delta.reshape(B, layer.num_features, -1)  # (B, C, S)
        return {"gamma": np.einsum("bcs,bcs->c", d, inp.reshape(d.shape)), "beta": d.sum(axis=(0, 2))}
    if isinstance(layer, Dense):
        grads = {"W": np.einsum("bo,bi->oi", delta, inp)}  # (n_out, n_in): sum of outer products
        if layer.bias:
            grads["b"] = delta.sum(axis=0)  # (n_out,)
        return grads
    if not isinstance(layer, Conv2d):
        raise TypeError(f"Proposition 1 is derived here for Dense, Conv2d and BatchNorm layers, got {type(layer).__name__}")
    # Conv2d: the same identity through the unfolded input
    cols = im2col(inp.reshape(B, *in_shape), layer.kernel_size, layer.stride, layer.padding, layer.padding_mode)
    d = delta.reshape(B, layer.c_out, -1)  # (B, c_out, P)
    gW = np.einsum("bop,bpk->ok", d, cols)  # (c_out, K)
    grads = {"W": gW.reshape(layer.c_out, layer.c_in, *layer.kernel_size)}
    if layer.bias:
        grads["b"] = d.sum(axis=(0, 2))  # (c_out,)
    return grads


def prop1_gradients(net, x, y, loss="cross_entropy", form: str = "general", *, max_elements=None) -> list[dict]:
    r"""Parameter gradients of the mean loss by Proposition 1 of [SPP], from explicit Jacobians.

    For every affine layer ``l = 1..K`` (``net.layers[l-1]``) and example ``i``:

    general form (i)
        ``dL/dW^l = sum_i (D^l_i J^{l,K}_i^T eps_i^T) x^{l-1}_i^T``,
        ``dL/db^l = sum_i D^l_i J^{l,K}_i^T eps_i^T``,
        with ``J^{l,K}`` from :func:`refnet.jacobians.jacobian` (``J^{K,K} = I``) and ``D^l``,
        ``x^{l-1}`` from the forward trace.
    linear form (ii), paper eq. (10); every activation the identity
        ``D^l = I`` and ``x^{l-1}`` replaced by ``J^{0,l-1}_i x^0_i + a^{l-1}``, where
        ``a^{l-1}`` (the bias contributions) is ``x^{l-1}`` of a forward pass of ``x^0 = 0``.

    Here ``eps`` is the error signal returned by the loss, which carries the ``1/B`` of the batch
    mean, so the sums are the means of the per-example gradients. For a Conv2d layer the outer
    product runs through the unfolded input (:func:`refnet.conv.im2col`), summed over output
    positions. Finally every gradient is multiplied by the mask: the gradient of
    ``L(mask * W)`` with respect to ``W`` is ``mask * dL/d(mask * W)``.

    Parameters
    ----------
    net : Network
    x : ndarray, shape (B, *net.in_shape)
    y : ndarray, shape (B,) int labels or (B, C) targets
    loss : "cross_entropy", "mse" or a callable ``(z, y) -> (loss, eps)``
    form : {"general", "linear"}
    max_elements : int, optional
        Budget for each dense Jacobian (see :func:`refnet.jacobians.jacobian`).

    Returns
    -------
    list of dict
        Shaped like ``net.params``; ``{}`` for parameter-free layers.

    Raises
    ------
    TypeError, ValueError
        For a bad ``net``, ``x``, ``y``, ``loss`` or ``form``; ``form="linear"`` on a network
        that is not linear (a non-identity activation or a MaxPool2d layer).
    """
    check_net(net)
    form = check_choice(form, "form", FORMS)
    if form == "linear":
        _check_linear(net)
    x, trace, eps = _forward_and_eps(net, x, y, loss)
    B, K = x.shape[0], net.n_layers
    N_K = prod(net.shapes[K])
    coupled_after = [any(couples_batch(layer) for layer in net.layers[l:]) for l in range(K + 1)]
    if form == "linear":
        # a^{l-1}: every x^{l-1} of the input x^0 = 0, i.e. the bias contributions alone
        _, trace0 = net.forward(np.zeros((1, *net.in_shape), dtype=x.dtype), return_trace=True)

    grads: list[dict] = []
    for idx, layer in enumerate(net.layers):
        if not _is_affine(layer):
            grads.append({})
            continue
        l = idx + 1  # paper index: this layer maps x^{l-1} (x^{in(l)} on a graph) to x^l
        cache = trace.caches[idx]
        # J^{l,K}: (B, N_K, N_l); J^{K,K} = I
        if l == K:
            J_lK = np.broadcast_to(np.eye(N_K, dtype=x.dtype), (B, N_K, N_K))
            back = np.einsum("bkn,bk->bn", J_lK, eps)  # (B, N_l): J^{l,K}^T eps^T per example
        elif coupled_after[l]:
            # train-mode batch norm after l: J_{ji} = dx^K_j / dx^l_i couples the examples
            J_lK = batch_jacobian(net, x, start=l, end=K, trace=trace, max_elements=max_elements)  # (B, N_K, B, N_l)
            back = np.einsum("jkin,jk->in", J_lK, eps)  # (B, N_l): sum_j J_{ji}^T eps_j^T
        else:
            J_lK = jacobian(net, x, start=l, end=K, trace=trace, max_elements=max_elements)
            back = np.einsum("bkn,bk->bn", J_lK, eps)  # (B, N_l): J^{l,K}^T eps^T per example
        bn = "gamma" in layer.keys  # batch norm: xhat (cache "xhat") in the role of x^{in(l)}
        if form == "general":
            delta = _rows(cache["D"]) * back  # (B, N_l): D^l J^{l,K}^T eps^T
            inp = _rows(cache["xhat"] if bn else cache["x"])  # (B, N_{l-1}): x^{l-1} (xhat for batch norm)
        else:
            delta = back  # D^l = I
            j = net.inputs[idx][0]  # the node the layer reads: l - 1 in a chain
            a = _rows(trace0.caches[idx]["x"])  # (1, N_{l-1}): x^{l-1} at x^0 = 0
            if j == 0:
                inp = _rows(x) + a  # J^{0,0} = I
            else:
                J_0l = jacobian(net, x, start=0, end=j, trace=trace, max_elements=max_elements)  # (B, N_{l-1}, N_0)
                inp = np.einsum("bnm,bm->bn", J_0l, _rows(x)) + a  # (B, N_{l-1}): J^{0,l-1} x^0 + a
            if bn:  # xhat = (x - running_mean) / s, an affine function of x^{in(l)}
                S = inp.shape[1] // layer.num_features
                inp = (inp - np.repeat(cache["mean"], S)) * np.repeat(cache["inv_std"], S)
        g = _outer_grads(layer, delta, inp, net.in_shapes[idx])
        mask = net.masks[idx]
        grads.append({k: g[k] * mask[k] for k in g})  # d/dW L(mask*W) = mask * dL/dW_eff
    return grads


# -------------------------------------------------------------------------------------------
# report: Proposition 1 against backprop
# -------------------------------------------------------------------------------------------


def max_rel_diff(a: dict, b: dict) -> float:
    """``max |a - b| / max |b|`` over every key of one layer's gradient dicts.

    When ``b`` is all zero the ratio is 0 if ``a`` is too, ``inf`` otherwise.
    """
    if set(a) != set(b):
        raise ValueError(f"gradient dicts must have the same keys, got {sorted(a)} and {sorted(b)}")
    num = max((float(np.max(np.abs(a[k] - b[k]), initial=0.0)) for k in a), default=0.0)
    den = max((float(np.max(np.abs(b[k]), initial=0.0)) for k in b), default=0.0)
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


def prop1_report(net, x, y, loss="cross_entropy", form: str = "general", *, max_elements=None) -> list[dict]:
    """Proposition 1 next to backprop for every affine layer.

    Returns
    -------
    list of dict, one per affine layer, with
        "layer": the index in ``net.layers`` (0-based; the paper's ``l`` is ``layer + 1``),
        "type": the layer class name,
        "backprop": that layer's gradients from :meth:`Network.loss_and_grads`,
        "prop1": that layer's gradients from :func:`prop1_gradients`,
        "max_rel_diff": ``max |prop1 - backprop| / max |backprop|`` over "W" and "b".
    """
    p1 = prop1_gradients(net, x, y, loss=loss, form=form, max_elements=max_elements)
    _, bp = net.loss_and_grads(x, y, loss=loss)
    report = []
    for idx, layer in enumerate(net.layers):
        if not _is_affine(layer):
            continue
        report.append(
            {
                "layer": idx,
                "type": type(layer).__name__,
                "backprop": bp[idx],
                "prop1": p1[idx],
                "max_rel_diff": max_rel_diff(p1[idx], bp[idx]),
            }
        )
    return report


def format_prop1_report(report) -> str:
    """A plain-text table of :func:`prop1_report`: one row per affine layer."""
    if not isinstance(report, (list, tuple)):
        raise TypeError(f"report must be the list returned by prop1_report, got {type(report).__name__}")
    head = f"{'layer':>5} {'l':>3}  {'type':<8} {'W shape':<18} {'max|g_W| backprop':>18} {'max rel diff':>13}"
    lines = [head, "-" * len(head)]
    worst = 0.0
    for r in report:
        try:
            gW = r["backprop"]["W" if "W" in r["backprop"] else "gamma"]  # batch norm: its gamma
            row = (
                f"{r['layer']:>5} {r['layer'] + 1:>3}  {r['type']:<8} {str(tuple(gW.shape)):<18} "
                f"{float(np.max(np.abs(gW), initial=0.0)):>18.6e} {r['max_rel_diff']:>13.3e}"
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"report rows must be dicts from prop1_report, got {r!r}") from exc
        lines.append(row)
        worst = max(worst, r["max_rel_diff"])
    lines.append(f"worst max rel diff: {worst:.3e} over {len(report)} affine layers")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------
# connection sensitivity through the mask
# -------------------------------------------------------------------------------------------


def mask_gradients(net, x, y, loss="cross_entropy") -> list[dict]:
    r"""``dL/dc`` at the current mask ``c``: the derivative with respect to the mask itself.

    The effective weight is ``W_eff = c * W``, so ``dL/dc = (dL/dW_eff) * W`` (and
    ``dL/dc_b = (dL/db_eff) * b``). ``dL/dW_eff`` is NOT masked: each layer computes it from its
    trace cache and the upstream gradient ``gh = dL/dh^l`` of a backward pass
    (:meth:`refnet.layers.Layer.mask_grads`),

    Dense   ``dL/dW_eff = gh^T x^{l-1}`` (sum over the batch), ``dL/db_eff = sum_i gh_i``;
    Conv2d  ``dL/dW_eff = sum_{i,p} gh_{i,:,p} cols_{i,p}^T`` reshaped, ``dL/db_eff = sum gh``,

    so pruned entries (``c = 0``) get the sensitivity of re-adding that connection, which is
    generally non-zero. At ``c = 1`` this is SNIP's ``g * w`` (PAPER.md section 4). The input
    gradients passed down between layers are those of the masked network (the layers' own
    VJPs); only the parameter gradients differ from :meth:`Network.backward`.

    Parameters
    ----------
    net : Network
    x : ndarray, shape (B, *net.in_shape)
    y : ndarray, shape (B,) int labels or (B, C) targets
    loss : "cross_entropy", "mse" or a callable

    Returns
    -------
    list of dict
        Shaped like ``net.params``: "W" (and "b" when the layer has a bias); ``{}`` for
        parameter-free layers.
    """
    x, trace, eps = _forward_and_eps(net, x, y, loss)
    out: list = [None] * net.n_layers
    if not net.is_chain:  # the cotangent of every node, summed over the layers reading it
        cot = net.node_cotangents(trace, eps, input_grad=False)
        return [layer.mask_grads(net.params[i], trace.caches[i], cot[i + 1]) for i, layer in enumerate(net.layers)]
    g = eps  # dL/dx^K, (B, *out_shape)
    for idx in range(net.n_layers - 1, -1, -1):
        layer, params, cache, mask = net.layers[idx], net.params[idx], trace.caches[idx], net.masks[idx]
        out[idx] = layer.mask_grads(params, cache, g)  # dL/dc = dL/dW_eff * W; {} without parameters
        if idx > 0:
            g, _ = layer.vjp(params, cache, g, mask, input_grad=True)  # dL/dx^{l-1} of the masked net
    return out
