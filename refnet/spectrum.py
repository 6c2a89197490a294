r"""Jacobian singular values (JSV) and layerwise dynamical isometry (PAPER.md sections 3 and 6).

For every example the exact Jacobian ``J^{start,end} = dx^end/dx^start`` (by default the
input-output Jacobian ``J^{0,K} = prod_l D^l W^l``, ``10 x 784`` for an MNIST classifier) is
formed by :func:`refnet.jacobians.jacobian` and its singular values are taken with
``np.linalg.svd(compute_uv=False)`` (descending). The SPP code pools the singular values of all
examples and reports their mean, std, max and min; the SPP tables add the condition number

.. math:: \mathrm{CN} = \frac{\max_{n,j} \sigma_j(J_n)}{\min_{n,j} \sigma_j(J_n)}

over the pooled values, while [DI] reports the mean over examples of
``sigma_max(J_n) / sigma_min(J_n)``. :func:`jsv_stats` gives both (``cn`` and ``cn_mean``) and
the per-example median (``cn_median``).

Layerwise dynamical isometry (SPP, Definition 1): every singular value of every layer Jacobian
``J^{l-1,l} = D^l W^l`` satisfies ``|1 - sigma| <= epsilon``. :func:`jsv_stats` reports, per
layer, the fraction of singular values (over all examples) that do.

Numerically zero singular values. A rank-deficient Jacobian (a pruned-away row, a saturated
unit with ``D = 0``) does not give exact zeros from LAPACK: they come out as ``~1e-16 sigma_max``.
As in ``np.linalg.matrix_rank``, a singular value ``sigma <= zero_rtol * sigma_max`` of its own
matrix, with ``zero_rtol = max(N_end, N_start) * eps(dtype)`` by default, is taken to be zero and
reported as exactly ``0.0``, so a rank-deficient Jacobian has CN ``inf`` rather than ``~1e17``.
Pass ``zero_rtol=0`` to get LAPACK's raw values.

Memory: ``x`` is processed ``batch_size`` examples at a time; only one batch of Jacobians exists at
any moment. The singular values themselves are kept (``n_examples * min(N_end, N_start)`` floats,
plus the same per layer when ``layerwise``), so every statistic is computed once at the end from
the full set and does not depend on ``batch_size``.

The ``refnet spectrum`` command (:mod:`refnet.cli.spectrum`) prints these statistics for one or
more initialisations and writes ``stats.json`` and PNG plots. ``stats.json`` is strict JSON: an
infinite condition number (a zero singular value) is written as the string "inf"
(``float("inf")`` reads it back).
"""

from __future__ import annotations

import numpy as np

from . import kernels
from ._checks import check_bool, check_float, check_int
from .jacobians import check_per_example, check_range, element_budget, jacobian, layer_sizes
from .network import Network, check_net
from ._compat import moved_names
from .progress import Progress, progress_target

__all__ = [
    "singular_values",
    "layer_singular_values",
    "collect_singular_values",
    "summarize",
    "jsv_stats",
    "format_stats",
    "layer_label",
]


# ============================================================================================
# singular values, streamed over batches
# ============================================================================================


def _check_x(net: Network, x) -> np.ndarray:
    x = net.check_input(x, "x")
    if x.shape[0] == 0:
        raise ValueError(f"x must hold at least one example of shape {net.in_shape}, got shape {x.shape}")
    return x


def _zero_rtol(zero_rtol, shape, dtype) -> float:
    if zero_rtol is None:
        return max(shape) * float(np.finfo(dtype).eps)
    return check_float(zero_rtol, "zero_rtol", min_value=0.0)


def _svdvals(J: np.ndarray, zero_rtol, what: str) -> np.ndarray:
    """Singular values (descending) of a stack ``J`` (B, m, n): (B, min(m, n)) in float64.

    Values ``<= rtol * sigma_max`` of their own matrix are set to exactly 0 (see module doc).
    """
    if not np.isfinite(J).all():
        bad = int(J.size - np.count_nonzero(np.isfinite(J)))
        raise FloatingPointError(
            f"{what} has {bad} non-finite entries (the forward pass overflowed); its singular values are undefined"
        )
    if 0 in J.shape:
        return np.zeros((J.shape[0], min(J.shape[1:])), dtype=np.float64)
    s = kernels.batched_svdvals(J).astype(np.float64, copy=False)  # (B, r), descending (LAPACK gesdd; a thread per core)
    return _zero_small(s, _zero_rtol(zero_rtol, J.shape[1:], J.dtype))


