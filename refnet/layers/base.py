"""The layer protocol (:class:`Layer`), the shared part of the affine layers (:class:`Affine`) and
the helpers every layer uses: the effective (masked) parameter, the masked gradient, flat rows."""

from __future__ import annotations

from dataclasses import asdict
from math import prod

import numpy as np

from .._checks import check_int
from ..activations import get_activation

__all__ = ["Affine", "Layer", "NoSecondOrder", "effective_param", "flat_rows", "mask_of", "masked_grad", "masked_kernel", "pair_arg", "stored_finite", "where_kept"]


def pair_arg(value, name: str, min_value: int) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
        return (check_int(value[0], name, min_value=min_value), check_int(value[1], name, min_value=min_value))
    v = check_int(value, name, min_value=min_value)
    return (v, v)


def where_kept(a, m):
    """``where(m, a, 0)``: ``a`` at kept entries and exactly 0 at pruned ones, whatever ``a``
    holds there (NaN and inf included: ``m * a`` would give ``0 * NaN = NaN``). A non-boolean
    mask (weights in [0, 1]) gives ``m * a`` at its non-zero entries and 0 elsewhere."""
    if m.dtype == bool:
        return np.where(m, a, 0)
    return np.where(m != 0, a * m, 0)


def effective_param(params: dict, mask: dict | None, key: str):
    """The effective parameter ``where(mask[key], params[key], 0)`` (or the parameter itself):
    the one place a layer forms it. A pruned entry contributes exactly zero whatever the stored
    value, so a NaN or inf stored at a pruned position never reaches an output, a gradient or a
    Jacobian (:func:`where_kept`)."""
    m = mask_of(mask, key)
    return params[key] if m is None else where_kept(params[key], m)


def stored_finite(a):
    """``a`` with its non-finite entries replaced by 0 (``a`` itself when all are finite): the
    stored values a mask gradient ``dL/dc = (dL/d theta_eff) * theta`` multiplies. Kept entries
    are finite (the network checks them), so only a pruned entry can hold NaN or inf, and such a
    value is not a weight that could be put back: its ``dL/dc`` is 0, not NaN."""
    finite = np.isfinite(a)
    return a if finite.all() else np.where(finite, a, 0)


def masked_kernel(kernel, a, W, m):
    """``kernel(a, W, m)`` for the masked-product kernels (:func:`refnet.kernels.masked_matmul`,
    :func:`~refnet.kernels.masked_matmul_t`), with the rule of :func:`effective_param`: their
    fast paths form ``mask * W`` (or read the kept entries only), so a non-finite result of a
    masked product is computed again on ``where(mask, W, 0)``; a NaN stored at a pruned position
    then cannot leak, and the common (finite) case costs one ``isfinite`` of the result."""
    with np.errstate(invalid="ignore"):  # 0 * NaN here is what the second call avoids
        out = kernel(a, W, m)
    if m is not None and not np.isfinite(out).all():
        out = kernel(a, where_kept(W, m), m)
    return out


def flat_rows(a: np.ndarray) -> np.ndarray:
    """``(B, *shape) -> (B, prod(shape))``, also for an empty batch."""
    return a.reshape(a.shape[0], prod(a.shape[1:]))


def mask_of(mask: dict | None, key: str):
    """The mask of ``key``, or None when there is none or it keeps everything (a cheap check
    on booleans that saves the multiplications of unpruned layers)."""
    m = None if mask is None else mask.get(key)
    return None if m is None or m.all() else m


def masked_grad(g: np.ndarray, mask: dict | None, key: str) -> np.ndarray:
    """``g`` with its pruned entries exactly zero (:func:`where_kept`)."""
    m = mask_of(mask, key)
    return g if m is None else where_kept(g, m)




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
            cols.append(flat_rows(self.jvp(params, cache, e.reshape(x.shape), mask)))
        return np.stack(cols, axis=2)  # (B, n_out, n_in)

    def jacobian_svdvals(self, params, cache, mask=None):
        """The singular values of every example's layer Jacobian from a closed form, ``(B, r)``
        with ``r = min(N_out, N_in)`` and each row descending, or None when the layer has none
        (the caller then decomposes :meth:`jacobian`). The default: None."""
        return None

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


class Affine(Layer):
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


class NoSecondOrder:
    """Mixin for a layer whose second-order rules are not derived: every R-operator entry point
    (:meth:`Layer.rop_forward`, :meth:`Layer.rop_backward`, :meth:`Layer.hessian_diag_backward`)
    raises ``NotImplementedError`` with the class's ``SECOND_ORDER_WHY`` (``{name}``: the class)."""

    SECOND_ORDER_WHY = "second-order products are not derived for {name}"

    def _no_second_order(self):
        raise NotImplementedError(self.SECOND_ORDER_WHY.format(name=type(self).__name__))

    def rop_forward(self, params, cache, x_dot, mask=None, dparams=None):
        self._no_second_order()

    def rop_backward(self, params, cache, rcache, g, g_dot, mask=None, dparams=None, input_grad=True, param_grads=True):
        self._no_second_order()

    def hessian_diag_backward(self, params, cache, Q, coef, g=None, mask=None, input_rows=True):
        self._no_second_order()

