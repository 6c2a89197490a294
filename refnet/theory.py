r"""Mean-field signal propagation in deep random networks.

Pure functions, float64 throughout. The network is the one of Poole et al. (2016) and
Schoenholz et al. (2017)::

    h^l = W^l phi(h^{l-1}) + b^l,    W^l_ij ~ N(0, sigma_w^2 / N),    b^l_i ~ N(0, sigma_b^2),

in the infinite-width limit, where every pre-activation is Gaussian. ``q`` is the squared
length per neuron of a pre-activation vector, ``q^l = (1/N) sum_i (h^l_i)^2``, and ``c`` the
correlation between the pre-activations of two inputs. ``z, z1, z2`` are independent standard
normals and ``E`` is the expectation over them.

References
----------
.. [P16] B. Poole, S. Lahiri, M. Raghu, J. Sohl-Dickstein, S. Ganguli, "Exponential
   expressivity in deep neural networks through transient chaos", Advances in Neural
   Information Processing Systems 29 (NIPS 2016), pp. 3360-3368; arXiv:1606.05340.
.. [S17] S. S. Schoenholz, J. Gilmer, S. Ganguli, J. Sohl-Dickstein, "Deep Information
   Propagation", ICLR 2017; arXiv:1611.01232.
.. [PSG17] J. Pennington, S. S. Schoenholz, S. Ganguli, "Resurrecting the sigmoid in deep
   learning through dynamical isometry: theory and practice", Advances in Neural
   Information Processing Systems 30 (NIPS 2017); arXiv:1711.04735.
.. [CS09] Y. Cho, L. K. Saul, "Kernel methods for deep learning", Advances in Neural
   Information Processing Systems 22 (NIPS 2009), pp. 342-350.
.. [W96] C. K. I. Williams, "Computing with infinite networks", Advances in Neural
   Information Processing Systems 9 (NIPS 1996), pp. 295-301 (the arcsine kernel of the
   erf network).

The random-matrix results (Fuss-Catalan moments of products of Gaussian matrices, the expected
mean squared singular value ``chi_1^L`` of a deep Jacobian) are in :mod:`refnet.random_matrix`
and importable from here too. ``phi``, ``phi'`` and ``phi''`` are those of
:mod:`refnet.activations` (tanh' and tanh'' excepted: see ``_sech2``); this module keeps what its
quadrature needs to know about them.

Numerical method
----------------
Gaussian expectations of ``tanh`` and ``erf`` are computed by a composite Gauss-Legendre rule
on ``z in [-10, 10]`` (the mass outside is 1.5e-23) against the normal density. The panel
breakpoints are the integers (the scale of the Gaussian) together with the activation's
feature points mapped to ``z`` (``u / sqrt(q)`` for ``u`` in -20, -18, ..., 20 for tanh and
-6, ..., 6 for erf; the kinks of hard_tanh and ReLU). ``n_quad`` is the number of nodes per
panel (default 16). Plain Gauss-Hermite quadrature in ``z`` was measured and rejected: with
200 nodes it errs by 2e-8 on ``E[tanh'(sqrt(q) z)^2]`` at ``q = 3`` and by 1e-4 at ``q = 10``,
because ``tanh(sqrt(q) z)`` steepens as ``q`` grows; the composite rule agrees with adaptive
``scipy.integrate.quad`` to about 1e-15 for ``q`` from 1e-3 to 1e4.

Two-dimensional expectations ``E[f(u1) f(u2)]`` use the conditional decomposition
``u2 | u1 ~ N(c u1, q (1 - c^2))``: the inner expectation is in closed form for erf
(``E[erf(m + s z)] = erf(m / sqrt(1 + 2 s^2))``) and hard_tanh (normal CDF/PDF), and is the
same composite rule for tanh; the outer one is the composite rule with breakpoints at the
features of both factors. ReLU and linear use closed forms throughout.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np
from numpy.polynomial.legendre import leggauss
from scipy import optimize, special

from ._checks import check_choice, check_float, check_int
from .activations import get_activation
# The random-matrix results live in refnet.random_matrix; refnet.theory.<name> keeps working.
from .random_matrix import expected_msv, fuss_catalan_mellin, fuss_catalan_moments, mean_singular_value_gaussian_product

__all__ = [
    "ACTIVATIONS",
    "length_map",
    "fixed_point_q",
    "chi_1",
    "chi_q",
    "chi_c",
    "correlation_map",
    "correlation_fixed_point",
    "xi_q",
    "xi_c",
    "critical_sigma_w2",
    "fuss_catalan_moments",
    "fuss_catalan_mellin",
    "mean_singular_value_gaussian_product",
    "expected_msv",
]

#: Activation names accepted by every function here ("identity" = "linear",
#: "hardtanh" = "hard_tanh" are accepted aliases).
ACTIVATIONS = ("tanh", "erf", "hard_tanh", "relu", "linear")
_ALIASES = {"identity": "linear", "hardtanh": "hard_tanh"}

_EPS = np.finfo(np.float64).eps
_SQRT2PI = math.sqrt(2.0 * math.pi)
_Z_MAX = 10.0  # P(|z| > 10) = 1.5e-23
_Z_GRID = np.arange(-_Z_MAX, _Z_MAX + 1.0)  # (21,) unit panels: the scale of the Gaussian
_DEFAULT_N_QUAD = 16
# |chi - 1| below this counts as criticality (the depth scale is returned as inf).
_CRITICAL_ATOL = 16 * _EPS


# ---------------------------------------------------------------------------------------------
# The activation table: phi, phi', phi'' come from refnet.activations; what is kept here is what
# the quadrature needs to know about them (feature points, kinks, bounds, closed-form smoothings).
# ---------------------------------------------------------------------------------------------


# The one exception: tanh' and tanh'' as sech^2 and -2 tanh sech^2. refnet.activations computes
# 1 - tanh^2 (from the forward value, as PyTorch's backward does, which every tanh gradient of the
# engine depends on); the two differ in the last bit, which would change chi_1, chi_c, xi_c and
# chi_q of tanh by an ulp. Both are equally accurate here (1e-15 against adaptive quadrature up to
# q = 1e4), so the engine keeps its form and this module keeps its results.
def _sech2(u):
    with np.errstate(over="ignore"):
        return 1.0 / np.cosh(u) ** 2


def _tanh_dd(u):
    return -2.0 * np.tanh(u) * _sech2(u)


def _erf_smooth(m, s):
    """E[erf(m + s z)] = erf(m / sqrt(1 + 2 s^2))."""
    return special.erf(m / np.sqrt(1.0 + 2.0 * s * s))


def _erf_d_smooth(m, s):
    """E[erf'(m + s z)] = (2/sqrt(pi)) exp(-m^2 / (1 + 2 s^2)) / sqrt(1 + 2 s^2)."""
    v = 1.0 + 2.0 * s * s
    return (2.0 / math.sqrt(math.pi)) * np.exp(-m * m / v) / np.sqrt(v)


def _ht_smooth(m, s):
    """E[clip(X, -1, 1)] for X = m + s z, by the normal CDF/PDF (s > 0), clip(m) when s = 0."""
    m = np.asarray(m, dtype=np.float64)
    if s == 0.0:
        return np.clip(m, -1.0, 1.0)
    a = (-1.0 - m) / s
    b = (1.0 - m) / s
    Pa, Pb = special.ndtr(a), special.ndtr(b)
    pa, pb = np.exp(-0.5 * a * a) / _SQRT2PI, np.exp(-0.5 * b * b) / _SQRT2PI
    # -P(X < -1) + P(X > 1) + E[X; -1 < X < 1]
    return -Pa + special.ndtr(-b) + m * (Pb - Pa) + s * (pa - pb)


def _ht_d_smooth(m, s):
    """E[1{|m + s z| < 1}] = Phi((1 - m)/s) - Phi((-1 - m)/s)."""
    m = np.asarray(m, dtype=np.float64)
    if s == 0.0:
        return (np.abs(m) < 1.0).astype(np.float64)
    return special.ndtr((1.0 - m) / s) - special.ndtr((-1.0 - m) / s)


@dataclass(frozen=True)
class _Activation:
    name: str
    phi: Callable
    dphi: Callable
    ddphi: Callable  # a.e.: hard_tanh'' and relu'' are 0 here; their Dirac parts enter in closed form
    features: np.ndarray  # points u where phi changes character (panel breakpoints)
    kinks: np.ndarray  # points u where phi' jumps (hard_tanh, relu)
    sup_phi2: float  # sup phi(u)^2 (inf when unbounded)
    sup_dphi2: float  # sup phi'(u)^2
    smooth: Callable | None  # (m, s) -> E[phi(m + s z)] in closed form, or None
    dsmooth: Callable | None  # (m, s) -> E[phi'(m + s z)] in closed form, or None


def _entry(name, features, kinks, sup_phi2, sup_dphi2, smooth=None, dsmooth=None, *, dphi=None, ddphi=None):
    """A table row: phi, phi', phi'' of :func:`refnet.activations.get_activation` (unless given)."""
    act = get_activation(name)
    return _Activation(name, act.phi, dphi or act.dphi, ddphi or act.d2phi, np.asarray(features, dtype=np.float64),
                       np.asarray(kinks, dtype=np.float64), sup_phi2, sup_dphi2, smooth, dsmooth)


_TABLE = {
    "tanh": _entry("tanh", np.arange(-20.0, 21.0, 2.0), [], 1.0, 1.0, dphi=_sech2, ddphi=_tanh_dd),
    "erf": _entry("erf", np.arange(-6.0, 7.0, 1.0), [], 1.0, 4.0 / math.pi, _erf_smooth, _erf_d_smooth),
    "hard_tanh": _entry("hard_tanh", [-1.0, 1.0], [-1.0, 1.0], 1.0, 1.0, _ht_smooth, _ht_d_smooth),
    "relu": _entry("relu", [0.0], [0.0], math.inf, 1.0),
    "linear": dataclasses.replace(_entry("identity", [], [], math.inf, 1.0), name="linear"),
}
_HOMOGENEOUS = ("relu", "linear")  # phi(a u) = a phi(u) for a > 0


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------


def _activation(activation) -> _Activation:
    if isinstance(activation, str):
        key = activation.lower().replace("-", "_")
        activation = _ALIASES.get(key, activation)
    name = check_choice(activation, "activation", ACTIVATIONS + tuple(_ALIASES))
    return _TABLE[_ALIASES.get(name, name)]


def _check_n_quad(n_quad) -> int:
    return check_int(n_quad, "n_quad", min_value=2)


def _check_variances(sigma_w2, sigma_b2):
    sw2 = check_float(sigma_w2, "sigma_w2", min_value=0.0, min_inclusive=False)
    sb2 = check_float(sigma_b2, "sigma_b2", min_value=0.0)
    return sw2, sb2


def _scalar_or_array(x, name, lo, hi):
    """A finite real scalar or array with entries in [lo, hi] -> (float64 array, is_scalar)."""
    if isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name} must be a real number or array, got bool {x!r}")
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real number or array, got {type(x).__name__} {x!r}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {x!r}")
    if arr.size and (arr.min() < lo or arr.max() > hi):
        raise ValueError(
            f"{name} must lie in [{lo}, {hi}], got values in [{arr.min()}, {arr.max()}]"
        )
    return arr, arr.ndim == 0


