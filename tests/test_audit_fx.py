"""Tests for the PyTorch graph importer (refnet.audit.fx behind refnet.audit.from_torch).

Each test was seen failing once on a planted bug in refnet/audit/fx.py or refnet/audit/graph.py
(noted per test). The three "silent" cases of the old attribute walker are the first three tests:
each is now converted exactly or refused.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
import torch.nn.utils.prune as prune  # noqa: E402
from torch import nn  # noqa: E402

from refnet import audit  # noqa: E402
from refnet.audit import fx, fx_ops, graph  # noqa: E402
from refnet.layers import AvgPool2d, Conv2d, Dense, Flatten, GlobalAvgPool2d, MaxPool2d  # noqa: E402

F64 = "float64"
F32 = "as-run float32"


def _data(rng, B, in_shape, C):
    return rng.standard_normal((B, *in_shape)), rng.integers(0, C, B)


def _f64(module, x):
    """The module's own forward in float64 (on a copy)."""
    m = fx.deepcopy_module(module).to(torch.float64)
    with torch.no_grad():
        return m(torch.as_tensor(x, dtype=torch.float64)).numpy()


def _assert_float64_exact(report, rtol=1e-10):
    cs = [c for c in report.checks if c.section == F64]
    assert {"logits", "loss", "mask/total"} <= {c.name for c in cs}
    for c in cs:
        assert c.passed, c
        if c.n_diff is None:
            assert c.max_rel_err <= rtol, c


# --------------------------------------------------------------------------------------------
# Synaptic-Flow's layers (Layers/layers.py): Linear/Conv2d subclasses that multiply a weight_mask
# buffer into their weight in their own forward
# --------------------------------------------------------------------------------------------


class MaskedLinear(nn.Linear):
    def __init__(self, in_features, out_features, bias=True):
        super().__init__(in_features, out_features, bias)
        self.register_buffer("weight_mask", torch.ones(self.weight.shape))
        if self.bias is not None:
            self.register_buffer("bias_mask", torch.ones(self.bias.shape))

    def forward(self, input):
        W = self.weight_mask * self.weight
        b = self.bias_mask * self.bias if self.bias is not None else self.bias
        return F.linear(input, W, b)


class MaskedConv2d(nn.Conv2d):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("weight_mask", torch.ones(self.weight.shape))
        if self.bias is not None:
            self.register_buffer("bias_mask", torch.ones(self.bias.shape))

    def _conv_forward(self, input, weight, bias):
        return F.conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, input):
        W = self.weight_mask * self.weight
        b = self.bias_mask * self.bias if self.bias is not None else self.bias
        return self._conv_forward(input, W, b)


def _synflow_fc(in_shape, num_classes, L=6, N=24, nonlinearity=None, seed=0):
    """Synaptic-Flow's Models.mlp.fc: ONE nonlinearity instance appended after every hidden layer."""
    torch.manual_seed(seed)
    nonlinearity = nn.Tanh() if nonlinearity is None else nonlinearity
    size = int(np.prod(in_shape))
    modules = [nn.Flatten(), MaskedLinear(size, N), nonlinearity]
    for _ in range(L - 2):
        modules += [MaskedLinear(N, N), nonlinearity]
    modules.append(MaskedLinear(N, num_classes))
    return nn.Sequential(*modules)


def _set_density(module, density, seed=0):
    """Exactly round(density * size) ones in every weight_mask (bias masks left at 1)."""
    g = np.random.default_rng(seed)
    for m in module.modules():
        if hasattr(m, "weight_mask"):
            n = m.weight_mask.numel()
            flat = np.zeros(n)
            flat[g.choice(n, int(round(density * n)), replace=False)] = 1
            m.weight_mask.copy_(torch.as_tensor(flat.reshape(tuple(m.weight_mask.shape))))


