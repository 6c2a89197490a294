"""PyTorch: any traceable ``nn.Module`` -> refnet Network (:func:`from_torch`, by the graph importer
:mod:`refnet.audit.fx`), refnet Network -> ``nn.Sequential`` (:func:`to_torch`,
:func:`torch_from_arch`), the audit of a module (:func:`compare_torch`) and the checkpoint files
``refnet audit --torch`` reads (:func:`save_torch_checkpoint`, :func:`load_torch_checkpoint`).

Pruned PyTorch modules (``torch.nn.utils.prune``) carry ``weight_orig`` (a parameter) and
``weight_mask`` (a buffer) and compute ``weight = weight_orig * weight_mask``. refnet stores the
same two arrays (``W``, ``mask``; the effective weight is ``mask * W``), and PyTorch's gradient
with respect to ``weight_orig`` is ``mask * dL/dW_eff`` -- exactly refnet's masked gradient, so the
two are compared directly (likewise ``bias_orig`` / ``bias_mask``). A 0/1 buffer the forward
multiplies into a parameter (``F.linear(x, self.weight * self.weight_mask, b)``) is the same
convention: ``weight.grad = mask * dL/dW_eff``.

torch is imported only inside the functions (``import refnet.audit`` does not import it).
"""

from __future__ import annotations

import math
import os
import time

import numpy as np

