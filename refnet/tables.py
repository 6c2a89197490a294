"""Tidy tables: one row per record, one column per setting or measurement.

Every table refnet writes as JSON (training histories, audit reports, sweep results) is also
offered as rows of plain values, as a CSV file beside the JSON, and as a :class:`pandas.DataFrame`.
pandas is an optional extra (``pip install "refnet[sweep]"`` or ``pandas``): only
:func:`to_dataframe` needs it.
"""

from __future__ import annotations

import csv
import io
import math

from ._io import atomic_write_text

__all__ = ["to_dataframe", "write_csv"]


def _cell(v):
    """A CSV/DataFrame cell: plain numbers and strings as they are, None and NaN as empty."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, (list, tuple, dict)):
        import json

        return json.dumps(v)
    return v


def _columns(rows: list[dict], columns=None) -> list[str]:
    if columns is not None:
        return list(columns)
    out = []
    for r in rows:
        for k in r:
            if k not in out:
                out.append(k)
    return out


def write_csv(path, rows: list[dict], columns=None) -> str:
    """Write ``rows`` (dicts of plain values) to ``path`` as CSV, atomically; the columns are
    ``columns`` or the union of the rows' keys in first-seen order. Returns the path."""
    cols = _columns(rows, columns)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow(["" if (c := _cell(r.get(k))) is None else c for k in cols])
    atomic_write_text(path, buf.getvalue())
    return str(path)


def to_dataframe(rows: list[dict], columns=None):
    """``rows`` as a :class:`pandas.DataFrame` (one row per dict); ImportError naming the extra
    when pandas is not installed."""
    try:
        import pandas as pd
    except ImportError:
        raise ImportError("to_dataframe needs pandas: pip install pandas (or refnet[sweep])") from None
    cols = _columns(rows, columns)
    return pd.DataFrame([[_cell(r.get(k)) for k in cols] for r in rows], columns=cols)
