r"""Approximate isometry (AI, [SPP]): repairing the weights of a pruned network, data-free.

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

OrthP and L1 neuron pruning ([DI], PAPER.md section 11), which remove whole units and repair the
smaller dense network by QR, live in :mod:`refnet.neuron_pruning`; ``refnet.isometry.orthp``,
``l1_neuron_prune``, ``activation_gain`` and ``DEFAULT_GAINS`` still work there, with a
DeprecationWarning.
"""

from __future__ import annotations

import math
import numbers
import time

import numpy as np

from ._compat import moved_names
from ._checks import check_array, check_choice, check_float, check_int
from .layers.base import where_kept
from .network import Network, check_net
from .progress import Progress, progress_target

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
    "select_affine_layers",
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
    check_net(net)
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


def select_affine_layers(net: Network, layers=None) -> list[int]:
    """The affine layers named by ``layers`` (indices into ``net.layers``, negative ones counted
    from the end; one int or a list), checked, without repeats and sorted; default: every affine
    layer. A ValueError or TypeError names ``layers`` and the offending index."""
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
    idx = select_affine_layers(net, layers)
    out = []
    for i in idx:
        V = layer_matrix(where_kept(net.params[i]["W"], net.masks[i]["W"]))
        n = float(np.linalg.norm(gram_residual(V, gram_side(V.shape, gram))))
        out.append(n * n if squared else n)
    return out


def isometry_gradients(net: Network, squared: bool = False, *, gram: str = "smaller", layers=None) -> list[np.ndarray]:
    """Gradient of ``sum_l ||A_l||_F`` (or of the squares) with respect to every affine layer's
    stored ``W`` (shape of ``W``, exactly zero at pruned entries), one array per affine layer
    (or per entry of ``layers``), in layer order."""
    idx = select_affine_layers(net, layers)
    out = []
    for i in idx:
        W, M = net.params[i]["W"], net.masks[i]["W"]
        V = layer_matrix(where_kept(W, M))
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


def _descend(steppers, Vs, steps, lr, squared, tol, bar: Progress):
    """The gradient-descent loop of :func:`approximate_isometry`. ``steppers[k](V)`` returns
    ``(||A||_F of V, V after one step)`` (a new array) and ``steppers[k].residual(V)`` the norm
    alone; the list ``Vs`` is updated in place to the final matrices. ``bar`` gets
    ``(step, objective)`` after every step."""

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
        if bar.active:
            bar.update(step, F, postfix=lambda: f"objective {F:.6e}")
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
        A progress bar over the steps with the objective (:class:`refnet.progress.Progress`):
        None: on stderr when stderr is a terminal; True: stderr; False: none; a stream: there. A
        callable is called as ``progress(step, F)`` after every step instead.
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
        Bad arguments; a network without affine layers; a non-finite kept weight (named with its
        layer; a pruned entry may hold anything: it contributes exactly zero).
    FloatingPointError
        The objective became non-finite (lr too large); the input network is unchanged anyway.
    """
    check_net(net)
    net.check_finite("net")
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
    idx = select_affine_layers(net, layers)
    target = progress_target(progress, allow_callable=True)

    # per layer: V (the effective weight matrix, replaced every step), mask matrix, its step
    Vs, Ms, steppers = [], [], []
    for i in idx:
        W, M = net.params[i]["W"], net.masks[i]["W"]
        Mm = layer_matrix(M)  # (n_out, n_in) bool
        Vs.append(layer_matrix(where_kept(W, M)).copy())  # (n_out, n_in)
        Ms.append(None if Mm.all() else np.ascontiguousarray(Mm))
        steppers.append(_Stepper(Mm.shape, Ms[-1], gram_side(Mm.shape, gram), lr, squared, sparse, engine))

    t0 = time.perf_counter()
    with (
        np.errstate(over="ignore", invalid="ignore"),  # a non-finite objective is raised in _descend
        Progress(False if target is None else target, steps, desc="AI step", unit="steps", allow_callable=True) as bar,
    ):
        F0, norms0, F, norms, done, stopped = _descend(steppers, Vs, steps, lr, squared, tol, bar)
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
# Names that moved to refnet.neuron_pruning
# ============================================================================================

#: moved to refnet.neuron_pruning (which imports this module, hence the lazy lookup)
__getattr__ = moved_names(__name__, {name: "refnet.neuron_pruning" for name in
                                     ("DEFAULT_GAINS", "activation_gain", "orthp", "l1_neuron_prune")})
