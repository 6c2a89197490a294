"""Approximate isometry (SPP): refnet/isometry.py; OrthP and L1 neuron pruning ([DI]): refnet/neuron_pruning.py."""

import math

import numpy as np
import pytest

import refnet as rn
from refnet import isometry as iso
from refnet import neuron_pruning as npr


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def objective(W, M, squared, gram):
    """Objective of one matrix computed from scratch (no refnet code): ||A||_F or its square."""
    V = W * M
    n_out, n_in = V.shape
    side = gram if gram != "smaller" else ("row" if n_out <= n_in else "column")
    A = V @ V.T - np.eye(n_out) if side == "row" else V.T @ V - np.eye(n_in)
    f = np.sqrt(np.sum(A * A))
    return f * f if squared else f


def central_fd(f, W, h=1e-6):
    g = np.zeros_like(W)
    for idx in np.ndindex(W.shape):
        Wp, Wm = W.copy(), W.copy()
        Wp[idx] += h
        Wm[idx] -= h
        g[idx] = (f(Wp) - f(Wm)) / (2 * h)
    return g


def rel_err(a, b):
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300)


def gram_of(V):
    """The smaller-side Gram matrix of V."""
    return V @ V.T if V.shape[0] <= V.shape[1] else V.T @ V


def snapshot(net):
    return [{k: v.copy() for k, v in p.items()} for p in net.params], [{k: v.copy() for k, v in m.items()} for m in net.masks]


def assert_same(net, snap):
    params, masks = snap
    for p, q in zip(net.params, params):
        for k in p:
            np.testing.assert_array_equal(p[k], q[k])
    for m, q in zip(net.masks, masks):
        for k in m:
            np.testing.assert_array_equal(m[k], q[k])


# ------------------------------------------------------------------------------------------
# gradient
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(4, 7), (7, 4), (5, 5)])
@pytest.mark.parametrize("gram", ["smaller", "row", "column"])
@pytest.mark.parametrize("squared", [False, True])
def test_gradient_matches_central_differences(shape, gram, squared):
    rng = np.random.default_rng([*shape, len(gram), int(squared)])
    W = rng.standard_normal(shape) / np.sqrt(shape[1])
    M = rng.random(shape) < 0.6
    value, g = iso.isometry_value_and_grad(W * M, M, squared=squared, gram=gram)
    assert value == pytest.approx(objective(W, M, squared, gram), rel=1e-13)
    fd = central_fd(lambda w: objective(w, M, squared, gram), W)
    assert rel_err(g, fd) < 1e-6
    # pruned entries: exactly zero gradient
    assert np.all(g[~M] == 0.0)
    # the CSR product path gives the same gradient
    _, gs = iso.isometry_value_and_grad(W * M, M, squared=squared, gram=gram, sparse=True)
    np.testing.assert_allclose(gs, g, rtol=1e-12, atol=1e-14)


def test_gradient_side_formulas_by_hand():
    """d||V^T V - I||/dV = 2 V A/||A|| (tall), d||V V^T - I||/dV = 2 A V/||A|| (wide); squared: 4 V A, 4 A V."""
    rng = np.random.default_rng(0)
    for shape in [(6, 3), (3, 6)]:
        V = rng.standard_normal(shape)
        if shape[0] > shape[1]:
            A = V.T @ V - np.eye(shape[1])
            want = V @ A
        else:
            A = V @ V.T - np.eye(shape[0])
            want = A @ V
        f, g = iso.isometry_value_and_grad(V)
        np.testing.assert_allclose(g, 2 * want / np.linalg.norm(A), rtol=1e-13)
        f2, g2 = iso.isometry_value_and_grad(V, squared=True)
        np.testing.assert_allclose(g2, 4 * want, rtol=1e-13)
        assert f2 == pytest.approx(f * f, rel=1e-14)


