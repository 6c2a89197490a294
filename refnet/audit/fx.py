r"""PyTorch graph import: trace what a module's ``forward`` really computes with :mod:`torch.fx`,
map every node of the graph to refnet, and prove the mapping on a probe batch before anyone audits
anything (:func:`convert_module`, behind :func:`refnet.audit.from_torch`).

Why a graph and not the module tree: attributes do not describe a computation. An activation
instance called six times is one child (``named_children`` skips repeats); a ``Linear`` subclass
may multiply a ``weight_mask`` buffer into its weight in its own ``forward``; a hook may change any
output. The fx graph has one node per call, module calls, ``torch.nn.functional`` calls and tensor
methods alike, and the subclass's ``forward`` is traced through (it becomes ``mul`` and
``F.linear`` nodes).

The steps (each failure is a ``ValueError`` that names the module or node, never a guess):

1. *Refuse what the graph cannot show*: forward hooks and pre-hooks on any module, the root
   included (``torch.nn.utils.prune``'s pre-hook on a ``Linear``/``Conv2d`` is the one understood:
   ``weight = weight_orig * weight_mask``), backward hooks, global module hooks, gradient hooks on
   parameters, parametrizations.
2. *Trace* with a :class:`torch.fx.Tracer` whose leaves are the modules whose ``forward`` is
   PyTorch's own (``nn.Linear``, ``nn.Tanh``, ...; ``nn.Sequential`` is traced through); every other
   ``forward`` is traced into its operations. An untraceable ``forward`` (data-dependent control
   flow) is refused naming its module.
3. *Map each node* by the tables of :func:`_tables` (one entry per operation;
   :data:`refnet.audit.graph.REFUSED` lists the operations understood but refused until the engine
   has them) to a :class:`~refnet.audit.graph.Piece`; the graph must be a chain. The pieces are
   grouped into refnet layers by :func:`refnet.audit.graph.group_pieces`.
4. *Probe*: run the traced graph on a float64 copy of the module (its own train/eval mode) with
   two batch sizes (:data:`PROBE_BATCH`; every node's per-example shape must not depend on the
   batch size), build the refnet network, and compare node by node: each refnet layer applied to
   PyTorch's input of that layer must give PyTorch's output of each node it covers, and the
   network's own forward must give the module's own output, both to :data:`PROBE_RTOL` relative
   (to the largest entry). The first node that differs is named.

torch is imported only inside the functions (``import refnet.audit`` does not import it).
"""

from __future__ import annotations

import copy
import functools
import operator
from dataclasses import dataclass

import numpy as np

from ..network import Network
from .graph import GAP_ONLY, REFUSED, Piece, check_layers, group_pieces, piece_layer, rel_err
from .names import ACTIVATIONS, resolve
from .reference import parse_shape

__all__ = [
    "PROBE_BATCH",
    "PROBE_RTOL",
    "SUPPORTED",
    "ParamRef",
    "TorchGraph",
    "convert_module",
    "deepcopy_module",
    "import_torch",
    "infer_in_shape",
    "node_values",
    "torch_activation",
    "trace_module",
]

#: relative tolerance (to the largest entry of each node's output) of the probe check
PROBE_RTOL = 1e-12

#: the probe's batch sizes: the comparison runs on the first, the second only checks that no
#: node's per-example shape (or a shape value a node uses) depends on the batch size
PROBE_BATCH = (5, 3)

#: torch.nn.Softplus / F.softplus is linear above this pre-activation (refnet's softplus is exact)
SOFTPLUS_THRESHOLD = 20.0

