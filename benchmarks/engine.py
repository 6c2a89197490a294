"""One forward+backward of the papers' 784-100x6-10 tanh MLP (batch 100, float64):
refnet's hand-derived backprop beside PyTorch CPU autograd, in the same run."""

from __future__ import annotations

import numpy as np

import refnet as rn

from .common import median_time


def run(quick: bool = False) -> list[dict]:
    rng = np.random.default_rng(0)
    net = rn.mlp([784] + [100] * 6 + [10], activation="tanh", init="orthogonal", seed=0)
    x = rng.standard_normal((100, 784))
    y = rng.integers(0, 10, 100)
    repeat = 5 if quick else 30
    case = "forward+backward, 784-100x6-10 tanh, B=100, float64"
    rows = [{"case": case, "impl": "refnet", "seconds": median_time(lambda: net.loss_and_grads(x, y), repeat)}]
    try:
        import torch
    except ImportError:
        return rows
    layers = []
    for i, p in enumerate(net.params):
        lin = torch.nn.Linear(p["W"].shape[1], p["W"].shape[0], dtype=torch.float64)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(p["W"]))
            lin.bias.copy_(torch.from_numpy(p["b"]))
        layers.append(lin)
        if i < len(net.params) - 1:
            layers.append(torch.nn.Tanh())
    model = torch.nn.Sequential(*layers)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def step():
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(xt), yt).backward()

    rows.append({"case": case, "impl": f"torch {torch.__version__} autograd", "seconds": median_time(step, repeat),
                 "torch_threads": torch.get_num_threads()})
    return rows
