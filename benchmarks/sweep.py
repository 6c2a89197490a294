"""``python -m benchmarks.sweep [--quick] [--out FILE]``: a sweep on 2 Dask workers against the
same cells one after another in one process.

The grid is the issue's 16 small cells: ``mlp-3-tanh`` on mnist5k, init orthogonal|lecun, method
snip|random, sparsity 0.5|0.9, seed 0|1, 50 SGD steps. Timed in ``--repeat`` rounds, each round
running every variant once into fresh folders (nothing is resumed), so that a change in the
machine's load between rounds moves all of them; times are medians over the rounds, ratios the
median of the ratios within a round:

- ``serial``: ``run_sweep(workers=0)``, the cells in this process (BLAS pinned to one thread, as
  each worker is);
- ``dask, 2 workers, cold``: ``run_sweep(workers=2)``, the LocalCluster started and stopped
  inside (worker processes spawned, refnet imported and the data loaded in each);
- ``dask, 2 workers, warm``: the same cells on an already running 2-worker cluster
  (``client=``), as a sweep that follows another one on the same cluster;
- ``no-op cells``: 16 cells whose task body returns at once, on the warm cluster and serially:
  the per-cell cost of the machinery itself (submit, schedule, return the result, append the row).

It also checks that the Dask results equal the serial ones exactly (every column except the
timings, worker, host, pid, run id and start time).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

GRID = {"arch": "mlp-3-tanh", "data": "mnist5k", "init": ["orthogonal", "lecun"], "method": ["snip", "random"],
        "sparsity": [0.5, 0.9], "seed": [0, 1], "steps": 50}


def noop_cell(cell: dict) -> dict:
    """A task body that does no work: a complete row with status ok and nothing measured."""
    from refnet import sweep

    row = dict.fromkeys(sweep.COLUMNS)
    row.update(sweep.normalize_cell(cell), hash=sweep.cell_hash(cell), status="ok", worker="noop")
    return {"row": row, "spectra": {}, "history": None, "run": None}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(quick: bool = False, repeat: int | None = None) -> list[dict]:
    """Rows ``{"case", "impl", "seconds", ...}`` as the other suites (``seconds``: median wall
    time of a whole sweep), plus the ratios and the per-cell overhead in the ``dask`` rows."""
    with tempfile.TemporaryDirectory(prefix="refnet-bench-sweep-") as base:
        return _run(base, quick, repeat)


def _run(base: str, quick: bool, repeat: int | None) -> list[dict]:
    from distributed import Client, LocalCluster

    from refnet import sweep
    from refnet.data import load

    repeat = repeat or (1 if quick else 3)
    n_cells = len(sweep.expand_grid(GRID))
    load("mnist5k", "train")  # fill the data cache first, so no run pays for building it
    k = iter(range(10**6))

    def fresh() -> str:
        return os.path.join(base, f"run{next(k)}")

    def sweep_serial(grid=GRID, cell_fn=None):
        return sweep.run_sweep(grid, fresh(), workers=0, progress=False, figures=False, cell_fn=cell_fn)

    times = {"serial": [], "cold": [], "warm": [], "noop_serial": [], "noop_dask": []}
    frames = {}
    import dask

    with dask.config.set(sweep.WORKER_DASK_CONFIG):  # the LocalCluster run_sweep makes, kept running
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                               env=dict(sweep.WORKER_ENV))
    with cluster, Client(cluster) as client:
        sweep.run_sweep(GRID, fresh(), client=client, progress=False, figures=False)  # warm the workers up
        # every round times every variant, so that a change in the machine's load between rounds
        # moves all of them; the ratios are taken within a round
        for _ in range(repeat):
            times["serial"].append(_timed(lambda: frames.__setitem__("serial", sweep_serial())))
            times["cold"].append(_timed(lambda: frames.__setitem__("cold", sweep.run_sweep(
                GRID, fresh(), workers=2, progress=False, figures=False))))
            times["warm"].append(_timed(lambda: frames.__setitem__("warm", sweep.run_sweep(
                GRID, fresh(), client=client, progress=False, figures=False))))
            times["noop_dask"].append(_timed(lambda: sweep.run_sweep(
                GRID, fresh(), client=client, progress=False, figures=False, cell_fn=noop_cell)))
            times["noop_serial"].append(_timed(lambda: sweep_serial(cell_fn=noop_cell)))

    cols = [c for c in sweep.COLUMNS if c not in sweep.VOLATILE_COLUMNS]
    ser = frames["serial"][cols].sort_values("hash").reset_index(drop=True)
    differ = sorted({c for m in ("cold", "warm") for c in cols
                     if not frames[m][cols].sort_values("hash").reset_index(drop=True)[c].equals(ser[c])})
    equal = not differ
    med = {key: statistics.median(v) for key, v in times.items()}
    cell_seconds = float(frames["warm"]["wall_seconds"].sum())  # the cells' own work on the workers
    case = f"sweep of {n_cells} cells (mlp-3-tanh, mnist5k, 50 steps), median of {repeat}"
    rows = [
        {"case": case, "impl": "refnet", "seconds": med["serial"], "note": "serial, one process (workers=0)"},
        {"case": case, "impl": "dask, 2 workers, cold", "seconds": med["cold"]},
        {"case": case, "impl": "dask, 2 workers, warm", "seconds": med["warm"]},
        {"case": f"{n_cells} no-op cells (the machinery alone), median of {repeat}", "impl": "refnet",
         "seconds": med["noop_serial"], "per_cell": med["noop_serial"] / n_cells},
        {"case": f"{n_cells} no-op cells (the machinery alone), median of {repeat}", "impl": "dask, 2 workers, warm",
         "seconds": med["noop_dask"], "per_cell": med["noop_dask"] / n_cells},
    ]
    summary = {
        # medians over rounds of the ratio within each round
        "ratio_cold": statistics.median(c / t for c, t in zip(times["cold"], times["serial"])),
        "ratio_warm": statistics.median(w / t for w, t in zip(times["warm"], times["serial"])),
        "overhead_per_cell_noop_s": med["noop_dask"] / n_cells,
        # worker time not spent inside cells, per cell: 2 workers x wall time - the cells' work
        "overhead_per_cell_warm_s": (2 * med["warm"] - cell_seconds) / n_cells,
        "cell_seconds_workers": cell_seconds,
        "cell_seconds_serial": float(frames["serial"]["wall_seconds"].sum()),
        "worker_busy_fraction": cell_seconds / (2 * med["warm"]),
        # CPU time per cell (all threads of the process): equal work, whatever the contention
        "cpu_per_cell_serial_s": float(frames["serial"]["cpu_seconds"].mean()),
        "cpu_per_cell_worker_s": float(frames["warm"]["cpu_seconds"].mean()),
        "load_average": os.getloadavg(),
        "results_equal_serial": equal,
        "columns_that_differ": differ,
        "n_cells": n_cells,
        "times": times,
    }
    rows[1]["ratio"], rows[2]["ratio"] = summary["ratio_cold"], summary["ratio_warm"]
    rows.append({"case": "summary", "impl": "dask", "seconds": med["warm"], **summary})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one run instead of the median of --repeat")
    ap.add_argument("--repeat", type=int, default=None, help="runs per variant (default 3; --quick: 1)")
    ap.add_argument("--out", default=None, help="JSON file to write (default: none)")
    args = ap.parse_args(argv)
    from .common import blas_info, write_json

    info = blas_info()
    rows = run(quick=args.quick, repeat=args.repeat)
    s = rows[-1]
    print(f"machine: {info.get('cpu_count')} cores, {info.get('blas')}, python {info.get('python')}, numpy {info.get('numpy')}")
    for r in rows[:-1]:
        extra = f"  ratio {r['ratio']:.2f}" if "ratio" in r else (f"  {1e3 * r['per_cell']:.1f} ms/cell" if "per_cell" in r else "")
        print(f"{r['case']:<62} {r['impl']:<24} {r['seconds']:8.2f} s{extra}")
    print(f"ratio dask/serial (median over rounds of the ratio within a round): {s['ratio_cold']:.2f} (cluster "
          f"started inside), {s['ratio_warm']:.2f} (running cluster)")
    print("per round (serial, cold, warm): " + "; ".join(
        f"{a:.1f} s, {b:.1f} s, {c:.1f} s" for a, b, c in zip(s["times"]["serial"], s["times"]["cold"], s["times"]["warm"])))
    print(f"scheduler overhead per cell: {1e3 * s['overhead_per_cell_noop_s']:.1f} ms (no-op cells), "
          f"{1e3 * s['overhead_per_cell_warm_s']:.0f} ms (worker time outside the cells' own work, real cells; "
          f"workers busy {100 * s['worker_busy_fraction']:.0f}% of the time)")
    print(f"one cell, mean: {s['cell_seconds_workers'] / s['n_cells']:.2f} s on a worker, "
          f"{s['cell_seconds_serial'] / s['n_cells']:.2f} s in the serial process (wall); CPU time "
          f"{s['cpu_per_cell_worker_s']:.2f} s and {s['cpu_per_cell_serial_s']:.2f} s")
    print(f"load average at the end: {', '.join(f'{x:.2f}' for x in s['load_average'])} (other processes share the cores)")
    print(f"results equal the serial run exactly: {s['results_equal_serial']}"
          + ("" if s["results_equal_serial"] else f" (columns {', '.join(s['columns_that_differ'])})"))
    if args.out:
        write_json(args.out, {"environment": info, "results": rows})
        print(f"wrote {args.out}")
    return 0 if s["results_equal_serial"] else 1


if __name__ == "__main__":
    sys.exit(main())
