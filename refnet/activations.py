r"""Elementwise activations phi with their derivatives phi' and phi''.

Each activation is an :class:`Activation`: a name, its parameters and three vectorised functions

.. math:: \phi(h), \qquad \phi'(h), \qquad \phi''(h).

``D^l = diag(phi'(h^l))`` is the diagonal factor of the layer Jacobian ``J^{l-1,l} = D^l W^l``
(PAPER.md section 1). At a kink the one-sided derivative PyTorch uses is taken, so that refnet and
PyTorch agree exactly: relu'(0) = 0, leaky_relu'(0) = slope, hard_tanh'(+-1) = 0.

Names users pass (case-insensitive, '-' and '_' alike): identity (alias linear), tanh, relu,
leaky_relu (``slope``, default 0.01), selu, elu (``alpha``, default 1), sigmoid, hard_tanh, erf,
softplus.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from scipy import special

from ._checks import check_float

__all__ = ["Activation", "get_activation", "ACTIVATIONS"]

# SELU constants (Klambauer et al. 2017), the same digits as PyTorch.
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946
_TWO_OVER_SQRT_PI = 2.0 / float(np.sqrt(np.pi))  # a Python float keeps float32 inputs float32


@dataclass(frozen=True)
class Activation:
    """An elementwise nonlinearity phi with phi' and phi''.

    Attributes
    ----------
    name : str
        Canonical name (a key of :data:`ACTIVATIONS`).
    params : tuple of (str, float)
        Parameters, e.g. ``(("slope", 0.01),)`` for leaky_relu.
    """

    name: str
    params: tuple = ()
    _fns: tuple = field(default=(), repr=False, compare=False)

    def phi(self, h: np.ndarray) -> np.ndarray:
        """phi(h), elementwise; same shape and dtype as ``h``."""
        return self._fns[0](h, **dict(self.params))

    def dphi(self, h: np.ndarray) -> np.ndarray:
        """phi'(h), elementwise: the diagonal of D."""
        return self._fns[1](h, **dict(self.params))

    def phi_dphi(self, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(phi(h), phi'(h))`` together; tanh and sigmoid reuse phi (``1 - y^2``, ``y (1 - y)``)."""
        y = self.phi(h)
        if self.name == "tanh":
            return y, 1.0 - y * y
        if self.name == "sigmoid":
            return y, y * (1.0 - y)
        return y, self.dphi(h)

    def d2phi(self, h: np.ndarray) -> np.ndarray:
        """phi''(h), elementwise (used by mean-field theory and curvature checks)."""
        return self._fns[2](h, **dict(self.params))

    __call__ = phi

    @property
    def is_linear(self) -> bool:
        return self.name == "identity"

    def to_dict(self) -> dict:
        """JSON-able description; :func:`get_activation` inverts it."""
        return {"name": self.name, **dict(self.params)}

    def __str__(self) -> str:
        if not self.params:
            return self.name
        return self.name + "(" + ", ".join(f"{k}={v:g}" for k, v in self.params) + ")"


def _where(cond, a, b):
    return np.where(cond, a, b)


# --- identity -------------------------------------------------------------------------------
def _id(h):
    return h.copy()


def _id_d(h):
    return np.ones_like(h)


def _zero(h, **_):
    return np.zeros_like(h)


# --- tanh -----------------------------------------------------------------------------------
def _tanh_d(h):
    t = np.tanh(h)
    return 1.0 - t * t


def _tanh_dd(h):
    t = np.tanh(h)
    return -2.0 * t * (1.0 - t * t)


# --- relu / leaky relu ----------------------------------------------------------------------
def _relu(h):
    return np.maximum(h, 0.0).astype(h.dtype, copy=False)


def _relu_d(h):
    return (h > 0).astype(h.dtype)


def _leaky(h, slope):
    return _where(h > 0, h, slope * h).astype(h.dtype, copy=False)


def _leaky_d(h, slope):
    return _where(h > 0, 1.0, slope).astype(h.dtype, copy=False)


def _leaky_dd(h, slope):
    return np.zeros_like(h)


# --- elu / selu -----------------------------------------------------------------------------
def _elu(h, alpha):
    return _where(h > 0, h, alpha * np.expm1(np.minimum(h, 0.0))).astype(h.dtype, copy=False)


def _elu_d(h, alpha):
    return _where(h > 0, 1.0, alpha * np.exp(np.minimum(h, 0.0))).astype(h.dtype, copy=False)


def _elu_dd(h, alpha):
    return _where(h > 0, 0.0, alpha * np.exp(np.minimum(h, 0.0))).astype(h.dtype, copy=False)


def _selu(h):
    return (SELU_SCALE * _elu(h, SELU_ALPHA)).astype(h.dtype, copy=False)


def _selu_d(h):
    return (SELU_SCALE * _elu_d(h, SELU_ALPHA)).astype(h.dtype, copy=False)


def _selu_dd(h):
    return (SELU_SCALE * _elu_dd(h, SELU_ALPHA)).astype(h.dtype, copy=False)


# --- sigmoid --------------------------------------------------------------------------------
def _sigmoid(h):
    return special.expit(h)


def _sigmoid_d(h):
    s = special.expit(h)
    return s * (1.0 - s)


def _sigmoid_dd(h):
    s = special.expit(h)
    return s * (1.0 - s) * (1.0 - 2.0 * s)


# --- hard tanh ------------------------------------------------------------------------------
def _hard_tanh(h):
    return np.clip(h, -1.0, 1.0)


def _hard_tanh_d(h):
    return ((h > -1.0) & (h < 1.0)).astype(h.dtype)


# --- erf ------------------------------------------------------------------------------------
def _erf(h):
    return special.erf(h)


def _erf_d(h):
    return _TWO_OVER_SQRT_PI * np.exp(-h * h)


def _erf_dd(h):
    return -2.0 * h * _erf_d(h)  # (-2 h) erf'(h)


# --- softplus (exact: log(1 + e^h), no linear cut-off) --------------------------------------
def _softplus(h):
    return np.logaddexp(0.0, h).astype(h.dtype, copy=False)


def _softplus_d(h):
    return special.expit(h)


def _softplus_dd(h):
    s = special.expit(h)
    return s * (1.0 - s)


#: name -> (phi, phi', phi'', default parameters)
ACTIVATIONS: dict[str, tuple[Callable, Callable, Callable, dict]] = {
    "identity": (_id, _id_d, _zero, {}),
    "tanh": (np.tanh, _tanh_d, _tanh_dd, {}),
    "relu": (_relu, _relu_d, _zero, {}),
    "leaky_relu": (_leaky, _leaky_d, _leaky_dd, {"slope": 0.01}),
    "selu": (_selu, _selu_d, _selu_dd, {}),
    "elu": (_elu, _elu_d, _elu_dd, {"alpha": 1.0}),
    "sigmoid": (_sigmoid, _sigmoid_d, _sigmoid_dd, {}),
    "hard_tanh": (_hard_tanh, _hard_tanh_d, _zero, {}),
    "erf": (_erf, _erf_d, _erf_dd, {}),
    "softplus": (_softplus, _softplus_d, _softplus_dd, {}),
}
_ALIASES = {"linear": "identity", "none": "identity", "hardtanh": "hard_tanh", "leakyrelu": "leaky_relu"}


def get_activation(activation="identity", **params) -> Activation:
    """Return the :class:`Activation` named ``activation``.

    Parameters
    ----------
    activation : str, Activation, dict or None
        A name from :data:`ACTIVATIONS` (or an alias: linear, none, hardtanh), an
        :class:`Activation` (returned unchanged), a dict from :meth:`Activation.to_dict`,
        or None (identity).
    **params
        Parameters of the activation: ``slope`` for leaky_relu, ``alpha`` for elu.

    Raises
    ------
    ValueError
        Unknown name, or a parameter the activation does not take.
    """
    if activation is None:
        activation = "identity"
    if isinstance(activation, Activation):
        if params:
            raise ValueError(f"activation parameters {sorted(params)} given with an Activation object")
        return activation
    if isinstance(activation, dict):
        d = dict(activation)
        name = d.pop("name", None)
        return get_activation(name, **d, **params)
    if not isinstance(activation, str):
        raise TypeError(
            f"activation must be a name, an Activation or None, got {type(activation).__name__}"
        )
    key = activation.lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in ACTIVATIONS:
        raise ValueError(
            f"activation must be one of {sorted(ACTIVATIONS)} (or linear), got {activation!r}"
        )
    fn, dfn, ddfn, defaults = ACTIVATIONS[key]
    unknown = set(params) - set(defaults)
    if unknown:
        raise ValueError(
            f"activation {key!r} takes parameters {sorted(defaults) or 'none'}, got {sorted(unknown)}"
        )
    values = {**defaults, **params}
    for k, v in values.items():
        lo = 0.0 if k == "alpha" else None
        values[k] = check_float(v, k, min_value=lo, min_inclusive=False)
    return Activation(key, tuple(sorted(values.items())), (fn, dfn, ddfn))
