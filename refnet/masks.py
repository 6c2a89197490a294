r"""Masks: the one home of refnet's keep counts, top-k selection and pruning masks.

Every mask of refnet (pruning at initialization, lottery tickets, neuron pruning, the audit) is
chosen here: :func:`top_k_mask` is the one top-k selector, :func:`kth_largest` its threshold,
and :func:`keep_count` the one keep-count rule, with its rounding explicit (``"half_even"`` for
the pruning methods, ``"half_up"`` for lottery tickets, ``"synflow"`` for Synaptic-Flow's
``int((1 - d) m)`` pruned entries). :func:`prune` turns per-layer scores into masks, globally or
per layer, and warns (:class:`LayerCollapseWarning`) when a mask disconnects the network;
:func:`pruning_report` and :func:`format_pruning_report` show the per-layer result. The scores
themselves (SNIP, SynFlow, magnitude, random) are in :mod:`refnet.pruning`, which re-exports
these names.

Ranking rules shared by every mask (see :func:`prune`):

* Ties: among equal scores the entry with the LOWER flat index is kept first. The flat index runs
  over the concatenation, in this order, of layer 0 "W" (row-major / C order), layer 0 "b" (when
  biases are ranked), layer 1 "W", ... (within one layer for ``scope="layer"``). This is what a
  stable sort of ``-score`` gives (``np.argsort(-s, kind="stable")``), and PAPER.md's "lower
  index first".
* Entries that the network's current mask has pruned stay pruned: they rank below every kept
  entry, whatever their score, so nothing is ever revived. ``k`` still counts over ALL entries
  (pruned or not), so a net pruned to sparsity 0.5 and pruned again at 0.9 keeps
  ``round(0.1 m)`` entries.
"""

from __future__ import annotations

import math
import warnings
from math import prod

import numpy as np

from . import kernels
from ._checks import check_array, check_bool, check_choice, check_int
from .layers import Dense, Flatten
from .network import Network, check_net

__all__ = [
    "LayerCollapseWarning",
    "ROUNDINGS",
    "check_bool",
    "check_rounding",
    "format_pruning_report",
    "keep_count",
    "kth_largest",
    "prune",
    "pruning_report",
    "ranked_keys",
    "resolve_density",
    "top_k_mask",
    "warn_collapse",
]


class LayerCollapseWarning(UserWarning):
    """A mask prunes every weight of a layer, or leaves no path from the input to the output."""




def resolve_density(sparsity, density, *, allow_empty: bool = False) -> float:
    """The kept fraction ``d``: ``1 - sparsity`` (sparsity in [0, 1)) or ``density`` in (0, 1]
    (with ``allow_empty``: sparsity in [0, 1], density in [0, 1], so ``d = 0`` too)."""
    if (sparsity is None) == (density is None):
        raise ValueError(
            "give exactly one of sparsity (fraction pruned, in [0, 1)) and density (fraction kept, "
            f"in (0, 1]), got sparsity={sparsity!r} and density={density!r}"
        )
    name, value = ("sparsity", sparsity) if sparsity is not None else ("density", density)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if name == "sparsity":
        if not (0.0 <= value < 1.0 or (allow_empty and value == 1.0)):  # also rejects NaN
            bounds = "[0, 1]" if allow_empty else "[0, 1)"
            raise ValueError(f"sparsity must be in {bounds} (the fraction of entries pruned), got {value}")
        return 1.0 - value
    if not (0.0 < value <= 1.0 or (allow_empty and value == 0.0)):
        bounds = "[0, 1]" if allow_empty else "(0, 1]"
        raise ValueError(f"density must be in {bounds} (the fraction of entries kept), got {value}")
    return value


#: the rounding rules of :func:`keep_count`
ROUNDINGS = ("half_even", "half_up", "synflow")


