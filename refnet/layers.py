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

Masks are dicts beside the params with the same keys and shapes (boolean); the effective weight
is ``mask * W``, so the gradient with respect to ``W`` is ``mask * dL/d(mask*W)`` and pruned
entries get exactly zero gradient. Parameter-free layers (pooling, flatten) have ``D = I``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from math import prod

import numpy as np

from . import conv as _conv
from . import kernels
from ._checks import check_choice, check_int
from .activations import Activation, get_activation

__all__ = [
    "Layer",
    "Dense",
    "Conv2d",
    "AvgPool2d",
    "MaxPool2d",
    "GlobalAvgPool2d",
    "Flatten",
    "layer_from_dict",
    "LAYER_TYPES",
]


def _pair(value, name: str, min_value: int) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
        return (check_int(value[0], name, min_value=min_value), check_int(value[1], name, min_value=min_value))
    v = check_int(value, name, min_value=min_value)
    return (v, v)


def _masked(params: dict, mask: dict | None, key: str):
    """The effective parameter ``mask[key] * params[key]`` (or the parameter itself)."""
    m = _mask_of(mask, key)
    return params[key] if m is None else params[key] * m


def _rows(a: np.ndarray) -> np.ndarray:
    """``(B, *shape) -> (B, prod(shape))``, also for an empty batch."""
    return a.reshape(a.shape[0], prod(a.shape[1:]))


def _mask_of(mask: dict | None, key: str):
    """The mask of ``key``, or None when there is none or it keeps everything (a cheap check
    on booleans that saves the multiplications of unpruned layers)."""
    m = None if mask is None else mask.get(key)
    return None if m is None or m.all() else m


def _mask_grad(g: np.ndarray, mask: dict | None, key: str) -> np.ndarray:
    m = _mask_of(mask, key)
    return g if m is None else g * m


#: elements of the largest intermediate array of one chunk of :meth:`Conv2d.vjp_many`
#: (the patch gradients of a chunk of cotangents): 2**22 float64 = 32 MiB
STACK_CHUNK_ELEMENTS = 2**22


