"""``refnet audit``: compare a PyTorch model, an ONNX model (or another framework's ``.npz``) with
refnet's float64 reference and write ``OUT/report.md`` and ``OUT/report.json`` (the library side is
:mod:`refnet.audit`; conventions and file formats in docs/audit.md).

Importing this module is cheap: refnet.audit is imported when the command builds its options or
runs, torch only when a ``--torch`` / ``--torch-module`` audit runs, onnx and onnxruntime only for
``--onnx``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from math import prod

from .args import CLIError, arch_name, check_data_flags, claim_out, dataset_name, float_in, int_at_least

NAME = "audit"
HELP = "compare a PyTorch or ONNX model (or another framework's .npz) with refnet's float64 reference"
DESCRIPTION = (
    "Audit what another framework computes: logits, loss, gradients, Jacobians, SNIP\n"
    "scores and masks, Jacobian singular values, in float64 and as the model runs (its own\n"
    "dtype), against refnet's float64 reference. Writes OUT/report.md and OUT/report.json;\n"
    "exit status 1 when a comparison fails (docs/audit.md)."
)

EPILOG = """\
inputs (one of):
  --torch-module FILE.py:FACTORY
                 your own model code: FILE.py is imported (importlib, from that path; its folder
                 is on sys.path while it loads) and FACTORY() must return a torch.nn.Module.
                 This runs the code in FILE.py: only use files you trust. --weights FILE loads a
                 state_dict into it (torch.load(weights_only=True), strictly). The module's
                 forward is traced with torch.fx (residual additions, BatchNorm in the module's
                 own train/eval mode, the option-A shortcut of CIFAR ResNets) and checked on a
                 probe batch before the audit; what refnet cannot reproduce (hooks, concatenations,
                 ...) is an error naming the module or graph node.
  --torch FILE   a file read with torch.load(weights_only=True): either a checkpoint written by
                 refnet.audit.save_torch_checkpoint (architecture inside) or a bare state_dict
                 with --torch-arch/--arch SPEC (the module is rebuilt as
                 refnet.audit.torch_from_arch lays it out, e.g. mlp-3-tanh: Linear, Tanh, Linear,
                 Tanh, Linear). Pruned state dicts (weight_orig/weight_mask) are supported. Whole
                 pickled modules and TorchScript files are not read (weights_only=True cannot
                 load them safely).
  --onnx FILE    an ONNX model (a protobuf; weights from its initializers), run by onnxruntime
                 as saved; the report compares its logits and layer outputs, and OUT/reference.npz
                 holds refnet's exact gradients, Jacobians and SNIP scores.
  --npz FILE     a framework-neutral file (docs/audit.md): architecture, weights, x, y and the
                 other framework's outputs.
