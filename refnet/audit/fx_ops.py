r"""The node-mapping half of the PyTorch graph importer (:mod:`refnet.audit.fx`): what each
:mod:`torch.fx` node computes, in refnet's terms.

:func:`map_node` turns one data node of the traced graph (a module call, a ``torch.nn.functional``
call or a tensor method) into a :class:`~refnet.audit.graph.Piece`, by the tables of
:func:`tables` (one handler per operation); everything else is refused with a ValueError that
names the node and its operation. :class:`NodeContext` is what the handlers see: the traced
graph, each node's class (data, shape value, constant), the names used in messages and, in the
second pass, the probe's values (shape values such as ``x.size(3)`` are read from there).

torch is imported only inside the functions (``import refnet.audit`` does not import it).
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass

import numpy as np

from .graph import GAP_ONLY, Piece
from .names import ACTIVATIONS, resolve

__all__ = [
    "PROBE_BATCH",
    "SUPPORTED",
    "NodeContext",
    "ParamRef",
    "import_torch",
    "map_node",
    "op_name",
    "tables",
    "torch_activation",
]

#: the probe's batch sizes: the comparison runs on the first, the second only checks that no
#: node's per-example shape (or a shape value a node uses) depends on the batch size
PROBE_BATCH = (5, 3)

#: what is mapped, for the messages that refuse the rest
SUPPORTED = (
    "Linear / F.linear; Conv2d / F.conv2d (groups=1, dilation=1, padding int/pair/'valid'/'same' with odd kernels, "
    "padding_mode zeros or circular); activations Tanh, ReLU, LeakyReLU, SELU, ELU, Sigmoid, Hardtanh(-1, 1), "
    "Softplus(beta=1, threshold=20) as modules, torch.nn.functional calls or tensor methods (and torch.erf), each "
    "right after a Linear, Conv2d, BatchNorm or residual addition; BatchNorm1d over (B, C) and BatchNorm2d / "
    "F.batch_norm (train mode: batch statistics; eval mode: running statistics; float momentum); the addition of two "
    "tensors (a residual connection: out + shortcut, out += shortcut, torch.add); x[:, :, ::s, ::s] and "
    "F.pad(x, (0, 0, 0, 0, a, b)) (the option-A shortcut); AvgPool2d and MaxPool2d (stride = kernel, square kernel, no padding, "
    "ceil_mode False, dilation 1); AdaptiveAvgPool2d(1) or mean(dim=(2, 3), keepdim=True) followed by a flatten, "
    "or mean(dim=(2, 3)) (global average pooling); Flatten / torch.flatten(x, 1) / x.view(x.size(0), -1) / "
    "reshape to (B, -1); Dropout in eval mode, Identity, contiguous, clone (no-ops); weights that are parameters, "
    "pruned by torch.nn.utils.prune or multiplied by a 0/1 buffer in the forward; branches only as residual additions"
)


def import_torch():
    """``torch`` (with ``torch.fx`` and ``torch.nn.utils.prune``), or an ImportError that says what
    to install."""
    try:
        import torch
        import torch.fx  # noqa: F401
        import torch.nn.utils.prune  # noqa: F401  (not imported by ``import torch``)
        import torch.nn.utils.parametrize  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the PyTorch audit needs torch: pip install 'refnet[torch]' (or pip install torch)") from exc
    return torch


def torch_activation(m, nn):
    """(name, params) of a supported activation module (by :data:`refnet.audit.names.ACTIVATIONS`),
    None for a non-activation, or a ValueError (returned) for a setting refnet does not model."""
    for row in ACTIVATIONS.values():
        if row.torch is None or not isinstance(m, getattr(nn, row.torch)):
            continue
        if isinstance(m, tuple(getattr(nn, c) for c in row.torch_not)):
            continue
        if any(float(getattr(m, attr)) != value for attr, value in row.torch_fixed):
            fixed = ", ".join(f"{attr}={value:g}" for attr, value in row.torch_fixed)
            return ValueError(f"{row.torch} is supported only with {fixed} ({row.torch_fixed_why})")
        return row.name, {p: float(getattr(m, attr)) for p, attr in row.torch_params}
    return None


# --------------------------------------------------------------------------------------------
# one piece per node, by tables
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamRef:
    """Where a refnet parameter lives in the module: the qualified name of the parameter (refnet's
    ``W`` or ``b``) and of the 0/1 buffer that masks it (None: unmasked), and how the mask is
    applied: ``"prune"`` (``torch.nn.utils.prune``: ``weight_orig``/``weight_mask``) or
    ``"buffer"`` (the traced forward multiplies it in)."""

    param: str
    mask: str | None = None
    how: str = ""


_REQUIRED = object()


class NodeContext:
    """What the handlers see: the graph, the module, each node's class (data, shape, const), and
    (in the second pass) the probe's values."""

    def __init__(self, torch, gm, prefix):
        self.torch = torch
        self.nn = torch.nn
        self.gm = gm
        self.prefix = prefix
        self.cls = {}  # node -> "data" | "shape" | "const"
        self.index = {}  # data op node -> its index among the data ops
        self.calls = {}  # module target -> number of calls
        self.call_no = {}  # call_module node -> which call of its target it is
        self.values = None  # name -> value at PROBE_BATCH[0] (second pass)
        self.values2 = None  # name -> value at PROBE_BATCH[1]

    # -- names ---------------------------------------------------------------------------------
    def qual(self, target: str) -> str:
        """A qualified name relative to the user's module."""
        if self.prefix:
            return target[len(self.prefix):] if target.startswith(self.prefix) else ("" if target == self.prefix[:-1] else target)
        return target

    def module(self, node):
        return self.gm.get_submodule(node.target)

    def label(self, node) -> str:
        """``'fc1' (Linear)`` / ``'relu' (F.relu)``: how a node is named in a message."""
        if node.op == "call_module":
            q = self.qual(node.target)
            return f"{q or '<root>'!r} ({type(self.module(node)).__name__})"
        return f"{node.name!r} ({op_name(node)}{self.owner(node, ' in ')})"

    def owner(self, node, sep) -> str:
        """The module whose forward a function or method node comes from (``sep`` + ``'fc1'
        (MaskedLinear)``), or "" for the root's own forward."""
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            return ""
        path, cls = list(stack.values())[-1]
        q = self.qual(path)
        if not q and self.prefix:
            return ""
        return f"{sep}{q or '<root>'!r} ({getattr(cls, '__name__', cls)})"

    def source(self, node) -> str:
        """``[fc1] Linear`` / ``[relu] F.relu``: the report's source of a tensor."""
        if node.op == "call_module":
            q = self.qual(node.target)
            s = f"[{q or '<root>'}] {type(self.module(node)).__name__}"
            if self.calls.get(node.target, 1) > 1:
                s += f" (call {self.call_no[node]} of {self.calls[node.target]})"
            return s
        stack = node.meta.get("nn_module_stack") or {}
        if stack:
            path, cls = list(stack.values())[-1]
            q = self.qual(path)
            if q:
                return f"[{q}] {getattr(cls, '__name__', cls)}: {op_name(node)}"
        return f"[{node.name}] {op_name(node)}"

    def where(self, node) -> str:
        k = self.index.get(node, "?")
        if node.op == "call_module":
            q = self.qual(node.target)
            return f"module {k} ({q or '<root>'!r}: {self.module(node)!r})"
        return f"node {k} {node.name!r} ({op_name(node)}{self.owner(node, ' in module ')})"

    # -- values --------------------------------------------------------------------------------
    def literal(self, node, arg, what):
        """A non-tensor argument: a literal, or a shape value computed from the input's shape (its
        probe value, which must not depend on the batch size; None before the probe)."""
        if isinstance(arg, (list, tuple)):
            vals = [self.literal(node, a, what) for a in arg]
            return None if any(v is None for v in vals) else type(arg)(vals)
        if hasattr(arg, "op"):  # an fx Node
            if self.cls.get(arg) != "shape":
                raise ValueError(f"{self.where(node)}: {what} must be a number or a shape value, got the tensor node {arg.name!r}")
            if self.values is None:
                return None
            v, v2 = self.values[arg.name], self.values2[arg.name]
            if v != v2:
                raise ValueError(f"{self.where(node)}: {what} is {v} with a batch of {PROBE_BATCH[0]} and {v2} with "
                                 f"{PROBE_BATCH[1]}: it depends on the batch size, which refnet's layers cannot")
            return v
        return arg

    def tensor(self, node):
        """The probe value (float64 NumPy) of a tensor node."""
        return self.values[node.name].detach().cpu().numpy()

    def param(self, target):
        """``(tensor, is_parameter)`` of a get_attr target (None when it is neither a parameter nor
        a buffer of the module)."""
        try:
            return self.gm.get_parameter(target), True
        except AttributeError:
            pass
        try:
            return self.gm.get_buffer(target), False
        except AttributeError:
            return None, False

    def param_ref(self, node, arg, what) -> ParamRef:
        """A weight or bias argument of a functional affine call: a parameter, or a parameter
        times a 0/1 buffer (a mask the forward multiplies in)."""
        torch = self.torch
        fail = (f"{self.where(node)}: the {what} must be a parameter of the module, or a parameter times a 0/1 "
                "buffer of the same shape (a mask)")
        if not hasattr(arg, "op") or self.cls.get(arg) != "const":
            raise ValueError(f"{fail}; got {arg!r}")
        if arg.op == "get_attr":
            t, is_param = self.param(arg.target)
            if t is None:
                raise ValueError(f"{fail}; got {arg.target!r}, a tensor constant captured by the trace")
            if not is_param:
                raise ValueError(f"{fail}; got the buffer {self.qual(arg.target)!r} (refnet compares the gradients of "
                                 "parameters; register it as an nn.Parameter)")
            return ParamRef(self.qual(arg.target))
        is_mul = (arg.op == "call_function" and arg.target in (operator.mul, torch.mul)) or (
            arg.op == "call_method" and arg.target == "mul")
        if is_mul and len(arg.args) == 2 and not arg.kwargs and all(hasattr(a, "op") and a.op == "get_attr" for a in arg.args):
            (ta, pa), (tb, pb) = (self.param(a.target) for a in arg.args)
            if ta is not None and tb is not None and pa != pb:
                (p, pn), (m, mn) = ((ta, arg.args[0]), (tb, arg.args[1])) if pa else ((tb, arg.args[1]), (ta, arg.args[0]))
                mv = m.detach()
                if tuple(m.shape) != tuple(p.shape):
                    raise ValueError(f"{fail}; the buffer {self.qual(mn.target)!r} has shape {tuple(m.shape)}, the "
                                     f"parameter {self.qual(pn.target)!r} {tuple(p.shape)}")
                if not bool(torch.all((mv == 0) | (mv == 1))):
                    raise ValueError(f"{fail}; the buffer {self.qual(mn.target)!r} holds values other than 0 and 1 "
                                     "(a scaling, not a mask)")
                return ParamRef(self.qual(pn.target), self.qual(mn.target), "buffer")
        raise ValueError(f"{fail}; it is computed by node {arg.name!r} ({op_name(arg)})")