from .._io import atomic_write
from ..layers import Add, AvgPool2d, BatchNorm1d, BatchNorm2d, Conv2d, Dense, Flatten, GlobalAvgPool2d, MaxPool2d, SubsamplePad
from ..network import Network
from .fx import TorchGraph, convert_module, deepcopy_module, import_torch, node_values
from .graph import batch_jacobian_note, graph_reference
from .names import ACTIVATIONS
from .reference import (
    DEFAULT_RTOL,
    Reference,
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

__all__ = [
    "compare_torch",
    "from_torch",
    "load_torch_checkpoint",
    "load_torch_state",
    "save_torch_checkpoint",
    "to_torch",
    "torch_from_arch",
]


def _torch():
    return import_torch()


def _softplus_notes(ref: Reference, threshold: float = 20.0) -> list:
    """How many softplus pre-activations exceed PyTorch's linear cut-off (a known difference)."""
    notes = []
    net = ref.net
    _, trace = net.forward(ref.x, return_trace=True)
    for i, layer in enumerate(net.layers):
        act = getattr(layer, "activation", None)
        if act is not None and act.name == "softplus":
            h = trace.caches[i].get("h")
            n = int(np.count_nonzero(h > threshold)) if h is not None else 0
            notes.append(
                f"layer {i}: torch.nn.Softplus(beta=1, threshold={threshold:g}) is linear above the threshold, refnet's "
                f"softplus is the exact log(1+e^h): a known modelling difference of at most log1p(exp(-{threshold:g})) "
                f"= {math.log1p(math.exp(-threshold)):.1e} in the value and derivative; {n} of {h.size if h is not None else 0} "
                "pre-activations here exceed the threshold"
            )
    return notes


def cancelled_bias_layers(net: Network) -> list:
    """The layers whose bias gradient is zero by construction: a Dense/Conv2d with a bias and a
    linear activation whose output only train-mode batch normalization reads (the batch mean
    removes every per-channel constant, so ``dL/db = sum dL/dh = 0`` up to rounding)."""
    out = []
    for i, layer in enumerate(net.layers):
        act = getattr(layer, "activation", None)
        if not getattr(layer, "bias", False) or act is None or not act.is_linear:
            continue
        readers = [net.layers[l] for l, ins in enumerate(net.inputs) if i + 1 in ins]
        if readers and all(getattr(r, "couples_batch", False) and getattr(r, "num_features", None) for r in readers):
            out.append(i)
    return out


def rescale_cancelled_bias_checks(report, ref: Reference) -> None:
    """A bias gradient that is zero by construction (:func:`cancelled_bias_layers`) is rounding noise
    on both sides, so its error relative to its own largest entry means nothing: its checks are
    rescaled to ``max_c sum |dL/dh_c|``, the size of the terms that cancel (refnet's node
    cotangent of the layer's output), and say so."""
    from ..losses import get_loss

    layers = cancelled_bias_layers(ref.net)
    if not layers:
        return
    net = ref.net
    out, trace = net.forward(ref.x, return_trace=True)
    _, eps = get_loss(ref.loss_name)(out, ref.y)
    cot = net.node_cotangents(trace, eps, input_grad=False)
    for i in layers:
        g = np.abs(cot[i + 1])
        scale = float(np.max(g.sum(axis=tuple(a for a in range(g.ndim) if a != 1))))
        for c in report.checks:
            if c.name == f"grad/{i}/b" and scale > 0 and math.isfinite(c.max_abs_err):
                c.ref_max = scale
                c.max_rel_err = c.max_abs_err / scale
                c.passed = bool(c.max_rel_err <= c.tol)
                c.note = (f"zero by construction (train-mode BatchNorm removes per-channel constants): error relative to "
                          f"max_c sum |dL/dh_c| = {scale:.3g}, the terms that cancel")


def from_torch(module, in_shape=None) -> Network:
    """A refnet :class:`~refnet.network.Network` computing what a PyTorch module computes, or a
    ValueError that names what it cannot reproduce.

    The module's ``forward`` is traced with :mod:`torch.fx` and every node is mapped
    (:func:`refnet.audit.fx.convert_module`): module calls, ``torch.nn.functional`` calls and
    tensor methods alike, so an activation instance used six times gives six activations, and a
    ``Linear``/``Conv2d`` subclass that multiplies a ``weight_mask`` buffer into its weight in its own
    ``forward`` gives a masked layer. Before returning, the network must reproduce the module's own
    forward on a float64 probe batch, node by node, to 1e-12 relative.

    Parameters
    ----------
    module : torch.nn.Module
        Any module whose traced graph is a chain, or a graph that branches into residual
        additions (``out + shortcut``, ``out += shortcut``), of: Linear / ``F.linear``; Conv2d /
        ``F.conv2d`` (groups=1, dilation=1, padding an int, a pair, "valid", or "same" with an odd
        kernel; padding_mode "zeros" or "circular"); the activations Tanh, ReLU, LeakyReLU, SELU,
        ELU, Sigmoid, Hardtanh(-1, 1), Softplus(beta=1, threshold=20) (modules, functions or tensor
        methods, and ``torch.erf``) -- each must directly follow a Linear, Conv2d, BatchNorm or
        addition and is fused into it (a refnet layer owns one affine map, BatchNorm or sum and its
        activation); BatchNorm1d over ``(B, C)`` and BatchNorm2d (modules, ``F.batch_norm``; train
        mode with batch statistics when the module is training or keeps no running statistics,
        else eval mode with its running statistics; ``gamma = weight``, ``beta = bias``); the
        addition of two tensors (:class:`~refnet.layers.Add`); ``x[:, :, ::s, ::s]`` and
        ``F.pad(x, (0, 0, 0, 0, a, b))``, the option-A shortcut (:class:`~refnet.layers.SubsamplePad`);
        AvgPool2d and MaxPool2d with
        stride = kernel (square), no padding, ceil_mode False; global average pooling
        (AdaptiveAvgPool2d(1) or ``mean((2, 3), keepdim=True)`` then a flatten, or
        ``mean((2, 3))``); flattening each example (Flatten, ``torch.flatten(x, 1)``,
        ``x.view(x.size(0), -1)``, ``reshape``); Dropout in eval mode, Identity, ``contiguous``
        (no-ops). Masks: ``torch.nn.utils.prune`` (``W = weight_orig``, mask ``weight_mask``; likewise
        bias) and 0/1 buffers the forward multiplies into a parameter (``F.linear(x, self.weight *
        self.weight_mask, b)``: ``W = weight``, mask the buffer). The module is not changed.
    in_shape : tuple of int, optional
        Per-example input shape, e.g. ``(1, 28, 28)``. Required unless the first layer is Linear.

    Returns
    -------
    Network
        float64, weights copied (``W`` is ``(n_out, n_in)`` / ``(c_out, c_in, kh, kw)`` as in
        PyTorch, no transposes).

    Raises
    ------
    ValueError
        A hook (other than prune's), a parametrization, an untraceable forward, an unsupported
        operation or setting, a node reading two tensors other than an addition, training-mode
        dropout, a missing or wrong ``in_shape``, or a probe batch on which the network does not
        reproduce the module: the message names the module or graph node.
    TypeError
        ``module`` is not a ``torch.nn.Module``.
    """
    return convert_module(module, in_shape).net


def _torch_dtype(dtype):
    torch = _torch()
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(np.dtype(dtype)) if not isinstance(dtype, str) else dtype.replace("torch.", "")
    if name == "bfloat16":
        return torch.bfloat16
    try:
        return {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "double": torch.float64,
                "float": torch.float32, "half": torch.float16}[name]
    except KeyError:
        raise ValueError(f"dtype must be one of float64, float32, float16, bfloat16, got {dtype!r}") from None


def _torch_dtype_name(dt) -> str:
    return str(dt).replace("torch.", "")


def _torch_run(module, layout: TorchGraph, x, y, loss_name: str, dtype, want_jac: bool) -> Run:
    """Run a copy of ``module`` in ``dtype`` (its own forward) and collect everything refnet
    compares; the output of every refnet layer comes from the traced graph's nodes
    (:func:`refnet.audit.fx.node_values`) on the same copy."""
    torch = _torch()
    F = torch.nn.functional
    model = deepcopy_module(module).to(dtype)
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    xt = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float64).to(device=device, dtype=dtype)
    z = model(xt)
    if z.ndim != 2:
        raise ValueError(f"the torch module must output (B, C) logits, got shape {tuple(z.shape)}")
    if loss_name == "cross_entropy":
        target = torch.as_tensor(y, device=device)
        target = target.long() if y.ndim == 1 else target.to(dtype)
        L = F.cross_entropy(z, target)
    else:
        t = torch.as_tensor(y, device=device)
        t = F.one_hot(t.long(), z.shape[1]).to(dtype) if y.ndim == 1 else t.to(dtype)
        L = F.mse_loss(z, t)
    L.backward()

    def np64(t):
        return t.detach().to(torch.float64).cpu().numpy()

    values = node_values(model, xt.detach(), layout.outputs)
    acts = [values.get(name) for name in layout.outputs]
    params, grads, scores, pmasks = [], [], [], []
    for refs in layout.params:
        p, g, s, pm = {}, {}, {}, {}
        for key, ref in refs.items():
            t = model.get_parameter(ref.param)
            p[key] = np64(t)
            g[key] = np64(t.grad) if t.grad is not None else np.zeros(tuple(t.shape))
            if ref.mask is not None:  # the module's own pruning masks, compared with the reference's
                pm[key] = np64(model.get_buffer(ref.mask)).astype(bool)
            if key == "W":
                s["W"] = np64((t.grad * t).abs()) if t.grad is not None else np.zeros(tuple(t.shape))
        params.append(p)
        grads.append(g)
        scores.append(s)
        pmasks.append(pm)
    run = Run(_torch_dtype_name(dtype), logits=np64(z), loss=float(L.detach().to(torch.float64).cpu()),
              grads=grads, params=params, prune_masks=pmasks, scores=scores,
              acts=[None if a is None else np64(a) for a in acts])
    if want_jac:
        from torch.func import jacrev

        def f(xb):  # the examples do not interact (no train-mode BatchNorm), so d sum_b z_b / d x_b = d z_b / d x_b
            return model(xb).sum(0)

        J = jacrev(f)(xt.detach())  # (n_out, B, *in_shape): n_out reverse passes over the batch, vmapped
        J = J.reshape(J.shape[0], J.shape[1], -1).transpose(0, 1)
        Jsv = J if dtype in (torch.float32, torch.float64) else J.to(torch.float32)
        run.jac = np64(J)
        run.sv = np64(torch.linalg.svdvals(Jsv))
    return run


