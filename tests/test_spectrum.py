"""Tests for refnet.spectrum (Jacobian singular values, LDI, the spectrum command) and refnet.plots.

Every test group was seen failing once on a planted bug (noted per test).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import refnet as rn
from refnet import data
from refnet.arch import build
from refnet.cli import main
from refnet.spectrum import (
    collect_singular_values,
    format_stats,
    jsv_stats,
    layer_singular_values,
    singular_values,
    summarize,
)


@pytest.fixture(autouse=True, scope="module")
def _single_threaded_blas():
    """Stacks of small SVDs are much slower with OpenBLAS threads on a busy machine (measured on 2
    busy cores: 4 stacked 100 x 100 SVDs 0.55 s threaded, ~0.003 s pinned), so pin BLAS to one
    thread when threadpoolctl is installed. Results do not depend on it."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


# --------------------------------------------------------------------------------------------
# an independent oracle: explicit forward pass, D W per layer, explicit matrix products
# --------------------------------------------------------------------------------------------


def _layer_jacobians_by_hand(net, x):
    """Per layer ``D^l W^l`` (B, N_l, N_{l-1}) from a hand-written tanh/identity forward pass."""
    Js, a = [], x
    for layer, p, m in zip(net.layers, net.params, net.masks):
        W = p["W"] * m["W"]  # (N_l, N_{l-1})
        h = a @ W.T + p["b"] * m["b"]  # (B, N_l)
        if layer.activation.name == "tanh":
            a, D = np.tanh(h), 1.0 - np.tanh(h) ** 2
        else:
            assert layer.activation.name == "identity"
            a, D = h, np.ones_like(h)
        Js.append(D[:, :, None] * W[None])  # (B, N_l, N_{l-1})
    return Js


def _direct_stats(net, x, epsilon):
    Js = _layer_jacobians_by_hand(net, x)
    J = Js[0]
    for Jl in Js[1:]:
        J = Jl @ J  # later layers on the left: (B, N_K, N_0)
    s = np.linalg.svd(J, compute_uv=False)  # (B, r)
    pooled = s.ravel()
    cn_ex = s.max(axis=1) / s.min(axis=1)
    ls = [np.linalg.svd(Jl, compute_uv=False) for Jl in Js]
    return {
        "mean": pooled.mean(), "std": pooled.std(), "min": pooled.min(), "max": pooled.max(),
        "cn": pooled.max() / pooled.min(), "cn_mean": cn_ex.mean(), "cn_median": np.median(cn_ex),
        "n_examples": len(x), "n_values": pooled.size,
        "ldi": [np.mean(np.abs(1.0 - v) <= epsilon) for v in ls],
        "layer_mean": [v.mean() for v in ls], "layer_min": [v.min() for v in ls], "layer_max": [v.max() for v in ls],
    }, s, ls


def _small_tanh_mlp(seed=3):
    net = rn.mlp([12, 16, 9, 7, 5], activation="tanh", init="lecun", seed=seed)
    rng = np.random.default_rng(seed)
    # non-zero biases so they matter; gain ~1.5 so some layer singular values exceed 1 + epsilon
    params = [{"W": 1.5 * p["W"], "b": 0.3 * rng.standard_normal(p["b"].shape)} for p in net.params]
    return net.with_params(params), rng.standard_normal((23, 12))


# --------------------------------------------------------------------------------------------
# jsv_stats against the direct computation
# --------------------------------------------------------------------------------------------


