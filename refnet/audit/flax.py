"""Flax linen: a refnet Network from a ``flax.linen.Sequential`` and its variables
(:func:`from_flax`, with the layout changes: ``(in, out)`` Dense kernels, HWIO convolutions, NHWC
images) and its audit (:func:`compare_flax`, run by :func:`refnet.audit.jax.compare_jax_model`).

flax and jax are imported only inside the functions (``import refnet.audit`` imports neither).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from math import prod

import numpy as np

from ..layers import AvgPool2d, Conv2d, Dense, Flatten, GlobalAvgPool2d, MaxPool2d
from ..network import Network
from .jax import compare_jax_model, import_jax
from .names import ACTIVATIONS, resolve
from .reference import DEFAULT_RTOL, check_loss, check_rtol, check_sparsity, parse_shape
from .report import AuditReport

__all__ = ["compare_flax", "flax_flatten", "flax_global_avg_pool", "from_flax"]


def _flax_linen():
    try:
        import flax.linen as nn
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the Flax audit needs flax: pip install flax") from exc
    return nn


def flax_flatten(x):
    """``x.reshape(B, -1)``: use it in a ``flax.linen.Sequential`` so :func:`from_flax` sees a Flatten."""
    return x.reshape((x.shape[0], -1))


def flax_global_avg_pool(x):
    """Mean over H and W of an NHWC batch: use it in a ``flax.linen.Sequential`` for global average pooling."""
    return x.mean(axis=(1, 2))


def _flax_activation(fn):
    """(name, params) of an activation function of :data:`refnet.audit.names.ACTIVATIONS` (one of
    its JAX functions or its flax.linen alias, possibly a ``functools.partial`` with keyword
    parameters), or None for anything else."""
    import_jax()
    table = [(resolve(path), row) for row in ACTIVATIONS.values() for path in row.jax]
    try:
        nn = _flax_linen()
        table += [(getattr(nn, row.flax), row) for row in ACTIVATIONS.values() if row.flax and hasattr(nn, row.flax)]
    except ImportError:  # pragma: no cover
        pass
    base, kw = fn, {}
    if isinstance(fn, functools.partial):
        base, kw = fn.func, dict(fn.keywords)
        if fn.args:
            return None
    for f, row in table:
        if base is f:
            params = {name: float(kw.pop(key, default)) for name, key, default in row.jax_params}
            if kw:
                raise ValueError(f"activation {row.name} with arguments {sorted(kw)} is not supported")
            return row.name, params
    return None


def _flax_pool(fn, nn):
    if not isinstance(fn, functools.partial) or fn.args:
        return None
    base = fn.func
    kind = "avgpool" if base is nn.avg_pool else "maxpool" if base is nn.max_pool else None
    if kind is None:
        return None
    kw = dict(fn.keywords)
    ws = tuple(kw.pop("window_shape", ()))
    st = kw.pop("strides", None)
    pad = kw.pop("padding", "VALID")
    kw.pop("count_include_pad", None)
    if len(ws) != 2 or ws[0] != ws[1] or (st is None or tuple(st) != ws) or pad != "VALID" or kw:
        raise ValueError(f"{kind}: only square windows with strides = window_shape and padding 'VALID' are supported, "
                         f"got window_shape={ws}, strides={st}, padding={pad!r}, other {sorted(kw)}")
    return kind, ws[0]


@dataclass
class _FlaxLayout:
    net: Network
    sources: list
    converters: list  # per refnet layer: None or (layer_key, {"W": fn, "b": fn}) mapping flax arrays to refnet
    image_input: bool


def _flax_convert(model, variables, in_shape) -> _FlaxLayout:
    nn = _flax_linen()
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"model must be a flax.linen.Sequential, got {type(model).__name__}")
    if not isinstance(variables, dict) and not hasattr(variables, "keys"):
        raise TypeError(f"variables must be the dict from model.init, got {type(variables).__name__}")
    P = variables["params"] if "params" in variables else variables
    shape = parse_shape(in_shape, "in_shape")  # flax layout: (n,) or (H, W, C)
    image = len(shape) == 3
    cur = (shape[2], shape[0], shape[1]) if image else shape  # refnet layout of the current tensor
    ref_in = cur
    nhwc = image  # the current tensor is an image in NHWC layout
    perm = None  # column permutation for a Dense after flattening an NHWC image
    specs = []
    for j, m in enumerate(model.layers):
        where = f"layers[{j}] ({m!r})" if not callable(m) or isinstance(m, nn.Module) else f"layers[{j}] ({getattr(m, '__name__', repr(m))})"
        if isinstance(m, nn.Dense):
            if len(cur) != 1:
                raise ValueError(f"{where}: Dense on an image of shape {cur} acts on the channels only; flatten first "
                                 "(refnet.audit.flax_flatten)")
            key = f"layers_{j}"
            if key not in P:
                raise ValueError(f"variables['params'] has no {key!r} for {where}")
            n_in, n_out = cur[0], int(m.features)
            pm = perm

            def wconv(k, pm=pm):
                k = np.asarray(k)
                return (k[pm, :] if pm is not None else k).T

            conv_ = {"W": wconv, "b": lambda b: np.asarray(b)}
            specs.append({"layer": ("dense", {"n_in": n_in, "n_out": n_out, "bias": bool(m.use_bias)}), "act": None,
                          "conv": (key, conv_), "src": f"flax layers[{j}] Dense({n_out})"})
            cur, perm = (n_out,), None
        elif isinstance(m, nn.Conv):
            if len(cur) != 3:
                raise ValueError(f"{where}: Conv needs an NHWC image input")
            if (m.feature_group_count or 1) != 1:
                raise ValueError(f"{where}: feature_group_count must be 1")
            for a in ("kernel_dilation", "input_dilation"):
                v = getattr(m, a, None)
                if v not in (None, 1) and tuple(np.atleast_1d(v)) not in ((1,), (1, 1)):
                    raise ValueError(f"{where}: {a}={v} is not supported (only 1)")
            k = tuple(int(v) for v in m.kernel_size)
            if len(k) != 2:
                raise ValueError(f"{where}: only 2-D kernels are supported, got kernel_size {m.kernel_size}")
            st = m.strides if m.strides is not None else 1
            st = (int(st), int(st)) if isinstance(st, int) else tuple(int(v) for v in st)
            C, H, W = cur
            pad, mode = _flax_padding(m.padding, k, st, (H, W), where)
            key = f"layers_{j}"
            if key not in P:
                raise ValueError(f"variables['params'] has no {key!r} for {where}")
            conv_ = {"W": lambda kk: np.asarray(kk).transpose(3, 2, 0, 1), "b": lambda b: np.asarray(b)}
            layer = ("conv", {"c_in": C, "c_out": int(m.features), "kernel_size": k, "stride": st, "padding": pad,
                              "padding_mode": mode, "bias": bool(m.use_bias)})
            specs.append({"layer": layer, "act": None, "conv": (key, conv_), "src": f"flax layers[{j}] Conv({m.features}, {k})"})
            cur = Conv2d(**layer[1]).out_shape(cur)
        elif m is flax_flatten:
            if len(cur) == 3 and nhwc:
                C, H, W = cur
                perm = np.arange(H * W * C).reshape(H, W, C).transpose(2, 0, 1).ravel()
            specs.append({"layer": ("flatten", {}), "act": None, "conv": None, "src": f"flax layers[{j}] flax_flatten"})
            cur = (prod(cur),)
        elif m is flax_global_avg_pool:
            specs.append({"layer": ("gap", {}), "act": None, "conv": None, "src": f"flax layers[{j}] flax_global_avg_pool"})
            cur = (cur[0],)
        else:
            pool = _flax_pool(m, nn) if callable(m) else None
            if pool is not None:
                kind, k = pool
                specs.append({"layer": (kind, {"kernel_size": k}), "act": None, "conv": None, "src": f"flax layers[{j}] {kind}({k})"})
                lay = AvgPool2d(k) if kind == "avgpool" else MaxPool2d(k)
                cur = lay.out_shape(cur)
                continue
            act = _flax_activation(m) if callable(m) else None
            if act is None:
                raise ValueError(
                    f"unsupported Flax layer {where}: supported are nn.Dense, nn.Conv (groups 1, no dilation, padding "
                    "'VALID'/'SAME'/'CIRCULAR'/ints where symmetric), activation functions (jax.nn.tanh, relu, "
                    "leaky_relu, selu, elu, sigmoid, hard_tanh, softplus, jax.scipy.special.erf; functools.partial for "
                    "parameters), functools.partial(nn.avg_pool / nn.max_pool, window_shape=(k, k), strides=(k, k)), "
                    "refnet.audit.flax_flatten and refnet.audit.flax_global_avg_pool"
                )
            if act[0] == "identity":
                continue
            prev = specs[-1] if specs else None
            if prev is None or prev["layer"][0] not in ("dense", "conv") or prev["act"] is not None:
                raise ValueError(f"{where}: an activation must come right after a Dense or Conv (and only one); refnet "
                                 "fuses each activation into the affine layer before it")
            prev["act"] = act
            prev["src"] += f" + layers[{j}] {act[0]}"
    layers, params, convs, sources = [], [], [], []
    for s in specs:
        kind, kw = s["layer"]
        act = None if s["act"] is None else {"name": s["act"][0], **s["act"][1]}
        if kind == "dense":
            layers.append(Dense(activation=act or "identity", **kw))
        elif kind == "conv":
            layers.append(Conv2d(activation=act or "identity", **kw))
        elif kind == "avgpool":
            layers.append(AvgPool2d(**kw))
        elif kind == "maxpool":
            layers.append(MaxPool2d(**kw))
        elif kind == "gap":
            layers.append(GlobalAvgPool2d())
        else:
            layers.append(Flatten())
        convs.append(s["conv"])
        sources.append(s["src"])
        if s["conv"] is None:
            params.append({})
        else:
            key, fns = s["conv"]
            d = P[key]
            p = {"W": np.asarray(fns["W"](np.asarray(d["kernel"], dtype=np.float64)), dtype=np.float64)}
            if kw.get("bias"):
                p["b"] = np.asarray(d["bias"], dtype=np.float64)
            params.append(p)
    net = Network(layers, in_shape=ref_in, params=[{k: np.ascontiguousarray(v) for k, v in p.items()} for p in params])
    return _FlaxLayout(net, sources, convs, image)


def _flax_padding(padding, k, st, hw, where):
    if isinstance(padding, str):
        p = padding.upper()
        if p == "VALID":
            return (0, 0), "zeros"
        if p in ("SAME", "CIRCULAR"):
            pads = []
            for d in range(2):
                out = -(-hw[d] // st[d])
                total = max((out - 1) * st[d] + k[d] - hw[d], 0)
                lo = total // 2
                if total - lo != lo:
                    raise ValueError(f"{where}: padding {padding!r} pads asymmetrically ({lo}, {total - lo}) here, which "
                                     "refnet's Conv2d cannot represent")
                pads.append(lo)
            return tuple(pads), ("circular" if p == "CIRCULAR" else "zeros")
        raise ValueError(f"{where}: padding {padding!r} is not supported (VALID, SAME, CIRCULAR or symmetric ints)")
    if isinstance(padding, int):
        return (padding, padding), "zeros"
    pads = []
    for v in padding:
        if isinstance(v, int):
            pads.append(v)
        else:
            lo, hi = v
            if lo != hi:
                raise ValueError(f"{where}: asymmetric padding {padding!r} is not supported")
            pads.append(int(lo))
    if len(pads) == 1:
        pads = pads * 2
    return tuple(pads), "zeros"


def from_flax(model, variables, in_shape) -> Network:
    """A float64 refnet Network from a ``flax.linen.Sequential`` and its variables.

    Layout changes: ``nn.Dense`` kernels are ``(in, out)`` (transposed to ``(out, in)``); ``nn.Conv``
    kernels are HWIO (transposed to OIHW); Flax images are NHWC, so ``in_shape`` is given in
    Flax's layout (``(H, W, C)`` or ``(n,)``) and the refnet network takes ``(C, H, W)``; a Dense
    after :func:`flax_flatten` of an NHWC image has its input columns permuted from (h, w, c) to
    refnet's (c, h, w) order. Supported layers: see :func:`compare_flax`.
    """
    return _flax_convert(model, variables, in_shape).net


def compare_flax(model, variables, x, y, loss="cross_entropy", *, sparsity=0.9, rtol=DEFAULT_RTOL, rtol_as_run=None,
                 dtype_as_run=None, jacobian: bool = True, jit: bool = True) -> AuditReport:
    """Audit a ``flax.linen.Sequential`` against refnet (needs flax).

    ``model.layers`` may hold ``nn.Dense``, ``nn.Conv`` (feature_group_count 1, no dilation,
    padding "VALID", "SAME"/"CIRCULAR" where symmetric, or symmetric ints), activation functions
    (``jax.nn.tanh``/``jnp.tanh``, ``relu``, ``leaky_relu``, ``selu``, ``elu``, ``sigmoid``,
    ``hard_tanh``, ``softplus``, ``jax.scipy.special.erf``; ``functools.partial`` for their
    parameters) right after a Dense/Conv, ``functools.partial(nn.avg_pool | nn.max_pool,
    window_shape=(k, k), strides=(k, k))``, :func:`flax_flatten` and :func:`flax_global_avg_pool`.
    ``x`` is in the model's layout (NHWC for images); gradients are with respect to
    ``variables["params"]`` and are mapped to refnet layouts like the weights (:func:`from_flax`),
    the Jacobians' input axis to NCHW order.
    """
    jax, jnp = import_jax()
    loss_name = check_loss(loss)
    sparsity = check_sparsity(sparsity)
    rtol = check_rtol(rtol)
    x_fw = np.asarray(x)
    if x_fw.ndim not in (2, 4):
        raise ValueError(f"x must be (B, n) or NHWC (B, H, W, C), got shape {x_fw.shape}")
    lay = _flax_convert(model, variables, x_fw.shape[1:])
    net = lay.net
    x_ref = x_fw.transpose(0, 3, 1, 2) if lay.image_input else x_fw

    def extract(tree):
        P = tree["params"] if "params" in tree else tree
        out = []
        for i, c in enumerate(lay.converters):
            if c is None:
                out.append({})
                continue
            key, fns = c
            d = {"W": np.ascontiguousarray(fns["W"](P[key]["kernel"]))}
            if "b" in net.params[i]:
                d["b"] = np.asarray(P[key]["bias"])
            out.append(d)
        return out

    def grad_params(tree):
        rest = {k: v for k, v in tree.items() if k != "params"}
        return tree["params"], (lambda q: {**rest, "params": q})

    def jac_to_ref(J):
        if not lay.image_input:
            return J
        B, n_out = J.shape[:2]
        H, W, C = x_fw.shape[1:]
        return J.reshape(B, n_out, H, W, C).transpose(0, 1, 4, 2, 3).reshape(B, n_out, -1)

    def apply_fn(v, xb):
        return model.apply(v, xb)

    return compare_jax_model("flax", net, apply_fn, variables, x_fw, x_ref, y, loss_name, sparsity=sparsity,
                             rtol=rtol, rtol_as_run=None if rtol_as_run is None else check_rtol(rtol_as_run, "rtol_as_run"),
                             dtype_as_run=dtype_as_run, jacobian=jacobian, jit=jit, extract=extract,
                             jac_to_ref=jac_to_ref, grad_params=grad_params, sources=lay.sources,
                             reference_label="from_flax(model, variables)")
