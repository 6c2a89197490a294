"""``refnet audit``: compare a PyTorch model (or another framework's ``.npz``) with refnet's float64
reference and write ``OUT/report.md`` and ``OUT/report.json`` (the library side is
:mod:`refnet.audit`; conventions and file formats in docs/audit.md).

Importing this module is cheap: refnet.audit is imported when the command builds its options or
runs, torch only when a ``--torch`` audit runs.
"""

from __future__ import annotations

import argparse
import os
from math import prod

from .args import CLIError, arch_name, dataset_name, float_in, int_at_least

NAME = "audit"
HELP = "compare a PyTorch model (or another framework's .npz) with refnet's float64 reference"
DESCRIPTION = (
    "Audit what another framework computes: logits, loss, gradients, Jacobians, SNIP\n"
    "scores and masks, Jacobian singular values, in float64 and as the model runs (its own\n"
    "dtype), against refnet's float64 reference. Writes OUT/report.md and OUT/report.json;\n"
    "exit status 1 when a comparison fails (docs/audit.md)."
)

EPILOG = """\
inputs:
  --torch FILE   a file read with torch.load(weights_only=True): either a checkpoint written by
                 refnet.audit.save_torch_checkpoint (architecture inside) or a bare state_dict
                 with --torch-arch SPEC (the module is rebuilt as refnet.audit.torch_from_arch
                 lays it out, e.g. mlp-3-tanh: Linear, Tanh, Linear, Tanh, Linear). Pruned
                 state dicts (weight_orig/weight_mask) are supported. Whole pickled modules and
                 TorchScript files are not read (weights_only=True cannot load them safely).
  --npz FILE     a framework-neutral file (docs/audit.md): architecture, weights, x, y and the
                 other framework's outputs.
exit status: 0 all comparisons passed, 1 a comparison failed, 2 bad arguments or input."""


def _shape_arg(text: str) -> tuple:
    from ..audit.reference import parse_shape

    try:
        return parse_shape(text, "in-shape")
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be comma-separated positive ints such as 1,28,28, got {text!r}") from None


_pos_float = float_in(0.0, lo_open=True)
_sparsity_arg = float_in(0.0, 1.0, hi_open=True)
_n_arg = int_at_least(1)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``refnet audit``."""
    from ..audit.reference import DEFAULT_RTOL, LOSSES  # the defaults and choices of the library

    p.epilog = EPILOG
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--torch", "--torch-state", dest="torch", metavar="FILE", default=None,
                     help="PyTorch checkpoint or state_dict (torch.load(weights_only=True))")
    src.add_argument("--npz", metavar="FILE", default=None, help="framework-neutral .npz (docs/audit.md)")
    p.add_argument("--torch-arch", metavar="SPEC", type=arch_name, default=None,
                   help="refnet architecture spec of a bare state_dict (e.g. mlp-7-tanh, cnn-small-relu)")
    p.add_argument("--in-shape", type=_shape_arg, default=None,
                   help="per-example input shape, e.g. 784 or 1,28,28 (default: from the checkpoint or the dataset)")
    p.add_argument("--data", type=dataset_name, default=None, help="dataset for the torch audit: mnist5k (default), digits, mnist, fashion-mnist, synthetic")
    p.add_argument("--data-dir", default=None, help="folder of the IDX files (mnist, fashion-mnist)")
    p.add_argument("--split", default="train", choices=["train", "test"], help="data split (default train)")
    p.add_argument("--n", type=_n_arg, default=100, help="number of examples (default 100)")
    p.add_argument("--loss", default="cross_entropy", choices=list(LOSSES), help="loss (default cross_entropy)")
    p.add_argument("--sparsity", type=_sparsity_arg, default=None, help="sparsity of the SNIP masks compared (default 0.9)")
    p.add_argument("--rtol", type=_pos_float, default=DEFAULT_RTOL, help=f"float64 tolerance (default {DEFAULT_RTOL:g})")
    p.add_argument("--rtol-as-run", type=_pos_float, default=None, help="as-run tolerance (default by dtype: float32 1e-4)")
    p.add_argument("--no-as-run", action="store_true", help="skip the audit of the model in its own dtype")
    p.add_argument("--no-jacobian", action="store_true", help="skip the Jacobians and their singular values")
    p.add_argument("--out", default=os.path.join("runs", "audit"), help="folder for report.md and report.json (default runs/audit)")
    p.add_argument("--quiet", action="store_true", help="print only the result line")


def run(args: argparse.Namespace) -> int:
    """Run ``refnet audit``; 0 when every comparison passed, 1 otherwise (bad input raises)."""
    from .. import data as _data
    from ..audit import compare_npz, compare_torch, load_torch_checkpoint

    out = args.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise CLIError(f"argument --out: {out!r} exists and is not a folder")
    if args.npz is not None:
        for opt in ("torch_arch", "data", "in_shape"):
            if getattr(args, opt) is not None:
                raise CLIError(f"argument --{opt.replace('_', '-')}: not used with --npz (the file holds everything)")
        report = compare_npz(args.npz, rtol=args.rtol, rtol_as_run=args.rtol_as_run, sparsity=args.sparsity,
                             jacobian=False if args.no_jacobian else None)
    else:
        name = args.data or "mnist5k"  # --data and --torch-arch were checked by the parser
        info = _data.DATASETS[name]
        in_shape = args.in_shape
        if in_shape is None and args.torch_arch is not None:
            from ..arch import parse_arch

            in_shape = info.in_shape(flatten=parse_arch(args.torch_arch).flat_input)
        module, meta = load_torch_checkpoint(args.torch, arch=args.torch_arch, in_shape=in_shape, n_classes=info.n_classes
                                             if args.torch_arch is not None else None)
        in_shape = tuple(meta["in_shape"])
        if prod(in_shape) != info.n_features:
            raise CLIError(f"argument --in-shape: {in_shape} does not hold the {info.n_features} features of {name}")
        X, y = _data.load(name, split=args.split, data_dir=args.data_dir)
        n = min(args.n, len(X))
        X = X[:n].reshape((n, *in_shape))
        y = y[:n]
        report = compare_torch(module, X, y, args.loss, sparsity=0.9 if args.sparsity is None else args.sparsity,
                               rtol=args.rtol, rtol_as_run=args.rtol_as_run,
                               dtype_as_run=False if args.no_as_run else None, jacobian=not args.no_jacobian)
        report.meta.update({"torch_file": os.path.abspath(args.torch), "arch": meta["arch"], "data": f"{name} {args.split}[:{n}]"})
    md, js = report.save(out)
    if args.quiet:
        print(f"refnet audit: {'PASSED' if report.passed else 'FAILED'} ({len(report.failures())} of {len(report.checks)} checks failed)")
    else:
        print(report.summary())
        print(f"wrote {md} and {js}")
    return 0 if report.passed else 1
