"""Provenance of a run: what produced a folder of results, and a guard against overwriting one.

Every command writes ``OUT/run.json`` beside its results: the refnet version, the git commit
when refnet runs from a checkout, the command line, every resolved argument, the seeds, the
Python / NumPy / SciPy / Numba versions, the BLAS library and its threads, the thread-count
and other relevant environment variables, the kernel engine, and the start and end times. A command wires it in
three lines::

    from ..provenance import prepare_out, recording

    out = prepare_out(args.out, overwrite=args.overwrite)      # refuses an earlier run's folder
    with recording(out, "train", args):                        # run.json at the end, even on error
        ...                                                    # the command's work

or, with the pieces, ``record = run_record(...)`` at the start and ``write_run_json(out, record)``
at the end. Nothing here imports more than the standard library and NumPy (versions of the other
libraries are read from the installed package metadata, without importing them), so a record
costs a few milliseconds plus one ``git`` call.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import subprocess
import sys
from pathlib import Path

from ._io import atomic_write_json, jsonable

__all__ = [
    "RUN_JSON",
    "THREAD_ENV_VARS",
    "ENV_VARS",
    "git_commit",
    "library_versions",
    "blas_info",
    "thread_info",
    "run_record",
    "finish_record",
    "write_run_json",
    "read_run_json",
    "prepare_out",
    "recording",
]

#: file name of the provenance record in an output folder
RUN_JSON = "run.json"
#: format tag and version of the record
RUN_FORMAT, RUN_VERSION = "refnet.run", 1
#: environment variables that set the thread counts of BLAS, OpenMP and Numba
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
#: other environment variables that change what refnet computes or how fast
ENV_VARS = ("REFNET_ENGINE", "REFNET_DATA_DIR", "REFNET_CACHE_DIR", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")


def _now() -> str:
    """The current time, ISO 8601 in UTC with microseconds (``2024-05-01T12:00:00.123456+00:00``)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat()


def git_commit(folder=None) -> dict | None:
    """The git commit of the checkout refnet runs from, or None (an install, no git, any error).

    Runs ``git rev-parse --show-toplevel HEAD`` in the package's folder (or ``folder``) and
    accepts the answer only when that folder is directly inside the repository's top level (so
    an installed refnet inside some other repository does not report that repository's commit).
    Never raises.

    Returns
    -------
    dict or None
        ``{"commit": 40 hex digits, "dirty": bool or None}``: ``dirty`` is True when tracked
        files differ from the commit (``git status --porcelain --untracked-files=no``).
    """
    pkg = Path(folder) if folder is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=pkg, capture_output=True,
                             text=True, timeout=10, check=False)
        if out.returncode != 0:
            return None
        top, commit = out.stdout.split()[:2]
        if folder is None and Path(top).resolve() != pkg.parent:
            return None
        if len(commit) != 40 or any(c not in "0123456789abcdef" for c in commit):
            return None
        st = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=pkg,
                            capture_output=True, text=True, timeout=10, check=False)
        dirty = bool(st.stdout.strip()) if st.returncode == 0 else None
        return {"commit": commit, "dirty": dirty}
    except Exception:  # no git, a timeout, an odd answer: provenance never fails a run
        return None


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def library_versions() -> dict:
    """Versions of Python, refnet and the numeric libraries (None for one not installed).

    NumPy's version is the imported module's; the others come from package metadata (so Numba,
    SciPy and the rest are not imported just to be named).
    """
    import numpy as np

    from . import __version__

    out = {
        "refnet": __version__,
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "numpy": np.__version__,
    }
    for name in ("scipy", "numba", "threadpoolctl", "cupy", "dask", "distributed", "pandas"):
        mod = sys.modules.get(name)
        out[name] = getattr(mod, "__version__", None) if mod is not None else _dist_version(name)
    return out


