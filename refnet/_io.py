"""Atomic file writes: every file refnet writes goes through :func:`atomic_write`.

The content is written to a temporary file in the destination folder, flushed and fsynced, then
moved into place with ``os.replace`` (atomic on POSIX and Windows), so a reader or a crash never
sees a half-written file; on any error the temporary file is removed and the old file stays.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_json", "atomic_savez", "atomic_savefig", "json_float", "jsonable"]


def _target_mode(path: Path) -> int:
    """The existing file's permission bits, or ``0o666`` less the process umask for a new file."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write(path, write: Callable, *, suffix: str = ".tmp") -> None:
    """Call ``write(fileobj)`` (binary) on a temporary file beside ``path``, then replace ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes the file 0600; give it the mode an ordinary open() would have
        os.chmod(tmp, _target_mode(path))
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` (UTF-8) atomically."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def json_float(v):
    """A finite float as a number; inf and nan as the strings "inf", "-inf", "nan" (strict JSON
    has no non-finite numbers; Python's ``float()`` reads the strings back). None stays None."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else ("nan" if v != v else ("inf" if v > 0 else "-inf"))


def jsonable(obj, *, other=None):
    """``obj`` with NumPy scalars and arrays turned into Python numbers and lists, dict keys into
    strings and non-finite floats into strings (:func:`json_float`), for strict JSON. Values of
    other types are passed to ``other`` (e.g. ``str``) or left as they are."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v, other=other) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v, other=other) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist(), other=other)
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return json_float(obj)
    if obj is None or isinstance(obj, str) or other is None:
        return obj
    return other(obj)


def atomic_write_json(path, obj, *, indent: int = 2, allow_nan: bool = True) -> None:
    """Write ``obj`` as JSON atomically (a trailing newline included)."""
    atomic_write_text(path, json.dumps(obj, indent=indent, allow_nan=allow_nan) + "\n")


def atomic_savez(path, arrays: dict) -> None:
    """``np.savez`` of ``arrays`` atomically (read it back with ``allow_pickle=False``)."""
    atomic_write(path, lambda f: np.savez(f, **arrays), suffix=".npz")


def atomic_savefig(fig, path, *, dpi: int = 110) -> str:
    """Save a matplotlib figure as PNG atomically; returns the path."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi), suffix=".png")
    return os.fspath(path)
