"""The one progress helper and the refnet logger (refnet/progress.py), and the loops that use it."""

import io
import logging
import sys

import numpy as np
import pytest

import refnet as rn
from refnet import progress as P
from refnet import training


class Terminal(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self):
        return True


def as_terminal(monkeypatch):
    """Make stderr a terminal (inside the test: pytest's capture replaces stderr between setup and
    call)."""
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    return term


def small_problem():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 6))
    y = rng.integers(0, 3, 40)
    return rn.mlp([6, 8, 3], activation="tanh", seed=0), X, y


# ------------------------------------------------------------------------------------------
# the argument
# ------------------------------------------------------------------------------------------
def test_none_is_silent_without_a_terminal_and_a_bar_on_one(monkeypatch):
    # planted bug seen failing: None resolved to stderr whatever isatty says
    terminal = as_terminal(monkeypatch)
    assert P.progress_target(None) is terminal  # stderr is a terminal here
    with P.Progress(None, 3, desc="step") as bar:
        for _ in range(3):
            bar.update()
    assert "step 3/3" in terminal.getvalue()
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal
    assert P.progress_target(None) is None
    with P.Progress(None, 3, desc="step") as bar:
        assert not bar.shown and not bar.active
        bar.update()
    assert sys.stderr.getvalue() == ""


def test_false_is_silent_and_true_is_stderr(capsys):
    with P.Progress(False, 2, desc="x") as bar:
        bar.update(postfix="never shown")
    assert capsys.readouterr().err == ""
    with P.Progress(True, 2, desc="rounds", unit="rounds") as bar:
        bar.update(n=2, postfix="a b")
    err = capsys.readouterr().err
    assert "rounds 2/2" in err and "a b" in err


def test_bar_on_a_given_stream():
    # planted bug seen failing: the postfix function never called
    buf = io.StringIO()
    with P.Progress(buf, 4, desc="AI step", unit="steps") as bar:
        for k in range(4):
            bar.update(k, postfix=lambda: f"objective {0.5:.3f}")
    out = buf.getvalue()
    assert out.startswith("\rAI step 0/4") and out.endswith("\n")
    assert "AI step 4/4" in out and "objective 0.500" in out and "steps/s" in out


def test_counter_without_total_and_messages_above_the_bar():
    buf = io.StringIO()
    bar = P.Progress(buf, None, desc="lenet", unit="units")
    bar.describe("train/seed0")
    bar.write("lenet: train/seed0 done in 0.1s")
    bar.update()
    bar.close()
    bar.close()  # twice is fine
    out = buf.getvalue()
    assert "lenet: train/seed0 done in 0.1s\n" in out and "lenet 1 units" in out and "train/seed0" in out


def test_callable_receives_the_records_and_draws_nothing(capsys):
    # planted bug seen failing: the record dropped (callable called without arguments)
    got = []
    with P.Progress(lambda *r: got.append(r), 3, desc="x", allow_callable=True) as bar:
        assert bar.active and not bar.shown
        bar.update(1, 0.5, postfix="ignored")
        bar.update(2, 0.25)
    assert got == [(1, 0.5), (2, 0.25)]
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("bad", ["yes", 3, 1.0, [sys.stderr]])
def test_bad_progress_is_a_type_error_naming_it(bad):
    with pytest.raises(TypeError, match="progress must be None, True, False or a text stream"):
        P.Progress(bad, 3, desc="x")
    with pytest.raises(TypeError, match="args.progress must be"):
        P.progress_target(bad, name="args.progress")
    with pytest.raises(TypeError, match="progress must be None, a bool, a text stream or a callable"):
        P.Progress(bad, 3, desc="x", allow_callable=True)
    with pytest.raises(TypeError, match="or a text stream, got function"):
        P.Progress(lambda *r: None, 3, desc="x")  # a callable only where the loop takes one


def test_messages_go_to_the_refnet_logger_when_no_bar(caplog):
    assert P.logger is logging.getLogger("refnet") and P.get_logger() is P.logger
    assert P.get_logger("validation").name == "refnet.validation"
    assert any(isinstance(h, logging.NullHandler) for h in P.logger.handlers)
    with caplog.at_level(logging.INFO, logger="refnet"):
        P.Progress(False, 1, desc="x").write("a message")
    assert [r.getMessage() for r in caplog.records if r.name == "refnet"] == ["a message"]


