r"""Progress bars and messages: the one helper behind every long loop of refnet.

Bars are :mod:`tqdm` bars; messages go to the ``refnet`` :mod:`logging` logger. Library code
never prints: what a command prints is the command's output (``refnet.cli``), everything else is
a bar or a log record.

The ``progress`` argument
-------------------------
Every long loop (training steps, approximate-isometry steps, IMP rounds, SynFlow rounds, Jacobian
batches, validation units) takes a ``progress`` argument with one meaning:

``None`` (the default)
    A bar on stderr when stderr is a terminal; nothing otherwise (pipes, files, CI, pytest).
``True``
    A bar on stderr.
``False``
    Nothing.
a text stream (anything with ``write``)
    A bar there.
a callable (only where a loop documents it: :func:`refnet.approximate_isometry`, :func:`refnet.imp`)
    Called with the loop's record after every step or round, and no bar.

A bar nested in another one (training inside a validation unit) takes the next line and is
cleared when it ends (tqdm's ``leave=None``); the outermost bar stays.

Messages
--------
:data:`logger` is ``logging.getLogger("refnet")`` with a :class:`logging.NullHandler`, so nothing
shows until the application configures logging (``logging.basicConfig(level=logging.INFO)``);
:func:`get_logger` gives its children (``refnet.validation``, ...).
"""

from __future__ import annotations

import logging
import sys
from typing import Callable

import numpy as np

__all__ = ["Progress", "get_logger", "logger", "progress_target"]

#: The library's logger: every message of refnet goes here (or to a child of it).
logger = logging.getLogger("refnet")
logger.addHandler(logging.NullHandler())

_BAR_FORMAT = "{desc} {n_fmt}/{total_fmt} |{bar:16}| [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
_COUNTER_FORMAT = "{desc} {n_fmt} {unit} [{elapsed}, {rate_fmt}{postfix}]"  # total unknown


def get_logger(name: str | None = None) -> logging.Logger:
    """The ``refnet`` logger (``name`` None) or its child ``refnet.<name>``."""
    if name is None:
        return logger
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be None or a non-empty str, got {name!r}")
    return logger.getChild(name)


def _stderr_is_terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)  # sys.stderr may be None (pythonw) or replaced
    try:
        return bool(isatty()) if isatty is not None else False
    except (ValueError, OSError):  # a closed stream
        return False


def progress_target(progress, *, allow_callable: bool = False, name: str = "progress"):
    """Where the reports of a ``progress`` argument go (see the module docstring).

    Returns
    -------
    None (no reports), a text stream (a bar there: stderr for ``True``, and for ``None`` when
    stderr is a terminal), or the callable itself (``allow_callable`` and a callable without
    ``write``).

    Raises
    ------
    TypeError
        Anything else, naming ``name``.
    """
    if progress is None:
        return sys.stderr if _stderr_is_terminal() else None
    if isinstance(progress, (bool, np.bool_)):
        return sys.stderr if progress else None
    if hasattr(progress, "write"):
        return progress
    if allow_callable and callable(progress):
        return progress
    what = "None, a bool, a text stream or a callable" if allow_callable else "None, True, False or a text stream"
    raise TypeError(f"{name} must be {what}, got {type(progress).__name__}")


class Progress:
    """A progress report over one loop: a tqdm bar, a callable's records, or nothing.

    Parameters
    ----------
    progress : None, bool, text stream or callable
        See the module docstring; a callable only with ``allow_callable``.
    total : int, optional
        Number of updates the loop expects (the bar shows ``n/total`` and the time left);
        None: a counter.
    desc : str
        What is counted, written before the count ("step", "AI step", "units").
    unit : str
        Unit of the rate ("steps" gives "... steps/s").
    allow_callable : bool
        Accept a callable ``progress``: :meth:`update` then calls it with its record.
    leave : bool, optional
        Keep the finished bar on screen (None: only the outermost bar).
    name : str
        The argument's name in error messages.

    Use it as a context manager (or call :meth:`close`); with a bar on a stream that is not a
    terminal (a file, ``io.StringIO``) the bar is written as tqdm writes it: ``"\\r"`` before
    every redraw and ``"\\n"`` after the last one.
    """

    def __init__(self, progress=None, total: int | None = None, *, desc: str, unit: str = "it",
                 allow_callable: bool = False, leave: bool | None = None, name: str = "progress"):
        target = progress_target(progress, allow_callable=allow_callable, name=name)
        self.callback: Callable | None = None
        self.stream = None
        self._bar = None
        if target is None:
            return
        if not hasattr(target, "write"):
            self.callback = target
            return
        from tqdm import tqdm  # imported when a bar is shown: `import refnet` stays light

        self.stream = target
        self._bar = tqdm(total=total, desc=desc, unit=unit, file=target, leave=leave,
                         bar_format=_BAR_FORMAT if total is not None else _COUNTER_FORMAT)

    @property
    def shown(self) -> bool:
        """True when a bar is drawn."""
        return self._bar is not None

    @property
    def active(self) -> bool:
        """True when :meth:`update` reaches anyone (a bar or a callable)."""
        return self._bar is not None or self.callback is not None

    def update(self, *record, n: int = 1, postfix=None) -> None:
        """One report: a callable ``progress`` is called as ``progress(*record)``; a bar advances
        by ``n`` and shows ``postfix`` (a str, or a function returning one, called only when a bar
        is shown) after its rate."""
        if self.callback is not None:
            self.callback(*record)
        elif self._bar is not None:
            if postfix is not None:
                self._bar.set_postfix_str(postfix() if callable(postfix) else str(postfix), refresh=False)
            self._bar.update(n)

    def describe(self, postfix) -> None:
        """Show ``postfix`` (what the loop is doing now) without advancing the bar."""
        if self._bar is not None:
            self._bar.set_postfix_str(str(postfix))

    def write(self, message: str) -> None:
        """A message line: above the bar when one is shown (the bar is redrawn below it), else a
        record of :data:`logger` at INFO level."""
        if self._bar is not None:
            self._bar.write(str(message), file=self.stream)
        else:
            logger.info("%s", message)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
