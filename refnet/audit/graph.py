r"""The framework-neutral half of graph import: the pieces a converter maps each graph node to,
their grouping into refnet layers and the graph between them, and the node-by-node probe
comparison. The PyTorch importer (:mod:`refnet.audit.fx`) and the ONNX importer
(:mod:`refnet.audit.onnx`) both map nodes to :class:`Piece` objects and share everything after that.

A refnet layer owns one affine map (or batch normalization, or a residual addition) and its
activation, so a layer covers several nodes: ``Linear -> Tanh`` is one
``Dense(..., activation="tanh")``, ``Conv2d -> BatchNorm2d -> ReLU`` is ``Conv2d`` then
``BatchNorm2d(..., activation="relu")``, ``out + shortcut -> ReLU`` is ``Add("relu")``; a no-op
(Identity, eval-mode Dropout) joins the layer before it; global average pooling that keeps its
``1 x 1`` axes joins the flatten after it; spatial subsampling and zero channel padding (the "option
A" shortcut) make one :class:`~refnet.layers.SubsamplePad`. A node is fused into the layer before it
only when that layer's output has no other reader (otherwise the other reader would see the fused
value). :func:`group_pieces` does this grouping and records, for every layer, the refnet nodes it
reads (``Network(..., inputs=...)``: node 0 the input, node ``j`` the output of layer ``j - 1``; a
chain reads ``(j,)`` from layer ``j``, an :class:`~refnet.layers.Add` two nodes);
:func:`piece_layer` builds the layer, and :func:`check_layers` compares, node by node, each refnet
layer applied to the framework's own inputs of that layer with the framework's output of every node
the layer covers, so that a failure names the first node that differs.

No framework is imported here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..layers import (
    Add,
    AvgPool2d,
    BatchNorm1d,
    BatchNorm2d,
    Conv2d,
    Dense,
    Flatten,
    GlobalAvgPool2d,
    MaxPool2d,
    SubsamplePad,
)
from .reference import compute_reference

__all__ = ["ACT_HOSTS", "GAP_ONLY", "LAYERS", "REFUSED", "Piece", "batch_jacobian_note", "check_layers", "graph_reference",
           "group_pieces", "node_outputs", "piece_layer", "rel_err"]

#: operations recognised but refused because refnet's engine cannot compute them, by both
#: importers (empty now that the engine has batch normalization and residual composition).
#: Adding one: an entry here, and a handler in each importer's table that raises with it.
REFUSED: dict = {}

#: the refnet layer of each piece kind that is a layer of its own (the kinds of
#: :data:`ACT_HOSTS` also take the activation that follows them)
LAYERS = {"dense": Dense, "conv": Conv2d, "avgpool": AvgPool2d, "maxpool": MaxPool2d, "gap": GlobalAvgPool2d,
          "flatten": Flatten, "batchnorm1d": BatchNorm1d, "batchnorm2d": BatchNorm2d, "add": Add,
          "subsample_pad": SubsamplePad}

#: the kinds whose refnet layer has an activation (an activation node right after one is fused into it)
ACT_HOSTS = ("dense", "conv", "batchnorm1d", "batchnorm2d", "add")

#: the kinds whose node output is refnet's pre-activation ``h`` (``cache["h"]``)
_H_KINDS = ("dense", "conv", "bias", "batchnorm1d", "batchnorm2d", "add")

GAP_ONLY = "only AdaptiveAvgPool2d(1) followed by Flatten() (global average pooling) is supported"


@dataclass(eq=False)
class Piece:
    """What one graph node computes, in refnet's terms.

    Attributes
    ----------
    node : object
        The framework's node (an fx ``Node``, an ONNX ``NodeProto``).
    kind : str
        ``dense``, ``conv`` (``kw`` = the layer's arguments, ``params`` = where W and b live),
        ``batchnorm1d``/``batchnorm2d`` (``kw`` = the layer's arguments, ``params`` = where gamma
        and beta live, ``buffers`` = the running statistics), ``add`` (the sum of two tensors),
        ``subsample_pad`` (``kw`` = ``{"stride", "pad_channels"}``), ``act`` (``kw`` =
        ``{"name", "params"}``), ``avgpool``/``maxpool`` (``kw`` = ``{"kernel_size"}``), ``gap``
        (global average pooling to ``(B, C)``), ``gap_keepdim`` (to ``(B, C, 1, 1)``: must be
        followed by a flatten), ``flatten``, ``identity`` (a no-op), or an importer's own kind
        (``bias`` for ONNX's MatMul + Add).
    kw : dict
    params : dict
        refnet parameter name (``"W"``, ``"b"``, ``"gamma"``, ``"beta"``) -> the importer's
        reference to the parameter.
    inplace : bool
        The node overwrites its (first) input.
    inputs : tuple
        The keys of the data values the node reads (fx nodes, ONNX value names), in order.
    out : object
        The key of the value it produces.
    buffers : dict
        ``"running_mean"``/``"running_var"`` -> the importer's reference (batch normalization).
    """

    node: object
    kind: str
    kw: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    inplace: bool = False
    inputs: tuple = ()
    out: object = None
    buffers: dict = field(default_factory=dict)


def _act_error(where, label, piece, prev) -> ValueError:
    w = where(piece.node)
    if prev is None or prev["kind"] not in ACT_HOSTS:
        if prev is None:
            what = "it is the first module or operation"
        else:
            what = f"it follows {label(prev['pieces'][-1].node)}"
        return ValueError(
            f"{w}: an activation must come right after a Linear, Conv2d, BatchNorm or residual addition ({what}); "
            "refnet fuses each activation into the layer before it (one layer = one W, or one BatchNorm, or one "
            "sum, and its phi). Put the activation before the pooling (ReLU and max-pooling commute) or add an "
            "explicit Linear/Conv2d"
        )
    return ValueError(f"{w}: a second activation after {label(prev['pieces'][0].node)}; refnet layers have one "
                      f"activation each (already {prev['act'][0]})")


def group_pieces(pieces, first, last, where, label, supported: str, merge=None) -> list:
    """Group a graph's pieces into refnet layer specs
    ``{"kind", "kw", "pieces", "act", "params", "buffers", "inputs", "out"}``.

    ``pieces`` are the data nodes in topological order (each with ``inputs`` and ``out`` keys),
    ``first`` the key of the graph's input, ``last`` that of its output. A spec's ``inputs`` are
    the refnet nodes its layer reads (node 0: the input; node ``j``: the output of spec
    ``j - 1``), ``out`` the key of the framework value equal to its output.

    An activation joins the layer of :data:`ACT_HOSTS` that produces its input; a no-op joins the
    layer that produces its input (it reads the same refnet node); ``gap_keepdim`` joins the
    flatten after it; a ``subsample_pad`` after a ``subsample_pad`` composes with it (strides
    multiply, channel pads add); ``merge(spec, piece)`` (optional) may absorb an importer's own
    piece kind into the spec that produces its input (True). Fusing requires that the fused value
    has no other reader. ``where(node)`` and ``label(node)`` name nodes in messages; anything that
    cannot be grouped is a ValueError naming the node.
    """
    # values equal to one another through no-ops share a root; readers are counted per root
    root = {first: first}
    for p in pieces:
        if p.kind == "identity" and p.inputs:
            root[p.out] = root.get(p.inputs[0], p.inputs[0])
        else:
            root.setdefault(p.out, p.out)
    readers: dict = {}
    for p in pieces:
        if p.kind == "identity":
            continue
        for k in p.inputs:
            readers.setdefault(root.get(k, k), []).append(p)

    def others(key, piece) -> list:
        """The nodes besides ``piece`` that read ``key`` (or a no-op of it); "the output" counts."""
        r = root.get(key, key)
        out = [q for q in readers.get(r, []) if q is not piece]
        return out + (["the output"] if root.get(last, last) == r else [])

    def name_of(q) -> str:
        return q if isinstance(q, str) else label(q.node)

    node_of = {first: 0}
    specs: list = []
    for p in pieces:
        if p.inplace and p.kind != "identity" and p.inputs:
            o = [q for q in others(p.inputs[0], p) if q != "the output"]
            if o:
                raise ValueError(f"{where(p.node)}: an in-place operation on a tensor that {name_of(o[0])} also reads "
                                 "(the graph does not show the order of the two); assign a new tensor instead")
        if not p.inputs or any(k not in node_of for k in p.inputs):
            raise ValueError(f"{where(p.node)}: reads a value refnet has no node for (internal error in the graph walk)")
        ins = tuple(node_of[k] for k in p.inputs)
        src = specs[ins[0] - 1] if ins[0] > 0 else None
        if p.kind == "identity":
            if src is not None:
                src["pieces"].append(p)
            node_of[p.out] = ins[0]
            continue
        fusable = src is not None and len(p.inputs) == 1 and not others(p.inputs[0], p)
        if p.kind == "act":
            if src is None or src["kind"] not in ACT_HOSTS or src["act"] is not None:
                raise _act_error(where, label, p, src)
            if not fusable:
                o = others(p.inputs[0], p)
                raise ValueError(f"{where(p.node)}: an activation of {label(src['pieces'][0].node)}, whose output "
                                 f"{name_of(o[0])} also reads; refnet fuses the activation into the layer, so the "
                                 "value before the activation cannot be read elsewhere")
            src["act"] = (p.kw["name"], p.kw["params"])
            src["pieces"].append(p)
            src["out"] = p.out
            node_of[p.out] = ins[0]
            continue
        if p.kind == "flatten" and src is not None and src["kind"] == "gap_keepdim":
            if not fusable:
                raise ValueError(f"unsupported setting in {where(src['pieces'][0].node)}: {GAP_ONLY} (its output is "
                                 f"also read by {name_of(others(p.inputs[0], p)[0])}). Supported: {supported}")
            src["kind"], src["kw"] = "gap", {}
            src["pieces"].append(p)
            src["out"] = p.out
            node_of[p.out] = ins[0]
            continue
        if src is not None and src["kind"] == "gap_keepdim":
            raise ValueError(f"unsupported setting in {where(src['pieces'][0].node)}: {GAP_ONLY} (it is followed by "
                             f"{label(p.node)}). Supported: {supported}")
        if p.kind == "subsample_pad" and fusable and src["kind"] == "subsample_pad":
            (s0, t0), (s1, t1) = _pair(src["kw"]["stride"]), _pair(p.kw["stride"])
            (a0, b0), (a1, b1) = src["kw"]["pad_channels"], p.kw["pad_channels"]
            src["kw"] = {"stride": (s0 * s1, t0 * t1), "pad_channels": (a0 + a1, b0 + b1)}
            src["pieces"].append(p)
            src["out"] = p.out
            node_of[p.out] = ins[0]
            continue
        if p.kind not in LAYERS and p.kind != "gap_keepdim":
            if merge is not None and fusable and src["act"] is None and merge(src, p):
                src["pieces"].append(p)
                src["out"] = p.out
                node_of[p.out] = ins[0]
                continue
            prev = src["pieces"][-1].node if src is not None else None
            raise ValueError(f"{where(p.node)}: cannot be mapped here (a {p.kind} after "
                             f"{label(prev) if prev is not None else 'the input'}). Supported: {supported}")
        kw = dict(p.kw)
        kw.pop("dim", None)
        specs.append({"kind": p.kind, "kw": kw, "pieces": [p], "act": None, "params": dict(p.params),
                      "buffers": dict(p.buffers), "inputs": ins, "out": p.out})
        node_of[p.out] = len(specs)
    if not specs:
        raise ValueError("the model holds no layer refnet can convert (only no-ops such as Identity)")
    if specs[-1]["kind"] == "gap_keepdim":
        raise ValueError(f"unsupported setting in {where(specs[-1]['pieces'][0].node)}: {GAP_ONLY} (it is followed by "
                         f"nothing). Supported: {supported}")
    for spec in specs:
        if spec["kind"] == "subsample_pad":
            sh, sw = _pair(spec["kw"]["stride"])
            if sh != sw:
                raise ValueError(f"unsupported setting in {where(spec['pieces'][0].node)}: spatial subsampling by "
                                 f"({sh}, {sw}); refnet's SubsamplePad takes one stride for both axes. Supported: {supported}")
            spec["kw"]["stride"] = sh
    if node_of.get(last) != len(specs):
        raise ValueError(f"the model's output is not the output of its last layer (refnet node {node_of.get(last)} of "
                         f"{len(specs)}): the graph does not end in one layer")
    return specs


def _pair(s) -> tuple:
    return (int(s), int(s)) if np.ndim(s) == 0 else (int(s[0]), int(s[1]))


def _subsample_pad(x, stride, pad_channels):
    """``x[:, :, ::sh, ::sw]`` with ``a`` zero channels before and ``b`` after."""
    sh, sw = _pair(stride)
    a, b = pad_channels
    sub = x[:, :, ::sh, ::sw]
    y = np.zeros((sub.shape[0], a + sub.shape[1] + b) + sub.shape[2:], dtype=sub.dtype)
    y[:, a:a + sub.shape[1]] = sub
    return y


def piece_layer(spec):
    """The refnet layer of a spec of :func:`group_pieces`."""
    act = None if spec["act"] is None else {"name": spec["act"][0], **spec["act"][1]}
    cls = LAYERS[spec["kind"]]
    if spec["kind"] in ACT_HOSTS:
        return cls(activation=act or "identity", **spec["kw"])
    return cls(**spec["kw"])


def rel_err(got, ref) -> float:
    """``max |got - ref| / max |ref|`` (inf for a shape mismatch; non-finite entries must match)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    if got.shape != ref.shape:
        return math.inf
    if not (np.all(np.isfinite(got)) and np.all(np.isfinite(ref))):
        return 0.0 if np.array_equal(got, ref, equal_nan=True) else math.inf
    err = float(np.max(np.abs(got - ref))) if ref.size else 0.0
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    return err / scale if scale > 0 else (0.0 if err == 0 else math.inf)


def _layer_input(net, i, nodes):
    ins = net.inputs[i]
    return nodes[ins[0]] if getattr(net.layers[i], "n_inputs", 1) == 1 else tuple(nodes[j] for j in ins)


def node_outputs(net, x) -> list:
    """``[x^0, x^1, ..., x^K]``: the value of every node of ``net`` (chain or graph) on the batch
    ``x`` (node ``j`` is the output of ``net.layers[j - 1]``)."""
    nodes = [np.asarray(x)]
    for i, layer in enumerate(net.layers):
        y, _ = layer.forward(net.layer_params(i), _layer_input(net, i, nodes), net.masks[i])
        nodes.append(y)
    return nodes


def check_layers(net, specs, value, first_input, tol: float, where, what: str, softplus_threshold=None) -> tuple:
    """Node by node, each refnet layer applied to the framework's own inputs of that layer.

    ``value(key)`` is the framework's value of a graph value (float64 NumPy), ``first_input`` the
    network's input. Layer ``i`` reads the framework's values of the refnet nodes ``net.inputs[i]``
    (the output of spec ``j - 1`` for node ``j``); walking the nodes it covers, an affine map,
    batch normalization or addition must give refnet's pre-activation ``h``, an activation the
    output ``y``, a no-op the value before it, a subsampling/padding node that operation applied to
    the value before it, and the layer's last node ``y``, each to ``tol`` relative
    (:func:`rel_err`). With ``softplus_threshold``, the framework's softplus is taken to be linear
    above it (PyTorch's documented cut-off): entries above are compared with ``h``. ValueError
    naming the first node that differs (``what`` names the model).

    Returns ``(largest relative error, indices of softplus layers with entries above the threshold)``.
    """
    worst = 0.0
    exceeded = []

    def check(piece, got, desc):
        nonlocal worst
        ref = value(piece.out)
        got = np.reshape(got, ref.shape) if np.size(got) == ref.size else got
        e = rel_err(got, ref)
        if not e <= tol:
            raise ValueError(
                f"the converted network does not reproduce the {what} on the probe batch: {where(piece.node)} differs "
                f"({desc}: max relative error {e:.2e} > {tol:g}, shape {tuple(np.shape(got))} vs {tuple(ref.shape)}); "
                "refusing to audit a network that computes something else"
            )
        worst = max(worst, e)

    nodes = [first_input] + [value(spec["out"]) for spec in specs]
    for i, (layer, spec) in enumerate(zip(net.layers, specs)):
        x_in = _layer_input(net, i, nodes)
        y, cache = layer.forward(net.layer_params(i), x_in, net.masks[i])
        cur = x_in
        for k, p in enumerate(spec["pieces"]):
            last = k == len(spec["pieces"]) - 1
            if p.kind in _H_KINDS:
                cur = _partial_h(spec, p, cache, y)
                desc = f"refnet layer {i} pre-activation"
            elif p.kind == "act" and p.kw["name"] == "softplus" and softplus_threshold is not None:
                h = cache["h"]
                over = h > softplus_threshold
                if np.any(over):
                    exceeded.append(i)
                cur = np.where(over, h, y)
                desc = f"refnet layer {i} output (the framework's softplus is linear above {softplus_threshold:g})"
            elif p.kind == "identity":
                desc = f"refnet layer {i} value before this no-op"
            elif p.kind == "subsample_pad" and not last:
                cur = _subsample_pad(cur, p.kw["stride"], p.kw["pad_channels"])
                desc = f"refnet layer {i}, this node's subsampling/padding"
            else:
                cur = y
                desc = f"refnet layer {i} output"
            check(p, cur, desc)
    return worst, exceeded


def _partial_h(spec, piece, cache, y):
    """The pre-activation as far as ``piece``: ``h`` at the affine node (and at an importer's bias
    piece after it); for a bias-free affine node followed by a bias piece, ``h`` minus the bias."""
    pieces = spec["pieces"]
    h = cache.get("h", y)
    if piece.kind in ("dense", "conv"):
        k = next(j for j, q in enumerate(pieces) if q is piece)
        later_bias = [q for q in pieces[k + 1:] if q.kind == "bias"]
        if later_bias and "b" in spec["params"]:
            b = later_bias[0].kw["b"]
            return h - (b if h.ndim == 2 else b.reshape(1, -1, 1, 1))
    return h


def batch_jacobian_note(net, jacobian: bool) -> tuple:
    """``(jacobian, note)``: per-example input-output Jacobians exist only when no layer couples the
    examples of a batch; with batch normalization in train mode they are not computed (a note
    says why)."""
    if jacobian and net.couples_batch:
        return False, ("BatchNorm runs in train mode (batch statistics): one example's output depends on the whole "
                       "batch, so there are no per-example input-output Jacobians to compare; audit the module in eval "
                       "mode (module.eval()) for the Jacobians and their singular values.")
    return jacobian, ""


def graph_reference(net, x, y, loss_name: str, sparsity: float, want_jac: bool):
    """:func:`refnet.audit.reference.compute_reference`, with the layer outputs of a network with
    residual connections read from its nodes (:func:`refnet.audit.graph.node_outputs`: a node that
    only an addition's second input reads is in no layer's cache)."""
    ref = compute_reference(net, x, y, loss_name, sparsity, want_jac)
    if not net.is_chain:
        ref.acts = node_outputs(net, x)[1:]
    return ref
