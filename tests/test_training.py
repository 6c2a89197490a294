"""Tests for refnet.training (refnet.train): SGD/momentum formula, masks, determinism, errors, history files.

Every test here was seen failing once on a planted bug in refnet/train.py (noted per test).
"""

from __future__ import annotations

import io
import json
import os
import re

import numpy as np
import pytest

from refnet import data
from refnet.arch import build
from refnet.network import Network, mlp
from refnet.training import History, TrainingDiverged, load_history, train


@pytest.fixture(scope="module")
def synth():
    X, y = data.load("synthetic", split="train")
    Xt, yt = data.load("synthetic", split="test")
    return X, y, Xt, yt


def small_net(seed=0, activation="tanh", sizes=(20, 16, 16, 4), init="lecun"):
    return mlp(list(sizes), activation=activation, init=init, seed=seed)


def random_masks(net, rng, keep=0.5):
    return [{k: rng.random(a.shape) < keep for k, a in p.items()} for p in net.params]


def snapshot(net):
    return [{k: v.copy() for k, v in p.items()} for p in net.params]


def assert_params_equal(a, b):
    assert len(a) == len(b)
    for pa, pb in zip(a, b):
        assert pa.keys() == pb.keys()
        for k in pa:
            np.testing.assert_array_equal(pa[k], pb[k])


# --------------------------------------------------------------------------------------------
# learning
# --------------------------------------------------------------------------------------------


def test_loss_decreases_and_net_trained_in_place(synth):
    # planted bug seen failing: `new = p[k] + lr * v` (ascent)
    X, y, Xt, yt = synth
    net = small_net()
    arrays = [p["W"] for p in net.params]  # the same objects must end trained
    before = snapshot(net)
    loss0, acc0 = net.evaluate(Xt, yt)
    hist = train(net, X, y, steps=150, lr=0.1, batch_size=50, X_test=Xt, y_test=yt, eval_every=10)
    assert hist.status == "completed"
    assert hist.steps == list(range(10, 151, 10))
    assert hist.train_loss[-1] < 0.5 * hist.train_loss[0]
    assert hist.test_loss[-1] < 0.5 * loss0
    assert hist.final_test_acc > max(0.8, acc0)
    assert all(a is not None for a in hist.train_acc)
    # the user's net object is the trained one
    assert all(p["W"] is a for p, a in zip(net.params, arrays))
    assert not np.array_equal(net.params[0]["W"], before[0]["W"])
    assert net.evaluate(Xt, yt) == (hist.test_loss[-1], hist.test_acc[-1])


def test_deterministic_for_a_seed(synth):
    # planted bug seen failing: batch order from np.random.permutation (global RNG)
    X, y, _, _ = synth
    nets = [small_net(seed=1) for _ in range(3)]
    h0 = train(nets[0], X, y, steps=37, lr=0.05, batch_size=32, momentum=0.9, seed=7)
    h1 = train(nets[1], X, y, steps=37, lr=0.05, batch_size=32, momentum=0.9, seed=np.random.default_rng(7))
    train(nets[2], X, y, steps=37, lr=0.05, batch_size=32, momentum=0.9, seed=8)
    assert_params_equal(nets[0].params, nets[1].params)
    assert h0.train_loss == h1.train_loss
    assert not np.array_equal(nets[0].params[0]["W"], nets[2].params[0]["W"])
    assert h0.seed == 7 and h1.seed is None


# --------------------------------------------------------------------------------------------
# the update rule, by hand
# --------------------------------------------------------------------------------------------