# ---------------------------------------------------------------------------------------------
# Quadrature
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=32)
def _legendre(n: int):
    x, w = leggauss(n)
    return x, w


def _panels(a, b, n):
    """Gauss-Legendre nodes and weights (against the N(0, 1) density) on panels [a, b]."""
    x, w = _legendre(n)  # (n,)
    half = 0.5 * (b - a)
    z = (0.5 * (a + b))[..., None] + half[..., None] * x  # (..., P, n)
    wt = half[..., None] * w * np.exp(-0.5 * z * z) / _SQRT2PI  # (..., P, n)
    return z, wt


def _normal_rule(points, n, *, even=False):
    """Composite Gauss-Legendre rule for E[f(z)], z ~ N(0, 1), on [-10, 10].

    Breakpoints: the grid ``_Z_GRID`` plus ``points`` (in z, clipped to [-10, 10]). With
    ``even=True`` the rule covers [0, 10] with doubled weights, exact for even integrands.
    Returns 1-D nodes ``z`` and weights ``w`` with ``sum(w * f(z)) ~= E[f(z)]``.
    """
    pts = np.clip(np.asarray(points, dtype=np.float64), -_Z_MAX, _Z_MAX)
    grid = _Z_GRID
    if even:
        pts, grid = np.abs(pts), grid[grid >= 0.0]
    b = np.unique(np.concatenate([grid, pts]))  # sorted, no empty panels
    z, w = _panels(b[:-1], b[1:], n)  # (P, n)
    return z.ravel(), (2.0 * w if even else w).ravel()


