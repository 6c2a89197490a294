"""Argument checks shared by the whole package.

Every public function validates its inputs before it touches any state, and a bad input
raises a ``ValueError`` or ``TypeError`` whose message names the argument, what was expected
and what was given. These helpers keep those messages uniform.
"""

from __future__ import annotations

import numbers
import os
from typing import Iterable

import numpy as np

__all__ = [
    "available_memory",
    "as_rng",
    "check_array",
    "check_choice",
    "check_float",
    "check_int",
    "check_labels",
    "check_memory",
    "check_shape_tuple",
    "format_bytes",
    "resolve_dtype",
]

FLOAT_DTYPES = (np.dtype(np.float64), np.dtype(np.float32))


def as_rng(seed, name: str = "seed") -> np.random.Generator:
    """Return a ``numpy.random.Generator`` from a seed, a Generator or None.

    Randomness is always an argument: refnet never reads or writes NumPy's global state.
    ``None`` draws fresh OS entropy (not reproducible, as in NumPy).
    """
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None:
        return np.random.default_rng()
    if isinstance(seed, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int, a numpy.random.Generator or None, got bool {seed!r}")
    if isinstance(seed, numbers.Integral):
        if seed < 0:
            raise ValueError(f"{name} must be a non-negative int, got {seed}")
        return np.random.default_rng(int(seed))
    if isinstance(seed, np.random.SeedSequence):
        return np.random.default_rng(seed)
    raise TypeError(
        f"{name} must be an int, a numpy.random.Generator or None, got {type(seed).__name__}"
    )


def resolve_dtype(dtype, name: str = "dtype") -> np.dtype:
    """float64 (the default) or float32; anything else is an error."""
    try:
        dt = np.dtype(np.float64 if dtype is None else dtype)
    except TypeError as exc:
        raise TypeError(f"{name} must be float64 or float32, got {dtype!r}") from exc
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float64 or float32, got {dt}")
    return dt


def check_bool(value, name: str) -> bool:
    """A bool (Python or NumPy), as a Python bool; TypeError naming ``name`` otherwise."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def check_int(value, name: str, *, min_value: int | None = None) -> int:
    """An integer (not bool) >= ``min_value``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if min_value is not None and value < min_value:
        raise ValueError(f"{name} must be >= {min_value}, got {value}")
    return value


def check_float(
    value,
    name: str,
    *,
    min_value: float | None = None,
    max_value: float | None = None,
    min_inclusive: bool = True,
    max_inclusive: bool = True,
) -> float:
    """A finite real number inside the given bounds."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if min_value is not None and (value < min_value or (not min_inclusive and value == min_value)):
        op = ">=" if min_inclusive else ">"
        raise ValueError(f"{name} must be {op} {min_value}, got {value}")
    if max_value is not None and (value > max_value or (not max_inclusive and value == max_value)):
        op = "<=" if max_inclusive else "<"
        raise ValueError(f"{name} must be {op} {max_value}, got {value}")
    return value


def check_choice(value, name: str, choices: Iterable[str]) -> str:
    """A string among ``choices`` (case-insensitive; '-' and '_' are the same)."""
    choices = list(choices)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {choices}, got {type(value).__name__} {value!r}")
    key = value.lower().replace("-", "_")
    norm = {c.lower().replace("-", "_"): c for c in choices}
    if key not in norm:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return norm[key]


def check_array(
    x,
    name: str,
    *,
    ndim: int | None = None,
    shape: tuple | None = None,
    dtype=None,
    finite: bool = True,
    allow_int: bool = False,
) -> np.ndarray:
    """Validate a real array and return it as an ndarray.

    Parameters
    ----------
    x : array_like
    name : str
        The argument name used in error messages.
    ndim : int, optional
        Required number of dimensions.
    shape : tuple, optional
        Required shape; ``None`` entries match any size.
    dtype : dtype, optional
        If given, the array is converted to it (float arrays only).
    finite : bool
        Reject NaN and infinite entries.
    allow_int : bool
        Accept integer arrays (converted to ``dtype`` when given).
    """
    if not isinstance(x, np.ndarray):
        if hasattr(x, "__cuda_array_interface__") or type(x).__module__.startswith("torch"):
            raise TypeError(f"{name} must be a NumPy array, got {type(x).__module__}.{type(x).__name__}")
        try:
            x = np.asarray(x)
        except Exception as exc:  # pragma: no cover - exotic objects
            raise TypeError(f"{name} must be array-like, got {type(x).__name__}") from exc
    if x.dtype.kind not in "fiu" or (x.dtype.kind in "iu" and not (allow_int or dtype is not None)):
        raise TypeError(f"{name} must be a real floating-point array, got dtype {x.dtype}")
    if x.dtype.kind == "f" and x.dtype not in FLOAT_DTYPES and dtype is None:
        raise TypeError(f"{name} must be float64 or float32, got dtype {x.dtype}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {x.shape}")
    if shape is not None:
        ok = len(shape) == x.ndim and all(s is None or s == t for s, t in zip(shape, x.shape))
        if not ok:
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name} must have shape {want}, got {x.shape}")
    if dtype is not None:
        x = x.astype(dtype, copy=False)
    if finite and x.dtype.kind == "f" and x.size and not np.isfinite(x).all():
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        raise ValueError(f"{name} must be finite, got {bad} non-finite entries")
    return x


def check_labels(y, name: str, *, n: int, n_classes: int) -> np.ndarray:
    """Integer class labels of shape (n,) in [0, n_classes)."""
    y = np.asarray(y)
    if y.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array of class labels, got dtype {y.dtype}")
    if y.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(
            f"{name} must hold labels in [0, {n_classes}), got values in [{y.min()}, {y.max()}]"
        )
    return y.astype(np.intp, copy=False)


def check_shape_tuple(shape, name: str) -> tuple:
    """A per-example shape: a positive int or a sequence of positive ints (not bools, not floats
    such as 6.7, which would otherwise be truncated silently)."""
    if isinstance(shape, (numbers.Integral,)) and not isinstance(shape, (bool, np.bool_)):
        shape = (shape,)
    if isinstance(shape, (str, bytes)) or not hasattr(shape, "__iter__"):
        raise TypeError(f"{name} must be a tuple of positive ints, got {type(shape).__name__} {shape!r}")
    shape = tuple(shape)
    if not shape:
        raise ValueError(f"{name} must hold at least one size, got ()")
    for i, s in enumerate(shape):
        if isinstance(s, (bool, np.bool_)) or not isinstance(s, numbers.Integral):
            raise TypeError(f"{name}[{i}] must be an int, got {type(s).__name__} {s!r} (in {name}={shape!r})")
        if s <= 0:
            raise ValueError(f"{name} must hold positive sizes, got {shape!r}")
    return tuple(int(s) for s in shape)


# ============================================================================================
# memory: refuse up front what cannot be allocated
# ============================================================================================


def format_bytes(n: float) -> str:
    """``n`` bytes in binary units: ``'5.70 TiB'``."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} EiB"  # pragma: no cover


def _meminfo() -> dict:
    out = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    out[key] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
    except OSError:
        pass
    return out


def _cgroup_room() -> int | None:
    """Bytes left under this process's cgroup memory limit (v2 or v1), or None without one."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file, encoding="ascii") as fh:
                text = fh.read().strip()
            if text == "max":
                return None
            limit = int(text)
            with open(usage_file, encoding="ascii") as fh:
                usage = int(fh.read().strip())
        except (OSError, ValueError):
            continue
        if limit >= 2**60:  # v1 reports "no limit" as a huge number
            return None
        return max(0, limit - usage)
    return None


def available_memory() -> int | None:
    """Bytes this process could still allocate: the memory available now plus free swap
    (``/proc/meminfo``), capped by a cgroup limit; the physical memory where ``/proc`` is absent;
    None when nothing can be read (then no request is refused)."""
    info = _meminfo()
    if "MemAvailable" in info:
        avail = info["MemAvailable"] + info.get("SwapFree", 0)
    else:
        try:
            avail = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            return None
    room = _cgroup_room()
    return avail if room is None else min(avail, room)


def check_memory(n_bytes: int, what: str) -> None:
    """Refuse up front (``ValueError`` with the size that would be needed) a request of
    ``n_bytes`` that exceeds :func:`available_memory`; ``what`` names the request and the argument
    behind it, e.g. "the parameters of layers[1] (Dense(784, 1000000000))"."""
    avail = available_memory()
    if avail is not None and n_bytes > avail:
        raise ValueError(
            f"{what} would need {format_bytes(n_bytes)} of memory, more than the {format_bytes(avail)} "
            "available; use smaller sizes"
        )