def test_gradient_at_exact_isometry_is_zero_not_nan():
    V = np.eye(4)[:3]  # (3, 4) orthonormal rows: A = 0 exactly
    f, g = iso.isometry_value_and_grad(V)
    assert f == 0.0
    assert np.all(g == 0.0)


def test_network_gradients_match_finite_differences_and_are_masked():
    rng = np.random.default_rng(1)
    net = rn.Network([rn.Conv2d(2, 3, 2), rn.Flatten(), rn.Dense(27, 5)], in_shape=(2, 4, 4), init="lecun", seed=1)
    net = net.with_masks([{"W": rng.random((3, 2, 2, 2)) < 0.7}, {}, {"W": rng.random((5, 27)) < 0.7}])
    grads = iso.isometry_gradients(net)
    assert [g.shape for g in grads] == [(3, 2, 2, 2), (5, 27)]
    for g, li in zip(grads, [0, 2]):
        W, M = net.params[li]["W"], net.masks[li]["W"]

        def total(w, li=li):
            params = [{k: v.copy() for k, v in p.items()} for p in net.params]
            params[li]["W"] = w
            return sum(iso.isometry_residuals(net.with_params(params)))

        assert rel_err(g, central_fd(total, W)) < 1e-6
        assert np.all(g[~M] == 0.0)


# ------------------------------------------------------------------------------------------
# approximate isometry
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sizes", [[8, 8], [5, 12], [12, 5], [6, 9, 9, 4]])
def test_ai_full_mask_reaches_orthogonality(sizes):
    net = rn.mlp(sizes, activation="tanh", init="lecun", seed=3)  # Gaussian weights
    assert max(iso.isometry_residuals(net)) > 0.5
    # squared GD: curvature 12 s^2 - 4 at a singular value s, so lr < 2 / (12 s_max^2 - 4) (s_max ~ 2.6 here)
    new, rep = iso.approximate_isometry(net, steps=3000, lr=0.02, squared=True, tol=1e-20, return_report=True)
    for p in new.params:
        V = p["W"]
        r = min(V.shape)
        assert np.linalg.norm(gram_of(V) - np.eye(r)) < 1e-8
    assert max(iso.isometry_residuals(new)) < 1e-8
    assert rep["stopped"] in ("tol", "plateau")
    assert all(row["residual_after"] < 1e-8 for row in rep["layers"])


def test_ai_unsquared_objective_decreases():
    net = rn.mlp([10, 10, 10], init="lecun", seed=0)
    rng = np.random.default_rng(0)
    net = net.with_masks([{"W": rng.random((10, 10)) < 0.5} for _ in range(2)])
    new, rep = iso.approximate_isometry(net, steps=300, return_report=True)
    assert rep["objective_after"] < 0.5 * rep["objective_before"]
    assert rep["objective_after"] == pytest.approx(sum(iso.isometry_residuals(new)), rel=1e-12)


def scratch_descent(Ws, Ms, steps, lr, squared, gram):
    """Plain GD on sum_l ||A_l||_F (or squares), written from the formulas (no refnet code)."""
    out = []
    for W, M in zip(Ws, Ms):
        V = W * M
        n_out, n_in = V.shape
        side = gram if gram != "smaller" else ("row" if n_out <= n_in else "column")
        for _ in range(steps):
            A = V @ V.T - np.eye(n_out) if side == "row" else V.T @ V - np.eye(n_in)
            n = np.sqrt(np.sum(A * A))
            G = A @ V if side == "row" else V @ A
            V = V - lr * (4.0 if squared else 2.0 / n) * G * M
        out.append(V)
    return out


