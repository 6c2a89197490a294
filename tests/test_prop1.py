"""Proposition 1 of [SPP] against backprop, and connection sensitivity through the mask.

* Proposition 1, general form (explicit ``J^{l,K}``, ``D^l``, ``x^{l-1}``), equals
  ``Network.loss_and_grads`` to 1e-12 relative on hypothesis MLPs (depth 1-8, widths 1-64, every
  activation, biases on/off, random masks) and small CNNs, for both losses;
* the linear form (``J^{0,l-1} x^0 + a``, ``D^l = I``; paper eq. 10) equals backprop and the
  general form on linear MLPs and CNNs;
* ``mask_gradients`` (dL/dc) equals ``g * w`` at c = 1, equals ``dL/dW_eff * W`` from backprop of
  the effective network and central finite differences in a continuous c at partial masks, and
  is non-zero at pruned entries exactly where the input and the upstream gradient are;
* the errors.

The relative difference is ``max |a - b| / max |b|`` over one layer's "W" and "b", with a floor
for layers whose gradient is exactly zero (e.g. a layer cut off by its mask).
"""

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from netgen import INITS, cnns, mlps, perturb_biases, random_masks

import refnet as rn
from refnet.prop1 import (
    format_prop1_report,
    mask_gradients,
    max_rel_diff,
    prop1_gradients,
    prop1_report,
)

RTOL = 1e-12
FLOOR = 1e-300  # denominators of exactly-zero gradients
FD_H = 1e-6
FD_RTOL = 1e-6
FD_ATOL = 1e-9
SMOOTH = ["identity", "tanh", "sigmoid", "erf", "softplus"]
LOSSES = ["cross_entropy", "mse"]


# -------------------------------------------------------------------------------------------
# helpers
# -------------------------------------------------------------------------------------------


