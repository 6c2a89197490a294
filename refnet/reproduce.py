"""``refnet reproduce``: run the validation scripts and write one summary report.

Each script (:data:`refnet.validation.SCRIPTS`) writes ``OUT/<name>/results.json`` and
``report.md`` as it goes; a script interrupted or failed keeps what it finished, and the next
``refnet reproduce`` resumes it. The summary ``OUT/SUMMARY.md`` gathers every script's table
(paper beside refnet, criterion, holds?) and figures.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from pathlib import Path

__all__ = ["add_arguments", "run", "write_summary"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from refnet.validation import SCRIPTS
    from refnet.validation.common import add_common_arguments

    p.add_argument("names", nargs="*", metavar="NAME", help=f"scripts to run (default: all): {', '.join(SCRIPTS)}")
    add_common_arguments(p)  # --quick, --tiny, --seed, --engine, --data, --data-dir, --out, --fresh
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
    from refnet.validation import SCRIPTS

    if args.list:
        for name, desc in SCRIPTS.items():
            print(f"{name:<16} {desc}")
        return 0
    unknown = [n for n in args.names if n not in SCRIPTS]
    if unknown:
        raise ValueError(f"unknown script(s) {unknown}; choose from {list(SCRIPTS)}")
    names = args.names or list(SCRIPTS)
    out = Path(args.out)
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
    from refnet.validation import SCRIPTS
    from refnet.validation.common import atomic_write_text, check_row

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
