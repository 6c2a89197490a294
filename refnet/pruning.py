r"""Pruning: the scores (SNIP, SynFlow, magnitude, random) and the one method dispatch.

Scores (each a list with one dict per layer, keys and shapes as ``net.params``; ``{}`` for
parameter-free layers; "W" always, "b" only when asked for):

* :func:`connection_sensitivity` -- SNIP's connection sensitivity (PAPER.md section 4). With an
  auxiliary mask ``c`` on the weights, ``L(c * w)``,

  .. math:: g_j = \frac{\partial L(c \odot w)}{\partial c_j}\Big|_{c=1}
                = \frac{\partial L}{\partial w_j}\, w_j, \qquad
            s_j = \frac{|g_j|}{\sum_k |g_k|}.

  For a network that already carries a mask ``m`` the auxiliary ``c`` multiplies its effective
  weights ``m * w``, so ``g_j = (dL/dW_eff)_j (m_j w_j)``, which is zero on pruned entries.
  (:func:`refnet.prop1.mask_gradients` is the derivative with respect to ``m`` itself, which is the
  sensitivity of re-adding a pruned connection; the two agree on kept entries.)
  The loss may be supervised ("cross_entropy", "mse", a callable) or one of the unsupervised
  losses of PAPER.md section 9 (:data:`UNSUPERVISED_LOSSES`, see :func:`unsupervised_targets`).
* :func:`random_scores`, :func:`magnitude_scores` -- baselines (PAPER.md section 12).
* :func:`synflow_scores` -- SynFlow (Tanaka et al. 2020), data-free, with
  :func:`synflow_objective` (its ``R``) and the iterative :func:`synflow_prune`.

Second-order saliency (GraSP, OBD, layer-wise OBS) lives in :mod:`refnet.saliency`; the dispatch
below makes it a method like the others.

Masks: :func:`snip` is connection sensitivity followed by a global top-k; :func:`masks_for`
dispatches a method name (:data:`METHODS`) to its scores and mask, and :func:`prune_network` a name
of :data:`NETWORK_METHODS` to the pruned network (the masks applied, or, for L-OBS, the masks and
the compensating update of the kept weights). Turning scores into masks
(:func:`prune`, :func:`top_k_mask`, :func:`kth_largest`, :func:`keep_count`, the ranking rules,
:func:`pruning_report`) has one home, :mod:`refnet.masks`; those names are re-exported here.

Layer indices are code indices (``net.layers[i]``, 0-based); the paper numbers weight layers
from 1. No function here changes the network it is given.
"""

from __future__ import annotations

import warnings

import numpy as np

from ._checks import as_rng, check_choice, check_int
from .layers import Add, AvgPool2d, Conv2d, Dense, Flatten, GlobalAvgPool2d, MaxPool2d, SubsamplePad
from .layers.base import where_kept
from .losses import cross_entropy, get_loss, softmax
from .network import Network, check_net
from .masks import (  # re-exported: refnet.pruning has always offered them
    ROUNDINGS,
    LayerCollapseWarning,
    check_bool,
    check_rounding,
    format_pruning_report,
    keep_count,
    kth_largest,
    prune,
    pruning_report,
    ranked_keys,
    resolve_density,
    top_k_mask,
    warn_collapse,
)
from .progress import Progress, progress_target
from .saliency import GRASP_TEMPERATURE, grasp_scores, obd_scores, obs_prune

__all__ = [
    "LayerCollapseWarning",
    "UNSUPERVISED_LOSSES",
    "connection_sensitivity",
    "unsupervised_targets",
    "random_scores",
    "magnitude_scores",
    "synflow_scores",
    "synflow_objective",
    "synflow_prune",
    "prune",
    "snip",
    "pruning_report",
    "format_pruning_report",
    "keep_count",
    "ROUNDINGS",
    "top_k_mask",
    "kth_largest",
    "METHODS",
    "DATA_METHODS",
    "UPDATE_METHODS",
    "NETWORK_METHODS",
    "check_method_options",
    "masks_for",
    "prune_network",
]

#: the unsupervised losses of PAPER.md section 9 (refnet's definitions)
UNSUPERVISED_LOSSES = ("uniform", "pred_raw", "pred_softmax")

#: layers whose SynFlow copy is the layer itself (linear, or piecewise linear like MaxPool2d)
_PARAM_FREE = (AvgPool2d, MaxPool2d, GlobalAvgPool2d, Flatten)


# -------------------------------------------------------------------------------------------
# argument checks
# -------------------------------------------------------------------------------------------


def _loss_kind(loss):
    """("unsupervised", name) or ("supervised", loss function)."""
    if isinstance(loss, str):
        key = loss.lower().replace("-", "_")
        if key in UNSUPERVISED_LOSSES:
            return "unsupervised", key
        try:
            return "supervised", get_loss(loss)
        except ValueError:
            raise ValueError(
                f"loss must be one of ['cross_entropy', 'mse', 'uniform', 'pred_raw', 'pred_softmax'] "
                f"or a callable (z, y) -> (loss, eps), got {loss!r}"
            ) from None
    if callable(loss):
        return "supervised", loss
    raise TypeError(f"loss must be a name or a callable (z, y) -> (loss, eps), got {type(loss).__name__}")


