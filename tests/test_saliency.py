"""Second-order saliency (refnet.saliency): GraSP against independent PyTorch float64 replicas of
Synaptic-Flow's and the GraSP paper's code, OBD against its definition and the exact loss change
of a quadratic, layer-wise OBS against the classic single-weight OBS formula, sequential OBS with
inverse downdates, and the optimality of the compensating update."""

import numpy as np
import pytest
from netgen import perturb_biases, random_masks

import refnet as rn
from refnet import saliency as sal
from refnet import second_order as so

RTOL = 1e-10


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """PyTorch on one thread for these tiny models (restored afterwards)."""
    try:
        import torch
    except ImportError:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _rel(a, b):
    return float(np.abs(a - b).max()) / max(float(np.abs(b).max()), 1e-300)


def _mlp(seed, act="tanh", masked=True):
    rng = np.random.default_rng(seed)
    net = perturb_biases(rn.mlp([6, 5, 4, 3], activation=act, seed=rng), rng)
    if masked:
        net = net.with_masks(random_masks(net, rng, 0.7))
    return net, rng


def _cnn(seed, masked=True):
    rng = np.random.default_rng(seed)
    layers = [rn.Conv2d(2, 3, 3, padding=1, activation="tanh"), rn.MaxPool2d(2), rn.Flatten(), rn.Dense(12, 3, activation="sigmoid"), rn.Dense(3, 3)]
    net = perturb_biases(rn.Network(layers, in_shape=(2, 4, 4), seed=rng), rng)
    if masked:
        net = net.with_masks(random_masks(net, rng, 0.7))
    return net, rng


def _flat_W(scores):
    return np.concatenate([s["W"].ravel() for s in scores if s])


# -------------------------------------------------------------------------------------------
# GraSP
# -------------------------------------------------------------------------------------------


def _torch_weights(torch, model):
    """The (stored) weight tensors of the Linear/Conv2d modules: ``weight_orig`` when pruned."""
    out = []
    for mod in model.modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            w = getattr(mod, "weight_orig", None)
            out.append(mod.weight if w is None else w)
    return out


def synflow_grasp(net, x, y, T):
    """Synaptic-Flow's ``Pruners.pruners.GraSP.score`` (one batch), float64, on ``to_torch(net)``."""
    torch = pytest.importorskip("torch")
    from refnet.audit import to_torch

    model = to_torch(net)
    weights = _torch_weights(torch, model)
    data, target = torch.from_numpy(x), torch.from_numpy(y)
    L = torch.nn.functional.cross_entropy(model(data) / T, target)
    stopped = torch.cat([g.reshape(-1) for g in torch.autograd.grad(L, weights)])
    L = torch.nn.functional.cross_entropy(model(data) / T, target)
    grads = torch.autograd.grad(L, weights, create_graph=True)
    gnorm = (stopped * torch.cat([g.reshape(-1) for g in grads])).sum()
    Hg = torch.autograd.grad(gnorm, weights)
    scores = [(h * w.data).detach() for h, w in zip(Hg, weights)]  # "Hg * theta"
    norm = torch.abs(torch.sum(torch.cat([s.reshape(-1) for s in scores]))) + 1e-10
    return np.concatenate([(s / norm).reshape(-1).numpy() for s in scores])


