"""Tests for refnet.provenance: run.json records and the output-folder guard.

Every test was seen failing once on a planted bug (noted per test).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import refnet
from refnet import provenance as pv

FIELDS = ("format", "version", "command", "argv", "args", "seeds", "refnet_version", "git", "versions", "blas",
          "threads", "engine", "environment", "host", "start", "end", "status", "error")


def _repo_head() -> str | None:
    """HEAD of the checkout refnet is imported from, or None (an installed refnet)."""
    pkg = Path(refnet.__file__).resolve().parent
    if not (pkg.parent / ".git").exists():
        return None
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=pkg, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def test_run_record_has_every_field_and_is_strict_json(tmp_path, monkeypatch):
    # planted bugs seen failing: thread variables read once at import (OMP_NUM_THREADS=3 not
    # seen); argparse's private "_command" entry stored; seeds not picked from the arguments;
    # the engine read from REFNET_ENGINE instead of refnet.kernels
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.delenv("REFNET_ENGINE", raising=False)
    ns = argparse.Namespace(arch="mlp-3-tanh", seed=7, init_seed=2, lr=0.1, out=tmp_path, _command=object())
    rec = pv.run_record("train", ["refnet", "train", "--seed", "7"], ns)
    assert all(k in rec for k in FIELDS)
    json.dumps(rec, allow_nan=False)  # strict JSON
    assert rec["command"] == "train" and rec["argv"] == ["refnet", "train", "--seed", "7"]
    assert rec["args"] == {"arch": "mlp-3-tanh", "seed": 7, "init_seed": 2, "lr": 0.1, "out": str(tmp_path)}
    assert rec["seeds"] == {"seed": 7, "init_seed": 2}
    assert rec["refnet_version"] == refnet.__version__ == rec["versions"]["refnet"]
    assert rec["versions"]["numpy"] == np.__version__ and rec["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    import scipy

    assert rec["versions"]["scipy"] == scipy.__version__
    assert rec["threads"]["env"]["OMP_NUM_THREADS"] == "3" and rec["threads"]["env"]["MKL_NUM_THREADS"] is None
    assert set(rec["threads"]["env"]) == set(pv.THREAD_ENV_VARS)
    assert set(rec["environment"]) == set(pv.ENV_VARS) and rec["environment"]["REFNET_ENGINE"] is None
    from refnet import kernels

    assert rec["engine"] == kernels.get_engine()
    with kernels.use_engine("numpy"):
        assert pv.run_record("x")["engine"] == "numpy"
    assert isinstance(rec["blas"], list) and rec["blas"]
    assert rec["end"] is None and rec["status"] == "running"
    head = _repo_head()
    if head is not None:
        assert rec["git"]["commit"] == head and isinstance(rec["git"]["dirty"], bool)
    assert pv.run_record("x", seeds=[1, 2])["seeds"] == [1, 2]
    assert pv.run_record("x", [], {"seed": np.int64(3), "arr": np.arange(2)})["args"] == {"seed": 3, "arr": [0, 1]}
    with pytest.raises(TypeError, match="argv must be a list of str"):
        pv.run_record("x", "refnet train")


def test_git_commit_is_none_outside_a_checkout_and_never_fails(tmp_path, monkeypatch):
    # planted bug seen failing: the FileNotFoundError of a missing git propagated
    assert pv.git_commit(tmp_path) is None  # not a repository
    monkeypatch.setenv("PATH", str(tmp_path))  # no git at all
    assert pv.git_commit() is None
    assert pv.run_record("x")["git"] is None


def test_git_commit_only_for_the_package_own_checkout(tmp_path, monkeypatch):
    # planted bug seen failing: the toplevel check dropped (refnet installed inside another
    # repository would report that repository's commit)
    if subprocess.run(["git", "--version"], capture_output=True).returncode != 0:
        pytest.skip("git is not installed")
    repo = tmp_path / "project"
    pkg = repo / "venv" / "site-packages" / "refnet"
    pkg.mkdir(parents=True)
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True, env=env)
    subprocess.run(["git", "commit", "-q", "--allow-empty", "-m", "x"], cwd=repo, check=True, env=env)
    monkeypatch.setattr(pv, "__file__", str(pkg / "provenance.py"))
    assert pv.git_commit() is None  # a repository, but not refnet's own checkout
    monkeypatch.setattr(pv, "__file__", str(repo / "refnet" / "provenance.py"))
    (repo / "refnet").mkdir()
    got = pv.git_commit()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert got == {"commit": head, "dirty": False}


def test_write_run_json_is_atomic_and_sets_the_end_time(tmp_path, monkeypatch):
    # planted bugs seen failing: the end time not set when writing; a plain open("w") write
    # (a failing write left a truncated run.json behind)
    rec = pv.run_record("spectrum", [], {"seed": 0})
    path = pv.write_run_json(tmp_path, rec)
    assert path == os.path.join(tmp_path, "run.json")
    back = pv.read_run_json(tmp_path)
    assert back["end"] is not None and back["end"] >= back["start"] and back["status"] == "completed"
    assert back == json.loads(json.dumps(rec))
    # a write that fails midway leaves the earlier file as it was
    rec2 = pv.run_record("spectrum", [], {"seed": 1})
    rec2["extra"]["bad"] = float("nan")
    monkeypatch.setattr(pv, "jsonable", lambda obj, other=None: obj)  # nan reaches json.dumps(allow_nan=False)
    with pytest.raises(ValueError):
        pv.write_run_json(tmp_path, rec2)
    assert pv.read_run_json(tmp_path) == back
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]
    with pytest.raises(ValueError, match="not a refnet run record"):
        (tmp_path / "x.json").write_text("{}")
        pv.read_run_json(tmp_path / "x.json")


def test_recording_writes_the_status_also_on_failure(tmp_path):
    # planted bug seen failing: run.json written only on success
    with pv.recording(tmp_path, "prune", {"seed": 3}, argv=["refnet", "prune"]) as rec:
        rec["extra"]["note"] = "hello"
    done = pv.read_run_json(tmp_path)
    assert done["status"] == "completed" and done["extra"]["note"] == "hello" and done["seeds"] == {"seed": 3}
    with pytest.raises(ZeroDivisionError):
        with pv.recording(tmp_path, "prune", {"seed": 3}):
            1 / 0
    failed = pv.read_run_json(tmp_path)
    assert failed["status"] == "failed" and failed["error"].startswith("ZeroDivisionError")


def test_blas_info_without_threadpoolctl(monkeypatch):
    # planted bug seen failing: the fallback reading a key numpy's show_config does not have
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)  # import fails
    info = pv.blas_info()
    assert info and info[0]["source"] == "numpy.show_config" and info[0]["api"] == "blas"
    json.dumps(info)


def test_prepare_out_refuses_an_earlier_runs_folder(tmp_path):
    # planted bugs seen failing: an existing non-empty folder accepted; the message without
    # --overwrite; the resume marker accepted without the file
    new = tmp_path / "a" / "b"
    assert pv.prepare_out(new) == new and new.is_dir()
    assert pv.prepare_out(new) == new  # empty: fine
    (new / "history.json").write_text("{}")
    with pytest.raises(ValueError) as err:
        pv.prepare_out(new)
    assert str(new) in str(err.value) and "--overwrite" in str(err.value)
    assert pv.prepare_out(new, overwrite=True) == new
    assert (new / "history.json").read_text() == "{}"  # nothing is deleted
    with pytest.raises(ValueError, match="--overwrite"):
        pv.prepare_out(new, resume_from="sweep.json")  # not this command's folder
    (new / "sweep.json").write_text("{}")
    assert pv.prepare_out(new, resume_from="sweep.json") == new
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a folder"):
        pv.prepare_out(tmp_path / "file", overwrite=True)
    with pytest.raises(TypeError, match="path must be"):
        pv.prepare_out("")