def sgd_by_hand(net, X, y, batches, rates, momentum, wd):
    """Heavy-ball SGD written out: v = mu v + g, W = W - lr v, one (batch, lr) per step."""
    v = [{k: np.zeros_like(a) for k, a in p.items()} for p in net.params]
    for idx, lr in zip(batches, rates):
        _, g = net.loss_and_grads(X[idx], y[idx], weight_decay=wd)
        for l, p in enumerate(net.params):
            for k in p:
                v[l][k] = momentum * v[l][k] + g[l][k]
                p[k] = p[k] - lr * v[l][k]


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_momentum_update_by_hand(synth, momentum):
    # planted bug seen failing: `v = momentum * v + (1 - momentum) * g`; and reusing one
    # permutation for every epoch (steps=3 with 2 batches per epoch crosses an epoch)
    X, y, _, _ = synth
    X, y = X[:90], y[:90]
    lr, wd, bs, seed = 0.05, 0.01, 40, 3
    net = small_net(seed=2)
    ref = net.copy()
    train(net, X, y, steps=3, lr=lr, batch_size=bs, momentum=momentum, weight_decay=wd, seed=seed)

    rng = np.random.default_rng(seed)
    perm1, perm2 = rng.permutation(90), rng.permutation(90)  # 2 full batches per epoch
    batches = [perm1[:40], perm1[40:80], perm2[:40]]
    sgd_by_hand(ref, X, y, batches, [lr] * 3, momentum, wd)
    for pa, pb in zip(net.params, ref.params):
        for k in pa:
            np.testing.assert_allclose(pa[k], pb[k], rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_lr_schedule_by_hand_keeps_momentum_across_phases(synth, momentum, tmp_path):
    # planted bugs seen failing: the phase looked up one step late (bisect_left); the velocity
    # reset at a phase change (as chaining train() calls does)
    X, y, _, _ = synth
    X, y = X[:90], y[:90]
    schedule, wd, bs, seed = [(1, 0.05), (3, 0.02), (5, 0.005)], 0.01, 40, 3
    net = small_net(seed=2)
    ref = net.copy()
    hist = train(net, X, y, steps=6, lr=schedule, batch_size=bs, momentum=momentum, weight_decay=wd, seed=seed,
                 history_path=tmp_path / "h.json")
    rng = np.random.default_rng(seed)
    perms = [rng.permutation(90) for _ in range(3)]  # 2 batches per epoch
    batches = [p[a:a + 40] for p in perms for a in (0, 40)]
    sgd_by_hand(ref, X, y, batches, [0.05, 0.05, 0.02, 0.02, 0.005, 0.005], momentum, wd)
    for pa, pb in zip(net.params, ref.params):
        for k in pa:
            np.testing.assert_allclose(pa[k], pb[k], rtol=1e-13, atol=1e-15)
    assert hist.lr == 0.05 and hist.lr_schedule == [[1, 0.05], [3, 0.02], [5, 0.005]]
    assert load_history(tmp_path / "h.json").lr_schedule == hist.lr_schedule  # round trip
    # one phase is the constant lr, bit for bit, and records no schedule
    a, b = small_net(seed=2), small_net(seed=2)
    ha = train(a, X, y, steps=4, lr=[(1, 0.05)], batch_size=bs, momentum=momentum, seed=seed)
    train(b, X, y, steps=4, lr=0.05, batch_size=bs, momentum=momentum, seed=seed)
    assert_params_equal(a.params, b.params)
    assert ha.lr_schedule is None


def test_weight_decay_gradient_matches_finite_differences(synth):
    # the objective train() descends: loss + wd * sum ||mask*W||^2 (biases excluded).
    # planted bugs seen failing: the penalty gradient halved (monkeypatched into Network by a
    # pytest plugin, since network.py is not ours); train() decaying W a second time
    X, y, _, _ = synth
    x, t = X[:30], y[:30]
    wd = 0.3
    net = small_net(seed=4).with_masks(random_masks(small_net(seed=4), np.random.default_rng(0), 0.7))
    _, g = net.loss_and_grads(x, t, weight_decay=wd)
    rng = np.random.default_rng(1)
    h = 1e-6
    for l, key in [(0, "W"), (1, "W"), (2, "W"), (1, "b")]:
        for _ in range(4):
            i = tuple(int(rng.integers(s)) for s in net.params[l][key].shape)
            W = net.params[l][key]
            old = W[i]
            W[i] = old + h
            up = net.loss(x, t, weight_decay=wd)
            W[i] = old - h
            down = net.loss(x, t, weight_decay=wd)
            W[i] = old
            fd = (up - down) / (2 * h)
            assert abs(fd - g[l][key][i]) <= 1e-7 * max(1.0, abs(fd)), (l, key, i)
    # and one train step applies exactly that gradient: W <- W - lr * g
    ref = [{k: v.copy() for k, v in p.items()} for p in net.params]
    perm = np.random.default_rng(0).permutation(30)
    _, g1 = net.loss_and_grads(x[perm], t[perm], weight_decay=wd)
    train(net, x, t, steps=1, lr=0.1, batch_size=30, weight_decay=wd, seed=0)
    for l, p in enumerate(net.params):
        for k in p:
            np.testing.assert_allclose(p[k], ref[l][k] - 0.1 * g1[l][k], rtol=1e-13, atol=1e-15)


# --------------------------------------------------------------------------------------------
# masks
# --------------------------------------------------------------------------------------------


def test_pruned_weights_stay_zero_and_stored_values_unchanged(synth):
    # planted bug seen failing: decoupled decay `new = p[k] * (1 - lr * wd) - lr * v`
    X, y, _, _ = synth
    base = small_net(seed=5, sizes=(20, 32, 32, 4))
    net = base.with_masks(random_masks(base, np.random.default_rng(2), keep=0.3))
    stored = snapshot(net)
    train(net, X, y, steps=60, lr=0.1, batch_size=25, momentum=0.9, weight_decay=0.01, seed=0)
    moved = 0
    for p, m, s in zip(net.params, net.masks, stored):
        for k in p:
            np.testing.assert_array_equal(p[k][~m[k]], s[k][~m[k]])  # stored W untouched
            assert not np.any((p[k] * m[k])[~m[k]])  # effective weight exactly zero
            moved += int(np.sum(p[k][m[k]] != s[k][m[k]]))
    assert moved > 0.9 * sum(int(m[k].sum()) for m in net.masks for k in m)


def test_conv_net_trains_with_masks():
    # planted bug seen failing: an update that is non-zero at pruned entries
    X, y = data.load("digits", split="train", flatten=False)
    net = build("cnn-small-relu", X.shape[1:], 10, init="he", seed=0)
    net = net.with_masks(random_masks(net, np.random.default_rng(3), keep=0.5))
    stored = snapshot(net)
    hist = train(net, X[:200], y[:200], steps=8, lr=0.05, batch_size=50)
    assert np.isfinite(hist.train_loss[-1])
    for p, m, s in zip(net.params, net.masks, stored):
        for k in p:
            np.testing.assert_array_equal(p[k][~m[k]], s[k][~m[k]])


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------

BAD = [
    (dict(steps=0), ValueError, "steps"),
    (dict(steps=2.5), TypeError, "steps"),
    (dict(lr=0.0), ValueError, "lr"),
    (dict(lr=float("nan")), ValueError, "lr"),
    (dict(lr="0.1"), TypeError, "lr"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(batch_size=10_000), ValueError, "batch_size"),
    (dict(momentum=1.0), ValueError, "momentum"),
    (dict(momentum=-0.1), ValueError, "momentum"),
    (dict(weight_decay=-1e-4), ValueError, "weight_decay"),
    (dict(loss="hinge"), ValueError, "loss"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed="a"), TypeError, "seed"),
    (dict(eval_every=0), ValueError, "eval_every"),
    (dict(progress="yes"), TypeError, "progress"),
    (dict(callback=3), TypeError, "callback"),
    (dict(history_path=3), TypeError, "history_path"),
    (dict(train_eval_size=-1), ValueError, "train_eval_size"),
    (dict(X_test="given-alone"), ValueError, "X_test"),
    (dict(X_test="wrong-width", y_test="ok"), ValueError, "X_test"),
    (dict(X_test="ok", y_test="out-of-range"), ValueError, "y_test"),
    (dict(X="wrong-width"), ValueError, "X"),
    (dict(X="nan"), ValueError, "X"),
    (dict(y="short"), ValueError, "y"),
    (dict(y="out-of-range"), ValueError, "y"),
    (dict(y="float"), TypeError, "y"),
    (dict(meta={"a": object()}), ValueError, "meta"),
    (dict(lr=[]), ValueError, "lr"),
    (dict(lr=[(2, 0.1)]), ValueError, "lr: the first phase must start at step 1"),
    (dict(lr=[(1, 0.1), (1, 0.01)]), ValueError, "lr: the first steps of the phases must increase"),
    (dict(lr=[(1, 0.1), (9, 0.01)]), ValueError, "lr[1][0] (first step) must be <= steps (5)"),
    (dict(lr=[(1, 0.1), (3, 0.0)]), ValueError, "lr[1][1] (learning rate)"),
    (dict(lr=[(1, 0.1, 2)]), ValueError, "lr[0] must be a (first_step, lr) pair"),
    (dict(lr=[(1.5, 0.1)]), TypeError, "lr[0][0] (first step)"),
]


