"""JAX: a refnet Network from JAX parameters in refnet/PyTorch layout (:func:`from_jax`), a
pure-JAX forward pass of a refnet spec (:func:`jax_apply`), and the audit of a model
``apply_fn(params, x)`` (:func:`compare_jax`), shared with Flax (:func:`compare_jax_model`).

The float64 audit sets ``jax_enable_x64`` and restores the caller's value afterwards. jax is
imported only inside the functions (``import refnet.audit`` does not import it).
"""

from __future__ import annotations

import functools
import time

import numpy as np

from ..layers import AvgPool2d, Conv2d, Dense, Flatten, GlobalAvgPool2d, MaxPool2d
from ..network import Network
from .names import ACTIVATIONS, resolve
from .reference import (
    DEFAULT_RTOL,
    Run,
    add_activation_checks,
    check_loss,
    check_rtol,
    check_sparsity,
    check_xy,
    compare_run,
    compute_reference,
    match_reference,
    new_report,
    parse_shape,
    section_tol,
    spec_layers,
)
from .report import AuditReport

__all__ = ["compare_jax", "from_jax", "jax_apply"]


def import_jax():
    """``(jax, jax.numpy)``, or an ImportError that says what to install."""
    try:
        import jax
        import jax.numpy as jnp
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the JAX audit needs jax: pip install 'refnet[jax]' (or pip install jax jaxlib)") from exc
    return jax, jnp


def _expand_params(layers, params, what="params") -> list:
    """A per-layer list of dicts; accepts one entry per layer or one per parameterised layer."""
    if isinstance(params, dict):
        raise TypeError(f"{what} must be a list of dicts {{'W', 'b'}} (refnet layout), got a dict; for Flax use compare_flax")
    params = list(params)
    n_all = len(layers)
    with_p = [i for i, l in enumerate(layers) if l.keys]
    if len(params) == n_all:
        out = [dict(p) if p else {} for p in params]
    elif len(params) == len(with_p):
        out = [{} for _ in layers]
        for i, p in zip(with_p, params):
            out[i] = dict(p)
    else:
        raise ValueError(f"{what} must have one dict per layer ({n_all}) or per layer with parameters ({len(with_p)}), got {len(params)}")
    for i, (l, p) in enumerate(zip(layers, out)):
        if set(p) != set(l.keys):
            raise ValueError(f"{what}[{i}] must have keys {sorted(l.keys)} for {type(l).__name__}, got {sorted(p)}")
    return out


def from_jax(params, layers_spec, in_shape=None, masks=None) -> Network:
    """A float64 refnet Network from JAX parameters in refnet/PyTorch layout.

    Parameters
    ----------
    params : list of dict
        One dict per layer of ``layers_spec`` (``{}`` for parameter-free layers), or one per
        layer with parameters, with ``"W"`` -- ``(n_out, n_in)`` for Dense, ``(c_out, c_in, kh, kw)``
        for Conv2d -- and ``"b"`` ``(n_out,)`` / ``(c_out,)``. JAX or NumPy arrays of any float dtype.
        (Flax's ``(in, out)`` / HWIO kernels: use :func:`from_flax`.)
    layers_spec : list of refnet Layers or layer dicts, a ``Network.to_config()``-style dict
        ``{"in_shape", "layers"}``, a Network, or an arch string (with ``in_shape``).
    in_shape : tuple, optional
        Per-example input shape; needed unless the spec has it or starts with Dense.
    masks : list of dict, optional
        Pruning masks (the effective weight is ``mask * W``).
    """
    layers, sh = spec_layers(layers_spec, list(params) if not isinstance(params, dict) else None, in_shape)
    in_shape = in_shape if in_shape is not None else sh
    if in_shape is None and not isinstance(layers[0], Dense):
        raise ValueError(f"in_shape is required when the first layer is {type(layers[0]).__name__}, e.g. (1, 28, 28)")
    p = _expand_params(layers, params)
    p64 = [{k: np.array(np.asarray(v), dtype=np.float64) for k, v in d.items()} for d in p]
    m = None if masks is None else _expand_masks(layers, masks)
    return Network(layers, in_shape=None if in_shape is None else parse_shape(in_shape, "in_shape"), params=p64, masks=m)


