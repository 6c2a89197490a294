"""refnet's float64 reference of an audit, computed once, and its comparison with a framework run.

:func:`compute_reference` runs refnet on the audited network (:class:`Reference`: logits, loss,
gradients, layer outputs, Jacobians and their singular values, SNIP scores and global top-k
masks); each framework module turns the other framework's run into a :class:`Run` in refnet
layouts (float64 NumPy) and :func:`compare_run` appends one :class:`~refnet.audit.report.Check`
per tensor to the report. The argument checks shared by the converters (loss, sparsity,
tolerances, inputs, shapes, layer specs) live here too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .. import kernels
from ..jacobians import jacobian
from ..layers import AvgPool2d, Conv2d, Dense, Layer, MaxPool2d, layer_from_dict
from ..network import Network
from ..pruning import connection_sensitivity, keep_count, kth_largest, prune
from .report import AuditReport, Check, format_value, join_notes, scalar_check, tensor_check

__all__ = [
    "AS_RUN_RTOL",
    "DEFAULT_RTOL",
    "LOSSES",
    "Reference",
    "Run",
    "add_activation_checks",
    "check_loss",
    "check_rtol",
    "check_sparsity",
    "check_xy",
    "compare_run",
    "compute_reference",
    "layer_desc",
    "match_reference",
    "new_report",
    "parse_shape",
    "section_tol",
    "spec_layers",
    "topk_masks",
]

#: default relative tolerance of the float64 comparison
DEFAULT_RTOL = 1e-10

#: default relative tolerance of the as-run comparison, by the dtype the model runs in. float32:
#: unit roundoff u = 2**-24 = 6.0e-8; a depth-K net of fan-in n accumulates roughly
#: 2 K sqrt(n) u in its forward plus backward pass (2.3e-5 for the 784-100x6-10 MLP), so 1e-4
#: leaves a factor ~4 above that estimate and ~50 above what is measured on well-conditioned nets
#: (docs/audit.md). The half-precision values are loose sanity bounds, not derived.
AS_RUN_RTOL = {"float64": DEFAULT_RTOL, "float32": 1e-4, "float16": 5e-2, "bfloat16": 2e-1}

#: the losses an audit computes in every framework (mean over the batch)
LOSSES = ("cross_entropy", "mse")


# --------------------------------------------------------------------------------------------
# tolerances and argument checks (shared by the converters)
# --------------------------------------------------------------------------------------------


def section_tol(dtype_name: str, rtol: float, rtol_as_run) -> float:
    """The tolerance of a section run in ``dtype_name``: ``rtol_as_run`` when given, ``rtol`` for
    float64, else :data:`AS_RUN_RTOL` of the dtype."""
    if rtol_as_run is not None:
        return float(rtol_as_run)
    if dtype_name == "float64":
        return float(rtol)
    if dtype_name not in AS_RUN_RTOL:
        raise ValueError(f"no default as-run tolerance for dtype {dtype_name}; pass rtol_as_run")
    return AS_RUN_RTOL[dtype_name]


def check_loss(loss) -> str:
    """The canonical name (one of :data:`LOSSES`) of a loss given by name or alias."""
    if callable(loss) or not isinstance(loss, str):
        raise ValueError(f"loss must be one of {list(LOSSES)} (a framework audit needs a named loss), got {loss!r}")
    key = loss.lower().replace("-", "_")
    key = {"ce": "cross_entropy", "xent": "cross_entropy", "mean_squared_error": "mse"}.get(key, key)
    if key not in LOSSES:
        raise ValueError(f"loss must be one of {list(LOSSES)}, got {loss!r}")
    return key


def check_sparsity(sparsity) -> float:
    """``sparsity`` as a float in [0, 1)."""
    try:
        s = float(sparsity)
    except (TypeError, ValueError):
        raise TypeError(f"sparsity must be a number in [0, 1), got {sparsity!r}") from None
    if not 0.0 <= s < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {s}")
    return s


def check_rtol(rtol, name="rtol") -> float:
    """``rtol`` as a positive finite float (errors name the argument ``name``)."""
    try:
        r = float(rtol)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a positive number, got {rtol!r}") from None
    if not (r > 0 and math.isfinite(r)):
        raise ValueError(f"{name} must be a positive finite number, got {rtol!r}")
    return r


def check_xy(net: Network, x, y, loss_name: str):
    """``(x, y)`` checked against ``net``: x ``(B, *in_shape)`` with B >= 1, y ``(B,)`` int64 labels in
    ``[0, C)`` or ``(B, C)`` float64 targets, for a net with ``(B, C)`` logits."""
    x = net.check_input(x, "x")
    if x.shape[0] == 0:
        raise ValueError(f"x must hold at least one example of shape {net.in_shape}, got shape {x.shape}")
    y = np.asarray(y)
    if y.ndim == 0 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y must have one row per example of x ({x.shape[0]}), got shape {y.shape}")
    if len(net.out_shape) != 1:
        raise ValueError(f"the network must output (B, C) logits for a loss, got per-example shape {net.out_shape}")
    C = net.out_shape[0]
    if y.ndim == 1:
        if y.dtype.kind not in "iu":
            raise ValueError(f"y must hold integer class labels (B,) or targets (B, {C}), got dtype {y.dtype}")
        if y.min() < 0 or y.max() >= C:
            raise ValueError(f"y labels must lie in [0, {C}), got range [{y.min()}, {y.max()}]")
        y = y.astype(np.int64)
    elif y.shape != (x.shape[0], C):
        raise ValueError(f"y must be (B,) labels or (B, C) = {(x.shape[0], C)} targets, got shape {y.shape}")
    else:
        y = np.asarray(y, dtype=np.float64)
    return x, y


def parse_shape(shape, name: str) -> tuple:
    """A per-example shape from an int, a sequence or a string (``"1,28,28"``, ``"1x28x28"``)."""
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
        shape = (int(shape),)
    if isinstance(shape, str):
        shape = tuple(int(s) for s in shape.replace("x", ",").split(",") if s.strip())
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a tuple of positive ints such as (1, 28, 28), got {shape!r}") from None
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"{name} must be a tuple of positive ints such as (1, 28, 28), got {shape!r}")
    return shape


def spec_layers(spec, params=None, in_shape=None):
    """(layers, in_shape or None) from a layer spec: a Network, a list of Layers or dicts, a
    ``to_config()``-style dict, or an arch string (needs in_shape; n_classes from the params)."""
    if isinstance(spec, Network):
        return list(spec.layers), spec.in_shape
    if isinstance(spec, str):
        from ..arch import build

        if in_shape is None:
            raise ValueError(f"an arch spec string ({spec!r}) needs in_shape")
        if not params:
            raise ValueError("an arch spec string needs the params to read n_classes from")
        last = [p for p in params if p][-1]
        n_classes = int(np.shape(last["W"])[0])
        net = build(spec, parse_shape(in_shape, "in_shape"), n_classes, seed=0)
        return list(net.layers), net.in_shape
    sh = None
    if isinstance(spec, dict):
        if "layers" not in spec:
            raise ValueError(f"a spec dict must have 'layers' (and 'in_shape'), got keys {sorted(spec)}")
        sh = spec.get("in_shape")
        spec = spec["layers"]
    if not isinstance(spec, (list, tuple)) or not spec:
        raise TypeError(f"spec must be a non-empty list of refnet layers or layer dicts, got {type(spec).__name__}")
    layers = []
    for i, l in enumerate(spec):
        if isinstance(l, Layer):
            layers.append(l)
        elif isinstance(l, dict):
            try:
                layers.append(layer_from_dict(l))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"spec[{i}]: {exc}") from None
        else:
            raise TypeError(f"spec[{i}] must be a refnet Layer or a layer dict, got {type(l).__name__}")
    return layers, (tuple(sh) if sh is not None else None)


# --------------------------------------------------------------------------------------------
# the float64 reference, computed once
# --------------------------------------------------------------------------------------------


@dataclass
class Reference:
    """refnet's float64 results on one batch (:func:`compute_reference`), everything a run is
    compared with: per-layer lists follow ``net.layers``."""

    net: Network
    x: np.ndarray
    y: np.ndarray
    loss_name: str
    logits: np.ndarray
    loss: float
    grads: list
    acts: list
    jac: np.ndarray | None
    scores: list
    masks: list
    sv: np.ndarray | None
    stats: dict | None
    k_keep: int
    threshold: float


def _weight_scores(net: Network, scores) -> tuple[np.ndarray, np.ndarray]:
    """All weight scores flattened in layer order (float64) and whether the network's mask keeps
    each weight: what the global top-k ranks."""
    have = ["W" in p for p in net.params]
    flat = np.concatenate([np.asarray(scores[i]["W"], np.float64).ravel() for i, h in enumerate(have) if h])
    alive = np.concatenate([net.masks[i]["W"].ravel() for i, h in enumerate(have) if h])
    return flat, alive


def topk_masks(net: Network, scores, sparsity: float) -> list:
    """Global top-k over all weights by :func:`refnet.pruning.prune` (k = round(m (1 - sparsity)),
    pruned entries stay pruned, ties to the lower flat index)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        masks = prune(net, scores, sparsity, warn=False)
    return [{"W": m["W"]} if "W" in m else {} for m in masks]