def test_jsv_stats_equals_direct_computation():
    # planted bug seen failing: pooling only the largest singular value of each example (sv[:, :1])
    net, x = _small_tanh_mlp()
    st = jsv_stats(net, x, batch_size=5, epsilon=0.1, layerwise=True)
    ref, s, ls = _direct_stats(net, x, 0.1)
    for k in ("mean", "std", "min", "max", "cn", "cn_mean", "cn_median"):
        assert st[k] == pytest.approx(ref[k], rel=1e-12, abs=0), k
    assert st["n_examples"] == 23 and st["n_values"] == 23 * 5
    for k in ("layer_mean", "layer_min", "layer_max"):
        np.testing.assert_allclose(st[k], ref[k], rtol=1e-12, atol=0, err_msg=k)
    assert st["ldi"] == ref["ldi"]
    assert st["layers"] == [1, 2, 3, 4] and st["ldi_epsilon"] == 0.1
    assert st["layer_names"] == ["Dense[tanh]"] * 3 + ["Dense[identity]"]
    # the raw arrays too: shapes, descending rows
    sv = singular_values(net, x, batch_size=4)
    assert sv.shape == (23, 5)
    np.testing.assert_allclose(sv, s, rtol=1e-12, atol=1e-15)
    assert np.all(np.diff(sv, axis=1) <= 0)
    lsv = layer_singular_values(net, x, batch_size=6)
    assert [v.shape for v in lsv] == [(23, 12), (23, 9), (23, 7), (23, 5)]
    for a, b in zip(lsv, ls):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)


def test_jsv_stats_plain_python_and_json():
    net, x = _small_tanh_mlp()
    st = jsv_stats(net, x, layerwise=True)
    json.dumps(st)  # JSON-able
    for k, v in st.items():
        assert type(v) in (float, int, list), (k, type(v))
        if isinstance(v, list):
            assert all(type(e) in (float, int, str) for e in v), k


def test_jsv_stats_start_end_and_layerwise_off():
    net, x = _small_tanh_mlp()
    Js = _layer_jacobians_by_hand(net, x)
    J = Js[2] @ Js[1]  # J^{1,3}
    s = np.linalg.svd(J, compute_uv=False)
    st = jsv_stats(net, x, start=1, end=3, epsilon=0.2, layerwise=True)
    assert st["mean"] == pytest.approx(s.mean(), rel=1e-12)
    assert st["layers"] == [2, 3] and (st["start"], st["end"]) == (1, 3)
    assert st["ldi"] == [np.mean(np.abs(1 - np.linalg.svd(Js[l], compute_uv=False)) <= 0.2) for l in (1, 2)]
    st = jsv_stats(net, x, layerwise=False)
    assert "ldi" not in st and "layer_mean" not in st
    assert jsv_stats(net, x) == st  # off by default: the layer Jacobians cost many times the input-output ones
    with pytest.raises(TypeError, match="layerwise"):
        jsv_stats(net, x, layerwise="yes")


# --------------------------------------------------------------------------------------------
# streaming over batches
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 7, 23, 1000])
def test_streaming_does_not_change_the_result(batch_size):
    # planted bug seen failing: the last (partial) batch dropped (range(0, n - bs + 1, bs))
    net, x = _small_tanh_mlp()
    ref = jsv_stats(net, x, batch_size=23, layerwise=True)
    st = jsv_stats(net, x, batch_size=batch_size, layerwise=True)
    assert st.keys() == ref.keys()
    for k, v in ref.items():
        if isinstance(v, float):
            # equal up to rounding: BLAS may sum a 1-row product (GEMV) in another order
            assert st[k] == pytest.approx(v, rel=1e-13, abs=0), k
        elif k in ("layer_mean", "layer_min", "layer_max"):
            np.testing.assert_allclose(st[k], v, rtol=1e-13, atol=0)
        else:
            assert st[k] == v, k
    sv, lsv = collect_singular_values(net, x, batch_size=batch_size, layerwise=True)
    sv0, lsv0 = collect_singular_values(net, x, batch_size=23, layerwise=True)
    np.testing.assert_allclose(sv, sv0, rtol=1e-13, atol=0)
    assert [a.shape for a in lsv] == [a.shape for a in lsv0]