def test_reused_activation_instance_is_converted_once_per_use(rng):
    # the old walker (named_children) kept 1 of 5 Tanh and the logits differed by ~1e-1.
    # planted bug seen failing: repeated calls of one module taken as no-ops (as named_children keeps
    # one; the probe refused: relative error 1.8e-1)
    module = _synflow_fc((1, 6, 6), 5)
    assert len(list(module.named_children())) == 8  # 12 calls, 8 distinct children
    net = audit.from_torch(module, (1, 6, 6))
    assert [type(l).__name__ for l in net.layers] == ["Flatten"] + ["Dense"] * 6
    assert [str(l.activation) for l in net.layers[1:]] == ["tanh"] * 5 + ["identity"]
    x, y = _data(rng, 7, (1, 6, 6), 5)
    assert np.allclose(net.forward(x), _f64(module, x), rtol=0, atol=1e-13)
    report = audit.compare_torch(module, x, y)
    assert report.passed, report.summary()
    _assert_float64_exact(report)
    # every use is a source of its own
    assert "[2] Tanh (call 3 of 5)" in report.get("act/3", F64).source
    # what the old walker computed is far from it: the silent error this closes
    one_tanh = net.layers[:2] + tuple(Dense(l.n_in, l.n_out) for l in net.layers[2:])
    wrong = type(net)(one_tanh, in_shape=(1, 6, 6), params=net.params, masks=net.masks)
    assert np.max(np.abs(wrong.forward(x) - net.forward(x))) > 1e-2 * np.max(np.abs(net.forward(x)))


def test_masked_subclass_keeps_its_weight_mask_buffer(rng):
    # the old walker converted these as plain layers: a model pruned to density 0.1 came back dense.
    # planted bug seen failing: the mask of `weight_mask * weight` dropped (the probe refused the
    # network: node 'linear' differs)
    module = _synflow_fc((12,), 4, L=4, N=40, nonlinearity=nn.ReLU())
    _set_density(module, 0.1)
    net = audit.from_torch(module, (12,))
    lin = [m for m in module.modules() if isinstance(m, MaskedLinear)]
    dense = [i for i, l in enumerate(net.layers) if isinstance(l, Dense)]
    for i, m in zip(dense, lin):
        assert np.array_equal(net.masks[i]["W"], m.weight_mask.numpy() == 1)
        assert net.masks[i]["W"].mean() == pytest.approx(0.1, abs=0.5 / m.weight_mask.numel())
        assert np.array_equal(net.params[i]["W"], m.weight.detach().double().numpy())  # W unmasked, as refnet keeps it
    total = sum(int(net.masks[i]["W"].sum()) for i in dense)
    assert total == sum(int(m.weight_mask.sum()) for m in lin)
    x, y = _data(rng, 6, (12,), 4)
    report = audit.compare_torch(module, x, y)
    assert report.passed, report.summary()
    _assert_float64_exact(report)
    assert report.get("prune_mask/1/W", F64).n_diff == 0  # compared, as for torch.nn.utils.prune
    # pruned weights: zero gradient on both sides
    _, grads = net.loss_and_grads(x, y)
    assert np.all(grads[1]["W"][~net.masks[1]["W"]] == 0)
    # the convolution twin, in a module with its own forward
    torch.manual_seed(1)

    class ConvNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = MaskedConv2d(2, 5, 3, padding=1)
            self.fc = MaskedLinear(5 * 3 * 3, 3)

        def forward(self, x):
            x = F.avg_pool2d(F.elu(self.conv(x), 0.5), 2)
            return self.fc(x.view(x.size(0), -1))

    cnet = ConvNet()
    _set_density(cnet, 0.1, seed=3)
    net = audit.from_torch(cnet, (2, 6, 6))
    assert [type(l) for l in net.layers] == [Conv2d, AvgPool2d, Flatten, Dense]
    assert net.masks[0]["W"].sum() == round(0.1 * 5 * 2 * 9)
    assert np.array_equal(net.masks[0]["W"], cnet.conv.weight_mask.numpy() == 1)
    x, y = _data(rng, 4, (2, 6, 6), 3)
    report = audit.compare_torch(cnet, x, y, dtype_as_run=False)
    assert report.passed, report.summary()
    _assert_float64_exact(report)
    assert report.get("act/0", F64).source == "torch [conv] MaskedConv2d: torch.conv2d + [elu] F.elu"


