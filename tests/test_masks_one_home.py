"""One source of truth for masks (refnet/pruning.py): the top-k selector, its threshold, the
keep-count rule and the method dispatch, and what is built on them.

* ``top_k_mask`` against a naive stable-argsort oracle and ``kth_largest`` against ``np.sort`` on
  hypothesis arrays (ties, ``+-inf``, alive masks, ``k = 0``, ``k`` = all and beyond, float32 and
  integer scores), with their argument errors;
* ``keep_count``'s three roundings on exact halves against hand-computed counts;
* ``prune``'s ``rounding`` and ``layers`` arguments, ``synflow_prune``'s ``rounding``;
* ``masks_for`` against the per-method code the ``prune`` and ``spectrum`` commands ran;
* ``lottery.magnitude_prune`` (now ``prune`` of ``magnitude_scores`` with ``rounding="half_up"``)
  against its former implementation, and the deprecated ``lottery.kept_count``;
* no second top-k selector in the library.
"""

import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from netgen import cnns, mlps

import refnet as rn
from refnet import lottery, pruning
from refnet.pruning import DATA_METHODS, METHODS, keep_count, kth_largest, masks_for, prune, top_k_mask

ROOT = Path(__file__).resolve().parents[1]


# -------------------------------------------------------------------------------------------
# oracles
# -------------------------------------------------------------------------------------------


def _oracle_top_k(scores, k, alive):
    """The rule spelled out: a stable argsort of -score over the alive flat indices, first k."""
    flat = np.asarray(scores).ravel()
    a = np.ones(flat.size, dtype=bool) if alive is None else np.asarray(alive).ravel()
    idx = np.flatnonzero(a)
    order = idx[np.argsort(-flat[idx].astype(np.float64), kind="stable")]
    keep = np.zeros(flat.size, dtype=bool)
    keep[order[:k]] = True
    return keep.reshape(np.shape(scores))


def _oracle_kth(scores, k, alive):
    flat = np.asarray(scores).ravel()
    a = np.ones(flat.size, dtype=bool) if alive is None else np.asarray(alive).ravel()
    sa = np.sort(flat[a])[::-1]
    if k == 0:
        return math.inf
    if k > sa.size:
        return -math.inf
    return float(sa[k - 1])


def _old_magnitude_prune(net, density, scope="global", layers=None):
    """lottery.magnitude_prune as it was written before it was built on prune."""
    aff = [i for i, layer in enumerate(net.layers) if "W" in layer.keys]
    idx = aff if layers is None else sorted(set(layers))

    def top_k(scores, alive, k):
        s = np.where(alive, scores, -np.inf)
        order = np.argsort(-s, kind="stable")
        keep = np.zeros(s.shape, dtype=bool)
        keep[order[:k]] = True
        return keep

    def kept(m, d):
        return int(math.floor(m * d + 0.5))

    masks = [{k: v.copy() for k, v in m.items()} for m in net.masks]
    if scope == "global":
        scores = np.concatenate([np.abs(net.params[i]["W"] * net.masks[i]["W"]).ravel() for i in idx])
        alive = np.concatenate([net.masks[i]["W"].ravel() for i in idx])
        keep = top_k(scores, alive, min(kept(scores.size, density), int(alive.sum())))
        start = 0
        for i in idx:
            n = net.masks[i]["W"].size
            masks[i]["W"] = keep[start : start + n].reshape(net.masks[i]["W"].shape)
            start += n
    else:
        for i in idx:
            W, M = net.params[i]["W"], net.masks[i]["W"]
            k = min(kept(W.size, density), int(M.sum()))
            masks[i]["W"] = top_k(np.abs(W * M).ravel(), M.ravel(), k).reshape(M.shape)
    return masks


def _old_command_masks(method, net, sparsity, xs, ys, seed, scope, batch_size=None):
    """The per-method code of the ``prune`` command (and of ``spectrum --prune`` for snip, random
    and magnitude with scope global) before the dispatch moved to pruning.masks_for."""
    if method == "synflow":
        return pruning.synflow_prune(net, sparsity=sparsity, scope=scope)
    if method in ("snip", "uniform", "pred_raw", "pred_softmax"):
        loss = "cross_entropy" if method == "snip" else method
        scores = pruning.connection_sensitivity(net, xs, ys, loss=loss, batch_size=batch_size)
    elif method == "random":
        scores = pruning.random_scores(net, seed)
    else:
        scores = pruning.magnitude_scores(net)
    return pruning.prune(net, scores, sparsity=sparsity, scope=scope)


