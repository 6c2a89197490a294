"""The validation script modern_networks: a --tiny run writes its report, results and figure with the
paper's OS column beside refnet's; a rerun resumes every unit; the orthogonality score is the mean
of ||V^T V - I||_F over the weight layers."""

import numpy as np
import pytest

pytest.importorskip("matplotlib")

import refnet as rn  # noqa: E402
from refnet.validation import modern_networks  # noqa: E402

from tiny_runs import HEADER, outputs, run_all, run_tiny  # noqa: E402


@pytest.fixture(scope="module")
def tiny_out(tmp_path_factory):
    return run_all(tmp_path_factory, (modern_networks,), "validation-modern")


def test_tiny_run_writes_report_and_resumes(tiny_out, monkeypatch):
    out, rcs = tiny_out
    assert rcs[modern_networks.NAME] == 0
    d, res, report = outputs(out, modern_networks.NAME)
    assert res["status"] == "done" and res["settings"]["mode"] == "tiny"
    assert res["settings"]["data"] == "mnist5k-32"  # the embedded 32 x 32 default
    assert HEADER in report and all(c["holds"] is None for c in res["checks"])
    assert (d / "orthogonality_score.png").stat().st_size > 1000
    # the paper's OS column beside refnet's, and what differs
    assert "| LDI-AI | 2.62 |" in report and "| 6.43 |" in report
    assert "## What differs from the paper" in report and "mnist5k padded to 32 x 32" in report
    units = res["units"]
    assert set(units) == {f"{n}/{r}" for n in modern_networks.PAPER for r in modern_networks.INITS}
    for u in units.values():
        assert u["os"] > 0 and abs(u["density"] - 0.1) < 0.01 and u["status"] == "completed"
    assert "ai" in units["ResNet-32/LDI-AI"] and "ai" not in units["ResNet-32/LDI"]

    def boom(*args, **kwargs):
        raise AssertionError("a unit was recomputed instead of resumed")

    monkeypatch.setattr(modern_networks, "_unit", boom)
    assert run_tiny(modern_networks, out) == 0
    _, res2, report2 = outputs(out, modern_networks.NAME)
    assert res2["units"] == units and f"Resumed: {len(units)} unit(s)" in report2


def test_orthogonality_score_is_the_mean_gram_residual():
    rng = np.random.default_rng(0)
    net = rn.build("resnet-8-w0.25", (1, 8, 8), 3, init="orthogonal", seed=0)
    net = net.with_masks([{k: rng.random(v.shape) < 0.3 if k == "W" else None for k, v in p.items()} for p in net.params])
    mean, per = modern_networks.orthogonality_score(net)
    manual = []
    for p, m in zip(net.params, net.masks):
        if "W" not in p:
            continue
        W = p["W"] * m["W"]
        V = W.reshape(W.shape[0], -1)  # (c_out, c_in kh kw): V^T V is (c_in kh kw)^2, V V^T (c_out)^2
        G = V @ V.T if V.shape[0] <= V.shape[1] else V.T @ V
        manual.append(np.linalg.norm(G - np.eye(G.shape[0])))
    np.testing.assert_allclose(per, manual, rtol=1e-12)
    assert mean == pytest.approx(np.mean(manual), rel=1e-12) and len(per) == 8
    # unpruned orthogonal weights are isometric: OS = 0 up to rounding
    assert modern_networks.orthogonality_score(rn.build("resnet-8-w0.25", (1, 8, 8), 3, init="orthogonal", seed=0))[0] < 1e-12


def test_small_images_are_padded_to_32():
    X = np.arange(2 * 1 * 28 * 28, dtype=float).reshape(2, 1, 28, 28)
    P = modern_networks._pad32(X)
    assert P.shape == (2, 1, 32, 32)
    np.testing.assert_array_equal(P[:, :, 2:30, 2:30], X)
    assert (P[:, :, 0] == X.min()).all()
    assert modern_networks._pad32(np.zeros((1, 3, 32, 32))).shape == (1, 3, 32, 32)