def test_hooks_are_refused_with_their_module(rng):
    # the old walker ignored a forward hook on the root.
    # planted bug seen failing: the root skipped by the hook check (the probe's graph-vs-module check
    # then refused it, but without naming the hook)
    module = _synflow_fc((12,), 4, L=3)
    h = module.register_forward_hook(lambda m, inp, out: 2 * out)
    with pytest.raises(ValueError, match=r"module '<root>' \(Sequential\): has forward hooks \(.*<lambda>\)"):
        audit.from_torch(module, (12,))
    with pytest.raises(ValueError, match="forward hooks"):
        audit.compare_torch(module, *_data(rng, 3, (12,), 4))
    h.remove()
    h = module[3].register_forward_pre_hook(lambda m, inp: None)
    with pytest.raises(ValueError, match=r"module '3' \(MaskedLinear\): has a forward pre-hook"):
        audit.from_torch(module, (12,))
    h.remove()
    h = module[2].register_full_backward_hook(lambda m, gi, go: None)
    with pytest.raises(ValueError, match=r"module '2' \(Tanh\): has backward hooks"):
        audit.from_torch(module, (12,))
    h.remove()
    h = torch.nn.modules.module.register_module_forward_hook(lambda m, inp, out: None)
    try:
        with pytest.raises(ValueError, match="global module forward hook"):
            audit.from_torch(module, (12,))
    finally:
        h.remove()
    assert len(audit.from_torch(module, (12,)).layers) == 4  # nothing left behind


def test_torch_prune_masks_and_hooks(rng):
    # planted bug seen failing: prune's weight_orig/weight_mask not recognised (`weight`, the hook's
    # product, refused as not a parameter)
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 8, 3)
            self.fc = nn.Linear(8 * 4 * 4, 30)
            self.out = nn.Linear(30, 3)

        def forward(self, x):
            x = torch.relu(self.conv(x))
            x = torch.flatten(x, 1)
            return self.out(torch.tanh(self.fc(x)))

    module = Net()
    prune.random_unstructured(module.conv, "weight", amount=0.9)
    prune.l1_unstructured(module.fc, "weight", amount=0.5)
    prune.random_unstructured(module.fc, "weight", amount=0.8)  # iterative: a PruningContainer, density 0.1
    prune.l1_unstructured(module.out, "bias", amount=1)
    net = audit.from_torch(module, (1, 6, 6))
    for i, m in ((0, module.conv), (2, module.fc)):
        assert np.array_equal(net.masks[i]["W"], m.weight_mask.numpy() == 1)
        assert np.array_equal(net.params[i]["W"], m.weight_orig.detach().double().numpy())
        assert net.masks[i]["W"].mean() == pytest.approx(0.1, abs=0.5 / m.weight.numel())
    assert net.masks[3]["b"].sum() == 2 and net.masks[3]["W"].all()
    x, y = _data(rng, 5, (1, 6, 6), 3)
    report = audit.compare_torch(module, x, y)
    assert report.passed, report.summary()
    _assert_float64_exact(report)
    assert report.get("prune_mask/2/W", F64).n_diff == 0