def _threshold(net: Network, scores, sparsity: float) -> tuple[int, float]:
    """``k = keep_count(m, sparsity)`` and the threshold score ``s_(min(k, n))``, the k-th largest
    score among the ``n`` weights the network's mask keeps (:func:`refnet.pruning.kth_largest`);
    ``inf`` when ``k = 0`` or nothing is alive."""
    flat, alive = _weight_scores(net, scores)
    k = keep_count(flat.size, sparsity)
    n = int(np.count_nonzero(alive))
    if k <= 0 or n == 0:
        return k, math.inf
    return k, kth_largest(flat, min(k, n), alive)


def _threshold_gap(net: Network, scores, sparsity: float) -> float:
    """Relative gap ``(s_(k) - s_(k+1)) / s_(k)`` between the last kept and the first dropped
    score (``s_(j)`` the j-th largest alive score): score errors below it cannot change the mask;
    ``inf`` when nothing is dropped or ``s_(k) <= 0``."""
    flat, alive = _weight_scores(net, scores)
    k = keep_count(flat.size, sparsity)
    if k <= 0 or k >= int(np.count_nonzero(alive)):
        return math.inf
    s_k = kth_largest(flat, k, alive)
    if s_k <= 0:
        return math.inf
    return float((s_k - kth_largest(flat, k + 1, alive)) / s_k)


