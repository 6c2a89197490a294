r"""OrthP and L1 neuron pruning ([DI], PAPER.md section 11): structured pruning that removes units,
and the QR re-orthogonalisation that repairs what it leaves.

[DI] H. Wang, C. Qin, Y. Bai, Y. Fu, "Dynamical Isometry: The Missing Ingredient for Neural
Network Pruning" (2021).

:func:`l1_neuron_prune` removes whole units (rows of ``W^l``, entries of ``b^l``, columns of
``W^{l+1}``), giving a smaller dense network; :func:`orthp` then re-orthogonalises every remaining
weight matrix by QR. Both work on the affine layers of :mod:`refnet.isometry`
(:func:`~refnet.isometry.affine_layers`, :func:`~refnet.isometry.layer_matrix`); approximate
isometry, the data-free repair of *unstructured* masks ([SPP]), stays there.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import numpy as np

from ._checks import check_float
from .isometry import affine_layers, layer_matrix, select_affine_layers
from .layers import AvgPool2d, Conv2d, Dense, Flatten, GlobalAvgPool2d, MaxPool2d
from .network import Network
from .pruning import keep_count, top_k_mask

__all__ = ["DEFAULT_GAINS", "activation_gain", "orthp", "l1_neuron_prune"]


# ============================================================================================
# OrthP ([DI]): QR re-orthogonalisation of structurally pruned (dense) weights
# ============================================================================================

#: Gain of the orthogonal weight per activation name ([DI]: 1 for linear, sqrt 2 for ReLU; the SPP
#: code uses 1 for tanh). Activations not listed get 1; leaky_relu gets sqrt(2 / (1 + slope^2)).
DEFAULT_GAINS = {
    "identity": 1.0,
    "tanh": 1.0,
    "hard_tanh": 1.0,
    "erf": 1.0,
    "sigmoid": 1.0,
    "softplus": 1.0,
    "selu": 1.0,
    "elu": 1.0,
    "relu": math.sqrt(2.0),
}


def activation_gain(activation, gains: dict | None = None) -> float:
    """The OrthP gain of an activation: ``gains`` (name -> gain) over :data:`DEFAULT_GAINS`."""
    name = activation.name
    if gains is not None and name in gains:
        return float(gains[name])
    if name == "leaky_relu":
        slope = dict(activation.params).get("slope", 0.01)
        return math.sqrt(2.0 / (1.0 + slope * slope))
    return DEFAULT_GAINS.get(name, 1.0)


def _qr_orthonormal(M: np.ndarray) -> np.ndarray:
    """Orthonormal rows (``n_out < n_in``) or columns (else) from the QR of ``M`` itself, with the
    ``sign(diag R)`` fix (``sign(0) := +1``): the Gram-Schmidt orthonormalisation of M's columns
    (rows), each new vector having a positive inner product with the one it came from."""
    n_out, n_in = M.shape
    tall = M if n_out >= n_in else M.T  # (max, min)
    q, r = np.linalg.qr(tall)  # q (max, min), r (min, min)
    q = q * np.where(np.diagonal(r) < 0.0, -1.0, 1.0)  # column j times sign(R_jj)
    return q if n_out >= n_in else q.T  # (n_out, n_in)


def orthp(net: Network, *, gain=None) -> Network:
    r"""OrthP ([DI]): re-orthogonalise every weight matrix of a structurally pruned network.

    For each affine layer, with ``V = W`` as a ``(n_out, n_in)`` matrix (conv: ``(c_out,
    c_in*kh*kw)``):

    .. math:: V = Q R \ (\text{or } V^\top = Q R \text{ if } n_{out} < n_{in}), \quad
              Q \leftarrow Q\,\mathrm{diag}(\mathrm{sign}\,R_{jj}), \quad W \leftarrow g\,Q
              \ (\text{or } g\,Q^\top),

    so rows are orthonormal if ``n_out < n_in``, else columns (times ``g``). This is the QR of the
    **current** weights (re-orthogonalisation: the Gram-Schmidt factor of W, keeping each row/column
    close in direction to the one it replaces), not a fresh random draw; note it is not the
    Frobenius-nearest orthogonal matrix (that would be the polar factor). Biases are untouched.

    Parameters
    ----------
    net : Network
        Structurally pruned (e.g. by :func:`l1_neuron_prune`): every weight mask entry must be
        True. Not changed.
    gain : None, float, dict or list, optional
        ``g`` per layer: None = the layer's activation gain (:data:`DEFAULT_GAINS`: 1 linear/tanh,
        sqrt 2 ReLU); a float for every layer; a dict activation name -> gain overriding the
        defaults; or a list with one gain per affine layer.

    Raises
    ------
    ValueError
        A weight mask has a False entry (unstructured pruning), or bad gains.
    """
    idx = affine_layers(net)
    if not idx:
        raise ValueError("net has no affine layers (Dense or Conv2d): nothing to orthogonalise")
    for i in idx:
        M = net.masks[i]["W"]
        if not M.all():
            raise ValueError(
                f"orthp needs structurally pruned, dense weight matrices, but layer {i} "
                f"({type(net.layers[i]).__name__}) has {int(M.size - M.sum())} pruned (mask False) weight "
                "entries: the QR would fill in those zeros and revive pruned weights. Remove whole units "
                "with l1_neuron_prune (smaller dense layers) instead of masking them"
            )
    gains = _resolve_gains(net, idx, gain)
    new = net.copy()
    for i, g in zip(idx, gains):
        W = new.params[i]["W"]
        Q = _qr_orthonormal(layer_matrix(W).astype(np.float64))  # (n_out, n_in)
        W[...] = (g * Q).reshape(W.shape)
    return new


def _resolve_gains(net: Network, idx: list[int], gain) -> list[float]:
    if gain is None or isinstance(gain, dict):
        if isinstance(gain, dict):
            for k, v in gain.items():
                if not isinstance(k, str):
                    raise TypeError(f"gain dict keys must be activation names, got {k!r}")
                check_float(v, f"gain[{k!r}]", min_value=0.0, min_inclusive=False)
        return [activation_gain(net.layers[i].activation, gain) for i in idx]
    if isinstance(gain, (list, tuple)):
        if len(gain) != len(idx):
            raise ValueError(f"gain must have one entry per affine layer ({len(idx)}), got {len(gain)}")
        return [check_float(g, f"gain[{k}]", min_value=0.0, min_inclusive=False) for k, g in enumerate(gain)]
    g = check_float(gain, "gain", min_value=0.0, min_inclusive=False)
    return [g] * len(idx)


# ============================================================================================
# Structured L1-norm neuron (filter) pruning that physically removes units
# ============================================================================================


def _n_keep(keep, n: int, name: str) -> int:
    if isinstance(keep, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int or a fraction in (0, 1), got bool")
    if isinstance(keep, numbers.Integral):
        k = int(keep)
        if not 1 <= k <= n:
            raise ValueError(f"{name} must keep between 1 and {n} units, got {k}")
        return k
    if isinstance(keep, numbers.Real):
        f = check_float(keep, name, min_value=0.0, max_value=1.0, min_inclusive=False, max_inclusive=False)
        return max(1, keep_count(n, density=f, rounding="half_up"))  # floor(f n + 1/2)
    raise TypeError(f"{name} must be an int or a fraction in (0, 1), got {type(keep).__name__}")


def _top_units(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest scores (ties: lower index first), sorted ascending."""
    return np.flatnonzero(top_k_mask(scores, k))  # ties: lower index first (refnet.pruning's rule)