@pytest.mark.parametrize("gram", ["smaller", "row", "column"])
@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("engine, sparse", [("numpy", False), ("numpy", True), ("numba", True), ("numba", False), (None, None)])
def test_ai_engines_follow_the_descent_from_scratch(engine, sparse, gram, squared):
    # tall (30 x 20), square (30 x 30) and wide (12 x 30) layers, 85% pruned; 8 steps (long
    # unsquared runs are chaotic: 1e-16 differences grow to 1e-1 within 300 steps)
    rng = np.random.default_rng(11)
    net = rn.mlp([20, 30, 30, 12], activation="tanh", init="orthogonal", seed=4)
    net = net.with_masks([{"W": rng.random(p["W"].shape) < 0.15} for p in net.params])
    lr = 0.02 if squared else 0.1
    new, rep = iso.approximate_isometry(net, steps=8, lr=lr, squared=squared, gram=gram, tol=0,
                                        engine=engine, sparse=sparse, return_report=True)
    want = scratch_descent([p["W"] for p in net.params], [m["W"] for m in net.masks], 8, lr, squared, gram)
    for p, m, V in zip(new.params, net.masks, want):
        np.testing.assert_allclose(p["W"] * m["W"], V, rtol=0, atol=1e-13)
    f_want = [objective(V, m["W"], False, gram) for V, m in zip(want, net.masks)]
    np.testing.assert_allclose([r["residual_after"] for r in rep["layers"]], f_want, rtol=1e-12)


def test_ai_runs_the_kernel_step_on_the_smaller_side(monkeypatch):
    from refnet import kernels

    calls = []
    real = kernels.isometry_step

    def spy(V, mask, lr, squared=False, **kw):
        calls.append((V.shape, kw.get("engine"), kw.get("method")))
        return real(V, mask, lr, squared, **kw)

    monkeypatch.setattr(kernels, "isometry_step", spy)
    net = rn.mlp([20, 30, 12], init="lecun", seed=0)  # a tall and a wide layer
    iso.approximate_isometry(net, steps=3, tol=0, engine="numba", sparse=True)
    assert sorted(set(calls)) == [((12, 30), "numba", "csr"), ((30, 20), "numba", "csr")]
    assert len(calls) == 2 * 3  # steps 1-3 take a kernel step each; after step 3 only the residual
    calls.clear()
    iso.approximate_isometry(net, steps=3, tol=0, gram="row")  # the tall layer's larger Gram: NumPy products
    assert {c[0] for c in calls} == {(12, 30)}


def test_ai_keeps_pruned_entries_biases_masks_and_input():
    rng = np.random.default_rng(5)
    net = rn.mlp([12, 9, 9, 3], activation="tanh", init="orthogonal", seed=5)
    net = rn.Network(net.layers, params=[{"W": p["W"], "b": p["b"] + rng.standard_normal(p["b"].shape)} for p in net.params])
    net = net.with_masks([{"W": rng.random(p["W"].shape) < 0.4} for p in net.params])
    before = snapshot(net)
    new = iso.approximate_isometry(net, steps=200, lr=0.1)
    assert_same(net, before)  # the input network is unchanged
    for p, q, m in zip(new.params, net.params, new.masks):
        W = m["W"]
        assert np.all((p["W"] * W)[~W] == 0.0)  # effective pruned weights exactly zero
        np.testing.assert_array_equal(p["W"][~W], q["W"][~W])  # stored W at pruned positions unchanged
        np.testing.assert_array_equal(p["b"], q["b"])  # biases untouched
        assert not np.array_equal(p["W"][W], q["W"][W])  # kept weights moved
    for m, q in zip(new.masks, net.masks):
        np.testing.assert_array_equal(m["W"], q["W"])


def test_ai_layers_argument_only_touches_those_layers():
    net = rn.mlp([6, 6, 6, 6], init="lecun", seed=2)
    new = iso.approximate_isometry(net, steps=50, layers=[1])
    np.testing.assert_array_equal(new.params[0]["W"], net.params[0]["W"])
    np.testing.assert_array_equal(new.params[2]["W"], net.params[2]["W"])
    assert not np.array_equal(new.params[1]["W"], net.params[1]["W"])


