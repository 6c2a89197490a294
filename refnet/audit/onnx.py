r"""ONNX: a refnet Network from an ONNX file (:func:`from_onnx`) and the audit of the model as
onnxruntime runs it (:func:`compare_onnx`).

ONNX is the framework-neutral format engineers already export to (``torch.onnx.export``,
tf2onnx, ...). The file is a protobuf: it is read with ``onnx.load`` (no pickle) and the weights
come from the graph's initializers (``onnx.numpy_helper.to_array``). The import follows the graph,
node by node, as the PyTorch importer (:mod:`refnet.audit.fx`) follows the fx graph, and shares its
second half (:mod:`refnet.audit.graph`):

========================================  =============================================
ONNX                                      refnet
========================================  =============================================
``Gemm`` (alpha = beta = 1, transA = 0)   ``Dense`` (``W = B`` if transB else ``B^T``)
``MatMul`` (+ ``Add`` of a constant)      ``Dense`` (``W = B^T``, the added constant is b)
``Conv`` (group 1, dilation 1, symmetric  ``Conv2d``
pads or auto_pad VALID/SAME with odd
kernels)
``Relu``, ``Tanh``, ``Sigmoid``,          the activation of the layer before it
``LeakyRelu``, ``Elu``, ``Selu``
(PyTorch's constants), ``Softplus``,
``Erf``, ``Clip(-1, 1)`` (hard_tanh)
``MaxPool``, ``AveragePool`` (square,     ``MaxPool2d``, ``AvgPool2d``
stride = kernel, no padding, floor)
``GlobalAveragePool``, ``ReduceMean``     ``GlobalAvgPool2d`` (with the flatten after it)
over axes (2, 3)
``Flatten`` (axis 1), ``Reshape`` /       ``Flatten``
``Squeeze`` to ``(B, -1)``
``BatchNormalization`` (inference, or     ``BatchNorm1d``/``BatchNorm2d`` (gamma =
``training_mode`` 1 with the statistics   scale, beta = B, running statistics,
outputs unused)                           momentum ``1 - momentum``)
``Add`` of two tensors                    ``Add`` (a residual connection)
``Slice`` with steps along axes 2, 3      ``SubsamplePad`` (the option-A shortcut)
(start 0, to the end), ``Pad`` of the
channels with zeros
``Identity``, ``Dropout`` (inference)     no-ops
========================================  =============================================

Anything else is refused naming the node and its operator. Shape arithmetic (``Shape``, ``Gather``, ``Concat``, ... as
``x.view(x.size(0), -1)`` exports) is allowed where it only feeds a ``Reshape``.

Before returning, the converted network must reproduce onnxruntime's output of every node on a
probe batch (two batch sizes when the batch axis is symbolic), each refnet layer applied to
onnxruntime's input of that layer, to the as-run tolerance of the model's dtype
(:data:`refnet.audit.reference.AS_RUN_RTOL`: onnxruntime runs the model as saved, usually in
float32); ValueError naming the first node that differs.

onnx and onnxruntime are imported only inside the functions (the ``onnx`` extra).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from ..network import Network
from .graph import Piece, batch_jacobian_note, check_layers, graph_reference, group_pieces, piece_layer, rel_err
from .names import ACTIVATIONS
from .reference import (
    AS_RUN_RTOL,
    DEFAULT_RTOL,
    Run,
    add_activation_checks,
    check_loss,
    check_rtol,
    check_sparsity,
    check_xy,
    compare_run,
    match_reference,
    new_report,
    parse_shape,
    section_tol,
)
from .report import AuditReport

__all__ = ["OnnxGraph", "compare_onnx", "convert_onnx", "from_onnx", "import_onnx"]

#: the probe's batch sizes when the model's batch axis is symbolic (else its fixed size)
PROBE_BATCH = (5, 3)

SUPPORTED = (
    "Gemm (alpha=beta=1, transA=0); MatMul by a constant, optionally followed by Add of a constant (the bias); Conv "
    "(group 1, dilation 1, symmetric pads); Relu, Tanh, Sigmoid, LeakyRelu, Elu, Selu (PyTorch's constants), Softplus, "
    "Erf, Clip(-1, 1), each right after a Gemm/MatMul/Conv/BatchNormalization/Add; MaxPool and AveragePool (square kernel, stride = kernel, "
    "no padding, ceil_mode 0); GlobalAveragePool or ReduceMean over axes (2, 3) followed by a flatten; Flatten (axis 1), "
    "Reshape or Squeeze to (B, -1); Identity, Dropout (inference); BatchNormalization of (B, C) or (B, C, H, W); Add of "
    "two tensors (a residual connection); Slice with steps along axes 2 and 3 and Pad of the channels with zeros (the "
    "option-A shortcut); branches only as residual additions"
)

_ONNX_DTYPES = {1: np.float32, 10: np.float16, 11: np.float64}

#: attribute defaults of the ONNX operator specification that :data:`ACTIVATIONS` fixes
_ONNX_DEFAULTS = {("Selu", "alpha"): 1.67326319217681884765625, ("Selu", "gamma"): 1.05070102214813232421875}


def import_onnx():
    """``(onnx, onnx.numpy_helper, onnxruntime)``, or an ImportError that says what to install."""
    try:
        import onnx
        import onnxruntime
        from onnx import numpy_helper
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the ONNX audit needs onnx and onnxruntime: pip install 'refnet[onnx]' "
                          "(or pip install onnx onnxruntime)") from exc
    return onnx, numpy_helper, onnxruntime


def _attrs(onnx, node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


class _Graph:
    """The loaded model, each value's class (data, shape, const) and the probe's values."""

    def __init__(self, path, model, onnx, numpy_helper):
        self.path = path
        self.model = model
        self.onnx = onnx
        g = model.graph
        self.consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        self.producer = {}
        self.index = {}
        self.cls = {}
        for t in g.initializer:
            self.cls[t.name] = "const"
        inputs = [i for i in g.input if i.name not in self.consts]
        if len(inputs) != 1:
            raise ValueError(f"{path}: the graph takes {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); refnet imports "
                             "a model of one input tensor")
        self.input = inputs[0]
        if len(g.output) != 1:
            raise ValueError(f"{path}: the graph has {len(g.output)} outputs; refnet imports a model of one output (the logits)")
        self.output = g.output[0].name
        self.cls[self.input.name] = "data"
        k = 0
        for node in g.node:
            for o in node.output:
                if o:
                    self.producer[o] = node
            ins = [self.cls.get(i) for i in node.input if i]
            if node.op_type == "Constant":
                a = _attrs(onnx, node)
                if "value" not in a:
                    raise ValueError(f"{path}: Constant node {node.name!r} without a tensor 'value' is not supported")
                self.consts[node.output[0]] = numpy_helper.to_array(a["value"])
                c = "const"
            elif node.op_type == "Identity" and ins == ["const"] and node.input[0] in self.consts:
                # exporters replace initializers of equal values (zero biases) by Identity of one
                self.consts[node.output[0]] = self.consts[node.input[0]]
                c = "const"
            elif "data" in ins:
                c = "shape" if node.op_type == "Shape" else "data"
            elif "shape" in ins:
                c = "shape"
            else:
                c = "const"
            for o in node.output:
                if o:
                    self.cls[o] = c
            if c == "data":
                self.index[id(node)] = k
                k += 1
        self.values = None
        self.values2 = None

    def where(self, node) -> str:
        return f"node {self.index.get(id(node), '?')} {node.name or node.output[0]!r} ({node.op_type})"

    def label(self, node) -> str:
        return f"{node.name or node.output[0]!r} ({node.op_type})"

    def source(self, node) -> str:
        return f"[{node.name or node.output[0]}] {node.op_type}"

    def const(self, node, name, what):
        """A constant input (an initializer or a Constant node's value)."""
        if not name:
            return None
        if self.cls.get(name) != "const" or name not in self.consts:
            raise ValueError(f"{self.where(node)}: its {what} {name!r} must be an initializer (a constant), "
                             f"got a {'computed value' if self.cls.get(name) else 'missing value'}")
        return np.asarray(self.consts[name])

    def const_value(self, node, name, what):
        """A constant input that may also be computed from constants (``F.pad``'s pads are
        ``ConstantOfShape``/``Concat``/``Reshape`` of constants): an initializer, a Constant, or the
        probe's value of a node that reads no data; None before the probe when it is computed."""
        if not name:
            return None
        if name in self.consts:
            return np.asarray(self.consts[name])
        if self.cls.get(name) != "const":
            raise ValueError(f"{self.where(node)}: its {what} {name!r} must be a constant (computed from constants only), "
                             f"got a {'value computed from the input' if self.cls.get(name) else 'missing value'}")
        return None if self.values is None else np.asarray(self.values[name])

    def data_inputs(self, node):
        return [i for i in node.input if i and self.cls.get(i) == "data"]

    def shape(self, name):
        return tuple(self.values[name].shape)


def _unsupported(g, node, why=""):
    return ValueError(f"unsupported operation {g.where(node)}" + (f": {why}" if why else "") + f". Supported: {SUPPORTED}")


def _pads(g, node, a, k):
    """Symmetric ``(pad_h, pad_w)`` of a Conv or pool, ValueError otherwise."""
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("VALID",):
        return (0, 0)
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        strides = tuple(a.get("strides", (1, 1)))
        if strides != (1, 1) or k[0] % 2 == 0 or k[1] % 2 == 0:
            raise _unsupported(g, node, f"auto_pad={auto} with strides {strides} and kernel {k} pads asymmetrically")
        return ((k[0] - 1) // 2, (k[1] - 1) // 2)
    pads = tuple(a.get("pads", (0, 0, 0, 0)))
    if len(pads) != 4 or pads[0] != pads[2] or pads[1] != pads[3]:
        raise _unsupported(g, node, f"pads {pads} are not symmetric (top = bottom, left = right)")
    return (int(pads[0]), int(pads[1]))


def _gemm(g, node, a):
    if float(a.get("alpha", 1.0)) != 1.0 or float(a.get("beta", 1.0)) != 1.0 or int(a.get("transA", 0)) != 0:
        raise _unsupported(g, node, f"Gemm with alpha={a.get('alpha', 1.0)}, beta={a.get('beta', 1.0)}, transA={a.get('transA', 0)} "
                                    "(only alpha = beta = 1, transA = 0)")
    if g.cls.get(node.input[0]) != "data":
        raise _unsupported(g, node, "the data must be its first input")
    B = g.const(node, node.input[1], "weight (B)")
    if B.ndim != 2:
        raise _unsupported(g, node, f"a weight of shape {B.shape}")
    W = B if int(a.get("transB", 0)) else B.T
    params = {"W": np.array(W, dtype=np.float64)}
    if len(node.input) > 2 and node.input[2]:
        C = g.const(node, node.input[2], "bias (C)")
        if C.size not in (1, W.shape[0]) or (C.ndim == 2 and C.shape[0] != 1) or C.ndim > 2:
            raise _unsupported(g, node, f"a bias of shape {C.shape} for {W.shape[0]} outputs")
        params["b"] = np.broadcast_to(np.asarray(C, np.float64).ravel(), (W.shape[0],)).copy()
    return Piece(node, "dense", {"n_in": int(W.shape[1]), "n_out": int(W.shape[0]), "bias": "b" in params}, params)


def _matmul(g, node, a):
    if g.cls.get(node.input[0]) != "data":
        raise _unsupported(g, node, "the data must be its first input (x @ W)")
    B = g.const(node, node.input[1], "weight")
    if B.ndim != 2:
        raise _unsupported(g, node, f"a weight of shape {B.shape}")
    W = np.array(B.T, dtype=np.float64)
    return Piece(node, "dense", {"n_in": int(W.shape[1]), "n_out": int(W.shape[0]), "bias": False}, {"W": W},
                 inplace=False)


def _add(g, node, a):
    data = g.data_inputs(node)
    if len(data) >= 2:
        if data[0] == data[1]:
            raise _unsupported(g, node, "a tensor added to itself (x + x) is a scaling, which has no refnet layer")
        return Piece(node, "add")
    other = [i for i in node.input if i and i not in data]
    b = g.const(node, other[0], "added constant")
    return Piece(node, "bias", {"b": np.asarray(b, np.float64)})


def _conv(g, node, a):
    if g.cls.get(node.input[0]) != "data":
        raise _unsupported(g, node, "the data must be its first input")
    W = g.const(node, node.input[1], "weight")
    if W.ndim != 4:
        raise _unsupported(g, node, f"a weight of shape {W.shape} (only 2-d convolutions)")
    if int(a.get("group", 1)) != 1:
        raise _unsupported(g, node, f"group={a.get('group')} (only 1)")
    if tuple(a.get("dilations", (1, 1))) != (1, 1):
        raise _unsupported(g, node, f"dilations={tuple(a.get('dilations'))} (only 1)")
    k = tuple(int(v) for v in W.shape[2:])
    if "kernel_shape" in a and tuple(a["kernel_shape"]) != k:
        raise _unsupported(g, node, f"kernel_shape {tuple(a['kernel_shape'])} differs from the weight's {k}")
    pad = _pads(g, node, a, k)
    params = {"W": np.array(W, dtype=np.float64)}
    if len(node.input) > 2 and node.input[2]:
        params["b"] = np.array(g.const(node, node.input[2], "bias"), dtype=np.float64).ravel()
    kw = {"c_in": int(W.shape[1]), "c_out": int(W.shape[0]), "kernel_size": k, "stride": tuple(int(s) for s in a.get("strides", (1, 1))),
          "padding": pad, "padding_mode": "zeros", "bias": "b" in params}
    return Piece(node, "conv", kw, params)


def _activation(row):
    def handler(g, node, a):
        vals = dict(a)
        if row.onnx == "Clip":  # opset >= 11: min and max are inputs
            for pos, name in ((1, "min"), (2, "max")):
                if len(node.input) > pos and node.input[pos]:
                    vals[name] = float(np.asarray(g.const(node, node.input[pos], name)).reshape(()))
        for attr, value in row.onnx_fixed:
            got = vals.get(attr, _ONNX_DEFAULTS.get((row.onnx, attr)))
            if got is None or np.float32(got) != np.float32(value):
                fixed = ", ".join(f"{k}={v:g}" for k, v in row.onnx_fixed)
                raise _unsupported(g, node, f"{row.onnx} is supported only with {fixed} (refnet's {row.name}), got {attr}={got}")
        params = {p: float(vals.get(attr, default)) for p, attr, default in row.onnx_params}
        return Piece(node, "act", {"name": row.name, "params": params})

    return handler


def _pool(kind):
    def handler(g, node, a):
        if len(node.output) > 1 and any(node.output[1:]):
            raise _unsupported(g, node, "its indices output is used")
        k = tuple(int(v) for v in a.get("kernel_shape", ()))
        if len(k) != 2:
            raise _unsupported(g, node, f"kernel_shape {k} (only 2-d pooling)")
        s = tuple(int(v) for v in a.get("strides", (1, 1)))
        problems = []
        if k[0] != k[1]:
            problems.append(f"kernel {k} is not square")
        if s != k:
            problems.append(f"strides {s} != kernel {k}")
        if _pads(g, node, a, k) != (0, 0):
            problems.append(f"pads {tuple(a.get('pads'))}")
        if int(a.get("ceil_mode", 0)):
            problems.append("ceil_mode=1")
        if tuple(a.get("dilations", (1, 1))) != (1, 1):
            problems.append(f"dilations {tuple(a.get('dilations'))}")
        if problems:
            raise _unsupported(g, node, ", ".join(problems))
        return Piece(node, kind, {"kernel_size": k[0]})

    return handler


def _global_pool(g, node, a):
    return Piece(node, "gap_keepdim")


def _reduce_mean(g, node, a):
    axes = a.get("axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = g.const(node, node.input[1], "axes").tolist()
    keep = int(a.get("keepdims", 1))
    if axes is None:
        raise _unsupported(g, node, "a mean over all axes")
    if g.values is not None:
        nd = len(g.shape(node.input[0]))
        if nd != 4 or sorted(int(d) % nd for d in axes) != [2, 3]:
            raise _unsupported(g, node, f"a mean over axes {list(axes)} of a {nd}-d tensor; only the spatial axes (2, 3) "
                                        "of an NCHW image are global average pooling")
    return Piece(node, "gap_keepdim" if keep else "gap")


def _flatten(g, node, a):
    if int(a.get("axis", 1)) != 1:
        raise _unsupported(g, node, f"Flatten(axis={a.get('axis')}); only axis 1 (flatten each example)")
    return Piece(node, "flatten")


def _reshape(g, node, a):
    """Reshape / Squeeze: a flatten of each example, checked on the probe's shapes."""
    if node.op_type == "Squeeze":
        axes = a.get("axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            axes = g.const(node, node.input[1], "axes").tolist()
        if axes is None or 0 in [int(v) for v in axes]:
            raise _unsupported(g, node, "a Squeeze that may drop the batch axis (give axes without 0)")
    if g.values is not None:
        src = g.data_inputs(node)[0]
        for vals in (g.values, g.values2):
            if vals is None:
                continue
            i, o = tuple(vals[src].shape), tuple(vals[node.output[0]].shape)
            if o != (i[0], int(np.prod(i[1:]))):
                raise _unsupported(g, node, f"reshapes {i} to {o}; only flattening each example ((B, ...) -> (B, -1)) is supported")
    return Piece(node, "flatten")


def _identity(g, node, a):
    if node.op_type == "Dropout":
        if len(node.output) > 1 and any(node.output[1:]):
            raise _unsupported(g, node, "its mask output is used")
        if len(node.input) > 2 and node.input[2]:
            training = g.const(node, node.input[2], "training_mode")
            if bool(np.asarray(training).reshape(())):
                raise _unsupported(g, node, "Dropout in training mode drops random units, which refnet does not model")
    return Piece(node, "identity")


def _rank(g, node):
    """The rank of the node's data input on the probe (None before the probe)."""
    return None if g.values is None else len(g.shape(g.data_inputs(node)[0]))


def _batchnorm(g, node, a):
    """BatchNormalization: gamma = scale, beta = B, the running statistics from input_mean and
    input_var; ``training_mode`` 1 is train mode (batch statistics). ONNX's momentum weighs the old
    running value, refnet's (PyTorch's) the batch statistic: ``1 - momentum``."""
    if g.cls.get(node.input[0]) != "data":
        raise _unsupported(g, node, "the data must be its first input")
    if len(node.input) != 5:
        raise _unsupported(g, node, f"{len(node.input)} inputs (X, scale, B, input_mean, input_var expected)")
    if len(node.output) > 1 and any(node.output[1:]):
        raise _unsupported(g, node, "its running-statistics outputs are used (refnet updates them only in training)")
    arrs = [np.asarray(g.const(node, node.input[i], what), np.float64).ravel()
            for i, what in ((1, "scale"), (2, "B"), (3, "input_mean"), (4, "input_var"))]
    C = arrs[0].size
    if any(v.size != C for v in arrs):
        raise _unsupported(g, node, f"scale, B, mean and var of sizes {[v.size for v in arrs]}")
    if "spatial" in a and int(a["spatial"]) != 1:
        raise _unsupported(g, node, "spatial=0 (per-position statistics)")
    nd = _rank(g, node)
    kind = {None: "batchnorm", 2: "batchnorm1d", 4: "batchnorm2d"}.get(nd)
    if kind is None:
        raise _unsupported(g, node, f"batch normalization of a {nd}-d input; refnet has BatchNorm1d over (B, C) and "
                                    "BatchNorm2d over (B, C, H, W)")
    mode = "train" if int(a.get("training_mode", 0)) else "eval"
    kw = {"num_features": C, "eps": float(a.get("epsilon", 1e-5)), "momentum": 1.0 - float(a.get("momentum", 0.9)),
          "affine": True, "mode": mode}
    return Piece(node, kind, kw, {"gamma": arrs[0], "beta": arrs[1]},
                 buffers={"running_mean": arrs[2], "running_var": arrs[3]})


def _slice(g, node, a):
    """Slice with steps along the spatial axes of an NCHW tensor (start 0, to the end):
    ``x[:, :, ::s, ::s]``, the first half of the option-A shortcut."""
    if "starts" in a:  # opset < 10: attributes, no steps
        starts, ends, axes, steps = a["starts"], a["ends"], a.get("axes"), None
    else:
        starts, ends, axes, steps = (g.const_value(node, node.input[i], what) if len(node.input) > i else None
                                     for i, what in ((1, "starts"), (2, "ends"), (3, "axes"), (4, "steps")))
    if g.values is None:
        return Piece(node, "subsample_pad", {"stride": (1, 1), "pad_channels": (0, 0)})
    shape = g.shape(g.data_inputs(node)[0])
    starts = [int(v) for v in np.ravel(starts)]
    ends = [int(v) for v in np.ravel(ends)]
    axes = list(range(len(starts))) if axes is None else [int(v) % len(shape) for v in np.ravel(axes)]
    steps = [1] * len(starts) if steps is None else [int(v) for v in np.ravel(steps)]
    stride = [1, 1]
    for ax, s0, e, st in zip(axes, starts, ends, steps):
        if len(shape) != 4 or ax not in (2, 3) or s0 != 0 or st < 1 or e < shape[ax]:
            raise _unsupported(g, node, f"Slice(starts={starts}, ends={ends}, axes={axes}, steps={steps}) of a tensor of shape "
                                        f"{shape}; only x[:, :, ::s, ::s] (spatial subsampling, the option-A shortcut)")
        stride[ax - 2] *= st
    return Piece(node, "subsample_pad", {"stride": tuple(stride), "pad_channels": (0, 0)})


def _pad(g, node, a):
    """Pad of an NCHW tensor's channels with zeros, ``pads = [0, a, 0, 0, 0, b, 0, 0]``: the second
    half of the option-A shortcut."""
    mode = a.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if "pads" in a:  # opset < 11
        pads, value = a["pads"], a.get("value", 0.0)
    else:
        pads = g.const_value(node, node.input[1], "pads") if len(node.input) > 1 else None
        value = g.const_value(node, node.input[2], "constant_value") if len(node.input) > 2 and node.input[2] else 0.0
    if len(node.input) > 3 and node.input[3]:
        raise _unsupported(g, node, "Pad with axes")
    if g.values is None:
        return Piece(node, "subsample_pad", {"stride": (1, 1), "pad_channels": (0, 0)})
    pads = [int(v) for v in np.ravel(pads)]
    value = float(np.ravel(value)[0]) if np.size(value) else 0.0
    if mode != "constant" or value != 0.0 or len(pads) != 8 or any(pads[i] for i in (0, 2, 3, 4, 6, 7)) or min(pads) < 0:
        raise _unsupported(g, node, f"Pad(mode={mode!r}, pads={pads}, value={value}); only zero channels of an NCHW tensor, "
                                    "pads = [0, a, 0, 0, 0, b, 0, 0] (the option-A shortcut)")
    return Piece(node, "subsample_pad", {"stride": (1, 1), "pad_channels": (pads[1], pads[5])})


def _tables() -> dict:
    """op_type -> handler(graph, node, attributes) -> Piece."""
    t = {
        "Gemm": _gemm, "MatMul": _matmul, "Add": _add, "Conv": _conv,
        "MaxPool": _pool("maxpool"), "AveragePool": _pool("avgpool"),
        "GlobalAveragePool": _global_pool, "ReduceMean": _reduce_mean,
        "Flatten": _flatten, "Reshape": _reshape, "Squeeze": _reshape,
        "Identity": _identity, "Dropout": _identity,
        "BatchNormalization": _batchnorm, "Slice": _slice, "Pad": _pad,
    }
    for row in ACTIVATIONS.values():
        if row.onnx is not None:
            t[row.onnx] = _activation(row)
    return t


def _handle(g, node):
    handler = _tables().get(node.op_type)
    if handler is None:
        raise _unsupported(g, node)
    if node.domain not in ("", "ai.onnx"):
        raise _unsupported(g, node, f"operator domain {node.domain!r}")
    return handler(g, node, _attrs(g.onnx, node))


def _chain(g):
    """The live data nodes in graph (topological) order; ValueError for a node that reads more
    tensors than its operator takes here (only Add reads two). The graph may branch (residual
    connections): :func:`refnet.audit.graph.group_pieces` turns it into layers and their inputs."""
    graph = g.model.graph
    live, stack = set(), [g.output]
    while stack:
        v = stack.pop()
        n = g.producer.get(v)
        if n is None or id(n) in live:
            continue
        live.add(id(n))
        stack.extend(i for i in n.input if i)
    if g.cls.get(g.output) != "data":
        raise ValueError(f"{g.path}: the output {g.output!r} does not depend on the input")
    if g.output == g.input.name:
        raise ValueError(f"{g.path}: the output is the input: there is no layer to import")
    chain = []
    for node in graph.node:
        if id(node) not in live or g.cls.get(node.output[0]) != "data":
            continue
        piece = _handle(g, node)  # structure only (no values yet): unsupported operations are named first
        data = g.data_inputs(node)
        want = 2 if piece.kind == "add" else 1
        if len(data) != want:
            raise ValueError(f"{g.where(node)} reads {len(data)} tensors ({', '.join(data)}); refnet imports "
                             f"{'an addition of two tensors' if want == 2 else 'one tensor per operation'} here "
                             "(no concatenations or products of tensors)")
        chain.append(node)
    return chain


def _wire(g, node, piece):
    piece.inputs = tuple(g.data_inputs(node))
    piece.out = node.output[0]
    return piece


def _session(onnxruntime, model_bytes, optimize: bool):
    so = onnxruntime.SessionOptions()
    if not optimize:
        so.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    return onnxruntime.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def _all_values_model(onnx, model, names):
    """A copy of the model that also outputs ``names`` (onnxruntime infers their types)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(onnx.ValueInfoProto(name=n))
    return m


@dataclass
class OnnxGraph:
    """An ONNX model imported by :func:`convert_onnx`.

    Attributes
    ----------
    net : Network
        float64, weights from the initializers (``W`` in refnet/PyTorch layout).
    sources : list of str
        Per refnet layer, the nodes it covers (``onnx [/0/Gemm] Gemm + [/1/Tanh] Tanh``).
    outputs : list of str
        Per refnet layer, the ONNX value name of its output.
    input_name, output_name : str
    dtype : numpy dtype
        Of the model's input (what onnxruntime runs in).
    batch : int or None
        The model's fixed batch size (None: symbolic).
    probe : dict
    model_bytes : bytes
        The serialized model as loaded.
    """

    net: Network
    sources: list
    outputs: list
    input_name: str
    output_name: str
    dtype: object
    batch: int | None
    probe: dict
    model_bytes: bytes


def convert_onnx(path, in_shape=None) -> OnnxGraph:
    """Import an ONNX file (see the module docstring) or refuse with a ValueError naming the node.

    Parameters
    ----------
    path : str or PathLike
        An ``.onnx`` file (external data next to it is read too).
    in_shape : tuple of int, optional
        Per-example input shape; default the model's input shape without its batch axis (needed
        when those axes are symbolic).
    """
    onnx, numpy_helper, onnxruntime = import_onnx()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"onnx file {path!r} does not exist")
    try:
        model = onnx.load(path)
        onnx.checker.check_model(model)
    except Exception as exc:  # protobuf and checker errors come in many types
        raise ValueError(f"{path}: not a valid ONNX model: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    g = _Graph(path, model, onnx, numpy_helper)
    tt = g.input.type.tensor_type
    dtype = _ONNX_DTYPES.get(tt.elem_type)
    if dtype is None:
        raise ValueError(f"{path}: the input {g.input.name!r} has element type {tt.elem_type} "
                         "(only float, double, float16)")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
    if not dims:
        raise ValueError(f"{path}: the input {g.input.name!r} has no shape; give in_shape")
    batch = dims[0]
    if in_shape is None:
        if any(d is None for d in dims[1:]) or len(dims) < 2:
            raise ValueError(f"in_shape is required: the input {g.input.name!r} of {path} has symbolic axes {dims}; "
                             "give the per-example input shape, e.g. in_shape=(1, 28, 28)")
        in_shape = tuple(dims[1:])
    in_shape = parse_shape(in_shape, "in_shape")
    if len(dims) != len(in_shape) + 1 or any(d is not None and d != s for d, s in zip(dims[1:], in_shape)):
        raise ValueError(f"the ONNX model does not fit in_shape={in_shape}: its input {g.input.name!r} has shape {dims}")
    chain = _chain(g)  # first pass: structure only
    # the probe: every value of the graph, as onnxruntime computes it
    names = [o for n in model.graph.node for o in n.output if o]
    probe_model = _all_values_model(onnx, model, names)
    try:
        sess = _session(onnxruntime, probe_model.SerializeToString(), optimize=False)
    except Exception as exc:
        raise ValueError(f"{path}: onnxruntime cannot load the model: {str(exc).splitlines()[0]}") from None
    outs = [o.name for o in sess.get_outputs()]
    rng = np.random.default_rng(0)
    runs = []
    for B in ((batch,) if batch else PROBE_BATCH):
        x = rng.standard_normal((B, *in_shape)).astype(dtype)
        try:
            vals = sess.run(None, {g.input.name: x})
        except Exception as exc:
            raise ValueError(f"the ONNX model does not fit in_shape={in_shape} with a batch of {B}: "
                             f"{str(exc).splitlines()[0]}") from None
        runs.append((x, {**dict(zip(outs, vals)), g.input.name: x}))
    g.values = runs[0][1]
    g.values2 = runs[1][1] if len(runs) > 1 else None
    for node in chain:
        o = node.output[0]
        shapes = [np.shape(r[1][o]) for r in runs]
        if any(len(s) == 0 or s[0] != r[0].shape[0] for s, r in zip(shapes, runs)) or len({s[1:] for s in shapes}) != 1:
            raise ValueError(f"{g.where(node)}: output shapes {shapes} for batches of {[r[0].shape[0] for r in runs]}: refnet needs "
                             "(B, *shape) with a per-example shape that does not depend on B")
    pieces = [_wire(g, node, _handle(g, node)) for node in chain]

    def merge(spec, piece):  # MatMul + Add of a constant: the bias of the Dense before it
        if piece.kind != "bias" or spec["kind"] != "dense" or spec["kw"]["bias"] or spec["act"] is not None:
            return False
        b = piece.kw["b"]
        n = spec["kw"]["n_out"]
        if b.size not in (1, n) or (b.ndim > 1 and b.shape[-1] != b.size):
            return False
        spec["kw"]["bias"] = True
        spec["params"]["b"] = np.broadcast_to(b.ravel(), (n,)).astype(np.float64)
        piece.kw["b"] = spec["params"]["b"]
        return True

    specs = group_pieces(pieces, g.input.name, g.output, g.where, g.label, SUPPORTED, merge=merge)
    layers = [piece_layer(s) for s in specs]
    params = [dict(s["params"]) for s in specs]
    buffers = [dict(s["buffers"]) for s in specs]
    try:
        net = Network(layers, in_shape=in_shape, params=params, buffers=buffers, inputs=[s["inputs"] for s in specs])
    except ValueError as exc:
        raise ValueError(f"the ONNX model does not fit in_shape={in_shape}: {exc}") from None
    name = np.dtype(dtype).name
    tol = AS_RUN_RTOL[name]

    def value(name):
        return np.asarray(g.values[name], dtype=np.float64)

    x0 = runs[0][0].astype(np.float64)
    worst, _ = check_layers(net, specs, value, x0, tol, g.where, "ONNX model (onnxruntime)")
    out = net.forward(x0)
    e = rel_err(out, np.asarray(g.values[g.output], np.float64))
    if not e <= tol:
        raise ValueError(f"the converted network's forward differs from onnxruntime's on the probe batch (max relative "
                         f"error {e:.2e} > {tol:g} for {name}); every node agrees on its own, so the errors grow along the graph")
    sources = ["onnx " + " + ".join(g.source(p.node) for p in s["pieces"]) for s in specs]
    outputs = [s["out"] for s in specs]
    probe = {"probe_batch": int(runs[0][0].shape[0]), "probe_max_rel_err": max(worst, e), "probe_rtol": tol,
             "graph_nodes": len(g.index), "opset": [f"{o.domain or 'ai.onnx'}:{o.version}" for o in model.opset_import]}
    return OnnxGraph(net, sources, outputs, g.input.name, g.output, np.dtype(dtype), batch, probe, model.SerializeToString())


def from_onnx(path, in_shape=None) -> Network:
    """A float64 refnet :class:`~refnet.network.Network` computing what an ONNX model computes
    (:func:`convert_onnx`: the mapping table is in the module docstring), checked node by node
    against onnxruntime on a probe batch before it is returned; ValueError naming the node for
    anything refnet does not model."""
    return convert_onnx(path, in_shape).net


def compare_onnx(
    path,
    x,
    y,
    loss="cross_entropy",
    *,
    sparsity=0.9,
    rtol=DEFAULT_RTOL,
    rtol_as_run=None,
    reference: Network | None = None,
    in_shape=None,
    jacobian: bool = True,
) -> AuditReport:
    """Audit an ONNX model as onnxruntime runs it against refnet's float64 reference.

    onnxruntime computes the forward pass only, in the model's own dtype (usually float32): the
    report compares its logits and the output of every refnet layer (``act/{i}``, the node values
    of an instrumented copy run without graph optimisations) with refnet's float64 forward, in the
    section ``as-run <dtype>`` held to the as-run tolerance (:data:`AS_RUN_RTOL`; ``rtol`` for a
    float64 model). The gradients, Jacobians, their singular values and the SNIP scores and masks
    are refnet's, exact in float64: the report's meta has their statistics, and ``report.reference``
    (a :class:`refnet.audit.reference.Reference`) holds the arrays (``grads``, ``jac``, ``sv``,
    ``scores``, ``masks``); ``refnet audit --onnx`` writes them to ``OUT/reference.npz``.

    Parameters
    ----------
    path : str or PathLike
        The ``.onnx`` file (read with ``onnx.load``: a protobuf, no pickle).
    x : ndarray, shape (B, *in_shape)
        Inputs (NCHW for images), cast to the model's input dtype for onnxruntime; the reference
        runs on the cast values.
    y : ndarray, shape (B,) int labels or (B, C) targets
    loss : "cross_entropy" or "mse"
    sparsity : float in [0, 1)
        Of refnet's SNIP masks.
    rtol, rtol_as_run : float
        Tolerances (see above).
    reference : Network, optional
        The refnet network to compare with; default ``from_onnx(path)``.
    in_shape : tuple, optional
        Default ``x.shape[1:]``.
    jacobian : bool
        Compute refnet's input-output Jacobians and their singular values.

    Returns
    -------
    AuditReport
        With the attribute ``reference`` (refnet's results).
    """
    onnx, _, onnxruntime = import_onnx()
    loss_name = check_loss(loss)
    sparsity = check_sparsity(sparsity)
    rtol = check_rtol(rtol)
    if rtol_as_run is not None:
        rtol_as_run = check_rtol(rtol_as_run, "rtol_as_run")
    x_arr = np.asarray(x)
    if in_shape is None:
        if x_arr.ndim < 2:
            raise ValueError(f"x must be a batch (B, *in_shape), got shape {x_arr.shape}")
        in_shape = x_arr.shape[1:]
    layout = convert_onnx(path, in_shape)
    if layout.batch and x_arr.shape[0] != layout.batch:
        raise ValueError(f"the ONNX model has a fixed batch size of {layout.batch}; x has {x_arr.shape[0]} examples")
    net = layout.net
    act_diffs = []
    if reference is not None:
        act_diffs = match_reference(reference, net, "ONNX model")
        net = reference.astype(np.float64) if reference.dtype != np.float64 else reference
    x_run = np.ascontiguousarray(x_arr, dtype=layout.dtype)
    x_ref, y_arr = check_xy(net, x_run.astype(np.float64), y, loss_name)
    t0 = time.perf_counter()
    jacobian, jac_note = batch_jacobian_note(net, jacobian)
    ref = graph_reference(net, x_ref, y_arr, loss_name, sparsity, jacobian)
    name = layout.dtype.name
    tol = section_tol(name, rtol, rtol_as_run) if name in AS_RUN_RTOL else section_tol("float32", rtol, rtol_as_run)
    meta = {"file": os.path.abspath(os.fspath(path)), "onnx_version": onnx.__version__,
            "onnxruntime_version": onnxruntime.__version__, "model_dtype": name, "sparsity": sparsity,
            "rtol_as_run": tol, "reference": "given Network" if reference is not None else "from_onnx(path)",
            "import": "ONNX graph, checked against onnxruntime on a probe batch", "import_probe": layout.probe}
    report = new_report("onnx", ref, meta)
    report.notes.append(
        "onnxruntime computes the forward pass only: its logits and every layer's output are compared; the gradients, "
        "Jacobians, singular values and SNIP scores and masks are refnet's exact float64 values (report.reference; "
        "`refnet audit --onnx` writes them to reference.npz)."
    )
    report.notes.append(f"x is cast to the model's input dtype ({name}) for onnxruntime; the reference runs on the cast values.")
    if jac_note:
        report.notes.append(jac_note)
    add_activation_checks(report, act_diffs, layout.sources)
    plain = _session(onnxruntime, layout.model_bytes, optimize=True)  # as the user runs it
    logits = plain.run([layout.output_name], {layout.input_name: x_run})[0]
    inst = _session(onnxruntime, _all_values_model(onnx, onnx.load_from_string(layout.model_bytes), layout.outputs).SerializeToString(),
                    optimize=False)
    outs = [o.name for o in inst.get_outputs()]
    vals = dict(zip(outs, inst.run(None, {layout.input_name: x_run})))
    run = Run(name, logits=np.asarray(logits, np.float64),
              acts=[np.asarray(vals[o], np.float64) if o in vals else None for o in layout.outputs])
    compare_run(ref, run, f"as-run {name}", tol, sparsity, layout.sources, report)
    report.meta["seconds"] = round(time.perf_counter() - t0, 3)
    report.reference = ref
    return report
