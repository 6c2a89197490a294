"""BatchNorm1d / BatchNorm2d: every derivative by finite differences and the dot-product test, in
train mode (batch statistics: the derivatives are those of the batch map) and eval mode (running
statistics: per example); the batch Jacobian; running statistics as PyTorch updates them; PyTorch
float64 agreement for the forward map, the input and parameter gradients and training."""

import numpy as np
import pytest
import torch

import refnet as rn
from refnet.jacobians import batch_jacobian
from refnet.layers import BatchNorm1d, BatchNorm2d, Dense
from refnet.network import Network

H = 1e-6

CASES = [
    (BatchNorm1d(4), (4,)),
    (BatchNorm1d(3, activation="tanh", eps=1e-3), (3,)),
    (BatchNorm2d(3), (3, 2, 3)),
    (BatchNorm2d(2, activation="tanh", momentum=0.3), (2, 3, 2)),
    (BatchNorm2d(2, affine=False, activation="softplus"), (2, 2, 2)),
]
MODES = ["train", "eval"]


def _setup(layer, in_shape, mode, rng, B=4):
    """Layer in ``mode``, params with random gamma/beta, random buffers merged in, a random mask
    (one pruned gamma), an input batch, and the forward pass."""
    layer = layer.with_mode(mode)
    params = layer.init(rng, in_shape, None, np.float64)
    params = {k: v + 0.5 * rng.standard_normal(v.shape) for k, v in params.items()}
    mask = {k: np.ones(v.shape, dtype=bool) for k, v in params.items()}
    if "gamma" in mask:
        mask["gamma"][0] = False
    buffers = {"running_mean": rng.standard_normal(in_shape[0]), "running_var": 0.5 + rng.random(in_shape[0])}
    full = {**params, **buffers}
    x = 1.5 * rng.standard_normal((B, *in_shape)) + 0.3
    y, cache = layer.forward(full, x, mask)
    return layer, params, full, mask, x, y, cache


