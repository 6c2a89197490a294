"""A NumPy stand-in for the part of CuPy that ``refnet.kernels.cupy_engine`` uses, so that the
engine's own logic (host/device round trips, CSR structure, Gram side, gradient scale, the
returned types) runs in every test session, GPU or not.

What it checks and what it cannot:

* "Device" arrays are :class:`ndarray`, a NumPy subclass whose type lives in a ``cupy...``
  module (what ``refnet.kernels`` looks at to pick the cupy engine), with ``.get()``; indexing
  one with a scalar index gives a 0-d array, as in CuPy.
* As in CuPy, a ufunc (``*``, ``@``, ``-``...) that mixes a device array with a NumPy array of
  one or more dimensions raises ``TypeError``: the engine must move every operand with
  ``cupy.asarray`` first.
* ``cupyx.scipy.sparse.csr_matrix`` does SciPy's arithmetic (not cuSPARSE's) and, like
  cupyx, takes device arrays only and gives device arrays.
* It says nothing about CuPy's speed, cuSOLVER's accuracy, or API corners where CuPy differs
  from NumPy beyond the ones above; ``test_cupy_engine_matches_oracle`` on a GPU covers those.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import scipy.sparse


class ndarray(np.ndarray):
    """A "device" array."""

    def get(self):
        return np.array(self.view(np.ndarray), copy=True)

    def __getitem__(self, key):
        out = super().__getitem__(key)
        return out if isinstance(out, np.ndarray) else _dev(np.asarray(out))

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        for a in inputs + (out or ()):
            if isinstance(a, np.ndarray) and not isinstance(a, ndarray) and a.ndim > 0:
                raise TypeError(f"Unsupported type {type(a)} (a NumPy array in a CuPy ufunc)")
        args = [a.view(np.ndarray) if isinstance(a, ndarray) else a for a in inputs]
        if out is not None:
            kwargs["out"] = tuple(o.view(np.ndarray) for o in out)
        res = getattr(ufunc, method)(*args, **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _wrap(res)


ndarray.__module__ = "cupy._core.core"  # the dispatcher's test for "these are CuPy arrays"


def _dev(a: np.ndarray) -> ndarray:
    return a.view(ndarray)


def _wrap(res):
    if isinstance(res, tuple):
        return tuple(_wrap(r) for r in res)
    if isinstance(res, np.ndarray):
        return res if isinstance(res, ndarray) else _dev(res)
    if isinstance(res, np.generic):
        return _dev(np.asarray(res))
    return res


def _host(a):
    return a.view(np.ndarray) if isinstance(a, ndarray) else a


def _numpy(fn):
    """``fn`` on the host values of the arguments, the result as device arrays."""

    def call(*args, **kwargs):
        args = [[_host(b) for b in a] if isinstance(a, (list, tuple)) else _host(a) for a in args]
        return _wrap(fn(*args, **{k: _host(v) for k, v in kwargs.items()}))

    call.__name__ = fn.__name__
    return call


class _Sparse:
    """``cupyx.scipy.sparse`` matrices: SciPy's arithmetic on the host values, dense results as
    device arrays (as cuSPARSE gives); the constructor takes device arrays only."""

    def __init__(self, arg, shape=None):
        if isinstance(arg, tuple):
            for a in arg:
                if not isinstance(a, ndarray):
                    raise TypeError(f"cupyx.scipy.sparse matrices take CuPy arrays, got {type(a)}")
            arg = scipy.sparse.csr_matrix(tuple(_host(a) for a in arg), shape=shape)
        self._m = arg

    @property
    def shape(self):
        return self._m.shape

    @property
    def T(self):
        return _Sparse(self._m.T)

    def tocsr(self):
        return _Sparse(self._m.tocsr())

    def toarray(self):
        return _dev(self._m.toarray())

    def __matmul__(self, other):
        if isinstance(other, _Sparse):
            return _Sparse(self._m @ other._m)
        if not isinstance(other, ndarray):
            raise TypeError(f"a cupyx sparse matrix times {type(other)}: CuPy arrays only")
        return _dev(np.asarray(self._m @ _host(other)))


class _Device:
    """The stand-in's one pretend device (work is done when a call returns)."""

    id = 0

    def __init__(self, i=0):
        pass

    def synchronize(self):
        pass


def asarray(a, dtype=None):
    """A copy on the "device" (a device array stays as it is when no dtype change is asked)."""
    if isinstance(a, ndarray) and (dtype is None or a.dtype == dtype):
        return a
    return _dev(np.array(_host(a), dtype=dtype, copy=True))


def asnumpy(a):
    return a.get() if isinstance(a, ndarray) else np.asarray(a)


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    return mod


def modules() -> dict:
    """``sys.modules`` entries that make ``import cupy`` and ``import cupyx.scipy.sparse`` give
    the stand-in."""
    names = ("zeros", "cumsum", "bincount", "nonzero", "count_nonzero", "all", "matmul", "stack", "eye", "arange", "partition")
    linalg = _module("cupy.linalg", svd=_numpy(np.linalg.svd), norm=_numpy(np.linalg.norm), LinAlgError=np.linalg.LinAlgError)
    cupy = _module(
        "cupy",
        __version__="0+numpy-stand-in",
        ndarray=ndarray,
        asarray=asarray,
        asnumpy=asnumpy,
        linalg=linalg,
        bool_=np.bool_,
        int32=np.int32,
        float32=np.float32,
        float64=np.float64,
        **{n: _numpy(getattr(np, n)) for n in names},
    )
    cuda = _module(
        "cupy.cuda",
        Device=_Device,
        runtime=_module(
            "cupy.cuda.runtime",
            getDeviceCount=lambda: 1,
            getDeviceProperties=lambda i: {"name": b"NumPy stand-in for CuPy (no GPU)"},
        ),
    )
    cupy.cuda = cuda
    sparse = _module("cupyx.scipy.sparse", csr_matrix=_Sparse)
    cupyx_scipy = _module("cupyx.scipy", sparse=sparse)
    cupyx = _module("cupyx", scipy=cupyx_scipy)
    return {"cupy": cupy, "cupy.linalg": linalg, "cupy.cuda": cuda, "cupyx": cupyx, "cupyx.scipy": cupyx_scipy, "cupyx.scipy.sparse": sparse}


def install(monkeypatch) -> types.ModuleType:
    """Put the stand-in in ``sys.modules`` for one test (``monkeypatch`` undoes it) and make
    ``refnet.kernels`` import its cupy engine afresh; returns the fake ``cupy`` module."""
    from refnet import kernels

    for name, mod in modules().items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.delitem(sys.modules, "refnet.kernels.cupy_engine", raising=False)
    monkeypatch.delattr(kernels, "cupy_engine", raising=False)
    monkeypatch.setattr(kernels, "_loaded", {k: v for k, v in kernels._loaded.items() if k != "cupy"})
    return sys.modules["cupy"]
