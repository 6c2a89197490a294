"""Every derivative of the engine: central finite differences and the dot-product test.

For random MLPs and CNNs (hypothesis: depth, widths, kernels, strides, padding modes, pooling,
every activation, biases on/off, random masks) and both losses:

* finite differences: the directional derivative ``(L(t + h d) - L(t - h d)) / 2h`` along random
  parameter and input directions equals ``<grad, d>`` to 1e-6 relative;
* the dot-product (adjoint) test ``<v, J u + J_theta du> == <vjp(v)_x, u> + <vjp(v)_theta, du>``
  to 1e-12 relative, for the whole network and for every layer alone;
* the explicit layer Jacobians equal the JVP on basis vectors and the finite differences.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from netgen import ACTIVATIONS, cnns, mlps, perturb_biases, random_masks

import refnet as rn

H = 1e-6
FD_RTOL = 1e-6
FD_ATOL = 1e-9  # rounding floor of a central difference of an O(1) loss with h = 1e-6


def _random_like(params, rng):
    return [{k: rng.standard_normal(v.shape) for k, v in p.items()} for p in params]


def _inner(a, b):
    return sum(float(np.sum(a[i][k] * b[i][k])) for i in range(len(a)) for k in a[i])


def _shift(net, d, t):
    return net.with_params([{k: v + t * d[i][k] for k, v in p.items()} for i, p in enumerate(net.params)])


def _targets(net, rng, B, loss):
    C = net.out_shape[0]
    if loss == "cross_entropy":
        return rng.integers(0, C, size=B)
    return rng.standard_normal((B, C))


#: points where phi' jumps; a finite difference that straddles one is meaningless
KINKS = {"relu": [0.0], "leaky_relu": [0.0], "selu": [0.0], "elu": [0.0], "hard_tanh": [-1.0, 1.0]}


def _pieces(net, x):
    """Which smooth piece every unit is on: the side of each kink of each pre-activation and
    every max-pool arg-max."""
    _, trace = net.forward(x, return_trace=True)
    out = []
    for layer, cache in zip(net.layers, trace.caches):
        act = getattr(layer, "activation", None)
        for k in KINKS.get(getattr(act, "name", ""), []):
            out.append(np.sign(cache["h"] - k))
        if isinstance(layer, rn.MaxPool2d):
            out.append(cache["arg"])
    return out


def _same_pieces(a, b):
    return all(np.array_equal(p, q) for p, q in zip(a, b))


def _check_fd(net, rng, loss, B=3, weight_decay=0.0):
    """Directional finite differences of the loss along random parameter and input directions,
    drawn (and redrawn) so that the +-h evaluations stay on the base point's smooth piece."""
    checked = 0
    for _ in range(100):
        x = rng.standard_normal((B, *net.in_shape))
        y = _targets(net, rng, B, loss)
        d = _random_like(net.params, rng)
        u = rng.standard_normal(x.shape)
        plus, minus = _shift(net, d, H), _shift(net, d, -H)
        base = _pieces(net, x)
        if not all(
            _same_pieces(base, p)
            for p in (_pieces(plus, x), _pieces(minus, x), _pieces(net, x + H * u), _pieces(net, x - H * u))
        ):
            continue
        _, grads = net.loss_and_grads(x, y, loss=loss, weight_decay=weight_decay)
        fd = (plus.loss(x, y, loss=loss, weight_decay=weight_decay) - minus.loss(x, y, loss=loss, weight_decay=weight_decay)) / (2 * H)
        an = _inner(grads, d)
        assert abs(fd - an) <= FD_RTOL * max(abs(fd), abs(an)) + FD_ATOL, (fd, an)
        out, trace = net.forward(x, return_trace=True)
        _, eps = rn.get_loss(loss)(out, y)
        _, gx = net.backward(trace, eps, return_input_grad=True)
        fd = (net.loss(x + H * u, y, loss=loss) - net.loss(x - H * u, y, loss=loss)) / (2 * H)
        an = float(np.sum(gx * u))
        assert abs(fd - an) <= FD_RTOL * max(abs(fd), abs(an)) + FD_ATOL, (fd, an)
        checked += 1
        if checked == 2:
            return
    raise AssertionError("could not draw directions that stay on one smooth piece")


def _check_adjoint(net, rng, B=3):
    x = rng.standard_normal((B, *net.in_shape))
    out, trace = net.forward(x, return_trace=True)
    v = rng.standard_normal(out.shape)
    u = rng.standard_normal(x.shape)
    du = _random_like(net.params, rng)
    grads, gx = net.backward(trace, v, return_input_grad=True)
    ydot = net.jvp(trace, u, du)
    lhs = float(np.sum(ydot * v))
    rhs = float(np.sum(gx * u)) + _inner(grads, du)
    scale = np.linalg.norm(ydot) * np.linalg.norm(v) + np.linalg.norm(gx) * np.linalg.norm(u) + 1e-300
    assert abs(lhs - rhs) <= 1e-12 * scale, (lhs, rhs, scale)


