r"""Layers: small frozen dataclasses of hyperparameters with pure methods.

Every layer implements one protocol (shapes are per batch; ``B`` examples as rows):

``out_shape(in_shape)``
    Per-example output shape for a per-example input shape.
``init(rng, in_shape, initializer, dtype) -> params``
    A dict of arrays (``{"W", "b"}`` for affine layers, ``{}`` for parameter-free ones).
``forward(params, x, mask=None) -> (y, cache)``
    The map and what the backward pass needs. Affine layers cache the input ``x`` (= x^{l-1}),
    the pre-activation ``h`` (= h^l) and ``D`` (= phi'(h^l), the diagonal of D^l).
``vjp(params, cache, g, mask=None, input_grad=True) -> (g_x, grads)``
    Reverse mode: ``g = dL/dy`` to ``g_x = dL/dx`` and the parameter gradients (``g_x`` is None
    when ``input_grad`` is False: the first layer of a backward pass skips that product).
``jvp(params, cache, v, mask=None, dparams=None) -> y_dot``
    Forward mode: the tangent of ``y`` for an input tangent ``v`` (and, optionally, parameter
    tangents ``dparams``); the adjoint of ``vjp``.
``jacobian(params, cache, mask=None) -> J``
    The per-example layer Jacobian ``J^{l-1,l} = D^l W^l`` as a dense ``(B, n_out, n_in)`` array
    over the flattened (NCHW) input and output.
``vjp_many(params, cache, G, mask=None, in_shape=None, out_shape=None) -> G J``
    Reverse mode for a stack of ``m`` cotangents per example: ``G`` is ``(B, m, N_out)`` (rows,
    flattened NCHW), the result ``(B, m, N_in)``; row ``j`` of example ``b`` is
    ``G[b, j] J^{l-1,l}_b``. The default loops over ``vjp``; Dense overrides it with one GEMM,
    Conv2d with one batched product per chunk of vectors, Flatten returns the stack itself.
``jvp_many(params, cache, V, mask=None, in_shape=None, out_shape=None) -> (J V^T)^T``
    Forward mode for a stack ``V`` ``(B, m, N_in)`` of tangents: ``(B, m, N_out)``, the adjoint of
    ``vjp_many``. The default loops over ``jvp``; Dense overrides it with one GEMM, Flatten
    returns the stack itself.
``mask_grads(params, cache, g) -> dL/dc``
    The derivative of ``L(c * theta)`` with respect to the mask ``c`` at the current mask, from
    ``g = dL/dy``: ``(dL/d theta_eff) * theta`` per parameter, with ``dL/d theta_eff`` NOT
    masked; ``{}`` for parameter-free layers.
``rop_forward(params, cache, x_dot, mask=None, dparams=None) -> (y_dot, rcache)``
    Second order, Pearlmutter's R-operator, forward half: ``R{y}`` (the derivative of the output
    along a parameter direction ``dparams``) from ``R{x}`` (None: zero), and what the backward
    half needs (``rcache``: ``"x_dot"``, and ``"h_dot"`` = ``R{h}`` for Dense and Conv2d).
``rop_backward(params, cache, rcache, g, g_dot, mask=None, dparams=None, input_grad=True)``
    Its backward half: ``(dL/dx, R{dL/dx}, dL/dtheta, R{dL/dtheta})`` from ``g = dL/dy`` and
    ``R{g}``; ``R{dL/dtheta}`` is this layer's block of the Hessian-vector product, with the
    ``phi''`` term (:mod:`refnet.second_order`).
``hessian_diag_backward(params, cache, Q, coef, g=None, mask=None, input_rows=True)``
    A signed factor of the per-example output Hessian, ``sum_r coef Q_r Q_r^T``, pulled back to
    the input, and the exact diagonal of the Hessian with respect to the parameters (the
    Gauss-Newton diagonal when ``g`` is None).
``keys``, ``is_affine_map``, ``flat_identity``
    The parameter names; whether ``x^l`` is an affine function of ``x^{l-1}`` (a linear
    activation, or a linear parameter-free layer); whether the layer is the identity on
    flattened vectors (Flatten).

:meth:`Dense.jacobian_factors` gives the two factors of ``J = D W`` (the effective weight and
``D``), for products that run through a chain of Dense layers without a layer loop
(:func:`refnet.jacobians.jacobian`).

The caches that ``forward`` returns are part of the protocol: every layer caches its input
``"x"``, and the keys other modules may read are listed, with their shapes and their names in
the paper, in the docstring of :class:`Layer`.

Layers beyond the protocol's single input: :class:`Add` reads several nodes of a network with
residual connections (its ``forward`` takes a tuple of inputs; see :mod:`refnet.layers.residual`),
and :class:`Residual` is not a layer but a block ``phi(main(x) + shortcut(x))`` that
:class:`refnet.network.Network` expands into layers and an :class:`Add`. :class:`BatchNorm1d` and
:class:`BatchNorm2d` have parameters ``gamma``/``beta`` (not weights), buffers (the running
statistics, ``buffer_shapes``/``init_buffers``/``updated_buffers``) and a ``mode``; in train mode
they couple the examples (``couples_batch``) and have no per-example ``jacobian``, only
``batch_jacobian``. Optional attributes a layer may define, read with ``getattr`` and a default:
``couples_batch`` (False), ``needs_initializer`` (``bool(keys)``), ``n_inputs`` (1).

Masks are dicts beside the params with the same keys and shapes (boolean); the effective weight
is ``mask * W``, so the gradient with respect to ``W`` is ``mask * dL/d(mask*W)`` and pruned
entries get exactly zero gradient. Parameter-free layers (pooling, flatten) have ``D = I``.
"""
from __future__ import annotations

from .base import Affine, Layer
from .batchnorm import BN_MODES, BatchNorm1d, BatchNorm2d
from .conv2d import STACK_CHUNK_ELEMENTS, Conv2d
from .dense import Dense
from .pooling import AvgPool2d, Flatten, GlobalAvgPool2d, MaxPool2d
from .residual import Add, Residual, SubsamplePad, expand_layers

__all__ = [
    "Layer",
    "Affine",
    "Dense",
    "Conv2d",
    "AvgPool2d",
    "MaxPool2d",
    "GlobalAvgPool2d",
    "Flatten",
    "BatchNorm1d",
    "BatchNorm2d",
    "BN_MODES",
    "Add",
    "SubsamplePad",
    "Residual",
    "expand_layers",
    "layer_from_dict",
    "LAYER_TYPES",
    "STACK_CHUNK_ELEMENTS",
]


LAYER_TYPES = {
    cls.__name__: cls
    for cls in (Dense, Conv2d, AvgPool2d, MaxPool2d, GlobalAvgPool2d, Flatten, BatchNorm1d, BatchNorm2d, Add, SubsamplePad)
}


def layer_from_dict(d: dict) -> Layer:
    """Rebuild a layer from :meth:`Layer.to_dict` (used by :func:`refnet.network.Network.load`)."""
    if not isinstance(d, dict) or "type" not in d:
        raise ValueError(f"a layer description must be a dict with a 'type', got {d!r}")
    d = dict(d)
    kind = d.pop("type")
    if kind not in LAYER_TYPES:
        raise ValueError(f"layer type must be one of {sorted(LAYER_TYPES)}, got {kind!r}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return LAYER_TYPES[kind](**kwargs)