# -------------------------------------------------------------------------------------------
# connection sensitivity (SNIP) and the unsupervised losses
# -------------------------------------------------------------------------------------------


def _targets_from_output(z: np.ndarray, kind: str) -> np.ndarray:
    B, C = z.shape
    if kind == "uniform":
        return np.full((B, C), 1.0 / C, dtype=z.dtype)
    if kind == "pred_raw":
        t = np.zeros((B, C), dtype=z.dtype)
        t[np.arange(B), z.argmax(axis=1)] = 1.0  # first arg-max on ties
        return t
    return softmax(z)  # pred_softmax: a constant array, no gradient flows through it


def unsupervised_targets(net, x, kind: str) -> np.ndarray:
    r"""Targets ``t`` of the unsupervised losses of PAPER.md section 9 (refnet's definitions).

    Each loss is the mean softmax cross-entropy against these targets,
    ``L = -(1/B) sum_i sum_j t_ij log softmax(z_i)_j``, with ``z = net(x)`` and ``t`` held
    constant (no gradient flows through ``t``):

    ``"uniform"``       ``t_ij = 1/C``, so ``L = -(1/B) sum_i (1/C) sum_j log softmax(z_i)_j``
                        (the public SPP code's uniform-label loss).
    ``"pred_raw"``      ``t_i = onehot(argmax_j z_ij)`` (first arg-max on ties): the net's own
                        initial prediction.
    ``"pred_softmax"``  ``t_i = softmax(z_i)``: the net's own soft prediction. Note that
                        ``dL/dz = softmax(z) - t = 0`` here, so this loss is stationary at the
                        current weights and its gradients are zero up to rounding.

    Parameters
    ----------
    net : Network
        Output ``(B, C)`` logits.
    x : ndarray, shape (B, *net.in_shape)
    kind : {"uniform", "pred_raw", "pred_softmax"}

    Returns
    -------
    ndarray, shape (B, C), the network's dtype
    """
    check_net(net)
    kind = check_choice(kind, "kind", UNSUPERVISED_LOSSES)
    x = net.check_input(x, "x")
    z = net.forward(x)
    if z.ndim != 2:
        raise ValueError(f"the network output must be (B, C) logits for a loss, got shape {z.shape}")
    return _targets_from_output(z, kind)