def _stats(sv: np.ndarray) -> dict:
    """mean, std (ddof 0), min, max and cn = max / min over all singular values pooled (raw
    LAPACK values, no zero threshold)."""
    sv = np.asarray(sv, dtype=np.float64)
    vmin, vmax = float(sv.min()), float(sv.max())
    return {
        "mean": float(sv.mean()),
        "std": float(sv.std()),
        "min": vmin,
        "max": vmax,
        "cn": vmax / vmin if vmin > 0 else math.inf,
    }


def compute_reference(net: Network, x, y, loss_name: str, sparsity: float, want_jac: bool) -> Reference:
    """Run refnet once: logits, loss, gradients, layer outputs, SNIP scores ``|dL/dW * W|`` and the
    global top-k masks at ``sparsity`` (with ``k`` and the threshold score), and with ``want_jac``
    the Jacobians ``(B, n_out, n_in)``, their singular values and statistics."""
    from ..losses import get_loss

    out, trace = net.forward(x, return_trace=True)
    value, eps = get_loss(loss_name)(out, y)
    grads = net.backward(trace, eps)
    if net.is_chain:
        acts = [c["x"] for c in trace.caches[1:]] + [out]
    else:  # a graph: a shortcut's output may be read only by an Add, so take every node's value
        from .graph import node_outputs

        acts = node_outputs(net, x)[1:]
    cs = connection_sensitivity(net, x, y, loss_name, normalize=False)
    scores = [{"W": d["W"]} if "W" in d else {} for d in cs]
    masks = topk_masks(net, scores, sparsity)
    k, t = _threshold(net, scores, sparsity)
    jac = sv = stats = None
    if want_jac:
        jac = jacobian(net, x)  # (B, n_out, n_in)
        sv = kernels.batched_svdvals(jac)  # (B, r), descending
        stats = _stats(sv)
    return Reference(net, x, y, loss_name, out, float(value), grads, acts, jac, scores, masks, sv, stats, k, t)


