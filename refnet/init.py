"""Weight and bias initialisations of the SPP paper (Lee et al., ICLR 2020, section 5).

Every function is pure: it takes a ``numpy.random.Generator`` (or an int seed, turned into one
with :func:`refnet._checks.as_rng`), a shape and a dtype, and returns a new array. Nothing reads
or writes NumPy's global random state.

Layouts and fans (PyTorch's layouts, the paper code's fans)
-----------------------------------------------------------
* dense ``W`` is ``(n_out, n_in)``:             ``fan_in = n_in``,          ``fan_out = n_out``
* conv ``W`` is ``(c_out, c_in, kh, kw)``:      ``fan_in = c_in*kh*kw``,    ``fan_out = c_out*kh*kw``

More generally, for any shape ``(a, b, *k)`` with ``ndim >= 2``, ``fan_in = b * prod(k)`` and
``fan_out = a * prod(k)`` (:func:`compute_fans`), which also covers 1-D and 3-D convolutions.

Initialisations (all normals are untruncated unless ``truncated=True``)
-----------------------------------------------------------------------
========================  ==========================  ===========================================
name (aliases)            function                    distribution
========================  ==========================  ===========================================
``lecun`` (``vs-l``)      :func:`lecun_normal`        ``N(0, 1/fan_in)``
``glorot`` (``vs-g``)     :func:`glorot_normal`       ``N(0, 2/(fan_in + fan_out))``
``he`` (``vs-h``)         :func:`he_normal`           ``N(0, 2/fan_in)``
``sg``                    :func:`sg_normal`           ``N(0, gamma)``, gamma is the VARIANCE
``orthogonal`` (``ldi``)  :func:`orthogonal`          Haar orthogonal times ``gain``
``delta_orthogonal``      :func:`delta_orthogonal`    orthogonal kernel centre, zeros elsewhere
(bias, every init)        :func:`bias_init`           zeros, or ``N(0, sigma_b^2)`` if sigma_b > 0
========================  ==========================  ===========================================

Determinism and draw order
--------------------------
* The same seed (or a Generator in the same state) gives the same array, bit for bit.
* All draws are made in float64 from the given Generator and cast to ``dtype`` at the end, so the
  float32 array is exactly the float64 array rounded to float32.
* Draws per function: the VS and SG inits draw ``rng.standard_normal(shape)`` (C order) once;
  the truncated variant then redraws, in C order, every entry with ``|z| > 2`` until none is left;
  :func:`orthogonal` draws one ``standard_normal((rows, cols))`` matrix (``rows = shape[0]``,
  ``cols = prod(shape[1:])``); :func:`delta_orthogonal` draws exactly what :func:`orthogonal`
  draws for the ``(c_out, c_in)`` centre matrix; :func:`bias_init` draws
  ``standard_normal(n)`` only when ``sigma_b > 0`` and draws NOTHING otherwise.
* A layer initialises its WEIGHT FIRST and its BIAS SECOND from the same Generator
  (:meth:`Initializer.weight` then :meth:`Initializer.bias`), and a network initialises its layers
  in order. With ``sigma_b = 0`` (the default, and the paper's setting) the bias consumes no draws,
  so the weights do not depend on whether biases exist.

Example
-------
>>> import numpy as np
>>> from refnet.init import get_initializer
>>> init = get_initializer("LDI")            # the paper's name for orthogonal
>>> rng = np.random.default_rng(0)
>>> W = init.weight(rng, (100, 784))          # rows orthonormal: W @ W.T == I
>>> b = init.bias(rng, 100)                   # zeros, no draws
>>> bool(np.allclose(W @ W.T, np.eye(100)))
True
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
from typing import Any, Mapping

import numpy as np

from ._checks import as_rng, check_bool, check_choice, check_float, check_memory, resolve_dtype

__all__ = [
    "TRUNCATED_STD",
    "INIT_NAMES",
    "Initializer",
    "bias_init",
    "compute_fans",
    "delta_orthogonal",
    "get_initializer",
    "glorot_normal",
    "he_normal",
    "lecun_normal",
    "orthogonal",
    "sg_normal",
]

#: Standard deviation of a standard normal truncated to [-2, 2] (Keras VarianceScaling's
#: constant): ``sqrt(1 - 4 phi(2) / (2 Phi(2) - 1))``. Dividing the target std by it makes the
#: truncated draw's variance equal the target.
TRUNCATED_STD = 0.87962566103423978

#: Canonical init names, in the order of the paper's section 5.
INIT_NAMES = ("lecun", "glorot", "he", "sg", "orthogonal", "delta_orthogonal")

_ALIASES = {"vs_l": "lecun", "vs_g": "glorot", "vs_h": "he", "ldi": "orthogonal"}


# --------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------


def _check_shape(shape, name: str = "shape", *, min_ndim: int = 2, draw: bool = True) -> tuple[int, ...]:
    """A tuple of ints >= 1 with at least ``min_ndim`` entries (an int means ``(int,)``). With
    ``draw``, an array of that shape must fit in memory (three float64 copies: the draw, the
    dtype conversion, an orthogonal factorisation): refused up front, with the size needed."""
    if isinstance(shape, numbers.Integral) and not isinstance(shape, (bool, np.bool_)):
        shape = (shape,)
    if not isinstance(shape, (tuple, list)):
        raise TypeError(f"{name} must be a tuple of ints, got {type(shape).__name__} {shape!r}")
    out = []
    for s in shape:
        if isinstance(s, (bool, np.bool_)) or not isinstance(s, numbers.Integral):
            raise TypeError(f"{name} must be a tuple of ints, got {tuple(shape)!r}")
        if s < 1:
            raise ValueError(f"{name} must have every entry >= 1, got {tuple(shape)!r}")
        out.append(int(s))
    if len(out) < min_ndim:
        raise ValueError(
            f"{name} must have at least {min_ndim} dimensions "
            "((n_out, n_in) dense or (c_out, c_in, kh, kw) conv), "
            f"got {tuple(shape)!r}"
        )
    if draw:
        check_memory(3 * 8 * math.prod(out), f"an initial array of {name} {tuple(out)}")
    return tuple(out)


def compute_fans(shape) -> tuple[int, int]:
    """Fan-in and fan-out of a weight shape, as in the paper's code and PyTorch.

    For ``shape = (a, b, *k)`` with receptive field ``r = prod(k)`` (``r = 1`` for dense):
    ``fan_in = b * r`` and ``fan_out = a * r``. So dense ``(n_out, n_in)`` gives
    ``(n_in, n_out)`` and conv ``(c_out, c_in, kh, kw)`` gives ``(c_in*kh*kw, c_out*kh*kw)``.

    Parameters
    ----------
    shape : tuple of int
        Weight shape, ``ndim >= 2``.

    Returns
    -------
    (fan_in, fan_out) : tuple of int
    """
    shape = _check_shape(shape, draw=False)
    r = math.prod(shape[2:])
    return shape[1] * r, shape[0] * r


# --------------------------------------------------------------------------------------------
# variance-scaling and scaled-Gaussian inits
# --------------------------------------------------------------------------------------------


def _truncated_standard_normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal conditioned on ``|z| <= 2``, by rejection (redraw the rejected entries)."""
    z = rng.standard_normal(shape)
    bad = np.abs(z) > 2.0
    while bad.any():  # acceptance rate 0.9545, so a handful of rounds at most
        z[bad] = rng.standard_normal(int(bad.sum()))
        bad = np.abs(z) > 2.0
    return z


