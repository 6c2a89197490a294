"""Deprecated: the ``refnet reproduce`` command lives in :mod:`refnet.cli.reproduce`.

The old names (``add_arguments``, ``run``, ``write_summary``) still work: they warn
(``DeprecationWarning``) and forward there.
"""

from __future__ import annotations

from ._compat import moved_names

__all__: list[str] = []

__getattr__ = moved_names(__name__, {"add_arguments": "refnet.cli.reproduce", "run": "refnet.cli.reproduce", "write_summary": "refnet.cli.reproduce"})
