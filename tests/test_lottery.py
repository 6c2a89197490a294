"""Lottery tickets: iterative magnitude pruning with rewinding (refnet/lottery.py)."""

import math
from fractions import Fraction

import numpy as np
import pytest

import refnet as rn
from refnet import lottery
from refnet.training import train

STEPS = 30
TRAIN_KW = dict(lr=0.1, batch_size=50, momentum=0.9, weight_decay=1e-4)


@pytest.fixture(scope="module")
def data():
    X, y = rn.data.load("synthetic")  # (1000, 20), 4 classes
    Xt, yt = rn.data.load("synthetic", split="test")
    return X, y, Xt, yt


def small_net(seed=0):
    return rn.mlp([20, 24, 16, 4], activation="tanh", init="orthogonal", seed=seed)


def exact_count(m, r, p=Fraction(1, 5)):
    """floor(m (1 - p)^r + 1/2) in exact rational arithmetic."""
    return math.floor(m * (1 - p) ** r + Fraction(1, 2))


def snapshot(net):
    return [{k: v.copy() for k, v in p.items()} for p in net.params]


# ------------------------------------------------------------------------------------------
def test_imp_density_counts_nesting_and_rewind_to_init(data):
    X, y, Xt, yt = data
    net = small_net()
    init = snapshot(net)
    out = lottery.imp(net, X, y, rounds=4, sparsity_per_round=0.2, steps_per_round=STEPS, seed=3,
                      X_test=Xt, y_test=yt, **TRAIN_KW)
    hist = out["history"]
    assert [h["round"] for h in hist] == [0, 1, 2, 3, 4]
    m = sum(p["W"].size for p in net.params)
    for r, h in enumerate(hist):
        kept = sum(int(mm["W"].sum()) for mm in h["masks"])
        assert kept == h["n_kept"] == exact_count(m, r)
        assert h["density"] == kept / m
        assert 0.0 <= h["test_acc"] <= 1.0
        assert all(mm["b"].all() for mm in h["masks"])  # biases are never pruned
    # pruned weights are never revived: each round's mask is inside the previous one
    for prev, cur in zip(hist, hist[1:]):
        for a, b in zip(prev["masks"], cur["masks"]):
            assert not np.any(b["W"] & ~a["W"])
    # input network unchanged; rewind_step=0 rewinds to the initial weights
    for p, q, r in zip(net.params, init, out["rewind_params"]):
        for k in p:
            np.testing.assert_array_equal(p[k], q[k])
            np.testing.assert_array_equal(r[k], q[k])
    # the last ticket = the initial weights with the last mask, trained for the same steps
    ticket = rn.Network(net.layers, params=init, masks=hist[-1]["masks"])
    train(ticket, X, y, steps=STEPS, seed=3, progress=False, **TRAIN_KW)
    for p, q in zip(ticket.params, out["net"].params):
        for k in p:
            np.testing.assert_array_equal(p[k], q[k])


def test_imp_prunes_smallest_magnitudes_of_the_trained_net(data):
    X, y, _, _ = data
    net = small_net(1)
    out = lottery.imp(net, X, y, rounds=1, steps_per_round=STEPS, seed=0, **TRAIN_KW)
    trained = net.copy()
    train(trained, X, y, steps=STEPS, seed=0, progress=False, **TRAIN_KW)
    mags = np.concatenate([np.abs(p["W"]).ravel() for p in trained.params])
    keep = np.concatenate([mm["W"].ravel() for mm in out["history"][1]["masks"]])
    assert keep.sum() == exact_count(mags.size, 1)
    assert mags[keep].min() >= mags[~keep].max()


def test_imp_rewind_to_step_k(data):
    X, y, _, _ = data
    net = small_net(2)
    k = 7
    out = lottery.imp(net, X, y, rounds=2, steps_per_round=STEPS, rewind_step=k, seed=5, **TRAIN_KW)
    early = net.copy()
    train(early, X, y, steps=k, seed=5, progress=False, **TRAIN_KW)  # the first k steps of round 0
    for p, q in zip(early.params, out["rewind_params"]):
        for key in p:
            np.testing.assert_array_equal(p[key], q[key])
    assert not np.array_equal(out["rewind_params"][0]["W"], net.params[0]["W"])
    # later rounds start from W_k with the new mask and train steps_per_round - k steps
    assert [h["steps"] for h in out["history"]] == [STEPS, STEPS - k, STEPS - k]
    ticket = rn.Network(net.layers, params=out["rewind_params"], masks=out["history"][-1]["masks"])
    train(ticket, X, y, steps=STEPS - k, seed=5, progress=False, **TRAIN_KW)
    np.testing.assert_array_equal(ticket.params[1]["W"], out["net"].params[1]["W"])


def test_imp_deterministic_and_layer_scope(data):
    X, y, _, _ = data
    net = small_net(4)
    kw = dict(rounds=2, sparsity_per_round=0.3, steps_per_round=10, scope="layer", seed=9, **TRAIN_KW)
    a = lottery.imp(net, X, y, **kw)
    b = lottery.imp(net, X, y, **kw)
    for ha, hb in zip(a["history"], b["history"]):
        for ma, mb in zip(ha["masks"], hb["masks"]):
            np.testing.assert_array_equal(ma["W"], mb["W"])
    for p, q in zip(a["net"].params, b["net"].params):
        np.testing.assert_array_equal(p["W"], q["W"])
    # layer scope: every layer keeps exactly floor(m_l 0.7^r + 1/2)
    for r, h in enumerate(a["history"]):
        for mm, p in zip(h["masks"], net.params):
            assert int(mm["W"].sum()) == exact_count(p["W"].size, r, Fraction(3, 10))


def test_magnitude_prune_ties_and_existing_masks():
    W = np.array([[3.0, -1.0, 2.0], [1.0, 0.5, -1.0]])
    net = rn.Network([rn.Dense(3, 2, bias=False)], params=[{"W": W}])
    masks = lottery.magnitude_prune(net, 4 / 6)  # keep 4: 3, 2, and the first two of the three 1s
    np.testing.assert_array_equal(masks[0]["W"], [[True, True, True], [True, False, False]])
    # a pruned weight stays pruned even if it is the largest
    net2 = net.with_masks([{"W": np.array([[False, True, True], [True, True, True]])}])
    m2 = lottery.magnitude_prune(net2, 4 / 6)
    np.testing.assert_array_equal(m2[0]["W"], [[False, True, True], [True, False, True]])
    # a kept weight that is exactly 0 still beats a pruned one (whose |mask * W| is also 0)
    net3 = rn.Network([rn.Dense(3, 1, bias=False)], params=[{"W": np.array([[5.0, 0.0, 1.0]])}],
                      masks=[{"W": np.array([[False, True, True]])}])
    np.testing.assert_array_equal(lottery.magnitude_prune(net3, 2 / 3)[0]["W"], [[False, True, True]])


def test_imp_errors(data):
    X, y, _, _ = data
    net = small_net()
    with pytest.raises(ValueError, match="rewind_step"):
        lottery.imp(net, X, y, steps_per_round=5, rewind_step=5)
    with pytest.raises(ValueError, match="sparsity_per_round"):
        lottery.imp(net, X, y, sparsity_per_round=1.0)
    with pytest.raises(ValueError, match="X_test"):
        lottery.imp(net, X, y, X_test=X)