def test_a_module_with_its_own_forward_converts(rng):
    # planted bug seen failing: x.view(x.size(0), -1) mapped to nothing (the Dense then got a
    # 4-d input: refused by the Network, never audited)
    torch.manual_seed(2)

    class LeNetish(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
            self.conv2 = nn.Conv2d(4, 6, 3, padding="same", padding_mode="circular")
            self.drop = nn.Dropout(0.5)
            self.fc1 = nn.Linear(6 * 2 * 2, 10)
            self.fc2 = nn.Linear(10, 3)

        def forward(self, x):
            x = F.max_pool2d(F.relu(self.conv1(x)), 2)
            x = F.avg_pool2d(self.conv2(x).sigmoid(), kernel_size=2)
            x = x.view(x.size(0), -1)
            x = self.drop(F.leaky_relu(self.fc1(x), negative_slope=0.1))
            x = torch.flatten(x.contiguous(), 1)
            return self.fc2(x)

    module = LeNetish().eval()  # eval: the Dropout is the identity
    net = audit.from_torch(module, (1, 8, 8))
    assert [type(l) for l in net.layers] == [Conv2d, MaxPool2d, Conv2d, AvgPool2d, Flatten, Dense, Flatten, Dense]
    assert [str(getattr(l, "activation", "")) for l in net.layers] == ["relu", "", "sigmoid", "", "", "leaky_relu(slope=0.1)", "", "identity"]
    assert net.layers[2].padding_mode == "circular"
    x, y = _data(rng, 5, (1, 8, 8), 3)
    report = audit.compare_torch(module, x, y)
    assert report.passed, report.summary()
    _assert_float64_exact(report)
    srcs = [report.get(f"act/{i}", F64).source for i in range(len(net.layers))]
    assert srcs[0] == "torch [conv1] Conv2d + [relu] F.relu" and srcs[4] == "torch [view] Tensor.view"
    assert srcs[5] == "torch [fc1] Linear + [leaky_relu] F.leaky_relu + [drop] Dropout + [contiguous] Tensor.contiguous"
    # the probe's record
    assert report.meta["import_probe"]["probe_max_rel_err"] <= fx.PROBE_RTOL


def test_global_pooling_forms(rng):
    # planted bug seen failing: F.adaptive_avg_pool2d missing from the function table
    torch.manual_seed(0)

    class Gap(nn.Module):
        def __init__(self, how):
            super().__init__()
            self.how = how
            self.conv = nn.Conv2d(2, 4, 3)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            x = F.selu(self.conv(x))
            if self.how == "mean":
                x = x.mean(dim=(2, 3))
            elif self.how == "keepdim":
                x = torch.mean(x, (-1, -2), keepdim=True).reshape(x.shape[0], -1)
            else:
                x = torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1)
            return self.fc(x)

    x, y = _data(rng, 4, (2, 5, 5), 3)
    for how in ("mean", "keepdim", "adaptive"):
        module = Gap(how)
        net = audit.from_torch(module, (2, 5, 5))
        assert [type(l) for l in net.layers] == [Conv2d, GlobalAvgPool2d, Dense], how
        report = audit.compare_torch(module, x, y, dtype_as_run=False)
        assert report.passed, report.summary()


@pytest.mark.parametrize(
    "fwd, match",
    [
        (lambda s, x: s.b(F.gelu(s.a(x))), r"unsupported operation node 1 'gelu' \(F.gelu\)"),
        (lambda s, x: F.log_softmax(s.b(torch.relu(s.a(x))), dim=1), r"node 3 'log_softmax' \(F.log_softmax\)"),
        (lambda s, x: s.b(s.a(x) * 2.0), r"node 1 'mul' \(operator.mul\)"),
        (lambda s, x: torch.cat([s.a(x), s.a(x)], 1), r"node 2 'cat' \(torch.cat\)"),
        (lambda s, x: s.b(s.a(x).float()), r"node 1 'float\w*' \(Tensor.float\)"),
        (lambda s, x: s.b(torch.relu(s.a(x))) + x[:, :4], r"node \d+ 'getitem' \(operator.getitem\)"),
        (lambda s, x: s.b(F.relu6(s.a(x))), r"node 1 'relu6' \(F.relu6\)"),
        (lambda s, x: s.b(F.hardtanh(s.a(x), 0.0, 1.0)), r"node 1 'hardtanh'.*min_val=-1, max_val=1"),
        (lambda s, x: s.b(F.softplus(s.a(x), beta=2)), r"node 1 'softplus'.*beta=1"),
        (lambda s, x: s.b(F.dropout(s.a(x), 0.3)), r"node 1 'dropout'.*training mode"),
        (lambda s, x: s.a(x).view(-1, 2), r"node 1 'view' \(Tensor.view\): output shape \(10, 2\) with a batch of 5"),
        (lambda s, x: s.b(s.a(x).view(5, -1)), r"node 1 'view'.*depends on the batch size"),
        (lambda s, x: s.b(torch.tanh(s.b(x))), r"parameter 'b.weight' is also used"),
        (lambda s, x: s.b(torch.tanh(x)), r"node 0 'tanh' \(torch.tanh\): an activation must come right after"),
    ],
)
def test_unsupported_operations_are_refused_naming_the_node(fwd, match):
    # planted bug seen failing: call_function targets missing from the table fell through to a
    # KeyError instead of a ValueError naming the node
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)

        def forward(self, x):
            return fwd(self, x)

    with pytest.raises(ValueError, match=match):
        audit.from_torch(M(), (4,))