# ------------------------------------------------------------------------------------------------
# whole networks
# ------------------------------------------------------------------------------------------------


@settings(max_examples=60)
@given(mlps(), st.sampled_from(["cross_entropy", "mse"]))
def test_mlp_gradients_match_finite_differences(net_rng, loss):
    net, rng = net_rng
    _check_fd(net, rng, loss)


@settings(max_examples=60)
@given(mlps())
def test_mlp_dot_product_test(net_rng):
    _check_adjoint(*net_rng)


@settings(max_examples=40)
@given(cnns(), st.sampled_from(["cross_entropy", "mse"]))
def test_cnn_gradients_match_finite_differences(net_rng, loss):
    net, rng = net_rng
    _check_fd(net, rng, loss, B=2)


@settings(max_examples=40)
@given(cnns())
def test_cnn_dot_product_test(net_rng):
    _check_adjoint(*net_rng, B=2)


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_every_activation_and_loss(act, loss):
    """The full activation x loss grid once, deterministically, including weight decay."""
    rng = np.random.default_rng(7)
    net = rn.mlp([5, 7, 6, 4], activation=act, init="lecun", seed=rng)
    net = perturb_biases(net, rng).with_masks(random_masks(net, rng, 0.7))
    _check_fd(net, rng, loss, weight_decay=0.01)
    _check_adjoint(net, rng)


def test_probability_targets_cross_entropy():
    rng = np.random.default_rng(3)
    net = rn.mlp([4, 6, 3], activation="tanh", seed=rng)
    x = rng.standard_normal((5, 4))
    t = rng.random((5, 3))
    t /= t.sum(axis=1, keepdims=True)
    _, grads = net.loss_and_grads(x, t)
    d = _random_like(net.params, rng)
    fd = (_shift(net, d, H).loss(x, t) - _shift(net, d, -H).loss(x, t)) / (2 * H)
    assert abs(fd - _inner(grads, d)) <= FD_RTOL * abs(fd) + FD_ATOL


# ------------------------------------------------------------------------------------------------
# single layers: Jacobians, JVP, VJP
# ------------------------------------------------------------------------------------------------

LAYER_CASES = [
    (rn.Dense(5, 4, activation="tanh"), (5,)),
    (rn.Dense(3, 6, activation="softplus", bias=False), (3,)),
    (rn.Conv2d(2, 3, 3, stride=1, padding=1, activation="elu"), (2, 5, 4)),
    (rn.Conv2d(2, 2, (2, 3), stride=(2, 1), padding=(1, 2), padding_mode="circular", activation="sigmoid"), (2, 4, 5)),
    (rn.Conv2d(1, 2, 3, stride=2, padding=0, activation="erf", bias=False), (1, 6, 6)),
    (rn.AvgPool2d(2), (2, 5, 4)),
    (rn.MaxPool2d(2), (2, 4, 5)),
    (rn.GlobalAvgPool2d(), (3, 3, 2)),
    (rn.Flatten(), (2, 3, 2)),
]


def _layer_setup(layer, in_shape, rng, B=3):
    params = layer.init(rng, in_shape, rn.get_initializer("lecun", sigma_b=0.5), np.float64)
    masks = {k: rng.random(v.shape) < 0.7 for k, v in params.items()}
    x = rng.standard_normal((B, *in_shape))
    y, cache = layer.forward(params, x, masks)
    return params, masks, x, y, cache


