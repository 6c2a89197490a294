r"""The Network: layer specs, parameters and masks, with hand-derived forward and backward.

A network of K layers maps ``x^0`` to ``x^K`` by ``x^l = layer_l(x^{l-1})``; for affine layers
``h^l = W^l x^{l-1} + b^l`` and ``x^l = phi(h^l)`` (PAPER.md section 1). Backprop runs the layers'
VJPs in reverse from ``eps = dL/dx^K``:

.. math:: g^{K} = \varepsilon, \qquad (g^{l-1}, \nabla_{W^l} L) = \mathrm{vjp}_l(g^l),

where each layer's VJP is derived by hand in :mod:`refnet.layers`; no autodiff anywhere.

``net.params`` and ``net.masks`` are lists (one entry per layer) of dicts with keys "W" and "b"
in PyTorch layouts. Masks are boolean and always present for every parameter; the effective
weight is ``where(mask, W, 0)``: a pruned entry contributes exactly zero whatever it stores (NaN
and inf included), and a non-finite KEPT entry is an error naming its layer
(:meth:`Network.check_finite`). A network is not changed by any failed call; methods that "change" it
(:meth:`with_masks`, :meth:`with_params`) return a new network. Files are read by
:meth:`Network.load`, which names the path of a damaged or malformed file.

Residual connections: the layers form a small directed acyclic graph. ``net.inputs[l]`` names
the nodes ``layers[l]`` reads (node 0 is ``x^0``, node ``j`` the output ``x^j`` of
``layers[j-1]``); a chain has ``inputs[l] = (l,)``. A :class:`~refnet.layers.Residual` block in
the ``layers`` given to :class:`Network` is expanded into its layers and an
:class:`~refnet.layers.Add`, so every layer, and every weight matrix ``W^l``, keeps its own entry
in ``params`` and ``masks``. Backprop on the graph sums the cotangents of a node read by several
layers:

.. math:: g^{j} = \sum_{l:\ j \in \mathrm{inputs}(l)} \mathrm{vjp}_l(g^{l+1})_j .

Batch normalization: ``net.buffers`` (one dict per layer, ``{}`` but for
:class:`~refnet.layers.BatchNorm1d`/``2d``) holds the running statistics, which are not parameters
(no gradient, no mask); :meth:`with_mode` switches the batch-normalization layers between train
mode (batch statistics) and eval mode (running statistics), and :meth:`updated_buffers` gives the
running statistics after a train-mode forward pass (PyTorch's update, used by
:func:`refnet.training.train`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ._io import atomic_savez, json_entry, read_npz
from ._checks import as_rng, check_array, check_choice, check_float, check_int, check_labels, check_memory, check_shape_tuple, resolve_dtype
from .activations import get_activation
from .init import Initializer, get_initializer
from .layers import Dense, Layer, Residual, expand_layers, layer_from_dict
from .layers.base import where_kept
from .losses import get_loss

__all__ = ["Network", "Trace", "check_net", "mlp", "load_network"]

FORMAT_VERSION = 1

#: the keys of a saved network's config (:meth:`Network.to_config`): True for a required key
CONFIG_KEYS = {"format": True, "version": True, "in_shape": True, "dtype": True, "layers": True, "init": False,
               "inputs": False}


def n_inputs(layer) -> int:
    """How many nodes ``layer`` reads (1 but for :class:`~refnet.layers.Add`)."""
    return getattr(layer, "n_inputs", 1)


def couples_batch(layer) -> bool:
    """Whether ``layer``'s output for one example depends on the others (train-mode batch norm)."""
    return bool(getattr(layer, "couples_batch", False))


def _needs_initializer(layer) -> bool:
    """Whether the network's initializer draws ``layer``'s parameters (not batch norm's gamma/beta)."""
    return bool(getattr(layer, "needs_initializer", True))


def chain_inputs(n: int) -> tuple:
    """The inputs of a chain of ``n`` layers: ``((0,), (1,), ..., (n-1,))``."""
    return tuple((l,) for l in range(n))


def check_inputs(layers, inputs, name: str = "inputs") -> tuple:
    """``inputs`` validated for ``layers``: one tuple of node indices per layer, as many as the layer
    reads, each an earlier node (``0 <= j <= l`` for ``layers[l]``), and every node but the output
    read by some layer. ValueError/TypeError naming ``name`` otherwise."""
    K = len(layers)
    if not isinstance(inputs, (list, tuple)) or len(inputs) != K:
        got = f"{len(inputs)} entries" if isinstance(inputs, (list, tuple)) else type(inputs).__name__
        raise ValueError(f"{name} must hold one tuple of node indices per layer ({K}), got {got}")
    out = []
    for l, (layer, ins) in enumerate(zip(layers, inputs)):
        if isinstance(ins, (int, np.integer)) and not isinstance(ins, (bool, np.bool_)):
            ins = (ins,)
        if not isinstance(ins, (list, tuple)):
            raise TypeError(f"{name}[{l}] must be a tuple of node indices, got {type(ins).__name__}")
        ins = tuple(check_int(j, f"{name}[{l}] entries", min_value=0) for j in ins)
        if len(ins) != n_inputs(layer):
            raise ValueError(f"{name}[{l}] must name {n_inputs(layer)} node(s) for layers[{l}] "
                             f"({type(layer).__name__}), got {ins}")
        if any(j > l for j in ins):
            raise ValueError(f"{name}[{l}] must name earlier nodes (0..{l}: node 0 is the input, node j the output "
                             f"of layers[j-1]), got {ins}")
        out.append(ins)
    used = {j for ins in out for j in ins}
    unused = [j for j in range(K) if j not in used]
    if unused:
        raise ValueError(f"{name}: node {unused[0]} ({'the input' if unused[0] == 0 else f'the output of layers[{unused[0] - 1}]'}) "
                         "is read by no layer; every node but the last must be used")
    return tuple(out)


