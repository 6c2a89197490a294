"""`refnet prune` end to end on small settings."""

import json

import numpy as np
import pytest

import refnet as rn
from refnet.cli import main


def _run(tmp_path, *extra):
    out = tmp_path / "out"
    argv = ["prune", "--data", "digits", "--arch", "mlp-3-tanh", "--jsv-examples", "20", "--score-examples", "50",
            "--train-steps", "30", "--quiet", "--out", str(out), *extra]
    return main(argv), out


def test_prune_snip_with_ai_writes_everything(tmp_path, capsys):
    rc, out = _run(tmp_path, "--repair", "ai", "--ai-steps", "50", "--sparsity", "0.8")
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("jsv_after_init", "jsv_after_pruning", "jsv_after_repair", "layers", "final_test_error", "ai"):
        assert key in summary
    assert summary["pruned_weights_untouched"] is True
    # exactly k = round(m (1 - s)) weights kept over all layers
    kept = sum(layer["kept"] for layer in summary["layers"])
    total = sum(layer["total"] for layer in summary["layers"])
    assert kept == round(total * 0.2)
    # the masks file loads without pickle and matches the saved network
    net = rn.load_network(out / "net.npz")
    with np.load(out / "masks.npz", allow_pickle=False) as f:
        for i, m in enumerate(net.masks):
            for k, v in m.items():
                np.testing.assert_array_equal(f[f"mask/{i}/{k}"], v)
    # effective pruned weights are exactly zero after training
    for p, m in zip(net.effective_params(), net.masks):
        assert np.all(p["W"][~m["W"]] == 0)
    assert "final test error" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["random", "magnitude", "uniform", "synflow"])
def test_prune_methods(tmp_path, method):
    rc, out = _run(tmp_path, "--method", method, "--train-steps", "0")
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method and "final_test_error" not in summary


@pytest.mark.parametrize("bad,word", [(["--sparsity", "1.0"], "--sparsity"), (["--method", "obs"], "--method"),
                                       (["--arch", "mlp-x"], "--arch")])
def test_prune_bad_arguments(tmp_path, capsys, bad, word):
    rc, _ = _run(tmp_path, *bad)
    assert rc == 2
    assert word in capsys.readouterr().err
