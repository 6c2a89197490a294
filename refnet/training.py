r"""Mini-batch SGD with heavy-ball momentum on a (possibly pruned) network.

The objective is the papers' (PAPER.md section 8)

.. math:: \mathcal{L}(W) = \frac{1}{B} \sum_{i \in \text{batch}} \ell(f(x_i; c \odot W), y_i)
          + \lambda \sum_l \lVert c^l \odot W^l \rVert_F^2 ,

with ``c`` the masks and ``lambda`` = ``weight_decay`` (biases are not decayed). One step, for
every parameter ``W`` with gradient ``g = dL/dW`` (exactly zero at pruned entries):

.. math:: v \leftarrow \mu v + g, \qquad W \leftarrow W - \eta v ,

``mu`` = ``momentum`` and ``eta`` = ``lr`` (``v`` starts at 0; ``momentum=0`` is plain SGD).
Since ``g`` and ``v`` are zero wherever ``c = 0``, the stored ``W`` at pruned positions never
changes and the effective weight ``c * W`` there stays exactly zero.

All or nothing. :func:`train` checks every argument (the history file included: it is written
once, status "running", before the first step) and then trains a working copy of the network; the
caller's network receives the result only when the run completes (or the callback stops it). A
run that fails in any way (divergence, Ctrl-C, a callback's exception) leaves the caller's network
exactly as it was. Divergence raises :class:`TrainingDiverged` with the partial result attached
(``.history`` and ``.net``, the working copy with the last finite parameters), so nothing is lost.

Batches are epochs of a random permutation of the training rows drawn from
``numpy.random.default_rng(seed)``: each epoch visits ``floor(n / batch_size)`` full batches (the
last ``n mod batch_size`` rows of that epoch's permutation are skipped, so every step sees exactly
``batch_size`` examples and the skipped rows differ from epoch to epoch). No global RNG is used; a
seed gives bitwise identical parameters on every run.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ._checks import as_rng, check_float, check_int
from ._io import atomic_write_json, read_json
from .losses import get_loss
from .network import Network, check_net
from .progress import Progress, progress_target

__all__ = ["History", "TrainingDiverged", "train", "load_history"]

HISTORY_FORMAT = "refnet.History"
HISTORY_VERSION = 1
DEFAULT_N_EVALS = 20  # eval_every=None -> about this many evaluations over the run


# ============================================================================================
# History
# ============================================================================================


class TrainingDiverged(RuntimeError, FloatingPointError):
    """Training diverged: a non-finite loss, network output, gradient or update.

    A ``RuntimeError`` (a failed run, not a bad argument; also a ``FloatingPointError``, what
    :func:`train` raised before, so existing ``except FloatingPointError`` clauses still catch it).
    The message names the step. The caller's network is unchanged; the partial result is attached:

    Attributes
    ----------
    history : History
        The run so far, ``status == "diverged"`` and ``error`` the message (None if the exception
        was made outside :func:`train`).
    net : Network
        The working copy :func:`train` trained: the parameters from before step ``step`` when the
        message says "at step s", those after step ``step`` when it says "after step s" (finite
        parameters whose output on the evaluation data is not).
    step : int
        The step named in the message.
    """

    def __init__(self, message: str, *, step: int, history=None, net=None):
        super().__init__(message)
        self.step, self.history, self.net = step, history, net


@dataclass
class History:
    """What a training run recorded, one entry per evaluation point.

    Lists (same length, one entry per evaluation):

    steps : list of int
        Optimiser steps completed at the evaluation (1-based; the last one is the final step).
    train_loss : list of float
        Mean of the mini-batch objective (loss + weight-decay term) over the steps since the
        previous evaluation.
    test_loss, test_acc : list of float or None
        Mean loss (without weight decay) and accuracy on the whole test set (None without one).
    train_acc : list of float or None
        Accuracy on the first ``min(n, train_eval_size)`` training rows (None if disabled).
    elapsed : list of float
        Seconds since the start of training (evaluation time included).

    Settings: ``n_steps`` (steps asked for), ``lr`` (the first step's), ``lr_schedule`` (the
    ``[first_step, lr]`` phases of a schedule, or None for a constant lr), ``momentum``, ``weight_decay``,
    ``batch_size``, ``loss`` (name), ``seed`` (int, or None for a Generator), ``n_train``,
    ``n_test``, ``eval_every``. State: ``status`` is "running", "completed", "stopped" (the
    callback asked to stop), "diverged" (non-finite loss; ``error`` says where), "interrupted"
    (KeyboardInterrupt) or "failed" (another exception, named in ``error``);
    ``wall_time`` is the total seconds. ``meta`` is free-form JSON-able information (the CLI puts
    the data set, architecture and init there).
    """

    n_steps: int = 0
    lr: float = 0.0
    lr_schedule: list | None = None
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 0
    loss: str = "cross_entropy"
    seed: int | None = None
    n_train: int = 0
    n_test: int = 0
    eval_every: int = 0
    steps: list = field(default_factory=list)
    train_loss: list = field(default_factory=list)
    test_loss: list = field(default_factory=list)
    test_acc: list = field(default_factory=list)
    train_acc: list = field(default_factory=list)
    elapsed: list = field(default_factory=list)
    status: str = "running"
    error: str | None = None
    wall_time: float = 0.0
    meta: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ summaries
    @property
    def _test_points(self) -> list:
        return [(s, a) for s, a in zip(self.steps, self.test_acc) if a is not None]

    @property
    def best_test_error(self) -> float | None:
        """``1 - max(test_acc)`` over the checkpoints (the papers' reported error); None if no
        test set was evaluated."""
        pts = self._test_points
        return None if not pts else 1.0 - max(a for _, a in pts)

    @property
    def best_test_step(self) -> int | None:
        """The step of the best test accuracy (the first one on ties)."""
        pts = self._test_points
        if not pts:
            return None
        best = max(a for _, a in pts)
        return next(s for s, a in pts if a == best)

    @property
    def final_test_acc(self) -> float | None:
        """Test accuracy at the last evaluation (None if no test set)."""
        return self.test_acc[-1] if self.test_acc else None

    @property
    def final_test_error(self) -> float | None:
        acc = self.final_test_acc
        return None if acc is None else 1.0 - acc

    @property
    def final_train_loss(self) -> float | None:
        return self.train_loss[-1] if self.train_loss else None

    @property
    def steps_done(self) -> int:
        return self.steps[-1] if self.steps else 0

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict:
        """A JSON-able dict (floats, ints, None, lists) with ``format`` and ``version`` keys."""
        d = dataclasses.asdict(self)
        d["best_test_error"] = self.best_test_error
        d["best_test_step"] = self.best_test_step
        d["final_test_acc"] = self.final_test_acc
        return {"format": HISTORY_FORMAT, "version": HISTORY_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict) -> "History":
        """Inverse of :meth:`to_dict` (derived keys are ignored, unknown keys are an error)."""
        if not isinstance(d, dict) or d.get("format") != HISTORY_FORMAT:
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"d must be a {HISTORY_FORMAT} dict, got format {got!r}")
        if d.get("version") != HISTORY_VERSION:
            raise ValueError(f"d must have version {HISTORY_VERSION}, got {d.get('version')!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        derived = {"format", "version", "best_test_error", "best_test_step", "final_test_acc"}
        unknown = set(d) - names - derived
        if unknown:
            raise ValueError(f"d has unknown keys {sorted(unknown)}")
        values = {k: v for k, v in d.items() if k in names}
        _check_history_fields(values)
        return cls(**values)

    def to_rows(self) -> list[dict]:
        """One tidy row per evaluation: ``step``, ``train_loss``, ``test_loss``, ``test_acc``,
        ``train_acc`` and ``elapsed`` (None where a quantity was not measured)."""
        cols = ("train_loss", "test_loss", "test_acc", "train_acc", "elapsed")
        at = lambda xs, i: xs[i] if i < len(xs) else None  # noqa: E731
        return [{"step": s, **{c: at(getattr(self, c), i) for c in cols}} for i, s in enumerate(self.steps)]

    def to_dataframe(self):
        """:meth:`to_rows` as a :class:`pandas.DataFrame` (pandas is an optional extra)."""
        from .tables import to_dataframe

        return to_dataframe(self.to_rows())

    def save_csv(self, path) -> None:
        """Write :meth:`to_rows` as CSV to ``path`` atomically (the tidy twin of :meth:`save_json`)."""
        from .tables import write_csv

        write_csv(path, self.to_rows(), ("step", "train_loss", "test_loss", "test_acc", "train_acc", "elapsed"))

    def save_json(self, path) -> None:
        """Write :meth:`to_dict` as JSON to ``path`` atomically (temporary file in the same
        folder, then ``os.replace``), so a reader never sees a half-written file."""
        atomic_write_json(path, self.to_dict(), indent=1, allow_nan=False)

    @classmethod
    def load_json(cls, path) -> "History":
        """Read a history written by :meth:`save_json`. A damaged file (empty, truncated, not JSON)
        or one that is not a history (another format, unknown keys, values of the wrong type) is a
        ``ValueError`` naming the path and what is wrong."""
        d = read_json(path, "history file")
        try:
            return cls.from_dict(d)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"history file {os.fspath(path)!r}: {exc}") from None


_STATUSES = ("running", "completed", "stopped", "diverged", "interrupted", "failed")


def _check_history_fields(v: dict) -> None:
    """TypeError / ValueError naming the first entry of a history dict of the wrong type."""

    def is_int(x):
        return isinstance(x, int) and not isinstance(x, bool)

    def is_num(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    def bad(key, want):
        raise ValueError(f"d[{key!r}] must be {want}, got {v[key]!r:.80}")

    for key in ("n_steps", "batch_size", "n_train", "n_test", "eval_every"):
        if key in v and not (is_int(v[key]) and v[key] >= 0):
            bad(key, "a non-negative int")
    for key in ("lr", "momentum", "weight_decay", "wall_time"):
        if key in v and not is_num(v[key]):
            bad(key, "a number")
    if "seed" in v and not (v["seed"] is None or is_int(v["seed"])):
        bad("seed", "an int or null")
    if "loss" in v and not isinstance(v["loss"], str):
        bad("loss", "a str")
    if "status" in v and v["status"] not in _STATUSES:
        bad("status", f"one of {list(_STATUSES)}")
    if "error" in v and not (v["error"] is None or isinstance(v["error"], str)):
        bad("error", "a str or null")
    if "meta" in v and not isinstance(v["meta"], dict):
        bad("meta", "an object")
    if "lr_schedule" in v and v["lr_schedule"] is not None:
        sched = v["lr_schedule"]
        if not isinstance(sched, list) or not all(isinstance(p, list) and len(p) == 2 and is_int(p[0]) and is_num(p[1])
                                                   for p in sched):
            bad("lr_schedule", "null or a list of [first_step, lr] pairs")
    lengths = {}
    for key, ok, want in (("steps", is_int, "ints"), ("train_loss", is_num, "numbers"), ("elapsed", is_num, "numbers"),
                          ("test_loss", None, "numbers or nulls"), ("test_acc", None, "numbers or nulls"),
                          ("train_acc", None, "numbers or nulls")):
        if key not in v:
            continue
        check = ok or (lambda x: x is None or is_num(x))
        if not isinstance(v[key], list) or not all(check(x) for x in v[key]):
            bad(key, f"a list of {want}")
        lengths[key] = len(v[key])
    if len(set(lengths.values())) > 1:
        raise ValueError(f"the lists of a history must have one entry per evaluation, got lengths {lengths}")


def load_history(path) -> History:
    """Read a history JSON file written by :meth:`History.save_json`."""
    return History.load_json(path)


# ============================================================================================
# Progress (refnet.progress) and the argument checks
# ============================================================================================


def _loss_name(loss) -> str:
    if isinstance(loss, str):
        return loss
    return getattr(loss, "__name__", type(loss).__name__)


def _evaluate(net: Network, X, y, loss_fn, step: int, what: str, batch_size: int = 1000) -> tuple[float, float]:
    """Mean loss and accuracy, as :meth:`Network.evaluate`, but a non-finite network output is a
    :class:`TrainingDiverged` rather than the loss's ValueError."""
    total, correct = 0.0, 0
    labels = y if y.ndim == 1 else y.argmax(axis=1)
    with np.errstate(over="ignore", invalid="ignore"):
        for i in range(0, len(X), batch_size):
            out = net.forward(X[i : i + batch_size])  # (b, n_classes)
            if not np.isfinite(out).all():
                raise TrainingDiverged(
                    f"training diverged after step {step}: the network output on the {what} is not "
                    "finite; try a smaller lr", step=step
                )
            value, _ = loss_fn(out, y[i : i + batch_size])
            if not math.isfinite(value):
                raise TrainingDiverged(
                    f"training diverged after step {step}: the loss on the {what} is {value}; try a smaller lr",
                    step=step
                )
            total += float(value) * len(out)
            correct += int(np.sum(out.argmax(axis=1) == labels[i : i + batch_size]))
    return total / len(X), correct / len(X)


def _check_lr(lr, steps: int) -> list:
    """``lr`` as schedule phases ``[(first_step, lr), ...]`` (one phase for a constant)."""
    if isinstance(lr, (list, tuple)):
        if not lr:
            raise ValueError("lr must be a positive float or a non-empty list of (first_step, lr) pairs, got []")
        phases = []
        for i, item in enumerate(lr):
            if not isinstance(item, (list, tuple)) or len(item) != 2:
                raise ValueError(f"lr[{i}] must be a (first_step, lr) pair, got {item!r}")
            first = check_int(item[0], f"lr[{i}][0] (first step)", min_value=1)
            if first > steps:
                raise ValueError(f"lr[{i}][0] (first step) must be <= steps ({steps}), got {first}")
            rate = check_float(item[1], f"lr[{i}][1] (learning rate)", min_value=0.0, min_inclusive=False)
            if phases and first <= phases[-1][0]:
                raise ValueError(f"lr: the first steps of the phases must increase, got {phases[-1][0]} then {first}")
            phases.append((first, rate))
        if phases[0][0] != 1:
            raise ValueError(f"lr: the first phase must start at step 1, got {phases[0][0]}")
        return phases
    return [(1, check_float(lr, "lr", min_value=0.0, min_inclusive=False))]


@dataclass
class _TrainSetup:
    """The checked arguments of :func:`train` (see there), with the data as arrays, the schedule as
    phases ``[(first_step, lr), ...]`` and the resolved progress stream (None: no bar)."""

    X: np.ndarray
    y: np.ndarray
    steps: int
    phases: list
    batch_size: int
    momentum: float
    weight_decay: float
    loss_fn: Callable
    X_test: np.ndarray | None
    y_test: np.ndarray | None
    eval_every: int
    stream: object
    callback: Callable | None
    history_path: object
    train_eval_size: int
    rng: np.random.Generator
    history: History

    @functools.cached_property
    def starts(self) -> list:
        return [s0 for s0, _ in self.phases]

    def lr_at(self, step: int) -> float:
        """The learning rate of ``step`` (1-based): the rate of the last phase started by then."""
        return self.phases[bisect.bisect_right(self.starts, step) - 1][1]


def _check_train_args(net, X, y, *, steps, lr, batch_size, momentum, weight_decay, loss, seed, X_test, y_test,
                      eval_every, progress, callback, history_path, train_eval_size, meta) -> _TrainSetup:
    """Every check of :func:`train`'s arguments, in one place, before anything runs: a bad argument
    is a TypeError or ValueError naming it and the network is not touched. Returns them checked,
    with the empty :class:`History` of the run."""
    check_net(net)
    if len(net.out_shape) != 1:
        raise ValueError(f"net must output (B, n_classes) logits for training, got per-example shape {net.out_shape}")
    X, y = net.check_targets(X, y, "X", "y")
    n = X.shape[0]
    steps = check_int(steps, "steps", min_value=1)
    phases = _check_lr(lr, steps)  # [(first_step, lr), ...]
    batch_size = check_int(batch_size, "batch_size", min_value=1)
    if batch_size > n:
        raise ValueError(f"batch_size must be <= the number of training examples ({n}), got {batch_size}")
    momentum = check_float(momentum, "momentum", min_value=0.0, max_value=1.0, max_inclusive=False)
    weight_decay = check_float(weight_decay, "weight_decay", min_value=0.0)
    loss_fn = get_loss(loss)
    if (X_test is None) != (y_test is None):
        raise ValueError("X_test and y_test must be given together (or neither)")
    if X_test is not None:
        X_test, y_test = net.check_targets(X_test, y_test, "X_test", "y_test")
    if eval_every is None:
        eval_every = max(1, steps // DEFAULT_N_EVALS)
    else:
        eval_every = check_int(eval_every, "eval_every", min_value=1)
    stream = progress_target(progress)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
    if history_path is not None:
        if not isinstance(history_path, (str, os.PathLike)):
            raise TypeError(f"history_path must be a str or os.PathLike, got {type(history_path).__name__}")
        if not os.fspath(history_path):
            raise ValueError("history_path must be a file path, got an empty one")
        if os.path.isdir(history_path):
            raise ValueError("history_path must be a file path such as run/history.json, got the folder "
                             f"{os.fspath(history_path)!r}")
    train_eval_size = check_int(train_eval_size, "train_eval_size", min_value=0)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    try:
        json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"meta must be JSON-able: {exc}") from None
    seed_value = None if isinstance(seed, np.random.Generator) else seed
    rng = as_rng(seed)
    net.check_finite("net")  # pruned entries may hold anything; kept ones must be finite
    for i, p in enumerate(net.params):
        for k, a in p.items():
            if not a.flags.writeable:
                raise ValueError(f"net.params[{i}][{k!r}] is read-only; train writes the trained values into it")
    history = History(
        n_steps=steps,
        lr=phases[0][1],
        lr_schedule=[[s0, r] for s0, r in phases] if len(phases) > 1 else None,
        momentum=momentum,
        weight_decay=weight_decay,
        batch_size=batch_size,
        loss=_loss_name(loss),
        seed=int(seed_value) if seed_value is not None else None,
        n_train=n,
        n_test=0 if X_test is None else int(X_test.shape[0]),
        eval_every=eval_every,
        meta=dict(meta),
    )
    return _TrainSetup(X, y, steps, phases, batch_size, momentum, weight_decay, loss_fn, X_test, y_test, eval_every,
                       stream, callback, history_path, train_eval_size, rng, history)


# ============================================================================================
# The pieces of the loop: batches, one SGD step, the record
# ============================================================================================


def _batches(rng: np.random.Generator, n: int, batch_size: int):
    """Row indices of the successive batches: epochs of ``rng.permutation(n)`` (drawn when the
    epoch's first batch is asked for), each cut into ``n // batch_size`` full batches."""
    per_epoch = n // batch_size
    while True:
        order = rng.permutation(n)
        for j in range(per_epoch):
            yield order[j * batch_size : (j + 1) * batch_size]  # (batch_size,)


class _SGD:
    """Heavy-ball SGD on ``net.params`` in place: ``v <- mu v + g``, ``W <- W - eta v``.

    Parameters pruned somewhere have their gradient multiplied by the mask (belt and braces; the
    network already returns exactly-zero gradients there). A step computes every update first and
    applies them only if all are finite, so a diverging step leaves the parameters as they were.
    """

    def __init__(self, net: Network, momentum: float, weight_decay: float, loss_fn: Callable):
        self.net, self.momentum, self.weight_decay, self.loss_fn = net, momentum, weight_decay, loss_fn
        params, masks = net.params, net.masks
        self.keys = [[k for k in p] for p in params]
        self.partial = [{k: (None if masks[l][k].all() else masks[l][k]) for k in self.keys[l]}
                        for l in range(len(params))]
        self.velocity = ([{k: np.zeros_like(params[l][k]) for k in self.keys[l]} for l in range(len(params))]
                         if momentum else None)
        self.track_stats = net.mode == "train"  # batch norm in train mode: update the running statistics

    def step(self, step: int, xb: np.ndarray, yb: np.ndarray, lr: float) -> float:
        """One step on the batch ``(xb, yb)`` with learning rate ``lr``; returns its objective
        (mean loss + weight decay). :class:`TrainingDiverged` (naming ``step``) on a non-finite
        loss, network output or update (at a kept entry)."""
        net, params, velocity = self.net, self.net.params, self.velocity
        with np.errstate(over="ignore", invalid="ignore"):
            try:
                value, grads, trace = net.loss_and_grads(xb, yb, loss=self.loss_fn, weight_decay=self.weight_decay,
                                                         return_trace=True)
            except ValueError as exc:
                # the inputs were validated, so a failure here is non-finite activations
                # (the loss refuses non-finite logits); anything else is re-raised as is
                if np.isfinite(net.forward(xb)).all():
                    raise
                raise TrainingDiverged(
                    f"training diverged at step {step}: the network output is not finite ({exc}); "
                    "try a smaller lr", step=step
                ) from exc
        if not math.isfinite(value):
            raise TrainingDiverged(f"training diverged at step {step}: loss is {value}; try a smaller lr", step=step)
        updates = []
        for l, (p, g) in enumerate(zip(params, grads)):
            for k in self.keys[l]:
                gk = g[k]
                if self.partial[l][k] is not None:
                    gk = np.where(self.partial[l][k], gk, 0.0)
                if velocity is not None:
                    v = self.momentum * velocity[l][k] + gk  # v = mu v + g
                else:
                    v = gk
                with np.errstate(over="ignore", invalid="ignore"):
                    new = p[k] - lr * v  # W - eta v
                kept = self.partial[l][k]  # pruned entries (v = 0) keep their stored value, whatever it is
                if not (np.isfinite(new).all() or (kept is not None and np.isfinite(new[kept]).all())):
                    raise TrainingDiverged(
                        f"training diverged at step {step}: non-finite update of params[{l}][{k!r}] "
                        f"(loss {value:.6g}); try a smaller lr", step=step
                    )
                updates.append((l, k, v, new))
        # running statistics of train-mode batch norm (PyTorch's update), applied with the step
        stats = net.updated_buffers(trace) if self.track_stats else None
        if stats is not None and not all(np.isfinite(a).all() for b in stats for a in b.values()):
            raise TrainingDiverged(f"training diverged at step {step}: non-finite batch-norm running statistics "
                                   f"(loss {value:.6g}); try a smaller lr", step=step)
        for l, k, v, new in updates:
            params[l][k][...] = new
            if velocity is not None:
                velocity[l][k] = v
        if stats is not None:
            for buf, new in zip(net.buffers, stats):
                for k in buf:
                    buf[k][...] = new[k]
        return value


class _Recorder:
    """The :class:`History` of a run as it goes: the mean training objective since the last
    evaluation, the evaluations, and the history file written after each of them."""

    def __init__(self, net: Network, s: _TrainSetup):
        self.net, self.s, self.hist = net, s, s.history
        # evaluations use batch norm's running statistics (PyTorch's model.eval()): a view sharing the arrays
        self.eval_net = net.with_mode("eval", share=True) if net.mode == "train" else net
        n = s.X.shape[0]
        self.X_tr_eval = s.X[: min(n, s.train_eval_size)]
        self.y_tr_eval = s.y[: min(n, s.train_eval_size)]
        self.loss_sum, self.loss_count = 0.0, 0
        self.last_acc = None
        self.t0 = time.perf_counter()

    def add(self, value: float) -> None:
        self.loss_sum += value
        self.loss_count += 1

    def postfix(self) -> str:
        """The bar's text: the mean objective since the last evaluation (or at it), the last test
        accuracy."""
        loss = self.loss_sum / self.loss_count if self.loss_count else self.hist.train_loss[-1]
        return f"loss {loss:.4f}" + ("" if self.last_acc is None else f", test acc {self.last_acc:.4f}")

    def save(self) -> None:
        self.hist.wall_time = time.perf_counter() - self.t0
        if self.s.history_path is not None:
            self.hist.save_json(self.s.history_path)

    def evaluate(self, step: int) -> None:
        s, hist = self.s, self.hist
        # compute everything first, so that a failure leaves the lists consistent
        tl = ta = tra = None
        if s.X_test is not None:
            tl, ta = _evaluate(self.eval_net, s.X_test, s.y_test, s.loss_fn, step, "test set")
            self.last_acc = ta
        if len(self.X_tr_eval):
            tra = _evaluate(self.eval_net, self.X_tr_eval, self.y_tr_eval, s.loss_fn, step, "training rows")[1]
        hist.steps.append(step)
        hist.train_loss.append(self.loss_sum / self.loss_count)
        hist.test_loss.append(tl)
        hist.test_acc.append(ta)
        hist.train_acc.append(tra)
        hist.elapsed.append(time.perf_counter() - self.t0)
        self.loss_sum, self.loss_count = 0.0, 0
        self.save()

    @contextlib.contextmanager
    def ending(self):
        """Record how the run ends: an exception sets ``status`` ("diverged", "interrupted" or
        "failed") and ``error``, writes the history and propagates; a divergence gets the history
        and the working network attached (:class:`TrainingDiverged`)."""
        hist = self.hist
        try:
            yield
        except FloatingPointError as exc:
            hist.status, hist.error = "diverged", str(exc)
            self.save()
            if not isinstance(exc, TrainingDiverged):  # pragma: no cover - every divergence is one
                m = re.search(r"step (\d+)", str(exc))
                raise TrainingDiverged(str(exc), step=int(m[1]) if m else 0, history=hist, net=self.net) from exc
            exc.history, exc.net = hist, self.net
            raise
        except KeyboardInterrupt:
            hist.status, hist.error = "interrupted", "KeyboardInterrupt"
            self.save()
            raise
        except Exception as exc:
            hist.status, hist.error = "failed", f"{type(exc).__name__}: {exc}"
            self.save()
            raise
        self.save()


# ============================================================================================
# train
# ============================================================================================


def train(
    net: Network,
    X,
    y,
    *,
    steps: int = 1000,
    lr: float = 0.1,
    batch_size: int = 100,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    loss="cross_entropy",
    seed=0,
    X_test=None,
    y_test=None,
    eval_every: int | None = None,
    progress=None,
    callback: Callable | None = None,
    history_path=None,
    train_eval_size: int = 1000,
    meta: dict | None = None,
) -> History:
    r"""Train ``net`` with mini-batch SGD and heavy-ball momentum, all or nothing.

    Each step draws the next batch of ``batch_size`` rows (epochs of a permutation from
    ``seed``), computes the mean loss plus ``weight_decay * sum_l ||c^l * W^l||^2`` and its
    gradient ``g`` with :meth:`Network.loss_and_grads`, then for every parameter

    .. math:: v \leftarrow \mu v + g, \qquad W \leftarrow W - \eta v.

    Every argument is checked first (the history file is written once, status "running", before
    the first step, so a path that cannot be written fails here). A working copy of ``net`` is
    trained; when the run completes or the callback stops it, the result is written into
    ``net.params`` (the same array objects, updated in place), so the ``net`` passed in ends
    trained. Any failure (divergence, Ctrl-C, an exception of the callback) leaves ``net``
    exactly as it was. Pruned entries have ``g = v = 0``: the stored ``W`` there never changes
    (it may hold anything, NaN included: the effective weight is ``where(c, W, 0)``); kept
    parameters must be finite.

    Batch normalization: in train mode (``net.mode == "train"``) every step normalises with the
    batch statistics and then updates the running statistics (``net.buffers``, committed with the
    parameters) as PyTorch does (:meth:`Network.updated_buffers`: momentum, unbiased batch
    variance); the evaluations use the running statistics (eval mode, as PyTorch's
    ``model.eval()``). A network in eval mode trains with its running statistics fixed. ``gamma``
    and ``beta`` are trained like biases (no weight decay).

    Parameters
    ----------
    net : Network
        Its output must be ``(n_classes,)`` logits.
    X : ndarray, shape (n, *net.in_shape)
    y : ndarray, shape (n,) int labels in ``[0, n_classes)``, or (n, n_classes) float targets
    steps : int >= 1
        Optimiser steps (mini-batches).
    lr : float > 0, or a schedule
        Learning rate ``eta``: a constant, or piecewise-constant phases as a list of
        ``(first_step, lr)`` pairs with strictly increasing first steps, the first of them 1
        (``[(1, 0.1), (5001, 0.01)]``: 0.1 for steps 1-5000, then 0.01). The momentum buffer
        ``v`` carries over from one phase to the next (chaining ``train`` calls would restart it
        and the epoch order).
    batch_size : int, 1 <= batch_size <= n
    momentum : float in [0, 1)
        ``mu``; 0 is plain SGD.
    weight_decay : float >= 0
        ``lambda`` of the penalty on the masked weights (PAPER.md uses 0.00025).
    loss : "cross_entropy", "mse" or a callable ``(z, y) -> (loss, eps)``
    seed : int or numpy.random.Generator
        Source of the batch order (a Generator is advanced).
    X_test, y_test : ndarray, optional
        Evaluated (mean loss, accuracy) at every evaluation point; both or neither.
    eval_every : int >= 1, optional
        Steps between evaluations; the last step is always evaluated. Default: about 20
        evaluations over the run (``max(1, steps // 20)``).
    progress : None, bool or text stream
        A progress bar over the steps (:class:`refnet.progress.Progress`: the mean objective
        since the last evaluation, the last test accuracy, the rate), redrawn at most 10 times a
        second. None: on stderr only if stderr is a terminal; True: stderr; False: none; a
        stream: there.
    callback : callable, optional
        Called after every evaluation as ``callback(history, work)``, ``work`` the working copy
        being trained; if it returns True training stops (``history.status == "stopped"``) and
        the result is committed to ``net``.
    history_path : str or os.PathLike, optional
        The history is written there (atomically, as JSON) after every evaluation and when the
        run ends, also when it ends by an error, so an interrupted run keeps what it finished.
    train_eval_size : int >= 0
        Training accuracy is measured on the first ``min(n, train_eval_size)`` rows at each
        evaluation (0 disables it).
    meta : dict, optional
        JSON-able information stored in ``History.meta``.

    Returns
    -------
    History

    Raises
    ------
    TypeError, ValueError
        Bad arguments (the message names the argument, non-finite kept parameters name the layer,
        an unwritable ``history_path`` names it); nothing has run.
    TrainingDiverged
        (a ``RuntimeError`` and a ``FloatingPointError``) Training diverged; the message names the
        step, ``net`` is unchanged, and the exception carries the partial result: ``.history``
        (``status="diverged"``) and ``.net``, the working copy. "at step s": the loss, the output,
        a gradient or an updated (kept) parameter of step s was non-finite, and ``.net`` holds the
        parameters from before step s. "after step s": the parameters after step s are finite but
        the network's output on the evaluation data is not (``.net`` holds them). The history
        file, if any, is written with ``status="diverged"``.
    """
    s = _check_train_args(net, X, y, steps=steps, lr=lr, batch_size=batch_size, momentum=momentum,
                          weight_decay=weight_decay, loss=loss, seed=seed, X_test=X_test, y_test=y_test,
                          eval_every=eval_every, progress=progress, callback=callback, history_path=history_path,
                          train_eval_size=train_eval_size, meta=meta)
    hist = s.history
    work = net.copy()  # trained here; the caller's net gets the result only at the end
    rec = _Recorder(work, s)
    if s.history_path is not None:
        try:  # the first write, before the first step: a path that cannot be written fails now
            rec.save()
        except OSError as exc:
            raise ValueError(f"history_path {os.fspath(s.history_path)!r} cannot be written: {exc}") from None
    sgd = _SGD(work, s.momentum, s.weight_decay, s.loss_fn)
    batches = _batches(s.rng, s.X.shape[0], s.batch_size)
    with Progress(False if s.stream is None else s.stream, s.steps, desc="step", unit="steps") as bar:
        with rec.ending():
            for step in range(1, s.steps + 1):
                idx = next(batches)  # (batch_size,) rows of this step
                rec.add(sgd.step(step, s.X[idx], s.y[idx], s.lr_at(step)))
                if step % s.eval_every == 0 or step == s.steps:
                    rec.evaluate(step)
                    if s.callback is not None and s.callback(hist, work) is True:
                        hist.status = "stopped"
                        break
                bar.update(postfix=rec.postfix)
            else:
                hist.status = "completed"
    for dst, src in zip(net.params, work.params):  # commit: the same array objects, updated in place
        for k in dst:
            dst[k][...] = src[k]
    for dst, src in zip(net.buffers, work.buffers):  # batch norm's running statistics
        for k in dst:
            dst[k][...] = src[k]
    return hist