def op_name(node) -> str:
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_function":
        t = node.target
        mod = getattr(t, "__module__", None) or ""
        name = getattr(t, "__name__", repr(t))
        if mod.startswith("torch.nn.functional") or mod == "torch._C._nn":
            return f"F.{name}"
        if mod in ("_operator", "operator"):
            return f"operator.{name}"
        if mod.startswith("torch"):
            return f"torch.{name}"
        return f"{mod}.{name}" if mod else name
    return str(node.target)


def _bind(ctx, node, sig, args=None, kwargs=None):
    """``{name: value}`` of a call's arguments by ``sig`` (a tuple of (name, default)),
    ValueError naming the node for unknown or missing arguments."""
    args = node.args if args is None else args
    kwargs = node.kwargs if kwargs is None else kwargs
    names = [n for n, _ in sig]
    if len(args) > len(sig):
        raise ValueError(f"{ctx.where(node)}: {len(args)} arguments, at most {len(sig)} ({', '.join(names)}) are understood")
    out = dict(zip(names, args))
    for k, v in kwargs.items():
        if k not in names:
            raise ValueError(f"{ctx.where(node)}: argument {k!r} is not understood (only {', '.join(names)})")
        out[k] = v
    for n, d in sig:
        if n not in out:
            if d is _REQUIRED:
                raise ValueError(f"{ctx.where(node)}: missing argument {n!r}")
            out[n] = d
    return out


