"""Tests for the ONNX importer and audit (refnet.audit.onnx): models exported from PyTorch
(torch.onnx.export, the TorchScript exporter: dynamo=False needs no extra package) and graphs
built with onnx.helper, run by onnxruntime.

Each test was seen failing once on a planted bug in refnet/audit/onnx.py (noted per test).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from torch import nn  # noqa: E402

from refnet import audit  # noqa: E402
from refnet.audit import graph  # noqa: E402
from refnet.layers import AvgPool2d, Conv2d, Dense, Flatten, GlobalAvgPool2d, MaxPool2d  # noqa: E402

F32 = "as-run float32"


def _export(module, x, path, dynamic=True):
    kw = {"dynamic_axes": {"x": {0: "B"}, "y": {0: "B"}}} if dynamic else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(module.eval(), (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"], **kw)
    return path


def _mlp(n_in=12, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(n_in, 16), nn.Tanh(), nn.Linear(16, 16), nn.LeakyReLU(0.2), nn.Linear(16, 16), nn.SELU(),
        nn.Linear(16, 16), nn.ELU(0.7), nn.Linear(16, 16), nn.Sigmoid(), nn.Linear(16, 16), nn.Hardtanh(),
        nn.Linear(16, 16), nn.Softplus(), nn.Linear(16, 5),
    )


class _CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(6, 5, 1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.avg_pool2d(torch.tanh(self.c2(x)), 2)
        x = F.adaptive_avg_pool2d(F.elu(self.c3(x)), 1)
        return self.fc(x.view(x.size(0), -1))  # exported as Shape -> Gather -> Unsqueeze -> Concat -> Reshape


def _torch_f64_grads(module, x, y):
    """PyTorch float64 autograd of the module with its float32 weights: logits and weight grads."""
    m = audit.fx.deepcopy_module(module).double()
    z = m(torch.as_tensor(x, dtype=torch.float64))
    F.cross_entropy(z, torch.as_tensor(y).long()).backward()
    return z.detach().numpy(), [p.grad.numpy() for n, p in m.named_parameters() if n.endswith("weight")]


def test_onnx_mlp_round_trip(rng, tmp_path):
    # planted bug seen failing: LeakyRelu's alpha ignored (slope 0.01): the probe named node
    # '/3/LeakyRelu'
    module = _mlp()
    path = _export(module, torch.randn(2, 12), tmp_path / "mlp.onnx")
    net = audit.from_onnx(path)
    ref = audit.from_torch(module)
    # the same layers; ONNX attributes are float32, so LeakyReLU's 0.2 is float32(0.2) = 0.20000000298...
    assert [type(l) for l in net.layers] == [type(l) for l in ref.layers]
    for a, b in zip(net.layers, ref.layers):
        assert a.activation.name == b.activation.name
        assert dict(a.activation.params) == {k: float(np.float32(v)) for k, v in b.activation.params}
    for p, q in zip(net.params, ref.params):  # the initializers, exactly
        assert all(np.array_equal(p[k], q[k]) for k in q)
    x, y = rng.standard_normal((6, 12)), rng.integers(0, 5, 6)
    report = audit.compare_onnx(path, x, y)
    assert report.passed, report.summary()
    assert report.sections == [F32] and report.meta["model_dtype"] == "float32"
    names = {c.name for c in report.checks}
    assert {"logits"} | {f"act/{i}" for i in range(8)} <= names
    c = report.get("logits")
    assert 1e-9 < c.max_rel_err < 1e-4 and c.tol == 1e-4  # float32 rounding: measured, nonzero
    assert report.get("act/0").source == "onnx [/0/Gemm] Gemm + [/1/Tanh] Tanh"
    # refnet's exact quantities ride along: they are the float64 gradients of the ONNX model's
    # function (whose LeakyReLU and ELU parameters are the float32 values the file stores)
    r = report.reference
    x32 = x.astype(np.float32).astype(np.float64)
    module[3].negative_slope, module[7].alpha = float(np.float32(0.2)), float(np.float32(0.7))
    z, gW = _torch_f64_grads(module, x32, y)
    assert np.allclose(r.logits, z, rtol=0, atol=1e-12 * np.abs(z).max())
    for i, g in zip([i for i, p in enumerate(r.net.params) if "W" in p], gW):
        assert np.max(np.abs(r.grads[i]["W"] - g)) <= 1e-10 * np.abs(g).max()
    assert r.jac.shape == (6, 5, 12) and len(r.masks) == 8 and "snip_k" in report.meta


def test_onnx_cnn_round_trip_dynamic_and_fixed_batch(rng, tmp_path):
    # planted bug seen failing: the Reshape after the Shape/Gather/Concat subgraph mapped to a
    # no-op (the Network refused the 4-d input of the Dense)
    torch.manual_seed(0)
    module = _CNN()
    path = _export(module, torch.randn(2, 1, 8, 8), tmp_path / "cnn.onnx")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert {"Shape", "Gather", "Reshape", "GlobalAveragePool", "AveragePool", "MaxPool", "Gemm"} <= set(ops)
    net = audit.from_onnx(path)
    assert [type(l) for l in net.layers] == [Conv2d, MaxPool2d, Conv2d, AvgPool2d, Conv2d, GlobalAvgPool2d, Dense]
    assert net.layers[2].stride == (2, 2) and net.layers[2].padding == (1, 1)
    x, y = rng.standard_normal((5, 1, 8, 8)), rng.integers(0, 3, 5)
    report = audit.compare_onnx(path, x, y)
    assert report.passed, report.summary()
    assert report.get("act/5").source == "onnx [/GlobalAveragePool] GlobalAveragePool + [/Reshape] Reshape"
    # a fixed batch size (exported without dynamic axes): x must have it
    path2 = _export(module, torch.randn(2, 1, 8, 8), tmp_path / "cnn_fixed.onnx", dynamic=False)
    with pytest.raises(ValueError, match="fixed batch size of 2; x has 5 examples"):
        audit.compare_onnx(path2, x, y)
    assert audit.compare_onnx(path2, x[:2], y[:2], jacobian=False).passed


def _model(nodes, inits, in_shape=("B", 6), out_name="y", opset=17, extra_inputs=()):
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape)), *extra_inputs],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["B", None])],
        initializer=[numpy_helper.from_array(np.asarray(v) if np.asarray(v).dtype.kind in "iu" else np.asarray(v, np.float32), k)
                     for k, v in inits.items()],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def test_onnx_matmul_add_reshape_and_clip(rng, tmp_path):
    # planted bug seen failing: the MatMul weight not transposed (B is (n_in, n_out))
    W1, b1 = rng.standard_normal((6, 5)), rng.standard_normal(5)
    W2, b2 = rng.standard_normal((5, 3)), rng.standard_normal(3)
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "W1"], ["h1"]),
        helper.make_node("Add", ["h1", "b1"], ["a1"]),
        helper.make_node("Clip", ["a1", "lo", "hi"], ["c1"]),
        helper.make_node("MatMul", ["c1", "W2"], ["h2"]),
        helper.make_node("Add", ["b2", "h2"], ["y"]),  # the constant first: still the bias
    ]
    inits = {"W1": W1, "b1": b1, "W2": W2, "b2": b2, "lo": -1.0, "hi": 1.0}
    model = _model(nodes, inits, in_shape=("B", 2, 3))
    model.graph.initializer.append(numpy_helper.from_array(np.array([0, -1], np.int64), "shape"))
    path = tmp_path / "mm.onnx"
    onnx.save(model, str(path))
    net = audit.from_onnx(path)
    assert [type(l) for l in net.layers] == [Flatten, Dense, Dense]
    assert str(net.layers[1].activation) == "hard_tanh" and net.layers[1].bias and net.layers[2].bias
    W1_32 = W1.astype(np.float32).astype(np.float64)
    assert np.array_equal(net.params[1]["W"], W1_32.T) and np.array_equal(net.params[2]["b"], b2.astype(np.float32).astype(np.float64))
    x = rng.standard_normal((4, 2, 3)).astype(np.float32).astype(np.float64)
    h = np.clip(x.reshape(4, 6) @ W1_32 + b1.astype(np.float32), -1, 1)
    expect = h @ W2.astype(np.float32).astype(np.float64) + b2.astype(np.float32)
    assert np.allclose(net.forward(x), expect, rtol=0, atol=1e-12)
    report = audit.compare_onnx(path, x, rng.integers(0, 3, 4))
    assert report.passed, report.summary()
    assert report.get("act/1").source == "onnx [h1] MatMul + [a1] Add + [c1] Clip"


def _one(op, inputs, inits, attrs=None, in_shape=("B", 6), **kw):
    return _model([helper.make_node(op, inputs, ["y"], **(attrs or {}))], inits, in_shape=in_shape, **kw)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda r: _model([helper.make_node("Gemm", ["x", "W"], ["h"], transB=1),
                           helper.make_node("BatchNormalization", ["h", "s", "b", "m", "v"], ["y", "rm", "rv"], training_mode=1)],
                          {"W": r.standard_normal((6, 6)), "s": np.ones(6), "b": np.zeros(6), "m": np.zeros(6), "v": np.ones(6)}),
         r"node 1 'y' \(BatchNormalization\): its running-statistics outputs are used"),
        (lambda r: _model([helper.make_node("Gemm", ["x", "W"], ["h"], transB=1), helper.make_node("Add", ["h", "h"], ["y"])],
                          {"W": r.standard_normal((6, 6))}),
         r"node 1 'y' \(Add\): a tensor added to itself"),
        (lambda r: _model([helper.make_node("Slice", ["x", "st", "en", "ax", "sp"], ["y"])],
                          {"st": np.array([0], np.int64), "en": np.array([2], np.int64), "ax": np.array([1], np.int64),
                           "sp": np.array([1], np.int64)}, in_shape=("B", 3, 2, 2)),
         r"node 0 'y' \(Slice\): Slice\(starts=\[0\], ends=\[2\], axes=\[1\].*only x\[:, :, ::s, ::s\]"),
        (lambda r: _model([helper.make_node("Pad", ["x", "p"], ["y"])],
                          {"p": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)}, in_shape=("B", 3, 2, 2)),
         r"node 0 'y' \(Pad\): Pad\(mode='constant', pads=\[0, 0, 1, 1, 0, 0, 1, 1\].*only zero channels"),
        (lambda r: _model([helper.make_node("Gemm", ["x", "W"], ["h"], transB=1), helper.make_node("Softmax", ["h"], ["y"])],
                          {"W": r.standard_normal((6, 6))}),
         r"unsupported operation node 1 'y' \(Softmax\)"),
        (lambda r: _one("Gemm", ["x", "W"], {"W": r.standard_normal((6, 4))}, {"transA": 1}),
         r"Gemm with alpha=1.0, beta=1.0, transA=1"),
        (lambda r: _one("Conv", ["x", "W"], {"W": r.standard_normal((2, 1, 3, 3))}, {"pads": [1, 0, 0, 1]}, in_shape=("B", 1, 5, 5)),
         r"node 0 'y' \(Conv\): pads \(1, 0, 0, 1\) are not symmetric"),
        (lambda r: _one("MaxPool", ["x"], {}, {"kernel_shape": [2, 2]}, in_shape=("B", 1, 4, 4)),
         r"strides \(1, 1\) != kernel \(2, 2\)"),
        (lambda r: _one("LeakyRelu", ["x"], {}, {"alpha": 0.1}),
         r"node 0 'y' \(LeakyRelu\): an activation must come right after a Linear, Conv2d, BatchNorm or residual addition \(it is the first"),
        (lambda r: _model([helper.make_node("Gemm", ["x", "W"], ["h"], transB=1), helper.make_node("Selu", ["h"], ["y"], alpha=1.5)],
                          {"W": r.standard_normal((6, 6))}),
         r"Selu is supported only with alpha=1.67326, gamma=1.0507"),
        (lambda r: _one("Gemm", ["x", "W"], {"W": r.standard_normal((6, 4))}, {"transB": 1},
                        extra_inputs=[helper.make_tensor_value_info("z", TensorProto.FLOAT, ["B", 6])]),
         r"the graph takes 2 inputs \(x, z\)"),
    ],
)
def test_onnx_refusals_name_the_node(make, match, tmp_path):
    # planted bugs seen failing: the Add of a tensor to itself taken as a residual addition; the
    # spatial-only check of Slice dropped (a channel slice imported as subsampling)
    path = tmp_path / "m.onnx"
    onnx.save(make(np.random.default_rng(0)), str(path))
    with pytest.raises(ValueError, match=match):
        audit.from_onnx(path, _shape_of(path))


def _shape_of(path):
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    return tuple(d.dim_value for d in dims[1:])


def test_onnx_probe_catches_a_wrong_mapping(monkeypatch, tmp_path):
    # planted bug seen failing: the probe comparison skipped (check_layers not called)
    torch.manual_seed(0)
    module = _CNN()
    path = _export(module, torch.randn(2, 1, 8, 8), tmp_path / "cnn.onnx")
    monkeypatch.setitem(graph.LAYERS, "avgpool", MaxPool2d)
    with pytest.raises(ValueError, match=r"does not reproduce the ONNX model \(onnxruntime\) on the probe batch: node 5 "
                                         r"'/AveragePool' \(AveragePool\) differs"):
        audit.from_onnx(path)


def test_onnx_audit_catches_a_different_reference(rng, tmp_path):
    # planted bug seen failing: act/{i} taken from the reference instead of onnxruntime's values
    module = _mlp()
    path = _export(module, torch.randn(2, 12), tmp_path / "mlp.onnx")
    net = audit.from_onnx(path)
    params = [{k: v.copy() for k, v in p.items()} for p in net.params]
    params[6]["b"][0] += 1e-1
    x, y = rng.standard_normal((6, 12)), rng.integers(0, 5, 6)
    report = audit.compare_onnx(path, x, y, reference=net.with_params(params), jacobian=False)
    assert not report.passed
    failed = report.failed_names(F32)
    assert "act/6" in failed and "logits" in failed and "act/5" not in failed
    assert report.first_divergence().name == "act/6"


def test_cli_onnx(rng, tmp_path, capsys):
    # planted bug seen failing: reference.npz written without the Jacobian
    from refnet.cli import main

    path = _export(_mlp(n_in=20), torch.randn(2, 20), tmp_path / "mlp20.onnx")
    out = tmp_path / "out"
    assert main(["audit", "--onnx", str(path), "--data", "synthetic", "--n", "8", "--out", str(out)]) == 0
    d = json.loads((out / "report.json").read_text())
    assert d["framework"] == "onnx" and d["meta"]["in_shape"] == [20] and d["meta"]["data"] == "synthetic train[:8]"
    assert "reference.npz" in capsys.readouterr().out
    with np.load(out / "reference.npz") as f:
        assert f["jacobian"].shape == (8, 5, 20) and "cs_scores/0/W" in f.files and "grad/7/b" in f.files
    assert audit.compare_npz(out / "reference.npz").passed  # refnet's own numbers, in the neutral format
    bad = tmp_path / "softmax.onnx"
    onnx.save(_model([helper.make_node("Gemm", ["x", "W"], ["h"], transB=1), helper.make_node("Softmax", ["h"], ["y"])],
                     {"W": rng.standard_normal((20, 20))}, in_shape=("B", 20)), str(bad))
    for argv, msg in (([str(bad)], "unsupported operation node 1 'y' (Softmax)"),
                      ([str(path), "--no-as-run"], "--no-as-run: the ONNX audit is"),
                      ([str(tmp_path / "none.onnx")], "does not exist")):
        assert main(["audit", "--onnx", *argv, "--data", "synthetic", "--out", str(out), "--overwrite"]) == 2, argv
        err = capsys.readouterr().err
        assert msg in err, (argv, err)


def test_onnx_initializers_deduplicated_by_the_exporter(rng, tmp_path):
    # planted bug seen failing: Identity of an initializer classed as a computed value (the
    # exporter replaces equal initializers, here zero biases, by Identity nodes of one of them)
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3))
    with torch.no_grad():
        for j in (0, 2, 4):
            module[j].bias.zero_()
        module[4].bias[0] = 0.5
    path = _export(module, torch.randn(2, 6), tmp_path / "dedup.onnx")
    nodes = onnx.load(str(path)).graph.node
    assert "Identity" in [n.op_type for n in nodes]
    net = audit.from_onnx(path)
    assert [p["b"].tolist() for p in net.params] == [[0.0] * 5, [0.0] * 5, [0.5, 0, 0]]
    assert audit.compare_onnx(path, rng.standard_normal((4, 6)), rng.integers(0, 3, 4), jacobian=False).passed


def test_onnx_batchnorm1d_and_residual_add(rng, tmp_path):
    # planted bug seen failing: ONNX's momentum taken as refnet's (0.9 instead of 1 - 0.9)
    W1, W2 = rng.standard_normal((6, 6)), rng.standard_normal((3, 6))
    s, b, m, v = rng.uniform(0.5, 1.5, 6), rng.standard_normal(6), rng.standard_normal(6), rng.uniform(0.5, 1.5, 6)
    nodes = [
        helper.make_node("Gemm", ["x", "W1"], ["h"], transB=1),
        helper.make_node("BatchNormalization", ["h", "s", "b", "m", "v"], ["n"], epsilon=1e-3, momentum=0.8),
        helper.make_node("Relu", ["n"], ["r"]),
        helper.make_node("Add", ["r", "x"], ["a"]),
        helper.make_node("Gemm", ["a", "W2"], ["y"], transB=1),
    ]
    path = tmp_path / "bn.onnx"
    onnx.save(_model(nodes, {"W1": W1, "s": s, "b": b, "m": m, "v": v, "W2": W2}), str(path))
    net = audit.from_onnx(path, (6,))
    assert [type(layer).__name__ for layer in net.layers] == ["Dense", "BatchNorm1d", "Add", "Dense"]
    bn = net.layers[1]
    assert bn.mode == "eval" and str(bn.activation) == "relu" and net.inputs[2] == (2, 0)
    assert bn.eps == float(np.float32(1e-3)) and abs(bn.momentum - 0.2) < 1e-7
    f32 = [np.asarray(a, np.float32).astype(np.float64) for a in (W1, s, b, m, v, W2)]
    x = rng.standard_normal((4, 6)).astype(np.float32).astype(np.float64)
    h = x @ f32[0].T
    n = (h - f32[3]) / np.sqrt(f32[4] + bn.eps) * f32[1] + f32[2]
    np.testing.assert_allclose(net.forward(x), (np.maximum(n, 0) + x) @ f32[5].T, rtol=0, atol=1e-12)
    report = audit.compare_onnx(path, x, rng.integers(0, 3, 4))
    assert report.passed, report.summary()
