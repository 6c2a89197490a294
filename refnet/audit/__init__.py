r"""Audit what PyTorch, JAX/Flax (or any framework, through an ``.npz`` file) compute against refnet.

refnet is an independent float64 reference: hand-derived forward and backward passes on NumPy.
An audit runs the other framework's model twice and compares both runs with refnet, tensor by
tensor:

``float64``
    A float64 copy of the model (same weights, same inputs) against refnet in float64. Both are
    exact arithmetic up to float64 rounding, so everything must agree to ``rtol`` (default 1e-10,
    relative to the largest reference entry of the tensor). A failure here is a modelling
    difference or a bug, in the model, in the conversion, or in either library.
``as-run <dtype>``
    The model as the user runs it (its own dtype, usually float32) against the same float64
    reference. This measures the framework's own rounding error, judged against a tolerance
    appropriate to that dtype (:data:`AS_RUN_RTOL`: 1e-4 for float32; docs/audit.md derives it).

What is compared (each a row of the :class:`AuditReport`): the parameters (``param/{i}/W``), the
output of every refnet layer (``act/{i}``, torch only: locates the first layer that diverges),
the logits, the loss, every weight and bias gradient (``grad/{i}/W``), the input-output Jacobians
(``jacobian``, ``(B, n_out, n_in)``, NCHW order), SNIP's connection sensitivity ``|g * w|``
(``cs_scores/{i}/W``) and the global top-k masks it gives at ``sparsity`` (``mask/{i}/W``, with the
number of entries that differ), and the Jacobian singular values and their statistics
(``jsv/singular_values``, ``jsv/mean``, ``std``, ``min``, ``max``, ``cn``).

Error measures (per tensor): ``max_abs_err = max |got - ref|`` and
``max_rel_err = max_abs_err / max |ref|`` (relative to the largest reference entry, so entries
near zero do not blow up the measure); a tensor passes when ``max_rel_err <= tol``. Scalars use
``|ref|``. The JSV statistics get the tolerance that a Jacobian perturbation of spectral norm
``tol * sigma_max`` allows by Weyl's inequality (``|sigma_i(J + E) - sigma_i(J)| <= ||E||_2``), so
``jsv/min`` may move by ``tol * sigma_max`` (a relative tolerance ``tol * cn``) and ``jsv/cn`` by
the corresponding ratio. Masks pass when every differing entry is explained by the scores'
rounding: its reference score lies within ``2 E`` of the reference threshold (the k-th largest
score), ``E`` the largest score error (a tie broken the other way); otherwise they fail.

Pruned PyTorch modules (``torch.nn.utils.prune``) carry ``weight_orig`` (a parameter) and
``weight_mask`` (a buffer) and compute ``weight = weight_orig * weight_mask``. refnet stores the
same two arrays (``W``, ``mask``; the effective weight is ``mask * W``), and PyTorch's gradient
with respect to ``weight_orig`` is ``mask * dL/dW_eff`` -- exactly refnet's masked gradient, so the
two are compared directly (likewise ``bias_orig`` / ``bias_mask``). The connection sensitivity is
``|weight_orig.grad * weight_orig|``, zero on pruned entries as in :mod:`refnet.pruning`.

Importing a model is faithful or refused: :func:`from_torch` traces what the module's ``forward``
really computes with torch.fx and :func:`from_onnx` follows the ONNX graph, map every node, and
check on a probe batch, node by node, that the refnet network reproduces the model before anything
is audited; what they cannot reproduce (hooks, untraceable code, unsupported operations) is a
ValueError naming the module or node.

Entry points: :func:`from_torch`, :func:`compare_torch`, :func:`to_torch`; :func:`from_onnx`,
:func:`compare_onnx`; :func:`from_jax`, :func:`compare_jax`, :func:`jax_apply`; :func:`from_flax`,
:func:`compare_flax`; :func:`compare_npz`, :func:`write_npz`; the ``refnet audit`` command
(:mod:`refnet.cli.audit`). Conventions and file formats are in docs/audit.md.

One module per job: :mod:`~refnet.audit.report` (:class:`Check`, :class:`AuditReport`),
:mod:`~refnet.audit.reference` (the float64 reference, its comparison with a framework's run and
the tolerances), :mod:`~refnet.audit.graph` (graph nodes -> refnet layers and the probe
comparison, shared by the graph importers), :mod:`~refnet.audit.fx` (the PyTorch graph importer),
:mod:`~refnet.audit.torch`, :mod:`~refnet.audit.onnx`, :mod:`~refnet.audit.jax`,
:mod:`~refnet.audit.flax`, :mod:`~refnet.audit.npz`, and :mod:`~refnet.audit.names` (the one table
of activation names the converters share). torch, onnx, onnxruntime, jax and flax are imported only
by the functions that need them.
"""

from __future__ import annotations

from .flax import compare_flax, flax_flatten, flax_global_avg_pool, from_flax
from .jax import compare_jax, from_jax, jax_apply
from .npz import compare_npz, write_npz
from .onnx import compare_onnx, from_onnx
from .reference import AS_RUN_RTOL, DEFAULT_RTOL
from .report import AuditReport, Check
from .torch import (
    compare_torch,
    from_torch,
    load_torch_checkpoint,
    load_torch_state,
    save_torch_checkpoint,
    to_torch,
    torch_from_arch,
)

__all__ = [
    "AS_RUN_RTOL",
    "DEFAULT_RTOL",
    "AuditReport",
    "Check",
    "compare_flax",
    "compare_jax",
    "compare_npz",
    "compare_onnx",
    "compare_torch",
    "flax_flatten",
    "flax_global_avg_pool",
    "from_flax",
    "from_jax",
    "from_onnx",
    "from_torch",
    "jax_apply",
    "load_torch_checkpoint",
    "load_torch_state",
    "save_torch_checkpoint",
    "to_torch",
    "torch_from_arch",
    "write_npz",
]

# the ``refnet audit`` command moved to refnet.cli.audit: the old names warn and forward
_MOVED_TO_CLI = {"add_audit_arguments": "add_arguments", "run_audit": "run", "AUDIT_HELP": "EPILOG"}


def __getattr__(name: str):
    if name in _MOVED_TO_CLI:
        import warnings

        from ..cli import audit as cli_audit

        new = _MOVED_TO_CLI[name]
        warnings.warn(f"refnet.audit.{name} is deprecated; use refnet.cli.audit.{new}", DeprecationWarning, stacklevel=2)
        return getattr(cli_audit, new)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