def test_residual_add_and_batchnorm_import_and_their_limits_are_named():
    # planted bugs seen failing: operator.add missing from the table (refused as an unknown
    # operation); an activation fused into a layer whose output a shortcut also reads (the
    # probe then named the addition); the x + x refusal removed (imported as Add of one input)
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self, bn=False, tap=False):
            super().__init__()
            self.a = nn.Linear(6, 6)
            self.bn = nn.BatchNorm1d(6) if bn else nn.Identity()
            self.b = nn.Linear(6, 6)
            self.tap = tap

        def forward(self, x):
            h = self.bn(self.a(x))
            out = self.b(F.relu(h))
            return out + (h if self.tap else x)

    for bn in (False, True):
        for train in (False, True):
            block = Block(bn=bn).train(train)
            net = audit.from_torch(block, (6,))
            assert [type(l).__name__ for l in net.layers] == (["Dense", "BatchNorm1d", "Dense", "Add"] if bn else
                                                              ["Dense", "Dense", "Add"])
            assert net.inputs[-1] == ((3, 0) if bn else (2, 0))
            if bn:
                assert net.layers[1].mode == ("train" if train else "eval")
            with torch.no_grad():
                x = torch.randn(7, 6, dtype=torch.float64)
                want = fx.deepcopy_module(block).double()(x).numpy()
            np.testing.assert_allclose(net.forward(x.numpy()), want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"an activation of 'a' \(Linear\), whose output 'add' \(operator.add\) also reads"):
        audit.from_torch(Block(tap=True), (6,))

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 6)

        def forward(self, x):
            h = self.a(x)
            return h + h

    with pytest.raises(ValueError, match=r"'add' \(operator.add\).*a tensor added to itself"):
        audit.from_torch(Twice(), (6,))
    with pytest.raises(ValueError, match=r"module 0 \('0': BatchNorm3d.*refnet has BatchNorm1d and BatchNorm2d"):
        audit.from_torch(nn.Sequential(nn.BatchNorm3d(2)), (2, 2, 2, 2))
    bn = nn.BatchNorm1d(6, momentum=None)
    with pytest.raises(ValueError, match=r"module 1 \('1': BatchNorm1d.*momentum=None"):
        audit.from_torch(nn.Sequential(nn.Linear(6, 6), bn).eval(), (6,))
    assert not graph.REFUSED  # nothing is refused for want of an engine layer any more


def test_untraceable_forward_and_inplace_and_other_refusals():
    # planted bug seen failing: the module whose forward failed to trace not tracked (the root
    # named instead)
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x):
            return self.a(x) if x.sum() > 0 else x

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Branchy()
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            return self.out(self.inner(x))

    with pytest.raises(ValueError, match=r"module 'inner' \(Branchy\) cannot be traced by torch.fx"):
        audit.from_torch(Outer(), (4,))

    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 2)

        def forward(self, x):
            h = self.a(x)
            h.relu_()  # result not assigned: the graph alone would miss it
            return self.b(h)

    with pytest.raises(ValueError, match=r"node 1 'relu_' \(Tensor.relu_\): an in-place operation whose result is not used"):
        audit.from_torch(InPlace(), (4,))
    seq = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 2))  # in-place on its only reader: fine
    assert str(audit.from_torch(seq).layers[0].activation) == "relu"
    with pytest.raises(ValueError, match="the torch module does not fit in_shape=\\(5,\\)"):
        audit.from_torch(seq, (5,))
    with pytest.raises(ValueError, match=r"in_shape is required.*Conv2d.*'c' \(Conv2d\)"):
        audit.from_torch(_named_conv())
    with pytest.raises(TypeError, match="torch.nn.Module"):
        audit.from_torch(np.zeros(3))


