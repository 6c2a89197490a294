"""Deprecation aliases: one module ``__getattr__`` for every name that moved to another module.

>>> __getattr__ = moved_names(__name__, {"run_spectrum": "refnet.cli.spectrum:run"})

Each old name warns (``DeprecationWarning``: ``OLD.NAME is deprecated; use NEW.NEW_NAME``) and
returns the object it forwards to; the new module is imported only then, so the aliases cost
nothing at import time and may point at a module that imports the old one.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Callable

__all__ = ["moved_names"]


def moved_names(old_module: str, moved: dict[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` forwarding the names of ``moved`` (``name -> "new.module:new_name"``,
    or ``"new.module"`` when the name is the same) with a ``DeprecationWarning``."""
    targets = {}
    for name, target in moved.items():
        module, _, new_name = target.partition(":")
        targets[name] = (module, new_name or name)

    def __getattr__(name: str):
        if name not in targets:
            raise AttributeError(f"module {old_module!r} has no attribute {name!r}")
        module, new_name = targets[name]
        warnings.warn(f"{old_module}.{name} is deprecated; use {module}.{new_name}", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(module), new_name)

    return __getattr__
