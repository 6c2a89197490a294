"""Tests for refnet.init: distributions, orthogonality, Haar measure, determinism, errors.

Statistical checks use a 5-sigma bound: an estimate ``m`` of a quantity with known expectation
``mu`` passes iff ``|m - mu| <= 5 * se`` with ``se`` its standard error (known in closed form, or
the sample std over sqrt(N)). Under the null the two-sided false-alarm rate is about 6e-7 per
check, and every draw is seeded, so the tests are deterministic. Tests marked "can fail" show that
the same check rejects a deliberately wrong construction.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refnet import init as I
from refnet.init import (
    TRUNCATED_STD,
    Initializer,
    bias_init,
    compute_fans,
    delta_orthogonal,
    get_initializer,
    glorot_normal,
    he_normal,
    lecun_normal,
    orthogonal,
    sg_normal,
)

HYP = settings(max_examples=40, deadline=None)

dims = st.integers(1, 64)
gains = st.floats(0.1, 10.0, allow_nan=False, allow_infinity=False)
conv_shapes = st.tuples(st.integers(1, 16), st.integers(1, 16), st.integers(1, 5), st.integers(1, 5))


def within_5_sigma(estimate: float, expected: float, se: float) -> bool:
    """The 5-sigma acceptance rule used throughout: |estimate - expected| <= 5 se."""
    return abs(estimate - expected) <= 5.0 * se


def mean_within_5_sigma(samples: np.ndarray, expected: float) -> bool:
    """Sample mean within 5 standard errors (sample std / sqrt(N)) of ``expected``."""
    n = samples.size
    return within_5_sigma(samples.mean(), expected, samples.std(ddof=1) / math.sqrt(n))


def assert_singular_values(w2d: np.ndarray, gain: float) -> None:
    s = np.linalg.svd(w2d, compute_uv=False)
    assert np.max(np.abs(s - gain)) <= 1e-12 * max(1.0, gain), (s.min(), s.max(), gain)


# ------------------------------------------------------------------------------------------
# fans
# ------------------------------------------------------------------------------------------


def test_compute_fans_dense_and_conv():
    assert compute_fans((10, 784)) == (784, 10)  # dense (n_out, n_in)
    assert compute_fans((64, 32, 3, 5)) == (32 * 15, 64 * 15)  # conv (c_out, c_in, kh, kw)
    assert compute_fans((8, 4, 7)) == (28, 56)  # conv1d


@HYP
@given(shape=st.one_of(st.tuples(dims, dims), conv_shapes))
def test_compute_fans_matches_torch(shape):
    torch = pytest.importorskip("torch")
    assert compute_fans(shape) == torch.nn.init._calculate_fan_in_and_fan_out(torch.empty(shape))


@HYP
@given(shape=st.one_of(st.tuples(dims, dims), conv_shapes))
def test_vs_draws_are_standard_normal_times_exact_std(shape):
    """Documented draw: W = rng.standard_normal(shape) * sqrt(var), var from the paper's fans."""
    fan_in = shape[1] * math.prod(shape[2:])
    fan_out = shape[0] * math.prod(shape[2:])
    z = np.random.default_rng(5).standard_normal(shape)
    for fn, var in [
        (lecun_normal, 1.0 / fan_in),
        (glorot_normal, 2.0 / (fan_in + fan_out)),
        (he_normal, 2.0 / fan_in),
    ]:
        np.testing.assert_array_equal(fn(5, shape), z * math.sqrt(var))
    np.testing.assert_array_equal(sg_normal(5, shape, 0.7), z * math.sqrt(0.7))


# ------------------------------------------------------------------------------------------
# variances (5 sigma; var(s^2) = 2 sigma^4 / (n - 1) for normal samples)
# ------------------------------------------------------------------------------------------

def _fans(shape):
    """Fans written out independently of refnet: (fan_in, fan_out) = (b r, a r), r = prod(k)."""
    r = math.prod(shape[2:])
    return shape[1] * r, shape[0] * r