def _named_conv():
    m = nn.Sequential()
    m.add_module("c", nn.Conv2d(1, 2, 3))
    return m


def test_the_probe_catches_a_wrong_mapping(monkeypatch):
    # planted bug seen failing: the probe check skipped (convert_module returned without it)
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8, 3))
    audit.from_torch(module, (1, 6, 6))  # right
    monkeypatch.setitem(graph.LAYERS, "avgpool", MaxPool2d)  # a mapping bug: avg -> max pooling
    with pytest.raises(ValueError, match=r"does not reproduce the module on the probe batch: module 2 \('2': AvgPool2d.*differs"):
        audit.from_torch(module, (1, 6, 6))
    monkeypatch.undo()

    def wrong_activation(m, nn_):  # a mapping bug: every Tanh taken as a sigmoid
        got = fx_torch_activation(m, nn_)
        return ("sigmoid", {}) if got == ("tanh", {}) else got

    fx_torch_activation = fx_ops.torch_activation
    monkeypatch.setattr(fx_ops, "torch_activation", wrong_activation)
    with pytest.raises(ValueError, match=r"module 1 \('1': Tanh\(\)\) differs \(refnet layer 0 output"):
        audit.from_torch(module, (1, 6, 6))


def test_softplus_threshold_is_a_known_difference_not_a_refusal(rng):
    # planted bug seen failing: the probe held torch's linear softplus tail to 1e-12 (refused)
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 4), nn.Softplus(), nn.Linear(4, 2))
    with torch.no_grad():
        module[0].bias[0] = 21.0  # torch: h exactly; refnet: log1p(e^h) = h + 7.6e-10
    net = audit.from_torch(module)
    assert str(net.layers[0].activation) == "softplus"
    with pytest.raises(ValueError, match="threshold=20"):
        audit.from_torch(nn.Sequential(nn.Linear(3, 4), nn.Softplus(threshold=5), nn.Linear(4, 2)))


def test_cli_torch_module_factory(tmp_path, capsys):
    # planted bug seen failing: the factory file's folder not on sys.path (its sibling import failed)
    from refnet.cli import main

    (tmp_path / "widths.py").write_text("HIDDEN = 12\n")
    (tmp_path / "model.py").write_text(
        "import torch\nfrom torch import nn\nimport torch.nn.functional as F\nfrom widths import HIDDEN\n\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv = nn.Conv2d(1, 3, 5, stride=3)\n"
        "        self.fc = nn.Linear(3 * 8 * 8, HIDDEN)\n"
        "        self.out = nn.Linear(HIDDEN, 10)\n\n"
        "    def forward(self, x):\n"
        "        x = F.relu(self.conv(x))\n"
        "        return self.out(torch.tanh(self.fc(x.view(x.size(0), -1))))\n\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    return Net()\n\n"
        "def concat():\n"
        "    class R(nn.Module):\n"
        "        def __init__(self):\n"
        "            super().__init__()\n"
        "            self.a = nn.Linear(784, 784)\n"
        "            self.b = nn.Linear(2 * 784, 10)\n"
        "        def forward(self, x):\n"
        "            return self.b(torch.cat([self.a(x), x], 1))\n"
        "    return R()\n"
    )
    out = tmp_path / "out"
    spec = f"{tmp_path / 'model.py'}:make"
    assert main(["audit", "--torch-module", spec, "--n", "6", "--no-jacobian", "--out", str(out)]) == 0
    d = json.loads((out / "report.json").read_text())
    assert d["passed"] and d["meta"]["in_shape"] == [1, 28, 28] and d["meta"]["torch_module"] == spec
    assert "torch [conv] Conv2d + [relu] F.relu" in {c["source"] for c in d["checks"]}
    capsys.readouterr()
    # trained weights from a state dict (float64: the as-run audit is the float64 audit)
    torch.manual_seed(5)
    import importlib.util

    s = importlib.util.spec_from_file_location("model_for_test", tmp_path / "model.py")
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        mod = importlib.util.module_from_spec(s)
        s.loader.exec_module(mod)
    finally:
        sys.path.remove(str(tmp_path))
    other = mod.Net().double()
    torch.save(other.state_dict(), tmp_path / "w.pt")
    assert main(["audit", "--torch-module", spec, "--weights", str(tmp_path / "w.pt"), "--n", "4", "--no-jacobian", "--overwrite",
                 "--out", str(out), "--quiet"]) == 0
    d = json.loads((out / "report.json").read_text())
    assert d["meta"]["module_dtype"] == "float64" and d["meta"]["weights"] == str(tmp_path / "w.pt")
    loaded = audit.load_torch_state(mod.Net(), tmp_path / "w.pt")
    assert torch.equal(loaded.fc.weight, other.fc.weight) and loaded.fc.weight.dtype == torch.float64
    cases = [
        ([f"{tmp_path / 'model.py'}:concat"], "unsupported operation node 1 'cat' (torch.cat)"),
        ([f"{tmp_path / 'model.py'}:nope"], "has no callable 'nope'"),
        ([str(tmp_path / "model.py")], "expected FILE.py:FACTORY"),
        ([f"{tmp_path / 'missing.py'}:make"], "does not exist"),
    ]
    for argv, msg in cases:
        assert main(["audit", "--torch-module", *argv, "--n", "4", "--out", str(out), "--overwrite"]) == 2, argv
        err = capsys.readouterr().err
        assert "refnet: error:" in err and msg in err, (argv, err)
    assert main(["audit", "--torch-module", spec, "--torch-arch", "mlp-2-relu", "--out", str(out)]) == 2
    assert "--torch-arch: only used with --torch" in capsys.readouterr().err


