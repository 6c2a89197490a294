"""Timing helpers shared by the benchmarks: medians of repeated runs and the environment."""

from __future__ import annotations

import json
import os
import platform
import time

import numpy as np


def median_time(fn, repeat: int = 20, warmup: int = 3, min_time: float = 0.2) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeat`` runs (each run loops until it
    lasts at least ``min_time / repeat`` to beat the timer's resolution)."""
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-9)
    inner = max(1, int(min_time / repeat / one))
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner)
    return float(np.median(samples))


def blas_info() -> dict:
    """The BLAS NumPy is linked against and the thread settings in force."""
    info = {"numpy": np.__version__, "python": platform.python_version(), "machine": platform.machine()}
    try:
        cfg = np.show_config(mode="dicts")
        blas = cfg["Build Dependencies"]["blas"]
        info["blas"] = f"{blas.get('name')} {blas.get('version')}"
        info["blas_config"] = blas.get("openblas configuration", "")
    except Exception:  # pragma: no cover - older NumPy
        info["blas"] = "unknown"
    try:
        from threadpoolctl import threadpool_info

        info["threadpools"] = [
            {k: d.get(k) for k in ("internal_api", "num_threads", "architecture", "version")} for d in threadpool_info()
        ]
    except ImportError:
        pass
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS", "OPENBLAS_CORETYPE"):
        info[var] = os.environ.get(var)
    info["cpu_count"] = os.cpu_count()
    return info


def write_json(path, payload) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(payload, fh, indent=2)
    os.replace(tmp, path)


def print_table(rows, ref_key: str = "refnet") -> None:
    """rows: list of dicts with 'case', 'impl', 'seconds'; ratio = impl time / refnet time."""
    cases = {}
    for r in rows:
        cases.setdefault(r["case"], []).append(r)
    for case, rs in cases.items():
        ref = next((r["seconds"] for r in rs if r["impl"] == ref_key), None)
        print(f"\n{case}")
        for r in rs:
            ratio = f"{r['seconds'] / ref:8.2f}x refnet" if ref else ""
            print(f"  {r['impl']:<28} {r['seconds'] * 1e3:10.3f} ms  {ratio}")
