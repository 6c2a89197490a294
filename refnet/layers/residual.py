r"""Residual composition: the addition node, the "option A" shortcut and the :class:`Residual` block.

A network with residual connections is a small directed acyclic graph of layers. refnet keeps it as
a flat list of layers, ``net.layers``, in which every layer still owns at most one affine map
(layer ``l`` names one ``W^l``), plus ``net.inputs``: for each layer, the nodes it reads (node 0
is the network input ``x^0``, node ``j`` the output ``x^j`` of ``net.layers[j-1]``). A chain reads
``inputs[l] = (l,)``. The addition of two branches is a layer of its own, :class:`Add`, which
reads two (or more) nodes:

.. math:: x^l = \phi\Big(\sum_{j \in \mathrm{inputs}(l)} x^j\Big), \qquad D^l = \mathrm{diag}\,\phi'(\cdot),
          \qquad \frac{\partial x^l}{\partial x^j} = D^l \ \text{for each input } j .

:class:`Residual` is the usual way to write one: ``Residual(main, shortcut, activation)`` computes
``phi(main(x) + shortcut(x))`` and :class:`refnet.network.Network` expands it (main layers, then
shortcut layers, then the :class:`Add`), so ``params``, ``masks`` and every per-layer list stay one
entry per layer. The shortcut is the identity (``shortcut=()``), a projection (e.g.
``[Conv2d(c, 2c, 1, stride=2, bias=False), BatchNorm2d(2c)]``) or the CIFAR ResNets' "option A"
:class:`SubsamplePad` (stride-2 subsampling plus zero channels).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil, prod

import numpy as np

from .._checks import check_int
from ..activations import Activation, get_activation
from .base import Layer, NoSecondOrder, flat_rows

__all__ = ["Add", "Residual", "SubsamplePad", "expand_layers"]


@dataclass(frozen=True)
class Add(NoSecondOrder, Layer):
    r"""The sum of ``n_inputs`` nodes of the same shape, then phi: ``y = phi(x_1 + ... + x_n)``.

    A multi-input layer: :meth:`forward` takes a tuple of inputs, :meth:`vjp` and
    :meth:`vjp_many` return a tuple of input gradients (all equal to ``D g``), :meth:`jvp` and
    :meth:`jvp_many` take a tuple of tangents (None for a zero tangent), and :meth:`out_shape` a
    tuple of input shapes. :meth:`jacobian` gives the Jacobian with respect to each input, the
    same ``diag(D)`` for all of them. The cache holds ``"x"`` (the first input), ``"h"`` (the sum)
    and ``"D"``.

    Parameters
    ----------
    activation : str or Activation
        phi after the sum (a CIFAR ResNet block: ``"relu"``).
    n_inputs : int >= 2
    """

    SECOND_ORDER_WHY = ("second-order products are not derived for networks with residual connections (Add); "
                        "refnet.second_order walks chains of Dense, Conv2d and parameter-free layers")

    activation: Activation = "identity"
    n_inputs: int = 2

    def __post_init__(self):
        object.__setattr__(self, "activation", get_activation(self.activation))
        object.__setattr__(self, "n_inputs", check_int(self.n_inputs, "n_inputs", min_value=2))

    @property
    def is_affine_map(self) -> bool:
        return self.activation.is_linear

    def _check_inputs(self, xs, what: str) -> tuple:
        if not isinstance(xs, (tuple, list)) or len(xs) != self.n_inputs:
            got = f"{len(xs)} entries" if isinstance(xs, (tuple, list)) else f"a single {type(xs).__name__}"
            raise TypeError(
                f"Add takes a tuple of {self.n_inputs} {what} (one per input node), got {got}; a network with "
                "residual connections is a DAG: walk it with net.inputs (refnet.network.Network.forward does)"
            )
        return tuple(xs)

    def out_shape(self, in_shape):
        shapes = self._check_inputs(in_shape, "input shapes")
        shapes = [tuple(s) for s in shapes]
        if any(s != shapes[0] for s in shapes):
            raise ValueError(f"Add needs inputs of one shape, got {shapes}")
        return shapes[0]

    def forward(self, params, x, mask=None):
        xs = self._check_inputs(x, "inputs")
        h = xs[0]
        for xi in xs[1:]:
            h = h + xi  # (B, *shape)
        y, D = self.activation.phi_dphi(h)
        return y, {"x": xs[0], "h": h, "D": D}

    def vjp(self, params, cache, g, mask=None, input_grad=True):
        if not input_grad:
            return None, {}
        gh = g * cache["D"]  # dL/dh, the gradient of every input
        return (gh,) * self.n_inputs, {}

    def jvp(self, params, cache, v, mask=None, dparams=None):
        vs = [vi for vi in self._check_inputs(v, "tangents") if vi is not None]
        if not vs:
            return np.zeros_like(cache["h"])
        h_dot = vs[0]
        for vi in vs[1:]:
            h_dot = h_dot + vi
        return cache["D"] * h_dot

    def vjp_many(self, params, cache, G, mask=None, in_shape=None, out_shape=None):
        """``(G * D,) * n_inputs`` for ``G`` ``(B, m, N)``."""
        return (G * flat_rows(cache["D"])[:, None, :],) * self.n_inputs

    def jvp_many(self, params, cache, V, mask=None, in_shape=None, out_shape=None):
        """``(sum of the non-None V_j) * D`` for a tuple of stacks ``(B, m, N)`` (None: zero)."""
        vs = [vi for vi in self._check_inputs(V, "tangent stacks") if vi is not None]
        if not vs:
            raise ValueError("Add.jvp_many needs at least one non-None tangent stack")
        h_dot = vs[0]
        for vi in vs[1:]:
            h_dot = h_dot + vi
        return h_dot * flat_rows(cache["D"])[:, None, :]

    def jacobian(self, params, cache, mask=None):
        """``(B, N, N)``: ``diag(D)``, the Jacobian with respect to each input."""
        D = flat_rows(cache["D"])
        B, N = D.shape
        J = np.zeros((B, N, N), dtype=D.dtype)
        J[:, np.arange(N), np.arange(N)] = D
        return J



@dataclass(frozen=True)
class SubsamplePad(Layer):
    r"""Spatial subsampling and zero channels: the "option A" shortcut of the CIFAR ResNets.

    ``y[:, a : a + C] = x[:, :, ::s, ::s]`` and zeros in the ``a`` channels before and the ``b``
    channels after, so ``(C, H, W) -> (a + C + b, ceil(H / s), ceil(W / s))``; PyTorch:
    ``F.pad(x[:, :, ::s, ::s], (0, 0, 0, 0, a, b))``. Linear: the JVP is the map itself and the VJP
    reads ``g[:, a : a + C]`` back into the subsampled positions (zero elsewhere).

    Parameters
    ----------
    stride : int >= 1
        ``s`` (1: no subsampling).
    pad_channels : (int, int)
        ``(a, b)``, zero channels before and after.
    """

    stride: int = 2
    pad_channels: tuple = (0, 0)

    is_affine_map = True

    def __post_init__(self):
        object.__setattr__(self, "stride", check_int(self.stride, "stride", min_value=1))
        pc = self.pad_channels
        if not isinstance(pc, (tuple, list)) or len(pc) != 2:
            raise ValueError(f"pad_channels must be a pair of ints (before, after), got {pc!r}")
        object.__setattr__(self, "pad_channels", (check_int(pc[0], "pad_channels[0]", min_value=0),
                                                  check_int(pc[1], "pad_channels[1]", min_value=0)))

    def out_shape(self, in_shape):
        in_shape = tuple(in_shape)
        if len(in_shape) != 3:
            raise ValueError(f"SubsamplePad needs per-example input shape (C, H, W), got {in_shape}")
        C, H, W = in_shape
        a, b = self.pad_channels
        s = self.stride
        return (a + C + b, ceil(H / s), ceil(W / s))

    def _apply(self, x):
        B, C = x.shape[:2]
        a, b = self.pad_channels
        s = self.stride
        sub = x[:, :, ::s, ::s]
        y = np.zeros((B, a + C + b) + sub.shape[2:], dtype=x.dtype)
        y[:, a : a + C] = sub
        return y

    def forward(self, params, x, mask=None):
        return self._apply(x), {"x": x}

    def jvp(self, params, cache, v, mask=None, dparams=None):
        return self._apply(v)

    def vjp(self, params, cache, g, mask=None, input_grad=True):
        x = cache["x"]
        a = self.pad_channels[0]
        s = self.stride
        g_x = np.zeros_like(x)
        g_x[:, :, ::s, ::s] = g[:, a : a + x.shape[1]]
        return g_x, {}

    def vjp_many(self, params, cache, G, mask=None, in_shape=None, out_shape=None):
        """``G J`` for ``G`` ``(B, m, N_out)``: the VJP of every row at once."""
        in_shape, out_shape = self._stack_shapes(cache, in_shape, out_shape)
        B, m, _ = G.shape
        Gs = G.reshape(B * m, *out_shape)
        a = self.pad_channels[0]
        s = self.stride
        g_x = np.zeros((B * m, *in_shape), dtype=G.dtype)
        g_x[:, :, ::s, ::s] = Gs[:, a : a + in_shape[0]]
        return g_x.reshape(B, m, prod(in_shape))

    def jvp_many(self, params, cache, V, mask=None, in_shape=None, out_shape=None):
        """``(J V^T)^T`` for ``V`` ``(B, m, N_in)``: the map applied to every row."""
        in_shape, out_shape = self._stack_shapes(cache, in_shape, out_shape)
        B, m, _ = V.shape
        return self._apply(V.reshape(B * m, *in_shape)).reshape(B, m, prod(out_shape))


@dataclass(frozen=True)
class Residual:
    r"""A residual block ``x -> phi(main(x) + shortcut(x))``, expanded by
    :class:`refnet.network.Network` into its layers and an :class:`Add`.

    Not a layer itself: ``Network([..., Residual(main, shortcut, "relu"), ...], in_shape)`` puts
    the layers of ``main`` (a chain reading the block input), then those of ``shortcut`` (a chain
    reading the block input; empty: the identity), then ``Add(activation)`` reading the ends of
    both, into ``net.layers``, and records the graph in ``net.inputs``. Blocks may be nested.

    Parameters
    ----------
    main : sequence of Layer or Residual
        At least one.
    shortcut : sequence of Layer or Residual
        Empty for the identity shortcut.
    activation : str or Activation
        phi after the sum.
    """

    main: tuple
    shortcut: tuple = ()
    activation: Activation = "identity"

    def __post_init__(self):
        for name in ("main", "shortcut"):
            seq = getattr(self, name)
            if isinstance(seq, (Layer, Residual)):
                seq = (seq,)
            if not isinstance(seq, (tuple, list)):
                raise TypeError(f"Residual {name} must be a sequence of layers, got {type(seq).__name__}")
            for i, item in enumerate(seq):
                if not isinstance(item, (Layer, Residual)):
                    raise TypeError(f"Residual {name}[{i}] must be a refnet Layer or Residual, got {type(item).__name__}")
            object.__setattr__(self, name, tuple(seq))
        if not self.main:
            raise ValueError("Residual main must hold at least one layer, got none")
        object.__setattr__(self, "activation", get_activation(self.activation))


def expand_layers(items) -> tuple[list, list]:
    """Flatten layers and :class:`Residual` blocks into ``(layers, inputs)``: the flat layer list and,
    for each layer, the tuple of node indices it reads (node 0 is the network input, node ``j > 0``
    the output of ``layers[j - 1]``)."""
    layers: list = []
    inputs: list = []

    def chain(seq, node: int) -> int:
        for item in seq:
            if isinstance(item, Residual):
                main_end = chain(item.main, node)
                short_end = chain(item.shortcut, node) if item.shortcut else node
                layers.append(Add(item.activation))
                inputs.append((main_end, short_end))
            else:
                layers.append(item)
                inputs.append((node,))
            node = len(layers)
        return node

    chain(items, 0)
    return layers, inputs
