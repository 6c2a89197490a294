"""Property-based fuzz test of the public API: hostile arguments get a clean error and change nothing.

For each main public function (mlp, Network, forward, loss_and_grads, evaluate, with_masks,
jacobian, jsv_stats, snip, prune, approximate_isometry, train, save, load_network), hypothesis
draws a call with at most one argument replaced by a hostile value: a wrong type, a wrong shape,
a wrong dtype, non-finite entries, an out-of-range number, a bad path, or a network whose KEPT
weights are not finite. The properties:

* the call succeeds, or raises ``ValueError`` / ``TypeError`` whose message names the argument
  that was replaced (or, for a damaged file, its path; a missing file is a ``FileNotFoundError``
  naming it);
* a deep copy of the network (parameters and masks), of the masks and scores passed in, and of the
  files in the work folder, taken before the call, equals them after a failed call (and after any
  call but a successful ``train``, which commits the trained weights);
* the networks used hold NaN, inf or ordinary values at PRUNED positions (the one rule: a pruned
  entry contributes exactly zero), so a successful uncorrupted call returns finite results.

How many cases CI tries: :data:`N_EXAMPLES` generated calls per function, :data:`N_FUNCTIONS`
functions, so 14 x 40 = 560 calls, derandomized under the "ci" hypothesis profile (tests/conftest.py).
The file runs in about 15 s on two busy cores.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import refnet as rn
from refnet.layers import Dense, Flatten
from refnet.network import Network

#: generated calls per function (each test below runs this many examples; REFNET_FUZZ_EXAMPLES=N
#: for a longer local run)
N_EXAMPLES = int(os.environ.get("REFNET_FUZZ_EXAMPLES", "40"))

N_IN, N_HID, N_OUT, B = 4, 5, 3, 8

# --------------------------------------------------------------------------------------------
# valid ingredients
# --------------------------------------------------------------------------------------------


def _net(variant: str) -> Network:
    """A 4-5-3 tanh MLP; pruned variants store 0.7, NaN or inf at the pruned weights (valid), and
    "kept_nan" / "kept_inf" hold a non-finite KEPT weight (a hostile network)."""
    net = rn.mlp([N_IN, N_HID, N_OUT], seed=0)
    if variant == "plain":
        return net
    rng = np.random.default_rng(1)
    masks = [{"W": rng.random(p["W"].shape) < 0.6} for p in net.params]
    for m in masks:
        m["W"].flat[0] = True  # a kept entry at index 0 (for the kept_* variants)
        m["W"].flat[-1] = False  # and a pruned one
    net = net.with_masks(masks)
    fill = {"pruned": 0.7, "pruned_nan": np.nan, "pruned_inf": -np.inf, "kept_nan": 0.7, "kept_inf": 0.7}[variant]
    for p, m in zip(net.params, net.masks):
        p["W"][~m["W"]] = fill
    if variant == "kept_nan":
        net.params[1]["W"].flat[0] = np.nan
    if variant == "kept_inf":
        net.params[0]["W"].flat[0] = np.inf
    return net


VALID_NETS = ("plain", "pruned", "pruned_nan", "pruned_inf")
HOSTILE_NETS = ("kept_nan", "kept_inf")

#: (function, network variant) pairs left out of the fuzz test until the modules behind them apply
#: the rules; test_known_gaps below fails (strict xfail) once one is fixed: then remove its entry.
KNOWN_GAPS: dict = {}

_rng = np.random.default_rng(0)
X = _rng.standard_normal((B, N_IN))
Y = np.arange(B) % N_OUT

#: hostile values that fit no argument
GENERIC = [None, "bogus", 2.5, -3, 0, True, float("nan"), float("inf"), -float("inf"), [], (), {},
           object(), b"x", 1 + 1j, np.float64("nan"), np.array([1.0, np.nan]), np.zeros((2, 3), dtype=np.complex128)]


def _bad_x():
    return [_x_with_nan(), X.astype(np.complex128), X.astype(bool), X.astype(np.float16),
            X.astype(object), X.astype(str), X[:, :3], X[0], X[None], np.zeros((0, N_IN)), "x",
            np.where(np.eye(B, N_IN, dtype=bool), np.inf, X)]


def _x_with_nan():
    x = X.copy()
    x[1, 2] = np.nan
    return x


def _bad_y():
    return [Y.astype(np.float64), Y[:, None], Y + N_OUT, Y - 1, Y[:-1], Y.astype(str), np.full((B, N_OUT), np.nan),
            np.eye(N_OUT)[Y][:, :2], Y.reshape(2, -1), "y"]


def _bad_masks(net):
    shapes = [p["W"].shape for p in net.params]
    return [[{"W": np.ones(s, bool)} for s in shapes[:1]], [{"W": np.ones((2, 2), bool)}, None],
            [{"W": np.full(s, 2)} for s in shapes], [{"W": np.full(s, np.nan)} for s in shapes], {"W": 1},
            [{"Q": np.ones(s, bool)} for s in shapes], [{"W": np.zeros(s, bool)} for s in shapes[:1]] + [None] * 3]


def _bad_scores(net):
    shapes = [p["W"].shape for p in net.params]
    return [[{"W": np.full(s, np.nan)} for s in shapes], [{"W": np.ones((1, 1))} for s in shapes], [{"W": "s"}] * 2,
            [{"W": np.ones(s)} for s in shapes[:1]], [{"W": np.ones(s, dtype=np.complex128)} for s in shapes]]


BAD_NUMBERS = [-1, 0, -0.5, 1.0, 1.5, float("nan"), float("inf"), -float("inf"), "0.5", True, None, 2.5]

#: argument -> its own hostile values (a callable of the network for masks and scores)
SPECIFIC = {
    "x": _bad_x, "X": _bad_x, "y": _bad_y,
    "sizes": lambda: [[4], [4, 0, 3], [4, 2.5, 3], [4, -1, 3], "abc", [4, 10**12, 10**6], [True, 3], [4, None, 3], 7],
    "in_shape": lambda: [(6.7,), (-1,), (), "4", (4, 0), (4.0,), (True,)],
    "layers": lambda: [[], [Dense(3, 2)], [Flatten(), 3], "dense", [Dense(N_IN, 10**9), Dense(10**9, 2)]],
    "activation": lambda: ["bogus", 3, "relu6"], "output_activation": lambda: ["bogus", 3],
    "init": lambda: ["bogus", 3, "sg"], "dtype": lambda: [np.int32, "complex128", np.float16, "bogus"],
    "seed": lambda: [-1, 2.5, "s", True], "bias": lambda: ["yes", 1.5],
    "loss": lambda: ["bogus", 3], "return_trace": lambda: [],
    "start": lambda: [-1, 5, 2.5, "0"], "end": lambda: [0, 9, -1, 1.5], "mode": lambda: ["bogus", 3],
    "batch_size": lambda: [0, -1, 2.5, 10**6, "1"], "epsilon": lambda: [-0.1, float("nan")],
    "sparsity": lambda: BAD_NUMBERS, "steps": lambda: [0, -1, 2.5, "3"], "lr": lambda: [0, -0.1, float("nan"), [], [(2, 0.1)]],
    "momentum": lambda: [1.0, -0.1, 2], "weight_decay": lambda: [-1, float("inf")],
    "scope": lambda: ["bogus", 3], "path": lambda: ["", 3, None],
}


# --------------------------------------------------------------------------------------------
# the calls: name -> (argument names, valid arguments(net, tmp), call(args, net))
# --------------------------------------------------------------------------------------------


def _save(net, path):
    net.save(path)


CALLS = {
    "mlp": (["sizes", "activation", "init", "seed", "bias", "output_activation", "dtype"],
            lambda net, tmp: dict(sizes=[N_IN, N_HID, N_OUT], activation="tanh", init="lecun", seed=0, bias=True,
                                  output_activation="identity", dtype=np.float64),
            lambda a, net: rn.mlp(**a)),
    "Network": (["layers", "in_shape", "init", "seed", "dtype", "params", "masks"],
                lambda net, tmp: dict(layers=net.layers, in_shape=(N_IN,), init="lecun", seed=0, dtype=np.float64,
                                      params=None, masks=None),
                lambda a, net: Network(**{k: v for k, v in a.items() if not (k in ("params", "masks") and v is None)})),
    "forward": (["x", "return_trace"], lambda net, tmp: dict(x=X, return_trace=False),
                lambda a, net: net.forward(**a)),
    "loss_and_grads": (["x", "y", "loss", "weight_decay"],
                       lambda net, tmp: dict(x=X, y=Y, loss="cross_entropy", weight_decay=0.1),
                       lambda a, net: net.loss_and_grads(**a)),
    "evaluate": (["x", "y", "loss", "batch_size"], lambda net, tmp: dict(x=X, y=Y, loss="mse", batch_size=3),
                 lambda a, net: net.evaluate(**a)),
    "with_masks": (["masks"], lambda net, tmp: dict(masks=[{"W": m["W"] & (np.arange(m["W"].size).reshape(m["W"].shape) % 3 > 0)}
                                                         for m in net.masks]),
                   lambda a, net: net.with_masks(**a)),
    "jacobian": (["net", "x", "start", "end", "mode"], lambda net, tmp: dict(net=net, x=X, start=0, end=None, mode="auto"),
                 lambda a, net: rn.jacobian(**a)),
    "jsv_stats": (["net", "x", "batch_size", "epsilon"], lambda net, tmp: dict(net=net, x=X, batch_size=4, epsilon=0.1),
                  lambda a, net: rn.jsv_stats(**a)),
    "snip": (["net", "x", "y", "sparsity"], lambda net, tmp: dict(net=net, x=X, y=Y, sparsity=0.5),
             lambda a, net: rn.snip(**a)),
    "prune": (["net", "scores", "sparsity", "scope"],
              lambda net, tmp: dict(net=net, scores=[{"W": np.random.default_rng(2).random(p["W"].shape)} for p in net.params],
                                    sparsity=0.5,
                                    scope="global"),
              lambda a, net: rn.prune(**a)),
    "approximate_isometry": (["net", "steps", "lr"], lambda net, tmp: dict(net=net, steps=3, lr=0.1),
                             lambda a, net: rn.approximate_isometry(**a)),
    "train": (["net", "X", "y", "steps", "lr", "batch_size", "momentum", "weight_decay", "history_path"],
              lambda net, tmp: dict(net=net, X=X, y=Y, steps=3, lr=0.1, batch_size=4, momentum=0.5, weight_decay=1e-3,
                                    history_path=os.path.join(tmp, "h.json")),
              lambda a, net: rn.train(**a, progress=False)),
    "save": (["path"], lambda net, tmp: dict(path=os.path.join(tmp, "n.npz")), lambda a, net: net.save(a["path"])),
    "load_network": (["path"], lambda net, tmp: dict(path=os.path.join(tmp, "saved.npz")),
                     lambda a, net: rn.load_network(a["path"])),
}
N_FUNCTIONS = len(CALLS)

#: message words that name each argument (besides the argument's own name)
ALIASES = {"net": ("net", "params"), "X": ("X",), "history_path": ("history_path",), "masks": ("masks",),
           "params": ("params",), "path": ("path", "network file")}


def _bad_path_values(tmp):
    """Hostile paths: a folder, damaged and wrong-format files (each named in the message)."""
    folder = os.path.join(tmp, "a-folder")
    os.makedirs(folder, exist_ok=True)
    empty = os.path.join(tmp, "empty.npz")
    open(empty, "wb").close()
    npy = os.path.join(tmp, "one.npy")
    np.save(npy, np.zeros(3))
    junk = os.path.join(tmp, "junk.npz")
    with open(junk, "wb") as fh:
        fh.write(b"PK\x03\x04 not really a zip archive")
    return [folder, empty, npy, junk, os.path.join(tmp, "missing.npz")]


def _snapshot_files(tmp) -> dict:
    out = {}
    for root, _, files in os.walk(tmp):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, tmp)] = fh.read()
    return out


def _copy_tree(obj):
    """A deep copy of the arrays inside lists / dicts / networks (for the 'changed nothing' check)."""
    if isinstance(obj, Network):
        return ("Network", _copy_tree(obj.params), _copy_tree(obj.masks))
    if isinstance(obj, np.ndarray):
        return obj.copy()
    if isinstance(obj, dict):
        return {k: _copy_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_copy_tree(v) for v in obj]
    return obj


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)) or a.shape != b.shape or a.dtype != b.dtype:
            return False
        return bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return True  # other objects: identity of non-array values is not checked


def _finite_result(name, out) -> bool:
    """Whether an uncorrupted call's result is finite (the pruned-NaN rule)."""
    if name == "forward":
        return bool(np.isfinite(out).all())
    if name == "loss_and_grads":
        return np.isfinite(out[0]) and all(np.isfinite(g).all() for d in out[1] for g in d.values())
    if name == "jacobian":
        return bool(np.isfinite(out).all())
    return True