def graph_shapes(layers, in_shape, inputs) -> tuple[list, list]:
    """``(shapes, in_shapes)``: the per-example shapes of the nodes ``x^0 .. x^K`` and the input shape
    of every layer (a tuple of shapes for a multi-input layer)."""
    shapes = [tuple(in_shape)]
    in_shapes = []
    for i, (layer, ins) in enumerate(zip(layers, inputs)):
        s_in = shapes[ins[0]] if n_inputs(layer) == 1 else tuple(shapes[j] for j in ins)
        try:
            shapes.append(tuple(layer.out_shape(s_in)))
        except ValueError as exc:
            raise ValueError(f"layers[{i}] ({type(layer).__name__}): {exc}") from None
        in_shapes.append(s_in)
    return shapes, in_shapes


@dataclass
class Trace:
    """What a forward pass keeps for the backward pass.

    Attributes
    ----------
    x : ndarray
        The input ``x^0``, ``(B, *in_shape)``.
    caches : list of dict
        One per layer; affine layers hold ``x`` (= x^{l-1}), ``h`` (= h^l) and ``D`` (= phi'(h^l)).
    out : ndarray
        The output ``x^K``.
    """

    x: np.ndarray
    caches: list
    out: np.ndarray

    @property
    def inputs(self) -> list:
        """``[x^0, ..., x^{K-1}]``: the input of every layer."""
        return [c["x"] for c in self.caches]


