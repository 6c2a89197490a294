"""Parameter-free layers (``D = I``): average, max and global average pooling, and Flatten."""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import numpy as np

from .._checks import check_int
from .base import Layer, flat_rows

__all__ = ["AvgPool2d", "Flatten", "GlobalAvgPool2d", "MaxPool2d"]


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

    def jacobian_svdvals(self, params, cache, mask=None):
        """Every row of ``J`` holds ``1/k^2`` on its own ``k x k`` window, so ``J J^T = I / k^2``:
        all ``N_out`` singular values are ``1/k``."""
        x = cache["x"]
        return np.full((x.shape[0], prod(self.out_shape(x.shape[1:]))), 1.0 / self.kernel_size, dtype=x.dtype)


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

    def _source(self, cache) -> np.ndarray:
        """``(B, 1, C Ho Wo)``: the flat (NCHW) input index each output reads, ``c H W + (i k + u) W
        + (j k + v)`` for the arg-max ``(u, v)`` of window ``(i, j)`` of channel ``c``."""
        arg, (B, C, H, W) = cache["arg"], cache["x"].shape
        k = self.kernel_size
        Ho, Wo = arg.shape[2:]
        row = np.arange(Ho)[:, None] * k + arg // k  # (B, C, Ho, Wo)
        col = np.arange(Wo)[None, :] * k + arg % k
        src = np.arange(C)[:, None, None] * (H * W) + row * W + col
        return src.reshape(B, 1, -1)

    def vjp_many(self, params, cache, G, mask=None, in_shape=None, out_shape=None):
        """``G J`` for a stack ``G`` ``(B, m, N_out)``: every cotangent placed at its window's
        arg-max (one scatter per example over the flat input, the same index for all ``m`` rows;
        windows do not overlap, so no two outputs share a target), zero elsewhere. The values are those of :meth:`vjp`'s, moved, not summed."""
        B, m, _ = G.shape
        src = self._source(cache)[:, 0]  # (B, N_out)
        out = np.zeros((B, m, cache["x"][0].size), dtype=G.dtype)
        for b in range(B):  # one example at a time: no index array of the stack's size
            out[b][:, src[b]] = G[b]
        return out

    def jvp_many(self, params, cache, V, mask=None, in_shape=None, out_shape=None):
        """``(J V^T)^T`` for a stack ``V`` ``(B, m, N_in)``: every tangent read at the arg-max of each
        window, one gather for all ``m`` rows."""
        src = self._source(cache)
        return np.take_along_axis(V, np.broadcast_to(src, (V.shape[0], V.shape[1], src.shape[2])), axis=2)

    def jacobian_svdvals(self, params, cache, mask=None):
        """Every row of ``J`` is a unit vector at its window's arg-max and the windows do not
        overlap, so ``J J^T = I``: all ``N_out`` singular values are 1."""
        arg = cache["arg"]
        return np.ones((arg.shape[0], arg[0].size), dtype=cache["x"].dtype)


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

    def jacobian_svdvals(self, params, cache, mask=None):
        """Row ``c`` of ``J`` holds ``1/(H W)`` on channel ``c``'s ``H W`` pixels, so
        ``J J^T = I / (H W)``: all ``C`` singular values are ``1/sqrt(H W)``."""
        x = cache["x"]
        return np.full((x.shape[0], x.shape[1]), 1.0 / np.sqrt(x.shape[2] * x.shape[3]), dtype=x.dtype)


@dataclass(frozen=True)
class Flatten(Layer):
    """``(B, *shape) -> (B, prod(shape))`` in C (NCHW) order; its Jacobian is the identity."""

    is_affine_map = True
    flat_identity = True

    def out_shape(self, in_shape):
        return (prod(in_shape),)

    def forward(self, params, x, mask=None):
        return flat_rows(x), {"x": x}

    def jvp(self, params, cache, v, mask=None, dparams=None):
        return flat_rows(v)

    def vjp(self, params, cache, g, mask=None, input_grad=True):
        return g.reshape(cache["x"].shape), {}

    def vjp_many(self, params, cache, G, mask=None, in_shape=None, out_shape=None):
        """``G J = G``: stacks are already flattened, so the stack itself (not a copy)."""
        return G

    def jvp_many(self, params, cache, V, mask=None, in_shape=None, out_shape=None):
        """``(J V^T)^T = V``: the stack itself (not a copy)."""
        return V

    def jacobian_svdvals(self, params, cache, mask=None):
        """``J = I``: all singular values are 1."""
        x = cache["x"]
        return np.ones((x.shape[0], x[0].size), dtype=x.dtype)

    def jacobian(self, params, cache, mask=None):
        x = cache["x"]
        n = prod(x.shape[1:])
        return np.broadcast_to(np.eye(n, dtype=x.dtype), (x.shape[0], n, n)).copy()
