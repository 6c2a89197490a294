"""benchmarks/gpu.py, the GPU suite, on tiny sizes: without CuPy it measures nothing and says why;
with the NumPy stand-in for CuPy (tests/fake_cupy.py) every case runs, checks the cupy engine's
results against the CPU ones before timing, and gives a "refnet" row per case. Real GPU figures
come only from a run on a machine with a GPU (``python -m benchmarks gpu``)."""

import sys

import numpy as np
import pytest

import fake_cupy
from refnet.benchmarks import gpu

TINY = {
    "matmul": [(np.float64, 40, 3, 0.5), (np.float32, 40, 3, 0.9)],
    "svd": [(3, 6)],
    "svd_quick": [(3, 6)],
    "jacobian": [([5, 4, 3], 2)],
    "isometry": (12, 0.8, 4),
    "select": [1000],
}


@pytest.fixture
def tiny(monkeypatch):
    """Tiny cases, timed by two runs each (the suite's own timer loops for 0.2 s per row)."""
    from refnet.benchmarks.common import median_time

    monkeypatch.setattr(gpu, "SIZES", TINY)
    monkeypatch.setattr(gpu, "time_call", lambda fn, quick: median_time(fn, repeat=2, warmup=1, min_time=0.0))


def test_without_cupy_the_suite_says_why_and_measures_nothing(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "cupy", None)
    assert gpu.run(quick=True) == []
    assert "gpu suite skipped: CuPy could not be imported" in capsys.readouterr().out


def test_every_case_runs_on_the_stand_in(monkeypatch, tiny, capsys):
    fake_cupy.install(monkeypatch)
    rows = gpu.run(quick=True)
    cases = {}
    for r in rows:
        cases.setdefault(r["case"], []).append(r)
        assert r["seconds"] > 0 and r["gpu"] == "NumPy stand-in for CuPy (no GPU)"
    # 2 forward + 2 transposed matmul cases, 1 SVD stack (values, and the full SVD), 1 Jacobian stack, isometry, select
    assert len(cases) == 9
    for case, rs in cases.items():
        assert [r["impl"] for r in rs].count("refnet") == 1, case
        assert next(r for r in rs if r["impl"] == "refnet")["engine"] == "cupy"
        assert len(rs) >= 3, case  # refnet beside at least two CPU rows
    assert all(r["max_dev_rel"] <= 1e-10 for r in rows if "max_dev_rel" in r)
    assert "GPU: NumPy stand-in for CuPy (no GPU)" in capsys.readouterr().out


@pytest.mark.parametrize("kernel, bench", [("batched_svdvals", gpu.bench_svdvals), ("batched_svd", gpu.bench_svdvals), ("masked_matmul", gpu.bench_masked_matmul), ("isometry_step", gpu.bench_isometry)])
def test_a_wrong_gpu_result_stops_the_suite(monkeypatch, tiny, kernel, bench):
    cp = fake_cupy.install(monkeypatch)
    from refnet.kernels import _load

    engine = _load("cupy")
    real = getattr(engine, kernel)

    def off(*args, **kw):
        out = real(*args, **kw)
        if isinstance(out, tuple):  # (V, residual) or (U, S, Vh): the first array is off
            return (out[0] * (1 + 1e-6),) + tuple(out[1:])
        return out * (1 + 1e-6)

    monkeypatch.setattr(engine, kernel, off)
    with pytest.raises(AssertionError, match="deviates"):
        bench(cp, True)
