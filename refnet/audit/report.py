"""The audit report: one :class:`Check` per compared tensor, gathered by section in an
:class:`AuditReport` that prints as a summary and saves as ``report.md`` and ``report.json``.

Error measures (per tensor, :func:`tensor_check`): ``max_abs_err = max |got - ref|`` and
``max_rel_err = max_abs_err / max |ref|`` (relative to the largest reference entry, so entries
near zero do not blow up the measure); a tensor passes when ``max_rel_err <= tol``. Scalars
(:func:`scalar_check`) are held to an absolute tolerance and report it relative to ``|ref|``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import numpy as np

from .._io import atomic_write_text, json_float as _json_float, jsonable

__all__ = ["AuditReport", "Check", "format_value", "join_notes", "scalar_check", "tensor_check"]


@dataclass
class Check:
    """One comparison: a tensor (or scalar, or mask) of the other framework against refnet.

    Attributes
    ----------
    name : str
        ``param/{i}/W``, ``act/{i}``, ``logits``, ``loss``, ``grad/{i}/W``, ``grad/{i}/b``,
        ``jacobian``, ``cs_scores/{i}/W``, ``mask/{i}/W``, ``mask/total``, ``prune_mask/{i}/W``,
        ``jsv/singular_values``, ``jsv/mean``, ``jsv/std``, ``jsv/min``, ``jsv/max``, ``jsv/cn``.
        ``i`` is the refnet layer index (``net.layers[i]``).
    section : str
        ``"float64"``, ``"as-run float32"`` (the model's own dtype) or ``"npz"``.
    max_abs_err : float
        ``max |got - ref|`` (masks: the number of differing entries).
    max_rel_err : float
        ``max_abs_err / max |ref|`` (masks: the fraction of entries that differ).
    tol : float
        The relative tolerance ``max_rel_err`` is held to (masks: 0; see ``passed``).
    passed : bool
    shape : tuple
    ref_max : float
        ``max |ref|``, the scale of the relative error.
    source : str
        Where the tensor lives in the other framework (e.g. ``torch [2] Linear(...)``).
    note : str
    n_diff : int or None
        Masks only: how many entries differ.
    """

    name: str
    section: str
    max_abs_err: float
    max_rel_err: float
    tol: float
    passed: bool
    shape: tuple = ()
    ref_max: float = float("nan")
    source: str = ""
    note: str = ""
    n_diff: int | None = None

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "section": self.section,
            "max_abs_err": _json_float(self.max_abs_err),
            "max_rel_err": _json_float(self.max_rel_err),
            "tol": _json_float(self.tol),
            "passed": bool(self.passed),
            "shape": list(self.shape),
            "ref_max": _json_float(self.ref_max),
            "source": self.source,
            "note": self.note,
            "n_diff": self.n_diff,
        }


def format_value(v) -> str:
    """A number as the report prints it (``1.23e-05``, ``0``, ``nan``, ``inf``; None as ``-``)."""
    if v is None:
        return "-"
    v = float(v)
    if v != v:
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return "0" if v == 0 else f"{v:.2e}"


@dataclass
class AuditReport:
    """The result of an audit: one :class:`Check` per compared tensor, by section.

    ``passed`` is True when every check passed. :meth:`failures` lists the failed checks,
    :meth:`get` finds one by name, :meth:`first_divergence` names the first refnet layer whose
    output differs, :meth:`to_markdown` / :meth:`to_json` / :meth:`save` write it out.
    """

    framework: str
    checks: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    #: the exact float64 results that back the report (gradients, Jacobians, SNIP scores), where an
    #: audit computes them beside the comparison (compare_onnx); not part of to_dict
    reference: object = field(default=None, repr=False, compare=False)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def sections(self) -> list:
        out = []
        for c in self.checks:
            if c.section not in out:
                out.append(c.section)
        return out

    def failures(self, section: str | None = None) -> list:
        return [c for c in self.checks if not c.passed and (section is None or c.section == section)]

    def failed_names(self, section: str | None = None) -> list:
        return [c.name for c in self.failures(section)]

    def get(self, name: str, section: str | None = None) -> Check:
        """The check named ``name`` (of ``section``, default the first section that has it)."""
        for c in self.checks:
            if c.name == name and (section is None or c.section == section):
                return c
        have = sorted({c.name for c in self.checks if section is None or c.section == section})
        raise KeyError(f"no check named {name!r}" + (f" in section {section!r}" if section else "") + f"; have {have}")

    def first_divergence(self, section: str | None = None):
        """The first failing ``act/{i}`` (or, without layer outputs, ``param``/``logits``) check
        of ``section`` (default: the first section with a failure), or None."""
        sections = [section] if section else self.sections
        for s in sections:
            fails = self.failures(s)
            if not fails:
                continue
            for prefix in ("layer/", "param/", "prune_mask/", "act/"):
                hits = [c for c in fails if c.name.startswith(prefix)]
                if hits:
                    return hits[0]
            return fails[0]
        return None

    def to_dict(self) -> dict:
        fd = self.first_divergence()
        return {
            "format": "refnet.audit",
            "version": 1,
            "framework": self.framework,
            "passed": self.passed,
            "n_checks": len(self.checks),
            "n_failed": len(self.failures()),
            "failed": [f"{c.section}: {c.name}" for c in self.failures()],
            "first_divergence": None if fd is None else {"section": fd.section, "name": fd.name, "source": fd.source},
            "meta": _jsonable(self.meta),
            "notes": list(self.notes),
            "checks": [c.to_dict() for c in self.checks],
        }

    def to_json(self, path=None, indent: int = 2) -> str:
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=False)
        if path is not None:
            atomic_write_text(path, text + "\n")
        return text

    def to_markdown(self) -> str:
        lines = [f"# refnet audit: {self.framework}", ""]
        status = "PASSED" if self.passed else f"FAILED ({len(self.failures())} of {len(self.checks)} checks)"
        lines.append(f"**{status}**")
        lines.append("")
        fd = self.first_divergence()
        if fd is not None:
            lines.append(f"First divergence: `{fd.name}` in section {fd.section}" + (f" ({fd.source})" if fd.source else ""))
            lines.append("")
        if self.meta:
            lines += ["| setting | value |", "| --- | --- |"]
            for k, v in self.meta.items():
                lines.append(f"| {k} | {_md_cell(v)} |")
            lines.append("")
        for s in self.sections:
            cs = [c for c in self.checks if c.section == s]
            nf = sum(not c.passed for c in cs)
            lines.append(f"## {s}: " + ("all passed" if nf == 0 else f"{nf} failed"))
            lines.append("")
            lines.append("| tensor | shape | max abs err | max rel err | tol | passed | note |")
            lines.append("| --- | --- | --- | --- | --- | --- | --- |")
            for c in cs:
                shape = "x".join(str(d) for d in c.shape) if c.shape else "scalar"
                note = c.note
                if c.source:
                    note = (note + "; " if note else "") + c.source
                mark = "yes" if c.passed else "**NO**"
                lines.append(
                    f"| `{c.name}` | {shape} | {format_value(c.max_abs_err)} | {format_value(c.max_rel_err)} | {format_value(c.tol)} | {mark} | {_md_cell(note)} |"
                )
            lines.append("")
        if self.notes:
            lines.append("## Notes")
            lines.append("")
            for n in self.notes:
                lines.append(f"- {n}")
            lines.append("")
        return "\n".join(lines)

    def to_rows(self) -> list[dict]:
        """One tidy row per check: the framework, then the check's fields (:meth:`Check.to_dict`)."""
        return [{"framework": self.framework, **c.to_dict()} for c in self.checks]

    def to_dataframe(self):
        """The checks as a :class:`pandas.DataFrame`, one row each (pandas is an optional extra)."""
        from ..tables import to_dataframe

        return to_dataframe(self.to_rows())

    def save(self, folder) -> tuple[str, str]:
        """Write ``folder/report.md``, ``folder/report.json`` and the tidy ``folder/report.csv``
        (one row per check), each atomically; return the paths of the first two."""
        from ..tables import write_csv

        folder = os.fspath(folder)
        os.makedirs(folder, exist_ok=True)
        md, js = os.path.join(folder, "report.md"), os.path.join(folder, "report.json")
        atomic_write_text(md, self.to_markdown())
        self.to_json(js)
        write_csv(os.path.join(folder, "report.csv"), self.to_rows())
        return md, js

    def summary(self) -> str:
        """A few lines: overall result, then the largest relative error per section."""
        out = [f"refnet audit ({self.framework}): " + ("PASSED" if self.passed else "FAILED")]
        for s in self.sections:
            cs = [c for c in self.checks if c.section == s and c.n_diff is None]
            worst = max(cs, key=lambda c: (c.max_rel_err / c.tol) if c.tol > 0 else 0.0, default=None)
            nf = sum(not c.passed for c in self.checks if c.section == s)
            line = f"  {s}: {nf} failed of {sum(c.section == s for c in self.checks)}"
            if worst is not None:
                line += f"; closest to its tolerance: {worst.name} rel err {format_value(worst.max_rel_err)} (tol {format_value(worst.tol)})"
            out.append(line)
            for c in self.failures(s)[:8]:
                out.append(f"    FAILED {c.name}: rel err {format_value(c.max_rel_err)} > tol {format_value(c.tol)}" + (f" ({c.note})" if c.note else ""))
        return "\n".join(out)

    def __str__(self) -> str:
        return self.summary()


def _md_cell(v) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def _jsonable(obj):
    return jsonable(obj, other=str)


def tensor_check(name, section, got, ref, tol, source="", note="") -> Check:
    """``max |got - ref|`` and that over ``max |ref|``; non-finite entries must match exactly."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if got.shape != ref.shape:
        return Check(name, section, math.inf, math.inf, tol, False, tuple(ref.shape), math.nan, source,
                     join_notes(note, f"shape {tuple(got.shape)} differs from the reference {tuple(ref.shape)}"))
    if ref.size == 0:
        return Check(name, section, 0.0, 0.0, tol, True, tuple(ref.shape), 0.0, source, note)
    fin = np.isfinite(ref)
    bad_nonfinite = int(np.count_nonzero(~fin & ~((got == ref) | (np.isnan(got) & np.isnan(ref)))))
    bad_nonfinite += int(np.count_nonzero(fin & ~np.isfinite(got)))
    scale = float(np.max(np.abs(ref[fin]))) if fin.any() else 0.0
    both = fin & np.isfinite(got)
    abs_err = float(np.max(np.abs(got[both] - ref[both]))) if both.any() else 0.0
    if bad_nonfinite:
        return Check(name, section, math.inf, math.inf, tol, False, tuple(ref.shape), scale, source,
                     join_notes(note, f"{bad_nonfinite} non-finite entries differ"))
    rel = abs_err / scale if scale > 0 else (0.0 if abs_err == 0 else math.inf)
    return Check(name, section, abs_err, rel, tol, bool(rel <= tol), tuple(ref.shape), scale, source, note)


def scalar_check(name, section, got, ref, abs_tol, source="", note="") -> Check:
    """A scalar held to an absolute tolerance, reported as a relative one (``abs_tol / |ref|``)."""
    got, ref = float(got), float(ref)
    if math.isinf(ref) or math.isinf(got) or got != got or ref != ref:
        same = got == ref or (got != got and ref != ref)
        return Check(name, section, 0.0 if same else math.inf, 0.0 if same else math.inf, 0.0, same, (), abs(ref),
                     source, join_notes(note, "" if same else f"got {got!r}, reference {ref!r}"))
    err = abs(got - ref)
    scale = abs(ref)
    rel = err / scale if scale > 0 else (0.0 if err == 0 else math.inf)
    tol = abs_tol / scale if scale > 0 else (math.inf if abs_tol > 0 else 0.0)
    return Check(name, section, err, rel, tol, bool(err <= abs_tol), (), scale, source, note)


def join_notes(a: str, b: str) -> str:
    """Two notes joined by ``"; "`` (either may be empty)."""
    return a + ("; " if a and b else "") + b
