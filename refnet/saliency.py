r"""Second-order saliency for pruning: GraSP, Optimal Brain Damage and layer-wise OBS (L-OBS).

Scores have the layout of :mod:`refnet.pruning`: a list with one dict per layer, keys and shapes as
``net.params``, ``{}`` for parameter-free layers, ``"W"`` always and ``"b"`` only when asked for;
a higher score means "keep" unless a function says otherwise (GraSP's paper convention), so
:func:`refnet.pruning.prune` turns them into masks. Every curvature here is exact
(:mod:`refnet.second_order`, derived by hand); the effective weight is ``c * w``, so pruned entries
score 0 and stay pruned.

* :func:`grasp_scores` -- GraSP (Wang, Zhang & Grosse, ICLR 2020): ``-w * (H g)`` with the
  gradient and Hessian of the loss at a temperature, in the paper's or Synaptic-Flow's sign.
* :func:`obd_scores` -- Optimal Brain Damage (LeCun, Denker & Solla 1990):
  ``1/2 H_jj w_j^2`` with the exact Hessian diagonal or the Gauss-Newton one.
* :func:`obs_prune` -- layer-wise Optimal Brain Surgeon (L-OBS; Dong, Chen & Pan 2017): per layer,
  the inverse Hessian of the layer's reconstruction error, the OBS saliencies, and the
  compensating update of the remaining weights.
"""

from __future__ import annotations

import numpy as np

from ._checks import check_choice, check_float
from .layers import Conv2d, Dense
from .layers.base import where_kept
from .losses import get_loss, loss_name
from .masks import keep_count, top_k_mask
from .network import check_net
from .second_order import gn_diag, hessian_diag, hvp

__all__ = ["GRASP_TEMPERATURE", "GRASP_EPS", "grasp_scores", "obd_scores", "lobs_hessians", "obs_prune"]

#: GraSP's temperature ``T`` (the logits are divided by it), the value of both reference codes
GRASP_TEMPERATURE = 200.0
#: the constant both reference codes add to ``|sum of scores|`` before normalising
GRASP_EPS = 1e-10


