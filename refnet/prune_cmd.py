"""Deprecated: the ``refnet prune`` command lives in :mod:`refnet.cli.prune`.

The old names (``add_arguments``, ``run``, ``METHODS``) still work: they warn
(``DeprecationWarning``) and forward there.
"""

from __future__ import annotations

__all__: list[str] = []

_MOVED = ("add_arguments", "run", "METHODS")


def __getattr__(name: str):
    if name in _MOVED:
        import warnings

        from .cli import prune

        warnings.warn(f"refnet.prune_cmd.{name} is deprecated; use refnet.cli.prune.{name}", DeprecationWarning, stacklevel=2)
        return getattr(prune, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
