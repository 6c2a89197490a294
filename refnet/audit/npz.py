"""The framework-neutral audit file: :func:`write_npz` writes it, :func:`compare_npz` reads and
compares it (any framework that can save NumPy arrays; keys and layouts in docs/audit.md)."""

from __future__ import annotations

import contextlib
import json
import os
import re
from math import prod

import numpy as np

from .. import kernels
from .._io import atomic_savez, json_entry, read_npz
from ..network import Network
from .reference import (
    AS_RUN_RTOL,
    DEFAULT_RTOL,
    Run,
    check_loss,
    check_rtol,
    check_sparsity,
    check_xy,
    compare_run,
    compute_reference,
    layer_desc,
    new_report,
    parse_shape,
    section_tol,
    spec_layers,
)
from .report import AuditReport

__all__ = ["compare_npz", "write_npz"]


_NPZ_RE = re.compile(r"^(param|param_mask|grad|cs_scores|mask)/(\d+)/(W|b)$|^act/(\d+)$")
_NPZ_PLAIN = {"arch", "x", "y", "logits", "loss", "loss_fn", "sparsity", "jacobian"}


def _npz_arch(data: dict, path: str):
    key = "arch"
    if key not in data:
        raise ValueError(f"{path}: missing key 'arch' (the architecture as a JSON string)")
    cfg = json_entry(data[key], path, key)
    if "layers" in cfg:
        if "in_shape" not in cfg:
            raise ValueError(f"{path}: {key!r} has 'layers' but no 'in_shape'")
        layers, _ = spec_layers(cfg["layers"])
        return layers, parse_shape(cfg["in_shape"], f"{key}.in_shape")
    if "arch" in cfg:
        from ..arch import build

        for k in ("in_shape", "n_classes"):
            if k not in cfg:
                raise ValueError(f"{path}: {key!r} with an 'arch' spec needs {k!r}")
        net = build(cfg["arch"], parse_shape(cfg["in_shape"], "in_shape"), int(cfg["n_classes"]), seed=0)
        return list(net.layers), net.in_shape
    raise ValueError(f"{path}: {key!r} must hold 'layers' + 'in_shape' (Network.to_config()) or 'arch' + 'in_shape' + 'n_classes'")


def _npz_float(a, name, path, shape=None):
    a = np.asarray(a)
    if a.dtype.kind != "f":
        raise ValueError(f"{path}: {name!r} must be a float array, got dtype {a.dtype}")
    if shape is not None and a.shape != tuple(shape):
        raise ValueError(f"{path}: {name!r} must have shape {tuple(shape)}, got {a.shape}")
    return a