def connection_sensitivity(
    net,
    x,
    y=None,
    loss="cross_entropy",
    *,
    batch_size=None,
    include_bias: bool = False,
    normalize: bool = True,
) -> list[dict]:
    r"""SNIP's connection sensitivity ``|dL/dc|`` at ``c = 1`` (PAPER.md section 4).

    .. math:: g_j = \frac{\partial L(c \odot w)}{\partial c_j}\Big|_{c = 1}
                  = \frac{\partial L}{\partial w_j}\, w_j, \qquad
              s_j = \frac{|g_j|}{\sum_k |g_k|}\ \ (\text{normalize=True}),

    where the sum runs over every scored entry (all weights, plus all biases when
    ``include_bias``). For a masked network the auxiliary ``c`` multiplies the effective weights,
    ``g_j = (dL/dW_eff)_j (m_j w_j)``, so pruned entries score exactly 0. The gradient comes from
    the network's hand-derived backward pass (``g_j = grad_j * w_j`` with the masked gradient).

    Batches: with ``batch_size=None`` ``L`` is the mean loss over all of ``x`` (SNIP scores one
    mini-batch). With ``batch_size=n`` the rows of ``x`` are cut into consecutive batches of ``n``
    (the last may be smaller) and, as in the SPP code, the per-batch gradients of the per-batch
    MEAN loss are SUMMED before the absolute value: ``s_j ∝ |sum_batches dL_batch/dc_j|``.

    Parameters
    ----------
    net : Network
        Must output ``(B, C)``.
    x : ndarray, shape (B, *net.in_shape)
    y : ndarray, shape (B,) int labels or (B, C) targets; ignored (may be None) for the
        unsupervised losses.
    loss : str or callable
        "cross_entropy", "mse", a callable ``(z, y) -> (loss, eps)``, or an unsupervised loss
        "uniform", "pred_raw", "pred_softmax" (targets from :func:`unsupervised_targets`, used
        with the cross-entropy; for "pred_softmax" the gradient vanishes, see there; a
        warning says so).
    batch_size : int >= 1, optional
    include_bias : bool
        Also score the biases (the official SNIP code does; zero biases score exactly 0).
    normalize : bool
        Divide by the total ``sum_k |g_k|`` (when that is 0 every score is 0 and stays 0).

    Returns
    -------
    list of dict
        Per layer ``{"W": (shape of W)}`` (plus "b" when ``include_bias`` and the layer has one);
        ``{}`` for parameter-free layers. float, the network's dtype, non-negative.
    """
    check_net(net)
    include_bias = check_bool(include_bias, "include_bias")
    normalize = check_bool(normalize, "normalize")
    kind, fn = _loss_kind(loss)
    x = net.check_input(x, "x")
    B = x.shape[0]
    if B == 0:
        raise ValueError(f"x must hold at least one example, got shape {x.shape}")
    bs = B if batch_size is None else check_int(batch_size, "batch_size", min_value=1)
    if kind == "supervised":
        if y is None:
            raise ValueError(f"y must be given for the supervised loss {loss!r} (y=None only for {list(UNSUPERVISED_LOSSES)})")
        y = np.asarray(y)
        if y.ndim == 0 or y.shape[0] != B:
            raise ValueError(f"y must have one row per row of x ({B}), got shape {y.shape}")
    elif fn == "pred_softmax":
        warnings.warn(
            "loss='pred_softmax': the cross-entropy against the network's own softmax held constant "
            "has dL/dz = softmax(z) - t = 0 at the current weights, so every connection sensitivity "
            "is zero up to rounding and the ranking is not informative",
            RuntimeWarning,
            stacklevel=2,
        )
    keys = ranked_keys(net, include_bias)
    # dL/dc multiplies the EFFECTIVE weights where(m, w, 0): a NaN stored at a pruned position
    # contributes 0, not 0 * NaN (the masked gradient is 0 there, so finite weights score the same)
    eff = [{k: where_kept(net.params[i][k], net.masks[i][k]) for k in ks} for i, ks in enumerate(keys)]
    acc = None  # the first batch's products start the sums (no zeros to add to)
    for start in range(0, B, bs):
        xb = x[start : start + bs]  # (b, *in_shape)
        z, trace = net.forward(xb, return_trace=True)  # (b, C)
        if z.ndim != 2:
            raise ValueError(f"the network output must be (B, C) logits for a loss, got shape {z.shape}")
        if kind == "unsupervised":
            _, eps = cross_entropy(z, _targets_from_output(z, fn))  # (b, C)
        else:
            _, eps = fn(z, y[start : start + bs])
        grads = net.backward(trace, eps)  # masked: m * dL/dW_eff
        if acc is None:
            acc = [{k: np.multiply(grads[i][k], eff[i][k]) for k in ks} for i, ks in enumerate(keys)]
            continue
        for i, ks in enumerate(keys):
            for k in ks:
                acc[i][k] += grads[i][k] * eff[i][k]  # dL/dc = (m dL/dW_eff) * w
    scores = [{k: np.abs(v, out=v) for k, v in d.items()} for d in acc]  # our own arrays
    if normalize:
        total = sum(float(v.sum()) for d in scores for v in d.values())
        if total > 0:
            scores = [{k: v / total for k, v in d.items()} for d in scores]
    return scores


# -------------------------------------------------------------------------------------------
# baselines
# -------------------------------------------------------------------------------------------


def random_scores(net, seed, *, include_bias: bool = False) -> list[dict]:
    """Uniform random scores in [0, 1), reproducible from ``seed``.

    Draws, layer by layer, one array for "W" and then one for "b" (when the layer has one) from
    ``numpy.random.default_rng(seed)``, so the weight scores do not depend on ``include_bias``.

    Parameters
    ----------
    net : Network
    seed : int or numpy.random.Generator
    include_bias : bool
        Also return the bias scores.
    """
    check_net(net)
    include_bias = check_bool(include_bias, "include_bias")
    if seed is None:
        raise TypeError("seed must be an int or a numpy.random.Generator (random scores must be reproducible), got None")
    rng = as_rng(seed)
    out = []
    for p in net.params:
        d = {}
        for k in ("W", "b"):
            if k in p:
                s = rng.random(p[k].shape)
                if k == "W" or include_bias:
                    d[k] = s
        out.append(d)
    return out


def magnitude_scores(net, *, include_bias: bool = False) -> list[dict]:
    """Magnitude scores ``|m * w|`` of the effective weights (pruned entries score 0).

    Parameters
    ----------
    net : Network
    include_bias : bool
        Also return ``|m_b * b|``.
    """
    check_net(net)
    include_bias = check_bool(include_bias, "include_bias")
    keys = ranked_keys(net, include_bias)
    return [{k: np.abs(where_kept(net.params[i][k], net.masks[i][k])) for k in ks} for i, ks in enumerate(keys)]


# -------------------------------------------------------------------------------------------
# SynFlow
# -------------------------------------------------------------------------------------------


