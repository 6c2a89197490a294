"""Tests for refnet.sweep and ``refnet sweep`` on a real 2-worker Dask LocalCluster.

Cells are tiny (the synthetic data set, a 3-layer width-16 MLP, 10 SGD steps), so the file runs
in well under a minute on 2 cores. Every test was seen failing once on a planted bug (noted per
test).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("distributed")
pytest.importorskip("pandas")

import refnet as rn
from refnet import sweep
from refnet.cli import sweep as sweep_cmd

# 8 cells: 2 methods x 2 sparsities x 2 seeds
GRID = {"arch": "mlp-3-tanh-w16", "data": "synthetic", "method": ["snip", "random"], "sparsity": [0.5, 0.9],
        "seed": [0, 1], "steps": 10, "eval_every": 5, "jsv_examples": 12, "score_examples": 50}
RESULT_COLUMNS = [c for c in sweep.COLUMNS if c not in sweep.VOLATILE_COLUMNS]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """One 2-worker LocalCluster (worker processes, one thread each) shared by the tests."""
    import cloudpickle
    import dask
    from distributed import Client, LocalCluster

    # the task bodies defined here travel by value (the workers need not import this file)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    env = dict(sweep.WORKER_ENV, REFNET_CACHE_DIR=str(tmp_path_factory.getbasetemp() / "refnet-cache"))
    with dask.config.set(sweep.WORKER_DASK_CONFIG):
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, env=env)
    c = Client(cluster)
    yield c
    c.close()
    cluster.close()
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


# task bodies for instrumentation (run on the workers)

def counting_cell(counter_dir, cell):
    """run_cell, leaving one file per execution in counter_dir."""
    import uuid

    Path(counter_dir).mkdir(exist_ok=True)
    (Path(counter_dir) / f"{sweep.cell_hash(cell)}.{uuid.uuid4().hex}").touch()
    return sweep.run_cell(cell)


def executions(counter_dir) -> list[str]:
    """The hashes of the executions recorded by counting_cell (one entry per execution)."""
    d = Path(counter_dir)
    return sorted(p.name.split(".")[0] for p in d.iterdir()) if d.is_dir() else []


def failing_cell(counter_dir, cell):
    """counting_cell that raises (outside run_cell's own handling) for seed 1."""
    if cell["seed"] == 1:
        raise RuntimeError("planted failure")
    return counting_cell(counter_dir, cell)


def dying_cell(marker_dir, cell):
    """counting_cell whose worker process dies on the first attempt of the cell snip/0.9/seed 1."""
    if (cell["method"], cell["sparsity"], cell["seed"]) == ("snip", 0.9, 1):
        marker = Path(marker_dir) / "died"
        if not marker.exists():
            marker.touch()
            os._exit(1)  # the worker process dies mid-task
    return counting_cell(Path(marker_dir) / "runs", cell)


def csv_rows(out) -> list[dict]:
    import csv

    with open(Path(out) / "results.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_expand_grid_and_cell_hash():
    # planted bugs seen failing: the hash over the settings as given instead of the normalised
    # ones (0.5 vs 1/2, "SNIP" vs "snip"); expand_grid not removing duplicate cells
    cells = sweep.expand_grid(GRID)
    assert len(cells) == 8 and all(set(c) == set(sweep.SETTINGS) for c in cells)
    assert [c["seed"] for c in cells[:2]] == [0, 1]  # the last setting varies fastest
    assert len({sweep.cell_hash(c) for c in cells}) == 8
    a = sweep.cell_hash({"method": "SNIP", "sparsity": 1 / 2, "seed": 0})
    assert a == sweep.cell_hash({"method": "snip", "sparsity": 0.5}) == sweep.cell_hash(dict(sweep.DEFAULTS, sparsity=0.5))
    assert len(a) == 16 and a != sweep.cell_hash({"sparsity": 0.5, "seed": 1})
    assert len(sweep.expand_grid({"seed": [0, 0, 1], "init": ["orthogonal", "Orthogonal"]})) == 2
    with pytest.raises(ValueError, match="unknown grid settings.*'sparsities'"):
        sweep.expand_grid({"sparsities": [0.5]})
    with pytest.raises(ValueError, match="'sparsity' must be < 1.0"):
        sweep.expand_grid({"sparsity": [0.5, 1.0]})
    with pytest.raises(ValueError, match="'method' must be one of"):
        sweep.expand_grid({"method": "magic"})
    with pytest.raises(ValueError, match="'seed' is an empty list"):
        sweep.expand_grid({"seed": []})


def test_sweep_on_a_local_cluster_writes_one_row_per_cell_and_resumes(tmp_path):
    # planted bugs seen failing: results.csv opened in "w" mode per row (the header lost); the
    # pruned network measured as stage "init"; LocalCluster workers started without WORKER_ENV;
    # and without WORKER_DASK_CONFIG
    out = tmp_path / "sweep"
    df = sweep.run_sweep(GRID, out, workers=2, progress=False)
    assert len(df) == 8 and (df["status"] == "ok").all(), df[["status", "error"]]
    assert sorted(df["hash"]) == sorted(sweep.cell_hash(c) for c in sweep.expand_grid(GRID))
    rows = csv_rows(out)
    assert len(rows) == 8 and list(rows[0]) == list(sweep.COLUMNS)
    assert all(r["worker"].startswith("tcp://") for r in rows)
    for col in ("test_error", "best_error", "final_loss", "jsv_init_cn", "jsv_pruned_cn"):
        assert df[col].notna().all()
    assert df["jsv_repaired_mean"].isna().all()  # repair=none
    assert np.allclose(df["sparsity_actual"], df["sparsity"], atol=1e-3)
    assert all(len(json.loads(s)) == 3 for s in df["layer_sparsity"])

    # per-cell folders, written by the client: provenance made on the worker, raw spectra
    h = df["hash"][0]
    run = json.loads((out / "cells" / h / "run.json").read_text())
    assert run["command"] == "sweep-cell" and run["args"]["seed"] == df["seed"][0] and run["status"] == "ok"
    assert run["extra"]["worker"] == df["worker"][0]
    assert run["threads"]["env"]["NUMBA_NUM_THREADS"] == "1" and run["threads"]["env"]["OPENBLAS_NUM_THREADS"] == "1"
    assert all(b["num_threads"] == 1 for b in run["blas"] if "num_threads" in b)
    assert run["environment"]["MALLOC_TRIM_THRESHOLD_"] is None  # Dask's default removed (WORKER_DASK_CONFIG)
    with np.load(out / "cells" / h / "spectra.npz", allow_pickle=False) as z:
        assert sorted(z.files) == sorted(f"{s}/{k}" for s in ("init", "pruned") for k in ("io", "layer1", "layer2", "layer3"))
        assert z["init/io"].shape == (12, 4) and z["pruned/layer1"].shape == (12, 16)
        assert z["pruned/io"].mean() == df["jsv_pruned_mean"][0]
    # the statistics are refnet.jsv_stats' on the first jsv_examples training rows
    X, y = rn.data.load("synthetic", "train")
    net = rn.build("mlp-3-tanh-w16", X.shape[1:], 4, init="orthogonal", seed=int(df["seed"][0]))
    assert rn.jsv_stats(net, X[:12])["cn"] == df["jsv_init_cn"][0]
    masks = rn.snip(net, X[:50], y[:50], sparsity=float(df["sparsity"][0])) if df["method"][0] == "snip" else None
    if masks is not None:
        assert rn.jsv_stats(net.with_masks(masks), X[:12])["mean"] == df["jsv_pruned_mean"][0]
    hist = json.loads((out / "cells" / h / "history.json").read_text())
    assert 1 - hist["test_acc"][-1] == df["test_error"][0]
    for name in ("summary.md", "sweep.json", "run.json", "results.parquet", "test_error.png", "jsv_pruned_cn.png"):
        assert (out / name).is_file(), name
    assert "| method | sparsity | n | test_error" in (out / "summary.md").read_text()
    import pandas as pd

    pq = pd.read_parquet(out / "results.parquet")
    assert pq.sort_values("hash").reset_index(drop=True)[RESULT_COLUMNS].equals(
        sweep.load_results(out).sort_values("hash").reset_index(drop=True)[RESULT_COLUMNS])

    # a rerun computes nothing (no task executes) and leaves the table as it was
    before = (out / "results.csv").read_bytes()
    counter = tmp_path / "count"
    df2 = sweep.run_sweep(GRID, out, workers=2, progress=False, cell_fn=functools.partial(counting_cell, str(counter)))
    assert executions(counter) == []
    assert (out / "results.csv").read_bytes() == before
    assert list(df2["run_id"]) == list(df["run_id"])
    assert len(json.loads((out / "sweep.json").read_text())["runs"]) == 2


def test_failed_cells_are_recorded_and_the_others_finish(tmp_path, client):
    # planted bugs seen failing: a task exception propagated out of run_sweep (the sweep stops);
    # the resume check counting error rows as done (nothing rerun); every earlier row kept on
    # resume (the rerun's results of the failed cells then never written)
    out, counter = tmp_path / "sweep", tmp_path / "count"
    # batch size 5000 > the 1000 synthetic training rows: train raises ValueError in those cells
    grid = dict(GRID, method="snip", sparsity=0.5, batch_size=[100, 5000])
    df = sweep.run_sweep(grid, out, client=client, progress=False, cell_fn=functools.partial(failing_cell, str(counter)))
    assert len(df) == 4
    st = {(r.batch_size, r.seed): (r.status, r.error) for r in df.itertuples()}
    assert st[(100, 0)][0] == "ok" and pd_isna(st[(100, 0)][1])
    assert st[(5000, 0)][0] == "error" and "batch_size" in st[(5000, 0)][1]
    assert st[(100, 1)] == ("error", "RuntimeError: planted failure") == st[(5000, 1)]
    err = df[df["batch_size"] == 5000].iloc[0]
    assert pd_notna(err["jsv_pruned_cn"])  # what was measured before the failure is kept
    run = json.loads((out / "cells" / err["hash"] / "run.json").read_text())
    assert run["status"] == "error" and "Traceback" in run["extra"]["traceback"]
    assert "Failed cells" in (out / "summary.md").read_text()

    # a rerun retries the failed cells only, and leaves one row per cell
    df2 = sweep.run_sweep(grid, out, client=client, progress=False, cell_fn=functools.partial(counting_cell, str(counter)))
    (ok_first,) = [r.hash for r in df.itertuples() if r.status == "ok"]
    runs = executions(counter)
    assert len(runs) == 2 + 3  # first run: the two seed-0 cells; rerun: the three failed ones
    assert runs.count(ok_first) == 1 and sorted(set(runs)) == sorted(df["hash"])
    rows = csv_rows(out)
    assert len(rows) == 4 and len({r["hash"] for r in rows}) == 4
    assert dict(zip(df2["batch_size"], df2["status"])) == {100: "ok", 5000: "error"}


def pd_notna(x) -> bool:
    import pandas as pd

    return bool(pd.notna(x))


def pd_isna(x) -> bool:
    return not pd_notna(x)


def test_a_worker_killed_mid_sweep_loses_no_cell_and_duplicates_none(tmp_path, client):
    # planted bug seen failing: a scheduler that reruns no task of a dead worker (the fixture's
    # cluster made with distributed.scheduler.allowed-failures = 0): the dying cell and the one
    # queued behind it on that worker became KilledWorker error rows. (The client's own
    # one-row-per-hash rule is tested below, where a result can be handed over twice.)
    out, marker = tmp_path / "sweep", tmp_path / "marker"
    marker.mkdir()
    df = sweep.run_sweep(GRID, out, client=client, progress=False, cell_fn=functools.partial(dying_cell, str(marker)))
    assert (marker / "died").exists()  # a worker did die
    rows = csv_rows(out)
    assert len(rows) == 8 and len({r["hash"] for r in rows}) == 8
    assert (df["status"] == "ok").all()
    runs = executions(marker / "runs")
    assert sorted(set(runs)) == sorted(df["hash"])  # every cell ran to the end once at least
    client.wait_for_workers(2, timeout=60)  # the nanny restarted the dead worker


def test_the_client_writes_each_cell_once(tmp_path):
    # planted bug seen failing: the writer without its hash check (a result handed over twice
    # written twice)
    (tmp_path / "results.csv").write_text(",".join(sweep.COLUMNS) + "\n")
    cell = sweep.expand_grid(dict(GRID, seed=0, method="random", sparsity=0.5))[0]
    result = sweep.run_cell(cell)
    write = sweep._Writer(tmp_path, set())
    assert write(cell, result) is True and write(cell, result) is False
    assert len(csv_rows(tmp_path)) == 1 and write.n_new == 1
    # a result that is not the cell's is recorded as an error of the cell, not written as it is
    other = sweep.expand_grid(dict(GRID, seed=1, method="random", sparsity=0.5))[0]
    assert write(other, result) is True
    rows = csv_rows(tmp_path)
    assert rows[1]["hash"] == sweep.cell_hash(other) and rows[1]["status"] == "error" and "row of hash" in rows[1]["error"]


def test_dask_results_equal_the_serial_run_exactly(tmp_path, client):
    # planted bug seen failing: the in-process path seeding the batch order with seed + 1
    grid = dict(GRID, repair=["none", "ai"], ai_steps=30, sparsity=0.9)
    par = sweep.run_sweep(grid, tmp_path / "dask", client=client, progress=False, figures=False)
    ser = sweep.run_sweep(grid, tmp_path / "serial", workers=0, progress=False, figures=False)
    assert len(par) == len(ser) == 8 and (par["status"] == "ok").all()
    assert set(ser["worker"]) == {"local"} and not set(par["worker"]) & {"local"}
    pd_testing = pytest.importorskip("pandas.testing")
    pd_testing.assert_frame_equal(par[RESULT_COLUMNS], ser[RESULT_COLUMNS], check_exact=True)
    assert par["jsv_repaired_cn"].notna().sum() == 4
    for h in ser["hash"]:
        with np.load(tmp_path / "dask" / "cells" / h / "spectra.npz") as a, np.load(tmp_path / "serial" / "cells" / h / "spectra.npz") as b:
            assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files)
        ha = json.loads((tmp_path / "dask" / "cells" / h / "history.json").read_text())
        hb = json.loads((tmp_path / "serial" / "cells" / h / "history.json").read_text())
        assert ha["test_acc"] == hb["test_acc"] and ha["train_loss"] == hb["train_loss"]


def test_resume_drops_a_torn_last_line_and_refuses_other_folders(tmp_path):
    # planted bugs seen failing: a torn last line padded and kept (its cell never recomputed);
    # prepare_out's resume marker test inverted (an earlier sweep's folder refused)
    out, counter = tmp_path / "sweep", tmp_path / "count"
    grid = dict(GRID, method="random", sparsity=0.5)
    sweep.run_sweep(grid, out, workers=0, progress=False, figures=False)
    text = (out / "results.csv").read_text()
    (out / "results.csv").write_text(text[: len(text) - 40])  # the last row cut mid-line
    df = sweep.run_sweep(grid, out, workers=0, progress=False, figures=False, cell_fn=functools.partial(counting_cell, str(counter)))
    assert len(executions(counter)) == 1 and len(df) == 2 and (df["status"] == "ok").all()
    assert len(csv_rows(out)) == 2

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"other.*--overwrite"):
        sweep.run_sweep(grid, other, workers=0, progress=False)
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]


