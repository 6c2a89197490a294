"""The ``refnet`` command line: ``refnet <command> [options]``.

Commands are registered in :data:`_SUBCOMMANDS`: each is a :class:`Command` with a function that
adds its options to an ``argparse`` sub-parser and a function that runs it from the parsed
namespace and returns the exit status. To add one, write ``add_arguments(parser)`` and
``run(args) -> int`` in its own module and call ``register(NAME, HELP, *_delegate(MODULE,
"add_arguments", "run"))``: the module is imported only when the command runs, so that
``refnet --help`` stays fast.

Exit status: 0 success, 1 a run that failed (e.g. training diverged), 2 bad arguments or input
(the message, ``refnet: error: ...``, names the argument; no traceback), 130 interrupted.
Set ``REFNET_DEBUG=1`` to get the full traceback instead of the one-line message.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

from .args import float_in, int_at_least

__all__ = ["Command", "main", "register", "build_parser"]

PROG = "refnet"


class CLIError(Exception):
    """A bad command-line argument or input: printed as ``refnet: error: ...``, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises :class:`CLIError` instead of printing usage and exiting."""

    def error(self, message):
        raise CLIError(message)


@dataclass(frozen=True)
class Command:
    """One subcommand: ``add_arguments(parser)`` defines its options, ``run(args) -> int`` runs it."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str | None = None


_SUBCOMMANDS: dict[str, Command] = {}


def register(name: str, help: str, add_arguments, run, description: str | None = None) -> None:
    """Register a subcommand (a later registration of the same name replaces the earlier one)."""
    _SUBCOMMANDS[name] = Command(name, help, add_arguments, run, description)


# ============================================================================================
# argument types (argparse reports their errors as "argument --NAME: ..."; the numeric ones are
# in refnet._args, shared with the audit command)
# ============================================================================================


def _lr_phases(text: str) -> list:
    """``STEP:LR[,STEP:LR...]``: from step STEP on, the learning rate LR (steps increasing, > 1)."""
    phases = []
    for part in text.split(","):
        step, sep, rate = part.strip().partition(":")
        try:
            if not sep:
                raise ValueError
            step_i, rate_f = int(step), float(rate)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected STEP:LR pairs separated by commas (e.g. 5001:0.01,7501:0.001), got {text!r}") from None
        if step_i < 2 or not rate_f > 0 or (phases and step_i <= phases[-1][0]):
            raise argparse.ArgumentTypeError(f"steps must increase from 2 on and learning rates be > 0, got {text!r}")
        phases.append((step_i, rate_f))
    return phases


def _init_name(text: str) -> str:
    from .._checks import check_choice
    from ..init import INIT_NAMES

    names = list(INIT_NAMES) + ["vs-l", "vs-g", "vs-h", "ldi"]
    try:
        check_choice(text, "init", names)
    except (ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(names)}; got {text!r}") from None
    return text


def _arch_name(text: str) -> str:
    from ..arch import parse_arch

    try:
        parse_arch(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).split("\n")[0]) from None
    return text


def _data_name(text: str) -> str:
    from ..data import DATASETS

    key = text.lower().replace("_", "-")
    if key not in DATASETS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(DATASETS)}; got {text!r}")
    return key


# ============================================================================================
# refnet train
# ============================================================================================


