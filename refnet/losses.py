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
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ._checks import check_array, check_labels

__all__ = ["cross_entropy", "mse", "get_loss", "log_softmax", "softmax", "LOSSES"]


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
