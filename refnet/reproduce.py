"""Deprecated: the ``refnet reproduce`` command lives in :mod:`refnet.cli.reproduce`.

The old names (``add_arguments``, ``run``, ``write_summary``) still work: they warn
(``DeprecationWarning``) and forward there.
"""

from __future__ import annotations

__all__: list[str] = []

_MOVED = ("add_arguments", "run", "write_summary")


def __getattr__(name: str):
    if name in _MOVED:
        import warnings

        from .cli import reproduce

        warnings.warn(f"refnet.reproduce.{name} is deprecated; use refnet.cli.reproduce.{name}", DeprecationWarning, stacklevel=2)
        return getattr(reproduce, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