def _normal_rule_rows(extra, n):
    """One composite rule per row: breakpoints ``_Z_GRID`` plus the row of ``extra`` (R, k).

    Returns nodes and weights of shape (R, M) (rows share M; clipped duplicates give empty
    panels of zero weight).
    """
    R = extra.shape[0]
    pts = np.concatenate(
        [np.broadcast_to(_Z_GRID, (R, _Z_GRID.size)), np.clip(extra, -_Z_MAX, _Z_MAX)], axis=1
    )
    pts.sort(axis=1)  # (R, P)
    z, w = _panels(pts[:, :-1], pts[:, 1:], n)  # (R, P-1, n)
    return z.reshape(R, -1), w.reshape(R, -1)


def _points(act: _Activation) -> np.ndarray:
    return np.union1d(act.features, act.kinks)


def _expect_1d(f, act: _Activation, q: float, n: int) -> float:
    """E[f(sqrt(q) z)] for an even integrand f (all 1-D integrands here are even)."""
    if q == 0.0:
        return float(f(np.zeros(1))[0])
    rq = math.sqrt(q)
    z, w = _normal_rule(_points(act) / rq, n, even=True)
    return float(np.sum(w * f(rq * z)))


def _e_phi2(act, q, n):
    """E[phi(sqrt(q) z)^2]."""
    name = act.name
    if name == "relu":
        return 0.5 * q
    if name == "linear":
        return q
    if name == "hard_tanh":
        if q == 0.0:
            return 0.0
        a = 1.0 / math.sqrt(q)
        pdf = math.exp(-0.5 * a * a) / _SQRT2PI
        return q * math.erf(a / math.sqrt(2.0)) - 2.0 * math.sqrt(q) * pdf + 2.0 * special.ndtr(-a)
    return _expect_1d(lambda u: act.phi(u) ** 2, act, q, n)


def _e_dphi2(act, q, n):
    """E[phi'(sqrt(q) z)^2] (for ReLU at q = 0 the q -> 0+ limit 1/2)."""
    name = act.name
    if name == "relu":
        return 0.5
    if name == "linear":
        return 1.0
    if name == "hard_tanh":
        return 1.0 if q == 0.0 else math.erf(1.0 / math.sqrt(2.0 * q))
    return _expect_1d(lambda u: act.dphi(u) ** 2, act, q, n)


def _e_phi_ddphi(act, q, n):
    """E[phi(sqrt(q) z) phi''(sqrt(q) z)] (phi'' as a distribution for hard_tanh and ReLU)."""
    name = act.name
    if name in ("relu", "linear"):
        return 0.0  # relu'' = delta(u) and relu(0) = 0
    if name == "hard_tanh":
        # phi'' = delta(u + 1) - delta(u - 1), phi(+-1) = +-1: -(p(1) + p(-1)), p = N(0, q) density
        if q == 0.0:
            return 0.0
        a = 1.0 / math.sqrt(q)
        return -2.0 * a * math.exp(-0.5 * a * a) / _SQRT2PI
    return _expect_1d(lambda u: act.phi(u) * act.ddphi(u), act, q, n)


def _inner_quad(f, m, s, act, n):
    """E[f(m + s z)] for each entry of the 1-D array m (composite rule, one row per entry)."""
    if s == 0.0:
        return f(m)
    extra = (_points(act)[None, :] - m[:, None]) / s  # (R, k) features in z
    z, w = _normal_rule_rows(extra, n)  # (R, M)
    return np.sum(w * f(m[:, None] + s * z), axis=1)


