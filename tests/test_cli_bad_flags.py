"""Every flag of every command, given a bad value, is refused before any work: one line on stderr,
exit status 2, no traceback.

The cases are generated from the registry (:data:`refnet.cli._SUBCOMMANDS`: a command added later
is covered without editing this file) and from each parser's own actions:

* a flag with ``choices`` gets a value outside them;
* a flag with a ``type`` gets the candidates of :data:`CANDIDATES` that the type itself rejects
  (wrong types, non-finite and out-of-range numbers, malformed lists);
* a flag without a type is classified by its destination: folders (``*_dir``) get a missing
  folder and a file; ``--out`` an existing non-empty folder (and a file, where OUT is a folder);
  input files a missing and an empty file; anything else a nonsense word;
* plus the combinations no single flag shows: ``--data mnist`` without ``--data-dir``, a
  ``--data-dir`` that does not exist, ``--data-dir`` given for a bundled dataset.

"Before any work" is enforced: loading data, training, running a validation script or a
benchmark suite, or running sweep cells raises :class:`WorkStarted` (a BaseException that no
command catches), so a flag checked only after work started fails here. Runs in-process through
:func:`refnet.cli.main`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util

import numpy as np
import pytest

import refnet.cli as cli
from refnet.cli import main

#: values tried on every typed flag (those its type rejects are kept, at most MAX_PER_FLAG)
CANDIDATES = ["abc", "", "nan", "inf", "-1", "-1e300", "1.5", "0", "1e300", "2:0.1,1:0.1", "x,y"]
MAX_PER_FLAG = 4

#: commands whose --out is a file, not a folder
FILE_OUT = {"bench"}

#: commands that resume into an existing --out (a non-empty folder is not a bad value for them)
RESUMING_OUT = {"reproduce"}

#: flags that are not inputs (help) or take no value
SKIP_DESTS = {"help", "version"}

#: (command, flag, value-kind) cases that fail today in files this test does not own; strict
#: xfail, so fixing one makes the test fail until its entry is removed here
KNOWN_GAPS: dict = {}


class WorkStarted(BaseException):
    """Raised by the entry points of real work while a bad flag is being tested."""


def _stop(what):
    def stop(*args, **kwargs):
        raise WorkStarted(what)

    return stop


@pytest.fixture
def no_work(monkeypatch):
    """Any real work raises WorkStarted."""
    import refnet.data
    import refnet.training

    monkeypatch.setattr(refnet.data, "load", _stop("refnet.data.load"))
    monkeypatch.setattr(refnet.training, "train", _stop("refnet.training.train"))
    try:
        import refnet.sweep

        for name in ("_run_serial", "_run_dask"):
            if hasattr(refnet.sweep, name):
                monkeypatch.setattr(refnet.sweep, name, _stop(f"refnet.sweep.{name}"))
    except ImportError:  # pragma: no cover - sweep needs its extras
        pass
    real_import = importlib.import_module

    def guarded_import(name, package=None):
        full = importlib.util.resolve_name(name, package) if name.startswith(".") else name
        if full.startswith("refnet.validation.") or (
            full.startswith("refnet.benchmarks.") and full.rsplit(".", 1)[1] not in ("__main__", "common")
        ):
            raise WorkStarted(f"import {full}")
        return real_import(name, package)

    monkeypatch.setattr(importlib, "import_module", guarded_import)
    monkeypatch.delenv("REFNET_DATA_DIR", raising=False)


# --------------------------------------------------------------------------------------------
# the cases, generated from the registry and the parsers
# --------------------------------------------------------------------------------------------


def _actions(cmd) -> list:
    p = argparse.ArgumentParser(prog=f"refnet {cmd.name}")
    cmd.add_arguments(p)
    return [a for a in p._actions if a.dest not in SKIP_DESTS and not (a.option_strings and a.nargs == 0)]


def _flag(action) -> str:
    return action.option_strings[0] if action.option_strings else action.dest


def _bad_values(name, action) -> list[tuple[str, object]]:
    """``(kind, value)`` pairs; a value may be a callable of the work folder (paths)."""
    if action.choices is not None:
        return [("choice", "not-a-choice")]
    if action.type is not None:
        out = []
        for value in CANDIDATES:
            try:
                action.type(value)
            except (argparse.ArgumentTypeError, ValueError, TypeError):
                out.append((f"type:{value}", value))
        return out[:MAX_PER_FLAG]
    dest = action.dest
    if dest.endswith("dir"):
        return [("missing-folder", lambda d: str(d / "no-such-folder")), ("file", lambda d: str(_file(d)))]
    if dest == "out":
        kinds = [] if name in RESUMING_OUT else [("nonempty-folder", lambda d: str(_nonempty(d)))]
        if name not in FILE_OUT:
            kinds.append(("file", lambda d: str(_file(d))))
        return kinds
    if dest == "torch_module":
        return [("missing-file", lambda d: str(d / "no_such_model.py") + ":make")]
    if dest == "config":
        return [("missing-file", lambda d: str(d / "no-such-file.toml")), ("garbage-file", lambda d: str(_garbage(d)))]
    if dest in ("torch", "onnx", "npz", "weights"):
        return [("missing-file", lambda d: str(d / "no-such-file.bin")), ("empty-file", lambda d: str(_empty(d)))]
    return [("word", "bogus-value")]


def _file(d):
    f = d / "a-file.txt"
    f.write_text("x")
    return f


def _empty(d):
    f = d / "empty.bin"
    f.write_bytes(b"")
    return f


def _garbage(d):
    f = d / "garbage.toml"
    f.write_text("[[[ this is not = valid\n")
    return f


def _nonempty(d):
    f = d / "earlier-run"
    f.mkdir(exist_ok=True)
    (f / "results.txt").write_text("an earlier run")
    return f


def _audit_npz(d):
    import refnet as rn
    from refnet import audit

    net = rn.mlp([4, 3, 2], seed=0)
    x = np.random.default_rng(0).standard_normal((5, 4))
    path = d / "audit-input.npz"
    audit.write_npz(path, net, x, np.arange(5) % 2, logits=net.forward(x))
    return path


def _base(name, d, flag) -> list[str]:
    """Arguments that make the command otherwise valid (cheap settings)."""
    out = str(d / "out")
    small = ["--data", "synthetic", "--arch", "mlp-2-tanh"]
    if name == "train":
        return [*small, "--steps", "2", "--out", out]
    if name == "spectrum":
        return [*small, "--n-examples", "5", "--out", out]
    if name == "prune":
        return [*small, "--train-steps", "0", "--ai-steps", "2", "--jsv-examples", "5", "--out", out]
    if name == "reproduce":
        return ["--tiny", "--out", out]
    if name == "audit":
        source = ("--torch", "--torch-module", "--onnx", "--npz")
        return ["--out", out] if flag in source else ["--npz", str(_audit_npz(d)), "--out", out]
    if name == "bench":
        return ["--out", str(d / "bench.json")]
    if name == "sweep":
        return ["--workers", "0", "--out", out]
    return ["--out", out] if any(a.dest == "out" for a in _actions(cli._SUBCOMMANDS[name])) else []


def _cases():
    cases = []
    for name, cmd in sorted(cli._SUBCOMMANDS.items()):
        takes = {a.dest for a in _actions(cmd)}
        for action in _actions(cmd):
            for kind, value in _bad_values(name, action):
                cases.append((name, _flag(action), kind, value))
        if {"data", "data_dir"} <= takes and name != "audit":  # audit's base (--npz) takes no --data
            cases.append((name, "--data", "mnist-without-data-dir", None))
            cases.append((name, "--data-dir", "missing-for-mnist", None))
    return cases


CASES = _cases()


def _argv(name, flag, kind, value, d) -> tuple[list[str], object]:
    """The command line and the bad value it holds."""
    base = _base(name, d, flag)
    if kind == "mnist-without-data-dir":
        return [name, *base, "--data", "mnist"], None
    if kind == "missing-for-mnist":
        return [name, *base, "--data", "mnist", "--data-dir", str(d / "no-such-folder")], None
    value = value(d) if callable(value) else value
    if flag.startswith("-"):
        return [name, *base, flag, value], value
    return [name, value, *base], value  # a positional argument


def _param(case):
    name, flag, kind, _ = case
    why = KNOWN_GAPS.get((name, flag, kind))
    marks = [pytest.mark.xfail(strict=True, reason=why)] if why else []
    return pytest.param(*case, id=f"{name} {flag} {kind}", marks=marks)


@pytest.mark.parametrize("name,flag,kind,value", [_param(c) for c in CASES])
def test_bad_flag_is_one_line_exit_2_before_any_work(name, flag, kind, value, tmp_path, capsys, no_work):
    argv, value = _argv(name, flag, kind, value, tmp_path)
    try:
        rc = main(argv)
    except WorkStarted as exc:
        pytest.fail(f"refnet {' '.join(argv)}: work started ({exc}) before {flag} was checked")
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, f"exit status {rc} for refnet {' '.join(argv)}; stderr: {err}"
    assert "Traceback" not in err
    assert len(lines) == 1, f"{len(lines)} lines on stderr: {err}"
    words = {flag, flag.lstrip("-"), flag.lstrip("-").replace("-", "_"), "NAME", "COMMAND"}
    if isinstance(value, str) and value:
        words.add(value)
    if kind.endswith("mnist") or kind.startswith("mnist"):
        words |= {"--data-dir", "data_dir", "REFNET_DATA_DIR"}
    assert any(w in lines[0] for w in words), f"the message does not name {flag}: {lines[0]}"


def test_cases_cover_every_command_and_flag():
    """The generator sees every registered command and every flag that takes a value."""
    seen = {(c[0], c[1]) for c in CASES}
    for name, cmd in cli._SUBCOMMANDS.items():
        for action in _actions(cmd):
            assert (name, _flag(action)) in seen, (name, _flag(action))
    assert {"train", "spectrum", "prune", "reproduce", "audit", "bench"} <= set(cli._SUBCOMMANDS)
    assert len(CASES) > 100