class Network:
    """A feed-forward network of refnet layers.

    Parameters
    ----------
    layers : sequence of Layer or Residual
        The layers in order; a :class:`~refnet.layers.Residual` block is expanded into its layers
        and an :class:`~refnet.layers.Add` (``net.layers`` holds the flat list).
    in_shape : tuple of int, optional
        Per-example input shape, e.g. ``(784,)`` or ``(1, 28, 28)``. Inferred from a first
        Dense layer; required when the first layer is not Dense.
    init : str, Initializer or list of them
        One initialization for every layer, or one per layer (None for parameter-free layers).
        Names: "lecun" ("vs-l"), "glorot" ("vs-g"), "he" ("vs-h"), "sg" (needs ``gamma``),
        "orthogonal" ("ldi"), "delta_orthogonal"; see :mod:`refnet.init`.
    seed : int or numpy.random.Generator, optional
        The only source of randomness. Layers draw in order, weight then bias.
    dtype : float64 (default) or float32
    params, masks : list of dict, optional
        Given parameters (validated, copied) instead of drawing them; masks default to all ones.
    buffers : list of dict, optional
        The running statistics of the batch-normalization layers (validated, copied); default
        ``running_mean = 0``, ``running_var = 1``.
    inputs : sequence of tuple of int, optional
        The graph (for flat ``layers`` without Residual blocks): ``inputs[l]`` names the nodes
        ``layers[l]`` reads, node 0 the input and node ``j`` the output of ``layers[j-1]``.
        Default: a chain.
    **init_kwargs
        Passed to the initializer: ``gain``, ``gamma``, ``sigma_b``, ``truncated``.
    """

    def __init__(
        self,
        layers: Sequence[Layer],
        in_shape=None,
        init="lecun",
        seed=None,
        dtype=np.float64,
        params=None,
        masks=None,
        buffers=None,
        inputs=None,
        **init_kwargs,
    ):
        if isinstance(layers, (str, bytes, Layer)) or not hasattr(layers, "__iter__"):
            raise TypeError(f"layers must be a sequence of refnet Layers, got {type(layers).__name__} {layers!r:.60}")
        layers = tuple(layers)
        if not layers:
            raise ValueError("layers must hold at least one layer, got none")
        for i, layer in enumerate(layers):
            if not isinstance(layer, (Layer, Residual)):
                raise TypeError(f"layers[{i}] must be a refnet Layer or Residual, got {type(layer).__name__}")
        if any(isinstance(layer, Residual) for layer in layers):
            if inputs is not None:
                raise ValueError("inputs must be None when layers holds Residual blocks (they define the graph)")
            layers, inputs = expand_layers(layers)
            layers = tuple(layers)
        self.inputs = chain_inputs(len(layers)) if inputs is None else check_inputs(layers, inputs)
        if in_shape is None:
            if isinstance(layers[0], Dense):
                in_shape = (layers[0].n_in,)
            else:
                raise ValueError(
                    f"in_shape must be given when the first layer is {type(layers[0]).__name__}, e.g. (1, 28, 28)"
                )
        in_shape = check_shape_tuple(in_shape, "in_shape")
        self.layers = layers
        self.in_shape = in_shape
        self.dtype = resolve_dtype(dtype)
        shapes, self.in_shapes = graph_shapes(layers, in_shape, self.inputs)
        self.shapes = shapes  # per-example shapes of x^0 .. x^K; in_shapes: each layer's input

        if params is None:
            self._check_size()
            inits = self._resolve_inits(init, init_kwargs)
            rng = as_rng(seed)
            params = [
                layer.init(rng, self.in_shapes[i], inits[i], self.dtype) if inits[i] is not None
                else (layer.init(rng, self.in_shapes[i], None, self.dtype) if layer.keys else {})
                for i, layer in enumerate(layers)
            ]
            self.init = inits
        else:
            if init_kwargs:
                raise ValueError(f"init arguments {sorted(init_kwargs)} given together with params")
            params = self._check_params(params, copy=True)
            self.init = None
        self.params = params
        self.masks = self._check_masks(masks) if masks is not None else self._full_masks()
        if self.init is None:
            self.check_finite(None)  # given params: finite wherever the masks keep them
        self.buffers = self._check_buffers(buffers) if buffers is not None else self._init_buffers()

    # ---------------------------------------------------------------------------------------
    # construction helpers
    # ---------------------------------------------------------------------------------------
    def _resolve_inits(self, init, init_kwargs) -> list:
        if isinstance(init, (list, tuple)):
            if init_kwargs:
                raise ValueError("init arguments must be inside each Initializer when init is a list")
            if len(init) != len(self.layers):
                raise ValueError(f"init must have one entry per layer ({len(self.layers)}), got {len(init)}")
            out = []
            for i, (it, layer) in enumerate(zip(init, self.layers)):
                if not layer.keys or not _needs_initializer(layer):
                    out.append(None)
                elif it is None:
                    raise ValueError(f"init[{i}] is None but layers[{i}] has parameters")
                else:
                    out.append(get_initializer(it))
            return out
        ini = get_initializer(init, **init_kwargs)
        return [ini if layer.keys and _needs_initializer(layer) else None for layer in self.layers]

    def _check_size(self) -> None:
        """Refuse up front (ValueError with the size needed) parameters that cannot be allocated:
        the parameters, their boolean masks and the initializer's work arrays (a few copies of the
        largest weight in float64)."""
        sizes = [sum(int(np.prod(s, dtype=object)) for s in shapes.values()) for shapes in self.param_shapes()]
        total = sum(sizes)
        if not total:
            return
        biggest = max(range(len(sizes)), key=sizes.__getitem__)
        need = total * (self.dtype.itemsize + 1) + 3 * 8 * sizes[biggest]
        check_memory(need, f"the network's {total:,} parameters (the largest, layers[{biggest}] "
                           f"{self._layer_desc(biggest)}, has {sizes[biggest]:,})")

    def _layer_desc(self, i: int) -> str:
        """``Dense(784, 100)[tanh]``-like description of layer ``i`` (for messages)."""
        layer = self.layers[i]
        fields = [getattr(layer, f) for f in ("n_in", "n_out", "c_in", "c_out") if hasattr(layer, f)]
        desc = f"{type(layer).__name__}({', '.join(str(f) for f in fields)})"
        act = getattr(layer, "activation", None)
        return desc + (f"[{act.name}]" if getattr(act, "name", None) else "")

    def param_shapes(self) -> list[dict]:
        """Per layer, ``{key: shape}`` of its parameters."""
        return [layer.param_shapes(self.in_shapes[i]) for i, layer in enumerate(self.layers)]

    def buffer_shapes(self) -> list[dict]:
        """Per layer, ``{key: shape}`` of its buffers (the running statistics of batch norm)."""
        return [layer.buffer_shapes(self.in_shapes[i]) if hasattr(layer, "buffer_shapes") else {}
                for i, layer in enumerate(self.layers)]

    def _init_buffers(self) -> list[dict]:
        return [layer.init_buffers(self.in_shapes[i], self.dtype) if hasattr(layer, "init_buffers") else {}
                for i, layer in enumerate(self.layers)]

    def _check_buffers(self, buffers, name: str = "buffers") -> list[dict]:
        expected = self.buffer_shapes()
        if not isinstance(buffers, (list, tuple)) or len(buffers) != len(self.layers):
            got = len(buffers) if isinstance(buffers, (list, tuple)) else type(buffers).__name__
            raise ValueError(f"{name} must be a list of {len(self.layers)} dicts (one per layer), got {got}")
        out = []
        for i, (b, shapes) in enumerate(zip(buffers, expected)):
            if b is None:
                b = {}
            if not isinstance(b, dict) or set(b) != set(shapes):
                got = sorted(b) if isinstance(b, dict) else type(b).__name__
                raise ValueError(f"{name}[{i}] must be a dict with keys {sorted(shapes)}, got {got}")
            d = {}
            for k, shape in shapes.items():
                a = check_array(b[k], f"{name}[{i}][{k!r}]", shape=shape)
                if a.dtype != self.dtype:
                    raise TypeError(f"{name}[{i}][{k!r}] must have dtype {self.dtype}, got {a.dtype}")
                if k == "running_var" and np.any(a < 0):
                    raise ValueError(f"{name}[{i}][{k!r}] must be >= 0, got min {float(a.min())}")
                d[k] = a.copy()
            out.append(d)
        return out

    def _check_params(self, params, copy: bool, name: str = "params") -> list[dict]:
        expected = self.param_shapes()
        if not isinstance(params, (list, tuple)) or len(params) != len(self.layers):
            got = len(params) if isinstance(params, (list, tuple)) else type(params).__name__
            raise ValueError(f"{name} must be a list of {len(self.layers)} dicts (one per layer), got {got}")
        out = []
        for i, (p, shapes) in enumerate(zip(params, expected)):
            if not isinstance(p, dict) or set(p) != set(shapes):
                got = sorted(p) if isinstance(p, dict) else type(p).__name__
                raise ValueError(f"{name}[{i}] must be a dict with keys {sorted(shapes)}, got {got}")
            d = {}
            for k, shape in shapes.items():
                # non-finite entries are allowed where pruned: check_finite runs once the masks are known
                a = check_array(p[k], f"{name}[{i}][{k!r}]", shape=shape, finite=False)
                if a.dtype != self.dtype:
                    raise TypeError(f"{name}[{i}][{k!r}] must have dtype {self.dtype}, got {a.dtype}")
                d[k] = a.copy() if copy else a
            out.append(d)
        return out

    def _full_masks(self) -> list[dict]:
        return [{k: np.ones(s, dtype=bool) for k, s in shapes.items()} for shapes in self.param_shapes()]

    def _check_masks(self, masks, name: str = "masks") -> list[dict]:
        expected = self.param_shapes()
        if not isinstance(masks, (list, tuple)) or len(masks) != len(self.layers):
            got = len(masks) if isinstance(masks, (list, tuple)) else type(masks).__name__
            raise ValueError(f"{name} must be a list of {len(self.layers)} dicts (one per layer), got {got}")
        out = []
        for i, (m, shapes) in enumerate(zip(masks, expected)):
            if m is None:
                m = {}
            if not isinstance(m, dict) or not set(m) <= set(shapes):
                got = sorted(m) if isinstance(m, dict) else type(m).__name__
                raise ValueError(f"{name}[{i}] must be a dict with keys among {sorted(shapes)}, got {got}")
            d = {}
            for k, shape in shapes.items():
                if k not in m or m[k] is None:
                    d[k] = np.ones(shape, dtype=bool)
                    continue
                a = np.asarray(m[k])
                where = f"{name}[{i}][{k!r}]"
                if a.shape != shape:
                    raise ValueError(f"{where} must have shape {shape}, got {a.shape}")
                if a.dtype != bool:
                    if a.dtype.kind not in "biuf" or not np.all((a == 0) | (a == 1)):
                        raise ValueError(f"{where} must be boolean or hold only 0 and 1, got dtype {a.dtype}")
                d[k] = a.astype(bool, copy=True)
            out.append(d)
        return out

    # ---------------------------------------------------------------------------------------
    # properties
    # ---------------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def is_chain(self) -> bool:
        """True when every layer reads the node before it (no residual connection)."""
        return all(ins == (l,) for l, ins in enumerate(self.inputs))

    @property
    def couples_batch(self) -> bool:
        """True when some layer couples the examples of a batch (batch norm in train mode)."""
        return any(couples_batch(layer) for layer in self.layers)

    def layer_params(self, i: int) -> dict:
        """What ``layers[i].forward`` takes as ``params``: the parameters, plus the buffers (running
        statistics) of a batch-normalization layer."""
        p, b = self.params[i], self.buffers[i]
        return {**p, **b} if b else p

    @property
    def out_shape(self) -> tuple:
        return self.shapes[-1]

    @property
    def n_params(self) -> int:
        return int(sum(a.size for p in self.params for a in p.values()))

    @property
    def n_weights(self) -> int:
        return int(sum(p["W"].size for p in self.params if "W" in p))

    def density(self, key: str = "W") -> float:
        """Fraction of kept entries of parameter ``key`` over all layers."""
        kept = sum(int(m[key].sum()) for m in self.masks if key in m)
        total = sum(m[key].size for m in self.masks if key in m)
        return kept / total if total else 1.0

    def effective_params(self) -> list[dict]:
        """``where(mask, param, 0)`` for every parameter: the weights the network actually uses (a
        pruned entry is exactly zero whatever the stored value, NaN included)."""
        return [{k: where_kept(p[k], m[k]) for k in p} for p, m in zip(self.params, self.masks)]

    def check_finite(self, name: str | None = "net", what: str = "params") -> None:
        """Raise ``ValueError`` naming the first parameter (and its layer) that holds a non-finite
        (NaN or infinite) value at a KEPT entry. Pruned entries may hold anything: they contribute
        exactly zero (the effective weight is ``where(mask, W, 0)``). Messages name
        ``{name}.params[i][key]`` (``params[i][key]`` when ``name`` is None)."""
        for i, (p, m) in enumerate(zip(self.params, self.masks)):
            for k, a in p.items():
                finite = np.isfinite(a)
                if finite.all():
                    continue
                bad = ~finite & m[k]
                n_bad = int(np.count_nonzero(bad))
                if n_bad:
                    idx = tuple(int(j) for j in np.argwhere(bad)[0])
                    where = f"{name}.params" if name else what
                    raise ValueError(
                        f"{where}[{i}][{k!r}] (layer {i}, {self._layer_desc(i)}) has {n_bad} non-finite kept "
                        f"entries (e.g. {a[idx]} at {idx}); kept parameters must be finite (pruned entries may "
                        "hold anything: they contribute exactly zero)"
                    )

    def __repr__(self) -> str:
        return f"Network({self.n_layers} layers, in_shape={self.in_shape}, n_params={self.n_params}, dtype={self.dtype})"

    def summary(self) -> str:
        """A table of layers, output shapes, parameter counts and kept fractions."""
        lines = [f"{'#':>3}  {'layer':<48} {'output':<16} {'params':>9} {'kept':>7}"]
        chain = self.is_chain
        for i, layer in enumerate(self.layers):
            n = sum(a.size for a in self.params[i].values())
            kept = sum(int(m.sum()) for m in self.masks[i].values())
            frac = f"{kept / n:7.3f}" if n else "      -"
            desc = type(layer).__name__
            if hasattr(layer, "activation"):
                desc += f"[{layer.activation}]"
            if not chain and self.inputs[i] != (i,):
                desc += f" <- {', '.join(f'x^{j}' for j in self.inputs[i])}"
            lines.append(f"{i:>3}  {desc:<48} {str(self.shapes[i + 1]):<16} {n:>9} {frac}")
        lines.append(f"total parameters: {self.n_params}, input shape {self.in_shape}, dtype {self.dtype}")
        return "\n".join(lines)

    # ---------------------------------------------------------------------------------------
    # forward / backward
    # ---------------------------------------------------------------------------------------
    def check_input(self, x, name: str = "x") -> np.ndarray:
        """Validate a batch ``(B, *in_shape)`` and convert it to the network's dtype."""
        x = check_array(x, name, shape=(None, *self.in_shape), allow_int=True)
        return x.astype(self.dtype, copy=False)

    def forward(self, x, return_trace: bool = False):
        """Run the network on a batch.

        Parameters
        ----------
        x : ndarray, shape (B, *in_shape)
        return_trace : bool
            Also return the :class:`Trace` the backward pass and the Jacobian routines need.

        Returns
        -------
        out : ndarray, shape (B, *out_shape)
        trace : Trace, only if ``return_trace``
        """
        if not isinstance(return_trace, (bool, np.bool_)):
            raise TypeError(f"return_trace must be a bool, got {type(return_trace).__name__} {return_trace!r}")
        x = self.check_input(x)
        h, caches = x, []
        if self.is_chain:
            for i, (layer, m) in enumerate(zip(self.layers, self.masks)):
                h, cache = layer.forward(self.layer_params(i), h, m)
                caches.append(cache)
        else:  # a graph: every node kept until the layers reading it have run (they hold it in their caches)
            nodes = [x]
            for i, (layer, ins, m) in enumerate(zip(self.layers, self.inputs, self.masks)):
                h_in = nodes[ins[0]] if len(ins) == 1 and n_inputs(layer) == 1 else tuple(nodes[j] for j in ins)
                h, cache = layer.forward(self.layer_params(i), h_in, m)
                nodes.append(h)
                caches.append(cache)
        # a non-finite kept weight is named here, not left to the loss or the Jacobian: it shows
        # as a non-finite output or pre-activation (tanh(inf) is finite); then check the weights
        if not np.isfinite(h).all() or not all(np.isfinite(c["h"]).all() for c in caches if "h" in c):
            self.check_finite()
        return (h, Trace(x, caches, h)) if return_trace else h

    __call__ = forward

    def backward(self, trace: Trace, eps, return_input_grad: bool = False):
        """Backpropagate ``eps = dL/dx^K`` through a trace.

        Returns the parameter gradients (a list of dicts shaped like ``params``; pruned entries
        exactly zero) and, if asked, ``dL/dx^0``.
        """
        if not isinstance(trace, Trace):
            raise TypeError(f"trace must be a Trace from forward(..., return_trace=True), got {type(trace).__name__}")
        g = check_array(eps, "eps", shape=trace.out.shape)
        grads = [None] * self.n_layers
        if not self.is_chain:
            cot = self.node_cotangents(trace, g, grads=grads, input_grad=return_input_grad)
            return (grads, cot[0]) if return_input_grad else grads
        for l in range(self.n_layers - 1, -1, -1):
            need = l > 0 or return_input_grad
            g, grads[l] = self.layers[l].vjp(self.params[l], trace.caches[l], g, self.masks[l], input_grad=need)
        return (grads, g) if return_input_grad else grads

    def node_cotangents(self, trace: Trace, eps, *, grads: list | None = None, input_grad: bool = True) -> list:
        r"""``[dL/dx^0, ..., dL/dx^K]``: the cotangent of every node, from ``eps = dL/dx^K``.

        Reverse mode on the graph: layer ``l`` (in reverse order) pulls back the cotangent of its
        output, ``g^{l+1}``, and the result is added to the cotangent of every node it reads (a node
        read by a main branch and a shortcut gets the sum of both). The gradients of ``layers[l]``'s
        parameters are written to ``grads[l]`` when a list is given. ``dL/dx^0`` is None unless
        ``input_grad``.
        """
        K = self.n_layers
        cot: list = [None] * (K + 1)
        cot[K] = eps
        for l in range(K - 1, -1, -1):
            ins = self.inputs[l]
            need = input_grad or any(j > 0 for j in ins)
            g_x, gr = self.layers[l].vjp(self.params[l], trace.caches[l], cot[l + 1], self.masks[l], input_grad=need)
            if grads is not None:
                grads[l] = gr
            if not need:
                continue
            g_xs = g_x if n_inputs(self.layers[l]) > 1 else (g_x,)
            for j, gj in zip(ins, g_xs):
                if j == 0 and not input_grad:
                    continue
                cot[j] = gj if cot[j] is None else cot[j] + gj
        return cot

    def jvp(self, trace: Trace, v, dparams=None):
        """Forward-mode product: the tangent of ``x^K`` for an input tangent ``v`` and optional
        parameter tangents ``dparams`` (a list of dicts, entries may be missing)."""
        g = check_array(v, "v", shape=trace.x.shape)
        if not self.is_chain:
            tangents = [g]
            for l, (layer, ins) in enumerate(zip(self.layers, self.inputs)):
                dp = None if dparams is None else dparams[l]
                t = tangents[ins[0]] if n_inputs(layer) == 1 else tuple(tangents[j] for j in ins)
                tangents.append(layer.jvp(self.params[l], trace.caches[l], t, self.masks[l], dp))
            return tangents[-1]
        for l, layer in enumerate(self.layers):
            dp = None if dparams is None else dparams[l]
            g = layer.jvp(self.params[l], trace.caches[l], g, self.masks[l], dp)
        return g

    def weight_decay_penalty(self, weight_decay: float):
        """``wd * sum_l ||mask * W^l||^2`` and its gradient ``2 wd mask * W`` (weights only)."""
        value = 0.0
        grads = []
        for p, m in zip(self.params, self.masks):
            if "W" in p:
                W = where_kept(p["W"], m["W"])
                value += float(np.sum(W * W))
                grads.append({"W": 2.0 * weight_decay * W})
            else:
                grads.append({})
        return weight_decay * value, grads

    def loss_and_grads(self, x, y, loss="cross_entropy", weight_decay: float = 0.0, *, return_trace: bool = False):
        """Mean loss on a batch and its gradients with respect to every parameter.

        Parameters
        ----------
        x : ndarray, shape (B, *in_shape)
        y : ndarray, shape (B,) int labels or (B, C) targets
        loss : "cross_entropy", "mse" or a callable ``(z, y) -> (loss, eps)``
        weight_decay : float
            Adds ``weight_decay * sum_l ||mask * W^l||^2`` (biases and batch-norm parameters
            excluded, PAPER.md section 8).
        return_trace : bool
            Also return the forward pass's :class:`Trace` (for :meth:`updated_buffers`).

        Returns
        -------
        loss : float
        grads : list of dict, shaped like ``params``
        trace : Trace, only if ``return_trace``
        """
        wd = check_float(weight_decay, "weight_decay", min_value=0.0)
        loss_fn = get_loss(loss)
        out, trace = self.forward(x, return_trace=True)
        if out.ndim != 2:
            raise ValueError(f"the network output must be (B, C) for a loss, got shape {out.shape}")
        value, eps = loss_fn(out, y)
        grads = self.backward(trace, eps)
        if wd:
            pen, pgrads = self.weight_decay_penalty(wd)
            value += pen
            for g, pg in zip(grads, pgrads):
                if "W" in pg:
                    g["W"] = g["W"] + pg["W"]
        return (float(value), grads, trace) if return_trace else (float(value), grads)

    def loss(self, x, y, loss="cross_entropy", weight_decay: float = 0.0) -> float:
        """The mean loss (plus the weight-decay term) on a batch."""
        wd = check_float(weight_decay, "weight_decay", min_value=0.0)
        value, _ = get_loss(loss)(self.forward(x), y)
        return float(value + (self.weight_decay_penalty(wd)[0] if wd else 0.0))

    def check_targets(self, x, y, xname: str = "x", yname: str = "y"):
        """Validate a labelled batch for this classifier: ``x`` ``(n, *in_shape)`` with ``n >= 1``
        and ``y`` either ``(n,)`` integer labels in ``[0, n_classes)`` or ``(n, n_classes)`` float
        targets (a ``(n, 1)`` column of labels is named as such). Returns ``(x, y)`` converted."""
        x = self.check_input(x, xname)
        n = x.shape[0]
        if n == 0:
            raise ValueError(f"{xname} must hold at least one example, got shape {x.shape}")
        if len(self.out_shape) != 1:
            raise ValueError(f"the network output must be (B, n_classes) for labels, got per-example shape {self.out_shape}")
        n_classes = self.out_shape[0]
        y_arr = np.asarray(y)
        if y_arr.ndim == 2:
            if y_arr.shape == (n, 1) and n_classes != 1:
                raise ValueError(f"{yname} must be labels of shape ({n},) or targets ({n}, {n_classes}), got a column "
                                 f"of shape {y_arr.shape}: pass {yname}.ravel() for labels")
            return x, check_array(y_arr, yname, shape=(n, n_classes), dtype=self.dtype)
        if y_arr.ndim != 1:
            raise ValueError(f"{yname} must be labels of shape ({n},) or targets ({n}, {n_classes}), got shape {y_arr.shape}")
        if y_arr.shape[0] != n:
            raise ValueError(f"{yname} must have one label per row of {xname} ({n}), got {y_arr.shape[0]}")
        return x, check_labels(y_arr, yname, n=n, n_classes=n_classes)

    def predict(self, x, batch_size: int = 1000) -> np.ndarray:
        """Arg-max class of each row, computed in batches of ``batch_size >= 1`` rows."""
        batch_size = check_int(batch_size, "batch_size", min_value=1)
        x = self.check_input(x)
        return np.concatenate(
            [self.forward(x[i : i + batch_size]).argmax(axis=1) for i in range(0, len(x), batch_size)]
        ) if len(x) else np.zeros(0, dtype=np.intp)

    def evaluate(self, x, y, loss="cross_entropy", batch_size: int = 1000) -> tuple[float, float]:
        """Mean loss and accuracy over a data set, computed in batches of ``batch_size >= 1`` rows;
        ``y`` as :meth:`check_targets` takes it."""
        batch_size = check_int(batch_size, "batch_size", min_value=1)
        loss_fn = get_loss(loss)
        x, y = self.check_targets(x, y)
        total, correct = 0.0, 0
        for i in range(0, len(x), batch_size):
            out = self.forward(x[i : i + batch_size])
            value, _ = loss_fn(out, y[i : i + batch_size])
            total += value * len(out)
            if y.ndim == 1:
                correct += int(np.sum(out.argmax(axis=1) == y[i : i + batch_size]))
            else:
                correct += int(np.sum(out.argmax(axis=1) == y[i : i + batch_size].argmax(axis=1)))
        return total / len(x), correct / len(x)

    # ---------------------------------------------------------------------------------------
    # new networks from this one
    # ---------------------------------------------------------------------------------------
    def _new(self, params, masks, buffers=None, layers=None) -> "Network":
        """A network sharing this one's graph, with these lists (``buffers`` None: copies of this
        one's; ``layers`` None: the same layers)."""
        net = object.__new__(Network)
        net.layers, net.in_shape, net.dtype, net.shapes = self.layers, self.in_shape, self.dtype, self.shapes
        net.inputs, net.in_shapes = self.inputs, self.in_shapes
        if layers is not None:
            net.layers = tuple(layers)
        net.init = self.init
        net.params, net.masks = params, masks
        net.buffers = [{k: v.copy() for k, v in b.items()} for b in self.buffers] if buffers is None else buffers
        return net

    def copy(self) -> "Network":
        """A deep copy (parameters, masks and buffers)."""
        return self._new(
            [{k: v.copy() for k, v in p.items()} for p in self.params],
            [{k: v.copy() for k, v in m.items()} for m in self.masks],
        )

    def with_mode(self, mode: str, *, share: bool = False) -> "Network":
        """The network with every batch-normalization layer in ``mode``: "train" (batch statistics,
        the examples of a batch coupled) or "eval" (running statistics, per example).

        A new network with copies of the parameters, masks and buffers; with ``share=True`` it
        shares this one's arrays (a view: training one trains the other), as PyTorch's
        ``module.eval()`` would. Networks without batch normalization come back unchanged (copied).
        """
        mode = check_choice(mode, "mode", ("train", "eval"))
        layers = [layer.with_mode(mode) if hasattr(layer, "with_mode") else layer for layer in self.layers]
        if share:
            return self._new(self.params, self.masks, self.buffers, layers=layers)
        net = self.copy()
        net.layers = tuple(layers)
        return net

    @property
    def mode(self) -> str | None:
        """"train" when a batch-normalization layer is in train mode, "eval" when all of them are in
        eval mode, None without batch normalization."""
        modes = {layer.mode for layer in self.layers if hasattr(layer, "with_mode")}
        return None if not modes else ("train" if "train" in modes else "eval")

    def updated_buffers(self, trace: Trace) -> list[dict]:
        r"""The running statistics after the train-mode forward pass ``trace`` (new arrays; this
        network is not changed): for every train-mode batch-normalization layer, PyTorch's
        ``running_mean <- (1 - momentum) running_mean + momentum mu_B`` and
        ``running_var <- (1 - momentum) running_var + momentum m/(m-1) sigma_B^2`` (the unbiased
        batch variance); copies for every other layer."""
        if not isinstance(trace, Trace):
            raise TypeError(f"trace must be a Trace from forward(..., return_trace=True), got {type(trace).__name__}")
        return [layer.updated_buffers(b, c) if b else {}
                for layer, b, c in zip(self.layers, self.buffers, trace.caches)]

    def with_masks(self, masks) -> "Network":
        """A new network with these masks (validated; missing entries mean 'keep all') and a copy
        of the parameters. The stored ``W`` is not changed: the effective weight is
        ``where(mask, W, 0)``; masks that keep a non-finite stored value are refused."""
        masks = self._check_masks(masks)
        net = self._new([{k: v.copy() for k, v in p.items()} for p in self.params], masks)
        try:
            net.check_finite(None)  # a pruned NaN may become a kept one
        except ValueError as exc:
            raise ValueError(f"masks keep non-finite stored values: {exc}") from None
        return net

    def with_params(self, params) -> "Network":
        """A new network with these parameters (validated, copied) and a copy of the masks."""
        params = self._check_params(params, copy=True)
        net = self._new(params, [{k: v.copy() for k, v in m.items()} for m in self.masks])
        net.check_finite(None)
        return net

    def astype(self, dtype) -> "Network":
        """A copy in another float dtype (float64 or float32)."""
        dt = resolve_dtype(dtype)
        net = self.copy()
        net.dtype = dt
        net.params = [{k: v.astype(dt) for k, v in p.items()} for p in net.params]
        net.buffers = [{k: v.astype(dt) for k, v in b.items()} for b in net.buffers]
        return net

    # ---------------------------------------------------------------------------------------
    # files (.npz, no pickle, atomic)
    # ---------------------------------------------------------------------------------------
    def to_config(self) -> dict:
        return {
            "format": "refnet.Network",
            "version": FORMAT_VERSION,
            "in_shape": list(self.in_shape),
            "dtype": str(self.dtype),
            "layers": [layer.to_dict() for layer in self.layers],
            "init": None if self.init is None else [None if i is None else i.to_dict() for i in self.init],
            **({} if self.is_chain else {"inputs": [list(ins) for ins in self.inputs]}),
        }

    def save(self, path) -> None:
        """Write the network to ``path`` (.npz): the layer specs as JSON, params and masks.

        The file is written to a temporary file in the same folder and moved into place with
        ``os.replace``, so a crash never leaves a half-written file.
        """
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
            raise TypeError(f"path must be a non-empty str or os.PathLike, got {type(path).__name__} {path!r:.60}")
        if os.path.isdir(path):
            raise ValueError(f"path {os.fspath(path)!r} is a folder; give a file path such as run/net.npz")
        arrays = {"config": np.array(json.dumps(self.to_config()))}
        for i, (p, m) in enumerate(zip(self.params, self.masks)):
            for k in p:
                arrays[f"param/{i}/{k}"] = p[k]
                arrays[f"mask/{i}/{k}"] = m[k]
        for i, b in enumerate(self.buffers):
            for k in b:
                arrays[f"buffer/{i}/{k}"] = b[k]
        atomic_savez(path, arrays)

    @classmethod
    def load(cls, path) -> "Network":
        """Read a network written by :meth:`save`; every key, shape and dtype is validated.

        A damaged file (empty, truncated, a flipped byte), a file of another kind (a ``.npy``, a
        config without ``layers`` or with a key :data:`CONFIG_KEYS` does not list, an unknown layer
        type or layer argument, arrays missing or of the wrong shape or dtype) is a ``ValueError``
        naming the path and what is wrong; a missing file a ``FileNotFoundError``.
        """
        data = read_npz(path, "network file")
        where = f"network file {os.fspath(path)!r}"
        try:
            return cls._from_arrays(data, where)
        except (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError) as exc:
            msg = str(exc)
            raise ValueError(msg if msg.startswith(where) else f"{where}: {msg}") from None

    @classmethod
    def _from_arrays(cls, data: dict, where: str) -> "Network":
        """The network described by the arrays of a saved file (see :meth:`load`)."""
        if "config" not in data:
            raise ValueError(f"{where} has no 'config' entry: not a refnet network file (entries {sorted(data)[:8]})")
        cfg = json_entry(data.pop("config"), where, "config")
        if cfg.get("format") != "refnet.Network" or cfg.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{where}: expected format refnet.Network version {FORMAT_VERSION}, "
                f"got {cfg.get('format')!r} version {cfg.get('version')!r}"
            )
        missing = sorted(k for k in CONFIG_KEYS if CONFIG_KEYS[k] and k not in cfg)
        unknown = sorted(set(cfg) - set(CONFIG_KEYS))
        if missing or unknown:
            raise ValueError(f"{where}: config keys {missing} are missing" if missing else
                             f"{where}: config has unknown keys {unknown} (known: {sorted(CONFIG_KEYS)})")
        if not isinstance(cfg["layers"], list) or not cfg["layers"]:
            raise ValueError(f"{where}: config 'layers' must be a non-empty list, got {cfg['layers']!r:.80}")
        layers = []
        for i, d in enumerate(cfg["layers"]):
            try:
                layers.append(layer_from_dict(d))
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                raise ValueError(f"{where}: config 'layers'[{i}] is not a layer: {exc}") from None
        if not isinstance(cfg["in_shape"], list):
            raise ValueError(f"{where}: config 'in_shape' must be a list of positive ints, got {cfg['in_shape']!r}")
        in_shape = check_shape_tuple(cfg["in_shape"], "config 'in_shape'")
        dtype = resolve_dtype(cfg["dtype"], "config 'dtype'")
        inputs = cfg.get("inputs")
        inputs = chain_inputs(len(layers)) if inputs is None else check_inputs(layers, inputs, "config 'inputs'")
        try:
            _, in_shapes = graph_shapes(layers, in_shape, inputs)
        except ValueError as exc:
            raise ValueError(f"{where}: config 'layers' do not fit their input shapes: {exc}") from None
        expected = [layer.param_shapes(in_shapes[i]) for i, layer in enumerate(layers)]
        expected_buf = [layer.buffer_shapes(in_shapes[i]) if hasattr(layer, "buffer_shapes") else {}
                        for i, layer in enumerate(layers)]
        want = {f"{kind}/{i}/{k}" for i, s in enumerate(expected) for k in s for kind in ("param", "mask")}
        want |= {f"buffer/{i}/{k}" for i, s in enumerate(expected_buf) for k in s}
        if set(data) != want:
            raise ValueError(f"{where}: arrays {sorted(set(data) ^ want)} are missing or unexpected")
        for key, a in data.items():
            if key.startswith("mask/") and a.dtype != bool:
                raise ValueError(f"{where}: {key!r} must be a boolean mask, got dtype {a.dtype}")
        params = [{k: data[f"param/{i}/{k}"] for k in s} for i, s in enumerate(expected)]
        masks = [{k: data[f"mask/{i}/{k}"] for k in s} for i, s in enumerate(expected)]
        buffers = [{k: data[f"buffer/{i}/{k}"] for k in s} for i, s in enumerate(expected_buf)]
        net = cls(layers, in_shape=in_shape, dtype=dtype, params=params, masks=masks, buffers=buffers, inputs=inputs)
        init = cfg.get("init")
        if init is not None:
            if not isinstance(init, list) or len(init) != len(layers):
                raise ValueError(f"{where}: config 'init' must be null or a list of {len(layers)} entries, got {init!r:.80}")
            net.init = [None if d is None else Initializer.from_dict(d) for d in init]
        return net