def check_rounding(rounding) -> str:
    if not isinstance(rounding, str) or rounding not in ROUNDINGS:
        raise ValueError(
            f"rounding must be one of {list(ROUNDINGS)} (half_even: round(m d), refnet's default; "
            f"half_up: floor(m d + 1/2), the lottery-ticket count; synflow: m - int((1 - d) m), "
            f"Synaptic-Flow's), got {rounding!r}"
        )
    return rounding


def keep_count(m: int, sparsity=None, *, density=None, rounding: str = "half_even") -> int:
    r"""How many of ``m`` entries a mask keeps at density ``d = 1 - sparsity`` (or ``d = density``).

    The one keep-count rule of refnet, with the rounding of ``m d`` to a whole count explicit
    (every product is the float64 ``m * d``, ``d`` itself the float64 ``1 - sparsity``):

    ``"half_even"`` (default)
        :math:`k = \operatorname{round}(m d)`, Python's ``round`` (halves to even): what
        :func:`prune`, :func:`snip` and :func:`synflow_prune` keep.
    ``"half_up"``
        :math:`k = \lfloor m d + 1/2 \rfloor` (halves up): the count of
        :func:`refnet.lottery.magnitude_prune` and :func:`refnet.lottery.imp`.
    ``"synflow"``
        :math:`k = m - \lfloor (1 - d)\, m \rfloor`: Synaptic-Flow's convention (Tanaka et al.
        2020, ``Pruners/pruners.py``: ``int((1.0 - sparsity) * numel)`` entries pruned, where its
        ``sparsity`` is the kept fraction ``d``), so the pruned count is truncated and the kept
        count is rounded up. (Its mask then also prunes every entry tied with the threshold;
        refnet keeps exactly ``k``, ties to the lower index.)

    For example ``m = 10, d = 0.25`` (``m d = 2.5``): 2, 3 and 3; ``m = 10, d = 0.21``: 2, 2 and 3.

    Parameters
    ----------
    m : int
        Number of scored entries (>= 0).
    sparsity : float in [0, 1], optional
    density : float in [0, 1], optional
        Exactly one of ``sparsity`` and ``density`` (``d = 0`` keeps nothing here; the mask
        functions themselves need ``d > 0``).
    rounding : {"half_even", "half_up", "synflow"}

    Returns
    -------
    int in [0, m]
    """
    m = check_int(m, "m", min_value=0)
    d = resolve_density(sparsity, density, allow_empty=True)
    rounding = check_rounding(rounding)
    if rounding == "half_even":
        return int(round(m * d))
    if rounding == "half_up":
        return int(math.floor(m * d + 0.5))
    return m - int((1.0 - d) * m)


def ranked_keys(net: Network, include_bias: bool) -> list[tuple]:
    """Per layer, the keys that are scored/ranked: ("W",) or ("W", "b")."""
    out = []
    for p in net.params:
        keys = [k for k in ("W", "b") if k in p and (k == "W" or include_bias)]
        out.append(tuple(keys))
    return out


def _ranked_layers(net: Network, layers) -> set:
    """The code indices of the layers ranked by :func:`prune`: ``layers`` validated (each a layer
    with weights), or every layer with weights."""
    with_weights = [i for i, p in enumerate(net.params) if "W" in p]
    if layers is None:
        return set(with_weights)
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise TypeError(f"layers must be a sequence of int layer indices, got {type(layers).__name__} {layers!r}")
    out = set()
    for i in layers:
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"layers must hold int layer indices, got {type(i).__name__} {i!r}")
        if int(i) not in with_weights:
            raise ValueError(f"layers: {i} is not the index of a layer with weights; those are {with_weights}")
        out.add(int(i))
    if not out:
        raise ValueError(f"layers must name at least one layer with weights (those are {with_weights}), got {layers!r}")
    return out


