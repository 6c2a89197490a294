r"""The framework-neutral half of graph import: the pieces a converter maps each graph node to,
their grouping into refnet layers, and the node-by-node probe comparison. The PyTorch importer
(:mod:`refnet.audit.fx`) and the ONNX importer (:mod:`refnet.audit.onnx`) both map nodes to
:class:`Piece` objects and share everything after that.

A refnet layer owns one affine map and its activation, so a layer covers several nodes:
``Linear -> Tanh`` is one ``Dense(..., activation="tanh")``; a no-op (Identity, eval-mode
Dropout) joins the layer before it; global average pooling that keeps its ``1 x 1`` axes joins the
flatten after it. :func:`group_pieces` does this grouping (refusing an activation that follows
anything but an affine map, or a second activation), :func:`piece_layer` builds the layer, and
:func:`check_layers` compares, node by node, each refnet layer applied to the framework's own input
of that layer with the framework's output of every node the layer covers, so that a failure names
the first node that differs.

No framework is imported here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..layers import AvgPool2d, Conv2d, Dense, Flatten, GlobalAvgPool2d, MaxPool2d

__all__ = ["GAP_ONLY", "LAYERS", "REFUSED", "Piece", "check_layers", "group_pieces", "piece_layer", "rel_err"]

#: operations recognised but refused until refnet's engine can compute them, by both importers.
#: Adding one: remove its entry here, let the importers' tables return a :class:`Piece` of a new
#: kind for it (``"batchnorm"``), and add that kind to :data:`LAYERS` (the engine's layer). A
#: residual addition also needs the importers' chain checks to accept a block's two branches.
REFUSED = {
    "batch_norm": "BatchNorm is refused until refnet's engine has a BatchNorm layer (train mode couples the examples)",
    "residual_add": "a residual addition (two tensors added) is refused until refnet's engine has residual "
                    "composition (main(x) + shortcut(x)); refnet imports chains only",
}

#: the refnet layer of each piece kind that is a layer of its own (``dense`` and ``conv`` also take
#: the activation that follows them)
LAYERS = {"dense": Dense, "conv": Conv2d, "avgpool": AvgPool2d, "maxpool": MaxPool2d, "gap": GlobalAvgPool2d,
          "flatten": Flatten}

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
        ``act`` (``kw`` = ``{"name", "params"}``), ``avgpool``/``maxpool`` (``kw`` =
        ``{"kernel_size"}``), ``gap`` (global average pooling to ``(B, C)``), ``gap_keepdim`` (to
        ``(B, C, 1, 1)``: must be followed by a flatten), ``flatten``, ``identity`` (a no-op), or an
        importer's own kind (``bias`` for ONNX's MatMul + Add).
    kw : dict
    params : dict
        ``"W"``/``"b"`` -> the importer's reference to the parameter.
    inplace : bool
        The node overwrites its input.
    """

    node: object
    kind: str
    kw: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    inplace: bool = False


def _act_error(where, label, piece, prev) -> ValueError:
    w = where(piece.node)
    if prev is None or prev["kind"] not in ("dense", "conv"):
        if prev is None:
            what = "it is the first module or operation"
        else:
            what = f"it follows {label(prev['pieces'][-1].node)}, not a Linear or Conv2d"
        return ValueError(
            f"{w}: an activation must come right after a Linear or Conv2d ({what}); refnet fuses each "
            "activation into the affine layer before it (one layer = one W and its phi). Put the activation "
            "before the pooling (ReLU and max-pooling commute) or add an explicit Linear/Conv2d"
        )
    return ValueError(f"{w}: a second activation after {label(prev['pieces'][0].node)}; refnet layers have one "
                      f"activation each (already {prev['act'][0]})")


