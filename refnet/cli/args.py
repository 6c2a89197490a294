"""What the command-line parsers share: argument types and the error a command raises.

Every ``type=`` here raises ``argparse.ArgumentTypeError`` with a message that reads after
argparse's "argument --NAME: ", e.g. "argument --lr: must be > 0, got -0.1". The name types
(:func:`dataset_name`, :func:`arch_name`, :func:`init_name`, :func:`engine_name`) check against the
library's own tables, imported only when a value is parsed, so that building a parser stays cheap.

Every command checks every flag before any work starts (a typo is one line on stderr and exit
status 2, never a traceback or a half-done run): the types at parse time, then the checks that
involve several flags or the file system (:func:`check_data_flags`, :func:`claim_out`) first thing
in ``run``.

Output folders (:func:`claim_out`). A command's ``--out`` holds one run's files: an existing
non-empty folder is refused unless ``--overwrite`` (:func:`refnet.provenance.prepare_out`); with
``--overwrite`` the earlier run's files of the names this command writes are removed before
anything is written, so a reader never sees one run's history beside another run's network; and
while a run writes, a lock file ``OUT/.refnet-run.lock`` (host and process id) makes a second run
into the same folder fail at once. A lock left by a killed run (its process gone) is taken over.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import time

__all__ = [
    "CLIError",
    "INIT_ALIASES",
    "LOCK_NAME",
    "Namespace",
    "arch_name",
    "check_data_flags",
    "claim_out",
    "scheduler_address",
    "dataset_name",
    "engine_name",
    "float_in",
    "float_list",
    "init_name",
    "int_at_least",
    "lr_phases",
]

#: what a parser returns (for annotations outside refnet.cli, which does not import argparse)
Namespace = argparse.Namespace

#: the initialisation names a command accepts: refnet.init.INIT_NAMES and the SPP paper's aliases
INIT_ALIASES = ("vs-l", "vs-g", "vs-h", "ldi")


class CLIError(Exception):
    """A bad command-line argument or input: printed as ``refnet: error: ...``, exit status 2."""


# ============================================================================================
# numbers
# ============================================================================================


def int_at_least(lo: int):
    """An integer ``>= lo``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {value}")
        return value

    parse.__name__ = f"int>={lo}"
    return parse


