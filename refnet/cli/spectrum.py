"""``refnet spectrum``: Jacobian singular values and layerwise dynamical isometry of one or more
initialisations (the library side is :mod:`refnet.spectrum`).

Writes ``OUT/stats.json`` (strict JSON: an infinite condition number is the string "inf"),
``OUT/run.json`` and, with matplotlib, the PNGs of :mod:`refnet.plots`. Every flag is checked
before any work (the networks are built from the dataset's shape before any data are read);
``--out`` is refused when it holds an earlier run's files, unless ``--overwrite``
(:func:`refnet.cli.args.claim_out`).
"""

from __future__ import annotations

import argparse
import json
import os
import time

from .args import add_layerwise_argument, arch_name, check_data_flags, claim_out, dataset_name, float_in, float_list, int_at_least

NAME = "spectrum"
HELP = "Jacobian singular values and layerwise dynamical isometry of one or more initializations"
DESCRIPTION = (
    "For each initialization, build the network, optionally prune it, and compute the\n"
    "singular values of the input-output Jacobian of every example (pooled mean, std, min, max,\n"
    "CN = max/min as the SPP tables; CN mean over examples as [DI]) and, optionally, of every layer Jacobian\n"
    "(fraction within epsilon of 1: layerwise dynamical isometry) with --layerwise. Writes OUT/stats.json\n"
    "and PNGs."
)

#: --prune choices (a subset of refnet.pruning.METHODS)
PRUNE_METHODS = ("snip", "random", "magnitude")

#: examples of the training split that snip scores
SCORE_EXAMPLES = 100

