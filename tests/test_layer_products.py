"""The layers' own batched products and mask gradient (the layer protocol beyond vjp/jvp).

For every layer type (Dense, Conv2d with strides, padding and both padding modes, AvgPool2d,
MaxPool2d, GlobalAvgPool2d, Flatten), with and without masks:

* ``vjp_many`` / ``jvp_many`` equal the per-vector loop of the base class (``Layer.vjp_many``,
  ``Layer.jvp_many``) to 1e-12, Conv2d's batched ``vjp_many`` to the bit, and both equal the
  products with the explicit layer Jacobian;
* the dot-product test ``<U, jvp_many(V)> == <vjp_many(U), V>`` for every pair of rows, to 1e-12;
* ``mask_grads`` is ``(dL/dW_eff) * W`` with ``dL/dW_eff`` from the layer's own backprop
  (``vjp`` without the mask), and ``g * W`` at the full mask;
* ``jacobians`` and ``prop1`` switch on layer types in at most three places.
"""

import ast
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from netgen import ACTIVATIONS

import refnet as rn
from refnet import layers as L

TOL = 1e-12


@st.composite
def layer_cases(draw):
    """A layer, its per-example input shape, and whether to mask its parameters."""
    kind = draw(st.sampled_from(["dense", "conv", "avg", "max", "gap", "flatten_image", "flatten_flat",
                                 "bn1d", "bn2d", "subsample"]))
    act = draw(st.sampled_from(ACTIVATIONS))
    bias = draw(st.booleans())
    if kind == "dense":
        n_in, n_out = draw(st.integers(1, 12)), draw(st.integers(1, 12))
        return rn.Dense(n_in, n_out, activation=act, bias=bias), (n_in,), draw(st.booleans())
    if kind == "flatten_flat":
        return rn.Flatten(), (draw(st.integers(1, 9)),), False
    if kind == "bn1d":  # eval mode: train mode couples the examples and has no per-example Jacobian
        C = draw(st.integers(1, 6))
        return rn.BatchNorm1d(C, mode="eval", activation=act, affine=draw(st.booleans())), (C,), draw(st.booleans())
    C, H, W = draw(st.integers(1, 3)), draw(st.integers(2, 7)), draw(st.integers(2, 7))
    if kind == "conv":
        kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
        ph, pw = draw(st.integers(0, 2)), draw(st.integers(0, 2))
        if H + 2 * ph < kh or W + 2 * pw < kw:
            ph, pw = kh, kw
        layer = rn.Conv2d(
            C, draw(st.integers(1, 4)), (kh, kw), stride=(draw(st.integers(1, 2)), draw(st.integers(1, 2))),
            padding=(ph, pw), padding_mode=draw(st.sampled_from(["zeros", "circular"])), activation=act, bias=bias,
        )
        return layer, (C, H, W), draw(st.booleans())
    if kind in ("avg", "max"):
        k = draw(st.integers(1, min(H, W)))
        return (rn.AvgPool2d(k) if kind == "avg" else rn.MaxPool2d(k)), (C, H, W), False
    if kind == "bn2d":
        return rn.BatchNorm2d(C, mode="eval", activation=act, affine=draw(st.booleans())), (C, H, W), draw(st.booleans())
    if kind == "subsample":
        pads = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
        return rn.SubsamplePad(stride=draw(st.integers(1, 3)), pad_channels=pads), (C, H, W), False
    return (rn.GlobalAvgPool2d() if kind == "gap" else rn.Flatten()), (C, H, W), False


def _setup(layer, in_shape, masked, rng, B):
    params = layer.init(rng, in_shape, rn.get_initializer("lecun", sigma_b=0.5), np.float64)
    mask = {k: rng.random(v.shape) < 0.6 for k, v in params.items()} if masked else None
    if hasattr(layer, "init_buffers"):  # eval-mode BatchNorm: random running statistics beside the params
        params = dict(params)
        params["running_mean"] = rng.standard_normal(layer.num_features)
        params["running_var"] = rng.uniform(0.5, 2.0, layer.num_features)
    x = rng.standard_normal((B, *in_shape))
    y, cache = layer.forward(params, x, mask)
    return params, mask, x, y, cache


def _close(a, b, tol=TOL):
    scale = max(float(np.abs(b).max(initial=0.0)), 1e-300)
    assert a.shape == b.shape and a.dtype == b.dtype
    assert float(np.abs(a - b).max(initial=0.0)) <= tol * scale, float(np.abs(a - b).max()) / scale