def _normal(rng, shape, var: float, dtype, truncated: bool) -> np.ndarray:
    """``N(0, var)`` draws (or the variance-corrected 2-sigma truncation), cast to ``dtype``."""
    std = math.sqrt(var)
    if truncated:
        z = _truncated_standard_normal(rng, shape)  # shape
        std = std / TRUNCATED_STD
    else:
        z = rng.standard_normal(shape)  # shape
    return (z * std).astype(dtype, copy=False)


def _variance_scaling(rng, shape, dtype, truncated, kind: str) -> np.ndarray:
    rng = as_rng(rng, "rng")
    shape = _check_shape(shape)
    dt = resolve_dtype(dtype)
    truncated = check_bool(truncated, "truncated")
    fan_in, fan_out = compute_fans(shape)
    var = {"lecun": 1.0 / fan_in, "glorot": 2.0 / (fan_in + fan_out), "he": 2.0 / fan_in}[kind]
    return _normal(rng, shape, var, dt, truncated)


_TRUNC_DOC = """
    With ``truncated=True`` the draw is ``w = (sigma / 0.87962566103423978) z`` with ``z`` a
    standard normal conditioned on ``|z| <= 2`` (rejection sampling). 0.8796... is the standard
    deviation of that truncated normal (Keras ``VarianceScaling``), so ``Var(w) = sigma^2``
    exactly and ``|w| <= 2 sigma / 0.8796...``.
"""


