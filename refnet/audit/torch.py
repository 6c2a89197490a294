"""PyTorch: ``nn.Sequential`` <-> refnet Network (:func:`from_torch`, :func:`to_torch`,
:func:`torch_from_arch`), the audit of a module (:func:`compare_torch`) and the checkpoint files
``refnet audit --torch`` reads (:func:`save_torch_checkpoint`, :func:`load_torch_checkpoint`).

Pruned PyTorch modules (``torch.nn.utils.prune``) carry ``weight_orig`` (a parameter) and
``weight_mask`` (a buffer) and compute ``weight = weight_orig * weight_mask``. refnet stores the
same two arrays (``W``, ``mask``; the effective weight is ``mask * W``), and PyTorch's gradient
with respect to ``weight_orig`` is ``mask * dL/dW_eff`` -- exactly refnet's masked gradient, so the
two are compared directly (likewise ``bias_orig`` / ``bias_mask``).

torch is imported only inside the functions (``import refnet.audit`` does not import it).
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass

import numpy as np

from .._io import atomic_write
from ..layers import AvgPool2d, Conv2d, Dense, Flatten, GlobalAvgPool2d, MaxPool2d
from ..network import Network
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
    compute_reference,
    match_reference,
    new_report,
    parse_shape,
    section_tol,
)
from .report import AuditReport

__all__ = ["compare_torch", "from_torch", "load_torch_checkpoint", "save_torch_checkpoint", "to_torch", "torch_from_arch"]


def _torch():
    try:
        import torch
        import torch.nn.utils.prune  # noqa: F401  (not imported by ``import torch``)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the PyTorch audit needs torch: pip install 'refnet[torch]' (or pip install torch)") from exc
    return torch


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


def _torch_activation(m, nn):
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


_TORCH_SUPPORTED = (
    "Linear; Conv2d (groups=1, dilation=1, padding int/pair/'valid'/'same' with odd kernels, padding_mode zeros or "
    "circular); activations Tanh, ReLU, LeakyReLU, SELU, ELU, Sigmoid, Hardtanh(-1, 1), Softplus(beta=1), each "
    "right after a Linear or Conv2d; Identity; AvgPool2d and MaxPool2d (stride = kernel, square kernel, no padding, "
    "ceil_mode False, dilation 1); AdaptiveAvgPool2d(1) followed by Flatten (global average pooling); Flatten "
    "(start_dim=1, end_dim=-1); nested nn.Sequential"
)


def _torch_flat_modules(module) -> list:
    torch = _torch()
    nn = torch.nn
    if not isinstance(module, nn.Sequential):
        raise TypeError(
            f"module must be a torch.nn.Sequential (nested Sequentials are flattened), got {type(module).__name__}; "
            f"supported children: {_TORCH_SUPPORTED}"
        )
    out = []

    def walk(m, prefix):
        if type(m).forward is not nn.Sequential.forward:
            raise ValueError(f"module {prefix or '<root>'!r} ({type(m).__name__}) overrides Sequential.forward; "
                             "only plain nn.Sequential containers can be converted")
        for name, child in m.named_children():
            q = f"{prefix}{name}"
            if isinstance(child, nn.Sequential):
                walk(child, q + ".")
            else:
                out.append((q, child))

    walk(module, "")
    if not out:
        raise ValueError("module is an empty nn.Sequential")
    return out


def _pair_of(v, what, where):
    if isinstance(v, int):
        return (v, v)
    v = tuple(v)
    if len(v) == 1:
        return (int(v[0]), int(v[0]))
    if len(v) != 2:
        raise ValueError(f"{where}: {what} {v!r} is not a pair")
    return (int(v[0]), int(v[1]))


def _torch_pruned(m, name: str, where: str):
    """(param, mask or None) of ``m.<name>``: ``<name>_orig`` and ``<name>_mask`` when pruned."""
    torch = _torch()
    prune = torch.nn.utils.prune
    orig = getattr(m, name + "_orig", None)
    if orig is not None and isinstance(orig, torch.nn.Parameter):
        mask = getattr(m, name + "_mask", None)
        hooks = [h for h in m._forward_pre_hooks.values()
                 if isinstance(h, prune.BasePruningMethod) and getattr(h, "_tensor_name", None) == name]
        if mask is None or not hooks:
            raise ValueError(f"{where}: has {name}_orig but no torch.nn.utils.prune mask/hook for it ({name}_mask); "
                             "only torch.nn.utils.prune reparametrisations are supported")
        return orig, mask
    return getattr(m, name, None), None


def _torch_check_plain(m, where: str) -> None:
    """Refuse hooks and parametrisations that refnet does not model."""
    torch = _torch()
    prune = torch.nn.utils.prune
    if getattr(m, "parametrizations", None) is not None:
        raise ValueError(f"{where}: parametrized weights (torch.nn.utils.parametrize) are not supported; "
                         "remove the parametrization (parametrize.remove_parametrizations) first")
    for h in m._forward_pre_hooks.values():
        if not isinstance(h, prune.BasePruningMethod):
            raise ValueError(f"{where}: has a forward pre-hook ({type(h).__name__ if not callable(h) else getattr(h, '__name__', type(h).__name__)}) "
                             "refnet does not model; only torch.nn.utils.prune hooks are supported")
    if m._forward_hooks:
        raise ValueError(f"{where}: has forward hooks refnet does not model")
    allowed = {"weight", "bias", "weight_orig", "bias_orig"}
    extra = sorted(set(dict(m.named_parameters(recurse=False))) - allowed)
    if extra:
        raise ValueError(f"{where}: parameters {extra} are not supported (only weight and bias, possibly pruned)")


@dataclass
class _TorchLayout:
    net: Network
    groups: list  # per refnet layer: list of (qualified name, module) of the torch modules it covers
    affine: list  # per refnet layer: qualified name of its Linear/Conv2d, or None
    sources: list  # per refnet layer: a description "torch [q] Module + [q] Act"


def _convert_torch(module, in_shape=None) -> _TorchLayout:
    torch = _torch()
    nn = torch.nn
    items = _torch_flat_modules(module)
    specs = []  # dicts: kind, kwargs, group, affine
    skip = set()

    def where(idx, q, m):
        return f"module {idx} ({q!r}: {m!r})"

    for idx, (q, m) in enumerate(items):
        if idx in skip:
            continue
        w = where(idx, q, m)
        if isinstance(m, nn.Identity):
            if specs:
                specs[-1]["group"].append((q, m))
            continue
        act = _torch_activation(m, nn)
        if isinstance(act, ValueError):
            raise ValueError(f"unsupported setting in {w}: {act}. Supported: {_TORCH_SUPPORTED}")
        if act is not None:
            prev = specs[-1] if specs else None
            if prev is None or prev["kind"] not in ("dense", "conv"):
                what = "it is the first module" if prev is None else f"it follows {prev['group'][-1][0]!r} ({type(prev['group'][-1][1]).__name__}), not a Linear or Conv2d"
                raise ValueError(
                    f"{w}: an activation must come right after a Linear or Conv2d ({what}); refnet fuses each "
                    "activation into the affine layer before it (one layer = one W and its phi). Put the activation "
                    "before the pooling (ReLU and max-pooling commute) or add an explicit Linear/Conv2d"
                )
            if prev["act"] is not None:
                raise ValueError(
                    f"{w}: a second activation after {prev['group'][0][0]!r}; refnet layers have one activation each "
                    f"(already {prev['act'][0]})"
                )
            prev["act"] = act
            prev["group"].append((q, m))
            continue
        if isinstance(m, nn.Linear):
            _torch_check_plain(m, w)
            specs.append({"kind": "dense", "kw": {"n_in": m.in_features, "n_out": m.out_features, "bias": m.bias is not None or hasattr(m, "bias_orig")},
                          "group": [(q, m)], "affine": q, "act": None, "module": m})
        elif isinstance(m, nn.Conv2d):
            _torch_check_plain(m, w)
            if m.groups != 1:
                raise ValueError(f"unsupported setting in {w}: groups={m.groups} (only groups=1). Supported: {_TORCH_SUPPORTED}")
            if tuple(m.dilation) != (1, 1):
                raise ValueError(f"unsupported setting in {w}: dilation={m.dilation} (only 1). Supported: {_TORCH_SUPPORTED}")
            if m.padding_mode not in ("zeros", "circular"):
                raise ValueError(f"unsupported setting in {w}: padding_mode={m.padding_mode!r} (only 'zeros' or 'circular')")
            k = _pair_of(m.kernel_size, "kernel_size", w)
            if isinstance(m.padding, str):
                if m.padding == "valid":
                    pad = (0, 0)
                else:  # 'same' (stride 1): total k - 1, split left = total // 2
                    if k[0] % 2 == 0 or k[1] % 2 == 0:
                        raise ValueError(f"unsupported setting in {w}: padding='same' with an even kernel {k} pads "
                                         "asymmetrically, which refnet's Conv2d cannot represent")
                    pad = ((k[0] - 1) // 2, (k[1] - 1) // 2)
            else:
                pad = _pair_of(m.padding, "padding", w)
            specs.append({"kind": "conv", "kw": {"c_in": m.in_channels, "c_out": m.out_channels, "kernel_size": k,
                                                  "stride": _pair_of(m.stride, "stride", w), "padding": pad,
                                                  "padding_mode": m.padding_mode,
                                                  "bias": m.bias is not None or hasattr(m, "bias_orig")},
                          "group": [(q, m)], "affine": q, "act": None, "module": m})
        elif isinstance(m, (nn.AvgPool2d, nn.MaxPool2d)):
            k = _pair_of(m.kernel_size, "kernel_size", w)
            s = k if m.stride is None or (isinstance(m.stride, (tuple, list)) and len(m.stride) == 0) else _pair_of(m.stride, "stride", w)
            pad = _pair_of(m.padding, "padding", w)
            problems = []
            if k[0] != k[1]:
                problems.append(f"kernel {k} is not square")
            if s != k:
                problems.append(f"stride {s} != kernel {k}")
            if pad != (0, 0):
                problems.append(f"padding {pad}")
            if m.ceil_mode:
                problems.append("ceil_mode=True")
            if isinstance(m, nn.MaxPool2d):
                if _pair_of(m.dilation, "dilation", w) != (1, 1):
                    problems.append(f"dilation {m.dilation}")
                if m.return_indices:
                    problems.append("return_indices=True")
            elif getattr(m, "divisor_override", None) is not None:
                problems.append(f"divisor_override={m.divisor_override}")
            if problems:
                raise ValueError(f"unsupported setting in {w}: {', '.join(problems)}. Supported: {_TORCH_SUPPORTED}")
            kind = "avgpool" if isinstance(m, nn.AvgPool2d) else "maxpool"
            specs.append({"kind": kind, "kw": {"kernel_size": k[0]}, "group": [(q, m)], "affine": None, "act": None})
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            osz = m.output_size
            ok = osz == 1 or (isinstance(osz, (tuple, list)) and tuple(osz) == (1, 1))
            j = idx + 1
            while j < len(items) and isinstance(items[j][1], nn.Identity):
                j += 1
            nxt = items[j][1] if j < len(items) else None
            if not ok or not (isinstance(nxt, nn.Flatten) and nxt.start_dim == 1 and nxt.end_dim == -1):
                raise ValueError(f"unsupported setting in {w}: only AdaptiveAvgPool2d(1) followed by Flatten() "
                                 f"(global average pooling) is supported. Supported: {_TORCH_SUPPORTED}")
            group = [(q, m)] + [items[t] for t in range(idx + 1, j + 1)]
            skip.update(range(idx + 1, j + 1))
            specs.append({"kind": "gap", "kw": {}, "group": group, "affine": None, "act": None})
        elif isinstance(m, nn.Flatten):
            if m.start_dim != 1 or m.end_dim != -1:
                raise ValueError(f"unsupported setting in {w}: Flatten(start_dim={m.start_dim}, end_dim={m.end_dim}); "
                                 "only start_dim=1, end_dim=-1")
            specs.append({"kind": "flatten", "kw": {}, "group": [(q, m)], "affine": None, "act": None})
        else:
            raise ValueError(f"unsupported module {w}. Supported: {_TORCH_SUPPORTED}")
    if not specs:
        raise ValueError("module holds no layer refnet can convert (only Identity modules)")

    layers, params, masks = [], [], []
    for s in specs:
        act = None if s["act"] is None else {"name": s["act"][0], **s["act"][1]}
        if s["kind"] == "dense":
            layers.append(Dense(activation=act or "identity", **s["kw"]))
        elif s["kind"] == "conv":
            layers.append(Conv2d(activation=act or "identity", **s["kw"]))
        elif s["kind"] == "avgpool":
            layers.append(AvgPool2d(**s["kw"]))
        elif s["kind"] == "maxpool":
            layers.append(MaxPool2d(**s["kw"]))
        elif s["kind"] == "gap":
            layers.append(GlobalAvgPool2d())
        else:
            layers.append(Flatten())
        p, mk = {}, {}
        if s["affine"] is not None:
            m = s["module"]
            where_ = f"module {s['affine']!r} ({m!r})"
            for key, tname in (("W", "weight"), ("b", "bias")):
                t, mask = _torch_pruned(m, tname, where_)
                if t is None:
                    continue
                p[key] = t.detach().cpu().to(torch.float64).numpy().copy()
                if mask is not None:
                    mm = mask.detach().cpu().to(torch.float64).numpy()
                    if not np.all((mm == 0) | (mm == 1)):
                        raise ValueError(f"{where_}: {tname}_mask must hold only 0 and 1")
                    mk[key] = mm.astype(bool)
        params.append(p)
        masks.append(mk)
    if in_shape is None:
        if isinstance(layers[0], Dense):
            in_shape = (layers[0].n_in,)
        else:
            raise ValueError(
                f"in_shape is required: the first refnet layer is {type(layers[0]).__name__} "
                f"(from torch module {specs[0]['group'][0][0]!r}); give the per-example input shape, e.g. in_shape=(1, 28, 28)"
            )
    in_shape = parse_shape(in_shape, "in_shape")
    try:
        net = Network(layers, in_shape=in_shape, params=params, masks=masks)
    except ValueError as exc:
        raise ValueError(f"the torch module does not fit in_shape={in_shape}: {exc}") from None
    groups = [s["group"] for s in specs]
    sources = ["torch " + " + ".join(f"[{q}] {type(m).__name__}" for q, m in g) for g in groups]
    return _TorchLayout(net, groups, [s["affine"] for s in specs], sources)


def from_torch(module, in_shape=None) -> Network:
    """A refnet :class:`~refnet.network.Network` with the weights of a PyTorch ``nn.Sequential``.

    Parameters
    ----------
    module : torch.nn.Sequential
        Children (nested Sequentials are flattened): Linear; Conv2d (groups=1, dilation=1,
        padding an int, a pair, "valid", or "same" with an odd kernel; padding_mode "zeros" or
        "circular"); activations Tanh, ReLU, LeakyReLU, SELU, ELU, Sigmoid, Hardtanh(-1, 1),
        Softplus(beta=1) -- each must directly follow a Linear or Conv2d and is fused into it
        (a refnet layer owns one affine map and its activation); Identity (dropped); AvgPool2d and
        MaxPool2d with stride = kernel (square), no padding, ceil_mode False; AdaptiveAvgPool2d(1)
        followed by Flatten() (-> GlobalAvgPool2d); Flatten(). Pruned modules
        (``torch.nn.utils.prune``: ``weight_orig`` + ``weight_mask``, likewise bias) become refnet
        masks with ``W = weight_orig``.
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
        An unsupported module or setting (the message names the module by index and repr and
        lists what is supported), an activation not right after an affine layer, a missing or
        wrong ``in_shape``.
    """
    return _convert_torch(module, in_shape).net


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


def _torch_deepcopy(module):
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


def _torch_run(module, layout: _TorchLayout, x, y, loss_name: str, dtype, want_jac: bool) -> Run:
    """Run a copy of ``module`` in ``dtype`` and collect everything refnet compares."""
    torch = _torch()
    F = torch.nn.functional
    model = _torch_deepcopy(module).to(dtype)
    mods = dict(model.named_modules())
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    xt = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float64).to(device=device, dtype=dtype)
    acts = [None] * len(layout.groups)
    handles = []
    for i, g in enumerate(layout.groups):
        q = g[-1][0]

        def hook(_m, _inp, out, i=i):
            acts[i] = out.detach()

        handles.append(mods[q].register_forward_hook(hook))
    try:
        z = model(xt)
    finally:
        for h in handles:
            h.remove()
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

    params, grads, scores, pmasks = [], [], [], []
    for i, q in enumerate(layout.affine):
        p, g, s, pm = {}, {}, {}, {}
        if q is not None:
            m = mods[q]
            for key, tname in (("W", "weight"), ("b", "bias")):
                t, mask = _torch_pruned(m, tname, f"module {q!r}")
                if t is None:
                    continue
                p[key] = np64(t)
                g[key] = np64(t.grad) if t.grad is not None else np.zeros(tuple(t.shape))
                if mask is not None:
                    pm[key] = np64(mask).astype(bool)
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
        from torch.func import jacrev, vmap

        def f(xi):
            return model(xi.unsqueeze(0)).squeeze(0)

        J = vmap(jacrev(f))(xt.detach())  # (B, n_out, *in_shape)
        J = J.reshape(J.shape[0], J.shape[1], -1)
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
    """Audit a PyTorch ``nn.Sequential`` against refnet, in float64 and as it runs.

    Parameters
    ----------
    module : torch.nn.Sequential
        See :func:`from_torch` for what it may contain. It is not changed (every run works on a
        deep copy).
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
        Compare the input-output Jacobians (``torch.func.vmap(torch.func.jacrev(f))``) and their
        singular values (costs ``n_out`` backward passes per example).

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
    layout = _convert_torch(module, in_shape)
    net = layout.net
    act_diffs = []
    if reference is not None:
        act_diffs = match_reference(reference, net, "module")
        net = reference.astype(np.float64) if reference.dtype != np.float64 else reference
    x_arr, y_arr = check_xy(net, x_arr, y, loss_name)
    t0 = time.perf_counter()
    ref = compute_reference(net, x_arr, y_arr, loss_name, sparsity, jacobian)
    own = _module_dtype(module)
    meta = {"module_dtype": _torch_dtype_name(own), "torch_version": torch.__version__, "sparsity": sparsity,
            "rtol_float64": rtol, "reference": "given Network" if reference is not None else "from_torch(module)"}
    report = new_report("torch", ref, meta)
    report.notes.append(
        "Pruned modules: refnet W = weight_orig, mask = weight_mask; PyTorch's weight_orig.grad = mask * dL/dW_eff "
        "is refnet's masked gradient and is compared directly (likewise bias_orig)."
    )
    report.notes += _softplus_notes(ref)
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
    report.meta["seconds"] = round(time.perf_counter() - t0, 3)
    return report


