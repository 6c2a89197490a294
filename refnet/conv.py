r"""2-D convolution through im2col, its adjoint, its explicit operator matrix and a naive oracle.

Notation (NCHW, PyTorch layouts). Input ``x`` is ``(B, C, H, W)``, weight ``W`` is
``(c_out, C, kh, kw)``, stride ``(sh, sw)``, padding ``(ph, pw)`` with mode "zeros" or "circular".
The output size is ``Ho = (H + 2 ph - kh) // sh + 1`` (likewise ``Wo``), and

.. math:: h[b, o, i, j] = \sum_{c,u,v} W[o, c, u, v]\, \tilde x[b, c, i s_h + u, j s_w + v] + b[o],

with ``x~`` the padded input. im2col gathers the patches into ``cols`` of shape
``(B, P, K)`` with ``P = Ho Wo`` and ``K = C kh kw`` (column order (c, u, v), that of
``W.reshape(c_out, K)``), so that ``h = cols @ W_f^T``. The gather is one fancy index into the
flattened input extended by a single zero (the target of every zero-padding tap):
:func:`patch_index`. Its adjoint (col2im) sums the patch gradients back: for zero padding tap by
tap, ``kh kw`` strided additions into the padded input, each adding one tap's ``(C, Ho, Wo)``
slab (no index arrays, no copy of the patches); for circular padding (where taps may wrap onto
the same pixel) with a sparse scatter matrix built once per geometry: :func:`col2im`.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import scipy.sparse as sp

__all__ = [
    "conv_output_size",
    "patch_index",
    "im2col",
    "col2im",
    "col2im_last",
    "conv2d_im2col",
    "conv2d_naive",
    "conv_matrix",
    "circular_conv_singular_values",
]


def conv_output_size(H: int, W: int, kernel, stride, padding) -> tuple[int, int]:
    """``(Ho, Wo)`` of a convolution; raises when the kernel does not fit."""
    kh, kw = kernel
    sh, sw = stride
    ph, pw = padding
    Ho = (H + 2 * ph - kh) // sh + 1
    Wo = (W + 2 * pw - kw) // sw + 1
    if H + 2 * ph < kh or W + 2 * pw < kw or Ho <= 0 or Wo <= 0:
        raise ValueError(
            f"x spatial size {(H, W)} with padding {(ph, pw)} is smaller than the kernel {(kh, kw)}"
        )
    return Ho, Wo


@lru_cache(maxsize=64)
def patch_index(C: int, H: int, W: int, kernel, stride, padding, mode: str) -> np.ndarray:
    """Gather index ``(P, K)`` into the flattened input extended by one zero.

    Entry ``[p, k]`` is the flat index ``c*H*W + r*W + s`` of the input pixel under tap
    ``k = (c, u, v)`` of output position ``p = (i, j)``, or ``C*H*W`` (the appended zero) when the
    tap falls in zero padding. With circular padding the row and column wrap modulo H and W.
    The result is cached and read-only.
    """
    kh, kw = kernel
    sh, sw = stride
    ph, pw = padding
    Ho, Wo = conv_output_size(H, W, kernel, stride, padding)
    i = np.arange(Ho)[:, None, None, None, None]  # (Ho, 1, 1, 1, 1)
    j = np.arange(Wo)[None, :, None, None, None]  # (1, Wo, 1, 1, 1)
    c = np.arange(C)[None, None, :, None, None]  # (1, 1, C, 1, 1)
    u = np.arange(kh)[None, None, None, :, None]  # (1, 1, 1, kh, 1)
    v = np.arange(kw)[None, None, None, None, :]  # (1, 1, 1, 1, kw)
    r = i * sh + u - ph  # row in the unpadded input
    s = j * sw + v - pw  # column in the unpadded input
    if mode == "circular":
        r, s = r % H, s % W
        inside = np.ones(np.broadcast_shapes(r.shape, s.shape), dtype=bool)
    else:
        inside = (r >= 0) & (r < H) & (s >= 0) & (s < W)
    flat = c * (H * W) + np.clip(r, 0, H - 1) * W + np.clip(s, 0, W - 1)
    idx = np.where(inside, flat, C * H * W)  # (Ho, Wo, C, kh, kw)
    idx = np.ascontiguousarray(idx.reshape(Ho * Wo, C * kh * kw)).astype(np.intp)
    idx.setflags(write=False)
    return idx


@lru_cache(maxsize=64)
def _scatter_matrix(C: int, H: int, W: int, kernel, stride, padding, mode: str) -> sp.csr_matrix:
    """Sparse ``(P*K, C*H*W)`` 0/1 matrix S with ``cols.ravel() = S @ x.ravel()`` (no pad column)."""
    idx = patch_index(C, H, W, kernel, stride, padding, mode).ravel()
    n_in = C * H * W
    keep = idx < n_in
    rows = np.flatnonzero(keep)
    S = sp.csr_matrix(
        (np.ones(rows.size), (rows, idx[keep])), shape=(idx.size, n_in), dtype=np.float64
    )
    return S


def im2col(x: np.ndarray, kernel, stride, padding, mode: str) -> np.ndarray:
    """Patches ``(B, P, K)`` of ``x`` ``(B, C, H, W)``; see :func:`patch_index`."""
    B, C, H, W = x.shape
    idx = patch_index(C, H, W, tuple(kernel), tuple(stride), tuple(padding), mode)
    x_ext = np.concatenate([x.reshape(B, C * H * W), np.zeros((B, 1), dtype=x.dtype)], axis=1)
    return x_ext[:, idx]  # (B, P, K)


def _sum_taps(taps: np.ndarray, padded_shape, lead: int, stride) -> np.ndarray:
    """The tap-by-tap sum of zero-padding col2im: ``taps`` has ``lead`` leading axes, then
    ``(kh, kw, Ho, Wo)``, then any trailing ones; the result (``padded_shape``, the padded
    input with the same leading and trailing axes) gets ``g[..., i s_h + u, j s_w + v, ...] +=
    taps[..., u, v, i, j, ...]`` over ``u < kh``, ``v < kw`` in that order."""
    kh, kw, Ho, Wo = taps.shape[lead : lead + 4]
    sh, sw = stride
    g = np.zeros(padded_shape, dtype=taps.dtype)
    head = (slice(None),) * lead
    for u in range(kh):
        for v in range(kw):
            g[head + (slice(u, u + (Ho - 1) * sh + 1, sh), slice(v, v + (Wo - 1) * sw + 1, sw))] += taps[head + (u, v)]
    return g


def col2im(g_cols: np.ndarray, x_shape, kernel, stride, padding, mode: str, layout: str = "pk") -> np.ndarray:
    """Adjoint of :func:`im2col`: sums patch gradients into ``(B, C, H, W)``.

    ``g_cols`` is ``(B, P, K)`` (``layout="pk"``, the shape :func:`im2col` returns) or
    ``(B, K, P)`` (``layout="kp"``, what ``W_f^T @ g_h`` gives without a transpose). With zero
    padding the sum runs tap by tap, ``g_x~[:, :, i s_h + u, j s_w + v] += g[:, (., u, v), (i, j)]``
    over ``u < kh``, ``v < kw`` in that order, then the padding is cut off; with circular padding
    through the sparse scatter matrix (the adjoint of the gather, CSC order)."""
    B, C, H, W = x_shape
    kernel, stride, padding = tuple(kernel), tuple(stride), tuple(padding)
    kh, kw = kernel
    if layout not in ("pk", "kp"):
        raise ValueError(f"layout must be 'pk' or 'kp', got {layout!r}")
    if mode == "circular":
        if layout == "kp":
            g_cols = g_cols.transpose(0, 2, 1)
        S = _scatter_matrix(C, H, W, kernel, stride, padding, mode)
        g = np.ascontiguousarray(g_cols).reshape(B, -1)  # (B, P*K)
        gx = (S.T @ g.T).T  # (B, C*H*W)
        return np.ascontiguousarray(gx, dtype=g_cols.dtype).reshape(B, C, H, W)
    Ho, Wo = conv_output_size(H, W, kernel, stride, padding)
    ph, pw = padding
    if layout == "kp":
        taps = g_cols.reshape(B, C, kh, kw, Ho, Wo)
    else:
        taps = g_cols.reshape(B, Ho, Wo, C, kh, kw).transpose(0, 3, 4, 5, 1, 2)  # (B, C, kh, kw, Ho, Wo)
    g = _sum_taps(taps, (B, C, H + 2 * ph, W + 2 * pw), 2, stride)
    if ph or pw:
        g = np.ascontiguousarray(g[:, :, ph : ph + H, pw : pw + W])
    return g


def col2im_last(cols: np.ndarray, in_shape, kernel, stride, padding) -> np.ndarray:
    """:func:`col2im` (zero padding) for a stack of ``V`` vectors kept as the LAST axis:
    ``cols`` ``(K, P, V)`` (``W_f^T`` times the cotangents laid out ``(c_out, P, V)``, one GEMM for
    the whole stack) summed into ``(C, H, W, V)``. The tap-by-tap additions then run over
    contiguous rows of ``Wo V`` numbers, which is what makes the stacked input gradient of a
    convolution (:meth:`refnet.layers.Conv2d.vjp_many`) cheap."""
    C, H, W = in_shape
    kh, kw = kernel
    ph, pw = padding
    Ho, Wo = conv_output_size(H, W, kernel, stride, padding)
    V = cols.shape[-1]
    taps = cols.reshape(C, kh, kw, Ho, Wo, V)
    g = _sum_taps(taps, (C, H + 2 * ph, W + 2 * pw, V), 1, stride)
    return g[:, ph : ph + H, pw : pw + W, :]


def conv2d_im2col(x, W, b, stride, padding, mode) -> np.ndarray:
    """Pre-activation ``h`` ``(B, c_out, Ho, Wo)`` through im2col (``b`` may be None)."""
    B, C, H, Wd = x.shape
    c_out, _, kh, kw = W.shape
    Ho, Wo = conv_output_size(H, Wd, (kh, kw), stride, padding)
    cols = im2col(x, (kh, kw), stride, padding, mode)  # (B, P, K)
    h = cols @ W.reshape(c_out, -1).T  # (B, P, c_out)
    if b is not None:
        h = h + b
    return np.ascontiguousarray(h.transpose(0, 2, 1)).reshape(B, c_out, Ho, Wo)


def conv2d_naive(x, W, b, stride, padding, mode) -> np.ndarray:
    """The convolution by seven explicit loops: the slow, obvious oracle for im2col.

    Pads explicitly (``np.pad`` with zeros, or ``mode="wrap"`` for circular), then sums
    ``W[o, c, u, v] * xp[b, c, i*sh + u, j*sw + v]`` term by term.
    """
    B, C, H, Wd = x.shape
    c_out, _, kh, kw = W.shape
    sh, sw = stride
    ph, pw = padding
    Ho, Wo = conv_output_size(H, Wd, (kh, kw), stride, padding)
    pad = ((0, 0), (0, 0), (ph, ph), (pw, pw))
    xp = np.pad(x, pad, mode="wrap") if mode == "circular" else np.pad(x, pad)
    out = np.zeros((B, c_out, Ho, Wo), dtype=x.dtype)
    for n in range(B):
        for o in range(c_out):
            for i in range(Ho):
                for j in range(Wo):
                    acc = 0.0 if b is None else b[o]
                    for c in range(C):
                        for u in range(kh):
                            for v in range(kw):
                                acc += W[o, c, u, v] * xp[n, c, i * sh + u, j * sw + v]
                    out[n, o, i, j] = acc
    return out


def conv_matrix(W, in_shape, stride, padding, mode) -> np.ndarray:
    """The explicit matrix ``M`` ``(c_out*Ho*Wo, C*H*W)`` of the (bias-free) convolution operator.

    ``h.reshape(B, -1) = x.reshape(B, -1) @ M.T``: rows follow NCHW flattening of the output,
    columns that of the input. Taps that wrap onto the same pixel (circular padding with a kernel
    larger than the input) add up.
    """
    C, H, Wd = in_shape
    c_out, _, kh, kw = W.shape
    idx = patch_index(C, H, Wd, (kh, kw), tuple(stride), tuple(padding), mode)  # (P, K)
    P, K = idx.shape
    n_in = C * H * Wd
    M = np.zeros((c_out, P, n_in + 1), dtype=W.dtype)
    Wf = W.reshape(c_out, K)
    o = np.arange(c_out)[:, None, None]
    p = np.arange(P)[None, :, None]
    np.add.at(M, (o, p, idx[None, :, :]), Wf[:, None, :])
    return M[:, :, :n_in].reshape(c_out * P, n_in)


def circular_conv_singular_values(W, in_shape) -> np.ndarray:
    r"""All singular values (descending) of the circular convolution operator ``M`` of ``W``
    ``(c_out, C, kh, kw)`` on inputs ``in_shape = (C, H, W)`` with stride 1 and an output of the
    input's size (circular padding ``2 p = k - 1``), from its Fourier symbol [Sedghi et al.,
    "The singular values of convolutional layers", ICLR 2019]: the 2-D DFT block-diagonalizes
    ``M`` into the ``H W`` matrices

    .. math:: \hat W(f) = \sum_{u,v} W[:, :, u, v]\, e^{-2\pi i (f_1 u / H + f_2 v / W)}
              \quad (c_{out} \times C),

    up to a unit phase per frequency (the padding's shift) and complex conjugation, neither of
    which changes a singular value, and the DFT is unitary. So the ``H W min(c_out, C)``
    singular values of ``M`` (``min(N_out, N_in)``) are those of the ``H W`` small matrices, at
    ``O(H W c_out C min(c_out, C))`` cost instead of the dense ``(c_out H W) x (C H W)`` SVD.
    Taps of a kernel larger than the input wrap onto the same pixel and add up (as
    :func:`conv_matrix`)."""
    W = np.asarray(W)
    c_out, C, kh, kw = W.shape
    _, H, Wd = in_shape
    K = np.zeros((c_out, C, H, Wd), dtype=W.dtype)
    u = (np.arange(kh) % H)[:, None]
    v = (np.arange(kw) % Wd)[None, :]
    np.add.at(K, (slice(None), slice(None), u, v), W)  # the kernel on the input's torus
    sym = np.fft.fft2(K, axes=(2, 3)).transpose(2, 3, 0, 1).reshape(H * Wd, c_out, C)  # (HW, c_out, C)
    s = np.linalg.svd(sym, compute_uv=False).ravel()
    return np.sort(s)[::-1]
