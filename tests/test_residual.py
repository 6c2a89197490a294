"""Residual composition (a network as a small graph, net.inputs): Add and SubsamplePad by finite
differences and the dot-product test; Jacobians J^{k,l} through shortcuts; Proposition 1 in its
graph and batch-norm forms; random residual/BatchNorm networks (hypothesis) against PyTorch autograd
in float64 (loss, every gradient, input-output Jacobians, SNIP masks); pruning, spectra, isometry,
training and save/load on such networks."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import refnet as rn
from refnet.jacobians import batch_jacobian
from refnet.layers import (Add, AvgPool2d, BatchNorm1d, BatchNorm2d, Conv2d, Dense, Flatten, GlobalAvgPool2d,
                           MaxPool2d, Residual, SubsamplePad, expand_layers)
from refnet.network import Network
from refnet.prop1 import mask_gradients, prop1_gradients, prop1_report

H = 1e-6

# ---------------------------------------------------------------------------------------------
# the PyTorch twin, built by hand from the layer list and the graph
# ---------------------------------------------------------------------------------------------

ACT_T = {
    "identity": lambda t: t,
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "selu": F.selu,
    "elu": F.elu,
    "leaky_relu": lambda t: F.leaky_relu(t, 0.01),
}


def torch_params(net, masks=True):
    """Leaf tensors of ``net.params`` (float64, requires_grad) and the effective (masked) ones."""
    leaves = [{k: torch.tensor(v, requires_grad=True) for k, v in p.items()} for p in net.params]
    eff = [{k: t * torch.from_numpy(net.masks[i][k].astype(np.float64)) if masks else t for k, t in d.items()}
           for i, d in enumerate(leaves)]
    return leaves, eff


def torch_forward(net, P, X):
    """``net``'s forward pass written with torch.nn.functional, node by node on ``net.inputs``."""
    nodes = [X]
    for l, (layer, ins) in enumerate(zip(net.layers, net.inputs)):
        a, p = nodes[ins[0]], P[l]
        act = ACT_T[layer.activation.name] if hasattr(layer, "activation") else None
        if isinstance(layer, Dense):
            out = act(F.linear(a, p["W"], p.get("b")))
        elif isinstance(layer, Conv2d):
            assert layer.padding_mode == "zeros"
            out = act(F.conv2d(a, p["W"], p.get("b"), stride=layer.stride, padding=layer.padding))
        elif isinstance(layer, (BatchNorm1d, BatchNorm2d)):
            b = net.buffers[l]
            out = act(F.batch_norm(a, torch.tensor(b["running_mean"]), torch.tensor(b["running_var"]), p.get("gamma"),
                                   p.get("beta"), training=layer.mode == "train", momentum=layer.momentum, eps=layer.eps))
        elif isinstance(layer, Add):
            s = nodes[ins[0]]
            for j in ins[1:]:
                s = s + nodes[j]
            out = act(s)
        elif isinstance(layer, SubsamplePad):
            s = layer.stride
            out = F.pad(a[:, :, ::s, ::s], (0, 0, 0, 0, *layer.pad_channels))
        elif isinstance(layer, GlobalAvgPool2d):
            out = a.mean(dim=(2, 3))
        elif isinstance(layer, AvgPool2d):
            out = F.avg_pool2d(a, layer.kernel_size)
        elif isinstance(layer, MaxPool2d):
            out = F.max_pool2d(a, layer.kernel_size)
        elif isinstance(layer, Flatten):
            out = a.flatten(1)
        else:  # pragma: no cover
            raise TypeError(type(layer).__name__)
        nodes.append(out)
    return nodes[-1]


def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    scale = np.abs(b).max() if b.size else 0.0
    return float(np.abs(a - b).max() / scale) if scale > 0 else float(np.abs(a - b).max())


# ---------------------------------------------------------------------------------------------
# random residual / batch-norm networks
# ---------------------------------------------------------------------------------------------

ACTS = list(ACT_T)