def _module_dtype(module):
    torch = _torch()
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def compare_torch(
    module,
    x,
    y,
    loss="cross_entropy",
    *,
    dtype_as_run=None,
    sparsity=0.9,
    rtol=DEFAULT_RTOL,
    rtol_as_run=None,
    reference: Network | None = None,
    in_shape=None,
    jacobian: bool = True,
) -> AuditReport:
    """Audit a PyTorch module against refnet, in float64 and as it runs.

    Parameters
    ----------
    module : torch.nn.Module
        See :func:`from_torch` for what it may contain (it is imported, and the import checked on a
        probe batch, before anything is compared). It is not changed (every run works on a deep
        copy, in the module's own train/eval mode). Logits, loss, gradients and Jacobians come from
        the module's own forward; the per-layer outputs ``act/{i}`` from the traced graph's nodes.
    x : ndarray, shape (B, *in_shape)
        Inputs (NCHW for images), B >= 1.
    y : ndarray, shape (B,) int labels or (B, C) targets
    loss : "cross_entropy" or "mse"
        Mean over the batch, as ``F.cross_entropy`` / ``F.mse_loss`` and refnet's losses.
    dtype_as_run : torch dtype or name, optional
        The dtype of the as-run audit; default the module's own (its first floating parameter).
        ``False`` skips it. Nothing extra is run when it is float64 (that is the float64 audit).
    sparsity : float in [0, 1)
        Of the SNIP masks compared.
    rtol : float
        Tolerance of the float64 comparison (relative to each tensor's largest reference entry).
    rtol_as_run : float, optional
        Tolerance of the as-run comparison; default :data:`AS_RUN_RTOL` of its dtype.
    reference : Network, optional
        The refnet network to compare with; default ``from_torch(module, in_shape)``. Its layers
        must have the module's structure (the parameters are then compared too).
    in_shape : tuple, optional
        Default ``x.shape[1:]``.
    jacobian : bool
        Compare the input-output Jacobians (``torch.func.jacrev`` of ``x -> sum_b f(x)_b`` over the
        batch: ``n_out`` vmapped reverse passes, exact because the examples do not interact) and
        their singular values. Not computed when BatchNorm runs in train mode (the examples are
        coupled: no per-example Jacobian exists; the report says so).

    Returns
    -------
    AuditReport
    """
    torch = _torch()
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
    layout = convert_module(module, in_shape)
    net = layout.net
    act_diffs = []
    if reference is not None:
        act_diffs = match_reference(reference, net, "module")
        net = reference.astype(np.float64) if reference.dtype != np.float64 else reference
    x_arr, y_arr = check_xy(net, x_arr, y, loss_name)
    t0 = time.perf_counter()
    jacobian, jac_note = batch_jacobian_note(net, jacobian)
    ref = graph_reference(net, x_arr, y_arr, loss_name, sparsity, jacobian)
    own = _module_dtype(module)
    meta = {"module_dtype": _torch_dtype_name(own), "torch_version": torch.__version__, "sparsity": sparsity,
            "rtol_float64": rtol, "reference": "given Network" if reference is not None else "from_torch(module)",
            "import": "torch.fx graph, checked on a float64 probe batch", "import_probe": layout.probe}
    report = new_report("torch", ref, meta)
    report.notes.append(
        "Pruned modules: refnet W = weight_orig, mask = weight_mask; PyTorch's weight_orig.grad = mask * dL/dW_eff "
        "is refnet's masked gradient and is compared directly (likewise bias_orig)."
    )
    report.notes += _softplus_notes(ref)
    if jac_note:
        report.notes.append(jac_note)
    add_activation_checks(report, act_diffs, layout.sources)
    run64 = _torch_run(module, layout, x_arr, y_arr, loss_name, torch.float64, jacobian)
    compare_run(ref, run64, "float64", rtol, sparsity, layout.sources, report)
    if dtype_as_run is not False:
        dt = own if dtype_as_run is None else _torch_dtype(dtype_as_run)
        name = _torch_dtype_name(dt)
        if dt == torch.float64:
            report.notes.append("the module runs in float64, so the as-run audit is the float64 audit")
        else:
            tol = section_tol(name, rtol, rtol_as_run)
            report.meta["rtol_as_run"] = tol
            report.meta["as_run_dtype"] = name
            run = _torch_run(module, layout, x_arr, y_arr, loss_name, dt, jacobian)
            compare_run(ref, run, f"as-run {name}", tol, sparsity, layout.sources, report)
    rescale_cancelled_bias_checks(report, ref)
    report.meta["seconds"] = round(time.perf_counter() - t0, 3)
    return report


