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
3. *Map each node* by the tables of :func:`refnet.audit.fx_ops.tables` (one entry per operation)
   to a :class:`~refnet.audit.graph.Piece`. Every node reads one tensor, but a residual addition,
   which reads two: the graph may branch (a ResNet block's main path and shortcut) and join only
   there. :func:`refnet.audit.graph.group_pieces` groups the pieces into refnet layers and the
   nodes each layer reads (``Network(..., inputs=...)``).
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
from dataclasses import dataclass

import numpy as np

from ..network import Network
from .fx_ops import PROBE_BATCH, SUPPORTED, NodeContext, ParamRef, import_torch, map_node, torch_activation
from .graph import check_layers, group_pieces, node_outputs, piece_layer, rel_err
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
    "wire",
]

#: relative tolerance (to the largest entry of each node's output) of the probe check
PROBE_RTOL = 1e-12

#: torch.nn.Softplus / F.softplus is linear above this pre-activation (refnet's softplus is exact)
SOFTPLUS_THRESHOLD = 20.0


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
# 3-4. the graph: classes of nodes, the data nodes (map_node on each), the probe
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


def _data_inputs(ctx, n) -> list:
    return [a for a in n.all_input_nodes if ctx.cls.get(a) == "data"]


def wire(ctx, n, piece):
    """Set the piece's ``inputs`` (the data nodes it reads, in argument order) and ``out``
    (the node itself), as :func:`refnet.audit.graph.group_pieces` reads them."""
    piece.inputs = tuple(_data_inputs(ctx, n))
    piece.out = n
    return piece


def _chain(ctx, graph, pieces_by_node, x_node):
    """The live data nodes from the input to the output, in graph (topological) order; ValueError
    for a node that reads more tensors than its operation takes (only an addition reads two), an
    in-place operation whose result is not used, or a forward that does not return one tensor
    computed from its input. The graph may branch (residual connections):
    :func:`refnet.audit.graph.group_pieces` turns it into refnet's layers and their inputs."""
    out, live = _live(graph)
    ret = out.args[0]
    if not hasattr(ret, "op") or ctx.cls.get(ret) != "data":
        raise ValueError(f"the module's forward must return one tensor computed from its input, got {ret!r}")
    if ret is x_node:
        raise ValueError("the module's forward returns its input: there is no layer to import")
    chain = []
    for n in graph.nodes:
        if ctx.cls.get(n) != "data" or n.op == "placeholder":
            continue
        data_in = _data_inputs(ctx, n)
        piece = pieces_by_node.get(n)
        if n not in live:
            if piece is not None and piece.inplace:
                raise ValueError(f"{ctx.where(n)}: an in-place operation whose result is not used (it changes "
                                 f"{data_in[0].name!r} in place, which the graph does not show); assign its result")
            continue
        want = 2 if piece.kind == "add" else 1
        if len(data_in) != want:
            raise ValueError(f"{ctx.where(n)} reads {len(data_in)} tensors ({', '.join(a.name for a in data_in)}); "
                             f"refnet imports {'an addition of two tensors' if want == 2 else 'one tensor per operation'} "
                             "here (no concatenations or products of tensors)")
        wire(ctx, n, piece)
        chain.append(n)
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
# 5. pieces -> refnet layers, and the probe comparison
# --------------------------------------------------------------------------------------------


