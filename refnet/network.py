r"""The Network: layer specs, parameters and masks, with hand-derived forward and backward.

A network of K layers maps ``x^0`` to ``x^K`` by ``x^l = layer_l(x^{l-1})``; for affine layers
``h^l = W^l x^{l-1} + b^l`` and ``x^l = phi(h^l)`` (PAPER.md section 1). Backprop runs the layers'
VJPs in reverse from ``eps = dL/dx^K``:

.. math:: g^{K} = \varepsilon, \qquad (g^{l-1}, \nabla_{W^l} L) = \mathrm{vjp}_l(g^l),

where each layer's VJP is derived by hand in :mod:`refnet.layers`; no autodiff anywhere.

``net.params`` and ``net.masks`` are lists (one entry per layer) of dicts with keys "W" and "b"
in PyTorch layouts. Masks are boolean and always present for every parameter; the effective
weight is ``mask * W``. A network is not changed by any failed call; methods that "change" it
(:meth:`with_masks`, :meth:`with_params`) return a new network.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ._io import atomic_savez
from ._checks import as_rng, check_array, check_float, resolve_dtype
from .init import Initializer, get_initializer
from .layers import Dense, Layer, layer_from_dict
from .losses import get_loss

__all__ = ["Network", "Trace", "check_net", "mlp", "load_network"]

FORMAT_VERSION = 1


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
    layers : sequence of Layer
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
        **init_kwargs,
    ):
        layers = tuple(layers)
        if not layers:
            raise ValueError("layers must hold at least one layer, got none")
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"layers[{i}] must be a refnet Layer, got {type(layer).__name__}")
        if in_shape is None:
            if isinstance(layers[0], Dense):
                in_shape = (layers[0].n_in,)
            else:
                raise ValueError(
                    f"in_shape must be given when the first layer is {type(layers[0]).__name__}, e.g. (1, 28, 28)"
                )
        if isinstance(in_shape, (int, np.integer)):
            in_shape = (int(in_shape),)
        in_shape = tuple(int(s) for s in in_shape)
        if any(s <= 0 for s in in_shape):
            raise ValueError(f"in_shape must hold positive sizes, got {in_shape}")
        self.layers = layers
        self.in_shape = in_shape
        self.dtype = resolve_dtype(dtype)
        shapes = [in_shape]
        for i, layer in enumerate(layers):
            try:
                shapes.append(tuple(layer.out_shape(shapes[-1])))
            except ValueError as exc:
                raise ValueError(f"layers[{i}] ({type(layer).__name__}): {exc}") from None
        self.shapes = shapes  # per-example shapes of x^0 .. x^K

        if params is None:
            inits = self._resolve_inits(init, init_kwargs)
            rng = as_rng(seed)
            params = [
                layer.init(rng, shapes[i], inits[i], self.dtype) if inits[i] is not None else {}
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
                if not layer.keys:
                    out.append(None)
                elif it is None:
                    raise ValueError(f"init[{i}] is None but layers[{i}] has parameters")
                else:
                    out.append(get_initializer(it))
            return out
        ini = get_initializer(init, **init_kwargs)
        return [ini if layer.keys else None for layer in self.layers]

    def param_shapes(self) -> list[dict]:
        """Per layer, ``{key: shape}`` of its parameters."""
        return [layer.param_shapes(self.shapes[i]) for i, layer in enumerate(self.layers)]

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
                a = check_array(p[k], f"{name}[{i}][{k!r}]", shape=shape)
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
        """``mask * param`` for every parameter: the weights the network actually uses."""
        return [{k: p[k] * m[k] for k in p} for p, m in zip(self.params, self.masks)]

    def __repr__(self) -> str:
        return f"Network({self.n_layers} layers, in_shape={self.in_shape}, n_params={self.n_params}, dtype={self.dtype})"

    def summary(self) -> str:
        """A table of layers, output shapes, parameter counts and kept fractions."""
        lines = [f"{'#':>3}  {'layer':<48} {'output':<16} {'params':>9} {'kept':>7}"]
        for i, layer in enumerate(self.layers):
            n = sum(a.size for a in self.params[i].values())
            kept = sum(int(m.sum()) for m in self.masks[i].values())
            frac = f"{kept / n:7.3f}" if n else "      -"
            desc = type(layer).__name__
            if hasattr(layer, "activation"):
                desc += f"[{layer.activation}]"
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
        x = self.check_input(x)
        h, caches = x, []
        for layer, p, m in zip(self.layers, self.params, self.masks):
            h, cache = layer.forward(p, h, m)
            caches.append(cache)
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
        for l in range(self.n_layers - 1, -1, -1):
            need = l > 0 or return_input_grad
            g, grads[l] = self.layers[l].vjp(self.params[l], trace.caches[l], g, self.masks[l], input_grad=need)
        return (grads, g) if return_input_grad else grads

    def jvp(self, trace: Trace, v, dparams=None):
        """Forward-mode product: the tangent of ``x^K`` for an input tangent ``v`` and optional
        parameter tangents ``dparams`` (a list of dicts, entries may be missing)."""
        g = check_array(v, "v", shape=trace.x.shape)
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
                W = p["W"] * m["W"]
                value += float(np.sum(W * W))
                grads.append({"W": 2.0 * weight_decay * W})
            else:
                grads.append({})
        return weight_decay * value, grads

    def loss_and_grads(self, x, y, loss="cross_entropy", weight_decay: float = 0.0):
        """Mean loss on a batch and its gradients with respect to every parameter.

        Parameters
        ----------
        x : ndarray, shape (B, *in_shape)
        y : ndarray, shape (B,) int labels or (B, C) targets
        loss : "cross_entropy", "mse" or a callable ``(z, y) -> (loss, eps)``
        weight_decay : float
            Adds ``weight_decay * sum_l ||mask * W^l||^2`` (biases excluded, PAPER.md section 8).

        Returns
        -------
        loss : float
        grads : list of dict, shaped like ``params``
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
        return float(value), grads

    def loss(self, x, y, loss="cross_entropy", weight_decay: float = 0.0) -> float:
        """The mean loss (plus the weight-decay term) on a batch."""
        wd = check_float(weight_decay, "weight_decay", min_value=0.0)
        value, _ = get_loss(loss)(self.forward(x), y)
        return float(value + (self.weight_decay_penalty(wd)[0] if wd else 0.0))

    def predict(self, x, batch_size: int = 1000) -> np.ndarray:
        """Arg-max class of each row, computed in batches."""
        x = self.check_input(x)
        return np.concatenate(
            [self.forward(x[i : i + batch_size]).argmax(axis=1) for i in range(0, len(x), batch_size)]
        ) if len(x) else np.zeros(0, dtype=np.intp)

    def evaluate(self, x, y, loss="cross_entropy", batch_size: int = 1000) -> tuple[float, float]:
        """Mean loss and accuracy over a data set, computed in batches of ``batch_size``."""
        x = self.check_input(x)
        y = np.asarray(y)
        if len(y) != len(x):
            raise ValueError(f"y must have one label per row of x ({len(x)}), got {len(y)}")
        if len(x) == 0:
            raise ValueError("x must hold at least one example")
        loss_fn = get_loss(loss)
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
    def _new(self, params, masks) -> "Network":
        net = object.__new__(Network)
        net.layers, net.in_shape, net.dtype, net.shapes = self.layers, self.in_shape, self.dtype, self.shapes
        net.init = self.init
        net.params, net.masks = params, masks
        return net

    def copy(self) -> "Network":
        """A deep copy (parameters and masks)."""
        return self._new(
            [{k: v.copy() for k, v in p.items()} for p in self.params],
            [{k: v.copy() for k, v in m.items()} for m in self.masks],
        )

    def with_masks(self, masks) -> "Network":
        """A new network with these masks (validated; missing entries mean 'keep all') and a copy
        of the parameters. The stored ``W`` is not changed: the effective weight is ``mask * W``."""
        masks = self._check_masks(masks)
        return self._new([{k: v.copy() for k, v in p.items()} for p in self.params], masks)

    def with_params(self, params) -> "Network":
        """A new network with these parameters (validated, copied) and a copy of the masks."""
        params = self._check_params(params, copy=True)
        return self._new(params, [{k: v.copy() for k, v in m.items()} for m in self.masks])

    def astype(self, dtype) -> "Network":
        """A copy in another float dtype (float64 or float32)."""
        dt = resolve_dtype(dtype)
        net = self.copy()
        net.dtype = dt
        net.params = [{k: v.astype(dt) for k, v in p.items()} for p in net.params]
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
        }

    def save(self, path) -> None:
        """Write the network to ``path`` (.npz): the layer specs as JSON, params and masks.

        The file is written to a temporary file in the same folder and moved into place with
        ``os.replace``, so a crash never leaves a half-written file.
        """
        arrays = {"config": np.array(json.dumps(self.to_config()))}
        for i, (p, m) in enumerate(zip(self.params, self.masks)):
            for k in p:
                arrays[f"param/{i}/{k}"] = p[k]
                arrays[f"mask/{i}/{k}"] = m[k]
        atomic_savez(path, arrays)

    @classmethod
    def load(cls, path) -> "Network":
        """Read a network written by :meth:`save`; every key, shape and dtype is validated."""
        try:
            with np.load(path, allow_pickle=False) as f:
                data = {k: f[k] for k in f.files}
        except (OSError, ValueError) as exc:
            raise ValueError(f"path {str(path)!r} is not a readable refnet .npz file: {exc}") from exc
        if "config" not in data:
            raise ValueError(f"path {str(path)!r} has no 'config' entry: not a refnet network file")
        try:
            cfg = json.loads(str(data.pop("config")))
        except json.JSONDecodeError as exc:
            raise ValueError(f"path {str(path)!r}: config is not valid JSON: {exc}") from exc
        if cfg.get("format") != "refnet.Network" or cfg.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"path {str(path)!r}: expected format refnet.Network version {FORMAT_VERSION}, "
                f"got {cfg.get('format')!r} version {cfg.get('version')!r}"
            )
        layers = [layer_from_dict(d) for d in cfg["layers"]]
        shell = cls.__new__(cls)
        shell.layers = tuple(layers)
        shell.in_shape = tuple(cfg["in_shape"])
        shell.dtype = resolve_dtype(cfg["dtype"])
        shell.shapes = [shell.in_shape]
        for layer in layers:
            shell.shapes.append(tuple(layer.out_shape(shell.shapes[-1])))
        expected = shell.param_shapes()
        want = {f"{kind}/{i}/{k}" for i, s in enumerate(expected) for k in s for kind in ("param", "mask")}
        if set(data) != want:
            raise ValueError(
                f"path {str(path)!r}: arrays {sorted(set(data) ^ want)} are missing or unexpected"
            )
        params = [{k: data[f"param/{i}/{k}"] for k in s} for i, s in enumerate(expected)]
        masks = [{k: data[f"mask/{i}/{k}"] for k in s} for i, s in enumerate(expected)]
        net = cls(layers, in_shape=shell.in_shape, dtype=shell.dtype, params=params, masks=masks)
        if cfg.get("init"):
            net.init = [None if d is None else Initializer.from_dict(d) for d in cfg["init"]]
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