def _graph_classes(nn, F):
    """The small modules :func:`to_torch` builds a network with residual connections from
    (defined once torch is imported)."""
    global _GRAPH_CLASSES
    if _GRAPH_CLASSES is not None:
        return _GRAPH_CLASSES

    class RefnetAdd(nn.Module):
        """``act(x_1 + ... + x_n)``: refnet's :class:`~refnet.layers.Add`."""

        def __init__(self, act):
            super().__init__()
            self.act = act

        def forward(self, *xs):
            out = xs[0]
            for x in xs[1:]:
                out = out + x
            return self.act(out)

    class RefnetSubsamplePad(nn.Module):
        """``F.pad(x[:, :, ::s, ::s], (0, 0, 0, 0, a, b))``: refnet's
        :class:`~refnet.layers.SubsamplePad` (the option-A shortcut)."""

        def __init__(self, stride, pad_channels):
            super().__init__()
            self.stride, self.pad_channels = int(stride), tuple(int(v) for v in pad_channels)

        def forward(self, x):
            s = self.stride
            return F.pad(x[:, :, ::s, ::s], (0, 0, 0, 0) + self.pad_channels)

    class RefnetGraph(nn.Module):
        """A refnet network with residual connections: ``layers[l]`` reads the nodes
        ``inputs[l]`` (node 0 the input, node ``j`` the output of ``layers[j - 1]``)."""

        def __init__(self, layers, inputs):
            super().__init__()
            self.layers = nn.ModuleList(layers)
            self.inputs = tuple(tuple(int(j) for j in ins) for ins in inputs)

        def forward(self, x):
            nodes = [x]
            for layer, ins in zip(self.layers, self.inputs):
                nodes.append(layer(*[nodes[j] for j in ins]))
            return nodes[-1]

    _GRAPH_CLASSES = (RefnetAdd, RefnetSubsamplePad, RefnetGraph)
    return _GRAPH_CLASSES


