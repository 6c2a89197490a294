"""Input-output Jacobians and all their singular values (the JSV spectrum), float64, in one run:
refnet (``refnet.jacobians.jacobian`` + ``kernels.batched_svdvals``) vs PyTorch
(``torch.func.vmap(jacrev)`` + ``torch.linalg.svdvals``) vs JAX
(``jax.jit`` of ``vmap(jacrev)`` + ``jnp.linalg.svd(compute_uv=False)``, x64 enabled).

Cases:
* K = 7 tanh MLP of width 100, 100 inputs and 100 outputs, 100 examples: J is (100, 100, 100).
* The paper's MNIST MLP 784-100x6-10, 1,000 examples: J is (1000, 10, 784).
* LeNet-5 (``build("lenet5", (1, 28, 28), 10, seed=0)``: conv 5x5 to 20, max-pool 2, conv 5x5
  to 50, max-pool 2, dense 800-500 relu, dense 500-10) on the first 1,000 28 x 28 test images of
  mnist5k: J is (1000, 10, 784). The peers run ``conv2d`` / ``max_pool2d`` / ``relu`` / ``linear``
  (PyTorch) and ``lax.conv_general_dilated`` / ``lax.reduce_window(max)`` / ``nn.relu`` (JAX) on
  one example inside ``vmap(jacrev)`` (``jacfwd`` runs out of memory here).

Each case is timed whole (Jacobians + singular values) and in its two parts; the three
frameworks' singular values are checked against each other (1e-10 of the largest) first.
The CNN case differs in two ways:

* Its checks. MNIST digits sit on a constant zero background, so many max-pool windows hold
  tied maxima, where the derivative depends on which maximum takes the gradient: refnet takes the
  first (as ``np.argmax``) and so does JAX (their Jacobians agree to 1e-15), PyTorch's
  ``max_pool2d`` picks another and its Jacobians differ by some 17% on these images. Both pick
  valid (sub)gradients. So JAX's Jacobians and singular values are checked against refnet's on
  the timed MNIST batch itself, PyTorch's Jacobians on a tie-free batch (a few dozen of the
  images plus 1e-3 Gaussian noise) to 1e-10 relative, and PyTorch's singular values of refnet's
  Jacobians on the timed batch.
* Its timer. One call takes seconds (JAX's Jacobians some 20 s on one core), so every callable
  runs once on the timed inputs before timing (the checks, which also compile JAX's ``jit``,
  or one untimed call) and is then timed without further warm-up or calibration calls:
  medians of at least 3 runs (1 with ``--quick``) within the usual budget,
  ``time_call(..., warmup=0)``.
"""

from __future__ import annotations

import numpy as np

import refnet as rn
from refnet import data, kernels
from refnet.arch import build
from refnet.jacobians import jacobian
from refnet.layers import Conv2d, Dense, Flatten, MaxPool2d

from .common import suite_main
from .kernels import jax_or_none, pin_one_core, time_call, torch_or_none

CASES = {
    "K=7 width-100 tanh MLP 100->100, 100 examples": ([100] * 8, 100),
    "paper MLP 784-100x6-10, 1000 examples": ([784] + [100] * 6 + [10], 1000),
}
# (architecture, dataset, examples, tie-free examples for PyTorch's check)
CNN_CASES = {
    "lenet5 on 28x28 mnist5k, 1000 examples": ("lenet5", "mnist5k", 1000, 32),
}


def _torch_fns(torch, params):
    Ws = [torch.from_numpy(p["W"]) for p in params]
    bs = [torch.from_numpy(p["b"]) for p in params]

    def f(x):  # one example (n_in,) -> (n_out,)
        for i, (W, b) in enumerate(zip(Ws, bs)):
            x = W @ x + b
            if i < len(Ws) - 1:
                x = torch.tanh(x)
        return x

    jac = torch.func.vmap(torch.func.jacrev(f))
    return jac, lambda X: torch.linalg.svdvals(jac(X)), torch.linalg.svdvals


def _ready(fn):
    """``fn`` waiting for JAX's asynchronous result, so that a timer measures the computation."""
    return lambda *a: fn(*a).block_until_ready()


