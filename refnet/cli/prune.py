"""``refnet prune``: prune (at initialization or after dense training), optionally repair, train, and
report signal propagation.

The pipeline of the SPP paper in one command: build a network, measure the Jacobian singular
values (JSV) at initialization, optionally train it densely first (``--pretrain-steps``: the
protocol of OBD and L-OBS, which prune a trained network), prune it (connection sensitivity, a
baseline, SynFlow, GraSP, OBD or L-OBS), measure again, optionally repair the pruned weights by
approximate isometry (``--repair ai``) and measure again, then train and report the test error.
Writes OUT/masks.npz, OUT/net.npz, OUT/history.json, OUT/summary.json, OUT/run.json and, with
matplotlib, OUT/curves.png. Every flag is checked before any work (the network is built from the
dataset's shape before any data are read); ``--out`` is refused when it holds an earlier run's
files, unless ``--overwrite`` (:func:`refnet.cli.args.claim_out`).

The pruned network comes from :func:`refnet.pruning.prune_network`: for every method but L-OBS
the masks of :func:`refnet.pruning.masks_for` (the one dispatch from a method name to its masks,
which ``refnet spectrum --prune`` uses too) on unchanged weights; for ``--method lobs`` the masks
and L-OBS's compensating update of the kept weights (:func:`refnet.saliency.obs_prune`), so
OUT/net.npz then holds updated weights.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .args import add_layerwise_argument, arch_name, check_data_flags, claim_out, dataset_name, float_in, init_name, int_at_least

__all__ = ["NAME", "HELP", "DESCRIPTION", "METHODS", "add_arguments", "run"]

NAME = "prune"
HELP = "prune (at init or after --pretrain-steps), optionally repair by approximate isometry, train and report JSV"
DESCRIPTION = (
    "Build a network, measure its Jacobian singular values, optionally train it densely\n"
    "(--pretrain-steps), prune it (connection sensitivity, a baseline, SynFlow, GraSP, OBD or\n"
    "L-OBS), optionally repair it (--repair ai), measure again, train and report the test error.\n"
    "Writes OUT/masks.npz, net.npz, history.json, summary.json, curves.png, run.json\n"
    "(an existing non-empty OUT is refused unless --overwrite)."
)

#: the files a run writes in OUT (an earlier run's are removed first with --overwrite)
OUTPUTS = ("masks.npz", "net.npz", "history.json", "summary.json", "curves.png", "run.json")

#: --method choices (refnet.pruning.NETWORK_METHODS, in its order): name -> what it scores
METHODS = {
    "snip": "connection sensitivity |dL/dc| with the true labels (SNIP)",
    "uniform": "connection sensitivity with the uniform-label loss (unsupervised)",
    "pred_raw": "connection sensitivity against the net's own initial arg-max (unsupervised)",
    "pred_softmax": "connection sensitivity against the net's own softmax held constant (degenerate: dL/dz = 0)",
    "random": "uniform random scores (baseline)",
    "magnitude": "|w| (baseline)",
    "synflow": "iterative SynFlow, data-free (100 rounds, exponential schedule)",
    "grasp": "GraSP, gradient signal preservation: keeps the largest w*(Hg) at --temperature (default 200), "
             "i.e. removes the largest of the paper's -w*(Hg)",
    "obd": "Optimal Brain Damage 1/2 H_jj w^2 with the exact Hessian diagonal (use --pretrain-steps)",
    "obd_gn": "Optimal Brain Damage with the Gauss-Newton diagonal",
    "lobs": "layer-wise Optimal Brain Surgeon: per-layer OBS saliencies of the reconstruction error and the "
            "compensating update of the kept weights (changes weights; scope layer; --damp)",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``refnet prune``."""
    from ..arch import ARCH_HELP

    p.epilog = ARCH_HELP
    g = p.add_argument_group("data and model")
    g.add_argument("--data", type=dataset_name, default="mnist5k", help="dataset (default mnist5k)")
    g.add_argument("--data-dir", default=None, help="folder of the IDX files (mnist, fashion-mnist)")
    g.add_argument("--arch", type=arch_name, default="mlp-7-tanh", help="architecture spec (default mlp-7-tanh)")
    g.add_argument("--init", type=init_name, default="orthogonal", help="initialization (default orthogonal)")
    g.add_argument("--gamma", type=float_in(0.0, lo_open=True), default=None, help="weight variance for --init sg")
    g.add_argument("--gain", type=float_in(0.0, lo_open=True), default=None, help="gain for orthogonal inits")
    g.add_argument("--sigma-b", type=float_in(0.0), default=None, help="bias std (default 0)")
    g.add_argument("--seed", type=int_at_least(0), default=0, help="seed of init, scores and batch order (default 0)")
    g = p.add_argument_group("pruning")
    g.add_argument("--method", choices=list(METHODS), default="snip",
                   help="; ".join(f"{k}: {v}" for k, v in METHODS.items()))
    g.add_argument("--sparsity", type=float_in(0.0, 1.0, hi_open=True), default=0.9, help="fraction of weights removed (default 0.9)")
    g.add_argument("--scope", choices=["global", "layer"], default=None,
                   help="rank over all layers or per layer (default: global; layer for lobs, the only scope it has)")
    g.add_argument("--score-examples", type=int_at_least(1), default=100,
                   help="training examples scored (default 100: one SNIP batch)")
    g.add_argument("--score-batch-size", type=int_at_least(1), default=None,
                   help="accumulate dL/dc over batches of this size before |.| (the SPP code: 100; "
                        "connection-sensitivity methods only)")
    g.add_argument("--temperature", type=float_in(0.0, lo_open=True), default=None,
                   help="grasp, obd, obd_gn: the loss of the logits / T (default 200 for grasp, as its code; 1 for obd)")
    g.add_argument("--damp", type=float_in(0.0), default=None,
                   help="lobs: relative damping of the layer Hessian X^T X / n (default 1e-4)")
    g.add_argument("--pretrain-steps", type=int_at_least(0), default=0,
                   help="train densely this many steps before pruning (same --lr, --batch-size, --weight-decay; "
                        "default 0: prune at initialization)")
    g.add_argument("--repair", choices=["none", "ai"], default="none", help="ai: approximate isometry of the pruned weights")
    g.add_argument("--ai-steps", type=int_at_least(1), default=10_000, help="approximate-isometry steps (default 10000)")
    g.add_argument("--ai-lr", type=float_in(0.0, lo_open=True), default=0.1, help="approximate-isometry lr (default 0.1)")
    g = p.add_argument_group("measurement and training")
    g.add_argument("--jsv-examples", type=int_at_least(1), default=1000, help="test examples for the JSV statistics (default 1000)")
    add_layerwise_argument(g)
    g.add_argument("--train-steps", type=int_at_least(0), default=2000, help="SGD steps after pruning (default 2000; 0: no training)")
    g.add_argument("--lr", type=float_in(0.0, lo_open=True), default=0.1, help="learning rate (default 0.1)")
    g.add_argument("--batch-size", type=int_at_least(1), default=100, help="mini-batch size (default 100)")
    g.add_argument("--weight-decay", type=float_in(0.0), default=0.00025, help="coefficient of sum ||mask*W||^2 (default 0.00025, as the SPP code)")
    g.add_argument("--out", default=os.path.join("runs", "prune"), help="output folder (default runs/prune)")
    g.add_argument("--overwrite", action="store_true",
                   help="write into an existing non-empty --out (the earlier run's files are removed first)")
    g.add_argument("--quiet", action="store_true", help="print only the final lines")


