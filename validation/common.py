"""What every validation script shares: arguments, a resumable result store and the report.

A script is a module of :mod:`refnet.validation` with ``main(argv=None) -> int``. It builds a
:class:`Run` from :func:`parse_args`, computes its units of work through :meth:`Run.unit` (a unit
already in ``results.json`` is not computed again, so an interrupted run resumes where it
stopped), states each comparison with the paper through :meth:`Run.check`, saves figures with
:meth:`Run.figure_path`, and ends with :meth:`Run.finish`, which writes ``results.json`` and
``report.md`` with the table "paper | refnet | agreement criterion | holds?".

Every file is written atomically (temporary file, then ``os.replace``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from refnet._io import atomic_write_text
from refnet._io import jsonable as _jsonable  # NumPy values and non-finite floats ("inf") for strict JSON
from refnet.cli.args import Namespace
from refnet.cli.reproduce import add_validation_arguments, parse_validation_args
from refnet.plots import atomic_savefig, new_figure, new_figure_row  # figures are made and saved in refnet.plots
from refnet.progress import Progress, get_logger

_log = get_logger("validation")

__all__ = ["Check", "Run", "add_common_arguments", "parse_args", "seeded_settings", "start", "unit_grid", "atomic_savefig", "atomic_write_text", "fmt", "load_data", "new_figure", "new_figure_row", "train_record"]


def md_cell(text) -> str:
    """Text made safe for one Markdown table cell (``|`` escaped, newlines as spaces)."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def check_row(c: dict) -> str:
    """One row of the table "check | paper | refnet | agreement criterion | holds?"."""
    mark = {True: "yes", False: "**no**", None: "n/a"}[c["holds"]]
    note = f" ({c['note']})" if c.get("note") else ""
    return f"| {md_cell(c['name'])} | {md_cell(c['paper'])} | {md_cell(c['refnet'])} | {md_cell(c['criterion'] + note)} | {mark} |"


def fmt(value, spec: str = ".3g") -> str:
    """Format a number (or a list of numbers) for a report table."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, np.ndarray)):
        return " ".join(fmt(v, spec) for v in value)
    v = float(value)
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return format(v, spec)


@dataclass
class Check:
    """One row of the report: a published number (or claim) beside refnet's and the criterion."""

    name: str
    paper: str
    refnet: str
    criterion: str
    holds: bool | None  # None: reported, not judged (e.g. a setting the paper did not publish)
    note: str = ""


def add_common_arguments(p) -> None:
    """The flags shared by every script and ``refnet reproduce`` (which passes them on to each);
    defined in :func:`refnet.cli.reproduce.add_validation_arguments`."""
    add_validation_arguments(p)


def parse_args(name: str, description: str, argv=None, add_arguments: Callable | None = None) -> Namespace:
    """The flags every script takes, plus the script's own (``add_arguments(parser)``); parsed by
    :func:`refnet.cli.reproduce.parse_validation_args`."""
    return parse_validation_args(name, description, argv, add_arguments)


def train_record(net, data, *, steps: int, eval_every: int, seed: int, progress=False, **train_kwargs) -> dict:
    """Train ``net`` in place with :func:`refnet.train` on ``data = (X, y, X_test, y_test)`` and
    return a JSON-able record of the run. A diverged run is a finding, not an error: it is
    recorded with ``status="diverged"`` and the error message."""
    import refnet

    X, y, Xt, yt = data
    out = {"steps": steps, "eval_every": eval_every}
    try:
        hist = refnet.train(net, X, y, steps=steps, seed=seed, X_test=Xt, y_test=yt, eval_every=eval_every,
                            train_eval_size=0, progress=bool(progress), **train_kwargs)
    except FloatingPointError as exc:
        out.update(status="diverged", error=str(exc), best_test_error=None)
        return out
    out.update(
        status=hist.status,
        best_test_error=hist.best_test_error,
        best_test_step=hist.best_test_step,
        final_test_error=hist.final_test_error,
        checkpoints=list(hist.steps),
        test_error=[None if a is None else 1.0 - a for a in hist.test_acc],
        train_loss=list(hist.train_loss),
        seconds=hist.wall_time,
    )
    return out