def _synflow_copy(net: Network):
    """The linear, bias-free copy of every layer (activations replaced by the identity), its
    parameters (``|m * W|``; BatchNorm: ``|gamma|``, ``beta = 0``) and buffers (BatchNorm in eval
    mode with running mean 0 and the network's running variance: the diagonal scaling
    ``|gamma| / sqrt(var + eps)``, as Synaptic-Flow scores a model in eval mode)."""
    layers, params, buffers = [], [], []
    for i, layer in enumerate(net.layers):
        p, m, buf = net.params[i], net.masks[i], net.buffers[i]
        q, b = {}, {}
        if isinstance(layer, Dense):
            new = Dense(layer.n_in, layer.n_out, bias=False)
        elif isinstance(layer, Conv2d):
            new = Conv2d(layer.c_in, layer.c_out, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                         padding_mode=layer.padding_mode, bias=False)
        elif "running_var" in buf:  # BatchNorm1d / BatchNorm2d
            new = type(layer)(layer.num_features, eps=layer.eps, momentum=layer.momentum, affine=layer.affine, mode="eval")
            if layer.affine:
                g_m = m.get("gamma")
                q = {"gamma": np.abs(p["gamma"] if g_m is None else where_kept(p["gamma"], g_m)).astype(np.float64),
                     "beta": np.zeros(layer.num_features)}
            b = {"running_mean": np.zeros(layer.num_features), "running_var": np.asarray(buf["running_var"], np.float64)}
        elif isinstance(layer, Add):
            new = Add(n_inputs=layer.n_inputs)
        elif isinstance(layer, _PARAM_FREE + (SubsamplePad,)):
            new = layer
        else:
            raise TypeError(f"synflow does not know layers[{i}] of type {type(layer).__name__}")
        if "W" in p:
            q = {"W": np.abs(where_kept(p["W"], m["W"])).astype(np.float64)}
        layers.append(new)
        params.append(q)
        buffers.append(b)
    return layers, params, buffers


def _synflow_graph_pass(net: Network, layers, params, buffers):
    """SynFlow on a network with shortcuts: one unscaled pass of the linear copy on the same graph
    (the per-layer rescaling of the chain is exact only for chains: a path around a block skips
    its factors)."""
    copy = Network(layers, in_shape=net.in_shape, dtype=np.float64, params=params, buffers=buffers, inputs=net.inputs)
    out, trace = copy.forward(np.ones((1, *net.in_shape)), return_trace=True)
    R = float(out.sum())  # 1^T x^K
    if not np.isfinite(R):
        raise ValueError(f"synflow: R = 1^T x^K overflows float64 on this {len(layers)}-layer network with shortcuts "
                         "(no exact rescaling exists across an Add)")
    if R == 0.0:
        return [{k: np.zeros_like(v) for k, v in q.items() if k == "W"} for q in params], -np.inf, 0.0
    grads = copy.backward(trace, np.ones_like(out))  # dR/dtheta
    scores = [{"W": g["W"] * q["W"]} if "W" in q else {} for g, q in zip(grads, params)]
    return scores, 0.0, R


def _synflow_pass(net: Network):
    r"""Rescaled SynFlow forward and backward.

    Returns ``(scores', log_P, R')`` with ``R = exp(log_P) R'`` and ``scores = exp(log_P) scores'``.
    The signal after every layer is divided by its maximum ``a_l`` (``x^l <- x^l / a_l``), which is
    the same as using ``|W^l| / a_l``: ``R`` is multilinear in the layers, so ``R' = R / P`` with
    ``P = prod_l a_l``, and each score ``dR/d|w| |w|`` is divided by the same ``P``.
    """
    layers, params, buffers = _synflow_copy(net)
    if not net.is_chain:
        return _synflow_graph_pass(net, layers, params, buffers)
    absw = [{**q, **b} for q, b in zip(params, buffers)]  # BatchNorm: the running statistics beside
    x = np.ones((1, *net.in_shape), dtype=np.float64)  # x^0 = 1
    caches, scales = [], []
    for layer, p in zip(layers, absw):
        y, cache = layer.forward(p, x, None)  # (1, *out_shape), non-negative
        a = float(y.max()) if y.size else 0.0
        if not a > 0.0:  # no signal reaches this layer: R = 0 and every score is 0
            zeros = [{k: np.zeros_like(v) for k, v in q.items() if k == "W"} for q in params]
            return zeros, -np.inf, 0.0
        x = y / a
        caches.append(cache)
        scales.append(a)
    R_prime = float(x.sum())  # 1^T x^K
    g = np.ones_like(x)  # dR'/dx^K
    scores = [{} for _ in layers]
    for i in range(len(layers) - 1, -1, -1):
        g = g / scales[i]  # dR'/dy for y = a_i x^i
        g_x, grads = layers[i].vjp(absw[i], caches[i], g, None, input_grad=i > 0)
        if "W" in params[i]:
            scores[i] = {"W": grads["W"] * params[i]["W"]}  # dR'/d|w| * |w|
        g = g_x
    return scores, float(np.sum(np.log(scales))), R_prime


def _check_in_shape(net: Network, in_shape) -> None:
    if in_shape is None:
        return
    shape = (int(in_shape),) if isinstance(in_shape, (int, np.integer)) else tuple(in_shape)
    if shape != tuple(net.in_shape):
        raise ValueError(f"in_shape must be None or the network's input shape {net.in_shape}, got {in_shape!r}")