class Layer:
    """Base class: the protocol of the module docstring, with default Jacobian, multi-vector
    products and mask gradient, and serialisation helpers.

    A subclass implements ``out_shape``, ``forward``, ``vjp`` and ``jvp``; the defaults here build
    everything else from those (``jacobian`` from ``n_in`` JVPs, ``vjp_many`` / ``jvp_many`` as a
    loop of VJPs / JVPs) and a subclass overrides them where a batched form is faster. The
    second-order rules (``rop_forward``, ``rop_backward``, ``hessian_diag_backward``) default to
    those of a parameter-free, piecewise linear layer (zero second derivative); a layer with
    parameters must define them (NotImplementedError otherwise), as it must ``mask_grads``.

    Trace caches. The dict ``forward`` returns (one entry of ``Trace.caches``) holds these keys;
    :mod:`refnet.jacobians`, :mod:`refnet.prop1` and the audits read caches by these names only
    (paper notation, shapes per batch):

    =============  =============  ==========================================================
    layer          key            value
    =============  =============  ==========================================================
    every layer    ``"x"``        ``x^{l-1}``, the input, ``(B, *in_shape)``
    Dense, Conv2d  ``"h"``        ``h^l``, the pre-activation, ``(B, *out_shape)``
    Dense, Conv2d  ``"D"``        ``phi'(h^l)``, the diagonal of ``D^l``, shaped like ``h``
    Conv2d         ``"cols"``     ``im2col(x^{l-1})``, ``(B, P, K)``: the patch under each of
                                  the ``P = Ho Wo`` output positions over the
                                  ``K = c_in kh kw`` taps (:func:`refnet.conv.im2col`)
    MaxPool2d      ``"arg"``      the arg-max of each ``k x k`` window (row-major within the
                                  window, first on ties), ``(B, C, Ho, Wo)`` integers
    =============  =============  ==========================================================

    Parameter-free layers keep no ``"h"`` or ``"D"``: their ``D = I``.
    """

    #: parameter names of this layer instance (``()`` for parameter-free layers)
    keys: tuple = ()

    #: True for a layer that is the identity on flattened (NCHW) vectors (Flatten): ``J = I``,
    #: and ``vjp_many`` / ``jvp_many`` hand the stack back unchanged
    flat_identity = False

    #: True when ``x^l`` is an affine function of ``x^{l-1}`` (``J`` does not depend on the input):
    #: Dense and Conv2d with a linear activation, average pooling, Flatten; not MaxPool2d
    is_affine_map = False

    def out_shape(self, in_shape: tuple) -> tuple:  # pragma: no cover - abstract
        raise NotImplementedError

    def check_in_shape(self, in_shape: tuple) -> None:
        """Raise ValueError if this layer cannot take per-example input ``in_shape``."""
        self.out_shape(in_shape)

    def init(self, rng, in_shape, initializer, dtype) -> dict:
        return {}

    def param_shapes(self, in_shape) -> dict:
        return {}

    def jacobian(self, params, cache, mask=None) -> np.ndarray:
        """Dense ``(B, n_out, n_in)`` Jacobian by forward-mode basis products (n_in JVPs)."""
        x = cache["x"]
        B = x.shape[0]
        in_shape = x.shape[1:]
        n_in = prod(in_shape)
        cols = []
        for k in range(n_in):
            e = np.zeros((B, n_in), dtype=x.dtype)
            e[:, k] = 1.0
            cols.append(_rows(self.jvp(params, cache, e.reshape(x.shape), mask)))
        return np.stack(cols, axis=2)  # (B, n_out, n_in)

    def _stack_shapes(self, cache, in_shape, out_shape) -> tuple:
        """Per-example input and output shapes of a multi-vector product (from the cached input
        ``x`` when not given)."""
        if in_shape is None:
            in_shape = cache["x"].shape[1:]
        if out_shape is None:
            out_shape = self.out_shape(in_shape)
        return tuple(in_shape), tuple(out_shape)

    def vjp_many(self, params, cache, G, mask=None, in_shape=None, out_shape=None) -> np.ndarray:
        r"""``G J`` for a stack of cotangents: row ``j`` of example ``b`` is ``G[b, j] J^{l-1,l}_b``.

        Parameters
        ----------
        params, cache, mask
            As in :meth:`vjp` (``cache`` from :meth:`forward`).
        G : ndarray, shape (B, m, N_out)
            ``m`` cotangents (rows) per example over the flattened (NCHW) output.
        in_shape, out_shape : tuple, optional
            Per-example input and output shapes (default: from ``cache["x"]`` and
            :meth:`out_shape`).

        Returns
        -------
        ndarray, shape (B, m, N_in)
            The default pulls the ``m`` cotangents back one at a time through :meth:`vjp`.
        """
        in_shape, out_shape = self._stack_shapes(cache, in_shape, out_shape)
        B, m, _ = G.shape
        out = np.empty((B, m, prod(in_shape)), dtype=G.dtype)
        for j in range(m):
            gx, _ = self.vjp(params, cache, G[:, j].reshape(B, *out_shape), mask)
            out[:, j] = gx.reshape(B, -1)
        return out

    def jvp_many(self, params, cache, V, mask=None, in_shape=None, out_shape=None) -> np.ndarray:
        r"""``(J V^T)^T`` for a stack of tangents: row ``j`` of example ``b`` is ``J^{l-1,l}_b V[b, j]``.

        Parameters
        ----------
        params, cache, mask, in_shape, out_shape
            As in :meth:`vjp_many`.
        V : ndarray, shape (B, m, N_in)
            ``m`` tangents (rows) per example over the flattened (NCHW) input.

        Returns
        -------
        ndarray, shape (B, m, N_out)
            The default pushes the ``m`` tangents forward one at a time through :meth:`jvp`.
        """
        in_shape, out_shape = self._stack_shapes(cache, in_shape, out_shape)
        B, m, _ = V.shape
        out = np.empty((B, m, prod(out_shape)), dtype=V.dtype)
        for j in range(m):
            out[:, j] = self.jvp(params, cache, V[:, j].reshape(B, *in_shape), mask).reshape(B, -1)
        return out

    def mask_grads(self, params, cache, g) -> dict:
        r"""``dL/dc``: the derivative of ``L(c * theta)`` with respect to the mask ``c`` at the
        current mask, for every parameter ``theta`` of the layer.

        With the effective parameter ``theta_eff = c * theta``, ``dL/dc = (dL/d theta_eff) * theta``,
        where ``dL/d theta_eff`` is the parameter gradient of :meth:`vjp` WITHOUT the final
        multiplication by the mask; so a pruned entry gets the first-order change of the loss if it
        were re-added. At ``c = 1`` this is SNIP's ``g * w``.

        Parameters
        ----------
        params, cache
            As in :meth:`vjp`.
        g : ndarray, shape (B, *out_shape)
            ``dL/dy``, the gradient with respect to the layer's output.

        Returns
        -------
        dict
            Shaped like ``params``; ``{}`` for a parameter-free layer.
        """
        if self.keys:
            raise NotImplementedError(f"{type(self).__name__} has parameters {self.keys} but no mask_grads")
        return {}

    # --- second order (Pearlmutter's R-operator; driven by refnet.second_order) ---------------
    def rop_forward(self, params, cache, x_dot, mask=None, dparams=None) -> tuple:
        r"""Forward half of the R-operator: ``R{y}``, the derivative of the output along a
        direction ``V`` of the parameters (of this and earlier layers), from ``R{x}``.

        ``R{f} = d/dt f(theta + t V) |_{t=0}``. For an affine layer
        ``R{h} = W R{x} + (c * V_W) x + c_b * V_b`` and ``R{y} = D R{h}`` (the JVP with the parameter
        tangent ``V``); the second derivative ``phi''`` enters only on the way back
        (:meth:`rop_backward`). The default here is for parameter-free layers: linear (pooling,
        flatten) or piecewise linear with the arg-max held (max pooling), so ``R{y} = jvp(R{x})``.

        Parameters
        ----------
        params, cache, mask
            As in :meth:`vjp` (``cache`` from :meth:`forward`).
        x_dot : ndarray, shape (B, *in_shape), or None
            ``R{x}``; None means zero (the input of the first layer is data).
        dparams : dict or None
            This layer's part of ``V``, keys and shapes as ``params``; masked here (the direction of
            the effective parameter is ``mask * V``). None or a missing key: zero.

        Returns
        -------
        y_dot : ndarray, shape (B, *out_shape), or None
            ``R{y}`` (None when it is zero: no input tangent and no parameter direction).
        rcache : dict
            What :meth:`rop_backward` needs: ``"x_dot"`` (``R{x}`` or None) and, for Dense and
            Conv2d, ``"h_dot"`` (``R{h}`` or None); Conv2d adds ``"cols_dot"``
            (``im2col(R{x})`` or None).
        """
        if self.keys:
            raise NotImplementedError(f"{type(self).__name__} has parameters {self.keys} but no rop_forward")
        y_dot = None if x_dot is None else self.jvp(params, cache, x_dot, mask)
        return y_dot, {"x_dot": x_dot}

    def rop_backward(self, params, cache, rcache, g, g_dot, mask=None, dparams=None, input_grad=True, param_grads=True) -> tuple:
        r"""Backward half of the R-operator: the VJP and its directional derivative together.

        From ``g = dL/dy`` and ``R{g}`` (its derivative along ``V``) return ``dL/dx`` and
        ``R{dL/dx}``, the parameter gradients and their ``R{.}``: the rows of ``H V`` for this
        layer's parameters. For an affine layer (one example, ``g_h = dL/dh``)

        .. math::
            g_h = D g, \qquad R\{g_h\} = D\,R\{g\} + \phi''(h) \odot g \odot R\{h\},

            R\{\partial L/\partial W\} = c \odot \big(R\{g_h\}\, x^T + g_h\, R\{x\}^T\big), \qquad
            R\{\partial L/\partial b\} = c_b \odot R\{g_h\},

            R\{\partial L/\partial x\} = W^T R\{g_h\} + (c \odot V_W)^T g_h .

        The default here is for parameter-free layers (piecewise linear, second derivative zero):
        ``(vjp(g), vjp(R{g}), {}, {})``.

        Parameters
        ----------
        params, cache, mask, dparams
            As in :meth:`rop_forward`.
        rcache : dict
            From :meth:`rop_forward`.
        g, g_dot : ndarray, shape (B, *out_shape)
            ``dL/dy`` and ``R{dL/dy}``.
        input_grad : bool
            False skips ``dL/dx`` and ``R{dL/dx}`` (returned as None): the first layer.
        param_grads : bool
            False skips ``dL/dtheta`` (``grads`` returned as ``{}``): a Hessian-vector product alone
            does not need the gradient.

        Returns
        -------
        g_x, g_x_dot : ndarray, shape (B, *in_shape), or None
        grads, hv : dict
            ``dL/dtheta`` and ``R{dL/dtheta} = (H V)_theta``, shaped like ``params``, pruned entries
            exactly zero; ``{}`` for a parameter-free layer.
        """
        if self.keys:
            raise NotImplementedError(f"{type(self).__name__} has parameters {self.keys} but no rop_backward")
        if not input_grad:
            return None, None, {}, {}
        g_x, _ = self.vjp(params, cache, g, mask)
        g_x_dot, _ = self.vjp(params, cache, g_dot, mask)
        return g_x, g_x_dot, {}, {}

    def hessian_diag_backward(self, params, cache, Q, coef, g=None, mask=None, input_rows=True) -> tuple:
        r"""One layer of the exact (or Gauss-Newton) Hessian diagonal: pull back a signed factor of
        the per-example Hessian with respect to the output and read off the parameters' diagonal.

        The Hessian of the (mean) loss with respect to this layer's output, for example ``b``, is
        held as ``d^2L/dy_b^2 = sum_r coef[b, r] Q[b, r] Q[b, r]^T`` (rows ``Q[b, r]`` over the
        flattened output). Through an affine layer ``y = phi(h)``, ``h = W x + b``:

        .. math::
            \frac{\partial^2 L}{\partial h^2} = D \frac{\partial^2 L}{\partial y^2} D
                + \operatorname{diag}\big(\phi''(h) \odot g\big), \qquad
            \frac{\partial^2 L}{\partial x^2} = W^T \frac{\partial^2 L}{\partial h^2} W,

        so the rows become ``D Q`` and, for every unit ``a`` with a non-zero residual
        ``r_a = phi''(h_a) g_a``, one new row ``sqrt|r_a| e_a`` with coefficient ``sign r_a``; both
        are then pulled back through ``W``. ``h`` is linear in ``W``, so the weight block of the
        Hessian is ``sum_b (dh/dW)^T (d^2L/dh_b^2) (dh/dW)`` and its diagonal is a sum of squares of
        per-row weight gradients (Dense: ``diag(d^2L/dh^2)^T (x * x)``). With ``g`` None the
        residual rows are left out: the Gauss-Newton diagonal. Parameter-free layers are piecewise
        linear: their default here pulls the rows back with :meth:`vjp_many` and adds none.

        Parameters
        ----------
        params, cache, mask
            As in :meth:`vjp`.
        Q : ndarray, shape (B, r, N_out)
            The factor rows over the flattened (NCHW) output.
        coef : ndarray, shape (B, r)
            Their coefficients (signed).
        g : ndarray, shape (B, *out_shape), or None
            ``dL/dy`` for the exact Hessian; None for the Gauss-Newton matrix.
        input_rows : bool
            False skips the rows for the input (the first layer).

        Returns
        -------
        Q_in : ndarray, shape (B, r', N_in), or None
        coef_in : ndarray, shape (B, r'), or None
            The factor for the input (``r' >= r``: the residual rows appended).
        diag : dict
            The diagonal of the Hessian with respect to each parameter (through ``mask * theta``:
            zero at pruned entries), shaped like ``params``; ``{}`` for a parameter-free layer.
        """
        if self.keys:
            raise NotImplementedError(f"{type(self).__name__} has parameters {self.keys} but no hessian_diag_backward")
        if not input_rows:
            return None, None, {}
        return self.vjp_many(params, cache, Q, mask), coef, {}

    # --- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {"type": type(self).__name__}
        for k, v in asdict(self).items():
            if k == "activation":
                v = self.activation.to_dict()
            d[k] = list(v) if isinstance(v, tuple) else v
        return d


