"""Atomic writes (refnet._io): a failed write leaves the old file and no temporary file."""

import json

import numpy as np
import pytest

from refnet import _io


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"old")

    def half_then_fail(f):
        f.write(b"new but incomplete")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        _io.atomic_write(path, half_then_fail)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f"]
    _io.atomic_write(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["f"]


def test_text_json_npz_and_folders(tmp_path):
    _io.atomic_write_text(tmp_path / "a" / "t.md", "héllo\n")
    assert (tmp_path / "a" / "t.md").read_text(encoding="utf-8") == "héllo\n"
    _io.atomic_write_json(tmp_path / "j.json", {"x": [1, 2.5]})
    assert json.loads((tmp_path / "j.json").read_text()) == {"x": [1, 2.5]}
    with pytest.raises(ValueError):
        _io.atomic_write_json(tmp_path / "j.json", {"x": float("nan")}, allow_nan=False)
    assert json.loads((tmp_path / "j.json").read_text()) == {"x": [1, 2.5]}  # unchanged
    _io.atomic_savez(tmp_path / "z.npz", {"a": np.arange(3.0), "m": np.array([True, False])})
    with np.load(tmp_path / "z.npz", allow_pickle=False) as f:
        np.testing.assert_array_equal(f["a"], [0.0, 1.0, 2.0])
        assert f["m"].dtype == bool
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "j.json", "z.npz"]


def test_savefig(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure()
    FigureCanvasAgg(fig)
    fig.subplots().plot([0, 1], [1, 0])
    out = _io.atomic_savefig(fig, tmp_path / "p.png")
    assert out.endswith("p.png") and (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"]


def test_new_files_get_the_umask_mode_and_existing_files_keep_theirs(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        _io.atomic_write_text(tmp_path / "new.txt", "x")
        assert (tmp_path / "new.txt").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
        (tmp_path / "kept.txt").write_text("a")
        os.chmod(tmp_path / "kept.txt", 0o640)
        _io.atomic_write_text(tmp_path / "kept.txt", "b")
        assert (tmp_path / "kept.txt").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)
