"""``refnet sweep``: the prune-at-initialization pipeline over a grid of settings, on Dask.

Every grid option takes a comma-separated list (``--sparsity 0.5,0.9 --seed 0,1``); the grid is
their Cartesian product. ``--config sweep.toml`` reads settings from a TOML file (top-level keys
named as the options, with ``_`` or ``-``; a value or an array of values); options given on the
command line replace the file's. See :mod:`refnet.sweep` and docs/sweeps.md.
"""

from __future__ import annotations

import argparse
import os

from .args import arch_name, dataset_name, float_in, init_name, int_at_least, scheduler_address

NAME = "sweep"
HELP = "run the pruning pipeline over a grid of settings on Dask workers; resumable, tidy results"
DESCRIPTION = (
    "For every cell of the grid (the product of the comma lists): build, prune at initialization,\n"
    "optionally repair (--repair ai), measure the Jacobian singular values before and after, train\n"
    "and evaluate. Cells run on a local Dask cluster of --workers single-threaded processes, or on an\n"
    "existing cluster (--scheduler). Writes OUT/results.csv (one row per cell, appended as cells\n"
    "finish; results.parquet with pyarrow), OUT/cells/<hash>/ (run.json, spectra.npz, history.json),\n"
    "OUT/summary.md and a figure per metric. Running it again into the same OUT resumes: finished\n"
    "cells are not recomputed. Needs `pip install refnet[sweep]`."
)



def _one_of(setting: str, table: str):
    """A name among ``refnet.sweep.<table>`` (case-insensitive; ``-`` and ``_`` the same)."""

    def parse(text: str) -> str:
        from .. import sweep
        from .._checks import check_choice

        names = list(getattr(sweep, table))
        try:
            return check_choice(text, setting, names)
        except (ValueError, TypeError):
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(names)}; got {text!r}") from None

    parse.__name__ = setting
    return parse


# grid option (the setting's name) -> the type of one item of its comma list, in the order of
# refnet.sweep.SETTINGS (which checks the values once more, e.g. those of --config)
_GRID_OPTIONS = {
    "arch": arch_name,
    "data": dataset_name,
    "init": init_name,
    "method": _one_of("method", "METHODS"),
    "sparsity": float_in(0.0, 1.0, hi_open=True),
    "scope": _one_of("scope", "SCOPES"),
    "repair": _one_of("repair", "REPAIRS"),
    "seed": int_at_least(0),
    "steps": int_at_least(0),
    "lr": float_in(0.0, lo_open=True),
    "batch_size": int_at_least(1),
    "momentum": float_in(0.0, 1.0, hi_open=True),
    "weight_decay": float_in(0.0),
    "eval_every": int_at_least(1),
    "score_examples": int_at_least(1),
    "jsv_examples": int_at_least(1),
    "ai_steps": int_at_least(1),
    "ai_lr": float_in(0.0, lo_open=True),
}


def comma_list(item):
    """A comma-separated list of ``item`` values (``item`` parses one, e.g. ``int_at_least(0)``)."""

    def parse(text: str) -> list:
        parts = [p.strip() for p in text.split(",")]
        if not all(parts):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list such as 0.5,0.9, got {text!r}")
        return [item(p) for p in parts]

    parse.__name__ = "list"
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..arch import ARCH_HELP
    from ..sweep import DEFAULTS, METHODS, SETTINGS

    p.epilog = ARCH_HELP
    g = p.add_argument_group("grid (comma-separated lists; defaults in brackets)")
    for key, item in _GRID_OPTIONS.items():
        extra = f"; one of {', '.join(METHODS)}" if key == "method" else ""
        g.add_argument(f"--{key.replace('_', '-')}", dest=key, type=comma_list(item), default=None, metavar="LIST",
                       help=f"{SETTINGS[key][2]}{extra} [{DEFAULTS[key]}]")
    g.add_argument("--config", default=None, metavar="TOML",
                   help="a TOML file of settings (keys as the options above); the command line wins")
    g = p.add_argument_group("execution and output")
    g.add_argument("--workers", type=int_at_least(0), default=2,
                   help="worker processes of the local Dask cluster, one thread each (default 2; 0: one after "
                   "another in this process, without Dask)")
    g.add_argument("--scheduler", type=scheduler_address, default=None, metavar="ADDRESS",
                   help="run on an existing Dask cluster, e.g. tcp://10.0.0.1:8786 (workers started with --nthreads 1)")
    g.add_argument("--out", default=os.path.join("runs", "sweep"), help="output folder (default runs/sweep)")
    g.add_argument("--overwrite", action="store_true",
                   help="recompute every cell and restart results.csv (also: write into a non-empty folder that is not a sweep's)")
    g.add_argument("--no-figures", action="store_true", help="do not draw the figures")
    g.add_argument("--quiet", action="store_true", help="no progress bar; print only the final lines")


def read_config(path) -> dict:
    """The settings of a sweep TOML file: ``{setting: value or list}`` (keys with ``-`` or ``_``)."""
    import tomllib

    from ..sweep import SETTINGS

    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"argument --config: {path!r} is not valid TOML: {exc}") from None
    grid = {}
    for key, value in data.items():
        k = key.replace("-", "_")
        if k not in SETTINGS:
            raise ValueError(f"argument --config: unknown setting {key!r} in {path!r}; known: {', '.join(SETTINGS)}")
        if isinstance(value, dict):
            raise ValueError(f"argument --config: setting {key!r} in {path!r} must be a value or an array, got a table")
        grid[k] = value
    return grid


def grid_from_args(args: argparse.Namespace) -> dict:
    """The grid of the parsed arguments: the --config file's settings, replaced by the options given."""
    grid = read_config(args.config) if args.config else {}
    for key in _GRID_OPTIONS:
        value = getattr(args, key, None)
        if value is not None:
            grid[key] = value
    return grid


def run(args: argparse.Namespace) -> int:
    import sys

    from ..sweep import run_sweep

    grid = grid_from_args(args)
    df = run_sweep(grid, args.out, workers=args.workers, scheduler=args.scheduler, overwrite=args.overwrite,
                   progress=False if args.quiet else None, figures=not args.no_figures)
    counts = df["status"].value_counts()
    n_ok, n_div, n_err = (int(counts.get(s, 0)) for s in ("ok", "diverged", "error"))
    print(f"{len(df)} cells: {n_ok} ok, {n_div} diverged, {n_err} failed")
    print(f"wrote {os.path.join(args.out, 'results.csv')}, summary.md, cells/<hash>/ (run.json, spectra.npz)")
    if n_err:
        print(f"{NAME}: {n_err} cells failed (status=error in results.csv; rerun to retry them)", file=sys.stderr)
    return 1 if n_err else 0