def _same(a, b):
    return len(a) == len(b) and all(
        set(x) == set(y) and all(np.array_equal(x[k], y[k]) and x[k].dtype == y[k].dtype for k in x)
        for x, y in zip(a, b)
    )


# -------------------------------------------------------------------------------------------
# top_k_mask and kth_largest
# -------------------------------------------------------------------------------------------

_VALUES = st.sampled_from([0.0, -0.0, 1.0, 1.0, 2.5, -3.0, 7.0, np.inf, -np.inf, 1e-300, 1e300])


@st.composite
def scored(draw):
    """(scores, alive or None, k): few distinct values (many ties), any shape up to 3-D."""
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=6))
    kind = draw(st.sampled_from(["float64", "float32", "int64"]))
    if kind == "int64":
        s = draw(hnp.arrays(np.int64, shape, elements=st.integers(-3, 3)))
    else:
        with np.errstate(over="ignore"):  # 1e300 is inf in float32
            s = draw(hnp.arrays(np.float64, shape, elements=_VALUES)).astype(kind)
    alive = None if draw(st.booleans()) else draw(hnp.arrays(np.bool_, shape))
    size = int(np.prod(shape))
    k = draw(st.integers(0, size + 2))
    return s, alive, k


@settings(max_examples=400)
@given(scored())
def test_top_k_mask_matches_the_stable_argsort_oracle(case):
    s, alive, k = case
    got = top_k_mask(s, k, alive)
    want = _oracle_top_k(s, k, alive)
    assert got.dtype == bool and got.shape == s.shape
    np.testing.assert_array_equal(got, want)
    n_alive = s.size if alive is None else int(alive.sum())
    assert int(got.sum()) == min(k, n_alive)
    if alive is not None:
        assert not np.any(got & ~alive)  # pruned stays pruned


@settings(max_examples=400)
@given(scored())
def test_kth_largest_matches_np_sort(case):
    s, alive, k = case
    got = kth_largest(s, k, alive)
    assert isinstance(got, float)
    assert got == _oracle_kth(s, k, alive)
    # the threshold and the mask agree: everything above it is kept, nothing below it
    keep = top_k_mask(s, k, alive)
    a = np.ones(s.shape, dtype=bool) if alive is None else alive
    assert np.all(keep[a & (s > got)]) and not np.any(keep[s < got])


def test_top_k_mask_ends_and_ties_by_hand():
    s = np.array([[1.0, 3.0, 3.0], [2.0, 3.0, 0.0]])
    assert top_k_mask(s, 0).sum() == 0 and top_k_mask(s, 6).all() and top_k_mask(s, 60).all()
    assert top_k_mask(s, 2).tolist() == [[False, True, True], [False, False, False]]  # lower index first
    alive = np.array([[True, False, True], [True, True, True]])
    assert top_k_mask(s, 2, alive).tolist() == [[False, False, True], [False, True, False]]
    assert top_k_mask(s, 9, alive).tolist() == alive.tolist()  # capped at the alive entries
    assert kth_largest(s, 3) == 3.0 and kth_largest(s, 4) == 2.0 and kth_largest(s, 4, alive) == 1.0
    assert kth_largest(s, 0) == math.inf and kth_largest(s, 7) == -math.inf
    assert kth_largest(s, 1, np.zeros_like(alive)) == -math.inf  # nothing alive


def test_top_k_mask_and_kth_largest_errors():
    s = np.arange(4.0)
    for fn in (top_k_mask, kth_largest):
        with pytest.raises(ValueError, match="NaN"):
            fn(np.array([1.0, np.nan]), 1)
        with pytest.raises(ValueError, match="k must be >= 0"):
            fn(s, -1)
        with pytest.raises(TypeError, match="k must be an int"):
            fn(s, True)
        with pytest.raises(TypeError, match="alive must be a boolean mask"):
            fn(s, 1, np.ones(4))
        with pytest.raises(ValueError, match="alive must have the shape"):
            fn(s, 1, np.ones(3, dtype=bool))
        with pytest.raises(TypeError, match="scores"):
            fn(np.array(["a", "b"]), 1)


