r"""Batch normalization ``x^l = phi(gamma * xhat + beta)`` over (B, C) or (B, C, H, W) inputs.

One layer owns the normalization, its affine map ``gamma``, ``beta`` and an activation, as
:class:`~refnet.layers.Dense` owns ``W``, ``b`` and phi; a convolution followed by batch
normalization and a ReLU is ``Conv2d(..., bias=False)`` then ``BatchNorm2d(c, activation="relu")``.

Notation (per channel ``c``; the statistics run over the ``m`` entries of that channel: the
batch for :class:`BatchNorm1d`, the batch and the ``H W`` positions for :class:`BatchNorm2d`)

.. math::
    \mu = \frac1m \sum x, \quad \sigma^2 = \frac1m \sum (x - \mu)^2, \quad
    s = \sqrt{\sigma^2 + \epsilon}, \quad \hat x = (x - \mu)/s, \quad
    h = \gamma \hat x + \beta, \quad y = \phi(h), \quad D = \phi'(h).

``mode="train"`` normalises with the batch statistics (the biased variance, as PyTorch), so the
output of one example depends on every example of the batch; ``mode="eval"`` normalises with the
running statistics ``mu = running_mean``, ``sigma^2 = running_var`` (buffers of the network, not
parameters), a per-example affine map. Training updates the running statistics as PyTorch does,
``running_mean <- (1 - momentum) running_mean + momentum mu`` and
``running_var <- (1 - momentum) running_var + momentum m/(m-1) sigma^2`` (the UNBIASED batch
variance), see :meth:`_BatchNorm.updated_buffers`.

Derivatives (per channel; ``<a> = (1/m) sum a`` over the channel's entries)

============  ===============================================================================
              train mode                                 eval mode
============  ===============================================================================
JVP           ``y_dot = D (gamma xhat_dot + dgamma xhat + dbeta)``, with
              ``xhat_dot = (v - <v> - xhat <xhat v>) / s``  ``xhat_dot = v / s``
VJP           ``g_h = D g``; ``dL/dgamma = sum g_h xhat``, ``dL/dbeta = sum g_h``;
              ``g_x = (g_xh - <g_xh> - xhat <xhat g_xh>) / s`` with ``g_xh = gamma g_h``
                                                         ``g_x = gamma g_h / s``
Jacobian      ``dy_i/dx_j = D_i gamma (delta_ij - 1/m - xhat_i xhat_j / m) / s``  ``D gamma / s`` (diagonal)
              over all ``m`` entries ``i, j`` of a channel
              across examples (:meth:`batch_jacobian`)
============  ===============================================================================

The train-mode operator ``(I - 11^T/m - xhat xhat^T/m)/s`` is symmetric, so the VJP and the JVP
use the same formula (the dot-product test checks it). It couples the examples, so a train-mode
layer has no per-example Jacobian: :meth:`jacobian` refuses it (ValueError naming the mode) and
:meth:`batch_jacobian` gives the ``(B, N, B, N)`` Jacobian of the batch map; the multi-vector
products :meth:`vjp_many` / :meth:`jvp_many` treat every stacked vector ``G[:, j]`` as a
cotangent (tangent) of the whole batch. Parameters ``gamma``, ``beta`` (keys of :attr:`keys`,
masked like every parameter: the effective value is ``mask * gamma``) are not weights: pruning,
approximate isometry, OrthP and weight decay, which work on ``"W"``, leave them alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import numpy as np

from .._checks import check_choice, check_float, check_int
from ..activations import Activation, get_activation
from .base import Layer, NoSecondOrder, effective_param, masked_grad

__all__ = ["BatchNorm1d", "BatchNorm2d", "BN_MODES"]

#: the two modes of a batch normalization layer
BN_MODES = ("train", "eval")


@dataclass(frozen=True)
class _BatchNorm(NoSecondOrder, Layer):
    """Shared part of :class:`BatchNorm1d` and :class:`BatchNorm2d` (see the module docstring)."""

    SECOND_ORDER_WHY = ("second-order products (R-operator, Hessian diagonal) are not derived for {name}; "
                        "refnet.second_order supports Dense, Conv2d and the parameter-free layers")

    num_features: int
    eps: float = 1e-5
    momentum: float = 0.1
    affine: bool = True
    mode: str = "train"
    activation: Activation = "identity"

    #: the per-example rank of the input: 1 for (C,), 3 for (C, H, W)
    _ndim = 1

    def __post_init__(self):
        object.__setattr__(self, "num_features", check_int(self.num_features, "num_features", min_value=1))
        object.__setattr__(self, "eps", check_float(self.eps, "eps", min_value=0.0, min_inclusive=False))
        if self.momentum is None:
            raise ValueError("momentum must be a float in [0, 1]; momentum=None (PyTorch's cumulative average) is not supported")
        object.__setattr__(self, "momentum", check_float(self.momentum, "momentum", min_value=0.0, max_value=1.0))
        if not isinstance(self.affine, (bool, np.bool_)):
            raise TypeError(f"affine must be a bool, got {type(self.affine).__name__}")
        object.__setattr__(self, "affine", bool(self.affine))
        object.__setattr__(self, "mode", check_choice(self.mode, "mode", BN_MODES))
        object.__setattr__(self, "activation", get_activation(self.activation))

    # --- protocol attributes --------------------------------------------------------------
    @property
    def keys(self) -> tuple:
        return ("gamma", "beta") if self.affine else ()

    #: gamma = 1, beta = 0 (PyTorch's); the network's initializer does not apply
    needs_initializer = False

    @property
    def couples_batch(self) -> bool:
        """True in train mode: one example's output depends on the whole batch."""
        return self.mode == "train"

    @property
    def is_affine_map(self) -> bool:
        return self.mode == "eval" and self.activation.is_linear

    def with_mode(self, mode: str) -> "_BatchNorm":
        """The same layer in ``mode`` ("train" or "eval")."""
        return type(self)(self.num_features, self.eps, self.momentum, self.affine, check_choice(mode, "mode", BN_MODES),
                          self.activation)

    # --- shapes, parameters and buffers ---------------------------------------------------
    def out_shape(self, in_shape):
        in_shape = tuple(in_shape)
        name = type(self).__name__
        want = "(C,)" if self._ndim == 1 else "(C, H, W)"
        if len(in_shape) != self._ndim or in_shape[0] != self.num_features:
            raise ValueError(f"{name}({self.num_features}) needs per-example input shape {want} with "
                             f"C = {self.num_features}, got {in_shape}")
        return in_shape

    def param_shapes(self, in_shape):
        return {"gamma": (self.num_features,), "beta": (self.num_features,)} if self.affine else {}

    def init(self, rng, in_shape, initializer, dtype):
        self.out_shape(in_shape)
        if not self.affine:
            return {}
        return {"gamma": np.ones(self.num_features, dtype=dtype), "beta": np.zeros(self.num_features, dtype=dtype)}

    def buffer_shapes(self, in_shape) -> dict:
        """The running statistics: ``{"running_mean": (C,), "running_var": (C,)}``."""
        return {"running_mean": (self.num_features,), "running_var": (self.num_features,)}

    def init_buffers(self, in_shape, dtype) -> dict:
        """``running_mean = 0``, ``running_var = 1`` (PyTorch's)."""
        return {"running_mean": np.zeros(self.num_features, dtype=dtype),
                "running_var": np.ones(self.num_features, dtype=dtype)}

    # --- helpers ----------------------------------------------------------------------------
    @staticmethod
    def _bcs(a: np.ndarray) -> np.ndarray:
        """``(B, C, ...) -> (B, C, S)``: the entries of each channel of one example as a row."""
        return a.reshape(a.shape[0], a.shape[1], -1)

    @staticmethod
    def _chan(v: np.ndarray) -> np.ndarray:
        """``(C,) -> (1, C, 1)``, to broadcast over ``(B, C, S)``."""
        return v[None, :, None]

    def _gamma_beta(self, params, mask):
        if not self.affine:
            return None, None
        return effective_param(params, mask, "gamma"), effective_param(params, mask, "beta")

    def _normalize(self, xhat_dot: np.ndarray, cache) -> np.ndarray:
        """The Jacobian of ``x -> xhat`` applied to ``(B, C, S)`` (the same operator serves the VJP)."""
        inv = self._chan(cache["inv_std"])
        if self.mode == "eval":
            return xhat_dot * inv
        xhat = self._bcs(cache["xhat"])
        mean_v = xhat_dot.mean(axis=(0, 2), keepdims=True)  # (1, C, 1): <v>
        mean_xv = (xhat * xhat_dot).mean(axis=(0, 2), keepdims=True)  # (1, C, 1): <xhat v>
        return (xhat_dot - mean_v - xhat * mean_xv) * inv

    # --- forward ------------------------------------------------------------------------------
    def forward(self, params, x, mask=None):
        r"""``y = phi(gamma (x - mu)/s + beta)`` with batch (train) or running (eval) statistics.

        The cache holds ``"x"``, ``"xhat"``, ``"h"`` (``gamma xhat + beta``), ``"D"`` (``phi'(h)``),
        ``"mean"``, ``"var"`` (the statistics used, ``(C,)``: the biased batch variance in train
        mode), ``"inv_std"`` (``1/s``, ``(C,)``) and ``"m"`` (entries per channel). In eval mode
        ``params`` must also hold the buffers ``"running_mean"`` and ``"running_var"``
        (:meth:`refnet.network.Network.layer_params` merges them).
        """
        x3 = self._bcs(x)  # (B, C, S)
        m = x3.shape[0] * x3.shape[2]
        if self.mode == "train":
            if m < 2:
                raise ValueError(
                    f"{type(self).__name__} in train mode needs more than 1 value per channel (batch x positions), "
                    f"got input shape {x.shape}; use mode='eval' (running statistics) for single examples"
                )
            mean = x3.mean(axis=(0, 2))  # (C,)
            xc = x3 - self._chan(mean)
            var = (xc * xc).mean(axis=(0, 2))  # (C,): biased
        else:
            if "running_mean" not in params or "running_var" not in params:
                raise ValueError(
                    f"{type(self).__name__} in eval mode needs the running statistics: params must hold "
                    "'running_mean' and 'running_var' (use Network.layer_params(i), which merges the buffers)"
                )
            mean = np.asarray(params["running_mean"], dtype=x.dtype)
            var = np.asarray(params["running_var"], dtype=x.dtype)
            xc = x3 - self._chan(mean)
        inv_std = 1.0 / np.sqrt(var + self.eps)  # (C,)
        xhat = xc * self._chan(inv_std)  # (B, C, S)
        gamma, beta = self._gamma_beta(params, mask)
        h = xhat if gamma is None else xhat * self._chan(gamma) + self._chan(beta)
        h = h.reshape(x.shape)
        y, D = self.activation.phi_dphi(h)
        return y, {"x": x, "xhat": xhat.reshape(x.shape), "h": h, "D": D, "mean": mean, "var": var,
                   "inv_std": inv_std, "m": m}

    def updated_buffers(self, buffers: dict, cache) -> dict:
        r"""The running statistics after a train-mode forward pass (new arrays; PyTorch's rule):

        ``running_mean <- (1 - momentum) running_mean + momentum mu`` and
        ``running_var <- (1 - momentum) running_var + momentum (m / (m - 1)) sigma^2``, with the
        batch mean ``mu`` and biased variance ``sigma^2`` of ``cache``. In eval mode: copies.
        """
        if self.mode != "train":
            return {k: v.copy() for k, v in buffers.items()}
        mom, m = self.momentum, cache["m"]
        unbiased = cache["var"] * (m / (m - 1))
        return {
            "running_mean": (1.0 - mom) * buffers["running_mean"] + mom * cache["mean"],
            "running_var": (1.0 - mom) * buffers["running_var"] + mom * unbiased,
        }

    # --- first-order products ----------------------------------------------------------------
    def vjp(self, params, cache, g, mask=None, input_grad=True):
        gh = self._bcs(g * cache["D"])  # (B, C, S): dL/dh
        grads = {}
        gamma, _ = self._gamma_beta(params, mask)
        if self.affine:
            xhat = self._bcs(cache["xhat"])
            grads["gamma"] = masked_grad((gh * xhat).sum(axis=(0, 2)), mask, "gamma")  # (C,)
            grads["beta"] = masked_grad(gh.sum(axis=(0, 2)), mask, "beta")  # (C,)
        if not input_grad:
            return None, grads
        g_xhat = gh if gamma is None else gh * self._chan(gamma)  # (B, C, S): dL/dxhat
        return self._normalize(g_xhat, cache).reshape(g.shape), grads

    def jvp(self, params, cache, v, mask=None, dparams=None):
        h_dot = self._normalize(self._bcs(v), cache)  # (B, C, S): xhat_dot
        gamma, _ = self._gamma_beta(params, mask)
        if gamma is not None:
            h_dot = h_dot * self._chan(gamma)
            if dparams is not None:
                if "gamma" in dparams:
                    h_dot = h_dot + self._bcs(cache["xhat"]) * self._chan(effective_param(dparams, mask, "gamma"))
                if "beta" in dparams:
                    h_dot = h_dot + self._chan(effective_param(dparams, mask, "beta"))
        return cache["D"] * h_dot.reshape(v.shape)

    def vjp_many(self, params, cache, G, mask=None, in_shape=None, out_shape=None):
        """``G J`` for ``G`` ``(B, m, N)``; in train mode each ``G[:, j]`` is a cotangent of the whole
        batch (the batch VJP), in eval mode the per-example products; one vectorised pass."""
        B, n_vec, N = G.shape
        C = self.num_features
        S = N // C
        gamma, _ = self._gamma_beta(params, mask)
        scale = self._bcs(cache["D"])[:, None]  # (B, 1, C, S)
        if gamma is not None:
            scale = scale * gamma[None, None, :, None]
        gx = G.reshape(B, n_vec, C, S) * scale  # (B, m, C, S): dL/dxhat
        inv = cache["inv_std"][None, None, :, None]
        if self.mode == "train":
            xhat = self._bcs(cache["xhat"])[:, None]  # (B, 1, C, S)
            mean_g = gx.mean(axis=(0, 3), keepdims=True)  # (1, m, C, 1)
            mean_xg = (xhat * gx).mean(axis=(0, 3), keepdims=True)
            gx = gx - mean_g - xhat * mean_xg
        return (gx * inv).reshape(B, n_vec, N)

    def jvp_many(self, params, cache, V, mask=None, in_shape=None, out_shape=None):
        """``(J V^T)^T`` for ``V`` ``(B, m, N)``: the adjoint of :meth:`vjp_many` (the normalization
        operator is symmetric, the diagonal factors move to the other side)."""
        B, n_vec, N = V.shape
        C = self.num_features
        S = N // C
        v = V.reshape(B, n_vec, C, S) * cache["inv_std"][None, None, :, None]
        if self.mode == "train":
            xhat = self._bcs(cache["xhat"])[:, None]  # (B, 1, C, S)
            # (v - <v> - xhat <xhat v>) / s, with 1/s a per-channel constant factored out first
            v = v - v.mean(axis=(0, 3), keepdims=True) - xhat * (xhat * v).mean(axis=(0, 3), keepdims=True)
        gamma, _ = self._gamma_beta(params, mask)
        scale = self._bcs(cache["D"])[:, None]
        if gamma is not None:
            scale = scale * gamma[None, None, :, None]
        return (v * scale).reshape(B, n_vec, N)

    def jacobian(self, params, cache, mask=None):
        """The per-example ``(B, N, N)`` Jacobian: ``diag(D gamma / s)`` in eval mode. Train mode has
        none (the batch statistics couple the examples): ValueError; see :meth:`batch_jacobian`."""
        if self.mode == "train":
            raise ValueError(
                f"{type(self).__name__} is in train mode: its output depends on the whole batch (batch statistics), "
                "so it has no per-example Jacobian; use batch_jacobian (the (B, N, B, N) Jacobian of the batch map) "
                "or the layer in eval mode (running statistics)"
            )
        d = self._diag(params, cache, mask)  # (B, N)
        B, N = d.shape
        J = np.zeros((B, N, N), dtype=d.dtype)
        J[:, np.arange(N), np.arange(N)] = d
        return J

    def _diag(self, params, cache, mask):
        """``D gamma / s`` per entry, ``(B, N)`` (the eval-mode Jacobian's diagonal)."""
        gamma, _ = self._gamma_beta(params, mask)
        s = self._chan(cache["inv_std"]) if gamma is None else self._chan(gamma * cache["inv_std"])
        D = self._bcs(cache["D"])
        return (D * s).reshape(D.shape[0], -1)

    def batch_jacobian(self, params, cache, mask=None) -> np.ndarray:
        r"""The Jacobian of the batch map, ``J[b, i, a, j] = d y_{b,i} / d x_{a,j}``, ``(B, N, B, N)``.

        Train mode: ``D_{b,i} gamma_c (delta - 1/m - xhat_{b,i} xhat_{a,j}/m) / s_c`` when the entries
        ``(b, i)`` and ``(a, j)`` belong to the same channel ``c``, zero otherwise. Eval mode: the
        per-example diagonal on the blocks ``a = b``, zero off them.
        """
        x = cache["x"]
        B = x.shape[0]
        N = prod(x.shape[1:])
        C = self.num_features
        S = N // C
        J = np.zeros((B, C, S, B, C, S), dtype=x.dtype)
        gamma, _ = self._gamma_beta(params, mask)
        g = np.ones(C, dtype=x.dtype) if gamma is None else gamma
        D = self._bcs(cache["D"])  # (B, C, S)
        inv = cache["inv_std"]
        m = cache["m"]
        eye = np.eye(B * S, dtype=x.dtype).reshape(B, S, B, S)
        for c in range(C):
            block = eye
            if self.mode == "train":
                xh = self._bcs(cache["xhat"])[:, c, :]  # (B, S)
                block = eye - 1.0 / m - xh[:, :, None, None] * xh[None, None, :, :] / m
            J[:, c, :, :, c, :] = D[:, c, :, None, None] * (g[c] * inv[c]) * block
        return J.reshape(B, N, B, N)

    def mask_grads(self, params, cache, g):
        """``dL/dc_gamma = (sum g_h xhat) * gamma``, ``dL/dc_beta = (sum g_h) * beta`` (unmasked
        gradients of the effective parameters times the stored ones)."""
        if not self.affine:
            return {}
        gh = self._bcs(g * cache["D"])
        return {"gamma": (gh * self._bcs(cache["xhat"])).sum(axis=(0, 2)) * params["gamma"],
                "beta": gh.sum(axis=(0, 2)) * params["beta"]}



@dataclass(frozen=True)
class BatchNorm1d(_BatchNorm):
    r"""Batch normalization over ``(B, C)`` (statistics over the batch, per feature), then phi.

    Parameters
    ----------
    num_features : int
        ``C``; ``gamma``, ``beta`` and the running statistics are ``(C,)``.
    eps : float > 0
        Added to the variance (PyTorch's default 1e-5).
    momentum : float in [0, 1]
        Of the running statistics (PyTorch's default 0.1).
    affine : bool
        Whether the layer has ``gamma`` and ``beta``.
    mode : {"train", "eval"}
        Batch statistics (train) or running statistics (eval); see the module docstring.
    activation : str or Activation
        phi, applied after the affine map (default identity).
    """

    _ndim = 1


@dataclass(frozen=True)
class BatchNorm2d(_BatchNorm):
    r"""Batch normalization over ``(B, C, H, W)`` (statistics over the batch and the positions, per
    channel), then phi. Parameters as :class:`BatchNorm1d`."""

    _ndim = 3