def _leaves(v):
    """The non-container entries of nested tuples and lists."""
    if isinstance(v, (tuple, list)):
        return [x for a in v for x in _leaves(a)]
    return [v]


def _pair_of(v, what, where):
    if isinstance(v, int):
        return (v, v)
    v = tuple(v)
    if len(v) == 1:
        return (int(v[0]), int(v[0]))
    if len(v) != 2:
        raise ValueError(f"{where}: {what} {v!r} is not a pair")
    return (int(v[0]), int(v[1]))


def _unsupported(ctx, node, why=""):
    what = "module" if node.op == "call_module" else "operation"
    return ValueError(f"unsupported {what} {ctx.where(node)}" + (f": {why}" if why else "") + f". Supported: {SUPPORTED}")


# ---- affine --------------------------------------------------------------------------------


def _conv_kw(ctx, node, c_in, c_out, k, stride, padding, dilation, groups, padding_mode, bias):
    w = ctx.where(node)
    if groups != 1:
        raise ValueError(f"unsupported setting in {w}: groups={groups} (only groups=1). Supported: {SUPPORTED}")
    if _pair_of(dilation, "dilation", w) != (1, 1):
        raise ValueError(f"unsupported setting in {w}: dilation={tuple(_pair_of(dilation, 'dilation', w))} (only 1). Supported: {SUPPORTED}")
    if padding_mode not in ("zeros", "circular"):
        raise ValueError(f"unsupported setting in {w}: padding_mode={padding_mode!r} (only 'zeros' or 'circular')")
    k = _pair_of(k, "kernel_size", w)
    stride = _pair_of(stride, "stride", w)
    if isinstance(padding, str):
        if padding == "valid":
            pad = (0, 0)
        elif padding == "same":  # (stride 1): total k - 1, split left = total // 2
            if k[0] % 2 == 0 or k[1] % 2 == 0:
                raise ValueError(f"unsupported setting in {w}: padding='same' with an even kernel {k} pads "
                                 "asymmetrically, which refnet's Conv2d cannot represent")
            pad = ((k[0] - 1) // 2, (k[1] - 1) // 2)
        else:
            raise ValueError(f"unsupported setting in {w}: padding={padding!r}")
    else:
        pad = _pair_of(padding, "padding", w)
    return {"c_in": c_in, "c_out": c_out, "kernel_size": k, "stride": stride, "padding": pad,
            "padding_mode": padding_mode, "bias": bias}


def _module_params(ctx, node, m) -> dict:
    """ParamRefs of a leaf Linear/Conv2d (``torch.nn.utils.prune``: ``<name>_orig`` and
    ``<name>_mask``)."""
    prune = ctx.nn.utils.prune
    q = ctx.qual(node.target)
    pre = f"{q}." if q else ""
    out = {}
    allowed = {"weight", "bias", "weight_orig", "bias_orig"}
    extra = sorted(set(dict(m.named_parameters(recurse=False))) - allowed)
    if extra:
        raise ValueError(f"{ctx.where(node)}: parameters {extra} are not supported (only weight and bias, possibly pruned)")
    for key, tname in (("W", "weight"), ("b", "bias")):
        orig = getattr(m, tname + "_orig", None)
        if isinstance(orig, ctx.nn.Parameter):
            mask = getattr(m, tname + "_mask", None)
            hooks = [h for h in m._forward_pre_hooks.values()
                     if isinstance(h, prune.BasePruningMethod) and getattr(h, "_tensor_name", None) == tname]
            if mask is None or not hooks:
                raise ValueError(f"{ctx.where(node)}: has {tname}_orig but no torch.nn.utils.prune mask/hook for it "
                                 f"({tname}_mask); only torch.nn.utils.prune reparametrisations are supported")
            mv = mask.detach()
            if not bool(ctx.torch.all((mv == 0) | (mv == 1))):
                raise ValueError(f"{ctx.where(node)}: {tname}_mask must hold only 0 and 1")
            out[key] = ParamRef(f"{pre}{tname}_orig", f"{pre}{tname}_mask", "prune")
        elif isinstance(m._parameters.get(tname), ctx.nn.Parameter):
            out[key] = ParamRef(f"{pre}{tname}")
        elif getattr(m, tname, None) is not None:
            raise ValueError(f"{ctx.where(node)}: its {tname} is a {type(getattr(m, tname)).__name__} but not a registered "
                             "parameter (refnet compares the gradients of parameters)")
    return out


def _linear_module(ctx, node, m):
    params = _module_params(ctx, node, m)
    return Piece(node, "dense", {"n_in": m.in_features, "n_out": m.out_features, "bias": "b" in params}, params)


def _conv_module(ctx, node, m):
    params = _module_params(ctx, node, m)
    kw = _conv_kw(ctx, node, m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                  m.groups, m.padding_mode, "b" in params)
    return Piece(node, "conv", kw, params)


def _linear_fn(ctx, node):
    a = _bind(ctx, node, (("input", _REQUIRED), ("weight", _REQUIRED), ("bias", None)))
    params = {"W": ctx.param_ref(node, a["weight"], "weight")}
    W, _ = ctx.param(_full(ctx, params["W"].param))
    if W.ndim != 2:
        raise ValueError(f"{ctx.where(node)}: the weight has shape {tuple(W.shape)}, not (n_out, n_in)")
    if a["bias"] is not None:
        params["b"] = ctx.param_ref(node, a["bias"], "bias")
    return Piece(node, "dense", {"n_in": int(W.shape[1]), "n_out": int(W.shape[0]), "bias": "b" in params}, params)


def _conv_fn(ctx, node):
    a = _bind(ctx, node, (("input", _REQUIRED), ("weight", _REQUIRED), ("bias", None), ("stride", 1), ("padding", 0),
                          ("dilation", 1), ("groups", 1)))
    params = {"W": ctx.param_ref(node, a["weight"], "weight")}
    W, _ = ctx.param(_full(ctx, params["W"].param))
    if W.ndim != 4:
        raise ValueError(f"{ctx.where(node)}: the weight has shape {tuple(W.shape)}, not (c_out, c_in, kh, kw)")
    if a["bias"] is not None:
        params["b"] = ctx.param_ref(node, a["bias"], "bias")
    for key in ("stride", "padding", "dilation", "groups"):
        if hasattr(a[key], "op"):
            raise ValueError(f"{ctx.where(node)}: {key} must be a literal")
    kw = _conv_kw(ctx, node, int(W.shape[1]) * int(a["groups"]), int(W.shape[0]), tuple(W.shape[2:]), a["stride"],
                  a["padding"], a["dilation"], a["groups"], "zeros", "b" in params)
    return Piece(node, "conv", kw, params)


def _full(ctx, name: str) -> str:
    """A name relative to the user's module -> the graph module's target."""
    return ctx.prefix + name if ctx.prefix else name


# ---- activations ---------------------------------------------------------------------------


def _act_module(ctx, node, m):
    act = torch_activation(m, ctx.nn)
    if isinstance(act, ValueError):
        raise ValueError(f"unsupported setting in {ctx.where(node)}: {act}. Supported: {SUPPORTED}")
    return Piece(node, "act", {"name": act[0], "params": act[1]}, inplace=bool(getattr(m, "inplace", False)))


def _act_call(row, ctx, node):
    a = _bind(ctx, node, (("input", _REQUIRED),) + tuple(row.torch_args))
    kw = {k: ctx.literal(node, v, k) for k, v in a.items() if k != "input"}
    if any(float(kw[attr]) != value for attr, value in row.torch_fixed):
        fixed = ", ".join(f"{attr}={value:g}" for attr, value in row.torch_fixed)
        raise ValueError(f"unsupported setting in {ctx.where(node)}: supported only with {fixed} ({row.torch_fixed_why}). "
                         f"Supported: {SUPPORTED}")
    inplace = bool(kw.get("inplace", False)) or str(node.target if node.op == "call_method" else getattr(node.target, "__name__", "")).endswith("_")
    return Piece(node, "act", {"name": row.name, "params": {p: float(kw[k]) for p, k in row.torch_params}}, inplace=inplace)


# ---- pooling, flattening, no-ops -----------------------------------------------------------


def _pool_piece(ctx, node, kind, k, stride, padding, ceil_mode, dilation=1, return_indices=False, divisor_override=None):
    w = ctx.where(node)
    if ctx.values is None and any(hasattr(v, "op") for v in _leaves((k, stride))):
        return Piece(node, kind)  # first pass: a shape value (x.size(3)), checked with the probe
    k = ctx.literal(node, k, "kernel_size")
    stride = ctx.literal(node, stride, "stride")
    k = _pair_of(k, "kernel_size", w)
    s = k if stride is None or (isinstance(stride, (tuple, list)) and len(stride) == 0) else _pair_of(stride, "stride", w)
    pad = _pair_of(padding, "padding", w)
    problems = []
    if k[0] != k[1]:
        problems.append(f"kernel {k} is not square")
    if s != k:
        problems.append(f"stride {s} != kernel {k}")
    if pad != (0, 0):
        problems.append(f"padding {pad}")
    if ceil_mode:
        problems.append("ceil_mode=True")
    if kind == "maxpool":
        if _pair_of(dilation, "dilation", w) != (1, 1):
            problems.append(f"dilation {dilation}")
        if return_indices:
            problems.append("return_indices=True")
    elif divisor_override is not None:
        problems.append(f"divisor_override={divisor_override}")
    if problems:
        raise ValueError(f"unsupported setting in {w}: {', '.join(problems)}. Supported: {SUPPORTED}")
    return Piece(node, kind, {"kernel_size": k[0]})


def _maxpool_module(ctx, node, m):
    return _pool_piece(ctx, node, "maxpool", m.kernel_size, m.stride, m.padding, m.ceil_mode, m.dilation, m.return_indices)


def _avgpool_module(ctx, node, m):
    return _pool_piece(ctx, node, "avgpool", m.kernel_size, m.stride, m.padding, m.ceil_mode,
                       divisor_override=getattr(m, "divisor_override", None))


def _maxpool_fn(ctx, node):
    a = _bind(ctx, node, (("input", _REQUIRED), ("kernel_size", _REQUIRED), ("stride", None), ("padding", 0),
                          ("dilation", 1), ("ceil_mode", False), ("return_indices", False)))
    return _pool_piece(ctx, node, "maxpool", a["kernel_size"], a["stride"], a["padding"], a["ceil_mode"], a["dilation"],
                       a["return_indices"])


def _avgpool_fn(ctx, node):
    a = _bind(ctx, node, (("input", _REQUIRED), ("kernel_size", _REQUIRED), ("stride", None), ("padding", 0),
                          ("ceil_mode", False), ("count_include_pad", True), ("divisor_override", None)))
    return _pool_piece(ctx, node, "avgpool", a["kernel_size"], a["stride"], a["padding"], a["ceil_mode"],
                       divisor_override=a["divisor_override"])


def _adaptive(ctx, node, osz):
    ok = osz == 1 or (isinstance(osz, (tuple, list)) and tuple(osz) == (1, 1))
    if not ok:
        raise ValueError(f"unsupported setting in {ctx.where(node)}: output_size={osz!r}; {GAP_ONLY}. Supported: {SUPPORTED}")
    return Piece(node, "gap_keepdim")


def _adaptive_module(ctx, node, m):
    return _adaptive(ctx, node, m.output_size)


def _adaptive_fn(ctx, node):
    a = _bind(ctx, node, (("input", _REQUIRED), ("output_size", _REQUIRED)))
    return _adaptive(ctx, node, ctx.literal(node, a["output_size"], "output_size"))


def _mean(ctx, node):
    a = _bind(ctx, node, (("input", _REQUIRED), ("dim", None), ("keepdim", False), ("dtype", None)))
    if a["dtype"] is not None:
        raise _unsupported(ctx, node, "mean with a dtype changes the precision")
    dim = a["dim"]
    if dim is None or hasattr(dim, "op"):
        raise _unsupported(ctx, node, "only the mean over the spatial axes (dim=(2, 3)) is global average pooling")
    piece = Piece(node, "gap_keepdim" if a["keepdim"] else "gap", {"dim": tuple(dim) if isinstance(dim, (list, tuple)) else (dim,)})
    if ctx.values is not None:
        nd = len(ctx.values[node.args[0].name].shape)
        dims = sorted(d % nd for d in piece.kw["dim"])
        if nd != 4 or dims != [2, 3]:
            raise _unsupported(ctx, node, f"a mean over dims {piece.kw['dim']} of a {nd}-d tensor; only the mean over the "
                                          "spatial axes (2, 3) of an NCHW image is global average pooling")
    return piece


def _flatten(ctx, node, start_dim, end_dim, what="Flatten"):
    if start_dim != 1 or end_dim != -1:
        raise ValueError(f"unsupported setting in {ctx.where(node)}: {what}(start_dim={start_dim}, end_dim={end_dim}); "
                         "only start_dim=1, end_dim=-1 (flatten each example)")
    return Piece(node, "flatten")


def _flatten_module(ctx, node, m):
    return _flatten(ctx, node, m.start_dim, m.end_dim)


def _flatten_fn(ctx, node):
    a = _bind(ctx, node, (("input", _REQUIRED), ("start_dim", 0), ("end_dim", -1)))
    return _flatten(ctx, node, a["start_dim"], a["end_dim"], op_name(node))


def _reshape(ctx, node):
    """view / reshape: a flatten of each example (``x.view(x.size(0), -1)``, ``x.reshape(-1, n)``),
    checked on the probe's shapes (with both batch sizes)."""
    args = node.args[1:]
    if node.op == "call_function":  # torch.reshape(input, shape)
        a = _bind(ctx, node, (("input", _REQUIRED), ("shape", _REQUIRED)))
        args = (a["shape"],)
    elif node.kwargs:
        if set(node.kwargs) != {"shape"} and set(node.kwargs) != {"size"}:
            raise _unsupported(ctx, node, f"arguments {sorted(node.kwargs)}")
        args = (next(iter(node.kwargs.values())),)
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        args = tuple(args[0])
    for v in args:
        if not (isinstance(v, int) or (hasattr(v, "op") and ctx.cls.get(v) == "shape")):
            raise _unsupported(ctx, node, f"a reshape to {args!r}; only flattening each example is supported")
    if ctx.values is not None:
        src = node.args[0]
        for vals, B in ((ctx.values, PROBE_BATCH[0]), (ctx.values2, PROBE_BATCH[1])):
            i, o = tuple(vals[src.name].shape), tuple(vals[node.name].shape)
            if o != (B, int(np.prod(i[1:]))):
                raise _unsupported(ctx, node, f"reshapes {i} to {o} with a batch of {B}; only flattening each example "
                                              "((B, ...) -> (B, -1), e.g. x.view(x.size(0), -1)) is supported")
    return Piece(node, "flatten")


def _dropout_module(ctx, node, m):
    if m.training and float(m.p) > 0:
        raise ValueError(f"unsupported module {ctx.where(node)}: {type(m).__name__} in training mode (p={float(m.p):g}) "
                         "drops random units, which refnet does not model; call module.eval() first (in eval mode it is "
                         f"the identity). Supported: {SUPPORTED}")
    return Piece(node, "identity", inplace=bool(getattr(m, "inplace", False)))


def _dropout_fn(training_default, train_name="training"):
    def handler(ctx, node):
        a = _bind(ctx, node, (("input", _REQUIRED), ("p", 0.5), (train_name, training_default), ("inplace", False)))
        p, training = ctx.literal(node, a["p"], "p"), ctx.literal(node, a[train_name], train_name)
        if training and float(p) > 0:
            raise _unsupported(ctx, node, f"dropout in training mode ({train_name}={training}, p={float(p):g}) drops random "
                                          f"units, which refnet does not model; pass {train_name}=self.training and call "
                                          "module.eval() first")
        return Piece(node, "identity", inplace=bool(a["inplace"]))

    return handler


def _identity_module(ctx, node, m):
    return Piece(node, "identity")


def _noop_method(ctx, node):
    if len(node.args) > 1 or node.kwargs:
        raise _unsupported(ctx, node, "with arguments (e.g. a memory format)")
    return Piece(node, "identity")


def _refuse(why):
    def handler(ctx, node, m=None):
        raise _unsupported(ctx, node, why)

    return handler


# ---- batch normalization -------------------------------------------------------------------


def _bn_kind(ctx, node, module_kind=None):
    """``batchnorm1d`` for a ``(B, C)`` input, ``batchnorm2d`` for ``(B, C, H, W)`` (from the probe;
    ``module_kind`` or ``batchnorm`` before it); ValueError for other ranks."""
    if ctx.values is None:
        return module_kind or "batchnorm"
    nd = len(ctx.values[_first_data(ctx, node).name].shape)
    kind = {2: "batchnorm1d", 4: "batchnorm2d"}.get(nd)
    if kind is None or (module_kind is not None and kind != module_kind):
        raise _unsupported(ctx, node, f"batch normalization of a {nd}-d input; refnet has BatchNorm1d over (B, C) and "
                                      "BatchNorm2d over (B, C, H, W)")
    return kind


def _first_data(ctx, node):
    return next(a for a in node.all_input_nodes if ctx.cls.get(a) == "data")


def _bn_kw(ctx, node, num_features, eps, momentum, affine, mode):
    if momentum is None:
        raise _unsupported(ctx, node, "momentum=None (a cumulative moving average of the running statistics) is not "
                                      "modelled; give a float momentum (PyTorch's default is 0.1)")
    return {"num_features": int(num_features), "eps": float(eps), "momentum": float(momentum), "affine": bool(affine),
            "mode": mode}


def _bn_module(ctx, node, m):
    """``nn.BatchNorm1d/2d``: gamma = ``weight``, beta = ``bias`` (parameters), the running
    statistics (buffers); train mode (batch statistics) when the module is training or keeps no
    running statistics, eval mode (running statistics) otherwise."""
    nn = ctx.nn
    q = ctx.qual(node.target)
    pre = f"{q}." if q else ""
    extra = sorted(set(dict(m.named_parameters(recurse=False))) - {"weight", "bias"})
    if extra:
        raise ValueError(f"{ctx.where(node)}: parameters {extra} are not supported (only weight and bias)")
    params = {}
    if m.affine:
        for key, tname in (("gamma", "weight"), ("beta", "bias")):
            if not isinstance(m._parameters.get(tname), nn.Parameter):
                raise ValueError(f"{ctx.where(node)}: its {tname} is not a registered parameter (refnet compares the "
                                 "gradients of parameters)")
            params[key] = ParamRef(f"{pre}{tname}")
    track = bool(m.track_running_stats) and m.running_mean is not None
    buffers = {"running_mean": f"{pre}running_mean", "running_var": f"{pre}running_var"} if track else {}
    kind = _bn_kind(ctx, node, "batchnorm1d" if isinstance(m, nn.BatchNorm1d) else "batchnorm2d")
    mode = "train" if (m.training or not track) else "eval"
    kw = _bn_kw(ctx, node, m.num_features, m.eps, m.momentum, m.affine, mode)
    return Piece(node, kind, kw, params, buffers=buffers)


def _bn_fn(sig):
    """``F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)``
    (``sig``: its argument order; ``torch.batch_norm`` has another)."""

    def handler(ctx, node):
        a = _bind(ctx, node, sig)
        buffers = {}
        for key in ("running_mean", "running_var"):
            arg = a[key]
            if arg is None:
                continue
            t = None
            if hasattr(arg, "op") and arg.op == "get_attr":
                t, is_param = ctx.param(arg.target)
                if is_param:
                    t = None
            if t is None:
                raise _unsupported(ctx, node, f"its {key} must be a buffer of the module (or None), got {getattr(arg, 'name', arg)!r}")
            buffers[key] = ctx.qual(arg.target)
        if len(buffers) == 1:
            raise _unsupported(ctx, node, "running_mean and running_var must both be buffers or both None")
        params = {}
        for key, arg in (("gamma", a["weight"]), ("beta", a["bias"])):
            if arg is not None:
                params[key] = ctx.param_ref(node, arg, "BatchNorm weight" if key == "gamma" else "BatchNorm bias")
        if len(params) == 1:
            raise _unsupported(ctx, node, "a weight without a bias (or a bias without a weight) has no refnet layer")
        training = ctx.literal(node, a["training"], "training")
        momentum = ctx.literal(node, a["momentum"], "momentum")
        eps = ctx.literal(node, a["eps"], "eps")
        if any(hasattr(v, "op") for v in (training, momentum, eps)):
            raise _unsupported(ctx, node, "training, momentum and eps must be literals")
        if not buffers and not training:
            raise _unsupported(ctx, node, "training=False needs the running statistics")
        kind = _bn_kind(ctx, node)
        num = None
        for key, ref in params.items():
            num = ctx.param(_full(ctx, ref.param))[0].shape[0]
        if num is None and buffers:
            num = ctx.param(_full(ctx, buffers["running_mean"]))[0].shape[0]
        if num is None:
            num = ctx.values[node.args[0].name].shape[1] if ctx.values is not None else 1
        mode = "train" if (training or not buffers) else "eval"
        return Piece(node, kind, _bn_kw(ctx, node, num, eps, momentum, bool(params), mode), params, buffers=buffers)

    return handler


# ---- residual addition and the option-A shortcut ---------------------------------------------


def _add(ctx, node, m=None):
    """``a + b`` of two tensors (``operator.add``/``iadd``, ``torch.add``, ``Tensor.add``/``add_``):
    refnet's :class:`~refnet.layers.Add`; ``iadd``/``add_`` overwrite ``a`` (in place)."""
    data_args = [v for v in list(node.args) + list(node.kwargs.values()) if hasattr(v, "op") and ctx.cls.get(v) == "data"]
    if len(data_args) == 2:
        if data_args[0] is data_args[1]:
            raise _unsupported(ctx, node, "a tensor added to itself (x + x) is a scaling, which has no refnet layer")
        other = {k: v for k, v in node.kwargs.items() if k != "other"}
        alpha = ctx.literal(node, other.pop("alpha", 1), "alpha")
        if other or len(node.args) > 2 or (alpha is not None and alpha != 1):
            raise _unsupported(ctx, node, f"an addition with arguments {sorted(node.kwargs)} (only a + b, alpha=1)")
        inplace = node.target in (operator.iadd, "add_")
        return Piece(node, "add", inplace=inplace)
    raise _unsupported(ctx, node, "adding a constant to a tensor (a bias outside a Linear/Conv2d) has no refnet layer")


def _step(v, where):
    """The step of a slice ``::s`` (start 0 or None, stop None), or None when it is not one."""
    if not isinstance(v, slice) or v.start not in (None, 0) or v.stop is not None:
        return None
    if v.step is None:
        return 1
    return v.step if isinstance(v.step, int) and not isinstance(v.step, bool) and v.step >= 1 else None


def _getitem(ctx, node):
    """``x[:, :, ::s, ::s]`` (or ``x[..., ::s, ::s]``) of an NCHW tensor: spatial subsampling, the
    first half of the CIFAR ResNets' option-A shortcut (:class:`~refnet.layers.SubsamplePad`; the
    two steps may differ here if later subsampling evens them out)."""
    idx = node.args[1] if len(node.args) > 1 else None
    idx = idx if isinstance(idx, tuple) else (idx,)
    full = slice(None, None, None)
    if idx and idx[0] is Ellipsis:
        spatial = idx[1:]
    elif len(idx) == 4 and idx[0] == full and idx[1] == full:
        spatial = idx[2:]
    else:
        spatial = ()
    steps = [_step(v, ctx.where(node)) for v in spatial]
    if len(steps) != 2 or None in steps:
        raise _unsupported(ctx, node, f"indexing with {idx!r}; only x[:, :, ::s, ::s] (spatial subsampling, the "
                                      "option-A shortcut) is supported")
    if ctx.values is not None and len(ctx.values[node.args[0].name].shape) != 4:
        raise _unsupported(ctx, node, f"subsampling a {len(ctx.values[node.args[0].name].shape)}-d tensor (only NCHW images)")
    return Piece(node, "subsample_pad", {"stride": tuple(steps), "pad_channels": (0, 0)})


def _pad(ctx, node):
    """``F.pad(x, (0, 0, 0, 0, a, b))`` of an NCHW tensor, mode "constant", value 0: ``a`` and
    ``b`` zero channels before and after, the second half of the option-A shortcut."""
    a = _bind(ctx, node, (("input", _REQUIRED), ("pad", _REQUIRED), ("mode", "constant"), ("value", None)))
    pad = ctx.literal(node, a["pad"], "pad")
    value = ctx.literal(node, a["value"], "value")
    ok = (isinstance(pad, (tuple, list)) and len(pad) in (2, 4, 6, 8) and all(isinstance(v, int) for v in pad)
          and a["mode"] == "constant" and (value is None or float(value) == 0.0))
    pad = tuple(pad) + (0,) * (8 - len(pad)) if ok else pad
    if not ok or any(pad[:4]) or any(pad[6:]) or min(pad) < 0:
        raise _unsupported(ctx, node, f"F.pad with pad={a['pad']!r}, mode={a['mode']!r}, value={value!r}; only zero "
                                      "channels, pad=(0, 0, 0, 0, a, b) with a, b >= 0, mode 'constant', value 0 (the "
                                      "option-A shortcut), are supported")
    if ctx.values is not None and len(ctx.values[node.args[0].name].shape) != 4:
        raise _unsupported(ctx, node, f"padding the channels of a {len(ctx.values[node.args[0].name].shape)}-d tensor "
                                      "(only NCHW images)")
    return Piece(node, "subsample_pad", {"stride": 1, "pad_channels": (pad[4], pad[5])})


@functools.lru_cache(maxsize=1)
def tables():
    """``(modules, functions, methods)``: the handler of every supported (or refused) operation."""
    torch = import_torch()
    nn, F = torch.nn, torch.nn.functional
    modules = [  # (class, handler): matched in order by isinstance and PyTorch's own forward
        (nn.Linear, _linear_module),
        (nn.Conv2d, _conv_module),
        (nn.MaxPool2d, _maxpool_module),
        (nn.AvgPool2d, _avgpool_module),
        (nn.AdaptiveAvgPool2d, _adaptive_module),
        (nn.Flatten, _flatten_module),
        (nn.Identity, _identity_module),
    ]
    modules += [(getattr(nn, c), _dropout_module) for c in ("Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout",
                                                            "FeatureAlphaDropout") if hasattr(nn, c)]
    modules += [(nn.BatchNorm1d, _bn_module), (nn.BatchNorm2d, _bn_module),
                (nn.BatchNorm3d, _refuse("refnet has BatchNorm1d and BatchNorm2d, not BatchNorm3d")),
                (nn.SyncBatchNorm, _refuse("SyncBatchNorm shares statistics across processes, which refnet does not "
                                           "model; convert it to BatchNorm2d (in a single process they agree)"))]
    functions = {
        F.linear: _linear_fn,
        torch.conv2d: _conv_fn,
        F.conv2d: _conv_fn,
        F.max_pool2d: _maxpool_fn,
        torch.max_pool2d: _maxpool_fn,
        F.avg_pool2d: _avgpool_fn,
        F.adaptive_avg_pool2d: _adaptive_fn,
        torch.mean: _mean,
        torch.flatten: _flatten_fn,
        torch.reshape: _reshape,
        F.dropout: _dropout_fn(True),
        F.dropout1d: _dropout_fn(True),
        F.dropout2d: _dropout_fn(True),
        F.dropout3d: _dropout_fn(True),
        F.alpha_dropout: _dropout_fn(False),
        F.feature_alpha_dropout: _dropout_fn(False),
        torch.dropout: _dropout_fn(_REQUIRED, "train"),
        F.batch_norm: _bn_fn((("input", _REQUIRED), ("running_mean", _REQUIRED), ("running_var", _REQUIRED), ("weight", None),
                              ("bias", None), ("training", False), ("momentum", 0.1), ("eps", 1e-5))),
        torch.batch_norm: _bn_fn((("input", _REQUIRED), ("weight", _REQUIRED), ("bias", _REQUIRED), ("running_mean", _REQUIRED),
                                  ("running_var", _REQUIRED), ("training", _REQUIRED), ("momentum", _REQUIRED),
                                  ("eps", _REQUIRED), ("cudnn_enabled", True))),
        operator.add: _add,
        operator.iadd: _add,
        torch.add: _add,
        operator.getitem: _getitem,
        F.pad: _pad,
    }
    methods = {"view": _reshape, "reshape": _reshape, "flatten": _flatten_fn, "mean": _mean, "contiguous": _noop_method,
               "clone": _noop_method, "add": _add, "add_": _add, "__add__": _add, "__radd__": _add,
               "__getitem__": _getitem}
    for row in ACTIVATIONS.values():
        for path in row.torch_functions:
            functions[resolve(path)] = functools.partial(_act_call, row)
        for name in row.torch_methods:
            methods[name] = functools.partial(_act_call, row)
    return modules, functions, methods


def map_node(ctx, node):
    """The piece of a data node (ValueError naming it when it is not supported)."""
    nn = ctx.nn
    modules, functions, methods = tables()
    if node.op == "call_module":
        m = ctx.module(node)  # a leaf: its forward is PyTorch's own (_is_leaf)
        if torch_activation(m, nn) is not None:
            return _act_module(ctx, node, m)
        for cls, handler in modules:
            if isinstance(m, cls) and type(m).forward is cls.forward:
                return handler(ctx, node, m)
        raise _unsupported(ctx, node)
    if node.op == "call_function":
        try:
            handler = functions.get(node.target)
        except TypeError:  # unhashable target
            handler = None
        if handler is None:
            raise _unsupported(ctx, node)
        return handler(ctx, node)
    if node.op == "call_method":
        handler = methods.get(node.target)
        if handler is None:
            raise _unsupported(ctx, node)
        return handler(ctx, node)
    raise _unsupported(ctx, node)