# -------------------------------------------------------------------------------------------
# keep_count
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "m, density, half_even, half_up, synflow",
    [
        (10, 0.25, 2, 3, 3),  # m d = 2.5: to even 2, up 3; pruned int(0.75 * 10) = int(7.5) = 7
        (10, 0.35, 4, 4, 4),  # float64 m d = 3.5: to even 4; pruned int(6.5) = 6
        (10, 0.45, 4, 5, 5),  # m d = 4.5: to even 4, up 5; pruned int(5.5) = 5
        (3, 0.5, 2, 2, 2),  # m d = 1.5: to even 2, up 2; pruned int(1.5) = 1
        (5, 0.5, 2, 3, 3),  # m d = 2.5; pruned int(2.5) = 2
        (10, 0.21, 2, 2, 3),  # m d = 2.1: both round down; pruned int(7.9) = 7, so 3 kept
        (18, 0.25, 4, 5, 5),  # m d = 4.5; pruned int(13.5) = 13
        (7, 1.0, 7, 7, 7),
        (7, 0.0, 0, 0, 0),
        (0, 0.5, 0, 0, 0),
    ],
)
def test_keep_count_roundings_by_hand(m, density, half_even, half_up, synflow):
    assert keep_count(m, density=density) == half_even
    assert keep_count(m, density=density, rounding="half_even") == half_even
    assert keep_count(m, density=density, rounding="half_up") == half_up
    assert keep_count(m, density=density, rounding="synflow") == synflow
    if density in (0.25, 0.5, 0.0):  # 1 - sparsity is exact for these: the same counts
        assert keep_count(m, 1.0 - density, rounding="half_up") == half_up
        assert keep_count(m, 1.0 - density, rounding="synflow") == synflow


def test_keep_count_errors():
    for bad in ("half-up", "floor", "HALF_EVEN", None, 1):
        with pytest.raises(ValueError, match="rounding must be one of"):
            keep_count(10, 0.5, rounding=bad)
    with pytest.raises(ValueError, match="density must be in"):
        keep_count(10, density=1.5)
    with pytest.raises(ValueError, match="sparsity must be in"):
        keep_count(10, -0.1)
    with pytest.raises(ValueError, match="exactly one of sparsity"):
        keep_count(10, 0.5, density=0.5)
    with pytest.raises(ValueError, match="m must be >= 0"):
        keep_count(-1, 0.5)


def test_lottery_kept_count_is_a_deprecated_alias():
    with pytest.warns(DeprecationWarning, match="keep_count"):
        assert lottery.kept_count(10, 0.25) == 3  # half up, not to even
    with pytest.warns(DeprecationWarning):
        assert lottery.kept_count(10, 0.0) == 0
    with pytest.warns(DeprecationWarning):
        assert lottery.kept_count(129400, 0.8**3) == math.floor(129400 * 0.8**3 + 0.5)


# -------------------------------------------------------------------------------------------
# prune's rounding and layers
# -------------------------------------------------------------------------------------------


def _kept(masks, layers=None):
    return sum(int(m["W"].sum()) for i, m in enumerate(masks) if "W" in m and (layers is None or i in layers))


def test_prune_rounding_and_layers():
    net = rn.mlp([4, 3, 2], seed=0)  # 12 + 6 = 18 weights
    s = pruning.random_scores(net, 5)
    for rounding, k in (("half_even", 4), ("half_up", 5), ("synflow", 5)):  # 18 * 0.25 = 4.5
        m = prune(net, s, density=0.25, rounding=rounding, warn=False)
        assert _kept(m) == k
        ref = top_k_mask(np.concatenate([s[0]["W"].ravel(), s[1]["W"].ravel()]), k)
        np.testing.assert_array_equal(np.concatenate([m[0]["W"].ravel(), m[1]["W"].ravel()]), ref)
    # layers=[1]: only layer 1's 6 weights are ranked (k = round(6 * 0.5) = 3); layer 0 is copied
    pre = net.with_masks([{"W": np.arange(12).reshape(3, 4) % 2 == 0, "b": np.ones(3, bool)}, {}])
    m = prune(pre, [{}, s[1]], 0.5, layers=[1], warn=False)
    np.testing.assert_array_equal(m[0]["W"], pre.masks[0]["W"])
    assert m[0]["W"] is not pre.masks[0]["W"] and _kept(m, [1]) == 3
    np.testing.assert_array_equal(m[1]["W"].ravel(), top_k_mask(s[1]["W"].ravel(), 3))
    assert _same(prune(pre, s, 0.5, layers=[0, 1]), prune(pre, s, 0.5))
    for bad, err, match in (
        ([2], ValueError, "not the index of a layer with weights"),
        ([True], TypeError, "int layer"),
        ([], ValueError, "at least one"),
        (1, TypeError, "sequence"),
    ):
        with pytest.raises(err, match=match):
            prune(net, s, 0.5, layers=bad)
    with pytest.raises(ValueError, match="rounding"):
        prune(net, s, 0.5, rounding="up")