VS_CASES = [
    ("lecun", lambda fi, fo: 1.0 / fi),
    ("glorot", lambda fi, fo: 2.0 / (fi + fo)),
    ("he", lambda fi, fo: 2.0 / fi),
]


@pytest.mark.parametrize("shape", [(300, 200), (64, 32, 3, 5)])
@pytest.mark.parametrize("name,target", VS_CASES)
def test_vs_variance(name, target, shape):
    fan_in, fan_out = _fans(shape)
    var = target(fan_in, fan_out)
    w = get_initializer(name).weight(np.random.default_rng(11), shape)
    n = w.size
    se = math.sqrt(2.0 / (n - 1)) * var  # std of the sample variance of n normals
    assert within_5_sigma(w.var(ddof=1), var, se), (w.var(ddof=1), var, se)
    assert within_5_sigma(w.mean(), 0.0, math.sqrt(var / n))


@pytest.mark.parametrize("gamma", [0.25, 1.0, 2.0, 4.0])
def test_sg_variance_is_gamma(gamma):
    w = sg_normal(np.random.default_rng(3), (200, 300), gamma)
    n = w.size
    se = math.sqrt(2.0 / (n - 1)) * gamma
    assert within_5_sigma(w.var(ddof=1), gamma, se)
    if gamma != 1.0:  # gamma is the variance, not the std
        assert not within_5_sigma(w.var(ddof=1), gamma**2, math.sqrt(2.0 / (n - 1)) * gamma**2)


def test_vs_variance_check_can_fail():
    """can fail: He weights do not pass the LeCun variance check (factor 2)."""
    shape = (300, 200)
    w = he_normal(np.random.default_rng(11), shape)
    var = 1.0 / 200
    assert not within_5_sigma(w.var(ddof=1), var, math.sqrt(2.0 / (w.size - 1)) * var)


def test_truncated_std_constant():
    from scipy.stats import norm, truncnorm

    exact = math.sqrt(1.0 - 4.0 * norm.pdf(2.0) / (2.0 * norm.cdf(2.0) - 1.0))
    assert TRUNCATED_STD == pytest.approx(exact, abs=1e-15)
    assert TRUNCATED_STD == pytest.approx(truncnorm(-2.0, 2.0).std(), abs=1e-14)


def _sample_variance_se(w: np.ndarray) -> float:
    """Empirical std of the sample variance: sqrt((m4 - s^4 (n-3)/(n-1)) / n)."""
    n = w.size
    d = w.ravel() - w.mean()
    s2 = d @ d / (n - 1)
    m4 = np.mean(d**4)
    return math.sqrt((m4 - s2**2 * (n - 3) / (n - 1)) / n)


@pytest.mark.parametrize("shape", [(400, 300), (64, 32, 3, 5)])
@pytest.mark.parametrize("name,target", VS_CASES)
def test_truncated_variance_and_bound(name, target, shape):
    fan_in, fan_out = _fans(shape)
    var = target(fan_in, fan_out)
    std_scale = math.sqrt(var) / TRUNCATED_STD  # the std of the normal before truncation
    init = get_initializer(name, truncated=True)
    w = init.weight(np.random.default_rng(21), shape)
    assert within_5_sigma(w.var(ddof=1), var, _sample_variance_se(w))
    amax = np.abs(w).max()
    assert amax <= 2.0 * std_scale * (1 + 1e-15)
    assert amax >= 1.9 * std_scale  # the cut really is at 2 std_scale, not below
    # can fail: the untruncated draw from the same seed breaks the bound
    assert np.abs(get_initializer(name).weight(np.random.default_rng(21), shape)).max() > 2.0 * std_scale