def _bool(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def _gradient(net, x, y, loss, T: float) -> list[dict]:
    """``dL(z / T)/dtheta`` (pruned entries zero) by one forward and one backward pass."""
    out, trace = net.forward(x, return_trace=True)
    if out.ndim != 2:
        raise ValueError(f"the network output must be (B, C) for a loss, got shape {out.shape}")
    _, eps = get_loss(loss)(out / T, y)
    return net.backward(trace, eps / T)


def grasp_scores(
    net, x, y, *, loss="cross_entropy", temperature=GRASP_TEMPERATURE, convention="synflow", normalize=True
) -> list[dict]:
    r"""GraSP scores (Gradient Signal Preservation, Wang et al. 2020), exact in float64.

    GraSP keeps the weights whose removal least reduces the gradient norm after pruning. With
    ``L_T(theta) = L(z(theta) / T)`` (logits divided by the temperature ``T``), ``g = dL_T/dw``
    over the weights of every Dense and Conv2d layer (biases are not in ``g`` and not scored, as
    in both reference codes) and ``H`` the Hessian of ``L_T``, the first-order change of
    ``g^T g`` when ``w`` is scaled to ``w + delta`` is ``2 delta^T H g``; removing weight ``j``
    (``delta_j = -w_j``) changes it by ``-2 w_j (H g)_j``, and the paper's score is

    .. math:: S(-w) = -w \odot (H g), \qquad s = \frac{S}{|\sum_j S_j| + 10^{-10}} .

    ``H g`` is one exact Hessian-vector product (:func:`refnet.second_order.hvp`, the R-operator,
    with the direction ``g`` on the weights and zero on the biases), not double backprop.

    The two conventions (same ranking, opposite sign; the masks agree up to ties):

    ``"paper"``
        ``s = -w (H g) / (|sum| + eps)``, as the paper and its code (alecwangcq/GraSP,
        ``pruner/GraSP.py``: ``-layer.weight.data * layer.weight.grad``). GraSP REMOVES the
        largest scores (it keeps ``s <= `` the threshold of the top ``sparsity`` fraction), so
        with :func:`refnet.pruning.prune`, which keeps the largest, pass ``-s``.
    ``"synflow"``
        ``s = +w (H g) / (|sum| + eps)``, as Synaptic-Flow's ``Pruners/pruners.py`` (Tanaka et
        al. 2020; "Hg * theta (negate to remove top percent)"), which keeps the LARGEST scores like
        every other pruner there: ``prune(net, s, sparsity)`` directly. The default.

    The normaliser is positive, so normalising changes no ranking. The reference codes sum ``g``
    and ``H g`` over mini-batches (the paper's code over two half batches); here ``x`` is one
    batch and ``L`` its mean loss, which scales ``S`` by a positive factor (4 for the paper's two
    halves) and changes nothing after normalising but the relative weight of the ``1e-10``.

    Parameters
    ----------
    net : Network
    x : ndarray, shape (B, *net.in_shape)
    y : ndarray, shape (B,) int labels or (B, C) targets
    loss : "cross_entropy" (GraSP's) or "mse"
    temperature : float
        ``T > 0``; default :data:`GRASP_TEMPERATURE` (200, both reference codes).
    convention : {"synflow", "paper"}
    normalize : bool
        Divide by ``|sum_j S_j| + 1e-10`` (both reference codes do).

    Returns
    -------
    list of dict
        ``{"W": s}`` per affine layer, ``{}`` for parameter-free layers; zero at pruned entries.
    """
    net = check_net(net)
    name = loss_name(loss)
    T = check_float(temperature, "temperature", min_value=0.0, min_inclusive=False)
    convention = check_choice(convention, "convention", ["synflow", "paper"])
    normalize = _bool(normalize, "normalize")
    g = _gradient(net, x, y, name, T)
    v = [{"W": gi["W"]} if "W" in gi else {} for gi in g]  # the direction: g on the weights only
    Hg = hvp(net, x, y, v, name, temperature=T)
    scores = [
        {"W": where_kept(p["W"], m["W"]) * h["W"]} if "W" in p else {} for p, m, h in zip(net.params, net.masks, Hg)
    ]  # w (H g), zero at pruned entries
    if normalize:
        total = abs(sum(float(s["W"].sum()) for s in scores if s)) + GRASP_EPS
        scores = [{k: a / total for k, a in s.items()} for s in scores]
    if convention == "paper":
        scores = [{k: -a for k, a in s.items()} for s in scores]
    return scores


def obd_scores(
    net, x, y, *, loss="cross_entropy", diag="exact", include_bias=False, temperature=1.0, max_elements=None
) -> list[dict]:
    r"""Optimal Brain Damage saliencies ``s_j = 1/2 H_jj w_j^2`` (LeCun, Denker & Solla 1990).

    OBD approximates the increase of the loss when weight ``j`` is set to zero by the second-order
    Taylor term with the Hessian taken diagonal (and the gradient term dropped, "assuming a
    critical point"): ``delta L ~ 1/2 H_jj w_j^2``. Small scores are pruned first, so
    :func:`refnet.pruning.prune` (keeps the largest) takes them as they are.

    Parameters
    ----------
    net, x, y, loss
        As in :func:`grasp_scores` ("cross_entropy" or "mse").
    diag : {"exact", "gauss_newton"}
        ``H_jj`` from :func:`refnet.second_order.hessian_diag` (exact, may be negative away from a
        minimum) or :func:`refnet.second_order.gn_diag` (the Gauss-Newton diagonal, non-negative:
        what OBD's own derivation keeps, and cheaper).
    include_bias : bool
        Also score the biases.
    temperature, max_elements
        As in :func:`refnet.second_order.hessian_diag`.

    Returns
    -------
    list of dict
        ``1/2 H_jj (c_j w_j)^2``; zero at pruned entries.
    """
    net = check_net(net)
    diag = check_choice(diag, "diag", ["exact", "gauss_newton"])
    include_bias = _bool(include_bias, "include_bias")
    fn = hessian_diag if diag == "exact" else gn_diag
    h = fn(net, x, y, loss, temperature=temperature, max_elements=max_elements)
    out = []
    for p, m, d in zip(net.params, net.masks, h):
        keys = [k for k in ("W", "b") if k in p and (k == "W" or include_bias)]
        out.append({k: 0.5 * d[k] * where_kept(p[k], m[k]) ** 2 for k in keys})
    return out


# -------------------------------------------------------------------------------------------
# layer-wise OBS
# -------------------------------------------------------------------------------------------


def _layer_inputs(layer, cache) -> np.ndarray:
    """The rows the layer's weight multiplies: ``x^{l-1}`` ``(B, n_in)`` for Dense, the im2col
    patches ``(B P, K)`` for Conv2d."""
    if isinstance(layer, Conv2d):
        cols = cache["cols"]
        return cols.reshape(-1, cols.shape[2])
    return cache["x"]


def lobs_hessians(net, x) -> list:
    r"""The Hessian of each affine layer's reconstruction error (L-OBS), per output row.

    For layer ``l`` with inputs ``X`` (``n`` rows: the ``B`` examples' ``x^{l-1}`` for Dense, the
    ``B P`` im2col patches for Conv2d) the error of replacing the weights ``W`` by ``W'`` is

    .. math:: E^l = \frac{1}{2n} \lVert X W'^T - X W^T \rVert_F^2, \qquad
              \frac{\partial^2 E^l}{\partial w'_a \partial w'_a} = \frac1n X^T X = H^l

    for every output row ``a`` (rows do not interact). ``X`` comes from one forward pass of ``net``.

    Returns
    -------
    list
        ``H^l`` ``(N, N)`` (``N = n_in`` or ``c_in kh kw``) per Dense / Conv2d layer, None for other
        layers.
    """
    net = check_net(net)
    _, trace = net.forward(x, return_trace=True)
    out = []
    for layer, cache in zip(net.layers, trace.caches):
        if isinstance(layer, (Dense, Conv2d)):
            X = _layer_inputs(layer, cache)  # (n, N)
            out.append(X.T @ X / X.shape[0])
        else:
            out.append(None)
    return out


def _obs_row(w: np.ndarray, H: np.ndarray, Hinv: np.ndarray, S: np.ndarray, K: np.ndarray) -> np.ndarray:
    """The optimal row ``w'`` with ``w'_S = 0`` for the quadratic ``(w' - w)^T H (w' - w)``.

    ``delta_K = H_KK^{-1} H_KS w_S`` (a ``|K|`` system), or equivalently, through the inverse,
    ``delta = -Hinv_{:,S} (Hinv_SS)^{-1} w_S`` (a ``|S|`` system); the smaller one is solved."""
    out = w.copy()
    if S.size == 0:
        return out
    if K.size <= S.size:
        if K.size:
            out[K] = w[K] + np.linalg.solve(H[np.ix_(K, K)], H[np.ix_(K, S)] @ w[S])
    else:
        lam = np.linalg.solve(Hinv[np.ix_(S, S)], w[S])  # (|S|,)
        out[K] = w[K] - Hinv[np.ix_(K, S)] @ lam
    out[S] = 0.0
    return out


def obs_prune(net, x, sparsity, *, damp=1e-4, include_layers=None) -> object:
    r"""Layer-wise Optimal Brain Surgeon (L-OBS, Dong, Chen & Pan 2017): prune every Dense and
    Conv2d layer to ``sparsity`` with the OBS saliencies of its reconstruction error, and move the
    remaining weights to compensate.

    Per layer (inputs ``X`` of the network as given, one forward pass; :func:`lobs_hessians`):

    1. ``H = X^T X / n + lambda I`` with ``lambda = damp * mean(diag(X^T X / n))`` (``X^T X`` is
       singular when ``n < N`` or inputs are constant, e.g. MNIST's border pixels; ``damp = 0``
       needs a positive definite ``X^T X``);
    2. the OBS saliency of each entry, the least increase of ``E`` when it alone is zeroed and the
       rest of its row moves optimally: ``L_q = w_q^2 / (2 [H^{-1}]_qq)``;
    3. keep the ``round(m (1 - sparsity))`` largest saliencies of the layer (ties: the lower flat
       index first; entries the mask already prunes stay pruned and rank last);
    4. the compensating update: in every row, the exact minimiser of ``E`` with the pruned set
       ``S`` held at zero, ``w'_K = w_K + H_KK^{-1} H_KS w_S``. This is what a sequence of single
       OBS steps ``delta = -(w_q / [H^{-1}]_qq) H^{-1} e_q`` reaches for the same set when the
       inverse is updated after each step (with the inverse held fixed, as the L-OBS paper
       describes, a later step would move an earlier zero).

    Selection is one-shot from the saliencies of step 2; biases are neither pruned nor updated.

    Parameters
    ----------
    net : Network
    x : ndarray, shape (B, *net.in_shape)
        The data whose layer inputs define the reconstruction errors.
    sparsity : float or sequence of float
        Fraction of each layer's weights to prune, in [0, 1): one value for every affine layer, or
        one per affine layer (in order).
    damp : float
        Relative damping ``>= 0`` (above).
    include_layers : sequence of int, optional
        Code indices of the affine layers to prune (default: all).

    Returns
    -------
    Network
        A new network: masks with the pruned entries removed and kept weights updated (the stored
        values of pruned entries are left as they were; the mask holds them at zero).
    """
    net = check_net(net)
    damp = check_float(damp, "damp", min_value=0.0)
    affine = [i for i, layer in enumerate(net.layers) if isinstance(layer, (Dense, Conv2d))]
    if include_layers is None:
        chosen = list(affine)
    else:
        chosen = [int(i) for i in include_layers]
        bad = [i for i in chosen if i not in affine]
        if bad:
            raise ValueError(f"include_layers must hold indices of Dense or Conv2d layers {affine}, got {bad}")
    if isinstance(sparsity, (list, tuple, np.ndarray)):
        sp = [check_float(s, f"sparsity[{j}]", min_value=0.0, max_value=1.0, max_inclusive=False) for j, s in enumerate(sparsity)]
        if len(sp) != len(affine):
            raise ValueError(f"sparsity must be one float or one per affine layer ({len(affine)}), got {len(sp)} values")
        per_layer = dict(zip(affine, sp))
    else:
        s = check_float(sparsity, "sparsity", min_value=0.0, max_value=1.0, max_inclusive=False)
        per_layer = {i: s for i in affine}
    Hs = lobs_hessians(net, x)
    params = [{k: a.copy() for k, a in p.items()} for p in net.params]
    masks = [{k: a.copy() for k, a in m.items()} for m in net.masks]
    for i in chosen:
        H0 = Hs[i]
        N = H0.shape[0]
        mean_diag = float(np.trace(H0)) / N
        lam = damp * (mean_diag if mean_diag > 0 else 1.0)
        H = H0 + lam * np.eye(N, dtype=H0.dtype)
        try:
            Hinv = np.linalg.inv(H)
        except np.linalg.LinAlgError:
            raise ValueError(
                f"layer {i}: the reconstruction Hessian X^T X / n is singular; use damp > 0 (got damp={damp})"
            ) from None
        W = params[i]["W"]
        shape = W.shape
        mask = masks[i]["W"].reshape(shape[0], -1)  # (rows, N)
        w = where_kept(W, masks[i]["W"]).reshape(shape[0], -1)  # (rows, N): the effective weights
        sal = w * w / (2.0 * np.diag(Hinv))[None, :]  # (rows, N): OBS saliencies
        new_mask = top_k_mask(sal, keep_count(mask.size, per_layer[i]), mask)  # (rows, N)
        Wn = W.reshape(shape[0], -1).copy()
        for a in range(shape[0]):
            K = np.flatnonzero(new_mask[a])
            S = np.flatnonzero(~new_mask[a])
            row = _obs_row(w[a], H, Hinv, S, K)
            Wn[a, K] = row[K]
        params[i]["W"] = Wn.reshape(shape)
        masks[i]["W"] = new_mask.reshape(shape)
    return net.with_params(params).with_masks(masks)
