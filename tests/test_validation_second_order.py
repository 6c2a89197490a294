"""The second_order validation script (OBD and L-OBS beside SNIP, GraSP beside SNIP and SynFlow)
runs end to end in --tiny mode, its numbers are sane, and it resumes: from results.json without
computing any unit, and from a missing pretrained-network file by retraining the same weights."""

import json

import numpy as np
import pytest

import refnet
from refnet.masks import keep_count
from refnet.validation import SCRIPTS, common
from refnet.validation import second_order as so
from tiny_runs import HEADER
from tiny_runs import run_tiny as _run


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


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("second_order")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REFNET_CACHE_DIR", str(out / "refnet-cache"))
        rc = _run(so, out)
    return out, rc


def test_registered_for_reproduce():
    assert "second_order" in SCRIPTS


def test_tiny_run_writes_report_with_sane_numbers(tiny):
    # planted bugs seen failing: L-OBS's layer budget taken from the dense net's masks (all kept);
    # the budget's magnitude masks at the density instead of the sparsity
    out, rc = tiny
    assert rc == 0
    d = out / so.NAME
    res = json.loads((d / "results.json").read_text())
    assert res["status"] == "done" and res["settings"]["mode"] == "tiny"
    units = res["units"]
    sparsities = so.MODES["tiny"]["sparsities"]
    want = {"dense/seed=0/steps=10", "diag/seed=0/steps=10"}
    want |= {f"after/{m}/sparsity={s:g}/seed=0/steps=10" for m in so.AFTER for s in sparsities}
    want |= {f"init/{m}/sparsity={s:g}/seed=0/steps=10" for m in so.AT_INIT for s in sparsities}
    assert set(units) == want
    # every error is a fraction; every pruned net keeps exactly its count
    total = 784 * 300 + 300 * 100 + 100 * 10
    for key, u in units.items():
        rec = u if key.startswith("dense") else u.get("train")
        if rec is not None:
            assert rec["status"] == "completed", key
            assert 0.0 <= rec["best_test_error"] <= 1.0 and len(rec["test_error"]) == len(rec["checkpoints"]) > 0
        if key.startswith(("after", "init")):
            s = u["sparsity"]
            kept = [r["kept"] for r in u["layers"]]
            assert sum(r["total"] for r in u["layers"]) == total
            if u["method"] == "lobs":  # every layer at the sparsity
                assert kept == [keep_count(r["total"], s) for r in u["layers"]], key
            else:  # one global count (L-OBS's budget: the global magnitude top-k's)
                assert sum(kept) == keep_count(total, s), key
            for k in ("pretrained_error", "after_pruning_error", "no_update_error"):
                if k in u:
                    assert 0.0 <= u[k] <= 1.0
        if key.startswith("init"):
            assert np.isfinite(u["grad_norm2_dense"]) and u["grad_norm2_dense"] > 0 and u["grad_norm2_pruned"] >= 0
    # L-OBS with the magnitude budget keeps the magnitude mask's per-layer counts, not its entries
    lb = units["after/lobs_budget/sparsity=0.985/seed=0/steps=10"]["layers"]
    assert [r["kept"] for r in lb] != [keep_count(r["total"], 0.985) for r in lb]
    # the exact and Gauss-Newton diagonals of a ReLU net are equal to rounding (phi'' = 0)
    diag = units["diag/seed=0/steps=10"]
    assert diag["rel_diff"] <= so.DIAG_RTOL and diag["same_masks"] is True
    # the report: the table, every check with a verdict, the figure, the pretrained network
    report = (d / "report.md").read_text()
    assert HEADER in report and "SNIP's Table 1, side by side" in report
    names = [c["name"] for c in res["checks"]]
    assert any(n.startswith("OBD at 92.0%") for n in names) and any(n.startswith("L-OBS at 98.5%") for n in names)
    for c in res["checks"]:
        assert c["holds"] in (True, False, None)
        for field in ("name", "paper", "refnet", "criterion"):
            assert "|" not in c[field], f"a '|' in {field!r} breaks the report table: {c[field]!r}"
    assert {c["name"]: c["holds"] for c in res["checks"]}["OBD's diagonal: exact Hessian = Gauss-Newton for a ReLU net"]
    for fig in res["figures"]:
        assert (d / fig["file"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (pre,) = d.glob("pretrained_tiny_seed=0_steps=10_*.npz")
    net = refnet.load_network(pre)
    assert net.n_layers == 3 and all(m["W"].all() for m in net.masks if "W" in m)  # the dense net


def test_tiny_run_resumes(tiny, monkeypatch):
    # planted bug seen failing: the fallback retraining the dense net from another seed
    out, _ = tiny
    d = out / so.NAME
    res = json.loads((d / "results.json").read_text())
    computed = []
    unit = common.Run.unit

    def counting_unit(self, key, compute):
        def wrapped():
            computed.append(key)
            return compute()

        return unit(self, key, wrapped)

    monkeypatch.setattr(common.Run, "unit", counting_unit)
    assert _run(so, out) == 0
    assert computed == []
    res2 = json.loads((d / "results.json").read_text())
    assert res2["units"] == res["units"]
    assert [c["refnet"] for c in res2["checks"]] == [c["refnet"] for c in res["checks"]]
    # without the pretrained file, the units after pretraining are recomputed on the same weights
    for p in d.glob("pretrained_*.npz"):
        p.unlink()
    redo = {k: v for k, v in res["units"].items() if not k.startswith("after/lobs_budget")}
    payload = dict(res2, units=redo)
    (d / "results.json").write_text(json.dumps(payload))
    computed.clear()
    assert _run(so, out) == 0
    assert sorted(computed) == sorted(k for k in res["units"] if k.startswith("after/lobs_budget"))
    res3 = json.loads((d / "results.json").read_text())
    for k in computed:
        a, b = res3["units"][k], res["units"][k]
        assert a["layers"] == b["layers"] and a["after_pruning_error"] == b["after_pruning_error"]
        assert a["train"]["test_error"] == b["train"]["test_error"]