def _expect_2d(act: _Activation, q: float, c: float, n: int, derivative: bool) -> float:
    """E[g(u1) g(u2)], g = phi (or phi' if ``derivative``), u1 = sqrt(q) z1,
    u2 = sqrt(q) (c z1 + sqrt(1 - c^2) z2), by conditioning on u1."""
    g = act.dphi if derivative else act.phi
    if q == 0.0:
        return float(g(np.zeros(1))[0] ** 2)
    rq = math.sqrt(q)
    s = rq * math.sqrt(max(0.0, 1.0 - c * c))  # std of u2 given u1
    closed = act.dsmooth if derivative else act.smooth
    if closed is not None:
        inner = lambda m: closed(m, s)  # noqa: E731
    else:
        inner = lambda m: _inner_quad(g, m, s, act, n)  # noqa: E731
    # Breakpoints (in u1) for g(u1) and for psi(c u1) = E[g(c u1 + s z2)], a smoothed g whose
    # features sit at the features of g, at the kinks widened by s, and on the scale s itself.
    pts = _points(act)
    u_pts = [pts]
    if c != 0.0:
        v = [pts]
        if s > 0.0:
            v.append(s * _Z_GRID)
            if act.kinks.size:
                v.append((act.kinks[:, None] + s * _Z_GRID[None, :]).ravel())
        u_pts.append(np.concatenate(v) / c)
    # g is odd (phi) or even (phi') and so is psi(c u1): the integrand is even in u1.
    z, w = _normal_rule(np.concatenate(u_pts) / rq, n, even=True)  # (M,)
    u1 = rq * z  # (M,)
    return float(np.sum(w * g(u1) * inner(c * u1)))


# ---------------------------------------------------------------------------------------------
# Fixed points of increasing one-dimensional maps
# ---------------------------------------------------------------------------------------------


def _monotone_fixed_point(g, x0, lo, hi, tol, max_iter, what):
    """Fixed point of an increasing map ``g`` on [lo, hi] reached by iterating from x0.

    The iteration ``x <- g(x)`` (at most ``max_iter`` steps, stopping once a step is below
    ``tol * max(1, |x|)``) selects the attracting fixed point; the last iterate is then
    polished to machine precision by ``scipy.optimize.brentq`` on a bracket found by stepping
    from it in the direction the iteration moves (first to twice the distance predicted by
    Aitken extrapolation, then by doubling steps, then geometrically toward the bound).
    Raises ValueError when no fixed point is bracketed.
    """
    x, step = x0, math.nan
    for _ in range(max_iter):
        gx = g(x)
        if not math.isfinite(gx):
            raise ValueError(f"{what}: the iteration produced a non-finite value {gx}")
        step = gx - x
        x = min(max(gx, lo), hi)
        if abs(step) <= tol * max(1.0, abs(x)):
            break

    def f(t):
        return g(t) - t

    fx = f(x)
    if fx == 0.0:
        return x
    sgn = math.copysign(1.0, fx)
    bound = hi if fx > 0 else lo  # the iteration moves toward this side
    last = x  # last point known to have f of the sign of f(x)

    def brent(a, b):
        return optimize.brentq(f, *sorted((a, b)), xtol=1e-300, rtol=4 * _EPS, maxiter=500)

    def probe(t):
        """0: root at t; 1: sign change between last and t; -1: same sign as at x."""
        ft = f(t)
        if ft == 0.0:
            return 0
        return 1 if math.copysign(1.0, ft) != sgn else -1

    rho = fx / step if step == step and step != 0.0 else math.nan  # contraction estimate
    guesses = [x + 2.0 * fx / (1.0 - rho)] if 0.0 < rho < 1.0 else []
    guesses += [x + fx * 2.0**k for k in range(1, 1000)]
    for t in guesses:
        if not lo < t < hi:
            if guesses and t == guesses[0] and 0.0 < rho < 1.0:
                continue  # the extrapolated probe left the interval: fall back to doubling
            break
        if (t - last) * sgn <= 0.0:
            continue  # not beyond the last point already known to be short of the root
        r = probe(t)
        if r == 0:
            return t
        if r == 1:
            return brent(last, t)
        last = t
    base = last
    for t in [bound - (bound - base) * 2.0**-j for j in range(1, 61)] + [bound]:
        r = probe(t)
        if r == 0:
            return t
        if r == 1:
            return brent(last, t)
        last = t
    raise ValueError(f"{what}: no fixed point found between {x} and {bound}")


# ---------------------------------------------------------------------------------------------
# Mean-field maps
# ---------------------------------------------------------------------------------------------


def length_map(q, sigma_w2, sigma_b2, activation, *, n_quad=_DEFAULT_N_QUAD):
    r"""The length map (variance map) of one random layer.

    .. math:: q^{l} = \sigma_w^2 \, E_z\big[\phi(\sqrt{q^{l-1}}\, z)^2\big] + \sigma_b^2

    (the length map of [P16]; the same recursion in [S17]). Closed forms: ReLU
    ``sigma_w2 q / 2 + sigma_b2``; linear ``sigma_w2 q + sigma_b2``; hard_tanh with
    ``a = 1/sqrt(q)``, ``E[phi^2] = q (2 Phi(a) - 1) - 2 sqrt(q) pdf(a) + 2 Phi(-a)``. tanh
    and erf use the composite quadrature of the module docstring.

    Parameters
    ----------
    q : float or array_like
        Length ``q^{l-1} >= 0`` of the incoming pre-activations (any shape).
    sigma_w2 : float
        Weight variance ``sigma_w^2 > 0`` (weights are ``N(0, sigma_w^2 / N)``).
    sigma_b2 : float
        Bias variance ``sigma_b^2 >= 0``.
    activation : {"tanh", "erf", "hard_tanh", "relu", "linear"}
    n_quad : int
        Gauss-Legendre nodes per panel of the composite rule (tanh and erf only).

    Returns
    -------
    float or ndarray
        ``q^l``, with the shape of ``q``.
    """
    qa, scalar = _scalar_or_array(q, "q", 0.0, np.inf)
    sw2, sb2 = _check_variances(sigma_w2, sigma_b2)
    act = _activation(activation)
    n = _check_n_quad(n_quad)
    out = np.array([sw2 * _e_phi2(act, float(v), n) + sb2 for v in qa.ravel()]).reshape(qa.shape)
    return float(out) if scalar else out