def test_lower_bound_with_zero_rows_is_reported_and_respected():
    """Two all-zero rows of a (6, 10) mask: A_ii = -1 for those rows whatever W is, so
    ||A||_F >= sqrt(2); the other rows can be made orthonormal, so the bound is attained here."""
    rng = np.random.default_rng(7)
    net = rn.Network([rn.Dense(10, 6)], init="lecun", seed=7)
    M = rng.random((6, 10)) < 0.8
    M[[1, 4]] = False
    net = net.with_masks([{"W": M}])
    new, rep = iso.approximate_isometry(net, steps=3000, squared=True, tol=1e-24, return_report=True)
    row = rep["layers"][0]
    assert row["side"] == "row" and row["size"] == 6
    assert row["zero_lines"] == 2
    assert row["structural_rank"] == 4
    assert row["lower_bound"] == pytest.approx(math.sqrt(2))
    assert row["residual_after"] >= row["lower_bound"] - 1e-12
    assert row["residual_after"] == pytest.approx(math.sqrt(2), abs=1e-8)
    text = iso.format_isometry_report(rep)
    assert "lower bound" in text and "1.41421" in text


def test_lower_bound_from_structural_rank_and_columns():
    # three rows that only reach the same two columns: structural rank 2 < 3, no zero row
    M = np.zeros((3, 5), dtype=bool)
    M[:, :2] = True
    lb = iso.isometry_lower_bound(M)
    assert (lb["side"], lb["zero_lines"], lb["structural_rank"]) == ("row", 0, 2)
    assert lb["bound"] == pytest.approx(1.0)
    # tall: column Gram; one all-zero column
    Mt = np.ones((6, 3), dtype=bool)
    Mt[:, 2] = False
    lb = iso.isometry_lower_bound(Mt)
    assert (lb["side"], lb["size"], lb["zero_lines"], lb["bound"]) == ("column", 3, 1, 1.0)
    assert lb["zero_lines_bound"] == 1.0
    # no V with this mask beats the bound (random search)
    rng = np.random.default_rng(0)
    for _ in range(200):
        V = rng.standard_normal((3, 5)) * M
        assert np.linalg.norm(V @ V.T - np.eye(3)) >= 1.0 - 1e-12


@pytest.mark.parametrize("shape", [(5, 9), (9, 5), (6, 6), (4, 2, 2)])
def test_lower_bound_is_attained_by_a_matching(shape):
    rng = np.random.default_rng(len(shape) * 100 + shape[0])
    for density in (0.15, 0.3, 0.6):
        M = rng.random(shape) < density
        lb = iso.isometry_lower_bound(M)
        assert lb["bound"] >= lb["zero_lines_bound"]
        V = (iso.min_residual_weights(M) * M).reshape(shape[0], -1)
        assert np.all(V[~M.reshape(V.shape)] == 0.0)
        assert np.linalg.norm(gram_of(V) - np.eye(min(V.shape))) == pytest.approx(lb["bound"], abs=1e-12)
        # and no W under this mask does better, e.g. what AI reaches from a random start
        net = rn.Network([rn.Dense(V.shape[1], V.shape[0])], init="lecun", seed=1)
        net = net.with_masks([{"W": M.reshape(V.shape)}])
        _, rep = iso.approximate_isometry(net, steps=300, lr=0.05, squared=True, return_report=True)
        assert rep["layers"][0]["residual_after"] >= lb["bound"] - 1e-9
        assert rep["layers"][0]["lower_bound"] == lb["bound"]