def test_truncated_variance_check_can_fail():
    """can fail: a 2-sigma truncation without the 0.8796 correction has variance 0.774 var."""
    rng = np.random.default_rng(21)
    var = 2.0 / 300
    w = I._truncated_standard_normal(rng, (400, 300)) * math.sqrt(var)
    assert not within_5_sigma(w.var(ddof=1), var, _sample_variance_se(w))


# ------------------------------------------------------------------------------------------
# orthogonal
# ------------------------------------------------------------------------------------------


@HYP
@given(rows=dims, cols=dims, gain=gains, seed=st.integers(0, 2**32 - 1))
def test_orthogonal_singular_values_dense(rows, cols, gain, seed):
    w = orthogonal(seed, (rows, cols), gain)
    assert w.shape == (rows, cols) and w.dtype == np.float64
    assert_singular_values(w, gain)
    k = min(rows, cols)
    gram = w.T @ w if rows >= cols else w @ w.T  # (k, k)
    np.testing.assert_allclose(gram, gain**2 * np.eye(k), rtol=0, atol=1e-12 * max(1.0, gain**2))


@HYP
@given(shape=conv_shapes, gain=gains, seed=st.integers(0, 2**32 - 1))
def test_orthogonal_singular_values_conv_flattened(shape, gain, seed):
    w = orthogonal(seed, shape, gain)
    assert w.shape == shape
    assert_singular_values(w.reshape(shape[0], -1), gain)  # (c_out, c_in*kh*kw)


def _haar_stats(qs: np.ndarray) -> dict[str, bool]:
    """5-sigma checks of Haar moments for n x n matrices (n >= 4): E tr = 0, E tr^2 = 1,
    E det = 0. Bound: |mean - expected| <= 5 * sample_std / sqrt(N)."""
    tr = np.trace(qs, axis1=1, axis2=2)  # (N,)
    det = np.linalg.det(qs)  # (N,)
    return {
        "E tr Q = 0": mean_within_5_sigma(tr, 0.0),
        "E (tr Q)^2 = 1": mean_within_5_sigma(tr**2, 1.0),
        "E det Q = 0": mean_within_5_sigma(det, 0.0),
    }


N_HAAR = 3000


def test_orthogonal_haar_moments():
    rng = np.random.default_rng(2024)
    qs = np.stack([orthogonal(rng, (16, 16)) for _ in range(N_HAAR)])  # (N, 16, 16)
    assert all(_haar_stats(qs).values()), _haar_stats(qs)


def test_haar_check_fails_without_sign_correction():
    """can fail: the plain np.linalg.qr Q (no sign(diag R) correction) is not Haar."""
    rng = np.random.default_rng(2024)
    a = rng.standard_normal((N_HAAR, 16, 16))  # (N, 16, 16)
    q, _ = np.linalg.qr(a)  # (N, 16, 16)
    stats = _haar_stats(q)
    assert not stats["E tr Q = 0"], stats


# ------------------------------------------------------------------------------------------
# delta orthogonal
# ------------------------------------------------------------------------------------------