def lecun_normal(rng, shape, dtype=np.float64, *, truncated: bool = False) -> np.ndarray:
    """VS-L (LeCun): ``W_ij ~ N(0, 1/fan_in)``.

    Parameters
    ----------
    rng : numpy.random.Generator or int
        Source of randomness (an int is a seed).
    shape : tuple of int
        ``(n_out, n_in)`` dense or ``(c_out, c_in, kh, kw)`` conv; fans from :func:`compute_fans`.
    dtype : float64 (default) or float32
        Draws are made in float64 and cast.
    truncated : bool, default False
        Untruncated (the paper's setting) or the 2-sigma truncation described below.

    Returns
    -------
    W : ndarray of shape ``shape``
    """
    return _variance_scaling(rng, shape, dtype, truncated, "lecun")


def glorot_normal(rng, shape, dtype=np.float64, *, truncated: bool = False) -> np.ndarray:
    """VS-G (Glorot / Xavier): ``W_ij ~ N(0, 2/(fan_in + fan_out))``.

    Parameters and return value as in :func:`lecun_normal`.
    """
    return _variance_scaling(rng, shape, dtype, truncated, "glorot")


def he_normal(rng, shape, dtype=np.float64, *, truncated: bool = False) -> np.ndarray:
    """VS-H (He / Kaiming, fan-in mode): ``W_ij ~ N(0, 2/fan_in)``.

    Parameters and return value as in :func:`lecun_normal`.
    """
    return _variance_scaling(rng, shape, dtype, truncated, "he")


for _f in (lecun_normal, glorot_normal, he_normal):
    _f.__doc__ += _TRUNC_DOC
del _f


def sg_normal(rng, shape, gamma, dtype=np.float64) -> np.ndarray:
    """SG(gamma), the scaled Gaussian: ``W_ij ~ N(0, gamma)``; ``gamma`` is the VARIANCE.

    The standard deviation is ``sqrt(gamma)`` (this reading matches the published JSV means of
    the SPP paper). The variance does not depend on the fans.

    Parameters
    ----------
    rng : numpy.random.Generator or int
    shape : tuple of int
        Any shape with ``ndim >= 1`` (an int ``n`` means ``(n,)``).
    gamma : float > 0
        Variance of every entry.
    dtype : float64 (default) or float32

    Returns
    -------
    W : ndarray of shape ``shape``
    """
    rng = as_rng(rng, "rng")
    shape = _check_shape(shape, min_ndim=1)
    gamma = check_float(gamma, "gamma", min_value=0.0, min_inclusive=False)
    dt = resolve_dtype(dtype)
    return _normal(rng, shape, gamma, dt, False)


# --------------------------------------------------------------------------------------------
# orthogonal inits
# --------------------------------------------------------------------------------------------


