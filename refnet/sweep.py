r"""Sweeps: the pruning-at-initialization pipeline over a grid of settings, on Dask distributed.

The papers' claims are statements over grids (seeds x sparsities x inits x methods). A sweep
runs one **cell** per point of the grid; a cell is the pipeline of ``refnet prune``:

1. ``net = build(arch, init, seed)``; JSV statistics of ``J^{0,K}`` on the first
   ``jsv_examples`` training rows (:func:`refnet.jsv_stats`'s numbers, from the same
   singular values that are saved);
2. prune at initialization (``method``, ``sparsity``, ``scope``); JSV again;
3. optional repair, ``repair="ai"``: approximate isometry of the pruned weights; JSV again;
4. train with mini-batch SGD (``steps``, ``lr``, ``batch_size``, ``momentum``,
   ``weight_decay``, batch order from ``seed``) and evaluate on the test split.

The same ``seed`` seeds the init, the random scores and the batch order, exactly as
``refnet prune --seed``.

Cells run as tasks on Dask distributed (``pip install refnet[sweep]``): a ``LocalCluster`` of
``workers`` single-threaded worker processes by default (BLAS, OpenMP and Numba limited to one
thread each in the workers' environment), or the workers of an existing cluster (``scheduler=
"tcp://host:port"``); both go through one ``distributed.Client``. ``workers=0`` runs the cells
one after another in this process instead (the reference the parallel results equal exactly).

Output folder ``out``:

``results.csv``
    One tidy row per cell (columns :data:`COLUMNS`: the settings, ``hash``, ``status``, the
    metrics), appended by this (the client) process as each cell finishes, so an interrupted
    sweep keeps what it finished. ``results.parquet`` is the same table, written at the end when
    pyarrow is installed. Load either with :func:`load_results`.
``cells/<hash>/``
    Per cell: ``run.json`` (provenance, made on the worker that ran it: versions, BLAS, threads,
    host; plus the JSV statistics with the layerwise keys, the pruning and repair reports and,
    for a failed cell, the traceback), ``spectra.npz`` (the raw singular values: ``<stage>/io``,
    shape (n_examples, r), and ``<stage>/layer<l>`` for every layer ``l``, for the stages
    ``init``, ``pruned`` and ``repaired``) and ``history.json`` (the training history).
``summary.md``, ``<metric>.png``
    Mean ± std over seeds of every setting, and one figure per metric against sparsity (one line
    per method and other varying settings; mean with the spread over seeds).
``sweep.json``, ``run.json``
    The sweep's format and invocations, and the provenance of the latest invocation.

Resuming: a cell is named by :func:`cell_hash` of its settings. Running a sweep again into the
same folder skips every cell whose hash already has a row with status ``ok`` or ``diverged``
(training diverged: a result, not a failure) and reruns the rest; a cell that fails (status
``error``, with the message) does not stop the others. A worker that dies has its cells rerun
elsewhere by Dask; the client writes each hash once.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import math
import os
import sys
import time
import traceback
import uuid
import warnings
from pathlib import Path
from typing import Callable

from ._io import atomic_savefig, atomic_savez, atomic_write, atomic_write_json, atomic_write_text, jsonable
from .progress import Progress, get_logger
from .provenance import finish_record, prepare_out, run_record, write_run_json
from .pruning import METHODS

__all__ = [
    "SETTINGS",
    "DEFAULTS",
    "REPAIRS",
    "SCOPES",
    "COLUMNS",
    "METRICS",
    "VOLATILE_COLUMNS",
    "expand_grid",
    "normalize_cell",
    "cell_hash",
    "run_cell",
    "run_sweep",
    "load_results",
    "summarize_results",
]

log = get_logger("sweep")

#: settings of a cell: name -> (type, default, what it is); the order is the column order
SETTINGS: dict[str, tuple] = {
    "arch": (str, "mlp-7-tanh", "architecture spec, e.g. mlp-3-tanh (refnet.arch.ARCH_HELP)"),
    "data": (str, "mnist5k", "dataset name (refnet.data.DATASETS)"),
    "init": (str, "orthogonal", "initialization name or alias"),
    "method": (str, "snip", "pruning method (refnet.pruning.METHODS)"),
    "sparsity": (float, 0.9, "fraction of weights removed, in [0, 1)"),
    "scope": (str, "global", "global or layer top-k"),
    "repair": (str, "none", "none, or ai (approximate isometry of the pruned weights)"),
    "seed": (int, 0, "seed of the init, the random scores and the batch order"),
    "steps": (int, 2000, "SGD steps after pruning (0: no training)"),
    "lr": (float, 0.1, "learning rate"),
    "batch_size": (int, 100, "mini-batch size"),
    "momentum": (float, 0.0, "heavy-ball momentum, in [0, 1)"),
    "weight_decay": (float, 0.00025, "coefficient of sum ||mask*W||^2"),
    "eval_every": (int, None, "steps between test evaluations (None: about 20 over the run)"),
    "score_examples": (int, 100, "training rows scored by the data-dependent methods"),
    "jsv_examples": (int, 100, "training rows of the JSV statistics (the first ones)"),
    "ai_steps": (int, 10_000, "approximate-isometry steps (repair=ai)"),
    "ai_lr": (float, 0.1, "approximate-isometry step size (repair=ai)"),
}
#: default of every setting
DEFAULTS = {k: v[1] for k, v in SETTINGS.items()}

#: top-k scopes of the pruning (``refnet.prune``'s ``scope``)
SCOPES = ("global", "layer")
#: repairs after pruning. (OrthP is not one: it needs structurally pruned, dense matrices.)
REPAIRS = ("none", "ai")

#: the JSV stages and statistics that get a column each (``jsv_<stage>_<stat>``)
JSV_STAGES = ("init", "pruned", "repaired")
JSV_STATS = ("mean", "std", "min", "max", "cn", "cn_mean")

#: metric columns, in order
METRICS = (
    "test_error", "best_error", "best_step", "final_loss", "steps_done",
    *(f"jsv_{stage}_{s}" for stage in JSV_STAGES for s in JSV_STATS),
    "sparsity_actual", "layer_sparsity", "ai_objective", "ai_stopped", "ai_steps_done", "warnings",
)
#: columns that describe one execution rather than the result (they differ between two runs)
VOLATILE_COLUMNS = ("prune_seconds", "repair_seconds", "train_seconds", "wall_seconds", "cpu_seconds", "worker", "host", "pid",
                    "run_id", "started")
#: every column of results.csv, in order
COLUMNS = ("hash", *SETTINGS, "status", "error", *METRICS, *VOLATILE_COLUMNS)
#: statuses of a finished cell that a rerun does not recompute
DONE_STATUSES = ("ok", "diverged")

SWEEP_JSON, RESULTS_CSV, RESULTS_PARQUET, SUMMARY_MD = "sweep.json", "results.csv", "results.parquet", "summary.md"
SWEEP_FORMAT, SWEEP_VERSION = "refnet.sweep", 1
#: part of every cell hash: bump when a cell's computation changes meaning
CELL_VERSION = 1
#: thread settings of every worker process
WORKER_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
#: Dask settings of the LocalCluster: no MALLOC_TRIM_THRESHOLD_ in the workers' environment
#: (Dask sets 65536 by default; glibc then also stops raising its mmap threshold, so every
#: array over 128 KiB is a fresh mmap that page-faults: measured 2.6 s instead of 1.2 s for an
#: mlp-3-tanh cell on mnist5k, training 4x slower). Workers of a cluster of your own: docs/sweeps.md.
WORKER_DASK_CONFIG = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}
_EXTRA_HINT = "install the sweep extras with `pip install refnet[sweep]` (dask[distributed] and pandas)"


# ============================================================================================
# the grid
# ============================================================================================


def _check_setting(key: str, value):
    """``value`` of setting ``key`` checked and in its canonical form (the hash depends on it)."""
    from ._checks import check_choice, check_float, check_int

    name = f"setting {key!r}"
    if key == "eval_every" and value is None:
        return None
    kind = SETTINGS[key][0]
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        lo = {"seed": 0, "steps": 0}.get(key, 1)
        return check_int(value, name, min_value=lo)
    if kind is float:
        kw = {
            "sparsity": dict(min_value=0.0, max_value=1.0, max_inclusive=False),
            "momentum": dict(min_value=0.0, max_value=1.0, max_inclusive=False),
            "weight_decay": dict(min_value=0.0),
        }.get(key, dict(min_value=0.0, min_inclusive=False))
        return check_float(value, name, **kw)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__} {value!r}")
    if key == "arch":
        from .arch import parse_arch

        parse_arch(value)
        return value.strip().lower()
    if key == "data":
        from .data import DATASETS

        k = value.strip().lower().replace("_", "-")
        if k not in DATASETS:
            raise ValueError(f"{name} must be one of {list(DATASETS)}, got {value!r}")
        return k
    if key == "init":
        from .init import INIT_NAMES

        return check_choice(value.strip(), name, [*INIT_NAMES, "vs-l", "vs-g", "vs-h", "ldi"])
    if key == "method":
        return check_choice(value.strip(), name, METHODS)
    if key == "scope":
        return check_choice(value.strip(), name, SCOPES)
    if key == "repair":
        return check_choice(value.strip(), name, REPAIRS)
    raise AssertionError(key)  # pragma: no cover


def normalize_cell(cell: dict) -> dict:
    """A complete cell: every setting of :data:`SETTINGS`, defaults filled in, values checked and
    canonical (``0.5`` and ``1/2`` the same, names lower case). Unknown keys are an error."""
    if not isinstance(cell, dict):
        raise TypeError(f"cell must be a dict of settings, got {type(cell).__name__}")
    unknown = [k for k in cell if k not in SETTINGS]
    if unknown:
        raise ValueError(f"unknown settings {unknown}; known: {', '.join(SETTINGS)}")
    return {k: _check_setting(k, cell.get(k, DEFAULTS[k])) for k in SETTINGS}


def cell_hash(cell: dict) -> str:
    """The 16-hex-digit name of a cell: SHA-256 of its canonical settings (:func:`normalize_cell`,
    as sorted JSON) and :data:`CELL_VERSION`. Equal settings give equal hashes on every machine."""
    c = normalize_cell(cell)
    text = json.dumps({"cell_version": CELL_VERSION, **c}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def expand_grid(grid: dict) -> list[dict]:
    """The cells of a grid: the Cartesian product of its values, in :data:`SETTINGS` order.

    Parameters
    ----------
    grid : dict
        Setting name -> a value or a list/tuple of values; settings not named take their
        :data:`DEFAULTS`. E.g. ``{"init": ["orthogonal", "lecun"], "sparsity": [0.5, 0.9],
        "seed": [0, 1], "steps": 50}`` has 8 cells.

    Returns
    -------
    list of dict
        Complete, canonical cells (:func:`normalize_cell`), the last setting varying fastest;
        cells equal after normalisation appear once.

    Raises
    ------
    ValueError, TypeError
        An unknown setting, an empty list, or a bad value (the message names the setting).
    """
    if not isinstance(grid, dict):
        raise TypeError(f"grid must be a dict of setting -> value(s), got {type(grid).__name__}")
    unknown = [k for k in grid if k not in SETTINGS]
    if unknown:
        raise ValueError(f"unknown grid settings {unknown}; known: {', '.join(SETTINGS)}")
    axes = []
    for key in SETTINGS:
        vals = grid.get(key, DEFAULTS[key])
        vals = list(vals) if isinstance(vals, (list, tuple)) else [vals]
        if not vals:
            raise ValueError(f"grid setting {key!r} is an empty list")
        axes.append([_check_setting(key, v) for v in vals])
    cells, seen = [], set()
    for combo in itertools.product(*axes):
        cell = dict(zip(SETTINGS, combo))
        h = cell_hash(cell)
        if h not in seen:
            seen.add(h)
            cells.append(cell)
    return cells


# ============================================================================================
# one cell (the task body; runs on a worker)
# ============================================================================================


def _worker_name() -> str:
    """The Dask worker's address when running in one, else ``"local"``."""
    if "distributed" in sys.modules:
        try:
            from distributed import get_worker

            return get_worker().address
        except Exception:  # not inside a task
            pass
    return "local"