@pytest.fixture(autouse=True)
def _in_a_scratch_folder(tmp_path, monkeypatch):
    """Hostile paths are relative ("bogus", ...): a call that accepts one writes into a scratch
    folder, never into the folder the tests run from."""
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("name", list(CALLS))
@settings(max_examples=N_EXAMPLES)
@given(data=st.data())
def test_hostile_arguments_give_clean_errors_and_change_nothing(name, data, tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("fuzz"))
    argnames, valid, call = CALLS[name]
    variants = [v for v in VALID_NETS + HOSTILE_NETS if v not in KNOWN_GAPS.get(name, ())]
    variant = data.draw(st.sampled_from(variants), label="net variant")
    net = _net(variant)
    _net("pruned").save(os.path.join(tmp, "saved.npz"))  # a good file for load_network
    args = valid(net, tmp)
    corrupted = None
    if variant in HOSTILE_NETS:
        corrupted = "net"
    elif data.draw(st.booleans(), label="corrupt an argument"):
        corrupted = data.draw(st.sampled_from(argnames), label="argument")
        pool = list(GENERIC)
        spec = SPECIFIC.get(corrupted)
        if corrupted in ("masks", "params"):
            pool += _bad_masks(net) if corrupted == "masks" else [[{"W": np.full_like(p["W"], np.nan), "b": p["b"]}
                                                                   for p in net.params]]
        elif corrupted == "scores":
            pool += _bad_scores(net)
        elif corrupted in ("path", "history_path"):
            pool += _bad_path_values(tmp)[: 1 if corrupted == "history_path" else None] + ["", 3]
        elif spec is not None:
            pool += spec()
        args[corrupted] = data.draw(st.sampled_from(pool), label="hostile value")

    before = _copy_tree([net, args])
    files = _snapshot_files(tmp)
    try:
        out = call(args, net)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        msg = str(exc)
        if isinstance(exc, FileNotFoundError):  # a missing file (not a damaged one) is this, naming it
            assert corrupted == "path" and args["path"] in msg, msg
        names = ALIASES.get(corrupted, (corrupted,)) if corrupted else argnames
        bad = args.get(corrupted)
        named = any(n in msg for n in names) or (isinstance(bad, str) and bad and bad in msg)
        assert corrupted is not None or variant in HOSTILE_NETS, f"{name} refused valid arguments: {msg}"
        assert named, f"{name}({corrupted}={bad!r:.60}) raised {type(exc).__name__} not naming it: {msg}"
        assert _same(before, _copy_tree([net, args])), f"{name} failed after changing its arguments"
        assert _snapshot_files(tmp) == files, f"{name} failed after changing files"
        return
    # success: nothing changed but what the call is for; uncorrupted results are finite
    if name != "train":
        assert _same(before, _copy_tree([net, args])), f"{name} changed its arguments"
    if corrupted is None and variant in VALID_NETS:
        assert _finite_result(name, out), f"{name} on the {variant} network gave non-finite results"


@pytest.mark.xfail(strict=True, reason="refnet/pruning.py and refnet/isometry.py do not yet apply the NaN rule")
@pytest.mark.parametrize("name,variant", [(n, v) for n, vs in KNOWN_GAPS.items() for v in vs])
def test_known_gaps(name, variant, tmp_path):
    argnames, valid, call = CALLS[name]
    net = _net(variant)
    args = valid(net, str(tmp_path))
    try:
        call(args, net)
    except ValueError as exc:
        assert variant in HOSTILE_NETS and "net" in str(exc)
    else:
        assert variant in VALID_NETS