def float_in(lo: float | None = None, hi: float | None = None, lo_open=False, hi_open=False):
    """A finite number in ``[lo, hi]`` (either bound may be open or absent)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
        if lo is not None and (value < lo or (lo_open and value == lo)):
            raise argparse.ArgumentTypeError(f"must be {'>' if lo_open else '>='} {lo:g}, got {value:g}")
        if hi is not None and (value > hi or (hi_open and value == hi)):
            raise argparse.ArgumentTypeError(f"must be {'<' if hi_open else '<='} {hi:g}, got {value:g}")
        return value

    parse.__name__ = "number"
    return parse


def float_list(item):
    """``G[,G...]``: a comma-separated list of numbers, each parsed by ``item`` (e.g.
    ``float_in(0.0, lo_open=True)``); empty items are skipped."""

    def parse(text: str) -> list:
        return [item(t) for t in text.split(",") if t.strip()]

    parse.__name__ = "list"
    return parse


def lr_phases(text: str) -> list:
    """``STEP:LR[,STEP:LR...]``: from step STEP on, the learning rate LR (steps increasing, > 1)."""
    phases = []
    for part in text.split(","):
        step, sep, rate = part.strip().partition(":")
        try:
            if not sep:
                raise ValueError
            step_i, rate_f = int(step), float(rate)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected STEP:LR pairs separated by commas (e.g. 5001:0.01,7501:0.001), got {text!r}") from None
        if step_i < 2 or not rate_f > 0 or (phases and step_i <= phases[-1][0]):
            raise argparse.ArgumentTypeError(f"steps must increase from 2 on and learning rates be > 0, got {text!r}")
        phases.append((step_i, rate_f))
    return phases


# ============================================================================================
# names
# ============================================================================================


def dataset_name(text: str) -> str:
    """A dataset of :data:`refnet.data.DATASETS`, as its key: case-insensitive, ``-`` and ``_``
    the same (``Fashion_MNIST`` -> ``fashion-mnist``), the one rule every command uses."""
    from ..data import DATASETS, dataset_name as key

    try:
        return key(text, "data")
    except (ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(DATASETS)}; got {text!r}") from None


def init_name(text: str) -> str:
    """An initialisation name: :data:`refnet.init.INIT_NAMES` or an alias (vs-l, vs-g, vs-h, ldi);
    returned as given (``refnet.init.get_initializer`` resolves it)."""
    from .._checks import check_choice
    from ..init import INIT_NAMES

    names = [*INIT_NAMES, *INIT_ALIASES]
    try:
        check_choice(text, "init", names)
    except (ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(names)}; got {text!r}") from None
    return text


def arch_name(text: str) -> str:
    """An architecture spec :func:`refnet.arch.parse_arch` reads (e.g. mlp-7-tanh); returned as given."""
    from ..arch import parse_arch

    try:
        parse_arch(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).split("\n")[0]) from None
    return text


def engine_name(text: str) -> str:
    """A kernel engine: numpy, numba, cupy or auto (:data:`refnet.kernels.ENGINES`)."""
    from ..kernels import ENGINES

    names = (*ENGINES, "auto")
    if text not in names:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(names)}; got {text!r}")
    return text


def scheduler_address(text: str) -> str:
    """A Dask scheduler address ``PROTOCOL://HOST:PORT`` (tcp, tls, ws, wss, ucx, inproc), checked
    for its form only (nothing is contacted while parsing)."""
    import re

    if not re.fullmatch(r"(tcp|tls|ws|wss|ucx|inproc)://\S+", text):
        raise argparse.ArgumentTypeError(f"must be a scheduler address such as tcp://10.0.0.1:8786, got {text!r}")
    return text


# ============================================================================================
# checks that involve several flags or the file system (first thing in a command's run)
# ============================================================================================


def add_layerwise_argument(group) -> None:
    """``--layerwise/--no-layerwise`` (default off): the singular values of every layer Jacobian
    beside the input-output ones (:func:`refnet.spectrum.collect_singular_values`)."""
    group.add_argument("--layerwise", action=argparse.BooleanOptionalAction, default=False,
                       help="also the singular values of every layer Jacobian J^(l-1,l) and the layerwise dynamical "
                            "isometry (LDI) table; costs many times the input-output statistics for MLPs with "
                            "saturating units (one decomposition per layer per example) and for tanh/ReLU "
                            "convolutions (default off)")


def check_data_flags(data: str, data_dir) -> None:
    """``--data`` and ``--data-dir`` together, without reading any data: a dataset read from files
    needs its folder and files (``--data-dir`` or ``$REFNET_DATA_DIR``); a bundled one takes no
    ``--data-dir``. :class:`CLIError` naming the flag otherwise."""
    from ..data import check_data_dir

    try:
        check_data_dir(data, data_dir, "--data-dir")
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    except (FileNotFoundError, TypeError) as exc:
        raise CLIError(f"argument --data-dir: {exc}") from None


#: the lock file of a run writing into an output folder
LOCK_NAME = ".refnet-run.lock"


def _lock_owner(path: str):
    """``(host, pid)`` written in a lock file, or None when it cannot be read."""
    try:
        with open(path, encoding="utf-8") as fh:
            host, pid = fh.read().split()[:2]
        return host, int(pid)
    except (OSError, ValueError):
        return None


def _owner_gone(owner, lock: str) -> bool:
    """True when the run that wrote a lock is gone: same host, process not running (an unreadable
    lock counts as gone once it is a minute old: its writer died between creating and writing it)."""
    from .._io import process_gone

    if owner is None:
        try:
            return time.time() - os.path.getmtime(lock) > 60
        except OSError:
            return True
    host, pid = owner
    return host == socket.gethostname() and process_gone(pid)


def _take_lock(folder: str) -> str:
    lock = os.path.join(folder, LOCK_NAME)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            owner = _lock_owner(lock)
            if not _owner_gone(owner, lock) or os.name != "posix":
                who = f"process {owner[1]} on {owner[0]}" if owner else "another run"
                raise CLIError(f"argument --out: {folder!r} is in use by {who} (lock file {LOCK_NAME}); "
                               "wait for it or choose another --out") from None
            try:  # a lock left by a killed run
                os.unlink(lock)
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(f"{socket.gethostname()} {os.getpid()}\n")
        return lock
    raise CLIError(f"argument --out: cannot take the lock {lock!r}")  # pragma: no cover - a race lost twice


@contextlib.contextmanager
def claim_out(out, *, overwrite: bool = False, outputs=(), resume: bool = False):
    """The output folder ``out`` of one run, held for this run alone (see the module docstring).

    Parameters
    ----------
    out : str
        The ``--out`` value; created when missing.
    overwrite : bool
        ``--overwrite``: accept a non-empty folder, removing first the files named in ``outputs``.
    outputs : tuple of str
        The file names this command writes there (an earlier run's are removed with ``overwrite``).
    resume : bool
        A command that resumes into its folder (``refnet reproduce``): a non-empty folder is
        accepted without ``overwrite``, and nothing is removed.

    Yields
    ------
    pathlib.Path
        The folder; its lock is released when the block ends, however it ends.
    """
    from ..provenance import prepare_out

    if not isinstance(out, str) or not out:
        raise CLIError(f"argument --out: expected a folder path, got {out!r}")
    try:
        folder = prepare_out(out, overwrite=overwrite or resume)
    except ValueError as exc:
        raise CLIError(f"argument --out: {exc}") from None
    except OSError as exc:
        raise CLIError(f"argument --out: cannot create the folder {out!r}: {exc.strerror or exc}") from None
    lock = _take_lock(os.fspath(folder))
    try:
        if overwrite and not resume:
            for name in outputs:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(folder / name)
        yield folder
    finally:
        if _lock_owner(lock) == (socket.gethostname(), os.getpid()):
            with contextlib.suppress(OSError):
                os.unlink(lock)