def _measure(stage: str, net, x, row: dict, spectra: dict, stats: dict) -> None:
    """JSV of ``net`` on ``x``: the row's ``jsv_<stage>_*`` columns, the raw singular values in
    ``spectra`` and the full :func:`refnet.spectrum.summarize` dict in ``stats``."""
    from .spectrum import collect_singular_values, summarize

    sv, layer_sv = collect_singular_values(net, x, layerwise=True)  # (n, r), [(n, r_l)]
    s = summarize(sv, layer_sv)
    for k in JSV_STATS:
        row[f"jsv_{stage}_{k}"] = s[k]
    spectra[f"{stage}/io"] = sv
    for l, v in zip(s["layers"], layer_sv):
        spectra[f"{stage}/layer{l}"] = v
    stats[stage] = s


def _pipeline(cell: dict, row: dict, spectra: dict, info: dict):
    """The cell's work; fills ``row``, ``spectra`` and ``info``; returns the History (or None)."""
    import numpy as np

    from . import data
    from .arch import build, parse_arch
    from .isometry import approximate_isometry
    from .pruning import masks_for, pruning_report
    from .training import train

    spec = parse_arch(cell["arch"])
    X, y = data.load(cell["data"], split="train", flatten=spec.flat_input)
    Xt, yt = data.load(cell["data"], split="test", flatten=spec.flat_input)
    net = build(cell["arch"], X.shape[1:], data.DATASETS[cell["data"]].n_classes, init=cell["init"], seed=cell["seed"])
    xj = X[: cell["jsv_examples"]]  # (n_jsv, *in_shape): a fixed subset of the training rows
    stats = info.setdefault("jsv", {})
    _measure("init", net, xj, row, spectra, stats)

    t = time.perf_counter()
    n = cell["score_examples"]  # the data-dependent methods score the first n training rows
    masks = masks_for(cell["method"], net, cell["sparsity"], x=X[:n], y=y[:n], seed=cell["seed"], scope=cell["scope"])
    pruned = net.with_masks(masks)
    row["prune_seconds"] = time.perf_counter() - t
    report = pruning_report(pruned)
    info["pruning"] = report
    kept, total = sum(r["kept"] for r in report), sum(r["total"] for r in report)
    row["sparsity_actual"] = 1.0 - kept / total
    row["layer_sparsity"] = json.dumps([r["sparsity"] for r in report])
    _measure("pruned", pruned, xj, row, spectra, stats)

    if cell["repair"] == "ai":
        t = time.perf_counter()
        pruned, ai = approximate_isometry(pruned, steps=cell["ai_steps"], lr=cell["ai_lr"], return_report=True)
        row["repair_seconds"] = time.perf_counter() - t
        row.update(ai_objective=ai["objective_after"], ai_stopped=ai["stopped"], ai_steps_done=ai["steps"])
        info["repair"] = ai
        _measure("repaired", pruned, xj, row, spectra, stats)

    if cell["steps"] == 0:
        return None
    t = time.perf_counter()
    try:
        hist = train(pruned, X, y, steps=cell["steps"], lr=cell["lr"], batch_size=cell["batch_size"],
                     momentum=cell["momentum"], weight_decay=cell["weight_decay"], seed=cell["seed"],
                     X_test=Xt, y_test=yt, eval_every=cell["eval_every"], progress=False,
                     meta={"sweep_cell": row["hash"]})
    except FloatingPointError as exc:  # diverged: a result of these settings, not a failure
        row["train_seconds"] = time.perf_counter() - t
        row["status"], row["error"] = "diverged", f"FloatingPointError: {exc}"
        return None
    row["train_seconds"] = time.perf_counter() - t
    row.update(test_error=hist.final_test_error, best_error=hist.best_test_error, best_step=hist.best_test_step,
               final_loss=hist.final_train_loss, steps_done=hist.steps_done)
    if not np.isfinite(row["final_loss"]):  # pragma: no cover - train raises first
        row["status"] = "diverged"
    return hist


