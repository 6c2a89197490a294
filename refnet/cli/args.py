"""Argument types for the command-line parsers (``refnet`` and its ``audit`` command): argparse
reports their errors as "argument --NAME: must be ..."."""

from __future__ import annotations

import argparse

__all__ = ["int_at_least", "float_in"]


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