def _expand_masks(layers, masks):
    masks = list(masks)
    with_p = [i for i, l in enumerate(layers) if l.keys]
    if len(masks) == len(layers):
        return [dict(m) if m else {} for m in masks]
    if len(masks) == len(with_p):
        out = [{} for _ in layers]
        for i, m in zip(with_p, masks):
            out[i] = dict(m) if m else {}
        return out
    raise ValueError(f"masks must have one dict per layer ({len(layers)}) or per layer with parameters ({len(with_p)}), got {len(masks)}")


@functools.lru_cache(maxsize=1)
def _jax_acts() -> dict:
    """refnet activation name -> the JAX function :func:`jax_apply` uses: the first JAX function of
    its row of :data:`refnet.audit.names.ACTIVATIONS`, except identity (a plain function) and
    hard_tanh, whose derivative at the kinks must be refnet's."""
    jax, jnp = import_jax()

    def hard_tanh(h):  # derivative 0 at +-1 as refnet and PyTorch (jnp.clip would give 0.5)
        return jnp.where((h > -1.0) & (h < 1.0), h, jnp.sign(h))

    acts = {name: resolve(row.jax[0]) for name, row in ACTIVATIONS.items() if row.jax}
    acts.update({"identity": lambda h: h, "hard_tanh": hard_tanh})
    return acts


def jax_apply(spec, in_shape=None, masks=None):
    """A pure-JAX ``apply_fn(params, x)`` of a refnet layer spec, in refnet layouts (the params
    convention of :func:`compare_jax`; x is ``(B, *in_shape)``, NCHW for images).

    Conv2d uses ``lax.conv_general_dilated`` with ("NCHW", "OIHW", "NCHW") dimension numbers
    (circular padding by ``jnp.pad(mode="wrap")``); pooling reshapes (floor mode). ``masks``,
    when given, multiply the weights inside (so gradients are ``mask * dL/dW_eff``). It is a
    second implementation of refnet's forward pass for JAX users and for tests; the dtype of a
    call is the dtype of its params and x.
    """
    jax, jnp = import_jax()
    layers, _ = spec_layers(spec, None, in_shape)
    mk = None if masks is None else _expand_masks(layers, masks)
    acts = _jax_acts()

    def act_fn(a):
        kw = dict(a.params)
        if a.name == "leaky_relu":
            s = kw["slope"]
            return lambda h: jnp.where(h > 0, h, s * h)  # leaky_relu'(0) = slope, as refnet
        if a.name not in acts:
            raise ValueError(f"activation {a.name!r} has no JAX counterpart here")
        fn = acts[a.name]
        extra = {key: kw[name] for name, key, _ in ACTIVATIONS[a.name].jax_params}
        if extra:  # elu: jax.nn.elu(h, alpha=alpha), elu'(0) = alpha, as refnet
            return lambda h: fn(h, **extra)
        return fn

    fns = [act_fn(l.activation) if hasattr(l, "activation") else None for l in layers]

    def apply_fn(params, x):
        p = _expand_params(layers, params)
        h = x
        for i, layer in enumerate(layers):
            if isinstance(layer, (Dense, Conv2d)):
                W = p[i]["W"]
                if mk is not None and mk[i].get("W") is not None:
                    W = W * jnp.asarray(mk[i]["W"], dtype=W.dtype)
                b = p[i].get("b")
                if b is not None and mk is not None and mk[i].get("b") is not None:
                    b = b * jnp.asarray(mk[i]["b"], dtype=b.dtype)
                if isinstance(layer, Dense):
                    h = h @ W.T
                    if b is not None:
                        h = h + b
                else:
                    ph, pw = layer.padding
                    if layer.padding_mode == "circular" and (ph or pw):
                        h = jnp.pad(h, ((0, 0), (0, 0), (ph, ph), (pw, pw)), mode="wrap")
                        pad = ((0, 0), (0, 0))
                    else:
                        pad = ((ph, ph), (pw, pw))
                    h = jax.lax.conv_general_dilated(h, W, window_strides=layer.stride, padding=pad,
                                                     dimension_numbers=("NCHW", "OIHW", "NCHW"),
                                                     precision=jax.lax.Precision.HIGHEST)
                    if b is not None:
                        h = h + b[None, :, None, None]
                h = fns[i](h)
            elif isinstance(layer, (AvgPool2d, MaxPool2d)):
                k = layer.kernel_size
                B, C, H, Wd = h.shape
                Ho, Wo = H // k, Wd // k
                win = h[:, :, : Ho * k, : Wo * k].reshape(B, C, Ho, k, Wo, k)
                h = win.mean(axis=(3, 5)) if isinstance(layer, AvgPool2d) else win.max(axis=(3, 5))
            elif isinstance(layer, GlobalAvgPool2d):
                h = h.mean(axis=(2, 3))
            elif isinstance(layer, Flatten):
                h = h.reshape(h.shape[0], -1)
            else:
                raise ValueError(f"layer {i} ({type(layer).__name__}) has no JAX counterpart here")
        return h

    return apply_fn