def paper_grasp(net, x, y, T):
    """The GraSP paper's code (alecwangcq/GraSP ``pruner/GraSP.py``, one iteration: the batch in two
    halves, ``grad_w`` summed over them, ``z.backward()`` per half), float64, no re-init."""
    torch = pytest.importorskip("torch")
    from refnet.audit import to_torch

    model = to_torch(net)
    weights = _torch_weights(torch, model)
    X, Y = torch.from_numpy(x), torch.from_numpy(y)
    N = X.shape[0]
    halves = [(X[: N // 2], Y[: N // 2]), (X[N // 2 :], Y[N // 2 :])]
    grad_w = None
    for xi, yi in halves:
        g = torch.autograd.grad(torch.nn.functional.cross_entropy(model(xi) / T, yi), weights)
        grad_w = list(g) if grad_w is None else [a + b for a, b in zip(grad_w, g)]
    acc = [torch.zeros_like(w) for w in weights]
    for xi, yi in halves:
        grad_f = torch.autograd.grad(torch.nn.functional.cross_entropy(model(xi) / T, yi), weights, create_graph=True)
        z = sum((gw.data * gf).sum() for gw, gf in zip(grad_w, grad_f))
        acc = [a + h for a, h in zip(acc, torch.autograd.grad(z, weights))]
    scores = [-w.data * h for w, h in zip(weights, acc)]  # -theta_q Hg
    all_scores = torch.cat([s.reshape(-1) for s in scores])
    norm = torch.abs(torch.sum(all_scores)) + 1e-10
    return (all_scores / norm).numpy(), all_scores.numpy()


@pytest.mark.parametrize("T", [200.0, 1.0])
@pytest.mark.parametrize("make", [_mlp, _cnn])
def test_grasp_matches_synaptic_flow_and_the_paper_code(make, T):
    net, rng = make(1)
    x = rng.standard_normal((6, *net.in_shape))
    y = rng.integers(0, 3, 6)
    s = sal.grasp_scores(net, x, y, temperature=T)  # convention="synflow"
    assert _rel(_flat_W(s), synflow_grasp(net, x, y, T)) <= RTOL
    p = sal.grasp_scores(net, x, y, temperature=T, convention="paper")
    assert np.array_equal(_flat_W(p), -_flat_W(s))
    # the paper's code sums g and H g over two half batches: 4 x (-w H g) of the mean loss, and its
    # 1e-10 in the normaliser then weighs a quarter as much, so compare before normalising and
    # normalise alike
    ref, ref_raw = paper_grasp(net, x, y, T)
    raw = 4.0 * _flat_W(sal.grasp_scores(net, x, y, temperature=T, convention="paper", normalize=False))
    assert _rel(raw, ref_raw) <= RTOL
    assert _rel(raw / (abs(raw.sum()) + 1e-10), ref) <= RTOL
    assert _rel(_flat_W(p), ref) <= 1e-10 + 3e-10 / abs(raw.sum())  # the normaliser's 1e-10 alone
    assert all(np.all(si["W"][~m["W"]] == 0) for si, m in zip(s, net.masks) if si)
    assert [sorted(si) for si in s] == [["W"] if layer.keys else [] for layer in net.layers]


def test_grasp_unnormalised_is_w_times_hessian_times_weight_gradient():
    net, rng = _mlp(2, masked=False)
    x = rng.standard_normal((5, 6))
    y = rng.integers(0, 3, 5)
    T = 3.0
    out, trace = net.forward(x, return_trace=True)
    _, eps = rn.cross_entropy(out / T, y)
    g = net.backward(trace, eps / T)
    Hg = so.hvp(net, x, y, [{"W": gi["W"]} for gi in g], temperature=T)
    s = sal.grasp_scores(net, x, y, temperature=T, normalize=False)
    for si, p, h in zip(s, net.params, Hg):
        np.testing.assert_array_equal(si["W"], p["W"] * h["W"])
    # the bias part of the gradient is not in the direction (both reference codes)
    Hg_all = so.hvp(net, x, y, g, temperature=T)
    assert not np.allclose(Hg_all[0]["W"], Hg[0]["W"])
    masks = rn.prune(net, sal.grasp_scores(net, x, y), 0.5)  # keeps the largest synflow-convention scores
    assert sum(int(m["W"].sum()) for m in masks) == round(0.5 * net.n_weights)


def test_grasp_argument_errors():
    net, rng = _mlp(3)
    x, y = rng.standard_normal((2, 6)), np.array([0, 1])
    with pytest.raises(ValueError, match="convention"):
        sal.grasp_scores(net, x, y, convention="snip")
    with pytest.raises(ValueError, match="temperature"):
        sal.grasp_scores(net, x, y, temperature=-1.0)
    with pytest.raises(TypeError, match="normalize"):
        sal.grasp_scores(net, x, y, normalize=1)


# -------------------------------------------------------------------------------------------
# OBD
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [_mlp, _cnn])
def test_obd_is_half_hjj_w2_with_either_diagonal(make):
    net, rng = make(4)
    x = rng.standard_normal((4, *net.in_shape))
    y = rng.integers(0, 3, 4)
    H = so.hessian(net, x, y)
    w = so.params_to_vector(net, net.effective_params())
    exact = sal.obd_scores(net, x, y, include_bias=True)
    np.testing.assert_allclose(so.params_to_vector(net, exact), 0.5 * np.diag(H) * w * w, rtol=0, atol=1e-12 * np.abs(np.diag(H) * w * w).max())
    gn = sal.obd_scores(net, x, y, diag="gauss_newton")
    d = so.gn_diag(net, x, y)
    for s, di, p, m in zip(gn, d, net.params, net.masks):
        assert set(s) <= {"W"}
        if s:
            np.testing.assert_array_equal(s["W"], 0.5 * di["W"] * (p["W"] * m["W"]) ** 2)
            assert np.all(s["W"] >= 0) and np.all(s["W"][~m["W"]] == 0)


def test_obd_is_the_exact_loss_increase_of_a_quadratic_at_its_minimum():
    """One linear layer with mse at its least-squares optimum: the loss is quadratic and its
    gradient zero, so removing weight j raises it by exactly 1/2 H_jj w_j^2."""
    rng = np.random.default_rng(5)
    net = rn.mlp([4, 3], activation="identity", seed=rng)
    x = rng.standard_normal((20, 4))
    t = rng.standard_normal((20, 3))
    Xa = np.hstack([x, np.ones((20, 1))])
    sol = np.linalg.lstsq(Xa, t, rcond=None)[0]  # (5, 3)
    net = net.with_params([{"W": sol[:4].T.copy(), "b": sol[4].copy()}])
    base = net.loss(x, t, "mse")
    s = sal.obd_scores(net, x, t, loss="mse")[0]["W"]
    for a in range(3):
        for b in range(4):
            W = net.params[0]["W"].copy()
            W[a, b] = 0.0
            dL = net.with_params([{"W": W, "b": net.params[0]["b"]}]).loss(x, t, "mse") - base
            assert abs(dL - s[a, b]) <= 1e-12 * max(1.0, abs(s[a, b]))


# -------------------------------------------------------------------------------------------
# layer-wise OBS
# -------------------------------------------------------------------------------------------


def _layer_X(net, x, i):
    _, trace = net.forward(x, return_trace=True)
    c = trace.caches[i]
    return c["cols"].reshape(-1, c["cols"].shape[2]) if "cols" in c else c["x"]


def test_one_removal_is_the_classic_obs_step_and_its_saliency_is_the_error_increase():
    rng = np.random.default_rng(6)
    net = perturb_biases(rn.mlp([5, 3, 2], activation="tanh", seed=rng), rng)
    x = rng.standard_normal((40, 5))
    X = _layer_X(net, x, 0)
    H = X.T @ X / len(X)
    Hinv = np.linalg.inv(H)
    W = net.params[0]["W"]
    L = W**2 / (2 * np.diag(Hinv))[None, :]
    a, q = np.unravel_index(np.argmin(L), L.shape)
    new = sal.obs_prune(net, x, 1 / 15 + 1e-9, damp=0.0, include_layers=[0])  # 15 weights: one pruned
    assert not new.masks[0]["W"][a, q] and new.masks[0]["W"].sum() == 14
    expect = W[a] - (W[a, q] / Hinv[q, q]) * Hinv[:, q]  # the OBS step
    got = new.params[0]["W"][a] * new.masks[0]["W"][a]
    np.testing.assert_allclose(got, expect * new.masks[0]["W"][a], rtol=0, atol=1e-12)
    assert abs(expect[q]) <= 1e-12
    others = [r for r in range(3) if r != a]
    np.testing.assert_array_equal(new.params[0]["W"][others], W[others])
    # the increase of E = 1/(2n) ||X (w' - w)||^2 is the saliency
    d = got - W[a]
    assert abs(0.5 * d @ H @ d - L[a, q]) <= 1e-12 * L[a, q]
    np.testing.assert_array_equal(new.params[1]["W"], net.params[1]["W"])  # other layers untouched
    np.testing.assert_array_equal(new.params[0]["b"], net.params[0]["b"])


def _sequential_obs(w, Hinv, S):
    """Single OBS steps, one entry of S after another, with the inverse downdated each time."""
    w, Hinv = w.copy(), Hinv.copy()
    for q in S:
        w = w - (w[q] / Hinv[q, q]) * Hinv[:, q]
        Hinv = Hinv - np.outer(Hinv[:, q], Hinv[q, :]) / Hinv[q, q]
    return w


@pytest.mark.parametrize("damp", [0.0, 1e-2])
@pytest.mark.parametrize("sparsity", [0.3, 0.8])
def test_many_removals_equal_sequential_obs_and_are_optimal(sparsity, damp):
    rng = np.random.default_rng(7)
    net = perturb_biases(rn.mlp([6, 4, 3], activation="tanh", seed=rng), rng)
    net = net.with_masks(random_masks(net, rng, 0.9))
    x = rng.standard_normal((30, 6))
    new = sal.obs_prune(net, x, sparsity, damp=damp)
    for i in (0, 1):
        X = _layer_X(net, x, i)
        H = X.T @ X / len(X)
        H = H + damp * np.trace(H) / len(H) * np.eye(len(H))
        Hinv = np.linalg.inv(H)
        w_old = net.params[i]["W"] * net.masks[i]["W"]
        m_new = new.masks[i]["W"]
        assert m_new.sum() == min(round(m_new.size * (1 - sparsity)), int(net.masks[i]["W"].sum()))
        assert not np.any(m_new & ~net.masks[i]["W"])  # nothing revived
        w_new = new.params[i]["W"] * m_new
        for a in range(w_old.shape[0]):
            S = np.flatnonzero(~m_new[a])
            ref = _sequential_obs(w_old[a], Hinv, S)
            np.testing.assert_allclose(w_new[a], np.where(m_new[a], ref, 0.0), rtol=0, atol=1e-10 * (1 + np.abs(ref).max()))
            K = np.flatnonzero(m_new[a])
            grad = H @ (w_new[a] - w_old[a])  # dE/dw' (damped): zero on the kept entries
            assert np.abs(grad[K]).max(initial=0.0) <= 1e-10 * (1 + np.abs(w_old[a]).max())


def test_conv_layer_obs_reduces_the_reconstruction_error():
    net, rng = _cnn(8, masked=False)
    # correlated pixels (a shared level per example and channel plus noise): with white inputs
    # X^T X ~ I and there is little for the update to compensate
    x = rng.standard_normal((10, 2, 1, 1)) + 0.2 * rng.standard_normal((10, 2, 4, 4))
    new = sal.obs_prune(net, x, [0.5, 0.6, 0.0], damp=1e-3)
    _, t_old = net.forward(x, return_trace=True)
    h_old = t_old.caches[0]["h"]
    plain = net.with_masks(new.masks)  # the same masks without the compensating update
    _, t_plain = plain.forward(x, return_trace=True)
    _, t_new = new.forward(x, return_trace=True)
    e_plain = np.sum((t_plain.caches[0]["h"] - h_old) ** 2)
    e_new = np.sum((t_new.caches[0]["h"] - h_old) ** 2)
    assert e_new < 0.5 * e_plain
    assert new.masks[0]["W"].sum() == round(54 * 0.5)
    assert new.masks[3]["W"].sum() == round(36 * 0.4)
    assert new.masks[4]["W"].all() and np.array_equal(new.params[4]["W"], net.params[4]["W"])


def test_obs_argument_errors():
    net, rng = _mlp(9, masked=False)
    x = rng.standard_normal((3, 6))  # fewer examples than inputs: X^T X is singular
    with pytest.raises(ValueError, match="sparsity"):
        sal.obs_prune(net, x, 1.0)
    with pytest.raises(ValueError, match="sparsity"):
        sal.obs_prune(net, x, [0.5, 0.5])
    with pytest.raises(ValueError, match="include_layers"):
        sal.obs_prune(net, x, 0.5, include_layers=[5])
    with pytest.raises(ValueError, match="damp"):
        sal.obs_prune(net, x, 0.5, damp=0.0)
    with pytest.raises(ValueError, match="damp"):
        sal.obs_prune(net, x, 0.5, damp=-1.0)
