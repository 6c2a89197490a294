"""Random networks for property tests: hypothesis strategies and plain builders."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

import refnet as rn

ACTIVATIONS = ["identity", "tanh", "relu", "leaky_relu", "selu", "elu", "sigmoid", "hard_tanh", "erf", "softplus"]
INITS = ["lecun", "glorot", "he", "orthogonal"]


def random_masks(net, rng, density):
    """Bernoulli(density) boolean masks for every parameter of ``net``."""
    return [{k: rng.random(s) < density for k, s in shapes.items()} for shapes in net.param_shapes()]


def perturb_biases(net, rng, scale=0.3):
    """Non-zero biases so bias gradients are exercised (inits set them to zero)."""
    params = [{k: (v + scale * rng.standard_normal(v.shape) if k == "b" else v) for k, v in p.items()} for p in net.params]
    return net.with_params(params)


@st.composite
def mlps(draw, max_depth=6, max_width=64, masked=None):
    """A random MLP (depth 1-6, widths 1-64, any activation, bias on/off, random masks)."""
    depth = draw(st.integers(1, max_depth))
    sizes = [draw(st.integers(1, max_width)) for _ in range(depth + 1)]
    act = draw(st.sampled_from(ACTIVATIONS))
    bias = draw(st.booleans())
    init = draw(st.sampled_from(INITS))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    net = rn.mlp(sizes, activation=act, init=init, seed=rng, bias=bias)
    if bias:
        net = perturb_biases(net, rng)
    if masked is None:
        masked = draw(st.booleans())
    if masked:
        net = net.with_masks(random_masks(net, rng, draw(st.sampled_from([0.3, 0.7, 0.95]))))
    return net, rng


@st.composite
def cnns(draw, masked=None):
    """A random small CNN: 1-2 conv layers (kernel 1-3, stride 1-2, padding 0-2, zeros/circular),
    an optional pooling layer, then Flatten or GlobalAvgPool2d and a Dense head."""
    c_in = draw(st.integers(1, 3))
    H = draw(st.integers(4, 7))
    W = draw(st.integers(4, 7))
    act = draw(st.sampled_from(ACTIVATIONS))
    bias = draw(st.booleans())
    layers, shape = [], (c_in, H, W)
    for _ in range(draw(st.integers(1, 2))):
        k = draw(st.integers(1, 3))
        s = draw(st.integers(1, 2))
        p = draw(st.integers(0, 2))
        mode = draw(st.sampled_from(["zeros", "circular"]))
        if shape[1] + 2 * p < k or shape[2] + 2 * p < k:
            continue
        if mode == "circular" and p > min(shape[1], shape[2]):
            mode = "zeros"  # PyTorch refuses a circular pad that wraps around more than once
        layer = rn.Conv2d(shape[0], draw(st.integers(1, 4)), k, stride=s, padding=p, padding_mode=mode,
                          activation=act, bias=bias)
        layers.append(layer)
        shape = layer.out_shape(shape)
    if not layers:
        layer = rn.Conv2d(c_in, 2, 1, activation=act, bias=bias)
        layers.append(layer)
        shape = layer.out_shape(shape)
    pool = draw(st.sampled_from([None, "avg", "max"]))
    if pool and min(shape[1:]) >= 2:
        layers.append(rn.AvgPool2d(2) if pool == "avg" else rn.MaxPool2d(2))
        shape = layers[-1].out_shape(shape)
    if draw(st.booleans()):
        layers.append(rn.GlobalAvgPool2d())
    else:
        layers.append(rn.Flatten())
    shape = layers[-1].out_shape(shape)
    layers.append(rn.Dense(shape[0], draw(st.integers(1, 5)), bias=bias))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    net = rn.Network(layers, in_shape=(c_in, H, W), init=draw(st.sampled_from(INITS)), seed=rng)
    if bias:
        net = perturb_biases(net, rng)
    if masked is None:
        masked = draw(st.booleans())
    if masked:
        net = net.with_masks(random_masks(net, rng, 0.6))
    return net, rng