def _ids(case):
    layer, shape = case
    return f"{type(layer).__name__}{shape}{'' if layer.affine else '-noaffine'}-{layer.activation.name}"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_input_derivatives_fd_and_dot_product(case, mode):
    rng = np.random.default_rng(0)
    layer, params, full, mask, x, y, cache = _setup(*case, mode, rng)
    u = rng.standard_normal(x.shape)
    v = rng.standard_normal(y.shape)
    ydot = layer.jvp(full, cache, u, mask)
    gx, _ = layer.vjp(full, cache, v, mask)
    # finite differences of the batch map (train mode: every example moves, the statistics too)
    fd = (layer.forward(full, x + H * u, mask)[0] - layer.forward(full, x - H * u, mask)[0]) / (2 * H)
    np.testing.assert_allclose(fd, ydot, rtol=1e-6, atol=1e-8)
    lhs, rhs = float(np.sum(ydot * v)), float(np.sum(gx * u))
    assert abs(lhs - rhs) <= 1e-13 * np.linalg.norm(ydot) * np.linalg.norm(v) + 1e-15
    if mode == "train":  # a genuine coupling: moving example 0 alone moves the others' outputs
        e = np.zeros_like(x)
        e[0] = u[0]
        assert np.abs(layer.jvp(full, cache, e, mask)[1:]).max() > 1e-3


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_parameter_derivatives_fd_dot_product_and_masks(case, mode):
    layer, shape = case
    if not layer.affine:
        pytest.skip("no parameters")
    rng = np.random.default_rng(1)
    layer, params, full, mask, x, y, cache = _setup(layer, shape, mode, rng)
    v = rng.standard_normal(y.shape)
    dp = {k: rng.standard_normal(p.shape) for k, p in params.items()}
    ydot = layer.jvp(full, cache, np.zeros_like(x), mask, dp)
    _, grads = layer.vjp(full, cache, v, mask)
    lhs = float(np.sum(ydot * v))
    rhs = sum(float(np.sum(grads[k] * dp[k])) for k in dp)
    assert abs(lhs - rhs) <= 1e-13 * np.linalg.norm(ydot) * np.linalg.norm(v)
    plus = {**full, **{k: params[k] + H * dp[k] for k in params}}
    minus = {**full, **{k: params[k] - H * dp[k] for k in params}}
    fd = (layer.forward(plus, x, mask)[0] - layer.forward(minus, x, mask)[0]) / (2 * H)
    np.testing.assert_allclose(fd, ydot, rtol=1e-6, atol=1e-8)
    assert grads["gamma"][0] == 0.0  # pruned: exactly zero
    # dL/dc = (unmasked dL/dtheta_eff) * theta; on kept entries grad * theta
    mg = layer.mask_grads(full, cache, v)
    for k in grads:
        keep = mask[k]
        np.testing.assert_allclose(mg[k][keep], (grads[k] * params[k])[keep], rtol=1e-13, atol=1e-15)
    assert mg["gamma"][0] != 0.0  # the sensitivity of re-adding the pruned gamma


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_batch_jacobian_and_stacked_products(case, mode):
    rng = np.random.default_rng(2)
    layer, params, full, mask, x, y, cache = _setup(*case, mode, rng)
    B, N = x.shape[0], x[0].size
    Jb = layer.batch_jacobian(full, cache, mask)  # (B, N, B, N)
    u = rng.standard_normal(x.shape)
    np.testing.assert_allclose(np.einsum("bian,an->bi", Jb, u.reshape(B, N)),
                               layer.jvp(full, cache, u, mask).reshape(B, N), rtol=1e-12, atol=1e-13)
    # columns by finite differences
    for a, j in [(0, 0), (B - 1, N - 1), (1, N // 2)]:
        e = np.zeros((B, N))
        e[a, j] = 1.0
        e = e.reshape(x.shape)
        fd = (layer.forward(full, x + H * e, mask)[0] - layer.forward(full, x - H * e, mask)[0]) / (2 * H)
        np.testing.assert_allclose(fd.reshape(B, N), Jb[:, :, a, j], rtol=1e-6, atol=1e-8)
    # vjp_many / jvp_many: every stacked vector is one (co)tangent of the batch map
    m = 3
    G = rng.standard_normal((B, m, N))
    V = rng.standard_normal((B, m, N))
    GJ = layer.vjp_many(full, cache, G, mask)
    JV = layer.jvp_many(full, cache, V, mask)
    for k in range(m):
        gx, _ = layer.vjp(full, cache, G[:, k].reshape(y.shape), mask)
        np.testing.assert_allclose(GJ[:, k], gx.reshape(B, N), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(JV[:, k], layer.jvp(full, cache, V[:, k].reshape(x.shape), mask).reshape(B, N),
                                   rtol=1e-12, atol=1e-14)
    if mode == "eval":  # per example: block diagonal, and jacobian() is its diagonal blocks
        J = layer.jacobian(full, cache, mask)
        for b in range(B):
            np.testing.assert_array_equal(J[b], Jb[b, :, b, :])
            for a in range(B):
                if a != b:
                    assert not Jb[b, :, a, :].any()
    else:
        with pytest.raises(ValueError, match="train mode.*batch_jacobian"):
            layer.jacobian(full, cache, mask)


def _torch_bn(layer, params, buffers, training):
    cls = torch.nn.BatchNorm1d if isinstance(layer, BatchNorm1d) else torch.nn.BatchNorm2d
    m = cls(layer.num_features, eps=layer.eps, momentum=layer.momentum, affine=layer.affine).double()
    with torch.no_grad():
        if layer.affine:
            m.weight.copy_(torch.from_numpy(params["gamma"]))
            m.bias.copy_(torch.from_numpy(params["beta"]))
        m.running_mean.copy_(torch.from_numpy(buffers["running_mean"]))
        m.running_var.copy_(torch.from_numpy(buffers["running_var"]))
    m.train(training)
    return m


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES[:4], ids=_ids)
def test_against_pytorch_forward_gradients_and_running_stats(case, mode):
    rng = np.random.default_rng(3)
    layer, params, full, _, x, _, _ = _setup(*case, mode, rng)
    mask = {k: np.ones(v.shape, dtype=bool) for k, v in params.items()}
    y, cache = layer.forward(full, x, mask)
    buffers = {k: full[k] for k in ("running_mean", "running_var")}
    m = _torch_bn(layer, params, buffers, training=mode == "train")
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    act = {"identity": lambda t: t, "tanh": torch.tanh}[layer.activation.name]
    yt = act(m(xt))
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-12, atol=1e-13)
    g = rng.standard_normal(y.shape)
    yt.backward(torch.from_numpy(g))
    gx, grads = layer.vjp(full, cache, g, mask)
    np.testing.assert_allclose(gx, xt.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grads["gamma"], m.weight.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grads["beta"], m.bias.grad.numpy(), rtol=1e-10, atol=1e-12)
    # running statistics after this forward pass: momentum, unbiased batch variance (train mode)
    new = layer.updated_buffers(buffers, cache)
    np.testing.assert_allclose(new["running_mean"], m.running_mean.numpy(), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(new["running_var"], m.running_var.numpy(), rtol=1e-13, atol=1e-15)
    if mode == "train":
        assert not np.allclose(new["running_var"], buffers["running_var"])


def _mlp_bn(seed=0, act="tanh"):
    return Network([Dense(5, 6, bias=False), BatchNorm1d(6, activation=act), Dense(6, 3)], init="lecun", seed=seed)


def test_network_gradients_fd_and_modes():
    rng = np.random.default_rng(4)
    net = _mlp_bn()
    net = net.with_params([{k: v + 0.3 * rng.standard_normal(v.shape) for k, v in p.items()} for p in net.params])
    x = rng.standard_normal((6, 5))
    y = rng.integers(0, 3, 6)
    for mode in MODES:
        n = net.with_mode(mode)
        assert n.mode == mode and n.couples_batch == (mode == "train")
        _, grads = n.loss_and_grads(x, y)
        d = [{k: rng.standard_normal(v.shape) for k, v in p.items()} for p in n.params]
        shift = lambda t: n.with_params([{k: v + t * d[i][k] for k, v in p.items()} for i, p in enumerate(n.params)])
        fd = (shift(H).loss(x, y) - shift(-H).loss(x, y)) / (2 * H)
        an = sum(float(np.sum(grads[i][k] * d[i][k])) for i in range(len(d)) for k in d[i])
        assert abs(fd - an) <= 1e-6 * abs(an) + 1e-9
    # eval mode with fresh running statistics (0, 1): gamma * x / sqrt(1 + eps) + beta
    ev = net.with_mode("eval")
    h = x @ net.params[0]["W"].T
    z = np.tanh(net.params[1]["gamma"] * h / np.sqrt(1 + 1e-5) + net.params[1]["beta"])
    np.testing.assert_allclose(ev.forward(x), z @ net.params[2]["W"].T + net.params[2]["b"], rtol=1e-13)
    assert net.mode == "train" and ev.mode == "eval" and rn.mlp([3, 2]).mode is None


def test_jacobian_refuses_train_mode_and_batch_jacobian_is_block_diagonal_in_eval():
    rng = np.random.default_rng(5)
    net = _mlp_bn()
    x = rng.standard_normal((4, 5))
    for fn in (rn.jacobian, rn.layer_jacobians, rn.jacobian_svd):
        with pytest.raises(ValueError, match=r"layers\[1\] \(BatchNorm1d\) is in mode='train'.*with_mode\('eval'\)"):
            fn(net, x)
    with pytest.raises(ValueError, match="mode='train'"):
        rn.jsv_stats(net, x)
    Jb = batch_jacobian(net, x)  # train mode: defined, and not block diagonal
    assert Jb.shape == (4, 3, 4, 5) and np.abs(Jb[0, :, 1, :]).max() > 1e-3
    ev = net.with_mode("eval")
    J, Jb = rn.jacobian(ev, x), batch_jacobian(ev, x)
    for b in range(4):
        np.testing.assert_allclose(Jb[b, :, b, :], J[b], rtol=1e-13, atol=1e-15)
        assert not Jb[b, :, (b + 1) % 4, :].any()
    assert rn.jsv_stats(ev, x)["mean"] > 0


def test_bad_arguments_and_refusals():
    with pytest.raises(ValueError, match="momentum=None"):
        BatchNorm2d(3, momentum=None)
    with pytest.raises(ValueError, match="mode must be one of"):
        BatchNorm2d(3, mode="inference")
    with pytest.raises(ValueError, match="eps must be > 0"):
        BatchNorm1d(3, eps=0.0)
    with pytest.raises(ValueError, match=r"BatchNorm2d\(3\) needs per-example input shape \(C, H, W\)"):
        BatchNorm2d(3).out_shape((3, 4))
    layer = BatchNorm1d(2)
    p = layer.init(None, (2,), None, np.float64)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer.forward(p, np.ones((1, 2)))
    with pytest.raises(ValueError, match="needs the running statistics.*layer_params"):
        layer.with_mode("eval").forward(p, np.ones((3, 2)))
    with pytest.raises(NotImplementedError, match="second-order"):
        rn.hvp(_mlp_bn().with_mode("eval"), np.ones((2, 5)), np.zeros(2, dtype=int),
               [{k: np.ones_like(v) for k, v in p.items()} for p in _mlp_bn().params])
    net = _mlp_bn()
    with pytest.raises(ValueError, match=r"buffers\[1\] must be a dict with keys"):
        Network(net.layers, params=net.params, buffers=[{}, {}, {}])
    with pytest.raises(ValueError, match=r"running_var'\] must be >= 0"):
        Network(net.layers, params=net.params,
                buffers=[{}, {"running_mean": np.zeros(6), "running_var": -np.ones(6)}, {}])


def test_parameters_are_not_weights():
    """gamma/beta: trained, but not pruned, not decayed, not made isometric, not drawn by the init."""
    rng = np.random.default_rng(6)
    net = _mlp_bn(act="relu")
    for init in ("lecun", "orthogonal"):
        n = Network(net.layers, init=init, seed=0)
        np.testing.assert_array_equal(n.params[1]["gamma"], np.ones(6))
        np.testing.assert_array_equal(n.params[1]["beta"], np.zeros(6))
    # the init draws of the weights do not depend on the batch norm between them
    plain = Network([Dense(5, 6, bias=False), Dense(6, 3)], init="lecun", seed=0)
    np.testing.assert_array_equal(plain.params[1]["W"], net.params[2]["W"])
    x, y = rng.standard_normal((8, 5)), rng.integers(0, 3, 8)
    for scores in (rn.connection_sensitivity(net, x, y), rn.magnitude_scores(net, include_bias=True),
                   rn.random_scores(net, 0, include_bias=True)):
        assert scores[1] == {}
    masks = rn.snip(net, x, y, sparsity=0.5)
    assert masks[1]["gamma"].all() and masks[1]["beta"].all()
    pen, pg = net.weight_decay_penalty(1e-3)
    assert pg[1] == {}
    repaired = rn.approximate_isometry(net.with_masks(masks), steps=5)
    np.testing.assert_array_equal(repaired.params[1]["gamma"], net.params[1]["gamma"])


def test_training_matches_pytorch_sgd_with_running_statistics():
    """Full-batch SGD with momentum for 3 steps (batch order irrelevant): parameters, BN's gamma,
    beta and running statistics equal PyTorch's to 1e-10 (train mode forward, then eval)."""
    rng = np.random.default_rng(7)
    net = _mlp_bn(act="tanh")
    x, y = rng.standard_normal((10, 5)), rng.integers(0, 3, 10)
    tnet = torch.nn.Sequential(torch.nn.Linear(5, 6, bias=False), torch.nn.BatchNorm1d(6), torch.nn.Tanh(),
                               torch.nn.Linear(6, 3)).double()
    with torch.no_grad():
        tnet[0].weight.copy_(torch.from_numpy(net.params[0]["W"]))
        tnet[3].weight.copy_(torch.from_numpy(net.params[2]["W"]))
        tnet[3].bias.copy_(torch.from_numpy(net.params[2]["b"]))
    rn.train(net, x, y, steps=3, lr=0.1, batch_size=10, momentum=0.9, seed=0, progress=False, train_eval_size=0)
    opt = torch.optim.SGD(tnet.parameters(), lr=0.1, momentum=0.9)
    tnet.train()
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(tnet(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        opt.step()
    pairs = [(net.params[0]["W"], tnet[0].weight), (net.params[1]["gamma"], tnet[1].weight),
             (net.params[1]["beta"], tnet[1].bias), (net.buffers[1]["running_mean"], tnet[1].running_mean),
             (net.buffers[1]["running_var"], tnet[1].running_var), (net.params[2]["W"], tnet[3].weight)]
    for a, t in pairs:
        np.testing.assert_allclose(a, t.detach().numpy(), rtol=1e-10, atol=1e-12)
    tnet.eval()
    np.testing.assert_allclose(net.with_mode("eval").forward(x), tnet(torch.from_numpy(x)).detach().numpy(),
                               rtol=1e-10, atol=1e-12)


def test_save_load_round_trip_keeps_buffers_and_mode(tmp_path):
    rng = np.random.default_rng(8)
    net = _mlp_bn().with_mode("eval")
    net.buffers[1]["running_mean"][...] = rng.standard_normal(6)
    net.save(tmp_path / "bn.npz")
    back = rn.load_network(tmp_path / "bn.npz")
    assert back.layers == net.layers and back.mode == "eval"
    np.testing.assert_array_equal(back.buffers[1]["running_mean"], net.buffers[1]["running_mean"])
    x = rng.standard_normal((3, 5))
    np.testing.assert_array_equal(back.forward(x), net.forward(x))