def _jax_loss(jnp, jax, loss_name):
    def loss_fn(z, t):
        if loss_name == "cross_entropy":
            return -jnp.sum(t * jax.nn.log_softmax(z, axis=1)) / z.shape[0]
        return jnp.mean((z - t) ** 2)

    return loss_fn


def _targets(y, C):
    if y.ndim == 1:
        t = np.zeros((y.shape[0], C))
        t[np.arange(y.shape[0]), y] = 1.0
        return t
    return np.asarray(y, dtype=np.float64)


def _tree_dtype(tree):
    jax, _ = import_jax()
    for leaf in jax.tree_util.tree_leaves(tree):
        dt = np.dtype(getattr(leaf, "dtype", np.float64))
        if dt.kind == "f" or dt.name == "bfloat16":
            return dt
    return np.dtype(np.float32)


def _jax_run(apply_fn, params, x_fw, y, C, loss_name, dtype, want_jac, jit, extract, jac_to_ref, grad_params=None) -> Run:
    """Run ``apply_fn(params, x)`` in ``dtype`` under the current JAX config and collect results.

    ``extract(tree) -> list of dict`` maps a params-shaped tree (params, grads, scores) to refnet
    layouts; ``jac_to_ref(J)`` maps a Jacobian ``(B, n_out, *x_fw.shape[1:])`` to ``(B, n_out, n_in)``
    in refnet's input order.
    """
    jax, jnp = import_jax()
    cast = lambda a: jnp.asarray(np.asarray(a, dtype=np.float64), dtype=dtype)  # noqa: E731
    p = jax.tree_util.tree_map(cast, params)
    xj = jnp.asarray(np.asarray(x_fw, dtype=np.float64), dtype=dtype)
    tj = jnp.asarray(_targets(y, C), dtype=dtype)
    loss_fn = _jax_loss(jnp, jax, loss_name)
    split = grad_params or (lambda tree: (tree, lambda q: q))
    trainable, rebuild = split(p)

    def objective(q):
        z = apply_fn(rebuild(q), xj)
        return loss_fn(z, tj), z

    vg = jax.value_and_grad(objective, has_aux=True)
    if jit:
        vg = jax.jit(vg)
    (L, z), g = vg(trainable)
    if z.ndim != 2:
        raise ValueError(f"apply_fn must return (B, C) logits, got shape {z.shape}")
    sc = jax.tree_util.tree_map(lambda gi, wi: jnp.abs(gi * wi), g, trainable)
    np64 = lambda a: np.asarray(jnp.asarray(a, dtype=jnp.float32) if a.dtype == jnp.bfloat16 else a).astype(np.float64)  # noqa: E731
    to_np = lambda tree: jax.tree_util.tree_map(np64, tree)  # noqa: E731
    run = Run(str(np.dtype(dtype)), logits=np64(z), loss=float(np64(L)), grads=extract(to_np(g)),
              params=extract(to_np(trainable)), scores=[{"W": d["W"]} if "W" in d else {} for d in extract(to_np(sc))])
    if want_jac:
        full = rebuild(trainable)

        def f(xi):
            return apply_fn(full, xi[None])[0]

        jf = jax.vmap(jax.jacrev(f))
        if jit:
            jf = jax.jit(jf)
        J = jf(xj)  # (B, n_out, *x shape)
        J = J.reshape(J.shape[0], J.shape[1], -1)
        Jsv = J if J.dtype in (jnp.float32, jnp.float64) else J.astype(jnp.float32)
        run.sv = np64(jnp.linalg.svd(Jsv, compute_uv=False))
        run.jac = jac_to_ref(np64(J))
    return run


