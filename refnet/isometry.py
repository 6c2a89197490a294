r"""Approximate isometry (AI, [SPP]) and OrthP ([DI]): repairing the weights of a pruned network.

Approximate isometry (PAPER.md section 7)
-----------------------------------------
For every affine layer ``l`` with mask ``C`` and stored weight ``W`` let

.. math:: V = C \odot W \quad\text{as a matrix: } (n_{out}, n_{in}) \text{ for Dense, }
          (c_{out}, c_{in} k_h k_w) \text{ for Conv2d (PyTorch's flattening).}

The residual of the layer is the Gram matrix minus the identity **on the smaller side**,

.. math:: A = V V^\top - I_{n_{out}} \quad (n_{out} \le n_{in}), \qquad
          A = V^\top V - I_{n_{in}} \quad (n_{out} > n_{in}),

because the larger Gram matrix has rank at most ``min(n_out, n_in)`` and can never equal the
identity: for a tall ``V`` (``n_out > n_in``) ``||V V^T - I||_F >= sqrt(n_out - n_in)`` for every
``V``. The SPP code reshapes conv kernels to ``[kh*kw*c_in, c_out]`` (TensorFlow's layout), i.e. ``V^T``
with its rows permuted ((kh, kw, c_in) order instead of PyTorch's (c_in, kh, kw)), and always uses ``W^T W`` of that layout, which is
our *row* Gram ``V V^T`` (``c_out x c_out``); a permutation ``P`` only changes the column Gram to
``P A P^T``, so the residual is the same up to which Gram side is used. For every MLP of the papers
(784-100-...-100-10) ``n_out <= n_in`` in each layer and the smaller side *is* the SPP side;
``gram="row"`` reproduces the SPP choice everywhere.

AI minimises, data-free, with plain gradient descent on the kept weights only,

.. math:: F(W) = \sum_l \lVert A_l \rVert_F \quad\text{(SPP code; or } \sum_l \lVert A_l\rVert_F^2
          \text{ with squared=True).}

Hand-derived gradient (``A`` is symmetric): for ``A = V^T V - I``, ``d||A||_F^2 / dV = 4 V A``,
so ``d||A||_F / dV = 2 V A / ||A||_F``; for ``A = V V^T - I`` they are ``4 A V`` and
``2 A V / ||A||_F``. The gradient with respect to the stored ``W`` is ``C ⊙ dF/dV`` (chain rule
through ``V = C ⊙ W``), so pruned entries get exactly zero gradient and stay exactly zero. When
``||A||_F = 0`` the unsquared norm is not differentiable; refnet returns the gradient 0 there
(a minimiser; no NaN).

Note on the unsquared objective: ``||A||_F`` has a kink at ``A = 0`` and its gradient has norm
about 2 near an orthogonal ``V`` whatever the distance, so plain GD with a constant ``lr`` ends in a
small limit cycle of size about ``lr`` when ``I`` is reachable (full masks); it converges normally
when the mask keeps ``||A||_F`` away from 0 (the pruned case the papers study). ``squared=True``
is smooth and converges linearly to orthogonality; along a singular value ``s`` of ``V`` its
curvature is ``12 s^2 - 4`` (8 at an orthogonal ``V``), so GD is stable for ``lr < 2 / (12 s_max^2
- 4)``: ``lr = 0.1`` works near orthogonal weights (``s_max^2 < 2``) but diverges for badly scaled
ones, for which a smaller ``lr`` is needed (the unsquared gradient is normalised and has no such
limit).

What AI does to a sparse layer (measured, refnet 784-100x6-10, random 90% mask): the minimum of
``||A||_F`` under a mask is ``sqrt(r - s)`` (:func:`isometry_lower_bound`; 0 for these masks), but an
orthogonal matrix with ~10% support is essentially a signed permutation with small blocks, and GD
gets there only partly: after the SPP schedule a 100 x 100 layer keeps ~18% of its kept weights
above 1e-3 (about 2 per row) and can end at a partial isometry with 1-2 exactly-zero singular
values (``||A||_F = sqrt(k)``; partial isometries are stationary points).

Rounding and long runs: the unsquared descent on a sparse mask is chaotic. On that MLP two
engines whose steps differ by 1e-16 (the NumPy dense products and the Numba sparse kernels, which
add in another order) give weights 1e-16 apart after 10 steps, 2e-11 after 50, 2e-7 after 200
and 0.08 after 300, while the objective curves stay within 1e-4 of each other. The individual
weights after thousands of steps are therefore not reproducible across engines, BLAS builds or
thread counts; the objective, the residuals and the spectra are.

Speed: each step of a layer is :func:`refnet.kernels.isometry_step` (Numba sparse Gram and
gradient kernels at 80% sparsity and more): 500 steps of that MLP at 90% take 0.27 s against
0.64 s on the NumPy engine (one thread).

OrthP and L1 neuron pruning ([DI], PAPER.md section 11)
------------------------------------------------------
:func:`l1_neuron_prune` removes whole units (rows of ``W^l``, entries of ``b^l``, columns of
``W^{l+1}``), giving a smaller dense network; :func:`orthp` then re-orthogonalises every remaining
weight matrix by QR.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import time

import numpy as np

from ._checks import check_array, check_choice, check_float, check_int
from .layers import AvgPool2d, Conv2d, Dense, Flatten, GlobalAvgPool2d, MaxPool2d
from .network import Network
from .training import _progress_target

__all__ = [
    "affine_layers",
    "layer_matrix",
    "gram_side",
    "gram_residual",
    "isometry_value_and_grad",
    "isometry_residuals",
    "isometry_gradients",
    "isometry_lower_bound",
    "min_residual_weights",
    "approximate_isometry",
    "format_isometry_report",
    "DEFAULT_GAINS",
    "activation_gain",
    "orthp",
    "l1_neuron_prune",
]

GRAM_CHOICES = ("smaller", "row", "column")
PLATEAU_WINDOW = 100  # steps between the two objective values of the relative-change stop rule
# The product A V (the gradient) uses a scipy CSR copy of V when the mask keeps at most this
# fraction and the matrix has at least SPARSE_MIN_SIZE entries. Measured (one thread, 1024 x 1024,
# per step): density 0.05: CSR 1.4x faster; 0.10: ~1.2x; 0.15: ~1.1x slower; below ~256 x 256 the
# CSR overhead cancels the gain. The Gram matrix stays a dense symmetric rank-k update (CSR is slower
# there at these densities).
SPARSE_DENSITY = 0.12
SPARSE_MIN_SIZE = 65_536


# ============================================================================================
# Matrices, Gram sides, residuals
# ============================================================================================


def affine_layers(net: Network) -> list[int]:
    """Indices (into ``net.layers``) of the layers with a weight ``W`` (Dense, Conv2d)."""
    if not isinstance(net, Network):
        raise TypeError(f"net must be a refnet Network, got {type(net).__name__}")
    return [i for i, layer in enumerate(net.layers) if "W" in layer.keys]


def layer_matrix(W: np.ndarray) -> np.ndarray:
    """``W`` as the matrix ``V``: ``(n_out, n_in)`` for Dense, ``(c_out, c_in*kh*kw)`` for conv
    (a view of ``W``; C order, PyTorch's ``weight.flatten(1)``)."""
    return W.reshape(W.shape[0], -1)


def gram_side(shape, gram: str = "smaller") -> str:
    """``"row"`` (``A = V V^T - I``) or ``"column"`` (``A = V^T V - I``) for a ``(n_out, n_in)``
    matrix: the smaller Gram matrix by default (``"row"`` when ``n_out <= n_in``)."""
    gram = check_choice(gram, "gram", GRAM_CHOICES)
    if gram != "smaller":
        return gram
    n_out, n_in = shape
    return "row" if n_out <= n_in else "column"


def gram_residual(V: np.ndarray, side: str) -> np.ndarray:
    """``A = V V^T - I`` (side "row", ``(n_out, n_out)``) or ``V^T V - I`` ("column",
    ``(n_in, n_in)``). ``V @ V.T`` of one buffer runs as a symmetric rank-k update (half the
    flops of a general product)."""
    G = V @ V.T if side == "row" else V.T @ V  # (r, r), symmetric
    G[np.diag_indices_from(G)] -= 1.0  # A = G - I, in place
    return G


class _SparseV:
    """A CSR matrix with the (fixed) sparsity pattern of the mask, holding ``V^T`` (row side) or
    ``V`` (column side); :meth:`product` refreshes its values from ``V`` and returns ``A V`` or
    ``V A`` in ``2 nnz r`` flops instead of ``2 r^2 n``."""

    def __init__(self, mask: np.ndarray, side: str):
        import scipy.sparse as sp

        self.side = side
        n_out, n_in = mask.shape
        if side == "row":  # CSR of V^T: rows are the columns of V
            j, i = np.nonzero(mask.T)  # sorted by (j, i)
            self.flat = i * n_in + j  # positions in V.ravel()
            shape = (n_in, n_out)
            self.csr = sp.csr_matrix((np.zeros(len(i)), (j, i)), shape=shape)
        else:  # CSR of V
            i, j = np.nonzero(mask)
            self.flat = i * n_in + j
            self.csr = sp.csr_matrix((np.zeros(len(i)), (i, j)), shape=mask.shape)
        self.csr.sort_indices()

    def product(self, A: np.ndarray, V: np.ndarray) -> np.ndarray:
        self.csr.data[:] = V.ravel()[self.flat]  # CSR order equals the nonzero order used above
        if self.side == "row":  # A V = (V^T A)^T, A symmetric
            return np.asarray(self.csr @ A).T  # (n_out, n_in)
        return np.asarray(self.csr @ A)  # V A: (n_out, n_in)


def _auto_sparse(mask: np.ndarray) -> bool:
    """The CSR product pays when the mask is sparse and the matrix is not tiny (measured)."""
    return mask.size >= SPARSE_MIN_SIZE and mask.mean() <= SPARSE_DENSITY


def _times_A(A: np.ndarray, V: np.ndarray, side: str, mask, sparse) -> np.ndarray:
    """``A V`` (row side) or ``V A`` (column side), times the mask. ``sparse`` is None/False
    (dense BLAS product) or a :class:`_SparseV` of the mask (CSR product)."""
    if sparse:
        P = sparse.product(A, V)  # (n_out, n_in), full product; masked below
    else:
        P = A @ V if side == "row" else V @ A  # (n_out, n_in)
    if mask is not None:
        P = P * mask
    return P


def isometry_value_and_grad(V, mask=None, *, squared: bool = False, gram: str = "smaller", sparse=None):
    r"""The AI objective of one matrix and its gradient.

    .. math:: f(V) = \lVert A \rVert_F \text{ (or } \lVert A\rVert_F^2\text{)}, \qquad
              A = V V^\top - I \text{ or } V^\top V - I \text{ (see } gram\text{)},

    gradient ``2 A V / ||A||`` (row) or ``2 V A / ||A||`` (column); squared: ``4 A V`` or ``4 V A``;
    then times ``mask``. ``||A|| = 0`` gives the gradient 0 for the unsquared norm.

    Parameters
    ----------
    V : ndarray, shape (n_out, n_in)
        The effective weight matrix (``mask * W`` already applied by the caller if wanted).
    mask : ndarray of bool, shape (n_out, n_in), optional
        The returned gradient is multiplied by it (the chain rule through ``V = mask * W``).
    squared : bool
    gram : {"smaller", "row", "column"}
    sparse : bool, optional
        Compute the product through scipy CSR; default: when the mask density is <= 0.15.

    Returns
    -------
    value : float
    grad : ndarray, shape (n_out, n_in)
    """
    V = check_array(V, "V", ndim=2)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != V.shape:
            raise ValueError(f"mask must have the shape of V {V.shape}, got {mask.shape}")
        mask = mask.astype(bool, copy=False)
    side = gram_side(V.shape, gram)
    if sparse is None:
        sparse = mask is not None and _auto_sparse(mask)
    if sparse and mask is None:
        mask = np.ones(V.shape, dtype=bool)
    norm, scale, g = _norm_scale_direction(V, side, mask, _SparseV(mask, side) if sparse else None, squared)
    if g is None:  # ||A|| = 0 with the unsquared norm
        return 0.0, np.zeros_like(V)
    g *= scale
    return (norm * norm if squared else norm), g


def _norm_scale_direction(V, side, mask, sparse, squared):
    """``(||A||_F, scale, mask * (A V or V A))`` for one matrix; the gradient is ``scale`` times
    the direction (``4`` squared, ``2 / ||A||_F`` otherwise). The direction is None when the
    scale is 0 (unsquared norm at ``A = 0``, where refnet takes the gradient 0)."""
    A = gram_residual(V, side)  # (r, r)
    norm = float(np.linalg.norm(A))
    scale = 4.0 if squared else (2.0 / norm if norm > 0.0 else 0.0)
    return norm, scale, (_times_A(A, V, side, mask, sparse) if scale else None)


def _check_layers(net: Network, layers) -> list[int]:
    aff = affine_layers(net)
    if not aff:
        raise ValueError("net has no affine layers (Dense or Conv2d): nothing to make isometric")
    if layers is None:
        return aff
    if isinstance(layers, (numbers.Integral,)) and not isinstance(layers, bool):
        layers = [layers]
    if not isinstance(layers, (list, tuple, range, np.ndarray)):
        raise TypeError(f"layers must be None or a list of layer indices, got {type(layers).__name__}")
    out = []
    for i in layers:
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, numbers.Integral):
            raise TypeError(f"layers must hold int layer indices, got {i!r}")
        i = int(i)
        j = i + net.n_layers if i < 0 else i
        if not 0 <= j < net.n_layers:
            raise ValueError(f"layers: index {i} is out of range for a network of {net.n_layers} layers")
        if j not in aff:
            raise ValueError(
                f"layers: layer {i} ({type(net.layers[j]).__name__}) has no weight; affine layers are {aff}"
            )
        if j not in out:
            out.append(j)
    if not out:
        raise ValueError("layers must name at least one affine layer, got none")
    return sorted(out)


