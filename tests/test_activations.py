"""phi' and phi'' of every activation (refnet/activations.py) against finite differences.

A five-point central difference ``(-f(h+2H) + 8 f(h+H) - 8 f(h-H) + f(h-2H)) / 12H`` with
``H = 1e-3`` has a truncation error of ``H^4 |f^(5)| / 30`` (~1e-13 here) and a rounding floor of
``~eps / H`` (~1e-13), so the hand-derived derivatives must match it to 1e-9, over a range that
includes the tails (where ``1 - tanh^2`` and ``exp(-h^2)`` are small) and with the activations'
parameters away from their defaults. Points within ``2H`` of a kink are left out; at the kinks
themselves phi'' is the a.e. value 0 on both sides (the Dirac parts are not representable).
"""

import numpy as np
import pytest

import refnet as rn
from refnet.activations import ACTIVATIONS

H = 1e-3
RTOL, ATOL = 1e-9, 1e-11
KINKS = np.array([-1.0, 0.0, 1.0])  # relu, leaky_relu, elu, selu at 0; hard_tanh at +-1

# every registered activation, plus the parametrised ones away from their defaults
CASES = [(name, {}) for name in ACTIVATIONS] + [("leaky_relu", {"slope": 0.2}), ("elu", {"alpha": 2.5})]


def five_point(f, h):
    return (-f(h + 2 * H) + 8 * f(h + H) - 8 * f(h - H) + f(h - 2 * H)) / (12 * H)


def grid():
    h = np.linspace(-7.3, 7.1, 2001)  # the tails: tanh' ~ 1e-6, erf' ~ 1e-22 at the ends
    return h[np.min(np.abs(h[:, None] - KINKS[None]), axis=1) > 3 * H]


@pytest.mark.parametrize("name, params", CASES, ids=[f"{n}{p or ''}" for n, p in CASES])
def test_second_derivative_matches_finite_differences(name, params):
    # planted bugs seen failing: tanh'' = -2 t (1 + t^2); sigmoid'' without the (1 - 2 s) factor;
    # elu'' = alpha exp(h) also for h > 0
    act = rn.get_activation(name, **params)
    h = grid()
    np.testing.assert_allclose(act.dphi(h), five_point(act.phi, h), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(act.d2phi(h), five_point(act.dphi, h), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", ["relu", "leaky_relu", "hard_tanh", "identity"])
def test_second_derivative_of_piecewise_linear_is_zero_everywhere(name):
    act = rn.get_activation(name)
    h = np.concatenate([grid(), KINKS])
    assert np.array_equal(act.d2phi(h), np.zeros_like(h))


@pytest.mark.parametrize("name", list(ACTIVATIONS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_second_derivative_keeps_dtype_and_shape(name, dtype):
    act = rn.get_activation(name)
    h = np.linspace(-3, 3, 12, dtype=dtype).reshape(3, 4)
    out = act.d2phi(h)
    assert out.dtype == dtype and out.shape == h.shape and np.all(np.isfinite(out))


def test_erf_second_derivative_is_minus_2h_times_erf_prime():
    # refnet.theory takes erf'' from here: the expression (-2 h) erf'(h) is the one its results
    # were computed with, to the last bit (planted bug seen failing: -2 h (2/sqrt(pi)) exp(-h^2),
    # which associates the constant differently)
    act = rn.get_activation("erf")
    h = np.linspace(-5, 5, 1001)
    assert np.array_equal(act.d2phi(h), -2.0 * h * ((2.0 / np.sqrt(np.pi)) * np.exp(-h * h)))
