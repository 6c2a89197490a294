"""Sparsity structure of a mask, built once per mask and cached (engine-neutral, NumPy arrays).

A mask changes rarely (once per pruning round) while the weight it masks changes every training
step, so the kernels cache only the *structure* of ``mask != 0`` (CSR row pointers and column
indices, and on demand the column-wise CSC twin) and read the values from ``W`` on every call,
which is ``O(nnz)``.

Cache key: the mask object's identity, checked against a weak reference (so a recycled ``id``
of a garbage-collected mask can never alias) and against its shape, strides and dtype (an
array object keeps its data buffer for life, so the identity check covers the buffer; reading
the data pointer through ``__array_interface__`` cost 1 us per lookup, a tenth of a small
masked product). The contract that goes with it: **do not modify a mask in place after it has been used**
(make a new mask array, as refnet's pruning functions do), or call :func:`clear_cache`.
Hashing the mask's bytes on every call would cost a full read of the mask, as much as the
sparse product itself at 99% sparsity, so it is not done.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict

import numpy as np

__all__ = ["MaskStructure", "mask_structure", "mask_density", "cached", "clear_cache", "cache_info"]

#: number of masks whose structure is kept (least recently used ones are dropped)
CACHE_SIZE = 64


class MaskStructure:
    """CSR structure of ``mask != 0`` for a 2-D mask ``(n_out, n_in)``.

    Attributes
    ----------
    shape : (int, int)
    nnz : int
    indptr : int64 array (n_out + 1,)
        Row ``i`` keeps columns ``indices[indptr[i]:indptr[i+1]]`` (ascending).
    indices : int32 array (nnz,)
    binary : bool
        Whether every entry of the mask is 0 or 1 (then ``mask * W`` is ``W`` on the structure;
        sparse paths need this, a weighted mask takes the dense path).
    """

    __slots__ = ("shape", "nnz", "binary", "indptr", "indices", "_csc", "_rows", "_lock", "__weakref__")

    def __init__(self, mask: np.ndarray):
        mask = np.asarray(mask)
        if mask.ndim != 2:
            raise ValueError(f"mask must be 2-D (n_out, n_in), got shape {mask.shape}")
        n_out, n_in = mask.shape
        if n_in >= 2**31 or n_out >= 2**31:
            raise ValueError(f"mask dimensions must be < 2**31, got shape {mask.shape}")
        self.binary = bool(mask.dtype == np.bool_ or np.all((mask == 0) | (mask == 1)))
        rows, cols = np.nonzero(mask)  # row-major order: rows ascending, cols ascending per row
        self.shape = (n_out, n_in)
        self.nnz = int(rows.size)
        self.indptr = np.zeros(n_out + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=n_out), out=self.indptr[1:])
        self.indices = cols.astype(np.int32)
        self._rows = rows.astype(np.int32)
        self._csc = None
        self._lock = threading.Lock()

    @property
    def density(self) -> float:
        n = self.shape[0] * self.shape[1]
        return self.nnz / n if n else 1.0

    @property
    def rows(self) -> np.ndarray:
        """Row index of every stored entry (nnz,), int32: ``W[rows, indices]`` are the values."""
        return self._rows

    def csc(self):
        """Column-wise twin ``(indptr_c (n_in + 1,), indices_c (nnz,), perm (nnz,), iperm (nnz,))``:
        column ``j`` keeps rows ``indices_c[indptr_c[j]:indptr_c[j+1]]`` (ascending); ``perm``
        maps each column-wise position to its row-wise (CSR) position and ``iperm`` back."""
        with self._lock:
            if self._csc is None:
                n_in = self.shape[1]
                perm = np.argsort(self.indices, kind="stable").astype(np.int64)  # CSR order is row-major
                iperm = np.empty_like(perm)
                iperm[perm] = np.arange(perm.size, dtype=np.int64)
                indptr_c = np.zeros(n_in + 1, dtype=np.int64)
                np.cumsum(np.bincount(self.indices, minlength=n_in), out=indptr_c[1:])
                self._csc = (indptr_c, self._rows[perm], perm, iperm)
            return self._csc


class _Record:
    """What is known about one mask: its density and (built on demand) its structure."""

    __slots__ = ("density", "structure", "extra")

    def __init__(self, density):
        self.density = density
        self.structure = None
        self.extra = {}  # engine-specific things derived from the mask (e.g. device copies)


_cache: OrderedDict = OrderedDict()  # id(mask) -> (weakref, key, _Record)
_cache_lock = threading.Lock()
_stats = {"hits": 0, "misses": 0, "builds": 0}
_dead: list = []


def _purge():
    while _dead:
        ident, ref = _dead.pop()
        hit = _cache.get(ident)
        if hit is not None and hit[0] is ref:
            del _cache[ident]


def _key(mask):
    return (id(mask), mask.shape, mask.strides, mask.dtype.str)


def _lookup(mask):
    key = _key(mask)
    with _cache_lock:
        hit = _cache.get(key[0])
        if hit is not None and hit[0]() is mask and hit[1] == key:
            _cache.move_to_end(key[0])
            _stats["hits"] += 1
            return hit[2]
    return None


def _record(mask, count_nonzero=np.count_nonzero) -> _Record:
    rec = _lookup(mask)
    if rec is not None:
        return rec
    rec = _Record(float(count_nonzero(mask)) / mask.size if mask.size else 1.0)
    ident = id(mask)

    def _drop(ref, ident=ident):  # the mask died; purged on the next call (no locking in a GC callback)
        _dead.append((ident, ref))

    try:
        ref = weakref.ref(mask, _drop)
    except TypeError:  # pragma: no cover - ndarray subclasses without weakref support
        return rec
    with _cache_lock:
        _purge()
        _stats["misses"] += 1
        _cache[ident] = (ref, _key(mask), rec)
        _cache.move_to_end(ident)
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return rec


def _check(mask):
    if not isinstance(mask, np.ndarray):
        raise TypeError(f"mask must be a NumPy array, got {type(mask).__name__}")


def mask_structure(mask) -> MaskStructure:
    """The cached :class:`MaskStructure` of ``mask`` (built on first use)."""
    _check(mask)
    rec = _record(mask)
    if rec.structure is None:
        rec.structure = MaskStructure(mask)
        with _cache_lock:
            _stats["builds"] += 1
    return rec.structure


def mask_density(mask) -> float:
    """Fraction of nonzeros of ``mask`` (cached per mask like the structure)."""
    _check(mask)
    return _record(mask).density


def cached(mask, name: str, build, count_nonzero=np.count_nonzero):
    """``build(mask)``, computed once per mask object and kept with its cached structure (for
    engine-specific derived data such as device arrays; ``mask`` may be a CuPy array)."""
    rec = _record(mask, count_nonzero)
    if name not in rec.extra:
        rec.extra[name] = build(mask)
    return rec.extra[name]


def clear_cache() -> None:
    """Forget every cached mask structure (call it after modifying a mask in place)."""
    with _cache_lock:
        _cache.clear()


def cache_info() -> dict:
    with _cache_lock:
        return {"entries": len(_cache), **_stats}