@settings(max_examples=250)
@given(layer_cases(), st.integers(1, 3), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_vjp_many_and_jvp_many_equal_the_loop_the_jacobian_and_are_adjoint(case, B, m, seed):
    layer, in_shape, masked = case
    rng = np.random.default_rng(seed)
    params, mask, x, y, cache = _setup(layer, in_shape, masked, rng, B)
    n_in, n_out = x[0].size, y[0].size
    U = rng.standard_normal((B, m, n_out))  # cotangents (rows)
    V = rng.standard_normal((B, m, n_in))  # tangents (rows)
    shapes = (in_shape, y.shape[1:])
    UJ = layer.vjp_many(params, cache, U, mask, *shapes)  # (B, m, n_in)
    JV = layer.jvp_many(params, cache, V, mask, *shapes)  # (B, m, n_out)
    assert UJ.shape == (B, m, n_in) and JV.shape == (B, m, n_out)
    # the per-vector loop of the base class
    _close(UJ, L.Layer.vjp_many(layer, params, cache, U, mask, *shapes))
    _close(JV, L.Layer.jvp_many(layer, params, cache, V, mask, *shapes))
    if isinstance(layer, rn.Conv2d):  # the batched form makes the loop's products: same bits
        np.testing.assert_array_equal(UJ, L.Layer.vjp_many(layer, params, cache, U, mask, *shapes))
    # the shapes default to those of the cached input
    np.testing.assert_array_equal(layer.vjp_many(params, cache, U, mask), UJ)
    np.testing.assert_array_equal(layer.jvp_many(params, cache, V, mask), JV)
    # the explicit layer Jacobian (B, n_out, n_in)
    J = layer.jacobian(params, cache, mask)
    _close(UJ, np.einsum("bmo,boi->bmi", U, J))
    _close(JV, np.einsum("boi,bmi->bmo", J, V))
    # dot-product test for every pair of rows: U_i (J V_j) == (U_i J) V_j
    lhs = np.einsum("bio,bjo->bij", U, JV)
    rhs = np.einsum("bin,bjn->bij", UJ, V)
    scale = (np.linalg.norm(U, axis=2)[:, :, None] * np.linalg.norm(JV, axis=2)[:, None, :]
             + np.linalg.norm(UJ, axis=2)[:, :, None] * np.linalg.norm(V, axis=2)[:, None, :])
    assert np.all(np.abs(lhs - rhs) <= TOL * scale + 1e-300), float(np.max(np.abs(lhs - rhs) - TOL * scale))


def test_every_layer_type_is_drawn():
    """The strategy above reaches every layer class (so no type is left out of the products test)."""
    seen = set()

    @settings(max_examples=200, database=None)
    @given(layer_cases())
    def collect(case):
        seen.add(type(case[0]).__name__)

    collect()
    assert seen == set(L.LAYER_TYPES) - {"Add"}  # Add takes several inputs: tests/test_residual.py


@pytest.mark.parametrize("chunk", [1, 50, 10**9])
def test_conv_vjp_many_chunks_give_the_same_bits(monkeypatch, chunk):
    rng = np.random.default_rng(3)
    layer = rn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 2), padding_mode="circular", activation="tanh")
    params, mask, x, y, cache = _setup(layer, (2, 6, 5), True, rng, 3)
    U = rng.standard_normal((3, 7, y[0].size))
    want = L.Layer.vjp_many(layer, params, cache, U, mask)
    monkeypatch.setattr(L.conv2d, "STACK_CHUNK_ELEMENTS", chunk)
    np.testing.assert_array_equal(layer.vjp_many(params, cache, U, mask), want)
    # an identity stack, as jacobians.jacobian sends it (a read-only broadcast view)
    E = np.broadcast_to(np.eye(y[0].size), (3, y[0].size, y[0].size))
    np.testing.assert_array_equal(layer.vjp_many(params, cache, E, mask), L.Layer.vjp_many(layer, params, cache, E, mask))


def test_flatten_hands_the_stack_back():
    layer = rn.Flatten()
    x = np.zeros((2, 3, 2, 2))
    _, cache = layer.forward({}, x)
    G = np.ones((2, 4, 12))
    assert layer.vjp_many({}, cache, G) is G and layer.jvp_many({}, cache, G) is G
    assert layer.flat_identity and not any(t().flat_identity for t in (rn.AvgPool2d, rn.MaxPool2d, rn.GlobalAvgPool2d))


