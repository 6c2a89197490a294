"""A save killed mid-write (SIGKILL: no ``finally``, no ``atexit``) leaves no stray file behind.

A subprocess saves a 32 MB network in a loop and is killed after a short delay, so that it dies
while writing a temporary file. The rule of :mod:`refnet._io`: a temporary file names its writer
(``.<name>.<host>.<pid>-<random>.tmp``), and every later save or load in that folder removes the
temporary files of writers that no longer run. So after the kill the next load (or save) works,
reads the last complete file, and leaves the folder holding only ``net.npz``. Seen failing before
the rule: the killed writer's ``.net.npz.*.tmp`` stayed forever.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import refnet as rn
from refnet._io import TMP_RE, host_tag, sweep_stale_temps

pytestmark = pytest.mark.skipif(os.name != "posix", reason="SIGKILL and the process probe are POSIX")

WRITER = """
import sys
import refnet as rn
net = rn.mlp([2000, 2000, 10], seed=0)  # 4 million float64 parameters: a 32 MB file
net.save(sys.argv[1])
print("saved", flush=True)
while True:
    net.save(sys.argv[1])
"""


def _temps(folder):
    return sorted(p.name for p in folder.iterdir() if TMP_RE.match(p.name))


def _kill_mid_save(folder, delays=(0.15, 0.05, 0.3, 0.1, 0.5)):
    """Run the writer and SIGKILL it until it dies leaving a temporary file; returns its name."""
    path = folder / "net.npz"
    for delay in delays:
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "saved"
            time.sleep(delay)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
        stray = _temps(folder)
        if stray:
            return stray
    pytest.fail("the writer was never killed during a save (no temporary file seen)")


def test_load_after_a_killed_save_works_and_removes_the_stray_file(tmp_path):
    stray = _kill_mid_save(tmp_path)
    assert len(stray) == 1 and stray[0].startswith(".net.npz.")
    net = rn.load_network(tmp_path / "net.npz")  # the last complete save
    np.testing.assert_array_equal(net.params[1]["W"], rn.mlp([2000, 2000, 10], seed=0).params[1]["W"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.npz"]


def test_next_save_after_a_killed_save_works_and_leaves_no_stray_file(tmp_path):
    _kill_mid_save(tmp_path)
    small = rn.mlp([3, 2], seed=1)
    small.save(tmp_path / "net.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.npz"]
    back = rn.load_network(tmp_path / "net.npz")
    np.testing.assert_array_equal(back.params[0]["W"], small.params[0]["W"])


def test_temporary_files_of_live_writers_are_kept(tmp_path):
    """The sweep never removes a file a running process may still be writing."""
    mine = tmp_path / f".net.npz.{host_tag()}.{os.getpid()}-0123abcd.tmp"
    other_host = tmp_path / f".net.npz.ffffffff.{os.getpid() + 10**6}-0123abcd.tmp"
    mine.write_bytes(b"partial")
    other_host.write_bytes(b"partial")
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        live = tmp_path / f".net.npz.{host_tag()}.{proc.pid}-0123abcd.tmp"
        live.write_bytes(b"partial")
        assert sweep_stale_temps(tmp_path) == []
        assert {mine.name, other_host.name, live.name} <= {p.name for p in tmp_path.iterdir()}
    finally:
        proc.kill()
        proc.wait()
    assert sweep_stale_temps(tmp_path) == [live.name]  # its writer is gone now