class _X64:
    """Context: ``jax.config.update("jax_enable_x64", True)``, restored on exit."""

    def __enter__(self):
        jax, _ = import_jax()
        self.prev = bool(jax.config.read("jax_enable_x64")) if hasattr(jax.config, "read") else bool(jax.config.jax_enable_x64)
        jax.config.update("jax_enable_x64", True)
        return self

    def __exit__(self, *exc):
        jax, _ = import_jax()
        jax.config.update("jax_enable_x64", self.prev)
        return False


def compare_jax_model(framework, net, apply_fn, params, x_fw, x_ref, y, loss_name, *, sparsity, rtol, rtol_as_run,
                      dtype_as_run, jacobian, jit, extract, jac_to_ref, grad_params, sources, reference_label,
                      act_diffs=()) -> AuditReport:
    """The audit of a JAX model (:func:`compare_jax`, :func:`refnet.audit.flax.compare_flax`): the
    as-run section under the caller's JAX config, then the float64 one with ``jax_enable_x64``.

    ``extract(tree)`` maps a params-shaped tree to refnet layouts, ``jac_to_ref(J)`` a Jacobian to
    ``(B, n_out, n_in)`` in refnet's input order, ``grad_params(tree) -> (trainable, rebuild)``
    picks what is differentiated (default the whole tree).
    """
    jax, _ = import_jax()
    x_ref, y = check_xy(net, x_ref, y, loss_name)
    if np.asarray(x_fw).shape[0] != x_ref.shape[0]:
        raise ValueError("x has a different number of rows after the layout change")  # pragma: no cover
    t0 = time.perf_counter()
    ref = compute_reference(net, x_ref, y, loss_name, sparsity, jacobian)
    C = net.out_shape[0]
    own = _tree_dtype(params)
    meta = {"params_dtype": own.name, "jax_version": jax.__version__, "sparsity": sparsity, "rtol_float64": rtol,
            "reference": reference_label, "jax_enable_x64 (as the caller had it)": _x64_state()}
    report = new_report(framework, ref, meta)
    report.notes.append(
        "JAX: the as-run audit runs first, under the caller's JAX config; the float64 audit then sets "
        "jax.config.update('jax_enable_x64', True) and restores the previous value when done."
    )
    add_activation_checks(report, act_diffs, sources)
    runs = []
    if dtype_as_run is not False:
        dt = own if dtype_as_run is None else np.dtype(dtype_as_run)
        if dt != np.float64:
            if dt == np.float64 or (not _x64_state() and dt.itemsize > 4):
                raise ValueError(f"dtype_as_run {dt} needs jax_enable_x64")
            run = _jax_run(apply_fn, params, x_fw, y, C, loss_name, dt, jacobian, jit, extract, jac_to_ref, grad_params)
            runs.append((f"as-run {dt.name}", section_tol(dt.name, rtol, rtol_as_run), run))
        else:
            report.notes.append("the params are float64, so the as-run audit is the float64 audit")
    with _X64():
        run64 = _jax_run(apply_fn, params, x_fw, y, C, loss_name, np.dtype(np.float64), jacobian, jit, extract, jac_to_ref, grad_params)
    compare_run(ref, run64, "float64", rtol, sparsity, sources, report)
    for section, tol, run in runs:
        report.meta["rtol_as_run"] = tol
        report.meta["as_run_dtype"] = run.dtype
        compare_run(ref, run, section, tol, sparsity, sources, report)
    report.meta["seconds"] = round(time.perf_counter() - t0, 3)
    return report