# ============================================================================================
# Affine layers
# ============================================================================================


class _Affine(Layer):
    """Shared part of :class:`Dense` and :class:`Conv2d` (both frozen dataclasses with the fields
    ``activation`` and ``bias``): their checks and the parameter names ``W`` (and ``b``)."""

    def _check_activation_and_bias(self) -> None:
        """Normalise ``activation`` to an :class:`Activation` and check that ``bias`` is a bool
        (the end of ``__post_init__``)."""
        object.__setattr__(self, "activation", get_activation(self.activation))
        if not isinstance(self.bias, (bool, np.bool_)):
            raise TypeError(f"bias must be a bool, got {type(self.bias).__name__}")
        object.__setattr__(self, "bias", bool(self.bias))

    @property
    def keys(self) -> tuple:
        return ("W", "b") if self.bias else ("W",)

    @property
    def is_affine_map(self) -> bool:
        return self.activation.is_linear

    def _residual(self, cache, g, h_dot=None):
        """``phi''(h) * g`` (times ``R{h}`` when given), or None for a linear activation."""
        if self.activation.is_linear:
            return None
        r = g * self.activation.d2phi(cache["h"])
        return r if h_dot is None else r * h_dot


@dataclass(frozen=True)
class Dense(_Affine):
    r"""Fully connected layer ``x^l = phi(h^l)``, ``h^l = x^{l-1} W^T + b``.

    Parameters
    ----------
    n_in, n_out : int
        ``W`` is ``(n_out, n_in)`` (PyTorch's ``nn.Linear`` layout), ``b`` is ``(n_out,)``.
    activation : str or Activation
        phi; default identity.
    bias : bool
        Whether the layer has ``b``.

    Formulas (per example, column vectors; batches are rows in code)
        forward  ``h = W x + b``, ``y = phi(h)``
        Jacobian ``J = D W`` with ``D = diag(phi'(h))``                       (:meth:`jacobian`)
        VJP      ``g_x = W^T (D g)``; ``dL/dW = (D g) x^T``, ``dL/db = D g``     (:meth:`vjp`)
        JVP      ``y_dot = D (W v + dW x + db)``                               (:meth:`jvp`)
        stacks   ``G -> (G * D) W``, ``V -> (V W^T) * D``, one GEMM each  (:meth:`vjp_many`, :meth:`jvp_many`)
        mask     ``dL/dc = ((D g) x^T) * W``, ``dL/dc_b = (D g) * b``            (:meth:`mask_grads`)
        R-op     ``R{h} = W R{x} + V_W x + V_b``, ``R{y} = D R{h}``;                 (:meth:`rop_forward`)
                 ``R{g_h} = D R{g} + phi''(h) g R{h}``, ``(H V)_W = R{g_h} x^T + g_h R{x}^T``,
                 ``R{g_x} = W^T R{g_h} + V_W^T g_h``                              (:meth:`rop_backward`)
        diag H   ``diag_W = diag(d2L/dh2) (x * x)^T`` with ``d2L/dh2 = D (d2L/dy2) D + diag(phi''(h) g)``
                                                                           (:meth:`hessian_diag_backward`)
    with ``W`` the effective weight ``mask * W`` (the stored ``W`` in ``dL/dc``).
    """

    n_in: int
    n_out: int
    activation: Activation = "identity"
    bias: bool = True

    def __post_init__(self):
        object.__setattr__(self, "n_in", check_int(self.n_in, "n_in", min_value=1))
        object.__setattr__(self, "n_out", check_int(self.n_out, "n_out", min_value=1))
        self._check_activation_and_bias()

    def out_shape(self, in_shape):
        if tuple(in_shape) != (self.n_in,):
            raise ValueError(
                f"Dense({self.n_in}, {self.n_out}) needs per-example input shape ({self.n_in},), "
                f"got {tuple(in_shape)} (add a Flatten layer before it for images)"
            )
        return (self.n_out,)

    def param_shapes(self, in_shape):
        shapes = {"W": (self.n_out, self.n_in)}
        if self.bias:
            shapes["b"] = (self.n_out,)
        return shapes

    def init(self, rng, in_shape, initializer, dtype):
        self.out_shape(in_shape)
        params = {"W": initializer.weight(rng, (self.n_out, self.n_in), dtype=dtype)}
        if self.bias:
            params["b"] = initializer.bias(rng, (self.n_out,), dtype=dtype)
        return params

    def forward(self, params, x, mask=None):
        mW = _mask_of(mask, "W")
        h = kernels.masked_matmul(x, params["W"], mW)  # (B, n_out) = x (mask*W)^T
        if self.bias:
            h = h + _masked(params, mask, "b")
        y, D = self.activation.phi_dphi(h)  # (B, n_out) each
        return y, {"x": x, "h": h, "D": D}

    def vjp(self, params, cache, g, mask=None, input_grad=True):
        gh = g * cache["D"]  # (B, n_out): dL/dh
        mW = _mask_of(mask, "W")
        gW = gh.T @ cache["x"]  # (n_out, n_in)
        grads = {"W": gW if mW is None else gW * mW}
        if self.bias:
            grads["b"] = _mask_grad(gh.sum(axis=0), mask, "b")  # (n_out,)
        g_x = kernels.masked_matmul_t(gh, params["W"], mW) if input_grad else None  # (B, n_in)
        return g_x, grads

    def jvp(self, params, cache, v, mask=None, dparams=None):
        h_dot = v @ _masked(params, mask, "W").T  # (B, n_out)
        if dparams is not None:
            if "W" in dparams:
                h_dot = h_dot + cache["x"] @ _masked(dparams, mask, "W").T
            if self.bias and "b" in dparams:
                h_dot = h_dot + _masked(dparams, mask, "b")
        return cache["D"] * h_dot

    def jacobian_factors(self, params, cache, mask=None) -> tuple:
        """The two factors of ``J^{l-1,l} = D^l W^l``: the effective weight ``mask * W``
        ``(n_out, n_in)`` (shared by the batch) and the diagonals ``D = phi'(h)`` ``(B, n_out)``."""
        return _masked(params, mask, "W"), cache["D"]

    def jacobian(self, params, cache, mask=None):
        W, D = self.jacobian_factors(params, cache, mask)  # (n_out, n_in), (B, n_out)
        return D[:, :, None] * W[None, :, :]  # (B, n_out, n_in): J = D W

    def vjp_many(self, params, cache, G, mask=None, in_shape=None, out_shape=None):
        """``G J = (G * D) W`` for ``G`` ``(B, m, n_out)``: one GEMM with the shared weight."""
        B, m, _ = G.shape
        W, D = self.jacobian_factors(params, cache, mask)
        return ((G * D[:, None, :]).reshape(B * m, -1) @ W).reshape(B, m, W.shape[1])  # (B, m, n_in)

    def jvp_many(self, params, cache, V, mask=None, in_shape=None, out_shape=None):
        """``(J V^T)^T = (V W^T) * D`` for ``V`` ``(B, m, n_in)``: one GEMM with the shared weight."""
        B, m, _ = V.shape
        W, D = self.jacobian_factors(params, cache, mask)
        return (V.reshape(B * m, -1) @ W.T).reshape(B, m, W.shape[0]) * D[:, None, :]  # (B, m, n_out)

    def mask_grads(self, params, cache, g):
        """``dL/dc_W = (gh^T x) * W`` and ``dL/dc_b = (sum_i gh_i) * b`` with ``gh = g * D``."""
        gh = g * cache["D"]  # (B, n_out): dL/dh
        out = {"W": (gh.T @ cache["x"]) * params["W"]}  # (n_out, n_in): dL/dW_eff, unmasked, times W
        if self.bias:
            out["b"] = gh.sum(axis=0) * params["b"]  # (n_out,)
        return out

    def rop_forward(self, params, cache, x_dot, mask=None, dparams=None):
        """``R{h} = R{x} (c W)^T + x (c V_W)^T + c_b V_b`` and ``R{y} = D R{h}``
        (see :meth:`Layer.rop_forward`)."""
        h_dot = None
        if x_dot is not None:
            h_dot = x_dot @ _masked(params, mask, "W").T  # (B, n_out): W R{x}
        if dparams is not None and "W" in dparams:
            t = cache["x"] @ _masked(dparams, mask, "W").T  # (B, n_out): V_W x
            h_dot = t if h_dot is None else h_dot + t
        if self.bias and dparams is not None and "b" in dparams:
            vb = _masked(dparams, mask, "b")  # (n_out,)
            h_dot = np.zeros_like(cache["h"]) + vb if h_dot is None else h_dot + vb
        if h_dot is None:
            return None, {"x_dot": None, "h_dot": None}
        return cache["D"] * h_dot, {"x_dot": x_dot, "h_dot": h_dot}  # (B, n_out)

    def rop_backward(self, params, cache, rcache, g, g_dot, mask=None, dparams=None, input_grad=True, param_grads=True):
        """``g_h = D g``, ``R{g_h} = D R{g} + phi''(h) g R{h}``; ``R{dL/dW} = c (R{g_h}^T x +
        g_h^T R{x})`` (rows are examples), ``R{dL/db} = c_b sum R{g_h}``,
        ``R{dL/dx} = R{g_h} (c W) + g_h (c V_W)`` (see :meth:`Layer.rop_backward`)."""
        x, D = cache["x"], cache["D"]
        x_dot, h_dot = rcache["x_dot"], rcache["h_dot"]
        gh = g * D  # (B, n_out): dL/dh
        gh_dot = g_dot * D  # (B, n_out): R{dL/dh}, the first-order part
        if h_dot is not None:
            r = self._residual(cache, g, h_dot)
            if r is not None:
                gh_dot = gh_dot + r  # + phi''(h) g R{h}
        gW_dot = gh_dot.T @ x  # (n_out, n_in)
        if x_dot is not None:
            gW_dot = gW_dot + gh.T @ x_dot
        grads = {"W": _mask_grad(gh.T @ x, mask, "W")} if param_grads else {}
        hv = {"W": _mask_grad(gW_dot, mask, "W")}
        if self.bias:
            if param_grads:
                grads["b"] = _mask_grad(gh.sum(axis=0), mask, "b")  # (n_out,)
            hv["b"] = _mask_grad(gh_dot.sum(axis=0), mask, "b")
        if not input_grad:
            return None, None, grads, hv
        W = _masked(params, mask, "W")  # (n_out, n_in)
        g_x = gh @ W  # (B, n_in)
        g_x_dot = gh_dot @ W
        if dparams is not None and "W" in dparams:
            g_x_dot = g_x_dot + gh @ _masked(dparams, mask, "W")
        return g_x, g_x_dot, grads, hv

    def hessian_diag_backward(self, params, cache, Q, coef, g=None, mask=None, input_rows=True):
        """Rows ``M = Q * D`` of ``d^2L/dh^2`` (plus the diagonal residual ``phi''(h) g``);
        ``diag_W = c * (diag(d^2L/dh^2)^T (x * x))``, ``diag_b = c_b * sum diag(d^2L/dh^2)``; rows
        for the input ``M (c W)`` and ``sqrt|r_a| (c W)_a`` (see :meth:`Layer.hessian_diag_backward`)."""
        B, r, n_out = Q.shape
        M = Q * cache["D"][:, None, :]  # (B, r, n_out): rows of D (d2L/dy2) D
        diag_h = np.einsum("br,bra->ba", coef, M * M)  # (B, n_out): diag of the first part
        res = None if g is None else self._residual(cache, g)  # (B, n_out): phi''(h) g
        if res is not None:
            diag_h = diag_h + res
        x = cache["x"]
        diag = {"W": _mask_grad(diag_h.T @ (x * x), mask, "W")}  # (n_out, n_in)
        if self.bias:
            diag["b"] = _mask_grad(diag_h.sum(axis=0), mask, "b")
        if not input_rows:
            return None, None, diag
        W = _masked(params, mask, "W")  # (n_out, n_in)
        Q_in = (M.reshape(B * r, n_out) @ W).reshape(B, r, W.shape[1])  # (B, r, n_in)
        if res is not None:
            units = np.flatnonzero(np.any(res != 0, axis=0))
            if units.size:
                rows = np.sqrt(np.abs(res[:, units]))[:, :, None] * W[units][None]  # (B, u, n_in)
                Q_in = np.concatenate([Q_in, rows], axis=1)
                coef = np.concatenate([coef, np.sign(res[:, units])], axis=1)
        return Q_in, coef, diag