def _probe_check(ctx, net, specs, x_probe, own_out, x_node) -> dict:
    """Node by node (:func:`refnet.audit.graph.check_layers`), then the network's forward against
    the module's own output; ValueError naming the first node that differs."""
    worst, exceeded = check_layers(net, specs, ctx.tensor, ctx.tensor(x_node), PROBE_RTOL, ctx.where, "module",
                                   softplus_threshold=SOFTPLUS_THRESHOLD)
    last = specs[-1]["out"]
    own = own_out.detach().cpu().numpy()
    e_graph = rel_err(ctx.tensor(last), own)
    if not e_graph <= PROBE_RTOL:
        raise ValueError(f"the traced graph does not reproduce the module's own forward (max relative error {e_graph:.2e}): "
                         "its forward is not a pure function of its input (randomness, state) and cannot be imported")
    out = net.forward(x_probe.numpy())
    e = rel_err(out, own)
    if not exceeded and not e <= PROBE_RTOL:  # errors that grow along the graph
        outs = node_outputs(net, x_probe.numpy())[1:]
        node = last
        for i, spec in enumerate(specs):
            node = spec["out"]
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
        PyTorch), masks from ``torch.nn.utils.prune`` or from multiplied 0/1 buffers, BatchNorm
        running statistics as its buffers, residual connections as its ``inputs``.
    sources : list of str
        Per refnet layer, the nodes it covers (``torch [0] Linear + [1] Tanh``).
    outputs : list of str
        Per refnet layer, the fx node name of its output (:func:`node_values`).
    params : list of dict
        Per refnet layer, its parameters' :class:`ParamRef` by refnet name (``"W"``, ``"b"``;
        ``"gamma"``, ``"beta"`` for BatchNorm).
    probe : dict
        The probe check: batch, largest relative error, tolerance.
    """

    net: Network
    sources: list
    outputs: list
    params: list
    probe: dict


def _first_pass(module):
    """Trace, classify and map every node without running anything: ``(ctx, probe_module,
    x_node, nodes, pieces)``; ValueError for every structural problem (hooks, tracing, unsupported
    operations and settings, a node reading more tensors than its operation takes)."""
    torch = import_torch()
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    _check_hooks(module)
    probe_module = deepcopy_module(module).to(device="cpu", dtype=torch.float64)
    gm, prefix = trace_module(probe_module)
    ctx = NodeContext(torch, gm, prefix)
    x_node = _classify(ctx, gm.graph)
    _, live = _live(gm.graph)
    pieces = {}
    for n in gm.graph.nodes:
        if ctx.cls.get(n) == "data" and n.op != "placeholder" and (n in live or _maybe_inplace(n)):
            pieces[n] = map_node(ctx, n)
    chain = _chain(ctx, gm.graph, pieces, x_node)
    return ctx, probe_module, x_node, chain, [pieces[n] for n in chain]


def _output_node(graph):
    return _live(graph)[0].args[0]


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
        if p.kind not in ("act", "identity", "flatten", "batchnorm1d"):
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
        Any module whose ``forward`` torch.fx can trace into the operations of :data:`SUPPORTED`
        (a chain, or a graph that branches into residual additions). It is not changed (the trace
        and the probe work on a float64 deep copy, in the module's own train/eval mode: BatchNorm
        layers get its mode, and its running statistics as the network's buffers).
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
            kind = {"conv": "Conv2d", "maxpool": "MaxPool2d", "avgpool": "AvgPool2d", "batchnorm2d": "BatchNorm2d",
                    "batchnorm": "BatchNorm"}.get(first.kind, first.kind) if first else "?"
            src = ctx.label(first.node) if first else "?"
            raise ValueError(f"in_shape is required: the first refnet layer is {kind} (from torch {src}); give the "
                             "per-example input shape, e.g. in_shape=(1, 28, 28)")
    in_shape = parse_shape(in_shape, "in_shape")
    x_probe, own_out = _probe(ctx, probe_module, chain, in_shape)
    pieces = [wire(ctx, n, map_node(ctx, n)) for n in chain]  # second pass, with the probe's values
    specs = group_pieces(pieces, x_node, _output_node(ctx.gm.graph), ctx.where, ctx.label, SUPPORTED)
    layers, params, masks, refs, buffers = [], [], [], [], []
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
        buffers.append({key: module.get_buffer(name).detach().cpu().to(torch.float64).numpy().copy()
                        for key, name in spec["buffers"].items() if name is not None})
    buffers = [b if b or not hasattr(layer, "buffer_shapes") else layer.init_buffers(None, np.float64)
               for b, layer in zip(buffers, layers)]  # no running statistics (track_running_stats=False)
    try:
        net = Network(layers, in_shape=in_shape, params=params, masks=masks, buffers=buffers,
                      inputs=[s["inputs"] for s in specs])
    except ValueError as exc:
        raise ValueError(f"the torch module does not fit in_shape={in_shape}: {exc}") from None
    probe = _probe_check(ctx, net, specs, x_probe, own_out, x_node)
    probe["graph_nodes"] = len(ctx.index)
    sources = ["torch " + " + ".join(ctx.source(p.node) for p in s["pieces"]) for s in specs]
    outputs = [s["out"].name for s in specs]
    return TorchGraph(net, sources, outputs, refs, probe)