@st.composite
def resnets(draw, mode=None, masked=False):
    """A random small residual network: stem conv (+ BN), 1-3 blocks with identity, option-A or
    projection (1x1 conv, optional BN) shortcuts and strides 1-2, optional BN in the blocks, a
    GlobalAvgPool2d or Flatten head, Dense (+ optional BatchNorm1d); train or eval mode."""
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    c = draw(st.integers(1, 3))
    Hs, Ws = draw(st.integers(3, 6)), draw(st.integers(3, 6))
    act = draw(st.sampled_from(ACTS))
    k = draw(st.sampled_from([1, 3]))
    c1 = draw(st.integers(1, 4))
    layers = [Conv2d(c, c1, k, padding=k // 2, bias=draw(st.booleans()), activation=act if draw(st.booleans()) else "identity")]
    if draw(st.booleans()):
        layers.append(BatchNorm2d(c1, activation=act))
    c_in, shape = c1, (c1, Hs, Ws)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["identity", "option_a", "projection"]))
        stride = 1 if kind == "identity" else draw(st.integers(1, 2))
        c_out = c_in if kind == "identity" else c_in + (draw(st.integers(0, 3)) if kind == "option_a" else draw(st.integers(-1, 3)))
        c_out = max(1, c_out)
        bn = draw(st.booleans())
        main = [Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=not bn)]
        main += [BatchNorm2d(c_out, activation=act)] if bn else []
        if draw(st.booleans()):
            main += [Conv2d(c_out, c_out, 3, padding=1, bias=not bn, activation="identity" if bn else act)]
            main += [BatchNorm2d(c_out)] if bn else []
        if kind == "identity":
            short = ()
        elif kind == "option_a":
            e = c_out - c_in
            short = (SubsamplePad(stride, (e // 2, e - e // 2)),)
        else:
            short = (Conv2d(c_in, c_out, 1, stride=stride, bias=False),) + ((BatchNorm2d(c_out),) if draw(st.booleans()) else ())
        layers.append(Residual(main, short, draw(st.sampled_from(["identity", act]))))
        c_in = c_out
        shape = Network(layers, in_shape=(c, Hs, Ws)).out_shape
    n_classes = draw(st.integers(2, 4))
    if draw(st.booleans()):
        layers += [GlobalAvgPool2d(), Dense(c_in, n_classes)]
    else:
        layers += [Flatten(), Dense(int(np.prod(shape)), n_classes)]
    if draw(st.booleans()):
        layers.append(BatchNorm1d(n_classes))
    mode = draw(st.sampled_from(["train", "eval"])) if mode is None else mode
    net = Network(layers, in_shape=(c, Hs, Ws), init=draw(st.sampled_from(["lecun", "he", "orthogonal"])), seed=rng)
    net = net.with_mode(mode)
    params = [{key: v + (0.3 * rng.standard_normal(v.shape) if key in ("gamma", "beta", "b") else 0.0) for key, v in p.items()}
              for p in net.params]
    net = net.with_params(params)
    if mode == "eval":
        net.buffers = [{"running_mean": 0.3 * rng.standard_normal(b["running_mean"].shape),
                        "running_var": 0.5 + rng.random(b["running_var"].shape)} if b else {} for b in net.buffers]
    if masked:
        net = net.with_masks([{key: rng.random(v.shape) < 0.7 if key == "W" else None for key, v in p.items()}
                              for p in net.params])
    return net, rng


# ---------------------------------------------------------------------------------------------
# the layers: Add and SubsamplePad
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("act", ["identity", "tanh", "elu"])
def test_add_fd_dot_product_and_jacobian(act):
    rng = np.random.default_rng(0)
    layer = Add(act, n_inputs=3)
    xs = tuple(rng.standard_normal((2, 3, 2)) for _ in range(3))
    y, cache = layer.forward({}, xs)
    us = tuple(rng.standard_normal(x.shape) for x in xs)
    v = rng.standard_normal(y.shape)
    ydot = layer.jvp({}, cache, us)
    fd = (layer.forward({}, tuple(x + H * u for x, u in zip(xs, us)))[0]
          - layer.forward({}, tuple(x - H * u for x, u in zip(xs, us)))[0]) / (2 * H)
    np.testing.assert_allclose(fd, ydot, rtol=1e-6, atol=1e-8)
    gxs, grads = layer.vjp({}, cache, v)
    assert grads == {} and len(gxs) == 3
    lhs, rhs = float(np.sum(ydot * v)), sum(float(np.sum(g * u)) for g, u in zip(gxs, us))
    assert abs(lhs - rhs) <= 1e-13 * np.linalg.norm(ydot) * np.linalg.norm(v)
    J = layer.jacobian({}, cache)  # the Jacobian with respect to each input
    np.testing.assert_allclose(np.einsum("bij,bj->bi", J, us[1].reshape(2, -1)),
                               layer.jvp({}, cache, (None, us[1], None)).reshape(2, -1), rtol=1e-13)
    with pytest.raises(TypeError, match="tuple of 3 inputs"):
        layer.forward({}, xs[0])
    with pytest.raises(ValueError, match="one shape"):
        Add().out_shape(((1, 2), (2, 1)))


@pytest.mark.parametrize("stride,pad,shape", [(2, (2, 2), (2, 5, 4)), (1, (0, 3), (3, 2, 2)), (3, (1, 0), (1, 7, 6))])
def test_subsample_pad_matches_pytorch_and_is_adjoint(stride, pad, shape):
    rng = np.random.default_rng(1)
    layer = SubsamplePad(stride, pad)
    x = rng.standard_normal((2, *shape))
    y, cache = layer.forward({}, x)
    ref = F.pad(torch.from_numpy(x)[:, :, ::stride, ::stride], (0, 0, 0, 0, *pad)).numpy()
    np.testing.assert_array_equal(y, ref)
    assert y.shape[1:] == layer.out_shape(shape)
    u, v = rng.standard_normal(x.shape), rng.standard_normal(y.shape)
    gx, _ = layer.vjp({}, cache, v)
    assert abs(float(np.sum(layer.jvp({}, cache, u) * v)) - float(np.sum(gx * u))) <= 1e-13 * np.linalg.norm(v) * np.linalg.norm(u)
    G = rng.standard_normal((2, 3, y[0].size))
    GJ = layer.vjp_many({}, cache, G)
    for j in range(3):
        np.testing.assert_array_equal(GJ[:, j], layer.vjp({}, cache, G[:, j].reshape(y.shape))[0].reshape(2, -1))
    V = rng.standard_normal((2, 3, x[0].size))
    JV = layer.jvp_many({}, cache, V)
    np.testing.assert_array_equal(JV[:, 1], layer.jvp({}, cache, V[:, 1].reshape(x.shape)).reshape(2, -1))


# ---------------------------------------------------------------------------------------------
# the graph
# ---------------------------------------------------------------------------------------------


def _block_net(mode="eval", act="tanh", seed=0):
    """stem, an identity block, an option-A block, a projection block, head (15 layers)."""
    layers = [Conv2d(2, 3, 3, padding=1, activation=act),
              Residual([Conv2d(3, 3, 3, padding=1, bias=False), BatchNorm2d(3, activation=act), Conv2d(3, 3, 3, padding=1)], (), act),
              Residual([Conv2d(3, 5, 3, stride=2, padding=1, bias=False), BatchNorm2d(5)], [SubsamplePad(2, (1, 1))], act),
              Residual([Conv2d(5, 4, 1, activation=act)], [Conv2d(5, 4, 1, bias=False), BatchNorm2d(4)], "identity"),
              GlobalAvgPool2d(), Dense(4, 3)]
    net = Network(layers, in_shape=(2, 5, 4), init="he", seed=seed).with_mode(mode)
    rng = np.random.default_rng(seed)
    net = net.with_params([{k: v + (0.4 * rng.standard_normal(v.shape) if k != "W" else 0.0) for k, v in p.items()}
                           for p in net.params])
    net.buffers = [{"running_mean": 0.2 * rng.standard_normal(b["running_mean"].shape),
                    "running_var": 0.6 + rng.random(b["running_var"].shape)} if b else {} for b in net.buffers]
    return net


def test_residual_expansion_and_graph():
    net = _block_net()
    names = [type(layer).__name__ for layer in net.layers]
    assert names == ["Conv2d", "Conv2d", "BatchNorm2d", "Conv2d", "Add", "Conv2d", "BatchNorm2d", "SubsamplePad", "Add",
                     "Conv2d", "Conv2d", "BatchNorm2d", "Add", "GlobalAvgPool2d", "Dense"]
    assert net.inputs[4] == (4, 1) and net.inputs[7] == (5,) and net.inputs[8] == (7, 8)
    assert net.inputs[10] == (9,) and net.inputs[12] == (10, 12) and not net.is_chain
    assert sum("W" in p for p in net.params) == 7  # each W^l has its own entry
    layers, inputs = expand_layers([Dense(2, 2), Residual([Dense(2, 2), Residual([Dense(2, 2)])])])
    assert inputs == [(0,), (1,), (2,), (3, 2), (4, 1)]
    assert rn.mlp([3, 4, 2]).is_chain
    assert "Add[tanh] <- x^4, x^1" in net.summary()


def test_bad_graphs_are_refused():
    d = Dense(2, 2)
    with pytest.raises(ValueError, match=r"inputs\[1\] must name earlier nodes"):
        Network([d, d], inputs=[(0,), (2,)])
    with pytest.raises(ValueError, match=r"node 1 \(the output of layers\[0\]\) is read by no layer"):
        Network([d, d], inputs=[(0,), (0,)])
    with pytest.raises(ValueError, match=r"inputs\[1\] must name 2 node"):
        Network([d, Add()], inputs=[(0,), (1,)])
    with pytest.raises(ValueError, match="Add needs inputs of one shape"):
        Network([Dense(2, 3), Add()], inputs=[(0,), (1, 0)])
    with pytest.raises(ValueError, match="inputs must be None when layers holds Residual"):
        Network([Residual([d])], inputs=[(0,)])
    with pytest.raises(ValueError, match="main must hold at least one layer"):
        Residual([])
    with pytest.raises(TypeError, match="Add takes a tuple"):
        Network([d, Add()], inputs=[(0,), (1, 0)]).layers[1].forward({}, np.zeros((1, 2)))


def _forward_from(net, x, k, xk):
    """The output when node ``k`` is replaced by ``xk`` (every other node recomputed from x)."""
    nodes = [xk if k == 0 else net.check_input(x)]
    for l, (layer, ins) in enumerate(zip(net.layers, net.inputs)):
        a = nodes[ins[0]] if len(ins) == 1 else tuple(nodes[j] for j in ins)
        out = layer.forward(net.layer_params(l), a, net.masks[l])[0]
        nodes.append(xk if l + 1 == k else out)
    return nodes


@pytest.mark.parametrize("start,end", [(0, 15), (1, 15), (2, 5), (3, 9), (5, 9), (8, 13), (4, 6), (9, 12)])
def test_jacobian_ranges_through_shortcuts_match_finite_differences(start, end):
    """J^{k,l} = dx^l/dx^k with the nodes that do not depend on x^k held fixed: k = 2, 3 are inside the
    first block's main path (the shortcut does not count), k = 1, 5, 8 feed a block (both paths)."""
    net = _block_net()
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 2, 5, 4))
    J = rn.jacobian(net, x, start, end, mode="reverse")
    np.testing.assert_allclose(rn.jacobian(net, x, start, end, mode="forward"), J, rtol=1e-12, atol=1e-13)
    nodes = _forward_from(net, x, -1, None)
    xk = nodes[start]
    u = rng.standard_normal(xk.shape)
    fd = (_forward_from(net, x, start, xk + H * u)[end] - _forward_from(net, x, start, xk - H * u)[end]) / (2 * H)
    np.testing.assert_allclose(np.einsum("bij,bj->bi", J, u.reshape(2, -1)), fd.reshape(2, -1), rtol=1e-6, atol=1e-8)
    vjp = rn.jacobians.vjp(net, x, np.ones((2, J.shape[1])), start, end)
    np.testing.assert_allclose(vjp, J.sum(axis=1), rtol=1e-12, atol=1e-13)


def test_jacobian_without_a_path_is_zero():
    net = _block_net()
    x = np.random.default_rng(3).standard_normal((2, 2, 5, 4))
    # x^6 is on the second block's main path; x^8 = SubsamplePad(x^5) is its shortcut: no path 6 -> 8
    for mode in ("reverse", "forward"):
        J = rn.jacobian(net, x, 6, 8, mode=mode)
        assert J.shape == (2, 5 * 3 * 2, 5 * 3 * 2) and not J.any()
    assert rn.jacobian(net, x, 5, 8).any()


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_network_gradients_fd_and_dot_product(mode):
    rng = np.random.default_rng(4)
    net = _block_net(mode)
    x = rng.standard_normal((3, 2, 5, 4))
    y = rng.integers(0, 3, 3)
    _, grads = net.loss_and_grads(x, y)
    d = [{k: rng.standard_normal(v.shape) for k, v in p.items()} for p in net.params]
    shift = lambda t: net.with_params([{k: v + t * d[i][k] for k, v in p.items()} for i, p in enumerate(net.params)])
    fd = (shift(H).loss(x, y) - shift(-H).loss(x, y)) / (2 * H)
    an = sum(float(np.sum(grads[i][k] * d[i][k])) for i in range(len(d)) for k in d[i])
    assert abs(fd - an) <= 1e-6 * abs(an) + 1e-9
    out, trace = net.forward(x, return_trace=True)
    v = rng.standard_normal(out.shape)
    u = rng.standard_normal(x.shape)
    g, gx = net.backward(trace, v, return_input_grad=True)
    ydot = net.jvp(trace, u, d)
    lhs = float(np.sum(ydot * v))
    rhs = float(np.sum(gx * u)) + sum(float(np.sum(g[i][k] * d[i][k])) for i in range(len(d)) for k in d[i])
    assert abs(lhs - rhs) <= 1e-12 * (np.linalg.norm(ydot) * np.linalg.norm(v) + np.linalg.norm(gx) * np.linalg.norm(u))
    fd = (net.loss(x + H * u, y) - net.loss(x - H * u, y)) / (2 * H)
    _, eps = rn.get_loss("cross_entropy")(out, y)
    _, gx = net.backward(trace, eps, return_input_grad=True)
    assert abs(fd - float(np.sum(gx * u))) <= 1e-6 * abs(fd) + 1e-9


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_proposition_1_with_residual_paths_and_batch_norm(mode):
    """Form (i) on the graph: dL/dW^l = sum_i (D^l J^{l,K,T} eps^T) x^{in(l),T}, J^{l,K} through every
    path (eval), or the batch Jacobian sum_j J_{ji}^T eps_j (train); batch norm's gamma, beta
    with xhat in the role of x^{in(l)}. Equal to backprop to ~1e-12."""
    rng = np.random.default_rng(5)
    net = _block_net(mode)
    x = rng.standard_normal((3, 2, 5, 4))
    y = rng.integers(0, 3, 3)
    report = prop1_report(net, x, y)
    assert {r["type"] for r in report} == {"Conv2d", "BatchNorm2d", "Dense"}
    assert len(report) == 10
    assert max(r["max_rel_diff"] for r in report) < 1e-12
    text = rn.prop1.format_prop1_report(report)
    assert "BatchNorm2d" in text
    # the train-mode form needs the batch Jacobian: the per-example one would be wrong
    if mode == "train":
        l = 1  # layers[1] reads x^1, its output x^2 runs through a train-mode BatchNorm2d
        with pytest.raises(ValueError, match="mode='train'"):
            rn.jacobian(net, x, l + 1, net.n_layers)
    mg = mask_gradients(net, x, y)
    _, g = net.loss_and_grads(x, y)
    for i, p in enumerate(net.params):
        for k in p:
            np.testing.assert_allclose(mg[i][k], g[i][k] * p[k], rtol=1e-12, atol=1e-16)


def test_proposition_1_linear_form_on_a_linear_graph():
    """Form (ii) on a graph of linear layers with eval-mode batch norm: x^{in(l)} = J^{0,in(l)} x^0 + a."""
    rng = np.random.default_rng(6)
    layers = [Conv2d(1, 2, 3, padding=1), BatchNorm2d(2),
              Residual([Conv2d(2, 3, 3, stride=2, padding=1, bias=False), BatchNorm2d(3)], [SubsamplePad(2, (0, 1))]),
              Residual([Conv2d(3, 3, 1)], [Conv2d(3, 3, 1, bias=False)]), Flatten(), Dense(27, 4), BatchNorm1d(4)]
    net = Network(layers, in_shape=(1, 5, 5), init="lecun", seed=1).with_mode("eval")
    net = net.with_params([{k: v + 0.3 * rng.standard_normal(v.shape) for k, v in p.items()} for p in net.params])
    net.buffers = [{"running_mean": rng.standard_normal(b["running_mean"].shape),
                    "running_var": 0.5 + rng.random(b["running_var"].shape)} if b else {} for b in net.buffers]
    x, y = rng.standard_normal((3, 1, 5, 5)), rng.integers(0, 4, 3)
    lin = prop1_gradients(net, x, y, form="linear")
    _, bp = net.loss_and_grads(x, y)
    for a, b in zip(lin, bp):
        for k in b:
            assert rel(a[k], b[k]) < 1e-11
    with pytest.raises(ValueError, match='form="linear"'):
        prop1_gradients(net.with_mode("train"), x, y, form="linear")


# ---------------------------------------------------------------------------------------------
# against PyTorch autograd, float64
# ---------------------------------------------------------------------------------------------


@settings(max_examples=30)
@given(resnets(masked=None))
def test_random_residual_networks_match_pytorch(net_rng):
    net, rng = net_rng
    if rng.random() < 0.5:
        net = net.with_masks([{k: rng.random(v.shape) < 0.7 if k == "W" else None for k, v in p.items()} for p in net.params])
    B = 3
    x = rng.standard_normal((B, *net.in_shape))
    y = rng.integers(0, net.out_shape[0], B)
    loss, grads = net.loss_and_grads(x, y)
    leaves, eff = torch_params(net)
    X = torch.from_numpy(x)
    lt = F.cross_entropy(torch_forward(net, eff, X), torch.from_numpy(y))
    lt.backward()
    assert abs(loss - lt.item()) <= 1e-10 * abs(lt.item())
    # relative to each gradient's own scale; a gradient that is zero but for rounding (a bias before a
    # train-mode batch norm: its exact gradient is 0, both sides hold sums of rounding errors) is
    # compared with an absolute floor at 1e-11 of the largest gradient (1e-12 was reached by the
    # rounding noise of such a cancelled sum: 1.9e-12 against a largest gradient of 0.28)
    floor = 1e-11 * max(float(np.abs(t.grad.numpy()).max()) for p in leaves for t in p.values())
    for i, p in enumerate(leaves):
        for k, t in p.items():
            ref = t.grad.numpy()
            err = float(np.abs(grads[i][k] - ref).max())
            assert err <= 1e-10 * float(np.abs(ref).max()) + floor, (i, k, type(net.layers[i]).__name__, err)
    # input-output Jacobians: per example in eval mode, of the batch map in train mode
    with torch.no_grad():
        eff0 = [{k: t.detach() for k, t in d.items()} for d in eff]
    Jt = torch.func.jacrev(lambda xb: torch_forward(net, eff0, xb))(X).numpy().reshape(B, net.out_shape[0], B, -1)
    Jb = batch_jacobian(net, x)
    assert rel(Jb, Jt) < 1e-10
    if net.mode != "train":
        J = rn.jacobian(net, x)
        assert rel(J, np.stack([Jt[b, :, b, :] for b in range(B)])) < 1e-10


@settings(max_examples=20)
@given(resnets())
def test_snip_masks_match_pytorch(net_rng):
    net, rng = net_rng
    B = 4
    x = rng.standard_normal((B, *net.in_shape))
    y = rng.integers(0, net.out_shape[0], B)
    leaves, eff = torch_params(net, masks=False)
    F.cross_entropy(torch_forward(net, eff, torch.from_numpy(x)), torch.from_numpy(y)).backward()
    keys = [i for i, p in enumerate(net.params) if "W" in p]
    s = np.concatenate([np.abs(leaves[i]["W"].grad.numpy() * net.params[i]["W"]).ravel() for i in keys])
    kk = round(s.size * 0.5)
    order = np.argsort(-s, kind="stable")
    srt = s[order]
    assume(kk >= s.size or srt[kk - 1] - srt[kk] > 1e-9 * srt[0])  # no near-tie at the cut
    keep = np.zeros(s.size, dtype=bool)
    keep[order[:kk]] = True
    masks = rn.snip(net, x, y, sparsity=0.5, warn=False)
    got = np.concatenate([masks[i]["W"].ravel() for i in keys])
    np.testing.assert_array_equal(got, keep)
    for i, p in enumerate(net.params):  # batch norm's gamma and beta are never pruned
        if "gamma" in p:
            assert masks[i]["gamma"].all() and masks[i]["beta"].all()


# ---------------------------------------------------------------------------------------------
# the algorithms on residual networks
# ---------------------------------------------------------------------------------------------


def test_pruning_spectra_isometry_and_training_on_a_residual_network(tmp_path):
    rng = np.random.default_rng(7)
    net = rn.build("resnet-8-w0.25", (1, 8, 8), 3, init="lecun", seed=0)
    x, y = rng.standard_normal((12, 1, 8, 8)), rng.integers(0, 3, 12)
    for method, scores in [("snip", rn.connection_sensitivity(net, x, y)), ("magnitude", rn.magnitude_scores(net)),
                           ("random", rn.random_scores(net, 0))]:
        masks = rn.prune(net, scores, sparsity=0.6, warn=False)
        kept = sum(int(m["W"].sum()) for m in masks if "W" in m)
        assert kept == round(net.n_weights * 0.4), method
    pruned = net.with_masks(rn.snip(net, x, y, sparsity=0.6, warn=False))
    stats = rn.jsv_stats(pruned.with_mode("eval"), x[:4])
    assert stats["mean"] > 0 and np.isfinite(stats["mean"])
    before = rn.isometry_residuals(pruned)
    repaired = rn.approximate_isometry(pruned, steps=20, lr=0.1)
    assert sum(rn.isometry_residuals(repaired)) < sum(before)
    for p, q, m in zip(pruned.params, repaired.params, pruned.masks):
        for k in p:
            if k != "W":
                np.testing.assert_array_equal(p[k], q[k])  # only the weights move
            else:
                assert not q[k][~m[k]].any() or np.array_equal(q[k][~m[k]], p[k][~m[k]])
    rm_before = [b["running_mean"].copy() for b in repaired.buffers if b]
    hist = rn.train(repaired, x, y, steps=8, lr=0.05, batch_size=6, seed=0, progress=False, X_test=x, y_test=y)
    assert hist.status == "completed" and np.isfinite(hist.train_loss[-1])
    assert any(not np.array_equal(a, b["running_mean"]) for a, b in zip(rm_before, [b for b in repaired.buffers if b]))
    repaired.save(tmp_path / "r.npz")
    back = rn.load_network(tmp_path / "r.npz")
    assert back.inputs == repaired.inputs and back.layers == repaired.layers
    for a, b in zip(back.buffers, repaired.buffers):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    for mode in ("train", "eval"):
        np.testing.assert_array_equal(back.with_mode(mode).forward(x), repaired.with_mode(mode).forward(x))
    with pytest.raises(NotImplementedError, match="second-order"):
        rn.hvp(net.with_mode("eval"), x[:2], y[:2], [{k: np.ones_like(v) for k, v in p.items()} for p in net.params])


def test_collapse_warning_sees_the_shortcut():
    # a residual block whose main-branch layer is fully pruned is still connected through its
    # identity shortcut (planted bug seen failing: the chain rule "any collapsed layer" applied
    # to graphs), while a collapsed layer on the only path disconnects the network
    import warnings

    from refnet.masks import LayerCollapseWarning, warn_collapse

    net = rn.Network([rn.Dense(4, 4, activation="relu"),
                      rn.Residual([rn.Dense(4, 4, activation="relu"), rn.Dense(4, 4)], activation="relu"),
                      rn.Dense(4, 3)], in_shape=(4,), seed=0)
    assert not net.is_chain
    main = [i for i, layer in enumerate(net.layers) if isinstance(layer, rn.Dense)]
    masks = [{k: np.ones_like(v, dtype=bool) for k, v in p.items()} for p in net.params]
    masks[main[1]]["W"][:] = False  # inside the block
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        warn_collapse(net, masks)
    msgs = [str(w.message) for w in rec if issubclass(w.category, LayerCollapseWarning)]
    assert len(msgs) == 1 and "layer collapse" in msgs[0]
    masks[main[1]]["W"][:] = True
    masks[main[-1]]["W"][:] = False  # the output layer: on every path
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        warn_collapse(net, masks)
    assert any("disconnected" in str(w.message) for w in rec)