def _jax_fns(jax, params):
    jnp = jax.numpy
    Ws = [jnp.asarray(p["W"]) for p in params]
    bs = [jnp.asarray(p["b"]) for p in params]

    def f(x):
        for i, (W, b) in enumerate(zip(Ws, bs)):
            x = W @ x + b
            if i < len(Ws) - 1:
                x = jnp.tanh(x)
        return x

    jac = jax.jit(jax.vmap(jax.jacrev(f)))
    svd = jax.jit(lambda J: jnp.linalg.svd(J, compute_uv=False))
    both = jax.jit(lambda X: jnp.linalg.svd(jax.vmap(jax.jacrev(f))(X), compute_uv=False))
    return _ready(jac), _ready(both), _ready(svd)


def _cnn_layers(net):
    """The CNN as (kind, params, settings) steps for the peers: conv, maxpool, flatten, dense
    and the activation after each (identity, relu or tanh)."""
    steps = []
    for layer, p in zip(net.layers, net.params):
        if isinstance(layer, Conv2d):
            assert layer.padding_mode == "zeros", layer
            steps.append(("conv", p, (tuple(layer.stride), tuple(layer.padding))))
        elif isinstance(layer, MaxPool2d):
            steps.append(("maxpool", p, layer.kernel_size))
        elif isinstance(layer, Flatten):
            steps.append(("flatten", p, None))
        elif isinstance(layer, Dense):
            steps.append(("dense", p, None))
        else:
            raise TypeError(f"no peer for {layer!r}")
        act = getattr(layer, "activation", None)
        if act is not None and act.name != "identity":
            assert act.name in ("relu", "tanh") and not act.params, act
            steps.append((act.name, None, None))
    return steps


def _torch_cnn_fns(torch, net):
    F = torch.nn.functional
    steps = [(k, {n: torch.from_numpy(a) for n, a in (p or {}).items()}, s) for k, p, s in _cnn_layers(net)]

    def f(x):  # one example (C, H, W) -> (n_out,)
        x = x[None]
        for kind, p, s in steps:
            if kind == "conv":
                x = F.conv2d(x, p["W"], p["b"], stride=s[0], padding=s[1])
            elif kind == "maxpool":
                x = F.max_pool2d(x, s)
            elif kind == "flatten":
                x = x.reshape(-1)
            elif kind == "dense":
                x = F.linear(x, p["W"], p["b"])
            else:
                x = F.relu(x) if kind == "relu" else torch.tanh(x)
        return x

    jac1 = torch.func.vmap(torch.func.jacrev(f))
    jac = lambda X: jac1(X).reshape(X.shape[0], -1, X[0].numel())  # noqa: E731
    return jac, lambda X: torch.linalg.svdvals(jac(X)), torch.linalg.svdvals


def _jax_cnn_fns(jax, net):
    jnp = jax.numpy
    steps = [(k, {n: jnp.asarray(a) for n, a in (p or {}).items()}, s) for k, p, s in _cnn_layers(net)]

    def f(x):
        x = x[None]
        for kind, p, s in steps:
            if kind == "conv":
                pad = [(q, q) for q in s[1]]
                x = jax.lax.conv_general_dilated(x, p["W"], s[0], pad, dimension_numbers=("NCHW", "OIHW", "NCHW"))
                x = x + p["b"][:, None, None]
            elif kind == "maxpool":
                x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 1, s, s), (1, 1, s, s), "VALID")
            elif kind == "flatten":
                x = x.reshape(-1)
            elif kind == "dense":
                x = p["W"] @ x + p["b"]
            else:
                x = jax.nn.relu(x) if kind == "relu" else jnp.tanh(x)
        return x

    def jac_fn(X):
        return jax.vmap(jax.jacrev(f))(X).reshape(X.shape[0], -1, X[0].size)

    jac = jax.jit(jac_fn)
    svd = jax.jit(lambda J: jnp.linalg.svd(J, compute_uv=False))
    both = jax.jit(lambda X: jnp.linalg.svd(jac_fn(X), compute_uv=False))
    return _ready(jac), _ready(both), _ready(svd)


def _refnet_impls(net, X):
    """refnet's Jacobians ``J`` of ``X``, their singular values and the case's first entry:
    ``("refnet", Jacobians, Jacobians + singular values, singular values of J)``."""

    def both():
        return kernels.batched_svdvals(jacobian(net, X))

    J = jacobian(net, X)
    return J, both(), [("refnet", lambda: jacobian(net, X), both, lambda: kernels.batched_svdvals(J))]