def fixed_point_q(
    sigma_w2,
    sigma_b2,
    activation,
    *,
    q0=1.0,
    tol=1e-13,
    max_iter=200,
    n_quad=_DEFAULT_N_QUAD,
):
    r"""The fixed point ``q*`` of the length map: ``q* = sigma_w2 E[phi(sqrt(q*) z)^2] + sigma_b2``.

    (The fixed point of the length map in [P16] and [S17]; [PSG17] Sec. 2.2 takes the
    pre-activations at this fixed point.) Found by iterating the length map from ``q0``
    (which selects the attracting fixed point, as a deep network does), then polished to
    machine precision by a bracketing root finder (``scipy.optimize.brentq``); the polish
    also finishes the job when ``max_iter`` iterations did not reach ``tol`` (slow
    convergence near ``chi_q = 1``).

    Closed forms for the unbounded activations, with slope ``a = sigma_w2 / 2`` (ReLU) or
    ``a = sigma_w2`` (linear): ``q* = sigma_b2 / (1 - a)`` when ``a < 1``; when ``a = 1`` and
    ``sigma_b2 = 0`` every ``q`` is fixed and ``q0`` is returned. Otherwise (ReLU with
    ``sigma_w2 >= 2``, linear with ``sigma_w2 >= 1``, apart from that critical case) the length
    grows without bound, and a ValueError is raised instead of returning ``inf``.

    For the bounded activations (tanh, erf, hard_tanh) ``q*`` lies in
    ``[sigma_b2, sigma_w2 + sigma_b2]``. With ``sigma_b2 = 0`` and
    ``sigma_w2 phi'(0)^2 <= 1`` the attracting fixed point is ``q* = 0`` (signals vanish).

    Parameters
    ----------
    sigma_w2 : float
        Weight variance, ``> 0``.
    sigma_b2 : float
        Bias variance, ``>= 0``.
    activation : {"tanh", "erf", "hard_tanh", "relu", "linear"}
    q0 : float
        Starting length, ``> 0``.
    tol : float
        The iteration phase stops when ``|q^{l+1} - q^l| <= tol * max(1, q^l)`` (``> 0``);
        the bracketed polish that follows brings ``q*`` to machine precision.
    max_iter : int
        Maximum number of iterations, ``>= 1``.
    n_quad : int
        Gauss-Legendre nodes per panel (tanh, erf).

    Returns
    -------
    float
        ``q*``.

    Raises
    ------
    ValueError
        When the length diverges (ReLU/linear above criticality) or no fixed point is found.
    """
    sw2, sb2 = _check_variances(sigma_w2, sigma_b2)
    act = _activation(activation)
    q0 = check_float(q0, "q0", min_value=0.0, min_inclusive=False)
    tol = check_float(tol, "tol", min_value=0.0, min_inclusive=False)
    max_iter = check_int(max_iter, "max_iter", min_value=1)
    n = _check_n_quad(n_quad)
    if act.name in _HOMOGENEOUS:
        a = sw2 / 2.0 if act.name == "relu" else sw2
        if a < 1.0:
            return sb2 / (1.0 - a)
        if a == 1.0 and sb2 == 0.0:
            return q0
        crit = "2" if act.name == "relu" else "1"
        raise ValueError(
            f"the length map of {act.name} has no finite fixed point for sigma_w2={sw2}, "
            f"sigma_b2={sb2}: q^l grows without bound (need sigma_w2 < {crit}, or "
            f"sigma_w2 = {crit} with sigma_b2 = 0)"
        )
    hi = sw2 * act.sup_phi2 + sb2
    return _monotone_fixed_point(
        lambda t: sw2 * _e_phi2(act, t, n) + sb2,
        min(q0, hi),
        0.0,
        hi,
        tol,
        max_iter,
        f"fixed_point_q({act.name}, sigma_w2={sw2}, sigma_b2={sb2})",
    )


def _setup(sigma_w2, sigma_b2, activation, q, n_quad):
    """Validated ``(sigma_w2, sigma_b2, activation, n_quad, q)``, q defaulting to q*."""
    sw2, sb2 = _check_variances(sigma_w2, sigma_b2)
    act = _activation(activation)
    n = _check_n_quad(n_quad)
    return sw2, sb2, act, n, _resolve_q(q, sw2, sb2, act, n)


def _resolve_q(q, sw2, sb2, act, n):
    if q is None:
        return fixed_point_q(sw2, sb2, act.name, n_quad=n)
    return check_float(q, "q", min_value=0.0)


def chi_1(sigma_w2, sigma_b2, activation, *, q=None, n_quad=_DEFAULT_N_QUAD):
    r"""``chi_1``: the mean squared singular value of one layer's Jacobian.

    .. math:: \chi_1 = \sigma_w^2 \, E_z\big[\phi'(\sqrt{q^*}\, z)^2\big]

    ([P16] and [S17], where its value 1 marks the order-to-chaos transition; [PSG17]
    eq. (5), where it is called ``chi``.) At the fixed point it is the slope of the
    correlation map at ``c = 1``, ``chi_1 = d c^{l+1} / d c^l |_{c=1}``; ``chi_1 < 1`` is
    the ordered phase, ``chi_1 > 1`` the chaotic one. Closed forms: ReLU ``sigma_w2 / 2``;
    linear ``sigma_w2``; hard_tanh ``sigma_w2 (2 Phi(1/sqrt(q)) - 1)``.

    Parameters
    ----------
    sigma_w2, sigma_b2 : float
        Weight (``> 0``) and bias (``>= 0``) variances.
    activation : {"tanh", "erf", "hard_tanh", "relu", "linear"}
    q : float, optional
        Length at which to evaluate (``>= 0``); default ``q* = fixed_point_q(...)``.
    n_quad : int
        Gauss-Legendre nodes per panel (tanh, erf).

    Returns
    -------
    float
    """
    sw2, sb2, act, n, qv = _setup(sigma_w2, sigma_b2, activation, q, n_quad)
    return sw2 * _e_dphi2(act, qv, n)


