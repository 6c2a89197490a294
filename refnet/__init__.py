"""refnet: a float64 reference for pruning at initialization seen through signal propagation.

Exact gradients, Jacobians and pruning masks of MLPs and CNNs, from hand-derived backprop on
NumPy (no autodiff anywhere in the engine).

>>> import refnet as rn
>>> net = rn.mlp([784] + [100] * 6 + [10], activation="tanh", init="orthogonal", seed=0)
"""

from . import activations, arch, conv, data, init, isometry, jacobians, layers, lottery, losses, masks, neuron_pruning, progress, prop1, pruning, saliency, second_order, spectrum, theory, training
from .activations import Activation, get_activation
from .init import Initializer, get_initializer
from .layers import Add, AvgPool2d, BatchNorm1d, BatchNorm2d, Conv2d, Dense, Flatten, GlobalAvgPool2d, Layer, MaxPool2d, Residual, SubsamplePad
from .losses import cross_entropy, get_loss, mse
from .arch import build
from .isometry import approximate_isometry, isometry_residuals
from .neuron_pruning import l1_neuron_prune, orthp
from .jacobians import batch_jacobian, jacobian, jacobian_svd, layer_jacobians
from .spectrum import jsv_stats, singular_values
from .lottery import imp
from .network import Network, Trace, load_network, mlp
from .prop1 import mask_gradients, prop1_gradients, prop1_report
from .pruning import (
    LayerCollapseWarning,
    connection_sensitivity,
    magnitude_scores,
    prune,
    pruning_report,
    random_scores,
    snip,
    synflow_prune,
    synflow_scores,
)
from .saliency import grasp_scores, obd_scores, obs_prune
from .second_order import gn_diag, gnvp, hessian, hessian_diag, hvp
from .training import History, TrainingDiverged, train

__version__ = "0.1.0"

__all__ = [
    "Activation",
    "History",
    "arch",
    "build",
    "jacobian",
    "jacobian_svd",
    "jacobians",
    "jsv_stats",
    "layer_jacobians",
    "singular_values",
    "spectrum",
    "approximate_isometry",
    "imp",
    "isometry",
    "isometry_residuals",
    "l1_neuron_prune",
    "lottery",
    "orthp",
    "theory",
    "training",
    "LayerCollapseWarning",
    "connection_sensitivity",
    "magnitude_scores",
    "mask_gradients",
    "prop1",
    "prop1_gradients",
    "prop1_report",
    "prune",
    "pruning",
    "pruning_report",
    "random_scores",
    "snip",
    "synflow_prune",
    "synflow_scores",
    "train",
    "TrainingDiverged",
    "Add",
    "AvgPool2d",
    "BatchNorm1d",
    "BatchNorm2d",
    "Residual",
    "SubsamplePad",
    "batch_jacobian",
    "Conv2d",
    "Dense",
    "Flatten",
    "GlobalAvgPool2d",
    "Initializer",
    "Layer",
    "MaxPool2d",
    "Network",
    "Trace",
    "activations",
    "conv",
    "cross_entropy",
    "data",
    "get_activation",
    "get_initializer",
    "get_loss",
    "init",
    "layers",
    "masks",
    "saliency",
    "second_order",
    "hvp",
    "gnvp",
    "hessian",
    "hessian_diag",
    "gn_diag",
    "grasp_scores",
    "obd_scores",
    "obs_prune",
    "neuron_pruning",
    "progress",
    "load_network",
    "losses",
    "mlp",
    "mse",
]