def isometry_residuals(net: Network, *, squared: bool = False, gram: str = "smaller", layers=None) -> list[float]:
    """``||A_l||_F`` (or its square) of every affine layer (or of ``layers``), in layer order,
    with ``V_l = mask_l * W_l`` (see the module docstring for ``A_l``)."""
    idx = _check_layers(net, layers)
    out = []
    for i in idx:
        V = layer_matrix(net.params[i]["W"] * net.masks[i]["W"])
        n = float(np.linalg.norm(gram_residual(V, gram_side(V.shape, gram))))
        out.append(n * n if squared else n)
    return out


def isometry_gradients(net: Network, squared: bool = False, *, gram: str = "smaller", layers=None) -> list[np.ndarray]:
    """Gradient of ``sum_l ||A_l||_F`` (or of the squares) with respect to every affine layer's
    stored ``W`` (shape of ``W``, exactly zero at pruned entries), one array per affine layer
    (or per entry of ``layers``), in layer order."""
    idx = _check_layers(net, layers)
    out = []
    for i in idx:
        W, M = net.params[i]["W"], net.masks[i]["W"]
        V = layer_matrix(W * M)
        _, g = isometry_value_and_grad(V, layer_matrix(M), squared=squared, gram=gram)
        out.append(g.reshape(W.shape))
    return out