_GRAPH_CLASSES = None


def _act_module(nn, layer, i):
    act = layer.activation
    if act.is_linear:
        return None
    row = ACTIVATIONS.get(act.name)
    if row is None or row.torch is None:
        raise ValueError(f"net.layers[{i}]: activation {act.name!r} has no torch.nn module")
    kw = dict(act.params)
    # the torch defaults are the settings refnet models (row.torch_fixed)
    return getattr(nn, row.torch)(**{attr: kw[p] for p, attr in row.torch_params})


def to_torch(net: Network, dtype=None):
    """A PyTorch module computing ``net`` (the inverse of :func:`from_torch`): a
    ``torch.nn.Sequential`` for a chain, else a small graph module whose ``layers[l]`` reads the
    outputs of ``net.inputs[l]``.

    Dense -> Linear (+ activation module), Conv2d -> Conv2d (+ activation), BatchNorm1d/2d ->
    BatchNorm1d/2d (``weight = gamma``, ``bias = beta``, the running statistics; training in train
    mode, eval in eval mode) (+ activation), Add -> the sum (+ activation), SubsamplePad ->
    ``F.pad(x[:, :, ::s, ::s], (0, 0, 0, 0, a, b))``, AvgPool2d/MaxPool2d -> the same,
    GlobalAvgPool2d -> AdaptiveAvgPool2d(1) + Flatten(), Flatten -> Flatten(). Masks that prune
    anything become ``torch.nn.utils.prune.custom_from_mask`` (``weight_orig`` holds refnet's
    ``W``). ``dtype`` defaults to the network's. The erf activation has no PyTorch module
    (ValueError). Softplus maps to ``nn.Softplus()`` whose linear cut-off at 20 is a known
    modelling difference.
    """
    torch = _torch()
    nn = torch.nn
    prune = nn.utils.prune
    if not isinstance(net, Network):
        raise TypeError(f"net must be a refnet Network, got {type(net).__name__}")
    dt = _torch_dtype(net.dtype if dtype is None else dtype)
    RefnetAdd, RefnetSubsamplePad, RefnetGraph = _graph_classes(nn, torch.nn.functional)
    per_layer, filled, bns = [], [], []
    for i, (layer, p) in enumerate(zip(net.layers, net.params)):
        mods, main = [], None
        if isinstance(layer, Dense):
            main = nn.Linear(layer.n_in, layer.n_out, bias=layer.bias)
        elif isinstance(layer, Conv2d):
            main = nn.Conv2d(layer.c_in, layer.c_out, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                             padding_mode=layer.padding_mode, bias=layer.bias)
        elif isinstance(layer, (BatchNorm1d, BatchNorm2d)):
            cls = nn.BatchNorm1d if isinstance(layer, BatchNorm1d) else nn.BatchNorm2d
            main = cls(layer.num_features, eps=layer.eps, momentum=layer.momentum, affine=layer.affine)
            bns.append((main, layer, p, net.buffers[i]))
        elif isinstance(layer, Add):
            act = _act_module(nn, layer, i)
            mods.append(RefnetAdd(act if act is not None else nn.Identity()))
        elif isinstance(layer, SubsamplePad):
            mods.append(RefnetSubsamplePad(layer.stride, layer.pad_channels))
        elif isinstance(layer, AvgPool2d):
            mods.append(nn.AvgPool2d(layer.kernel_size))
        elif isinstance(layer, MaxPool2d):
            mods.append(nn.MaxPool2d(layer.kernel_size))
        elif isinstance(layer, GlobalAvgPool2d):
            mods += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        elif isinstance(layer, Flatten):
            mods.append(nn.Flatten())
        else:
            raise ValueError(f"net.layers[{i}] ({type(layer).__name__}) has no PyTorch counterpart here")
        if main is not None:
            mods.append(main)
            if isinstance(layer, (Dense, Conv2d)):
                filled.append((main, p, net.masks[i]))
            act = _act_module(nn, layer, i)
            if act is not None:
                mods.append(act)
        per_layer.append(mods)
    if net.is_chain:
        root = nn.Sequential(*[m for mods in per_layer for m in mods])
    else:
        root = RefnetGraph([mods[0] if len(mods) == 1 else nn.Sequential(*mods) for mods in per_layer], net.inputs)
    root = root.to(dt)
    with torch.no_grad():  # copy after the cast: float64 weights must not pass through float32
        for affine, p, _ in filled:
            affine.weight.copy_(torch.as_tensor(p["W"], dtype=torch.float64))
            if affine.bias is not None:
                affine.bias.copy_(torch.as_tensor(p["b"], dtype=torch.float64))
        for bn, layer, p, buf in bns:
            if layer.affine:
                bn.weight.copy_(torch.as_tensor(p["gamma"], dtype=torch.float64))
                bn.bias.copy_(torch.as_tensor(p["beta"], dtype=torch.float64))
            bn.running_mean.copy_(torch.as_tensor(buf["running_mean"], dtype=torch.float64))
            bn.running_var.copy_(torch.as_tensor(buf["running_var"], dtype=torch.float64))
    if net.mode is not None:
        root.train(net.mode == "train")
        for bn, layer, _, _ in bns:
            bn.train(layer.mode == "train")
    # prune after the cast so the masks are the module's dtype
    for affine, _, m in filled:
        for key, tname in (("W", "weight"), ("b", "bias")):
            if key in m and not m[key].all():
                prune.custom_from_mask(affine, tname, torch.as_tensor(m[key]))
    return root