def _check_scores(net: Network, scores, keys: list[tuple]) -> list[dict]:
    """Validated float64 copies of the ranked entries of ``scores``."""
    if not isinstance(scores, (list, tuple)) or len(scores) != net.n_layers:
        got = f"{len(scores)} entries" if isinstance(scores, (list, tuple)) else type(scores).__name__
        raise ValueError(f"scores must be a list of {net.n_layers} dicts (one per layer, like net.params), got {got}")
    shapes = net.param_shapes()
    out = []
    for i, (s, ks) in enumerate(zip(scores, keys)):
        if s is None:
            s = {}
        if not isinstance(s, dict):
            raise TypeError(f"scores[{i}] must be a dict, got {type(s).__name__}")
        d = {}
        for k in ks:
            if k not in s:
                hint = " (pass include_bias=False to rank weights only)" if k == "b" else ""
                raise ValueError(f"scores[{i}] must have the key {k!r}, got keys {sorted(s)}{hint}")
            a = check_array(s[k], f"scores[{i}][{k!r}]", shape=shapes[i][k], finite=False, allow_int=True)
            a = a.astype(np.float64, copy=False)  # never written to
            if np.isnan(a).any():
                raise ValueError(f"scores[{i}][{k!r}] must not hold NaN, got {int(np.isnan(a).sum())} NaN entries")
            d[k] = a
        out.append(d)
    return out


def _ranked_entries(scores, alive):
    """``(shape of scores, flat indices of the alive entries or None when all are alive, their
    flat scores)`` after validating ``scores`` (real, no NaN) and ``alive`` (bool, same shape)."""
    s = check_array(scores, "scores", finite=False, allow_int=True)
    if s.dtype.kind == "f" and np.isnan(s).any():
        raise ValueError(f"scores must not hold NaN, got {int(np.isnan(s).sum())} NaN entries")
    flat = s.ravel()  # C order: the flat index of the tie rule
    if alive is None:
        return s.shape, None, flat
    a = np.asarray(alive)
    if a.dtype != bool:
        raise TypeError(f"alive must be a boolean mask, got dtype {a.dtype}")
    if a.shape != s.shape:
        raise ValueError(f"alive must have the shape of scores {s.shape}, got {a.shape}")
    a = a.ravel()
    if a.all():  # nothing pruned yet (the usual case): rank the scores themselves
        return s.shape, None, flat
    idx = np.flatnonzero(a)
    return s.shape, idx, flat[idx]


def kth_largest(scores, k: int, alive=None) -> float:
    r"""The ``k``-th largest score among the ``alive`` entries: the threshold of a top-k mask.

    With the alive scores sorted in decreasing order, :math:`s_{(1)} \ge s_{(2)} \ge \dots
    \ge s_{(n)}` (``n`` alive entries, repeated values counted), this is :math:`s_{(k)}`, the
    value :func:`top_k_mask` keeps down to: it keeps every alive entry scored above it and as many
    tied with it (lowest flat index first) as make ``k``. Exactly the value of
    ``np.sort(scores[alive])[::-1][k - 1]``, computed in O(n) by :func:`refnet.kernels.kth_largest`.

    Conventions at the ends: ``k = 0`` gives ``+inf`` (nothing is kept: every score is below the
    threshold) and ``k > n`` gives ``-inf`` (every alive entry is kept, and there is no ``k``-th
    one; this includes ``n = 0``).

    Parameters
    ----------
    scores : ndarray, any shape, real (float64, float32 or integer); ``+-inf`` allowed, NaN is a
        ValueError.
    k : int >= 0
    alive : ndarray of bool, shape of ``scores``, optional
        The entries that may be ranked (default: all).

    Returns
    -------
    float
    """
    _, _, sa = _ranked_entries(scores, alive)
    k = check_int(k, "k", min_value=0)
    if k == 0:
        return math.inf
    if k > sa.size:
        return -math.inf
    return float(kernels.kth_largest(sa, k))


