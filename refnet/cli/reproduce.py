"""``refnet reproduce``: run the validation scripts and write one summary report.

Each script (:data:`refnet.validation.SCRIPTS`) writes ``OUT/<name>/results.json`` and
``report.md`` as it goes; a script interrupted or failed keeps what it finished, and the next
``refnet reproduce`` resumes it. The summary ``OUT/SUMMARY.md`` gathers every script's table
(paper beside refnet, criterion, holds?) and figures.

The flags every script takes are defined here too (:func:`add_validation_arguments`,
:func:`parse_validation_args`): ``refnet reproduce`` takes the same ones and passes them on.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable

from .args import CLIError, check_data_flags, claim_out, dataset_name, engine_name, int_at_least

__all__ = [
    "NAME",
    "HELP",
    "DESCRIPTION",
    "add_arguments",
    "add_validation_arguments",
    "parse_validation_args",
    "run",
    "write_summary",
]

NAME = "reproduce"
HELP = "reproduce the papers' tables and figures; writes a summary report"
DESCRIPTION = (
    "Run the validation scripts (all by default), each writing results.json, report.md\n"
    "and figures under OUT/<name>/ as it goes, and gather them in OUT/SUMMARY.md.\n"
    "An interrupted run keeps what it finished; running it again resumes."
)


# ============================================================================================
# the flags of every validation script
# ============================================================================================


def add_validation_arguments(p: argparse.ArgumentParser) -> None:
    """The flags shared by every validation script and ``refnet reproduce`` (which passes them on
    to each): --quick, --tiny, --seed, --engine, --data, --data-dir, --out, --fresh."""
    p.add_argument("--quick", action="store_true", help="a reduced run (minutes) that keeps the comparison meaningful")
    p.add_argument("--tiny", action="store_true", help="a smoke-test run (seconds); numbers are not meaningful")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="seed of every random draw (default 0)")
    p.add_argument("--engine", type=engine_name, default=None, help="kernel engine: numpy, numba or cupy (default: automatic)")
    p.add_argument("--data", type=dataset_name, default="mnist5k",
                   help="data set: mnist5k (default, embedded), mnist, fashion-mnist, digits")
    p.add_argument("--data-dir", default=None,
                   help="folder with the MNIST / Fashion-MNIST IDX files (for --data mnist or fashion-mnist)")
    p.add_argument("--out", default="runs/reproduce", help="output folder; each script writes OUT/<name>/ (default runs/reproduce)")
    p.add_argument("--fresh", action="store_true", help="recompute instead of resuming earlier results")


def parse_validation_args(name: str, description: str, argv=None, add_arguments: Callable | None = None) -> argparse.Namespace:
    """Parse a validation script's command line (``argv``, default ``sys.argv[1:]``): the flags
    every script takes, ``--progress``/``--no-progress``, plus the script's own
    (``add_arguments(parser)``). Sets ``args.mode`` ("tiny", "quick" or "full") and, with
    ``--engine``, the ``REFNET_ENGINE`` environment variable. A usage error exits with status 2
    (argparse's behaviour), as a script run from the shell should."""
    ap = argparse.ArgumentParser(prog=f"refnet reproduce {name}", description=description)
    add_validation_arguments(ap)
    ap.add_argument("--progress", dest="progress", action="store_true", default=None, help="show progress (default: when stderr is a terminal)")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    if add_arguments is not None:
        add_arguments(ap)
    args = ap.parse_args(argv)
    try:
        check_data_flags(args.data, args.data_dir)
    except CLIError as exc:
        ap.error(str(exc))
    if args.engine is not None:
        os.environ["REFNET_ENGINE"] = args.engine
    args.mode = "tiny" if args.tiny else ("quick" if args.quick else "full")
    return args


# ============================================================================================
# the command
# ============================================================================================


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``refnet reproduce``."""
    from ..validation import SCRIPTS

    p.add_argument("names", nargs="*", metavar="NAME", help=f"scripts to run (default: all): {', '.join(SCRIPTS)}")
    add_validation_arguments(p)  # --quick, --tiny, --seed, --engine, --data, --data-dir, --out, --fresh
    p.add_argument("--list", action="store_true", help="list the scripts and exit")


def _script_argv(args, name: str) -> list[str]:
    argv = ["--seed", str(args.seed), "--data", args.data, "--out", args.out]
    for flag in ("quick", "tiny", "fresh"):
        if getattr(args, flag):
            argv.append(f"--{flag}")
    if args.engine:
        argv += ["--engine", args.engine]
    if args.data_dir:
        argv += ["--data-dir", args.data_dir]
    return argv


def run(args: argparse.Namespace) -> int:
    """Run ``refnet reproduce``; 0 when every script finished, 1 when one failed, 130 interrupted.
    Every flag is checked before the first script starts (a bad one is :class:`CLIError`)."""
    from ..validation import SCRIPTS

    if args.list:
        for name, desc in SCRIPTS.items():
            print(f"{name:<16} {desc}")
        return 0
    unknown = [n for n in args.names if n not in SCRIPTS]
    if unknown:
        raise CLIError(f"argument NAME: unknown script(s) {unknown}; choose from {list(SCRIPTS)}")
    check_data_flags(args.data, args.data_dir)  # every flag before the first script starts
    if args.engine not in (None, "auto"):
        from ..kernels import use_engine

        try:
            with use_engine(args.engine):  # imports it: a missing package fails now, not in a script
                pass
        except ImportError as exc:
            raise CLIError(f"argument --engine: {exc}") from None
    names = args.names or list(SCRIPTS)
    from ..provenance import finish_record, recording

    with claim_out(args.out, resume=True) as out, recording(out, NAME, args) as record:  # one run at a time; it resumes
        rc = _run_scripts(args, names, Path(args.out))
        if rc:
            finish_record(record, status="failed", error="a validation script failed (see SUMMARY.md)")
        return rc


def _run_scripts(args, names: list, out: Path) -> int:
    """Run the scripts ``names`` one after another (see :func:`run`)."""
    import importlib
    import traceback

    from ..validation import SCRIPTS

    failed = []
    t_all = time.perf_counter()
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name}: {SCRIPTS[name]}", flush=True)
        t = time.perf_counter()
        try:
            module = importlib.import_module(f"refnet.validation.{name}")
            rc = module.main(_script_argv(args, name))
        except KeyboardInterrupt:
            write_summary(out, names)
            print(f"\ninterrupted during {name}; finished results are kept in {out} and a rerun resumes", file=sys.stderr)
            return 130
        except Exception:  # a failing script must not lose the others' results
            traceback.print_exc()
            rc = 1
        if rc:
            failed.append(name)
        print(f"[{i}/{len(names)}] {name}: {'failed' if rc else 'done'} in {time.perf_counter() - t:.1f}s", flush=True)
    summary = write_summary(out, names)
    print(f"\nall done in {time.perf_counter() - t_all:.1f}s; summary report: {summary}")
    if failed:
        print(f"scripts that failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def write_summary(out, names=None) -> Path:
    """Gather OUT/<name>/results.json of every script into OUT/SUMMARY.md."""
    import json

    from ..validation import SCRIPTS
    from ..validation.common import atomic_write_text, check_row

    out = Path(out)
    names = names or list(SCRIPTS)
    lines = ["# refnet: the papers' results reproduced", ""]
    rows = []
    body = []
    for name in names:
        path = out / name / "results.json"
        if not path.exists():
            rows.append(f"| [{name}](#{name}) | not run | - | - |")
            continue
        try:
            res = json.loads(path.read_text())
        except (json.JSONDecodeError, OSError):
            rows.append(f"| {name} | unreadable results.json | - | - |")
            continue
        checks = res.get("checks", [])
        n_yes = sum(c["holds"] is True for c in checks)
        n_no = sum(c["holds"] is False for c in checks)
        rows.append(f"| [{name}](#{name}) | {res.get('status')} ({res['settings']['mode']}) | {n_yes} hold, {n_no} do not | {res.get('seconds', 0):.0f} s |")
        body += ["", f"<a id=\"{name}\"></a>", f"## {res.get('title', name)}", "",
                 "| check | paper | refnet | agreement criterion | holds? |", "|---|---|---|---|---|"]
        body += [check_row(c) for c in checks]
        for fig in res.get("figures", []):
            body += ["", f"![{fig['caption']}]({name}/{fig['file']})", f"*{fig['caption']}*"]
        body += ["", f"Full report: [{name}/report.md]({name}/report.md)"]
    lines += ["| script | status | checks | time |", "|---|---|---|---|", *rows, *body]
    path = out / "SUMMARY.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
