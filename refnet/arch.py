"""Architectures from short spec strings: ``build("mlp-7-tanh", (784,), 10)``.

Specs (case-insensitive; ``ACT`` is any name :func:`refnet.activations.get_activation` accepts,
with ``_`` inside names, e.g. ``tanh``, ``relu``, ``linear``, ``leaky_relu``, ``hard_tanh``):

``mlp-K-ACT[-wN]``
    K >= 1 weight layers of width N (default 100): ``n_in -> N x (K-1) -> n_classes``, ACT on
    every layer but the last (logits), bias on every layer (PAPER.md section 8).
    ``mlp-7-tanh`` is the papers' 784-100x6-10 tanh MLP-7.
``lenet300``
    LeNet-300-100 (SNIP): ReLU ``n_in -> 300 -> 100 -> n_classes``.
``lenet5[-ACT]``
    LeNet-5-Caffe (SNIP): conv 20 5x5, maxpool 2, conv 50 5x5, maxpool 2, flatten, dense 500 ReLU,
    dense n_classes. As in Caffe's LeNet the convolutions have no activation; ``lenet5-relu``
    puts ACT after both convolutions. Needs an image input, e.g. ``(1, 28, 28)``.
``cnn-small-ACT``
    A small CNN: conv 3x3 16 channels (padding 1) ACT, avgpool 2, conv 3x3 32 channels
    (padding 1) ACT, global average pool, dense n_classes. Needs an image input (H, W >= 2).

``resnet-N[-ACT][-wX]``
    The CIFAR ResNets of He et al. (2016), in the layout of akamaster/pytorch_resnet_cifar10:
    ``N = 6n + 2`` (20, 32, 44, 56, 110); conv 3x3 16 (no bias), BN, ReLU; three stages of ``n``
    basic blocks with 16, 32, 64 channels (stride 2 at the first block of stages 2 and 3); block
    ``relu(BN(conv(relu(BN(conv(x))))) + shortcut(x))`` with the "option A" shortcut where the shape
    changes (:class:`~refnet.layers.SubsamplePad`: stride-2 subsampling and zero channels, no
    parameters), else the identity; global average pooling; dense ``n_classes``.
``vgg-11|13|16|19[-ACT][-wX]``
    The CIFAR VGGs (the layout of kuangliu/pytorch-cifar): 3x3 convolutions (padding 1, no bias),
    each followed by BN and ReLU, max pooling 2 after each stage (configurations A, B, D, E of
    Simonyan and Zisserman: 64, 128, 256, 512, 512 channels), flatten, dense ``n_classes``. Needs
    H, W >= 32 (five poolings).
``wrn-D-K[-ACT][-wX]``
    Wide ResNet WRN-D-K (Zagoruyko and Komodakis 2016, the layout of xternalz/WideResNet-pytorch),
    ``D = 6n + 4`` (16, 22, 28, 40): conv 3x3 16; three stages of ``n`` pre-activation blocks with
    16K, 32K, 64K channels (stride 2 at stages 2 and 3); block
    ``conv(relu(BN(conv(relu(BN(x)))))) + x`` when the shape is kept, else the first
    ``relu(BN(.))`` is shared and the shortcut is a 1x1 convolution of it; BN, ReLU, global
    average pooling, dense ``n_classes``. No dropout.

In the three modern families ``ACT`` (default relu) replaces every ReLU, and ``-wX`` multiplies
every channel count by ``X`` (e.g. ``resnet-32-w0.25``: 4, 8, 16 channels), rounded, at least 1,
with the stage ratios kept (the channels of the first stage are ``max(1, round(16 X))`` and
doubled per stage), so they run on a 2-core machine. Convolutions are bias-free (the BatchNorm's
``beta`` is the bias), the BatchNorm layers start in train mode with ``gamma = 1``, ``beta = 0``
(PyTorch's defaults; ``net.with_mode("eval")`` switches to the running statistics), and ``init``
applies to every convolution and dense weight (``"delta_orthogonal"``, ``"orthogonal"``, the VS
inits). The first convolution takes the channels of ``in_shape``: ``(3, 32, 32)`` for CIFAR-10,
``(1, 32, 32)`` for the ``"mnist5k-32"`` stand-in.

MLP-type specs (mlp, lenet300) take flat inputs ``(n_features,)``; given an image ``in_shape``
``(C, H, W)`` they start with a :class:`~refnet.layers.Flatten` layer. Conv specs need ``(C, H, W)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from math import prod

import numpy as np

from ._checks import check_int
from .activations import ACTIVATIONS, get_activation
from .layers import AvgPool2d, BatchNorm2d, Conv2d, Dense, Flatten, GlobalAvgPool2d, MaxPool2d, Residual, SubsamplePad
from .network import Network

__all__ = ["ARCH_HELP", "ArchSpec", "build", "parse_arch"]

DEFAULT_WIDTH = 100

ARCH_HELP = """\
architectures (ACT: an activation name such as tanh, relu, linear, leaky_relu, selu):
  mlp-K-ACT[-wN]  K weight layers of width N (default 100), ACT on all but the last;
                  mlp-7-tanh is the papers' 784-100x6-10 tanh MLP
  mlp:N0-N1-...-NK:ACT   any widths, input to output (mlp:784-300-100-10:relu); N0 must be the
                  data's feature count and NK its class count
  lenet300        LeNet-300-100: ReLU n_in-300-100-n_classes (SNIP)
  lenet5[-ACT]    LeNet-5-Caffe: conv20 5x5, maxpool2, conv50 5x5, maxpool2, dense500 relu,
                  dense n_classes (needs images, e.g. 1x28x28); -ACT adds ACT after the convs
  cnn-small-ACT   conv16 3x3 pad1 ACT, avgpool2, conv32 3x3 pad1 ACT, global avg pool, dense
  resnet-N[-ACT][-wX]   CIFAR ResNet-N (N = 6n+2: 20, 32, 56, 110), option-A shortcuts, BN;
                        -wX multiplies the channels (resnet-32-w0.25: 4, 8, 16)
  vgg-11|13|16|19[-ACT][-wX]   CIFAR VGG with conv-BN-ReLU (needs 32x32 images)
  wrn-D-K[-ACT][-wX]    Wide ResNet WRN-D-K (D = 6n+4: 16, 22, 28), pre-activation blocks"""

_PATTERNS = ("mlp-K-ACT[-wN]", "mlp:N0-...-NK:ACT", "lenet300", "lenet5[-ACT]", "cnn-small-ACT", "resnet-N[-ACT][-wX]",
             "vgg-11|13|16|19[-ACT][-wX]", "wrn-D-K[-ACT][-wX]")
_ACT = r"([a-z][a-z0-9_]*)"
_RE_MLP = re.compile(r"mlp-(\d+)-" + _ACT + r"(?:-w(\d+))?")
_RE_MLP_WIDTHS = re.compile(r"mlp:(\d+(?:-\d+)+):" + _ACT)
_RE_LENET5 = re.compile(r"lenet5(?:-" + _ACT + r")?")
_RE_CNN = re.compile(r"cnn-small-" + _ACT)
_MODERN_TAIL = r"(?:-(?!w\d)([a-z][a-z0-9_]*))?(?:-w(\d+(?:\.\d*)?|\.\d+))?"
_RE_RESNET = re.compile(r"resnet-?(\d+)" + _MODERN_TAIL)
_RE_VGG = re.compile(r"vgg-?(\d+)" + _MODERN_TAIL)
_RE_WRN = re.compile(r"wrn-(\d+)-(\d+)" + _MODERN_TAIL)

#: the VGG configurations (channels; "M" = max pooling 2), as in kuangliu/pytorch-cifar
VGG_CONFIGS = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    19: (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
}


@dataclass(frozen=True)
class ArchSpec:
    """A parsed architecture spec.

    family : "mlp", "lenet300", "lenet5", "cnn-small", "resnet", "vgg" or "wrn"
    depth : number of weight layers (mlp), the N of resnet-N, vgg-N, wrn-N-K, or None
    activation : canonical activation name (None where fixed by the family)
    width : hidden width (mlp) or None
    width_mult : the channel multiplier X of "-wX" (resnet, vgg, wrn; 1.0 without it) or None
    widen : the K of wrn-N-K, or None
    widths : every layer width N0..NK of ``mlp:N0-...-NK:ACT`` (input to output), or None
    """

    spec: str
    family: str
    depth: int | None = None
    activation: str | None = None
    width: int | None = None
    width_mult: float | None = None
    widen: int | None = None
    widths: tuple | None = None

    @property
    def flat_input(self) -> bool:
        """True for MLP-type families (they take ``(n_features,)`` inputs)."""
        return self.family in ("mlp", "lenet300")


def _bad(spec, why: str = "") -> ValueError:
    extra = f" ({why})" if why else ""
    return ValueError(
        f"arch must match one of {', '.join(_PATTERNS)}, got {spec!r}{extra}\n{ARCH_HELP}"
    )


def _activation(name: str, spec: str) -> str:
    try:
        return get_activation(name).name
    except (ValueError, TypeError):
        raise _bad(spec, f"unknown activation {name!r}; known: {', '.join(sorted(ACTIVATIONS))}, linear") from None


def parse_arch(spec) -> ArchSpec:
    """Parse an architecture spec string (see :data:`ARCH_HELP`) without building anything."""
    if not isinstance(spec, str):
        raise TypeError(f"arch must be a str such as 'mlp-7-tanh', got {type(spec).__name__} {spec!r}")
    s = spec.strip().lower()
    if m := _RE_MLP.fullmatch(s):
        depth, act, width = int(m[1]), m[2], m[3]
        if depth < 1:
            raise _bad(spec, "K must be >= 1")
        width = DEFAULT_WIDTH if width is None else int(width)
        if width < 1:
            raise _bad(spec, "width N must be >= 1")
        return ArchSpec(spec, "mlp", depth, _activation(act, spec), width)
    if m := _RE_MLP_WIDTHS.fullmatch(s):
        widths = tuple(int(w) for w in m[1].split("-"))
        if min(widths) < 1:
            raise _bad(spec, "every width must be >= 1")
        return ArchSpec(spec, "mlp", len(widths) - 1, _activation(m[2], spec), None, widths=widths)
    if s in ("lenet300", "lenet-300-100", "lenet300-100"):
        return ArchSpec(spec, "lenet300", 3, "relu", None)
    if m := _RE_LENET5.fullmatch(s):
        act = "identity" if m[1] is None else _activation(m[1], spec)
        return ArchSpec(spec, "lenet5", 4, act, None)
    if m := _RE_CNN.fullmatch(s):
        return ArchSpec(spec, "cnn-small", 3, _activation(m[1], spec), None)
    if m := _RE_RESNET.fullmatch(s):
        depth = int(m[1])
        if depth < 8 or (depth - 2) % 6:
            raise _bad(spec, "resnet-N needs N = 6n + 2 with n >= 1 (20, 32, 44, 56, 110)")
        return ArchSpec(spec, "resnet", depth, _modern_act(m[2], spec), None, _width_mult(m[3], spec))
    if m := _RE_VGG.fullmatch(s):
        depth = int(m[1])
        if depth not in VGG_CONFIGS:
            raise _bad(spec, f"vgg-N needs N in {sorted(VGG_CONFIGS)}")
        return ArchSpec(spec, "vgg", depth, _modern_act(m[2], spec), None, _width_mult(m[3], spec))
    if m := _RE_WRN.fullmatch(s):
        depth, k = int(m[1]), int(m[2])
        if depth < 10 or (depth - 4) % 6:
            raise _bad(spec, "wrn-D-K needs D = 6n + 4 with n >= 1 (10, 16, 22, 28, 40)")
        if k < 1:
            raise _bad(spec, "wrn-D-K needs K >= 1")
        return ArchSpec(spec, "wrn", depth, _modern_act(m[2 + 1], spec), None, _width_mult(m[4], spec), k)
    raise _bad(spec)


def _modern_act(name, spec: str) -> str:
    return "relu" if name is None else _activation(name, spec)


def _width_mult(text, spec: str) -> float:
    if text is None:
        return 1.0
    w = float(text)
    if not w > 0:
        raise _bad(spec, "the width multiplier X of -wX must be > 0")
    return w


def _channels(base: int, w: float) -> int:
    """``max(1, round(base * w))``: a channel count scaled by the width multiplier."""
    return max(1, int(round(base * w)))


def _resnet_layers(a: ArchSpec, in_shape: tuple, n_classes: int) -> list:
    """CIFAR ResNet-N, option A (see the module docstring): 6n + 2 weight layers."""
    n = (a.depth - 2) // 6
    act = a.activation
    c0 = _channels(16, a.width_mult)
    layers = [Conv2d(in_shape[0], c0, 3, padding=1, bias=False), BatchNorm2d(c0, activation=act)]
    c_in = c0
    for stage, c in enumerate((c0, 2 * c0, 4 * c0)):
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 else 1
            main = [Conv2d(c_in, c, 3, stride=stride, padding=1, bias=False), BatchNorm2d(c, activation=act),
                    Conv2d(c, c, 3, padding=1, bias=False), BatchNorm2d(c)]
            shortcut = ()
            if stride != 1 or c_in != c:  # option A: subsample, zero channels (planes//4 each side)
                extra = c - c_in
                shortcut = (SubsamplePad(stride, (extra // 2, extra - extra // 2)),)
            layers.append(Residual(main, shortcut, act))
            c_in = c
    return layers + [GlobalAvgPool2d(), Dense(c_in, n_classes)]


def _vgg_layers(a: ArchSpec, in_shape: tuple, n_classes: int) -> list:
    """CIFAR VGG-N with conv-BN-ACT and max pooling (see the module docstring)."""
    C, H, W = in_shape
    if H < 32 or W < 32:
        raise ValueError(f"arch {a.spec!r} needs H, W >= 32 (five 2x2 poolings), got in_shape {in_shape}; "
                         "use 32x32 data such as 'cifar10' or 'mnist5k-32'")
    layers, c_in, h, w = [], C, H, W
    for item in VGG_CONFIGS[a.depth]:
        if item == "M":
            layers.append(MaxPool2d(2))
            h, w = h // 2, w // 2
        else:
            c = _channels(item, a.width_mult)
            layers += [Conv2d(c_in, c, 3, padding=1, bias=False), BatchNorm2d(c, activation=a.activation)]
            c_in = c
    return layers + [Flatten(), Dense(c_in * h * w, n_classes)]


def _wrn_layers(a: ArchSpec, in_shape: tuple, n_classes: int) -> list:
    """WRN-D-K with pre-activation blocks (see the module docstring)."""
    n = (a.depth - 4) // 6
    act = a.activation
    c0 = _channels(16, a.width_mult)
    layers = [Conv2d(in_shape[0], c0, 3, padding=1, bias=False)]
    c_in = c0
    for stage, c in enumerate((c0 * a.widen, 2 * c0 * a.widen, 4 * c0 * a.widen)):
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 else 1
            if c_in == c and stride == 1:  # identity shortcut on the block input
                layers.append(Residual([BatchNorm2d(c_in, activation=act), Conv2d(c_in, c, 3, padding=1, bias=False),
                                        BatchNorm2d(c, activation=act), Conv2d(c, c, 3, padding=1, bias=False)]))
            else:  # relu(BN(x)) shared by both branches; 1x1 convolution shortcut
                layers.append(BatchNorm2d(c_in, activation=act))
                layers.append(Residual([Conv2d(c_in, c, 3, stride=stride, padding=1, bias=False),
                                        BatchNorm2d(c, activation=act), Conv2d(c, c, 3, padding=1, bias=False)],
                                       [Conv2d(c_in, c, 1, stride=stride, bias=False)]))
            c_in = c
    return layers + [BatchNorm2d(c_in, activation=act), GlobalAvgPool2d(), Dense(c_in, n_classes)]


def _in_shape(in_shape) -> tuple:
    if isinstance(in_shape, (int, np.integer)) and not isinstance(in_shape, bool):
        in_shape = (int(in_shape),)
    if not isinstance(in_shape, (tuple, list)) or len(in_shape) not in (1, 3):
        raise ValueError(f"in_shape must be (n_features,) or an image shape (C, H, W), got {in_shape!r}")
    return tuple(check_int(s, "in_shape entries", min_value=1) for s in in_shape)


def _layers(a: ArchSpec, in_shape: tuple, n_classes: int) -> list:
    if a.flat_input:
        layers = [Flatten()] if len(in_shape) == 3 else []
        n_in = prod(in_shape)
        if a.family == "mlp" and a.widths is not None:
            if (a.widths[0], a.widths[-1]) != (n_in, n_classes):
                raise ValueError(f"arch {a.spec!r} runs {a.widths[0]} -> {a.widths[-1]}, but the data have "
                                 f"{n_in} features and {n_classes} classes")
            sizes, act = list(a.widths), a.activation
        elif a.family == "mlp":
            sizes, act = [n_in] + [a.width] * (a.depth - 1) + [n_classes], a.activation
        else:
            sizes, act = [n_in, 300, 100, n_classes], "relu"
        for i in range(len(sizes) - 1):
            layers.append(Dense(sizes[i], sizes[i + 1], activation=act if i < len(sizes) - 2 else "identity"))
        return layers
    if len(in_shape) != 3:
        raise ValueError(
            f"arch {a.spec!r} needs an image in_shape (C, H, W) such as (1, 28, 28), got {in_shape} "
            "(load the data with flatten=False)"
        )
    if a.family == "resnet":
        return _resnet_layers(a, in_shape, n_classes)
    if a.family == "vgg":
        return _vgg_layers(a, in_shape, n_classes)
    if a.family == "wrn":
        return _wrn_layers(a, in_shape, n_classes)
    C, H, W = in_shape
    if a.family == "lenet5":
        if (H - 4) // 2 - 4 < 2 or (W - 4) // 2 - 4 < 2:
            raise ValueError(f"arch {a.spec!r} needs H, W >= 16 (e.g. (1, 28, 28)), got in_shape {in_shape}")
        h1, w1 = (H - 4) // 2, (W - 4) // 2
        h2, w2 = (h1 - 4) // 2, (w1 - 4) // 2
        return [
            Conv2d(C, 20, 5, activation=a.activation),
            MaxPool2d(2),
            Conv2d(20, 50, 5, activation=a.activation),
            MaxPool2d(2),
            Flatten(),
            Dense(50 * h2 * w2, 500, activation="relu"),
            Dense(500, n_classes),
        ]
    # cnn-small
    if H < 2 or W < 2:
        raise ValueError(f"arch {a.spec!r} needs H, W >= 2, got in_shape {in_shape}")
    return [
        Conv2d(C, 16, 3, padding=1, activation=a.activation),
        AvgPool2d(2),
        Conv2d(16, 32, 3, padding=1, activation=a.activation),
        GlobalAvgPool2d(),
        Dense(32, n_classes),
    ]


def build(arch, in_shape, n_classes: int, *, init="lecun", seed=None, dtype=np.float64, **init_kwargs) -> Network:
    """Build the network named by the spec string ``arch`` (see :data:`ARCH_HELP`).

    Parameters
    ----------
    arch : str
        ``"mlp-K-ACT[-wN]"``, ``"lenet300"``, ``"lenet5[-ACT]"``, ``"cnn-small-ACT"``,
        ``"resnet-N[-ACT][-wX]"``, ``"vgg-N[-ACT][-wX]"`` or ``"wrn-D-K[-ACT][-wX]"``.
    in_shape : int or tuple
        Per-example input shape: ``(n_features,)`` or ``(C, H, W)``. MLP-type archs given an
        image shape start with a Flatten layer.
    n_classes : int >= 1
        Size of the output (logits).
    init, seed, dtype, **init_kwargs
        As :class:`refnet.Network` (``init`` a name or alias such as "orthogonal", "vs-l",
        "sg" with ``gamma=...``; ``gain``, ``sigma_b``, ...).

    Returns
    -------
    Network

    Examples
    --------
    >>> net = build("mlp-7-tanh", (784,), 10, init="orthogonal", seed=0)   # 784-100x6-10
    >>> net = build("resnet-20-w0.25", (3, 32, 32), 10, init="delta_orthogonal", seed=0)  # doctest: +SKIP
    """
    a = parse_arch(arch)
    in_shape = _in_shape(in_shape)
    n_classes = check_int(n_classes, "n_classes", min_value=1)
    layers = _layers(a, in_shape, n_classes)
    return Network(layers, in_shape=in_shape, init=init, seed=seed, dtype=dtype, **init_kwargs)