def load_data(args, split: str, flatten: bool = True):
    """``refnet.data.load`` with the script's --data and --data-dir."""
    from refnet import data

    return data.load(args.data, split=split, data_dir=args.data_dir, flatten=flatten)


def load_train_test(args, n_train=None, n_test=None, *, hold_out: bool = True):
    """``(X, y, X_test, y_test)`` of --data/--data-dir, cut to ``n_train`` / ``n_test`` rows when
    given. With ``hold_out`` and no ``n_train``, full MNIST's 60,000 training images lose the
    last 6,000: the SPP code holds 10% of the training split out."""
    X, y = load_data(args, "train")
    Xt, yt = load_data(args, "test")
    if n_train is None and hold_out and X.shape[0] == 60_000:
        n_train = 54_000
    if n_train is not None:
        X, y = X[:n_train], y[:n_train]
    if n_test is not None:
        Xt, yt = Xt[:n_test], yt[:n_test]
    return X, y, Xt, yt


def _code_fingerprint(name: str) -> str:
    """SHA-1 of the script's source and refnet's version: results of other code are not resumed."""
    import hashlib
    import importlib

    import refnet

    h = hashlib.sha1(refnet.__version__.encode())
    try:
        h.update(Path(importlib.import_module(f"refnet.validation.{name}").__file__).read_bytes())
    except (ImportError, OSError, TypeError):
        h.update(name.encode())
    return h.hexdigest()[:12]


class Run:
    """Results, checks and files of one script run, resumable.

    Parameters
    ----------
    name : str
        The script's name (its folder under ``--out``).
    args : argparse.Namespace
        From :func:`parse_args`. A previous ``results.json`` with the same mode, seed, data,
        engine and code (the script's source hash) is resumed unless ``--fresh``.
    title : str
        The report's heading.

    Progress (``args.progress``: None, the default, when stderr is a terminal) is a bar counting the
    computed units (:class:`refnet.progress.Progress`) with the unit in hand, and a line per unit
    done above it; without it those lines are INFO records of the ``refnet.validation`` logger.
    """

    def __init__(self, name: str, args: Namespace, title: str):
        self.name, self.args, self.title = name, args, title
        self.dir = Path(args.out) / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.results_path = self.dir / "results.json"
        self.checks: list[Check] = []
        self.sections: list[str] = []
        self.figures: list[tuple[str, str]] = []
        self.t0 = time.perf_counter()
        self.settings = {"mode": args.mode, "seed": args.seed, "data": args.data, "engine": args.engine,
                         "code": _code_fingerprint(name)}
        self.units: dict[str, Any] = {}
        if not args.fresh and self.results_path.exists():
            try:
                old = json.loads(self.results_path.read_text())
                if old.get("settings") == self.settings:
                    self.units = old.get("units", {})
            except (json.JSONDecodeError, OSError):
                self.units = {}
        self.resumed = len(self.units)
        self._bar = Progress(args.progress, None, desc=name, unit="units", name="args.progress")
        self._progress = self._bar.shown  # the scripts pass it on to their training runs

    # --- units of work -------------------------------------------------------------------------
    def unit(self, key: str, compute: Callable[[], Any]):
        """The result of ``compute()``, computed once: stored in results.json right away, so a
        rerun after an interruption takes it from there."""
        if key in self.units:
            return self.units[key]
        self._bar.describe(key)
        t = time.perf_counter()
        value = _jsonable(compute())
        self.units[key] = value
        self._save(status="running")
        self._bar.update()
        self.log(f"{self.name}: {key} done in {time.perf_counter() - t:.1f}s")
        return value

    def log(self, message: str) -> None:
        """A line above the progress bar when it is shown, else an INFO record of the
        ``refnet.validation`` logger."""
        if self._bar.shown:
            self._bar.write(message)
        else:
            _log.info("%s", message)

    # --- report --------------------------------------------------------------------------------
    def check(self, name: str, paper, refnet, criterion: str, holds: bool | None, note: str = "") -> Check:
        c = Check(name, fmt(paper), fmt(refnet), criterion, None if holds is None else bool(holds), note)
        self.checks.append(c)
        return c

    def section(self, markdown: str) -> None:
        """Free text (a table, an explanation) added to the report after the checks."""
        self.sections.append(markdown)

    def figure_path(self, filename: str, caption: str) -> Path:
        """Where to write a PNG; it is listed in the report with ``caption``."""
        self.figures.append((filename, caption))
        return self.dir / filename

    def _save(self, status: str) -> None:
        payload = {
            "name": self.name,
            "title": self.title,
            "status": status,
            "settings": self.settings,
            "seconds": round(time.perf_counter() - self.t0, 3),
            "units": self.units,
            "checks": [asdict(c) for c in self.checks],
            "figures": [{"file": f, "caption": c} for f, c in self.figures],
        }
        atomic_write_text(self.results_path, json.dumps(_jsonable(payload), indent=2, allow_nan=False))

    def report_markdown(self) -> str:
        lines = [f"# {self.title}", "", f"Settings: mode `{self.args.mode}`, seed {self.args.seed}, data `{self.args.data}`."]
        if self.resumed:
            lines.append(f"Resumed: {self.resumed} unit(s) taken from an earlier run with the same settings.")
        lines += ["", "| check | paper | refnet | agreement criterion | holds? |", "|---|---|---|---|---|"]
        lines += [check_row(asdict(c)) for c in self.checks]
        for s in self.sections:
            lines += ["", s]
        for f, cap in self.figures:
            lines += ["", f"![{cap}]({f})", f"*{cap}*"]
        return "\n".join(lines) + "\n"

    def finish(self) -> int:
        """Write results.json and report.md; return 0 (a failed check is a finding, not an error)."""
        self._bar.close()
        self._save(status="done")
        atomic_write_text(self.dir / "report.md", self.report_markdown())
        n_yes = sum(c.holds is True for c in self.checks)
        n_no = sum(c.holds is False for c in self.checks)
        print(f"{self.name}: {n_yes} checks hold, {n_no} do not; report: {self.dir / 'report.md'}")
        return 0