def test_bad_inputs():
    net, x = _small_tanh_mlp()
    with pytest.raises(ValueError, match="at least one example"):
        jsv_stats(net, x[:0])
    with pytest.raises(ValueError, match="at least one example"):
        singular_values(net, np.zeros((0, 12)))
    with pytest.raises(ValueError, match="batch_size"):
        jsv_stats(net, x, batch_size=0)
    with pytest.raises(ValueError, match="shape"):
        jsv_stats(net, x[:, :5])
    with pytest.raises(ValueError, match="start and end"):
        jsv_stats(net, x, start=3, end=2)
    with pytest.raises(ValueError, match="epsilon"):
        jsv_stats(net, x, epsilon=-1.0)
    with pytest.raises(TypeError, match="Network"):
        jsv_stats("net", x)
    with pytest.raises(ValueError, match="sv must be"):
        summarize(np.zeros((0, 3)))


# --------------------------------------------------------------------------------------------
# deep linear orthogonal networks: every singular value is 1
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [[30] * 7, [784] + [100] * 6 + [10]], ids=["square", "784-100x6-10"])
def test_deep_linear_orthogonal_is_an_isometry(sizes):
    # planted bug seen failing: the zero threshold inverted (s[s >= rtol * s_max] = 0)
    net = rn.mlp(sizes, activation="linear", init="orthogonal", seed=4)
    x = np.random.default_rng(0).standard_normal((4, sizes[0]))
    st = jsv_stats(net, x, batch_size=3, epsilon=1e-9, layerwise=True)
    for k in ("mean", "min", "max", "cn", "cn_mean", "cn_median"):
        assert abs(st[k] - 1.0) <= 1e-12, (k, st[k])
    assert st["std"] <= 1e-12
    assert st["n_values"] == 4 * min(sizes[0], sizes[-1])
    assert st["ldi"] == [1.0] * (len(sizes) - 1)
    for k in ("layer_mean", "layer_min", "layer_max"):
        assert np.allclose(st[k], 1.0, rtol=0, atol=1e-12), k


def test_build_arch_linear_orthogonal_matches_mlp():
    net = build("mlp-7-linear", (784,), 10, init="orthogonal", seed=0)
    x = np.random.default_rng(1).standard_normal((2, 784))
    st = jsv_stats(net, x, epsilon=1e-9, layerwise=True)
    assert abs(st["max"] - 1) <= 1e-12 and abs(st["min"] - 1) <= 1e-12 and st["ldi"] == [1.0] * 7


# --------------------------------------------------------------------------------------------
# rank deficiency: CN = inf, no warnings, no crash
# --------------------------------------------------------------------------------------------


def _net_with_zero_output_row():
    net = rn.mlp([20, 15, 15, 6], activation="tanh", init="orthogonal", seed=7)
    masks = [{k: np.ones_like(v, dtype=bool) for k, v in p.items()} for p in net.params]
    masks[-1]["W"][2, :] = False  # output unit 2 sees nothing: a zero row of every J^{0,K}
    return net.with_masks(masks), np.random.default_rng(2).standard_normal((9, 20))


def test_zero_row_gives_infinite_condition_number_without_warnings():
    # planted bugs seen failing: no zero threshold (LAPACK leaves ~1e-17, CN ~1e16 for some
    # examples); np.divide without where= (RuntimeWarning: divide by zero)
    net, x = _net_with_zero_output_row()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        st = jsv_stats(net, x, batch_size=4, layerwise=True)
        text = format_stats(st)
    assert st["min"] == 0.0
    assert st["cn"] == float("inf") and st["cn_mean"] == float("inf") and st["cn_median"] == float("inf")
    assert st["max"] > 0 and np.isfinite(st["mean"])
    assert "inf" in text
    sv = singular_values(net, x)
    assert np.all(sv[:, -1] == 0.0) and np.all(sv[:, :-1] > 0)
    # the last layer Jacobian D W has the zero row too
    assert st["layer_min"][-1] == 0.0
    # zero_rtol=0 keeps LAPACK's raw values: tiny, not necessarily exact zeros
    raw = singular_values(net, x, zero_rtol=0)
    assert np.all(raw[:, -1] <= 1e-14 * raw[:, 0])


