"""Exact Jacobians: forward and reverse accumulation, chains, JVP/VJP, finite differences,
the matrix-free operator and its extreme singular values."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from netgen import cnns, mlps

import refnet as rn
from refnet import jacobians as jac


def _rel(a, b):
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-300)


def _chain(layer_js, start, end):
    P = layer_js[start]
    for J in layer_js[start + 1 : end]:
        P = J @ P  # later layers on the left
    return P


@settings(max_examples=40)
@given(mlps(max_depth=6), st.data())
def test_mlp_chains_modes_and_products(net_rng, data):
    net, rng = net_rng
    K = net.n_layers
    start = data.draw(st.integers(0, K - 1))
    end = data.draw(st.integers(start + 1, K))
    x = rng.standard_normal((3, *net.in_shape))
    Jr = jac.jacobian(net, x, start, end, mode="reverse")
    Jf = jac.jacobian(net, x, start, end, mode="forward")
    Ja = jac.jacobian(net, x, start, end)
    Ls = jac.layer_jacobians(net, x)
    P = _chain(Ls, start, end)
    assert Jr.shape == (3, net.shapes[end][0], net.shapes[start][0])
    # the general vector-stack paths (used by CNNs, jvp/vjp and the operator) from identities
    trace = net.forward(x, return_trace=True)[1]
    n_out, n_in = net.shapes[end][0], net.shapes[start][0]
    Jp = jac.pullback(net, trace, np.broadcast_to(np.eye(n_out), (3, n_out, n_out)), start, end)
    Jq = jac.pushforward(net, trace, np.broadcast_to(np.eye(n_in), (3, n_in, n_in)), start, end).transpose(0, 2, 1)
    scale = max(np.abs(P).max(), 1e-300)
    for J in (Jr, Jf, Ja, Jp, Jq):
        assert np.abs(J - P).max() <= 1e-12 * scale


@settings(max_examples=25)
@given(cnns())
def test_cnn_input_output_jacobian_modes_and_products(net_rng):
    net, rng = net_rng
    x = rng.standard_normal((2, *net.in_shape))
    Jr = jac.jacobian(net, x, mode="reverse")
    Jf = jac.jacobian(net, x, mode="forward")
    P = _chain(jac.layer_jacobians(net, x), 0, net.n_layers)
    scale = max(np.abs(P).max(), 1e-300)
    assert np.abs(Jr - P).max() <= 1e-12 * scale
    assert np.abs(Jf - P).max() <= 1e-12 * scale


def test_jacobian_matches_finite_differences_and_products():
    rng = np.random.default_rng(0)
    net = rn.Network(
        [rn.Conv2d(2, 3, 3, padding=1, activation="tanh"), rn.AvgPool2d(2), rn.Flatten(), rn.Dense(18, 5, activation="erf"), rn.Dense(5, 4)],
        in_shape=(2, 4, 6), seed=0, sigma_b=0.2,
    )
    x = rng.standard_normal((3, 2, 4, 6))
    J = jac.jacobian(net, x)  # (3, 4, 48)
    h = 1e-6
    u = rng.standard_normal(x.shape)
    fd = (net.forward(x + h * u) - net.forward(x - h * u)) / (2 * h)
    Ju = np.einsum("bij,bj->bi", J, u.reshape(3, -1))
    np.testing.assert_allclose(fd, Ju, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(jac.jvp(net, x, u), Ju, rtol=1e-12, atol=1e-14)
    w = rng.standard_normal((3, 4))
    np.testing.assert_allclose(jac.vjp(net, x, w), np.einsum("bi,bij->bj", w, J), rtol=1e-12, atol=1e-14)
    # an inner chain J^{1,4} against finite differences of the sub-network
    _, trace = net.forward(x, return_trace=True)
    x1 = trace.caches[1]["x"]
    J14 = jac.jacobian(net, x, 1, 4)
    sub = lambda z: net.layers[3].forward(net.params[3], net.layers[2].forward({}, net.layers[1].forward({}, z)[0])[0])[0]
    v = rng.standard_normal(x1.shape)
    fd = (sub(x1 + h * v) - sub(x1 - h * v)) / (2 * h)
    np.testing.assert_allclose(fd, np.einsum("bij,bj->bi", J14, v.reshape(3, -1)), rtol=1e-7, atol=1e-9)


def test_reverse_mode_is_chosen_for_wide_inputs(monkeypatch):
    """A 10 x 784 Jacobian costs 10 pulled-back vectors, not 784 pushed-forward ones."""
    net = rn.mlp([784, 100, 10], activation="tanh", seed=0)
    x = np.random.default_rng(0).standard_normal((2, 784))
    seen = []
    real = jac._dense_chain

    def spy(net_, trace, dense, mode):
        J = real(net_, trace, dense, mode)
        seen.append((mode, J.shape))
        return J

    monkeypatch.setattr(jac, "_dense_chain", spy)
    J = jac.jacobian(net, x)
    assert seen == [("reverse", (2, 10, 784))] and J.shape == (2, 10, 784)
    # the general path (a CNN) pulls back 4 cotangents for a 4-output net
    cnn = rn.Network([rn.Conv2d(1, 2, 3, padding=1, activation="tanh"), rn.Flatten(), rn.Dense(2 * 6 * 6, 4)], in_shape=(1, 6, 6))
    shapes = []
    real_pull = jac.pullback

    def spy_pull(net_, trace, G, start, end):
        shapes.append(G.shape)
        return real_pull(net_, trace, G, start, end)

    monkeypatch.setattr(jac, "pullback", spy_pull)
    assert jac.jacobian(cnn, np.ones((2, 1, 6, 6))).shape == (2, 4, 36)
    assert shapes == [(2, 4, 4)]


def test_masked_network_jacobian_uses_effective_weights():
    rng = np.random.default_rng(1)
    net = rn.mlp([6, 5, 4], activation="tanh", seed=1)
    masks = [{"W": rng.random((5, 6)) < 0.5}, {"W": rng.random((4, 5)) < 0.5}]
    pruned = net.with_masks(masks)
    x = rng.standard_normal((2, 6))
    J = jac.jacobian(pruned, x)
    W1 = net.params[0]["W"] * masks[0]["W"]
    W2 = net.params[1]["W"] * masks[1]["W"]
    h1 = x @ W1.T + net.params[0]["b"]
    D1 = 1 - np.tanh(h1) ** 2
    for b in range(2):
        np.testing.assert_allclose(J[b], W2 @ np.diag(D1[b]) @ W1, rtol=1e-13, atol=1e-15)


def test_orthogonal_deep_linear_jacobian_is_an_isometry():
    net = rn.mlp([100] * 8, activation="linear", init="orthogonal", seed=3)
    x = np.random.default_rng(0).standard_normal((4, 100))
    s = np.linalg.svd(jac.jacobian(net, x), compute_uv=False)
    np.testing.assert_allclose(s, 1.0, atol=1e-12)
    # the paper's shape: 784-100x6-10; rows of J^{0,K} are orthonormal
    net = rn.mlp([784] + [100] * 6 + [10], activation="linear", init="orthogonal", seed=0)
    s = np.linalg.svd(jac.jacobian(net, np.zeros((2, 784))), compute_uv=False)
    assert s.shape == (2, 10)
    np.testing.assert_allclose(s, 1.0, atol=1e-12)


def test_operator_and_extreme_singular_values():
    rng = np.random.default_rng(2)
    net = rn.mlp([60, 40, 40, 30], activation="tanh", init="glorot", seed=2)
    x = rng.standard_normal(60)
    J = jac.jacobian(net, x[None])[0]
    op = jac.jacobian_operator(net, x)
    v, u = rng.standard_normal(60), rng.standard_normal(30)
    np.testing.assert_allclose(op.matvec(v), J @ v, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(op.rmatvec(u), J.T @ u, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(op.matmat(np.eye(60)), J, rtol=1e-12, atol=1e-14)
    s = np.linalg.svd(J, compute_uv=False)
    # ARPACK (Lanczos on the operator) is accurate to ~1e-10 here; LOBPCG iterates on the Gram
    # matrix, so its error in sigma^2 scales with sigma_max^2: for sigma_min/sigma_max ~ 4e-3 it
    # reaches ~1e-6 relative in sigma_min.
    for method, rtol_small in (("arpack", 1e-9), ("lobpcg", 1e-4)):
        r = jac.extreme_singular_values(net, x, k=2, method=method)
        np.testing.assert_allclose(r["largest"], s[:2], rtol=1e-8)
        np.testing.assert_allclose(r["smallest"], s[::-1][:2], rtol=rtol_small)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda n, x: jac.jacobian(n, x, 2, 2), r"0 <= start < end <= 2"),
        (lambda n, x: jac.jacobian(n, x, 0, 3), r"0 <= start < end <= 2"),
        (lambda n, x: jac.jacobian(n, x, mode="sideways"), "mode must be one of"),
        (lambda n, x: jac.jacobian(n, x, max_elements=10), "max_elements=10.*matrix-free"),
        (lambda n, x: jac.layer_jacobians(n, x, max_elements=10), "max_elements=10.*matrix-free"),
        (lambda n, x: jac.jvp(n, x, np.zeros((3, 4))), r"v must have shape \(3, 5\)"),
        (lambda n, x: jac.jacobian_operator(n, x), r"x must be one example"),
        (lambda n, x: jac.extreme_singular_values(n, x[0], k=3), "k must be < min"),
    ],
)
def test_errors(call, match):
    net = rn.mlp([5, 4, 3], seed=0)
    x = np.zeros((3, 5))
    with pytest.raises(ValueError, match=match):
        call(net, x)
    with pytest.raises(TypeError, match="net must be a refnet Network"):
        jac.jacobian("net", x)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_jacobian_svd_directions_through_jvp_and_vjp(kind):
    """J v_i = s_i u_i and u_i^T J = s_i v_i^T, checked through the JVP and VJP (the layers' own
    maps, not the Jacobian matrix) for every singular triple of every example."""
    rng = np.random.default_rng(7)
    if kind == "mlp":
        net = rn.mlp([6, 9, 5, 4], activation="tanh", init="orthogonal", seed=3)
        x, start, end = rng.standard_normal((3, 6)), 0, None
    else:
        net = rn.Network([rn.Conv2d(1, 2, 3, padding=1, activation="tanh"), rn.Flatten(), rn.Dense(2 * 4 * 4, 5)], in_shape=(1, 4, 4), seed=1)
        x, start, end = rng.standard_normal((2, 1, 4, 4)), 0, 3
    U, s, Vh = jac.jacobian_svd(net, x, start, end)
    J = jac.jacobian(net, x, start, end)
    B, n_end, n_start = J.shape
    k = min(n_end, n_start)
    assert (U.shape, s.shape, Vh.shape) == ((B, n_end, k), (B, k), (B, k, n_start))
    assert rn.jacobian_svd is jac.jacobian_svd
    np.testing.assert_allclose(s, np.linalg.svd(J, compute_uv=False), rtol=0, atol=1e-13 * s.max())
    start_shape = net.shapes[start]
    for i in range(k):
        Jv = jac.jvp(net, x, Vh[:, i].reshape((B,) + tuple(start_shape)), start, end)
        np.testing.assert_allclose(Jv, s[:, i, None] * U[:, :, i], rtol=0, atol=1e-12 * s.max())
        uJ = jac.vjp(net, x, U[:, :, i], start, end)
        np.testing.assert_allclose(uJ.reshape(B, -1), s[:, i, None] * Vh[:, i], rtol=0, atol=1e-12 * s.max())
    Uf, sf, Vhf = jac.jacobian_svd(net, x, start, end, full_matrices=True, engine="numpy")
    assert Uf.shape == (B, n_end, n_end) and Vhf.shape == (B, n_start, n_start)
    np.testing.assert_allclose(sf, s, rtol=0, atol=1e-13 * s.max())
    with pytest.raises(TypeError, match="full_matrices must be a bool"):
        jac.jacobian_svd(net, x, start, end, full_matrices=1)


def test_check_range_is_public_and_the_old_names_still_work():
    net = rn.mlp([5, 4, 3], seed=0)
    assert jac.check_range(net, 0, None) == (0, 2) and jac.check_range(net, 1, 2) == (1, 2)
    with pytest.raises(ValueError, match=r"0 <= start < end <= 2 .*start=1, end=1"):
        jac.check_range(net, 1, 1)
    assert jac._check_range is jac.check_range and jac._check_net is rn.network.check_net


@pytest.mark.parametrize("width", [100, 8])  # >= / < CHAIN_PER_EXAMPLE_ROWS stacked rows per example
@pytest.mark.parametrize("chunk", [1, 700, 10**9])
def test_dense_chain_chunks_of_examples_equal_the_layer_products(monkeypatch, chunk, width):
    """The Dense chain runs a few examples at a time through all layers; any chunk size (one
    example, a ragged last chunk, the whole batch) gives the products of the general path."""
    net = rn.mlp([12, width, width, width, 5], activation="tanh", seed=1, init="orthogonal")
    x = np.random.default_rng(2).standard_normal((7, 12))
    trace = net.forward(x, return_trace=True)[1]
    want_r = jac.pullback(net, trace, np.broadcast_to(np.eye(5), (7, 5, 5)), 0, 4)
    want_f = jac.pushforward(net, trace, np.broadcast_to(np.eye(12), (7, 12, 12)), 0, 4).transpose(0, 2, 1)
    monkeypatch.setattr(jac, "CHAIN_CHUNK_ELEMENTS", chunk)
    for mode, want in (("reverse", want_r), ("forward", want_f)):
        got = jac.jacobian(net, x, mode=mode)
        assert got.shape == (7, 5, 12)
        assert _rel(got, want) <= 1e-13
    # a square chain (m = width stacked rows per example)
    got = jac.jacobian(net, x, 1, 3)
    P = _chain(jac.layer_jacobians(net, x), 1, 3)
    assert _rel(got, P) <= 1e-13


@pytest.mark.parametrize("chunk, batches", [(1, [1] * 5), (300, [2, 2, 1]), (720, [5])])
def test_cnn_jacobian_chunks_of_examples(monkeypatch, chunk, batches):
    """Without a trace, a CNN's Jacobian takes a forward pass and the products per chunk of examples:
    the same matrices as one pass over the whole batch with its trace."""
    net = rn.Network([rn.Conv2d(1, 3, 3, padding=1, activation="tanh"), rn.MaxPool2d(2), rn.Flatten(),
                      rn.Dense(12, 4, activation="relu"), rn.Dense(4, 3)], in_shape=(1, 4, 4), seed=0, sigma_b=0.3)
    x = np.random.default_rng(4).standard_normal((5, 1, 4, 4))
    whole = jac.jacobian(net, x, trace=net.forward(x, return_trace=True)[1])
    monkeypatch.setattr(jac, "STACK_CHUNK_ELEMENTS", chunk)
    calls = []
    real = net.forward
    monkeypatch.setattr(net, "forward", lambda z, return_trace=False: calls.append(len(z)) or real(z, return_trace))
    got = jac.jacobian(net, x)
    assert _rel(got, whole) <= 1e-14
    assert calls == batches  # 3 stacked rows x 48 (the widest node) = 144 elements per example