def compare_npz(path, *, rtol=DEFAULT_RTOL, rtol_as_run=None, sparsity=None, jacobian=None) -> AuditReport:
    """Compare another framework's outputs stored in an ``.npz`` with refnet (docs/audit.md).

    Keys (``i`` = refnet layer index, as in ``Network.to_config()["layers"]``):

    * ``arch`` (required): a JSON string, ``Network.to_config()`` (or ``{"in_shape", "layers"}``
      with :meth:`Layer.to_dict` entries) or ``{"arch": "mlp-7-tanh", "in_shape": [784], "n_classes": 10}``;
    * ``param/{i}/W``, ``param/{i}/b`` (required, every parameter; refnet/PyTorch layouts);
      ``param_mask/{i}/W`` (optional pruning masks, 0/1);
    * ``x`` ``(B, *in_shape)`` and ``y`` ``(B,)`` int or ``(B, C)`` (required);
    * optional settings: ``loss_fn`` (str, default "cross_entropy"), ``sparsity`` (default 0.9);
    * the other framework's outputs, each optional, each compared when present: ``logits``
      ``(B, C)``, ``loss`` (scalar), ``grad/{i}/W``, ``grad/{i}/b``, ``jacobian`` ``(B, n_out, n_in)``
      (then also its singular values), ``cs_scores/{i}/W``, ``mask/{i}/W`` (SNIP masks at
      ``sparsity``), ``act/{i}`` (output of layer i).

    Loaded with ``allow_pickle=False``; every key, shape and dtype is validated (ValueError naming
    the key) before anything is computed. Each output is held to the tolerance of its stored dtype:
    float64 -> ``rtol``, float32 -> ``rtol_as_run`` or :data:`AS_RUN_RTOL`.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__} {path!r:.60}")
    path = os.fspath(path)
    rtol = check_rtol(rtol)
    # a damaged or wrong file (empty, truncated, flipped byte, .npy, pickles) names the path
    data = read_npz(path, "audit npz file")
    with _about(path):
        return _compare_npz_data(data, path, rtol, rtol_as_run, sparsity, jacobian)


@contextlib.contextmanager
def _about(path: str):
    """Every error of the block becomes a ``ValueError`` that names the file ``path`` (what is
    wrong is in the file, not in the call)."""
    try:
        yield
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError) as exc:
        msg = str(exc)
        if msg.startswith(path):
            raise
        raise ValueError(f"{path}: {msg}") from None


def _compare_npz_data(data: dict, path: str, rtol, rtol_as_run, sparsity, jacobian) -> AuditReport:
    """The body of :func:`compare_npz` once the arrays are read."""
    unknown = sorted(k for k in data if k not in _NPZ_PLAIN and not _NPZ_RE.match(k))
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; allowed: {sorted(_NPZ_PLAIN)} and param/{{i}}/W|b, "
                         "param_mask/{i}/W|b, grad/{i}/W|b, cs_scores/{i}/W, mask/{i}/W, act/{i}")
    layers, in_shape = _npz_arch(data, path)
    try:
        shapes = [tuple(in_shape)]
        for layer in layers:
            shapes.append(tuple(layer.out_shape(shapes[-1])))
    except ValueError as exc:
        raise ValueError(f"{path}: the architecture does not fit in_shape {in_shape}: {exc}") from None
    pshapes = [l.param_shapes(shapes[i]) for i, l in enumerate(layers)]
    params, pmasks, missing = [], [], []
    for i, ps in enumerate(pshapes):
        p, m = {}, {}
        for k, shp in ps.items():
            key = f"param/{i}/{k}"
            if key not in data:
                missing.append(key)
                continue
            p[k] = np.asarray(_npz_float(data[key], key, path, shp), dtype=np.float64)
            mk = f"param_mask/{i}/{k}"
            if mk in data:
                a = np.asarray(data[mk])
                if a.shape != shp or not np.all((a == 0) | (a == 1)):
                    raise ValueError(f"{path}: {mk!r} must be 0/1 of shape {shp}, got shape {a.shape}")
                m[k] = a.astype(bool)
        params.append(p)
        pmasks.append(m)
    for name in ("x", "y"):
        if name not in data:
            missing.append(name)
    if missing:
        raise ValueError(f"{path}: missing required keys {missing}")
    for key in data:
        mt = _NPZ_RE.match(key)
        if mt and mt.group(1):
            i, k = int(mt.group(2)), mt.group(3)
            if i >= len(layers) or k not in pshapes[i]:
                raise ValueError(f"{path}: key {key!r} names no parameter (layer {i} has {sorted(pshapes[i]) if i < len(layers) else 'no such layer'})")
            if mt.group(1) in ("cs_scores", "mask") and k != "W":
                raise ValueError(f"{path}: key {key!r}: scores and masks are for weights (W) only")
        elif mt and mt.group(4) is not None and int(mt.group(4)) >= len(layers):
            raise ValueError(f"{path}: key {key!r} names no layer ({len(layers)} layers)")
    net = Network(layers, in_shape=in_shape, params=params, masks=pmasks)
    x = np.asarray(data["x"])
    if x.shape[1:] != tuple(in_shape) or x.ndim < 2:
        raise ValueError(f"{path}: 'x' must have shape (B, {', '.join(map(str, in_shape))}), got {x.shape}")
    loss_name = check_loss(str(data["loss_fn"])) if "loss_fn" in data else "cross_entropy"
    if sparsity is None:
        sparsity = float(data["sparsity"]) if "sparsity" in data else 0.9
    sparsity = check_sparsity(sparsity)
    x, y = check_xy(net, x, data["y"], loss_name)
    B = x.shape[0]
    C = net.out_shape[0]
    n_in = prod(in_shape)
    run = Run("npz")
    tols = {}

    def tol_of(name, a):
        dt = np.dtype(a.dtype).name
        tols[name] = section_tol(dt, rtol, rtol_as_run) if dt in AS_RUN_RTOL else section_tol("float32", rtol, rtol_as_run)

    if "logits" in data:
        run.logits = _npz_float(data["logits"], "logits", path, (B, C))
        tol_of("logits", run.logits)
    if "loss" in data:
        a = _npz_float(data["loss"], "loss", path)
        if a.size != 1:
            raise ValueError(f"{path}: 'loss' must be a scalar, got shape {a.shape}")
        run.loss = float(a.reshape(()))
        tol_of("loss", a)
    if any(k.startswith("grad/") for k in data):
        run.grads = []
        for i, ps in enumerate(pshapes):
            g = {}
            for k, shp in ps.items():
                key = f"grad/{i}/{k}"
                if key in data:
                    g[k] = _npz_float(data[key], key, path, shp)
                    tol_of(key, g[k])
            run.grads.append(g)
    if "jacobian" in data:
        n_out = prod(shapes[-1])
        J = _npz_float(data["jacobian"], "jacobian", path, (B, n_out, n_in))
        run.jac = J
        tol_of("jacobian", J)
        run.sv = kernels.batched_svdvals(np.asarray(J, dtype=np.float64))
    if any(k.startswith("cs_scores/") for k in data):
        run.scores = []
        for i, ps in enumerate(pshapes):
            key = f"cs_scores/{i}/W"
            if key in data:
                run.scores.append({"W": _npz_float(data[key], key, path, ps["W"])})
                tol_of(key, run.scores[-1]["W"])
            else:
                run.scores.append({})
        if any("W" in ps and not s for ps, s in zip(pshapes, run.scores)):
            raise ValueError(f"{path}: cs_scores must be given for every layer with weights (global top-k), missing "
                             f"{[f'cs_scores/{i}/W' for i, (ps, s) in enumerate(zip(pshapes, run.scores)) if 'W' in ps and not s]}")
    if any(k.startswith("mask/") for k in data):
        run.snip_masks = []
        for i, ps in enumerate(pshapes):
            key = f"mask/{i}/W"
            if key in data:
                a = np.asarray(data[key])
                if a.shape != ps["W"] or not np.all((a == 0) | (a == 1)):
                    raise ValueError(f"{path}: {key!r} must be 0/1 of shape {ps['W']}, got shape {a.shape}")
                run.snip_masks.append({"W": a.astype(bool)})
            else:
                run.snip_masks.append({})
    if any(k.startswith("act/") for k in data):
        run.acts = []
        for i in range(len(layers)):
            key = f"act/{i}"
            if key in data:
                run.acts.append(_npz_float(data[key], key, path, (B, *shapes[i + 1])))
                tol_of(f"act/{i}", run.acts[-1])
            else:
                run.acts.append(None)
    run.tols = tols
    want_jac = run.jac is not None if jacobian is None else bool(jacobian) and run.jac is not None
    ref = compute_reference(net, x, y, loss_name, sparsity, want_jac)
    meta = {"file": os.path.abspath(path), "sparsity": sparsity, "rtol_float64": rtol,
            "rtol_float32": section_tol("float32", rtol, rtol_as_run),
            "outputs_present": sorted(k for k in data if k not in ("arch", "x", "y", "loss_fn", "sparsity")
                                      and not k.startswith("param"))}
    report = new_report("npz", ref, meta)
    report.notes.append("npz: each output is held to the tolerance of its stored dtype (float64: rtol; float32: the as-run tolerance).")
    compare_run(ref, run, "npz", rtol, sparsity, [f"layers[{i}] {layer_desc(l)}" for i, l in enumerate(layers)], report)
    if not report.checks:
        report.notes.append("the file holds no outputs to compare (logits, loss, grad/..., jacobian, cs_scores/..., mask/..., act/...)")
    return report


def write_npz(path, net: Network, x, y, *, loss_fn: str = "cross_entropy", sparsity: float | None = None,
              logits=None, loss=None, grads=None, jacobian=None, cs_scores=None, masks=None, acts=None) -> None:
    """Write an audit ``.npz`` (the format :func:`compare_npz` reads), atomically.

    ``net`` gives the architecture (``arch`` = ``net.to_config()`` as JSON), the parameters and
    any pruning masks; ``x``, ``y`` the inputs; the keyword arguments the other framework's
    outputs (``grads``/``cs_scores``/``masks`` as per-layer lists of dicts, ``acts`` a per-layer
    list). Arrays keep their dtype.
    """
    if not isinstance(net, Network):
        raise TypeError(f"net must be a refnet Network, got {type(net).__name__}")
    arrays = {"arch": np.array(json.dumps(net.to_config())), "x": np.asarray(x), "y": np.asarray(y),
              "loss_fn": np.array(check_loss(loss_fn))}
    if sparsity is not None:
        arrays["sparsity"] = np.array(check_sparsity(sparsity))
    for i, (p, m) in enumerate(zip(net.params, net.masks)):
        for k in p:
            arrays[f"param/{i}/{k}"] = p[k]
            if not m[k].all():
                arrays[f"param_mask/{i}/{k}"] = m[k]
    if logits is not None:
        arrays["logits"] = np.asarray(logits)
    if loss is not None:
        arrays["loss"] = np.asarray(loss)
    if jacobian is not None:
        arrays["jacobian"] = np.asarray(jacobian)
    for name, lst in (("grad", grads), ("cs_scores", cs_scores), ("mask", masks)):
        if lst is None:
            continue
        for i, d in enumerate(lst):
            for k, v in (d or {}).items():
                if name != "grad" and k != "W":
                    continue
                arrays[f"{name}/{i}/{k}"] = np.asarray(v)
    if acts is not None:
        for i, a in enumerate(acts):
            if a is not None:
                arrays[f"act/{i}"] = np.asarray(a)
    atomic_savez(path, arrays)
