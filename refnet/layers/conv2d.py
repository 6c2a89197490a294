"""The convolution layer ``x^l = phi(W^l * x^{l-1} + b^l)`` (NCHW, PyTorch's cross-correlation)."""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import numpy as np

from .. import conv as _conv
from .._checks import check_choice, check_int
from ..activations import Activation
from .base import Affine, effective_param, flat_rows, masked_grad, pair_arg, stored_finite

__all__ = ["Conv2d", "STACK_CHUNK_ELEMENTS"]

#: elements of the largest intermediate array of one chunk of :meth:`Conv2d.vjp_many`
#: (the patch gradients of a chunk of cotangents): 2**22 float64 = 32 MiB
STACK_CHUNK_ELEMENTS = 2**22


@dataclass(frozen=True)
class Conv2d(Affine):
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
                 ``g_x = col2im(W_f^T (D g))``
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
        object.__setattr__(self, "kernel_size", pair_arg(self.kernel_size, "kernel_size", 1))
        object.__setattr__(self, "stride", pair_arg(self.stride, "stride", 1))
        object.__setattr__(self, "padding", pair_arg(self.padding, "padding", 0))
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
        W = effective_param(params, mask, "W")
        hp, cols, (Ho, Wo) = self._conv(x, W)  # (B, P, c_out)
        if self.bias:
            hp = hp + effective_param(params, mask, "b")
        h = np.ascontiguousarray(hp.transpose(0, 2, 1)).reshape(x.shape[0], self.c_out, Ho, Wo)
        y, D = self.activation.phi_dphi(h)  # (B, c_out, Ho, Wo) each
        return y, {"x": x, "h": h, "D": D, "cols": cols}

    def vjp(self, params, cache, g, mask=None, input_grad=True):
        x, cols = cache["x"], cache["cols"]
        B = x.shape[0]
        gh = (g * cache["D"]).reshape(B, self.c_out, -1)  # (B, c_out, P): dL/dh
        gW = np.einsum("bop,bpk->ok", gh, cols, optimize=True).reshape(self.c_out, self.c_in, *self.kernel_size)
        grads = {"W": masked_grad(gW, mask, "W")}
        if self.bias:
            grads["b"] = masked_grad(gh.sum(axis=(0, 2)), mask, "b")
        if not input_grad:
            return None, grads
        Wf = effective_param(params, mask, "W").reshape(self.c_out, -1)  # (c_out, K)
        g_x = _conv.col2im(Wf.T @ gh, x.shape, *self._geom(), layout="kp")  # W_f^T (D g): (B, K, P)
        return g_x, grads

    def jvp(self, params, cache, v, mask=None, dparams=None):
        B = v.shape[0]
        hp, _, (Ho, Wo) = self._conv(v, effective_param(params, mask, "W"))  # (B, P, c_out)
        if dparams is not None:
            if "W" in dparams:
                dW = effective_param(dparams, mask, "W").reshape(self.c_out, -1)
                hp = hp + cache["cols"] @ dW.T
            if self.bias and "b" in dparams:
                hp = hp + effective_param(dparams, mask, "b")
        h_dot = np.ascontiguousarray(hp.transpose(0, 2, 1)).reshape(B, self.c_out, Ho, Wo)
        return cache["D"] * h_dot

    def vjp_many(self, params, cache, G, mask=None, in_shape=None, out_shape=None):
        """``G J`` for ``G`` ``(B, m, N_out)``: the input half of :meth:`vjp` for all ``m`` cotangents
        at once, ``g_x = col2im(W_f^T (G * D))`` (no product with ``D`` for the identity
        activation, whose ``D`` is 1); the weight gradient is not formed.

        With zero padding the ``B m`` cotangents are laid out with the stack LAST, ``(c_out, P,
        B m)``, so that ``W_f^T`` multiplies all of them in one GEMM and the col2im additions run
        over long contiguous rows (:func:`refnet.conv.col2im_last`); a chunk of vectors holds at
        most :data:`STACK_CHUNK_ELEMENTS` patch gradients ``K P`` (one example's ``m`` vectors at
        least). The sums are those of :meth:`vjp`, over the same terms and taps in the same order
        (the tests find the loop of :meth:`Layer.vjp_many` to the bit; a BLAS may in principle
        order a dot product's ``c_out`` terms differently per call). Circular padding keeps
        :meth:`vjp`'s own product per chunk (:func:`refnet.conv.col2im` through the scatter
        matrix)."""
        in_shape, out_shape = self._stack_shapes(cache, in_shape, out_shape)
        B, m, _ = G.shape
        Wf = effective_param(params, mask, "W").reshape(self.c_out, -1)  # (c_out, K)
        D = None if self.activation.is_linear else flat_rows(cache["D"])[:, None, :]  # (B, 1, N_out)
        P = out_shape[1] * out_shape[2]
        out = np.empty((B, m, prod(in_shape)), dtype=G.dtype)
        per_example = m * P * Wf.shape[1]
        step = max(1, STACK_CHUNK_ELEMENTS // max(1, per_example))
        for b0 in range(0, B, step):
            b1 = min(B, b0 + step)
            gh = G[b0:b1] if D is None else G[b0:b1] * D[b0:b1]  # (b, m, c_out P): D g
            V = (b1 - b0) * m
            if self.padding_mode == "circular":
                cols = Wf.T @ gh.reshape(V, self.c_out, P)  # (V, K, P)
                g_x = _conv.col2im(cols, (V, *in_shape), *self._geom(), layout="kp")
                out[b0:b1] = g_x.reshape(b1 - b0, m, -1)
                continue
            ghT = np.ascontiguousarray(gh.reshape(V, self.c_out * P).T)  # (c_out P, V): the stack last
            cols = Wf.T @ ghT.reshape(self.c_out, P * V)  # (K, P V)
            g_x = _conv.col2im_last(cols.reshape(-1, P, V), in_shape, self.kernel_size, self.stride, self.padding)
            out[b0:b1] = g_x.reshape(-1, V).T.reshape(b1 - b0, m, -1)
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
        out = {"W": gW_eff * stored_finite(params["W"])}  # a pruned NaN is not a weight to put back: 0
        if self.bias:
            out["b"] = gh.sum(axis=(0, 2)) * stored_finite(params["b"])  # (c_out,)
        return out

    def jacobian(self, params, cache, mask=None):
        x = cache["x"]
        M = _conv.conv_matrix(effective_param(params, mask, "W"), x.shape[1:], self.stride, self.padding, self.padding_mode)
        return flat_rows(cache["D"])[:, :, None] * M[None]  # (B, n_out, n_in): J = D M

    def jacobian_svdvals(self, params, cache, mask=None):
        """With a linear activation, circular padding, stride 1 and an output of the input's size
        (``2 p = k - 1``), ``J = M`` is a circular convolution for every example and its singular
        values come from the Fourier symbol (:func:`refnet.conv.circular_conv_singular_values`):
        no matrix is formed. None otherwise (the explicit ``D M`` is decomposed)."""
        x = cache["x"]
        if not (self.activation.is_linear and self.padding_mode == "circular" and self.stride == (1, 1)
                and self.out_shape(x.shape[1:])[1:] == x.shape[2:]):
            return None
        s = _conv.circular_conv_singular_values(effective_param(params, mask, "W"), x.shape[1:])
        return np.broadcast_to(s, (x.shape[0], s.size)).copy()

    def _to_nchw(self, hp, shape):
        """``(B, P, c_out)`` (im2col rows) to ``shape`` ``(B, c_out, Ho, Wo)``."""
        return np.ascontiguousarray(hp.transpose(0, 2, 1)).reshape(shape)

    def rop_forward(self, params, cache, x_dot, mask=None, dparams=None):
        """``R{h} = conv(R{x}, c W) + conv(x, c V_W) + c_b V_b`` (im2col: ``im2col(R{x}) W_f^T +
        cols V_f^T``) and ``R{y} = D R{h}`` (see :meth:`Layer.rop_forward`)."""
        cols_dot = hp = None
        if x_dot is not None:
            cols_dot = _conv.im2col(x_dot, *self._geom())  # (B, P, K): im2col(R{x})
            hp = cols_dot @ effective_param(params, mask, "W").reshape(self.c_out, -1).T  # (B, P, c_out)
        if dparams is not None and "W" in dparams:
            t = cache["cols"] @ effective_param(dparams, mask, "W").reshape(self.c_out, -1).T  # (B, P, c_out)
            hp = t if hp is None else hp + t
        if self.bias and dparams is not None and "b" in dparams:
            vb = effective_param(dparams, mask, "b")  # (c_out,)
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
            grads["W"] = masked_grad(np.einsum("bop,bpk->ok", gh, cols, optimize=True).reshape(shape), mask, "W")
        hv = {"W": masked_grad(gW_dot.reshape(shape), mask, "W")}
        if self.bias:
            if param_grads:
                grads["b"] = masked_grad(gh.sum(axis=(0, 2)), mask, "b")
            hv["b"] = masked_grad(gh_dot.sum(axis=(0, 2)), mask, "b")
        if not input_grad:
            return None, None, grads, hv
        Wf = effective_param(params, mask, "W").reshape(self.c_out, -1)  # (c_out, K)
        g_x = _conv.col2im(Wf.T @ gh, x.shape, *self._geom(), layout="kp")
        g_cols_dot = Wf.T @ gh_dot  # (B, K, P)
        if dparams is not None and "W" in dparams:
            g_cols_dot = g_cols_dot + effective_param(dparams, mask, "W").reshape(self.c_out, -1).T @ gh
        return g_x, _conv.col2im(g_cols_dot, x.shape, *self._geom(), layout="kp"), grads, hv

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
        M = Q * flat_rows(cache["D"])[:, None, :]  # (B, r, c_out P): rows of D (d2L/dy2) D
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
        diag = {"W": masked_grad(dWf.reshape(params["W"].shape), mask, "W")}
        if self.bias:
            diag["b"] = masked_grad(db, mask, "b")
        if not input_rows:
            return None, None, diag
        Mop = _conv.conv_matrix(effective_param(params, mask, "W"), x.shape[1:], self.stride, self.padding, self.padding_mode)
        Q_in = (M.reshape(B * r, -1) @ Mop).reshape(B, r, Mop.shape[1])  # (B, r, N_in)
        if res is not None:
            res = flat_rows(res)  # (B, c_out P)
            units = np.flatnonzero(np.any(res != 0, axis=0))
            if units.size:
                rows = np.sqrt(np.abs(res[:, units]))[:, :, None] * Mop[units][None]  # (B, u, N_in)
                Q_in = np.concatenate([Q_in, rows], axis=1)
                coef = np.concatenate([coef, np.sign(res[:, units])], axis=1)
        return Q_in, coef, diag