def _slice_units(p: dict, m: dict, rows, in_idx, bias: bool) -> tuple[dict, dict]:
    """Copies of a layer's params and masks keeping output units ``rows`` and inputs ``in_idx``
    (None: all) of ``W`` (axis 0 and 1; dense or conv) and ``rows`` of ``b``."""
    W, MW = p["W"], m["W"]
    if rows is not None:
        W, MW = W[rows], MW[rows]
    if in_idx is not None:
        W, MW = W[:, in_idx], MW[:, in_idx]
    params, masks = {"W": W.copy()}, {"W": MW.copy()}
    if bias:
        params["b"] = (p["b"] if rows is None else p["b"][rows]).copy()
        masks["b"] = (m["b"] if rows is None else m["b"][rows]).copy()
    return params, masks


def l1_neuron_prune(net: Network, keep, *, layers=None) -> Network:
    r"""Structured L1-norm pruning ([DI]) that physically removes units.

    For every pruned layer ``l`` the score of output unit ``i`` is the L1 norm of its incoming
    (effective) weights, ``s_i = sum_j |(C ⊙ W^l)_{ij}|`` (Dense) or ``sum |(C ⊙ W^l)[i]|`` over the
    whole kernel of filter ``i`` (Conv2d), computed on the network as given (every layer is scored
    independently). The ``keep`` highest-scoring units survive (ties: lower index first), in their
    original order. Removed: the rows of ``W^l``, ``b^l`` (and their masks) and the matching inputs
    of the next affine layer: columns of a next Dense, input channels of a next Conv2d, and through
    a ``Flatten`` the block of ``H*W`` columns of each removed channel (through pooling layers the
    channel index is carried unchanged; ``GlobalAvgPool2d`` maps channel ``c`` to column ``c``).

    The result computes exactly the function of the original network with the removed units'
    outgoing weights set to zero.

    Parameters
    ----------
    net : Network
        Not changed.
    keep : int, float in (0, 1), or list
        Units kept per pruned layer: an int, a fraction (``max(1, floor(f n + 1/2))`` of the layer's
        ``n`` units), or one of those per entry of ``layers``.
    layers : list of int, optional
        Indices into ``net.layers`` of the layers to prune; default every affine layer but the
        last (the output layer cannot lose units).

    Returns
    -------
    Network
        A smaller network (new layer specs, same activations, biases and masks sliced).
    """
    aff = affine_layers(net)
    if len(aff) < 2:
        raise ValueError(f"l1_neuron_prune needs at least two affine layers, net has {len(aff)}")
    if layers is None:
        layers = aff[:-1]
    else:
        layers = select_affine_layers(net, layers)
        if aff[-1] in layers:
            raise ValueError(f"layers must not include the last affine layer ({aff[-1]}): its units are the outputs")
    if isinstance(keep, (list, tuple)):
        if len(keep) != len(layers):
            raise ValueError(f"keep must have one entry per pruned layer ({len(layers)}), got {len(keep)}")
        keeps = list(keep)
    else:
        keeps = [keep] * len(layers)

    # kept output units of every layer, as an index array over its output "unit axis"
    kept_out = {}
    for k, (i, kp) in enumerate(zip(layers, keeps)):
        W = net.params[i]["W"] * net.masks[i]["W"]
        n = W.shape[0]
        scores = np.abs(W.reshape(n, -1)).sum(axis=1)  # (n,) L1 norm per unit / filter
        kept_out[i] = _top_units(scores, _n_keep(kp, n, f"keep[{k}]" if isinstance(keep, (list, tuple)) else "keep"))

    # walk the layers: carry the kept indices of the current representation
    new_layers, params, masks = [], [], []
    shape = net.in_shape  # per-example shape of the ORIGINAL representation at this point
    carried = None  # None: all features kept; else (kind, idx): kind "channel" or "feature"
    for i, layer in enumerate(net.layers):
        p, m = net.params[i], net.masks[i]
        out_shape = net.shapes[i + 1]
        if isinstance(layer, (Dense, Conv2d)):
            dense = isinstance(layer, Dense)
            unit = "feature" if dense else "channel"  # the kind of index its inputs and outputs carry
            in_idx = None
            if carried is not None:
                kind, ids = carried
                if kind != unit:  # Dense: (C,) after GlobalAvgPool2d, or (C, H, W) impossible here
                    raise NotImplementedError(
                        f"layer {i}: Dense after a channel-structured input of shape {shape}; add Flatten" if dense
                        else f"layer {i}: Conv2d after a flat representation is not supported"
                    )
                in_idx = ids
            rows = kept_out.get(i)
            np_, nm = _slice_units(p, m, rows, in_idx, layer.bias)
            n_out, n_in = np_["W"].shape[:2]
            sizes = {"n_in": n_in, "n_out": n_out} if dense else {"c_in": n_in, "c_out": n_out}
            new_layers.append(dataclasses.replace(layer, **sizes))
            params.append(np_)
            masks.append(nm)
            carried = None if rows is None else (unit, rows)
        elif isinstance(layer, (AvgPool2d, MaxPool2d)):
            new_layers.append(layer)  # per channel: the kept channel indices pass through
            params.append({})
            masks.append({})
        elif isinstance(layer, GlobalAvgPool2d):
            new_layers.append(layer)
            params.append({})
            masks.append({})
            if carried is not None:
                carried = ("feature", carried[1])  # channel c -> feature c
        elif isinstance(layer, Flatten):
            new_layers.append(layer)
            params.append({})
            masks.append({})
            if carried is not None and len(shape) == 3:
                _, ids = carried
                hw = shape[1] * shape[2]
                cols = (ids[:, None] * hw + np.arange(hw)[None, :]).reshape(-1)  # NCHW blocks
                carried = ("feature", cols)
            elif carried is not None and carried[0] == "channel":
                raise NotImplementedError(f"layer {i}: Flatten of shape {shape} after pruned channels")
        else:
            if carried is not None:
                raise NotImplementedError(
                    f"layer {i} ({type(layer).__name__}) after a pruned layer is not supported by l1_neuron_prune"
                )
            new_layers.append(layer)
            params.append({k: v.copy() for k, v in p.items()})
            masks.append({k: v.copy() for k, v in m.items()})
        shape = out_shape
    return Network(new_layers, in_shape=net.in_shape, dtype=net.dtype, params=params, masks=masks)