def test_protocol_attributes():
    assert rn.Dense(3, 2).is_affine_map and rn.Conv2d(1, 1, 1, activation="linear").is_affine_map
    assert not rn.Dense(3, 2, activation="tanh").is_affine_map and not rn.Conv2d(1, 1, 1, activation="relu").is_affine_map
    assert rn.AvgPool2d(2).is_affine_map and rn.GlobalAvgPool2d().is_affine_map and rn.Flatten().is_affine_map
    assert not rn.MaxPool2d(2).is_affine_map
    rng = np.random.default_rng(0)
    layer = rn.Dense(5, 4, activation="erf")
    params, mask, x, y, cache = _setup(layer, (5,), True, rng, 3)
    W, D = layer.jacobian_factors(params, cache, mask)
    np.testing.assert_array_equal(W, params["W"] * mask["W"])
    np.testing.assert_array_equal(D, cache["D"])
    np.testing.assert_array_equal(layer.jacobian(params, cache, mask), D[:, :, None] * W[None])


# ------------------------------------------------------------------------------------------------
# the mask gradient dL/dc
# ------------------------------------------------------------------------------------------------


@settings(max_examples=150)
@given(layer_cases(), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_mask_grads_is_unmasked_backprop_times_w(case, B, seed):
    layer, in_shape, masked = case
    rng = np.random.default_rng(seed)
    params, mask, x, y, cache = _setup(layer, in_shape, masked, rng, B)
    g = rng.standard_normal(y.shape)  # dL/dy
    got = layer.mask_grads(params, cache, g)
    keys = layer.keys  # the parameters (not BatchNorm's running statistics)
    assert set(got) == set(keys)
    _, g_eff = layer.vjp(params, cache, g, None)  # dL/d theta_eff: the same trace, no mask applied
    for k in keys:
        _close(got[k], g_eff[k] * params[k])
    if not masked:  # at c = 1 it is g * w with g the layer's own gradient
        _, grads = layer.vjp(params, cache, g, {k: np.ones(params[k].shape, bool) for k in keys})
        for k in keys:
            _close(got[k], grads[k] * params[k])


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_network_mask_gradients_equal_g_times_w_from_backprop(arch):
    rng = np.random.default_rng(4)
    if arch == "mlp":
        net = rn.mlp([6, 7, 5, 3], activation="tanh", seed=1, sigma_b=0.3)
        x = rng.standard_normal((4, 6))
    else:
        net = rn.Network([rn.Conv2d(2, 3, 3, padding=1, activation="relu"), rn.AvgPool2d(2), rn.Flatten(), rn.Dense(12, 3)],
                         in_shape=(2, 4, 4), seed=1, sigma_b=0.3)
        x = rng.standard_normal((4, 2, 4, 4))
    y = rng.integers(0, 3, 4)
    _, grads = net.loss_and_grads(x, y)
    got = rn.mask_gradients(net, x, y)
    for gl, pl, dl in zip(grads, net.params, got):
        assert set(dl) == set(pl)
        for k in pl:
            _close(dl[k], gl[k] * pl[k])


def test_a_layer_with_parameters_must_define_mask_grads():
    class Scale(L.Layer):
        keys = ("W",)

    with pytest.raises(NotImplementedError, match="Scale has parameters"):
        Scale().mask_grads({"W": np.ones(1)}, {}, np.ones((1, 1)))
    assert rn.MaxPool2d(2).mask_grads({}, {}, np.ones((1, 1, 1, 1))) == {}


# ------------------------------------------------------------------------------------------------
# the algorithms go through the protocol
# ------------------------------------------------------------------------------------------------


def _layer_type_switches(path: Path) -> list[str]:
    """``isinstance(..., <layer class>)`` calls in a module, as ``line: source``."""
    names = set(L.LAYER_TYPES) | {"Layer"}
    tree = ast.parse(path.read_text())
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance" and len(node.args) == 2:
            classes = node.args[1].elts if isinstance(node.args[1], ast.Tuple) else [node.args[1]]
            if any(getattr(c, "id", getattr(c, "attr", None)) in names for c in classes):
                hits.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return hits


def test_jacobians_and_prop1_switch_on_layer_types_in_at_most_three_places():
    """The oracle ``prop1._outer_grads`` derives Dense and Conv2d itself (two checks) and the Dense
    chain of ``jacobians.jacobian`` is one fast path (one check); everything else goes through
    the layer protocol."""
    root = Path(rn.__file__).parent
    hits = _layer_type_switches(root / "jacobians.py") + _layer_type_switches(root / "prop1.py")
    assert len(hits) <= 3, hits
    for name in ("jacobians.py", "prop1.py"):
        src = (root / name).read_text()
        assert "_mask_of" not in src and "from .layers import _" not in src