def torch_from_arch(arch: str, in_shape, n_classes: int, dtype=None):
    """The PyTorch module of a refnet architecture spec (``refnet.arch``), as :func:`to_torch`
    lays it out (e.g. ``mlp-3-tanh`` on (784,): Linear, Tanh, Linear, Tanh, Linear; a ResNet as a
    graph module). Its weights are refnet's default init (seed 0); load a state_dict into it."""
    from ..arch import build

    torch = _torch()
    net = build(arch, parse_shape(in_shape, "in_shape"), n_classes, seed=0)
    return to_torch(net, dtype=torch.float32 if dtype is None else dtype)


def save_torch_checkpoint(module, path, arch: str, in_shape, n_classes: int | None = None) -> None:
    """Save ``{"format": "refnet.audit.torch", "arch", "in_shape", "n_classes", "state_dict"}`` with
    ``torch.save`` (atomically): the file ``refnet audit --torch`` reads with
    ``torch.load(weights_only=True)``. ``module`` must have the layout of
    :func:`torch_from_arch` ``(arch, in_shape, n_classes)``."""
    torch = _torch()
    from ..arch import parse_arch

    parse_arch(arch)
    in_shape = parse_shape(in_shape, "in_shape")
    if n_classes is None:
        lin = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
        if not lin:
            raise ValueError("n_classes must be given (the module has no Linear layer to read it from)")
        n_classes = lin[-1].out_features
    payload = {"format": "refnet.audit.torch", "version": 1, "arch": arch, "in_shape": list(in_shape),
               "n_classes": int(n_classes), "state_dict": module.state_dict()}
    atomic_write(path, lambda f: torch.save(payload, f), suffix=".pt")