def _zero_small(s: np.ndarray, rtol: float) -> np.ndarray:
    """``s`` (B, r), rows descending, with values ``<= rtol * sigma_max`` of their row set to 0."""
    s[s <= rtol * s[:, :1]] = 0.0  # numerically zero (also: the whole row when sigma_max == 0)
    return s


def _layer_svdvals(net, l: int, xb: np.ndarray, trace, fixed: dict, zero_rtol, max_elements) -> np.ndarray:
    """Singular values ``(b, r_l)`` of ``J^{l,l+1}`` for the examples ``xb`` (``trace`` is theirs).

    In order of preference: the layer's closed form (:meth:`refnet.layers.Layer.jacobian_svdvals`:
    pooling, Flatten, a circular convolution's Fourier symbol); for an affine map (a Jacobian
    that does not depend on the input) one example's Jacobian, decomposed once per call and
    shared by every example (kept in ``fixed``); otherwise every example's dense Jacobian, in
    sub-batches of at most ``max_elements`` elements (a forward pass per sub-batch when the
    batch's Jacobians do not fit at once)."""
    layer, params, mask = net.layers[l], net.params[l], net.masks[l]
    n_out, n_in = layer_sizes(net, l)
    what = f"J^({l},{l + 1})"
    rtol = _zero_rtol(zero_rtol, (n_out, n_in), xb.dtype)
    s = layer.jacobian_svdvals(params, trace.caches[l], mask)
    if s is not None:
        return _zero_small(s.astype(np.float64, copy=True), rtol)
    limit = element_budget(max_elements)
    if n_out * n_in > limit:
        raise ValueError(
            f"the layer Jacobian {what} of one example has {n_out * n_in:,} elements, above max_elements={limit:,}; "
            "raise max_elements or leave layerwise off"
        )
    if layer.is_affine_map:
        if l not in fixed:
            one = net.forward(xb[:1], return_trace=True)[1]
            fixed[l] = _svdvals(layer.jacobian(params, one.caches[l], mask), zero_rtol, what)[0]
        return np.broadcast_to(fixed[l], (xb.shape[0], fixed[l].size)).copy()
    step = max(1, limit // (n_out * n_in))
    if step >= xb.shape[0]:
        return _svdvals(layer.jacobian(params, trace.caches[l], mask), zero_rtol, what)
    parts = []
    for b0 in range(0, xb.shape[0], step):
        sub = net.forward(xb[b0 : b0 + step], return_trace=True)[1]
        parts.append(_svdvals(layer.jacobian(params, sub.caches[l], mask), zero_rtol, what))
    return np.concatenate(parts, axis=0)


def _batch_starts(n: int, batch_size) -> tuple[range, int]:
    batch_size = check_int(batch_size, "batch_size", min_value=1)
    return range(0, n, batch_size), batch_size


def collect_singular_values(net, x, start: int = 0, end: int | None = None, batch_size: int = 100, *,
                            layerwise: bool = False, zero_rtol=None, max_elements=None, progress=None):
    """Singular values of ``J^{start,end}`` and (optionally) of every layer Jacobian, in one pass.

    With ``layerwise`` one forward pass per batch serves both (its trace is reused by
    :func:`refnet.jacobians.jacobian` and for the layers); without, :func:`refnet.jacobians.jacobian`
    runs its own forward passes (in cache-sized chunks of examples for CNNs).

    Layer Jacobians (``layerwise``) cost far more than the input-output one: an MLP's ``K``
    layers are ``K`` decompositions per example beside one (25 times the input-output time for
    the papers' 784-100x6-10 MLP), a convolution's ``D M`` is ``(c_out H' W') x (C H W)``. So they
    are opt-in, and each layer takes the cheapest exact route (:func:`_layer_svdvals`): a closed
    form for pooling and Flatten (``J J^T`` a multiple of the identity) and for a linear circular
    convolution (its Fourier symbol), one decomposition for a layer whose Jacobian does not
    depend on the input (a linear convolution, as LeNet-5's), and the per-example dense
    Jacobian only where ``D`` varies (tanh or ReLU layers), in sub-batches within ``max_elements``.

    Parameters
    ----------
    net : Network
    x : ndarray, shape (n_examples, *net.in_shape), n_examples >= 1
    start, end : int
        ``0 <= start < end <= K`` (default end = K: the input-output Jacobian).
    batch_size : int >= 1
        Examples per batch; only one batch of Jacobians is held in memory.
    layerwise : bool
        Also return the singular values of ``J^{l-1,l}`` for the layers ``l = start+1 .. end``
        (default False: see above).
    zero_rtol : float >= 0, optional
        Relative threshold below which a singular value is reported as 0 (module doc).
    max_elements : int, optional
        Budget per Jacobian array, as in :func:`refnet.jacobians.jacobian`; layer Jacobians go in
        sub-batches within it, and one example's above it is refused.
    progress : None, bool or text stream
        A bar over the batches (:mod:`refnet.progress`: None shows one when stderr is a terminal).

    Returns
    -------
    sv : ndarray, shape (n_examples, min(N_end, N_start)), float64, each row descending
    layer_sv : list of ndarray or None
        Entry ``i`` holds the singular values of layer ``l = start + i + 1``,
        shape (n_examples, min(N_l, N_{l-1})).
    """
    check_net(net)
    start, end = check_range(net, start, end)
    x = _check_x(net, x)
    starts, bs = _batch_starts(x.shape[0], batch_size)
    layerwise = check_bool(layerwise, "layerwise")
    progress_target(progress)  # checked before any work
    if layerwise:
        check_per_example(net, 0, net.n_layers, "layerwise singular values")
    sv, layer_sv, fixed = [], [[] for _ in range(start, end)] if layerwise else None, {}
    with Progress(progress, len(starts), desc="Jacobian batch", unit="batches") as bar:
        for i in starts:
            xb = x[i : i + bs]  # (b, *in_shape)
            trace = net.forward(xb, return_trace=True)[1] if layerwise else None
            J = jacobian(net, xb, start, end, trace=trace, max_elements=max_elements)  # (b, N_end, N_start)
            sv.append(_svdvals(J, zero_rtol, f"J^({start},{end})"))
            del J
            if layerwise:
                for k, l in enumerate(range(start, end)):
                    layer_sv[k].append(_layer_svdvals(net, l, xb, trace, fixed, zero_rtol, max_elements))
            bar.update()
    sv = np.concatenate(sv, axis=0)
    if layerwise:
        layer_sv = [np.concatenate(v, axis=0) for v in layer_sv]
    return sv, layer_sv


def singular_values(net, x, start: int = 0, end: int | None = None, batch_size: int = 100, *,
                    zero_rtol=None, max_elements=None, progress=None) -> np.ndarray:
    """Singular values of ``J^{start,end}`` of every example, streamed over ``x`` in batches.

    Parameters
    ----------
    net : Network
    x : ndarray, shape (n_examples, *net.in_shape), n_examples >= 1
    start, end : int
        ``0 <= start < end <= K`` (default: the input-output Jacobian ``J^{0,K}``).
    batch_size : int >= 1
        Memory is bounded by one batch of Jacobians, ``batch_size * N_end * N_start`` floats.
    zero_rtol : float >= 0, optional
        Values ``<= zero_rtol * sigma_max`` of their example are reported as 0; default
        ``max(N_end, N_start) * eps`` (NumPy's rank tolerance); 0 keeps LAPACK's raw values.

    Returns
    -------
    ndarray, shape (n_examples, min(N_end, N_start)), float64, each row descending.
    """
    sv, _ = collect_singular_values(net, x, start, end, batch_size, layerwise=False,
                                    zero_rtol=zero_rtol, max_elements=max_elements, progress=progress)
    return sv


def layer_singular_values(net, x, batch_size: int = 100, *, zero_rtol=None, max_elements=None, progress=None) -> list:
    """Singular values of every layer Jacobian ``J^{l-1,l}`` (``= D^l W^l``), per example.

    Streamed over ``x`` in batches like :func:`singular_values`, each layer by the cheapest
    exact route (closed forms, one decomposition for an input-independent Jacobian, dense
    per-example Jacobians otherwise: :func:`collect_singular_values`).

    Returns
    -------
    list of ndarray
        Entry ``l-1`` has shape ``(n_examples, min(N_l, N_{l-1}))``, rows descending. Parameter-free
        layers are included (Flatten gives all ones).
    """
    check_net(net)
    x = _check_x(net, x)
    starts, bs = _batch_starts(x.shape[0], batch_size)
    progress_target(progress)  # checked before any work
    check_per_example(net, 0, net.n_layers, "layer_singular_values")
    out, fixed = [[] for _ in net.layers], {}
    with Progress(progress, len(starts), desc="Jacobian batch", unit="batches") as bar:
        for i in starts:
            xb = x[i : i + bs]
            trace = net.forward(xb, return_trace=True)[1]
            for l in range(net.n_layers):
                out[l].append(_layer_svdvals(net, l, xb, trace, fixed, zero_rtol, max_elements))
            bar.update()
    return [np.concatenate(v, axis=0) for v in out]


# ============================================================================================
# statistics
# ============================================================================================


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` with ``x / 0 = inf`` for every x >= 0 (no RuntimeWarning)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.inf)
    np.divide(num, den, out=out, where=den > 0)
    return out


def layer_label(net, l: int) -> str:
    """The name of ``net.layers[l]`` in reports: its type and activation, e.g. ``Dense[tanh]``."""
    layer = net.layers[l]
    act = getattr(layer, "activation", None)
    return type(layer).__name__ + (f"[{act.name}]" if act is not None and hasattr(act, "name") else "")


def summarize(sv, layer_sv=None, *, epsilon: float = 0.1, layers=None, layer_names=None) -> dict:
    """Statistics of singular values already computed (see :func:`jsv_stats` for the keys).

    Parameters
    ----------
    sv : ndarray, shape (n_examples, r)
        Singular values of ``J^{start,end}``, one row per example.
    layer_sv : list of ndarray (n_examples, r_l), optional
        Singular values of the layer Jacobians (adds the layerwise keys).
    epsilon : float > 0
        Tolerance of layerwise dynamical isometry, ``|1 - sigma| <= epsilon``.
    layers, layer_names : list, optional
        Paper layer numbers ``l`` and names of the entries of ``layer_sv`` (default 1, 2, ...).
    """
    epsilon = check_float(epsilon, "epsilon", min_value=0.0)
    sv = np.asarray(sv, dtype=np.float64)
    if sv.ndim != 2 or sv.shape[0] == 0 or sv.shape[1] == 0:
        raise ValueError(f"sv must be a non-empty (n_examples, r) array, got shape {sv.shape}")
    smax = sv.max(axis=1)  # (n,)
    smin = sv.min(axis=1)  # (n,)
    cn_ex = _ratio(smax, smin)  # (n,) per-example sigma_max / sigma_min
    vmin, vmax = float(smin.min()), float(smax.max())
    out = {
        "mean": float(sv.mean()),
        "std": float(sv.std()),
        "min": vmin,
        "max": vmax,
        "cn": float(_ratio(vmax, vmin)),
        "cn_mean": float(cn_ex.mean()) if np.isfinite(cn_ex).all() else float("inf"),
        "cn_median": float(np.median(cn_ex)),
        "n_examples": int(sv.shape[0]),
        "n_values": int(sv.size),
    }
    if layer_sv is not None:
        layer_sv = [np.asarray(v, dtype=np.float64) for v in layer_sv]
        layers = list(range(1, len(layer_sv) + 1)) if layers is None else [int(l) for l in layers]
        out["layers"] = layers
        if layer_names is not None:
            out["layer_names"] = [str(s) for s in layer_names]
        out["ldi_epsilon"] = epsilon
        out["ldi"] = [float(np.count_nonzero(np.abs(1.0 - v) <= epsilon) / v.size) if v.size else 1.0 for v in layer_sv]
        out["layer_mean"] = [float(v.mean()) if v.size else float("nan") for v in layer_sv]
        out["layer_min"] = [float(v.min()) if v.size else float("nan") for v in layer_sv]
        out["layer_max"] = [float(v.max()) if v.size else float("nan") for v in layer_sv]
    return out


def jsv_stats(net, x, *, start: int = 0, end: int | None = None, batch_size: int = 100, epsilon: float = 0.1,
              layerwise: bool = False, zero_rtol=None, max_elements=None, progress=None) -> dict:
    """Jacobian singular value statistics of ``J^{start,end}`` over the examples ``x``.

    Parameters
    ----------
    net : Network
    x : ndarray, shape (n_examples, *net.in_shape), n_examples >= 1
    start, end : int
        ``0 <= start < end <= K``; default the input-output Jacobian ``J^{0,K}`` (PAPER.md section 6).
    batch_size : int >= 1
        Examples per batch (memory: one batch of Jacobians). The result does not depend on it.
    epsilon : float >= 0
        Layerwise dynamical isometry tolerance ``|1 - sigma| <= epsilon`` (PAPER.md section 3).
    layerwise : bool
        Add the layerwise keys for the layers ``l = start+1 .. end`` (default False: the layer
        Jacobians cost many times the input-output statistics; see :func:`collect_singular_values`).
    zero_rtol : float >= 0, optional
        See :func:`singular_values`.
    progress : None, bool or text stream
        A bar over the batches (:mod:`refnet.progress`: None shows one when stderr is a terminal).

    Returns
    -------
    dict of plain Python numbers and lists:
        ``mean``, ``std`` (population, ddof 0), ``min``, ``max`` over ALL singular values of all
        examples pooled; ``cn = max / min`` of the pooled values (the SPP tables); ``cn_mean``,
        the mean over examples of ``sigma_max / sigma_min`` ([DI]); ``cn_median``, its median;
        ``n_examples``; ``n_values``. A zero singular value gives ``inf`` for the CNs it enters.
        With ``layerwise``: ``layers`` (paper numbers ``l``), ``layer_names``, ``ldi`` (per layer
        the fraction of singular values of ``J^{l-1,l}`` with ``|1 - sigma| <= epsilon``),
        ``ldi_epsilon``, ``layer_mean``, ``layer_min``, ``layer_max``.
    """
    check_net(net)
    start, end = check_range(net, start, end)
    epsilon = check_float(epsilon, "epsilon", min_value=0.0)
    sv, layer_sv = collect_singular_values(net, x, start, end, batch_size, layerwise=layerwise,
                                           zero_rtol=zero_rtol, max_elements=max_elements, progress=progress)
    layers = list(range(start + 1, end + 1))
    names = [layer_label(net, l - 1) for l in layers]
    out = summarize(sv, layer_sv, epsilon=epsilon, layers=layers, layer_names=names)
    out["start"], out["end"] = start, end
    return out


def format_stats(stats: dict, title: str | None = None) -> str:
    """An aligned text table of :func:`jsv_stats` output (numbers in ``%.3e`` as the SPP tables)."""
    if not isinstance(stats, dict) or "mean" not in stats:
        raise TypeError(f"stats must be a dict from jsv_stats, got {type(stats).__name__}")

    def e(v) -> str:
        return f"{v:.3e}" if np.isfinite(v) else str(v)

    lines = []
    head = title or ""
    where = f"J^({stats['start']},{stats['end']})" if "start" in stats else "J"
    lines.append(
        (head + ": " if head else "")
        + f"singular values of {where}, {stats['n_examples']} examples, {stats['n_values']} values pooled"
    )
    cols = ["mean", "std", "min", "max", "CN", "CN mean", "CN median"]
    vals = [stats["mean"], stats["std"], stats["min"], stats["max"], stats["cn"], stats["cn_mean"], stats["cn_median"]]
    lines.append("  " + " ".join(f"{c:>10}" for c in cols))
    lines.append("  " + " ".join(f"{e(v):>10}" for v in vals))
    if "ldi" in stats:
        lines.append(f"  layer Jacobians J^(l-1,l); LDI = fraction with |1 - sigma| <= {stats['ldi_epsilon']:g}")
        names = stats.get("layer_names") or [""] * len(stats["ldi"])
        w = max([5] + [len(n) for n in names])
        lines.append(f"  {'l':>3}  {'layer':<{w}} {'mean':>10} {'min':>10} {'max':>10} {'LDI':>7}")
        for l, n, m, lo, hi, f in zip(stats["layers"], names, stats["layer_mean"], stats["layer_min"],
                                       stats["layer_max"], stats["ldi"]):
            lines.append(f"  {l:>3}  {n:<{w}} {e(m):>10} {e(lo):>10} {e(hi):>10} {f:>7.3f}")
    return "\n".join(lines)


# ============================================================================================
# the `refnet spectrum` command moved to refnet.cli.spectrum: the old names warn and forward
# ============================================================================================

__getattr__ = moved_names(__name__, {"add_spectrum_arguments": "refnet.cli.spectrum:add_arguments",
                                     "run_spectrum": "refnet.cli.spectrum:run"})
