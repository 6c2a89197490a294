"""Input-output Jacobians and all their singular values (the JSV spectrum), float64, in one run:
refnet (``refnet.jacobian.jacobian`` + ``kernels.batched_svdvals``) vs PyTorch
(``torch.func.vmap(jacrev)`` + ``torch.linalg.svdvals``) vs JAX
(``jax.jit`` of ``vmap(jacrev)`` + ``jnp.linalg.svd(compute_uv=False)``, x64 enabled).

Cases:
* K = 7 tanh MLP of width 100, 100 inputs and 100 outputs, 100 examples: J is (100, 100, 100).
* The paper's MNIST MLP 784-100x6-10, 1,000 examples: J is (1000, 10, 784).

Each case is timed whole (Jacobians + singular values) and in its two parts; the three
frameworks' singular values are checked against each other (1e-10 of the largest) first.
"""

from __future__ import annotations

import numpy as np

import refnet as rn
from refnet import kernels
from refnet.jacobians import jacobian

from .common import suite_main
from .kernels import jax_or_none, pin_one_core, time_call, torch_or_none

CASES = {
    "K=7 width-100 tanh MLP 100->100, 100 examples": ([100] * 8, 100),
    "paper MLP 784-100x6-10, 1000 examples": ([784] + [100] * 6 + [10], 1000),
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
    ready = lambda fn: (lambda *a: fn(*a).block_until_ready())  # noqa: E731
    return ready(jac), ready(both), ready(svd)


def run(quick: bool = False) -> list[dict]:
    pin_one_core()  # one thread asked for: one core for everyone (see benchmarks/kernels.py)
    torch = torch_or_none()
    jax = jax_or_none()
    rows = []
    for case, (sizes, n_examples) in CASES.items():
        net = rn.mlp(sizes, activation="tanh", init="orthogonal", seed=0)
        X = np.random.default_rng(0).standard_normal((n_examples, sizes[0]))

        def refnet_both():
            return kernels.batched_svdvals(jacobian(net, X))

        J = jacobian(net, X)
        s_ref = refnet_both()
        impls = [("refnet", lambda: jacobian(net, X), refnet_both, lambda: kernels.batched_svdvals(J))]
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
        for name, fj, fb, fs in impls:
            impl = "refnet" if name == "refnet" else name
            extra = {"engine": kernels.resolve_engine("batched_svdvals", J)} if name == "refnet" else {}
            rows.append({"case": f"Jacobians + all singular values: {case}", "impl": impl, "seconds": time_call(fb, quick), **extra})
            rows.append({"case": f"Jacobians only: {case}", "impl": impl, "seconds": time_call(fj, quick)})
            rows.append({"case": f"singular values only: {case}", "impl": impl, "seconds": time_call(fs, quick), **extra})
    return rows


def main(argv=None) -> int:
    return suite_main("python -m benchmarks.jacobian", __doc__, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