def run_cell(cell: dict) -> dict:
    """Run one cell of a sweep (the task body; importable by the Dask workers).

    Parameters
    ----------
    cell : dict
        Settings (:data:`SETTINGS`; missing ones take their defaults).

    Returns
    -------
    dict with
        ``"row"``: the results.csv row (every column of :data:`COLUMNS`; None where not
        measured); ``"spectra"``: dict of float64 arrays (the raw singular values, see the module
        docstring); ``"history"``: the training history as a dict (None without training);
        ``"run"``: the provenance record of this execution (:func:`refnet.provenance.run_record`
        made here, with the JSV statistics, the pruning and repair reports, and the traceback of
        a failure under ``"extra"``).

    A failure inside the pipeline does not raise: the row gets ``status="error"`` and
    ``error="<ExceptionType>: <message>"`` (and whatever was measured before it). Training that
    diverges gives ``status="diverged"``. Bad settings raise ValueError/TypeError.
    """
    cell = normalize_cell(cell)
    h = cell_hash(cell)
    worker = _worker_name()
    record = run_record("sweep-cell", [], cell, seeds={"init": cell["seed"], "scores": cell["seed"], "batches": cell["seed"]},
                        extra={"hash": h, "worker": worker, "cell_version": CELL_VERSION})
    row = dict.fromkeys(COLUMNS)
    row.update(cell, hash=h, status="ok", worker=worker, host=record["host"]["name"], pid=os.getpid(),
               run_id=uuid.uuid4().hex, started=record["start"])
    spectra, info, hist = {}, {}, None
    t0, c0 = time.perf_counter(), time.process_time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            hist = _pipeline(cell, row, spectra, info)
        except Exception as exc:
            row["status"], row["error"] = "error", f"{type(exc).__name__}: {exc}"
            info["traceback"] = traceback.format_exc()
    row["wall_seconds"], row["cpu_seconds"] = time.perf_counter() - t0, time.process_time() - c0
    msgs = list(dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught))
    row["warnings"] = json.dumps(msgs) if msgs else None
    record["extra"].update(jsonable(info, other=str))
    finish_record(record, status=row["status"], error=row["error"])
    return {"row": jsonable(row), "spectra": spectra, "history": None if hist is None else hist.to_dict(), "run": record}


