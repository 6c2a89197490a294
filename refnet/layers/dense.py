"""The fully connected layer ``x^l = phi(W^l x^{l-1} + b^l)``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import kernels
from .._checks import check_int
from ..activations import Activation
from .base import Affine, effective_param, mask_of, masked_grad, masked_kernel, stored_finite

__all__ = ["Dense"]


@dataclass(frozen=True)
class Dense(Affine):
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
    with ``W`` the effective weight ``where(mask, W, 0)`` (the stored ``W`` in ``dL/dc``; a pruned
    entry contributes exactly zero whatever it stores, and a non-finite stored value gets
    ``dL/dc = 0``: :func:`~refnet.layers.base.stored_finite`).
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
        mW = mask_of(mask, "W")
        h = masked_kernel(kernels.masked_matmul, x, params["W"], mW)  # (B, n_out) = x where(mask, W, 0)^T
        if self.bias:
            h = h + effective_param(params, mask, "b")
        y, D = self.activation.phi_dphi(h)  # (B, n_out) each
        return y, {"x": x, "h": h, "D": D}

    def vjp(self, params, cache, g, mask=None, input_grad=True):
        gh = g * cache["D"]  # (B, n_out): dL/dh
        mW = mask_of(mask, "W")
        gW = gh.T @ cache["x"]  # (n_out, n_in)
        grads = {"W": masked_grad(gW, mask, "W")}
        if self.bias:
            grads["b"] = masked_grad(gh.sum(axis=0), mask, "b")  # (n_out,)
        g_x = masked_kernel(kernels.masked_matmul_t, gh, params["W"], mW) if input_grad else None  # (B, n_in)
        return g_x, grads

    def jvp(self, params, cache, v, mask=None, dparams=None):
        h_dot = v @ effective_param(params, mask, "W").T  # (B, n_out)
        if dparams is not None:
            if "W" in dparams:
                h_dot = h_dot + cache["x"] @ effective_param(dparams, mask, "W").T
            if self.bias and "b" in dparams:
                h_dot = h_dot + effective_param(dparams, mask, "b")
        return cache["D"] * h_dot

    def jacobian_factors(self, params, cache, mask=None) -> tuple:
        """The two factors of ``J^{l-1,l} = D^l W^l``: the effective weight ``mask * W``
        ``(n_out, n_in)`` (shared by the batch) and the diagonals ``D = phi'(h)`` ``(B, n_out)``."""
        return effective_param(params, mask, "W"), cache["D"]

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
        out = {"W": (gh.T @ cache["x"]) * stored_finite(params["W"])}  # (n_out, n_in): dL/dW_eff, unmasked, times W
        if self.bias:
            out["b"] = gh.sum(axis=0) * stored_finite(params["b"])  # (n_out,)
        return out

    def rop_forward(self, params, cache, x_dot, mask=None, dparams=None):
        """``R{h} = R{x} (c W)^T + x (c V_W)^T + c_b V_b`` and ``R{y} = D R{h}``
        (see :meth:`Layer.rop_forward`)."""
        h_dot = None
        if x_dot is not None:
            h_dot = x_dot @ effective_param(params, mask, "W").T  # (B, n_out): W R{x}
        if dparams is not None and "W" in dparams:
            t = cache["x"] @ effective_param(dparams, mask, "W").T  # (B, n_out): V_W x
            h_dot = t if h_dot is None else h_dot + t
        if self.bias and dparams is not None and "b" in dparams:
            vb = effective_param(dparams, mask, "b")  # (n_out,)
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
        grads = {"W": masked_grad(gh.T @ x, mask, "W")} if param_grads else {}
        hv = {"W": masked_grad(gW_dot, mask, "W")}
        if self.bias:
            if param_grads:
                grads["b"] = masked_grad(gh.sum(axis=0), mask, "b")  # (n_out,)
            hv["b"] = masked_grad(gh_dot.sum(axis=0), mask, "b")
        if not input_grad:
            return None, None, grads, hv
        W = effective_param(params, mask, "W")  # (n_out, n_in)
        g_x = gh @ W  # (B, n_in)
        g_x_dot = gh_dot @ W
        if dparams is not None and "W" in dparams:
            g_x_dot = g_x_dot + gh @ effective_param(dparams, mask, "W")
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
        diag = {"W": masked_grad(diag_h.T @ (x * x), mask, "W")}  # (n_out, n_in)
        if self.bias:
            diag["b"] = masked_grad(diag_h.sum(axis=0), mask, "b")
        if not input_rows:
            return None, None, diag
        W = effective_param(params, mask, "W")  # (n_out, n_in)
        Q_in = (M.reshape(B * r, n_out) @ W).reshape(B, r, W.shape[1])  # (B, r, n_in)
        if res is not None:
            units = np.flatnonzero(np.any(res != 0, axis=0))
            if units.size:
                rows = np.sqrt(np.abs(res[:, units]))[:, :, None] * W[units][None]  # (B, u, n_in)
                Q_in = np.concatenate([Q_in, rows], axis=1)
                coef = np.concatenate([coef, np.sign(res[:, units])], axis=1)
        return Q_in, coef, diag