@pytest.mark.parametrize("kwargs,exc,name", BAD, ids=[f"{list(k)[0]}-{i}" for i, (k, _, _) in enumerate(BAD)])
def test_bad_arguments_raise_and_leave_net_unchanged(synth, kwargs, exc, name, tmp_path):
    # planted bugs seen failing: changing the net before validating momentum; no X/y checks
    X, y, Xt, yt = synth
    X, y = X[:100], y[:100]
    subs = {
        "wrong-width": np.zeros((10, 7)),
        "nan": np.where(np.arange(X.size).reshape(X.shape) == 5, np.nan, X),
        "short": y[:-1],
        "out-of-range": np.full(len(y), 4),
        "float": y.astype(float),
        "ok": None,
        "given-alone": Xt,
    }
    kw = dict(kwargs)
    args = {"X": X, "y": y}
    for k in ("X", "y"):
        if k in kw:
            args[k] = subs[kw.pop(k)]
    if "X_test" in kw:
        kw["X_test"] = Xt if kw["X_test"] == "ok" else subs[kw["X_test"]]
    if "y_test" in kw:
        kw["y_test"] = yt if kw["y_test"] == "ok" else np.full(len(kw["X_test"]), 9)
    net = small_net()
    before = snapshot(net)
    masks = [{k: v.copy() for k, v in m.items()} for m in net.masks]
    path = tmp_path / "h.json"
    with pytest.raises(exc, match=re.escape(name)):
        train(net, args["X"], args["y"], steps=kw.pop("steps", 5), history_path=kw.pop("history_path", path), **kw)
    assert_params_equal(net.params, before)
    for m, m0 in zip(net.masks, masks):
        for k in m:
            np.testing.assert_array_equal(m[k], m0[k])
    assert not path.exists()


