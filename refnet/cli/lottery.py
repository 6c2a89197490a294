"""``refnet lottery``: iterative magnitude pruning with rewinding (lottery tickets), the command
line of :func:`refnet.lottery.imp`. Writes ``OUT/rounds.json`` and ``OUT/rounds.csv`` (one tidy
row per round), ``OUT/masks.npz`` (the last round's masks), ``OUT/net.npz`` (the last round's
trained network) and ``OUT/run.json``; an existing OUT is refused unless ``--overwrite``."""

from __future__ import annotations

import argparse
import json
import os

from .args import arch_name, check_data_flags, claim_out, dataset_name, float_in, init_name, int_at_least

NAME = "lottery"
HELP = "iterative magnitude pruning with rewinding (lottery tickets): density and accuracy per round"
DESCRIPTION = (
    "Train the network, prune a fraction of the remaining weights by magnitude, rewind the kept\n"
    "weights to their initial values (or to step --rewind-step) and train again, for --rounds\n"
    "rounds (refnet.lottery.imp). Prints and writes one row per round."
)

#: the files a run writes in OUT
OUTPUTS = ("rounds.json", "rounds.csv", "masks.npz", "net.npz", "run.json")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``refnet lottery``."""
    from ..arch import ARCH_HELP

    p.epilog = ARCH_HELP
    g = p.add_argument_group("data and model")
    g.add_argument("--data", type=dataset_name, default="mnist5k", help="dataset (default mnist5k)")
    g.add_argument("--data-dir", default=None, help="folder of the dataset's files (mnist, fashion-mnist, cifar10)")
    g.add_argument("--arch", type=arch_name, default="lenet300", help="architecture spec (default lenet300; see below)")
    g.add_argument("--init", type=init_name, default="lecun", help="initialisation (default lecun)")
    g = p.add_argument_group("iterative magnitude pruning")
    g.add_argument("--rounds", type=int_at_least(0), default=5, help="pruning rounds after the dense one (default 5)")
    g.add_argument("--rate", type=float_in(0.0, 1.0, lo_open=True, hi_open=True), default=0.2,
                   help="fraction of the remaining weights pruned per round (default 0.2)")
    g.add_argument("--scope", choices=("global", "layer"), default="global", help="rank globally or per layer (default global)")
    g.add_argument("--rewind-step", type=int_at_least(0), default=0, help="rewind to the weights after this step of round 0 (default 0: the init)")
    g = p.add_argument_group("training (every round)")
    g.add_argument("--steps", type=int_at_least(1), default=1000, help="SGD steps per round (default 1000)")
    g.add_argument("--lr", type=float_in(0.0, lo_open=True), default=0.1, help="learning rate (default 0.1)")
    g.add_argument("--batch-size", type=int_at_least(1), default=100, help="mini-batch size (default 100)")
    g.add_argument("--momentum", type=float_in(0.0, 1.0, hi_open=True), default=0.0, help="momentum (default 0)")
    g.add_argument("--weight-decay", type=float_in(0.0), default=0.0, help="weight decay (default 0)")
    g.add_argument("--seed", type=int_at_least(0), default=0, help="seed of the init and the batch order (default 0)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=os.path.join("runs", "lottery"), help="output folder (default runs/lottery)")
    g.add_argument("--overwrite", action="store_true", help="write into an existing non-empty --out")


def run(args: argparse.Namespace) -> int:
    """Run ``refnet lottery``; 0 on success (bad input raises)."""
    import numpy as np

    from .. import data
    from .._io import atomic_savez, atomic_write_text
    from ..arch import build, parse_arch
    from ..lottery import imp
    from ..provenance import recording
    from ..tables import write_csv
    from .args import CLIError

    check_data_flags(args.data, args.data_dir)
    if args.rewind_step >= args.steps:
        raise CLIError(f"argument --rewind-step: must be < --steps ({args.steps}), got {args.rewind_step}")
    spec = parse_arch(args.arch)
    info = data.DATASETS[args.data]
    if info.n_train is not None and args.batch_size > info.n_train:
        raise CLIError(f"argument --batch-size: must be <= the {info.n_train} training examples of {args.data}, "
                       f"got {args.batch_size}")
    net = build(args.arch, info.in_shape(flatten=spec.flat_input), info.n_classes, init=args.init, seed=args.seed)

    with claim_out(args.out, overwrite=args.overwrite, outputs=OUTPUTS) as out, recording(out, NAME, args):
        X, y = data.load(args.data, split="train", data_dir=args.data_dir, flatten=spec.flat_input)
        X_test, y_test = data.load(args.data, split="test", data_dir=args.data_dir, flatten=spec.flat_input)
        print(f"data: {args.data}  train {X.shape}  test {X_test.shape}; arch {args.arch}, init {args.init}", flush=True)
        res = imp(net, X, y, rounds=args.rounds, sparsity_per_round=args.rate, steps_per_round=args.steps,
                  lr=args.lr, batch_size=args.batch_size, momentum=args.momentum, weight_decay=args.weight_decay,
                  rewind_step=args.rewind_step, scope=args.scope, seed=args.seed, X_test=X_test, y_test=y_test)
        rows = [{"round": r["round"], "density": r["density"], "n_kept": r["n_kept"], "test_acc": r["test_acc"],
                 "test_loss": r["test_loss"], "train_loss": r["train_loss"], "steps": r["steps"], "seconds": r["time"],
                 **{f"density_layer{i}": d for i, d in r["layer_density"].items()}} for r in res["history"]]
        atomic_write_text(os.path.join(out, "rounds.json"), json.dumps(rows, indent=2) + "\n")
        write_csv(os.path.join(out, "rounds.csv"), rows)
        last = res["history"][-1]["masks"]
        atomic_savez(os.path.join(out, "masks.npz"), {f"{i}/{k}": np.asarray(v) for i, m in enumerate(last) for k, v in m.items()})
        res["net"].save(os.path.join(out, "net.npz"))
        for r in rows:
            print(f"round {r['round']}: density {r['density']:.4f} ({r['n_kept']} weights)  "
                  f"test acc {r['test_acc']:.4f}  train loss {r['train_loss']:.4f}  {r['seconds']:.1f}s")
        print(f"wrote {out}/rounds.json, rounds.csv, masks.npz, net.npz and run.json")
    return 0
