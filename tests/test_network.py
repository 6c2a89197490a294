"""Network behaviour: the conv oracle, PyTorch float64 agreement, masks, files and bad input."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from netgen import ACTIVATIONS, cnns, mlps, perturb_biases, random_masks

import refnet as rn
from refnet import conv

# ------------------------------------------------------------------------------------------------
# convolution: im2col against the naive seven-loop oracle
# ------------------------------------------------------------------------------------------------


@settings(max_examples=60)
@given(
    B=st.integers(0, 2),
    C=st.integers(1, 3),
    O=st.integers(1, 3),
    Hs=st.integers(1, 7),
    Ws=st.integers(1, 7),
    kh=st.integers(1, 4),
    kw=st.integers(1, 4),
    sh=st.integers(1, 3),
    sw=st.integers(1, 3),
    ph=st.integers(0, 3),
    pw=st.integers(0, 3),
    mode=st.sampled_from(["zeros", "circular"]),
    bias=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_im2col_conv_matches_naive_loops(B, C, O, Hs, Ws, kh, kw, sh, sw, ph, pw, mode, bias, seed):
    if Hs + 2 * ph < kh or Ws + 2 * pw < kw:
        with pytest.raises(ValueError, match="smaller than the kernel"):
            conv.conv_output_size(Hs, Ws, (kh, kw), (sh, sw), (ph, pw))
        return
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, C, Hs, Ws))
    W = rng.standard_normal((O, C, kh, kw))
    b = rng.standard_normal(O) if bias else None
    fast = conv.conv2d_im2col(x, W, b, (sh, sw), (ph, pw), mode)
    slow = conv.conv2d_naive(x, W, b, (sh, sw), (ph, pw), mode)
    np.testing.assert_allclose(fast, slow, rtol=1e-13, atol=1e-13)
    # the explicit operator matrix is the same linear map
    M = conv.conv_matrix(W, (C, Hs, Ws), (sh, sw), (ph, pw), mode)
    lin = x.reshape(B, C * Hs * Ws) @ M.T + (0 if b is None else np.repeat(b, fast.shape[2] * fast.shape[3]))
    np.testing.assert_allclose(lin, slow.reshape(B, M.shape[0]), rtol=1e-13, atol=1e-13)
    # and the layer's forward is the same convolution
    layer = rn.Conv2d(C, O, (kh, kw), stride=(sh, sw), padding=(ph, pw), padding_mode=mode, bias=bias)
    params = {"W": W, "b": b} if bias else {"W": W}
    np.testing.assert_allclose(layer.forward(params, x)[0], slow, rtol=1e-13, atol=1e-13)


def test_col2im_is_the_adjoint_of_im2col():
    rng = np.random.default_rng(0)
    for mode in ("zeros", "circular"):
        x = rng.standard_normal((2, 3, 5, 4))
        cols = conv.im2col(x, (3, 2), (2, 1), (1, 2), mode)
        g = rng.standard_normal(cols.shape)
        lhs = np.sum(cols * g)
        rhs = np.sum(x * conv.col2im(g, x.shape, (3, 2), (2, 1), (1, 2), mode))
        assert abs(lhs - rhs) <= 1e-12 * np.linalg.norm(cols) * np.linalg.norm(g)


# ------------------------------------------------------------------------------------------------
# PyTorch float64 autograd as an independent check
# ------------------------------------------------------------------------------------------------


def _torch_act(act, torch):
    nn = torch.nn
    p = dict(act.params)
    return {
        "identity": lambda: nn.Identity(),
        "tanh": lambda: nn.Tanh(),
        "relu": lambda: nn.ReLU(),
        "leaky_relu": lambda: nn.LeakyReLU(p.get("slope", 0.01)),
        "selu": lambda: nn.SELU(),
        "elu": lambda: nn.ELU(p.get("alpha", 1.0)),
        "sigmoid": lambda: nn.Sigmoid(),
        "hard_tanh": lambda: nn.Hardtanh(),
        "erf": None,
        "softplus": lambda: nn.Softplus(beta=1.0, threshold=1e6),  # no linear cut-off: exact
    }[act.name]


def _to_torch(net, torch):
    """An nn.Module computing the same function with the same (masked) weights."""
    nn = torch.nn

    class Erf(nn.Module):
        def forward(self, x):
            return torch.erf(x)

    mods, eff = [], net.effective_params()
    for layer, p in zip(net.layers, eff):
        if isinstance(layer, rn.Dense):
            m = nn.Linear(layer.n_in, layer.n_out, bias=layer.bias, dtype=torch.float64)
        elif isinstance(layer, rn.Conv2d):
            m = nn.Conv2d(layer.c_in, layer.c_out, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                          padding_mode=layer.padding_mode, bias=layer.bias, dtype=torch.float64)
        elif isinstance(layer, rn.AvgPool2d):
            mods.append(nn.AvgPool2d(layer.kernel_size))
            continue
        elif isinstance(layer, rn.MaxPool2d):
            mods.append(nn.MaxPool2d(layer.kernel_size))
            continue
        elif isinstance(layer, rn.GlobalAvgPool2d):
            mods.append(nn.AdaptiveAvgPool2d(1))
            mods.append(nn.Flatten())
            continue
        elif isinstance(layer, rn.Flatten):
            mods.append(nn.Flatten())
            continue
        with torch.no_grad():
            m.weight.copy_(torch.from_numpy(p["W"]))
            if layer.bias:
                m.bias.copy_(torch.from_numpy(p["b"]))
        mods.append(m)
        make = _torch_act(layer.activation, torch)
        mods.append(Erf() if make is None else make())
    return nn.Sequential(*mods)


def _compare_with_torch(net, rng, loss, B=4):
    torch = pytest.importorskip("torch")
    model = _to_torch(net, torch)
    x = rng.standard_normal((B, *net.in_shape))
    C = net.out_shape[0]
    y = rng.integers(0, C, size=B) if loss == "cross_entropy" else rng.standard_normal((B, C))
    value, grads = net.loss_and_grads(x, y, loss=loss)
    xt = torch.from_numpy(x)
    out = model(xt)
    if loss == "cross_entropy":
        lt = torch.nn.functional.cross_entropy(out, torch.from_numpy(y))
    else:
        lt = torch.nn.functional.mse_loss(out, torch.from_numpy(y))
    lt.backward()
    np.testing.assert_allclose(net.forward(x), out.detach().numpy(), rtol=1e-12, atol=1e-13)
    assert abs(value - lt.item()) <= 1e-12 * max(1.0, abs(value))
    tparams = [m for m in model if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    ours = [(l, g) for l, g in zip(net.layers, grads) if g]
    masks = [m for l, m in zip(net.layers, net.masks) if m]
    assert len(tparams) == len(ours)
    for m, (layer, g), mask in zip(tparams, ours, masks):
        # torch's gradient is for the effective weight; refnet's is mask * that (chain rule)
        gw = m.weight.grad.numpy() * mask["W"]
        scale = max(np.abs(gw).max(), 1e-300)
        assert np.abs(g["W"] - gw).max() <= 1e-10 * scale
        if layer.bias:
            gb = m.bias.grad.numpy() * mask["b"]
            assert np.abs(g["b"] - gb).max() <= 1e-10 * max(np.abs(gb).max(), 1e-300)


@settings(max_examples=30)
@given(mlps(), st.sampled_from(["cross_entropy", "mse"]))
def test_mlp_matches_pytorch_float64(net_rng, loss):
    _compare_with_torch(*net_rng, loss)


@settings(max_examples=30)
@given(cnns(), st.sampled_from(["cross_entropy", "mse"]))
def test_cnn_matches_pytorch_float64(net_rng, loss):
    _compare_with_torch(*net_rng, loss, B=3)


def test_paper_mlp_matches_pytorch():
    rng = np.random.default_rng(0)
    net = rn.mlp([784] + [100] * 6 + [10], activation="tanh", init="orthogonal", seed=0)
    _compare_with_torch(perturb_biases(net, rng), rng, "cross_entropy", B=100)


# ------------------------------------------------------------------------------------------------
# masks
# ------------------------------------------------------------------------------------------------


def test_pruned_entries_have_exactly_zero_gradient_and_output_ignores_them():
    rng = np.random.default_rng(1)
    net = perturb_biases(rn.mlp([8, 6, 5, 3], activation="tanh", seed=1), rng)
    masks = random_masks(net, rng, 0.5)
    pruned = net.with_masks(masks)
    x = rng.standard_normal((7, 8))
    _, grads = pruned.loss_and_grads(x, rng.integers(0, 3, 7), weight_decay=0.1)
    for g, m in zip(grads, masks):  # the masks we asked for, not what the network reports
        for k in g:
            assert (~m[k]).any() and np.all(g[k][~m[k]] == 0.0)
            assert np.any(g[k][m[k]] != 0.0)
    # changing a pruned weight changes nothing
    params = [{k: np.where(m[k], v, 1e6) for k, v in p.items()} for p, m in zip(pruned.params, masks)]
    np.testing.assert_array_equal(pruned.with_params(params).forward(x), pruned.forward(x))
    # with_masks leaves the original network as it was
    assert all(m.all() for mm in net.masks for m in mm.values())


def test_with_masks_accepts_partial_and_numeric_masks():
    net = rn.mlp([4, 3, 2], seed=0)
    m = net.with_masks([{"W": np.ones((3, 4), dtype=int)}, None])
    assert m.masks[0]["W"].dtype == bool and m.masks[0]["b"].all() and m.masks[1]["W"].all()


@pytest.mark.parametrize(
    "masks,match",
    [
        ([{"W": np.ones((4, 3), bool)}, {}], r"masks\[0\]\['W'\] must have shape \(3, 4\)"),
        ([{"W": np.full((3, 4), 0.5)}, {}], r"masks\[0\]\['W'\] must be boolean or hold only 0 and 1"),
        ([{"V": np.ones((3, 4), bool)}, {}], r"masks\[0\] must be a dict with keys among \['W', 'b'\]"),
        ([{}], r"masks must be a list of 2 dicts"),
    ],
)
def test_bad_masks_are_clear_errors(masks, match):
    net = rn.mlp([4, 3, 2], seed=0)
    with pytest.raises(ValueError, match=match):
        net.with_masks(masks)


# ------------------------------------------------------------------------------------------------
# initialization through the network
# ------------------------------------------------------------------------------------------------


def test_same_seed_same_weights_and_generator_accepted():
    a = rn.mlp([5, 4, 3], init="glorot", seed=3)
    b = rn.mlp([5, 4, 3], init="vs-g", seed=np.random.default_rng(3))
    c = rn.mlp([5, 4, 3], init="glorot", seed=4)
    for p, q, r in zip(a.params, b.params, c.params):
        np.testing.assert_array_equal(p["W"], q["W"])
        assert not np.array_equal(p["W"], r["W"])


def test_per_layer_inits_and_sigma_b():
    layers = [rn.Dense(6, 6, activation="tanh"), rn.Dense(6, 2)]
    net = rn.Network(layers, init=[rn.get_initializer("orthogonal", gain=2.0), rn.get_initializer("sg", gamma=0.5, sigma_b=0.1)], seed=0)
    np.testing.assert_allclose(np.linalg.svd(net.params[0]["W"], compute_uv=False), 2.0, atol=1e-12)
    assert np.all(net.params[0]["b"] == 0) and np.any(net.params[1]["b"] != 0)


def test_deep_linear_orthogonal_net_is_an_isometry():
    """784-100x6-10 linear with orthogonal weights: J^{0,K} = W^7 ... W^1 has all singular
    values 1 (each factor has orthonormal rows, the product W^7...W^1 too)."""
    net = rn.mlp([784] + [100] * 6 + [10], activation="linear", init="orthogonal", seed=0)
    J = np.eye(784)
    for p in net.params:
        J = p["W"] @ J
    np.testing.assert_allclose(np.linalg.svd(J, compute_uv=False), 1.0, atol=1e-12)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_delta_orthogonal_circular_conv_is_an_exact_isometry(k):
    """A delta-orthogonal kernel with circular padding k//2 and stride 1 maps
    x -> Q x pixelwise, so every singular value of the full conv operator is 1."""
    layer = rn.Conv2d(4, 6, k, padding=k // 2, padding_mode="circular", bias=False)
    net = rn.Network([layer], in_shape=(4, 5, 5), init="delta_orthogonal", seed=0)
    M = conv.conv_matrix(net.params[0]["W"], (4, 5, 5), layer.stride, layer.padding, layer.padding_mode)
    s = np.linalg.svd(M, compute_uv=False)
    assert s.size == 4 * 25
    np.testing.assert_allclose(s, 1.0, atol=1e-12)
    # a generic orthogonal (not delta) kernel is not an isometry: the check can fail
    if k > 1:
        W = rn.init.orthogonal(np.random.default_rng(0), (6, 4, k, k))
        M2 = conv.conv_matrix(W, (4, 5, 5), layer.stride, layer.padding, layer.padding_mode)
        assert np.abs(np.linalg.svd(M2, compute_uv=False) - 1).max() > 1e-3


# ------------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------------


def test_save_load_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    net = rn.Network(
        [rn.Conv2d(1, 3, 3, padding=1, padding_mode="circular", activation=rn.get_activation("leaky_relu", slope=0.2)),
         rn.MaxPool2d(2), rn.Flatten(), rn.Dense(12, 4, activation="elu", bias=False), rn.Dense(4, 2)],
        in_shape=(1, 4, 4), init="he", seed=0, sigma_b=0.1,
    )
    net = net.with_masks(random_masks(net, rng, 0.5))
    path = tmp_path / "sub" / "net.npz"
    net.save(path)
    back = rn.load_network(path)
    assert back.layers == net.layers and back.in_shape == net.in_shape and back.init == net.init
    for a, b in zip(net.params + net.masks, back.params + back.masks):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
            assert a[k].dtype == b[k].dtype
    x = rng.standard_normal((3, 1, 4, 4))
    np.testing.assert_array_equal(net.forward(x), back.forward(x))
    assert [p.name for p in tmp_path.joinpath("sub").iterdir()] == ["net.npz"]  # no temp file left


def test_load_rejects_bad_files(tmp_path):
    net = rn.mlp([3, 2], seed=0)
    good = tmp_path / "good.npz"
    net.save(good)
    with np.load(good) as f:
        data = {k: f[k] for k in f.files}
    bad = dict(data)
    bad["param/0/W"] = np.zeros((2, 4))
    np.savez(tmp_path / "shape.npz", **bad)
    with pytest.raises(ValueError, match=r"params\[0\]\['W'\] must have shape \(2, 3\)"):
        rn.load_network(tmp_path / "shape.npz")
    bad = dict(data)
    del bad["mask/0/b"]
    np.savez(tmp_path / "missing.npz", **bad)
    with pytest.raises(ValueError, match="missing or unexpected"):
        rn.load_network(tmp_path / "missing.npz")
    bad = dict(data)
    bad["param/0/W"] = np.full((2, 3), np.nan)
    np.savez(tmp_path / "nan.npz", **bad)
    with pytest.raises(ValueError, match="must be finite"):
        rn.load_network(tmp_path / "nan.npz")
    np.savez(tmp_path / "obj.npz", config=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="obj.npz.*would need pickle"):
        rn.load_network(tmp_path / "obj.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="junk.npz' is not a .npz archive"):
        rn.load_network(tmp_path / "junk.npz")


# ------------------------------------------------------------------------------------------------
# bad input: clear errors, nothing changed
# ------------------------------------------------------------------------------------------------


def _snapshot(net):
    return [{k: v.copy() for k, v in p.items()} for p in net.params + net.masks]


def _unchanged(net, snap):
    return all(np.array_equal(a[k], b[k]) for a, b in zip(net.params + net.masks, snap) for k in a)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda n: n.forward(np.zeros((2, 5))), ValueError, r"x must have shape \(\*, 4\), got \(2, 5\)"),
        (lambda n: n.forward(np.full((2, 4), np.inf)), ValueError, "x must be finite"),
        (lambda n: n.forward(np.zeros((2, 4), dtype=complex)), TypeError, "x must be a real floating-point array"),
        (lambda n: n.loss_and_grads(np.zeros((2, 4)), np.array([0, 3])), ValueError, r"y must hold labels in \[0, 3\)"),
        (lambda n: n.loss_and_grads(np.zeros((2, 4)), np.array([0.0, 1.0])), TypeError, "y must be an integer array"),
        (lambda n: n.loss_and_grads(np.zeros((2, 4)), np.array([0])), ValueError, r"y must have shape \(2,\)"),
        (lambda n: n.loss_and_grads(np.zeros((2, 4)), np.array([0, 1]), loss="hinge"), ValueError, "loss must be one of"),
        (lambda n: n.loss_and_grads(np.zeros((2, 4)), np.array([0, 1]), weight_decay=-1), ValueError, "weight_decay must be >= 0"),
        (lambda n: n.with_params([{"W": np.zeros((4, 5)), "b": np.zeros(5)}, n.params[1]]), ValueError, r"params\[0\]\['W'\] must have shape \(5, 4\), got \(4, 5\)"),
        (lambda n: n.with_params([{"W": np.zeros((5, 4), np.float32), "b": np.zeros(5)}, n.params[1]]), TypeError, r"params\[0\]\['W'\] must have dtype float64"),
        (lambda n: n.with_params([{"W": np.zeros((5, 4))}, n.params[1]]), ValueError, r"params\[0\] must be a dict with keys \['W', 'b'\]"),
    ],
)
def test_bad_input_errors_name_the_argument_and_change_nothing(call, exc, match):
    net = rn.mlp([4, 5, 3], seed=0)
    snap = _snapshot(net)
    with pytest.raises(exc, match=match):
        call(net)
    assert _unchanged(net, snap)


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: rn.Dense(0, 3), ValueError, "n_in must be >= 1, got 0"),
        (lambda: rn.Dense(3, 2.5), TypeError, "n_out must be an int"),
        (lambda: rn.Dense(3, 2, activation="swish"), ValueError, "activation must be one of"),
        (lambda: rn.Dense(3, 2, activation="leaky_relu", bias="yes"), TypeError, "bias must be a bool"),
        (lambda: rn.get_activation("relu", slope=0.1), ValueError, "takes parameters none"),
        (lambda: rn.Conv2d(1, 2, 3, padding_mode="reflect"), ValueError, "padding_mode must be one of"),
        (lambda: rn.Conv2d(1, 2, (3, 3, 3)), ValueError, "kernel_size must be an int or a pair"),
        (lambda: rn.mlp([4, -1, 2]), ValueError, r"sizes\[1\] must be a positive int"),
        (lambda: rn.mlp([4, 2], init="xavier"), ValueError, "init"),
        (lambda: rn.mlp([4, 2], seed=-3), ValueError, "seed must be a non-negative int"),
        (lambda: rn.mlp([4, 2], dtype=np.int32), TypeError, "dtype must be float64 or float32"),
        (lambda: rn.Network([rn.Conv2d(1, 2, 3)]), ValueError, "in_shape must be given"),
        (lambda: rn.Network([rn.Flatten(), rn.Dense(5, 2)], in_shape=(1, 2, 2)), ValueError, r"layers\[1\] \(Dense\).*got \(4,\)"),
        (lambda: rn.Network([rn.Conv2d(1, 2, 5)], in_shape=(1, 3, 3)), ValueError, "smaller than the kernel"),
    ],
)
def test_bad_construction_errors(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_float32_net_rejects_float64_params():
    net = rn.mlp([3, 2], seed=0, dtype=np.float32)
    with pytest.raises(TypeError, match=r"params\[0\]\['W'\] must have dtype float32"):
        net.with_params([{"W": np.zeros((2, 3)), "b": np.zeros(2, np.float32)}])


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_every_activation_serialises(act, tmp_path):
    net = rn.mlp([3, 4, 2], activation=act, seed=0)
    net.save(tmp_path / "n.npz")
    assert rn.load_network(tmp_path / "n.npz").layers == net.layers


# ------------------------------------------------------------------------------------------------
# one rule for non-finite weights: a pruned entry contributes exactly zero, whatever it stores
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["numpy", "numba"])
@pytest.mark.parametrize("sparsity", [0.3, 0.95])  # the dense-block and the CSR fast paths
@pytest.mark.parametrize("fill", [np.nan, np.inf])
def test_non_finite_stored_at_pruned_entries_never_leaks(engine, sparsity, fill):
    # planted bugs seen failing: effective_param as mask * W (0 * NaN = NaN); Dense calling the
    # masked-product kernel without a second pass on where(mask, W, 0) (its fast path forms mask * W)
    if engine == "numba":
        pytest.importorskip("numba")
    from refnet import jacobian, kernels

    rng = np.random.default_rng(0)
    net = rn.mlp([300, 200, 10], seed=0)
    masks = [{"W": rng.random(p["W"].shape) > sparsity} for p in net.params]
    clean, dirty = net.with_masks(masks), net.with_masks(masks)
    for p, q, m in zip(clean.params, dirty.params, masks):
        p["W"][~m["W"]] = 0.0
        q["W"][~m["W"]] = fill
    x = rng.standard_normal((64, 300))
    y = np.arange(64) % 10
    with kernels.use_engine(engine):
        np.testing.assert_array_equal(dirty.forward(x), clean.forward(x))
        (l1, g1), (l2, g2) = dirty.loss_and_grads(x, y, weight_decay=0.1), clean.loss_and_grads(x, y, weight_decay=0.1)
        assert l1 == l2
        for a, b in zip(g1, g2):
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])
        np.testing.assert_array_equal(jacobian(dirty, x[:3]), jacobian(clean, x[:3]))
    for a, b in zip(dirty.effective_params(), clean.effective_params()):
        np.testing.assert_array_equal(a["W"], b["W"])


def test_non_finite_kept_weights_are_named_with_their_layer():
    # planted bug seen failing: forward returned NaN and the loss said "z must be finite"
    net = rn.mlp([4, 3, 2], seed=0)
    x = np.ones((2, 4))
    for fill, where in ((np.nan, 0), (np.inf, 1)):
        bad = net.copy()
        bad.params[where]["W"][0, 0] = fill
        for call in (lambda: bad.forward(x), lambda: bad.loss_and_grads(x, np.array([0, 1]))):
            with pytest.raises(ValueError, match=rf"params\[{where}\]\['W'\] \(layer {where}, Dense.*non-finite kept"):
                call()
    with pytest.raises(ValueError, match=r"params\[0\]\['W'\].*non-finite kept"):
        rn.Network(net.layers, params=[{"W": np.full((3, 4), np.nan), "b": np.zeros(3)}, net.params[1]])
    pruned = net.with_masks([{"W": np.zeros((3, 4), bool)}, None])
    pruned.params[0]["W"][:] = np.nan
    with pytest.raises(ValueError, match="masks keep non-finite"):
        pruned.with_masks([None, None])  # re-adding NaN entries


def test_arguments_are_not_silently_coerced_or_ignored():
    # planted bugs seen failing: int(6.7) == 6 for in_shape; range(0, n, -1) gave (0.0, 0.0);
    # the activation of an MLP without a hidden layer never checked; (B, 1) labels as a dtype error
    with pytest.raises(TypeError, match=r"in_shape\[0\] must be an int, got float 6.7"):
        rn.Network([rn.layers.Flatten()], in_shape=(6.7,))
    net = rn.mlp([4, 3], seed=0)
    x, y = np.ones((5, 4)), np.arange(5) % 3
    for bs in (0, -1, 2.5):
        with pytest.raises((ValueError, TypeError), match="batch_size"):
            net.evaluate(x, y, batch_size=bs)
        with pytest.raises((ValueError, TypeError), match="batch_size"):
            net.predict(x, batch_size=bs)
    with pytest.raises(ValueError, match="activation must be one of"):
        rn.mlp([4, 3], activation="tanhh")
    with pytest.raises(ValueError, match="output_activation must be one of"):
        rn.mlp([4, 3], output_activation="softmaxx")
    for call in (lambda: net.loss_and_grads(x, y[:, None]), lambda: net.evaluate(x, y[:, None])):
        with pytest.raises(ValueError, match=r"y must be labels of shape \(5,\).*column.*ravel"):
            call()


def test_sizes_too_large_to_allocate_are_refused_up_front():
    # planted bug seen failing: MemoryError from NumPy deep inside the initializer
    with pytest.raises(ValueError, match=r"layers\[0\] Dense\(784, 1000000000\).*would need [\d.]+ TiB"):
        rn.mlp([784, 10**9, 10])


@pytest.mark.parametrize("geom", [((3, 2), (2, 1), (1, 2)), ((5, 5), (1, 1), (0, 0)), ((2, 3), (3, 2), (2, 0))])
def test_col2im_taps_equal_the_scatter_matrix(geom):
    """The tap-by-tap col2im of zero padding (both layouts, and the stack-last form) equals the
    sparse scatter matrix's adjoint, S^T g, the gather's own transpose."""
    kernel, stride, padding = geom
    rng = np.random.default_rng(1)
    B, C, H, W = 3, 2, 7, 6
    S = conv._scatter_matrix(C, H, W, kernel, stride, padding, "zeros")
    P = conv.patch_index(C, H, W, kernel, stride, padding, "zeros").shape[0]
    K = C * kernel[0] * kernel[1]
    g = rng.standard_normal((B, P, K))
    want = (S.T @ g.reshape(B, -1).T).T.reshape(B, C, H, W)
    np.testing.assert_allclose(conv.col2im(g, (B, C, H, W), kernel, stride, padding, "zeros"), want, rtol=0, atol=1e-14)
    kp = np.ascontiguousarray(g.transpose(0, 2, 1))
    np.testing.assert_allclose(conv.col2im(kp, (B, C, H, W), kernel, stride, padding, "zeros", layout="kp"), want, rtol=0, atol=1e-14)
    last = np.ascontiguousarray(g.transpose(2, 1, 0))  # (K, P, B)
    got = conv.col2im_last(last, (C, H, W), kernel, stride, padding)  # (C, H, W, B)
    np.testing.assert_allclose(np.moveaxis(got, -1, 0), want, rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="layout"):
        conv.col2im(g, (B, C, H, W), kernel, stride, padding, "zeros", layout="pkk")