def _haar_orthogonal(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """A ``(rows, cols)`` matrix with orthonormal columns (rows >= cols) or rows (rows < cols),
    Haar-distributed (uniform on the Stiefel manifold).

    ``A ~ N(0, 1)^{rows x cols}``; with ``M = A`` (or ``A^T`` if rows < cols, so M is tall),
    ``M = Q R`` (reduced QR) and ``Q <- Q diag(sign(diag R))``, which makes the factorisation
    unique (``diag R > 0``) and so ``Q`` Haar (Mezzadri 2006). Same steps as
    ``torch.nn.init.orthogonal_``.
    """
    a = rng.standard_normal((rows, cols))  # (rows, cols)
    m = a.T if rows < cols else a  # (max, min): tall
    q, r = np.linalg.qr(m)  # q: (max, min), r: (min, min)
    d = np.diagonal(r)  # (min,)
    q = q * np.where(d < 0.0, -1.0, 1.0)  # (max, min), column j times sign(R_jj); sign(0) := +1
    return q.T if rows < cols else q  # (rows, cols)


def _check_orthogonal_args(rng, shape, gain, dtype):
    """The checked arguments of :func:`orthogonal` and :func:`delta_orthogonal`: a Generator,
    a shape with ``ndim >= 2``, a ``gain > 0`` and a float dtype."""
    rng = as_rng(rng, "rng")
    shape = _check_shape(shape)
    gain = check_float(gain, "gain", min_value=0.0, min_inclusive=False)
    return rng, shape, gain, resolve_dtype(dtype)


def orthogonal(rng, shape, gain: float = 1.0, dtype=np.float64) -> np.ndarray:
    """LDI: a Haar-distributed orthogonal weight times ``gain``.

    The shape is flattened to ``(rows, cols) = (shape[0], prod(shape[1:]))`` (for conv,
    ``(c_out, c_in*kh*kw)``, as ``torch.nn.init.orthogonal_`` does) and

    * ``rows >= cols``: orthonormal columns, ``W^T W = gain^2 I_cols``;
    * ``rows <  cols``: orthonormal rows,    ``W W^T = gain^2 I_rows``;

    so every singular value of the flattened ``W`` equals ``gain``. Construction: QR of a standard
    Gaussian matrix with the ``sign(diag R)`` correction (Mezzadri 2006), which makes ``W / gain``
    exactly Haar-distributed; without the correction it is not (e.g. ``E tr Q != 0``).

    Parameters
    ----------
    rng : numpy.random.Generator or int
    shape : tuple of int
        ``ndim >= 2``.
    gain : float > 0, default 1.0
        Common singular value (the paper's code uses 1, also for tanh).
    dtype : float64 (default) or float32

    Returns
    -------
    W : ndarray of shape ``shape``
    """
    rng, shape, gain, dt = _check_orthogonal_args(rng, shape, gain, dtype)
    rows, cols = shape[0], math.prod(shape[1:])
    q = _haar_orthogonal(rng, rows, cols)  # (rows, cols)
    return (gain * q).reshape(shape).astype(dt, copy=False)


def delta_orthogonal(rng, shape, gain: float = 1.0, dtype=np.float64) -> np.ndarray:
    """Delta-orthogonal conv kernel (Xiao et al. 2018): orthogonal centre tap, zeros elsewhere.

    For ``shape = (c_out, c_in, kh, kw)``::

        W[:, :, kh//2, kw//2] = gain * Q,   Q a Haar (c_out, c_in) matrix as in :func:`orthogonal`
        W[:, :, i, j] = 0                   for every other tap (exactly)

    so the convolution, with 'same' padding, acts on each pixel as ``gain * Q`` (an isometry
    when ``c_out >= c_in``). Any number of spatial dimensions is accepted (1-D ``(c_out, c_in, k)``,
    3-D ...); the centre is ``k//2`` along each. EVEN kernel sizes are allowed: there is no
    middle tap and ``k//2`` is the later of the two middle ones (index 1 of 2, 2 of 4). With
    PyTorch/TensorFlow 'same' padding (the extra pad after) the tap aligned with the output pixel
    is ``(k-1)//2``, so an even kernel acts as ``gain * Q`` followed by a one-pixel shift, which is
    still norm preserving away from the border. For a 2-D shape ``(n_out, n_in)`` this is exactly
    :func:`orthogonal`.
    The draws are those of ``orthogonal(rng, (c_out, c_in))``.

    Parameters
    ----------
    rng : numpy.random.Generator or int
    shape : tuple of int
        ``(c_out, c_in, *kernel)``, ``ndim >= 2``.
    gain : float > 0, default 1.0
    dtype : float64 (default) or float32

    Returns
    -------
    W : ndarray of shape ``shape``
    """
    rng, shape, gain, dt = _check_orthogonal_args(rng, shape, gain, dtype)
    c_out, c_in = shape[:2]
    q = _haar_orthogonal(rng, c_out, c_in)  # (c_out, c_in)
    w = np.zeros(shape, dtype=np.float64)  # (c_out, c_in, *kernel)
    centre = (slice(None), slice(None)) + tuple(k // 2 for k in shape[2:])
    w[centre] = gain * q
    return w.astype(dt, copy=False)


# --------------------------------------------------------------------------------------------
# bias
# --------------------------------------------------------------------------------------------


def bias_init(rng, n, sigma_b: float = 0.0, dtype=np.float64) -> np.ndarray:
    """Bias: ``b = 0`` if ``sigma_b == 0`` (the paper's setting), else ``b_i ~ N(0, sigma_b^2)``.

    With ``sigma_b == 0`` NO random numbers are drawn, so the Generator's state is unchanged.

    Parameters
    ----------
    rng : numpy.random.Generator or int
    n : int or tuple of int
        Bias length (or shape), entries >= 1.
    sigma_b : float >= 0, default 0.0
        Standard deviation of the bias.
    dtype : float64 (default) or float32

    Returns
    -------
    b : ndarray of shape ``(n,)`` (or ``n`` if a tuple)
    """
    rng = as_rng(rng, "rng")
    shape = _check_shape(n, "n", min_ndim=1)
    sigma_b = check_float(sigma_b, "sigma_b", min_value=0.0)
    dt = resolve_dtype(dtype)
    if sigma_b == 0.0:
        return np.zeros(shape, dtype=dt)
    return (sigma_b * rng.standard_normal(shape)).astype(dt, copy=False)


# --------------------------------------------------------------------------------------------
# Initializer: a named, validated, serialisable choice of init
# --------------------------------------------------------------------------------------------

# Per canonical name: the keyword arguments it takes and their defaults (None: required).
_ARGS: dict[str, dict[str, Any]] = {
    "lecun": {"sigma_b": 0.0, "truncated": False},
    "glorot": {"sigma_b": 0.0, "truncated": False},
    "he": {"sigma_b": 0.0, "truncated": False},
    "sg": {"gamma": None, "sigma_b": 0.0},
    "orthogonal": {"gain": 1.0, "sigma_b": 0.0},
    "delta_orthogonal": {"gain": 1.0, "sigma_b": 0.0},
}

_ARG_DOC = {
    "gain": "a float > 0",
    "gamma": "the weight variance, a float > 0",
    "sigma_b": "the bias std, a float >= 0",
    "truncated": "a bool",
}


def _canonical_name(name) -> str:
    choices = list(INIT_NAMES) + ["vs-l", "vs-g", "vs-h", "ldi"]
    key = check_choice(name, "init", choices).replace("-", "_")
    return _ALIASES.get(key, key)


def _check_arg(key: str, value):
    if key == "gain":
        return check_float(value, "gain", min_value=0.0, min_inclusive=False)
    if key == "gamma":
        return check_float(value, "gamma", min_value=0.0, min_inclusive=False)
    if key == "sigma_b":
        return check_float(value, "sigma_b", min_value=0.0)
    return check_bool(value, "truncated")


def _canonical_kwargs(name: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Validate ``kwargs`` for init ``name`` and fill the defaults (``None`` means 'not given')."""
    allowed = _ARGS[name]
    for key, value in kwargs.items():
        if not isinstance(key, str):
            raise TypeError(f"init argument names must be str, got {type(key).__name__} {key!r}")
        if key not in allowed and value is not None:
            where = [n for n, a in _ARGS.items() if key in a]
            applies = f"; {key} applies to {', '.join(where)}" if where else ""
            raise ValueError(
                f"{key} is not an argument of init {name!r}: expected only "
                f"{', '.join(sorted(allowed))}{applies}; got {key}={value!r}"
            )
    out = {}
    for key, default in allowed.items():
        value = kwargs.get(key)
        if value is None:
            if default is None:
                raise ValueError(
                    f"init {name!r} requires {key} ({_ARG_DOC[key]}), got none"
                )
            value = default
        out[key] = _check_arg(key, value)
    return out


@dataclasses.dataclass(frozen=True, init=False, eq=True, repr=False)
class Initializer:
    """A validated weight-and-bias initialisation: a canonical name and its arguments.

    Build one with :func:`get_initializer` (or ``Initializer(name, kwargs)``, which does the
    same checks). It is immutable, hashable, compares by value, and aliases give equal objects
    (``get_initializer("vs-h") == get_initializer("he")``).

    Attributes
    ----------
    name : str
        One of ``lecun, glorot, he, sg, orthogonal, delta_orthogonal``.
    kwargs : Mapping[str, Any]
        Read-only; every argument of that init with defaults filled in:
        VS inits ``{sigma_b, truncated}``; ``sg`` ``{gamma, sigma_b}``;
        orthogonal inits ``{gain, sigma_b}``.
    """

    name: str
    kwargs: Mapping[str, Any]

    def __init__(self, name: str, kwargs: Mapping[str, Any] | None = None):
        canon = _canonical_name(name)
        if kwargs is None:
            kwargs = {}
        if not isinstance(kwargs, Mapping):
            raise TypeError(f"kwargs must be a mapping, got {type(kwargs).__name__} {kwargs!r}")
        object.__setattr__(self, "name", canon)
        object.__setattr__(
            self, "kwargs", types.MappingProxyType(_canonical_kwargs(canon, dict(kwargs)))
        )

    def __hash__(self) -> int:
        return hash((self.name, tuple(sorted(self.kwargs.items()))))

    def __repr__(self) -> str:
        return f"Initializer(name={self.name!r}, kwargs={dict(self.kwargs)!r})"

    def weight(self, rng, shape, dtype=np.float64) -> np.ndarray:
        """Draw a weight of ``shape`` (see the function of the same name for the distribution).

        Parameters
        ----------
        rng : numpy.random.Generator or int
        shape : tuple of int
            ``(n_out, n_in)`` dense or ``(c_out, c_in, kh, kw)`` conv.
        dtype : float64 (default) or float32
        """
        k = self.kwargs
        if self.name == "lecun":
            return lecun_normal(rng, shape, dtype, truncated=k["truncated"])
        if self.name == "glorot":
            return glorot_normal(rng, shape, dtype, truncated=k["truncated"])
        if self.name == "he":
            return he_normal(rng, shape, dtype, truncated=k["truncated"])
        if self.name == "sg":
            return sg_normal(rng, shape, k["gamma"], dtype)
        if self.name == "orthogonal":
            return orthogonal(rng, shape, k["gain"], dtype)
        return delta_orthogonal(rng, shape, k["gain"], dtype)

    def bias(self, rng, shape, dtype=np.float64) -> np.ndarray:
        """Draw a bias of ``shape`` with :func:`bias_init` and this init's ``sigma_b``.

        Call it AFTER :meth:`weight` on the same Generator (the documented draw order).
        """
        return bias_init(rng, shape, self.kwargs["sigma_b"], dtype)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able ``{"name": str, "kwargs": {str: float | bool}}``; see :meth:`from_dict`."""
        return {"name": self.name, "kwargs": dict(self.kwargs)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Initializer":
        """Inverse of :meth:`to_dict` (validates everything, as :func:`get_initializer` does)."""
        if not isinstance(d, Mapping):
            raise TypeError(f"d must be a mapping with keys name, kwargs; got {type(d).__name__}")
        extra = set(d) - {"name", "kwargs"}
        if "name" not in d or extra:
            raise ValueError(
                f"d must have keys name and (optionally) kwargs, got keys {sorted(map(str, d))}"
            )
        return cls(d["name"], d.get("kwargs") or {})


def get_initializer(init, **kwargs) -> Initializer:
    """Resolve ``init`` (a name or an :class:`Initializer`) to a validated :class:`Initializer`.

    Parameters
    ----------
    init : str or Initializer
        ``"lecun"``, ``"glorot"``, ``"he"``, ``"sg"``, ``"orthogonal"``, ``"delta_orthogonal"``
        or the paper's aliases ``"vs-l"``, ``"vs-g"``, ``"vs-h"``, ``"ldi"`` (= orthogonal);
        case-insensitive, ``-`` and ``_`` are the same. An Initializer is returned as is (then
        no kwargs may be given).
    gain : float > 0, optional
        orthogonal and delta_orthogonal only (default 1.0).
    gamma : float > 0
        sg only, and required there: the weight VARIANCE.
    sigma_b : float >= 0, optional
        Every init (default 0.0): bias std.
    truncated : bool, optional
        lecun, glorot, he only (default False).

    A keyword given as ``None`` counts as not given.

    Raises
    ------
    ValueError
        Unknown name, missing ``gamma`` for sg, an argument that does not apply to the init, a
        value out of range, or kwargs together with an Initializer.
    TypeError
        ``init`` neither str nor Initializer, or an argument of the wrong type.
    """
    if isinstance(init, Initializer):
        given = {k: v for k, v in kwargs.items() if v is not None}
        if given:
            raise ValueError(
                "init is already an Initializer, so no keyword arguments are expected; "
                f"got {given!r} (put them in get_initializer(name, ...) instead)"
            )
        return init
    if not isinstance(init, str):
        raise TypeError(
            f"init must be a str (one of {list(INIT_NAMES)} or an alias) or an Initializer, "
            f"got {type(init).__name__} {init!r}"
        )
    return Initializer(init, kwargs)