# --------------------------------------------------------------------------------------------
# what a framework run produced (all float64 NumPy, refnet layouts)
# --------------------------------------------------------------------------------------------


@dataclass
class Run:
    """What a framework run produced, in refnet layouts (None: not produced, not compared)."""

    dtype: str
    logits: np.ndarray | None = None
    loss: float | None = None
    grads: list | None = None  # per layer {"W", "b"}
    params: list | None = None  # per layer {"W", "b"} as the framework holds them
    prune_masks: list | None = None  # per layer {"W", "b"} (framework-side pruning masks)
    acts: list | None = None  # per refnet layer output, or None entries
    jac: np.ndarray | None = None  # (B, n_out, n_in)
    scores: list | None = None  # per layer {"W"}
    snip_masks: list | None = None  # per layer {"W"} (given, e.g. from an npz)
    sv: np.ndarray | None = None  # (B, r)
    tols: dict = field(default_factory=dict)  # per-name tolerance overrides (npz: by stored dtype)


def compare_run(ref: Reference, run: Run, section: str, tol: float, sparsity: float, sources: list, report: AuditReport) -> None:
    """Append the checks of one framework run against the reference to ``report``."""
    net = ref.net
    add = report.checks.append

    def t(name):
        return run.tols.get(name, tol)

    def src(i):
        return sources[i] if sources and i < len(sources) else ""

    if run.params is not None:
        for i, p in enumerate(net.params):
            for k in p:
                add(tensor_check(f"param/{i}/{k}", section, run.params[i][k], p[k], t(f"param/{i}/{k}"), src(i)))
    if run.prune_masks is not None:
        for i, m in enumerate(net.masks):
            for k in m:
                got = run.prune_masks[i].get(k) if run.prune_masks[i] else None
                got = np.ones_like(m[k]) if got is None else np.asarray(got, dtype=bool)
                if got.all() and m[k].all():
                    continue
                nd = int(np.count_nonzero(got != m[k])) if got.shape == m[k].shape else m[k].size
                add(Check(f"prune_mask/{i}/{k}", section, float(nd), nd / max(m[k].size, 1), 0.0, nd == 0,
                          m[k].shape, 1.0, src(i), f"{nd} entries of the pruning mask differ", n_diff=nd))
    if run.acts is not None:
        for i, a in enumerate(run.acts):
            if a is not None:
                add(tensor_check(f"act/{i}", section, np.reshape(a, ref.acts[i].shape) if np.size(a) == ref.acts[i].size else a,
                                 ref.acts[i], t(f"act/{i}"), src(i), "output of this layer"))
    if run.logits is not None:
        add(tensor_check("logits", section, run.logits, ref.logits, t("logits")))
    if run.loss is not None:
        add(tensor_check("loss", section, run.loss, ref.loss, t("loss"), note=ref.loss_name))
    if run.grads is not None:
        for i, g in enumerate(ref.grads):
            for k in g:
                got = run.grads[i].get(k) if run.grads[i] else None
                if got is None:
                    continue
                add(tensor_check(f"grad/{i}/{k}", section, got, g[k], t(f"grad/{i}/{k}"), src(i)))
    if run.jac is not None and ref.jac is not None:
        jac = np.asarray(run.jac, dtype=np.float64)
        add(tensor_check("jacobian", section, jac.reshape(ref.jac.shape) if jac.size == ref.jac.size else jac,
                         ref.jac, t("jacobian"), note="d logits / d x per example, NCHW order"))
    # connection sensitivity and masks
    E = None
    if run.scores is not None:
        E = 0.0
        for i, s in enumerate(ref.scores):
            if "W" not in s or not run.scores[i] or "W" not in run.scores[i]:
                continue
            c = tensor_check(f"cs_scores/{i}/W", section, run.scores[i]["W"], s["W"], t(f"cs_scores/{i}/W"), src(i), "|dL/dW * W|")
            add(c)
            E = max(E, c.max_abs_err)
    snip = run.snip_masks
    if snip is None and run.scores is not None:
        if all(np.all(np.isfinite(np.asarray(run.scores[i]["W"], np.float64))) for i, s in enumerate(ref.scores) if "W" in s):
            snip = topk_masks(net, [{"W": np.asarray(run.scores[i]["W"], np.float64)} if "W" in s else {} for i, s in enumerate(ref.scores)], sparsity)
    if snip is not None:
        band = 2.0 * (E or 0.0)
        n_tot = n_unexp = 0
        kept_fw = kept_ref = 0
        for i, m in enumerate(ref.masks):
            if "W" not in m or not snip[i] or "W" not in snip[i]:
                continue
            got = np.asarray(snip[i]["W"])
            if got.shape != m["W"].shape:
                add(Check(f"mask/{i}/W", section, math.inf, math.inf, 0.0, False, m["W"].shape, 1.0, src(i),
                          f"shape {got.shape} differs from {m['W'].shape}"))
                n_unexp += 1
                continue
            got = got.astype(bool)
            diff = got != m["W"]
            nd = int(diff.sum())
            s_ref = np.asarray(ref.scores[i]["W"], np.float64)
            unexplained = int(np.count_nonzero(diff & (np.abs(s_ref - ref.threshold) > band)))
            kept_fw += int(got.sum())
            kept_ref += int(m["W"].sum())
            n_tot += nd
            n_unexp += unexplained
            note = f"{nd} of {m['W'].size} entries differ"
            if nd:
                note += f" ({nd - unexplained} within 2E = {format_value(band)} of the threshold score {format_value(ref.threshold)}: ties broken by rounding)"
            add(Check(f"mask/{i}/W", section, float(nd), nd / m["W"].size, 0.0, unexplained == 0, m["W"].shape, 1.0,
                      src(i), note, n_diff=nd))
        add(Check("mask/total", section, float(n_tot), n_tot / max(sum(m["W"].size for m in ref.masks if "W" in m), 1), 0.0,
                  n_unexp == 0 and kept_fw == kept_ref, (), 1.0, "",
                  f"global top-k at sparsity {sparsity:g}: {n_tot} entries differ ({n_unexp} not explained by rounding); "
                  f"kept {kept_fw} vs reference {kept_ref}", n_diff=n_tot))
    # Jacobian singular values
    if run.sv is not None and ref.sv is not None:
        sv = np.asarray(run.sv, dtype=np.float64)
        tj = t("jacobian")
        add(tensor_check("jsv/singular_values", section, sv, ref.sv, tj, note="per example, descending"))
        if sv.shape == ref.sv.shape:
            st = _stats(sv)
            smax = ref.stats["max"]
            delta = tj * smax  # Weyl: every singular value may move by ||E||_2 <= tol * sigma_max
            for key in ("mean", "std", "min", "max"):
                add(scalar_check(f"jsv/{key}", section, st[key], ref.stats[key], delta,
                                 note="Weyl tolerance tol * sigma_max"))
            lo, hi = ref.stats["min"], ref.stats["max"]
            if lo > delta:
                rel_tol = (hi + delta) / (lo - delta) / (hi / lo) - 1.0
            else:
                rel_tol = math.inf
            c = scalar_check("jsv/cn", section, st["cn"], ref.stats["cn"], rel_tol * abs(ref.stats["cn"]) if math.isfinite(rel_tol) else math.inf,
                             note="cn = max/min; Weyl tolerance")
            if math.isinf(rel_tol) and math.isfinite(ref.stats["cn"]):
                c.passed, c.tol = True, math.inf
                c.note = join_notes(c.note, "sigma_min below tol * sigma_max: not resolvable at this tolerance")
            add(c)