def synflow_objective(net, *, log: bool = False) -> float:
    r"""SynFlow's objective ``R = 1^T (prod_l |W^l|) 1``, or ``log R`` when ``log=True``.

    ``R`` is the sum of the outputs of the linearised copy of the network (every activation the
    identity, biases zero, every weight its absolute effective value ``|m * W|``; pooling and
    flatten layers unchanged, MaxPool2d routing through its arg-max on this positive signal) on
    the all-ones input. It is computed with per-layer rescaling (see :func:`synflow_scores`), so
    ``log R`` is finite for any depth; ``R`` itself may overflow to ``inf`` (``log=False``).
    ``R = 0`` (``log R = -inf``) when no path connects input and output.
    """
    check_net(net)
    log = check_bool(log, "log")
    _, log_P, R_prime = _synflow_pass(net)
    if R_prime == 0.0:
        return -np.inf if log else 0.0
    log_R = log_P + float(np.log(R_prime))
    if log:
        return log_R
    with np.errstate(over="ignore"):
        return float(np.exp(log_R))


def synflow_scores(net, in_shape=None, *, normalize: bool = True) -> list[dict]:
    r"""SynFlow scores (Tanaka et al. 2020), data-free, on the network's current masks.

    .. math:: R = \mathbf 1^T \Big(\prod_{l} |W^l|\Big) \mathbf 1, \qquad
              S_j = \Big|\frac{\partial R}{\partial w_j} w_j\Big|
                  = \frac{\partial R}{\partial |w_j|} |w_j|,

    evaluated on a linear, bias-free copy of the network with every weight replaced by its
    absolute effective value ``|m * W|`` (activations -> identity, biases ignored, AvgPool and
    flatten linear, MaxPool2d routed by its arg-max on the positive all-ones-input signal) and the
    all-ones input ``x^0 = 1``. Pruned weights score 0. BatchNorm becomes the diagonal scaling
    ``|gamma| / sqrt(running_var + eps)`` (eval mode with mean and ``beta`` 0, as Synaptic-Flow
    scores a model in eval mode; gamma is not scored); residual additions stay sums, and a network
    with shortcuts is evaluated in one unscaled pass (a ``ValueError`` if ``R`` overflows float64),
    since the per-layer rescaling below is exact only for chains.

    Conservation (Tanaka et al., Theorem 1): for every affine layer ``sum_j S_j = R`` (Euler's
    theorem: ``R`` is positively 1-homogeneous in each layer), so all layers have the same total.

    Overflow: ``R`` grows like the product of the layer gains. The forward signal is divided by
    its maximum ``a_l`` after every layer (equivalently ``|W^l| -> |W^l| / a_l``); ``R`` is
    multilinear in the layers, so this divides every score by the same ``P = prod_l a_l`` and
    leaves the global ranking (and the normalised scores) unchanged, for any depth.

    Parameters
    ----------
    net : Network
    in_shape : tuple, optional
        Accepted for parity with the reference code; must be None or ``net.in_shape``.
    normalize : bool
        True: ``S_j / sum_k S_k`` (always finite). False: the true ``S_j``; raises
        OverflowError when they do not fit in float64.

    Returns
    -------
    list of dict
        ``{"W": ...}`` per affine layer (float64), ``{}`` for the others.
    """
    check_net(net)
    _check_in_shape(net, in_shape)
    normalize = check_bool(normalize, "normalize")
    scores, log_P, _ = _synflow_pass(net)
    if normalize:
        total = sum(float(d["W"].sum()) for d in scores if d)
        return [{k: v / total for k, v in d.items()} if total > 0 else d for d in scores]
    if not np.isfinite(log_P):
        return scores  # R = 0: all zero
    with np.errstate(over="ignore", under="ignore"):
        factor = float(np.exp(log_P))
        out = [{k: v * factor for k, v in d.items()} for d in scores]
    for d, s in zip(out, scores):
        for k in d:
            if not np.isfinite(d[k]).all() or np.any((d[k] == 0) != (s[k] == 0)):
                raise OverflowError(
                    f"the unnormalised SynFlow scores do not fit in float64 (log R = {log_P:.1f} + "
                    f"log of an O(1) factor); use normalize=True (same ranking)"
                )
    return out