def group_pieces(pieces, where, label, supported: str, merge=None) -> list:
    """Group a chain's pieces into refnet layer specs ``{"kind", "kw", "pieces", "act", "params"}``.

    An activation joins the ``dense``/``conv`` right before it; a no-op joins the layer before it
    (and is dropped when first); ``gap_keepdim`` joins the flatten after it. ``where(node)`` and
    ``label(node)`` name nodes in messages; ``merge(spec, piece)`` (optional) may absorb an
    importer's own piece kind into the spec before it (True) -- anything else is a ValueError.
    """
    specs = []
    i = 0
    while i < len(pieces):
        p = pieces[i]
        i += 1
        if p.kind == "identity":
            if specs:
                specs[-1]["pieces"].append(p)
            continue
        if p.kind == "act":
            prev = specs[-1] if specs else None
            if prev is None or prev["kind"] not in ("dense", "conv") or prev["act"] is not None:
                raise _act_error(where, label, p, prev)
            prev["act"] = (p.kw["name"], p.kw["params"])
            prev["pieces"].append(p)
            continue
        if p.kind not in LAYERS and p.kind != "gap_keepdim":
            if merge is not None and specs and merge(specs[-1], p):
                specs[-1]["pieces"].append(p)
                continue
            raise ValueError(f"{where(p.node)}: cannot be mapped here (a {p.kind} after "
                             f"{label(specs[-1]['pieces'][-1].node) if specs else 'nothing'}). Supported: {supported}")
        spec = {"kind": p.kind, "kw": dict(p.kw), "pieces": [p], "act": None, "params": dict(p.params)}
        if p.kind == "gap_keepdim":
            j = i
            while j < len(pieces) and pieces[j].kind == "identity":
                j += 1
            if j >= len(pieces) or pieces[j].kind != "flatten":
                nxt = "nothing" if j >= len(pieces) else label(pieces[j].node)
                raise ValueError(f"unsupported setting in {where(p.node)}: {GAP_ONLY} (it is followed by {nxt}). "
                                 f"Supported: {supported}")
            spec["pieces"] += pieces[i:j + 1]
            spec["kind"] = "gap"
            spec["kw"] = {}
            i = j + 1
        spec["kw"].pop("dim", None)
        specs.append(spec)
    if not specs:
        raise ValueError("the model holds no layer refnet can convert (only no-ops such as Identity)")
    return specs


def piece_layer(spec):
    """The refnet layer of a spec of :func:`group_pieces`."""
    act = None if spec["act"] is None else {"name": spec["act"][0], **spec["act"][1]}
    cls = LAYERS[spec["kind"]]
    if spec["kind"] in ("dense", "conv"):
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


def check_layers(net, specs, value, first_input, tol: float, where, what: str, softplus_threshold=None) -> tuple:
    """Node by node, each refnet layer applied to the framework's own input of that layer.

    ``value(node)`` is the framework's output of a node (float64 NumPy), ``first_input`` the
    network's input. Layer ``i`` is applied to the output of the last node of layer ``i - 1``; its
    pre-activation must match the affine node's output and its output every later node it covers,
    each to ``tol`` relative (:func:`rel_err`). With ``softplus_threshold``, the framework's
    softplus is taken to be linear above it (PyTorch's documented cut-off): entries above are
    compared with ``h``. ValueError naming the first node that differs (``what`` names the model).

    Returns ``(largest relative error, indices of softplus layers with entries above the threshold)``.
    """
    worst = 0.0
    exceeded = []

    def check(node, got, desc):
        nonlocal worst
        ref = value(node)
        got = np.reshape(got, ref.shape) if np.size(got) == ref.size else got
        e = rel_err(got, ref)
        if not e <= tol:
            raise ValueError(
                f"the converted network does not reproduce the {what} on the probe batch: {where(node)} differs "
                f"({desc}: max relative error {e:.2e} > {tol:g}, shape {tuple(np.shape(got))} vs {tuple(ref.shape)}); "
                "refusing to audit a network that computes something else"
            )
        worst = max(worst, e)

    x_in = first_input
    for i, (layer, spec) in enumerate(zip(net.layers, specs)):
        y, cache = layer.forward(net.params[i], x_in, net.masks[i])
        for p in spec["pieces"]:
            if p.kind in ("dense", "conv", "bias"):
                check(p.node, _partial_h(spec, p, cache, y), f"refnet layer {i} pre-activation")
            elif p.kind == "act" and p.kw["name"] == "softplus" and softplus_threshold is not None:
                h = cache["h"]
                over = h > softplus_threshold
                if np.any(over):
                    exceeded.append(i)
                check(p.node, np.where(over, h, y), f"refnet layer {i} output (the framework's softplus is linear "
                                                    f"above {softplus_threshold:g})")
            else:
                check(p.node, y, f"refnet layer {i} output")
        x_in = value(spec["pieces"][-1].node)
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