def top_k_mask(scores, k: int, alive=None) -> np.ndarray:
    r"""Boolean mask of the ``k`` largest ``scores`` among the ``alive`` entries: the one top-k
    selector behind every pruning mask of refnet.

    Rules:

    * Ties: among equal scores the entry with the LOWER flat index (C order) is kept first, so the
      mask is ``keep[order[:k]] = True`` with ``order = idx[np.argsort(-scores.ravel()[idx],
      kind="stable")]`` and ``idx`` the alive flat indices in increasing order. It is computed in
      O(m) from the threshold :func:`kth_largest`: every alive entry above it is kept, then the
      lowest-index ties.
    * Entries that are not ``alive`` are never kept, whatever their score (pruned stays pruned).
    * ``k = 0`` keeps nothing; ``k`` at or above the number of alive entries keeps all of them
      (and no more).

    Parameters
    ----------
    scores : ndarray, any shape, real (float64, float32 or integer); ``+-inf`` allowed, NaN is a
        ValueError.
    k : int >= 0
    alive : ndarray of bool, shape of ``scores``, optional
        The entries that may be kept (default: all).

    Returns
    -------
    ndarray of bool, shape of ``scores``
        A new array with ``min(k, alive.sum())`` True entries.
    """
    shape, idx, sa = _ranked_entries(scores, alive)
    k = min(check_int(k, "k", min_value=0), sa.size)
    if k == 0:
        return np.zeros(shape, dtype=bool)
    if k == sa.size:
        sel = np.ones(sa.shape, dtype=bool)
    else:
        t = kernels.kth_largest(sa, k)  # the k-th largest score (np.partition, or a radix select)
        sel = sa > t
        ties = np.flatnonzero(sa == t)[: k - int(np.count_nonzero(sel))]  # lowest indices first
        sel[ties] = True
    if idx is None:  # every entry alive: sel is the mask
        return sel.reshape(shape)
    keep = np.zeros(prod(shape), dtype=bool)
    keep[idx[sel]] = True
    return keep.reshape(shape)


def _is_mlp(net: Network) -> bool:
    return all(isinstance(layer, (Dense, Flatten)) for layer in net.layers)


def warn_collapse(net: Network, masks: list[dict], stacklevel: int = 2) -> None:
    """LayerCollapseWarning for each layer whose weights are all pruned, and once when the
    network is disconnected (MLPs: the 0/1 product of the weight masks from input to output is
    all zero; other chains: some layer's weight mask is all zero; graphs: every path from the
    input to the output runs through such a layer)."""
    collapsed = []
    for i, m in enumerate(masks):
        if "W" in m and not m["W"].any():
            collapsed.append(i)
            warnings.warn(
                f"layer collapse: every weight of layers[{i}] ({type(net.layers[i]).__name__}, "
                f"{m['W'].size} weights) is pruned",
                LayerCollapseWarning,
                stacklevel=stacklevel + 1,
            )
    if _is_mlp(net):
        reach = np.ones(prod(net.in_shape), dtype=bool)  # inputs reached so far
        for layer, m in zip(net.layers, masks):
            if isinstance(layer, Dense):
                reach = m["W"][:, reach].any(axis=1)  # units with a kept edge from a reached unit
        disconnected = not reach.any()
        why = "the product of the weight masks (0/1 connectivity) from input to output is all zero"
    elif getattr(net, "is_chain", True):
        disconnected = bool(collapsed)
        why = f"the weights of layers {collapsed} are all pruned"
    else:  # a graph (residual blocks): a shortcut may carry the signal around a collapsed layer
        reached = [True]  # node 0: the input; node l + 1: the output of layers[l]
        for l, srcs in enumerate(net.inputs):
            reached.append(l not in collapsed and any(reached[j] for j in srcs))
        disconnected = not reached[-1]
        why = f"the weights of layers {collapsed} are all pruned and no shortcut goes around them"
    if disconnected:
        warnings.warn(
            f"the pruned network is disconnected: no path from the input to the output ({why})",
            LayerCollapseWarning,
            stacklevel=stacklevel + 1,
        )