def synflow_prune(
    net,
    sparsity=None,
    *,
    density=None,
    iterations: int = 100,
    scope: str = "global",
    rounding: str = "half_even",
    warn: bool = True,
    progress=None,
) -> list[dict]:
    r"""Iterative SynFlow pruning with the exponential schedule (Tanaka et al. 2020).

    For ``k = 1..n`` (``n = iterations``): score the network with its current mask
    (:func:`synflow_scores`), then prune to density ``d^(k/n)`` with :func:`prune`
    (``d = 1 - sparsity``), pruned entries staying pruned. The last step keeps exactly
    ``round(m d)`` weights (``rounding="synflow"``: ``m - int((1 - d) m)``, Synaptic-Flow's
    count, at every step). Biases are never pruned.

    Parameters
    ----------
    net : Network
    sparsity : float in [0, 1), optional
    density : float in (0, 1], optional
        Exactly one of the two.
    iterations : int >= 1
    scope : {"global", "layer"}
    rounding : {"half_even", "half_up", "synflow"}
        The keep count of every step (:func:`keep_count`).
    warn : bool
        Warn (:class:`LayerCollapseWarning`) about the final mask.
    progress : None, bool or text stream
        A bar over the rounds (:mod:`refnet.progress`: None shows one when stderr is a terminal).

    Returns
    -------
    list of dict
        Masks shaped like ``net.params``.
    """
    check_net(net)
    d = resolve_density(sparsity, density)
    n = check_int(iterations, "iterations", min_value=1)
    scope = check_choice(scope, "scope", ("global", "layer"))
    rounding = check_rounding(rounding)
    warn = check_bool(warn, "warn")
    progress_target(progress)  # checked before any work
    cur = net
    masks = None
    with Progress(progress, n, desc="SynFlow round", unit="rounds") as bar:
        for k in range(1, n + 1):
            dk = d ** (k / n)
            masks = prune(cur, synflow_scores(cur), density=dk, scope=scope, rounding=rounding, warn=False)
            cur = net.with_masks(masks)
            bar.update(postfix=lambda: f"density {dk:.4g}")
    if warn:
        warn_collapse(net, masks, stacklevel=3)
    return masks


# -------------------------------------------------------------------------------------------
# masks
# -------------------------------------------------------------------------------------------


def snip(
    net,
    x,
    y=None,
    sparsity=None,
    *,
    density=None,
    loss="cross_entropy",
    batch_size=None,
    include_bias: bool = False,
    scope: str = "global",
    warn: bool = True,
) -> list[dict]:
    r"""SNIP: connection sensitivity, then keep the top ``k = round(m (1 - sparsity))``.

    ``masks = prune(net, |dL/dc|, sparsity, scope=scope, include_bias=include_bias)`` with the
    scores of :func:`connection_sensitivity` (see there for ``loss``, ``batch_size`` and
    ``include_bias``). The ranking uses the unnormalised ``|g_j|``: dividing by the positive total
    does not change the order (and can only merge near-equal floats into ties).

    Returns
    -------
    list of dict
        Boolean masks shaped like ``net.params``; apply with ``net.with_masks(masks)``.

    Examples
    --------
    >>> masks = snip(net, X[:100], y[:100], sparsity=0.9)   # doctest: +SKIP
    """
    check_net(net)
    resolve_density(sparsity, density)  # fail before the backward pass
    check_choice(scope, "scope", ("global", "layer"))
    check_bool(warn, "warn")
    scores = connection_sensitivity(net, x, y, loss, batch_size=batch_size, include_bias=include_bias, normalize=False)
    return prune(net, scores, sparsity, density=density, scope=scope, include_bias=include_bias, warn=warn)


#: the pruning methods of :func:`masks_for` (the ``--method`` / ``--prune`` names of the commands)
METHODS = ("snip", "uniform", "pred_raw", "pred_softmax", "random", "magnitude", "synflow", "grasp", "obd", "obd_gn")

#: the methods of :data:`METHODS` that score examples ``x``: connection sensitivity and the
#: second-order saliencies of :mod:`refnet.saliency` (GraSP, OBD with either diagonal)
DATA_METHODS = ("snip",) + UNSUPERVISED_LOSSES + ("grasp", "obd", "obd_gn")

#: the methods that change the kept weights as well as the masks (L-OBS's compensating update):
#: :func:`prune_network` runs them, :func:`masks_for` refuses them
UPDATE_METHODS = ("lobs",)

#: every method of :func:`prune_network` (the ``refnet prune --method`` names)
NETWORK_METHODS = METHODS + UPDATE_METHODS

_SECOND_ORDER = ("grasp", "obd", "obd_gn")  # scored as one batch, with labels, at a temperature

#: option -> the methods that use it (any other method refuses it when given)
_USES = {
    "batch_size": ("snip",) + UNSUPERVISED_LOSSES,
    "temperature": _SECOND_ORDER,
    "damp": UPDATE_METHODS,
}


def check_method_options(method: str, *, scope=None, batch_size=None, temperature=None, damp=None) -> str:
    """``method`` checked against :data:`NETWORK_METHODS` (its canonical name is returned) with the
    options given to it: a ValueError naming an option the method does not use (``batch_size``
    is for connection sensitivity, ``temperature`` for grasp / obd / obd_gn, ``damp`` for lobs),
    and for ``scope="global"`` with "lobs" (layer-wise only). None means "not given". The
    commands call it before any work; :func:`masks_for` and :func:`prune_network` call it too."""
    method = check_choice(method, "method", NETWORK_METHODS)
    if scope is not None:
        scope = check_choice(scope, "scope", ("global", "layer"))
    for name, value in (("batch_size", batch_size), ("temperature", temperature), ("damp", damp)):
        if value is not None and method not in _USES[name]:
            raise ValueError(
                f"{name} does not apply to method {method!r} (only to {', '.join(_USES[name])}), got {name}={value!r}"
            )
    if method in UPDATE_METHODS and scope == "global":
        raise ValueError(
            f"scope must be 'layer' (or None) for method {method!r}: L-OBS prunes each layer by the OBS "
            "saliencies of that layer's reconstruction error, which do not rank across layers; got scope='global'"
        )
    return method


