"""Pruning at initialization: scores, top-k masks, SynFlow and layer collapse.

* ``prune``: exactly ``k = round(m (1 - sparsity))`` kept (global and per layer) on integer
  scores with many ties, the same mask on every call, equal to the stable-argsort reference
  (``np.argsort(-s, kind="stable")``), the documented tie rule on a hand-made example, pruned
  entries never revived, NaN and sparsity/density errors;
* connection sensitivity: ``dL/dc = g * w`` against ``loss_and_grads * W`` and central finite
  differences in ``c``; the batch accumulation (sum of per-batch gradients, then ``|.|``) against a
  manual loop; the official-code bias option;
* unsupervised losses against finite differences of their loss; "uniform" is
  ``-(1/C) sum_j log softmax(z)_j``; "pred_softmax" holds its target constant (its gradient is
  zero, unlike the gradient through the target);
* SynFlow against finite differences of ``R``, the conservation law, no overflow/underflow on
  50-layer nets (against an mpmath reference), invariance to per-layer scaling, iterative pruning;
* layer-collapse and disconnection warnings;
* the paper example (784-100x6-10 tanh MLP, orthogonal, SNIP 90% on 100 mnist5k examples) and the
  same mask from PyTorch autograd.
"""

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from netgen import cnns, mlps, perturb_biases, random_masks

import refnet as rn
from refnet.losses import log_softmax, softmax
from refnet.pruning import (
    UNSUPERVISED_LOSSES,
    LayerCollapseWarning,
    connection_sensitivity,
    format_pruning_report,
    keep_count,
    magnitude_scores,
    prune,
    pruning_report,
    random_scores,
    snip,
    synflow_objective,
    synflow_prune,
    synflow_scores,
    unsupervised_targets,
)

RTOL = 1e-12
FD_H = 1e-6
FD_RTOL = 1e-6
FD_ATOL = 1e-10


# -------------------------------------------------------------------------------------------
# helpers
# -------------------------------------------------------------------------------------------


def _signed_g_times_w(net, x, y, loss="cross_entropy", keys=("W",)):
    """dL/dc at c = 1 from the network's own gradient: loss_and_grads * W."""
    _, grads = net.loss_and_grads(x, y, loss)
    return [{k: grads[i][k] * p[k] for k in keys if k in p} for i, p in enumerate(net.params)]


def _flat(scores, keys=("W",)):
    return np.concatenate([d[k].ravel() for d in scores for k in keys if k in d])


def _reference_masks(net, scores, density, scope, include_bias):
    """Stable argsort of -score over the still-kept entries (the documented rule, spelled out)."""
    keys = [[k for k in ("W", "b") if k in p and (k == "W" or include_bias)] for p in net.params]
    entries = [(i, k) for i, ks in enumerate(keys) for k in ks]
    groups = [entries] if scope == "global" else [[e for e in entries if e[0] == i] for i in range(net.n_layers)]
    out = [{k: v.copy() for k, v in m.items()} for m in net.masks]
    for group in groups:
        if not group:
            continue
        s = np.concatenate([np.asarray(scores[i][k], dtype=float).ravel() for i, k in group])
        alive = np.concatenate([net.masks[i][k].ravel() for i, k in group])
        k = int(round(s.size * density))
        idx = np.flatnonzero(alive)
        order = idx[np.argsort(-s[idx], kind="stable")][:k]
        keep = np.zeros(s.size, dtype=bool)
        keep[order] = True
        start = 0
        for i, key in group:
            n = net.params[i][key].size
            out[i][key] = keep[start : start + n].reshape(net.params[i][key].shape)
            start += n
    return out


