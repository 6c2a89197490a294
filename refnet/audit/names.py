"""How refnet's activations are spelt in the frameworks the audit converts: one table.

Each row of :data:`ACTIVATIONS` maps a refnet activation name (:mod:`refnet.activations`) to the
``torch.nn`` module class, the ``torch`` functions and tensor methods, the JAX functions, the
``flax.linen`` function and the ONNX operator that compute it, and to how its parameters are spelt
there. The converters read only this table: :func:`refnet.audit.fx.convert_module` (the graph
importer behind :func:`refnet.audit.from_torch`: modules, functions and methods) and
:func:`~refnet.audit.torch.to_torch` (torch), :func:`refnet.audit.jax.jax_apply` (the first JAX
function), :func:`refnet.audit.flax.from_flax` (every JAX function and the flax.linen one) and
:func:`refnet.audit.onnx.from_onnx` (the ONNX operator). No framework is imported here: the names
are strings, resolved (:func:`resolve`) by the converter that needs them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from ..activations import SELU_ALPHA, SELU_SCALE

__all__ = ["ACTIVATIONS", "ActivationNames", "resolve"]


@dataclass(frozen=True)
class ActivationNames:
    """One refnet activation in the other frameworks.

    Attributes
    ----------
    name : str
        The refnet name (``refnet.activations.get_activation(name)``).
    torch : str or None
        The ``torch.nn`` module class; None when PyTorch has none.
    torch_params : tuple of (str, str)
        ``(refnet parameter, torch attribute and constructor keyword)`` pairs, e.g. leaky_relu's
        ``("slope", "negative_slope")``.
    torch_fixed : tuple of (str, float)
        ``(torch attribute, value)``: the only setting refnet models (others are refused).
    torch_fixed_why : str
        What refnet computes instead, for the message that refuses another setting.
    torch_not : tuple of str
        Subclasses of ``torch`` that are not this activation (``nn.ReLU6`` is a ``nn.Hardtanh``).
    torch_functions : tuple of str
        The ``torch`` functions that compute it (``"torch.nn.functional.relu"``, ``"torch.relu"``,
        in-place forms included), as paths.
    torch_methods : tuple of str
        The ``torch.Tensor`` methods that compute it (``"relu"``, ``"relu_"``).
    torch_args : tuple of (str, object)
        ``(keyword, default)`` of the functional form's arguments after the input, in order
        (``F.leaky_relu(input, negative_slope=0.01, inplace=False)``); the keywords are those of
        ``torch_params`` and ``torch_fixed``, so one check serves the module and the function.
    jax : tuple of str
        The JAX functions that compute it, as ``"module.attribute"`` paths. :func:`jax_apply`
        uses the first (except where refnet's derivative at a kink needs its own form);
        :func:`from_flax` recognises all of them.
    jax_params : tuple of (str, str, float)
        ``(refnet parameter, keyword of the JAX function, its default there)``.
    flax : str or None
        The ``flax.linen`` function of that name (an alias of the JAX one), recognised by
        :func:`from_flax`.
    onnx : str or None
        The ONNX operator (``op_type``); ``Clip`` for hard_tanh, with ``min``/``max`` given as
        attributes (opset < 11) or inputs.
    onnx_params : tuple of (str, str, float)
        ``(refnet parameter, ONNX attribute, its default there)``.
    onnx_fixed : tuple of (str, float)
        ``(ONNX attribute or input, value)``: the only setting refnet models, compared after
        rounding both to float32 (ONNX attributes are float32).
    """

    name: str
    torch: str | None = None
    torch_params: tuple = ()
    torch_fixed: tuple = ()
    torch_fixed_why: str = ""
    torch_not: tuple = ()
    torch_functions: tuple = ()
    torch_methods: tuple = ()
    torch_args: tuple = ()
    jax: tuple = ()
    jax_params: tuple = ()
    flax: str | None = None
    onnx: str | None = None
    onnx_params: tuple = ()
    onnx_fixed: tuple = ()


#: refnet activation name -> its names in PyTorch, JAX and Flax (the order is the order in which
#: torch modules are matched)
ACTIVATIONS: dict[str, ActivationNames] = {
    a.name: a
    for a in (
        ActivationNames("identity", jax=("jax.nn.identity",)),
        ActivationNames("tanh", torch="Tanh", jax=("jax.numpy.tanh", "jax.nn.tanh"), flax="tanh",
                        torch_functions=("torch.tanh", "torch.nn.functional.tanh", "torch.tanh_"),
                        torch_methods=("tanh", "tanh_"), onnx="Tanh"),
        ActivationNames("relu", torch="ReLU", jax=("jax.nn.relu",), flax="relu",
                        torch_functions=("torch.nn.functional.relu", "torch.relu", "torch.relu_", "torch.nn.functional.relu_"),
                        torch_methods=("relu", "relu_"), torch_args=(("inplace", False),), onnx="Relu"),
        ActivationNames("leaky_relu", torch="LeakyReLU", torch_params=(("slope", "negative_slope"),),
                        jax=("jax.nn.leaky_relu",), jax_params=(("slope", "negative_slope", 0.01),), flax="leaky_relu",
                        torch_functions=("torch.nn.functional.leaky_relu", "torch.nn.functional.leaky_relu_"),
                        torch_args=(("negative_slope", 0.01), ("inplace", False)),
                        onnx="LeakyRelu", onnx_params=(("slope", "alpha", 0.01),)),
        ActivationNames("selu", torch="SELU", jax=("jax.nn.selu",), flax="selu",
                        torch_functions=("torch.nn.functional.selu", "torch.selu", "torch.selu_", "torch.nn.functional.selu_"),
                        torch_args=(("inplace", False),),
                        onnx="Selu", onnx_fixed=(("alpha", SELU_ALPHA), ("gamma", SELU_SCALE))),
        ActivationNames("elu", torch="ELU", torch_params=(("alpha", "alpha"),),
                        jax=("jax.nn.elu",), jax_params=(("alpha", "alpha", 1.0),), flax="elu",
                        torch_functions=("torch.nn.functional.elu", "torch.nn.functional.elu_"),
                        torch_args=(("alpha", 1.0), ("inplace", False)),
                        onnx="Elu", onnx_params=(("alpha", "alpha", 1.0),)),
        ActivationNames("sigmoid", torch="Sigmoid", jax=("jax.nn.sigmoid",), flax="sigmoid",
                        torch_functions=("torch.sigmoid", "torch.nn.functional.sigmoid", "torch.special.expit", "torch.sigmoid_"),
                        torch_methods=("sigmoid", "sigmoid_"), onnx="Sigmoid"),
        ActivationNames("hard_tanh", torch="Hardtanh", torch_fixed=(("min_val", -1.0), ("max_val", 1.0)),
                        torch_fixed_why="refnet's hard_tanh", torch_not=("ReLU6",),
                        jax=("jax.nn.hard_tanh",), flax="hard_tanh",
                        torch_functions=("torch.nn.functional.hardtanh", "torch.nn.functional.hardtanh_"),
                        torch_args=(("min_val", -1.0), ("max_val", 1.0), ("inplace", False)),
                        onnx="Clip", onnx_fixed=(("min", -1.0), ("max", 1.0))),
        ActivationNames("erf", jax=("jax.scipy.special.erf", "jax.lax.erf"),
                        torch_functions=("torch.erf", "torch.special.erf", "torch.erf_"), torch_methods=("erf", "erf_"),
                        onnx="Erf"),
        ActivationNames("softplus", torch="Softplus", torch_fixed=(("beta", 1.0), ("threshold", 20.0)),
                        torch_fixed_why="refnet's softplus is log(1+e^h); torch's threshold 20 is a known difference "
                        "of at most 2.1e-9", jax=("jax.nn.softplus",), flax="softplus",
                        torch_functions=("torch.nn.functional.softplus",),
                        torch_args=(("beta", 1.0), ("threshold", 20.0)), onnx="Softplus"),
    )
}

def resolve(path: str):
    """The object a ``"package.module.attribute"`` path names (imports the module)."""
    module, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module), attr)
