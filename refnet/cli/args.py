"""What the command-line parsers share: argument types and the error a command raises.

Every ``type=`` here raises ``argparse.ArgumentTypeError`` with a message that reads after
argparse's "argument --NAME: ", e.g. "argument --lr: must be > 0, got -0.1". The name types
(:func:`dataset_name`, :func:`arch_name`, :func:`init_name`) check against the library's own
tables, imported only when a value is parsed, so that building a parser stays cheap.
"""

from __future__ import annotations

import argparse

__all__ = [
    "CLIError",
    "INIT_ALIASES",
    "Namespace",
    "arch_name",
    "dataset_name",
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
