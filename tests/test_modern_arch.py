"""The modern networks of refnet.arch: CIFAR ResNets (option A), VGGs with BatchNorm and Wide ResNets.
Each is compared with the reference PyTorch code written here as ordinary nn.Modules (the layouts of
akamaster/pytorch_resnet_cifar10, kuangliu/pytorch-cifar and xternalz/WideResNet-pytorch): the same
parameter count, and with refnet's weights loaded, the same outputs, loss and gradients in float64
in train and eval mode."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import refnet as rn
from refnet.arch import VGG_CONFIGS, parse_arch


# ---------------------------------------------------------------------------------------------
# the reference models, as their authors wrote them (float64)
# ---------------------------------------------------------------------------------------------


class LambdaLayer(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class BasicBlock(nn.Module):  # akamaster, option A
    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = LambdaLayer(lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4), "constant", 0))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class CifarResNet(nn.Module):  # akamaster
    def __init__(self, num_blocks, num_classes=10, in_channels=3, width=16):
        super().__init__()
        self.in_planes = width
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_layer(width, num_blocks, 1)
        self.layer2 = self._make_layer(2 * width, num_blocks, 2)
        self.layer3 = self._make_layer(4 * width, num_blocks, 2)
        self.linear = nn.Linear(4 * width, num_classes)

    def _make_layer(self, planes, num_blocks, stride):
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.avg_pool2d(out, out.size()[3])
        return self.linear(out.view(out.size(0), -1))


class VGG(nn.Module):  # kuangliu/pytorch-cifar, convolutions without bias
    def __init__(self, cfg, in_channels=3, width=1.0, num_classes=10):
        super().__init__()
        layers, c = [], in_channels
        for x in cfg:
            if x == "M":
                layers += [nn.MaxPool2d(kernel_size=2, stride=2)]
            else:
                w = max(1, round(x * width))
                layers += [nn.Conv2d(c, w, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                c = w
        layers += [nn.AvgPool2d(kernel_size=1, stride=1)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        out = self.features(x)
        return self.classifier(out.view(out.size(0), -1))


class WideBlock(nn.Module):  # xternalz/WideResNet-pytorch, dropRate 0
    def __init__(self, in_planes, out_planes, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.equalInOut = in_planes == out_planes
        self.convShortcut = (not self.equalInOut) and nn.Conv2d(in_planes, out_planes, 1, stride=stride, padding=0, bias=False) or None

    def forward(self, x):
        if not self.equalInOut:
            x = self.relu1(self.bn1(x))
        else:
            out = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(out if self.equalInOut else x)))
        out = self.conv2(out)
        return torch.add(x if self.equalInOut else self.convShortcut(x), out)


class WideResNet(nn.Module):
    def __init__(self, depth, widen, num_classes=10, in_channels=3, base=16):
        super().__init__()
        ch = [base, base * widen, 2 * base * widen, 4 * base * widen]
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(in_channels, ch[0], 3, stride=1, padding=1, bias=False)
        self.block1 = nn.Sequential(*[WideBlock(ch[0] if i == 0 else ch[1], ch[1], 1) for i in range(n)])
        self.block2 = nn.Sequential(*[WideBlock(ch[1] if i == 0 else ch[2], ch[2], 2 if i == 0 else 1) for i in range(n)])
        self.block3 = nn.Sequential(*[WideBlock(ch[2] if i == 0 else ch[3], ch[3], 2 if i == 0 else 1) for i in range(n)])
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(ch[3], num_classes)
        self.nChannels = ch[3]

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        out = F.avg_pool2d(out, out.size()[3])
        return self.fc(out.view(-1, self.nChannels))


def load_refnet_weights(module, net):
    """Copy refnet's parameters and running statistics into ``module``, both in registration order
    (which is refnet's layer order for these models); shapes must agree one by one."""
    ours = [p[k] for p in net.params for k in p]
    theirs = list(module.parameters())
    assert len(ours) == len(theirs)
    bufs = [b[k] for b in net.buffers for k in ("running_mean", "running_var") if b]
    tbufs = [b for name, b in module.named_buffers() if not name.endswith("num_batches_tracked")]
    assert len(bufs) == len(tbufs)
    with torch.no_grad():
        for a, t in zip(ours + bufs, theirs + tbufs):
            assert tuple(a.shape) == tuple(t.shape)
            t.copy_(torch.from_numpy(a))
    return theirs


def _compare(net, module, x, y, rtol=1e-10):
    rng = np.random.default_rng(0)
    net = net.with_params([{k: v + (0.2 * rng.standard_normal(v.shape) if k in ("gamma", "beta") else 0.0)
                            for k, v in p.items()} for p in net.params])
    net.buffers = [{"running_mean": 0.1 * rng.standard_normal(b["running_mean"].shape),
                    "running_var": 0.5 + rng.random(b["running_var"].shape)} if b else {} for b in net.buffers]
    module = module.double()
    for mode in ("train", "eval"):
        theirs = load_refnet_weights(module, net)  # again: a train-mode forward updates the running statistics
        n = net.with_mode(mode)
        module.train(mode == "train")
        module.zero_grad()
        out_t = module(torch.from_numpy(x))
        loss_t = F.cross_entropy(out_t, torch.from_numpy(y))
        loss_t.backward()
        out = n.forward(x)
        np.testing.assert_allclose(out, out_t.detach().numpy(), rtol=rtol, atol=rtol * np.abs(out).max())
        loss, grads = n.loss_and_grads(x, y)
        assert abs(loss - loss_t.item()) <= rtol * loss
        ours = [g[k] for g in grads for k in g]
        scale = max(float(t.grad.abs().max()) for t in theirs)
        for a, t in zip(ours, theirs):
            np.testing.assert_allclose(a, t.grad.numpy(), rtol=rtol, atol=1e-13 * scale)


def test_resnet20_is_akamasters_resnet20():
    net = rn.build("resnet-20", (3, 32, 32), 10, seed=0)
    assert net.n_params == sum(p.numel() for p in CifarResNet(3).parameters()) == 269_722
    assert sum("W" in p for p in net.params) == 20  # the "20"
    assert parse_arch("resnet-20").family == "resnet" and not parse_arch("resnet-20").flat_input


def test_resnet_matches_reference_module_in_train_and_eval_mode():
    rng = np.random.default_rng(1)
    net = rn.build("resnet-8-w0.5", (3, 12, 12), 10, init="he", seed=1)  # 8, 16, 32 channels
    x, y = rng.standard_normal((3, 3, 12, 12)), rng.integers(0, 10, 3)
    _compare(net, CifarResNet(1, width=8), x, y)


def test_vgg_matches_reference_module():
    rng = np.random.default_rng(2)
    net = rn.build("vgg-11-w0.0625", (3, 32, 32), 10, init="glorot", seed=2)  # 4, 8, 16, 32, 32 channels
    ref = VGG(VGG_CONFIGS[11], width=0.0625)
    assert net.n_params == sum(p.numel() for p in ref.parameters())
    x, y = rng.standard_normal((2, 3, 32, 32)), rng.integers(0, 10, 2)
    _compare(net, ref, x, y)


def test_vgg16_has_the_cifar_vgg16_parameter_count():
    # kuangliu's VGG16 has 14,728,266 parameters with convolution biases; refnet's convolutions
    # are bias-free (batch norm's beta is the bias): 4,224 fewer
    biases = sum(c for c in VGG_CONFIGS[16] if c != "M")
    assert rn.build("vgg-16", (3, 32, 32), 10).n_params == 14_728_266 - biases


def test_wrn_matches_reference_module():
    rng = np.random.default_rng(3)
    net = rn.build("wrn-16-2-w0.25", (3, 8, 8), 10, init="orthogonal", seed=3)  # 4, 8, 16, 32 channels
    ref = WideResNet(16, 2, base=4)
    assert net.n_params == sum(p.numel() for p in ref.parameters())
    x, y = rng.standard_normal((2, 3, 8, 8)), rng.integers(0, 10, 2)
    _compare(net, ref, x, y)
    assert rn.build("wrn-16-8", (3, 32, 32), 10).n_params == sum(p.numel() for p in WideResNet(16, 8).parameters())


def test_specs_widths_activations_and_errors():
    a = parse_arch("resnet-32-tanh-w0.25")
    assert (a.depth, a.activation, a.width_mult) == (32, "tanh", 0.25)
    assert parse_arch("wrn-16-8").widen == 8 and parse_arch("wrn-16-8-w2").width_mult == 2.0
    assert parse_arch("vgg16").depth == 16 and parse_arch("ResNet-56").depth == 56
    net = rn.build("resnet-32-w0.25", (1, 32, 32), 10, seed=0)
    convs = [p["W"].shape[0] for p in net.params if "W" in p and p["W"].ndim == 4]
    assert sorted(set(convs)) == [4, 8, 16] and len(convs) == 31
    tanh = rn.build("resnet-8-leaky_relu-w0.25", (3, 8, 8), 10, seed=0)
    assert {layer.activation.name for layer in tanh.layers if hasattr(layer, "activation")} <= {"leaky_relu", "identity"}
    for bad, why in [("resnet-21", "6n \\+ 2"), ("vgg-12", "vgg-N needs N in"), ("wrn-15-2", "6n \\+ 4"),
                     ("resnet-20-w0", "must be > 0"), ("resnet-20-foo", "unknown activation")]:
        with pytest.raises(ValueError, match=why):
            parse_arch(bad)
    with pytest.raises(ValueError, match="needs H, W >= 32"):
        rn.build("vgg-11", (1, 28, 28), 10)
    with pytest.raises(ValueError, match="needs an image in_shape"):
        rn.build("resnet-20", (784,), 10)


def test_inits_apply_to_every_weight_and_not_to_batch_norm():
    net = rn.build("resnet-8-w0.5", (3, 8, 8), 10, init="delta_orthogonal", seed=0)
    for p, layer in zip(net.params, net.layers):
        if "W" in p and p["W"].ndim == 4 and p["W"].shape[2] == 3:
            W = p["W"]
            centre = W[:, :, 1, 1]
            assert not W[:, :, 0, 0].any()  # delta: zeros off the centre
            gram = centre @ centre.T if centre.shape[0] <= centre.shape[1] else centre.T @ centre
            np.testing.assert_allclose(gram, np.eye(gram.shape[0]), atol=1e-12)
        if "gamma" in p:
            assert (p["gamma"] == 1).all() and (p["beta"] == 0).all()
    a = rn.build("resnet-8-w0.5", (3, 8, 8), 10, init="vs-h", seed=4)
    W = a.params[0]["W"]
    assert abs(W.var() - 2.0 / 27) < 0.5 * 2.0 / 27


def test_modern_network_save_load_and_eval_mode(tmp_path):
    rng = np.random.default_rng(5)
    net = rn.build("wrn-10-1-w0.25", (1, 8, 8), 4, seed=0)
    x = rng.standard_normal((3, 1, 8, 8))
    net.save(tmp_path / "w.npz")
    back = rn.load_network(tmp_path / "w.npz")
    np.testing.assert_array_equal(back.forward(x), net.forward(x))
    assert back.mode == "train" and back.with_mode("eval").mode == "eval"


def test_any_width_mlp_spec():
    # mlp:N0-...-NK:ACT builds exactly those widths, ACT on all but the last layer, and refuses a
    # spec whose ends do not fit the data (planted bug seen failing: the last width ignored)
    net = rn.build("mlp:784-300-100-10:relu", (784,), 10, seed=0)
    assert [(l.n_in, l.n_out) for l in net.layers] == [(784, 300), (300, 100), (100, 10)]
    assert [l.activation.name for l in net.layers] == ["relu", "relu", "identity"]
    img = rn.build("mlp:64-7-3:tanh", (1, 8, 8), 3, seed=0)  # an image in_shape gets a Flatten first
    assert isinstance(img.layers[0], rn.Flatten) and img.layers[1].n_out == 7
    for bad in ("mlp:784-300-9:relu", "mlp:100-300-10:relu"):
        with pytest.raises(ValueError, match="features and 10 classes"):
            rn.build(bad, (784,), 10)
    for bad in ("mlp:784:relu", "mlp:784-0-10:relu", "mlp:784-10:nope"):
        with pytest.raises(ValueError, match="arch"):
            rn.build(bad, (784,), 10)