def test_synflow_prune_rounding():
    net = rn.mlp([6, 5, 3], activation="relu", seed=2)  # 30 + 15 = 45 weights
    for rounding in pruning.ROUNDINGS:
        m = pruning.synflow_prune(net, density=0.32, iterations=3, rounding=rounding, warn=False)
        assert _kept(m) == keep_count(45, density=0.32, rounding=rounding)
    # 45 * 0.32 = 14.4: 14 to even or up; pruned int(0.68 * 45) = int(30.6) = 30, so 15 kept
    assert [keep_count(45, density=0.32, rounding=r) for r in pruning.ROUNDINGS] == [14, 14, 15]


# -------------------------------------------------------------------------------------------
# masks_for: the one method dispatch
# -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scored_data():
    X, y = rn.data.load("synthetic")  # (1000, 20), 4 classes
    return X[:100], y[:100]


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("method", ("snip", "uniform", "pred_raw", "pred_softmax", "random", "magnitude", "synflow"))
def test_masks_for_equals_the_command_code_paths(method, scope, scored_data):
    xs, ys = scored_data
    net = rn.mlp([20, 16, 12, 4], activation="tanh", init="orthogonal", seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pred_softmax's zero-gradient warning, collapse warnings
        want = _old_command_masks(method, net, 0.8, xs, ys, 7, scope)
        got = masks_for(method, net, 0.8, x=xs, y=ys, seed=7, scope=scope)
        assert _same(got, want)
        if method in DATA_METHODS:  # the prune command's --score-batch-size
            want = _old_command_masks(method, net, 0.8, xs, ys, 7, scope, batch_size=30)
            assert _same(masks_for(method, net, 0.8, x=xs, y=ys, seed=7, scope=scope, batch_size=30), want)
        assert _same(masks_for(method, net, density=0.2, x=xs, y=ys, seed=7, scope=scope, warn=False), got)


def test_masks_for_spectrum_path_and_errors(scored_data):
    xs, ys = scored_data
    net = rn.mlp([20, 16, 4], seed=3)
    # the spectrum command: connection_sensitivity(net, Xs[:100], ys[:100]) (default loss and batch)
    want = pruning.prune(net, pruning.connection_sensitivity(net, xs, ys), sparsity=0.9)
    assert _same(masks_for("snip", net, 0.9, x=xs, y=ys, seed=0), want)
    assert _same(masks_for("random", net, 0.9, seed=0), pruning.prune(net, pruning.random_scores(net, 0), sparsity=0.9))
    assert set(DATA_METHODS) <= set(METHODS) and "synflow" in METHODS
    with pytest.raises(ValueError, match="method must be one of"):
        masks_for("obs", net, 0.9)
    with pytest.raises(ValueError, match="x must be given"):
        masks_for("uniform", net, 0.9)
    with pytest.raises(ValueError, match="y must be given"):
        masks_for("snip", net, 0.9, x=xs)
    with pytest.raises(ValueError, match="sparsity"):
        masks_for("snip", net, 1.0, x=xs, y=ys)
    with pytest.raises(TypeError, match="net must be a refnet Network"):
        masks_for("magnitude", "net", 0.5)


def test_masks_for_ranks_the_normalised_sensitivities(monkeypatch):
    """The commands ranked connection_sensitivity's default, normalised scores (not snip's raw
    ones): two raw scores one ulp apart tie after the division, and the tie goes to the lower index."""
    a = 47 / 7
    raw = np.array([[a, np.nextafter(a, np.inf)], [3.25, 0.25]])  # (n_out, n_in) = (2, 2)
    total = float(raw.sum())
    assert raw[0, 0] < raw[0, 1] and raw[0, 0] / total == raw[0, 1] / total  # the premise

    def sensitivity(net, x, y=None, loss="cross_entropy", *, batch_size=None, include_bias=False, normalize=True):
        return [{"W": raw / total if normalize else raw.copy()}]

    monkeypatch.setattr(pruning, "connection_sensitivity", sensitivity)
    net = rn.mlp([2, 2], bias=False, seed=0)
    x, y = np.zeros((3, 2)), np.array([0, 1, 0])
    for method in ("snip",) + pruning.UNSUPERVISED_LOSSES:
        m = masks_for(method, net, density=0.25, x=x, y=y)  # keeps 1 of 4
        assert m[0]["W"].tolist() == [[True, False], [False, False]]
        assert _same(m, _old_command_masks(method, net, 0.75, x, y, 0, "global"))


# -------------------------------------------------------------------------------------------
# lottery.magnitude_prune on prune + magnitude_scores
# -------------------------------------------------------------------------------------------


@settings(max_examples=60)
@given(st.one_of(mlps(max_depth=4, max_width=20), cnns()), st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.8 ** 3, 0.9, 1.0]),
       st.sampled_from(["global", "layer"]), st.data())