def test_all_zero_jacobian_is_handled():
    net = rn.mlp([5, 4, 3], activation="tanh", init="lecun", seed=0)
    net = net.with_masks([{"W": np.zeros((4, 5), bool)}, {}])
    x = np.ones((3, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        st = jsv_stats(net, x, layerwise=True)
    assert st["max"] == 0.0 and st["min"] == 0.0 and st["cn"] == float("inf") and st["mean"] == 0.0


def test_per_example_cn_median_is_finite_when_few_examples_are_singular():
    # summarize on hand-made values: the pooled CN is inf, the median per-example CN is not
    sv = np.array([[2.0, 1.0], [4.0, 1.0], [3.0, 0.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        st = summarize(sv, [np.array([[1.05, 0.95], [1.2, 1.0]])], epsilon=0.1)
    assert st["cn"] == float("inf") and st["cn_mean"] == float("inf") and st["cn_median"] == 4.0
    assert st["mean"] == pytest.approx(11 / 6) and st["ldi"] == [0.75]


# --------------------------------------------------------------------------------------------
# the scale of the SPP table: SG(1e-4) tanh MLP-7 on real MNIST
# --------------------------------------------------------------------------------------------


def test_sg_1e4_jsv_mean_has_the_scale_of_the_spp_table():
    # SPP Table (PAPER.md section 9): JSV mean 2.46e-07 at gamma = 1e-4 (after 90% CS pruning;
    # here unpruned, so only the order of magnitude is checked).
    # planted bug seen failing: reporting eigenvalues of J J^T (sigma^2) instead of sigma
    X, _ = data.load("mnist5k", split="test")
    net = build("mlp-7-tanh", (784,), 10, init="sg", gamma=1e-4, seed=0)
    st = jsv_stats(net, X[:50], layerwise=False)
    assert 2.46e-07 / 3 <= st["mean"] <= 2.46e-07 * 3, st["mean"]
    assert st["n_values"] == 500


# --------------------------------------------------------------------------------------------
# layerwise dynamical isometry, computed independently
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("epsilon", [0.05, 0.1, 0.3, 1.0])
def test_ldi_fraction_independent(epsilon):
    # planted bug seen failing: one-sided test (1 - sigma <= epsilon) instead of |1 - sigma|
    net, x = _small_tanh_mlp(seed=5)
    st = jsv_stats(net, x, epsilon=epsilon, batch_size=8, layerwise=True)
    expected = []
    for Jl in _layer_jacobians_by_hand(net, x):
        s = np.linalg.svd(Jl, compute_uv=False)
        expected.append(float(np.sum((s >= 1 - epsilon) & (s <= 1 + epsilon)) / s.size))
    assert st["ldi"] == expected
    assert any(0 < f < 1 for f in expected)  # the check is not vacuous
    # singular values above 1 + epsilon exist, so the one-sided bug would be seen
    assert max(st["layer_max"]) > 1 + epsilon or epsilon == 1.0


# --------------------------------------------------------------------------------------------
# format_stats
# --------------------------------------------------------------------------------------------


def test_format_stats_table():
    net, x = _small_tanh_mlp()
    st = jsv_stats(net, x, layerwise=True)
    text = format_stats(st, title="lecun")
    assert text.startswith("lecun: singular values of J^(0,4), 23 examples, 115 values pooled")
    assert f"{st['mean']:.3e}" in text and f"{st['cn']:.3e}" in text
    rows = [line for line in text.splitlines() if line.strip().startswith(("1 ", "2 ", "3 ", "4 "))]
    assert len(rows) == 4 and all(f"{f:.3f}" in r for f, r in zip(st["ldi"], rows))
    header = text.splitlines()[1]
    values = text.splitlines()[2]
    assert len(header) == len(values)  # aligned
    with pytest.raises(TypeError):
        format_stats({"x": 1})


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------


def _png(path):
    with open(path, "rb") as fh:
        head = fh.read(8)
    return head == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


def test_plots_write_png_files(tmp_path):
    # planted bug seen failing: _save returning the path without writing the file
    pytest.importorskip("matplotlib")
    from refnet import plots

    rng = np.random.default_rng(0)
    wide = {"sg(1e-4)": 1e-7 * rng.random(200) + 1e-8, "orthogonal": rng.random(200) + 0.5,
            "pruned": np.r_[np.zeros(5), rng.random(50)]}
    narrow = {"a": rng.random(100) + 0.5}
    paths = [
        plots.plot_jsv_histograms(wide, tmp_path / "h_log.png"),
        plots.plot_jsv_histograms(narrow, tmp_path / "sub" / "h_lin.png", log=False, bins=10, title="t"),
        plots.plot_jsv_ecdf(wide, tmp_path / "ecdf.png"),
        plots.plot_layer_bands([rng.random((20, 5)) + 0.5, rng.random((20, 3))], tmp_path / "bands1.png"),
        plots.plot_layer_bands({"x": [rng.random(9), np.r_[0.0, rng.random(9)]], "y": [1e-4 * rng.random(9)] * 2},
                               tmp_path / "bands2.png"),
    ]
    for p in paths:
        assert _png(Path(p)), p
    assert sorted(f.name for f in tmp_path.iterdir() if f.is_file()) == ["bands1.png", "bands2.png", "ecdf.png", "h_log.png"]
    with pytest.raises(TypeError):
        plots.plot_jsv_histograms({}, tmp_path / "x.png")
    with pytest.raises(ValueError):
        plots.plot_jsv_ecdf({"a": np.array([np.nan])}, tmp_path / "x.png")


def test_plots_without_matplotlib_name_the_extra(tmp_path, monkeypatch):
    from refnet import plots

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(ImportError, match=r"pip install refnet\[plot\]"):
        plots.plot_jsv_ecdf({"a": np.ones(3)}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


# --------------------------------------------------------------------------------------------
# the spectrum command (through refnet.cli.main, as a user runs it)
# --------------------------------------------------------------------------------------------

TINY = ["spectrum", "--data", "digits", "--arch", "mlp-3-tanh-w16", "--n-examples", "20", "--batch-size", "7", "--layerwise"]


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_cli_writes_stats_and_plots(tmp_path, capsys):
    # planted bug seen failing: only the first --init value run (names[:1])
    out = tmp_path / "run"
    argv = [*TINY, "--init", "orthogonal,lecun", "--init", "sg", "--gamma", "1e-4", "--gamma", "1", "--out", str(out)]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    doc = json.loads((out / "stats.json").read_text())
    labels = ["orthogonal", "lecun", "sg(gamma=0.0001)", "sg(gamma=1)"]
    assert list(doc["results"]) == labels
    assert doc["n_examples"] == 20 and doc["data"] == "digits" and doc["sparsity"] is None
    for label in labels:
        assert f"{label}: singular values of J^(0,3), 20 examples, 200 values pooled" in stdout
    # the CLI statistics are those of jsv_stats on the same network and examples
    X, _ = data.load("digits", split="test")
    st = jsv_stats(build("mlp-3-tanh-w16", (64,), 10, init="sg", gamma=1e-4, seed=0), X[:20], layerwise=True)
    got = doc["results"]["sg(gamma=0.0001)"]
    for k in ("mean", "std", "min", "max", "cn", "cn_mean", "ldi", "layer_mean"):
        assert got[k] == pytest.approx(st[k], rel=1e-13), k
    assert f"wrote {out / 'stats.json'}" in stdout
    if _has_matplotlib():
        for name in ("jsv_hist.png", "jsv_ecdf.png", "layer_bands.png"):
            assert _png(out / name), name
            assert f"wrote {out / name}" in stdout


def test_cli_random_pruning(tmp_path, capsys):
    # planted bug seen failing: the pruned net not used for the measurement
    out = tmp_path / "pruned"
    assert main([*TINY, "--sparsity", "0.9", "--prune", "random", "--seed", "3", "--out", str(out)]) == 0
    doc = json.loads((out / "stats.json").read_text())
    res = doc["results"]["orthogonal"]
    m = 64 * 16 + 16 * 16 + 16 * 10
    assert res["density"] == pytest.approx(round(0.1 * m) / m)
    assert doc["prune"] == "random" and doc["sparsity"] == 0.9
    unpruned = jsv_stats(build("mlp-3-tanh-w16", (64,), 10, init="orthogonal", seed=3),
                         data.load("digits", split="test")[0][:20])
    assert res["mean"] < 0.5 * unpruned["mean"]  # random pruning shrinks the JSV (SPP figure)


def test_cli_without_matplotlib_skips_plots(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "noplot"
    assert main([*TINY, "--n-examples", "5", "--out", str(out)]) == 0
    assert "note: no plots" in capsys.readouterr().out
    assert sorted(f.name for f in out.iterdir()) == ["run.json", "stats.json"]  # no PNGs; the provenance record


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--init", "sg"], "--gamma"),
        (["--gamma", "1e-2"], "--gamma"),
        (["--init", "lecun", "--gain", "2"], "--gain"),
        (["--init", "bogus"], "--init"),
        (["--init", "lecun,lecun"], "twice"),
        (["--arch", "mlp-x"], "--arch"),
    ],
)
def test_cli_bad_arguments(tmp_path, capsys, argv, match):
    assert main([*TINY, "--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("refnet: error:") and match in err
    assert not (tmp_path / "o").exists()


def test_cli_stats_json_is_strict_with_an_infinite_condition_number(tmp_path, capsys):
    from refnet.pruning import LayerCollapseWarning

    # planted bug seen failing: json.dumps(doc) without jsonable (writes the token Infinity)
    out = tmp_path / "dead"
    with pytest.warns(LayerCollapseWarning):  # 99% leaves a layer without weights (and no path through)
        assert main([*TINY, "--sparsity", "0.99", "--prune", "random", "--seed", "3", "--out", str(out)]) == 0
    text = (out / "stats.json").read_text()

    def no_constants(token):
        raise AssertionError(f"non-standard JSON token {token}")

    doc = json.loads(text, parse_constant=no_constants)  # strict: no Infinity / NaN tokens
    res = doc["results"]["orthogonal"]
    assert res["min"] == 0.0 and res["cn"] == "inf" and float(res["cn"]) == np.inf


def test_jsonable_numpy_values_and_non_finite_floats():
    from refnet._io import json_float, jsonable

    obj = {1: np.float32(0.5), "a": [np.inf, -np.inf, np.nan, None], "b": np.arange(3), "c": np.bool_(True),
           "d": (np.int64(7), "s"), "e": np.dtype("float64")}
    got = jsonable(obj, other=str)
    assert got == {"1": 0.5, "a": ["inf", "-inf", "nan", None], "b": [0, 1, 2], "c": True, "d": [7, "s"], "e": "float64"}
    assert json.loads(json.dumps(got, allow_nan=False)) == got
    assert jsonable(np.dtype("float64")) == np.dtype("float64")  # left as it is without `other`
    assert json_float(None) is None and json_float(np.float64(2.0)) == 2.0


def test_cli_default_has_no_layerwise_table(tmp_path, capsys):
    out = tmp_path / "plain"
    assert main([a for a in TINY if a != "--layerwise"] + ["--out", str(out)]) == 0
    assert "LDI" not in capsys.readouterr().out
    doc = json.loads((out / "stats.json").read_text())
    assert doc["layerwise"] is False and "ldi" not in doc["results"]["orthogonal"]
    assert not (out / "layer_bands.png").exists()


def _dense_layer_svdvals(net, x):
    """Every layer Jacobian of every example, dense, decomposed: the oracle of the layer routes."""
    from refnet.jacobians import layer_jacobians

    return [np.linalg.svd(J, compute_uv=False) for J in layer_jacobians(net, x)]


@pytest.mark.parametrize("padding_mode", ["zeros", "circular"])
def test_cnn_layer_singular_values_by_their_routes_equal_the_dense_ones(padding_mode, monkeypatch):
    """Closed forms (pooling, Flatten, a linear circular convolution's Fourier symbol), one
    decomposition for an input-independent Jacobian (a linear zero-padded convolution), and the
    dense per-example Jacobian in sub-batches (a tanh convolution, a ReLU Dense layer) give the
    singular values of the dense layer Jacobians."""
    import refnet as rn
    from refnet import conv as C
    from refnet import spectrum

    rng = np.random.default_rng(0)
    net = rn.Network([rn.Conv2d(2, 3, 3, padding=1, padding_mode=padding_mode), rn.MaxPool2d(2),
                      rn.Conv2d(3, 4, 3, padding=1, padding_mode=padding_mode, activation="tanh"), rn.AvgPool2d(2),
                      rn.Conv2d(4, 4, 1), rn.GlobalAvgPool2d(), rn.Dense(4, 6, activation="relu"), rn.Dense(6, 3)],
                     in_shape=(2, 8, 8), seed=1, sigma_b=0.2)
    x = rng.standard_normal((5, 2, 8, 8))
    want = _dense_layer_svdvals(net, x)
    calls = []
    real = C.circular_conv_singular_values
    monkeypatch.setattr(C, "circular_conv_singular_values", lambda *a: calls.append(1) or real(*a))
    got = spectrum.layer_singular_values(net, x, batch_size=2, zero_rtol=0, max_elements=3 * 256 * 128)
    assert len(got) == len(want) == net.n_layers
    for l, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, l
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-13 * max(1.0, w.max()), err_msg=f"layer {l}")
    assert len(calls) == (3 if padding_mode == "circular" else 0)  # conv layer 0 per batch of 2: batches 2, 2, 1
    # collect_singular_values takes the same routes for a range of layers
    sv, lsv = spectrum.collect_singular_values(net, x, 2, 7, batch_size=3, layerwise=True, zero_rtol=0)
    for k, l in enumerate(range(2, 7)):
        np.testing.assert_allclose(lsv[k], want[l], rtol=0, atol=1e-13 * max(1.0, want[l].max()))
    with pytest.raises(ValueError, match="max_elements"):
        spectrum.layer_singular_values(net, x, max_elements=100)


def test_circular_conv_singular_values_equal_the_operator_matrix():
    from refnet import conv as C

    rng = np.random.default_rng(2)
    for c_out, c_in, k, H, W in [(3, 2, 3, 5, 4), (2, 3, 5, 6, 6), (4, 4, 1, 3, 3), (2, 2, 7, 4, 5)]:  # the last wraps
        Wt = rng.standard_normal((c_out, c_in, k, k))
        p = (k - 1) // 2
        M = C.conv_matrix(Wt, (c_in, H, W), (1, 1), (p, p), "circular")
        s = np.linalg.svd(M, compute_uv=False)
        f = C.circular_conv_singular_values(Wt, (c_in, H, W))
        assert f.shape == s.shape
        np.testing.assert_allclose(f, s, rtol=0, atol=1e-13 * s.max())


def test_layer_jacobians_in_sub_batches_within_max_elements():
    """A tanh convolution's per-example Jacobians go in sub-batches when the batch's do not fit
    max_elements (a forward pass per sub-batch): the values and their order are those of one pass."""
    import refnet as rn
    from refnet import spectrum

    net = rn.Network([rn.Conv2d(1, 2, 3, padding=1, activation="tanh"), rn.Flatten(), rn.Dense(32, 3)],
                     in_shape=(1, 4, 4), seed=2, sigma_b=0.3)
    x = np.random.default_rng(5).standard_normal((5, 1, 4, 4))
    want = _dense_layer_svdvals(net, x)
    per_example = 32 * 16
    got = spectrum.layer_singular_values(net, x, batch_size=5, zero_rtol=0, max_elements=2 * per_example)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-13 * w.max())