def test_conv_kernels_are_reshaped():
    rng = np.random.default_rng(4)
    # wide (c_out = 4 < c_in*kh*kw = 27): row Gram; tall (c_out = 16 > 2*2*2 = 8): column Gram
    net = rn.Network([rn.Conv2d(3, 4, 3), rn.Conv2d(4, 16, 1), rn.Flatten()], in_shape=(3, 5, 5), init="lecun", seed=4)
    tall = rn.Network([rn.Conv2d(2, 16, 2), rn.Flatten()], in_shape=(2, 4, 4), init="lecun", seed=4)
    for n in (net, tall):
        res = iso.isometry_residuals(n)
        for r, li in zip(res, iso.affine_layers(n)):
            W = n.params[li]["W"]  # (c_out, c_in, kh, kw)
            V = W.reshape(W.shape[0], -1)  # (c_out, c_in*kh*kw)
            assert r == pytest.approx(np.linalg.norm(gram_of(V) - np.eye(min(V.shape))), rel=1e-13)
            # the SPP code's layout [kh*kw*c_in, c_out]: same residual on the same side
            K = W.transpose(2, 3, 1, 0).reshape(-1, W.shape[0])
            assert r == pytest.approx(np.linalg.norm(gram_of(K) - np.eye(min(K.shape))), rel=1e-13)
    M = rng.random((16, 2, 2, 2)) < 0.9
    M[:, 1, 0, 0] = False  # one input position of every filter pruned: column Gram loses rank
    tall = tall.with_masks([{"W": M}, {}])
    new, rep = iso.approximate_isometry(tall, steps=3000, squared=True, tol=1e-24, return_report=True)
    row = rep["layers"][0]
    assert (row["side"], row["shape"], row["zero_lines"]) == ("column", (16, 8), 1)
    assert row["residual_after"] == pytest.approx(1.0, abs=1e-8)
    assert np.all(new.params[0]["W"][~M] == tall.params[0]["W"][~M])


def test_ai_errors():
    net = rn.mlp([4, 4], seed=0)
    with pytest.raises(ValueError, match="lr"):
        iso.approximate_isometry(net, lr=0.0)
    with pytest.raises(ValueError, match="steps"):
        iso.approximate_isometry(net, steps=-1)
    with pytest.raises(TypeError, match="steps"):
        iso.approximate_isometry(net, steps=1.5)
    with pytest.raises(ValueError, match="no affine layers"):
        iso.approximate_isometry(rn.Network([rn.Flatten()], in_shape=(2, 3)))
    with pytest.raises(ValueError, match="layers"):
        iso.approximate_isometry(net, layers=[3])
    with pytest.raises(FloatingPointError, match="smaller lr"):
        iso.approximate_isometry(rn.mlp([4, 4], init="sg", gamma=100.0, seed=0), lr=1e6, steps=50, squared=True)
    same = iso.approximate_isometry(net, steps=0)
    np.testing.assert_array_equal(same.params[0]["W"], net.params[0]["W"])


# ------------------------------------------------------------------------------------------
# OrthP
# ------------------------------------------------------------------------------------------
def test_orthp_orthonormal_times_gain_from_qr_of_current_weights():
    net = rn.Network([rn.Dense(10, 6, "relu"), rn.Dense(6, 6, "tanh"), rn.Dense(6, 9, "relu"), rn.Dense(9, 3)],
                     init="lecun", seed=0)
    new = npr.orthp(net)
    gains = [math.sqrt(2), 1.0, math.sqrt(2), 1.0]
    for p, q, g in zip(new.params, net.params, gains):
        V, W = p["W"], q["W"]
        r = min(V.shape)
        np.testing.assert_allclose(gram_of(V), g * g * np.eye(r), atol=1e-12)
        # QR of the CURRENT W with the sign fix: Q^T W (tall) / W Q^T (wide) is triangular, positive diagonal
        R = V.T @ W if V.shape[0] >= V.shape[1] else (W @ V.T).T
        R = R / g
        np.testing.assert_allclose(np.tril(R, -1), 0.0, atol=1e-12)
        assert np.all(np.diagonal(R) > 0)
        np.testing.assert_array_equal(p["b"], q["b"])
    # overrides: a float, a dict name -> gain, a list per layer
    for gain, want in [(2.0, [2.0] * 4), ({"relu": 3.0}, [3.0, 1.0, 3.0, 1.0]), ([1.0, 2.0, 3.0, 4.0], [1, 2, 3, 4])]:
        out = npr.orthp(net, gain=gain)
        for p, g in zip(out.params, want):
            np.testing.assert_allclose(gram_of(p["W"]), g * g * np.eye(min(p["W"].shape)), atol=1e-12)


