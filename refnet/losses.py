r"""Losses: each returns the value and the error signal ``eps = dL/dz`` for the output ``z``.

``z`` is ``(B, C)`` (batches are rows). Both losses are means over the batch, so ``eps`` carries
the factor ``1/B`` and backprop of ``eps`` gives the gradient of the mean loss (PAPER.md section 2:
the batch gradient is the mean of the per-example outer products).

softmax cross-entropy
    .. math:: L = -\frac1B \sum_i \sum_j t_{ij} \log \mathrm{softmax}(z_i)_j, \qquad
              \varepsilon_i = \frac1B \big(\mathrm{softmax}(z_i) \sum_j t_{ij} - t_i\big),

    where ``t`` is the one-hot matrix of integer labels or a given probability matrix. The log
    softmax uses the stable log-sum-exp ``z - max(z) - log sum exp(z - max(z))``.

mean squared error (PyTorch's ``MSELoss(reduction="mean")``: a mean over every element)
    .. math:: L = \frac{1}{B C} \sum_{ij} (z_{ij} - t_{ij})^2, \qquad
              \varepsilon = \frac{2}{B C} (z - t).

Second order (for :mod:`refnet.second_order`). The Hessian of the mean loss with respect to ``z``
is block-diagonal over examples; with ``s_i = sum_j t_ij`` and ``p_i = softmax(z_i)``

.. math:: \frac{\partial^2 L}{\partial z_i^2} = \frac{s_i}{B}\big(\operatorname{diag} p_i - p_i p_i^T\big)
          \ \text{(cross-entropy)}, \qquad \frac{\partial^2 L}{\partial z_i^2} = \frac{2}{BC} I
          \ \text{(mse)}.

:func:`output_hvp` multiplies it with a tangent ``u`` (``(B, C)``), :func:`output_hessian` forms the
``(B, C, C)`` blocks, and :func:`output_hessian_factor` gives a factor
``H_i = coef_i A_i^T A_i``: ``A_i = diag(sqrt p_i) (I - 1 p_i^T)`` for cross-entropy (since
``sum_j p_ij = 1``, ``A^T A = diag p - 2 p p^T + p p^T``) and ``A_i = I`` for mse.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ._checks import check_array, check_labels

__all__ = [
    "cross_entropy",
    "mse",
    "get_loss",
    "log_softmax",
    "softmax",
    "LOSSES",
    "loss_name",
    "cross_entropy_hvp",
    "mse_hvp",
    "cross_entropy_hessian_factor",
    "mse_hessian_factor",
    "output_hvp",
    "output_hessian_factor",
    "output_hessian",
]


def log_softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise log softmax with the stable log-sum-exp; ``z`` is ``(B, C)``."""
    m = z.max(axis=1, keepdims=True)  # (B, 1)
    s = z - m  # (B, C)
    return s - np.log(np.exp(s).sum(axis=1, keepdims=True))


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax; ``z`` is ``(B, C)``."""
    return np.exp(log_softmax(z))


def _targets(z: np.ndarray, y, name: str = "y") -> np.ndarray:
    """One-hot ``(B, C)`` targets from integer labels, or validated probability targets."""
    B, C = z.shape
    y_arr = np.asarray(y)
    if y_arr.ndim == 1:
        labels = check_labels(y_arr, name, n=B, n_classes=C)
        t = np.zeros((B, C), dtype=z.dtype)
        t[np.arange(B), labels] = 1.0
        return t
    if y_arr.ndim != 2 or y_arr.shape != (B, C):  # the shape first: a (B, 1) column is not a dtype problem
        hint = f": a column of labels; pass {name}.ravel()" if y_arr.shape == (B, 1) and C != 1 else ""
        raise ValueError(f"{name} must be labels of shape ({B},) or targets of shape ({B}, {C}), got shape {y_arr.shape}{hint}")
    t = check_array(y_arr, name, shape=(B, C))
    return t.astype(z.dtype, copy=False)


def _check_output(z, name="z"):
    z = check_array(z, name, ndim=2)
    if z.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one example, got shape {z.shape}")
    return z


def cross_entropy(z, y) -> tuple[float, np.ndarray]:
    """Mean softmax cross-entropy and ``eps = dL/dz``.

    Parameters
    ----------
    z : ndarray, shape (B, C)
        Logits.
    y : ndarray, shape (B,) int, or (B, C) float
        Integer class labels in ``[0, C)`` or target probabilities (rows need not sum to 1:
        the formula above is used as written, which is what the unsupervised uniform-label loss
        ``-(1/C) sum_j log softmax(z)_j`` needs).

    Returns
    -------
    loss : float
    eps : ndarray, shape (B, C)
    """
    z = _check_output(z)
    t = _targets(z, y)
    B = z.shape[0]
    ls = log_softmax(z)  # (B, C)
    loss = -float(np.sum(t * ls)) / B
    eps = (np.exp(ls) * t.sum(axis=1, keepdims=True) - t) / B  # (B, C)
    return loss, eps


def mse(z, y) -> tuple[float, np.ndarray]:
    """Mean squared error over every element and ``eps = dL/dz``.

    Parameters
    ----------
    z : ndarray, shape (B, C)
    y : ndarray, shape (B, C) float, or (B,) int labels (one-hot targets)
    """
    z = _check_output(z)
    t = _targets(z, y)
    r = z - t  # (B, C)
    n = r.size
    return float(np.sum(r * r)) / n, (2.0 / n) * r


def cross_entropy_hvp(z, y, u) -> np.ndarray:
    r"""``(d^2L/dz^2) u`` for the mean softmax cross-entropy (:func:`cross_entropy`).

    Differentiating ``eps_i = (s_i p_i - t_i)/B`` once more (``dp/dz = diag p - p p^T``):

    .. math:: (H u)_i = \frac{s_i}{B}\big(p_i \odot u_i - p_i\,(p_i \cdot u_i)\big),
              \qquad s_i = \textstyle\sum_j t_{ij}.

    Parameters
    ----------
    z : ndarray, shape (B, C)
        Logits.
    y : ndarray, shape (B,) int, or (B, C) float
        Labels or targets, as in :func:`cross_entropy`.
    u : ndarray, shape (B, C)
        A tangent of the logits.

    Returns
    -------
    ndarray, shape (B, C)
    """
    z = _check_output(z)
    t = _targets(z, y)
    u = check_array(u, "u", shape=z.shape)
    p = softmax(z)  # (B, C)
    s = t.sum(axis=1, keepdims=True) / z.shape[0]  # (B, 1): s_i / B
    return s * (p * u - p * np.sum(p * u, axis=1, keepdims=True))


def mse_hvp(z, y, u) -> np.ndarray:
    """``(d^2L/dz^2) u = (2 / (B C)) u`` for the mean squared error (:func:`mse`); shapes as in
    :func:`cross_entropy_hvp`."""
    z = _check_output(z)
    _targets(z, y)
    u = check_array(u, "u", shape=z.shape)
    return (2.0 / z.size) * u


def cross_entropy_hessian_factor(z, y) -> tuple[np.ndarray, np.ndarray]:
    r"""A factor of the cross-entropy's per-example output Hessian: ``H_i = coef_i A_i^T A_i``.

    ``A_i = diag(sqrt p_i) (I - 1 p_i^T)``: row ``a`` is ``sqrt(p_ia) (e_a - p_i)``, and
    ``coef_i = s_i / B`` (negative only for targets with a negative row sum).

    Returns
    -------
    A : ndarray, shape (B, C, C)
    coef : ndarray, shape (B, C)
        ``coef_i`` repeated for every row of ``A_i``.
    """
    z = _check_output(z)
    t = _targets(z, y)
    B, C = z.shape
    p = softmax(z)  # (B, C)
    A = np.sqrt(p)[:, :, None] * (np.eye(C, dtype=z.dtype)[None] - p[:, None, :])  # (B, C, C)
    coef = np.repeat(t.sum(axis=1, keepdims=True) / B, C, axis=1)  # (B, C)
    return A, coef


def mse_hessian_factor(z, y) -> tuple[np.ndarray, np.ndarray]:
    """The factor ``A_i = I``, ``coef = 2 / (B C)`` of the mean squared error's output Hessian
    (see :func:`cross_entropy_hessian_factor`)."""
    z = _check_output(z)
    _targets(z, y)
    B, C = z.shape
    A = np.broadcast_to(np.eye(C, dtype=z.dtype), (B, C, C)).copy()
    return A, np.full((B, C), 2.0 / z.size, dtype=z.dtype)


LOSSES: dict[str, Callable] = {"cross_entropy": cross_entropy, "mse": mse}
_ALIASES = {"ce": "cross_entropy", "xent": "cross_entropy", "mean_squared_error": "mse"}


def get_loss(loss) -> Callable:
    """The loss function named ``loss`` ("cross_entropy" or "mse"), or a callable unchanged.

    A custom callable must take ``(z, y)`` and return ``(loss, eps)`` with ``eps`` shaped like
    ``z``.
    """
    if callable(loss):
        return loss
    if not isinstance(loss, str):
        raise TypeError(f"loss must be a name or a callable, got {type(loss).__name__}")
    key = loss.lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in LOSSES:
        raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {loss!r}")
    return LOSSES[key]


#: name -> (output Hessian-vector product, output Hessian factor)
OUTPUT_HESSIANS: dict[str, tuple[Callable, Callable]] = {
    "cross_entropy": (cross_entropy_hvp, cross_entropy_hessian_factor),
    "mse": (mse_hvp, mse_hessian_factor),
}


def loss_name(loss) -> str:
    """The canonical name ("cross_entropy" or "mse") of a loss name, alias, or one of the
    functions :data:`LOSSES` holds; ValueError for anything else (a custom callable has no
    second derivative refnet knows)."""
    if callable(loss):
        for key, fn in LOSSES.items():
            if loss is fn:
                return key
        raise ValueError(
            f"loss must be one of {sorted(LOSSES)} for second-order products (their output Hessians are "
            f"derived here), got the callable {getattr(loss, '__name__', loss)!r}"
        )
    get_loss(loss)
    key = loss.lower().replace("-", "_")
    return _ALIASES.get(key, key)


def output_hvp(loss, z, y, u) -> np.ndarray:
    """``(d^2L/dz^2) u`` of the mean loss named ``loss`` (:func:`cross_entropy_hvp`,
    :func:`mse_hvp`); ``z``, ``u`` are ``(B, C)``."""
    return OUTPUT_HESSIANS[loss_name(loss)][0](z, y, u)


def output_hessian_factor(loss, z, y) -> tuple[np.ndarray, np.ndarray]:
    """``(A, coef)`` with ``d^2L/dz_i^2 = sum_r coef[i, r] A[i, r] A[i, r]^T``: ``A`` ``(B, R, C)``,
    ``coef`` ``(B, R)`` (:func:`cross_entropy_hessian_factor`, :func:`mse_hessian_factor`)."""
    return OUTPUT_HESSIANS[loss_name(loss)][1](z, y)


def output_hessian(loss, z, y) -> np.ndarray:
    """The per-example output Hessians ``d^2L/dz_i^2`` of the mean loss, ``(B, C, C)``."""
    A, coef = output_hessian_factor(loss, z, y)
    return np.einsum("br,bri,brj->bij", coef, A, A)
