"""Atomic file writes and careful reads: every file refnet writes goes through :func:`atomic_write`,
and the loaders read ``.npz`` and JSON files through :func:`read_npz` and :func:`read_json`.

Writes. The content is written to a temporary file in the destination folder, flushed and
fsynced, then moved into place with ``os.replace`` (atomic on POSIX and Windows), so a reader or a
crash never sees a half-written file; on any error (an exception, Ctrl-C) the temporary file is
removed and the old file stays.

Temporary files and a killed writer. A process killed mid-write (SIGKILL, a power cut) cannot
remove its temporary file, so the name says whose it is: ``.<name>.<host>.<pid>-<random>.tmp``
(``<host>`` eight hex digits of the host name's CRC-32). The rule: every write and every read of
a file here first removes the temporary files in that folder whose writer is gone, i.e. written on
this host by a process id that no longer runs (or is a zombie). A temporary file of a live
process, or of another host sharing the folder, is never touched, so concurrent writers are safe.
(On Windows, where a process cannot be probed safely, nothing is swept.)

Reads. :func:`read_npz` and :func:`read_json` turn every way a file can be damaged or of the
wrong kind (empty, truncated, a flipped byte caught by the zip CRC-32 or the ``.npy`` header, a
``.npy`` given for an ``.npz``, an archive member that would need pickle, invalid JSON) into a
``ValueError`` that names the path and what is wrong; a missing file is a ``FileNotFoundError``
naming it.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import socket
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

__all__ = [
    "atomic_write",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_savez",
    "atomic_savefig",
    "json_float",
    "jsonable",
    "host_tag",
    "process_gone",
    "read_json",
    "read_npz",
    "sweep_stale_temps",
    "TMP_RE",
]

#: the name of a temporary file of :func:`atomic_write`: ``.<target>.<host>.<pid>-<random>.tmp``
TMP_RE = re.compile(r"^\.(?P<target>.+)\.(?P<host>[0-9a-f]{8})\.(?P<pid>\d+)-[0-9a-f]{8}\.tmp$")


def host_tag() -> str:
    """This host's tag in temporary file names: 8 hex digits of the CRC-32 of its name."""
    return f"{zlib.crc32(socket.gethostname().encode('utf-8', 'replace')) & 0xFFFFFFFF:08x}"


def _target_mode(path: Path) -> int:
    """The existing file's permission bits, or ``0o666`` less the process umask for a new file."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def process_gone(pid: int) -> bool:
    """True when no process ``pid`` runs on this host (or it is a zombie); False when it runs or
    cannot be probed."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OSError, OverflowError):
        return False  # it exists (another user's), or the probe is not possible here
    try:  # Linux: a killed child not yet reaped by its parent still answers kill(pid, 0)
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except (OSError, IndexError):
        return False


def sweep_stale_temps(folder) -> list[str]:
    """Remove the temporary files of :func:`atomic_write` in ``folder`` whose writer is gone (see
    the module docstring for the rule); returns the names removed. Never raises."""
    if os.name != "posix":
        return []
    removed = []
    host = host_tag()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = TMP_RE.match(entry.name)
        if m is None or m["host"] != host or not process_gone(int(m["pid"])):
            continue
        try:
            os.unlink(entry.path)
            removed.append(entry.name)
        except OSError:
            pass
    return removed


def atomic_write(path, write: Callable, *, suffix: str = ".tmp") -> None:
    """Call ``write(fileobj)`` (binary) on a temporary file beside ``path``, then replace ``path``.

    The temporary file is ``.<name>.<host>.<pid>-<random>.tmp`` (``suffix`` is accepted for
    compatibility and not used); stale ones of killed writers in the folder are removed first
    (:func:`sweep_stale_temps`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(path.parent)
    while True:
        tmp = path.parent / f".{path.name}.{host_tag()}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
            break
        except FileExistsError:  # pragma: no cover - 32 random bits collided
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        # the file is made 0600; give it the mode an ordinary open() would have
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


# ============================================================================================
# careful reads
# ============================================================================================

_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")


def _check_readable(path, what: str) -> str:
    """``path`` as a str; FileNotFoundError / ValueError naming it when it is missing, a folder or
    empty. Stale temporary files beside it are swept first."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__} {path!r}")
    p = os.fspath(path)
    if not os.path.exists(p):
        raise FileNotFoundError(f"{what} {p!r} does not exist")
    if os.path.isdir(p):
        raise ValueError(f"{what} {p!r} is a folder, not a file")
    sweep_stale_temps(os.path.dirname(os.path.abspath(p)))
    if os.path.getsize(p) == 0:
        raise ValueError(f"{what} {p!r} is empty (0 bytes): a damaged or unfinished file")
    return p


