r"""Lottery tickets: iterative magnitude pruning (IMP) with rewinding (Frankle & Carbin 2019).

One run (``p`` = ``sparsity_per_round``, ``m`` = number of weights of the pruned layers):

round 0
    Train the dense network (``steps_per_round`` steps) from its initial weights ``W_0``. If
    ``rewind_step = k > 0``, the parameters after ``k`` steps of this run are saved as ``W_k``
    (``W_0`` itself when ``k = 0``).
round r = 1 .. rounds
    Prune: among the weights still kept, keep the ``n_r`` with the largest ``|c ⊙ W|`` of the
    network trained in round ``r - 1`` and prune the rest, where

    .. math:: n_r = \lfloor m (1 - p)^r + 1/2 \rfloor \quad (\text{round half up}),

    so the density after round ``r`` is ``n_r / m``, i.e. ``(1 - p)^r`` rounded to a whole count
    (never more than the count kept before). ``scope="global"`` ranks all pruned layers together
    (one top-k over their concatenated weights, layer order then C order); ``scope="layer"`` applies
    the same rule to each layer separately (``n_r^l = floor(m_l (1 - p)^r + 1/2)``). Ties: the lower
    index is kept. A pruned weight is never revived: masks only lose entries. This is
    :func:`refnet.pruning.prune` of :func:`refnet.pruning.magnitude_scores` with
    ``rounding="half_up"`` (:func:`refnet.pruning.keep_count`).
    Rewind: every parameter (weights and biases) is reset to ``W_k``; with the new mask, the
    surviving weights start from their step-``k`` values and the pruned ones are exactly 0.
    Train ``steps_per_round - k`` steps (the rest of the schedule, as in Frankle et al. 2020's
    rewinding), with the same batch order seed every round; the optimiser's momentum buffer is not
    rewound (it restarts at 0) and the batch order restarts from the seed's beginning.

Training is :func:`refnet.training.train` (SGD with momentum, weight decay on masked weights); it
keeps pruned gradients at exactly 0. Biases are never pruned (their masks stay as given).
"""

from __future__ import annotations

import numbers
import time
import warnings

import numpy as np

from ._checks import check_choice, check_float, check_int
from .network import Network, check_net
from .pruning import keep_count, magnitude_scores, prune
from .progress import Progress, progress_target
from .training import train

__all__ = ["imp", "magnitude_prune", "kept_count"]


def kept_count(m: int, density: float) -> int:
    """``floor(m * density + 1/2)``: the number of weights kept at a target density.

    .. deprecated::
        Use ``refnet.pruning.keep_count(m, density=density, rounding="half_up")``, the one
        keep-count rule; this alias warns (DeprecationWarning) and forwards to it.
    """
    warnings.warn(
        "refnet.lottery.kept_count is deprecated; use "
        "refnet.pruning.keep_count(m, density=density, rounding='half_up')",
        DeprecationWarning,
        stacklevel=2,
    )
    return keep_count(m, density=density, rounding="half_up")


def _weight_layers(net: Network, layers) -> list[int]:
    aff = [i for i, layer in enumerate(net.layers) if "W" in layer.keys]
    if not aff:
        raise ValueError("net has no layer with weights to prune")
    if layers is None:
        return aff
    out = []
    for i in layers:
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, numbers.Integral):
            raise TypeError(f"layers must hold int layer indices, got {i!r}")
        if int(i) not in aff:
            raise ValueError(f"layers: {i} is not the index of a layer with weights; those are {aff}")
        if int(i) not in out:
            out.append(int(i))
    if not out:
        raise ValueError("layers must name at least one layer with weights")
    return sorted(out)


def magnitude_prune(net: Network, density: float, *, scope: str = "global", layers=None) -> list[dict]:
    """Masks that keep the largest ``|mask * W|`` among the kept weights, at a target density.

    The kept count is ``floor(m * density + 1/2)`` over the ``m`` weights of ``layers`` (global) or
    per layer (``scope="layer"``), capped at the number currently kept. Existing pruned weights stay
    pruned. Other parameters' masks (biases, layers not in ``layers``) are copied unchanged.

    This is ``prune(net, magnitude_scores(net), density=density, scope=scope, layers=layers,
    rounding="half_up", warn=False)`` (:func:`refnet.pruning.prune`: ties to the lower flat index),
    with ``density = 0`` allowed (every weight of ``layers`` pruned).

    Returns
    -------
    list of dict
        New masks, one dict per layer (as ``net.masks``).
    """
    check_net(net)
    density = check_float(density, "density", min_value=0.0, max_value=1.0)
    scope = check_choice(scope, "scope", ["global", "layer"])
    idx = _weight_layers(net, layers)
    if density == 0.0:  # keep_count is 0 for every group; prune itself asks for density > 0
        masks = [{k: v.copy() for k, v in m.items()} for m in net.masks]
        for i in idx:
            masks[i]["W"] = np.zeros_like(masks[i]["W"])
        return masks
    return prune(net, magnitude_scores(net), density=density, scope=scope, layers=idx, rounding="half_up", warn=False)


def _snapshot(net: Network) -> list[dict]:
    return [{k: v.copy() for k, v in p.items()} for p in net.params]