def test_orthp_conv_and_unstructured_mask_error():
    net = rn.Network([rn.Conv2d(2, 3, 2, activation="relu"), rn.Flatten(), rn.Dense(27, 4)], in_shape=(2, 4, 4), seed=0)
    out = npr.orthp(net)
    V = out.params[0]["W"].reshape(3, -1)
    np.testing.assert_allclose(V @ V.T, 2.0 * np.eye(3), atol=1e-12)
    masks = [{"W": np.ones((3, 2, 2, 2), bool)}, {}, {"W": np.ones((4, 27), bool)}]
    masks[2]["W"][1, 5] = False
    with pytest.raises(ValueError, match="structurally pruned.*revive"):
        npr.orthp(net.with_masks(masks))


# ------------------------------------------------------------------------------------------
# L1 neuron pruning
# ------------------------------------------------------------------------------------------
def zero_outgoing(net, layer_units):
    """The original network with the outgoing weights of the removed units set to zero."""
    params = [{k: v.copy() for k, v in p.items()} for p in net.params]
    for nxt, cols in layer_units:
        params[nxt]["W"][:, cols] = 0.0
    return net.with_params(params)


def test_l1_prune_hand_example():
    W1 = np.array([[1.0, -1.0, 0.0], [2.0, 0.0, 3.0], [0.0, 1.0, -1.0], [0.5, 0.0, 0.0]])  # L1: 2, 5, 2, 0.5
    b1 = np.array([0.1, 0.2, 0.3, 0.4])
    W2 = np.arange(8.0).reshape(2, 4)
    b2 = np.array([-1.0, 1.0])
    net = rn.Network([rn.Dense(3, 4, "tanh"), rn.Dense(4, 2)], params=[{"W": W1, "b": b1}, {"W": W2, "b": b2}])
    out = npr.l1_neuron_prune(net, 2)  # units 1 (L1 5) and 0 (tie at 2 with unit 2: lower index)
    assert out.layers[0].n_out == 2 and out.layers[1].n_in == 2
    assert out.layers[0].activation.name == "tanh"
    np.testing.assert_array_equal(out.params[0]["W"], W1[[0, 1]])
    np.testing.assert_array_equal(out.params[0]["b"], b1[[0, 1]])
    np.testing.assert_array_equal(out.params[1]["W"], W2[:, [0, 1]])
    np.testing.assert_array_equal(out.params[1]["b"], b2)
    out3 = npr.l1_neuron_prune(net, 0.75)  # floor(0.75 * 4 + 1/2) = 3 units: 0, 1, 2
    np.testing.assert_array_equal(out3.params[0]["W"], W1[[0, 1, 2]])
    x = np.random.default_rng(0).standard_normal((5, 3))
    np.testing.assert_allclose(out(x), zero_outgoing(net, [(1, [2, 3])])(x), rtol=0, atol=1e-14)


def test_l1_prune_mlp_same_function_as_zeroed_original():
    rng = np.random.default_rng(3)
    net = rn.mlp([12, 10, 9, 8, 4], activation="tanh", init="lecun", seed=3)
    net = rn.Network(net.layers, params=[{"W": p["W"], "b": rng.standard_normal(p["b"].shape)} for p in net.params])
    before = snapshot(net)
    out = npr.l1_neuron_prune(net, [4, 0.5, 3])
    assert_same(net, before)
    assert [l.n_out for l in out.layers] == [4, 5, 3, 4]
    removed = []
    for li in range(3):
        scores = np.abs(net.params[li]["W"]).sum(axis=1)
        k = out.layers[li].n_out
        kept = np.sort(np.argsort(-scores, kind="stable")[:k])
        np.testing.assert_array_equal(out.params[li]["b"], net.params[li]["b"][kept])
        removed.append((li + 1, np.setdiff1d(np.arange(len(scores)), kept)))
    x = rng.standard_normal((7, 12))
    np.testing.assert_allclose(out(x), zero_outgoing(net, removed)(x), rtol=0, atol=1e-13)
    # orthp on the structurally pruned network works
    o = npr.orthp(out)
    for p in o.params:
        np.testing.assert_allclose(gram_of(p["W"]), np.eye(min(p["W"].shape)), atol=1e-12)