def isometry_lower_bound(mask, *, gram: str = "smaller", squared: bool = False) -> dict:
    r"""The smallest ``||A||_F`` any weights can reach under a given mask, with its certificates.

    With ``V = C ⊙ W`` and the Gram matrix of size ``r`` (the side used):

    Lower bound (every ``W``)
        ``V V^T`` (or ``V^T V``) has rank at most ``rank(V) <= s``, the structural (term) rank of
        the mask (the size of a maximum matching: kept entries no two in one row or column;
        :func:`scipy.sparse.csgraph.structural_rank`). So at least ``r - s`` eigenvalues of ``A``
        are -1:

        .. math:: \lVert A \rVert_F \ge \sqrt{r - s} \ge \sqrt{z},

        where ``z`` is the number of all-zero rows of the mask (row Gram; columns for the column
        Gram): each forces ``A_ii = -1`` whatever ``W`` is. ``sqrt(z)`` alone is a lower bound
        that need not be attained (when ``s < r - z``).
    Attained
        Put 1 on the ``s`` entries of a maximum matching and 0 elsewhere
        (:func:`min_residual_weights`): the matched rows (columns) are orthonormal and the others
        zero, so the Gram is ``diag(matched)`` and ``||A||_F = sqrt(r - s)``. Hence
        ``sqrt(r - s)`` is exactly the minimum over ``W`` for this mask.

    Gradient descent need not reach it: every partial isometry (Gram = a projection) is a
    stationary point of both objectives (``A V = 0`` there), so AI can stop at ``sqrt(k)`` for
    ``k`` collapsed directions although ``sqrt(r - s)`` is smaller.

    Returns
    -------
    dict with ``side``, ``size`` (r), ``zero_lines`` (z), ``structural_rank`` (s), ``bound``
    (``sqrt(r - s)``, the attainable minimum; ``r - s`` if squared) and ``zero_lines_bound``
    (``sqrt(z)``; ``z`` if squared).
    """
    M = np.asarray(mask, dtype=bool)
    M = M.reshape(M.shape[0], -1)
    side = gram_side(M.shape, gram)
    if side == "row":
        r, z = M.shape[0], int(np.sum(~M.any(axis=1)))
    else:
        r, z = M.shape[1], int(np.sum(~M.any(axis=0)))
    if M.all():
        s = min(M.shape)
    else:
        import scipy.sparse as sp
        from scipy.sparse.csgraph import structural_rank

        s = int(structural_rank(sp.csr_matrix(M.astype(np.int8)))) if M.any() else 0
    deficit = max(0, r - s)
    return {
        "side": side,
        "size": r,
        "zero_lines": z,
        "structural_rank": s,
        "bound": float(deficit) if squared else math.sqrt(deficit),
        "zero_lines_bound": float(z) if squared else math.sqrt(z),
    }