def chi_q(sigma_w2, sigma_b2, activation, *, q=None, n_quad=_DEFAULT_N_QUAD):
    r"""``chi_q``: the slope of the length map, which sets the depth scale ``xi_q``.

    .. math:: \chi_q = \frac{\partial q^{l+1}}{\partial q^l}
              = \sigma_w^2 E_z\big[\phi'(u)^2 + \phi''(u)\phi(u)\big]
              = \chi_1 + \sigma_w^2 E_z[\phi''(u)\phi(u)],\quad u = \sqrt{q}\, z

    ([S17], the argument of the logarithm in its depth scale ``xi_q``; the middle equality is
    Gaussian integration by parts.) For hard_tanh ``phi''`` is ``delta(u+1) - delta(u-1)``, so
    ``E[phi phi''] = -2 a pdf(a)`` with ``a = 1/sqrt(q)``; for ReLU and linear
    ``chi_q = chi_1``.

    Parameters
    ----------
    sigma_w2, sigma_b2 : float
        Weight (``> 0``) and bias (``>= 0``) variances.
    activation : {"tanh", "erf", "hard_tanh", "relu", "linear"}
    q : float, optional
        Length at which to evaluate (``>= 0``); default ``q*``.
    n_quad : int
        Gauss-Legendre nodes per panel (tanh, erf).

    Returns
    -------
    float
    """
    sw2, sb2, act, n, qv = _setup(sigma_w2, sigma_b2, activation, q, n_quad)
    return sw2 * (_e_dphi2(act, qv, n) + _e_phi_ddphi(act, qv, n))


def _corr_q(q, sw2, sb2, act, n):
    """The length used by the correlation map (q* by default); q = 0 only where scale-free."""
    qv = _resolve_q(q, sw2, sb2, act, n)
    if qv == 0.0:
        if act.name in _HOMOGENEOUS and sb2 == 0.0:
            return 1.0  # phi(a u) = a phi(u) and sigma_b2 = 0: the map does not depend on q
        raise ValueError(
            f"the correlation map is undefined at q = 0 for {act.name} "
            f"(sigma_w2={sw2}, sigma_b2={sb2}): the pre-activations vanish; pass q > 0"
        )
    return qv


def _corr_raw(act, q, c, n):
    """E[phi(u1) phi(u2)] at length q and correlation c."""
    if act.name == "relu":
        cc = min(1.0, max(-1.0, c))
        k1 = math.sqrt(max(0.0, 1.0 - cc * cc)) + (math.pi - math.acos(cc)) * cc
        return q / (2.0 * math.pi) * k1
    if act.name == "linear":
        return q * c
    if c == 1.0:
        return _e_phi2(act, q, n)  # same rule as the length map, so c = 1 maps to 1 exactly
    return _expect_2d(act, q, c, n, derivative=False)


def _dcorr_raw(act, q, c, n):
    """E[phi'(u1) phi'(u2)] at length q and correlation c."""
    if act.name == "relu":
        cc = min(1.0, max(-1.0, c))
        return (math.pi - math.acos(cc)) / (2.0 * math.pi)
    if act.name == "linear":
        return 1.0
    if c == 1.0:
        return _e_dphi2(act, q, n)
    return _expect_2d(act, q, c, n, derivative=True)


def correlation_map(c, sigma_w2, sigma_b2, activation, *, q=None, n_quad=_DEFAULT_N_QUAD):
    r"""The correlation map of one random layer.

    .. math:: c^{l+1} = \frac{\sigma_w^2\, E[\phi(u_1)\phi(u_2)] + \sigma_b^2}{q^{l+1}},\quad
              u_1 = \sqrt{q}\, z_1,\ u_2 = \sqrt{q}\,(c\, z_1 + \sqrt{1-c^2}\, z_2)

    with ``q^{l+1} = length_map(q)`` (the correlation map of [P16] and [S17]). At the default
    ``q = q*`` the denominator is ``q*`` itself, as in the papers; for another ``q`` it is the
    next layer's length, so ``c = 1`` always maps to 1. Closed forms: ReLU by the arc-cosine
    kernel [CS09], ``E[relu(u1) relu(u2)] = q/(2 pi) (sqrt(1-c^2) + (pi - arccos c) c)``;
    linear ``q c``. erf and hard_tanh: composite quadrature over ``u1`` of ``phi(u1)`` times
    the closed-form conditional mean ``E[phi(u2) | u1]``; tanh: nested composite quadrature
    (module docstring). erf has the closed form ``(2/pi) arcsin(2 q c / (1 + 2 q))`` [W96],
    which the tests use as an independent check.

    Parameters
    ----------
    c : float or array_like
        Input correlation(s) in ``[-1, 1]`` (any shape).
    sigma_w2, sigma_b2 : float
        Weight (``> 0``) and bias (``>= 0``) variances.
    activation : {"tanh", "erf", "hard_tanh", "relu", "linear"}
    q : float, optional
        Length of both inputs (``> 0``); default ``q*``. ``q = 0`` is accepted only for ReLU
        and linear with ``sigma_b2 = 0``, where the map does not depend on ``q``.
    n_quad : int
        Gauss-Legendre nodes per panel (tanh, erf, hard_tanh).

    Returns
    -------
    float or ndarray
        ``c^{l+1}``, with the shape of ``c``.
    """
    ca, scalar = _scalar_or_array(c, "c", -1.0, 1.0)
    sw2, sb2 = _check_variances(sigma_w2, sigma_b2)
    act = _activation(activation)
    n = _check_n_quad(n_quad)
    qv = _corr_q(q, sw2, sb2, act, n)
    q_next = sw2 * _e_phi2(act, qv, n) + sb2
    vals = [(sw2 * _corr_raw(act, qv, float(v), n) + sb2) / q_next for v in ca.ravel()]
    out = np.clip(np.array(vals, dtype=np.float64), -1.0, 1.0).reshape(ca.shape)
    return float(out) if scalar else out