_ACT_FORMS = {  # refnet name -> (module, function, method or None) spellings
    "tanh": (nn.Tanh, torch.tanh, "tanh"),
    "relu": (nn.ReLU, F.relu, "relu"),
    "sigmoid": (nn.Sigmoid, torch.sigmoid, "sigmoid"),
    "selu": (nn.SELU, F.selu, None),
    "elu": (lambda: nn.ELU(0.5), lambda h: F.elu(h, 0.5), None),
    "leaky_relu": (lambda: nn.LeakyReLU(0.3), lambda h: F.leaky_relu(h, negative_slope=0.3), None),
    "hard_tanh": (nn.Hardtanh, F.hardtanh, None),
    "erf": (None, torch.erf, "erf"),
}


@settings(max_examples=12)
@given(st.lists(st.tuples(st.sampled_from(sorted(_ACT_FORMS)), st.integers(0, 2), st.integers(2, 6)), min_size=1, max_size=4),
       st.integers(0, 2**16))
def test_module_function_and_method_spellings_agree(spec, seed):
    # planted bug seen failing: tensor methods looked up among the functions (x.tanh() refused)
    torch.manual_seed(seed)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            widths = [5] + [w for _, _, w in spec] + [3]
            self.lin = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
            self.acts = nn.ModuleList(
                (_ACT_FORMS[name][0] or nn.Identity)() if form == 0 else nn.Identity() for name, form, _ in spec)

        def forward(self, x):
            for (name, form, _), lin, act in zip(spec, self.lin, self.acts):
                x = lin(x)
                module, function, method = _ACT_FORMS[name]
                if form == 0 and module is not None:
                    x = act(x)
                elif form == 2 and method is not None:
                    x = getattr(x, method)()
                else:
                    x = function(x)
            return self.lin[-1](x)

    module = Net()
    net = audit.from_torch(module)
    want = [name for name, _, _ in spec] + ["identity"]
    assert [l.activation.name for l in net.layers] == want
    x = np.random.default_rng(seed).standard_normal((4, 5))
    assert np.max(np.abs(net.forward(x) - _f64(module, x))) <= 1e-12 * np.max(np.abs(_f64(module, x)))
    report = audit.compare_torch(module, x, np.arange(4) % 3, dtype_as_run=False, jacobian=False)
    assert report.passed, report.summary()
