"""Exact second order (refnet.second_order, the layers' R-operator rules, the losses' output
Hessians) against independent references.

* ``hvp`` equals central differences of the exact gradient (``loss_and_grads``) along ``v``, and
  ``<u, H v> == <H u, v>`` to 1e-12, on hypothesis MLPs and CNNs (every activation, both losses,
  biases on/off, random masks);
* ``hvp``, ``hessian`` and ``hessian_diag`` equal PyTorch float64 double backward (``to_torch``)
  to 1e-10 relative;
* ``gnvp`` and ``gn_diag`` equal ``sum_i J_i^T H_{L,i} J_i`` built from refnet's explicit
  Jacobians (``refnet.jacobian``) and the explicit output Hessians; for cross-entropy that matrix is
  the Fisher ``E_{c ~ p}[grad l_c grad l_c^T]`` of backprop gradients;
* ``hessian_diag`` / ``gn_diag`` equal the diagonals of the matrices, with and without chunking;
* planted bugs (a dropped phi'' term, a transposed R-op product) are caught.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from netgen import ACTIVATIONS, cnns, mlps, perturb_biases, random_masks

import refnet as rn
from refnet import layers as L
from refnet import losses
from refnet import second_order as so

LOSSES = ["cross_entropy", "mse"]
H_FD = 1e-5
FD_RTOL = 1e-6
SYM_TOL = 1e-12
TORCH_RTOL = 1e-10

#: points where phi' or phi'' jumps; a finite difference that straddles one is meaningless
KINKS = {"relu": [0.0], "leaky_relu": [0.0], "selu": [0.0], "elu": [0.0], "hard_tanh": [-1.0, 1.0]}


def _tree(net, rng):
    return [{k: rng.standard_normal(a.shape) for k, a in p.items()} for p in net.params]


def _vec(net, tree):
    return so.params_to_vector(net, tree)


def _targets(net, rng, B, loss):
    C = net.out_shape[0]
    return rng.integers(0, C, size=B) if loss == "cross_entropy" else rng.standard_normal((B, C))


def _shift(net, d, t):
    return net.with_params([{k: a + t * d[i][k] for k, a in p.items()} for i, p in enumerate(net.params)])


def _pieces(net, x):
    _, trace = net.forward(x, return_trace=True)
    out = []
    for layer, cache in zip(net.layers, trace.caches):
        for k in KINKS.get(getattr(getattr(layer, "activation", None), "name", ""), []):
            out.append(np.sign(cache["h"] - k))
        if isinstance(layer, rn.MaxPool2d):
            out.append(cache["arg"])
    return out


def _same(a, b):
    return all(np.array_equal(p, q) for p, q in zip(a, b))


def check_hvp(net, rng, loss, B=3, tries=100):
    """hvp against central differences of the exact gradient along v (drawn so that the +-h
    points stay on the base point's smooth piece) and the symmetry <u, H v> == <H u, v>."""
    for _ in range(tries):
        x = rng.standard_normal((B, *net.in_shape))
        y = _targets(net, rng, B, loss)
        v, u = _tree(net, rng), _tree(net, rng)
        plus, minus = _shift(net, v, H_FD), _shift(net, v, -H_FD)
        base = _pieces(net, x)
        if _same(base, _pieces(plus, x)) and _same(base, _pieces(minus, x)):
            break
    else:
        pytest.skip("no smooth draw found")
    value, grads, hv = so.loss_grads_and_hvp(net, x, y, v, loss)
    ref_value, ref_grads = net.loss_and_grads(x, y, loss)
    assert value == ref_value
    np.testing.assert_allclose(_vec(net, grads), _vec(net, ref_grads), rtol=0, atol=1e-15 * (1 + np.abs(_vec(net, ref_grads)).max()))
    hv = _vec(net, hv)
    np.testing.assert_array_equal(hv, _vec(net, so.hvp(net, x, y, v, loss)))
    fd = (_vec(net, plus.loss_and_grads(x, y, loss)[1]) - _vec(net, minus.loss_and_grads(x, y, loss)[1])) / (2 * H_FD)
    g_scale = max(1.0, float(np.abs(_vec(net, grads)).max(initial=0.0)))
    err = np.abs(fd - hv).max(initial=0.0)
    assert err <= FD_RTOL * np.abs(hv).max(initial=0.0) + 1e-9 * g_scale, err
    # pruned entries: zero in H v, and v there does not matter
    kept = _vec(net, [{k: m[k].astype(float) for k in m} for m in net.masks]) != 0
    assert np.all(hv[~kept] == 0)
    v2 = [{k: np.where(net.masks[i][k], a, 7.0) for k, a in d.items()} for i, d in enumerate(v)]
    np.testing.assert_allclose(_vec(net, so.hvp(net, x, y, v2, loss)), hv, rtol=0, atol=1e-14 * (1 + np.abs(hv).max(initial=0)))
    # symmetry
    hu = _vec(net, so.hvp(net, x, y, u, loss))
    uv, vv = _vec(net, u), _vec(net, v)
    lhs, rhs = float(uv @ hv), float(hu @ vv)
    scale = np.linalg.norm(uv) * np.linalg.norm(hv) + np.linalg.norm(hu) * np.linalg.norm(vv)
    assert abs(lhs - rhs) <= SYM_TOL * scale + 1e-300, (lhs, rhs, scale)


# -------------------------------------------------------------------------------------------
# finite differences and symmetry on random networks
# -------------------------------------------------------------------------------------------


@settings(max_examples=50)
@given(mlps(max_depth=4, max_width=12), st.sampled_from(LOSSES))
def test_mlp_hvp_matches_finite_differences_and_is_symmetric(net_rng, loss):
    net, rng = net_rng
    check_hvp(net, rng, loss)


@settings(max_examples=30)
@given(cnns(), st.sampled_from(LOSSES))
def test_cnn_hvp_matches_finite_differences_and_is_symmetric(net_rng, loss):
    net, rng = net_rng
    check_hvp(net, rng, loss, B=2)


def _small_net(act, seed, masked=True, bias=True, sizes=(4, 5, 5, 3)):
    rng = np.random.default_rng(seed)
    net = rn.mlp(list(sizes), activation=act, seed=rng, bias=bias)
    if bias:
        net = perturb_biases(net, rng)
    if masked:
        net = net.with_masks(random_masks(net, rng, 0.7))
    return net, rng


def _small_cnn(act, seed, masked=True):
    rng = np.random.default_rng(seed)
    layers = [
        rn.Conv2d(2, 2, 3, padding=1, padding_mode="circular", activation=act),
        rn.MaxPool2d(2),
        rn.Conv2d(2, 2, 2, stride=1, activation=act),
        rn.AvgPool2d(1),
        rn.Flatten(),
        rn.Dense(8, 4, activation=act),
        rn.Dense(4, 3),
    ]
    net = perturb_biases(rn.Network(layers, in_shape=(2, 6, 6), seed=rng), rng)  # 83 parameters
    if masked:
        net = net.with_masks(random_masks(net, rng, 0.7))
    return net, rng


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_every_activation_and_loss(act, loss):
    net, rng = _small_net(act, 1)
    check_hvp(net, rng, loss)
    x = rng.standard_normal((3, 4))
    y = _targets(net, rng, 3, loss)
    H = so.hessian(net, x, y, loss)
    assert H.shape == (net.n_params, net.n_params)
    np.testing.assert_allclose(H, H.T, rtol=0, atol=SYM_TOL * np.abs(H).max())
    d = _vec(net, so.hessian_diag(net, x, y, loss))
    np.testing.assert_allclose(d, np.diag(H), rtol=0, atol=SYM_TOL * np.abs(H).max())


def test_global_avg_pool_cnn_and_probability_targets():
    rng = np.random.default_rng(5)
    layers = [rn.Conv2d(1, 3, 2, stride=2, activation="softplus"), rn.GlobalAvgPool2d(), rn.Dense(3, 3, activation="tanh")]
    net = perturb_biases(rn.Network(layers, in_shape=(1, 4, 5), seed=rng), rng)
    check_hvp(net, rng, "cross_entropy")
    x = rng.standard_normal((2, 1, 4, 5))
    t = rng.random((2, 3))  # probability targets that do not sum to 1 (s_i != 1)
    v = _tree(net, rng)
    plus, minus = _shift(net, v, H_FD), _shift(net, v, -H_FD)
    fd = (_vec(net, plus.loss_and_grads(x, t)[1]) - _vec(net, minus.loss_and_grads(x, t)[1])) / (2 * H_FD)
    hv = _vec(net, so.hvp(net, x, t, v))
    np.testing.assert_allclose(hv, fd, rtol=0, atol=FD_RTOL * np.abs(hv).max() + 1e-9)
    H = so.hessian(net, x, t)
    np.testing.assert_allclose(_vec(net, so.hessian_diag(net, x, t)), np.diag(H), rtol=0, atol=SYM_TOL * np.abs(H).max())


# -------------------------------------------------------------------------------------------
# PyTorch float64 double backward
# -------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """PyTorch on one thread while these tiny models run (its default pool, on a busy machine,
    makes each op ~100x slower); restored afterwards."""
    try:
        import torch
    except ImportError:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _torch_setup(net, x, y, loss, temperature=1.0):
    """The loss of ``to_torch(net)`` and its parameters in refnet's flat order."""
    torch = pytest.importorskip("torch")
    from refnet.audit import to_torch

    model = to_torch(net)
    params = []
    for mod in model.modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            for name in ("weight", "bias"):
                p = getattr(mod, name + "_orig", None)
                params.append(getattr(mod, name) if p is None else p)
    params = [p for p in params if p is not None]
    out = model(torch.from_numpy(x)) / temperature
    if loss == "cross_entropy":
        value = torch.nn.functional.cross_entropy(out, torch.from_numpy(y))
    else:
        value = torch.nn.functional.mse_loss(out, torch.from_numpy(y))
    return torch, value, params