def correlation_fixed_point(
    sigma_w2,
    sigma_b2,
    activation,
    *,
    q=None,
    c0=0.0,
    tol=1e-10,
    max_iter=20,
    n_quad=_DEFAULT_N_QUAD,
):
    r"""The attracting fixed point ``c*`` of the correlation map.

    ``c* = correlation_map(c*)`` ([P16]; [S17]). ``c = 1`` is
    always a fixed point; it attracts when its slope ``chi_1 <= 1`` (ordered phase and
    criticality), and then ``1.0`` is returned. In the chaotic phase (``chi_1 > 1``) ``c* < 1``
    is found by iterating the map from ``c0`` and polishing with ``scipy.optimize.brentq``
    on a bracket found beyond the last iterate (``f(c) = map(c) - c`` is convex on [0, 1]
    with roots ``c*`` and 1 only, so the bracket holds ``c*``).

    Parameters
    ----------
    sigma_w2, sigma_b2 : float
        Weight (``> 0``) and bias (``>= 0``) variances.
    activation : {"tanh", "erf", "hard_tanh", "relu", "linear"}
    q : float, optional
        Length (``> 0``); default ``q*``.
    c0 : float
        Starting correlation in ``[-1, 1)``.
    tol : float
        The iteration phase stops when a step is below ``tol`` (``> 0``).
    max_iter : int
        Maximum number of iterations, ``>= 1``. The iteration only has to head for ``c*``:
        the bracketed polish that follows brings ``c*`` to machine precision whatever
        ``tol`` and ``max_iter`` (each map evaluation of tanh costs milliseconds, hence the
        small default).
    n_quad : int
        Gauss-Legendre nodes per panel.

    Returns
    -------
    float
        ``c*``.
    """
    sw2, sb2 = _check_variances(sigma_w2, sigma_b2)
    act = _activation(activation)
    c0 = check_float(c0, "c0", min_value=-1.0, max_value=1.0, max_inclusive=False)
    tol = check_float(tol, "tol", min_value=0.0, min_inclusive=False)
    max_iter = check_int(max_iter, "max_iter", min_value=1)
    n = _check_n_quad(n_quad)
    qv = _corr_q(q, sw2, sb2, act, n)
    q_next = sw2 * _e_phi2(act, qv, n) + sb2
    slope1 = sw2 * qv * _e_dphi2(act, qv, n) / q_next  # d c^{l+1} / d c^l at c = 1
    if slope1 <= 1.0 + _CRITICAL_ATOL:
        return 1.0

    def g(c):
        return min(1.0, max(-1.0, (sw2 * _corr_raw(act, qv, c, n) + sb2) / q_next))

    return _monotone_fixed_point(
        g, c0, -1.0, 1.0, tol, max_iter,
        f"correlation_fixed_point({act.name}, sigma_w2={sw2}, sigma_b2={sb2})",
    )


def chi_c(sigma_w2, sigma_b2, activation, *, c=None, q=None, n_quad=_DEFAULT_N_QUAD):
    r"""``chi_c``: the slope of the correlation map at its fixed point.

    .. math:: \chi_c = \sigma_w^2 \, E[\phi'(u_1)\phi'(u_2)],\quad
              u_1 = \sqrt{q}\, z_1,\ u_2 = \sqrt{q}\,(c\, z_1 + \sqrt{1-c^2}\, z_2)

    evaluated at ``c = c*`` ([S17], the argument of the logarithm in its depth scale ``xi_c``).
    In the ordered phase ``c* = 1`` and ``chi_c = chi_1``. At ``q = q*`` it equals
    ``d c^{l+1} / d c^l`` at ``c`` (Price's theorem). Closed forms: ReLU
    ``sigma_w2 (pi - arccos c) / (2 pi)`` [CS09]; linear ``sigma_w2``.

    Parameters
    ----------
    sigma_w2, sigma_b2 : float
        Weight (``> 0``) and bias (``>= 0``) variances.
    activation : {"tanh", "erf", "hard_tanh", "relu", "linear"}
    c : float, optional
        Correlation in ``[-1, 1]``; default ``c* = correlation_fixed_point(...)``.
    q : float, optional
        Length (``> 0``); default ``q*``.
    n_quad : int
        Gauss-Legendre nodes per panel.

    Returns
    -------
    float
    """
    sw2, sb2 = _check_variances(sigma_w2, sigma_b2)
    act = _activation(activation)
    n = _check_n_quad(n_quad)
    qv = _corr_q(q, sw2, sb2, act, n)
    if c is None:
        cv = correlation_fixed_point(sw2, sb2, act.name, q=qv, n_quad=n)
    else:
        cv = check_float(c, "c", min_value=-1.0, max_value=1.0)
    return sw2 * _dcorr_raw(act, qv, cv, n)


