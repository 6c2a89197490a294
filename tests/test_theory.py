"""Tests for refnet.theory: mean-field signal propagation and random-matrix results.

References are computed independently of the module: adaptive QUADPACK (scipy.integrate.quad)
with breakpoints, published closed forms (erf arcsine kernel, ReLU arc-cosine kernel), the
algebraic equation of the Fuss-Catalan generating function, and Monte Carlo with fixed seeds.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import special
from scipy.integrate import IntegrationWarning, quad

from refnet import theory as T

try:  # small (400 x 400) problems: BLAS threads only add contention on a busy machine
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = None


@pytest.fixture
def one_blas_thread():
    with threadpool_limits(1) if threadpool_limits else contextlib.nullcontext():
        yield


SQRT2PI = math.sqrt(2.0 * math.pi)
BOUNDED = ("tanh", "erf", "hard_tanh")

PHI = {
    "tanh": (np.tanh, lambda u: 1.0 / np.cosh(u) ** 2, lambda u: -2.0 * np.tanh(u) / np.cosh(u) ** 2),
    "erf": (
        special.erf,
        lambda u: 2.0 / math.sqrt(math.pi) * np.exp(-u * u),
        lambda u: -4.0 * u / math.sqrt(math.pi) * np.exp(-u * u),
    ),
    "hard_tanh": (lambda u: np.clip(u, -1.0, 1.0), lambda u: float(abs(u) < 1.0), None),
    "relu": (lambda u: max(u, 0.0), lambda u: float(u > 0.0), None),
}
KINKS = {"tanh": [0.0], "erf": [0.0], "hard_tanh": [-1.0, 1.0], "relu": [0.0]}


def gauss_quad(f, points=(), zmax=12.0):
    """E[f(z)], z ~ N(0, 1), by adaptive quad on [-zmax, zmax] split at ``points``."""
    edges = sorted({-zmax, zmax, 0.0, *[p for p in points if abs(p) < zmax]})
    total = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IntegrationWarning)
        for a, b in zip(edges[:-1], edges[1:]):
            total += quad(
                lambda z: f(z) * math.exp(-0.5 * z * z) / SQRT2PI, a, b,
                epsabs=1e-16, epsrel=1e-13, limit=400,
            )[0]
    return total


def expect_1d(f, q, act):
    """E[f(sqrt(q) z)] by quad, split where the activation changes character."""
    rq = math.sqrt(q)
    pts = [u / rq for u in np.arange(-20.0, 21.0, 1.0)] + [k / rq for k in KINKS[act]]
    return gauss_quad(lambda z: f(rq * z), pts)


def expect_2d(f, q, c, act):
    """E[f(u1) f(u2)], u1 = sqrt(q) z1, u2 = sqrt(q) (c z1 + sqrt(1 - c^2) z2), nested quad."""
    rq, s = math.sqrt(q), math.sqrt(q * (1.0 - c * c))
    kinks = KINKS[act]

    def inner(z1):
        m = rq * c * z1
        return gauss_quad(lambda z2: f(m + s * z2), [(k - m) / s for k in kinks])

    pts = [k / rq for k in kinks] + ([k / (rq * c) for k in kinks] if c else [])
    return gauss_quad(lambda z1: f(rq * z1) * inner(z1), pts)


# ---------------------------------------------------------------------------------------------
# One-dimensional Gaussian expectations
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("act", ["tanh", "erf"])
@pytest.mark.parametrize("q", [0.01, 0.5, 1.7, 6.0, 40.0])
def test_quadrature_matches_adaptive_quad(act, q):
    phi, dphi, ddphi = PHI[act]
    e_phi2 = expect_1d(lambda u: phi(u) ** 2, q, act)
    e_dphi2 = expect_1d(lambda u: dphi(u) ** 2, q, act)
    e_phiddphi = expect_1d(lambda u: phi(u) * ddphi(u), q, act)
    # sigma_w2 = 1, sigma_b2 = 0 exposes the bare expectations
    assert T.length_map(q, 1.0, 0.0, act) == pytest.approx(e_phi2, abs=1e-13)
    assert T.chi_1(1.0, 0.0, act, q=q) == pytest.approx(e_dphi2, abs=1e-13)
    assert T.chi_q(1.0, 0.0, act, q=q) == pytest.approx(e_dphi2 + e_phiddphi, abs=1e-13)


@pytest.mark.parametrize("q", [1e-3, 0.3, 1.0, 4.0, 100.0])
def test_erf_closed_forms(q):
    # E[erf(sqrt(q) z)^2] = (2/pi) arcsin(2q / (1 + 2q)); E[erf'^2] = (4/pi) / sqrt(1 + 4q)
    assert T.length_map(q, 1.0, 0.0, "erf") == pytest.approx(
        2.0 / math.pi * math.asin(2.0 * q / (1.0 + 2.0 * q)), abs=1e-14
    )
    assert T.chi_1(1.0, 0.0, "erf", q=q) == pytest.approx(4.0 / math.pi / math.sqrt(1.0 + 4.0 * q), abs=1e-14)


@pytest.mark.parametrize("act", ["hard_tanh", "relu"])
@pytest.mark.parametrize("q", [0.05, 0.7, 2.5, 30.0])
def test_closed_forms_match_quad(act, q):
    phi, dphi, _ = PHI[act]
    assert T.length_map(q, 1.0, 0.0, act) == pytest.approx(expect_1d(lambda u: phi(u) ** 2, q, act), abs=1e-12)
    assert T.chi_1(1.0, 0.0, act, q=q) == pytest.approx(expect_1d(lambda u: dphi(u) ** 2, q, act), abs=1e-12)


def test_linear_closed_forms():
    assert T.length_map(2.0, 0.5, 0.1, "linear") == pytest.approx(1.1, abs=1e-15)
    assert T.chi_1(0.7, 0.2, "linear") == 0.7
    assert T.correlation_map(0.3, 0.5, 0.1, "linear", q=2.0) == pytest.approx((0.5 * 0.6 + 0.1) / 1.1, abs=1e-15)
    assert T.fixed_point_q(0.5, 0.1, "identity") == pytest.approx(0.2, abs=1e-15)


@pytest.mark.parametrize("act", ["tanh", "erf", "hard_tanh", "relu", "linear"])
@pytest.mark.parametrize("q", [0.2, 1.3, 9.0])
def test_chi_q_is_slope_of_length_map(act, q):
    # chi_q = d q^{l+1} / d q^l (Gaussian integration by parts), central differences
    sw2, sb2 = 1.7, 0.2
    h = 1e-5 * q
    fd = (T.length_map(q + h, sw2, sb2, act) - T.length_map(q - h, sw2, sb2, act)) / (2 * h)
    assert T.chi_q(sw2, sb2, act, q=q) == pytest.approx(fd, abs=1e-8)


def test_length_map_vectorised_and_aliases():
    qs = np.array([[0.1, 1.0], [3.0, 7.0]])
    out = T.length_map(qs, 2.0, 0.1, "tanh")
    assert out.shape == (2, 2)
    assert out[1, 0] == T.length_map(3.0, 2.0, 0.1, "tanh")
    assert T.length_map(1.0, 2.0, 0.1, "Hard-Tanh") == T.length_map(1.0, 2.0, 0.1, "hardtanh")
    assert T.chi_1(1.2, 0.0, "identity", q=1.0) == T.chi_1(1.2, 0.0, "linear", q=1.0) == 1.2


# ---------------------------------------------------------------------------------------------
# Fixed points
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "act, sw2, sb2",
    [
        ("tanh", 2.5, 0.3), ("tanh", 1.3, 0.0), ("tanh", 0.6, 0.05), ("tanh", 8.0, 2.0),
        ("erf", 1.0, 0.05), ("erf", 3.0, 0.0), ("hard_tanh", 1.5, 0.3), ("hard_tanh", 4.0, 1.0),
        ("relu", 1.5, 0.1), ("linear", 0.8, 0.3),
    ],
)
def test_q_star_is_fixed_point(act, sw2, sb2):
    q = T.fixed_point_q(sw2, sb2, act)
    assert q > 0.0
    assert T.length_map(q, sw2, sb2, act) == pytest.approx(q, abs=1e-12 * max(1.0, q))
    # attracting: the slope of the length map there is below 1
    assert T.chi_q(sw2, sb2, act) < 1.0


def test_q_star_ordered_without_bias_is_zero():
    # sigma_b2 = 0 and sigma_w2 phi'(0)^2 <= 1: signals vanish
    assert T.fixed_point_q(0.8, 0.0, "tanh") == 0.0
    # critical: algebraic decay, then polish; f(q) = -2 q^2 + ... vanishes in rounding for q < 1e-16
    assert T.fixed_point_q(1.0, 0.0, "tanh") == pytest.approx(0.0, abs=1e-15)
    assert T.fixed_point_q(0.7, 0.0, "erf") == 0.0  # pi / 4 = 0.785...
    assert T.fixed_point_q(1.5, 0.0, "relu") == 0.0


def test_q_star_slow_convergence_is_polished():
    # max_iter = 3 stops the iteration far away; the bracketed polish still lands on q*
    q_full = T.fixed_point_q(2.5, 0.3, "tanh")
    q_short = T.fixed_point_q(2.5, 0.3, "tanh", q0=0.01, max_iter=3)
    assert q_short == pytest.approx(q_full, rel=1e-14)


def test_relu_fixed_point_closed_form_and_divergence():
    assert T.fixed_point_q(1.5, 0.1, "relu") == pytest.approx(0.1 / (1 - 0.75), rel=1e-15)
    assert T.fixed_point_q(2.0, 0.0, "relu", q0=3.0) == 3.0  # every q is fixed
    with pytest.raises(ValueError, match="relu.*grows without bound"):
        T.fixed_point_q(2.0, 0.1, "relu")
    with pytest.raises(ValueError, match="grows without bound"):
        T.fixed_point_q(2.5, 0.0, "relu")
    with pytest.raises(ValueError, match="linear"):
        T.fixed_point_q(1.2, 0.1, "linear")


@settings(max_examples=15, deadline=None, derandomize=True)
@given(
    act=st.sampled_from(BOUNDED),
    sw2=st.floats(0.3, 6.0),
    sb2=st.floats(0.01, 2.0),
)
def test_fixed_points_property(act, sw2, sb2):
    q = T.fixed_point_q(sw2, sb2, act)
    assert sb2 <= q <= sw2 + sb2
    assert abs(T.length_map(q, sw2, sb2, act) - q) <= 1e-12 * max(1.0, q)
    c = T.correlation_fixed_point(sw2, sb2, act)
    assert T.correlation_map(c, sw2, sb2, act) == pytest.approx(c, abs=1e-12)
    # ordered phase <=> c* = 1
    assert (c == 1.0) == (T.chi_1(sw2, sb2, act) <= 1.0)


# ---------------------------------------------------------------------------------------------
# Correlation map
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "act, q, c",
    [
        ("tanh", 0.4, -0.6), ("tanh", 1.5, 0.3), ("tanh", 6.0, 0.95), ("tanh", 100.0, 0.2), ("erf", 1.5, 0.3),
        ("hard_tanh", 0.4, -0.6), ("hard_tanh", 6.0, 0.95), ("relu", 1.5, 0.3), ("relu", 6.0, -0.95),
    ],
)
def test_correlation_expectations_match_nested_quad(act, q, c):
    sw2, sb2 = 1.0, 0.0
    phi, dphi, _ = PHI[act]
    e_pp = expect_2d(phi, q, c, act)
    e_dd = expect_2d(dphi, q, c, act)
    q_next = T.length_map(q, sw2, sb2, act)
    assert T.correlation_map(c, sw2, sb2, act, q=q) * q_next == pytest.approx(e_pp, abs=1e-12)
    assert T.chi_c(sw2, sb2, act, c=c, q=q) == pytest.approx(e_dd, abs=1e-12)


@pytest.mark.parametrize("q", [0.05, 1.0, 12.0, 500.0])
@pytest.mark.parametrize("c", [-0.999, -0.3, 0.0, 0.5, 0.9, 0.999999])
def test_erf_correlation_closed_form(q, c):
    # arcsine kernel: E[erf(u1) erf(u2)] = (2/pi) arcsin(2 q c / (1 + 2 q)),
    # E[erf'(u1) erf'(u2)] = (4/pi) / sqrt((1 + 2q)^2 - 4 q^2 c^2)
    q_next = T.length_map(q, 1.0, 0.0, "erf")
    got = T.correlation_map(c, 1.0, 0.0, "erf", q=q) * q_next
    assert got == pytest.approx(2.0 / math.pi * math.asin(2.0 * q * c / (1.0 + 2.0 * q)), abs=1e-14)
    want_d = 4.0 / math.pi / math.sqrt((1.0 + 2.0 * q) ** 2 - 4.0 * q * q * c * c)
    assert T.chi_c(1.0, 0.0, "erf", c=c, q=q) == pytest.approx(want_d, abs=1e-13)


def test_relu_arccosine_kernel():
    # sigma_b2 = 0: c' = (sqrt(1 - c^2) + (pi - arccos c) c) / pi, independent of q (q* = 0)
    for c in (-0.9, 0.0, 0.4, 0.99):
        want = (math.sqrt(1 - c * c) + (math.pi - math.acos(c)) * c) / math.pi
        assert T.correlation_map(c, 1.5, 0.0, "relu") == pytest.approx(want, abs=1e-15)
        assert T.chi_c(1.5, 0.0, "relu", c=c) == pytest.approx(1.5 * (math.pi - math.acos(c)) / (2 * math.pi), abs=1e-15)


@pytest.mark.parametrize("act", ["tanh", "erf", "hard_tanh", "relu", "linear"])
def test_correlation_map_fixes_one(act):
    sw2, sb2 = (1.5, 0.2) if act in ("relu",) else (0.9, 0.2) if act == "linear" else (2.0, 0.2)
    assert T.correlation_map(1.0, sw2, sb2, act) == pytest.approx(1.0, abs=1e-15)
    # also at a length that is not the fixed point
    assert T.correlation_map(1.0, sw2, sb2, act, q=3.7) == pytest.approx(1.0, abs=1e-15)


@pytest.mark.parametrize("act, sw2, sb2", [("tanh", 2.5, 0.3), ("tanh", 4.0, 0.05), ("erf", 1.0, 0.05), ("erf", 2.5, 0.5)])
def test_correlation_slope_at_one_is_chi_1(act, sw2, sb2):
    # one-sided second-order difference at c = 1 (the map is smooth there for smooth phi)
    h = 1e-4
    f0, f1, f2 = T.correlation_map(np.array([1.0, 1.0 - h, 1.0 - 2 * h]), sw2, sb2, act)
    slope = (3 * f0 - 4 * f1 + f2) / (2 * h)
    assert slope == pytest.approx(T.chi_1(sw2, sb2, act), abs=1e-7)


@pytest.mark.parametrize("act", ["hard_tanh", "relu"])
def test_correlation_slope_at_one_nonsmooth(act):
    # the second derivative blows up like (1 - c)^(-1/2) at c = 1, so compare chi_c(c -> 1)
    sw2, sb2 = (1.5, 0.3)
    chi1 = T.chi_1(sw2, sb2, act)
    assert T.chi_c(sw2, sb2, act, c=1.0) == pytest.approx(chi1, abs=1e-15)
    assert T.chi_c(sw2, sb2, act, c=1.0 - 1e-10) == pytest.approx(chi1, abs=1e-4)
    h = 1e-7
    slope = (T.correlation_map(1.0, sw2, sb2, act) - T.correlation_map(1.0 - h, sw2, sb2, act)) / h
    assert slope == pytest.approx(chi1, abs=1e-3)


@pytest.mark.parametrize("act", ["tanh", "erf", "hard_tanh", "relu"])
@pytest.mark.parametrize("c", [-0.5, 0.2, 0.8])
def test_chi_c_is_slope_of_correlation_map(act, c):
    sw2, sb2 = (1.5, 0.3) if act == "relu" else (2.2, 0.1)
    h = 1e-5
    fp, fm = T.correlation_map(np.array([c + h, c - h]), sw2, sb2, act)
    assert T.chi_c(sw2, sb2, act, c=c) == pytest.approx((fp - fm) / (2 * h), abs=1e-8)


def test_correlation_map_vectorised_matches_scalar():
    cs = np.linspace(-1.0, 1.0, 5)
    out = T.correlation_map(cs, 2.0, 0.1, "tanh")
    assert out.shape == (5,)
    assert out[3] == T.correlation_map(float(cs[3]), 2.0, 0.1, "tanh")


def test_correlation_undefined_at_zero_length():
    with pytest.raises(ValueError, match="q = 0"):
        T.correlation_map(0.5, 0.8, 0.0, "tanh")  # q* = 0 in the ordered phase


# ---------------------------------------------------------------------------------------------
# Criticality and depth scales
# ---------------------------------------------------------------------------------------------


def test_critical_point_tanh_known_values():
    sw2 = T.critical_sigma_w2(0.3, "tanh")
    assert sw2 == pytest.approx(2.5051, abs=1e-4)
    assert T.chi_1(sw2, 0.3, "tanh") == pytest.approx(1.0, abs=1e-12)
    xi = T.xi_c(sw2, 0.3, "tanh")
    assert xi == math.inf or xi > 1e10
    # the line separates the phases
    assert T.chi_1(sw2 * 0.999, 0.3, "tanh") < 1.0 < T.chi_1(sw2 * 1.001, 0.3, "tanh")
    assert T.critical_sigma_w2(0.0, "tanh") == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("act, sb2", [("erf", 0.3), ("hard_tanh", 0.3), ("tanh", 1.5), ("tanh", 1e-4)])
def test_critical_point_has_chi_1_one(act, sb2):
    sw2 = T.critical_sigma_w2(sb2, act)
    assert T.chi_1(sw2, sb2, act) == pytest.approx(1.0, abs=1e-12)
    assert T.correlation_fixed_point(sw2 * 0.99, sb2, act) == 1.0
    assert T.correlation_fixed_point(sw2 * 1.01, sb2, act) < 1.0


def test_critical_point_without_bias():
    assert T.critical_sigma_w2(0.0, "erf") == pytest.approx(math.pi / 4, abs=1e-12)  # phi'(0)^2 = 4/pi
    assert T.critical_sigma_w2(0.0, "hard_tanh") == pytest.approx(1.0, abs=1e-12)
    assert T.critical_sigma_w2(0.2, "relu") == 2.0
    assert T.critical_sigma_w2(0.0, "linear") == 1.0


def test_depth_scales_ordered_phase():
    sw2, sb2 = 1.5, 0.1
    assert T.xi_c(sw2, sb2, "tanh") == pytest.approx(-1.0 / math.log(T.chi_1(sw2, sb2, "tanh")), rel=1e-14)
    assert T.xi_q(sw2, sb2, "tanh") == pytest.approx(-1.0 / math.log(T.chi_q(sw2, sb2, "tanh")), rel=1e-14)
    # xi_q governs the approach of q^l to q*: deviations shrink by chi_q per layer
    q_star = T.fixed_point_q(sw2, sb2, "tanh")
    d0 = 1e-4
    d1 = T.length_map(q_star + d0, sw2, sb2, "tanh") - q_star
    assert d1 / d0 == pytest.approx(math.exp(-1.0 / T.xi_q(sw2, sb2, "tanh")), abs=1e-4)
    # relu and linear: chi_q = chi_1
    assert T.xi_q(1.5, 0.1, "relu") == pytest.approx(-1.0 / math.log(0.75), rel=1e-15)
    assert T.xi_c(1.5, 0.1, "relu") == pytest.approx(-1.0 / math.log(0.75), rel=1e-15)


def test_depth_scales_at_exact_criticality():
    assert T.xi_c(2.0, 0.0, "relu") == math.inf
    assert T.xi_c(1.0, 0.0, "linear") == math.inf
    assert T.xi_q(1.0, 0.0, "tanh") == math.inf  # q* = 0, chi_q = phi'(0)^2 = 1


@pytest.mark.parametrize("act", BOUNDED)
def test_chaotic_phase(act):
    sw2, sb2 = 4.0, 0.05
    c_star = T.correlation_fixed_point(sw2, sb2, act)
    assert 0.0 < c_star < 1.0
    assert T.correlation_map(c_star, sw2, sb2, act) == pytest.approx(c_star, abs=1e-14)
    chic = T.chi_c(sw2, sb2, act)
    assert chic < 1.0 < T.chi_1(sw2, sb2, act)
    assert T.xi_c(sw2, sb2, act) == pytest.approx(-1.0 / math.log(chic), rel=1e-12)
    # xi_c governs the approach to c*: a deviation shrinks by chi_c = exp(-1/xi_c) per layer
    devs = [1e-3]
    c = c_star + devs[0]
    for _ in range(3):
        c = T.correlation_map(c, sw2, sb2, act)
        devs.append(c - c_star)
    assert devs[3] / devs[2] == pytest.approx(math.exp(-1.0 / T.xi_c(sw2, sb2, act)), abs=2e-3)
    # the same attracting point from a negative start
    assert T.correlation_fixed_point(sw2, sb2, act, c0=-0.5) == pytest.approx(c_star, abs=1e-13)
    # without bias the chaotic fixed point of an odd activation is c* = 0
    assert T.correlation_fixed_point(sw2, 0.0, act) == pytest.approx(0.0, abs=1e-14)


# ---------------------------------------------------------------------------------------------
# Random matrices
# ---------------------------------------------------------------------------------------------


def test_fuss_catalan_known_values():
    np.testing.assert_array_equal(T.fuss_catalan_moments(1, 5), [1, 2, 5, 14, 42])
    np.testing.assert_array_equal(T.fuss_catalan_moments(2, 4), [1, 3, 12, 55])
    np.testing.assert_array_equal(T.fuss_catalan_moments(3, 3), [1, 4, 22])
    np.testing.assert_array_equal(T.fuss_catalan_moments(0, 3), [1, 1, 1])
    assert T.fuss_catalan_moments(1, 5).dtype == np.float64


@pytest.mark.parametrize("K", [0, 1, 2, 3, 5])
def test_mellin_at_integers_gives_fuss_catalan(K):
    fc = T.fuss_catalan_moments(K, 6)
    for k in range(1, 7):
        assert T.fuss_catalan_mellin(K, k) == pytest.approx(fc[k - 1], rel=1e-12)
    assert T.fuss_catalan_mellin(K, 0) == pytest.approx(1.0, abs=1e-14)


def test_mean_singular_value_quarter_circle():
    assert T.mean_singular_value_gaussian_product(1) == pytest.approx(8.0 / (3.0 * math.pi), rel=1e-14)
    assert T.mean_singular_value_gaussian_product(0) == pytest.approx(1.0, rel=1e-14)


@pytest.mark.parametrize("K", [1, 2])
def test_mellin_against_density(K):
    # Independent route: the generating function B(z) = sum FC_K(k) z^k solves
    # z B^{K+1} - B + 1 = 0; the density is |Im B(1/x)| / (pi x) on (0, (K+1)^{K+1} / K^K).
    edge = (K + 1) ** (K + 1) / K**K

    def rho(x):
        coeffs = np.zeros(K + 2)
        coeffs[0], coeffs[-2], coeffs[-1] = 1.0, -x, x  # B^{K+1} - x B + x = 0
        return np.max(np.abs(np.roots(coeffs).imag)) / (math.pi * x)

    def moment(s):  # x = edge t^{K+1} absorbs the x^{-K/(K+1)} singularity at 0
        f = lambda t: (edge * t ** (K + 1)) ** s * rho(edge * t ** (K + 1)) * edge * (K + 1) * t**K  # noqa: E731
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", IntegrationWarning)
            return quad(f, 0.0, 1.0, epsabs=1e-13, epsrel=1e-12, limit=200)[0]

    assert moment(1.0) == pytest.approx(1.0, abs=1e-11)  # the density is right
    assert moment(2.0) == pytest.approx(K + 1.0, abs=1e-11)
    assert moment(0.5) == pytest.approx(T.mean_singular_value_gaussian_product(K), abs=1e-11)
    assert moment(0.3) == pytest.approx(T.fuss_catalan_mellin(K, 0.3), abs=1e-11)
    if K == 2:
        assert T.mean_singular_value_gaussian_product(2) == pytest.approx(0.75, rel=1e-14)


@pytest.mark.parametrize("K", [1, 2, 3])
def test_fuss_catalan_monte_carlo(K, one_blas_thread):
    # N = 400, 3 products, fixed seed. Over 8 seeds the relative errors stayed below
    # 1%, 2%, 4.1% for m_1..m_3 and 0.7% for the mean singular value (finite-N bias
    # included); the tolerances below allow about 1.5x that.
    rng = np.random.default_rng(1234 + K)
    N = 400
    svs = []
    for _ in range(3):
        M = np.eye(N)
        for _ in range(K):
            M = rng.standard_normal((N, N)) / math.sqrt(N) @ M  # (N, N)
        svs.append(np.linalg.svd(M, compute_uv=False))
    sv = np.concatenate(svs)  # (3N,)
    emp = np.array([np.mean(sv ** (2 * k)) for k in (1, 2, 3)])
    for got, want, rtol in zip(emp, T.fuss_catalan_moments(K, 3), (0.015, 0.03, 0.06)):
        assert got == pytest.approx(want, rel=rtol)
    assert np.mean(sv) == pytest.approx(T.mean_singular_value_gaussian_product(K), rel=0.01)


def test_expected_msv():
    assert T.expected_msv(0.9, 3) == pytest.approx(0.729, rel=1e-15)
    assert T.expected_msv(1.0, 1000) == 1.0
    assert T.expected_msv(2.0, 0) == 1.0


def test_expected_msv_monte_carlo_jacobian(one_blas_thread):
    # (1/N) tr(J J^T) of a random tanh net started at q*, averaged over 8 nets (N = 400,
    # L = 5, fixed seed); one net scatters by about 10% (the finite-N spread of the D's),
    # so the mean is compared with an 8% tolerance.
    sw2, sb2, L, N = 1.6, 0.1, 5, 400
    q = T.fixed_point_q(sw2, sb2, "tanh")
    want = T.expected_msv(T.chi_1(sw2, sb2, "tanh"), L)
    rng = np.random.default_rng(7)
    vals = []
    for _ in range(8):
        h = rng.standard_normal(N) * math.sqrt(q)  # (N,) pre-activations at q*
        J = np.eye(N)  # (N, N) dh^l / dh^0
        for _ in range(L):
            W = rng.standard_normal((N, N)) * math.sqrt(sw2 / N)  # (N, N)
            J = W @ ((1.0 / np.cosh(h) ** 2)[:, None] * J)  # J^{l} = W D^{l-1} J^{l-1}
            h = W @ np.tanh(h) + rng.standard_normal(N) * math.sqrt(sb2)
        vals.append(np.sum(J * J) / N)
    assert np.mean(vals) == pytest.approx(want, rel=0.08)


# ---------------------------------------------------------------------------------------------
# Argument validation
# ---------------------------------------------------------------------------------------------


BAD_CALLS = [
    (lambda: T.length_map(1.0, 1.0, 0.0, "sigmoid"), ValueError, "activation"),
    (lambda: T.length_map(1.0, 1.0, 0.0, 3), TypeError, "activation"),
    (lambda: T.length_map(-1.0, 1.0, 0.0, "tanh"), ValueError, "q must lie in"),
    (lambda: T.length_map(float("nan"), 1.0, 0.0, "tanh"), ValueError, "q must be finite"),
    (lambda: T.length_map("1", 1.0, 0.0, "tanh"), TypeError, "q must be"),
    (lambda: T.length_map(1.0, 0.0, 0.0, "tanh"), ValueError, "sigma_w2 must be > 0"),
    (lambda: T.length_map(1.0, "2", 0.0, "tanh"), TypeError, "sigma_w2"),
    (lambda: T.length_map(1.0, True, 0.0, "tanh"), TypeError, "sigma_w2"),
    (lambda: T.length_map(1.0, 1.0, -0.1, "tanh"), ValueError, "sigma_b2 must be >= 0"),
    (lambda: T.length_map(1.0, 1.0, 0.0, "tanh", n_quad=1), ValueError, "n_quad"),
    (lambda: T.length_map(1.0, 1.0, 0.0, "tanh", n_quad=16.0), TypeError, "n_quad"),
    (lambda: T.fixed_point_q(1.0, 0.1, "tanh", q0=0.0), ValueError, "q0"),
    (lambda: T.fixed_point_q(1.0, 0.1, "tanh", tol=0.0), ValueError, "tol"),
    (lambda: T.fixed_point_q(1.0, 0.1, "tanh", max_iter=0), ValueError, "max_iter"),
    (lambda: T.chi_1(1.0, 0.1, "tanh", q=-2.0), ValueError, "q must be >= 0"),
    (lambda: T.chi_q(1.0, 0.1, "erf", q=math.inf), ValueError, "q must be finite"),
    (lambda: T.correlation_map(1.5, 1.0, 0.1, "tanh"), ValueError, r"c must lie in \[-1.0, 1.0\]"),
    (lambda: T.correlation_map([0.1, -1.2], 1.0, 0.1, "tanh"), ValueError, "c must lie in"),
    (lambda: T.correlation_map(None, 1.0, 0.1, "tanh"), TypeError, "c must be"),
    (lambda: T.correlation_fixed_point(1.0, 0.1, "tanh", c0=1.0), ValueError, "c0 must be < 1.0"),
    (lambda: T.chi_c(1.0, 0.1, "tanh", c=-1.5), ValueError, "c must be >= -1.0"),
    (lambda: T.xi_q(-1.0, 0.1, "tanh"), ValueError, "sigma_w2"),
    (lambda: T.xi_c(1.0, 0.1, "softplus"), ValueError, "activation"),
    (lambda: T.critical_sigma_w2(-0.3, "tanh"), ValueError, "sigma_b2"),
    (lambda: T.critical_sigma_w2(0.3, None), TypeError, "activation"),
    (lambda: T.fuss_catalan_moments(-1, 3), ValueError, "K must be >= 0"),
    (lambda: T.fuss_catalan_moments(1.5, 3), TypeError, "K must be an int"),
    (lambda: T.fuss_catalan_moments(1, 0), ValueError, "n_moments must be >= 1"),
    (lambda: T.fuss_catalan_mellin(1, -0.5), ValueError, "s must be > -0.5"),
    (lambda: T.fuss_catalan_mellin(1, "half"), TypeError, "s must be a real number"),
    (lambda: T.mean_singular_value_gaussian_product(2.0), TypeError, "K must be an int"),
    (lambda: T.expected_msv(-0.5, 3), ValueError, "chi must be >= 0"),
    (lambda: T.expected_msv(0.5, -1), ValueError, "L must be >= 0"),
    (lambda: T.expected_msv(0.5, 2.0), TypeError, "L must be an int"),
]


@pytest.mark.parametrize("call, exc, match", BAD_CALLS)
def test_bad_arguments_raise(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ------------------------------------------------------------------------------------------------
# phi, phi', phi'' come from refnet.activations (tanh' and tanh'' excepted, see the module)
# ------------------------------------------------------------------------------------------------


def test_activation_table_takes_the_engine_functions_with_the_previous_closed_forms():
    # The functions the quadrature integrates, to the last bit, as theory wrote them before it took
    # them from refnet.activations (the snapshot of chi_1, q*, chi_c, xi_c, chi_q and the
    # correlation map before and after the change agrees bit for bit). Planted bugs seen failing:
    # erf'' as -2 u (2/sqrt(pi)) exp(-u^2) (another association), tanh' as 1 - tanh^2.
    from refnet.activations import Activation, get_activation

    u = np.concatenate([np.linspace(-12.0, 12.0, 4801), [-1.0, 0.0, 1.0]])
    c = 2.0 / math.sqrt(math.pi)
    with np.errstate(over="ignore"):
        sech2 = 1.0 / np.cosh(u) ** 2
    previous = {
        "tanh": (np.tanh(u), sech2, -2.0 * np.tanh(u) * sech2),
        "erf": (special.erf(u), c * np.exp(-u * u), -2.0 * u * (c * np.exp(-u * u))),
        "hard_tanh": (np.clip(u, -1.0, 1.0), (np.abs(u) < 1.0).astype(np.float64), None),
        "relu": (np.maximum(u, 0.0), (u > 0).astype(np.float64), np.zeros_like(u)),
        "linear": (u, np.ones_like(u), np.zeros_like(u)),
    }
    for name, (phi, dphi, ddphi) in previous.items():
        row = T._TABLE[name]
        assert row.name == name
        assert np.array_equal(row.phi(u), phi) and np.array_equal(row.dphi(u), dphi), name
        if ddphi is not None:  # hard_tanh'' enters only through its closed forms
            assert np.array_equal(row.ddphi(u), ddphi), name
    def engine(f, name, method):  # f is the engine's method of the activation itself, not a copy
        act = get_activation("identity" if name == "linear" else name)
        return getattr(f, "__func__", None) is getattr(Activation, method) and f.__self__ == act

    for name in ("erf", "hard_tanh", "relu", "linear"):
        row = T._TABLE[name]
        assert engine(row.phi, name, "phi") and engine(row.dphi, name, "dphi") and engine(row.ddphi, name, "d2phi")
    assert engine(T._TABLE["tanh"].phi, "tanh", "phi")


def test_random_matrix_results_still_under_theory():
    from refnet import random_matrix

    for name in ("fuss_catalan_moments", "fuss_catalan_mellin", "mean_singular_value_gaussian_product", "expected_msv"):
        assert getattr(T, name) is getattr(random_matrix, name) and name in T.__all__