def torch_hvp(net, x, y, v, loss, temperature=1.0):
    torch, value, params = _torch_setup(net, x, y, loss, temperature)
    g = torch.autograd.grad(value, params, create_graph=True)
    flat_v = torch.from_numpy(_vec(net, v))
    gv = torch.cat([gi.reshape(-1) for gi in g]) @ flat_v
    return np.concatenate([h.reshape(-1).detach().numpy() for h in torch.autograd.grad(gv, params)])


def torch_hessian(net, x, y, loss):
    torch, value, params = _torch_setup(net, x, y, loss)
    g = torch.cat([gi.reshape(-1) for gi in torch.autograd.grad(value, params, create_graph=True)])
    eye = torch.eye(g.numel(), dtype=g.dtype)
    rows = torch.autograd.grad(g, params, grad_outputs=eye, is_grads_batched=True, allow_unused=True)  # row j: d g_j / d theta
    return np.concatenate(
        [(torch.zeros((g.numel(), *p.shape), dtype=g.dtype) if r is None else r).reshape(g.numel(), -1).detach().numpy()
         for r, p in zip(rows, params)],
        axis=1,
    )


def _rel(a, b):
    return float(np.abs(a - b).max()) / max(float(np.abs(b).max()), 1e-300)


TORCH_ACTS = [a for a in ACTIVATIONS if a != "erf"]  # torch.nn has no erf module (to_torch refuses)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("act", TORCH_ACTS)
def test_hvp_hessian_and_diag_match_torch_double_backward_mlp(act, loss):
    net, rng = _small_net(act, 2)
    x = rng.standard_normal((4, 4))
    y = _targets(net, rng, 4, loss)
    v = _tree(net, rng)
    assert _rel(_vec(net, so.hvp(net, x, y, v, loss)), torch_hvp(net, x, y, v, loss)) <= TORCH_RTOL
    Ht = torch_hessian(net, x, y, loss)
    assert _rel(so.hessian(net, x, y, loss), Ht) <= TORCH_RTOL
    assert _rel(_vec(net, so.hessian_diag(net, x, y, loss)), np.diag(Ht)) <= TORCH_RTOL


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("act", ["tanh", "relu", "selu", "sigmoid", "softplus", "leaky_relu"])
def test_hvp_hessian_and_diag_match_torch_double_backward_cnn(act, loss):
    net, rng = _small_cnn(act, 3)
    x = rng.standard_normal((2, 2, 6, 6))
    y = _targets(net, rng, 2, loss)
    v = _tree(net, rng)
    assert _rel(_vec(net, so.hvp(net, x, y, v, loss)), torch_hvp(net, x, y, v, loss)) <= TORCH_RTOL
    Ht = torch_hessian(net, x, y, loss)
    assert _rel(so.hessian(net, x, y, loss), Ht) <= TORCH_RTOL
    assert _rel(_vec(net, so.hessian_diag(net, x, y, loss)), np.diag(Ht)) <= TORCH_RTOL