def _depth_scale(chi: float) -> float:
    if abs(chi - 1.0) <= _CRITICAL_ATOL:
        return math.inf
    if chi == 0.0:
        return 0.0
    return -1.0 / math.log(chi)


def xi_q(sigma_w2, sigma_b2, activation, *, q=None, n_quad=_DEFAULT_N_QUAD):
    r"""Depth scale of the length: ``|q^l - q*| ~ exp(-l / xi_q)``.

    .. math:: \xi_q^{-1} = -\log\Big(\chi_1 + \sigma_w^2 \int Dz\, \phi''(\sqrt{q^*} z)\,
              \phi(\sqrt{q^*} z)\Big) = -\log \chi_q

    ([S17], the depth scale ``xi_q``.) Returns ``inf`` when ``|chi_q - 1| <= 16 eps`` and a
    negative number when ``chi_q > 1`` (an unstable ``q`` passed explicitly: the depth over
    which a deviation grows by ``e``).

    Parameters
    ----------
    sigma_w2, sigma_b2 : float
        Weight (``> 0``) and bias (``>= 0``) variances.
    activation : {"tanh", "erf", "hard_tanh", "relu", "linear"}
    q : float, optional
        Length (``>= 0``); default ``q*``.
    n_quad : int
        Gauss-Legendre nodes per panel.

    Returns
    -------
    float
    """
    return _depth_scale(chi_q(sigma_w2, sigma_b2, activation, q=q, n_quad=n_quad))


def xi_c(sigma_w2, sigma_b2, activation, *, q=None, n_quad=_DEFAULT_N_QUAD):
    r"""Depth scale of the correlation: ``|c^l - c*| ~ exp(-l / xi_c)``.

    .. math:: \xi_c^{-1} = -\log\Big(\sigma_w^2 \int Dz_1 Dz_2\, \phi'(u_1^*)\phi'(u_2^*)\Big)
              = -\log \chi_c

    with ``u1*, u2*`` at ``(q*, c*)`` ([S17], the depth scale ``xi_c``). In the ordered phase
    ``c* = 1`` and this is ``-1 / log(chi_1)``; it diverges (``inf`` is returned, for
    ``|chi_c - 1| <= 16 eps``) at the order-to-chaos transition ``chi_1 = 1``.

    Parameters
    ----------
    sigma_w2, sigma_b2 : float
        Weight (``> 0``) and bias (``>= 0``) variances.
    activation : {"tanh", "erf", "hard_tanh", "relu", "linear"}
    q : float, optional
        Length (``> 0``); default ``q*``.
    n_quad : int
        Gauss-Legendre nodes per panel.

    Returns
    -------
    float
    """
    return _depth_scale(chi_c(sigma_w2, sigma_b2, activation, q=q, n_quad=n_quad))


def critical_sigma_w2(sigma_b2, activation, *, n_quad=_DEFAULT_N_QUAD):
    r"""The order-to-chaos line: the ``sigma_w^2`` at which ``chi_1(q*) = 1``.

    .. math:: \sigma_w^2\, E_z\big[\phi'(\sqrt{q^*} z)^2\big] = 1,\qquad
              q^* = \sigma_w^2 E_z[\phi(\sqrt{q^*} z)^2] + \sigma_b^2

    (The order-to-chaos transition of [P16] and [S17] in the ``(sigma_w^2, sigma_b^2)``
    plane.) Solved by ``scipy.optimize.brentq`` in ``sigma_w2``, starting from
    ``1 / sup phi'^2`` (where ``chi_1 <= 1``), with ``q*`` solved afresh at each trial value.
    With ``sigma_b2 = 0`` the line starts at ``1 / phi'(0)^2`` (1 for tanh and hard_tanh,
    ``pi / 4`` for erf).

    ReLU: ``chi_1 = sigma_w2 / 2`` whatever ``q``, so 2.0 is returned; note that for
    ``sigma_b2 > 0`` ``q*`` diverges as ``sigma_w2 -> 2``, so only ``(2, 0)`` is a critical
    point with a finite ``q*``. Linear: 1.0 (likewise only with ``sigma_b2 = 0``).

    Parameters
    ----------
    sigma_b2 : float
        Bias variance, ``>= 0``.
    activation : {"tanh", "erf", "hard_tanh", "relu", "linear"}
    n_quad : int
        Gauss-Legendre nodes per panel.

    Returns
    -------
    float
    """
    sb2 = check_float(sigma_b2, "sigma_b2", min_value=0.0)
    act = _activation(activation)
    n = _check_n_quad(n_quad)
    if act.name == "relu":
        return 2.0
    if act.name == "linear":
        return 1.0

    def g(sw2):
        return sw2 * _e_dphi2(act, fixed_point_q(sw2, sb2, act.name, n_quad=n), n) - 1.0

    lo = 1.0 / act.sup_dphi2  # chi_1 <= sigma_w2 sup phi'^2 = 1 here
    g_lo = g(lo)
    if g_lo >= 0.0:
        return lo
    hi = 2.0 * lo
    for _ in range(200):
        if g(hi) > 0.0:
            break
        lo, hi = hi, 2.0 * hi
    else:  # pragma: no cover - chi_1 grows like sqrt(sigma_w2) for bounded phi
        raise ValueError(f"critical_sigma_w2: no critical point found for {act.name}")
    return optimize.brentq(g, lo, hi, xtol=1e-15, rtol=4 * _EPS, maxiter=500)