# ============================================================================================
# the results table (written by the client process only)
# ============================================================================================


def _csv_line(row: dict) -> str:
    buf = io.StringIO()
    # floats as repr (round-trips exactly), None as an empty field
    csv.writer(buf, lineterminator="\n").writerow(["" if row.get(c) is None else row[c] for c in COLUMNS])
    return buf.getvalue()


def _read_rows(path: Path) -> tuple[list[dict], bool]:
    """Rows of an existing results.csv and whether some line was dropped (a torn last line)."""
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            return [], True
        if tuple(header) != COLUMNS:
            raise ValueError(
                f"{os.fspath(path)!r} has other columns than this version of refnet writes; "
                "choose another --out, or pass --overwrite to start it afresh"
            )
        rows, dropped = [], False
        for fields in reader:
            if len(fields) != len(COLUMNS) or not fields[0]:
                dropped = True
                continue
            rows.append(dict(zip(COLUMNS, fields)))
    return rows, dropped


def _write_table(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, _csv_line(dict(zip(COLUMNS, COLUMNS))) + "".join(_csv_line(r) for r in rows))


def _append_row(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8", newline="") as fh:
        fh.write(_csv_line(row))
        fh.flush()
        os.fsync(fh.fileno())


def _column_dtypes() -> dict:
    out = {}
    for c in COLUMNS:
        kind = SETTINGS[c][0] if c in SETTINGS else None
        if c in ("best_step", "steps_done", "ai_steps_done", "pid", "eval_every") or kind is int:
            out[c] = "Int64"  # nullable
        elif kind is float or c.startswith("jsv_") or c.endswith("_seconds") or c in (
                "test_error", "best_error", "final_loss", "sparsity_actual", "ai_objective"):
            out[c] = "float64"
        else:
            out[c] = "string"
    return out


def load_results(out):
    """``out/results.csv`` as a pandas DataFrame, one row per cell, with typed columns.

    Floats are read back exactly (they are written as ``repr``; pandas < 3.1 is asked for its
    round-trip parser); integer columns with gaps
    are pandas' nullable ``Int64``; text columns are ``string``; an empty field is missing.
    ``layer_sparsity`` and ``warnings`` are JSON lists (``json.loads``).
    """
    pd = _pandas()
    path = Path(out)
    if path.is_dir():
        path = path / RESULTS_CSV
    dtypes = _column_dtypes()
    # exact float parsing: pandas < 3.1 needs float_precision="round_trip"; from 3.1 on every
    # mode uses the exact converter and the argument is deprecated
    major, minor = (int(x) for x in pd.__version__.split(".")[:2])
    exact = {"float_precision": "round_trip"} if (major, minor) < (3, 1) else {}
    df = pd.read_csv(path, dtype={c: ("float64" if t == "float64" else "string") for c, t in dtypes.items()},
                     keep_default_na=False, na_values={c: [""] for c in COLUMNS}, **exact)
    for c, t in dtypes.items():
        if t == "Int64":
            df[c] = pd.to_numeric(df[c]).astype("Int64")
    return df


def _pandas():
    try:
        import pandas as pd
    except ImportError:
        raise ImportError(f"sweep results need pandas: {_EXTRA_HINT}") from None
    return pd


# ============================================================================================
# summary and figures
# ============================================================================================

#: metrics of the summary table and the figures (those measured in a sweep)
SUMMARY_METRICS = ("test_error", "best_error", "final_loss", "jsv_init_cn", "jsv_pruned_mean", "jsv_pruned_cn",
                   "jsv_repaired_mean", "jsv_repaired_cn", "sparsity_actual")


def _varying(df, exclude=("seed",)) -> list[str]:
    return [k for k in SETTINGS if k not in exclude and df[k].nunique(dropna=False) > 1]


def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.4g}"