def _rel(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    num = max((float(np.max(np.abs(a[k] - b[k]))) for k in a), default=0.0)
    den = max((float(np.max(np.abs(b[k]))) for k in b), default=0.0)
    return num / max(den, FLOOR)


def _assert_close(got: list, want: list, rtol=RTOL):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert set(a) == set(b), f"layer {i}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            assert a[k].shape == b[k].shape, f"layer {i} {k}: shape {a[k].shape} vs {b[k].shape}"
        r = _rel(a, b)
        assert r <= rtol, f"layer {i} ({len(got)} layers): relative difference {r:.3e} > {rtol:.0e}"


def _data(net, rng, B, loss):
    x = rng.standard_normal((B, *net.in_shape))
    C = net.out_shape[0]
    y = rng.integers(0, C, size=B) if loss == "cross_entropy" else rng.standard_normal((B, C))
    return x, y


def _assert_pruned_zero(net, grads):
    for i, (g, m) in enumerate(zip(grads, net.masks)):
        for k in g:
            assert np.all(g[k][~m[k]] == 0.0), f"layer {i} {k}: pruned entries have non-zero gradient"


def _linearize(net):
    """The same parameters and masks with every activation the identity and max pooling turned
    into average pooling: a linear network."""
    layers = []
    for layer in net.layers:
        if isinstance(layer, (rn.Dense, rn.Conv2d)):
            layer = dataclasses.replace(layer, activation="identity")
        elif isinstance(layer, rn.MaxPool2d):
            layer = rn.AvgPool2d(layer.kernel_size)
        layers.append(layer)
    return rn.Network(layers, in_shape=net.in_shape, params=net.params, masks=net.masks)


def _scaled(net, c):
    """The network ``L(c * W)`` for a continuous mask ``c``: params ``c * W`` under a full mask."""
    params = [{k: c[i][k] * v for k, v in p.items()} for i, p in enumerate(net.params)]
    full = net.with_masks([{} for _ in net.layers])
    return full.with_params(params)


def _float_masks(net):
    return [{k: m[k].astype(np.float64) for k in m} for m in net.masks]


@st.composite
def smooth_mlps(draw):
    """MLPs with smooth activations (finite differences never straddle a kink), masks 0.5."""
    depth = draw(st.integers(1, 5))
    sizes = [draw(st.integers(1, 16)) for _ in range(depth + 1)]
    act = draw(st.sampled_from(SMOOTH))
    bias = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    net = rn.mlp(sizes, activation=act, init=draw(st.sampled_from(INITS)), seed=rng, bias=bias)
    if bias:
        net = perturb_biases(net, rng)
    return net.with_masks(random_masks(net, rng, 0.5)), rng


def smooth_cnn(seed, act="tanh"):
    """A fixed small CNN with smooth activations, circular and zero padding, avg pooling."""
    rng = np.random.default_rng(seed)
    layers = [
        rn.Conv2d(2, 3, 3, padding=1, padding_mode="circular", activation=act),
        rn.AvgPool2d(2),
        rn.Conv2d(3, 2, 2, stride=1, padding=1, activation="softplus"),
        rn.GlobalAvgPool2d(),
        rn.Dense(2, 3),
    ]
    net = rn.Network(layers, in_shape=(2, 5, 6), init="glorot", seed=rng)
    net = perturb_biases(net, rng)
    return net.with_masks(random_masks(net, rng, 0.5)), rng


# -------------------------------------------------------------------------------------------
# Proposition 1, general form
# -------------------------------------------------------------------------------------------


@settings(max_examples=200)
@given(mlps(max_depth=8), st.integers(1, 6), st.sampled_from(LOSSES))
def test_general_form_equals_backprop_mlp(net_rng, B, loss):
    net, rng = net_rng
    x, y = _data(net, rng, B, loss)
    got = prop1_gradients(net, x, y, loss=loss)
    _, want = net.loss_and_grads(x, y, loss=loss)
    _assert_close(got, want)
    _assert_pruned_zero(net, got)


@settings(max_examples=120)
@given(cnns(), st.integers(1, 4), st.sampled_from(LOSSES))
def test_general_form_equals_backprop_cnn(net_rng, B, loss):
    net, rng = net_rng
    x, y = _data(net, rng, B, loss)
    got = prop1_gradients(net, x, y, loss=loss)
    _, want = net.loss_and_grads(x, y, loss=loss)
    _assert_close(got, want)
    _assert_pruned_zero(net, got)
    assert all(g == {} for g, layer in zip(got, net.layers) if not layer.keys)


# -------------------------------------------------------------------------------------------
# Proposition 1, linear form (paper eq. 10)
# -------------------------------------------------------------------------------------------


@settings(max_examples=150)
@given(mlps(max_depth=8), st.integers(1, 6), st.sampled_from(LOSSES))
def test_linear_form_equals_backprop_linear_mlp(net_rng, B, loss):
    net, rng = net_rng
    net = _linearize(net)
    x, y = _data(net, rng, B, loss)
    got = prop1_gradients(net, x, y, loss=loss, form="linear")
    _, want = net.loss_and_grads(x, y, loss=loss)
    _assert_close(got, want)
    _assert_close(got, prop1_gradients(net, x, y, loss=loss, form="general"))
    _assert_pruned_zero(net, got)


@settings(max_examples=100)
@given(cnns(), st.integers(1, 4), st.sampled_from(LOSSES))
def test_linear_form_equals_backprop_linear_cnn(net_rng, B, loss):
    net, rng = net_rng
    net = _linearize(net)
    x, y = _data(net, rng, B, loss)
    got = prop1_gradients(net, x, y, loss=loss, form="linear")
    _, want = net.loss_and_grads(x, y, loss=loss)
    _assert_close(got, want)
    _assert_pruned_zero(net, got)


def test_linear_form_bias_term_matters():
    """With large biases the a-term of eq. (10) carries most of x^{l-1}: dropping it must show."""
    rng = np.random.default_rng(3)
    net = rn.mlp([4, 6, 5, 3], activation="identity", seed=rng)
    net = perturb_biases(net, rng, scale=5.0)
    x, y = _data(net, rng, 3, "cross_entropy")
    _, want = net.loss_and_grads(x, y)
    _assert_close(prop1_gradients(net, x, y, form="linear"), want)
    # the same formula with a = 0 is far off: the test above can see a missing bias term
    no_bias = net.with_params([{k: (0 * v if k == "b" else v) for k, v in p.items()} for p in net.params])
    assert _rel(prop1_gradients(no_bias, x, y, form="linear")[0], want[0]) > 1e-3


# -------------------------------------------------------------------------------------------
# report
# -------------------------------------------------------------------------------------------


def test_report_rows_and_table():
    net, rng = smooth_cnn(0)
    x, y = _data(net, rng, 3, "cross_entropy")
    report = prop1_report(net, x, y)
    affine = [i for i, layer in enumerate(net.layers) if layer.keys]
    assert [r["layer"] for r in report] == affine
    assert [r["type"] for r in report] == [type(net.layers[i]).__name__ for i in affine]
    _, bp = net.loss_and_grads(x, y)
    p1 = prop1_gradients(net, x, y)
    for r in report:
        i = r["layer"]
        assert set(r) >= {"layer", "type", "backprop", "prop1", "max_rel_diff"}
        for k in bp[i]:
            np.testing.assert_array_equal(r["backprop"][k], bp[i][k])
            np.testing.assert_array_equal(r["prop1"][k], p1[i][k])
        assert r["max_rel_diff"] == max_rel_diff(p1[i], bp[i])
        assert r["max_rel_diff"] <= RTOL
        assert r["max_rel_diff"] == pytest.approx(_rel(p1[i], bp[i]), rel=0, abs=0)
    table = format_prop1_report(report)
    lines = table.splitlines()
    assert len(lines) == 2 + len(report) + 1
    for r, line in zip(report, lines[2:]):
        assert line.split()[:3] == [str(r["layer"]), str(r["layer"] + 1), r["type"]]
        assert float(line.split()[-1]) == pytest.approx(r["max_rel_diff"], rel=1e-3, abs=1e-300)
    assert lines[-1].startswith("worst max rel diff")


def test_max_rel_diff_definition():
    a = {"W": np.array([[1.0, 2.0]]), "b": np.array([0.5])}
    b = {"W": np.array([[1.0, 4.0]]), "b": np.array([0.0])}
    assert max_rel_diff(a, b) == pytest.approx(2.0 / 4.0)
    z = {"W": np.zeros((1, 2))}
    assert max_rel_diff(z, z) == 0.0
    assert max_rel_diff({"W": np.ones((1, 2))}, z) == float("inf")
    with pytest.raises(ValueError, match="same keys"):
        max_rel_diff(a, z)


def test_report_linear_form_and_mse():
    rng = np.random.default_rng(5)
    net = perturb_biases(rn.mlp([3, 4, 2], activation="identity", seed=rng), rng)
    x, y = _data(net, rng, 2, "mse")
    report = prop1_report(net, x, y, loss="mse", form="linear")
    assert len(report) == 2 and all(r["max_rel_diff"] <= RTOL for r in report)


# -------------------------------------------------------------------------------------------
# connection sensitivity through the mask
# -------------------------------------------------------------------------------------------


@settings(max_examples=120)
@given(st.one_of(mlps(max_depth=8, masked=False), cnns(masked=False)), st.integers(1, 5), st.sampled_from(LOSSES))
def test_mask_gradients_at_full_mask_equal_g_times_w(net_rng, B, loss):
    net, rng = net_rng
    x, y = _data(net, rng, B, loss)
    dc = mask_gradients(net, x, y, loss=loss)
    _, g = net.loss_and_grads(x, y, loss=loss)
    _assert_close(dc, [{k: g[i][k] * p[k] for k in p} for i, p in enumerate(net.params)])


@settings(max_examples=120)
@given(st.one_of(mlps(max_depth=8, masked=True), cnns(masked=True)), st.integers(1, 5), st.sampled_from(LOSSES))
def test_mask_gradients_at_partial_mask_equal_effective_backprop(net_rng, B, loss):
    """dL/dc = dL/dW_eff * W with dL/dW_eff from backprop of the network whose weights are
    c * W under a full mask; at kept entries that is g * w."""
    net, rng = net_rng
    x, y = _data(net, rng, B, loss)
    dc = mask_gradients(net, x, y, loss=loss)
    _, g_eff = _scaled(net, _float_masks(net)).loss_and_grads(x, y, loss=loss)
    _assert_close(dc, [{k: g_eff[i][k] * p[k] for k in p} for i, p in enumerate(net.params)])
    _, g = net.loss_and_grads(x, y, loss=loss)
    for i, (d, m, p) in enumerate(zip(dc, net.masks, net.params)):
        for k in d:
            np.testing.assert_allclose(d[k][m[k]], (g[i][k] * p[k])[m[k]], rtol=0, atol=RTOL * max(np.abs(d[k]).max(), FLOOR))


def _fd_check(net, rng, x, y, loss, n_entries=3):
    c = _float_masks(net)
    dc = mask_gradients(net, x, y, loss=loss)

    def L(t, d):
        return _scaled(net, [{k: c[i][k] + t * d[i][k] for k in c[i]} for i in range(len(c))]).loss(x, y, loss=loss)

    # a random direction in every entry of c (kept and pruned)
    d = [{k: rng.standard_normal(v.shape) for k, v in ci.items()} for ci in c]
    fd = (L(FD_H, d) - L(-FD_H, d)) / (2 * FD_H)
    an = sum(float(np.sum(dc[i][k] * d[i][k])) for i in range(len(c)) for k in c[i])
    assert abs(fd - an) <= FD_RTOL * abs(an) + FD_ATOL, (fd, an)
    # single pruned entries: the sensitivity of re-adding a connection
    pruned = [(i, k, j) for i, m in enumerate(net.masks) for k in m for j in np.flatnonzero(~m[k])]
    for pick in rng.permutation(len(pruned))[:n_entries]:
        i, k, j = pruned[pick]
        e = [{kk: np.zeros(v.shape) for kk, v in ci.items()} for ci in c]
        e[i][k].flat[j] = 1.0
        fd = (L(FD_H, e) - L(-FD_H, e)) / (2 * FD_H)
        an = float(dc[i][k].flat[j])
        assert abs(fd - an) <= FD_RTOL * abs(an) + FD_ATOL, (i, k, j, fd, an)


@settings(max_examples=80)
@given(smooth_mlps(), st.integers(1, 4), st.sampled_from(LOSSES))
def test_mask_gradients_finite_differences_mlp(net_rng, B, loss):
    net, rng = net_rng
    x, y = _data(net, rng, B, loss)
    _fd_check(net, rng, x, y, loss)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("loss", LOSSES)
def test_mask_gradients_finite_differences_cnn(seed, loss):
    net, rng = smooth_cnn(seed)
    x, y = _data(net, rng, 2, loss)
    _fd_check(net, rng, x, y, loss)


@pytest.mark.parametrize("act", ["tanh", "relu"])
def test_mask_gradients_nonzero_at_pruned_entries(act):
    """One example: dL/dc_{oj} = gh_o x_j W_oj. At pruned entries (where backprop's gradient is
    exactly zero) it is non-zero exactly where the input x_j, the upstream gradient gh_o and
    W_oj are; gh is read off the bias gradient (bias kept)."""
    rng = np.random.default_rng(7)
    net = perturb_biases(rn.mlp([6, 8, 7, 4], activation=act, seed=rng), rng)
    net = net.with_masks([{"W": rng.random(p["W"].shape) < 0.5} for p in net.params])
    x, y = _data(net, rng, 1, "cross_entropy")
    dc = mask_gradients(net, x, y)
    _, g = net.loss_and_grads(x, y)
    _, trace = net.forward(x, return_trace=True)
    n_nonzero = 0
    for i, (d, m, p) in enumerate(zip(dc, net.masks, net.params)):
        pruned = ~m["W"]
        assert np.all(g[i]["W"][pruned] == 0.0)
        gh, xin = g[i]["b"], trace.caches[i]["x"][0]
        expect = (gh[:, None] != 0) & (xin[None, :] != 0) & (p["W"] != 0)
        np.testing.assert_array_equal(d["W"][pruned] != 0, expect[pruned])
        n_nonzero += int(np.sum(expect & pruned))
    assert n_nonzero >= 10


def test_mask_gradients_bias_entries():
    rng = np.random.default_rng(11)
    net = perturb_biases(rn.mlp([3, 5, 2], activation="tanh", seed=rng), rng)
    net = net.with_masks([{"b": np.array([True, False, True, False, True])}, {}])
    x, y = _data(net, rng, 4, "cross_entropy")
    dc = mask_gradients(net, x, y)
    _, g_eff = _scaled(net, _float_masks(net)).loss_and_grads(x, y)
    np.testing.assert_allclose(dc[0]["b"], g_eff[0]["b"] * net.params[0]["b"], rtol=1e-13, atol=0)
    assert np.all(dc[0]["b"][[1, 3]] != 0)
    no_bias = rn.mlp([3, 5, 2], activation="tanh", seed=0, bias=False)
    assert all(set(d) == {"W"} for d in mask_gradients(no_bias, x, y))


# -------------------------------------------------------------------------------------------
# errors
# -------------------------------------------------------------------------------------------


def test_errors():
    rng = np.random.default_rng(0)
    tanh_net = rn.mlp([4, 5, 3], activation="tanh", seed=0)
    x, y = _data(tanh_net, rng, 2, "cross_entropy")
    with pytest.raises(ValueError, match=r"form=\"linear\".*'tanh'"):
        prop1_gradients(tanh_net, x, y, form="linear")
    with pytest.raises(ValueError, match="form must be one of"):
        prop1_gradients(tanh_net, x, y, form="generla")
    with pytest.raises(TypeError, match="form"):
        prop1_gradients(tanh_net, x, y, form=2)
    with pytest.raises(ValueError, match="form must be one of"):
        prop1_report(tanh_net, x, y, form="quadratic")
    with pytest.raises(TypeError, match="net must be a refnet Network"):
        prop1_gradients("net", x, y)
    with pytest.raises(TypeError, match="net must be a refnet Network"):
        mask_gradients(None, x, y)
    with pytest.raises(ValueError, match=r"x must have shape \(\*, 4\)"):
        prop1_gradients(tanh_net, x[:, :3], y)
    with pytest.raises(ValueError, match=r"x must have shape"):
        mask_gradients(tanh_net, x[:, :3], y)
    with pytest.raises(ValueError, match=r"x must be finite"):
        prop1_gradients(tanh_net, np.full_like(x, np.nan), y)
    with pytest.raises(ValueError, match=r"y must hold labels in \[0, 3\)"):
        prop1_gradients(tanh_net, x, np.array([0, 3]))
    with pytest.raises(ValueError, match=r"y must have shape \(2,\)"):
        mask_gradients(tanh_net, x, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="loss must be one of"):
        prop1_gradients(tanh_net, x, y, loss="hinge")
    with pytest.raises(TypeError, match="report must be"):
        format_prop1_report("not a report")
    # max pooling is not linear even with identity activations
    pool_net = rn.Network(
        [rn.Conv2d(1, 2, 3, padding=1), rn.MaxPool2d(2), rn.Flatten(), rn.Dense(8, 3)], in_shape=(1, 4, 4), seed=0
    )
    xp = rng.standard_normal((2, 1, 4, 4))
    with pytest.raises(ValueError, match="MaxPool2d, which is not a linear map"):
        prop1_gradients(pool_net, xp, y, form="linear")
    # an output that is not (B, C)
    conv_out = rn.Network([rn.Conv2d(1, 2, 3)], in_shape=(1, 4, 4), seed=0)
    with pytest.raises(ValueError, match=r"output must be \(B, C\)"):
        prop1_gradients(conv_out, xp, y)
