"""The validation scripts linear_vs_tanh, unsupervised and lenet run end to end (--tiny) and resume.

Each script is run twice into the same folder: the first run must write results.json, report.md
(with the paper-vs-refnet table) and its figures; the second must take every unit from
results.json without computing any of them again.
"""

import json

import numpy as np
import pytest

from refnet.validation import common, lenet, linear_vs_tanh, unsupervised
from tiny_runs import HEADER
from tiny_runs import run_tiny as _run

SCRIPTS = [linear_vs_tanh, unsupervised, lenet]


@pytest.fixture(autouse=True)
def _one_blas_thread():
    """The tiny runs multiply small matrices: extra BLAS threads only contend for the cores."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: the test is correct without it, only slower
        yield
        return
    with threadpool_limits(limits=1):
        yield


@pytest.mark.parametrize("mod", SCRIPTS, ids=lambda m: m.NAME)
def test_tiny_run_writes_report_and_resumes(mod, tmp_path, monkeypatch):
    assert _run(mod, tmp_path) == 0
    d = tmp_path / mod.NAME
    res = json.loads((d / "results.json").read_text())
    assert res["status"] == "done"
    assert res["settings"]["mode"] == "tiny"
    assert res["units"], "no unit of work was recorded"
    assert res["checks"], "the report has no checks"
    for c in res["checks"]:
        assert c["holds"] in (True, False, None)
        for field in ("name", "paper", "refnet", "criterion"):
            assert "|" not in c[field], f"a '|' in {field!r} breaks the report table: {c[field]!r}"
    report = (d / "report.md").read_text()
    assert HEADER in report
    assert res["figures"]
    for fig in res["figures"]:
        png = d / fig["file"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{png} is not a PNG"

    # second run: every unit comes from results.json, none is computed
    computed = []
    unit = common.Run.unit

    def counting_unit(self, key, compute):
        def wrapped():
            computed.append(key)
            return compute()

        return unit(self, key, wrapped)

    monkeypatch.setattr(common.Run, "unit", counting_unit)
    assert _run(mod, tmp_path) == 0
    assert computed == []
    res2 = json.loads((d / "results.json").read_text())
    assert res2["units"] == res["units"]
    assert [c["refnet"] for c in res2["checks"]] == [c["refnet"] for c in res["checks"]]
    assert f"Resumed: {len(res['units'])} unit(s)" in (d / "report.md").read_text()


def test_entropy_of_softmax_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(5, 7)) * 2.0  # (B, C)
    loss, eps = unsupervised.entropy_of_softmax(z)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert loss == pytest.approx(float(-(p * np.log(p)).sum(1).mean()), rel=1e-12)
    h = 1e-6
    num = np.zeros_like(z)
    for idx in np.ndindex(*z.shape):
        zp, zm = z.copy(), z.copy()
        zp[idx] += h
        zm[idx] -= h
        num[idx] = (unsupervised.entropy_of_softmax(zp)[0] - unsupervised.entropy_of_softmax(zm)[0]) / (2 * h)
    np.testing.assert_allclose(eps, num, rtol=1e-6, atol=1e-10)