def test_temperature_matches_torch():
    net, rng = _small_cnn("tanh", 4)
    x = rng.standard_normal((3, 2, 6, 6))
    y = rng.integers(0, 3, 3)
    v = _tree(net, rng)
    for T in (0.5, 200.0):
        assert _rel(_vec(net, so.hvp(net, x, y, v, temperature=T)), torch_hvp(net, x, y, v, "cross_entropy", T)) <= TORCH_RTOL
    np.testing.assert_array_equal(_vec(net, so.hvp(net, x, y, v, temperature=1.0)), _vec(net, so.hvp(net, x, y, v)))


# -------------------------------------------------------------------------------------------
# Gauss-Newton: J^T H_L J from explicit Jacobians
# -------------------------------------------------------------------------------------------


def param_jacobian(net, x):
    """``dz/dtheta`` ``(B, C, n)`` from the explicit Jacobians ``J^{l,K}`` of refnet.jacobian and
    each layer's ``dx^l/dtheta^l`` (Dense: ``D_a x_b``; Conv2d: ``D_{o,p} cols_{p,k}``), masked."""
    _, trace = net.forward(x, return_trace=True)
    B, C, K = x.shape[0], net.out_shape[0], net.n_layers
    blocks = []
    for l, (layer, cache, mask) in enumerate(zip(net.layers, trace.caches, net.masks)):
        if not layer.keys:
            continue
        n_out = int(np.prod(net.shapes[l + 1]))
        J = np.broadcast_to(np.eye(C), (B, C, C)) if l + 1 == K else rn.jacobian(net, x, start=l + 1, end=K)
        JD = J * cache["D"].reshape(B, 1, n_out)  # (B, C, n_out): dz/dh^l
        if isinstance(layer, rn.Dense):
            jW = JD[:, :, :, None] * cache["x"][:, None, None, :]  # (B, C, n_out, n_in)
            jb = JD
        else:
            cols = cache["cols"]  # (B, P, Kf)
            JDr = JD.reshape(B, C, layer.c_out, -1)  # (B, C, c_out, P)
            jW = np.einsum("bcop,bpk->bcok", JDr, cols)
            jb = JDr.sum(axis=3)
        blocks.append((jW * mask["W"].reshape(1, 1, *jW.shape[2:])).reshape(B, C, -1))
        if "b" in mask:
            blocks.append(jb * mask["b"])
    return np.concatenate(blocks, axis=2)


