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


def test_history_rows_csv_dataframe_and_the_train_command(tmp_path):
    # one row per evaluation, equal to the history's lists; `refnet train` writes history.csv
    # beside history.json (planted bug seen failing: the rows shifted by one evaluation)
    from refnet.cli import main

    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((60, 5)), rng.integers(0, 3, 60)
    net = rn.mlp([5, 6, 3], activation="tanh", seed=0)
    h = rn.train(net, X, y, steps=20, batch_size=10, X_test=X[:20], y_test=y[:20], eval_every=5, progress=False)
    rows = h.to_rows()
    assert [r["step"] for r in rows] == h.steps and [r["test_acc"] for r in rows] == h.test_acc
    assert [r["train_loss"] for r in rows] == h.train_loss
    h.save_csv(tmp_path / "h.csv")
    with open(tmp_path / "h.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [int(r["step"]) for r in table] == h.steps
    assert [float(r["test_acc"]) for r in table] == h.test_acc  # repr round trip of float64
    out = tmp_path / "run"
    assert main(["train", "--data", "digits", "--arch", "mlp-2-tanh", "--steps", "10", "--eval-every", "5",
                 "--quiet", "--out", str(out)]) == 0
    hist = rn.training.History.load_json(out / "history.json")
    with open(out / "history.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == hist.steps
    pytest.importorskip("pandas")
    df = h.to_dataframe()
    assert df["step"].tolist() == h.steps and df["test_acc"].tolist() == h.test_acc