def test_not_a_network():
    # planted bug seen failing: no type check of net
    with pytest.raises(TypeError, match="net"):
        train(object(), np.zeros((2, 3)), np.zeros(2, int))


def _huge_eps_loss(z, y):
    """A finite loss whose gradient overflows: exercises the check on the update itself."""
    return 1.0, np.full(z.shape, 1e308)


@pytest.mark.parametrize(
    "loss,lr,eval_every,why",
    [
        ("mse", 1e12, 1000, "at step 3: loss is inf"),
        ("mse", 1e12, 1, "after step 2: the loss on the test set is inf"),
        ("cross_entropy", 1e300, 1000, "at step 2: the network output is not finite"),
        ("cross_entropy", 1e300, 1, "after step 1: the network output on the test set is not finite"),
        (_huge_eps_loss, 0.1, 1, "at step 1: non-finite update of params[0]['W']"),
    ],
)
def test_divergence_raises_and_keeps_last_finite_params(synth, tmp_path, loss, lr, eval_every, why):
    # planted bugs seen failing: applying the update before checking it is finite (third case);
    # letting the loss's ValueError escape (second case); no loss check (first case: params inf);
    # training the caller's network in place (it ended half-trained: all cases)
    X, y, Xt, yt = synth
    kw = dict(lr=lr, batch_size=20, loss=loss, seed=0, train_eval_size=0)
    net = small_net(seed=6, activation="linear")
    before = snapshot(net)
    path = tmp_path / "h.json"
    with pytest.raises(TrainingDiverged, match=r"step \d+") as info:
        train(net, X, y, steps=200, history_path=path, eval_every=eval_every, X_test=Xt, y_test=yt, **kw)
    exc = info.value
    assert isinstance(exc, RuntimeError) and isinstance(exc, FloatingPointError)
    assert why in str(exc)
    when, step = re.search(r"(at|after) step (\d+)", str(exc)).groups()
    step = int(step)
    assert exc.step == step and exc.history.status == "diverged" and exc.history.error == str(exc)
    kept = step - 1 if when == "at" else step  # "at": before step s; "after": evaluation failed
    assert 1 <= step < 200
    assert_params_equal(net.params, before)  # all or nothing: the caller's network is unchanged
    partial = exc.net  # the partial result is attached
    assert partial is not net
    assert all(np.isfinite(a).all() for p in partial.params for a in p.values())
    ref = small_net(seed=6, activation="linear")
    if kept:
        train(ref, X, y, steps=kept, **kw)  # the same run, stopped where the net must be
    assert_params_equal(partial.params, ref.params)
    saved = json.loads(path.read_text())
    assert saved["status"] == "diverged" and f"step {step}" in saved["error"]
    assert saved["steps"] == list(range(eval_every, step, eval_every))
    assert len(saved["train_loss"]) == len(saved["test_acc"]) == len(saved["steps"])