def masks_for(
    method: str,
    net,
    sparsity=None,
    *,
    density=None,
    x=None,
    y=None,
    seed=0,
    scope: str = "global",
    batch_size=None,
    temperature=None,
    warn: bool = True,
) -> list[dict]:
    r"""The masks of the pruning method named ``method`` (one of :data:`METHODS`): the one
    dispatch from a method name to its masks (the ``refnet prune``, ``refnet spectrum`` and
    ``refnet sweep`` commands use it).

    ============== ==================================================================================
    ``method``     masks
    ============== ==================================================================================
    "snip"         :func:`prune` of :func:`connection_sensitivity` ``(net, x, y)`` with the
                   cross-entropy on the labels ``y``
    "uniform",     :func:`prune` of :func:`connection_sensitivity` ``(net, x, loss=method)``: the
    "pred_raw",    unsupervised losses of :func:`unsupervised_targets` (``y`` is ignored;
    "pred_softmax" "pred_softmax" has zero gradients and warns)
    "random"       :func:`prune` of :func:`random_scores` ``(net, seed)``
    "magnitude"    :func:`prune` of :func:`magnitude_scores` ``(net)``: ``|m * w|``
    "synflow"      :func:`synflow_prune` ``(net, ...)``: iterative, data-free, 100 rounds
    "grasp"        :func:`prune` of :func:`refnet.saliency.grasp_scores` ``(net, x, y,
                   temperature=T, convention="synflow")``: ``+w (H g)`` normalised, the largest
                   kept, which removes the largest of the GraSP paper's ``-w (H g)`` (the
                   paper's own rule); ``T`` defaults to 200
    "obd"          :func:`prune` of :func:`refnet.saliency.obd_scores` ``(net, x, y,
                   diag="exact", temperature=T)``: ``1/2 H_jj w_j^2`` with the exact Hessian
                   diagonal (may be negative away from a minimum; the lowest are pruned first);
                   ``T`` defaults to 1 (the loss itself)
    "obd_gn"       the same with the Gauss-Newton diagonal (``diag="gauss_newton"``, non-negative:
                   the curvature OBD's own derivation keeps)
    ============== ==================================================================================

    L-OBS (``"lobs"``, :data:`UPDATE_METHODS`) is not a masks method: its compensating update of
    the kept weights is part of the method, so :func:`prune_network` runs it and this function
    refuses it (a ValueError that says so).

    Connection sensitivity scores all of ``x`` (the commands pass the first 100 training examples,
    ``refnet prune --score-examples``) with ``batch_size`` as in :func:`connection_sensitivity`,
    and ranks the normalised scores ``|g_j| / sum_k |g_k|`` (:func:`snip` ranks the unnormalised
    ``|g_j|``; the two orders differ only where the division merges near-equal floats into a tie).
    GraSP and OBD score all of ``x`` as one batch (the mean loss over it). Every method keeps
    ``k = round(m (1 - sparsity))`` of the ``m`` weights (biases are never pruned), over the whole
    network or per layer (``scope``), ties to the lower flat index.

    Parameters
    ----------
    method : str
        One of :data:`METHODS` (case-insensitive, ``-`` and ``_`` alike).
    net : Network
    sparsity : float in [0, 1), optional
    density : float in (0, 1], optional
        Exactly one of the two.
    x : ndarray, shape (B, *net.in_shape)
        The scored examples; required by :data:`DATA_METHODS`, ignored by the others.
    y : ndarray, shape (B,) int labels or (B, C) targets
        Labels of ``x``; required by "snip", "grasp", "obd" and "obd_gn", ignored by the others.
    seed : int or numpy.random.Generator
        Seed of "random"'s scores; ignored by the others.
    scope : {"global", "layer"}
    batch_size : int >= 1, optional
        Connection sensitivity over consecutive batches of ``x`` (:func:`connection_sensitivity`);
        only for the connection-sensitivity methods (a ValueError for the others).
    temperature : float > 0, optional
        The temperature ``T`` of "grasp" (default 200, :data:`refnet.saliency.GRASP_TEMPERATURE`)
        and of "obd" / "obd_gn" (default 1): the loss of the logits divided by ``T``. A ValueError
        for the other methods.
    warn : bool
        Emit :class:`LayerCollapseWarning` about the final mask (and :func:`prune`'s warnings).

    Returns
    -------
    list of dict
        Boolean masks shaped like ``net.params``; apply with ``net.with_masks(masks)``.
    """
    if isinstance(method, str) and method.lower().replace("-", "_") in UPDATE_METHODS:
        raise ValueError(
            f"method {method!r} (L-OBS) updates the kept weights as well as the masks, so its masks alone "
            "are not the method: use refnet.pruning.prune_network (or refnet.saliency.obs_prune)"
        )
    method = check_choice(method, "method", METHODS)
    check_net(net)
    resolve_density(sparsity, density)  # fail before any scoring
    scope = check_choice(scope, "scope", ("global", "layer"))
    warn = check_bool(warn, "warn")
    check_method_options(method, batch_size=batch_size, temperature=temperature)
    if method == "synflow":
        return synflow_prune(net, sparsity, density=density, scope=scope, warn=warn)
    if method in DATA_METHODS and x is None:
        raise ValueError(f"method {method!r} scores examples: x must be given (the examples to score), got None")
    if method in _SECOND_ORDER:
        if y is None:
            raise ValueError(f"method {method!r} scores the loss on labelled examples: y must be given, got None")
        if method == "grasp":
            T = GRASP_TEMPERATURE if temperature is None else temperature
            scores = grasp_scores(net, x, y, temperature=T, convention="synflow")
        else:
            T = 1.0 if temperature is None else temperature
            scores = obd_scores(net, x, y, diag="exact" if method == "obd" else "gauss_newton", temperature=T)
    elif method in DATA_METHODS:
        loss = "cross_entropy" if method == "snip" else method
        scores = connection_sensitivity(net, x, y, loss=loss, batch_size=batch_size)
    elif method == "random":
        scores = random_scores(net, seed)
    else:  # magnitude
        scores = magnitude_scores(net)
    return prune(net, scores, sparsity, density=density, scope=scope, warn=warn)


