"""One Hessian-vector product of the mean cross-entropy, float64, in one run: refnet's hand-derived
R-operator (``refnet.second_order.hvp``) vs one refnet ``loss_and_grads`` (the cost unit) vs
PyTorch's double backward (``autograd.grad`` of ``<grad, v>``, ``create_graph=True``) vs JAX's
forward-over-reverse ``jit(jvp(grad))`` (x64 enabled); refnet's Gauss-Newton product ``gnvp``
is timed beside them.

Case: the papers' MLP 784-100x6-10, tanh, orthogonal init, batch 100, every parameter (weights
and biases), a random direction. The three frameworks' ``H v`` are checked against each other
(1e-10 of the largest entry) before timing. Every figure is a median of repeated runs; run with one
thread (``OMP_NUM_THREADS=OPENBLAS_NUM_THREADS=MKL_NUM_THREADS=NUMBA_NUM_THREADS=1``) for the
one-thread figures. The implementations are timed in turns (:func:`interleaved_medians`), so a
change in the machine's load reaches them alike. The printed ratios are refnet's HVP time over
each other time.
"""

from __future__ import annotations

import time

import numpy as np

import refnet as rn
from refnet import second_order as so

from .common import suite_main
from .kernels import jax_or_none, pin_one_core, torch_or_none

SIZES = [784] + [100] * 6 + [10]
BATCH = 100
CASE = "one HVP, paper MLP 784-100x6-10 tanh, batch 100"


def _setup(seed: int = 0):
    net = rn.mlp(SIZES, activation="tanh", init="orthogonal", seed=seed)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((BATCH, SIZES[0]))
    y = rng.integers(0, SIZES[-1], BATCH)
    v = [{k: rng.standard_normal(a.shape) for k, a in p.items()} for p in net.params]
    return net, x, y, v


def _flat(tree):
    return np.concatenate([np.asarray(a).reshape(-1) for d in tree for a in (d["W"], d["b"])])


def _torch_hvp(torch, net, x, y, v):
    Ws = [torch.from_numpy(p["W"]).requires_grad_() for p in net.params]
    bs = [torch.from_numpy(p["b"]).requires_grad_() for p in net.params]
    params = [t for pair in zip(Ws, bs) for t in pair]
    vs = [torch.from_numpy(d[k]) for d in v for k in ("W", "b")]
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    F = torch.nn.functional

    def hvp():
        h = tx
        for i, (W, b) in enumerate(zip(Ws, bs)):
            h = F.linear(h, W, b)
            if i < len(Ws) - 1:
                h = torch.tanh(h)
        g = torch.autograd.grad(F.cross_entropy(h, ty), params, create_graph=True)
        return torch.autograd.grad(g, params, grad_outputs=vs)

    return hvp


def _jax_hvp(jax, net, x, y, v):
    jnp = jax.numpy
    params = [(jnp.asarray(p["W"]), jnp.asarray(p["b"])) for p in net.params]
    vs = [(jnp.asarray(d["W"]), jnp.asarray(d["b"])) for d in v]
    jx, jy = jnp.asarray(x), jnp.asarray(y)

    def loss(ps):
        h = jx
        for i, (W, b) in enumerate(ps):
            h = h @ W.T + b
            if i < len(ps) - 1:
                h = jnp.tanh(h)
        logp = jax.nn.log_softmax(h)
        return -jnp.mean(logp[jnp.arange(h.shape[0]), jy])

    fn = jax.jit(lambda ps, ts: jax.jvp(jax.grad(loss), (ps,), (ts,))[1])

    def hvp():
        out = fn(params, vs)
        jax.block_until_ready(out)
        return out

    return hvp


def run(quick: bool = False) -> list[dict]:
    pin_one_core()
    torch = torch_or_none()
    jax = jax_or_none()
    net, x, y, v = _setup()
    ref = _flat(so.hvp(net, x, y, v))
    tol = 1e-10 * np.abs(ref).max()
    impls = [
        ("refnet", lambda: so.hvp(net, x, y, v)),
        ("refnet loss_and_grads (1 gradient)", lambda: net.loss_and_grads(x, y)),
        ("refnet gnvp (Gauss-Newton)", lambda: so.gnvp(net, x, y, v)),
    ]
    if torch is not None:
        thvp = _torch_hvp(torch, net, x, y, v)
        got = np.concatenate([t.detach().numpy().reshape(-1) for t in thvp()])
        np.testing.assert_allclose(got, ref, rtol=0, atol=tol)
        impls.append((f"torch {torch.__version__} double backward", thvp))
    if jax is not None:
        jhvp = _jax_hvp(jax, net, x, y, v)
        got = np.concatenate([np.asarray(a).reshape(-1) for pair in jhvp() for a in pair])
        np.testing.assert_allclose(got, ref, rtol=0, atol=tol)
        impls.append((f"jax {jax.__version__} jit(jvp(grad))", jhvp))
    seconds = interleaved_medians([fn for _, fn in impls], rounds=7 if quick else 25)
    return [{"case": CASE, "impl": name, "seconds": t} for (name, _), t in zip(impls, seconds)]


def interleaved_medians(fns, rounds: int, min_time: float = 0.02) -> list[float]:
    """Median seconds per call of each function, timed in turns: every round runs each function
    for at least ``min_time`` (a fixed number of calls, set once), so a drift in the machine's
    load (other processes on a shared machine) reaches every implementation alike."""
    inner = []
    for fn in fns:
        for _ in range(3):
            fn()  # warm-up (JAX compiles here)
        t0 = time.perf_counter()
        fn()
        inner.append(max(1, int(min_time / max(time.perf_counter() - t0, 1e-9))))
    samples = [[] for _ in fns]
    for _ in range(rounds):
        for j, fn in enumerate(fns):
            t0 = time.perf_counter()
            for _ in range(inner[j]):
                fn()
            samples[j].append((time.perf_counter() - t0) / inner[j])
    return [float(np.median(s)) for s in samples]


def ratios(rows) -> dict:
    """refnet's HVP time over each other implementation's time, by name."""
    t = {r["impl"]: r["seconds"] for r in rows if r["case"] == CASE}
    return {name: t["refnet"] / s for name, s in t.items() if name != "refnet"}


def main(argv=None) -> int:
    return suite_main("python -m benchmarks.second_order", __doc__, run, argv,
                      summary=lambda rows: {"ratios": ratios(rows)})  # refnet hvp time / other time


if __name__ == "__main__":
    raise SystemExit(main())