def _masks_npz(path, masks) -> None:
    import numpy as np

    from .._io import atomic_savez

    atomic_savez(path, {f"mask/{i}/{k}": np.asarray(v) for i, m in enumerate(masks) for k, v in m.items()})


def run(args: argparse.Namespace) -> int:
    """Run ``refnet prune``; 0 on success (bad input raises)."""
    from .. import data
    from ..arch import build, parse_arch
    from ..provenance import recording
    from ..pruning import check_method_options

    # every check before any work: the flags together, the network (from the dataset's shape)
    check_method_options(args.method, scope=args.scope, batch_size=args.score_batch_size,
                         temperature=args.temperature, damp=args.damp)
    check_data_flags(args.data, args.data_dir)
    spec = parse_arch(args.arch)
    info = data.DATASETS[args.data]
    init_kwargs = {k: v for k, v in (("gamma", args.gamma), ("gain", args.gain), ("sigma_b", args.sigma_b)) if v is not None}
    # the network from the dataset's shape, before any data are read
    net = build(args.arch, info.in_shape(flatten=spec.flat_input), info.n_classes, init=args.init, seed=args.seed,
                **init_kwargs)
    with claim_out(args.out, overwrite=args.overwrite, outputs=OUTPUTS) as out, recording(out, NAME, args):
        return _run(args, net, spec, init_kwargs, out)