def prune_network(
    method: str,
    net,
    sparsity=None,
    *,
    density=None,
    x=None,
    y=None,
    seed=0,
    scope=None,
    batch_size=None,
    temperature=None,
    damp=None,
    warn: bool = True,
) -> Network:
    r"""The network pruned by ``method`` (one of :data:`NETWORK_METHODS`): what ``refnet prune``
    trains.

    * A method of :data:`METHODS`: ``net.with_masks(masks_for(method, net, ...))``; the weights
      are unchanged. ``scope=None`` is ``"global"``.
    * ``"lobs"``: layer-wise Optimal Brain Surgeon (:func:`refnet.saliency.obs_prune`): every
      Dense and Conv2d layer keeps ``round(m_l (1 - sparsity))`` of its ``m_l`` weights, chosen by
      the OBS saliencies ``w_q^2 / (2 [H^{-1}]_qq)`` of the layer's reconstruction error
      ``E^l = ||X W'^T - X W^T||^2 / (2n)`` over the inputs ``X`` that ``x`` gives the layer, and
      the kept weights of each row move to the exact minimiser of ``E^l`` with the pruned ones
      held at zero. The result has new weights, not only new masks. L-OBS is layer-wise by
      construction (the errors of different layers are not on one scale), so ``scope`` must be
      None or ``"layer"``; ``y`` and ``seed`` are ignored (no labels are used).

    Parameters
    ----------
    method : str
        One of :data:`NETWORK_METHODS` (case-insensitive, ``-`` and ``_`` alike).
    net : Network
        Not changed.
    sparsity, density, x, y, seed, batch_size, temperature, warn
        As in :func:`masks_for` ("lobs" needs ``x``; ``batch_size`` and ``temperature`` do not
        apply to it).
    scope : {None, "global", "layer"}
        None: the method's own (``"layer"`` for "lobs", ``"global"`` for the others).
    damp : float >= 0, optional
        L-OBS's relative damping ``lambda = damp * mean(diag(X^T X / n))`` (default 1e-4, see
        :func:`refnet.saliency.obs_prune`); a ValueError for the other methods.

    Returns
    -------
    Network
        A new network; for "lobs" with the compensating update applied (the stored values of the
        pruned weights are those of ``net``: the mask holds them at zero).
    """
    method = check_method_options(method, scope=scope, batch_size=batch_size, temperature=temperature, damp=damp)
    check_net(net)
    if scope is not None:
        scope = check_choice(scope, "scope", ("global", "layer"))
    if method not in UPDATE_METHODS:
        return net.with_masks(masks_for(method, net, sparsity, density=density, x=x, y=y, seed=seed,
                                        scope="global" if scope is None else scope, batch_size=batch_size,
                                        temperature=temperature, warn=warn))
    d = resolve_density(sparsity, density)  # fail before any work
    warn = check_bool(warn, "warn")
    if x is None:
        raise ValueError(f"method {method!r} reconstructs each layer's output on examples: x must be given, got None")
    s = 1.0 - d if sparsity is None else sparsity  # the sparsity as given keeps obs_prune's keep count exact
    out = obs_prune(net, x, s) if damp is None else obs_prune(net, x, s, damp=damp)
    if warn:
        warn_collapse(net, out.masks, stacklevel=2)
    return out


# -------------------------------------------------------------------------------------------
# reports
# -------------------------------------------------------------------------------------------


