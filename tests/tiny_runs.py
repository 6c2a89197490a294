"""Shared harness of the validation-script tests: --tiny runs into a folder and their outputs."""

from __future__ import annotations

import json

import pytest

#: the header of every script's paper-vs-refnet table
HEADER = "| check | paper | refnet | agreement criterion | holds? |"


def run_tiny(module, out) -> int:
    """``module.main`` in --tiny mode, writing under ``out``; its exit status."""
    return module.main(["--tiny", "--out", str(out), "--no-progress"])


def run_all(tmp_path_factory, modules, name: str):
    """One --tiny run of each module into a fresh folder, with the data cache kept there too
    (out of the home folder): ``(out, {NAME: exit status})``."""
    out = tmp_path_factory.mktemp(name)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REFNET_CACHE_DIR", str(out / "refnet-cache"))
        rcs = {m.NAME: run_tiny(m, out) for m in modules}
    return out, rcs


def outputs(out, name: str):
    """``(folder, results.json as a dict, report.md text)`` of script ``name`` under ``out``."""
    d = out / name
    return d, json.loads((d / "results.json").read_text()), (d / "report.md").read_text()
