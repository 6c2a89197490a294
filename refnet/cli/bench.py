"""``refnet bench``: the benchmark suites (``benchmarks/``, installed as :mod:`refnet.benchmarks`)
from the ``refnet`` command. The suites and their options are those of ``python -m benchmarks``
(:mod:`refnet.benchmarks.__main__`), so both ways of running them take the same flags."""

from __future__ import annotations

import argparse
import os

from .args import CLIError

NAME = "bench"
HELP = "time refnet beside NumPy, SciPy, PyTorch and JAX (whichever are installed) in one run"
DESCRIPTION = (
    "Benchmark suites (engine: training step and SNIP of the papers' MLP; kernels: masked\n"
    "products, batched singular values, isometry steps; jacobian: Jacobians and their singular\n"
    "values; gpu: the cupy engine beside the CPU engines, where CuPy and a GPU are there),\n"
    "medians of repeated runs, printed as times and ratios and written to --out as JSON\n"
    "with the BLAS library and thread settings. Set OMP_NUM_THREADS, OPENBLAS_NUM_THREADS and\n"
    "NUMBA_NUM_THREADS before starting for one-thread figures (docs/performance.md)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``refnet bench``: suite names, --quick, --out."""
    from ..benchmarks.__main__ import add_arguments as add_suite_arguments

    add_suite_arguments(p)


def run(args: argparse.Namespace) -> int:
    """Run the suites ``args.names`` (all when empty); 0 on success."""
    if os.path.isdir(args.out):  # before the suites run, not when their results are written
        raise CLIError(f"argument --out: {args.out!r} is a folder; give the JSON file to write")
    from ..benchmarks.__main__ import run as run_suites

    return run_suites(args)