def check_net(net, name: str = "net") -> Network:
    """``net`` itself if it is a :class:`Network`; otherwise ``TypeError`` naming ``name`` and the
    type given. The one check every algorithm module makes of its network argument."""
    if not isinstance(net, Network):
        raise TypeError(f"{name} must be a refnet Network, got {type(net).__name__}")
    return net


def load_network(path) -> Network:
    """Read a network saved with :meth:`Network.save`."""
    return Network.load(path)


def mlp(
    sizes: Sequence[int],
    activation="tanh",
    init="lecun",
    seed=None,
    bias: bool = True,
    output_activation="identity",
    dtype=np.float64,
    **init_kwargs,
) -> Network:
    """A multilayer perceptron ``sizes[0] -> ... -> sizes[-1]``.

    Every layer but the last uses ``activation``; the last is linear (logits) unless
    ``output_activation`` says otherwise, as in the papers' code (PAPER.md section 1).

    Example: ``mlp([784] + [100] * 6 + [10], activation="tanh", init="orthogonal", seed=0)`` is the
    papers' MLP-7 (K = 7 weight layers).
    """
    for arg, value in (("activation", activation), ("output_activation", output_activation)):
        try:  # checked even when no layer uses it (sizes without a hidden layer)
            get_activation(value)
        except (TypeError, ValueError) as exc:
            raise type(exc)(str(exc).replace("activation", arg, 1) if arg != "activation" else str(exc)) from None
    if isinstance(sizes, (str, bytes)) or not hasattr(sizes, "__iter__"):
        raise TypeError(f"sizes must be a list of positive ints such as [784, 100, 10], got {type(sizes).__name__} {sizes!r:.60}")
    sizes = list(sizes)
    if len(sizes) < 2:
        raise ValueError(f"sizes must list at least an input and an output size, got {sizes}")
    for i, s in enumerate(sizes):
        if isinstance(s, (bool, np.bool_)) or not isinstance(s, (int, np.integer)) or s <= 0:
            raise ValueError(f"sizes[{i}] must be a positive int, got {s!r}")
    layers = [
        Dense(sizes[i], sizes[i + 1], activation=activation if i < len(sizes) - 2 else output_activation, bias=bias)
        for i in range(len(sizes) - 1)
    ]
    return Network(layers, init=init, seed=seed, dtype=dtype, **init_kwargs)
