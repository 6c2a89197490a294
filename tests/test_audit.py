"""Tests for refnet.audit: PyTorch, JAX/Flax and .npz models against refnet's float64 reference.

Real PyTorch (CPU) and JAX are used when installed (each group skips itself otherwise). Every
group was seen failing once on a planted bug in refnet/audit.py (noted per test).
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest

from refnet import audit
from refnet.layers import AvgPool2d, Conv2d, Dense, Flatten, GlobalAvgPool2d, MaxPool2d
from refnet.network import Network, mlp

F64 = "float64"
F32 = "as-run float32"


def _data(rng, B, in_shape, C):
    return rng.standard_normal((B, *in_shape)), rng.integers(0, C, B)


def _assert_agree_float64(report, rtol=1e-10):
    """Everything of the float64 section within rtol, masks identical, the section non-trivial."""
    cs = [c for c in report.checks if c.section == F64]
    names = {c.name for c in cs}
    assert {"logits", "loss", "jacobian", "jsv/mean", "jsv/cn", "mask/total"} <= names, names
    for c in cs:
        assert c.passed, c
        if c.n_diff is not None:
            assert c.n_diff == 0, c  # the same weights selected
        else:
            assert c.max_rel_err <= rtol, c


# ============================================================================================
# PyTorch
# ============================================================================================

try:
    import torch
    import torch.nn.utils.prune as prune
    from torch import nn
except ImportError:  # the PyTorch tests skip themselves; JAX and npz tests still run
    torch = nn = prune = None

needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed")


def _torch_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(12, 16), nn.Tanh(),
        nn.Sequential(nn.Linear(16, 16), nn.LeakyReLU(0.2)),  # nested: flattened
        nn.Linear(16, 16), nn.SELU(), nn.Identity(),
        nn.Linear(16, 16), nn.ELU(0.7),
        nn.Linear(16, 16), nn.Sigmoid(),
        nn.Linear(16, 16), nn.Hardtanh(),
        nn.Linear(16, 16), nn.Softplus(),
        nn.Linear(16, 5),
    )


def _torch_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2),
        nn.Conv2d(4, 6, 3, padding="same", padding_mode="circular"), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(24, 7), nn.Tanh(), nn.Linear(7, 3),
    )


def _torch_cnn_gap(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding="valid"), nn.ELU(),
        nn.Conv2d(4, 5, (3, 1), padding=(1, 0), bias=False), nn.Tanh(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3),
    )


@needs_torch
def test_torch_mlp_and_cnns_agree_in_float64(rng):
    # planted bugs seen failing: ELU alpha dropped in the conversion; torch's scores |g| instead
    # of |g * w|
    for module, in_shape, C in ((_torch_mlp(), (12,), 5), (_torch_cnn(), (1, 8, 8), 3), (_torch_cnn_gap(), (2, 9, 7), 3)):
        x, y = _data(rng, 6, in_shape, C)
        report = audit.compare_torch(module, x, y)
        assert report.passed, report.summary()
        _assert_agree_float64(report)
        net = audit.from_torch(module, in_shape)
        for i, p in enumerate(net.params):
            for k in p:  # every weight and bias gradient is compared, in both sections
                assert report.get(f"grad/{i}/{k}", F64).passed and report.get(f"grad/{i}/{k}", F32).passed
        assert report.get("jacobian", F64).shape == (6, C, int(np.prod(in_shape)))
        # the as-run section measures float32's own rounding: nonzero, well inside 1e-4
        f32 = [c for c in report.checks if c.section == F32 and c.name in ("logits", "jacobian", "grad/0/W")]
        assert len(f32) == 3 and all(1e-9 < c.max_rel_err < 1e-4 and c.tol == 1e-4 for c in f32), f32


@needs_torch
def test_torch_conversion_layers_and_weights():
    # planted bug seen failing: 'same' padding converted as (k - 1) instead of (k - 1) // 2
    net = audit.from_torch(_torch_cnn(), (1, 8, 8))
    kinds = [type(l).__name__ for l in net.layers]
    assert kinds == ["Conv2d", "AvgPool2d", "Conv2d", "MaxPool2d", "Flatten", "Dense", "Dense"]
    assert net.layers[2].padding == (1, 1) and net.layers[2].padding_mode == "circular"
    assert [str(getattr(l, "activation", "")) for l in net.layers] == ["tanh", "", "relu", "", "", "tanh", "identity"]
    m = _torch_cnn()
    assert np.array_equal(net.params[2]["W"], m[3].weight.detach().double().numpy())
    assert net.params[2]["W"].dtype == np.float64
    mlp_net = audit.from_torch(_torch_mlp())
    acts = [str(l.activation) for l in mlp_net.layers]
    assert acts == ["tanh", "leaky_relu(slope=0.2)", "selu", "elu(alpha=0.7)", "sigmoid", "hard_tanh", "softplus", "identity"]
    gap = audit.from_torch(_torch_cnn_gap(), (2, 9, 7))
    assert isinstance(gap.layers[2], GlobalAvgPool2d) and gap.layers[1].bias is False
    assert gap.layers[1].kernel_size == (3, 1) and gap.layers[0].stride == (2, 2)


@needs_torch
def test_to_torch_round_trip(rng):
    # seen failing on a real bug: float64 weights copied into the float32 module before the cast
    layers = [Conv2d(1, 3, 3, padding=1, activation="relu"), MaxPool2d(2), Flatten(), Dense(12, 4, activation="leaky_relu")]
    net = Network(layers, in_shape=(1, 4, 4), seed=1)
    masks = [{"W": rng.random((3, 1, 3, 3)) > 0.3}, {}, {}, {"W": rng.random((4, 12)) > 0.5, "b": np.array([1, 0, 1, 1], bool)}]
    net = net.with_masks(masks)
    back = audit.from_torch(audit.to_torch(net), (1, 4, 4))
    for a, b in zip(net.params + net.masks, back.params + back.masks):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert [l.to_dict() for l in back.layers] == [l.to_dict() for l in net.layers]


@needs_torch
def test_planted_bias_perturbation_is_caught_and_named(rng):
    # planted bug seen failing: parameters not compared (only outputs), so no check named the bias
    module = _torch_mlp()
    x, y = _data(rng, 6, (12,), 5)
    ref = audit.from_torch(module)
    params = [{k: v.copy() for k, v in p.items()} for p in ref.params]
    params[2]["b"][3] += 1e-7
    report = audit.compare_torch(module, x, y, reference=ref.with_params(params))
    assert not report.passed
    failed = report.failed_names(F64)
    assert "param/2/b" in failed and "logits" in failed and "act/2" in failed
    assert "act/0" not in failed and "act/1" not in failed  # layers before it agree
    assert report.first_divergence().name == "param/2/b" and "[3] Linear" in report.first_divergence().source
    # float32 rounding hides a 1e-7 error; the float64 audit does not
    assert report.failures(F32) == []
    assert "param/2/b" in report.to_markdown() and "**NO**" in report.to_markdown()


@needs_torch
def test_planted_transposed_weight_is_caught(rng):
    # planted bug seen failing: the parameter check comparing the module's weights with themselves
    module = _torch_mlp()
    x, y = _data(rng, 6, (12,), 5)
    ref = audit.from_torch(module)
    params = [{k: v.copy() for k, v in p.items()} for p in ref.params]
    params[1]["W"] = params[1]["W"].T.copy()  # 16 x 16: the shapes still fit
    report = audit.compare_torch(module, x, y, reference=ref.with_params(params), dtype_as_run=False)
    failed = report.failed_names(F64)
    assert failed[0] == "param/1/W" and "act/1" in failed and "act/0" not in failed and "grad/1/W" in failed
    assert report.sections == [F64]


@needs_torch
def test_planted_wrong_activation_is_caught(rng):
    # planted bug seen failing: _match_reference ignoring activation differences (no
    # layer/0/activation check; the first divergence pointed at act/0)
    torch.manual_seed(3)
    module = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5))
    x, y = _data(rng, 6, (12,), 5)
    ref = audit.from_torch(module)
    wrong = Network([Dense(12, 16, activation="sigmoid"), Dense(16, 5)], params=ref.params)
    report = audit.compare_torch(module, x, y, reference=wrong)
    assert not report.passed
    fd = report.first_divergence()
    assert fd.name == "layer/0/activation" and "tanh" in fd.note and "sigmoid" in fd.note
    assert {"act/0", "logits", "grad/0/W", "jacobian"} <= set(report.failed_names(F64))
    with pytest.raises(ValueError, match="structure"):
        audit.compare_torch(module, x, y, reference=Network([Dense(12, 16), Dense(16, 5, bias=False)], seed=0))


@needs_torch
def test_pruned_modules_become_masks(rng):
    # planted bug seen failing: pruning not recognised, W taken from the effective `weight`
    # (mask * orig) instead of weight_orig and no masks
    module = _torch_cnn()
    prune.l1_unstructured(module[0], "weight", amount=0.4)
    prune.random_unstructured(module[3], "weight", amount=0.5)
    prune.l1_unstructured(module[7], "bias", amount=0.3)
    prune.l1_unstructured(module[7], "weight", amount=0.6)
    net = audit.from_torch(module, (1, 8, 8))
    for i, j in ((0, 0), (2, 3), (5, 7)):
        m = module[j]
        assert np.array_equal(net.masks[i]["W"], m.weight_mask.numpy().astype(bool))
        assert np.array_equal(net.params[i]["W"], m.weight_orig.detach().double().numpy())
    assert np.array_equal(net.masks[5]["b"], module[7].bias_mask.numpy().astype(bool))
    assert net.masks[0]["b"].all() and net.masks[6]["W"].all()
    x, y = _data(rng, 5, (1, 8, 8), 3)
    report = audit.compare_torch(module, x, y, reference=net)
    assert report.passed, report.summary()
    _assert_agree_float64(report)
    assert report.get("prune_mask/0/W", F64).n_diff == 0  # the module's masks are compared too
    # pruned entries: zero gradient on both sides, never selected by SNIP
    _, grads = net.loss_and_grads(x, y)
    assert np.all(grads[0]["W"][~net.masks[0]["W"]] == 0)
    module(torch.as_tensor(x, dtype=torch.float32)).sum().backward()
    assert torch.all(module[0].weight_orig.grad[module[0].weight_mask == 0] == 0)
    other = net.with_masks([{**m, "W": np.ones_like(m["W"])} if "W" in m and i == 0 else m for i, m in enumerate(net.masks)])
    r2 = audit.compare_torch(module, x, y, reference=other, dtype_as_run=False, jacobian=False)
    assert "prune_mask/0/W" in r2.failed_names(F64)


@needs_torch
def test_jsv_statistics_match_refnet_spectrum(rng):
    # planted bug seen failing: the audit's std with ddof=1
    spectrum = pytest.importorskip("refnet.spectrum")
    module = _torch_mlp()
    x, y = _data(rng, 7, (12,), 5)
    report = audit.compare_torch(module, x, y, dtype_as_run=False)
    st = spectrum.jsv_stats(audit.from_torch(module), x, layerwise=False, zero_rtol=0)
    for k in ("mean", "std", "min", "max", "cn"):
        assert report.meta["reference_jsv"][k] == pytest.approx(st[k], rel=1e-12)
        assert report.get(f"jsv/{k}", F64).ref_max == pytest.approx(abs(st[k]), rel=1e-12)  # what was compared


@needs_torch
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: [nn.Linear(4, 4), nn.Dropout(0.1)], r"unsupported module module 1 \('1': Dropout"),
        (lambda: [nn.Linear(4, 4), nn.BatchNorm1d(4, momentum=None)], r"module 1 .*BatchNorm1d.*momentum=None.*Supported: Linear"),
        (lambda: [nn.Conv2d(2, 2, 3, groups=2)], r"module 0 .*groups=2"),
        (lambda: [nn.Conv2d(1, 2, 3, dilation=2)], r"dilation=\(2, 2\)"),
        (lambda: [nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect")], r"padding_mode='reflect'"),
        (lambda: [nn.Conv2d(1, 2, 4, padding="same")], r"even kernel"),
        (lambda: [nn.Conv2d(1, 2, 3), nn.MaxPool2d(3, stride=2)], r"module 1 .*stride \(2, 2\) != kernel \(3, 3\)"),
        (lambda: [nn.Conv2d(1, 2, 3), nn.AvgPool2d(2, ceil_mode=True)], r"ceil_mode=True"),
        (lambda: [nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d(2), nn.Flatten()], r"AdaptiveAvgPool2d\(1\) followed by Flatten"),
        (lambda: [nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Linear(1, 2)], r"AdaptiveAvgPool2d\(1\) followed by Flatten"),
        (lambda: [nn.Linear(4, 4), nn.Hardtanh(0.0, 1.0)], r"min_val=-1, max_val=1"),
        (lambda: [nn.Linear(4, 4), nn.Softplus(beta=2.0)], r"beta=1"),
        (lambda: [nn.Linear(4, 4), nn.ReLU6()], r"module 1 .*ReLU6"),
        (lambda: [nn.Tanh(), nn.Linear(4, 4)], r"module 0 .*it is the first module"),
        (lambda: [nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.ReLU()], r"module 2 .*follows '1' \(MaxPool2d\)"),
        (lambda: [nn.Linear(4, 4), nn.Tanh(), nn.ReLU()], r"module 2 .*second activation"),
        (lambda: [nn.Linear(4, 4), nn.Flatten(start_dim=0)], r"start_dim=0"),
    ],
)
def test_unsupported_modules_error(make, match):
    # planted bug seen failing: Dropout silently dropped like Identity
    modules = make()
    with pytest.raises(ValueError, match=match):
        audit.from_torch(nn.Sequential(*modules), (1, 8, 8) if isinstance(modules[0], nn.Conv2d) else None)


@needs_torch
def test_conversion_argument_errors():
    # planted bug seen failing: forward hooks on a module not refused
    with pytest.raises(ValueError, match=r"in_shape is required.*Conv2d.*\(1, 28, 28\)"):
        audit.from_torch(nn.Sequential(nn.Conv2d(1, 2, 3)))
    with pytest.raises(TypeError, match=r"torch.nn.Module, got function"):
        audit.from_torch(lambda x: x)
    # any traceable module converts now (graph import), a bare Linear included
    lin3 = nn.Linear(3, 3)
    net = audit.from_torch(lin3)
    assert [type(l).__name__ for l in net.layers] == ["Dense"]
    assert np.array_equal(net.params[0]["W"], lin3.weight.detach().double().numpy())
    with pytest.raises(ValueError, match="does not fit in_shape"):
        audit.from_torch(nn.Sequential(nn.Linear(4, 4)), (5,))
    lin = nn.Linear(4, 4)
    lin.register_forward_hook(lambda *a: None)
    with pytest.raises(ValueError, match="forward hooks"):
        audit.from_torch(nn.Sequential(lin))
    with pytest.raises(ValueError, match="loss must be one of"):
        audit.compare_torch(nn.Sequential(nn.Linear(4, 2)), np.zeros((2, 4)), np.zeros(2, int), loss="hinge")
    with pytest.raises(ValueError, match="y labels must lie in"):
        audit.compare_torch(nn.Sequential(nn.Linear(4, 2)), np.zeros((2, 4)), np.array([0, 2]))


@needs_torch
def test_softplus_threshold_is_reported_as_known_difference(rng):
    # planted bug seen failing: pre-activations counted with the wrong comparison
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 4), nn.Softplus(), nn.Linear(4, 2))
    with torch.no_grad():
        module[0].bias[0] = 25.0  # pre-activations above torch's threshold 20
    x, y = _data(rng, 5, (3,), 2)
    report = audit.compare_torch(module, x, y, dtype_as_run=False)
    note = [n for n in report.notes if "Softplus" in n]
    assert note and "threshold=20" in note[0] and " 5 of 20 pre-activations" in note[0]
    assert report.get("act/0", F64).max_abs_err == pytest.approx(np.log1p(np.exp(-25.0)), rel=0.01)


@needs_torch
def test_report_files_and_formats(rng, tmp_path):
    # planted bug seen failing: the tolerance left out of report.json
    module = _torch_mlp()
    x, y = _data(rng, 4, (12,), 5)
    report = audit.compare_torch(module, x, y, loss="mse", jacobian=False)
    md, js = report.save(tmp_path / "out")
    d = json.loads(open(js).read())
    assert d["passed"] is True and d["n_failed"] == 0 and d["meta"]["loss"] == "mse"
    rows = {(c["section"], c["name"]): c for c in d["checks"]}
    c = rows[(F32, "grad/0/W")]
    assert set(c) >= {"name", "max_abs_err", "max_rel_err", "tol", "passed"} and c["tol"] == 1e-4
    assert "jacobian" not in {c["name"] for c in d["checks"]}
    text = open(md).read()
    assert "| `grad/0/W` |" in text and "## as-run float32: all passed" in text
    assert report.to_dict()["checks"] == d["checks"]


# ============================================================================================
# JAX and Flax
# ============================================================================================


def _jax():
    jax = pytest.importorskip("jax")
    return jax, jax.numpy


def _jax_params(net, dtype):
    _, jnp = _jax()
    return [{k: jnp.asarray(v, dtype=dtype) for k, v in p.items()} for p in net.params]


def test_jax_mlp_and_cnn_agree_in_float64(rng):
    # planted bugs seen failing: the JAX Jacobian transposed; jax_enable_x64 left switched on
    # after the call
    jax, jnp = _jax()
    before = bool(jax.config.read("jax_enable_x64"))
    mlp_layers = [Dense(12, 16, activation="tanh"), Dense(16, 16, activation="elu"), Dense(16, 5)]
    cnn_layers = [Conv2d(1, 3, 3, padding=1, activation="tanh"), AvgPool2d(2),
                  Conv2d(3, 4, 3, padding=1, padding_mode="circular", activation="relu"), MaxPool2d(2),
                  Flatten(), Dense(16, 3)]
    for layers, in_shape, C in ((mlp_layers, (12,), 5), (cnn_layers, (1, 8, 8), 3)):
        net = Network(layers, in_shape=in_shape, seed=2)
        x, y = _data(rng, 5, in_shape, C)
        params = _jax_params(net, jnp.float32)
        report = audit.compare_jax(audit.jax_apply(layers), params, layers, x, y)
        assert report.passed, report.summary()
        _assert_agree_float64(report)
        assert report.sections == [F64, F32]
        c = report.get("logits", F32)
        assert 1e-9 < c.max_rel_err < 1e-4
    assert bool(jax.config.read("jax_enable_x64")) == before


def test_jax_planted_discrepancies(rng):
    # planted bug seen failing: the JAX params not compared (no param/0/W check)
    jax, jnp = _jax()
    layers = [Dense(8, 8, activation="tanh"), Dense(8, 3)]
    net = Network(layers, seed=0)
    x, y = _data(rng, 4, (8,), 3)
    # the common JAX mistake: (in, out) kernels given where refnet layout (out, in) is expected
    params = [{k: v.copy() for k, v in p.items()} for p in net.params]  # NumPy float64 (JAX keeps x64 off)
    params_t = [{"W": params[0]["W"].T, "b": params[0]["b"]}, params[1]]
    rep = audit.compare_jax(audit.jax_apply(layers), params_t, layers, x, y, reference=net)
    assert "param/0/W" in rep.failed_names(F64) and "logits" in rep.failed_names(F64)
    # a wrong activation in the user's function (sigmoid where the spec says tanh)
    def wrong(p, xb):
        h = jax.nn.sigmoid(xb @ p[0]["W"].T + p[0]["b"])
        return h @ p[1]["W"].T + p[1]["b"]

    rep = audit.compare_jax(wrong, params, layers, x, y, jacobian=False)
    assert not rep.passed and {"logits", "loss", "grad/0/W", "cs_scores/0/W"} <= set(rep.failed_names(F64))
    assert rep.sections == [F64]  # float64 params: the as-run audit is the float64 audit


def test_jax_params_forms_and_masks(rng):
    # planted bug seen failing: the short params list mapped to the wrong layers
    _, jnp = _jax()
    layers = [Conv2d(1, 2, 3, activation="tanh"), Flatten(), Dense(8, 3)]
    net = Network(layers, in_shape=(1, 4, 4), seed=0)
    masks = [{"W": rng.random((2, 1, 3, 3)) > 0.4}, {}, {"W": rng.random((3, 8)) > 0.4}]
    short = [p for p in _jax_params(net, jnp.float32) if p]  # only layers with parameters
    got = audit.from_jax(short, layers, in_shape=(1, 4, 4), masks=masks)
    assert np.array_equal(got.params[2]["W"], net.params[2]["W"].astype(np.float32)) and np.array_equal(got.masks[0]["W"], masks[0]["W"])
    x, y = _data(rng, 3, (1, 4, 4), 3)
    rep = audit.compare_jax(audit.jax_apply(layers, masks=masks), short, layers, x, y, masks=masks)
    assert rep.passed, rep.summary()
    with pytest.raises(ValueError, match=r"params\[0\] must have keys \['W', 'b'\]"):
        audit.from_jax([{"W": np.zeros((2, 1, 3, 3))}, {}, {"W": np.zeros((3, 8)), "b": np.zeros(3)}], layers, (1, 4, 4))
    with pytest.raises(ValueError, match="in_shape is required"):
        audit.from_jax(short, layers)


def test_flax_sequential(rng):
    # planted bug seen failing: the Dense after an NHWC flatten without the (h, w, c) -> (c, h, w)
    # column permutation
    jax, jnp = _jax()
    pytest.importorskip("flax")
    import flax.linen as fnn

    model = fnn.Sequential([fnn.Conv(2, (3, 3), padding="SAME"), jnp.tanh, functools.partial(fnn.max_pool, window_shape=(2, 2), strides=(2, 2)),
                            audit.flax_flatten, fnn.Dense(5), functools.partial(jax.nn.leaky_relu, negative_slope=0.1), fnn.Dense(3)])
    x = rng.standard_normal((4, 4, 6, 2)).astype(np.float32)  # NHWC
    y = rng.integers(0, 3, 4)
    variables = model.init(jax.random.PRNGKey(0), x)
    net = audit.from_flax(model, variables, x.shape[1:])
    assert net.in_shape == (2, 4, 6) and [type(l).__name__ for l in net.layers] == ["Conv2d", "MaxPool2d", "Flatten", "Dense", "Dense"]
    k = np.asarray(variables["params"]["layers_0"]["kernel"])  # HWIO
    assert np.array_equal(net.params[0]["W"], k.transpose(3, 2, 0, 1))
    assert np.allclose(net.forward(x.transpose(0, 3, 1, 2)), np.asarray(model.apply(variables, x)), atol=1e-5)
    report = audit.compare_flax(model, variables, x, y)
    assert report.passed, report.summary()
    _assert_agree_float64(report)
    with pytest.raises(ValueError, match="unsupported Flax layer layers\\[1\\]"):
        audit.from_flax(fnn.Sequential([fnn.Dense(3), lambda h: h * 2]), {"params": {"layers_0": {}}}, (4,))


# ============================================================================================
# the framework-neutral .npz
# ============================================================================================


def _npz_case(rng):
    from refnet.jacobians import jacobian

    net = mlp([6, 8, 8, 3], activation="tanh", seed=0)
    x, y = _data(rng, 5, (6,), 3)
    out = net.forward(x)
    loss, grads = net.loss_and_grads(x, y)
    scores = [{"W": np.abs(g["W"] * p["W"])} for g, p in zip(grads, net.params)]
    return net, x, y, dict(logits=out, loss=loss, grads=grads, jacobian=jacobian(net, x), cs_scores=scores)


def test_npz_round_trip(rng, tmp_path):
    # planted bug seen failing: float32 outputs held to the float64 tolerance
    net, x, y, outs = _npz_case(rng)
    path = tmp_path / "a.npz"
    audit.write_npz(path, net, x, y, **outs)
    rep = audit.compare_npz(path)
    assert rep.passed, rep.summary()
    assert {"logits", "loss", "grad/0/W", "grad/2/b", "jacobian", "cs_scores/1/W", "mask/total", "jsv/cn"} <= {c.name for c in rep.checks}
    assert all(c.max_rel_err < 1e-12 for c in rep.checks if c.n_diff is None) and rep.get("mask/total").n_diff == 0
    # float32 outputs are held to the float32 tolerance
    outs32 = {**outs, "logits": outs["logits"].astype(np.float32)}
    audit.write_npz(path, net, x, y, **outs32)
    rep = audit.compare_npz(path)
    assert rep.passed and rep.get("logits").tol == 1e-4 and rep.get("loss").tol == 1e-10


def test_npz_planted_discrepancies(rng, tmp_path):
    # planted bug seen failing: given SNIP masks ignored when scores are also present
    net, x, y, outs = _npz_case(rng)
    grads = [{k: v.copy() for k, v in g.items()} for g in outs["grads"]]
    grads[1]["W"][2, 3] *= 1 + 1e-6
    masks = audit.reference.topk_masks(net, outs["cs_scores"], 0.9)
    flat = np.concatenate([m["W"].ravel() for m in masks])
    kept = np.flatnonzero(flat)[0]
    masks[0]["W"].ravel()[kept] = False  # drop the top-ranked weight: no tie explains this
    path = tmp_path / "b.npz"
    audit.write_npz(path, net, x, y, **{**outs, "grads": grads}, masks=masks)
    rep = audit.compare_npz(path)
    assert not rep.passed
    assert rep.failed_names() == ["grad/1/W", "mask/0/W", "mask/total"]
    assert rep.get("mask/0/W").n_diff == 1


def test_npz_validation_errors(rng, tmp_path):
    # planted bug seen failing: gradient shapes not validated
    net, x, y, outs = _npz_case(rng)
    good = tmp_path / "good.npz"
    audit.write_npz(good, net, x, y, **outs)
    base = dict(np.load(good))

    def write(name, **changes):
        d = {**base, **changes}
        for k, v in list(d.items()):
            if v is None:
                del d[k]
        p = tmp_path / name
        np.savez(p, **d)
        return p

    with pytest.raises(ValueError, match=r"missing key 'arch'"):
        audit.compare_npz(write("c1.npz", arch=None))
    with pytest.raises(ValueError, match=r"missing required keys \['param/1/b'\]"):
        audit.compare_npz(write("c2.npz", **{"param/1/b": None}))
    with pytest.raises(ValueError, match=r"'grad/0/W' must have shape \(8, 6\), got \(6, 8\)"):
        audit.compare_npz(write("c3.npz", **{"grad/0/W": np.zeros((6, 8))}))
    with pytest.raises(ValueError, match=r"unknown keys \['grads/0/W'\]"):
        audit.compare_npz(write("c4.npz", **{"grads/0/W": np.zeros((8, 6))}))
    with pytest.raises(ValueError, match="allow_pickle=False"):
        audit.compare_npz(write("c5.npz", logits=np.array([{"a": 1}], dtype=object)))
    with pytest.raises(ValueError, match="not valid JSON"):
        audit.compare_npz(write("c6.npz", arch=np.array("{nope")))
    with pytest.raises(ValueError, match=r"'x' must have shape \(B, 6\)"):
        audit.compare_npz(write("c7.npz", x=np.zeros((5, 7))))
    with pytest.raises(ValueError, match=r"'jacobian' must have shape \(5, 3, 6\)"):
        audit.compare_npz(write("c8.npz", jacobian=np.zeros((5, 6, 3))))
    with pytest.raises(FileNotFoundError):
        audit.compare_npz(tmp_path / "missing.npz")


# ============================================================================================
# refnet audit (command line, in-process)
# ============================================================================================


@needs_torch
def test_cli_torch_checkpoint_and_state_dict(tmp_path, capsys):
    # planted bug seen failing: a pruned state_dict (weight_orig/weight_mask) not loadable
    from refnet.cli import main

    module = audit.torch_from_arch("mlp-3-tanh-w8", (20,), 4)
    prune.l1_unstructured(module[2], "weight", amount=0.5)
    ck = tmp_path / "ck.pt"
    audit.save_torch_checkpoint(module, ck, "mlp-3-tanh-w8", (20,))
    out = tmp_path / "out"
    assert main(["audit", "--torch", str(ck), "--data", "synthetic", "--n", "12", "--out", str(out)]) == 0
    d = json.loads((out / "report.json").read_text())
    assert d["passed"] and d["meta"]["module_dtype"] == "float32" and "as-run float32" in {c["section"] for c in d["checks"]}
    assert (out / "report.md").read_text().startswith("# refnet audit: torch")
    assert "wrote" in capsys.readouterr().out
    sd = tmp_path / "sd.pt"
    torch.save(module.state_dict(), sd)
    assert main(["audit", "--torch-state", str(sd), "--torch-arch", "mlp-3-tanh-w8", "--data", "synthetic",
                 "--n", "8", "--no-jacobian", "--out", str(out), "--overwrite", "--quiet"]) == 0
    assert "PASSED" in capsys.readouterr().out


def test_cli_npz_failure_exits_1(rng, tmp_path, capsys):
    # planted bug seen failing: run_audit returning 0 regardless of the report
    from refnet.cli import main

    net, x, y, outs = _npz_case(rng)
    path = tmp_path / "bad.npz"
    audit.write_npz(path, net, x, y, **{**outs, "logits": outs["logits"] + 1e-8})
    out = tmp_path / "o"
    assert main(["audit", "--npz", str(path), "--out", str(out)]) == 1
    d = json.loads((out / "report.json").read_text())
    assert d["passed"] is False and "npz: logits" in d["failed"]
    assert "FAILED logits" in capsys.readouterr().out
    assert (out / "report.md").exists()


@needs_torch
def test_cli_bad_arguments_exit_2(tmp_path, capsys):
    # planted bug seen failing: --data accepted (and ignored) with --npz
    from refnet.cli import main

    sd = tmp_path / "sd.pt"
    torch.save(audit.torch_from_arch("mlp-2-relu-w4", (20,), 4).state_dict(), sd)
    cases = [
        (["audit"], "one of the arguments --torch"),
        (["audit", "--npz", str(tmp_path / "x.npz"), "--data", "mnist5k"], "--data: not used with --npz"),
        (["audit", "--torch", str(sd), "--in-shape", "1,x"], "--in-shape"),
        (["audit", "--torch", str(sd), "--data", "synthetic"], "bare state_dict: give arch"),
        (["audit", "--torch", str(tmp_path / "none.pt"), "--torch-arch", "mlp-2-relu"], "does not exist"),
        (["audit", "--torch", str(sd), "--torch-arch", "mlp-3-relu-w4", "--data", "synthetic"], "does not fit arch"),
        (["audit", "--torch", str(sd), "--torch-arch", "nope", "--data", "synthetic"], "--torch-arch"),
    ]
    for i, (argv, msg) in enumerate(cases):  # one --out each: a failed run leaves its run.json there
        assert main(argv + ["--out", str(tmp_path / f"o{i}")]) == 2, argv
        err = capsys.readouterr().err
        assert "refnet: error:" in err and msg in err, (argv, err)


@needs_torch
def test_state_dict_into_any_module_and_arch_alias(tmp_path, capsys):
    # planted bug seen failing: load_torch_state not casting the module to the state dict's dtype
    from refnet.cli import main

    torch.manual_seed(0)
    src = nn.Sequential(nn.Linear(20, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    prune.l1_unstructured(src[0], "weight", amount=0.5)
    path = tmp_path / "sd.pt"
    torch.save(src.state_dict(), path)
    dst = audit.load_torch_state(nn.Sequential(nn.Linear(20, 8), nn.Tanh(), nn.Linear(8, 4)), path)
    assert dst[0].weight_orig.dtype == torch.float64 and torch.equal(dst[0].weight_mask, src[0].weight_mask)
    net = audit.from_torch(dst)
    assert net.masks[0]["W"].sum() == 80 and np.array_equal(net.params[0]["W"], src[0].weight_orig.detach().numpy())
    with pytest.raises(ValueError, match=r"does not fit the module \(Sequential\)"):
        audit.load_torch_state(nn.Sequential(nn.Linear(20, 9)), path)
    # the sources of a Sequential keep their form (module index and class per refnet layer)
    report = audit.compare_torch(dst, np.random.default_rng(0).standard_normal((3, 20)), np.array([0, 1, 3]), jacobian=False)
    assert report.passed and report.get("act/0").source == "torch [0] Linear + [1] Tanh"
    # a bare state dict plus --arch (an alias of --torch-arch)
    sd = tmp_path / "arch.pt"
    torch.save(audit.torch_from_arch("mlp-2-relu-w4", (20,), 4).state_dict(), sd)
    assert main(["audit", "--torch", str(sd), "--arch", "mlp-2-relu-w4", "--data", "synthetic", "--n", "5",
                 "--no-jacobian", "--out", str(tmp_path / "o"), "--quiet"]) == 0
    assert "PASSED" in capsys.readouterr().out