exit status: 0 all comparisons passed, 1 a comparison failed, 2 bad arguments or input."""

#: the files a run writes in OUT (an earlier run's are removed first with --overwrite)
OUTPUTS = ("report.md", "report.json", "report.csv", "reference.npz", "run.json")


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
    src.add_argument("--torch-module", metavar="FILE.py:FACTORY", default=None,
                     help="your model code: FACTORY() in FILE.py returns the torch.nn.Module (runs FILE.py)")
    src.add_argument("--onnx", metavar="FILE", default=None, help="ONNX model, run by onnxruntime")
    src.add_argument("--npz", metavar="FILE", default=None, help="framework-neutral .npz (docs/audit.md)")
    p.add_argument("--torch-arch", "--arch", dest="torch_arch", metavar="SPEC", type=arch_name, default=None,
                   help="refnet architecture spec of a bare state_dict (e.g. mlp-7-tanh, cnn-small-relu)")
    p.add_argument("--weights", metavar="FILE", default=None,
                   help="state_dict loaded into the --torch-module model (torch.load(weights_only=True), strict)")
    p.add_argument("--in-shape", type=_shape_arg, default=None,
                   help="per-example input shape, e.g. 784 or 1,28,28 (default: from the checkpoint or the dataset)")
    p.add_argument("--data", type=dataset_name, default=None, help="dataset for the torch audit: mnist5k (default), digits, mnist, fashion-mnist, cifar10, mnist5k-32, "
                        "synthetic")
    p.add_argument("--data-dir", default=None, help="folder of the IDX files (mnist, fashion-mnist) or the CIFAR-10 binary batch files (cifar10)")
    p.add_argument("--split", default="train", choices=["train", "test"], help="data split (default train)")
    p.add_argument("--mode", default=None, choices=["train", "eval"],
                   help="run the PyTorch module in this mode (BatchNorm: batch or running statistics; default: the "
                        "mode the factory or --arch gives it)")
    p.add_argument("--n", type=_n_arg, default=100, help="number of examples (default 100)")
    p.add_argument("--loss", default="cross_entropy", choices=list(LOSSES), help="loss (default cross_entropy)")
    p.add_argument("--sparsity", type=_sparsity_arg, default=None, help="sparsity of the SNIP masks compared (default 0.9)")
    p.add_argument("--rtol", type=_pos_float, default=DEFAULT_RTOL, help=f"float64 tolerance (default {DEFAULT_RTOL:g})")
    p.add_argument("--rtol-as-run", type=_pos_float, default=None, help="as-run tolerance (default by dtype: float32 1e-4)")
    p.add_argument("--no-as-run", action="store_true", help="skip the audit of the model in its own dtype")
    p.add_argument("--no-jacobian", action="store_true", help="skip the Jacobians and their singular values")
    p.add_argument("--out", default=os.path.join("runs", "audit"), help="folder for report.md and report.json (default runs/audit)")
    p.add_argument("--overwrite", action="store_true", help="write into an existing non-empty --out (the earlier run's files are removed first)")
    p.add_argument("--quiet", action="store_true", help="print only the result line")


def load_factory(spec: str):
    """The ``torch.nn.Module`` that ``FACTORY()`` returns, ``spec = "FILE.py:FACTORY"``: FILE.py is
    imported with importlib from its path (its folder first on ``sys.path`` while it loads). This
    runs the user's own code."""
    from ..audit.fx import import_torch

    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name.isidentifier():
        raise CLIError(f"argument --torch-module: expected FILE.py:FACTORY, got {spec!r}")
    if not os.path.isfile(path):
        raise CLIError(f"argument --torch-module: {path!r} does not exist")
    torch = import_torch()
    folder = os.path.dirname(os.path.abspath(path))
    mod_name = f"_refnet_audit_user_{abs(hash(os.path.abspath(path)))}"
    sys.path.insert(0, folder)
    try:
        spec_ = importlib.util.spec_from_file_location(mod_name, path)
        if spec_ is None or spec_.loader is None:
            raise CLIError(f"argument --torch-module: {path!r} cannot be imported as a Python file")
        module = importlib.util.module_from_spec(spec_)
        sys.modules[mod_name] = module
        spec_.loader.exec_module(module)
        factory = getattr(module, name, None)
        if not callable(factory):
            raise CLIError(f"argument --torch-module: {path!r} has no callable {name!r}")
        model = factory()
    except CLIError:
        raise
    except Exception as exc:  # the user's code may raise anything
        raise CLIError(f"argument --torch-module: importing {path!r} or calling {name}() failed: "
                       f"{type(exc).__name__}: {exc}") from None
    finally:
        if sys.path and sys.path[0] == folder:
            sys.path.pop(0)
    if not isinstance(model, torch.nn.Module):
        raise CLIError(f"argument --torch-module: {name}() returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _examples(args, in_shape, n=None):
    """The first ``n`` (default ``--n``) examples of ``--data``, reshaped to ``in_shape``."""
    from .. import data as _data_mod

    name = args.data or "mnist5k"  # --data was checked by the parser
    info = _data_mod.DATASETS[name]
    if prod(in_shape) != info.n_features:
        raise CLIError(f"argument --in-shape: {tuple(in_shape)} does not hold the {info.n_features} features of {name}")
    X, y = _data_mod.load(name, split=args.split, data_dir=args.data_dir)
    n = min(args.n, len(X)) if n is None else n
    if n > len(X):
        raise CLIError(f"argument --data: the model needs {n} examples, {name} {args.split} has {len(X)}")
    return X[:n].reshape((n, *in_shape)), y[:n], f"{name} {args.split}[:{n}]"


def _run_onnx(args, out):
    from ..audit import compare_onnx, write_npz
    from ..audit.onnx import convert_onnx

    layout = convert_onnx(args.onnx, args.in_shape)
    in_shape = tuple(layout.net.in_shape)
    X, y, what = _examples(args, in_shape, n=layout.batch)
    report = compare_onnx(args.onnx, X, y, args.loss, sparsity=0.9 if args.sparsity is None else args.sparsity,
                          rtol=args.rtol, rtol_as_run=args.rtol_as_run, in_shape=in_shape, jacobian=not args.no_jacobian)
    report.meta.update({"onnx_file": os.path.abspath(args.onnx), "data": what})
    ref = report.reference
    os.makedirs(out, exist_ok=True)
    npz = os.path.join(out, "reference.npz")
    write_npz(npz, ref.net, ref.x, ref.y, loss_fn=ref.loss_name, sparsity=report.meta["sparsity"], logits=ref.logits,
              loss=ref.loss, grads=ref.grads, jacobian=ref.jac, cs_scores=ref.scores, masks=ref.masks, acts=ref.acts)
    return report, npz


def _audit(args, out: str):
    """The audit itself, after every flag was checked: ``(report, extra)`` (extra: the path of
    refnet's reference results, ONNX only)."""
    from .. import data as _data
    from ..audit import compare_npz, compare_torch, load_torch_checkpoint

    extra = None
    if args.npz is not None:
        report = compare_npz(args.npz, rtol=args.rtol, rtol_as_run=args.rtol_as_run, sparsity=args.sparsity,
                             jacobian=False if args.no_jacobian else None)
    elif args.onnx is not None:
        report, extra = _run_onnx(args, out)
    elif args.torch_module is not None:
        from ..audit import load_torch_state
        from ..audit.fx import infer_in_shape

        module = load_factory(args.torch_module)
        if args.weights is not None:
            module = load_torch_state(module, args.weights)
        if args.mode is not None:
            module.train(args.mode == "train")
        in_shape = args.in_shape
        if in_shape is None:
            in_shape = infer_in_shape(module)
        if in_shape is None:  # the dataset's image shape
            in_shape = _data.DATASETS[args.data or "mnist5k"].in_shape(flatten=False)
        X, y, what = _examples(args, in_shape)
        report = compare_torch(module, X, y, args.loss, sparsity=0.9 if args.sparsity is None else args.sparsity,
                               rtol=args.rtol, rtol_as_run=args.rtol_as_run,
                               dtype_as_run=False if args.no_as_run else None, jacobian=not args.no_jacobian)
        report.meta.update({"torch_module": args.torch_module, "data": what}
                           | ({"weights": os.path.abspath(args.weights)} if args.weights else {}))
    else:
        name = args.data or "mnist5k"  # --data and --torch-arch were checked by the parser
        info = _data.DATASETS[name]
        in_shape = args.in_shape
        if in_shape is None and args.torch_arch is not None:
            from ..arch import parse_arch

            in_shape = info.in_shape(flatten=parse_arch(args.torch_arch).flat_input)
        module, meta = load_torch_checkpoint(args.torch, arch=args.torch_arch, in_shape=in_shape, n_classes=info.n_classes
                                             if args.torch_arch is not None else None)
        if args.mode is not None:
            module.train(args.mode == "train")
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
    return report, extra


def run(args: argparse.Namespace) -> int:
    """Run ``refnet audit``; 0 when every comparison passed, 1 otherwise (bad input raises)."""
    from ..provenance import recording

    out = args.out
    if args.torch_arch is not None and (args.onnx or args.torch_module):
        raise CLIError("argument --torch-arch: only used with --torch (a bare state_dict)")
    if args.mode is not None and (args.onnx or args.npz):
        raise CLIError("argument --mode: only used with --torch or --torch-module (an ONNX graph or .npz fixes its mode)")
    if args.no_as_run and args.onnx:
        raise CLIError("argument --no-as-run: the ONNX audit is the audit as onnxruntime runs the model")
    if args.weights is not None and args.torch_module is None:
        raise CLIError("argument --weights: only used with --torch-module")
    if args.npz is not None:
        for opt in ("torch_arch", "data", "in_shape"):
            if getattr(args, opt) is not None:
                raise CLIError(f"argument --{opt.replace('_', '-')}: not used with --npz (the file holds everything)")
    elif args.data is not None or args.data_dir is not None:
        check_data_flags(args.data or "mnist5k", args.data_dir)
    if args.npz is not None and args.data_dir is not None:
        raise CLIError("argument --data-dir: not used with --npz (the file holds everything)")
    with claim_out(out, overwrite=args.overwrite, outputs=OUTPUTS) as folder, recording(folder, NAME, args):
        report, extra = _audit(args, os.fspath(folder))
        md, js = report.save(folder)
    if args.quiet:
        print(f"refnet audit: {'PASSED' if report.passed else 'FAILED'} ({len(report.failures())} of {len(report.checks)} checks failed)")
    else:
        print(report.summary())
        print(f"wrote {md} and {js}" + (f", and refnet's exact gradients, Jacobians and SNIP scores to {extra}" if extra else ""))
    return 0 if report.passed else 1