def imp(
    net: Network,
    X,
    y,
    *,
    rounds: int = 5,
    sparsity_per_round: float = 0.2,
    steps_per_round: int = 1000,
    lr: float = 0.1,
    batch_size: int = 100,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    rewind_step: int = 0,
    scope: str = "global",
    layers=None,
    seed=0,
    X_test=None,
    y_test=None,
    progress=None,
) -> dict:
    r"""Iterative magnitude pruning with rewinding (see the module docstring for the algorithm).

    Parameters
    ----------
    net : Network
        The initial network (its weights are ``W_0``; existing masks are respected: pruned stays
        pruned). Not changed.
    X, y : training data, as for :func:`refnet.training.train`
    rounds : int >= 0
        Pruning rounds after the dense round 0 (so ``rounds + 1`` trainings).
    sparsity_per_round : float in (0, 1)
        Fraction ``p`` of the REMAINING weights pruned each round.
    steps_per_round : int >= 1
        Training steps of round 0; later rounds train ``steps_per_round - rewind_step`` steps.
    lr, batch_size, momentum, weight_decay : as for :func:`refnet.training.train`
    rewind_step : int, 0 <= k < steps_per_round
        0: rewind to the initial weights; k > 0: to the weights after k steps of round 0.
    scope : {"global", "layer"}
    layers : list of int, optional
        Indices of the layers whose weights are pruned (default: every layer with weights).
    seed : int
        Seed of the batch order of every round's training (the same order each round).
    X_test, y_test : optional
        Test accuracy of each round's trained network.
    progress : None, bool, text stream or callable
        A bar over the rounds (None: on stderr when it is a terminal; True: stderr; a stream:
        there; False: none), or ``progress(record)`` after each round (:mod:`refnet.progress`).

    Returns
    -------
    dict
        ``"history"``: one record per round 0..rounds with ``round``, ``density`` (kept fraction of
        the pruned layers' weights), ``n_kept``, ``layer_density`` (dict layer index -> fraction),
        ``test_acc`` (None without test data), ``test_loss``, ``train_loss`` (last logged mean
        training loss), ``steps`` (trained in that round), ``time`` (s) and ``masks`` (the masks the
        round trained with). ``"net"``: the network trained in the last round. ``"rewind_params"``:
        the parameters ``W_k`` rewound to. ``"settings"``: the arguments.
    """
    check_net(net)
    rounds = check_int(rounds, "rounds", min_value=0)
    p = check_float(sparsity_per_round, "sparsity_per_round", min_value=0.0, max_value=1.0,
                    min_inclusive=False, max_inclusive=False)
    steps_per_round = check_int(steps_per_round, "steps_per_round", min_value=1)
    rewind_step = check_int(rewind_step, "rewind_step", min_value=0)
    if rewind_step >= steps_per_round:
        raise ValueError(f"rewind_step must be < steps_per_round ({steps_per_round}), got {rewind_step}")
    scope = check_choice(scope, "scope", ["global", "layer"])
    idx = _weight_layers(net, layers)
    if isinstance(seed, np.random.Generator):
        raise TypeError("seed must be an int (every round reuses the same batch order), got a Generator")
    check_int(seed, "seed", min_value=0)
    if (X_test is None) != (y_test is None):
        raise ValueError("X_test and y_test must be given together (or neither)")
    target = progress_target(progress, allow_callable=True)  # checked before any work
    train_kw = dict(lr=lr, batch_size=batch_size, momentum=momentum, weight_decay=weight_decay, seed=seed,
                    progress=False, train_eval_size=0)

    m_total = sum(net.masks[i]["W"].size for i in idx)
    work = net.copy()
    rewind = None
    history = []

    with Progress(False if target is None else target, rounds + 1, desc="IMP round", unit="rounds",
                  allow_callable=True) as bar:
        for r in range(rounds + 1):
            t0 = time.perf_counter()
            if r == 0:
                if rewind_step == 0:
                    rewind = _snapshot(work)
                    hist = train(work, X, y, steps=steps_per_round, **train_kw)
                else:
                    saved = {}

                    def grab(h, n, saved=saved):
                        if h.steps[-1] == rewind_step:
                            saved["params"] = _snapshot(n)

                    hist = train(work, X, y, steps=steps_per_round, eval_every=rewind_step, callback=grab, **train_kw)
                    rewind = saved["params"]
                steps_done = steps_per_round
            else:
                new_masks = magnitude_prune(work, (1.0 - p) ** r, scope=scope, layers=idx)
                work = Network(work.layers, in_shape=work.in_shape, dtype=work.dtype, params=rewind, masks=new_masks)
                steps_done = steps_per_round - rewind_step
                hist = train(work, X, y, steps=steps_done, **train_kw)
            test_loss = test_acc = None
            if X_test is not None:
                test_loss, test_acc = work.evaluate(X_test, y_test)
            n_kept = int(sum(int(work.masks[i]["W"].sum()) for i in idx))
            rec = {
                "round": r,
                "density": n_kept / m_total,
                "n_kept": n_kept,
                "layer_density": {i: float(work.masks[i]["W"].mean()) for i in idx},
                "test_acc": test_acc,
                "test_loss": test_loss,
                "train_loss": hist.final_train_loss,
                "steps": steps_done,
                "time": time.perf_counter() - t0,
                "masks": [{k: v.copy() for k, v in mm.items()} for mm in work.masks],
            }
            history.append(rec)
            bar.update(rec, postfix=lambda: f"density {rec['density']:.4f}, train loss {rec['train_loss']:.4f}"
                       + ("" if rec["test_acc"] is None else f", test acc {rec['test_acc']:.4f}"))

    return {
        "history": history,
        "net": work,
        "rewind_params": rewind,
        "settings": {
            "rounds": rounds,
            "sparsity_per_round": p,
            "steps_per_round": steps_per_round,
            "lr": lr,
            "batch_size": batch_size,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "rewind_step": rewind_step,
            "scope": scope,
            "layers": idx,
            "seed": seed,
        },
    }