@HYP
@given(shape=conv_shapes, gain=gains, seed=st.integers(0, 2**32 - 1))
def test_delta_orthogonal_centre_and_zeros(shape, gain, seed):
    c_out, c_in, kh, kw = shape
    w = delta_orthogonal(seed, shape, gain)
    assert w.shape == shape
    centre = w[:, :, kh // 2, kw // 2]  # (c_out, c_in)
    assert_singular_values(centre, gain)
    np.testing.assert_array_equal(centre, orthogonal(seed, (c_out, c_in), gain))
    rest = w.copy()
    rest[:, :, kh // 2, kw // 2] = 0.0
    assert np.count_nonzero(rest) == 0  # exactly zero elsewhere


def test_delta_orthogonal_even_kernel_and_other_ndims():
    w = delta_orthogonal(0, (4, 3, 2, 4))
    assert np.count_nonzero(w[:, :, 1, 2]) == 12 and np.count_nonzero(w) == 12
    w1 = delta_orthogonal(0, (5, 3, 3))  # conv1d
    assert_singular_values(w1[:, :, 1], 1.0) and np.count_nonzero(w1) == 15
    np.testing.assert_array_equal(delta_orthogonal(9, (7, 5), 2.0), orthogonal(9, (7, 5), 2.0))


# ------------------------------------------------------------------------------------------
# bias
# ------------------------------------------------------------------------------------------


def test_bias_zero_draws_nothing_and_gaussian_otherwise():
    rng = np.random.default_rng(1)
    state = rng.bit_generator.state
    b = bias_init(rng, 7)
    assert b.shape == (7,) and not b.any() and rng.bit_generator.state == state
    b = bias_init(np.random.default_rng(1), 20000, 0.3)
    assert within_5_sigma(b.var(ddof=1), 0.09, math.sqrt(2.0 / (b.size - 1)) * 0.09)
    np.testing.assert_array_equal(b, 0.3 * np.random.default_rng(1).standard_normal(20000))
    assert bias_init(0, (2, 3), 0.0, np.float32).dtype == np.float32


# ------------------------------------------------------------------------------------------
# Initializer, names, determinism
# ------------------------------------------------------------------------------------------

ALL_INITS = [
    ("lecun", {}),
    ("glorot", {}),
    ("he", {}),
    ("he", {"truncated": True}),
    ("sg", {"gamma": 0.5}),
    ("orthogonal", {"gain": 1.5}),
    ("delta_orthogonal", {}),
]


@pytest.mark.parametrize("shape", [(12, 7), (6, 4, 3, 3)])
@pytest.mark.parametrize("name,kw", ALL_INITS)
def test_determinism(name, kw, shape):
    init = get_initializer(name, **kw)
    a = init.weight(42, shape)
    np.testing.assert_array_equal(a, init.weight(42, shape))
    np.testing.assert_array_equal(a, init.weight(np.random.default_rng(42), shape))
    assert not np.array_equal(a, init.weight(43, shape))
    f32 = init.weight(42, shape, np.float32)
    assert f32.dtype == np.float32
    np.testing.assert_array_equal(f32, a.astype(np.float32))


def test_global_numpy_state_untouched():
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    for name, kw in ALL_INITS:
        get_initializer(name, sigma_b=0.1, **kw).weight(0, (5, 4, 3, 3))
    assert np.array_equal(np.random.get_state()[1], before)


def test_draw_order_weight_then_bias():
    init = get_initializer("he", sigma_b=0.2)
    rng = np.random.default_rng(8)
    w, b = init.weight(rng, (10, 6)), init.bias(rng, 10)
    ref = np.random.default_rng(8)
    np.testing.assert_array_equal(w, he_normal(ref, (10, 6)))
    np.testing.assert_array_equal(b, 0.2 * ref.standard_normal(10))


@pytest.mark.parametrize(
    "alias,canonical",
    [
        ("VS-L", "lecun"),
        ("vs_l", "lecun"),
        ("Vs-G", "glorot"),
        ("vs-h", "he"),
        ("VS_H", "he"),
        ("LDI", "orthogonal"),
        ("ldi", "orthogonal"),
        ("Delta-Orthogonal", "delta_orthogonal"),
        ("HE", "he"),
    ],
)
def test_aliases(alias, canonical):
    a, c = get_initializer(alias), get_initializer(canonical)
    assert a == c and hash(a) == hash(c) and a.name == canonical
    np.testing.assert_array_equal(a.weight(3, (8, 5)), c.weight(3, (8, 5)))


def test_initializer_defaults_roundtrip_and_immutability():
    assert dict(get_initializer("he").kwargs) == {"sigma_b": 0.0, "truncated": False}
    assert dict(get_initializer("ldi").kwargs) == {"gain": 1.0, "sigma_b": 0.0}
    assert dict(get_initializer("sg", gamma=2).kwargs) == {"gamma": 2.0, "sigma_b": 0.0}
    assert get_initializer("he", gamma=None) == get_initializer("he")  # None = not given
    for name, kw in ALL_INITS:
        init = get_initializer(name, sigma_b=0.25, **kw)
        assert get_initializer(init) is init
        d = json.loads(json.dumps(init.to_dict()))
        assert Initializer.from_dict(d) == init
        assert Initializer(init.name, dict(init.kwargs)) == init
        assert eval(repr(init), {"Initializer": Initializer}) == init
    init = get_initializer("orthogonal")
    with pytest.raises(dataclasses.FrozenInstanceError):
        init.name = "he"
    with pytest.raises(TypeError):
        init.kwargs["gain"] = 2.0


# ------------------------------------------------------------------------------------------
# errors: every bad argument names itself, what was expected and what was given
# ------------------------------------------------------------------------------------------

BAD_GET = [
    (("kaiming",), {}, ValueError, r"init must be one of \[.*'lecun'.*'ldi'\], got 'kaiming'"),
    (("",), {}, ValueError, r"init must be one of .*got ''"),
    ((3,), {}, TypeError, r"init must be a str .*got int 3"),
    ((None,), {}, TypeError, r"init must be a str .*got NoneType"),
    (("sg",), {}, ValueError, r"init 'sg' requires gamma \(the weight variance, a float > 0\), got none"),
    (("sg",), {"gamma": 0.0}, ValueError, r"gamma must be > 0.0, got 0.0"),
    (("sg",), {"gamma": -1}, ValueError, r"gamma must be > 0.0, got -1.0"),
    (("sg",), {"gamma": float("nan")}, ValueError, r"gamma must be finite, got nan"),
    (("sg",), {"gamma": "1"}, TypeError, r"gamma must be a real number, got str '1'"),
    (("he",), {"gamma": 0.5}, ValueError, r"gamma is not an argument of init 'he': expected only sigma_b, truncated; gamma applies to sg; got gamma=0.5"),
    (("lecun",), {"gain": 2.0}, ValueError, r"gain is not an argument of init 'lecun'.*applies to orthogonal, delta_orthogonal; got gain=2.0"),
    (("glorot",), {"gain": 2.0}, ValueError, r"gain is not an argument of init 'glorot'"),
    (("sg",), {"gamma": 1.0, "gain": 2.0}, ValueError, r"gain is not an argument of init 'sg': expected only gamma, sigma_b"),
    (("sg",), {"gamma": 1.0, "truncated": True}, ValueError, r"truncated is not an argument of init 'sg'.*got truncated=True"),
    (("orthogonal",), {"truncated": False}, ValueError, r"truncated is not an argument of init 'orthogonal': expected only gain, sigma_b"),
    (("delta_orthogonal",), {"gamma": 1.0}, ValueError, r"gamma is not an argument of init 'delta_orthogonal'"),
    (("he",), {"scale": 2.0}, ValueError, r"scale is not an argument of init 'he': expected only sigma_b, truncated; got scale=2.0"),
    (("orthogonal",), {"gain": 0.0}, ValueError, r"gain must be > 0.0, got 0.0"),
    (("ldi",), {"gain": -1.0}, ValueError, r"gain must be > 0.0, got -1.0"),
    (("orthogonal",), {"gain": float("inf")}, ValueError, r"gain must be finite, got inf"),
    (("orthogonal",), {"gain": True}, TypeError, r"gain must be a real number, got bool True"),
    (("he",), {"sigma_b": -0.1}, ValueError, r"sigma_b must be >= 0.0, got -0.1"),
    (("he",), {"truncated": "yes"}, TypeError, r"truncated must be a bool, got str 'yes'"),
    (("he",), {"truncated": 1}, TypeError, r"truncated must be a bool, got int 1"),
    ((get_initializer("he"),), {"sigma_b": 0.1}, ValueError, r"init is already an Initializer, so no keyword arguments are expected; got \{'sigma_b': 0.1\}"),
]


@pytest.mark.parametrize("args,kwargs,exc,match", BAD_GET)
def test_get_initializer_errors(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        get_initializer(*args, **kwargs)


BAD_CALLS = [
    (lambda: he_normal(0, (0, 3)), ValueError, r"shape must have every entry >= 1, got \(0, 3\)"),
    (lambda: he_normal(0, (-2, 3)), ValueError, r"shape must have every entry >= 1, got \(-2, 3\)"),
    (lambda: lecun_normal(0, (5,)), ValueError, r"shape must have at least 2 dimensions .*got \(5,\)"),
    (lambda: glorot_normal(0, 5), ValueError, r"shape must have at least 2 dimensions .*got \(5,\)"),
    (lambda: he_normal(0, (3.0, 2)), TypeError, r"shape must be a tuple of ints, got \(3.0, 2\)"),
    (lambda: he_normal(0, (True, 2)), TypeError, r"shape must be a tuple of ints, got \(True, 2\)"),
    (lambda: he_normal(0, "ab"), TypeError, r"shape must be a tuple of ints, got str 'ab'"),
    (lambda: he_normal(0, (3, 2), np.int64), TypeError, r"dtype must be float64 or float32, got int64"),
    (lambda: he_normal(0, (3, 2), np.float16), TypeError, r"dtype must be float64 or float32, got float16"),
    (lambda: he_normal(0, (3, 2), truncated=None), TypeError, r"truncated must be a bool, got NoneType None"),
    (lambda: he_normal("seed", (3, 2)), TypeError, r"rng must be an int, a numpy.random.Generator or None, got str"),
    (lambda: he_normal(-1, (3, 2)), ValueError, r"rng must be a non-negative int, got -1"),
    (lambda: sg_normal(0, (3, 2), 0.0), ValueError, r"gamma must be > 0.0, got 0.0"),
    (lambda: sg_normal(0, (0,), 1.0), ValueError, r"shape must have every entry >= 1, got \(0,\)"),
    (lambda: orthogonal(0, (3, 2), 0.0), ValueError, r"gain must be > 0.0, got 0.0"),
    (lambda: orthogonal(0, (3,)), ValueError, r"shape must have at least 2 dimensions"),
    (lambda: delta_orthogonal(0, (3, 2, 3, 3), -1.0), ValueError, r"gain must be > 0.0, got -1.0"),
    (lambda: delta_orthogonal(0, (3,)), ValueError, r"shape must have at least 2 dimensions"),
    (lambda: bias_init(0, 4, -1.0), ValueError, r"sigma_b must be >= 0.0, got -1.0"),
    (lambda: bias_init(0, 0), ValueError, r"n must have every entry >= 1, got \(0,\)"),
    (lambda: bias_init(0, 4.5), TypeError, r"n must be a tuple of ints, got float 4.5"),
    (lambda: compute_fans((4,)), ValueError, r"shape must have at least 2 dimensions"),
    (lambda: Initializer("he", "sigma_b"), TypeError, r"kwargs must be a mapping, got str 'sigma_b'"),
    (lambda: Initializer.from_dict(["he"]), TypeError, r"d must be a mapping with keys name, kwargs; got list"),
    (lambda: Initializer.from_dict({"kwargs": {}}), ValueError, r"d must have keys name and \(optionally\) kwargs, got keys \['kwargs'\]"),
    (lambda: Initializer.from_dict({"name": "he", "gain": 1}), ValueError, r"d must have keys name and \(optionally\) kwargs, got keys \['gain', 'name'\]"),
    (lambda: Initializer.from_dict({"name": "he", "kwargs": {"gain": 1.0}}), ValueError, r"gain is not an argument of init 'he'"),
    (lambda: Initializer.from_dict({"name": "nope"}), ValueError, r"init must be one of .*got 'nope'"),
]


@pytest.mark.parametrize("call,exc,match", BAD_CALLS)
def test_function_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
