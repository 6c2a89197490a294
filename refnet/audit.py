r"""Audit what PyTorch, JAX/Flax (or any framework, through an ``.npz`` file) compute against refnet.

refnet is an independent float64 reference: hand-derived forward and backward passes on NumPy.
An audit runs the other framework's model twice and compares both runs with refnet, tensor by
tensor:

``float64``
    A float64 copy of the model (same weights, same inputs) against refnet in float64. Both are
    exact arithmetic up to float64 rounding, so everything must agree to ``rtol`` (default 1e-10,
    relative to the largest reference entry of the tensor). A failure here is a modelling
    difference or a bug, in the model, in the conversion, or in either library.
``as-run <dtype>``
    The model as the user runs it (its own dtype, usually float32) against the same float64
    reference. This measures the framework's own rounding error, judged against a tolerance
    appropriate to that dtype (:data:`AS_RUN_RTOL`: 1e-4 for float32; docs/audit.md derives it).

What is compared (each a row of the :class:`AuditReport`): the parameters (``param/{i}/W``), the
output of every refnet layer (``act/{i}``, torch only: locates the first layer that diverges),
the logits, the loss, every weight and bias gradient (``grad/{i}/W``), the input-output Jacobians
(``jacobian``, ``(B, n_out, n_in)``, NCHW order), SNIP's connection sensitivity ``|g * w|``
(``cs_scores/{i}/W``) and the global top-k masks it gives at ``sparsity`` (``mask/{i}/W``, with the
number of entries that differ), and the Jacobian singular values and their statistics
(``jsv/singular_values``, ``jsv/mean``, ``std``, ``min``, ``max``, ``cn``).

Error measures (per tensor): ``max_abs_err = max |got - ref|`` and
``max_rel_err = max_abs_err / max |ref|`` (relative to the largest reference entry, so entries
near zero do not blow up the measure); a tensor passes when ``max_rel_err <= tol``. Scalars use
``|ref|``. The JSV statistics get the tolerance that a Jacobian perturbation of spectral norm
``tol * sigma_max`` allows by Weyl's inequality (``|sigma_i(J + E) - sigma_i(J)| <= ||E||_2``), so
``jsv/min`` may move by ``tol * sigma_max`` (a relative tolerance ``tol * cn``) and ``jsv/cn`` by
the corresponding ratio. Masks pass when every differing entry is explained by the scores'
rounding: its reference score lies within ``2 E`` of the reference threshold (the k-th largest
score), ``E`` the largest score error (a tie broken the other way); otherwise they fail.

Pruned PyTorch modules (``torch.nn.utils.prune``) carry ``weight_orig`` (a parameter) and
``weight_mask`` (a buffer) and compute ``weight = weight_orig * weight_mask``. refnet stores the
same two arrays (``W``, ``mask``; the effective weight is ``mask * W``), and PyTorch's gradient
with respect to ``weight_orig`` is ``mask * dL/dW_eff`` -- exactly refnet's masked gradient, so the
two are compared directly (likewise ``bias_orig`` / ``bias_mask``). The connection sensitivity is
``|weight_orig.grad * weight_orig|``, zero on pruned entries as in :mod:`refnet.pruning`.

Entry points: :func:`from_torch`, :func:`compare_torch`, :func:`to_torch`; :func:`from_jax`,
:func:`compare_jax`, :func:`jax_apply`; :func:`from_flax`, :func:`compare_flax`;
:func:`compare_npz`, :func:`write_npz`; the ``refnet audit`` command (:func:`run_audit`).
Conventions and file formats are in docs/audit.md.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from math import prod

import numpy as np

from . import kernels
from .cli.args import float_in, int_at_least
from .layers import AvgPool2d, Conv2d, Dense, Flatten, GlobalAvgPool2d, Layer, MaxPool2d, layer_from_dict
from ._io import atomic_savez, atomic_write, atomic_write_text, json_float as _json_float, jsonable
from .jacobians import jacobian
from .network import Network
from .pruning import connection_sensitivity, keep_count, prune

__all__ = [
    "AS_RUN_RTOL",
    "DEFAULT_RTOL",
    "AuditReport",
    "Check",
    "compare_flax",
    "compare_jax",
    "compare_npz",
    "compare_torch",
    "flax_flatten",
    "flax_global_avg_pool",
    "from_flax",
    "from_jax",
    "from_torch",
    "jax_apply",
    "load_torch_checkpoint",
    "save_torch_checkpoint",
    "to_torch",
    "torch_from_arch",
    "write_npz",
    "add_audit_arguments",
    "run_audit",
]

#: default relative tolerance of the float64 comparison
DEFAULT_RTOL = 1e-10

#: default relative tolerance of the as-run comparison, by the dtype the model runs in. float32:
#: unit roundoff u = 2**-24 = 6.0e-8; a depth-K net of fan-in n accumulates roughly
#: 2 K sqrt(n) u in its forward plus backward pass (2.3e-5 for the 784-100x6-10 MLP), so 1e-4
#: leaves a factor ~4 above that estimate and ~50 above what is measured on well-conditioned nets
#: (docs/audit.md). The half-precision values are loose sanity bounds, not derived.
AS_RUN_RTOL = {"float64": DEFAULT_RTOL, "float32": 1e-4, "float16": 5e-2, "bfloat16": 2e-1}

_LOSSES = ("cross_entropy", "mse")


# ============================================================================================
# optional imports
# ============================================================================================


def _torch():
    try:
        import torch
        import torch.nn.utils.prune  # noqa: F401  (not imported by ``import torch``)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the PyTorch audit needs torch: pip install 'refnet[torch]' (or pip install torch)") from exc
    return torch


def _jax():
    try:
        import jax
        import jax.numpy as jnp
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the JAX audit needs jax: pip install 'refnet[jax]' (or pip install jax jaxlib)") from exc
    return jax, jnp


def _flax_linen():
    try:
        import flax.linen as nn
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the Flax audit needs flax: pip install flax") from exc
    return nn


# ============================================================================================
# the report
# ============================================================================================


@dataclass
class Check:
    """One comparison: a tensor (or scalar, or mask) of the other framework against refnet.

    Attributes
    ----------
    name : str
        ``param/{i}/W``, ``act/{i}``, ``logits``, ``loss``, ``grad/{i}/W``, ``grad/{i}/b``,
        ``jacobian``, ``cs_scores/{i}/W``, ``mask/{i}/W``, ``mask/total``, ``prune_mask/{i}/W``,
        ``jsv/singular_values``, ``jsv/mean``, ``jsv/std``, ``jsv/min``, ``jsv/max``, ``jsv/cn``.
        ``i`` is the refnet layer index (``net.layers[i]``).
    section : str
        ``"float64"``, ``"as-run float32"`` (the model's own dtype) or ``"npz"``.
    max_abs_err : float
        ``max |got - ref|`` (masks: the number of differing entries).
    max_rel_err : float
        ``max_abs_err / max |ref|`` (masks: the fraction of entries that differ).
    tol : float
        The relative tolerance ``max_rel_err`` is held to (masks: 0; see ``passed``).
    passed : bool
    shape : tuple
    ref_max : float
        ``max |ref|``, the scale of the relative error.
    source : str
        Where the tensor lives in the other framework (e.g. ``torch [2] Linear(...)``).
    note : str
    n_diff : int or None
        Masks only: how many entries differ.
    """

    name: str
    section: str
    max_abs_err: float
    max_rel_err: float
    tol: float
    passed: bool
    shape: tuple = ()
    ref_max: float = float("nan")
    source: str = ""
    note: str = ""
    n_diff: int | None = None

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "section": self.section,
            "max_abs_err": _json_float(self.max_abs_err),
            "max_rel_err": _json_float(self.max_rel_err),
            "tol": _json_float(self.tol),
            "passed": bool(self.passed),
            "shape": list(self.shape),
            "ref_max": _json_float(self.ref_max),
            "source": self.source,
            "note": self.note,
            "n_diff": self.n_diff,
        }


def _fmt(v) -> str:
    if v is None:
        return "-"
    v = float(v)
    if v != v:
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return "0" if v == 0 else f"{v:.2e}"


@dataclass
class AuditReport:
    """The result of an audit: one :class:`Check` per compared tensor, by section.

    ``passed`` is True when every check passed. :meth:`failures` lists the failed checks,
    :meth:`get` finds one by name, :meth:`first_divergence` names the first refnet layer whose
    output differs, :meth:`to_markdown` / :meth:`to_json` / :meth:`save` write it out.
    """

    framework: str
    checks: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def sections(self) -> list:
        out = []
        for c in self.checks:
            if c.section not in out:
                out.append(c.section)
        return out

    def failures(self, section: str | None = None) -> list:
        return [c for c in self.checks if not c.passed and (section is None or c.section == section)]

    def failed_names(self, section: str | None = None) -> list:
        return [c.name for c in self.failures(section)]

    def get(self, name: str, section: str | None = None) -> Check:
        """The check named ``name`` (of ``section``, default the first section that has it)."""
        for c in self.checks:
            if c.name == name and (section is None or c.section == section):
                return c
        have = sorted({c.name for c in self.checks if section is None or c.section == section})
        raise KeyError(f"no check named {name!r}" + (f" in section {section!r}" if section else "") + f"; have {have}")

    def first_divergence(self, section: str | None = None):
        """The first failing ``act/{i}`` (or, without layer outputs, ``param``/``logits``) check
        of ``section`` (default: the first section with a failure), or None."""
        sections = [section] if section else self.sections
        for s in sections:
            fails = self.failures(s)
            if not fails:
                continue
            for prefix in ("layer/", "param/", "prune_mask/", "act/"):
                hits = [c for c in fails if c.name.startswith(prefix)]
                if hits:
                    return hits[0]
            return fails[0]
        return None

    def to_dict(self) -> dict:
        fd = self.first_divergence()
        return {
            "format": "refnet.audit",
            "version": 1,
            "framework": self.framework,
            "passed": self.passed,
            "n_checks": len(self.checks),
            "n_failed": len(self.failures()),
            "failed": [f"{c.section}: {c.name}" for c in self.failures()],
            "first_divergence": None if fd is None else {"section": fd.section, "name": fd.name, "source": fd.source},
            "meta": _jsonable(self.meta),
            "notes": list(self.notes),
            "checks": [c.to_dict() for c in self.checks],
        }

    def to_json(self, path=None, indent: int = 2) -> str:
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=False)
        if path is not None:
            atomic_write_text(path, text + "\n")
        return text

    def to_markdown(self) -> str:
        lines = [f"# refnet audit: {self.framework}", ""]
        status = "PASSED" if self.passed else f"FAILED ({len(self.failures())} of {len(self.checks)} checks)"
        lines.append(f"**{status}**")
        lines.append("")
        fd = self.first_divergence()
        if fd is not None:
            lines.append(f"First divergence: `{fd.name}` in section {fd.section}" + (f" ({fd.source})" if fd.source else ""))
            lines.append("")
        if self.meta:
            lines += ["| setting | value |", "| --- | --- |"]
            for k, v in self.meta.items():
                lines.append(f"| {k} | {_md_cell(v)} |")
            lines.append("")
        for s in self.sections:
            cs = [c for c in self.checks if c.section == s]
            nf = sum(not c.passed for c in cs)
            lines.append(f"## {s}: " + ("all passed" if nf == 0 else f"{nf} failed"))
            lines.append("")
            lines.append("| tensor | shape | max abs err | max rel err | tol | passed | note |")
            lines.append("| --- | --- | --- | --- | --- | --- | --- |")
            for c in cs:
                shape = "x".join(str(d) for d in c.shape) if c.shape else "scalar"
                note = c.note
                if c.source:
                    note = (note + "; " if note else "") + c.source
                mark = "yes" if c.passed else "**NO**"
                lines.append(
                    f"| `{c.name}` | {shape} | {_fmt(c.max_abs_err)} | {_fmt(c.max_rel_err)} | {_fmt(c.tol)} | {mark} | {_md_cell(note)} |"
                )
            lines.append("")
        if self.notes:
            lines.append("## Notes")
            lines.append("")
            for n in self.notes:
                lines.append(f"- {n}")
            lines.append("")
        return "\n".join(lines)

    def save(self, folder) -> tuple[str, str]:
        """Write ``folder/report.md`` and ``folder/report.json`` (each atomically); return their paths."""
        folder = os.fspath(folder)
        os.makedirs(folder, exist_ok=True)
        md, js = os.path.join(folder, "report.md"), os.path.join(folder, "report.json")
        atomic_write_text(md, self.to_markdown())
        self.to_json(js)
        return md, js

    def summary(self) -> str:
        """A few lines: overall result, then the largest relative error per section."""
        out = [f"refnet audit ({self.framework}): " + ("PASSED" if self.passed else "FAILED")]
        for s in self.sections:
            cs = [c for c in self.checks if c.section == s and c.n_diff is None]
            worst = max(cs, key=lambda c: (c.max_rel_err / c.tol) if c.tol > 0 else 0.0, default=None)
            nf = sum(not c.passed for c in self.checks if c.section == s)
            line = f"  {s}: {nf} failed of {sum(c.section == s for c in self.checks)}"
            if worst is not None:
                line += f"; closest to its tolerance: {worst.name} rel err {_fmt(worst.max_rel_err)} (tol {_fmt(worst.tol)})"
            out.append(line)
            for c in self.failures(s)[:8]:
                out.append(f"    FAILED {c.name}: rel err {_fmt(c.max_rel_err)} > tol {_fmt(c.tol)}" + (f" ({c.note})" if c.note else ""))
        return "\n".join(out)

    def __str__(self) -> str:
        return self.summary()


def _md_cell(v) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def _jsonable(obj):
    return jsonable(obj, other=str)


def _tensor_check(name, section, got, ref, tol, source="", note="") -> Check:
    """``max |got - ref|`` and that over ``max |ref|``; non-finite entries must match exactly."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if got.shape != ref.shape:
        return Check(name, section, math.inf, math.inf, tol, False, tuple(ref.shape), math.nan, source,
                     _join(note, f"shape {tuple(got.shape)} differs from the reference {tuple(ref.shape)}"))
    if ref.size == 0:
        return Check(name, section, 0.0, 0.0, tol, True, tuple(ref.shape), 0.0, source, note)
    fin = np.isfinite(ref)
    bad_nonfinite = int(np.count_nonzero(~fin & ~((got == ref) | (np.isnan(got) & np.isnan(ref)))))
    bad_nonfinite += int(np.count_nonzero(fin & ~np.isfinite(got)))
    scale = float(np.max(np.abs(ref[fin]))) if fin.any() else 0.0
    both = fin & np.isfinite(got)
    abs_err = float(np.max(np.abs(got[both] - ref[both]))) if both.any() else 0.0
    if bad_nonfinite:
        return Check(name, section, math.inf, math.inf, tol, False, tuple(ref.shape), scale, source,
                     _join(note, f"{bad_nonfinite} non-finite entries differ"))
    rel = abs_err / scale if scale > 0 else (0.0 if abs_err == 0 else math.inf)
    return Check(name, section, abs_err, rel, tol, bool(rel <= tol), tuple(ref.shape), scale, source, note)


def _scalar_check(name, section, got, ref, abs_tol, source="", note="") -> Check:
    """A scalar held to an absolute tolerance, reported as a relative one (``abs_tol / |ref|``)."""
    got, ref = float(got), float(ref)
    if math.isinf(ref) or math.isinf(got) or got != got or ref != ref:
        same = got == ref or (got != got and ref != ref)
        return Check(name, section, 0.0 if same else math.inf, 0.0 if same else math.inf, 0.0, same, (), abs(ref),
                     source, _join(note, "" if same else f"got {got!r}, reference {ref!r}"))
    err = abs(got - ref)
    scale = abs(ref)
    rel = err / scale if scale > 0 else (0.0 if err == 0 else math.inf)
    tol = abs_tol / scale if scale > 0 else (math.inf if abs_tol > 0 else 0.0)
    return Check(name, section, err, rel, tol, bool(err <= abs_tol), (), scale, source, note)


def _join(a: str, b: str) -> str:
    return a + ("; " if a and b else "") + b


def _section_tol(dtype_name: str, rtol: float, rtol_as_run) -> float:
    if rtol_as_run is not None:
        return float(rtol_as_run)
    if dtype_name == "float64":
        return float(rtol)
    if dtype_name not in AS_RUN_RTOL:
        raise ValueError(f"no default as-run tolerance for dtype {dtype_name}; pass rtol_as_run")
    return AS_RUN_RTOL[dtype_name]


# --------------------------------------------------------------------------------------------
# the float64 reference, computed once
# --------------------------------------------------------------------------------------------


@dataclass
class _Ref:
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


def _check_loss(loss) -> str:
    if callable(loss) or not isinstance(loss, str):
        raise ValueError(f"loss must be one of {list(_LOSSES)} (a framework audit needs a named loss), got {loss!r}")
    key = loss.lower().replace("-", "_")
    key = {"ce": "cross_entropy", "xent": "cross_entropy", "mean_squared_error": "mse"}.get(key, key)
    if key not in _LOSSES:
        raise ValueError(f"loss must be one of {list(_LOSSES)}, got {loss!r}")
    return key


def _check_sparsity(sparsity) -> float:
    try:
        s = float(sparsity)
    except (TypeError, ValueError):
        raise TypeError(f"sparsity must be a number in [0, 1), got {sparsity!r}") from None
    if not 0.0 <= s < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {s}")
    return s


def _check_rtol(rtol, name="rtol") -> float:
    try:
        r = float(rtol)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a positive number, got {rtol!r}") from None
    if not (r > 0 and math.isfinite(r)):
        raise ValueError(f"{name} must be a positive finite number, got {rtol!r}")
    return r


def _check_xy(net: Network, x, y, loss_name: str):
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


def _weight_keys(net: Network) -> list:
    return [("W",) if "W" in p else () for p in net.params]


def _topk_masks(net: Network, scores, sparsity: float) -> list:
    """Global top-k over all weights by :func:`refnet.pruning.prune` (k = round(m (1 - sparsity)),
    pruned entries stay pruned, ties to the lower flat index)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        masks = prune(net, scores, sparsity, warn=False)
    return [{"W": m["W"]} if "W" in m else {} for m in masks]


def _threshold(net: Network, scores, sparsity: float) -> tuple[int, float]:
    """``k`` and the k-th largest score among the weights the network's mask keeps."""
    keys = _weight_keys(net)
    flat = np.concatenate([np.asarray(scores[i]["W"], np.float64).ravel() for i, ks in enumerate(keys) if ks])
    alive = np.concatenate([net.masks[i]["W"].ravel() for i, ks in enumerate(keys) if ks])
    k = keep_count(flat.size, sparsity)
    sa = np.sort(flat[alive])[::-1]
    if k <= 0 or sa.size == 0:
        return k, math.inf
    return k, float(sa[min(k, sa.size) - 1])


def _threshold_gap(net: Network, scores, sparsity: float) -> float:
    """Relative gap ``(s_(k) - s_(k+1)) / s_(k)`` between the last kept and the first dropped
    score: score errors below it cannot change the mask."""
    keys = _weight_keys(net)
    flat = np.concatenate([np.asarray(scores[i]["W"], np.float64).ravel() for i, ks in enumerate(keys) if ks])
    alive = np.concatenate([net.masks[i]["W"].ravel() for i, ks in enumerate(keys) if ks])
    k = keep_count(flat.size, sparsity)
    sa = np.sort(flat[alive])[::-1]
    if k <= 0 or k >= sa.size or sa[k - 1] <= 0:
        return math.inf
    return float((sa[k - 1] - sa[k]) / sa[k - 1])


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


def _reference(net: Network, x, y, loss_name: str, sparsity: float, want_jac: bool) -> _Ref:
    from .losses import get_loss

    out, trace = net.forward(x, return_trace=True)
    value, eps = get_loss(loss_name)(out, y)
    grads = net.backward(trace, eps)
    acts = [c["x"] for c in trace.caches[1:]] + [out]
    cs = connection_sensitivity(net, x, y, loss_name, normalize=False)
    scores = [{"W": d["W"]} if "W" in d else {} for d in cs]
    masks = _topk_masks(net, scores, sparsity)
    k, t = _threshold(net, scores, sparsity)
    jac = sv = stats = None
    if want_jac:
        jac = jacobian(net, x)  # (B, n_out, n_in)
        sv = kernels.batched_svdvals(jac)  # (B, r), descending
        stats = _stats(sv)
    return _Ref(net, x, y, loss_name, out, float(value), grads, acts, jac, scores, masks, sv, stats, k, t)


# --------------------------------------------------------------------------------------------
# what a framework run produced (all float64 NumPy, refnet layouts)
# --------------------------------------------------------------------------------------------


@dataclass
class _Run:
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


def _compare(ref: _Ref, run: _Run, section: str, tol: float, sparsity: float, sources: list, report: AuditReport) -> None:
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
                add(_tensor_check(f"param/{i}/{k}", section, run.params[i][k], p[k], t(f"param/{i}/{k}"), src(i)))
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
                add(_tensor_check(f"act/{i}", section, np.reshape(a, ref.acts[i].shape) if np.size(a) == ref.acts[i].size else a,
                                  ref.acts[i], t(f"act/{i}"), src(i), "output of this layer"))
    if run.logits is not None:
        add(_tensor_check("logits", section, run.logits, ref.logits, t("logits")))
    if run.loss is not None:
        add(_tensor_check("loss", section, run.loss, ref.loss, t("loss"), note=ref.loss_name))
    if run.grads is not None:
        for i, g in enumerate(ref.grads):
            for k in g:
                got = run.grads[i].get(k) if run.grads[i] else None
                if got is None:
                    continue
                add(_tensor_check(f"grad/{i}/{k}", section, got, g[k], t(f"grad/{i}/{k}"), src(i)))
    if run.jac is not None and ref.jac is not None:
        jac = np.asarray(run.jac, dtype=np.float64)
        add(_tensor_check("jacobian", section, jac.reshape(ref.jac.shape) if jac.size == ref.jac.size else jac,
                          ref.jac, t("jacobian"), note="d logits / d x per example, NCHW order"))
    # connection sensitivity and masks
    E = None
    if run.scores is not None:
        E = 0.0
        for i, s in enumerate(ref.scores):
            if "W" not in s or not run.scores[i] or "W" not in run.scores[i]:
                continue
            c = _tensor_check(f"cs_scores/{i}/W", section, run.scores[i]["W"], s["W"], t(f"cs_scores/{i}/W"), src(i), "|dL/dW * W|")
            add(c)
            E = max(E, c.max_abs_err)
    snip = run.snip_masks
    if snip is None and run.scores is not None:
        if all(np.all(np.isfinite(np.asarray(run.scores[i]["W"], np.float64))) for i, s in enumerate(ref.scores) if "W" in s):
            snip = _topk_masks(net, [{"W": np.asarray(run.scores[i]["W"], np.float64)} if "W" in s else {} for i, s in enumerate(ref.scores)], sparsity)
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
                note += f" ({nd - unexplained} within 2E = {_fmt(band)} of the threshold score {_fmt(ref.threshold)}: ties broken by rounding)"
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
        add(_tensor_check("jsv/singular_values", section, sv, ref.sv, tj, note="per example, descending"))
        if sv.shape == ref.sv.shape:
            st = _stats(sv)
            smax = ref.stats["max"]
            delta = tj * smax  # Weyl: every singular value may move by ||E||_2 <= tol * sigma_max
            for key in ("mean", "std", "min", "max"):
                add(_scalar_check(f"jsv/{key}", section, st[key], ref.stats[key], delta,
                                  note="Weyl tolerance tol * sigma_max"))
            lo, hi = ref.stats["min"], ref.stats["max"]
            if lo > delta:
                rel_tol = (hi + delta) / (lo - delta) / (hi / lo) - 1.0
            else:
                rel_tol = math.inf
            c = _scalar_check("jsv/cn", section, st["cn"], ref.stats["cn"], rel_tol * abs(ref.stats["cn"]) if math.isfinite(rel_tol) else math.inf,
                              note="cn = max/min; Weyl tolerance")
            if math.isinf(rel_tol) and math.isfinite(ref.stats["cn"]):
                c.passed, c.tol = True, math.inf
                c.note = _join(c.note, "sigma_min below tol * sigma_max: not resolvable at this tolerance")
            add(c)


def _new_report(framework: str, ref: _Ref, meta: dict) -> AuditReport:
    net = ref.net
    meta = {
        "framework": framework,
        "n_examples": int(ref.x.shape[0]),
        "in_shape": list(net.in_shape),
        "layers": len(net.layers),
        "architecture": " -> ".join(_layer_desc(l) for l in net.layers),
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


def _layer_desc(layer: Layer) -> str:
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


def _match_reference(reference, net: Network, what: str) -> list:
    """Check that a given reference has the structure of the converted model; return the layers
    whose activations differ as ``(i, model_activation, reference_activation)`` (a modelling
    difference the report shows as a failed check; anything else is a ValueError)."""
    if not isinstance(reference, Network):
        raise TypeError(f"reference must be a refnet Network, got {type(reference).__name__}")

    def bare(l):
        d = l.to_dict()
        d.pop("activation", None)
        return d

    if [bare(l) for l in reference.layers] != [bare(l) for l in net.layers] or tuple(reference.in_shape) != tuple(net.in_shape):
        raise ValueError(
            f"reference does not have the {what}'s structure: reference "
            f"{' -> '.join(_layer_desc(l) for l in reference.layers)} on {reference.in_shape}, {what} "
            f"{' -> '.join(_layer_desc(l) for l in net.layers)} on {net.in_shape}"
        )
    out = []
    for i, (a, b) in enumerate(zip(net.layers, reference.layers)):
        if hasattr(a, "activation") and a.activation != b.activation:
            out.append((i, str(a.activation), str(b.activation)))
    return out


def _add_activation_checks(report: AuditReport, diffs, sources) -> None:
    for i, mine, theirs in diffs:
        src = sources[i] if sources and i < len(sources) else ""
        report.checks.append(Check(f"layer/{i}/activation", "structure", math.inf, math.inf, 0.0, False, (), math.nan, src,
                                   f"the model uses {mine}, the reference {theirs}"))


def _softplus_notes(ref: _Ref, threshold: float = 20.0) -> list:
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


# ============================================================================================
# PyTorch
# ============================================================================================


def _torch_activation(m, nn):
    """(name, params) of a supported activation module, None for a non-activation, or raise."""
    if isinstance(m, nn.Tanh):
        return "tanh", {}
    if isinstance(m, nn.ReLU):
        return "relu", {}
    if isinstance(m, nn.LeakyReLU):
        return "leaky_relu", {"slope": float(m.negative_slope)}
    if isinstance(m, nn.SELU):
        return "selu", {}
    if isinstance(m, nn.ELU):
        return "elu", {"alpha": float(m.alpha)}
    if isinstance(m, nn.Sigmoid):
        return "sigmoid", {}
    if isinstance(m, nn.Hardtanh) and not isinstance(m, (nn.ReLU6,)):
        if float(m.min_val) != -1.0 or float(m.max_val) != 1.0:
            return ValueError("Hardtanh is supported only with min_val=-1, max_val=1 (refnet's hard_tanh)")
        return "hard_tanh", {}
    if isinstance(m, nn.Softplus):
        if float(m.beta) != 1.0:
            return ValueError("Softplus is supported only with beta=1 (refnet's softplus is log(1+e^h))")
        return "softplus", {}
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
    in_shape = _parse_shape(in_shape, "in_shape")
    try:
        net = Network(layers, in_shape=in_shape, params=params, masks=masks)
    except ValueError as exc:
        raise ValueError(f"the torch module does not fit in_shape={in_shape}: {exc}") from None
    groups = [s["group"] for s in specs]
    sources = ["torch " + " + ".join(f"[{q}] {type(m).__name__}" for q, m in g) for g in groups]
    return _TorchLayout(net, groups, [s["affine"] for s in specs], sources)


def _parse_shape(shape, name: str) -> tuple:
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


def _torch_run(module, layout: _TorchLayout, x, y, loss_name: str, dtype, want_jac: bool) -> _Run:
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
    run = _Run(_torch_dtype_name(dtype), logits=np64(z), loss=float(L.detach().to(torch.float64).cpu()),
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
    loss_name = _check_loss(loss)
    sparsity = _check_sparsity(sparsity)
    rtol = _check_rtol(rtol)
    if rtol_as_run is not None:
        rtol_as_run = _check_rtol(rtol_as_run, "rtol_as_run")
    x_arr = np.asarray(x)
    if in_shape is None:
        if x_arr.ndim < 2:
            raise ValueError(f"x must be a batch (B, *in_shape), got shape {x_arr.shape}")
        in_shape = x_arr.shape[1:]
    layout = _convert_torch(module, in_shape)
    net = layout.net
    act_diffs = []
    if reference is not None:
        act_diffs = _match_reference(reference, net, "module")
        net = reference.astype(np.float64) if reference.dtype != np.float64 else reference
    x_arr, y_arr = _check_xy(net, x_arr, y, loss_name)
    t0 = time.perf_counter()
    ref = _reference(net, x_arr, y_arr, loss_name, sparsity, jacobian)
    own = _module_dtype(module)
    meta = {"module_dtype": _torch_dtype_name(own), "torch_version": torch.__version__, "sparsity": sparsity,
            "rtol_float64": rtol, "reference": "given Network" if reference is not None else "from_torch(module)"}
    report = _new_report("torch", ref, meta)
    report.notes.append(
        "Pruned modules: refnet W = weight_orig, mask = weight_mask; PyTorch's weight_orig.grad = mask * dL/dW_eff "
        "is refnet's masked gradient and is compared directly (likewise bias_orig)."
    )
    report.notes += _softplus_notes(ref)
    _add_activation_checks(report, act_diffs, layout.sources)
    run64 = _torch_run(module, layout, x_arr, y_arr, loss_name, torch.float64, jacobian)
    _compare(ref, run64, "float64", rtol, sparsity, layout.sources, report)
    if dtype_as_run is not False:
        dt = own if dtype_as_run is None else _torch_dtype(dtype_as_run)
        name = _torch_dtype_name(dt)
        if dt == torch.float64:
            report.notes.append("the module runs in float64, so the as-run audit is the float64 audit")
        else:
            tol = _section_tol(name, rtol, rtol_as_run)
            report.meta["rtol_as_run"] = tol
            report.meta["as_run_dtype"] = name
            run = _torch_run(module, layout, x_arr, y_arr, loss_name, dt, jacobian)
            _compare(ref, run, f"as-run {name}", tol, sparsity, layout.sources, report)
    report.meta["seconds"] = round(time.perf_counter() - t0, 3)
    return report


_TORCH_ACT = {"tanh": "Tanh", "relu": "ReLU", "selu": "SELU", "sigmoid": "Sigmoid", "hard_tanh": "Hardtanh",
              "softplus": "Softplus", "leaky_relu": "LeakyReLU", "elu": "ELU"}


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
            name = _TORCH_ACT.get(act.name)
            if name is None:
                raise ValueError(f"net.layers[{i}]: activation {act.name!r} has no torch.nn module")
            kw = dict(act.params)
            if act.name == "leaky_relu":
                mods.append(nn.LeakyReLU(kw["slope"]))
            elif act.name == "elu":
                mods.append(nn.ELU(kw["alpha"]))
            else:
                mods.append(getattr(nn, name)())
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
    from .arch import build

    torch = _torch()
    net = build(arch, _parse_shape(in_shape, "in_shape"), n_classes, seed=0)
    return to_torch(net, dtype=torch.float32 if dtype is None else dtype)


def save_torch_checkpoint(module, path, arch: str, in_shape, n_classes: int | None = None) -> None:
    """Save ``{"format": "refnet.audit.torch", "arch", "in_shape", "n_classes", "state_dict"}`` with
    ``torch.save`` (atomically): the file ``refnet audit --torch`` reads with
    ``torch.load(weights_only=True)``. ``module`` must have the layout of
    :func:`torch_from_arch` ``(arch, in_shape, n_classes)``."""
    torch = _torch()
    from .arch import parse_arch

    parse_arch(arch)
    in_shape = _parse_shape(in_shape, "in_shape")
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
    in_shape = _parse_shape(in_shape, "in_shape")
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


# ============================================================================================
# JAX
# ============================================================================================


def _spec_layers(spec, params=None, in_shape=None):
    """(layers, in_shape or None) from a layer spec: a Network, a list of Layers or dicts, a
    ``to_config()``-style dict, or an arch string (needs in_shape; n_classes from the params)."""
    if isinstance(spec, Network):
        return list(spec.layers), spec.in_shape
    if isinstance(spec, str):
        from .arch import build

        if in_shape is None:
            raise ValueError(f"an arch spec string ({spec!r}) needs in_shape")
        if not params:
            raise ValueError("an arch spec string needs the params to read n_classes from")
        last = [p for p in params if p][-1]
        n_classes = int(np.shape(last["W"])[0])
        net = build(spec, _parse_shape(in_shape, "in_shape"), n_classes, seed=0)
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


def _expand_params(layers, params, what="params") -> list:
    """A per-layer list of dicts; accepts one entry per layer or one per parameterised layer."""
    if isinstance(params, dict):
        raise TypeError(f"{what} must be a list of dicts {{'W', 'b'}} (refnet layout), got a dict; for Flax use compare_flax")
    params = list(params)
    n_all = len(layers)
    with_p = [i for i, l in enumerate(layers) if l.keys]
    if len(params) == n_all:
        out = [dict(p) if p else {} for p in params]
    elif len(params) == len(with_p):
        out = [{} for _ in layers]
        for i, p in zip(with_p, params):
            out[i] = dict(p)
    else:
        raise ValueError(f"{what} must have one dict per layer ({n_all}) or per layer with parameters ({len(with_p)}), got {len(params)}")
    for i, (l, p) in enumerate(zip(layers, out)):
        if set(p) != set(l.keys):
            raise ValueError(f"{what}[{i}] must have keys {sorted(l.keys)} for {type(l).__name__}, got {sorted(p)}")
    return out


def from_jax(params, layers_spec, in_shape=None, masks=None) -> Network:
    """A float64 refnet Network from JAX parameters in refnet/PyTorch layout.

    Parameters
    ----------
    params : list of dict
        One dict per layer of ``layers_spec`` (``{}`` for parameter-free layers), or one per
        layer with parameters, with ``"W"`` -- ``(n_out, n_in)`` for Dense, ``(c_out, c_in, kh, kw)``
        for Conv2d -- and ``"b"`` ``(n_out,)`` / ``(c_out,)``. JAX or NumPy arrays of any float dtype.
        (Flax's ``(in, out)`` / HWIO kernels: use :func:`from_flax`.)
    layers_spec : list of refnet Layers or layer dicts, a ``Network.to_config()``-style dict
        ``{"in_shape", "layers"}``, a Network, or an arch string (with ``in_shape``).
    in_shape : tuple, optional
        Per-example input shape; needed unless the spec has it or starts with Dense.
    masks : list of dict, optional
        Pruning masks (the effective weight is ``mask * W``).
    """
    layers, sh = _spec_layers(layers_spec, list(params) if not isinstance(params, dict) else None, in_shape)
    in_shape = in_shape if in_shape is not None else sh
    if in_shape is None and not isinstance(layers[0], Dense):
        raise ValueError(f"in_shape is required when the first layer is {type(layers[0]).__name__}, e.g. (1, 28, 28)")
    p = _expand_params(layers, params)
    p64 = [{k: np.array(np.asarray(v), dtype=np.float64) for k, v in d.items()} for d in p]
    m = None if masks is None else _expand_masks(layers, masks)
    return Network(layers, in_shape=None if in_shape is None else _parse_shape(in_shape, "in_shape"), params=p64, masks=m)


def _expand_masks(layers, masks):
    masks = list(masks)
    with_p = [i for i, l in enumerate(layers) if l.keys]
    if len(masks) == len(layers):
        return [dict(m) if m else {} for m in masks]
    if len(masks) == len(with_p):
        out = [{} for _ in layers]
        for i, m in zip(with_p, masks):
            out[i] = dict(m) if m else {}
        return out
    raise ValueError(f"masks must have one dict per layer ({len(layers)}) or per layer with parameters ({len(with_p)}), got {len(masks)}")


@functools.lru_cache(maxsize=1)
def _jax_acts():
    jax, jnp = _jax()
    from jax.scipy.special import erf

    def hard_tanh(h):  # derivative 0 at +-1 as refnet and PyTorch (jnp.clip would give 0.5)
        return jnp.where((h > -1.0) & (h < 1.0), h, jnp.sign(h))

    return {
        "identity": lambda h: h,
        "tanh": jnp.tanh,
        "relu": jax.nn.relu,
        "selu": jax.nn.selu,
        "sigmoid": jax.nn.sigmoid,
        "hard_tanh": hard_tanh,
        "erf": erf,
        "softplus": jax.nn.softplus,
    }


def jax_apply(spec, in_shape=None, masks=None):
    """A pure-JAX ``apply_fn(params, x)`` of a refnet layer spec, in refnet layouts (the params
    convention of :func:`compare_jax`; x is ``(B, *in_shape)``, NCHW for images).

    Conv2d uses ``lax.conv_general_dilated`` with ("NCHW", "OIHW", "NCHW") dimension numbers
    (circular padding by ``jnp.pad(mode="wrap")``); pooling reshapes (floor mode). ``masks``,
    when given, multiply the weights inside (so gradients are ``mask * dL/dW_eff``). It is a
    second implementation of refnet's forward pass for JAX users and for tests; the dtype of a
    call is the dtype of its params and x.
    """
    jax, jnp = _jax()
    layers, _ = _spec_layers(spec, None, in_shape)
    mk = None if masks is None else _expand_masks(layers, masks)
    acts = _jax_acts()

    def act_fn(a):
        kw = dict(a.params)
        if a.name == "leaky_relu":
            s = kw["slope"]
            return lambda h: jnp.where(h > 0, h, s * h)  # leaky_relu'(0) = slope, as refnet
        if a.name == "elu":
            al = kw["alpha"]
            return lambda h: jax.nn.elu(h, al)  # elu'(0) = alpha, as refnet
        if a.name not in acts:
            raise ValueError(f"activation {a.name!r} has no JAX counterpart here")
        return acts[a.name]

    fns = [act_fn(l.activation) if hasattr(l, "activation") else None for l in layers]

    def apply_fn(params, x):
        p = _expand_params(layers, params)
        h = x
        for i, layer in enumerate(layers):
            if isinstance(layer, (Dense, Conv2d)):
                W = p[i]["W"]
                if mk is not None and mk[i].get("W") is not None:
                    W = W * jnp.asarray(mk[i]["W"], dtype=W.dtype)
                b = p[i].get("b")
                if b is not None and mk is not None and mk[i].get("b") is not None:
                    b = b * jnp.asarray(mk[i]["b"], dtype=b.dtype)
                if isinstance(layer, Dense):
                    h = h @ W.T
                    if b is not None:
                        h = h + b
                else:
                    ph, pw = layer.padding
                    if layer.padding_mode == "circular" and (ph or pw):
                        h = jnp.pad(h, ((0, 0), (0, 0), (ph, ph), (pw, pw)), mode="wrap")
                        pad = ((0, 0), (0, 0))
                    else:
                        pad = ((ph, ph), (pw, pw))
                    h = jax.lax.conv_general_dilated(h, W, window_strides=layer.stride, padding=pad,
                                                     dimension_numbers=("NCHW", "OIHW", "NCHW"),
                                                     precision=jax.lax.Precision.HIGHEST)
                    if b is not None:
                        h = h + b[None, :, None, None]
                h = fns[i](h)
            elif isinstance(layer, (AvgPool2d, MaxPool2d)):
                k = layer.kernel_size
                B, C, H, Wd = h.shape
                Ho, Wo = H // k, Wd // k
                win = h[:, :, : Ho * k, : Wo * k].reshape(B, C, Ho, k, Wo, k)
                h = win.mean(axis=(3, 5)) if isinstance(layer, AvgPool2d) else win.max(axis=(3, 5))
            elif isinstance(layer, GlobalAvgPool2d):
                h = h.mean(axis=(2, 3))
            elif isinstance(layer, Flatten):
                h = h.reshape(h.shape[0], -1)
            else:
                raise ValueError(f"layer {i} ({type(layer).__name__}) has no JAX counterpart here")
        return h

    return apply_fn


def _jax_loss(jnp, jax, loss_name):
    def loss_fn(z, t):
        if loss_name == "cross_entropy":
            return -jnp.sum(t * jax.nn.log_softmax(z, axis=1)) / z.shape[0]
        return jnp.mean((z - t) ** 2)

    return loss_fn


def _targets(y, C):
    if y.ndim == 1:
        t = np.zeros((y.shape[0], C))
        t[np.arange(y.shape[0]), y] = 1.0
        return t
    return np.asarray(y, dtype=np.float64)


def _tree_dtype(tree):
    jax, _ = _jax()
    for leaf in jax.tree_util.tree_leaves(tree):
        dt = np.dtype(getattr(leaf, "dtype", np.float64))
        if dt.kind == "f" or dt.name == "bfloat16":
            return dt
    return np.dtype(np.float32)


def _jax_run(apply_fn, params, x_fw, y, C, loss_name, dtype, want_jac, jit, extract, jac_to_ref, grad_params=None) -> _Run:
    """Run ``apply_fn(params, x)`` in ``dtype`` under the current JAX config and collect results.

    ``extract(tree) -> list of dict`` maps a params-shaped tree (params, grads, scores) to refnet
    layouts; ``jac_to_ref(J)`` maps a Jacobian ``(B, n_out, *x_fw.shape[1:])`` to ``(B, n_out, n_in)``
    in refnet's input order.
    """
    jax, jnp = _jax()
    cast = lambda a: jnp.asarray(np.asarray(a, dtype=np.float64), dtype=dtype)  # noqa: E731
    p = jax.tree_util.tree_map(cast, params)
    xj = jnp.asarray(np.asarray(x_fw, dtype=np.float64), dtype=dtype)
    tj = jnp.asarray(_targets(y, C), dtype=dtype)
    loss_fn = _jax_loss(jnp, jax, loss_name)
    split = grad_params or (lambda tree: (tree, lambda q: q))
    trainable, rebuild = split(p)

    def objective(q):
        z = apply_fn(rebuild(q), xj)
        return loss_fn(z, tj), z

    vg = jax.value_and_grad(objective, has_aux=True)
    if jit:
        vg = jax.jit(vg)
    (L, z), g = vg(trainable)
    if z.ndim != 2:
        raise ValueError(f"apply_fn must return (B, C) logits, got shape {z.shape}")
    sc = jax.tree_util.tree_map(lambda gi, wi: jnp.abs(gi * wi), g, trainable)
    np64 = lambda a: np.asarray(jnp.asarray(a, dtype=jnp.float32) if a.dtype == jnp.bfloat16 else a).astype(np.float64)  # noqa: E731
    to_np = lambda tree: jax.tree_util.tree_map(np64, tree)  # noqa: E731
    run = _Run(str(np.dtype(dtype)), logits=np64(z), loss=float(np64(L)), grads=extract(to_np(g)),
               params=extract(to_np(trainable)), scores=[{"W": d["W"]} if "W" in d else {} for d in extract(to_np(sc))])
    if want_jac:
        full = rebuild(trainable)

        def f(xi):
            return apply_fn(full, xi[None])[0]

        jf = jax.vmap(jax.jacrev(f))
        if jit:
            jf = jax.jit(jf)
        J = jf(xj)  # (B, n_out, *x shape)
        J = J.reshape(J.shape[0], J.shape[1], -1)
        Jsv = J if J.dtype in (jnp.float32, jnp.float64) else J.astype(jnp.float32)
        run.sv = np64(jnp.linalg.svd(Jsv, compute_uv=False))
        run.jac = jac_to_ref(np64(J))
    return run


class _X64:
    """Context: ``jax.config.update("jax_enable_x64", True)``, restored on exit."""

    def __enter__(self):
        jax, _ = _jax()
        self.prev = bool(jax.config.read("jax_enable_x64")) if hasattr(jax.config, "read") else bool(jax.config.jax_enable_x64)
        jax.config.update("jax_enable_x64", True)
        return self

    def __exit__(self, *exc):
        jax, _ = _jax()
        jax.config.update("jax_enable_x64", self.prev)
        return False


def _compare_jax_common(framework, net, apply_fn, params, x_fw, x_ref, y, loss_name, *, sparsity, rtol, rtol_as_run,
                        dtype_as_run, jacobian, jit, extract, jac_to_ref, grad_params, sources, reference_label,
                        act_diffs=()) -> AuditReport:
    jax, _ = _jax()
    x_ref, y = _check_xy(net, x_ref, y, loss_name)
    if np.asarray(x_fw).shape[0] != x_ref.shape[0]:
        raise ValueError("x has a different number of rows after the layout change")  # pragma: no cover
    t0 = time.perf_counter()
    ref = _reference(net, x_ref, y, loss_name, sparsity, jacobian)
    C = net.out_shape[0]
    own = _tree_dtype(params)
    meta = {"params_dtype": own.name, "jax_version": jax.__version__, "sparsity": sparsity, "rtol_float64": rtol,
            "reference": reference_label, "jax_enable_x64 (as the caller had it)": _x64_state()}
    report = _new_report(framework, ref, meta)
    report.notes.append(
        "JAX: the as-run audit runs first, under the caller's JAX config; the float64 audit then sets "
        "jax.config.update('jax_enable_x64', True) and restores the previous value when done."
    )
    _add_activation_checks(report, act_diffs, sources)
    runs = []
    if dtype_as_run is not False:
        dt = own if dtype_as_run is None else np.dtype(dtype_as_run)
        if dt != np.float64:
            if dt == np.float64 or (not _x64_state() and dt.itemsize > 4):
                raise ValueError(f"dtype_as_run {dt} needs jax_enable_x64")
            run = _jax_run(apply_fn, params, x_fw, y, C, loss_name, dt, jacobian, jit, extract, jac_to_ref, grad_params)
            runs.append((f"as-run {dt.name}", _section_tol(dt.name, rtol, rtol_as_run), run))
        else:
            report.notes.append("the params are float64, so the as-run audit is the float64 audit")
    with _X64():
        run64 = _jax_run(apply_fn, params, x_fw, y, C, loss_name, np.dtype(np.float64), jacobian, jit, extract, jac_to_ref, grad_params)
    _compare(ref, run64, "float64", rtol, sparsity, sources, report)
    for section, tol, run in runs:
        report.meta["rtol_as_run"] = tol
        report.meta["as_run_dtype"] = run.dtype
        _compare(ref, run, section, tol, sparsity, sources, report)
    report.meta["seconds"] = round(time.perf_counter() - t0, 3)
    return report


def _x64_state() -> bool:
    jax, _ = _jax()
    try:
        return bool(jax.config.read("jax_enable_x64"))
    except AttributeError:  # pragma: no cover - older JAX
        return bool(jax.config.jax_enable_x64)


def compare_jax(
    apply_fn,
    params,
    spec,
    x,
    y,
    loss="cross_entropy",
    *,
    masks=None,
    in_shape=None,
    sparsity=0.9,
    rtol=DEFAULT_RTOL,
    rtol_as_run=None,
    dtype_as_run=None,
    reference: Network | None = None,
    jacobian: bool = True,
    jit: bool = True,
) -> AuditReport:
    """Audit a JAX model ``apply_fn(params, x) -> logits`` against refnet.

    Params convention (docs/audit.md): ``params`` is a list of dicts, one per layer of ``spec``
    (``{}`` for parameter-free layers) or one per layer with parameters, holding ``"W"`` in
    refnet/PyTorch layout -- Dense ``(n_out, n_in)`` used as ``x @ W.T + b``, Conv2d
    ``(c_out, c_in, kh, kw)`` on NCHW inputs -- and ``"b"``. ``spec`` describes the same network
    in refnet terms (see :func:`from_jax`). Gradients are ``jax.grad`` of the mean loss with
    respect to ``params``; Jacobians are ``jax.vmap(jax.jacrev(f))`` over the examples.

    The as-run audit runs ``apply_fn`` with the params' own dtype (float32 by default in JAX)
    under the caller's JAX config; the float64 audit sets ``jax_enable_x64`` (restored after).
    ``masks`` are pruning masks of the reference; ``apply_fn`` must apply them itself (then
    ``jax.grad`` gives ``mask * dL/dW_eff``, refnet's masked gradient). Other arguments as
    :func:`compare_torch`; ``jit`` compiles the gradient and Jacobian functions.
    """
    _jax()
    loss_name = _check_loss(loss)
    sparsity = _check_sparsity(sparsity)
    rtol = _check_rtol(rtol)
    if rtol_as_run is not None:
        rtol_as_run = _check_rtol(rtol_as_run, "rtol_as_run")
    if not callable(apply_fn):
        raise TypeError(f"apply_fn must be callable as apply_fn(params, x), got {type(apply_fn).__name__}")
    x_arr = np.asarray(x)
    if in_shape is None:
        in_shape = x_arr.shape[1:]
    net = from_jax(params, spec, in_shape=in_shape, masks=masks)
    layers = list(net.layers)
    label = "from_jax(params, spec)"
    act_diffs = []
    if reference is not None:
        act_diffs = _match_reference(reference, net, "spec")
        net, label = (reference.astype(np.float64) if reference.dtype != np.float64 else reference), "given Network"
    n_given = len(list(params))

    def extract(tree):
        return [{k: v for k, v in d.items()} for d in _expand_params(layers, tree)]

    sources = [f"params[{j}]" for j in range(len(layers))] if n_given == len(layers) else None
    if sources is None:
        with_p = [i for i, l in enumerate(layers) if l.keys]
        sources = [""] * len(layers)
        for j, i in enumerate(with_p):
            sources[i] = f"params[{j}]"
    return _compare_jax_common("jax", net, apply_fn, list(params), x_arr, x_arr, y, loss_name, sparsity=sparsity,
                               rtol=rtol, rtol_as_run=rtol_as_run, dtype_as_run=dtype_as_run, jacobian=jacobian,
                               jit=jit, extract=extract, jac_to_ref=lambda J: J, grad_params=None, sources=sources,
                               reference_label=label, act_diffs=act_diffs)


# --------------------------------------------------------------------------------------------
# Flax linen
# --------------------------------------------------------------------------------------------


def flax_flatten(x):
    """``x.reshape(B, -1)``: use it in a ``flax.linen.Sequential`` so :func:`from_flax` sees a Flatten."""
    return x.reshape((x.shape[0], -1))


def flax_global_avg_pool(x):
    """Mean over H and W of an NHWC batch: use it in a ``flax.linen.Sequential`` for global average pooling."""
    return x.mean(axis=(1, 2))


def _flax_activation(fn):
    jax, jnp = _jax()
    from jax.scipy.special import erf

    table = [
        (jax.nn.tanh, "tanh"), (jnp.tanh, "tanh"), (jax.nn.relu, "relu"), (jax.nn.sigmoid, "sigmoid"),
        (jax.nn.selu, "selu"), (jax.nn.elu, "elu"), (jax.nn.softplus, "softplus"), (jax.nn.hard_tanh, "hard_tanh"),
        (jax.nn.leaky_relu, "leaky_relu"), (erf, "erf"), (jax.lax.erf, "erf"), (jax.nn.identity, "identity"),
    ]
    try:
        nn = _flax_linen()
        table += [(getattr(nn, n), n2) for n, n2 in (("tanh", "tanh"), ("relu", "relu"), ("sigmoid", "sigmoid"),
                                                     ("selu", "selu"), ("elu", "elu"), ("softplus", "softplus"),
                                                     ("hard_tanh", "hard_tanh"), ("leaky_relu", "leaky_relu"))
                  if hasattr(nn, n)]
    except ImportError:  # pragma: no cover
        pass
    base, kw = fn, {}
    if isinstance(fn, functools.partial):
        base, kw = fn.func, dict(fn.keywords)
        if fn.args:
            return None
    for f, name in table:
        if base is f:
            params = {}
            if name == "leaky_relu":
                params["slope"] = float(kw.pop("negative_slope", 0.01))
            elif name == "elu":
                params["alpha"] = float(kw.pop("alpha", 1.0))
            if kw:
                raise ValueError(f"activation {name} with arguments {sorted(kw)} is not supported")
            return name, params
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
    shape = _parse_shape(in_shape, "in_shape")  # flax layout: (n,) or (H, W, C)
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
    jax, jnp = _jax()
    loss_name = _check_loss(loss)
    sparsity = _check_sparsity(sparsity)
    rtol = _check_rtol(rtol)
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

    return _compare_jax_common("flax", net, apply_fn, variables, x_fw, x_ref, y, loss_name, sparsity=sparsity,
                               rtol=rtol, rtol_as_run=None if rtol_as_run is None else _check_rtol(rtol_as_run, "rtol_as_run"),
                               dtype_as_run=dtype_as_run, jacobian=jacobian, jit=jit, extract=extract,
                               jac_to_ref=jac_to_ref, grad_params=grad_params, sources=lay.sources,
                               reference_label="from_flax(model, variables)")


# ============================================================================================
# the framework-neutral .npz
# ============================================================================================

_NPZ_RE = re.compile(r"^(param|param_mask|grad|cs_scores|mask)/(\d+)/(W|b)$|^act/(\d+)$")
_NPZ_PLAIN = {"arch", "x", "y", "logits", "loss", "loss_fn", "sparsity", "jacobian"}


def _npz_arch(data: dict, path: str):
    key = "arch"
    if key not in data:
        raise ValueError(f"{path}: missing key 'arch' (the architecture as a JSON string)")
    a = data[key]
    if a.ndim != 0 or a.dtype.kind not in "US":
        raise ValueError(f"{path}: {key!r} must be a JSON string (0-d str array), got dtype {a.dtype}, shape {a.shape}")
    try:
        cfg = json.loads(str(a))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: {key!r} is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: {key!r} must be a JSON object, got {type(cfg).__name__}")
    if "layers" in cfg:
        if "in_shape" not in cfg:
            raise ValueError(f"{path}: {key!r} has 'layers' but no 'in_shape'")
        layers, _ = _spec_layers(cfg["layers"])
        return layers, _parse_shape(cfg["in_shape"], f"{key}.in_shape")
    if "arch" in cfg:
        from .arch import build

        for k in ("in_shape", "n_classes"):
            if k not in cfg:
                raise ValueError(f"{path}: {key!r} with an 'arch' spec needs {k!r}")
        net = build(cfg["arch"], _parse_shape(cfg["in_shape"], "in_shape"), int(cfg["n_classes"]), seed=0)
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
    path = os.fspath(path)
    rtol = _check_rtol(rtol)
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise FileNotFoundError(f"npz file {path!r} does not exist") from None
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"{path}: not a readable .npz without pickles (allow_pickle=False): {exc}") from None
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
    loss_name = _check_loss(str(data["loss_fn"])) if "loss_fn" in data else "cross_entropy"
    if sparsity is None:
        sparsity = float(data["sparsity"]) if "sparsity" in data else 0.9
    sparsity = _check_sparsity(sparsity)
    x, y = _check_xy(net, x, data["y"], loss_name)
    B = x.shape[0]
    C = net.out_shape[0]
    n_in = prod(in_shape)
    run = _Run("npz")
    tols = {}

    def tol_of(name, a):
        dt = np.dtype(a.dtype).name
        tols[name] = _section_tol(dt, rtol, rtol_as_run) if dt in AS_RUN_RTOL else _section_tol("float32", rtol, rtol_as_run)

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
    ref = _reference(net, x, y, loss_name, sparsity, want_jac)
    meta = {"file": os.path.abspath(path), "sparsity": sparsity, "rtol_float64": rtol,
            "rtol_float32": _section_tol("float32", rtol, rtol_as_run),
            "outputs_present": sorted(k for k in data if k not in ("arch", "x", "y", "loss_fn", "sparsity")
                                      and not k.startswith("param"))}
    report = _new_report("npz", ref, meta)
    report.notes.append("npz: each output is held to the tolerance of its stored dtype (float64: rtol; float32: the as-run tolerance).")
    _compare(ref, run, "npz", rtol, sparsity, [f"layers[{i}] {_layer_desc(l)}" for i, l in enumerate(layers)], report)
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
              "loss_fn": np.array(_check_loss(loss_fn))}
    if sparsity is not None:
        arrays["sparsity"] = np.array(_check_sparsity(sparsity))
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


# ============================================================================================
# refnet audit (command line)
# ============================================================================================

AUDIT_HELP = """\
inputs:
  --torch FILE   a file read with torch.load(weights_only=True): either a checkpoint written by
                 refnet.audit.save_torch_checkpoint (architecture inside) or a bare state_dict
                 with --torch-arch SPEC (the module is rebuilt as refnet.audit.torch_from_arch
                 lays it out, e.g. mlp-3-tanh: Linear, Tanh, Linear, Tanh, Linear). Pruned
                 state dicts (weight_orig/weight_mask) are supported. Whole pickled modules and
                 TorchScript files are not read (weights_only=True cannot load them safely).
  --npz FILE     a framework-neutral file (docs/audit.md): architecture, weights, x, y and the
                 other framework's outputs.
exit status: 0 all comparisons passed, 1 a comparison failed, 2 bad arguments or input."""


def _shape_arg(text: str) -> tuple:
    try:
        return _parse_shape(text, "in-shape")
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be comma-separated positive ints such as 1,28,28, got {text!r}") from None


_pos_float = float_in(0.0, lo_open=True)
_sparsity_arg = float_in(0.0, 1.0, hi_open=True)
_n_arg = int_at_least(1)


def add_audit_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``refnet audit``."""
    p.epilog = AUDIT_HELP
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--torch", "--torch-state", dest="torch", metavar="FILE", default=None,
                     help="PyTorch checkpoint or state_dict (torch.load(weights_only=True))")
    src.add_argument("--npz", metavar="FILE", default=None, help="framework-neutral .npz (docs/audit.md)")
    p.add_argument("--torch-arch", metavar="SPEC", default=None,
                   help="refnet architecture spec of a bare state_dict (e.g. mlp-7-tanh, cnn-small-relu)")
    p.add_argument("--in-shape", type=_shape_arg, default=None,
                   help="per-example input shape, e.g. 784 or 1,28,28 (default: from the checkpoint or the dataset)")
    p.add_argument("--data", default=None, help="dataset for the torch audit: mnist5k (default), digits, mnist, fashion-mnist, synthetic")
    p.add_argument("--data-dir", default=None, help="folder of the IDX files (mnist, fashion-mnist)")
    p.add_argument("--split", default="train", choices=["train", "test"], help="data split (default train)")
    p.add_argument("--n", type=_n_arg, default=100, help="number of examples (default 100)")
    p.add_argument("--loss", default="cross_entropy", choices=list(_LOSSES), help="loss (default cross_entropy)")
    p.add_argument("--sparsity", type=_sparsity_arg, default=None, help="sparsity of the SNIP masks compared (default 0.9)")
    p.add_argument("--rtol", type=_pos_float, default=DEFAULT_RTOL, help=f"float64 tolerance (default {DEFAULT_RTOL:g})")
    p.add_argument("--rtol-as-run", type=_pos_float, default=None, help="as-run tolerance (default by dtype: float32 1e-4)")
    p.add_argument("--no-as-run", action="store_true", help="skip the audit of the model in its own dtype")
    p.add_argument("--no-jacobian", action="store_true", help="skip the Jacobians and their singular values")
    p.add_argument("--out", default=os.path.join("runs", "audit"), help="folder for report.md and report.json (default runs/audit)")
    p.add_argument("--quiet", action="store_true", help="print only the result line")


def run_audit(args: argparse.Namespace) -> int:
    """Run ``refnet audit``; 0 when every comparison passed, 1 otherwise (bad input raises)."""
    from .cli import CLIError

    out = args.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise CLIError(f"argument --out: {out!r} exists and is not a folder")
    if args.npz is not None:
        for opt in ("torch_arch", "data", "in_shape"):
            if getattr(args, opt) is not None:
                raise CLIError(f"argument --{opt.replace('_', '-')}: not used with --npz (the file holds everything)")
        report = compare_npz(args.npz, rtol=args.rtol, rtol_as_run=args.rtol_as_run, sparsity=args.sparsity,
                             jacobian=False if args.no_jacobian else None)
    else:
        from . import data as _data

        if args.torch_arch is not None:
            from .arch import parse_arch

            try:
                parse_arch(args.torch_arch)
            except ValueError as exc:
                raise CLIError(f"argument --torch-arch: {str(exc).splitlines()[0]}") from None
        name = (args.data or "mnist5k").lower().replace("_", "-")
        if name not in _data.DATASETS:
            raise CLIError(f"argument --data: must be one of {', '.join(_data.DATASETS)}; got {args.data!r}")
        info = _data.DATASETS[name]
        in_shape = args.in_shape
        if in_shape is None and args.torch_arch is not None:
            from .arch import parse_arch

            in_shape = info.in_shape(flatten=parse_arch(args.torch_arch).flat_input)
        module, meta = load_torch_checkpoint(args.torch, arch=args.torch_arch, in_shape=in_shape, n_classes=info.n_classes
                                             if args.torch_arch is not None else None)
        in_shape = tuple(meta["in_shape"])
        if prod(in_shape) != info.n_features:
            raise CLIError(f"argument --in-shape: {in_shape} does not hold the {info.n_features} features of {name}")
        X, y = _data.load(name, split=args.split, data_dir=args.data_dir)
        n = min(args.n, len(X))
        X = X[:n].reshape((n, *in_shape))
        y = y[:n]
        report = compare_torch(module, X, y, args.loss, sparsity=0.9 if args.sparsity is None else args.sparsity,
                               rtol=args.rtol, rtol_as_run=args.rtol_as_run,
                               dtype_as_run=False if args.no_as_run else None, jacobian=not args.no_jacobian)
        report.meta.update({"torch_file": os.path.abspath(args.torch), "arch": meta["arch"], "data": f"{name} {args.split}[:{n}]"})
    md, js = report.save(out)
    if args.quiet:
        print(f"refnet audit: {'PASSED' if report.passed else 'FAILED'} ({len(report.failures())} of {len(report.checks)} checks failed)")
    else:
        print(report.summary())
        print(f"wrote {md} and {js}")
    return 0 if report.passed else 1