def new_report(framework: str, ref: Reference, meta: dict) -> AuditReport:
    """An empty report whose meta describes the network, the reference and the SNIP threshold."""
    net = ref.net
    meta = {
        "framework": framework,
        "n_examples": int(ref.x.shape[0]),
        "in_shape": list(net.in_shape),
        "layers": len(net.layers),
        "architecture": " -> ".join(layer_desc(l) for l in net.layers),
        "loss": ref.loss_name,
        **meta,
    }
    if ref.stats is not None:
        sp = ref.stats.get("refnet.spectrum")
        meta["reference_jsv"] = sp if sp else {k: ref.stats[k] for k in ("mean", "std", "min", "max", "cn")}
        meta["reference_jsv_from"] = "refnet.spectrum.summarize of the raw singular values" if sp else "numpy.linalg.svd of refnet's Jacobians"
    meta["snip_k"] = ref.k_keep
    meta["snip_threshold_score"] = ref.threshold
    meta["snip_threshold_gap"] = _threshold_gap(net, ref.scores, meta.get("sparsity", 0.9))
    notes = [
        "max_rel_err = max|got - ref| / max|ref| per tensor (scalars: / |ref|); passed when max_rel_err <= tol.",
        "JSV statistics use the Weyl tolerance: each singular value may move by tol * sigma_max "
        "(so jsv/min has relative tolerance tol * cn); singular values are raw LAPACK values.",
        "Masks: global top-k of |dL/dW * W| over all weights, k = round(m (1 - sparsity)), ties to the lower flat "
        "index, entries already pruned stay pruned (refnet.pruning.prune). A differing entry is allowed only when its "
        "reference score lies within 2E of the threshold score (E = largest score error): a tie broken by rounding.",
    ]
    return AuditReport(framework, [], meta, notes)


