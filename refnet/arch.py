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
from .layers import AvgPool2d, Conv2d, Dense, Flatten, GlobalAvgPool2d, MaxPool2d
from .network import Network

__all__ = ["ARCH_HELP", "ArchSpec", "build", "parse_arch"]

DEFAULT_WIDTH = 100

ARCH_HELP = """\
architectures (ACT: an activation name such as tanh, relu, linear, leaky_relu, selu):
  mlp-K-ACT[-wN]  K weight layers of width N (default 100), ACT on all but the last;
                  mlp-7-tanh is the papers' 784-100x6-10 tanh MLP
  lenet300        LeNet-300-100: ReLU n_in-300-100-n_classes (SNIP)
  lenet5[-ACT]    LeNet-5-Caffe: conv20 5x5, maxpool2, conv50 5x5, maxpool2, dense500 relu,
                  dense n_classes (needs images, e.g. 1x28x28); -ACT adds ACT after the convs
  cnn-small-ACT   conv16 3x3 pad1 ACT, avgpool2, conv32 3x3 pad1 ACT, global avg pool, dense"""

_PATTERNS = ("mlp-K-ACT[-wN]", "lenet300", "lenet5[-ACT]", "cnn-small-ACT")
_ACT = r"([a-z][a-z0-9_]*)"
_RE_MLP = re.compile(r"mlp-(\d+)-" + _ACT + r"(?:-w(\d+))?")
_RE_LENET5 = re.compile(r"lenet5(?:-" + _ACT + r")?")
_RE_CNN = re.compile(r"cnn-small-" + _ACT)


@dataclass(frozen=True)
class ArchSpec:
    """A parsed architecture spec.

    family : "mlp", "lenet300", "lenet5" or "cnn-small"
    depth : number of weight layers (mlp) or None
    activation : canonical activation name (None where fixed by the family)
    width : hidden width (mlp) or None
    """

    spec: str
    family: str
    depth: int | None = None
    activation: str | None = None
    width: int | None = None

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
    if s in ("lenet300", "lenet-300-100", "lenet300-100"):
        return ArchSpec(spec, "lenet300", 3, "relu", None)
    if m := _RE_LENET5.fullmatch(s):
        act = "identity" if m[1] is None else _activation(m[1], spec)
        return ArchSpec(spec, "lenet5", 4, act, None)
    if m := _RE_CNN.fullmatch(s):
        return ArchSpec(spec, "cnn-small", 3, _activation(m[1], spec), None)
    raise _bad(spec)


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
        if a.family == "mlp":
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
        ``"mlp-K-ACT[-wN]"``, ``"lenet300"``, ``"lenet5[-ACT]"`` or ``"cnn-small-ACT"``.
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
    """
    a = parse_arch(arch)
    in_shape = _in_shape(in_shape)
    n_classes = check_int(n_classes, "n_classes", min_value=1)
    layers = _layers(a, in_shape, n_classes)
    return Network(layers, in_shape=in_shape, init=init, seed=seed, dtype=dtype, **init_kwargs)