def _read_torch_file(path):
    """``(state_dict, checkpoint or None)`` of a file read with ``torch.load(weights_only=True)``:
    a bare state dict or a checkpoint of :func:`save_torch_checkpoint`."""
    torch = _torch()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"torch file {path!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors come in many types
        raise ValueError(
            f"torch file {path!r} could not be loaded with torch.load(weights_only=True): {exc}. "
            "Save a state_dict (or refnet.audit.save_torch_checkpoint), not a whole pickled module"
        ) from None
    if isinstance(obj, dict) and obj.get("format") == "refnet.audit.torch":
        return obj.get("state_dict"), obj
    if isinstance(obj, dict) and all(isinstance(k, str) for k in obj) and all(torch.is_tensor(v) for v in obj.values()):
        return obj, None
    raise ValueError(f"torch file {path!r} holds a {type(obj).__name__}, not a state_dict or a refnet.audit.torch checkpoint")


def _load_state(module, state):
    """Load ``state`` strictly into ``module`` cast to the state dict's dtype (the dtype the model
    runs in); pruned entries (``weight_orig``/``weight_mask``) go into modules prepared with
    ``torch.nn.utils.prune.identity``. Returns the module; RuntimeError from ``load_state_dict``."""
    torch = _torch()
    prune = torch.nn.utils.prune
    dts = {v.dtype for v in state.values() if torch.is_tensor(v) and v.is_floating_point()}
    if len(dts) == 1:
        module = module.to(dts.pop())
    mods = dict(module.named_modules())
    for key in state:
        for tname in ("weight", "bias"):
            if key.endswith(f".{tname}_orig") or key == f"{tname}_orig":
                mname = key[: -len(f"{tname}_orig")].rstrip(".")
                if mname in mods and not hasattr(mods[mname], f"{tname}_orig"):
                    prune.identity(mods[mname], tname)
    module.load_state_dict(state, strict=True)
    return module


def load_torch_state(module, path):
    """Load the weights of a file read with ``torch.load(weights_only=True)`` (a bare
    ``state_dict`` or a checkpoint of :func:`save_torch_checkpoint`) into ``module``, strictly;
    the module is cast to the state dict's dtype and pruned entries (``weight_orig`` /
    ``weight_mask``) are loaded into modules prepared with ``torch.nn.utils.prune.identity``.
    Returns the module (changed in place). ValueError naming the file when the keys or shapes do
    not fit."""
    path = os.fspath(path)
    state, _ = _read_torch_file(path)
    try:
        return _load_state(module, state)
    except RuntimeError as exc:
        raise ValueError(f"the state_dict in {path!r} does not fit the module "
                         f"({type(module).__name__}): {' '.join(line.strip() for line in str(exc).splitlines()[:3])}") from None


def load_torch_checkpoint(path, arch: str | None = None, in_shape=None, n_classes: int | None = None):
    """Rebuild an ``nn.Sequential`` from a file read with ``torch.load(weights_only=True)``.

    The file is either a checkpoint of :func:`save_torch_checkpoint` (architecture inside; the
    arguments, when given, override it) or a bare ``state_dict`` (then ``arch``, ``in_shape`` and
    ``n_classes`` are needed). Pruned state dicts (``weight_orig`` / ``weight_mask`` keys) are
    loaded into modules prepared with ``torch.nn.utils.prune.identity``. Returns
    ``(module, info)`` with ``info = {"arch", "in_shape", "n_classes"}``.
    """
    path = os.fspath(path)
    state, obj = _read_torch_file(path)
    if obj is not None:
        arch = arch or obj.get("arch")
        in_shape = in_shape if in_shape is not None else obj.get("in_shape")
        n_classes = n_classes if n_classes is not None else obj.get("n_classes")
    missing = [n for n, v in (("arch", arch), ("in_shape", in_shape), ("n_classes", n_classes)) if v is None]
    if missing:
        raise ValueError(f"torch file {path!r} is a bare state_dict: give {', '.join(missing)} (--torch-arch, --in-shape; "
                         "n_classes is read from the last Linear's weight when possible)")
    in_shape = parse_shape(in_shape, "in_shape")
    module = torch_from_arch(arch, in_shape, int(n_classes))
    try:
        module = _load_state(module, state)
    except RuntimeError as exc:
        layout = ", ".join(f"{n}: {type(m).__name__}" for n, m in module.named_children())
        raise ValueError(f"the state_dict in {path!r} does not fit arch {arch!r} on in_shape {in_shape} "
                         f"(expected module layout {layout}): {' '.join(line.strip() for line in str(exc).splitlines()[:3])}") from None
    return module, {"arch": arch, "in_shape": list(in_shape), "n_classes": int(n_classes)}