# --------------------------------------------------------------------------------------------
# history, files, progress, callback
# --------------------------------------------------------------------------------------------


def test_history_json_written_during_training_and_readable(synth, tmp_path):
    # planted bug seen failing: writing history only at the end
    X, y, Xt, yt = synth
    path = tmp_path / "sub" / "history.json"
    seen = []

    def cb(hist, net):
        seen.append(json.loads(path.read_text())["steps"] == hist.steps)

    hist = train(small_net(), X, y, steps=25, eval_every=10, X_test=Xt, y_test=yt, history_path=path,
                 callback=cb, meta={"who": "test"})
    assert seen == [True, True, True]  # steps 10, 20, 25
    assert hist.steps == [10, 20, 25]
    back = load_history(path)
    assert back == hist
    d = json.loads(path.read_text())
    assert d["status"] == "completed" and d["meta"] == {"who": "test"}
    assert d["best_test_error"] == pytest.approx(1 - max(hist.test_acc))
    assert hist.best_test_error == pytest.approx(1 - max(hist.test_acc))
    assert hist.final_test_acc == hist.test_acc[-1]
    assert hist.best_test_step in hist.steps
    assert sorted(os.listdir(path.parent)) == ["history.json"]  # no temporary files left


def test_history_save_is_atomic(tmp_path, monkeypatch):
    # planted bug seen failing: writing straight into the target file
    path = tmp_path / "h.json"
    old = History(n_steps=1, steps=[1], train_loss=[0.5], test_loss=[None], test_acc=[None],
                  train_acc=[None], elapsed=[0.1])
    old.save_json(path)
    text = path.read_text()

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    new = History(n_steps=2, steps=[1, 2], train_loss=[0.5, 0.4], test_loss=[None] * 2,
                  test_acc=[None] * 2, train_acc=[None] * 2, elapsed=[0.1, 0.2])
    with pytest.raises(OSError, match="disk full"):
        new.save_json(path)
    assert path.read_text() == text
    assert os.listdir(tmp_path) == ["h.json"]
    assert History.from_dict(json.loads(text)).best_test_error is None


def test_history_from_dict_rejects_other_files():
    # planted bug seen failing: unknown keys ignored
    with pytest.raises(ValueError, match="format"):
        History.from_dict({"format": "something else"})
    d = History().to_dict()
    d["surprise"] = 1
    with pytest.raises(ValueError, match="surprise"):
        History.from_dict(d)


def test_no_test_set_and_default_eval_points(synth):
    # planted bug seen failing: a different default number of evaluations
    X, y, _, _ = synth
    hist = train(small_net(), X, y, steps=45, train_eval_size=0)
    assert hist.eval_every == 2 and hist.steps[-1] == 45 and len(hist.steps) == 23
    assert hist.best_test_error is None and hist.final_test_acc is None
    assert set(hist.test_acc) == {None} and set(hist.train_acc) == {None}


def test_callback_can_stop(synth):
    # planted bug seen failing: stopping on a False return instead of True
    X, y, _, _ = synth
    net = small_net()
    hist = train(net, X, y, steps=100, eval_every=5, callback=lambda h, n: h.steps[-1] >= 15)
    assert hist.status == "stopped" and hist.steps == [5, 10, 15]