def min_residual_weights(mask, *, gram: str = "smaller") -> np.ndarray:
    """Weights that attain the minimum ``sqrt(r - s)`` of ``||A||_F`` for ``mask``: 1 on the
    entries of a maximum matching of the mask (kept entries no two in one row or column), 0
    elsewhere; shape of ``mask``. A certificate of :func:`isometry_lower_bound`, not a useful
    initialisation (each unit then has a single input)."""
    import scipy.sparse as sp
    from scipy.sparse.csgraph import maximum_bipartite_matching

    M = np.asarray(mask, dtype=bool)
    Mm = M.reshape(M.shape[0], -1)
    gram_side(Mm.shape, gram)  # validates gram; a matching serves both sides
    W = np.zeros(Mm.shape)
    if Mm.any():
        match = maximum_bipartite_matching(sp.csr_matrix(Mm.astype(np.int8)), perm_type="column")
        rows = np.flatnonzero(match >= 0)  # row i matched to column match[i]
        W[rows, match[rows]] = 1.0
    return W.reshape(M.shape)


# ============================================================================================
# Approximate isometry: gradient descent
# ============================================================================================


def _progress_fn(progress, steps: int):
    stream = _progress_target(progress)
    if stream is None or not hasattr(stream, "write"):
        return stream  # no reports, or the caller's callable
    every = max(1, steps // 10)

    def report(step, value):
        if step % every == 0 or step == steps:
            stream.write(f"AI step {step}/{steps}  objective {value:.6e}\n")
            stream.flush()

    return report


def _descend(steppers, Vs, steps, lr, squared, tol, report_fn):
    """The gradient-descent loop of :func:`approximate_isometry`. ``steppers[k](V)`` returns
    ``(||A||_F of V, V after one step)`` (a new array) and ``steppers[k].residual(V)`` the norm
    alone; the list ``Vs`` is updated in place to the final matrices."""

    def total(norms):
        return sum(n * n for n in norms) if squared else sum(norms)

    pairs = [st(V) for st, V in zip(steppers, Vs)]
    norms0 = [n for n, _ in pairs]
    F0 = F = total(norms0)
    norms = norms0
    history = [F0]  # history[t] = objective after t steps
    stopped = "steps"
    done = 0
    if not math.isfinite(F0):
        raise FloatingPointError(f"approximate_isometry: the initial objective is {F0} (weights too large)")
    if F0 < tol:
        return F0, norms0, F, norms, done, "tol"
    for step in range(1, steps + 1):
        Vs[:] = [V_new for _, V_new in pairs]  # pruned entries: zero gradient, V stays 0
        done = step
        if step < steps:
            pairs = [st(V) for st, V in zip(steppers, Vs)]
            norms = [n for n, _ in pairs]
        else:  # the last objective needs no step
            norms = [st.residual(V) for st, V in zip(steppers, Vs)]
        F = total(norms)
        if not math.isfinite(F):
            raise FloatingPointError(
                f"approximate_isometry diverged at step {step}: objective {F}; try a smaller lr (got {lr})"
            )
        history.append(F)
        if report_fn is not None:
            report_fn(step, F)
        if F < tol:
            stopped = "tol"
            break
        if step >= PLATEAU_WINDOW:
            prev = history[step - PLATEAU_WINDOW]
            if abs(prev - F) <= tol * prev:
                stopped = "plateau"
                break
    return F0, norms0, F, norms, done, stopped


class _Stepper:
    """One layer's AI step ``V -> (||A||_F, V - lr * scale * mask * G)``.

    On the smaller Gram side (the default; for a square ``V`` both sides give the same residual
    and the same gradient, ``V V^T V - V``) the step is :func:`refnet.kernels.isometry_step`,
    which picks its engine (the Numba sparse kernels on sparse masks); on the other side (an
    explicit ``gram`` that names the larger Gram matrix) the NumPy products of
    :func:`isometry_value_and_grad` run.
    """

    def __init__(self, shape, mask, side, lr, squared, sparse, engine):
        n_out, n_in = shape
        self.mask, self.side, self.lr, self.squared, self.engine = mask, side, lr, squared, engine
        self.method = "auto" if sparse is None else ("csr" if sparse else "dense")
        self.kernel = side == ("column" if n_out >= n_in else "row") or n_out == n_in
        self._sp = None
        if not self.kernel and mask is not None and (_auto_sparse(mask) if sparse is None else sparse):
            self._sp = _SparseV(mask, side)

    def __call__(self, V):
        if self.kernel:
            from . import kernels

            V_new, n = kernels.isometry_step(V, self.mask, self.lr, self.squared, engine=self.engine, method=self.method)
            return n, V_new
        n, scale, g = _norm_scale_direction(V, self.side, self.mask, self._sp, self.squared)
        return n, (V.copy() if g is None else V - (self.lr * scale) * g)

    def residual(self, V):
        return float(np.linalg.norm(gram_residual(V, self.side)))


def approximate_isometry(
    net: Network,
    steps: int = 10_000,
    lr: float = 0.1,
    *,
    squared: bool = False,
    tol: float = 1e-10,
    layers=None,
    gram: str = "smaller",
    progress=None,
    return_report: bool = False,
    sparse=None,
    engine: str | None = None,
):
    r"""Approximate isometry (SPP): make every masked weight matrix as orthogonal as its mask allows.

    Plain gradient descent on ``F(W) = sum_l ||A_l||_F`` (``squared``: ``sum_l ||A_l||_F^2``),
    data-free:

    .. math:: W_l \leftarrow W_l - \eta\, C_l \odot \partial F / \partial V_l ,

    with the hand-derived gradients of the module docstring. Only kept weights move: the effective
    weights ``C ⊙ W`` are what AI changes; the stored ``W`` at pruned positions is left exactly as it
    was (and the effective weight there stays exactly 0). Biases are not touched; masks are copied.

    Stopping: after step ``t`` the run stops when ``F < tol`` ("tol"), or when ``t >= 100`` and
    ``|F_{t-100} - F_t| <= tol * F_{t-100}`` ("plateau": less than ``tol`` relative change over the
    last 100 steps; this also ends a limit cycle whose period divides 100), else after ``steps``
    ("steps").

    Parameters
    ----------
    net : Network
        Not changed.
    steps : int >= 0
        Maximum number of gradient steps (SPP code: 10,000).
    lr : float > 0
        Step size eta (SPP code: 0.1).
    squared : bool
        Minimise the sum of squared norms instead (smooth; reaches orthogonality with full masks).
    tol : float >= 0
        See "Stopping"; 0 disables early stopping.
    layers : list of int, optional
        Indices into ``net.layers`` of the affine layers to repair (default: all of them); the
        objective is summed over these only, the other layers are copied unchanged.
    gram : {"smaller", "row", "column"}
        Which Gram matrix; "row" is the SPP code's choice (``W^T W`` of TF's ``[n_in, n_out]``).
    progress : None, bool, text stream or callable
        True/stream: a line every ~10% of ``steps``; a callable is called as ``progress(step, F)``
        after every step.
    return_report : bool
        Also return a report dict (see :func:`format_isometry_report`).
    sparse : bool, optional
        True: the sparse kernels (``method="csr"`` of :func:`refnet.kernels.isometry_step`; SciPy
        CSR on the NumPy engine); False: dense products; None (default): the engine decides by
        the mask's sparsity (``kernels/_tuning.py``).
    engine : {"numpy", "numba", "cupy", "auto"} or None
        The kernel engine of each step (see :mod:`refnet.kernels`; default: the engine in force).

    Returns
    -------
    net : Network
        A new network with the repaired weights.
    report : dict, only if ``return_report``
        ``steps`` (run), ``stopped`` ("tol", "plateau" or "steps"), ``objective_before/after``,
        ``squared``, ``lr``, ``gram``, ``time`` (s), and ``layers``: per repaired layer ``layer``
        (index), ``kind``, ``shape`` (of V), ``side``, ``size``, ``density``, ``residual_before``,
        ``residual_after`` (unsquared ``||A||_F``), ``zero_lines``, ``structural_rank`` and
        ``lower_bound`` (``sqrt(r - s)``, the smallest residual any weights reach under the mask;
        see :func:`isometry_lower_bound`; the run may stop above it).

    Raises
    ------
    ValueError, TypeError
        Bad arguments; a network without affine layers.
    FloatingPointError
        The objective became non-finite (lr too large); the input network is unchanged anyway.
    """
    if not isinstance(net, Network):
        raise TypeError(f"net must be a refnet Network, got {type(net).__name__}")
    steps = check_int(steps, "steps", min_value=0)
    lr = check_float(lr, "lr", min_value=0.0, min_inclusive=False)
    tol = check_float(tol, "tol", min_value=0.0)
    if not isinstance(squared, (bool, np.bool_)):
        raise TypeError(f"squared must be a bool, got {type(squared).__name__}")
    gram = check_choice(gram, "gram", GRAM_CHOICES)
    if sparse is not None and not isinstance(sparse, (bool, np.bool_)):
        raise TypeError(f"sparse must be None or a bool, got {type(sparse).__name__}")
    if engine is not None:
        from . import kernels

        kernels.resolve_engine("isometry_step", engine=engine)  # a bad name fails before any work
    idx = _check_layers(net, layers)
    report_fn = _progress_fn(progress, steps)

    # per layer: V (the effective weight matrix, replaced every step), mask matrix, its step
    Vs, Ms, steppers = [], [], []
    for i in idx:
        W, M = net.params[i]["W"], net.masks[i]["W"]
        Mm = layer_matrix(M)  # (n_out, n_in) bool
        Vs.append(layer_matrix(W * M).copy())  # (n_out, n_in)
        Ms.append(None if Mm.all() else np.ascontiguousarray(Mm))
        steppers.append(_Stepper(Mm.shape, Ms[-1], gram_side(Mm.shape, gram), lr, squared, sparse, engine))

    t0 = time.perf_counter()
    with np.errstate(over="ignore", invalid="ignore"):  # a non-finite objective is raised below
        F0, norms0, F, norms, done, stopped = _descend(steppers, Vs, steps, lr, squared, tol, report_fn)
    elapsed = time.perf_counter() - t0

    new = net.copy()
    for i, V, M in zip(idx, Vs, Ms):
        W = new.params[i]["W"]
        if M is None:
            W[...] = V.reshape(W.shape)
        else:  # keep the stored W at pruned positions unchanged
            np.copyto(W, V.reshape(W.shape), where=M.reshape(W.shape))
    if not return_report:
        return new
    rows = []
    for k, i in enumerate(idx):
        M = net.masks[i]["W"]
        lb = isometry_lower_bound(M, gram=gram)
        rows.append(
            {
                "layer": i,
                "kind": type(net.layers[i]).__name__,
                "shape": tuple(int(s) for s in layer_matrix(M).shape),
                "side": lb["side"],
                "size": lb["size"],
                "density": float(M.mean()),
                "residual_before": norms0[k],
                "residual_after": norms[k],
                "zero_lines": lb["zero_lines"],
                "structural_rank": lb["structural_rank"],
                "lower_bound": lb["bound"],
            }
        )
    report = {
        "steps": done,
        "max_steps": steps,
        "stopped": stopped,
        "objective_before": F0,
        "objective_after": F,
        "squared": bool(squared),
        "lr": lr,
        "tol": tol,
        "gram": gram,
        "time": elapsed,
        "layers": rows,
    }
    return new, report


def format_isometry_report(report: dict) -> str:
    """A plain-text table of an :func:`approximate_isometry` report."""
    if not isinstance(report, dict) or "layers" not in report:
        raise TypeError("report must be the dict returned by approximate_isometry(..., return_report=True)")
    obj = "sum ||A||_F^2" if report["squared"] else "sum ||A||_F"
    lines = [
        f"approximate isometry: {report['steps']}/{report['max_steps']} steps (stopped: {report['stopped']}), "
        f"lr {report['lr']:g}, {obj}: {report['objective_before']:.6g} -> {report['objective_after']:.6g}, "
        f"{report['time']:.2f} s",
        f"{'layer':>5}  {'kind':<7} {'V shape':<14} {'Gram':<11} {'density':>7} "
        f"{'||A|| before':>13} {'||A|| after':>13} {'zero':>5} {'s-rank':>6} {'lower bound':>12}",
    ]
    for r in report["layers"]:
        shape = "x".join(str(s) for s in r["shape"])
        gram = f"{r['side']}({r['size']})"
        lines.append(
            f"{r['layer']:>5}  {r['kind']:<7} {shape:<14} {gram:<11} {r['density']:>7.3f} "
            f"{r['residual_before']:>13.6g} {r['residual_after']:>13.6g} {r['zero_lines']:>5} "
            f"{r['structural_rank']:>6} {r['lower_bound']:>12.6g}"
        )
    lines.append(
        "lower bound: sqrt(size - structural rank of the mask), valid for every W and attained by a matching of "
        "the mask (isometry_lower_bound); sqrt(zero) alone is a weaker bound"
    )
    return "\n".join(lines)


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
        return max(1, int(math.floor(f * n + 0.5)))
    raise TypeError(f"{name} must be an int or a fraction in (0, 1), got {type(keep).__name__}")


def _top_units(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest scores (ties: lower index first), sorted ascending."""
    order = np.argsort(-scores, kind="stable")  # descending, stable: lower index first on ties
    return np.sort(order[:k])


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
        layers = _check_layers(net, layers)
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