def layer_desc(layer: Layer) -> str:
    """A short description of a layer, e.g. ``Dense(784,100)[tanh]``."""
    if isinstance(layer, Dense):
        s = f"Dense({layer.n_in},{layer.n_out})"
    elif isinstance(layer, Conv2d):
        s = f"Conv2d({layer.c_in},{layer.c_out},k={layer.kernel_size[0]}x{layer.kernel_size[1]},s={layer.stride[0]},p={layer.padding[0]}"
        s += ",circular)" if layer.padding_mode == "circular" else ")"
    elif isinstance(layer, (AvgPool2d, MaxPool2d)):
        s = f"{type(layer).__name__}({layer.kernel_size})"
    else:
        s = type(layer).__name__
    act = getattr(layer, "activation", None)
    if act is not None and not act.is_linear:
        s += f"[{act}]"
    return s


def match_reference(reference, net: Network, what: str) -> list:
    """Check that a given reference has the structure of the converted model; return the layers
    whose activations differ as ``(i, model_activation, reference_activation)`` (a modelling
    difference the report shows as a failed check; anything else is a ValueError)."""
    if not isinstance(reference, Network):
        raise TypeError(f"reference must be a refnet Network, got {type(reference).__name__}")

    def bare(l):
        d = l.to_dict()
        d.pop("activation", None)
        return d

    if ([bare(l) for l in reference.layers] != [bare(l) for l in net.layers] or tuple(reference.in_shape) != tuple(net.in_shape)
            or tuple(map(tuple, reference.inputs)) != tuple(map(tuple, net.inputs))):
        raise ValueError(
            f"reference does not have the {what}'s structure: reference "
            f"{' -> '.join(layer_desc(l) for l in reference.layers)} on {reference.in_shape}, {what} "
            f"{' -> '.join(layer_desc(l) for l in net.layers)} on {net.in_shape}"
        )
    out = []
    for i, (a, b) in enumerate(zip(net.layers, reference.layers)):
        if hasattr(a, "activation") and a.activation != b.activation:
            out.append((i, str(a.activation), str(b.activation)))
    return out


def add_activation_checks(report: AuditReport, diffs, sources) -> None:
    """One failed ``layer/{i}/activation`` check per difference found by :func:`match_reference`."""
    for i, mine, theirs in diffs:
        src = sources[i] if sources and i < len(sources) else ""
        report.checks.append(Check(f"layer/{i}/activation", "structure", math.inf, math.inf, 0.0, False, (), math.nan, src,
                                   f"the model uses {mine}, the reference {theirs}"))