def _masks_equal(a, b):
    return len(a) == len(b) and all(set(x) == set(y) and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def _snapshot(net):
    return [{k: v.copy() for k, v in p.items()} for p in net.params], [{k: v.copy() for k, v in m.items()} for m in net.masks]


def _unchanged(net, snap):
    params, masks = snap
    return _masks_equal(net.params, params) and _masks_equal(net.masks, masks)


# -------------------------------------------------------------------------------------------
# prune: counts, ties, determinism, never revived
# -------------------------------------------------------------------------------------------


@st.composite
def _net_and_int_scores(draw):
    net, rng = draw(mlps(max_depth=4, max_width=24))
    hi = draw(st.integers(0, 4))  # scores in {0..hi}: many ties (all equal when hi = 0)
    include_bias = draw(st.booleans())
    scores = [{k: rng.integers(0, hi + 1, size=v.shape) for k, v in p.items()} for p in net.params]
    return net, scores, include_bias


@settings(max_examples=150)
@given(
    _net_and_int_scores(),
    st.floats(0.0, 0.999),
    st.sampled_from(["global", "layer"]),
    st.booleans(),
)
def test_prune_keeps_exactly_k_with_ties(case, sparsity, scope, as_density):
    net, scores, include_bias = case
    snap = _snapshot(net)
    kw = {"density": 1.0 - sparsity} if as_density else {"sparsity": sparsity}
    d = 1.0 - sparsity
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # collapse / "never revived" warnings are tested below
        masks = prune(net, scores, scope=scope, include_bias=include_bias, **kw)
        again = prune(net, scores, scope=scope, include_bias=include_bias, **kw)
    assert _masks_equal(masks, again)  # deterministic
    assert _unchanged(net, snap)
    want = _reference_masks(net, scores, d, scope, include_bias)
    assert _masks_equal(masks, want)
    keys = ["W", "b"] if include_bias else ["W"]
    groups = [list(range(net.n_layers))] if scope == "global" else [[i] for i in range(net.n_layers)]
    for g in groups:
        m = sum(net.params[i][k].size for i in g for k in keys if k in net.params[i])
        alive = sum(int(net.masks[i][k].sum()) for i in g for k in keys if k in net.params[i])
        kept = sum(int(masks[i][k].sum()) for i in g for k in keys if k in net.params[i])
        assert kept == min(round(m * d), alive)
    for i, p in enumerate(net.params):
        assert set(masks[i]) == set(p)
        for k in p:
            assert masks[i][k].dtype == bool and masks[i][k].shape == p[k].shape
            assert not np.any(masks[i][k] & ~net.masks[i][k])  # never revived
        if "b" in p and not include_bias:
            assert np.array_equal(masks[i]["b"], net.masks[i]["b"])  # unranked biases untouched


def test_tie_rule_hand_made():
    net = rn.mlp([3, 2, 2], activation="relu", seed=0)  # W0 (2, 3), b0 (2,), W1 (2, 2), b1 (2,)
    scores = [
        {"W": np.array([[1.0, 5.0, 1.0], [1.0, 1.0, 2.0]]), "b": np.array([1.0, 9.0])},
        {"W": np.array([[1.0, 1.0], [5.0, 1.0]]), "b": np.array([1.0, 1.0])},
    ]
    # weights only, m = 10, sparsity 0.5 -> k = 5: the two 5s, the 2, then the 1s with the lowest
    # flat indices: W0[0, 0] (index 0), W0[0, 2] (index 2).
    m = prune(net, scores, 0.5)
    assert m[0]["W"].tolist() == [[True, True, True], [False, False, True]]
    assert m[1]["W"].tolist() == [[False, False], [True, False]]
    assert m[0]["b"].all() and m[1]["b"].all()
    # with biases, m = 14, k = 7: 9, 5, 5, 2, then 1s in order W0[0,0], W0[0,2], W0[1,0]
    m = prune(net, scores, 0.5, include_bias=True)
    assert m[0]["W"].tolist() == [[True, True, True], [True, False, True]]
    assert m[0]["b"].tolist() == [False, True]
    assert m[1]["W"].tolist() == [[False, False], [True, False]]
    assert m[1]["b"].tolist() == [False, False]
    # per layer: layer 0 keeps round(6 * 0.5) = 3 (5, 2, then W0[0, 0]); layer 1 keeps 2 (5, W1[0, 0])
    m = prune(net, scores, 0.5, scope="layer")
    assert m[0]["W"].tolist() == [[True, True, False], [False, False, True]]
    assert m[1]["W"].tolist() == [[True, False], [True, False]]
    # all scores equal: the first k flat entries are kept
    flat = [{"W": np.zeros((2, 3))}, {"W": np.zeros((2, 2))}]
    with pytest.warns(LayerCollapseWarning):  # layer 1 gets none of the first 4 entries
        m = prune(net, flat, density=0.4)
    assert m[0]["W"].ravel().tolist() == [True] * 4 + [False] * 2 and not m[1]["W"].any()


def test_prune_inf_scores_and_alive_ordering():
    net = rn.mlp([4, 1], seed=0).with_masks([{"W": np.array([[False, True, True, True]])}])
    scores = [{"W": np.array([[np.inf, -np.inf, 0.0, -np.inf]])}]
    m = prune(net, scores, density=0.5)  # k = 2: 0.0, then the first -inf still kept (index 1)
    assert m[0]["W"].tolist() == [[False, True, True, False]]


def test_pruned_entries_never_revived_and_k_counts_all():
    X, y = rn.data.load("synthetic")
    net = rn.mlp([20, 30, 30, 4], activation="tanh", seed=3)
    m5 = snip(net, X[:50], y[:50], sparsity=0.5)
    net5 = net.with_masks(m5)
    m9 = snip(net5, X[:50], y[:50], sparsity=0.9)
    total = net.n_weights
    assert sum(int(d["W"].sum()) for d in m9) == round(0.1 * total)
    for a, b in zip(m9, m5):
        assert not np.any(a["W"] & ~b["W"])
    # scores that favour exactly the pruned entries still revive nothing
    adversarial = [{"W": (~d["W"]).astype(float) * 1e9} for d in m5]
    with pytest.warns(LayerCollapseWarning):  # the kept entries all tie at 0: layer 0 first
        m = prune(net5, adversarial, sparsity=0.9)
    for a, b in zip(m, m5):
        assert not np.any(a["W"] & ~b["W"])
    assert sum(int(d["W"].sum()) for d in m) == round(0.1 * total)
    # asking for more than is left keeps everything left and says so
    with pytest.warns(UserWarning, match="never revived"):
        m = prune(net.with_masks(m9), magnitude_scores(net), sparsity=0.5)
    assert _masks_equal(m, m9)


def test_sparsity_and_density_errors():
    net = rn.mlp([4, 3, 2], seed=0)
    s = magnitude_scores(net)
    for bad in (1.0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="sparsity"):
            prune(net, s, bad)
    for bad in (0.0, -0.5, 1.01):
        with pytest.raises(ValueError, match="density"):
            prune(net, s, density=bad)
    with pytest.raises(ValueError, match="exactly one of sparsity"):
        prune(net, s, 0.5, density=0.5)
    with pytest.raises(ValueError, match="exactly one of sparsity"):
        prune(net, s)
    with pytest.raises(TypeError, match="sparsity"):
        prune(net, s, "0.5")
    with pytest.raises(ValueError, match="sparsity"):
        snip(net, np.zeros((2, 4)), np.array([0, 1]), sparsity=1.0)
    with pytest.raises(ValueError, match="density"):
        synflow_prune(net, density=0.0)
    assert keep_count(10, 0.9) == 1 and keep_count(129400, 0.9) == 12940 and keep_count(7, density=1.0) == 7
    assert prune(net, s, 0.0)[0]["W"].all()  # sparsity 0 keeps everything


def test_prune_argument_errors():
    net = rn.mlp([4, 3, 2], seed=0)
    s = magnitude_scores(net)
    bad = [{"W": d["W"].copy()} for d in s]
    bad[1]["W"][0, 0] = np.nan
    with pytest.raises(ValueError, match=r"scores\[1\]\['W'\].*NaN"):
        prune(net, bad, 0.5)
    with pytest.raises(ValueError, match="scores must be a list of 2"):
        prune(net, s[:1], 0.5)
    with pytest.raises(ValueError, match=r"scores\[0\]\['W'\] must have shape"):
        prune(net, [{"W": np.ones((4, 3))}, s[1]], 0.5)
    with pytest.raises(ValueError, match="key 'b'"):
        prune(net, s, 0.5, include_bias=True)
    with pytest.raises(TypeError, match=r"scores\[0\]"):
        prune(net, [[1.0], s[1]], 0.5)
    with pytest.raises(ValueError, match="scope"):
        prune(net, s, 0.5, scope="local")
    with pytest.raises(TypeError, match="include_bias"):
        prune(net, s, 0.5, include_bias=1)
    with pytest.raises(TypeError, match="warn"):
        prune(net, s, 0.5, warn="no")
    with pytest.raises(TypeError, match="net"):
        prune(net.params, s, 0.5)


# -------------------------------------------------------------------------------------------
# connection sensitivity
# -------------------------------------------------------------------------------------------


def _data(net, rng, B, loss):
    x = rng.standard_normal((B, *net.in_shape))
    C = net.out_shape[0]
    y = rng.integers(0, C, size=B) if loss == "cross_entropy" else rng.standard_normal((B, C))
    return x, y


@settings(max_examples=60)
@given(st.one_of(mlps(max_depth=5, max_width=24), cnns()), st.integers(1, 5), st.sampled_from(["cross_entropy", "mse"]))
def test_connection_sensitivity_is_abs_g_times_w(net_rng, B, loss):
    net, rng = net_rng
    x, y = _data(net, rng, B, loss)
    snap = _snapshot(net)
    got = connection_sensitivity(net, x, y, loss, normalize=False, include_bias=True)
    want = _signed_g_times_w(net, x, y, loss, keys=("W", "b"))
    for g, w in zip(got, want):
        assert set(g) == set(w)
        for k in g:
            np.testing.assert_allclose(g[k], np.abs(w[k]), rtol=RTOL, atol=0)
    for i, g in enumerate(got):  # pruned entries score exactly zero
        for k in g:
            assert np.all(g[k][~net.masks[i][k]] == 0)
    norm = connection_sensitivity(net, x, y, loss, include_bias=True)
    total = _flat(got, ("W", "b")).sum()
    if total > 0:
        np.testing.assert_allclose(_flat(norm, ("W", "b")), _flat(got, ("W", "b")) / total, rtol=RTOL)
        assert abs(_flat(norm, ("W", "b")).sum() - 1.0) < 1e-12
    w_only = connection_sensitivity(net, x, y, loss, normalize=False)
    assert all(set(d) <= {"W"} for d in w_only)
    assert _unchanged(net, snap)


def _loss_with_weight_factor(net, x, y, loss, layer, key, idx, t):
    """L with the entry (layer, key, idx) of the effective weight multiplied by (1 + t), i.e. c_j = 1 + t."""
    params = [{k: v.copy() for k, v in p.items()} for p in net.params]
    params[layer][key][idx] *= 1.0 + t
    return net.with_params(params).loss(x, y, loss)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_dL_dc_finite_differences(masked, loss):
    rng = np.random.default_rng(7)
    net = perturb_biases(rn.mlp([5, 7, 6, 3], activation="tanh", seed=1), rng)
    if masked:
        net = net.with_masks(random_masks(net, rng, 0.6))
    x, y = _data(net, rng, 4, loss)
    signed = _signed_g_times_w(net, x, y, loss, keys=("W", "b"))
    scores = connection_sensitivity(net, x, y, loss, normalize=False, include_bias=True)
    checked = 0
    for layer in range(net.n_layers):
        for key in ("W", "b"):
            kept = np.argwhere(net.masks[layer][key])
            for idx in map(tuple, kept[rng.permutation(len(kept))[:3]]):
                fd = (
                    _loss_with_weight_factor(net, x, y, loss, layer, key, idx, FD_H)
                    - _loss_with_weight_factor(net, x, y, loss, layer, key, idx, -FD_H)
                ) / (2 * FD_H)
                assert abs(signed[layer][key][idx] - fd) <= FD_RTOL * abs(fd) + FD_ATOL
                assert abs(scores[layer][key][idx] - abs(fd)) <= FD_RTOL * abs(fd) + FD_ATOL
                checked += 1
    assert checked >= 12


def test_dL_dc_matches_prop1_mask_gradients_on_kept_entries():
    prop1 = pytest.importorskip("refnet.prop1")
    rng = np.random.default_rng(2)
    net = rn.mlp([6, 8, 8, 3], activation="tanh", seed=2)
    net = net.with_masks(random_masks(net, rng, 0.5))
    x, y = _data(net, rng, 5, "cross_entropy")
    mg = prop1.mask_gradients(net, x, y)
    cs = connection_sensitivity(net, x, y, normalize=False)
    for i, d in enumerate(cs):
        keep = net.masks[i]["W"]
        np.testing.assert_allclose(d["W"][keep], np.abs(mg[i]["W"][keep]), rtol=1e-12, atol=1e-300)
        assert np.all(d["W"][~keep] == 0)  # here: dL/dc on the effective weights, zero when pruned


@pytest.mark.parametrize("batch_size", [1, 7, 10, 64])
@pytest.mark.parametrize("loss", ["cross_entropy", "uniform"])
def test_batch_accumulation_sum_then_abs(batch_size, loss):
    X, y = rn.data.load("synthetic")
    net = rn.mlp([20, 16, 16, 4], activation="tanh", seed=5)
    x, yy = X[:30], y[:30]
    got = connection_sensitivity(net, x, yy, loss, batch_size=batch_size, normalize=False)
    acc = [np.zeros_like(p["W"]) for p in net.params]
    abs_acc = [np.zeros_like(p["W"]) for p in net.params]
    for s in range(0, len(x), batch_size):
        xb, yb = x[s : s + batch_size], yy[s : s + batch_size]
        tb = yb if loss == "cross_entropy" else np.full((len(xb), 4), 0.25)
        g = _signed_g_times_w(net, xb, tb)
        for i in range(net.n_layers):
            acc[i] += g[i]["W"]
            abs_acc[i] += np.abs(g[i]["W"])
    for i in range(net.n_layers):
        np.testing.assert_allclose(got[i]["W"], np.abs(acc[i]), rtol=1e-12, atol=1e-300)
    if batch_size < len(x):  # abs-then-sum would be a different quantity
        assert not np.allclose(_flat(got), np.concatenate([a.ravel() for a in abs_acc]), rtol=1e-6)
    whole = connection_sensitivity(net, x, yy, loss, normalize=False)
    if batch_size >= len(x):
        assert _masks_equal(got, whole) or np.allclose(_flat(got), _flat(whole), rtol=1e-13)


def test_official_bias_option_zero_biases_all_pruned():
    X, y = rn.data.load("synthetic")
    net = rn.mlp([20, 30, 30, 4], activation="tanh", seed=0)  # biases start at zero
    s = connection_sensitivity(net, X[:100], y[:100], include_bias=True)
    assert all(np.all(d["b"] == 0) for d in s)
    assert abs(_flat(s, ("W", "b")).sum() - 1.0) < 1e-12
    m = snip(net, X[:100], y[:100], sparsity=0.9, include_bias=True)
    assert not any(d["b"].any() for d in m)
    n_all = net.n_params
    assert sum(int(d["W"].sum()) + int(d["b"].sum()) for d in m) == round(0.1 * n_all)
    # default: biases are not ranked and stay kept
    m = snip(net, X[:100], y[:100], sparsity=0.9)
    assert all(d["b"].all() for d in m)
    assert sum(int(d["W"].sum()) for d in m) == round(0.1 * net.n_weights)


def test_connection_sensitivity_errors():
    net = rn.mlp([4, 3, 2], seed=0)
    x = np.zeros((3, 4))
    with pytest.raises(ValueError, match="y must be given"):
        connection_sensitivity(net, x, None)
    with pytest.raises(ValueError, match="y must have one row"):
        connection_sensitivity(net, x, np.array([0, 1]))
    with pytest.raises(ValueError, match="loss must be one of"):
        connection_sensitivity(net, x, np.array([0, 1, 0]), "hinge")
    with pytest.raises(TypeError, match="loss"):
        connection_sensitivity(net, x, np.array([0, 1, 0]), 3)
    with pytest.raises(ValueError, match="x must have shape"):
        connection_sensitivity(net, np.zeros((3, 5)), np.array([0, 1, 0]))
    with pytest.raises(ValueError, match="x must hold at least one"):
        connection_sensitivity(net, np.zeros((0, 4)), np.zeros(0, dtype=int))
    with pytest.raises(ValueError, match="batch_size"):
        connection_sensitivity(net, x, np.array([0, 1, 0]), batch_size=0)
    with pytest.raises(TypeError, match="batch_size"):
        connection_sensitivity(net, x, np.array([0, 1, 0]), batch_size=2.0)
    with pytest.raises(TypeError, match="normalize"):
        connection_sensitivity(net, x, np.array([0, 1, 0]), normalize=None)
    with pytest.raises(TypeError, match="net"):
        connection_sensitivity("net", x, np.array([0, 1, 0]))
    with pytest.raises(ValueError, match="kind"):
        unsupervised_targets(net, x, "entropy")
    # a custom callable loss works like a named one
    custom = connection_sensitivity(net, x + 1.0, np.array([0, 1, 0]), rn.cross_entropy)
    named = connection_sensitivity(net, x + 1.0, np.array([0, 1, 0]), "cross_entropy")
    assert _masks_equal(custom, named)


# -------------------------------------------------------------------------------------------
# unsupervised losses
# -------------------------------------------------------------------------------------------


def _unsup_loss(net, x, t):
    """Mean cross-entropy of net(x) against fixed targets t."""
    return rn.cross_entropy(net.forward(x), t)[0]


@pytest.mark.parametrize("kind", ["uniform", "pred_raw"])
def test_unsupervised_losses_finite_differences(kind):
    rng = np.random.default_rng(11)
    net = perturb_biases(rn.mlp([6, 9, 7, 5], activation="tanh", seed=4), rng)
    x = rng.standard_normal((8, 6))
    t = unsupervised_targets(net, x, kind)
    scores = connection_sensitivity(net, x, None, kind, normalize=False)
    signed = _signed_g_times_w(net, x, t)
    for layer in range(net.n_layers):
        for idx in map(tuple, rng.integers(0, net.params[layer]["W"].shape, size=(3, 2))):
            def L(tt):
                params = [{k: v.copy() for k, v in p.items()} for p in net.params]
                params[layer]["W"][idx] *= 1.0 + tt
                return _unsup_loss(net.with_params(params), x, t)  # targets held at the initial net

            fd = (L(FD_H) - L(-FD_H)) / (2 * FD_H)
            assert abs(scores[layer]["W"][idx] - abs(fd)) <= FD_RTOL * abs(fd) + FD_ATOL
            assert abs(signed[layer]["W"][idx] - fd) <= FD_RTOL * abs(fd) + FD_ATOL


def test_uniform_loss_and_targets():
    rng = np.random.default_rng(0)
    net = rn.mlp([6, 9, 5], activation="tanh", seed=4)
    x = rng.standard_normal((7, 6))
    z = net.forward(x)
    t = unsupervised_targets(net, x, "uniform")
    assert t.shape == (7, 5) and np.all(t == 0.2)
    want = float(np.mean(-(1.0 / 5) * log_softmax(z).sum(axis=1)))
    assert abs(_unsup_loss(net, x, t) - want) <= 1e-15 * abs(want)
    raw = unsupervised_targets(net, x, "pred_raw")
    assert np.array_equal(raw.argmax(axis=1), z.argmax(axis=1)) and np.all(raw.sum(axis=1) == 1)
    assert set(np.unique(raw)) <= {0.0, 1.0}
    np.testing.assert_allclose(unsupervised_targets(net, x, "pred_softmax"), softmax(z), rtol=1e-15)
    # y is ignored by the unsupervised losses
    for kind in UNSUPERVISED_LOSSES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            a = connection_sensitivity(net, x, None, kind, normalize=False)
            b = connection_sensitivity(net, x, np.zeros(7, dtype=int), kind, normalize=False)
        assert _masks_equal(a, b)


def test_pred_softmax_target_held_constant():
    """CE against the net's own softmax, held constant, has gradient softmax(z) - t = 0; the
    gradient through the target (the entropy H(softmax z)) is not zero."""
    rng = np.random.default_rng(3)
    net = rn.mlp([6, 9, 7, 5], activation="tanh", seed=4)
    x = rng.standard_normal((8, 6))
    with pytest.warns(RuntimeWarning, match="pred_softmax"):
        held = connection_sensitivity(net, x, None, "pred_softmax", normalize=False)
    g_uniform = connection_sensitivity(net, x, None, "uniform", normalize=False)
    scale = _flat(g_uniform).max()
    assert _flat(held).max() <= 1e-12 * scale  # zero up to rounding

    t0 = unsupervised_targets(net, x, "pred_softmax")
    layer, idx = 1, (2, 3)

    def held_L(tt):  # target frozen at the initial softmax
        params = [{k: v.copy() for k, v in p.items()} for p in net.params]
        params[layer]["W"][idx] *= 1.0 + tt
        return _unsup_loss(net.with_params(params), x, t0)

    def through_L(tt):  # target moves with the weights: L = mean entropy of softmax(z)
        params = [{k: v.copy() for k, v in p.items()} for p in net.params]
        params[layer]["W"][idx] *= 1.0 + tt
        n2 = net.with_params(params)
        return _unsup_loss(n2, x, unsupervised_targets(n2, x, "pred_softmax"))

    fd_held = (held_L(FD_H) - held_L(-FD_H)) / (2 * FD_H)
    fd_through = (through_L(FD_H) - through_L(-FD_H)) / (2 * FD_H)
    assert abs(fd_held) < 1e-9 and abs(held[layer]["W"][idx]) < 1e-15
    assert abs(fd_through) > 1e-4  # differentiating through the target gives another gradient
    # the analytic through-target gradient: dH/dz = -p * (log p - sum p log p) / B
    z, trace = net.forward(x, return_trace=True)
    p, lp = softmax(z), log_softmax(z)
    eps = -p * (lp - (p * lp).sum(axis=1, keepdims=True)) / len(x)
    g = net.backward(trace, eps)[layer]["W"][idx] * net.params[layer]["W"][idx]
    assert abs(g - fd_through) <= FD_RTOL * abs(fd_through) + FD_ATOL


# -------------------------------------------------------------------------------------------
# baselines
# -------------------------------------------------------------------------------------------


def test_random_and_magnitude_scores():
    rng = np.random.default_rng(0)
    net = rn.mlp([5, 6, 3], seed=0)
    net = net.with_masks(random_masks(net, rng, 0.5))
    a, b = random_scores(net, 42), random_scores(net, 42)
    assert _masks_equal(a, b) and not _masks_equal(a, random_scores(net, 43))
    assert all(set(d) == {"W"} and np.all((d["W"] >= 0) & (d["W"] < 1)) for d in a)
    ab = random_scores(net, 42, include_bias=True)
    assert all(np.array_equal(x["W"], y["W"]) and "b" in y for x, y in zip(a, ab))
    mag = magnitude_scores(net, include_bias=True)
    for d, p, m in zip(mag, net.params, net.masks):
        np.testing.assert_array_equal(d["W"], np.abs(p["W"]) * m["W"])
        assert "b" in d
    m = prune(net, mag, 0.8)
    kept = np.concatenate([np.abs(p["W"])[mm["W"]] for p, mm in zip(net.params, m)])
    dropped = np.concatenate([np.abs(p["W"])[om["W"] & ~mm["W"]] for p, mm, om in zip(net.params, m, net.masks)])
    assert kept.min() >= dropped.max()
    with pytest.raises(TypeError, match="seed"):
        random_scores(net, None)
    with pytest.raises(ValueError, match="seed"):
        random_scores(net, -1)


# -------------------------------------------------------------------------------------------
# SynFlow
# -------------------------------------------------------------------------------------------


def _naive_R_mlp(Ws):
    """R = 1^T |W_K| ... |W_1| 1 by plain matrix products (float64, no rescaling)."""
    v = np.ones(Ws[0].shape[1])
    for W in Ws:
        v = np.abs(W) @ v
    return float(v.sum())


def _linear_copy(net):
    """The linear bias-free |W| network, built with the public API (for R of CNNs)."""
    layers = []
    for layer in net.layers:
        if isinstance(layer, rn.Dense):
            layers.append(rn.Dense(layer.n_in, layer.n_out, bias=False))
        elif isinstance(layer, rn.Conv2d):
            layers.append(rn.Conv2d(layer.c_in, layer.c_out, layer.kernel_size, stride=layer.stride,
                                    padding=layer.padding, padding_mode=layer.padding_mode, bias=False))
        else:
            layers.append(layer)
    params = [{"W": np.abs(p["W"] * m["W"])} if "W" in p else {} for p, m in zip(net.params, net.masks)]
    return rn.Network(layers, in_shape=net.in_shape, params=params)


def _R_forward(net):
    return float(_linear_copy(net).forward(np.ones((1, *net.in_shape))).sum())


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_synflow_finite_differences_of_R(kind):
    rng = np.random.default_rng(5)
    if kind == "mlp":
        net = perturb_biases(rn.mlp([4, 5, 6, 3], activation="relu", seed=3), rng)  # biases must be ignored
        net = net.with_masks(random_masks(net, rng, 0.7))
    else:
        net = rn.Network(
            [rn.Conv2d(2, 3, 3, padding=1, activation="relu"), rn.AvgPool2d(2),
             rn.Conv2d(3, 2, 2, activation="tanh"), rn.Flatten(), rn.Dense(2 * 2 * 2, 3)],
            in_shape=(2, 6, 6), init="lecun", seed=4,
        )
        net = perturb_biases(net, rng)
    R = _R_forward(net)
    if kind == "mlp":
        assert abs(R - _naive_R_mlp([p["W"] * m["W"] for p, m in zip(net.params, net.masks)])) <= 1e-12 * R
    assert abs(synflow_objective(net) - R) <= 1e-12 * R
    assert abs(synflow_objective(net, log=True) - np.log(R)) <= 1e-12 * abs(np.log(R)) + 1e-14
    S = synflow_scores(net, normalize=False)
    checked = 0
    for i, p in enumerate(net.params):
        if "W" not in p:
            continue
        assert set(S[i]) == {"W"}
        assert np.all(S[i]["W"][~net.masks[i]["W"]] == 0)
        kept = np.argwhere(net.masks[i]["W"])
        for idx in map(tuple, kept[rng.permutation(len(kept))[:4]]):
            h = FD_H * abs(p["W"][idx])
            vals = []
            for t in (h, -h):
                params = [{k: v.copy() for k, v in q.items()} for q in net.params]
                params[i]["W"][idx] += t
                vals.append(_R_forward(net.with_params(params)))
            dR_dw = (vals[0] - vals[1]) / (2 * h)
            want = abs(dR_dw * p["W"][idx])
            assert abs(S[i]["W"][idx] - want) <= 1e-6 * want + 1e-10 * R
            checked += 1
    assert checked >= 8


@pytest.mark.parametrize("act", ["relu", "identity"])
@pytest.mark.parametrize("masked", [False, True])
def test_synflow_conservation_law(act, masked):
    rng = np.random.default_rng(8)
    net = rn.mlp([12, 20, 15, 20, 7], activation=act, init="he", seed=8, bias=False)
    if masked:
        net = net.with_masks(random_masks(net, rng, 0.6))
    S = synflow_scores(net, normalize=False)
    R = _naive_R_mlp([p["W"] * m["W"] for p, m in zip(net.params, net.masks)])
    sums = [float(d["W"].sum()) for d in S]
    for s in sums:
        assert abs(s - R) <= 1e-10 * R
    assert max(sums) - min(sums) <= 1e-10 * R


@settings(max_examples=40)
@given(st.one_of(mlps(max_depth=5, max_width=20), cnns()))
def test_synflow_conservation_law_any_net(net_rng):
    """Every affine layer carries the same total score R (Euler: R is 1-homogeneous per layer),
    also through pooling and flatten layers."""
    net, _ = net_rng
    S = synflow_scores(net, normalize=False)
    R = synflow_objective(net)
    sums = [float(d["W"].sum()) for d in S if d]
    if R == 0:
        assert all(s == 0 for s in sums)
    else:
        assert max(abs(s - R) for s in sums) <= 1e-10 * R
        np.testing.assert_allclose(R, _R_forward(net), rtol=1e-10)


def test_synflow_per_layer_scaling_leaves_normalised_scores_unchanged():
    rng = np.random.default_rng(1)
    net = rn.mlp([10, 12, 12, 5], activation="relu", seed=1)
    base = synflow_scores(net)
    params = [{k: v * c for k, v in p.items()} for p, c in zip(net.params, [1e3, 0.01, 7.0])]
    scaled_net = net.with_params(params)
    np.testing.assert_allclose(_flat(synflow_scores(scaled_net)), _flat(base), rtol=1e-12)
    np.testing.assert_allclose(_flat(synflow_scores(scaled_net, normalize=False)),
                               _flat(synflow_scores(net, normalize=False)) * 1e3 * 0.01 * 7.0, rtol=1e-12)
    assert _masks_equal(prune(net, base, 0.8), prune(scaled_net, synflow_scores(scaled_net), 0.8))
    del rng


def _mp_scores(Ws):
    """Exact-range reference with mpmath (no overflow): normalised SynFlow scores of an MLP."""
    mpmath = pytest.importorskip("mpmath")
    A = [[[mpmath.mpf(abs(float(v))) for v in row] for row in W] for W in Ws]
    xs = [[mpmath.mpf(1)] * len(A[0][0])]
    for M in A:
        xs.append([mpmath.fsum(r * c for r, c in zip(row, xs[-1])) for row in M])
    g = [mpmath.mpf(1)] * len(A[-1])
    out = [None] * len(A)
    for l in range(len(A) - 1, -1, -1):
        M = A[l]
        out[l] = [[g[i] * M[i][j] * xs[l][j] for j in range(len(M[0]))] for i in range(len(M))]
        g = [mpmath.fsum(g[i] * M[i][j] for i in range(len(M))) for j in range(len(M[0]))]
    total = mpmath.fsum(v for S in out for row in S for v in row)
    R = mpmath.fsum(xs[-1])
    return [np.array([[float(v / total) for v in row] for row in S]) for S in out], R


@pytest.mark.parametrize("scale", [3.0, 3e5, 3e-9])
def test_synflow_deep_net_no_overflow(scale):
    """50 layers: weights N(0, scale^2). scale 3 fits float64 naively; 3e5 overflows and 3e-9
    underflows a naive product; the rescaled computation stays finite and equals the mpmath
    reference (same ranking and masks)."""
    rng = np.random.default_rng(0)
    sizes = [8] + [10] * 49 + [6]
    Ws = [scale * rng.standard_normal((sizes[i + 1], sizes[i])) for i in range(50)]
    net = rn.Network([rn.Dense(sizes[i], sizes[i + 1], activation="relu" if i < 49 else "identity", bias=False)
                      for i in range(50)], params=[{"W": W} for W in Ws])
    with np.errstate(over="ignore", under="ignore"):
        naive = _naive_R_mlp(Ws)
    if scale > 1e3:
        assert naive == np.inf
        with pytest.raises(OverflowError, match="normalize=True"):
            synflow_scores(net, normalize=False)
    elif scale < 1e-3:
        assert naive == 0.0
    else:
        assert np.isfinite(naive) and naive > 1e50
    S = synflow_scores(net)
    flat = _flat(S)
    assert np.all(np.isfinite(flat)) and abs(flat.sum() - 1) < 1e-12
    ref, R = _mp_scores(Ws)
    np.testing.assert_allclose(flat, np.concatenate([r.ravel() for r in ref]), rtol=1e-9, atol=0)
    import mpmath

    assert abs(synflow_objective(net, log=True) - float(mpmath.log(R))) <= 1e-10 * abs(float(mpmath.log(R)))
    ref_masks = prune(net, [{"W": r} for r in ref], 0.9, warn=False)
    assert _masks_equal(prune(net, S, 0.9, warn=False), ref_masks)
    # conservation survives the rescaling: every layer carries 1/50 of the normalised total
    np.testing.assert_allclose([d["W"].sum() for d in S], 1 / 50, rtol=1e-9)


def test_synflow_prune_schedule():
    net = rn.mlp([16, 20, 20, 20, 5], activation="relu", seed=2)
    snap = _snapshot(net)
    m = synflow_prune(net, 0.9, iterations=10)
    assert sum(int(d["W"].sum()) for d in m) == round(0.1 * net.n_weights)
    assert all(d["b"].all() for d in m)
    one = synflow_prune(net, 0.9, iterations=1)  # one iteration is single-shot SynFlow
    assert _masks_equal(one, prune(net, synflow_scores(net), 0.9))
    # the schedule by hand: density 0.1^(k/n), rescoring each time
    cur = net
    for k in range(1, 4):
        mm = prune(cur, synflow_scores(cur), density=0.1 ** (k / 3))
        cur = net.with_masks(mm)
    assert _masks_equal(synflow_prune(net, density=0.1, iterations=3), mm)
    assert _unchanged(net, snap)
    with pytest.raises(ValueError, match="iterations"):
        synflow_prune(net, 0.9, iterations=0)
    with pytest.raises(ValueError, match="in_shape"):
        synflow_scores(net, in_shape=(3,))
    assert _masks_equal(synflow_scores(net, in_shape=(16,)), synflow_scores(net))


def test_synflow_disconnected_net_scores_zero():
    net = rn.mlp([4, 3, 2], seed=0, bias=False)
    net = net.with_masks([{"W": np.zeros((3, 4), bool)}, {}])
    assert synflow_objective(net) == 0.0 and synflow_objective(net, log=True) == -np.inf
    assert all(not d["W"].any() for d in synflow_scores(net))
    assert all(not d["W"].any() for d in synflow_scores(net, normalize=False))


# -------------------------------------------------------------------------------------------
# layer collapse
# -------------------------------------------------------------------------------------------


def test_layer_collapse_warning():
    net = rn.mlp([6, 5, 5, 3], activation="tanh", seed=0)
    scores = [{"W": np.ones((5, 6))}, {"W": np.zeros((5, 5))}, {"W": np.ones((3, 5))}]
    m = 30 + 25 + 15
    with pytest.warns(LayerCollapseWarning) as rec:
        masks = prune(net, scores, density=45 / m)  # keeps the 45 ones: layer 1 collapses
    msgs = [str(r.message) for r in rec if issubclass(r.category, LayerCollapseWarning)]
    assert any("layers[1]" in s and "layer collapse" in s for s in msgs)
    assert any("disconnected" in s for s in msgs)
    assert not any("layers[0]" in s or "layers[2]" in s for s in msgs)
    assert not masks[1]["W"].any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prune(net, scores, density=45 / m, warn=False)
        prune(net, scores, density=50 / m)  # keeps 5 of layer 1: no warning


def test_disconnected_without_collapsed_layer():
    net = rn.mlp([4, 3, 3, 2], activation="tanh", seed=0)
    s0 = np.zeros((3, 4))
    s0[0, :] = 1  # layer 0 only feeds hidden unit 0
    s1 = np.zeros((3, 3))
    s1[:, 1] = 1  # layer 1 only reads hidden unit 1
    s2 = np.ones((2, 3)) * 2
    scores = [{"W": s0}, {"W": s1}, {"W": s2}]
    with pytest.warns(LayerCollapseWarning, match="disconnected") as rec:
        prune(net, scores, density=13 / 27)  # 6 + 4 + 3 entries scored 2 and 1
    assert not any("layer collapse" in str(r.message) for r in rec)
    s1[:, 0] = 1  # now a path exists
    s1[:, 1] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prune(net, scores, density=13 / 27)


def test_cnn_collapse_is_disconnection():
    net = rn.Network([rn.Conv2d(1, 2, 3, activation="relu"), rn.Flatten(), rn.Dense(2 * 2 * 2, 3)],
                     in_shape=(1, 4, 4), seed=0)
    scores = [{"W": np.zeros((2, 1, 3, 3))}, {}, {"W": np.ones((3, 8))}]
    with pytest.warns(LayerCollapseWarning) as rec:
        prune(net, scores, density=24 / 42)
    msgs = [str(r.message) for r in rec]
    assert any("layers[0]" in s and "Conv2d" in s for s in msgs) and any("disconnected" in s for s in msgs)


# -------------------------------------------------------------------------------------------
# reports
# -------------------------------------------------------------------------------------------


def test_pruning_report():
    net = rn.Network([rn.Conv2d(1, 2, 3), rn.MaxPool2d(2), rn.Flatten(), rn.Dense(2, 3)], in_shape=(1, 4, 4), seed=0)
    m = prune(net, magnitude_scores(net), 0.5)
    rep = pruning_report(net.with_masks(m))
    assert [r["layer"] for r in rep] == [0, 3] and [r["type"] for r in rep] == ["Conv2d", "Dense"]
    assert sum(r["kept"] for r in rep) == 12 and [r["total"] for r in rep] == [18, 6]
    for r in rep:
        assert abs(r["sparsity"] - (1 - r["kept"] / r["total"])) < 1e-15
    bare = pruning_report(m)
    assert [r["type"] for r in bare] == [None, None] and [r["kept"] for r in bare] == [r["kept"] for r in rep]
    text = format_pruning_report(rep)
    assert "Conv2d" in text and text.splitlines()[-1].split()[:3] == ["all", "12", "24"]
    assert format_pruning_report(m).splitlines()[-1] == text.splitlines()[-1]
    assert format_pruning_report(net.with_masks(m)) == text
    with pytest.raises(TypeError, match="net_or_masks"):
        pruning_report("masks")
    with pytest.raises(TypeError, match="boolean"):
        pruning_report([{"W": np.ones(3)}])


# -------------------------------------------------------------------------------------------
# the paper example
# -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist100():
    X, y = rn.data.load("mnist5k", split="train")
    return X[:100], y[:100]


def test_paper_example_snip_90(mnist100):
    x, y = mnist100
    net = rn.mlp([784] + [100] * 6 + [10], activation="tanh", init="orthogonal", seed=0)
    snap = _snapshot(net)
    masks = snip(net, x, y, sparsity=0.9)
    assert net.n_weights == 129_400
    assert sum(int(d["W"].sum()) for d in masks) == round(0.1 * 129_400) == 12_940
    assert all(d["b"].all() for d in masks)
    assert _unchanged(net, snap)
    sp = [r["sparsity"] for r in pruning_report(masks)]
    # PAPER.md section 9 (small gamma rows): ~ .97 .80 .80 .80 .80 .81 .48
    assert sp[0] > 0.95 and all(0.75 < s < 0.85 for s in sp[1:6]) and 0.4 < sp[6] < 0.55

    torch = pytest.importorskip("torch")
    Ws = [torch.tensor(p["W"], requires_grad=True) for p in net.params]
    bs = [torch.tensor(p["b"]) for p in net.params]
    h = torch.tensor(x)
    for i, (W, b) in enumerate(zip(Ws, bs)):
        h = h @ W.T + b
        if i < 6:
            h = torch.tanh(h)
    torch.nn.functional.cross_entropy(h, torch.tensor(y)).backward()
    ts = [(W.grad * W).abs().detach().numpy() for W in Ws]
    ours = connection_sensitivity(net, x, y, normalize=False)
    np.testing.assert_allclose(_flat(ours), np.concatenate([t.ravel() for t in ts]), rtol=1e-10, atol=1e-18)
    flat = torch.cat([torch.tensor(t).flatten() for t in ts])
    top = torch.topk(flat, 12_940).indices.numpy()
    keep = np.zeros(flat.numel(), bool)
    keep[top] = True
    assert np.array_equal(keep, np.concatenate([d["W"].ravel() for d in masks]))
