"""``refnet train``: train a network with mini-batch SGD and write ``OUT/history.json``,
``OUT/net.npz`` and ``OUT/run.json`` (the library side is :func:`refnet.training.train`).

Every flag is checked before any work (the network is built from the dataset's shape before any
data are read); ``--out`` is refused when it holds an earlier run's files, unless ``--overwrite``
(:func:`refnet.cli.args.claim_out`)."""

from __future__ import annotations

import argparse
import os
import sys
import time

from .args import (CLIError, arch_name, check_data_flags, claim_out, dataset_name, float_in, init_name, int_at_least,
                   lr_phases)

NAME = "train"
HELP = "train a network with mini-batch SGD and write history.json and net.npz"
DESCRIPTION = (
    "Train a network (SGD with optional momentum and weight decay) on a dataset and\n"
    "report its test accuracy. Writes OUT/history.json after every evaluation and\n"
    "OUT/net.npz at the end (an existing OUT is refused unless --overwrite)."
)

#: the files a run writes in OUT (an earlier run's are removed first with --overwrite)
OUTPUTS = ("history.json", "history.csv", "net.npz", "run.json")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``refnet train``."""
    from ..arch import ARCH_HELP

    p.epilog = ARCH_HELP
    g = p.add_argument_group("data and model")
    g.add_argument("--data", type=dataset_name, default="mnist5k",
                   help="dataset: mnist5k (default), digits, mnist, fashion-mnist, synthetic")
    g.add_argument("--data-dir", default=None, help="folder of the IDX files (mnist, fashion-mnist)")
    g.add_argument("--arch", type=arch_name, default="mlp-7-tanh", help="architecture spec (default mlp-7-tanh; see below)")
    g.add_argument("--init", type=init_name, default="orthogonal",
                   help="lecun|glorot|he|sg|orthogonal|delta_orthogonal or vs-l|vs-g|vs-h|ldi (default orthogonal)")
    g.add_argument("--gamma", type=float_in(0.0, lo_open=True), default=None, help="weight variance for --init sg")
    g.add_argument("--gain", type=float_in(0.0, lo_open=True), default=None, help="gain for orthogonal inits")
    g.add_argument("--sigma-b", type=float_in(0.0), default=None, help="bias std (default 0)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int_at_least(1), default=2000, help="SGD steps (default 2000)")
    g.add_argument("--lr", type=float_in(0.0, lo_open=True), default=0.1, help="learning rate (default 0.1)")
    g.add_argument("--lr-decay", type=lr_phases, default=None, metavar="STEP:LR,...",
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
                   help="output folder for history.json, net.npz and run.json (default runs/train)")
    g.add_argument("--overwrite", action="store_true",
                   help="write into an existing non-empty --out (the earlier run's files are removed first)")
    g.add_argument("--quiet", action="store_true", help="print only the final result line")


def run(args: argparse.Namespace) -> int:
    """Run ``refnet train``; 0 on success, 1 when training diverged (bad input raises)."""
    from .. import data
    from ..arch import build, parse_arch
    from ..provenance import finish_record, recording
    from ..training import TrainingDiverged, train

    # every check before any work: the flags together, the network (from the dataset's shape)
    check_data_flags(args.data, args.data_dir)
    spec = parse_arch(args.arch)
    info = data.DATASETS[args.data]
    if args.lr_decay and args.lr_decay[-1][0] > args.steps:
        raise CLIError(f"argument --lr-decay: the first step of every phase must be <= steps ({args.steps}), "
                       f"got {args.lr_decay[-1][0]}")
    if info.n_train is not None and args.batch_size > info.n_train:
        raise CLIError(f"argument --batch-size: must be <= the {info.n_train} training examples of {args.data}, "
                       f"got {args.batch_size}")
    init_kwargs = {k: v for k, v in (("gamma", args.gamma), ("gain", args.gain), ("sigma_b", args.sigma_b)) if v is not None}
    # --seed seeds the init and (separately) the batch order, exactly as
    # build(..., seed=SEED) and train(..., seed=SEED) do from Python
    net = build(args.arch, info.in_shape(flatten=spec.flat_input), info.n_classes, init=args.init, seed=args.seed,
                **init_kwargs)

    with claim_out(args.out, overwrite=args.overwrite, outputs=OUTPUTS) as out, recording(out, NAME, args) as record:
        flat = spec.flat_input
        t_load = time.perf_counter()
        X, y = data.load(args.data, split="train", data_dir=args.data_dir, flatten=flat)
        X_test, y_test = data.load(args.data, split="test", data_dir=args.data_dir, flatten=flat)
        t_load = time.perf_counter() - t_load
        if args.batch_size > X.shape[0]:
            raise CLIError(f"argument --batch-size: must be <= the {X.shape[0]} training examples of {args.data}, "
                           f"got {args.batch_size}")
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
        except TrainingDiverged as exc:
            finish_record(record, status="diverged", error=str(exc))
            print(f"refnet: error: {exc} (history so far in {hist_path})", file=sys.stderr)
            return 1
        elapsed = time.perf_counter() - t0
        net_path = os.path.join(out, "net.npz")
        net.save(net_path)
        hist.save_csv(os.path.join(out, "history.csv"))  # the tidy table beside history.json
    acc = hist.final_test_acc
    print(
        f"test accuracy: {acc:.4f} (test error {100 * (1 - acc):.2f}%), best test error "
        f"{100 * hist.best_test_error:.2f}% at step {hist.best_test_step}, time {elapsed:.1f}s"
    )
    say(f"wrote {hist_path} and {net_path}")
    return 0
