"""``python -m benchmarks [name ...] [--quick] [--out results.json]``."""

from __future__ import annotations

import argparse
import importlib

from .common import blas_info, print_table, settle_allocator, write_json

SUITES = ["engine", "kernels", "jacobian", "second_order", "gpu"]  # gpu: skipped, saying why, without CuPy or a GPU


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("names", nargs="*", choices=SUITES + [[]], help="suites to run (default: all)")
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--out", default="benchmarks-results.json", help="JSON file to write")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    add_arguments(ap)
    return run(ap.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Run the suites named in ``args.names`` (all when empty), print the table, write JSON."""
    settle_allocator()
    info = blas_info()
    print("environment:", {k: v for k, v in info.items() if k != "threadpools"})
    rows = []
    for name in args.names or SUITES:
        rows += importlib.import_module(f".{name}", __package__).run(quick=args.quick)
    print_table(rows)
    write_json(args.out, {"environment": info, "results": rows})
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
