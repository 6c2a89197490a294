"""Deprecated: the ``refnet prune`` command lives in :mod:`refnet.cli.prune`.

The old names (``add_arguments``, ``run``, ``METHODS``) still work: they warn
(``DeprecationWarning``) and forward there.
"""

from __future__ import annotations

from ._compat import moved_names

__all__: list[str] = []

__getattr__ = moved_names(__name__, {"add_arguments": "refnet.cli.prune", "run": "refnet.cli.prune", "METHODS": "refnet.cli.prune"})