def summarize_results(df) -> str:
    """Markdown: mean ± std (ddof 1) over seeds of :data:`SUMMARY_METRICS`, one row per setting
    of the settings that vary (finished cells only), then the cells that failed."""
    import numpy as np

    pd = _pandas()
    done = df[df["status"].isin(DONE_STATUSES)]
    keys = _varying(df) or ["method"]
    metrics = [m for m in SUMMARY_METRICS if m in done and done[m].notna().any()]
    lines = ["# Sweep summary", "",
             f"{len(df)} cells: {int((df['status'] == 'ok').sum())} ok, {int((df['status'] == 'diverged').sum())} diverged, "
             f"{int((df['status'] == 'error').sum())} failed. Mean ± std over seeds (std with ddof 1; n = seeds).", ""]
    fixed = [k for k in SETTINGS if k not in keys and k != "seed"]
    if len(df):
        lines += ["Fixed settings: " + ", ".join(f"{k}={'-' if pd.isna(df[k].iloc[0]) else df[k].iloc[0]}" for k in fixed), ""]
    if len(done) and metrics:
        g = done.groupby(keys, sort=True, dropna=False)
        lines.append("| " + " | ".join([*keys, "n", *metrics]) + " |")
        lines.append("|" + "---|" * (len(keys) + 1 + len(metrics)))
        for name, part in g:
            name = name if isinstance(name, tuple) else (name,)
            cells = []
            for m in metrics:
                v = pd.to_numeric(part[m], errors="coerce").dropna().to_numpy(dtype=float)  # (n_seeds,)
                if not len(v):
                    cells.append("-")
                elif len(v) < 2 or not np.isfinite(v).all():  # no spread of one value, nor of inf
                    cells.append(_fmt(float(v.mean())) if np.isfinite(v).all() else _fmt(float(np.max(v))))
                else:
                    cells.append(f"{_fmt(float(v.mean()))} ± {_fmt(float(v.std(ddof=1)))}")
            lines.append("| " + " | ".join([*(str(x) for x in name), str(len(part)), *cells]) + " |")
        lines.append("")
    failed = df[df["status"] == "error"]
    if len(failed):
        lines += ["## Failed cells", "", "| hash | " + " | ".join(keys + ["seed"]) + " | error |",
                  "|" + "---|" * (len(keys) + 3)]
        for _, r in failed.iterrows():
            err = str(r["error"]).replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {r['hash']} | " + " | ".join(str(r[k]) for k in keys + ["seed"]) + f" | {err} |")
        lines.append("")
    return "\n".join(lines)