def _gn_case(kind, act, loss, seed):
    net, rng = _small_net(act, seed) if kind == "mlp" else _small_cnn(act, seed)
    x = rng.standard_normal((3, *net.in_shape))
    return net, rng, x, _targets(net, rng, 3, loss)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("loss", LOSSES)
def test_gnvp_and_gn_diag_equal_jt_hl_j(kind, loss):
    net, rng, x, y = _gn_case(kind, "tanh", loss, 6)
    Jp = param_jacobian(net, x)  # (B, C, n)
    HL = losses.output_hessian(loss, net.forward(x), y)  # (B, C, C)
    G = np.einsum("bci,bcd,bdj->ij", Jp, HL, Jp)
    v = _tree(net, rng)
    gv = _vec(net, so.gnvp(net, x, y, v, loss))
    np.testing.assert_allclose(gv, G @ _vec(net, v), rtol=0, atol=SYM_TOL * np.abs(G).max() * np.abs(_vec(net, v)).sum())
    np.testing.assert_allclose(_vec(net, so.gn_diag(net, x, y, loss)), np.diag(G), rtol=0, atol=SYM_TOL * np.abs(G).max())
    assert np.all(np.linalg.eigvalsh(G) >= -1e-12 * np.abs(G).max())  # positive semi-definite