#: what is mapped, for the messages that refuse the rest
SUPPORTED = (
    "Linear / F.linear; Conv2d / F.conv2d (groups=1, dilation=1, padding int/pair/'valid'/'same' with odd kernels, "
    "padding_mode zeros or circular); activations Tanh, ReLU, LeakyReLU, SELU, ELU, Sigmoid, Hardtanh(-1, 1), "
    "Softplus(beta=1, threshold=20) as modules, torch.nn.functional calls or tensor methods (and torch.erf), each "
    "right after a Linear or Conv2d; AvgPool2d and MaxPool2d (stride = kernel, square kernel, no padding, "
    "ceil_mode False, dilation 1); AdaptiveAvgPool2d(1) or mean(dim=(2, 3), keepdim=True) followed by a flatten, "
    "or mean(dim=(2, 3)) (global average pooling); Flatten / torch.flatten(x, 1) / x.view(x.size(0), -1) / "
    "reshape to (B, -1); Dropout in eval mode, Identity, contiguous, clone (no-ops); weights that are parameters, "
    "pruned by torch.nn.utils.prune or multiplied by a 0/1 buffer in the forward; a chain (no branches)"
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


def deepcopy_module(module):
    """``copy.deepcopy`` that also works on pruned modules: their ``weight`` attribute is the
    non-leaf product ``weight_orig * weight_mask`` (recomputed by the hook on every forward), which
    ``Tensor.__deepcopy__`` refuses, so a detached copy stands in for it."""
    memo = {}
    for m in module.modules():
        for tname in ("weight", "bias"):
            t = m.__dict__.get(tname)
            if t is not None and hasattr(t, "is_leaf") and not t.is_leaf:
                memo[id(t)] = t.detach().clone()
    return copy.deepcopy(module, memo)


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
# 1. what the graph cannot show: hooks and parametrizations
# --------------------------------------------------------------------------------------------


def _hook_name(h) -> str:
    return getattr(h, "__qualname__", None) or getattr(h, "__name__", None) or type(h).__name__


def _is_leaf(m, nn) -> bool:
    """A module is a leaf of the trace when its ``forward`` is PyTorch's own (then the mapping
    knows what it computes from its class and attributes); ``nn.Sequential`` and every forward
    written elsewhere (subclasses that override it, user modules) are traced through."""
    if isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward:
        return False
    mod = getattr(type(m).forward, "__module__", "") or ""
    return mod.startswith("torch.nn.") or mod.startswith("torch.ao.nn.")


def _plain_affine(m, nn) -> bool:
    return (isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward) or (
        isinstance(m, nn.Conv2d) and type(m).forward is nn.Conv2d.forward
    )


def _check_hooks(module) -> None:
    """Refuse every hook and parametrization refnet does not model (ValueError naming the module)."""
    torch = import_torch()
    nn = torch.nn
    prune = nn.utils.prune
    glob = torch.nn.modules.module
    for attr, what in (("_global_forward_hooks", "forward hook"), ("_global_forward_pre_hooks", "forward pre-hook"),
                       ("_global_backward_hooks", "backward hook"), ("_global_backward_pre_hooks", "backward pre-hook")):
        if getattr(glob, attr, None):
            raise ValueError(f"a global module {what} is registered (torch.nn.modules.module.register_module_{what.replace(' ', '_').replace('-', '_')}); "
                             "it runs on every module and refnet does not model it: remove it first")
    for name, m in module.named_modules():
        where = f"module {name or '<root>'!r} ({type(m).__name__})"
        if nn.utils.parametrize.is_parametrized(m):
            raise ValueError(f"{where}: parametrized weights (torch.nn.utils.parametrize) are not supported; "
                             "remove the parametrization (parametrize.remove_parametrizations) first")
        for h in m._forward_pre_hooks.values():
            if isinstance(h, prune.BasePruningMethod):
                tname = getattr(h, "_tensor_name", None)
                if not _plain_affine(m, nn):
                    raise ValueError(f"{where}: torch.nn.utils.prune on a module whose forward is not nn.Linear's or "
                                     "nn.Conv2d's is not supported (the pruned weight would be traced as a constant)")
                if tname not in ("weight", "bias"):
                    raise ValueError(f"{where}: torch.nn.utils.prune of {tname!r} is not supported (only weight and bias)")
                continue
            raise ValueError(f"{where}: has a forward pre-hook ({_hook_name(h)}) refnet does not model; only "
                             "torch.nn.utils.prune hooks are supported: remove it (handle.remove()) first")
        if m._forward_hooks:
            names = ", ".join(_hook_name(h) for h in m._forward_hooks.values())
            raise ValueError(f"{where}: has forward hooks ({names}) refnet does not model (a hook may change the output); "
                             "remove them (handle.remove()) first")
        if m._backward_hooks or getattr(m, "_backward_pre_hooks", None):
            raise ValueError(f"{where}: has backward hooks refnet does not model (they may change the gradients compared)")
        for pname, p in m.named_parameters(recurse=False):
            if getattr(p, "_backward_hooks", None):
                raise ValueError(f"{where}: parameter {pname!r} has a gradient hook (Tensor.register_hook) refnet does not model")


# --------------------------------------------------------------------------------------------
# 2. tracing
# --------------------------------------------------------------------------------------------


def trace_module(module):
    """``(graph_module, prefix)``: the module traced by :mod:`torch.fx`, leaves as in
    :func:`_is_leaf`. A root that is itself a leaf (a bare ``nn.Linear``) is traced inside an
    ``nn.Sequential`` so that its hooks and parameters are those of a module call; ``prefix`` is
    then ``"0."`` (stripped from the names reported). ValueError naming the module whose
    ``forward`` cannot be traced."""
    torch = import_torch()
    fx = torch.fx
    nn = torch.nn
    root, prefix = module, ""
    if _is_leaf(module, nn):
        root, prefix = nn.Sequential(module), "0."

    class _Tracer(fx.Tracer):
        failed = None

        def is_leaf_module(self, m, qualname):
            return _is_leaf(m, nn)

        def call_module(self, m, forward, args, kwargs):
            try:
                return super().call_module(m, forward, args, kwargs)
            except Exception:
                if self.failed is None:
                    try:
                        self.failed = (self.path_of_module(m), m)
                    except Exception:
                        self.failed = ("?", m)
                raise

    tracer = _Tracer()
    try:
        graph = tracer.trace(root)
    except Exception as exc:
        q, m = tracer.failed or ("", module)
        q = q[len(prefix):] if prefix and q.startswith(prefix) else ("" if prefix and q == "0" else q)
        raise ValueError(
            f"module {q or '<root>'!r} ({type(m).__name__}) cannot be traced by torch.fx: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''} (a forward with data-dependent control flow, or Python "
            "fx cannot follow, cannot be imported faithfully; write it with tensor operations or audit through ONNX)"
        ) from exc
    return fx.GraphModule(root, graph), prefix


def _recorder(torch):
    class _Recorder(torch.fx.Interpreter):
        """Runs the graph node by node and keeps (copies of) the values of the nodes asked for."""

        def __init__(self, gm, keep=None):
            super().__init__(gm, garbage_collect_values=False)
            self.keep = keep
            self.values = {}
            self.failed = None

        def run_node(self, n):
            try:
                v = super().run_node(n)
            except Exception:
                if self.failed is None:
                    self.failed = n
                raise
            if self.keep is None or n.name in self.keep:
                if isinstance(v, torch.Tensor):
                    self.values[n.name] = v.detach().clone()  # in-place ops later must not change it
                elif isinstance(v, torch.Size):
                    self.values[n.name] = tuple(v)
                else:
                    self.values[n.name] = v
            return v

    return _Recorder


def node_values(module, x, names) -> dict:
    """The outputs of the graph nodes ``names`` when ``module`` (traced again, as
    :func:`convert_module` traced it) runs on the tensor ``x``, without gradients:
    ``{name: tensor}``. Names the graph no longer has are left out."""
    torch = import_torch()
    gm, _ = trace_module(module)
    rec = _recorder(torch)(gm, keep=set(names))
    with torch.no_grad():
        rec.run(x)
    return rec.values


# --------------------------------------------------------------------------------------------
# 3. mapping: one piece per node, by tables
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


class _Ctx:
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
        return f"{node.name!r} ({_op_name(node)}{self.owner(node, ' in ')})"

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
                return f"[{q}] {getattr(cls, '__name__', cls)}: {_op_name(node)}"
        return f"[{node.name}] {_op_name(node)}"

    def where(self, node) -> str:
        k = self.index.get(node, "?")
        if node.op == "call_module":
            q = self.qual(node.target)
            return f"module {k} ({q or '<root>'!r}: {self.module(node)!r})"
        return f"node {k} {node.name!r} ({_op_name(node)}{self.owner(node, ' in module ')})"

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
        raise ValueError(f"{fail}; it is computed by node {arg.name!r} ({_op_name(arg)})")


def _op_name(node) -> str:
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
    return _flatten(ctx, node, a["start_dim"], a["end_dim"], _op_name(node))


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


def _refuse(key):
    def handler(ctx, node, m=None):
        raise _unsupported(ctx, node, REFUSED[key])

    return handler


def _add(ctx, node, m=None):
    data = [a for a in node.all_input_nodes if ctx.cls.get(a) == "data"]
    if len(data) >= 2:
        raise _unsupported(ctx, node, REFUSED["residual_add"])
    raise _unsupported(ctx, node, "adding a constant to a tensor (a bias outside a Linear/Conv2d) has no refnet layer")


@functools.lru_cache(maxsize=1)
def _tables():
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
    modules += [(getattr(nn, c), _refuse("batch_norm")) for c in ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm")]
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
        F.batch_norm: _refuse("batch_norm"),
        torch.batch_norm: _refuse("batch_norm"),
        operator.add: _add,
        operator.iadd: _add,
        torch.add: _add,
    }
    methods = {"view": _reshape, "reshape": _reshape, "flatten": _flatten_fn, "mean": _mean, "contiguous": _noop_method,
               "clone": _noop_method, "add": _add, "add_": _add, "__add__": _add, "__radd__": _add}
    for row in ACTIVATIONS.values():
        for path in row.torch_functions:
            functions[resolve(path)] = functools.partial(_act_call, row)
        for name in row.torch_methods:
            methods[name] = functools.partial(_act_call, row)
    return modules, functions, methods


def _handle(ctx, node):
    """The piece of a data node (ValueError naming it when it is not supported)."""
    nn = ctx.nn
    modules, functions, methods = _tables()
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


# --------------------------------------------------------------------------------------------
# the graph: classes of nodes, the chain, the probe
# --------------------------------------------------------------------------------------------


def _classify(ctx, graph):
    """Each node's class: ``data`` (depends on the input tensor), ``shape`` (a shape value such as
    ``x.size(0)``, or arithmetic on one) or ``const`` (parameters, buffers, products of them)."""
    import builtins

    cls = ctx.cls
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise ValueError(f"the module's forward takes {len(placeholders)} inputs ({', '.join(n.target for n in placeholders)}); "
                         "refnet imports a forward of one input tensor")
    k = 0
    for n in graph.nodes:
        if n.op == "placeholder":
            cls[n] = "data"
        elif n.op == "get_attr":
            cls[n] = "const"
        elif n.op == "output":
            continue
        else:
            ins = [cls.get(i) for i in n.all_input_nodes]
            if "data" in ins:
                is_shape = (n.op == "call_method" and n.target in ("size", "dim")) or (
                    n.op == "call_function" and n.target is builtins.getattr and len(n.args) > 1 and n.args[1] in ("shape", "ndim"))
                cls[n] = "shape" if is_shape else "data"
            elif "shape" in ins:
                cls[n] = "shape"
            else:
                cls[n] = "const"
            if cls[n] == "data":
                ctx.index[n] = k
                k += 1
    for n in graph.nodes:
        if n.op == "call_module" and cls.get(n) == "data":
            ctx.calls[n.target] = ctx.calls.get(n.target, 0) + 1
            ctx.call_no[n] = ctx.calls[n.target]
    return placeholders[0]


def _live(graph):
    out = next(n for n in graph.nodes if n.op == "output")
    live, stack = set(), [out]
    while stack:
        n = stack.pop()
        if n in live:
            continue
        live.add(n)
        stack.extend(n.all_input_nodes)
    return out, live


def _chain(ctx, graph, pieces_by_node, x_node):
    """The data nodes from the input to the output, in order; ValueError when the graph is not a
    chain (a node reads two tensors, or a tensor feeds two nodes)."""
    out, live = _live(graph)
    ret = out.args[0]
    if not hasattr(ret, "op") or ctx.cls.get(ret) != "data":
        raise ValueError(f"the module's forward must return one tensor computed from its input, got {ret!r}")
    head, chain = x_node, []
    for n in graph.nodes:
        if ctx.cls.get(n) != "data" or n.op == "placeholder":
            continue
        data_in = [a for a in n.all_input_nodes if ctx.cls.get(a) == "data"]
        piece = pieces_by_node.get(n)
        if n not in live:
            if piece is not None and piece.inplace:
                raise ValueError(f"{ctx.where(n)}: an in-place operation whose result is not used (it changes "
                                 f"{data_in[0].name!r} in place, which the graph does not show); assign its result")
            continue
        if len(data_in) != 1:
            raise ValueError(f"{ctx.where(n)} reads {len(data_in)} tensors ({', '.join(a.name for a in data_in)}): the graph is "
                             "not a chain; refnet imports chains only (no branches, residual connections or concatenations)")
        if data_in[0] is not head:
            raise ValueError(f"{ctx.where(n)} reads {data_in[0].name!r}, but the chain is at {head.name!r}: the graph "
                             "branches; refnet imports chains only (no branches or residual connections)")
        users = [u for u in data_in[0].users if ctx.cls.get(u) == "data" or u.op == "output"]
        if piece is not None and piece.inplace and len(users) > 1:
            raise ValueError(f"{ctx.where(n)}: an in-place operation on {data_in[0].name!r}, which other nodes also read")
        chain.append(n)
        head = n
    if head is not ret:
        raise ValueError(f"the module's forward returns {ret.name!r}, not the end of the chain {head.name!r}")
    return chain


def _probe(ctx, probe_module, chain, in_shape):
    """Run the traced graph (and the module itself) on float64 probes of both batch sizes."""
    torch = ctx.torch
    Rec = _recorder(torch)
    rng = np.random.default_rng(0)
    out = []
    for B in PROBE_BATCH:
        x = torch.as_tensor(rng.standard_normal((B, *in_shape)), dtype=torch.float64)
        rec = Rec(ctx.gm)
        try:
            with torch.no_grad():
                rec.run(x)
        except Exception as exc:
            n = rec.failed
            at = f"{ctx.where(n)} " if n is not None and n.op not in ("placeholder", "output") else ""
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if B == PROBE_BATCH[0]:
                raise ValueError(f"the torch module does not fit in_shape={tuple(in_shape)}: {at}raised {type(exc).__name__}: {msg}") from None
            raise ValueError(f"{at}fails with a batch of {B} examples after running with {PROBE_BATCH[0]} ({type(exc).__name__}: "
                             f"{msg}): the forward depends on the batch size, which refnet's layers cannot") from None
        with torch.no_grad():
            own = probe_module(x)
        out.append((x, rec.values, own))
    ctx.values, ctx.values2 = out[0][1], out[1][1]
    for n in chain:
        v1, v2 = ctx.values[n.name], ctx.values2[n.name]
        if not (isinstance(v1, torch.Tensor) and isinstance(v2, torch.Tensor)):
            raise ValueError(f"{ctx.where(n)} returns a {type(v1).__name__}, not a tensor")
        if v1.ndim == 0 or v1.shape[0] != PROBE_BATCH[0] or v2.shape[0] != PROBE_BATCH[1] or v1.shape[1:] != v2.shape[1:]:
            raise ValueError(f"{ctx.where(n)}: output shape {tuple(v1.shape)} with a batch of {PROBE_BATCH[0]} and "
                             f"{tuple(v2.shape)} with {PROBE_BATCH[1]}: refnet needs (B, *shape) with a per-example shape "
                             "that does not depend on B")
        if v1.dtype != torch.float64:
            raise ValueError(f"{ctx.where(n)} computes in {v1.dtype} on a float64 module: a dtype change refnet does not model")
    return out[0][0], out[0][2]


# --------------------------------------------------------------------------------------------
# 4. pieces -> refnet layers, and the probe comparison
# --------------------------------------------------------------------------------------------


def _probe_check(ctx, net, specs, x_probe, own_out, x_node) -> dict:
    """Node by node (:func:`refnet.audit.graph.check_layers`), then the network's forward against
    the module's own output; ValueError naming the first node that differs."""
    worst, exceeded = check_layers(net, specs, ctx.tensor, ctx.tensor(x_node), PROBE_RTOL, ctx.where, "module",
                                   softplus_threshold=SOFTPLUS_THRESHOLD)
    last = specs[-1]["pieces"][-1].node
    own = own_out.detach().cpu().numpy()
    e_graph = rel_err(ctx.tensor(last), own)
    if not e_graph <= PROBE_RTOL:
        raise ValueError(f"the traced graph does not reproduce the module's own forward (max relative error {e_graph:.2e}): "
                         "its forward is not a pure function of its input (randomness, state) and cannot be imported")
    _, trace = net.forward(x_probe.numpy(), return_trace=True)
    e = rel_err(trace.out, own)
    if not exceeded and not e <= PROBE_RTOL:  # errors that grow along the chain
        outs = [c["x"] for c in trace.caches[1:]] + [trace.out]
        node = last
        for i, spec in enumerate(specs):
            node = spec["pieces"][-1].node
            if not rel_err(np.reshape(outs[i], ctx.tensor(node).shape), ctx.tensor(node)) <= PROBE_RTOL:
                break
        raise ValueError(f"the converted network's forward differs from the module's on the probe batch (max relative "
                         f"error {e:.2e} > {PROBE_RTOL:g}); the errors first exceed the tolerance at {ctx.where(node)}")
    return {"probe_batch": PROBE_BATCH[0], "probe_max_rel_err": max(worst, 0.0 if exceeded else e),
            "probe_rtol": PROBE_RTOL, "softplus_over_threshold_layers": exceeded}


@dataclass
class TorchGraph:
    """A PyTorch module imported by :func:`convert_module`.

    Attributes
    ----------
    net : Network
        float64, weights copied (``W`` is ``(n_out, n_in)`` / ``(c_out, c_in, kh, kw)`` as in
        PyTorch), masks from ``torch.nn.utils.prune`` or from multiplied 0/1 buffers.
    sources : list of str
        Per refnet layer, the nodes it covers (``torch [0] Linear + [1] Tanh``).
    outputs : list of str
        Per refnet layer, the fx node name of its output (:func:`node_values`).
    params : list of dict
        Per refnet layer, ``{"W": ParamRef, "b": ParamRef}``.
    probe : dict
        The probe check: batch, largest relative error, tolerance.
    """

    net: Network
    sources: list
    outputs: list
    params: list
    probe: dict


def _first_pass(module):
    """Trace, classify and map every node without running anything: ``(ctx, x_node, chain,
    pieces)``; ValueError for every structural problem (hooks, tracing, unsupported operations
    and settings, a graph that is not a chain)."""
    torch = import_torch()
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    _check_hooks(module)
    probe_module = deepcopy_module(module).to(device="cpu", dtype=torch.float64)
    gm, prefix = trace_module(probe_module)
    ctx = _Ctx(torch, gm, prefix)
    x_node = _classify(ctx, gm.graph)
    _, live = _live(gm.graph)
    pieces = {}
    for n in gm.graph.nodes:
        if ctx.cls.get(n) == "data" and n.op != "placeholder" and (n in live or _maybe_inplace(n)):
            pieces[n] = _handle(ctx, n)
    chain = _chain(ctx, gm.graph, pieces, x_node)
    return ctx, probe_module, x_node, chain, [pieces[n] for n in chain]


def _maybe_inplace(n) -> bool:
    if n.op == "call_method":
        return str(n.target).endswith("_") and not str(n.target).startswith("__")
    if n.op == "call_function":
        return getattr(n.target, "__name__", "").endswith("_") or bool(n.kwargs.get("inplace", False))
    return False


def _infer(ctx, pieces):
    """The per-example input shape when the first layer with a shape is a Linear reached only
    through element-wise operations and flattens: ``(n_in,)``; else None."""
    for p in pieces:
        if p.kind == "dense":
            return (p.kw["n_in"],)
        if p.kind not in ("act", "identity", "flatten"):
            return None
    return None


def infer_in_shape(module):
    """The per-example input shape :func:`convert_module` would infer (``(n_in,)`` of a first
    Linear), or None when it must be given."""
    ctx, _, _, _, pieces = _first_pass(module)
    return _infer(ctx, pieces)


def convert_module(module, in_shape=None) -> TorchGraph:
    """Import ``module`` faithfully (see the module docstring) or refuse with a ValueError naming
    the module or node.

    Parameters
    ----------
    module : torch.nn.Module
        Any module whose ``forward`` torch.fx can trace into the operations of :data:`SUPPORTED`,
        forming a chain. It is not changed (the trace and the probe work on a float64 deep copy,
        in the module's own train/eval mode).
    in_shape : tuple of int, optional
        Per-example input shape, e.g. ``(1, 28, 28)``. Required unless the first layer is Linear.

    Returns
    -------
    TorchGraph
    """
    torch = import_torch()
    ctx, probe_module, x_node, chain, pieces = _first_pass(module)
    if in_shape is None:
        in_shape = _infer(ctx, pieces)
        if in_shape is None:
            first = next((p for p in pieces if p.kind not in ("act", "identity")), pieces[0] if pieces else None)
            kind = {"conv": "Conv2d", "maxpool": "MaxPool2d", "avgpool": "AvgPool2d"}.get(first.kind, first.kind) if first else "?"
            src = ctx.label(first.node) if first else "?"
            raise ValueError(f"in_shape is required: the first refnet layer is {kind} (from torch {src}); give the "
                             "per-example input shape, e.g. in_shape=(1, 28, 28)")
    in_shape = parse_shape(in_shape, "in_shape")
    x_probe, own_out = _probe(ctx, probe_module, chain, in_shape)
    pieces = [_handle(ctx, n) for n in chain]  # second pass, with the probe's values
    specs = group_pieces(pieces, ctx.where, ctx.label, SUPPORTED)
    layers, params, masks, refs = [], [], [], []
    used = {}
    for spec in specs:
        layers.append(piece_layer(spec))
        p, mk, r = {}, {}, {}
        for key, ref in spec["params"].items():
            owner = used.setdefault(ref.param, spec["pieces"][0].node)
            if owner is not spec["pieces"][0].node:
                raise ValueError(f"{ctx.where(spec['pieces'][0].node)}: parameter {ref.param!r} is also used by "
                                 f"{ctx.label(owner)}; shared weights are not supported (refnet owns one W per layer)")
            t = module.get_parameter(ref.param)
            p[key] = t.detach().cpu().to(torch.float64).numpy().copy()
            if ref.mask is not None:
                mk[key] = module.get_buffer(ref.mask).detach().cpu().to(torch.float64).numpy() == 1
            r[key] = ref
        params.append(p)
        masks.append(mk)
        refs.append(r)
    try:
        net = Network(layers, in_shape=in_shape, params=params, masks=masks)
    except ValueError as exc:
        raise ValueError(f"the torch module does not fit in_shape={in_shape}: {exc}") from None
    probe = _probe_check(ctx, net, specs, x_probe, own_out, x_node)
    probe["graph_nodes"] = len(ctx.index)
    sources = ["torch " + " + ".join(ctx.source(p.node) for p in s["pieces"]) for s in specs]
    outputs = [s["pieces"][-1].node.name for s in specs]
    return TorchGraph(net, sources, outputs, refs, probe)