def test_magnitude_prune_equals_its_former_implementation(net_rng, density, scope, data):
    net, _ = net_rng
    aff = [i for i, layer in enumerate(net.layers) if "W" in layer.keys]
    layers = data.draw(st.one_of(st.none(), st.lists(st.sampled_from(aff), min_size=1, unique=True)))
    got = lottery.magnitude_prune(net, density, scope=scope, layers=layers)
    assert _same(got, _old_magnitude_prune(net, density, scope, layers))


def test_magnitude_prune_checks_its_network():
    with pytest.raises(TypeError, match="net must be a refnet Network"):
        lottery.magnitude_prune("net", 0.5)


# -------------------------------------------------------------------------------------------
# one top-k selector
# -------------------------------------------------------------------------------------------

#: what selects the k largest entries: a sort or partition of the scores, or the kernel's threshold
_SELECTOR = re.compile(
    r"\b(argsort|argpartition|topk|kthvalue)\s*\("  # np.argsort, x.argsort(), torch.topk, ...
    r"|\b(np|numpy|cp|cupy|torch)\.partition\s*\("  # not str.partition
    r"|\bkernels\.kth_largest\s*\("
)

#: a line that sorts for another purpose says so with this comment
_EXEMPT = "# not a top-k selection"


def _selectors(root: Path) -> list[str]:
    """``path:line: code`` of every top-k selection in ``root/refnet`` outside masks.py, where
    the one selector (:func:`refnet.masks.top_k_mask`) lives; the kernels live in ``kernels/``."""
    out = []
    for path in sorted((root / "refnet").rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel == "refnet/masks.py" or "__pycache__" in path.parts:
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if _SELECTOR.search(line.split("#", 1)[0]) and _EXEMPT not in line:
                out.append(f"{rel}:{n}: {line.strip()}")
    return out


def test_the_selector_scan_finds_what_is_planted(tmp_path):
    pkg = tmp_path / "refnet"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "masks.py").write_text("t = kernels.kth_largest(sa, k)\norder = np.argsort(-s)\n")
    (pkg / "ok.py").write_text(
        "from .pruning import kth_largest, top_k_mask\n"
        "m = top_k_mask(s, k)  # np.argsort(-s) in a comment\n"
        "t = kth_largest(s, k)\n"
        "r = np.argsort(v)  # not a top-k selection: ranks\n"
    )
    assert _selectors(tmp_path) == []
    (pkg / "sub" / "bad.py").write_text(
        "keep = np.argsort(-s, kind='stable')[:k]\nt = np.partition(s, n - k)[n - k]\n"
        "t = kernels.kth_largest(s, k)\nv, i = torch.topk(s, k)\norder = (-s).argsort()\n"
        "step, sep, rate = part.partition(':')\n"
    )
    assert [x.split(": ")[0] for x in _selectors(tmp_path)] == [f"refnet/sub/bad.py:{n}" for n in range(1, 6)]


def test_one_top_k_selector_in_the_library():
    found = _selectors(ROOT)
    assert not found, "a second top-k selection; use refnet.pruning.top_k_mask / kth_largest:\n" + "\n".join(found)