def prune(
    net,
    scores,
    sparsity=None,
    *,
    density=None,
    scope: str = "global",
    include_bias: bool = False,
    layers=None,
    rounding: str = "half_even",
    warn: bool = True,
) -> list[dict]:
    r"""Masks keeping the ``k`` highest-scored entries: ``k = round(m (1 - sparsity))``.

    ``m`` is the number of ranked entries: all weights ("W") of ``layers`` (default: every layer),
    plus their biases when ``include_bias``, over the whole network (``scope="global"``, PAPER.md
    section 4's global top-k) or within each layer (``scope="layer"``, one
    ``k_l = round(m_l (1 - sparsity))`` per layer). ``round`` is Python's (halves to even) on the
    float64 product; ``rounding`` picks another rule of :func:`keep_count` (``"half_up"``:
    ``floor(m d + 1/2)``, ``"synflow"``: ``m - int((1 - d) m)``).

    Ties: among equal scores the entry with the LOWER flat index is kept first; the flat index
    runs over layer 0 "W" (row-major), layer 0 "b" (if ranked), layer 1 "W", ... This is exactly
    ``np.argsort(-s, kind="stable")[:k]``; it is computed in O(m) by :func:`top_k_mask`.

    Already-pruned entries: every entry pruned by ``net.masks`` stays pruned (it ranks below all
    kept entries whatever its score), but ``k`` counts over ALL ``m`` entries. If ``k`` exceeds the
    number of entries still kept, all of them are kept (fewer than ``k``) and a UserWarning says so.
    Biases that are not ranked, and the weights of layers not in ``layers``, keep their current
    mask.

    Parameters
    ----------
    net : Network
        Provides the shapes and the current masks; it is not changed.
    scores : list of dict
        One dict per layer with "W" (and "b" when ``include_bias``) shaped like the parameter, for
        the layers of ``layers``; real, ``+-inf`` allowed, NaN is a ValueError. Other keys, and
        the entries of other layers, are ignored.
    sparsity : float in [0, 1), optional
        Fraction pruned.
    density : float in (0, 1], optional
        Fraction kept. Give exactly one of ``sparsity`` and ``density``.
    scope : {"global", "layer"}
    include_bias : bool
        Rank the biases with the weights (the official SNIP code does).
    layers : sequence of int, optional
        Code indices (``net.layers[i]``) of the layers whose parameters are ranked; each must have
        weights. Default: every layer with weights.
    rounding : {"half_even", "half_up", "synflow"}
        The rule turning ``m d`` into ``k`` (:func:`keep_count`).
    warn : bool
        Emit :class:`LayerCollapseWarning` when a layer's weights are all pruned and when the
        network is disconnected.

    Returns
    -------
    list of dict
        Boolean masks with the keys and shapes of ``net.params`` ("W" and "b"); new arrays.
    """
    check_net(net)
    d = resolve_density(sparsity, density)
    scope = check_choice(scope, "scope", ("global", "layer"))
    include_bias = check_bool(include_bias, "include_bias")
    rounding = check_rounding(rounding)
    warn = check_bool(warn, "warn")
    chosen = _ranked_layers(net, layers)
    keys = [ks if i in chosen else () for i, ks in enumerate(ranked_keys(net, include_bias))]
    s = _check_scores(net, scores, keys)
    entries = [(i, k) for i, ks in enumerate(keys) for k in ks]
    ranked = set(entries)  # their masks are replaced below; the others are copied
    masks = [{k: (None if (i, k) in ranked else v.copy()) for k, v in m.items()} for i, m in enumerate(net.masks)]
    groups = [entries] if scope == "global" else [[e for e in entries if e[0] == i] for i in range(net.n_layers)]
    for group in groups:
        if not group:
            continue
        flat = np.concatenate([s[i][k].ravel() for i, k in group])  # concatenation order
        alive = np.concatenate([net.masks[i][k].ravel() for i, k in group])
        k_keep = keep_count(flat.size, density=d, rounding=rounding)
        keep = top_k_mask(flat, k_keep, alive)
        n_alive = int(alive.sum())
        if warn and n_alive < k_keep:
            where = "the network" if scope == "global" else f"layers[{group[0][0]}]"
            warnings.warn(
                f"density {d:g} asks to keep {k_keep} of {flat.size} entries of {where}, but its "
                f"current mask keeps only {n_alive}; pruned entries are never revived, so {n_alive} are kept",
                UserWarning,
                stacklevel=2,
            )
        start = 0
        for i, k in group:
            n = s[i][k].size
            masks[i][k] = keep[start : start + n].reshape(s[i][k].shape)
            start += n
    if warn:
        warn_collapse(net, masks, stacklevel=2)
    return masks