def test_gauss_newton_of_cross_entropy_is_the_fisher():
    """``G = (1/B) sum_i E_{c ~ p_i}[grad l_i(c) grad l_i(c)^T]`` with backprop gradients of one
    example's loss at each label ``c``."""
    net, rng = _small_net("tanh", 7)
    x = rng.standard_normal((3, 4))
    p = losses.softmax(net.forward(x))
    n, B, C = net.n_params, 3, 3
    F = np.zeros((n, n))
    for i in range(B):
        for c in range(C):
            g = _vec(net, net.loss_and_grads(x[i : i + 1], np.array([c]))[1])
            F += p[i, c] * np.outer(g, g) / B
    G = np.stack([_vec(net, so.gnvp(net, x, np.zeros(B, int), so.vector_to_params(net, e))) for e in np.eye(n)], axis=1)
    np.testing.assert_allclose(G, F, rtol=0, atol=SYM_TOL * np.abs(F).max())


@pytest.mark.parametrize("loss", LOSSES)
def test_one_linear_layer_hessian_is_gauss_newton(loss):
    net, rng = _small_net("identity", 8, sizes=(4, 3))
    x = rng.standard_normal((5, 4))
    y = _targets(net, rng, 5, loss)
    H = so.hessian(net, x, y, loss)
    G = np.stack([_vec(net, so.gnvp(net, x, y, so.vector_to_params(net, e), loss)) for e in np.eye(net.n_params)], axis=1)
    np.testing.assert_allclose(H, G, rtol=0, atol=SYM_TOL * np.abs(G).max())


# -------------------------------------------------------------------------------------------
# diagonals: hypothesis networks, chunking, budgets
# -------------------------------------------------------------------------------------------


@settings(max_examples=25)
@given(st.one_of(mlps(max_depth=3, max_width=8), cnns()), st.sampled_from(LOSSES))
def test_hessian_diag_is_the_diagonal_of_the_hessian(net_rng, loss):
    net, rng = net_rng
    x = rng.standard_normal((2, *net.in_shape))
    y = _targets(net, rng, 2, loss)
    H = so.hessian(net, x, y, loss)
    scale = max(np.abs(H).max(initial=0.0), 1e-300)
    np.testing.assert_allclose(_vec(net, so.hessian_diag(net, x, y, loss)), np.diag(H), rtol=0, atol=SYM_TOL * scale)
    G = np.stack([_vec(net, so.gnvp(net, x, y, so.vector_to_params(net, e), loss)) for e in np.eye(net.n_params)], axis=1)
    np.testing.assert_allclose(_vec(net, so.gn_diag(net, x, y, loss)), np.diag(G), rtol=0, atol=SYM_TOL * max(np.abs(G).max(initial=0.0), 1e-300))


def test_diagonals_in_chunks_of_examples():
    net, rng = _small_net("tanh", 9)
    x = rng.standard_normal((7, 4))
    y = rng.integers(0, 3, 7)
    whole = _vec(net, so.hessian_diag(net, x, y))
    per_example = 3 * 5 + (3 + 5 + 5) * 5  # rows x widths, the largest layer (see _factor_rows)
    for limit in (per_example, 3 * per_example):
        np.testing.assert_allclose(_vec(net, so.hessian_diag(net, x, y, max_elements=limit)), whole, rtol=1e-13, atol=1e-16)
    np.testing.assert_allclose(_vec(net, so.gn_diag(net, x, y, max_elements=15)), _vec(net, so.gn_diag(net, x, y)), rtol=1e-13, atol=1e-16)
    with pytest.raises(ValueError, match="max_elements=10"):
        so.hessian_diag(net, x, y, max_elements=10)


def test_hessian_refuses_sizes_over_the_budget_and_bad_arguments():
    net, rng = _small_net("tanh", 10)
    x = rng.standard_normal((2, 4))
    y = np.array([0, 1])
    with pytest.raises(ValueError, match="max_elements=100"):
        so.hessian(net, x, y, max_elements=100)
    with pytest.raises(ValueError, match="v\\[0\\]"):
        so.hvp(net, x, y, [{"W": np.zeros((5, 4)), "c": np.zeros(3)}, {}, {}])
    with pytest.raises(ValueError, match="shape"):
        so.hvp(net, x, y, [{"W": np.zeros((4, 5))}, {}, {}])
    with pytest.raises(ValueError, match="loss"):
        so.hvp(net, x, y, _tree(net, rng), loss=lambda z, t: (0.0, z))
    with pytest.raises(ValueError, match="temperature"):
        so.gnvp(net, x, y, _tree(net, rng), temperature=0.0)
    with pytest.raises(TypeError, match="net"):
        so.hessian_diag("net", x, y)


