"""The layout rules of the code base, checked on its source (DESIGN.md, "one home per concern").

* ``argparse`` is imported only under ``refnet/cli/`` (and ``benchmarks/``, a program of its own):
  the command line is the only place that parses arguments.
* No module imports another module's ``_private`` name (``from X import _name`` with X a module of
  the project); at most :data:`MAX_PRIVATE_IMPORTS` exceptions, each on a line with a
  ``# private import: <why>`` comment. Private *modules* (``from . import _threads``,
  ``from ._io import atomic_write``) are not private names: a package may use its own.
* ``refnet --help`` (and every ``refnet COMMAND --help``) imports neither matplotlib, numba, torch
  nor jax: commands import their library code when they run.

The scanners are tested on a small planted tree first, so a scanner that stops seeing anything
fails here rather than passing silently.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: repository folder -> the package it is installed as (pyproject.toml's package-dir)
PACKAGES = {"refnet": "refnet", "kernels": "refnet.kernels", "validation": "refnet.validation", "benchmarks": "refnet.benchmarks"}

#: folders where argparse may be imported (relative to the repository root)
ARGPARSE_HOMES = ("refnet/cli", "benchmarks")

#: cross-module private imports allowed, each with a "# private import: <why>" comment
MAX_PRIVATE_IMPORTS = 5
PRIVATE_TAG = "# private import:"

#: top-level packages `refnet --help` must not import
HEAVY = ("matplotlib", "numba", "torch", "jax", "jaxlib", "flax", "cupy")


# --------------------------------------------------------------------------------------------
# scanners
# --------------------------------------------------------------------------------------------


def _python_files(root: Path, folders) -> list[Path]:
    return sorted(p for d in folders for p in (root / d).rglob("*.py") if "__pycache__" not in p.parts)


def _module_name(root: Path, path: Path) -> tuple[str, bool]:
    """``(dotted installed name, is a package __init__)`` of a source file."""
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    is_pkg = parts[-1] == "__init__"
    if is_pkg:
        parts = parts[:-1]
    return ".".join([PACKAGES[parts[0]], *parts[1:]]), is_pkg


def _module_dir(root: Path, dotted: str) -> Path | None:
    """The source folder of package ``dotted`` (None when it is not a package of the project)."""
    for folder, pkg in sorted(PACKAGES.items(), key=lambda kv: -len(kv[1])):
        if dotted == pkg or dotted.startswith(pkg + "."):
            rest = dotted[len(pkg):].lstrip(".")
            return root / folder / Path(*rest.split(".")) if rest else root / folder
    return None


def _resolve(root: Path, path: Path, node: ast.ImportFrom) -> str | None:
    """The installed name of the module ``node`` imports from, or None outside the project."""
    if node.level:
        name, is_pkg = _module_name(root, path)
        base = name.split(".") if is_pkg else name.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
        top = target.split(".")[0]
        if top in PACKAGES and top != "refnet":  # `from kernels import ...` run from the repository
            target = PACKAGES[top] + target[len(top):]
    return target if _module_dir(root, target) is not None or target.split(".")[0] == "refnet" else None


def argparse_imports(root: Path, folders=("refnet", "kernels", "validation")) -> list[str]:
    """``path:line`` of every import of argparse outside :data:`ARGPARSE_HOMES`."""
    found = []
    for path in _python_files(root, folders):
        rel = path.relative_to(root).as_posix()
        if any(rel.startswith(home + "/") for home in ARGPARSE_HOMES):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            if any(n == "argparse" or n.startswith("argparse.") for n in names):
                found.append(f"{rel}:{node.lineno}")
    return found


def private_imports(root: Path, folders=tuple(PACKAGES)) -> list[dict]:
    """Every ``from X import _name`` where X is a project module and ``_name`` is not a module of
    it: ``{"where": "path:line", "what": "X._name", "why": comment or None}``."""
    found = []
    for path in _python_files(root, folders):
        lines = path.read_text().splitlines()
        rel = path.relative_to(root).as_posix()
        for node in ast.walk(ast.parse("\n".join(lines), str(path))):
            if not isinstance(node, ast.ImportFrom):
                continue
            target = _resolve(root, path, node)
            if target is None:
                continue
            folder = _module_dir(root, target)
            for alias in node.names:
                name = alias.name
                if not name.startswith("_") or name.startswith("__"):
                    continue
                if folder is not None and ((folder / f"{name}.py").exists() or (folder / name / "__init__.py").exists()):
                    continue  # a private module of a package, not a private name
                line_no = getattr(alias, "lineno", node.lineno)
                why = None
                for text in {lines[line_no - 1], lines[node.lineno - 1]}:
                    if PRIVATE_TAG in text:
                        why = text.split(PRIVATE_TAG, 1)[1].strip()
                found.append({"where": f"{rel}:{line_no}", "what": f"{target}.{name}", "why": why})
    return found


# --------------------------------------------------------------------------------------------
# the scanners see what they should (a planted tree)
# --------------------------------------------------------------------------------------------


def _plant(tmp_path: Path) -> Path:
    files = {
        "refnet/__init__.py": "",
        "refnet/_io.py": "def _helper():\n    pass\n",
        "refnet/good.py": "from ._io import atomic_write\nfrom . import _io\nfrom .cli import args\n",
        "refnet/bad.py": "import os\ndef f():\n    import argparse\n    from .cli.args import _secret, fine\n",
        "refnet/tagged.py": "from ._io import (\n    public,\n    _helper,  # private import: the test needs it\n)\n",
        "refnet/cli/__init__.py": "import argparse\n",
        "refnet/cli/args.py": "from argparse import ArgumentParser\n",
        "kernels/__init__.py": "from . import _threads\nfrom .engine import _check\n",
        "kernels/_threads.py": "",
        "kernels/engine.py": "from argparse import Namespace\nfrom numpy import _private_of_numpy\n",
        "validation/common.py": "from refnet.spectrum import _check_x\n",
        "benchmarks/__init__.py": "",
        "benchmarks/kernels.py": "import argparse\n",
        "benchmarks/gpu.py": "from .kernels import _time\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


def test_the_scanners_find_what_is_planted(tmp_path):
    # planted bugs seen failing: scanning only top-level statements (misses the import inside f);
    # resolving relative imports one package too high
    root = _plant(tmp_path)
    assert argparse_imports(root) == ["kernels/engine.py:1", "refnet/bad.py:3"]
    found = {(p["where"], p["what"], p["why"]) for p in private_imports(root)}
    assert found == {
        ("benchmarks/gpu.py:1", "refnet.benchmarks.kernels._time", None),
        ("kernels/__init__.py:2", "refnet.kernels.engine._check", None),
        ("refnet/bad.py:4", "refnet.cli.args._secret", None),
        ("refnet/tagged.py:3", "refnet._io._helper", "the test needs it"),
        ("validation/common.py:1", "refnet.spectrum._check_x", None),
    }


# --------------------------------------------------------------------------------------------
# the rules, on the real tree
# --------------------------------------------------------------------------------------------


def test_argparse_only_in_the_command_line():
    found = argparse_imports(ROOT)
    assert not found, f"argparse imported outside {', '.join(ARGPARSE_HOMES)}: {found}"


def test_no_module_imports_another_modules_private_names():
    found = private_imports(ROOT)
    for p in found:
        print(f"{p['where']}: {p['what']}" + (f"  (why: {p['why']})" if p["why"] else "  (no '# private import:' comment)"))
    untagged = [f"{p['where']} {p['what']}" for p in found if not p["why"]]
    tagged = [p for p in found if p["why"]]
    assert not untagged, (
        "private names imported from another module (make the name public in the lower module, or tag "
        f"the line '{PRIVATE_TAG} <why>'): {untagged}"
    )
    assert len(tagged) <= MAX_PRIVATE_IMPORTS, f"{len(tagged)} tagged private imports, at most {MAX_PRIVATE_IMPORTS}: {tagged}"


HELP_PROBE = """
import contextlib, io, json, sys
from refnet.cli import COMMAND_MODULES, main
codes = {}
for argv in [["--help"]] + [[m.NAME, "--help"] for m in COMMAND_MODULES]:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        codes[" ".join(argv)] = main(argv)
loaded = sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[1:]))
print(json.dumps({"codes": codes, "loaded": loaded}))
"""


def test_help_imports_no_heavy_library():
    # planted bug seen failing: `import matplotlib` at the top of refnet/cli/train.py
    r = subprocess.run([sys.executable, "-c", HELP_PROBE, *HEAVY], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(out["codes"].values()) == {0} and len(out["codes"]) >= 7, out["codes"]
    assert out["loaded"] == [], f"`refnet --help` imported {out['loaded']}"