def _x64_state() -> bool:
    jax, _ = import_jax()
    try:
        return bool(jax.config.read("jax_enable_x64"))
    except AttributeError:  # pragma: no cover - older JAX
        return bool(jax.config.jax_enable_x64)


def compare_jax(
    apply_fn,
    params,
    spec,
    x,
    y,
    loss="cross_entropy",
    *,
    masks=None,
    in_shape=None,
    sparsity=0.9,
    rtol=DEFAULT_RTOL,
    rtol_as_run=None,
    dtype_as_run=None,
    reference: Network | None = None,
    jacobian: bool = True,
    jit: bool = True,
) -> AuditReport:
    """Audit a JAX model ``apply_fn(params, x) -> logits`` against refnet.

    Params convention (docs/audit.md): ``params`` is a list of dicts, one per layer of ``spec``
    (``{}`` for parameter-free layers) or one per layer with parameters, holding ``"W"`` in
    refnet/PyTorch layout -- Dense ``(n_out, n_in)`` used as ``x @ W.T + b``, Conv2d
    ``(c_out, c_in, kh, kw)`` on NCHW inputs -- and ``"b"``. ``spec`` describes the same network
    in refnet terms (see :func:`from_jax`). Gradients are ``jax.grad`` of the mean loss with
    respect to ``params``; Jacobians are ``jax.vmap(jax.jacrev(f))`` over the examples.

    The as-run audit runs ``apply_fn`` with the params' own dtype (float32 by default in JAX)
    under the caller's JAX config; the float64 audit sets ``jax_enable_x64`` (restored after).
    ``masks`` are pruning masks of the reference; ``apply_fn`` must apply them itself (then
    ``jax.grad`` gives ``mask * dL/dW_eff``, refnet's masked gradient). Other arguments as
    :func:`compare_torch`; ``jit`` compiles the gradient and Jacobian functions.
    """
    import_jax()
    loss_name = check_loss(loss)
    sparsity = check_sparsity(sparsity)
    rtol = check_rtol(rtol)
    if rtol_as_run is not None:
        rtol_as_run = check_rtol(rtol_as_run, "rtol_as_run")
    if not callable(apply_fn):
        raise TypeError(f"apply_fn must be callable as apply_fn(params, x), got {type(apply_fn).__name__}")
    x_arr = np.asarray(x)
    if in_shape is None:
        in_shape = x_arr.shape[1:]
    net = from_jax(params, spec, in_shape=in_shape, masks=masks)
    layers = list(net.layers)
    label = "from_jax(params, spec)"
    act_diffs = []
    if reference is not None:
        act_diffs = match_reference(reference, net, "spec")
        net, label = (reference.astype(np.float64) if reference.dtype != np.float64 else reference), "given Network"
    n_given = len(list(params))

    def extract(tree):
        return [{k: v for k, v in d.items()} for d in _expand_params(layers, tree)]

    sources = [f"params[{j}]" for j in range(len(layers))] if n_given == len(layers) else None
    if sources is None:
        with_p = [i for i, l in enumerate(layers) if l.keys]
        sources = [""] * len(layers)
        for j, i in enumerate(with_p):
            sources[i] = f"params[{j}]"
    return compare_jax_model("jax", net, apply_fn, list(params), x_arr, x_arr, y, loss_name, sparsity=sparsity,
                             rtol=rtol, rtol_as_run=rtol_as_run, dtype_as_run=dtype_as_run, jacobian=jacobian,
                             jit=jit, extract=extract, jac_to_ref=lambda J: J, grad_params=None, sources=sources,
                             reference_label=label, act_diffs=act_diffs)