def to_torch(net: Network, dtype=None):
    """A ``torch.nn.Sequential`` computing ``net`` (the inverse of :func:`from_torch`).

    Dense -> Linear (+ activation module), Conv2d -> Conv2d (+ activation), AvgPool2d/MaxPool2d
    -> the same, GlobalAvgPool2d -> AdaptiveAvgPool2d(1) + Flatten(), Flatten -> Flatten().
    Masks that prune anything become ``torch.nn.utils.prune.custom_from_mask`` (``weight_orig``
    holds refnet's ``W``). ``dtype`` defaults to the network's. The erf activation has no
    PyTorch module (ValueError). Softplus maps to ``nn.Softplus()`` whose linear cut-off at 20 is a
    known modelling difference.
    """
    torch = _torch()
    nn = torch.nn
    prune = nn.utils.prune
    if not isinstance(net, Network):
        raise TypeError(f"net must be a refnet Network, got {type(net).__name__}")
    dt = _torch_dtype(net.dtype if dtype is None else dtype)
    mods, filled = [], []
    for i, (layer, p, m) in enumerate(zip(net.layers, net.params, net.masks)):
        affine = None
        if isinstance(layer, Dense):
            affine = nn.Linear(layer.n_in, layer.n_out, bias=layer.bias)
        elif isinstance(layer, Conv2d):
            affine = nn.Conv2d(layer.c_in, layer.c_out, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                               padding_mode=layer.padding_mode, bias=layer.bias)
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
        if affine is None:
            continue
        filled.append((affine, p))
        mods.append(affine)
        act = layer.activation
        if not act.is_linear:
            row = ACTIVATIONS.get(act.name)
            if row is None or row.torch is None:
                raise ValueError(f"net.layers[{i}]: activation {act.name!r} has no torch.nn module")
            kw = dict(act.params)
            # the torch defaults are the settings refnet models (row.torch_fixed)
            mods.append(getattr(nn, row.torch)(**{attr: kw[p] for p, attr in row.torch_params}))
    seq = nn.Sequential(*mods).to(dt)
    with torch.no_grad():  # copy after the cast: float64 weights must not pass through float32
        for affine, p in filled:
            affine.weight.copy_(torch.as_tensor(p["W"], dtype=torch.float64))
            if affine.bias is not None:
                affine.bias.copy_(torch.as_tensor(p["b"], dtype=torch.float64))
    # prune after the cast so the masks are the module's dtype
    j = 0
    for layer, m in zip(net.layers, net.masks):
        if isinstance(layer, (Dense, Conv2d)):
            while not isinstance(seq[j], (nn.Linear, nn.Conv2d)):
                j += 1
            for key, tname in (("W", "weight"), ("b", "bias")):
                if key in m and not m[key].all():
                    prune.custom_from_mask(seq[j], tname, torch.as_tensor(m[key]))
            j += 1
    return seq