def test_progress_line_goes_to_stream_and_auto_is_off_without_tty(synth, capsys):
    # planted bug seen failing: progress=None treated as True
    X, y, Xt, yt = synth
    buf = io.StringIO()
    train(small_net(), X, y, steps=30, X_test=Xt, y_test=yt, progress=buf)
    out = buf.getvalue()
    assert out.startswith("\rstep") and out.endswith("\n")
    assert "step 30/30" in out and "test acc 0." in out and "steps/s" in out
    train(small_net(), X, y, steps=5, progress=None)  # pytest's stderr is not a terminal
    assert capsys.readouterr().err == ""


def test_soft_targets_and_float32(synth):
    # planted bug seen failing: (n, C) targets rejected
    X, y, _, _ = synth
    T = np.eye(4)[y] * 0.9 + 0.025
    net = small_net()
    hist = train(net, X, T, steps=30)
    assert hist.train_loss[-1] < hist.train_loss[0]
    net32 = small_net().astype(np.float32)
    train(net32, X.astype(np.float32), y, steps=5)
    assert net32.params[0]["W"].dtype == np.float32


# --------------------------------------------------------------------------------------------
# all or nothing
# --------------------------------------------------------------------------------------------


def test_history_path_is_checked_before_the_first_step(synth, tmp_path):
    # planted bug seen failing: history_path first written after step 1 (the net was trained a step)
    X, y, _, _ = synth
    net = small_net()
    before = snapshot(net)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    steps = []
    for bad in (blocker / "history.json", tmp_path):  # under a file; a folder
        with pytest.raises(ValueError, match="history_path"):
            train(net, X, y, steps=5, batch_size=20, history_path=bad, callback=lambda h, n: steps.append(1))
    assert steps == []
    assert_params_equal(net.params, before)


@pytest.mark.parametrize("error", [RuntimeError("callback failed"), KeyboardInterrupt()])
def test_a_failed_run_leaves_the_callers_network_unchanged(synth, tmp_path, error):
    # planted bug seen failing: training the caller's network in place (it ended half-trained)
    X, y, _, _ = synth
    net = small_net()
    before = snapshot(net)
    seen = []

    def callback(hist, work):
        seen.append(work)
        if hist.steps[-1] >= 10:
            raise error

    path = tmp_path / "h.json"
    with pytest.raises(type(error)):
        train(net, X, y, steps=50, eval_every=5, batch_size=20, callback=callback, history_path=path)
    assert_params_equal(net.params, before)
    assert seen and seen[0] is not net  # the callback sees the working copy
    assert not np.array_equal(seen[0].params[0]["W"], before[0]["W"])
    assert load_history(path).status == ("interrupted" if isinstance(error, KeyboardInterrupt) else "failed")


def test_nan_at_pruned_entries_trains_and_kept_nan_is_named(synth):
    # planted bugs seen failing: the update check on every entry ("non-finite update" at step 1);
    # mask * W in the weight decay; a NaN kept weight reported as "must be finite before training"
    X, y, _, _ = synth
    rng = np.random.default_rng(3)
    base = small_net()
    masks = random_masks(base, rng)
    clean, dirty = base.with_masks(masks), base.with_masks(masks)
    for p, q, m in zip(clean.params, dirty.params, masks):
        p["W"][~m["W"]] = 0.0
        q["W"][~m["W"]] = np.nan
    kw = dict(steps=30, batch_size=20, momentum=0.9, weight_decay=1e-3, seed=4)
    assert train(dirty, X, y, **kw).status == "completed"
    train(clean, X, y, **kw)
    for p, q, m in zip(clean.params, dirty.params, masks):
        np.testing.assert_array_equal(p["W"][m["W"]], q["W"][m["W"]])
        assert np.isnan(q["W"][~m["W"]]).all()  # the stored pruned values are untouched
    kept = base.copy()
    kept.params[1]["W"][0, 0] = np.nan
    with pytest.raises(ValueError, match=r"net.params\[1\]\['W'\] \(layer 1, Dense"):
        train(kept, X, y, steps=3)