#: the files a run writes in OUT (an earlier run's are removed first with --overwrite)
OUTPUTS = ("stats.json", "jsv_hist.png", "jsv_ecdf.png", "layer_bands.png", "run.json")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``refnet spectrum``."""
    from ..arch import ARCH_HELP

    _positive_float, _nonneg_float = float_in(0.0, lo_open=True), float_in(0.0)
    p.epilog = ARCH_HELP
    g = p.add_argument_group("data and model")
    g.add_argument("--data", type=dataset_name, default="mnist5k",
                   help="dataset: mnist5k (default), digits, mnist, fashion-mnist, synthetic")
    g.add_argument("--data-dir", default=None, help="folder of the IDX files (mnist, fashion-mnist)")
    g.add_argument("--split", default="test", choices=["train", "test", "all"],
                   help="split the examples are taken from (default test)")
    g.add_argument("--n-examples", type=int_at_least(1), default=1000,
                   help="number of examples (the first ones of the split; default 1000, capped at the split size)")
    g.add_argument("--arch", type=arch_name, default="mlp-7-tanh", help="architecture spec (default mlp-7-tanh; see below)")
    g.add_argument("--init", action="append", default=None, metavar="NAME[,NAME...]",
                   help="initialisation(s) to compare: lecun|glorot|he|sg|orthogonal|delta_orthogonal or "
                        "vs-l|vs-g|vs-h|ldi; repeat the option or separate by commas (default orthogonal)")
    g.add_argument("--gamma", action="append", type=float_list(_positive_float), default=None, metavar="G[,G...]",
                   help="weight variance of --init sg; several values (repeated or comma-separated) give one "
                        "sg run each")
    g.add_argument("--gain", type=_positive_float, default=None, help="gain of the orthogonal inits (default 1)")
    g.add_argument("--sigma-b", type=_nonneg_float, default=None, help="bias std of every init (default 0)")
    g.add_argument("--seed", type=int_at_least(0), default=0, help="seed of the init and of the pruning mask (default 0)")
    g = p.add_argument_group("pruning")
    g.add_argument("--sparsity", type=float_in(0.0, 1.0, hi_open=True), default=None,
                   help="prune this fraction of all weights (global) before measuring; default: no pruning")
    g.add_argument("--prune", default="snip", choices=list(PRUNE_METHODS),
                   help="pruning method for --sparsity (refnet.pruning; exactly round(m*(1-sparsity)) of the m "
                        f"weights kept, biases kept): snip scores the first {SCORE_EXAMPLES} training examples (default)")
    g = p.add_argument_group("measurement and output")
    g.add_argument("--batch-size", type=int_at_least(1), default=100, help="examples per Jacobian batch (default 100)")
    g.add_argument("--epsilon", type=_nonneg_float, default=0.1,
                   help="layerwise dynamical isometry tolerance |1 - sigma| <= epsilon (default 0.1)")
    add_layerwise_argument(g)
    g.add_argument("--out", default=os.path.join("runs", "spectrum"),
                   help="output folder for stats.json and the plots (default runs/spectrum)")
    g.add_argument("--overwrite", action="store_true",
                   help="write into an existing non-empty --out (the earlier run's files are removed first)")


def init_runs(args: argparse.Namespace) -> list[tuple[str, str, dict]]:
    """``(label, init name, init kwargs)`` for every run ``--init``, ``--gamma``, ``--gain`` and
    ``--sigma-b`` ask for (one run per sg gamma); a combination that does not apply raises
    ``ValueError`` naming the option."""
    from ..init import get_initializer

    names = []
    for item in args.init or ["orthogonal"]:
        names += [t.strip() for t in item.split(",") if t.strip()]
    if not names:
        raise ValueError("argument --init: no initialisation given")
    gammas = [g for gs in (args.gamma or []) for g in gs]
    runs, used = [], set()
    for name in names:
        try:
            try:
                ini = get_initializer(name)
            except ValueError:
                ini = get_initializer(name, gamma=1.0)  # sg needs a gamma to resolve
        except (ValueError, TypeError) as exc:
            raise ValueError(f"argument --init: {exc}") from None
        allowed = set(ini.kwargs)
        kw = {}
        if args.sigma_b is not None:
            kw["sigma_b"] = args.sigma_b
        if args.gain is not None and "gain" in allowed:
            kw["gain"] = args.gain
            used.add("gain")
        if "gamma" in allowed:
            if not gammas:
                raise ValueError(f"argument --gamma: init {name!r} needs the weight variance --gamma, got none")
            used.add("gamma")
            for g in gammas:
                runs.append((f"{name}(gamma={g:g})", name, {**kw, "gamma": g}))
            continue
        label = name + (f"(gain={args.gain:g})" if "gain" in kw else "")
        runs.append((label, name, kw))
    if gammas and "gamma" not in used:
        raise ValueError(f"argument --gamma: applies only to --init sg, got inits {names}")
    if args.gain is not None and "gain" not in used:
        raise ValueError(f"argument --gain: applies only to orthogonal inits, got inits {names}")
    labels = [r[0] for r in runs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"argument --init: the same initialisation is asked for twice: {labels}")
    return runs


def run(args: argparse.Namespace) -> int:
    """Run ``refnet spectrum``; returns the exit status (0 on success).

    Bad arguments raise ``ValueError`` or :class:`~refnet.cli.args.CLIError` naming the option
    (:func:`refnet.cli.main` prints it, status 2).
    """
    from .. import data
    from ..arch import build, parse_arch

    # every check before any work: the flags together, the networks (from the dataset's shape)
    check_data_flags(args.data, args.data_dir)
    spec = parse_arch(args.arch)
    runs = init_runs(args)
    name = args.data
    info = data.DATASETS[name]
    in_shape = info.in_shape(flatten=spec.flat_input)
    nets = {label: build(args.arch, in_shape, info.n_classes, init=init, seed=args.seed, **kw) for label, init, kw in runs}
    with claim_out(args.out, overwrite=args.overwrite, outputs=OUTPUTS) as out:
        from ..provenance import recording

        with recording(out, NAME, args):
            return _run(args, out, spec, runs, nets)


def _run(args, out, spec, runs, nets) -> int:
    """The work of :func:`run` once every flag is checked and ``out`` is claimed."""
    from .. import data
    from .._io import atomic_write_text, jsonable
    from ..pruning import DATA_METHODS, masks_for
    from ..spectrum import collect_singular_values, format_stats, layer_label, summarize

    out = os.fspath(out)
    name = args.data
    X, _ = data.load(name, split=args.split, data_dir=args.data_dir, flatten=spec.flat_input)
    n = min(args.n_examples, X.shape[0])
    if n < args.n_examples:
        print(f"note: the {args.split} split of {name} has {X.shape[0]} examples; using all of them")
    X = X[:n]
    print(f"data: {name} {args.split} split, {n} examples of shape {X.shape[1:]}; arch: {args.arch}")
    scored = (None, None)
    if args.sparsity is not None:
        print(f"pruning: {args.prune}, sparsity {args.sparsity:g} (global, biases kept), seed {args.seed}")
        if args.prune in DATA_METHODS:
            Xs, ys = data.load(name, split="train", data_dir=args.data_dir, flatten=spec.flat_input)
            scored = (Xs[:SCORE_EXAMPLES], ys[:SCORE_EXAMPLES])

    results, spectra, layer_spectra = {}, {}, {}
    for label, init, kw in runs:
        t0 = time.perf_counter()
        net = nets[label]
        if args.sparsity is not None:
            net = net.with_masks(masks_for(args.prune, net, args.sparsity, x=scored[0], y=scored[1], seed=args.seed))
        sv, lsv = collect_singular_values(net, X, batch_size=args.batch_size, layerwise=args.layerwise, progress=None)
        K = net.n_layers
        stats = summarize(sv, lsv, epsilon=args.epsilon, layers=list(range(1, K + 1)),
                          layer_names=[layer_label(net, l) for l in range(K)])
        stats.update(start=0, end=K, init=init, init_kwargs=kw, density=net.density(),
                     seconds=round(time.perf_counter() - t0, 3))
        results[label] = stats
        spectra[label] = sv.ravel()
        if lsv is not None:
            layer_spectra[label] = lsv
        print()
        print(format_stats(stats, title=label))

    doc = {
        "command": "spectrum",
        "arch": args.arch,
        "data": name,
        "split": args.split,
        "n_examples": n,
        "seed": args.seed,
        "sparsity": args.sparsity,
        "prune": args.prune if args.sparsity is not None else None,
        "epsilon": args.epsilon,
        "layerwise": args.layerwise,
        "results": results,
    }
    stats_path = os.path.join(out, "stats.json")
    atomic_write_text(stats_path, json.dumps(jsonable(doc), indent=2, allow_nan=False) + "\n")  # strict JSON: inf -> "inf"
    print()
    print(f"wrote {stats_path}")

    from .. import plots

    try:
        plots.require_matplotlib()
    except ImportError as exc:
        print(f"note: no plots ({exc})")
        return 0
    what = "dx^K/dx^0" + (f", {args.prune} pruning at sparsity {args.sparsity:g}" if args.sparsity is not None else "")
    paths = [
        plots.plot_jsv_histograms(spectra, os.path.join(out, "jsv_hist.png"),
                                  title=f"Input-output Jacobian singular values ({what}), {args.arch}, {n} examples"),
        plots.plot_jsv_ecdf(spectra, os.path.join(out, "jsv_ecdf.png"),
                            title=f"Empirical CDF of the input-output JSV ({what}), {args.arch}"),
    ]
    if layer_spectra:
        paths.append(plots.plot_layer_bands(layer_spectra, os.path.join(out, "layer_bands.png"),
                                            title=f"Layer Jacobian singular values J^(l-1,l), {args.arch}, {n} examples"))
    for p in paths:
        print(f"wrote {p}")
    return 0