@pytest.mark.parametrize("pool", [None, "max", "global"])
def test_l1_prune_conv_chains(pool):
    rng = np.random.default_rng(11)
    layers = [rn.Conv2d(2, 5, 3, padding=1, activation="relu"), rn.Conv2d(5, 6, 3, activation="tanh")]
    if pool == "max":
        layers += [rn.MaxPool2d(2), rn.Flatten(), rn.Dense(6 * 2 * 2, 3)]
    elif pool == "global":
        layers += [rn.GlobalAvgPool2d(), rn.Dense(6, 3)]
    else:
        layers += [rn.Flatten(), rn.Dense(6 * 4 * 4, 3)]
    net = rn.Network(layers, in_shape=(2, 6, 6), init="lecun", seed=11)
    net = rn.Network(net.layers, in_shape=net.in_shape,
                     params=[{k: (v + rng.standard_normal(v.shape) if k == "b" else v) for k, v in p.items()} for p in net.params])
    out = npr.l1_neuron_prune(net, [3, 4])
    assert out.layers[0].c_out == 3 and out.layers[1].c_in == 3 and out.layers[1].c_out == 4
    # the original with the removed filters' outgoing weights zeroed
    params = [{k: v.copy() for k, v in p.items()} for p in net.params]
    kept0 = np.sort(np.argsort(-np.abs(net.params[0]["W"]).reshape(5, -1).sum(1), kind="stable")[:3])
    kept1 = np.sort(np.argsort(-np.abs(net.params[1]["W"]).reshape(6, -1).sum(1), kind="stable")[:4])
    params[1]["W"][:, np.setdiff1d(np.arange(5), kept0)] = 0.0
    dense = params[-1]["W"]
    hw = dense.shape[1] // 6
    for c in np.setdiff1d(np.arange(6), kept1):
        dense[:, c * hw : (c + 1) * hw] = 0.0
    x = rng.standard_normal((4, 2, 6, 6))
    np.testing.assert_allclose(out(x), net.with_params(params)(x), rtol=0, atol=1e-12)


def test_l1_prune_errors():
    net = rn.mlp([4, 5, 3], seed=0)
    with pytest.raises(ValueError, match="keep"):
        npr.l1_neuron_prune(net, 6)
    with pytest.raises(ValueError, match="keep"):
        npr.l1_neuron_prune(net, 1.0)
    with pytest.raises(ValueError, match="last affine layer"):
        npr.l1_neuron_prune(net, 2, layers=[1])
    with pytest.raises(ValueError, match="at least two affine"):
        npr.l1_neuron_prune(rn.mlp([4, 3], seed=0), 2)


# ------------------------------------------------------------------------------------------
# the names that moved to refnet.neuron_pruning
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["orthp", "l1_neuron_prune", "activation_gain", "DEFAULT_GAINS"])
def test_moved_names_still_work_with_a_deprecation_warning(name):
    # planted bug seen failing: the alias without its warning
    with pytest.warns(DeprecationWarning, match=f"refnet.neuron_pruning.{name}"):
        old = getattr(iso, name)
    assert old is getattr(npr, name)
    with pytest.warns(DeprecationWarning):
        exec(f"from refnet.isometry import {name}", {})
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        iso.nonsense  # noqa: B018


def test_top_level_names_are_the_moved_functions_without_warning(recwarn):
    assert rn.orthp is npr.orthp and rn.l1_neuron_prune is npr.l1_neuron_prune
    assert rn.neuron_pruning is npr
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning)]