# ------------------------------------------------------------------------------------------
# the loops
# ------------------------------------------------------------------------------------------
def test_train_bar_on_a_terminal_by_default(monkeypatch):
    terminal = as_terminal(monkeypatch)
    net, X, y = small_problem()
    training.train(net, X, y, steps=12, batch_size=10, X_test=X, y_test=y)
    out = terminal.getvalue()
    assert "step 12/12" in out and "loss " in out and "test acc " in out


def test_train_refuses_a_callable():
    net, X, y = small_problem()
    with pytest.raises(TypeError, match="progress must be None, True, False or a text stream"):
        training.train(net, X, y, steps=2, batch_size=10, progress=lambda *a: None)


def test_approximate_isometry_progress(capsys):
    # planted bug seen failing: the callable called every 10th step only
    net, X, y = small_problem()
    net = net.with_masks(rn.snip(net, X, y, sparsity=0.5))
    got = []
    _, report = rn.approximate_isometry(net, steps=7, progress=lambda step, F: got.append((step, F)),
                                        return_report=True, tol=0.0)
    assert [s for s, _ in got] == list(range(1, 8)) and got[-1][1] == report["objective_after"]
    buf = io.StringIO()
    rn.approximate_isometry(net, steps=7, progress=buf, tol=0.0)
    out = buf.getvalue()
    assert "AI step 7/7" in out and "objective " in out and out.endswith("\n")
    rn.approximate_isometry(net, steps=7)  # None, and pytest's stderr is not a terminal
    assert capsys.readouterr().err == ""
    with pytest.raises(TypeError, match="progress"):
        rn.approximate_isometry(net, steps=1, progress="yes")


def test_imp_progress_bar_callable_and_checked_first():
    # IMP reports through refnet.progress: a bar on a given stream with one update per round, a
    # callable gets each round's record, and a bad progress is refused before any training
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((30, 6)), rng.integers(0, 3, 30)
    net = rn.mlp([6, 8, 3], activation="tanh", seed=0)
    kw = dict(rounds=2, steps_per_round=3, batch_size=10, seed=0)
    buf = io.StringIO()
    rn.imp(net, X, y, progress=buf, **kw)
    assert "IMP round 3/3" in buf.getvalue() and "density" in buf.getvalue()
    recs = []
    rn.imp(net, X, y, progress=recs.append, **kw)
    assert [r["round"] for r in recs] == [0, 1, 2]
    before = [p["W"].copy() for p in net.params]
    with pytest.raises(TypeError, match="progress"):
        rn.imp(net, X, y, progress="yes", **kw)
    assert all(np.array_equal(a, p["W"]) for a, p in zip(before, net.params))


def test_synflow_and_jacobian_batches_report_progress():
    # SynFlow rounds and the Jacobian batches of the spectrum functions draw one bar each on a given
    # stream, are silent by default under pytest, and refuse a bad progress before any work
    net = rn.mlp([6, 8, 8, 3], activation="tanh", seed=0)
    X = np.random.default_rng(1).standard_normal((25, 6))
    buf = io.StringIO()
    quiet = rn.synflow_prune(net, 0.5, iterations=4)
    shown = rn.synflow_prune(net, 0.5, iterations=4, progress=buf)
    assert "SynFlow round 4/4" in buf.getvalue()
    assert all(np.array_equal(a["W"], b["W"]) for a, b in zip(quiet, shown))
    buf = io.StringIO()
    rn.jsv_stats(net, X, batch_size=10, progress=buf)
    assert "Jacobian batch 3/3" in buf.getvalue()
    buf = io.StringIO()
    rn.spectrum.layer_singular_values(net, X, batch_size=10, progress=buf)
    assert "Jacobian batch 3/3" in buf.getvalue()
    for bad in (lambda: rn.synflow_prune(net, 0.5, progress="yes"), lambda: rn.jsv_stats(net, X, progress=3),
                lambda: rn.singular_values(net, X, progress="yes")):
        with pytest.raises(TypeError, match="progress"):
            bad()
