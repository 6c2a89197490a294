"""How refnet's activations are spelt in the frameworks the audit converts: one table.

Each row of :data:`ACTIVATIONS` maps a refnet activation name (:mod:`refnet.activations`) to the
``torch.nn`` module class, the JAX functions and the ``flax.linen`` function that compute it, and
to how its parameters are spelt there. The converters read only this table:
:func:`refnet.audit.torch.from_torch` and :func:`~refnet.audit.torch.to_torch` (torch),
:func:`refnet.audit.jax.jax_apply` (the first JAX function) and :func:`refnet.audit.flax.from_flax`
(every JAX function and the flax.linen one). No framework is imported here: the names are strings,
resolved (:func:`resolve`) by the converter that needs them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

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
    jax : tuple of str
        The JAX functions that compute it, as ``"module.attribute"`` paths. :func:`jax_apply`
        uses the first (except where refnet's derivative at a kink needs its own form);
        :func:`from_flax` recognises all of them.
    jax_params : tuple of (str, str, float)
        ``(refnet parameter, keyword of the JAX function, its default there)``.
    flax : str or None
        The ``flax.linen`` function of that name (an alias of the JAX one), recognised by
        :func:`from_flax`.
    """

    name: str
    torch: str | None = None
    torch_params: tuple = ()
    torch_fixed: tuple = ()
    torch_fixed_why: str = ""
    torch_not: tuple = ()
    jax: tuple = ()
    jax_params: tuple = ()
    flax: str | None = None


#: refnet activation name -> its names in PyTorch, JAX and Flax (the order is the order in which
#: torch modules are matched)
ACTIVATIONS: dict[str, ActivationNames] = {
    a.name: a
    for a in (
        ActivationNames("identity", jax=("jax.nn.identity",)),
        ActivationNames("tanh", torch="Tanh", jax=("jax.numpy.tanh", "jax.nn.tanh"), flax="tanh"),
        ActivationNames("relu", torch="ReLU", jax=("jax.nn.relu",), flax="relu"),
        ActivationNames("leaky_relu", torch="LeakyReLU", torch_params=(("slope", "negative_slope"),),
                        jax=("jax.nn.leaky_relu",), jax_params=(("slope", "negative_slope", 0.01),), flax="leaky_relu"),
        ActivationNames("selu", torch="SELU", jax=("jax.nn.selu",), flax="selu"),
        ActivationNames("elu", torch="ELU", torch_params=(("alpha", "alpha"),),
                        jax=("jax.nn.elu",), jax_params=(("alpha", "alpha", 1.0),), flax="elu"),
        ActivationNames("sigmoid", torch="Sigmoid", jax=("jax.nn.sigmoid",), flax="sigmoid"),
        ActivationNames("hard_tanh", torch="Hardtanh", torch_fixed=(("min_val", -1.0), ("max_val", 1.0)),
                        torch_fixed_why="refnet's hard_tanh", torch_not=("ReLU6",),
                        jax=("jax.nn.hard_tanh",), flax="hard_tanh"),
        ActivationNames("erf", jax=("jax.scipy.special.erf", "jax.lax.erf")),
        ActivationNames("softplus", torch="Softplus", torch_fixed=(("beta", 1.0),),
                        torch_fixed_why="refnet's softplus is log(1+e^h)", jax=("jax.nn.softplus",), flax="softplus"),
    )
}


def resolve(path: str):
    """The object a ``"package.module.attribute"`` path names (imports the module)."""
    module, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module), attr)