def _add_train(p: argparse.ArgumentParser) -> None:
    from ..arch import ARCH_HELP

    p.epilog = ARCH_HELP
    g = p.add_argument_group("data and model")
    g.add_argument("--data", type=_data_name, default="mnist5k",
                   help="dataset: mnist5k (default), digits, mnist, fashion-mnist, synthetic")
    g.add_argument("--data-dir", default=None, help="folder of the IDX files (mnist, fashion-mnist)")
    g.add_argument("--arch", type=_arch_name, default="mlp-7-tanh", help="architecture spec (default mlp-7-tanh; see below)")
    g.add_argument("--init", type=_init_name, default="orthogonal",
                   help="lecun|glorot|he|sg|orthogonal|delta_orthogonal or vs-l|vs-g|vs-h|ldi (default orthogonal)")
    g.add_argument("--gamma", type=float_in(0.0, lo_open=True), default=None, help="weight variance for --init sg")
    g.add_argument("--gain", type=float_in(0.0, lo_open=True), default=None, help="gain for orthogonal inits")
    g.add_argument("--sigma-b", type=float_in(0.0), default=None, help="bias std (default 0)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int_at_least(1), default=2000, help="SGD steps (default 2000)")
    g.add_argument("--lr", type=float_in(0.0, lo_open=True), default=0.1, help="learning rate (default 0.1)")
    g.add_argument("--lr-decay", type=_lr_phases, default=None, metavar="STEP:LR,...",
                   help="later phases of a piecewise-constant schedule, e.g. 1001:0.01,1501:0.001 "
                   "(--lr until the first; momentum carries over)")
    g.add_argument("--batch-size", type=int_at_least(1), default=100, help="mini-batch size (default 100)")
    g.add_argument("--momentum", type=float_in(0.0, 1.0, hi_open=True), default=0.0, help="heavy-ball momentum (default 0)")
    g.add_argument("--weight-decay", type=float_in(0.0), default=0.0,
                   help="coefficient of sum ||mask*W||^2 (default 0; the papers use 0.00025)")
    g.add_argument("--seed", type=int_at_least(0), default=0, help="seed of the init and the batch order (default 0)")
    g.add_argument("--eval-every", type=int_at_least(1), default=None, help="steps between test evaluations (default steps/20)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=os.path.join("runs", "train"),
                   help="output folder for history.json and net.npz (default runs/train)")
    g.add_argument("--quiet", action="store_true", help="print only the final result line")


def _run_train(args: argparse.Namespace) -> int:
    from .. import data
    from ..arch import build, parse_arch
    from ..training import train

    out = args.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise CLIError(f"argument --out: {out!r} exists and is not a folder")
    spec = parse_arch(args.arch)
    info = data.DATASETS[args.data]
    flat = spec.flat_input
    t_load = time.perf_counter()
    X, y = data.load(args.data, split="train", data_dir=args.data_dir, flatten=flat)
    X_test, y_test = data.load(args.data, split="test", data_dir=args.data_dir, flatten=flat)
    t_load = time.perf_counter() - t_load
    init_kwargs = {k: v for k, v in (("gamma", args.gamma), ("gain", args.gain), ("sigma_b", args.sigma_b)) if v is not None}
    # --seed seeds the init and (separately) the batch order, exactly as
    # build(..., seed=SEED) and train(..., seed=SEED) do from Python
    net = build(args.arch, X.shape[1:], info.n_classes, init=args.init, seed=args.seed, **init_kwargs)
    say = (lambda *a, **k: None) if args.quiet else print
    say(f"data: {args.data}  train {X.shape}  test {X_test.shape}  ({t_load:.1f}s to load)")
    say(f"arch: {args.arch}  init: {args.init}" + "".join(f"  {k}={v:g}" for k, v in init_kwargs.items()))
    say(net.summary())
    decay = "".join(f", then {r:g} from step {st}" for st, r in args.lr_decay or [])
    say(f"training: {args.steps} steps, lr {args.lr:g}{decay}, batch {args.batch_size}, momentum {args.momentum:g}, "
        f"weight decay {args.weight_decay:g}, seed {args.seed}")
    sys.stdout.flush()

    tty = sys.stderr.isatty()
    callback = None
    if not args.quiet and not tty:
        # no live progress line: one line per evaluation instead
        def callback(hist, _net):
            acc = hist.test_acc[-1]
            print(f"step {hist.steps[-1]:>{len(str(args.steps))}}/{args.steps}  train loss {hist.train_loss[-1]:.4f}  "
                  f"test acc {acc:.4f}  {hist.elapsed[-1]:.1f}s", flush=True)

    hist_path = os.path.join(out, "history.json")
    meta = {
        "command": "train",
        "data": args.data,
        "arch": args.arch,
        "init": args.init,
        "init_kwargs": init_kwargs,
        "seed": args.seed,
    }
    t0 = time.perf_counter()
    try:
        hist = train(
            net, X, y,
            steps=args.steps, lr=[(1, args.lr), *args.lr_decay] if args.lr_decay else args.lr,
            batch_size=args.batch_size, momentum=args.momentum,
            weight_decay=args.weight_decay, seed=args.seed,
            X_test=X_test, y_test=y_test, eval_every=args.eval_every,
            progress=False if args.quiet else None, callback=callback,
            history_path=hist_path, meta=meta,
        )
    except FloatingPointError as exc:
        print(f"{PROG}: error: {exc} (history so far in {hist_path})", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - t0
    net_path = os.path.join(out, "net.npz")
    net.save(net_path)
    acc = hist.final_test_acc
    print(
        f"test accuracy: {acc:.4f} (test error {100 * (1 - acc):.2f}%), best test error "
        f"{100 * hist.best_test_error:.2f}% at step {hist.best_test_step}, time {elapsed:.1f}s"
    )
    say(f"wrote {hist_path} and {net_path}")
    return 0


register(
    "train",
    "train a network with mini-batch SGD and write history.json and net.npz",
    _add_train,
    _run_train,
    description="Train a network (SGD with optional momentum and weight decay) on a dataset and\n"
    "report its test accuracy. Writes OUT/history.json after every evaluation and\n"
    "OUT/net.npz at the end.",
)


def _delegate(module: str, add: str, run: str):
    """``(add_arguments, run)`` for a command whose code lives in ``module`` (relative to
    refnet), imported only when the command is used, so that ``refnet --help`` stays fast."""

    def add_arguments(p: argparse.ArgumentParser) -> None:
        getattr(importlib.import_module(module, 'refnet'), add)(p)

    def run_command(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module, 'refnet'), run)(args)

    return add_arguments, run_command


register(
    "spectrum",
    "Jacobian singular values and layerwise dynamical isometry of one or more initializations",
    *_delegate(".spectrum", "add_spectrum_arguments", "run_spectrum"),
    description="For each initialization, build the network, optionally prune it, and compute the\n"
    "singular values of the input-output Jacobian of every example (pooled mean, std, min, max,\n"
    "CN = max/min as the SPP tables; CN mean over examples as [DI]) and of every layer Jacobian\n"
    "(fraction within epsilon of 1: layerwise dynamical isometry). Writes OUT/stats.json and PNGs.",
)


register(
    "prune",
    "prune at initialization, optionally repair by approximate isometry, train and report JSV",
    *_delegate(".prune_cmd", "add_arguments", "run"),
    description="Build a network, measure its Jacobian singular values, prune it (connection\n"
    "sensitivity or a baseline), optionally repair it (--repair ai), measure again, train and\n"
    "report the test error. Writes OUT/masks.npz, net.npz, history.json, summary.json, curves.png.",
)


register(
    "reproduce",
    "reproduce the papers' tables and figures; writes a summary report",
    *_delegate(".reproduce", "add_arguments", "run"),
    description="Run the validation scripts (all by default), each writing results.json, report.md\n"
    "and figures under OUT/<name>/ as it goes, and gather them in OUT/SUMMARY.md.\n"
    "An interrupted run keeps what it finished; running it again resumes.",
)


register(
    "audit",
    "compare a PyTorch model (or another framework's .npz) with refnet's float64 reference",
    *_delegate(".audit", "add_audit_arguments", "run_audit"),
    description="Audit what another framework computes: logits, loss, gradients, Jacobians, SNIP\n"
    "scores and masks, Jacobian singular values, in float64 and as the model runs (its own\n"
    "dtype), against refnet's float64 reference. Writes OUT/report.md and OUT/report.json;\n"
    "exit status 1 when a comparison fails (docs/audit.md).",
)


register(
    "bench",
    "time refnet beside NumPy, SciPy, PyTorch and JAX (whichever are installed) in one run",
    *_delegate(".benchmarks.__main__", "add_arguments", "run"),
    description="Benchmark suites (engine: training step and SNIP of the papers' MLP; kernels: masked\n"
    "products, batched singular values, isometry steps; jacobian: Jacobians and their singular\n"
    "values; gpu: the cupy engine beside the CPU engines, where CuPy and a GPU are there),\n"
    "medians of repeated runs, printed as times and ratios and written to --out as JSON\n"
    "with the BLAS library and thread settings. Set OMP_NUM_THREADS, OPENBLAS_NUM_THREADS and\n"
    "NUMBA_NUM_THREADS before starting for one-thread figures (docs/performance.md).",
)


# ============================================================================================
# parser and entry point
# ============================================================================================


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per registered command."""
    from .. import __version__

    parser = _Parser(prog=PROG, description="refnet: a float64 reference for pruning at initialization.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for cmd in _SUBCOMMANDS.values():
        p = sub.add_parser(
            cmd.name, help=cmd.help, description=cmd.description or cmd.help,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        cmd.add_arguments(p)
        p.set_defaults(_command=cmd)
    return parser


def main(argv=None) -> int:
    """Run ``refnet`` with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    debug = os.environ.get("REFNET_DEBUG", "") not in ("", "0")
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help / --version
            return int(exc.code or 0)
        if getattr(args, "_command", None) is None:
            parser.print_help(sys.stderr)
            print(f"{PROG}: error: a command is required (one of {', '.join(_SUBCOMMANDS)})", file=sys.stderr)
            return 2
        return int(args._command.run(args))
    except CLIError as exc:
        if debug:
            raise
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, FileNotFoundError, ImportError, OSError) as exc:
        if debug:
            raise
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