def torch_from_arch(arch: str, in_shape, n_classes: int, dtype=None):
    """The ``nn.Sequential`` of a refnet architecture spec (``refnet.arch``), as :func:`to_torch`
    lays it out (e.g. ``mlp-3-tanh`` on (784,): Linear, Tanh, Linear, Tanh, Linear). Its weights
    are refnet's default init (seed 0); load a state_dict into it."""
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


def load_torch_checkpoint(path, arch: str | None = None, in_shape=None, n_classes: int | None = None):
    """Rebuild an ``nn.Sequential`` from a file read with ``torch.load(weights_only=True)``.

    The file is either a checkpoint of :func:`save_torch_checkpoint` (architecture inside; the
    arguments, when given, override it) or a bare ``state_dict`` (then ``arch``, ``in_shape`` and
    ``n_classes`` are needed). Pruned state dicts (``weight_orig`` / ``weight_mask`` keys) are
    loaded into modules prepared with ``torch.nn.utils.prune.identity``. Returns
    ``(module, info)`` with ``info = {"arch", "in_shape", "n_classes"}``.
    """
    torch = _torch()
    prune = torch.nn.utils.prune
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
        state = obj.get("state_dict")
        arch = arch or obj.get("arch")
        in_shape = in_shape if in_shape is not None else obj.get("in_shape")
        n_classes = n_classes if n_classes is not None else obj.get("n_classes")
    elif isinstance(obj, dict) and all(isinstance(k, str) for k in obj) and all(torch.is_tensor(v) for v in obj.values()):
        state = obj
    else:
        raise ValueError(f"torch file {path!r} holds a {type(obj).__name__}, not a state_dict or a refnet.audit.torch checkpoint")
    missing = [n for n, v in (("arch", arch), ("in_shape", in_shape), ("n_classes", n_classes)) if v is None]
    if missing:
        raise ValueError(f"torch file {path!r} is a bare state_dict: give {', '.join(missing)} (--torch-arch, --in-shape; "
                         "n_classes is read from the last Linear's weight when possible)")
    in_shape = parse_shape(in_shape, "in_shape")
    module = torch_from_arch(arch, in_shape, int(n_classes))
    # the dtype of the state dict is the dtype the model runs in
    dts = {v.dtype for v in state.values() if torch.is_tensor(v) and v.is_floating_point()}
    if len(dts) == 1:
        module = module.to(dts.pop())
    mods = dict(module.named_modules())
    for key in state:
        for tname in ("weight", "bias"):
            if key.endswith(f".{tname}_orig"):
                mname = key[: -len(f".{tname}_orig")]
                if mname in mods and not hasattr(mods[mname], f"{tname}_orig"):
                    prune.identity(mods[mname], tname)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        layout = ", ".join(f"{n}: {type(m).__name__}" for n, m in module.named_children())
        raise ValueError(f"the state_dict in {path!r} does not fit arch {arch!r} on in_shape {in_shape} "
                         f"(expected module layout {layout}): {' '.join(line.strip() for line in str(exc).splitlines()[:3])}") from None
    return module, {"arch": arch, "in_shape": list(in_shape), "n_classes": int(n_classes)}