def test_a_diverged_cell_is_a_result_and_is_not_rerun(tmp_path):
    # planted bugs seen failing: "diverged" left out of the statuses a rerun skips; the
    # FloatingPointError of train recorded as status "error"
    out, counter = tmp_path / "sweep", tmp_path / "count"
    grid = dict(GRID, method="random", sparsity=0.5, seed=0, lr=[0.1, 1e200])
    df = sweep.run_sweep(grid, out, workers=0, progress=False, figures=False)
    assert list(df["status"]) == ["ok", "diverged"]
    div = df.iloc[1]
    assert div["error"].startswith("FloatingPointError: training diverged") and pd_isna(div["test_error"])
    assert pd_notna(div["jsv_pruned_cn"])
    sweep.run_sweep(grid, out, workers=0, progress=False, figures=False, cell_fn=functools.partial(counting_cell, str(counter)))
    assert executions(counter) == []
    assert "1 diverged" in (out / "summary.md").read_text()


def _parse(argv):
    p = argparse.ArgumentParser()
    sweep_cmd.add_arguments(p)
    return p.parse_args(argv)


def test_cli_sweep_comma_lists_config_and_resume(tmp_path, capsys):
    # planted bugs seen failing: --config values overriding the command line; a comma list
    # parsed as one string; the exit status 0 with failed cells
    cfg = tmp_path / "sweep.toml"
    cfg.write_text('arch = "mlp-3-tanh-w16"\ndata = "synthetic"\nsparsity = [0.3, 0.6, 0.9]\nseed = 5\n'
                   "jsv-examples = 8\nsteps = 6\n")
    out = tmp_path / "out"
    args = _parse(["--config", str(cfg), "--sparsity", "0.5,0.9", "--method", "snip,random", "--workers", "0",
                   "--out", str(out), "--quiet", "--no-figures"])
    assert args.sparsity == [0.5, 0.9] and args.method == ["snip", "random"]
    grid = sweep_cmd.grid_from_args(args)
    assert grid["sparsity"] == [0.5, 0.9] and grid["seed"] == 5 and grid["jsv_examples"] == 8
    assert sweep_cmd.run(args) == 0
    assert "4 cells: 4 ok, 0 diverged, 0 failed" in capsys.readouterr().out
    df = sweep.load_results(out)
    assert sorted(zip(df["method"], df["sparsity"])) == [("random", 0.5), ("random", 0.9), ("snip", 0.5), ("snip", 0.9)]
    assert set(df["seed"]) == {5}
    run = json.loads((out / "run.json").read_text())
    assert run["command"] == "sweep" and run["args"]["grid"]["sparsity"] == [0.5, 0.9] and run["seeds"] == {"seed": [5]}
    before = (out / "results.csv").read_bytes()
    assert sweep_cmd.run(args) == 0  # resumes: nothing to do
    assert (out / "results.csv").read_bytes() == before
    # a failed cell gives exit status 1
    bad = _parse(["--config", str(cfg), "--batch-size", "5000", "--workers", "0", "--out", str(tmp_path / "bad"), "--quiet", "--no-figures"])
    assert sweep_cmd.run(bad) == 1
    with pytest.raises(SystemExit):
        _parse(["--sparsity", "0.5,,0.9"])
    bad_cfg = tmp_path / "bad.toml"
    bad_cfg.write_text("sparsities = [0.5]\n")
    with pytest.raises(ValueError, match="unknown setting 'sparsities'"):
        sweep_cmd.grid_from_args(_parse(["--config", str(bad_cfg)]))