@pytest.mark.parametrize("layer,in_shape", LAYER_CASES, ids=lambda c: type(c).__name__ if not isinstance(c, tuple) else "")
def test_layer_jacobian_matches_jvp_vjp_and_fd(layer, in_shape):
    rng = np.random.default_rng(11)
    params, masks, x, y, cache = _layer_setup(layer, in_shape, rng)
    B = x.shape[0]
    if isinstance(layer, rn.MaxPool2d):  # random data: the arg-max is unique with a wide margin
        win = np.sort(layer._windows(x), axis=-1)
        assert np.min(win[..., -1] - win[..., -2]) > 1e-4
    J = layer.jacobian(params, cache, masks)  # (B, n_out, n_in)
    assert J.shape == (B, y[0].size, x[0].size)
    u = rng.standard_normal(x.shape)
    v = rng.standard_normal(y.shape)
    Ju = np.einsum("bij,bj->bi", J, u.reshape(B, -1))
    np.testing.assert_allclose(Ju, layer.jvp(params, cache, u, masks).reshape(B, -1), rtol=1e-12, atol=1e-13)
    vJ = np.einsum("bi,bij->bj", v.reshape(B, -1), J)
    gx, _ = layer.vjp(params, cache, v, masks)
    np.testing.assert_allclose(vJ, gx.reshape(B, -1), rtol=1e-12, atol=1e-13)
    fd = (layer.forward(params, x + H * u, masks)[0] - layer.forward(params, x - H * u, masks)[0]) / (2 * H)
    np.testing.assert_allclose(fd.reshape(B, -1), Ju, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("layer,in_shape", LAYER_CASES[:5])
def test_layer_parameter_adjoint_and_fd(layer, in_shape):
    rng = np.random.default_rng(5)
    params, masks, x, y, cache = _layer_setup(layer, in_shape, rng)
    v = rng.standard_normal(y.shape)
    dp = {k: rng.standard_normal(p.shape) for k, p in params.items()}
    zero = np.zeros_like(x)
    ydot = layer.jvp(params, cache, zero, masks, dp)
    _, grads = layer.vjp(params, cache, v, masks)
    lhs = float(np.sum(ydot * v))
    rhs = sum(float(np.sum(grads[k] * dp[k])) for k in dp)
    assert abs(lhs - rhs) <= 1e-12 * (np.linalg.norm(ydot) * np.linalg.norm(v))
    plus = {k: params[k] + H * dp[k] for k in params}
    minus = {k: params[k] - H * dp[k] for k in params}
    fd = (layer.forward(plus, x, masks)[0] - layer.forward(minus, x, masks)[0]) / (2 * H)
    np.testing.assert_allclose(fd, ydot, rtol=1e-6, atol=1e-8)
    for k in grads:  # pruned entries: exactly zero gradient
        assert np.all(grads[k][~masks[k]] == 0.0)


def test_dense_jacobian_is_D_times_W():
    rng = np.random.default_rng(2)
    layer = rn.Dense(4, 3, activation="tanh")
    params, masks, x, y, cache = _layer_setup(layer, (4,), rng)
    J = layer.jacobian(params, cache, masks)
    D = 1 - np.tanh(cache["h"]) ** 2
    for b in range(x.shape[0]):
        np.testing.assert_array_equal(J[b], np.diag(D[b]) @ (masks["W"] * params["W"]))


# ------------------------------------------------------------------------------------------------
# activations alone: phi' and phi'' against finite differences
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_derivatives(name):
    act = rn.get_activation(name)
    h = np.linspace(-3.1, 3.3, 257)  # avoids the kinks at 0 and +-1 exactly
    h = h[np.min(np.abs(h[:, None] - np.array([-1.0, 0.0, 1.0])[None]), axis=1) > 1e-3]
    fd1 = (act.phi(h + H) - act.phi(h - H)) / (2 * H)
    np.testing.assert_allclose(act.dphi(h), fd1, rtol=1e-7, atol=1e-9)
    fd2 = (act.dphi(h + H) - act.dphi(h - H)) / (2 * H)
    np.testing.assert_allclose(act.d2phi(h), fd2, rtol=1e-6, atol=1e-8)


def test_activation_parameters_and_kinks():
    lr = rn.get_activation("leaky_relu", slope=0.2)
    np.testing.assert_array_equal(lr.phi(np.array([-2.0, 0.0, 3.0])), [-0.4, 0.0, 3.0])
    np.testing.assert_array_equal(lr.dphi(np.array([-2.0, 0.0, 3.0])), [0.2, 0.2, 1.0])  # PyTorch's kink
    np.testing.assert_array_equal(rn.get_activation("relu").dphi(np.array([0.0])), [0.0])
    np.testing.assert_array_equal(rn.get_activation("hard_tanh").dphi(np.array([-1.0, 0.5, 1.0])), [0, 1, 0])
    elu = rn.get_activation("elu", alpha=2.0)
    assert elu.phi(np.array([-np.inf]))[0] == -2.0
    sp = rn.get_activation("softplus")
    assert sp.phi(np.array([800.0]))[0] == 800.0 and np.isfinite(sp.phi(np.array([-800.0]))[0])
    assert rn.get_activation("linear") == rn.get_activation("identity")
    assert rn.get_activation(rn.get_activation("elu", alpha=2.0).to_dict()) == elu


def test_float32_stays_float32():
    net = rn.mlp([6, 5, 3], activation="erf", seed=0, dtype=np.float32)
    x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    out = net.forward(x)
    assert out.dtype == np.float32
    loss, grads = net.loss_and_grads(x, np.array([0, 1, 2, 0]))
    assert all(g.dtype == np.float32 for gg in grads for g in gg.values())
    ref = net.astype(np.float64)
    _, g64 = ref.loss_and_grads(x.astype(np.float64), np.array([0, 1, 2, 0]))
    for a, b in zip(grads, g64):
        np.testing.assert_allclose(a["W"], b["W"], rtol=1e-4, atol=1e-5)
