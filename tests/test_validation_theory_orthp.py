"""The validation scripts theory and orthp: a --tiny run writes its report and results, a rerun
resumes every unit instead of recomputing it, and the planted bug of the theory script is caught.

Seen failing on planted bugs: the planted sampler drawing variance 1/N (planted row then says
"yes"); a unit key that changes between runs, so a rerun recomputes (the spy records it); finite_n_m2
with 2/N instead of 2/N^2 (K = 1 no longer gives the Wishart value).
"""

import pytest

from refnet.validation import common, orthp, theory
from tiny_runs import HEADER, outputs, run_all
from tiny_runs import run_tiny as _run


@pytest.fixture(scope="module")
def tiny_out(tmp_path_factory):
    """One --tiny run of each script (module scope: each runs once for all the tests here)."""
    return run_all(tmp_path_factory, (theory, orthp), "validation-theory-orthp")


def _outputs(out, name):
    return outputs(out, name)[1:]  # (results, report)


@pytest.mark.parametrize("module", [theory, orthp], ids=["theory", "orthp"])
def test_tiny_run_writes_report_and_resumes(tiny_out, monkeypatch, module):
    out, rcs = tiny_out
    assert rcs[module.NAME] == 0
    res, report = _outputs(out, module.NAME)
    assert res["status"] == "done"
    assert res["settings"]["mode"] == "tiny"
    assert HEADER in report
    assert res["checks"], "the checks list must not be empty"
    assert all(c["name"] and c["refnet"] for c in res["checks"])
    units = res["units"]
    assert units

    # rerun: every unit comes from results.json; a spy on Run.unit records any computation
    computed = []
    original = common.Run.unit

    def spy(self, key, compute):
        def recording():
            computed.append(key)
            return compute()

        return original(self, key, recording)

    monkeypatch.setattr(common.Run, "unit", spy)
    assert _run(module, out) == 0
    assert computed == []
    res2, report2 = _outputs(out, module.NAME)
    assert res2["units"] == units
    assert f"Resumed: {len(units)} unit(s)" in report2
    assert [c["refnet"] for c in res2["checks"]] == [c["refnet"] for c in res["checks"]]


def test_theory_planted_bug_is_caught(tiny_out):
    out, _ = tiny_out
    res, report = _outputs(out, "theory")
    by_name = {c["name"]: c for c in res["checks"]}
    planted = [c for c in res["checks"] if c["name"].startswith("planted bug")]
    assert len(planted) == 1
    assert planted[0]["holds"] is False
    # the same check with the correct sampler holds
    assert by_name["(a) m_1, K=3 [PZ11]"]["holds"] is True
    assert by_name["(a) m_2, K=3 [PZ11] + Wick (finite N)"]["holds"] is True
    assert "planted bug" in report and "| **no** |" in report


def test_theory_exact_identities_hold_in_tiny_mode(tiny_out):
    """The exact (non-statistical) rows hold at any size."""
    out, _ = tiny_out
    res, _ = _outputs(out, "theory")
    exact = [c for c in res["checks"] if c["criterion"].startswith(("<= 1e-12", "max |σ-1| <= 1e-12"))]
    assert len(exact) >= 5
    assert all(c["holds"] is True for c in exact)


def test_finite_n_m2():
    # K = 1: the real Wishart value E (1/N) tr (W W^T)^2 = 2 + 1/N; N = 1: products of scalars
    for N in (1, 5, 64):
        m2, s = theory.finite_n_m2(1, N)
        assert m2 == pytest.approx(2 + 1 / N, rel=1e-15)
        assert s == pytest.approx(1 + 2 / N**2, rel=1e-15)
    assert theory.finite_n_m2(3, 1) == (27.0, 27.0)  # E (w1 w2 w3)^4 = 3^3
    # N -> inf: FC_K(2) = K + 1 and s -> 1
    m2, s = theory.finite_n_m2(5, 10**8)
    assert m2 == pytest.approx(6.0, rel=1e-6) and s == pytest.approx(1.0, rel=1e-6)


def test_orthp_tiny_pipeline(tiny_out):
    out, _ = tiny_out
    res, report = _outputs(out, "orthp")
    prune = res["units"]["rep0/prune"]
    assert prune["in_dim"] == 1024  # 28x28 padded to 32x32
    assert prune["widths"] == [20] * 6 + [10]
    assert prune["L1+OrthP"]["jsv"]["max_abs_sv_minus_1"] <= 1e-12
    assert "1024-20-20-20-20-20-20-10" in report


def test_load_train_test_holds_out_a_tenth_of_full_mnist(monkeypatch):
    # planted bug seen failing: the hold-out applied to an explicit n_train
    import numpy as np

    sizes = {"train": 60_000, "test": 10_000}
    monkeypatch.setattr(common, "load_data", lambda args, split: (np.zeros((sizes[split], 2)), np.arange(sizes[split])))
    X, y, Xt, yt = common.load_train_test(None)
    assert X.shape[0] == 54_000 and y[-1] == 53_999 and Xt.shape[0] == 10_000
    assert common.load_train_test(None, hold_out=False)[0].shape[0] == 60_000
    X, y, Xt, yt = common.load_train_test(None, 58_000, 500)
    assert X.shape[0] == 58_000 and Xt.shape[0] == yt.shape[0] == 500
    sizes["train"] = 4_000  # mnist5k: nothing held out
    assert common.load_train_test(None)[0].shape[0] == 4_000