def blas_info() -> list[dict]:
    """The BLAS / OpenMP libraries loaded in this process and their thread counts.

    From ``threadpoolctl.threadpool_info()`` when threadpoolctl is installed (one entry per loaded
    library: ``user_api``, ``internal_api``, ``version``, ``num_threads``, ``threading_layer``,
    ``architecture``, ``prefix``); otherwise NumPy's build configuration
    (``numpy.show_config(mode="dicts")``, ``{"source": "numpy.show_config", ...}``, no thread
    counts). An empty list when neither works.
    """
    try:
        from threadpoolctl import threadpool_info

        keys = ("user_api", "internal_api", "version", "num_threads", "threading_layer", "architecture", "prefix")
        return [{k: d.get(k) for k in keys} for d in threadpool_info()]
    except Exception:
        pass
    try:
        import numpy as np

        deps = np.show_config(mode="dicts")["Build Dependencies"]
        return [{"source": "numpy.show_config", "api": api, **{k: deps[api].get(k) for k in ("name", "version", "openblas configuration") if k in deps[api]}}
                for api in ("blas", "lapack") if api in deps]
    except Exception:
        return []


def thread_info() -> dict:
    """Thread settings: the environment variables of :data:`THREAD_ENV_VARS` (None when unset),
    the usable cores, and Numba's thread count when Numba is already imported."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - macOS, Windows
        cores = os.cpu_count()
    out = {"env": {v: os.environ.get(v) for v in THREAD_ENV_VARS}, "cpu_count": os.cpu_count(), "usable_cores": cores}
    numba = sys.modules.get("numba")
    if numba is not None:
        try:
            out["numba_threads"] = int(numba.get_num_threads())
        except Exception:
            pass
    return out


def _engine() -> str | None:
    try:
        from .kernels import get_engine

        return get_engine()
    except Exception:
        return None


def _seeds_from(args: dict):
    """The seed arguments of ``args``: keys ``seed``, ``seeds`` or ending in ``_seed``."""
    return {k: v for k, v in args.items() if k in ("seed", "seeds") or k.endswith("_seed")}


def _args_dict(args) -> dict:
    if args is None:
        return {}
    if not isinstance(args, dict):
        if not hasattr(args, "__dict__"):
            raise TypeError(f"args must be a dict or an argparse.Namespace, got {type(args).__name__}")
        args = vars(args)
    # private entries (argparse's "_command" and the like) are machinery, not settings
    return {str(k): v for k, v in args.items() if not str(k).startswith("_")}


def run_record(command: str, argv=None, args=None, *, seeds=None, extra: dict | None = None) -> dict:
    """The provenance record of a run that starts now.

    Parameters
    ----------
    command : str
        The command's name (``"train"``, ``"sweep"``, ...).
    argv : list of str, optional
        The command line; default ``sys.argv`` (program name first).
    args : dict or argparse.Namespace, optional
        Every resolved argument (after defaults and config files); entries whose name starts with
        ``_`` are left out, values that are not JSON-able are stored as their ``str``.
    seeds : optional
        The seeds of the run (an int, a list, or a dict naming what each one seeds); default: the
        entries of ``args`` named ``seed``, ``seeds`` or ``*_seed``.
    extra : dict, optional
        More JSON-able entries, stored under ``"extra"``.

    Returns
    -------
    dict (JSON-able)
        ``format``, ``version``, ``command``, ``argv``, ``args``, ``seeds``, ``refnet_version``,
        ``git`` (:func:`git_commit`), ``versions`` (:func:`library_versions`), ``blas``
        (:func:`blas_info`), ``threads`` (:func:`thread_info`), ``engine`` (the kernel engine in
        force: ``refnet.kernels.get_engine()``), ``environment`` (the variables of
        :data:`ENV_VARS`, None when unset), ``host`` (name, platform, machine), ``cwd``,
        ``pid``, ``start`` (ISO 8601, UTC), ``end`` (None until :func:`finish_record`),
        ``status`` (``"running"``), ``error`` and ``extra``.
    """
    if not isinstance(command, str) or not command:
        raise TypeError(f"command must be a non-empty str, got {command!r}")
    from . import __version__

    start = _now()
    a = _args_dict(args)
    if argv is None:
        argv = list(sys.argv)
    elif isinstance(argv, str) or not all(isinstance(s, str) for s in argv):
        raise TypeError(f"argv must be a list of str, got {argv!r}")
    return {
        "format": RUN_FORMAT,
        "version": RUN_VERSION,
        "command": command,
        "argv": list(argv),
        "args": jsonable(a, other=str),
        "seeds": jsonable(_seeds_from(a) if seeds is None else seeds, other=str),
        "refnet_version": __version__,
        "git": git_commit(),
        "versions": library_versions(),
        "blas": jsonable(blas_info(), other=str),
        "threads": thread_info(),
        "engine": _engine(),
        "environment": {v: os.environ.get(v) for v in ENV_VARS},
        "host": {"name": platform.node(), "platform": platform.platform(), "machine": platform.machine()},
        "cwd": os.getcwd(),
        "pid": os.getpid(),
        "start": start,
        "end": None,
        "status": "running",
        "error": None,
        "extra": jsonable(extra or {}, other=str),
    }


def finish_record(record: dict, *, status: str = "completed", error: str | None = None) -> dict:
    """Set ``end`` (now), ``status`` and ``error`` of ``record`` in place; returns it."""
    if not isinstance(record, dict) or record.get("format") != RUN_FORMAT:
        raise TypeError("record must be a dict made by run_record")
    record["end"] = _now()
    record["status"] = str(status)
    record["error"] = None if error is None else str(error)
    return record


def write_run_json(folder, record: dict, *, finish: bool = True) -> str:
    """Write ``record`` as ``folder/run.json`` atomically; returns the path.

    ``finish``: set the end time first when the record has none (:func:`finish_record` with
    status ``"completed"``); a record already finished keeps its time and status.
    """
    if not isinstance(record, dict) or record.get("format") != RUN_FORMAT:
        raise TypeError("record must be a dict made by run_record")
    if finish and record.get("end") is None:
        finish_record(record)
    path = Path(folder) / RUN_JSON
    atomic_write_json(path, jsonable(record, other=str), allow_nan=False)
    return os.fspath(path)


def read_run_json(folder) -> dict:
    """Read ``folder/run.json`` (or the file itself) and check its format tag."""
    import json

    path = Path(folder)
    if path.is_dir():
        path = path / RUN_JSON
    with open(path, encoding="utf-8") as fh:
        d = json.load(fh)
    if not isinstance(d, dict) or d.get("format") != RUN_FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not a refnet run record (format {RUN_FORMAT!r})")
    return d


def prepare_out(path, overwrite: bool = False, *, resume_from: str | None = None) -> Path:
    """Make the output folder ``path``, refusing an earlier run's folder.

    Parameters
    ----------
    path : str or os.PathLike
        Created (with its parents) when missing; an existing empty folder is fine.
    overwrite : bool
        Accept an existing non-empty folder (files of the same names are then replaced).
    resume_from : str, optional
        A file name such as ``"sweep.json"``: a folder that holds it is this command's own
        earlier output and is accepted without ``overwrite`` (the command resumes into it and
        checks that the settings match).

    Returns
    -------
    pathlib.Path

    Raises
    ------
    ValueError
        ``path`` exists and is not a folder, or is a non-empty folder and neither ``overwrite``
        nor ``resume_from`` allows it; the message names the path and ``--overwrite``.
    """
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise TypeError(f"path must be a non-empty str or os.PathLike, got {path!r}")
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"output folder {os.fspath(p)!r} exists and is not a folder")
    if p.is_dir() and any(p.iterdir()) and not overwrite:
        if resume_from is None or not (p / resume_from).is_file():
            raise ValueError(
                f"output folder {os.fspath(p)!r} exists and is not empty (an earlier run's results?); "
                "choose another --out, or pass --overwrite to write into it"
            )
    p.mkdir(parents=True, exist_ok=True)
    return p


@contextlib.contextmanager
def recording(out, command: str, args=None, *, argv=None, seeds=None, extra: dict | None = None):
    """Context manager: a :func:`run_record` made on entry, written to ``out/run.json`` on exit.

    The record is yielded, so the body may add entries (``record["extra"]["..."] = ...``). On a
    normal exit its status is ``"completed"``, unless the body finished it itself (e.g.
    ``finish_record(record, status="diverged", error=...)`` before returning exit status 1); on
    an exception ``"failed"`` (``"interrupted"`` for KeyboardInterrupt) with the error, and the
    exception propagates. ``out`` must exist (:func:`prepare_out`).
    """
    record = run_record(command, argv, args, seeds=seeds, extra=extra)
    try:
        yield record
    except KeyboardInterrupt:
        finish_record(record, status="interrupted", error="KeyboardInterrupt")
        write_run_json(out, record)
        raise
    except BaseException as exc:
        finish_record(record, status="failed", error=f"{type(exc).__name__}: {exc}")
        write_run_json(out, record)
        raise
    else:
        if record.get("end") is None:
            finish_record(record)
        write_run_json(out, record)
