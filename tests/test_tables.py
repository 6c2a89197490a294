"""Tidy tables: CSV beside JSON and pandas DataFrames with one row per record."""

import csv

import numpy as np
import pytest

import refnet as rn
from refnet import tables


def test_write_csv_and_dataframe_agree_with_the_rows(tmp_path):
    rows = [{"a": 1, "b": 0.5, "c": "x"}, {"a": 2, "d": [1, 2], "b": float("nan")}, {"c": None}]
    path = tables.write_csv(tmp_path / "t.csv", rows)
    with open(path, newline="") as f:
        got = list(csv.reader(f))
    assert got == [["a", "b", "c", "d"], ["1", "0.5", "x", ""], ["2", "", "", "[1, 2]"], ["", "", "", ""]]
    pd = pytest.importorskip("pandas")
    df = tables.to_dataframe(rows)
    assert list(df.columns) == ["a", "b", "c", "d"] and len(df) == 3
    assert df["a"].iloc[1] == 2 and pd.isna(df["b"].iloc[1]) and df["d"].iloc[1] == "[1, 2]"
    assert not list(tmp_path.glob(".*"))  # the atomic write left no temporary file


def test_audit_report_rows_csv_and_dataframe(tmp_path):
    pytest.importorskip("torch")
    from refnet import audit

    rng = np.random.default_rng(0)
    net = rn.mlp([6, 5, 3], activation="tanh", seed=0)
    x, y = rng.standard_normal((4, 6)), rng.integers(0, 3, 4)
    rep = audit.compare_torch(audit.to_torch(net), x, y, jacobian=False)
    rows = rep.to_rows()
    assert len(rows) == len(rep.checks) and all(r["framework"] == rep.framework for r in rows)
    assert [r["name"] for r in rows] == [c.name for c in rep.checks]
    rep.save(tmp_path)
    with open(tmp_path / "report.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["name"] for r in table] == [c.name for c in rep.checks]
    assert [r["passed"] for r in table] == [str(c.passed) for c in rep.checks]
    pytest.importorskip("pandas")
    df = rep.to_dataframe()
    assert len(df) == len(rep.checks) and df["passed"].tolist() == [c.passed for c in rep.checks]
