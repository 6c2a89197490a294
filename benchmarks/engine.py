"""The papers' 784-100x6-10 tanh MLP (batch 100, float64), refnet's hand-derived backprop beside
PyTorch CPU autograd in the same run:

* one forward+backward (loss and all gradients);
* SNIP at 90%: the connection sensitivities ``|dL/dW * W|`` and the global top-k mask
  (refnet ``pruning.snip``; PyTorch autograd, ``abs(grad * W)`` and ``torch.topk`` over the
  concatenated scores). The two masks are checked to be identical first."""

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
    rows += _snip_rows(net, x, y, model, xt, yt, torch, repeat)
    return rows


def _snip_rows(net, x, y, model, xt, yt, torch, repeat) -> list[dict]:
    from refnet import pruning

    sparsity = 0.9
    case = f"SNIP scores + global top-k mask at {sparsity:.0%}, 784-100x6-10 tanh, B=100, float64"
    weights = [m.weight for m in model if isinstance(m, torch.nn.Linear)]
    k = pruning.keep_count(sum(w.numel() for w in weights), sparsity)

    def torch_snip():
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        scores = torch.cat([(w.grad * w.detach()).abs().reshape(-1) for w in weights])
        keep = torch.zeros_like(scores, dtype=torch.bool)
        keep[torch.topk(scores, k, sorted=False).indices] = True
        return keep

    def refnet_snip():
        return pruning.snip(net, x, y, sparsity, warn=False)

    ours = np.concatenate([m["W"].reshape(-1) for m in refnet_snip()])
    if not np.array_equal(ours, torch_snip().numpy()):  # pragma: no cover - a real discrepancy
        raise AssertionError("refnet and PyTorch SNIP masks differ")
    return [
        {"case": case, "impl": "refnet", "seconds": median_time(refnet_snip, repeat)},
        {"case": case, "impl": f"torch {torch.__version__} autograd + topk", "seconds": median_time(torch_snip, repeat)},
    ]
