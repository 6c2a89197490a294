"""The ``refnet`` command line: ``refnet <command> [options]``, the only place refnet parses
arguments.

One module per command (:mod:`.train`, :mod:`.spectrum`, :mod:`.prune`, :mod:`.reproduce`,
:mod:`.audit`, :mod:`.bench`), each with ``NAME``, ``HELP``, ``DESCRIPTION``,
``add_arguments(parser)`` and ``run(args) -> int``; the argument types they share are in
:mod:`.args`. A command module imports only the standard library and :mod:`.args` at the top;
the library code it drives is imported inside ``add_arguments``/``run``, so that
``refnet --help`` stays fast (no matplotlib, numba, torch or jax). To add a command, write its
module and list it in :data:`COMMAND_MODULES` (or call :func:`register` from anywhere).

Exit status: 0 success, 1 a run that failed (e.g. training diverged: one line
``refnet: error: training diverged ...``), 2 bad arguments or input (one line on stderr,
``refnet: error: ...``, naming the argument; no traceback), 130 interrupted. Every command checks
all its flags before any work starts (:mod:`.args`). Set ``REFNET_DEBUG=1`` to get the full
traceback instead of the one-line message.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Callable

from .args import CLIError

__all__ = ["CLIError", "COMMAND_MODULES", "Command", "build_parser", "main", "register", "register_module"]

PROG = "refnet"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises :class:`CLIError` instead of printing usage and exiting."""

    def error(self, message):
        raise CLIError(message)


@dataclass(frozen=True)
class Command:
    """One subcommand: ``add_arguments(parser)`` defines its options, ``run(args) -> int`` runs it."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str | None = None


_SUBCOMMANDS: dict[str, Command] = {}


def register(name: str, help: str, add_arguments, run, description: str | None = None) -> None:
    """Register a subcommand (a later registration of the same name replaces the earlier one)."""
    _SUBCOMMANDS[name] = Command(name, help, add_arguments, run, description)


def register_module(module) -> None:
    """Register the command a module defines (``NAME``, ``HELP``, ``DESCRIPTION``,
    ``add_arguments``, ``run``)."""
    register(module.NAME, module.HELP, module.add_arguments, module.run, getattr(module, "DESCRIPTION", None))


# the commands, in the order `refnet --help` lists them
from . import audit, bench, lottery, prune, reproduce, spectrum, sweep, train  # noqa: E402

#: the command modules registered at import
COMMAND_MODULES = (train, spectrum, prune, lottery, reproduce, audit, bench, sweep)

for _module in COMMAND_MODULES:
    register_module(_module)
del _module


# ============================================================================================
# parser and entry point
# ============================================================================================


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per registered command."""
    from .. import __version__

    parser = _Parser(prog=PROG, description="refnet: a float64 reference for pruning at initialization.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for cmd in _SUBCOMMANDS.values():
        p = sub.add_parser(
            cmd.name, help=cmd.help, description=cmd.description or cmd.help,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        cmd.add_arguments(p)
        p.set_defaults(_command=cmd)
    return parser


def _one_line(exc) -> str:
    """The first line of an exception's message (library messages may append a help text)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def main(argv=None) -> int:
    """Run ``refnet`` with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    debug = os.environ.get("REFNET_DEBUG", "") not in ("", "0")
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help / --version
            return int(exc.code or 0)
        if getattr(args, "_command", None) is None:
            parser.print_help(sys.stderr)
            print(f"{PROG}: error: a command is required (one of {', '.join(_SUBCOMMANDS)})", file=sys.stderr)
            return 2
        return int(args._command.run(args))
    except CLIError as exc:
        if debug:
            raise
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:  # training diverged (refnet.training.TrainingDiverged): a failed run
        if debug:
            raise
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, FileNotFoundError, ImportError, OSError) as exc:
        if debug:
            raise
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