def _run(args, net, spec, init_kwargs, out) -> int:
    """The work of :func:`run` in the claimed folder ``out``."""
    import numpy as np

    from .. import data
    from .._io import atomic_write_text, jsonable
    from ..isometry import approximate_isometry, format_isometry_report
    from ..pruning import UPDATE_METHODS, format_pruning_report, prune_network, pruning_report
    from ..spectrum import format_stats, jsv_stats
    from ..training import train

    say = (lambda *a, **k: None) if args.quiet else (lambda *a, **k: print(*a, **k, flush=True))
    X, y = data.load(args.data, split="train", data_dir=args.data_dir, flatten=spec.flat_input)
    Xt, yt = data.load(args.data, split="test", data_dir=args.data_dir, flatten=spec.flat_input)
    say(net.summary())
    xj = Xt[: args.jsv_examples]
    scope = args.scope or ("layer" if args.method in UPDATE_METHODS else "global")
    summary = {"arch": args.arch, "init": args.init, "init_kwargs": init_kwargs, "data": args.data, "seed": args.seed,
               "method": args.method, "sparsity": args.sparsity, "scope": scope, "repair": args.repair}
    for k in ("temperature", "damp"):
        if getattr(args, k) is not None:
            summary[k] = getattr(args, k)

    def measure(label, model):
        t = time.perf_counter()
        stats = jsv_stats(model, xj, layerwise=args.layerwise)
        say(format_stats(stats, title=f"JSV {label} ({len(xj)} test examples, {time.perf_counter() - t:.1f}s)"))
        summary[f"jsv_{label.replace(' ', '_')}"] = stats
        return stats

    measure("after init", net)
    if args.pretrain_steps:
        say(f"pretraining densely {args.pretrain_steps} steps, lr {args.lr:g}, batch {args.batch_size}")
        pre = train(net, X, y, steps=args.pretrain_steps, lr=args.lr, batch_size=args.batch_size,
                    weight_decay=args.weight_decay, seed=args.seed, X_test=Xt, y_test=yt,
                    progress=None if not args.quiet else False)  # net is trained in place
        summary.update(pretrain_steps=args.pretrain_steps, pretrain_test_error=1 - pre.final_test_acc)
        say(f"dense test error after pretraining {100 * (1 - pre.final_test_acc):.2f}%")
        measure("after pretraining", net)
    t = time.perf_counter()
    pruned = prune_network(args.method, net, args.sparsity, x=X[: args.score_examples], y=y[: args.score_examples],
                           seed=args.seed, scope=scope, batch_size=args.score_batch_size,
                           temperature=args.temperature, damp=args.damp)
    summary["prune_seconds"] = time.perf_counter() - t
    report = pruning_report(pruned)
    summary["layers"] = report
    say(format_pruning_report(report))
    _masks_npz(os.path.join(out, "masks.npz"), pruned.masks)
    measure("after pruning", pruned)
    if args.repair == "ai":
        t = time.perf_counter()
        pruned, ai = approximate_isometry(pruned, steps=args.ai_steps, lr=args.ai_lr, return_report=True)
        say(format_isometry_report(ai))
        say(f"approximate isometry: {time.perf_counter() - t:.1f}s")
        summary["ai"] = {k: v for k, v in ai.items() if k != "layers"} | {"layers": ai.get("layers")}
        measure("after repair", pruned)
    if args.train_steps:
        say(f"training {args.train_steps} steps, lr {args.lr:g}, batch {args.batch_size}, weight decay {args.weight_decay:g}")
        hist = train(pruned, X, y, steps=args.train_steps, lr=args.lr, batch_size=args.batch_size,
                     weight_decay=args.weight_decay, seed=args.seed, X_test=Xt, y_test=yt,
                     progress=None if not args.quiet else False,
                     history_path=os.path.join(out, "history.json"))
        still_pruned = all(not np.any((p[k] * ~m[k]) != (net.params[i][k] * ~m[k]))
                           for i, (p, m) in enumerate(zip(pruned.params, pruned.masks)) for k in p)
        summary.update(final_test_error=1 - hist.final_test_acc, best_test_error=hist.best_test_error,
                       best_test_step=hist.best_test_step, train_seconds=hist.wall_time,
                       pruned_weights_untouched=bool(still_pruned))
        curves = _plot_curves(os.path.join(out, "curves.png"), hist)
        if curves:
            summary["curves"] = os.path.basename(curves)
        print(f"final test error {100 * (1 - hist.final_test_acc):.2f}%, best {100 * hist.best_test_error:.2f}% "
              f"at step {hist.best_test_step}")
    pruned.save(os.path.join(out, "net.npz"))
    atomic_write_text(os.path.join(out, "summary.json"), json.dumps(jsonable(summary), indent=2, allow_nan=False))
    print(f"wrote {args.out}/summary.json, masks.npz, net.npz" + (", history.json, curves.png" if args.train_steps else ""))
    sys.stdout.flush()
    return 0


def _plot_curves(path, hist) -> str | None:
    """OUT/curves.png through :func:`refnet.plots.plot_training_curves`; None without matplotlib."""
    from .. import plots

    try:
        plots.require_matplotlib()
    except ImportError:
        return None
    return plots.plot_training_curves(hist, path)