def _mlp_case(sizes, n_examples, torch, jax):
    net = rn.mlp(sizes, activation="tanh", init="orthogonal", seed=0)
    X = np.random.default_rng(0).standard_normal((n_examples, sizes[0]))
    J, s_ref, impls = _refnet_impls(net, X)
    if torch is not None:
        tjac, tboth, tsvd = _torch_fns(torch, net.params)
        tX, tJ = torch.from_numpy(X), torch.from_numpy(J)
        np.testing.assert_allclose(tboth(tX).numpy(), s_ref, rtol=0, atol=1e-10 * s_ref.max())
        impls.append((f"torch {torch.__version__} vmap(jacrev)+svdvals", lambda: tjac(tX), lambda: tboth(tX), lambda: tsvd(tJ)))
    if jax is not None:
        jjac, jboth, jsvd = _jax_fns(jax, net.params)
        jX, jJ = jax.device_put(X), jax.device_put(J)
        np.testing.assert_allclose(np.asarray(jboth(jX)), s_ref, rtol=0, atol=1e-10 * s_ref.max())
        impls.append((f"jax {jax.__version__} jit(vmap(jacrev))+svd", lambda: jjac(jX), lambda: jboth(jX), lambda: jsvd(jJ)))
    return J, impls


def _cnn_case(arch, dataset, n_examples, n_tie_free, torch, jax):
    """Setup and checks of a CNN case (see the module docstring: ties in max-pool windows);
    every callable returned has run once on the timed inputs."""
    X, _ = data.load(dataset, split="test", flatten=False)
    X = X[:n_examples]
    net = build(arch, X.shape[1:], 10, seed=0)
    J, s_ref, impls = _refnet_impls(net, X)
    tol = 1e-10 * s_ref.max()
    if torch is not None:
        tjac, tboth, tsvd = _torch_cnn_fns(torch, net)
        Xn = X[:n_tie_free] + 1e-3 * np.random.default_rng(1).standard_normal(X[:n_tie_free].shape)
        Jn = jacobian(net, Xn)
        np.testing.assert_allclose(tjac(torch.from_numpy(Xn)).numpy(), Jn, rtol=0, atol=1e-10 * np.abs(Jn).max())
        tX, tJ = torch.from_numpy(X), torch.from_numpy(J)
        np.testing.assert_allclose(tsvd(tJ).numpy(), s_ref, rtol=0, atol=tol)
        assert tboth(tX).shape == s_ref.shape  # the untimed run (of tjac too) on the timed batch; ties: not compared
        impls.append((f"torch {torch.__version__} vmap(jacrev)+svdvals", lambda: tjac(tX), lambda: tboth(tX), lambda: tsvd(tJ)))
    if jax is not None:
        jjac, jboth, jsvd = _jax_cnn_fns(jax, net)
        jX, jJ = jax.device_put(X), jax.device_put(J)
        np.testing.assert_allclose(np.asarray(jjac(jX)), J, rtol=0, atol=1e-10 * np.abs(J).max())
        np.testing.assert_allclose(np.asarray(jboth(jX)), s_ref, rtol=0, atol=tol)
        np.testing.assert_allclose(np.asarray(jsvd(jJ)), s_ref, rtol=0, atol=tol)
        impls.append((f"jax {jax.__version__} jit(vmap(jacrev))+svd", lambda: jjac(jX), lambda: jboth(jX), lambda: jsvd(jJ)))
    return J, impls


def run(quick: bool = False) -> list[dict]:
    pin_one_core()  # one thread asked for: one core for everyone (see benchmarks/kernels.py)
    torch = torch_or_none()
    jax = jax_or_none()
    rows = []
    setups = [(case, lambda a=args: _mlp_case(*a, torch, jax), {}) for case, args in CASES.items()]
    # the CNN callables take seconds and have all run once in the setup: no warm-up calls
    setups += [(case, lambda a=args: _cnn_case(*a, torch, jax), {"warmup": 0}) for case, args in CNN_CASES.items()]
    for case, setup, timer in setups:
        J, impls = setup()
        for name, fj, fb, fs in impls:
            impl = "refnet" if name == "refnet" else name
            extra = {"engine": kernels.resolve_engine("batched_svdvals", J)} if name == "refnet" else {}
            rows.append({"case": f"Jacobians + all singular values: {case}", "impl": impl, "seconds": time_call(fb, quick, **timer), **extra})
            rows.append({"case": f"Jacobians only: {case}", "impl": impl, "seconds": time_call(fj, quick, **timer)})
            rows.append({"case": f"singular values only: {case}", "impl": impl, "seconds": time_call(fs, quick, **timer), **extra})
    return rows


def main(argv=None) -> int:
    return suite_main("python -m benchmarks.jacobian", __doc__, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