def start(name: str, title: str, doc: str, argv, setup: Callable, add_arguments: Callable | None = None):
    """The opening of a script's ``main``: parse the flags (the description is ``doc``'s first
    line), open the :class:`Run` and call ``setup(args) -> (cfg, data)``. Returns
    ``(run, cfg, data, progress)``; the flags are ``run.args``."""
    args = parse_args(name, doc.splitlines()[0], argv, add_arguments)
    run = Run(name, args, title)
    cfg, data = setup(args)
    return run, cfg, data, getattr(run, "_progress", False)


def unit_grid(run: Run, seeds, items, unit_key: Callable[..., str], compute: Callable) -> dict:
    """One :meth:`Run.unit` per seed (outer loop) and item (inner loop), in that order:
    ``{(*item, seed): run.unit(unit_key(*item, seed), lambda: compute(*item, seed))}``. An item
    that is not a tuple stands for the 1-tuple ``(item,)``."""
    out = {}
    for seed in seeds:
        for item in items:
            item = item if isinstance(item, tuple) else (item,)
            out[(*item, seed)] = run.unit(unit_key(*item, seed), lambda item=item, seed=seed: compute(*item, seed))
    return out


def seeded_settings(args, modes: dict) -> dict:
    """A copy of ``modes[args.mode]`` with the seeds to average over: ``n_seeds`` (the mode's, or
    the script's ``--seeds N``, N >= 1) and ``seeds = [--seed, --seed + 1, ...]``."""
    cfg = dict(modes[args.mode])
    if args.seeds is not None:
        if args.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
        cfg["n_seeds"] = args.seeds
    cfg["seeds"] = [args.seed + i for i in range(cfg["n_seeds"])]
    return cfg
