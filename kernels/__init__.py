r"""refnet.kernels: the small kernel API behind refnet's hot paths.

Installed as ``refnet.kernels`` (the folder is ``kernels/`` in the repository). Three engines
implement the same functions:

``"numpy"``  :mod:`refnet.kernels.numpy_engine`, the oracle, always present.
``"numba"``  :mod:`refnet.kernels.numba_engine`, CPU kernels (CSR products, sparse isometry
             steps, a thread pool for stacked LAPACK calls); imported only when chosen.
``"cupy"``   :mod:`refnet.kernels.cupy_engine`, GPU (cuBLAS, cuSPARSE, cuSOLVER); imported
             only when chosen or when the data already are CuPy arrays (``pip install refnet[gpu]``).

Which engine runs a call: the ``engine=`` argument, else :func:`set_engine` /
:func:`use_engine`, else the ``REFNET_ENGINE`` environment variable, else the automatic choice:
CuPy when (and only when) the data are CuPy arrays; otherwise Numba where it measurably wins
(large masked products: the CSR kernel at and above the crossover sparsities in
``kernels/_tuning.py``, BLAS on ``mask * W`` formed block by block below them; sparse isometry
steps; stacks of SVDs and of products) and NumPy everywhere else. Results are arrays of the input's library (NumPy in, NumPy out).

Functions (batches are rows, weights are ``(n_out, n_in)`` as everywhere in refnet):

``masked_matmul(x, W, mask=None)``
    ``x @ (mask * W).T``: the pre-activation of a masked dense layer, ``(B, n_out)``.
``masked_matmul_t(g, W, mask=None)``
    ``g @ (mask * W)``: the input gradient of a masked dense layer, ``(B, n_in)``.
``batched_matmul(A, B)``, ``batched_matmul_chain(mats)``
    Stacked products and Jacobian chains ``J^{l-1,l} ... J^{k,k+1}``.
``batched_svdvals(A)``
    Singular values of a stack ``(..., m, n)``, in descending order.
``batched_svd(A, full_matrices=False)``
    The whole decomposition ``(U, S, Vh)`` of every matrix of a stack.
``isometry_step(V, mask, lr, squared=False)``
    One approximate-isometry gradient step on the kept entries: ``(V_new, residual)``.
``kth_largest(s, k)``
    The ``k``-th largest entry of a 1-D array: the pruning threshold of a global top-k.

Sparse paths cache the mask's structure per mask object: do not modify a mask in place after
using it (make a new one, as refnet's pruning does), or call :func:`clear_cache`. Results of
the sparse paths may be Fortran-ordered; values equal the oracle's to rounding.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import numbers
import os
import threading

from . import numpy_engine
from ._structure import cache_info, clear_cache, mask_density
from ._tuning import ISOMETRY_CROSSOVER, MIN_SELECT_SIZE, MIN_SPARSE_SIZE, MIN_SPARSE_WORK, MIN_THREADED_ISOMETRY, MIN_THREADED_WORK

__all__ = [
    "ENGINES",
    "ENV_VAR",
    *numpy_engine.ENGINE_KERNELS,
    "set_engine",
    "use_engine",
    "get_engine",
    "available_engines",
    "resolve_engine",
    "clear_cache",
    "cache_info",
]

#: engine names, in no particular order
ENGINES = ("numpy", "numba", "cupy")
#: environment variable read when no engine is set in code
ENV_VAR = "REFNET_ENGINE"

_EXTRA = {
    "numba": "pip install numba (a core dependency of refnet; reinstall refnet: pip install refnet)",
    "cupy": "pip install refnet[gpu] (CuPy for CUDA 12; see https://docs.cupy.dev for other CUDA versions)",
}
_PACKAGE = {"numba": "numba", "cupy": "cupy"}

_state_lock = threading.Lock()
_engine_set: str | None = None  # set_engine()'s choice; None = not set


# -------------------------------------------------------------------------------------------
# engine selection
# -------------------------------------------------------------------------------------------


def _check_name(name, what):
    if name is None or name == "auto":
        return None
    if not isinstance(name, str) or name not in ENGINES:
        raise ValueError(f"{what} must be one of {ENGINES + ('auto',)} or None, got {name!r}")
    return name


_loaded = {"numpy": numpy_engine}


def _load(name: str):
    """The engine module; an ImportError that names what to install when it is missing.
    Loaded modules are remembered (``importlib.import_module`` of a relative name costs ~23 us,
    as much as a whole small masked product)."""
    module = _loaded.get(name)
    if module is not None:
        return module
    try:
        module = importlib.import_module(f".{name}_engine", __name__)
    except ImportError as exc:
        raise ImportError(f"the {name!r} engine needs {_PACKAGE[name]}, which could not be imported ({exc}): {_EXTRA[name]}") from exc
    _loaded[name] = module
    return module


def set_engine(name: str | None) -> None:
    """Run every kernel on engine ``name`` ("numpy", "numba", "cupy"; "auto" or None: back to
    the environment variable / automatic choice). An explicit ``engine=`` argument still wins.
    The engine is imported now, so a missing package fails here, not in the middle of a run."""
    _swap_engine(name)


def _swap_engine(name):
    """Check ``name``, import its engine (so a missing package fails before anything changes),
    make it the one in force; returns the name and the previous choice."""
    global _engine_set
    name = _check_name(name, "name")
    if name is not None:
        _load(name)
    with _state_lock:
        previous, _engine_set = _engine_set, name
    return name, previous


@contextlib.contextmanager
def use_engine(name: str | None):
    """``with use_engine("numba"): ...``: :func:`set_engine` for the block, restored after."""
    global _engine_set
    name, previous = _swap_engine(name)
    try:
        yield name
    finally:
        with _state_lock:
            _engine_set = previous


def _env_engine():
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if not value:
        return None
    return _check_name(value, f"the environment variable {ENV_VAR}")


def get_engine() -> str:
    """The engine in force when no ``engine=`` argument is given: the one set in code, else
    ``REFNET_ENGINE``, else "auto"."""
    return _chosen(None) or "auto"


def available_engines() -> list[str]:
    """Engines whose package is installed (found without importing it; a CuPy install without
    a usable GPU is listed but fails when used)."""
    return ["numpy"] + [n for n in ("numba", "cupy") if importlib.util.find_spec(_PACKAGE[n]) is not None]


def _is_cupy(a) -> bool:
    return a is not None and type(a).__module__.startswith("cupy")


_numba_found = False


def _numba_ok() -> bool:
    """Numba installed (found without importing it; a positive answer is remembered)."""
    global _numba_found
    if not _numba_found:
        _numba_found = importlib.util.find_spec("numba") is not None
    return _numba_found


def _float_arrays(*arrays) -> bool:
    return all(getattr(a, "dtype", None) is not None and a.dtype.kind == "f" and a.dtype.itemsize in (4, 8) for a in arrays)


def _large_masked(W, mask) -> bool:
    """A NumPy mask on a NumPy weight of at least ``MIN_SPARSE_SIZE`` entries."""
    import numpy as np

    return mask is not None and isinstance(mask, np.ndarray) and isinstance(W, np.ndarray) and W.size >= MIN_SPARSE_SIZE


def _sparse_enough(W, mask, crossover) -> bool:
    return _large_masked(W, mask) and 1.0 - mask_density(mask) >= crossover


def _auto(kernel: str, args) -> str:
    """The automatic engine for a NumPy call (the benefit of each engine is measured in
    benchmarks/kernels.py; crossovers in kernels/_tuning.py)."""
    if not _numba_ok():
        return "numpy"
    if kernel in ("masked_matmul", "masked_matmul_t"):
        # Numba for every large enough masked product: its CSR kernel at and above the crossover
        # sparsity, below it BLAS on mask * W formed block by block (cheaper than NumPy's W * mask)
        x, W, mask = args
        big = getattr(x, "shape", (0,))[0] * getattr(W, "size", 0) >= MIN_SPARSE_WORK
        return "numba" if big and _float_arrays(x, W) and _large_masked(W, mask) else "numpy"
    if kernel == "isometry_step":
        V, mask = args
        return "numba" if _float_arrays(V) and _sparse_enough(V, mask, ISOMETRY_CROSSOVER) else "numpy"
    if kernel == "kth_largest":  # radix select: 129,400 scores 0.2 ms vs np.partition 1.0 ms
        (s,) = args
        return "numba" if getattr(s, "ndim", 0) == 1 and s.size >= MIN_SELECT_SIZE and _float_arrays(s) else "numpy"
    if kernel in ("batched_svdvals", "batched_svd"):
        (A,) = args
        shape = getattr(A, "shape", ())
        big = len(shape) >= 3 and min(shape[-2:]) >= 8 and math.prod(shape[:-2]) >= 2
        # on one thread only the values of a wide or tall stack gain (a batched QR first)
        lopsided = kernel == "batched_svdvals" and big and max(shape[-2:]) >= 2 * min(shape[-2:])
        return "numba" if big and (_cores() >= 2 or lopsided) else "numpy"
    if kernel == "batched_matmul":  # stacks split over a thread pool: 1.8x at 2 free cores
        A, B = (args + (None,))[:2]
        shape_a, shape_b = getattr(A, "shape", ()), getattr(B, "shape", ())
        if len(shape_a) < 3 or len(shape_b) < 2 or _cores() < 2:
            return "numpy"
        work = math.prod(shape_a) * shape_b[-1]  # count * m * k * n multiply-adds
        return "numba" if math.prod(shape_a[:-2]) >= 2 and work >= MIN_THREADED_WORK else "numpy"
    return "numpy"


def _cores() -> int:
    from ._threads import usable_cores

    n = usable_cores()
    env = os.environ.get("NUMBA_NUM_THREADS", "").strip()
    if env.isdigit():
        n = min(n, int(env))
    return n


def _chosen(engine):
    """The engine named in code or environment (``engine`` > :func:`set_engine` >
    ``REFNET_ENGINE``), or None when the choice is automatic."""
    name = _check_name(engine, "engine")
    if name is None:
        with _state_lock:
            name = _engine_set
    if name is None:
        name = _env_engine()
    return name


def resolve_engine(kernel: str, *arrays, engine: str | None = None) -> str:
    """The engine name that would run ``kernel`` on these arguments (in the order of the
    kernel's signature). Rules: ``engine`` > :func:`set_engine` > ``REFNET_ENGINE`` > auto;
    CuPy arrays need the cupy engine (auto picks it); NumPy arrays run on any engine (the cupy
    engine copies them to the GPU and back)."""
    name = _chosen(engine)
    on_gpu = any(_is_cupy(a) for a in arrays)
    if name is None:
        return "cupy" if on_gpu else _auto(kernel, arrays)
    if on_gpu and name != "cupy":
        raise TypeError(f"{kernel}: the data are CuPy arrays but the {name!r} engine runs on NumPy arrays; use engine='cupy' (or 'auto'), or move the data with cupy.asnumpy")
    return name


def _engine(kernel, arrays, engine):
    return _load(resolve_engine(kernel, *arrays, engine=engine))


def _masked_call(kernel: str, arrays, engine, method, *args, one_thread=True):
    """Run a masked kernel. When the engine was chosen automatically and is Numba, and
    ``one_thread``, it runs its serial kernels (one thread): measured on this 2-core machine with
    the other core busy (one thread / two threads / NumPy BLAS, float64, 90% sparse): N=1024
    B=64 1.5 / 8.0 / 3.9 ms; N=4096 B=256 95 / 95 / 195 ms; the 784-100x6-10 MLP's
    forward+backward 1.7 / 40 / 1.9 ms. A parallel region waits for its slowest thread, so a
    second thread on a busy core costs far more than it gains on small work. An explicit
    engine="numba" keeps NUMBA_NUM_THREADS."""
    chosen = _chosen(engine)
    name = resolve_engine(kernel, *arrays, engine=chosen)
    fn = getattr(_load(name), kernel)
    if name != "numba" or chosen is not None or not one_thread:
        return fn(*arrays, *args, method=method)
    return fn(*arrays, *args, method=method, threads=1)  # the serial kernels


# -------------------------------------------------------------------------------------------
# the kernels
# -------------------------------------------------------------------------------------------


def _check_2d(a, name):
    if getattr(a, "ndim", None) != 2:
        raise ValueError(f"{name} must be a 2-D array, got shape {getattr(a, 'shape', type(a).__name__)}")


def _check_matmul(x, W, mask, xname, axis):
    _check_2d(x, xname)
    _check_2d(W, "W")
    if x.shape[1] != W.shape[axis]:
        want = "(B, n_in)" if axis == 1 else "(B, n_out)"
        raise ValueError(f"{xname} must have shape {want} = (B, {W.shape[axis]}) for W of shape {W.shape}, got {x.shape}")
    if mask is not None and tuple(mask.shape) != tuple(W.shape):
        raise ValueError(f"mask must have W's shape {W.shape}, got {mask.shape}")


def masked_matmul(x, W, mask=None, *, engine: str | None = None, method: str = "auto"):
    r"""``h = x (mask \odot W)^T``.

    Parameters
    ----------
    x : array (B, n_in)
    W : array (n_out, n_in)
    mask : array (n_out, n_in) or None
        None: no pruning (the plain product). Boolean (or 0/1) for the sparse paths.
    engine : {"numpy", "numba", "cupy", "auto"} or None
    method : {"auto", "dense", "csr"}
        "dense": BLAS on ``mask * W``; "csr": the engine's sparse kernel (CSR structure cached
        per mask, values read from ``W`` each call); "auto": the engine's measured choice (the
        NumPy oracle always takes "dense").

    Returns
    -------
    array (B, n_out)
    """
    _check_matmul(x, W, mask, "x", 1)
    return _masked_call("masked_matmul", (x, W, mask), engine, method)


def masked_matmul_t(g, W, mask=None, *, engine: str | None = None, method: str = "auto"):
    r"""``g_x = g (mask \odot W)``: ``g`` is ``(B, n_out)``, the result ``(B, n_in)``.
    Arguments as in :func:`masked_matmul`."""
    _check_matmul(g, W, mask, "g", 0)
    return _masked_call("masked_matmul_t", (g, W, mask), engine, method)


def batched_matmul(A, B, *, engine: str | None = None):
    """``A @ B`` on stacks ``(..., m, k) @ (..., k, n)`` (``np.matmul`` semantics)."""
    return _engine("batched_matmul", (A, B), engine).batched_matmul(A, B)


def batched_matmul_chain(mats, *, engine: str | None = None):
    """``mats[-1] @ ... @ mats[0]``: the Jacobian chain ``J^{k,l}`` from the stacks
    ``[J^{k,k+1}, ..., J^{l-1,l}]`` (each ``(B, N_{i+1}, N_i)``); later layers on the left."""
    mats = list(mats)
    return _engine("batched_matmul", tuple(mats[:2]), engine).batched_matmul_chain(mats)


def batched_svdvals(A, *, engine: str | None = None):
    """Singular values of every matrix of a stack ``(..., m, n)``: ``(..., min(m, n))``, in
    descending order (LAPACK gesdd without singular vectors, or the GPU's cuSOLVER)."""
    return _engine("batched_svdvals", (A,), engine).batched_svdvals(A)


def batched_svd(A, *, full_matrices: bool = False, engine: str | None = None):
    r"""Singular value decomposition of every matrix of a stack ``(..., m, n)``: ``(U, S, Vh)``
    with ``A[i] = U[i] diag(S[i]) Vh[i]`` and ``S`` descending; ``U`` is ``(..., m, k)`` and
    ``Vh`` ``(..., k, n)`` with ``k = min(m, n)``, or ``(..., m, m)`` and ``(..., n, n)`` with
    ``full_matrices=True``. LAPACK gesdd per matrix (the Numba engine: chunks of the stack on
    separate threads), or the GPU's cuSOLVER. A singular vector is determined up to its sign,
    and within a repeated singular value up to a rotation: compare ``U diag(S) Vh`` or the
    subspaces, not the vectors themselves."""
    import numpy as np

    if not isinstance(full_matrices, (bool, np.bool_)):
        raise TypeError(f"full_matrices must be a bool, got {type(full_matrices).__name__}")
    return _engine("batched_svd", (A,), engine).batched_svd(A, bool(full_matrices))


def isometry_step(V, mask, lr: float, squared: bool = False, *, engine: str | None = None, method: str = "auto"):
    r"""One approximate-isometry gradient step on the kept entries of ``V`` (Lee et al. 2020).

    With ``U = mask \odot V`` and ``A = U^T U - I`` (``n_out >= n_in``) or ``U U^T - I``
    (otherwise: the smaller Gram side), the gradient of ``||A||_F`` is ``2 U A / ||A||_F``
    (``2 A U / ||A||_F``), of ``||A||_F^2`` (``squared=True``) ``4 U A`` (``4 A U``), taken
    times the mask.

    Parameters
    ----------
    V : array (n_out, n_in)
    mask : array (n_out, n_in) or None
    lr : float
    squared : bool
    engine, method : as in :func:`masked_matmul` ("csr": the sparse Gram/gradient kernels)

    Returns
    -------
    (V_new, residual) : (array (n_out, n_in), float)
        ``V - lr * mask * grad`` (a new array; pruned entries keep their values) and
        ``||A||_F`` before the step.
    """
    _check_2d(V, "V")
    if mask is not None and tuple(mask.shape) != tuple(V.shape):
        raise ValueError(f"mask must have V's shape {V.shape}, got {mask.shape}")
    # automatic Numba: one thread below MIN_THREADED_ISOMETRY entries (the many small parallel
    # regions of a step stall on a busy second core), the Numba thread count above
    return _masked_call("isometry_step", (V, mask), engine, method, lr, squared, one_thread=V.size < MIN_THREADED_ISOMETRY)


def kth_largest(s, k: int, *, engine: str | None = None):
    """The ``k``-th largest entry of the 1-D array ``s`` (``1 <= k <= s.size``), exactly
    ``np.partition(s, s.size - k)[s.size - k]`` (NaN ranks largest): the threshold of a top-k
    pruning mask. The Numba engine selects by radix on the bit patterns of non-negative scores."""
    if getattr(s, "ndim", None) != 1:
        raise ValueError(f"s must be a 1-D array, got shape {getattr(s, 'shape', type(s).__name__)}")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= s.shape[0]:
        raise ValueError(f"k must be an int in [1, {s.shape[0]}] (the size of s), got {k!r}")
    return _engine("kth_largest", (s,), engine).kth_largest(s, int(k))