def test_flat_order_round_trip():
    net, rng = _small_cnn("tanh", 11)
    t = _tree(net, rng)
    v = so.params_to_vector(net, t)
    assert v.shape == (net.n_params,)
    assert v[: t[0]["W"].size].tolist() == t[0]["W"].ravel().tolist()  # layer 0 W first, C order
    assert v[t[0]["W"].size : t[0]["W"].size + t[0]["b"].size].tolist() == t[0]["b"].tolist()  # then layer 0 b
    back = so.vector_to_params(net, v)
    assert all(np.array_equal(back[i][k], t[i][k]) for i in range(len(t)) for k in t[i])


# -------------------------------------------------------------------------------------------
# planted bugs
# -------------------------------------------------------------------------------------------


def test_planted_dropped_phi_second_derivative_is_caught(monkeypatch):
    net, rng = _small_net("tanh", 12, masked=False)
    check_hvp(net, np.random.default_rng(0), "cross_entropy")  # clean
    x = rng.standard_normal((3, 4))
    y = rng.integers(0, 3, 3)
    v = _tree(net, rng)
    clean_torch = torch_hvp(net, x, y, v, "cross_entropy")
    monkeypatch.setattr(L.Affine, "_residual", lambda self, cache, g, h_dot=None: None)
    with pytest.raises(AssertionError):
        check_hvp(net, np.random.default_rng(0), "cross_entropy")
    assert _rel(_vec(net, so.hvp(net, x, y, v)), clean_torch) > 1e-3
    H = torch_hessian(net, x, y, "cross_entropy")
    assert _rel(_vec(net, so.hessian_diag(net, x, y)), np.diag(H)) > 1e-3


def test_planted_transposed_rop_product_is_caught(monkeypatch):
    net, _ = _small_net("tanh", 13, masked=False, sizes=(4, 5, 5, 3))
    check_hvp(net, np.random.default_rng(1), "mse")  # clean
    clean = L.Dense.rop_forward

    def transposed(self, params, cache, x_dot, mask=None, dparams=None):
        # R{h} = x V_W (instead of x V_W^T) in the square hidden layer
        if dparams and "W" in dparams and dparams["W"].shape[0] == dparams["W"].shape[1]:
            dparams = {**dparams, "W": dparams["W"].T}
        return clean(self, params, cache, x_dot, mask, dparams)

    monkeypatch.setattr(L.Dense, "rop_forward", transposed)
    with pytest.raises(AssertionError):
        check_hvp(net, np.random.default_rng(1), "mse")


def test_float32_stays_float32_and_agrees_with_float64():
    net, rng = _small_cnn("tanh", 14)
    n32 = net.astype(np.float32)
    x = rng.standard_normal((2, 2, 6, 6))
    y = rng.integers(0, 3, 2)
    v = _tree(net, rng)
    for fn in (so.hvp, so.gnvp):
        a, b = fn(net, x, y, v), fn(n32, x, y, v)
        assert all(d[k].dtype == np.float32 for d in b for k in d)
        assert _rel(_vec(n32, b).astype(np.float64), _vec(net, a)) <= 1e-4
    for fn in (so.hessian_diag, so.gn_diag):
        b = fn(n32, x, y)
        assert all(d[k].dtype == np.float32 for d in b for k in d)
        assert _rel(_vec(n32, b).astype(np.float64), _vec(net, fn(net, x, y))) <= 1e-4


def test_a_layer_with_parameters_must_define_its_second_order_rules():
    class Scale(L.Layer):
        keys = ("W",)

        def out_shape(self, in_shape):
            return in_shape

    layer, p, c = Scale(), {"W": np.ones(2)}, {"x": np.ones((1, 2))}
    for call in (
        lambda: layer.rop_forward(p, c, None),
        lambda: layer.rop_backward(p, c, {}, np.ones((1, 2)), np.ones((1, 2))),
        lambda: layer.hessian_diag_backward(p, c, np.ones((1, 1, 2)), np.ones((1, 1))),
    ):
        with pytest.raises(NotImplementedError, match="Scale has parameters"):
            call()
