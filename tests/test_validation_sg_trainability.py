"""The validation scripts sg_gamma and trainability: a --tiny run writes its report, results and
figures; a rerun resumes every unit instead of recomputing it; the helpers judge correctly."""

import math

import pytest

pytest.importorskip("matplotlib")

from refnet.validation import sg_gamma, trainability  # noqa: E402

from tiny_runs import HEADER, outputs as _outputs, run_tiny as _run  # noqa: E402
from tiny_runs import run_all  # noqa: E402


@pytest.fixture(scope="module")
def tiny_out(tmp_path_factory):
    """One --tiny run of each script (module scope: each runs once for all the tests here)."""
    return run_all(tmp_path_factory, (sg_gamma, trainability), "validation-tiny")


def _forbid(monkeypatch, module, names):
    """Make the unit functions raise: a resumed run must not call them."""

    def boom(*args, **kwargs):
        raise AssertionError("a unit was recomputed instead of resumed")

    for n in names:
        monkeypatch.setattr(module, n, boom)


CASES = [
    (sg_gamma, ["jsv_histograms.png", "layer_sparsity.png", "test_error.png"],
     ["_prune_and_measure", "_train_one", "_cs_examples_trend"]),
    (trainability, ["jsv_vs_sparsity.png", "loss_curves.png"], ["_dense_unit", "_jsv_unit", "_train_unit"]),
]


@pytest.mark.parametrize("module, figures, unit_fns", CASES, ids=["sg_gamma", "trainability"])
def test_tiny_run_writes_report_and_resumes(tiny_out, monkeypatch, module, figures, unit_fns):
    out, rcs = tiny_out
    assert rcs[module.NAME] == 0
    d, res, report = _outputs(out, module.NAME)
    assert res["status"] == "done"
    assert res["settings"]["mode"] == "tiny"
    assert HEADER in report
    assert res["checks"], "the checks list must not be empty"
    assert all(c["holds"] is None for c in res["checks"])  # tiny mode judges nothing
    for f in figures:
        assert (d / f).stat().st_size > 1000, f
        assert f"]({f})" in report
    units = res["units"]
    assert units

    # rerun: every unit comes from results.json, none is recomputed, the report is the same table
    _forbid(monkeypatch, module, unit_fns)
    assert _run(module, out) == 0
    _, res2, report2 = _outputs(out, module.NAME)
    assert res2["units"] == units
    assert f"Resumed: {len(units)} unit(s)" in report2
    assert [c["refnet"] for c in res2["checks"]] == [c["refnet"] for c in res["checks"]]


def test_sg_gamma_units_and_paper_table(tiny_out):
    out, _ = tiny_out
    _, res, report = _outputs(out, "sg_gamma")
    u = res["units"]
    for g in sg_gamma.GAMMAS:
        p = u[f"prune/gamma={g:g}"]
        assert len(p["layer_sparsity"]) == 7
        assert p["kept_biases"] == 0  # zero biases score 0: all pruned, as in the SPP code
        assert abs(1 - p["kept_weights"] / p["total_weights"] - sg_gamma.SPARSITY) < 0.01
        assert u[f"train/gamma={g:g}"]["steps"] == sg_gamma.MODES["tiny"]["steps"]
    assert "2.46e-07" in report and "3.67e+04" in report  # the paper's numbers are in the table
    assert set(sg_gamma.PAPER) == set(sg_gamma.GAMMAS)


def test_trainability_units(tiny_out):
    out, _ = tiny_out
    _, res, _ = _outputs(out, "trainability")
    u = res["units"]
    for s in trainability.MODES["tiny"]["sparsities"]:
        for m in trainability.METHODS:
            assert abs(u[f"jsv/{m}/s={s:g}"]["weight_sparsity"] - s) < 0.01
        assert "ai" in u[f"jsv/LDI-CS-AI/s={s:g}"]
    for m in trainability.METHODS:
        t = u[f"train/{m}/s=0.9"]
        assert len(t["train_loss"]) == len(t["curve_steps"]) >= 2


def test_within_factor():
    f = sg_gamma._within_factor
    assert f(1.0, 2.9, 3) and f(2.9, 1.0, 3) and not f(1.0, 3.1, 3)
    assert f(math.inf, "inf", 3) and not f(1e300, math.inf, 3)
    assert not f(0.0, 1.0, 3) and not f(None, 1.0, 3)


def test_trainability_helpers():
    assert trainability.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert trainability.spearman([1, 2, 3, 4], [4, 3, 1, 2]) == pytest.approx(-0.8)
    assert trainability.spearman([1, 2, 3, 4], [1, 2, 3, 4]) == pytest.approx(1.0)
    assert trainability._decreasing([0.3, 0.02, 0.0, 0.0])
    assert not trainability._decreasing([0.3, 0.3, 0.1])
    assert not trainability._decreasing([0.1, 0.2])