@dataclass(frozen=True)
class Conv2d(_Affine):
    r"""2-D convolution with an activation, via im2col (:mod:`refnet.conv`).

    Parameters
    ----------
    c_in, c_out : int
        ``W`` is ``(c_out, c_in, kh, kw)`` (PyTorch's ``nn.Conv2d`` layout), ``b`` is ``(c_out,)``.
    kernel_size, stride, padding : int or (int, int)
    padding_mode : {"zeros", "circular"}
    activation : str or Activation
    bias : bool

    Formulas (``cols`` = im2col(x), ``(B, P, K)``; ``W_f`` = W reshaped ``(c_out, K)``)
        forward  ``h = cols W_f^T + b``, ``y = phi(h)``
        VJP      ``dL/dW_f = sum_{b,p} (D g)^T cols``, ``dL/db = sum (D g)``,
                 ``g_x = col2im((D g) W_f)``
        JVP      ``y_dot = D (conv(v, W) + conv(x, dW) + db)``
        Jacobian ``J = D M`` with ``M`` the explicit operator matrix (:func:`refnet.conv.conv_matrix`)
        mask     ``dL/dc = (sum_{b,p} (D g)^T cols) * W`` reshaped, ``dL/dc_b = sum (D g) * b``
        R-op     ``R{h} = D (conv(R{x}, W) + conv(x, V_W) + V_b)`` and its adjoint pass, as Dense with
                 ``cols`` and ``im2col(R{x})`` for ``x`` and ``R{x}``   (:meth:`rop_forward`, :meth:`rop_backward`)
    """

    c_in: int
    c_out: int
    kernel_size: tuple = 3
    stride: tuple = 1
    padding: tuple = 0
    padding_mode: str = "zeros"
    activation: Activation = "identity"
    bias: bool = True

    def __post_init__(self):
        object.__setattr__(self, "c_in", check_int(self.c_in, "c_in", min_value=1))
        object.__setattr__(self, "c_out", check_int(self.c_out, "c_out", min_value=1))
        object.__setattr__(self, "kernel_size", _pair(self.kernel_size, "kernel_size", 1))
        object.__setattr__(self, "stride", _pair(self.stride, "stride", 1))
        object.__setattr__(self, "padding", _pair(self.padding, "padding", 0))
        object.__setattr__(
            self, "padding_mode", check_choice(self.padding_mode, "padding_mode", ["zeros", "circular"])
        )
        self._check_activation_and_bias()

    def out_shape(self, in_shape):
        in_shape = tuple(in_shape)
        if len(in_shape) != 3 or in_shape[0] != self.c_in:
            raise ValueError(
                f"Conv2d({self.c_in}, {self.c_out}) needs per-example input shape ({self.c_in}, H, W), "
                f"got {in_shape}"
            )
        Ho, Wo = _conv.conv_output_size(in_shape[1], in_shape[2], self.kernel_size, self.stride, self.padding)
        return (self.c_out, Ho, Wo)

    def param_shapes(self, in_shape):
        shapes = {"W": (self.c_out, self.c_in, *self.kernel_size)}
        if self.bias:
            shapes["b"] = (self.c_out,)
        return shapes

    def init(self, rng, in_shape, initializer, dtype):
        self.out_shape(in_shape)
        params = {"W": initializer.weight(rng, (self.c_out, self.c_in, *self.kernel_size), dtype=dtype)}
        if self.bias:
            params["b"] = initializer.bias(rng, (self.c_out,), dtype=dtype)
        return params

    def _geom(self):
        return self.kernel_size, self.stride, self.padding, self.padding_mode

    def _conv(self, x, W):
        """Bias-free pre-activation and the im2col patches."""
        B, _, H, Wd = x.shape
        Ho, Wo = _conv.conv_output_size(H, Wd, self.kernel_size, self.stride, self.padding)
        cols = _conv.im2col(x, *self._geom())  # (B, P, K)
        h = cols @ W.reshape(self.c_out, -1).T  # (B, P, c_out)
        return h, cols, (Ho, Wo)

    def forward(self, params, x, mask=None):
        W = _masked(params, mask, "W")
        hp, cols, (Ho, Wo) = self._conv(x, W)  # (B, P, c_out)
        if self.bias:
            hp = hp + _masked(params, mask, "b")
        h = np.ascontiguousarray(hp.transpose(0, 2, 1)).reshape(x.shape[0], self.c_out, Ho, Wo)
        y, D = self.activation.phi_dphi(h)  # (B, c_out, Ho, Wo) each
        return y, {"x": x, "h": h, "D": D, "cols": cols}

    def vjp(self, params, cache, g, mask=None, input_grad=True):
        x, cols = cache["x"], cache["cols"]
        B = x.shape[0]
        gh = (g * cache["D"]).reshape(B, self.c_out, -1)  # (B, c_out, P): dL/dh
        gW = np.einsum("bop,bpk->ok", gh, cols, optimize=True).reshape(self.c_out, self.c_in, *self.kernel_size)
        grads = {"W": _mask_grad(gW, mask, "W")}
        if self.bias:
            grads["b"] = _mask_grad(gh.sum(axis=(0, 2)), mask, "b")
        if not input_grad:
            return None, grads
        Wf = _masked(params, mask, "W").reshape(self.c_out, -1)  # (c_out, K)
        g_cols = gh.transpose(0, 2, 1) @ Wf  # (B, P, K)
        g_x = _conv.col2im(g_cols, x.shape, *self._geom())
        return g_x, grads

    def jvp(self, params, cache, v, mask=None, dparams=None):
        B = v.shape[0]
        hp, _, (Ho, Wo) = self._conv(v, _masked(params, mask, "W"))  # (B, P, c_out)
        if dparams is not None:
            if "W" in dparams:
                dW = _masked(dparams, mask, "W").reshape(self.c_out, -1)
                hp = hp + cache["cols"] @ dW.T
            if self.bias and "b" in dparams:
                hp = hp + _masked(dparams, mask, "b")
        h_dot = np.ascontiguousarray(hp.transpose(0, 2, 1)).reshape(B, self.c_out, Ho, Wo)
        return cache["D"] * h_dot

    def vjp_many(self, params, cache, G, mask=None, in_shape=None, out_shape=None):
        """``G J`` for ``G`` ``(B, m, N_out)``: the input half of :meth:`vjp` for all ``m`` cotangents
        at once, ``g_x = col2im((G * D)^T W_f)`` with ``G * D`` as ``(B m, c_out, P)``, in chunks of
        vectors whose patch gradients ``(B chunk, P, K)`` hold at most
        :data:`STACK_CHUNK_ELEMENTS` elements (one vector at least); the weight gradient is not
        formed. Each example's ``(P, c_out) @ (c_out, K)`` product and its ``col2im`` are those
        :meth:`vjp` computes for one vector, so the result equals the loop of
        :meth:`Layer.vjp_many` to the bit (tested). The forward side keeps that loop
        (:meth:`Layer.jvp_many`): a batched im2col changes the memory layout of the patches, and
        with it, in some shapes (seen with ``c_out = 1``), the rounding of NumPy's product."""
        in_shape, out_shape = self._stack_shapes(cache, in_shape, out_shape)
        B, m, _ = G.shape
        Wf = _masked(params, mask, "W").reshape(self.c_out, -1)  # (c_out, K)
        D = cache["D"][:, None]  # (B, 1, c_out, Ho, Wo)
        out = np.empty((B, m, prod(in_shape)), dtype=G.dtype)
        for j0, j1 in self._chunks(B, m, out_shape[1] * out_shape[2] * Wf.shape[1]):
            c = j1 - j0
            gh = (G[:, j0:j1].reshape(B, c, *out_shape) * D).reshape(B * c, self.c_out, -1)  # (B c, c_out, P)
            g_cols = gh.transpose(0, 2, 1) @ Wf  # (B c, P, K)
            out[:, j0:j1] = _conv.col2im(g_cols, (B * c, *in_shape), *self._geom()).reshape(B, c, -1)
        return out

    @staticmethod
    def _chunks(B: int, m: int, per_vector: int):
        """``(j0, j1)`` ranges over ``m`` vectors with ``B * (j1 - j0) * per_vector`` elements at most
        :data:`STACK_CHUNK_ELEMENTS` (one vector at least)."""
        step = max(1, STACK_CHUNK_ELEMENTS // max(1, B * per_vector))
        return [(j0, min(m, j0 + step)) for j0 in range(0, m, step)]

    def mask_grads(self, params, cache, g):
        """``dL/dc_W = (sum_{i,p} gh_{i,:,p} cols_{i,p}^T) * W`` (reshaped) and
        ``dL/dc_b = (sum_{i,p} gh_{i,:,p}) * b`` with ``gh = g * D``; the sum over examples and
        positions is einsum's own loop (as it has always been here), not the BLAS contraction of
        :meth:`vjp`."""
        gh = (g * cache["D"]).reshape(g.shape[0], self.c_out, -1)  # (B, c_out, P): dL/dh
        gW_eff = np.einsum("bop,bpk->ok", gh, cache["cols"]).reshape(params["W"].shape)  # unmasked
        out = {"W": gW_eff * params["W"]}
        if self.bias:
            out["b"] = gh.sum(axis=(0, 2)) * params["b"]  # (c_out,)
        return out

    def jacobian(self, params, cache, mask=None):
        x = cache["x"]
        M = _conv.conv_matrix(_masked(params, mask, "W"), x.shape[1:], self.stride, self.padding, self.padding_mode)
        return _rows(cache["D"])[:, :, None] * M[None]  # (B, n_out, n_in): J = D M

    def _to_nchw(self, hp, shape):
        """``(B, P, c_out)`` (im2col rows) to ``shape`` ``(B, c_out, Ho, Wo)``."""
        return np.ascontiguousarray(hp.transpose(0, 2, 1)).reshape(shape)

    def rop_forward(self, params, cache, x_dot, mask=None, dparams=None):
        """``R{h} = conv(R{x}, c W) + conv(x, c V_W) + c_b V_b`` (im2col: ``im2col(R{x}) W_f^T +
        cols V_f^T``) and ``R{y} = D R{h}`` (see :meth:`Layer.rop_forward`)."""
        cols_dot = hp = None
        if x_dot is not None:
            cols_dot = _conv.im2col(x_dot, *self._geom())  # (B, P, K): im2col(R{x})
            hp = cols_dot @ _masked(params, mask, "W").reshape(self.c_out, -1).T  # (B, P, c_out)
        if dparams is not None and "W" in dparams:
            t = cache["cols"] @ _masked(dparams, mask, "W").reshape(self.c_out, -1).T  # (B, P, c_out)
            hp = t if hp is None else hp + t
        if self.bias and dparams is not None and "b" in dparams:
            vb = _masked(dparams, mask, "b")  # (c_out,)
            hp = np.zeros(cache["cols"].shape[:2] + (self.c_out,), dtype=cache["h"].dtype) + vb if hp is None else hp + vb
        if hp is None:
            return None, {"x_dot": None, "h_dot": None, "cols_dot": None}
        h_dot = self._to_nchw(hp, cache["h"].shape)  # (B, c_out, Ho, Wo)
        return cache["D"] * h_dot, {"x_dot": x_dot, "h_dot": h_dot, "cols_dot": cols_dot}

    def rop_backward(self, params, cache, rcache, g, g_dot, mask=None, dparams=None, input_grad=True, param_grads=True):
        """``g_h = D g``, ``R{g_h} = D R{g} + phi''(h) g R{h}``;
        ``R{dL/dW_f} = c (sum_{b,p} R{g_h}^T cols + g_h^T im2col(R{x}))``, ``R{dL/db} = c_b sum R{g_h}``,
        ``R{dL/dx} = col2im(R{g_h}^T W_f + g_h^T V_f)`` (see :meth:`Layer.rop_backward`)."""
        x, cols = cache["x"], cache["cols"]
        B = x.shape[0]
        gh = g * cache["D"]  # (B, c_out, Ho, Wo): dL/dh
        gh_dot = g_dot * cache["D"]
        if rcache["h_dot"] is not None:
            r = self._residual(cache, g, rcache["h_dot"])
            if r is not None:
                gh_dot = gh_dot + r  # + phi''(h) g R{h}
        gh = gh.reshape(B, self.c_out, -1)  # (B, c_out, P)
        gh_dot = gh_dot.reshape(B, self.c_out, -1)
        shape = params["W"].shape
        gW_dot = np.einsum("bop,bpk->ok", gh_dot, cols, optimize=True)  # (c_out, K)
        if rcache["cols_dot"] is not None:
            gW_dot = gW_dot + np.einsum("bop,bpk->ok", gh, rcache["cols_dot"], optimize=True)
        grads = {}
        if param_grads:
            grads["W"] = _mask_grad(np.einsum("bop,bpk->ok", gh, cols, optimize=True).reshape(shape), mask, "W")
        hv = {"W": _mask_grad(gW_dot.reshape(shape), mask, "W")}
        if self.bias:
            if param_grads:
                grads["b"] = _mask_grad(gh.sum(axis=(0, 2)), mask, "b")
            hv["b"] = _mask_grad(gh_dot.sum(axis=(0, 2)), mask, "b")
        if not input_grad:
            return None, None, grads, hv
        Wf = _masked(params, mask, "W").reshape(self.c_out, -1)  # (c_out, K)
        g_x = _conv.col2im(gh.transpose(0, 2, 1) @ Wf, x.shape, *self._geom())
        g_cols_dot = gh_dot.transpose(0, 2, 1) @ Wf  # (B, P, K)
        if dparams is not None and "W" in dparams:
            g_cols_dot = g_cols_dot + gh.transpose(0, 2, 1) @ _masked(dparams, mask, "W").reshape(self.c_out, -1)
        return g_x, _conv.col2im(g_cols_dot, x.shape, *self._geom()), grads, hv

    def hessian_diag_backward(self, params, cache, Q, coef, g=None, mask=None, input_rows=True):
        """Rows ``M = Q * D`` of ``d^2L/dh^2`` (plus the diagonal residual ``phi''(h) g``). The
        weight diagonal is ``sum_{b,r} coef (M_{b,r} cols_b)^2`` (each row's own weight gradient,
        squared; in chunks of rows) plus ``sum_{b,p} r_{b,o,p} cols_{b,p,k}^2`` for the residual;
        rows for the input go through the explicit operator ``M_op``
        (:func:`refnet.conv.conv_matrix`, ``h = M_op x``): ``M M_op`` and ``sqrt|r_a| (M_op)_a``
        (see :meth:`Layer.hessian_diag_backward`)."""
        x, cols = cache["x"], cache["cols"]
        B, r, _ = Q.shape
        P, K = cols.shape[1], cols.shape[2]
        M = Q * _rows(cache["D"])[:, None, :]  # (B, r, c_out P): rows of D (d2L/dy2) D
        dWf = np.zeros((self.c_out, K), dtype=Q.dtype)
        for j0, j1 in self._chunks(B, r, self.c_out * K):
            Gr = M[:, j0:j1].reshape(B, (j1 - j0) * self.c_out, P) @ cols  # (B, c c_out, K): per-row dL/dW_f
            Gr = Gr.reshape(B, j1 - j0, self.c_out, K)
            dWf += np.einsum("br,brok->ok", coef[:, j0:j1], Gr * Gr)
        S = M.reshape(B, r, self.c_out, P).sum(axis=3)  # (B, r, c_out): per-row dL/db
        db = np.einsum("br,bro->o", coef, S * S)
        res = None if g is None else self._residual(cache, g)  # (B, c_out, Ho, Wo)
        if res is not None:
            rf = res.reshape(B, self.c_out, P)
            dWf += np.einsum("bop,bpk->ok", rf, cols * cols)
            db = db + rf.sum(axis=(0, 2))
        diag = {"W": _mask_grad(dWf.reshape(params["W"].shape), mask, "W")}
        if self.bias:
            diag["b"] = _mask_grad(db, mask, "b")
        if not input_rows:
            return None, None, diag
        Mop = _conv.conv_matrix(_masked(params, mask, "W"), x.shape[1:], self.stride, self.padding, self.padding_mode)
        Q_in = (M.reshape(B * r, -1) @ Mop).reshape(B, r, Mop.shape[1])  # (B, r, N_in)
        if res is not None:
            res = _rows(res)  # (B, c_out P)
            units = np.flatnonzero(np.any(res != 0, axis=0))
            if units.size:
                rows = np.sqrt(np.abs(res[:, units]))[:, :, None] * Mop[units][None]  # (B, u, N_in)
                Q_in = np.concatenate([Q_in, rows], axis=1)
                coef = np.concatenate([coef, np.sign(res[:, units])], axis=1)
        return Q_in, coef, diag


# ============================================================================================
# Parameter-free layers (D = I)
# ============================================================================================


def _check_image(in_shape, who):
    in_shape = tuple(in_shape)
    if len(in_shape) != 3:
        raise ValueError(f"{who} needs per-example input shape (C, H, W), got {in_shape}")
    return in_shape


@dataclass(frozen=True)
class _Pool2d(Layer):
    """Shared part of the ``k x k`` pooling layers: non-overlapping windows, stride ``k``, and
    trailing rows and columns that do not fill a window dropped (PyTorch's default floor mode)."""

    kernel_size: int = 2

    def __post_init__(self):
        object.__setattr__(self, "kernel_size", check_int(self.kernel_size, "kernel_size", min_value=1))

    def out_shape(self, in_shape):
        name = type(self).__name__
        C, H, W = _check_image(in_shape, name)
        k = self.kernel_size
        if H < k or W < k:
            raise ValueError(f"{name}({k}) needs H, W >= {k}, got {(H, W)}")
        return (C, H // k, W // k)

    def _blocks(self, x):
        """``(B, C, H, W) -> (B, C, Ho, k, Wo, k)``: ``[b, c, i, u, j, v] = x[b, c, i k + u, j k + v]``."""
        B, C, H, W = x.shape
        k = self.kernel_size
        Ho, Wo = H // k, W // k
        return x[:, :, : Ho * k, : Wo * k].reshape(B, C, Ho, k, Wo, k)

    @staticmethod
    def _unblock(x, g_x_windows):
        """The input gradient: ``g_x_windows`` (B, C, Ho k, Wo k) placed over the windows of a zero
        array shaped as ``x``; the dropped trailing rows and columns get zero."""
        _, _, Hk, Wk = g_x_windows.shape
        g_x = np.zeros_like(x)
        g_x[:, :, :Hk, :Wk] = g_x_windows
        return g_x


@dataclass(frozen=True)
class AvgPool2d(_Pool2d):
    """Average pooling over non-overlapping ``k x k`` windows (stride k; trailing rows and
    columns that do not fill a window are dropped, as PyTorch's default floor mode).

    ``y[b, c, i, j] = (1/k^2) sum_{u,v<k} x[b, c, i k + u, j k + v]``; linear, so the JVP is the map
    itself and the VJP spreads ``g / k^2`` over each window.
    """

    is_affine_map = True

    def _pool(self, x):
        return self._blocks(x).mean(axis=(3, 5))

    def forward(self, params, x, mask=None):
        return self._pool(x), {"x": x}

    def vjp(self, params, cache, g, mask=None, input_grad=True):
        k = self.kernel_size
        spread = np.repeat(np.repeat(g, k, axis=2), k, axis=3) / (k * k)  # (B, C, Ho k, Wo k)
        return self._unblock(cache["x"], spread), {}

    def jvp(self, params, cache, v, mask=None, dparams=None):
        return self._pool(v)


@dataclass(frozen=True)
class MaxPool2d(_Pool2d):
    """Max pooling over non-overlapping ``k x k`` windows (stride k, floor mode).

    The derivative routes through the arg-max of each window (the first one on ties, as
    ``np.argmax``): ``y_dot = v[argmax]``, and the VJP puts ``g`` at the arg-max.
    """

    def _windows(self, x):
        win = self._blocks(x)  # (B, C, Ho, k, Wo, k)
        B, C, Ho, k, Wo, _ = win.shape
        return win.transpose(0, 1, 2, 4, 3, 5).reshape(B, C, Ho, Wo, k * k)

    def forward(self, params, x, mask=None):
        win = self._windows(x)  # (B, C, Ho, Wo, k*k)
        arg = win.argmax(axis=-1)  # (B, C, Ho, Wo)
        y = np.take_along_axis(win, arg[..., None], axis=-1)[..., 0]
        return y, {"x": x, "arg": arg}

    def jvp(self, params, cache, v, mask=None, dparams=None):
        win = self._windows(v)
        return np.take_along_axis(win, cache["arg"][..., None], axis=-1)[..., 0]

    def vjp(self, params, cache, g, mask=None, input_grad=True):
        arg = cache["arg"]
        B, C, Ho, Wo = g.shape
        k = self.kernel_size
        win = np.zeros((B, C, Ho, Wo, k * k), dtype=g.dtype)
        np.put_along_axis(win, arg[..., None], g[..., None], axis=-1)
        win = win.reshape(B, C, Ho, Wo, k, k).transpose(0, 1, 2, 4, 3, 5).reshape(B, C, Ho * k, Wo * k)
        return self._unblock(cache["x"], win), {}


@dataclass(frozen=True)
class GlobalAvgPool2d(Layer):
    """Mean over the spatial axes: ``(B, C, H, W) -> (B, C)``."""

    is_affine_map = True

    def out_shape(self, in_shape):
        C, H, W = _check_image(in_shape, "GlobalAvgPool2d")
        return (C,)

    def forward(self, params, x, mask=None):
        return x.mean(axis=(2, 3)), {"x": x}

    def jvp(self, params, cache, v, mask=None, dparams=None):
        return v.mean(axis=(2, 3))

    def vjp(self, params, cache, g, mask=None, input_grad=True):
        x = cache["x"]
        H, W = x.shape[2:]
        return np.broadcast_to(g[:, :, None, None] / (H * W), x.shape).copy(), {}


@dataclass(frozen=True)
class Flatten(Layer):
    """``(B, *shape) -> (B, prod(shape))`` in C (NCHW) order; its Jacobian is the identity."""

    is_affine_map = True
    flat_identity = True

    def out_shape(self, in_shape):
        return (prod(in_shape),)

    def forward(self, params, x, mask=None):
        return _rows(x), {"x": x}

    def jvp(self, params, cache, v, mask=None, dparams=None):
        return _rows(v)

    def vjp(self, params, cache, g, mask=None, input_grad=True):
        return g.reshape(cache["x"].shape), {}

    def vjp_many(self, params, cache, G, mask=None, in_shape=None, out_shape=None):
        """``G J = G``: stacks are already flattened, so the stack itself (not a copy)."""
        return G

    def jvp_many(self, params, cache, V, mask=None, in_shape=None, out_shape=None):
        """``(J V^T)^T = V``: the stack itself (not a copy)."""
        return V

    def jacobian(self, params, cache, mask=None):
        x = cache["x"]
        n = prod(x.shape[1:])
        return np.broadcast_to(np.eye(n, dtype=x.dtype), (x.shape[0], n, n)).copy()


LAYER_TYPES = {cls.__name__: cls for cls in (Dense, Conv2d, AvgPool2d, MaxPool2d, GlobalAvgPool2d, Flatten)}


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