def read_npz(path, what: str = "npz file") -> dict:
    """Every array of the ``.npz`` archive ``path``, as ``{name: ndarray}``, read without pickle.

    Each member's ``.npy`` header is checked against the member's size before its data are read
    (so a damaged header cannot ask for a huge allocation), and the zip CRC-32 of every member is
    verified. Any damage or a wrong format is a ``ValueError`` naming ``path`` (``what`` says what
    the file should be, e.g. "network file") and what is wrong.
    """
    p = _check_readable(path, what)
    try:
        with open(p, "rb") as fh:
            head = fh.read(8)
            if head.startswith(_NPY_MAGIC):
                raise ValueError(f"{what} {p!r} is a .npy file (one array), not a .npz archive")
            if not head.startswith(_ZIP_MAGICS):
                raise ValueError(f"{what} {p!r} is not a .npz archive (no zip signature at its start: {head[:4]!r})")
            fh.seek(0)
            out = {}
            with zipfile.ZipFile(fh) as zf:
                for info in zf.infolist():
                    name = info.filename
                    if not name.endswith(".npy"):
                        raise ValueError(f"member {name!r} is not a .npy array")
                    with zf.open(info) as m:
                        version = np.lib.format.read_magic(m)
                        if version == (1, 0):
                            shape, fortran, dtype = np.lib.format.read_array_header_1_0(m)
                        else:
                            shape, fortran, dtype = np.lib.format.read_array_header_2_0(m)
                        if dtype.hasobject:
                            raise ValueError(f"member {name!r} holds Python objects, which would need pickle "
                                             "(refused: files are read with allow_pickle=False)")
                        header = m.tell()
                        need = header + math.prod(shape) * dtype.itemsize
                        if need != info.file_size:
                            raise ValueError(f"member {name!r} announces shape {shape} of {dtype} ({need:,} bytes with "
                                             f"its header) but holds {info.file_size:,} bytes")
                        data = m.read(need - header)
                        if m.read(1):  # pragma: no cover - sizes were checked
                            raise ValueError(f"member {name!r} has trailing bytes")
                    a = np.frombuffer(data, dtype=dtype)
                    a = a.reshape(shape, order="F" if fortran else "C").copy(order="K")
                    out[name[: -len(".npy")]] = a
    except ValueError as exc:
        msg = str(exc)
        if p in msg:
            raise
        raise ValueError(f"{what} {p!r} is damaged or not a valid .npz archive: {msg}") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError, TypeError, struct.error, MemoryError,
            NotImplementedError, RuntimeError) as exc:
        raise ValueError(f"{what} {p!r} is damaged or not a valid .npz archive ({type(exc).__name__}: {exc})") from None
    return out


def json_entry(entry, where: str, name: str) -> dict:
    """The JSON object stored as the 0-d string array ``entry`` (an ``.npz`` member such as a
    network's ``config`` or an audit file's ``arch``); ``ValueError`` naming ``where`` and ``name``
    when it is not a string, not JSON, or not an object."""
    if entry.ndim != 0 or entry.dtype.kind not in "US":
        raise ValueError(f"{where}: {name!r} must be a JSON string (0-d str array), got dtype {entry.dtype}, "
                         f"shape {entry.shape}")
    try:
        obj = json.loads(str(entry))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: {name!r} is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: {name!r} must be a JSON object, got {type(obj).__name__}")
    return obj


def read_json(path, what: str = "JSON file"):
    """The JSON document in ``path`` (UTF-8). An empty file, bytes that are not UTF-8 or text that
    is not JSON is a ``ValueError`` naming ``path`` (and the line and column of a syntax error)."""
    p = _check_readable(path, what)
    try:
        with open(p, "rb") as fh:
            text = fh.read().decode("utf-8")
        return json.loads(text)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} {p!r} is not UTF-8 text (byte {exc.start}): a damaged or binary file") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} {p!r} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}): "
                         "a damaged or truncated file") from None
    except RecursionError:
        raise ValueError(f"{what} {p!r} is nested too deeply to be a refnet file") from None