def _figures(df, out: Path) -> list[str]:
    """One PNG per metric of :data:`SUMMARY_METRICS` against sparsity (mean over seeds, error bars
    = std with ddof 1, faint dots = the seeds; non-finite values, e.g. an infinite CN, are left
    out of the line and the bars), one line per method and other varying setting."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: no sweep figures")
        return []
    import numpy as np

    pd = _pandas()
    done = df[df["status"].isin(DONE_STATUSES)]
    if not len(done):
        return []
    keys = [k for k in _varying(df, exclude=("seed", "sparsity"))]
    paths = []
    for m in SUMMARY_METRICS:
        if m == "sparsity_actual" or m not in done or not done[m].notna().any():
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        groups = done.groupby(keys, sort=True, dropna=False) if keys else [((), done)]
        for i, (name, part) in enumerate(groups):
            name = name if isinstance(name, tuple) else (name,)
            label = ", ".join(f"{k}={v}" for k, v in zip(keys, name)) or m
            y = pd.to_numeric(part[m], errors="coerce").to_numpy(dtype=float)  # (n_cells,)
            x = part["sparsity"].to_numpy(dtype=float)  # (n_cells,)
            xs = np.unique(x[np.isfinite(y)])
            ys = [y[(x == v) & np.isfinite(y)] for v in xs]  # the seeds' values at each sparsity
            mean = np.array([v.mean() for v in ys])
            std = np.array([v.std(ddof=1) if len(v) > 1 else 0.0 for v in ys])
            ax.errorbar(xs, mean, yerr=std, marker="o", capsize=3, label=label, color=f"C{i % 10}")
            ax.scatter(x, y, s=8, alpha=0.35, color=f"C{i % 10}")
        ax.set_xlabel("sparsity")
        ax.set_ylabel(m)
        if m.endswith("_cn"):
            ax.set_yscale("log")
        ax.set_title(f"{m} (mean ± std over seeds)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(atomic_savefig(fig, out / f"{m}.png"))
        plt.close(fig)
    return paths


# ============================================================================================
# the sweep
# ============================================================================================


def _error_result(cell: dict, exc: BaseException) -> dict:
    """The result of a cell whose task raised (outside :func:`run_cell`'s own handling), e.g. a
    ``KilledWorker`` after its worker died too often."""
    row = dict.fromkeys(COLUMNS)
    row.update(cell, hash=cell_hash(cell), status="error", error=f"{type(exc).__name__}: {exc}", run_id=uuid.uuid4().hex)
    return {"row": row, "spectra": {}, "history": None, "run": None}


class _Writer:
    """Writes finished cells into ``out`` (cell folder first, then the row: a row means the cell's
    files are complete); each hash once."""

    def __init__(self, out: Path, done: set):
        self.out, self.written, self.n_new, self.n_failed = out, set(done), 0, 0
        self.csv = out / RESULTS_CSV

    def postfix(self) -> str:
        return f"{self.n_failed} failed" if self.n_failed else ""

    def __call__(self, cell: dict, result) -> bool:
        if not isinstance(result, dict) or not isinstance(result.get("row"), dict):
            result = _error_result(cell, TypeError(f"the cell function returned {type(result).__name__}, not a result dict"))
        row = result["row"]
        h = cell_hash(cell)
        if row.get("hash") != h:
            result = _error_result(cell, ValueError(f"the cell function returned the row of hash {row.get('hash')!r}"))
            row = result["row"]
        if h in self.written:  # a second result of a cell already written (never twice)
            return False
        folder = self.out / "cells" / h
        if result.get("run") is not None:
            write_run_json(folder, result["run"])
        if result.get("spectra"):
            atomic_savez(folder / "spectra.npz", result["spectra"])
        if result.get("history") is not None:
            atomic_write_json(folder / "history.json", jsonable(result["history"]), indent=1, allow_nan=False)
        _append_row(self.csv, row)
        self.written.add(h)
        self.n_new += 1
        self.n_failed += row.get("status") == "error"
        return True


def _start_sweep_folder(out, overwrite: bool) -> tuple[Path, dict, list]:
    """Prepare ``out``: create or resume (``sweep.json`` marks a sweep folder). Returns the folder,
    sweep.json's content and the rows kept from an earlier run."""
    out = prepare_out(out, overwrite, resume_from=SWEEP_JSON)
    meta_path, csv_path = out / SWEEP_JSON, out / RESULTS_CSV
    meta = {"format": SWEEP_FORMAT, "version": SWEEP_VERSION, "cell_version": CELL_VERSION, "columns": list(COLUMNS), "runs": []}
    rows = []
    if meta_path.is_file() and not overwrite:
        with open(meta_path, encoding="utf-8") as fh:
            old = json.load(fh)
        if not isinstance(old, dict) or old.get("format") != SWEEP_FORMAT or old.get("version") != SWEEP_VERSION:
            raise ValueError(f"{os.fspath(meta_path)!r} is not a refnet sweep (version {SWEEP_VERSION}) file; "
                             "choose another --out, or pass --overwrite")
        meta["runs"] = list(old.get("runs", []))
        if csv_path.is_file():
            rows, _ = _read_rows(csv_path)
    return out, meta, rows


def _make_client(workers: int, scheduler, client):
    """``(client, close)``: the given client, one connected to ``scheduler``, or a new LocalCluster."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise ImportError(f"a sweep on workers needs Dask distributed: {_EXTRA_HINT} (or run it serially with workers=0)") from None
    if client is not None:
        return client, lambda: None
    if scheduler is not None:
        c = Client(scheduler)
        return c, c.close
    import dask

    with dask.config.set(WORKER_DASK_CONFIG):
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                               env=dict(WORKER_ENV))
    c = Client(cluster)

    def close():
        c.close()
        cluster.close()

    return c, close


def _check_worker_versions(client) -> None:
    from . import __version__

    def version():
        import refnet

        return refnet.__version__

    try:
        found = client.run(version)
    except Exception as exc:  # a worker without refnet fails here
        raise RuntimeError(f"the Dask workers cannot run refnet ({type(exc).__name__}: {exc}); install the same refnet on every worker") from None
    other = {w: v for w, v in found.items() if v != __version__}
    if other:
        warnings.warn(f"Dask workers run another refnet version than this process ({__version__}): {other}", RuntimeWarning, stacklevel=3)


def run_sweep(grid: dict, out, *, workers: int = 2, scheduler=None, client=None, overwrite: bool = False,
              progress=None, figures: bool = True, cell_fn: Callable | None = None, argv=None):
    """Run the cells of ``grid`` on Dask distributed, writing ``out`` (see the module docstring).

    Parameters
    ----------
    grid : dict
        Setting -> value or list of values (:func:`expand_grid`).
    out : str or os.PathLike
        Output folder: new, empty, or an earlier sweep's folder (then the sweep resumes: cells
        already done are not recomputed). Another non-empty folder is refused unless ``overwrite``.
    workers : int >= 0
        Worker processes of the LocalCluster started for this sweep (one thread each; BLAS,
        OpenMP and Numba threads 1). ``0``: run the cells one after another in this process (under
        a one-thread BLAS limit when threadpoolctl is installed), without Dask.
    scheduler : str, optional
        Address of an existing Dask scheduler (``"tcp://host:port"``): the cells run on its
        workers (start them with ``--nthreads 1``); ``workers`` is then ignored.
    client : distributed.Client, optional
        An existing client to use (not closed); ``workers`` and ``scheduler`` are then ignored.
    overwrite : bool
        Start afresh: every cell is recomputed and results.csv restarted (also allows writing
        into a non-empty folder that is not a sweep's).
    progress : None, bool or text stream
        A progress bar over cells (:mod:`refnet.progress`: None, on stderr when it is a
        terminal; True, on stderr; False, none; a stream, there).
    figures : bool
        Draw the figures at the end (needs matplotlib; skipped without it).
    cell_fn : callable, optional
        The task body, ``cell_fn(cell) -> dict`` as :func:`run_cell` (the default); must be
        importable by the workers. For instrumentation and tests.
    argv : list of str, optional
        The command line recorded in run.json (default ``sys.argv``).

    Returns
    -------
    pandas.DataFrame
        The rows of the grid's cells (:func:`load_results` types), in grid order.
    """
    from ._checks import check_int

    _pandas()  # fail before any work when pandas is missing
    workers = check_int(workers, "workers", min_value=0)
    if scheduler is not None and not isinstance(scheduler, str):
        raise TypeError(f"scheduler must be an address str such as 'tcp://host:port', got {type(scheduler).__name__}")
    cells = expand_grid(grid)
    cell_fn = run_cell if cell_fn is None else cell_fn
    if not callable(cell_fn):
        raise TypeError(f"cell_fn must be callable, got {type(cell_fn).__name__}")
    out, meta, old_rows = _start_sweep_folder(out, overwrite)
    hashes = [cell_hash(c) for c in cells]
    done = {r["hash"] for r in old_rows if r["status"] in DONE_STATUSES}
    # keep finished rows and rows of cells outside this grid; failed cells of this grid are rerun
    mine = set(hashes)
    kept = [r for r in old_rows if r["hash"] in done or r["hash"] not in mine]
    _write_table(out / RESULTS_CSV, kept)
    todo = [(h, c) for h, c in zip(hashes, cells) if h not in done]
    mode = "serial" if (workers == 0 and scheduler is None and client is None) else "dask"
    args = {"grid": grid, "workers": workers, "scheduler": scheduler if client is None else str(client.scheduler.address),
            "overwrite": overwrite, "mode": mode, "n_cells": len(cells), "n_todo": len(todo)}
    record = run_record("sweep", argv, args, seeds={"seed": sorted({c["seed"] for c in cells})})
    meta["runs"].append({"start": record["start"], "end": None, "n_cells": len(cells), "n_todo": len(todo), "grid": jsonable(grid, other=str)})
    atomic_write_json(out / SWEEP_JSON, jsonable(meta, other=str))
    write = _Writer(out, {r["hash"] for r in kept})
    log.info("sweep: %d cells, %d done earlier, %d to run (%s)", len(cells), len(cells) - len(todo), len(todo), mode)

    status = "completed"
    bar = Progress(progress, total=len(todo), desc="cells", unit="cells")
    try:
        if todo and mode == "serial":
            _run_serial(todo, cell_fn, write, bar)
        elif todo:
            _run_dask(todo, cell_fn, write, bar, workers, scheduler, client)
    except BaseException as exc:
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        finish_record(record, status=status, error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        bar.close()
        record["extra"]["n_computed"] = write.n_new
        if record["end"] is None:
            finish_record(record)
        meta["runs"][-1].update(end=record["end"], n_computed=write.n_new, status=record["status"])
        atomic_write_json(out / SWEEP_JSON, jsonable(meta, other=str))
        write_run_json(out, record)

    every = load_results(out)
    _parquet(every, out / RESULTS_PARQUET)
    order = {h: i for i, h in enumerate(hashes)}
    df = every[every["hash"].isin(order)].copy()
    df = df.iloc[sorted(range(len(df)), key=lambda i: order[df["hash"].iloc[i]])].reset_index(drop=True)
    atomic_write_text(out / SUMMARY_MD, summarize_results(df))
    if figures:
        _figures(df, out)
    return df


def _run_serial(todo, cell_fn, write, bar) -> None:
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl is optional
        import contextlib

        def threadpool_limits(limits=None):
            return contextlib.nullcontext()

    with threadpool_limits(limits=1):
        for h, cell in todo:
            try:
                result = cell_fn(cell)
            except Exception as exc:
                result = _error_result(cell, exc)
            write(cell, result)
            bar.update(postfix=write.postfix)


def _run_dask(todo, cell_fn, write, bar, workers, scheduler, client) -> None:
    from distributed import as_completed

    c, close = _make_client(workers, scheduler, client)
    futures = {}
    try:
        _check_worker_versions(c)
        token = uuid.uuid4().hex[:8]
        for h, cell in todo:
            # one key per cell and sweep run: Dask never runs a key twice at once, and a worker
            # that dies has its tasks rescheduled on the others (distributed.scheduler.allowed-failures)
            f = c.submit(cell_fn, cell, key=f"refnet-cell-{h}-{token}", retries=0)
            futures[f.key] = (f, cell)
        for f in as_completed([f for f, _ in futures.values()]):
            cell = futures[f.key][1]
            try:
                result = f.result()
            except Exception as exc:  # the task raised, or its workers died too often (KilledWorker)
                result = _error_result(cell, exc)
            write(cell, result)
            f.release()
            bar.update(postfix=write.postfix)
    finally:
        for f, _ in futures.values():
            if f.status == "pending":
                f.cancel()
        close()


def _parquet(df, path: Path) -> str | None:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return None
    atomic_write(path, lambda f: df.to_parquet(f, index=False), suffix=".parquet")
    return os.fspath(path)