def _masks_and_types(net_or_masks):
    if isinstance(net_or_masks, Network):
        return net_or_masks.masks, [type(layer).__name__ for layer in net_or_masks.layers]
    if not isinstance(net_or_masks, (list, tuple)):
        raise TypeError(f"net_or_masks must be a Network or a list of mask dicts, got {type(net_or_masks).__name__}")
    for i, m in enumerate(net_or_masks):
        if m is None:
            continue
        if not isinstance(m, dict):
            raise TypeError(f"net_or_masks[{i}] must be a dict of boolean masks, got {type(m).__name__}")
        for k, v in m.items():
            a = np.asarray(v)
            if a.dtype != bool:
                raise TypeError(f"net_or_masks[{i}][{k!r}] must be a boolean mask, got dtype {a.dtype}")
    return [m or {} for m in net_or_masks], [None] * len(net_or_masks)


def pruning_report(net_or_masks) -> list[dict]:
    """Per-layer weight counts of a mask.

    Parameters
    ----------
    net_or_masks : Network or list of dict
        A network (its ``masks``) or masks as returned by :func:`prune`.

    Returns
    -------
    list of dict
        One row per layer with weights: ``{"layer": i (code index), "type": "Dense" / "Conv2d"
        (None for bare masks), "kept": kept weights, "total": weights, "sparsity": 1 - kept/total}``.
        Biases are not counted.
    """
    masks, types = _masks_and_types(net_or_masks)
    rows = []
    for i, (m, t) in enumerate(zip(masks, types)):
        if "W" not in m:
            continue
        W = np.asarray(m["W"])
        kept, total = int(W.sum()), int(W.size)
        rows.append({"layer": i, "type": t, "kept": kept, "total": total, "sparsity": 1.0 - kept / total})
    return rows


def format_pruning_report(report) -> str:
    """A text table of :func:`pruning_report` (given a report, a Network or masks), with a total
    line."""
    if isinstance(report, Network) or (
        isinstance(report, (list, tuple)) and not all(isinstance(r, dict) and "kept" in r for r in report)
    ):
        report = pruning_report(report)
    if not isinstance(report, (list, tuple)):
        raise TypeError(f"report must be a pruning_report list, a Network or masks, got {type(report).__name__}")
    lines = [f"{'layer':>5}  {'type':<8} {'kept':>9} {'total':>9} {'sparsity':>9}"]
    kept = total = 0
    for r in report:
        try:
            lines.append(
                f"{r['layer']:>5}  {str(r['type'] or '-'):<8} {r['kept']:>9} {r['total']:>9} {r['sparsity']:>9.4f}"
            )
            kept += r["kept"]
            total += r["total"]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"report rows must be dicts from pruning_report, got {r!r}") from exc
    sp = 1.0 - kept / total if total else 0.0
    lines.append(f"{'all':>5}  {'':<8} {kept:>9} {total:>9} {sp:>9.4f}")
    return "\n".join(lines)
