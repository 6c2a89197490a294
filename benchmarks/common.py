"""Timing helpers shared by the benchmarks: medians of repeated runs and the environment."""

from __future__ import annotations

import os
import platform
import time

import numpy as np


def settle_allocator(nbytes: int = 8 << 20) -> None:
    """Allocate and free one ``nbytes`` block, as any program that has handled a larger array
    before has done. glibc serves allocations above its mmap threshold (128 KiB at start) from
    fresh, page-faulting pages and raises the threshold only to the size of a freed mmapped
    block; a loop that allocates the same few hundred KiB every step (the 784 x 100 gradient of
    the papers' MLP) then faults on every step: 3.1 ms per training step before, 1.8 ms after.
    Every library timed in the same process profits alike."""
    block = np.ones(nbytes // 8)
    del block


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
    """Written atomically (refnet's own writer: a temporary file in the same folder, replaced)."""
    from refnet._io import atomic_write_json

    atomic_write_json(path, payload)


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


def suite_main(prog: str, description: str, run, argv=None, summary=None) -> int:
    """The ``main`` of a benchmark suite module: ``--quick`` and ``--out``, the environment line,
    ``run(quick)``'s table, then ``summary(rows)`` (a dict of extra results, printed and saved)."""
    import argparse

    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    settle_allocator()
    info = blas_info()
    print("environment:", {k: v for k, v in info.items() if k != "threadpools"})
    rows = run(args.quick)
    print_table(rows)
    extra = summary(rows) if summary is not None else {}
    for key, values in extra.items():
        print(f"\n{key}:")
        for name, r in values.items():
            print(f"  {name:<40} {r:6.2f}")
    if args.out:
        write_json(args.out, {"environment": info, "results": rows, **extra})
    return 0

