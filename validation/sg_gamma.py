r"""SPP table "interpreting failure cases": SG(gamma) init, JSV, CS layer sparsity and error.

PAPER.md section 9, first table. A tanh MLP 784-100x6-10 (K = 7 weight layers) is initialised
with SG(gamma), ``W_ij ~ N(0, gamma)`` (gamma is the variance), for gamma = 1e-4 ... 1e1; it is
pruned to 90% sparsity by connection sensitivity and trained (PAPER.md section 8). For every gamma
the script measures

* the Jacobian singular values (JSV) of the input-output Jacobian ``dx^K/dx^0`` per example,
  pooled (PAPER.md section 6): mean, std and CN = max / min of the pooled values, of the network
  at initialisation BEFORE pruning (what the paper's table reports, see below) and, for reference,
  of the pruned network;
* the per-layer sparsity of the connection-sensitivity mask;
* the best test error over 10 checkpoints of training.

Which network the paper's JSV columns describe. The SPP code (``spp/main.py``, ``check.py``)
measures the JSV three times: "after-init", "after-prune" and "after-isometry". The published
JSV mean and std agree with refnet's "after-init" (dense) values to within ~6% for all six
gammas, while the pruned network's JSV mean is 5-25x smaller for gamma <= 1e-1 and exactly 0 for
gamma >= 1 (whole layers are pruned, the Jacobian is the zero matrix) where the paper prints
1.03e3 and 3.67e4. So the JSV checks compare the dense network at initialisation; the pruned
network's values are reported beside them.

Settings, following the SPP code (namhoonlee/spp-public):

* Connection sensitivity: ``dL/dc`` summed over the WHOLE training split in batches of 100
  (``prune.py``), then ``|.|``, global top-k with the biases ranked too (``model.py`` masks
  ``w`` and ``b``; zero biases score 0, so all biases are pruned and stay 0 in training).
  The same in every mode: it costs well under a second.
* JSV: on the first rows of the training split (``check.py`` uses the training split); all of
  them in full mode (4,000 for mnist5k), 1,000 in quick mode. The mean and std do not depend on
  that number; the pooled CN (an extreme-value statistic) grows with it.
* Training: SGD lr 0.1, batch 100, mean cross-entropy + 0.00025 sum ||c*W||^2, 10,000 steps,
  test error at 10 checkpoints, best reported (full mode); quick mode trains 1,000 steps, so its
  errors are NOT comparable with the paper's and are not judged for gamma <= 1e-1.
* Data: mnist5k has 4,000 training images (the paper: 54,000 of MNIST's 60,000, 10% held out);
  an error comparison within 1 percentage point is only meaningful with ``--data mnist``
  (``--data-dir`` with the IDX files; the first 54,000 training rows are used). On mnist5k the
  criterion is a loose "below 10%".

Run: ``refnet reproduce sg_gamma [--quick]`` or ``python -m refnet.validation.sg_gamma``.
"""

from __future__ import annotations

import math
import time
import warnings

import numpy as np

import refnet
from refnet import pruning, spectrum

from .common import Run, atomic_savefig, fmt, load_train_test, new_figure_row, parse_args, train_record

NAME = "sg_gamma"
TITLE = "SPP table: SG(gamma) initialisation, Jacobian singular values, CS layer sparsity and error (tanh MLP-7, 90% sparse)"

GAMMAS = (1e-4, 1e-3, 1e-2, 1e-1, 1e0, 1e1)
SPARSITY = 0.9
LR, BATCH, WEIGHT_DECAY = 0.1, 100, 0.00025

#: PAPER.md section 9: gamma -> JSV mean, std, CN, layer sparsity 1..7, error %
PAPER = {
    1e-4: dict(mean=2.46e-07, std=9.90e-08, cn=4.66e00, sparsity=[.97, .80, .80, .80, .80, .81, .48], error=2.66),
    1e-3: dict(mean=5.74e-04, std=2.45e-04, cn=8.54e00, sparsity=[.97, .80, .80, .80, .80, .81, .48], error=2.67),
    1e-2: dict(mean=4.49e-01, std=2.51e-01, cn=5.14e01, sparsity=[.96, .80, .80, .80, .81, .81, .49], error=2.67),
    1e-1: dict(mean=2.30e01, std=2.56e01, cn=2.92e04, sparsity=[.96, .81, .82, .82, .82, .80, .45], error=2.61),
    1e0: dict(mean=1.03e03, std=2.61e03, cn=3.34e11, sparsity=[.85, .88, .99, 1.0, 1.0, 1.0, .91], error=90.2),
    1e1: dict(mean=3.67e04, std=2.64e05, cn=math.inf, sparsity=[.84, .95, 1.0, 1.0, 1.0, 1.0, 1.0], error=90.2),
}

#: per mode: hidden width, training rows (None: all; 54,000 for MNIST), JSV rows (None: all
#: training rows), training steps, steps between checkpoints, test rows (None: all)
MODES = {
    "full": dict(hidden=100, n_train=None, n_jsv=None, steps=10_000, eval_every=1_000, n_test=None),
    "quick": dict(hidden=100, n_train=None, n_jsv=1_000, steps=1_000, eval_every=100, n_test=None),
    "tiny": dict(hidden=16, n_train=300, n_jsv=20, steps=20, eval_every=10, n_test=100),
}

JSV_FACTOR = 3.0  # JSV mean / std / CN agreement: within this factor of the paper's
SPARSITY_TOL = 0.05  # per-layer sparsity agreement for gamma <= 1e-1
CN_FAILURE = 1e11  # the paper's reading: CS fails once CN exceeds this
COLLAPSE = 0.95  # gamma >= 1: layers 3..6 pruned at least this much
CHANCE_ERROR = 80.0  # gamma >= 1: error at least this (chance is 90%)
MNIST5K_ERROR = 10.0  # gamma <= 1e-1, full mode on mnist5k: error below this
MNIST_ERROR_PP = 1.0  # gamma <= 1e-1, full mode on MNIST: within this many points of the paper

#: histogram bins for the JSV figure: log10 edges, 10 per decade (values outside are counted)
HIST_EDGES = 10.0 ** np.round(np.arange(-14.0, 9.0 + 1e-9, 0.1), 1)


# ============================================================================================
# units of work
# ============================================================================================


def _gkey(g: float) -> str:
    return f"gamma={g:g}"


def _setup(args):
    """Training/test data and the settings of this mode."""
    cfg = dict(MODES[args.mode])
    X, y, Xt, yt = load_train_test(args, cfg["n_train"], cfg["n_test"])  # full MNIST: 54,000 as the paper
    cfg["n_jsv"] = X.shape[0] if cfg["n_jsv"] is None else min(cfg["n_jsv"], X.shape[0])
    n_classes = int(max(y.max(), yt.max())) + 1
    cfg["sizes"] = [X.shape[1]] + [cfg["hidden"]] * 6 + [n_classes]
    return cfg, (X, y, Xt, yt)


def _build(cfg, gamma: float, seed: int):
    return refnet.mlp(cfg["sizes"], activation="tanh", init="sg", gamma=gamma, seed=seed)


def _cs_masks(net, X, y):
    """SPP code: dL/dc summed over the training split in batches of 100, biases ranked too.
    Returns the masks and the layer-collapse warnings (as text)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", pruning.LayerCollapseWarning)
        masks = pruning.snip(net, X, y, sparsity=SPARSITY, batch_size=BATCH, include_bias=True)
    notes = [str(w.message) for w in caught if issubclass(w.category, pruning.LayerCollapseWarning)]
    return masks, notes


def _jsv(net, Xj) -> dict:
    """Pooled JSV statistics, the raw (LAPACK) CN, and a log-binned histogram for the figure."""
    sv_raw = spectrum.singular_values(net, Xj, zero_rtol=0.0)  # (n, n_out), LAPACK's values, descending
    # refnet's default rule (spectrum.singular_values): sigma <= max(n_out, n_in) * eps * sigma_max
    # of its own Jacobian is reported as exactly 0; applied here to avoid a second pass
    rtol = max(net.out_shape[0], int(np.prod(net.in_shape))) * float(np.finfo(np.float64).eps)
    sv = np.where(sv_raw <= rtol * sv_raw[:, :1], 0.0, sv_raw)  # (n, n_out)
    st = spectrum.summarize(sv)
    raw_min, raw_max = float(sv_raw.min()), float(sv_raw.max())
    counts, _ = np.histogram(sv[sv > 0], bins=HIST_EDGES)
    return {
        "mean": st["mean"],
        "std": st["std"],
        "min": st["min"],
        "max": st["max"],
        "cn": st["cn"],
        "cn_mean": st["cn_mean"],
        "cn_median": st["cn_median"],
        "cn_raw": raw_max / raw_min if raw_min > 0 else math.inf,
        "n_examples": st["n_examples"],
        "n_zero": int(np.count_nonzero(sv == 0)),
        "n_below": int(np.count_nonzero((sv > 0) & (sv < HIST_EDGES[0]))),
        "n_above": int(np.count_nonzero(sv >= HIST_EDGES[-1])),
        "hist": counts.tolist(),
    }


def _prune_and_measure(cfg, data, gamma: float, seed: int) -> dict:
    """One gamma: JSV of the dense net at init, CS mask, per-layer sparsity, JSV of the pruned net."""
    X, y, _, _ = data
    Xj = X[: cfg["n_jsv"]]
    net = _build(cfg, gamma, seed)
    t = time.perf_counter()
    dense = _jsv(net, Xj)
    masks, notes = _cs_masks(net, X, y)
    rep = pruning.pruning_report(masks)
    pruned = _jsv(net.with_masks(masks), Xj)
    n_b = sum(m["b"].size for m in masks if "b" in m)
    kept_b = sum(int(m["b"].sum()) for m in masks if "b" in m)
    return {
        "gamma": gamma,
        "dense": dense,
        "pruned": pruned,
        "layer_sparsity": [r["sparsity"] for r in rep],
        "kept_weights": sum(r["kept"] for r in rep),
        "total_weights": sum(r["total"] for r in rep),
        "kept_biases": kept_b,
        "total_biases": n_b,
        "collapse_warnings": notes,
        "n_cs_examples": int(X.shape[0]),
        "seconds": time.perf_counter() - t,
    }


def _train_one(cfg, data, gamma: float, seed: int, progress) -> dict:
    """One gamma: rebuild the same net and mask, train, best test error over the checkpoints."""
    X, y = data[0], data[1]
    net = _build(cfg, gamma, seed)
    masks, _ = _cs_masks(net, X, y)
    net = net.with_masks(masks)
    return train_record(net, data, steps=cfg["steps"], eval_every=cfg["eval_every"], seed=seed, progress=progress,
                        lr=LR, batch_size=BATCH, weight_decay=WEIGHT_DECAY)


def _cs_examples_trend(cfg, data, gamma: float, seed: int) -> dict:
    """Layer sparsity of the CS mask against the number of training rows summed (same net)."""
    X, y, _, _ = data
    n = X.shape[0]
    ns = sorted({m for m in (100, 500, 1000, 2000, 10_000, n) if m <= n})
    net = _build(cfg, gamma, seed)
    rows = []
    for m in ns:
        masks, _ = _cs_masks(net, X[:m], y[:m])
        rows.append({"n": m, "layer_sparsity": [r["sparsity"] for r in pruning.pruning_report(masks)]})
    return {"gamma": gamma, "rows": rows}


# ============================================================================================
# figures
# ============================================================================================


def _plot_jsv(path, units) -> None:
    fig, axes = new_figure_row(2, figsize=(12.0, 4.6))
    centers = np.sqrt(HIST_EDGES[:-1] * HIST_EDGES[1:])
    for ax, which, title in (
        (axes[0], "dense", "dense network at initialisation (the paper's JSV columns)"),
        (axes[1], "pruned", "after CS pruning to 90%"),
    ):
        for i, (g, u) in enumerate(units):
            s = u[which]
            total = sum(s["hist"]) + s["n_zero"] + s["n_below"] + s["n_above"]  # all pooled values
            frac = np.asarray(s["hist"], dtype=float) / max(total, 1)
            extra = []
            if s["n_zero"]:
                extra.append(f"{s['n_zero']} zeros")
            if s["n_below"] or s["n_above"]:
                extra.append(f"{s['n_below'] + s['n_above']} off-axis")
            label = f"gamma={g:g}, mean {fmt(s['mean'])}" + (f" ({', '.join(extra)} not shown)" if extra else "")
            if frac.any():
                ax.step(centers, frac, where="mid", color=f"C{i}", linewidth=1.4, label=label)
                ax.fill_between(centers, frac, step="mid", color=f"C{i}", alpha=0.2)
            else:
                ax.plot([], [], color=f"C{i}", label=label)
        occupied = [k for _, u in units for k, c in enumerate(u[which]["hist"]) if c]
        if occupied:  # the occupied bins, one decade of margin
            ax.set_xlim(HIST_EDGES[max(min(occupied) - 10, 0)], HIST_EDGES[min(max(occupied) + 11, len(HIST_EDGES) - 1)])
        ax.set_xscale("log")
        ax.set_xlabel("singular value of dx^K/dx^0 (log scale)")
        ax.set_ylabel("fraction of singular values per bin (10 bins/decade)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    atomic_savefig(fig, path)


def _plot_sparsity(path, units) -> None:
    fig, (ax,) = new_figure_row(1, figsize=(9.0, 4.5))
    n_g = len(units)
    width = 0.8 / n_g
    for i, (g, u) in enumerate(units):
        sp = u["layer_sparsity"]
        xs = np.arange(1, len(sp) + 1) - 0.4 + (i + 0.5) * width
        ax.bar(xs, sp, width=width, color=f"C{i}", label=f"gamma={g:g}")
        if g in PAPER and len(sp) == 7:
            ax.scatter(xs, PAPER[g]["sparsity"], marker="_", s=60, color="k", zorder=3,
                       label="paper" if i == 0 else None)
    ax.set_xticks(range(1, len(units[0][1]["layer_sparsity"]) + 1))
    ax.set_xlabel("layer l")
    ax.set_ylabel("sparsity (fraction of weights pruned)")
    ax.set_ylim(0.0, 1.05)
    ax.set_title("CS mask at 90% sparsity, per layer (bars: refnet, black ticks: paper)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(True, axis="y", alpha=0.3)
    atomic_savefig(fig, path)


def _plot_error(path, trained) -> None:
    fig, (ax,) = new_figure_row(1)
    for i, (g, t) in enumerate(trained):
        if t.get("checkpoints"):
            ax.plot(t["checkpoints"], [100 * e for e in t["test_error"]], marker="o", markersize=3,
                    color=f"C{i}", label=f"gamma={g:g}")
    ax.set_xlabel("training step")
    ax.set_ylabel("test error (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Test error at the checkpoints (SGD lr 0.1, batch 100, wd 0.00025)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    atomic_savefig(fig, path)


# ============================================================================================
# checks and report
# ============================================================================================


def _within_factor(a, b, factor) -> bool:
    if a is None or b is None:
        return False
    a, b = float(a), float(b)
    if math.isinf(a) or math.isinf(b):
        return math.isinf(a) and math.isinf(b)
    if a <= 0 or b <= 0:
        return False
    return max(a / b, b / a) <= factor


class _TinyRun:
    """In tiny mode the numbers are meaningless: every check is reported, none is judged."""

    def __init__(self, run: Run):
        self.run = run

    def check(self, name, paper, refnet, criterion, holds, note=""):
        return self.run.check(name, paper, refnet, criterion, None, note=(note + "; " if note else "") + "tiny mode: not judged")


def _checks(run: Run, args, cfg, units, trained) -> None:
    mode, data_name = args.mode, args.data
    if mode == "tiny":
        run = _TinyRun(run)
    for g, u in units:
        p, d = PAPER[g], u["dense"]
        small = g <= 1e-1
        gs = f"gamma={g:g}"
        run.check(f"{gs}: JSV mean", p["mean"], d["mean"], f"within a factor {JSV_FACTOR:g} (dense net at init)",
                  _within_factor(d["mean"], p["mean"], JSV_FACTOR),
                  note=f"pruned net: {fmt(u['pruned']['mean'])}")
        run.check(f"{gs}: JSV std", p["std"], d["std"], f"within a factor {JSV_FACTOR:g}",
                  _within_factor(d["std"], p["std"], JSV_FACTOR))
        n_ex = d["n_examples"]
        if small:
            run.check(f"{gs}: CN = max/min pooled", p["cn"], d["cn"],
                      f"within a factor {JSV_FACTOR:g} ({n_ex} examples pooled; CN grows with the number)",
                      _within_factor(d["cn"], p["cn"], JSV_FACTOR))
        else:
            run.check(f"{gs}: CN = max/min pooled", p["cn"], d["cn"],
                      f"> {CN_FAILURE:.0e} or inf, the paper's failure regime: the pooled min is an extreme value "
                      f"that moves by decades with the sample ({n_ex} examples here)",
                      float(d["cn"]) > CN_FAILURE, note=f"raw LAPACK max/min {fmt(d['cn_raw'])}")
        sp = u["layer_sparsity"]
        if small:
            dev = max(abs(a - b) for a, b in zip(sp, p["sparsity"])) if len(sp) == 7 else float("nan")
            run.check(f"{gs}: layer sparsity 1..7", " ".join(f"{v:.2f}" for v in p["sparsity"]),
                      " ".join(f"{v:.2f}" for v in sp), f"every layer within {SPARSITY_TOL:g}",
                      dev <= SPARSITY_TOL, note=f"max deviation {dev:.3f}")
        else:
            mid = sp[2:6]
            run.check(f"{gs}: layer sparsity 1..7", " ".join(f"{v:.2f}" for v in p["sparsity"]),
                      " ".join(f"{v:.2f}" for v in sp), f"layers 3-6 all >= {COLLAPSE:g} (later layers pruned away)",
                      len(mid) == 4 and min(mid) >= COLLAPSE, note=f"min over layers 3-6: {min(mid):.3f}")
    for g, t in trained:
        p = PAPER[g]
        gs = f"gamma={g:g}"
        err = None if t.get("best_test_error") is None else 100.0 * t["best_test_error"]
        steps = t["steps"]
        if g >= 1.0:
            run.check(f"{gs}: best test error %", p["error"], err,
                      f">= {CHANCE_ERROR:g}% (chance level; {steps} steps)", err is not None and err >= CHANCE_ERROR,
                      note=t.get("error", "") if t.get("status") == "diverged" else "")
        elif mode != "full":
            run.check(f"{gs}: best test error %", p["error"], err,
                      f"not judged: {steps} of the paper's 10,000 steps in {mode} mode", None)
        elif data_name.lower() == "mnist":
            ok = err is not None and abs(err - p["error"]) <= MNIST_ERROR_PP
            run.check(f"{gs}: best test error %", p["error"], err,
                      f"within {MNIST_ERROR_PP:g} percentage point (MNIST, 54,000 training images as the paper)", ok)
        else:
            run.check(f"{gs}: best test error %", p["error"], err,
                      f"< {MNIST5K_ERROR:g}% ({data_name}: {t.get('n_train', '')} training images vs the paper's "
                      "54,000, so only a loose bound is meaningful; use --data mnist for the 1-point comparison)",
                      err is not None and err < MNIST5K_ERROR)


def _sections(run: Run, args, cfg, units, trained, trend) -> None:
    lines = [
        "## Per gamma: paper beside refnet",
        "",
        "JSV of the input-output Jacobian dx^K/dx^0, singular values of every example pooled. "
        "\"dense\": the network at initialisation before pruning, which is what the paper's JSV columns "
        "describe (the SPP code checks JSV \"after-init\", \"after-prune\" and \"after-isometry\"; only "
        "\"after-init\" matches the published numbers, and for gamma >= 1 the pruned network's Jacobian is "
        "identically zero while the paper prints 1e3 and 4e4). \"pruned\": the same network after the CS mask.",
        "",
        "| gamma | JSV mean paper / dense / pruned | JSV std paper / dense / pruned | CN paper / dense / pruned "
        "| CN mean over examples (dense) | layer sparsity 1..7 paper | refnet | error % paper / refnet |",
        "|---|---|---|---|---|---|---|---|",
    ]
    tmap = dict(trained)
    for g, u in units:
        p, d, q = PAPER[g], u["dense"], u["pruned"]
        t = tmap.get(g, {})
        err = t.get("best_test_error")
        lines.append(
            f"| {g:g} | {fmt(p['mean'])} / {fmt(d['mean'])} / {fmt(q['mean'])} "
            f"| {fmt(p['std'])} / {fmt(d['std'])} / {fmt(q['std'])} "
            f"| {fmt(p['cn'])} / {fmt(d['cn'])} / {fmt(q['cn'])} | {fmt(d['cn_mean'])} "
            f"| {' '.join(f'{v:.2f}' for v in p['sparsity'])} | {' '.join(f'{v:.2f}' for v in u['layer_sparsity'])} "
            f"| {p['error']:g} / {'-' if err is None else f'{100 * err:.2f}'} |"
        )
    u0 = units[0][1]
    t0 = trained[0][1] if trained else {}
    lines += [
        "",
        f"Settings ({args.mode} mode): MLP {'-'.join(str(s) for s in cfg['sizes'])}, tanh, bias on every layer, "
        f"SG(gamma) weights (variance gamma), zero biases, seed {args.seed}. Connection sensitivity: dL/dc summed "
        f"over all {u0['n_cs_examples']} training rows in batches of {BATCH} (SPP code), biases ranked too, so all "
        f"{u0['total_biases']} biases are pruned ({u0['kept_biases']} kept) and "
        f"{u0['kept_weights']} of {u0['total_weights']} weights are kept. JSV on the first "
        f"{u0['dense']['n_examples']} training rows (the SPP code uses the training split). Training: SGD lr {LR:g}, "
        f"batch {BATCH}, weight decay {WEIGHT_DECAY:g} on sum ||c*W||^2, {t0.get('steps', cfg['steps'])} steps, "
        f"test error at every {cfg['eval_every']} steps, best reported.",
        "",
        "Known differences from the paper: float64 instead of float32; mnist5k has 4,000 training images "
        "(the paper 54,000), so the error is only loosely comparable; the pooled CN depends on the number of "
        "examples pooled (the paper pooled the whole training split). refnet reports a singular value "
        "<= 784*eps*sigma_max of its own Jacobian as exactly 0 (NumPy's rank tolerance), which is why CN is inf "
        "where the raw LAPACK ratio is ~1e20+.",
    ]
    stuck = [g for g, t in trained if g <= 1e-1 and t.get("best_test_error") is not None
             and t["best_test_error"] >= 0.5]
    if stuck:
        lines += ["", "Reading: the JSV mean and std columns reproduce (dense network at init), but the network" + ("s" if len(stuck) > 1 else "")
                  + f" with gamma = {', '.join(f'{g:g}' for g in stuck)} did not learn within "
                  f"{trained[0][1]['steps']} steps (best test error >= 50%), where the paper reports ~2.7% for every "
                  "gamma <= 1e-1. With weights of variance gamma the signal shrinks by about sqrt(gamma * fan_in) per "
                  "layer (JSV mean of the pruned net in the table above), so plain SGD at lr 0.1 starts from a vanishing "
                  "gradient; refnet reports what it measures."]
    if args.mode != "full":
        lines += ["", f"**{args.mode} mode**: {cfg['steps']} training steps instead of 10,000; the errors of "
                  "gamma <= 1e-1 are not comparable with the paper's and are not judged."]
    run.section("\n".join(lines))
    if trend:
        g = trend["gamma"]
        p = PAPER.get(g)
        rows = ["## Layer sparsity of gamma = 0.1 against the number of training rows summed in dL/dc", "",
                "The CS mask of gamma = 0.1 depends on how many batches are summed before |.|: with more rows "
                "it moves towards the paper's (which summed 54,000 MNIST images). Same network, same seed.", "",
                "| rows summed | layer sparsity 1..7 | max deviation from the paper |", "|---|---|---|"]
        for r in trend["rows"]:
            dev = max(abs(a - b) for a, b in zip(r["layer_sparsity"], p["sparsity"])) if p and len(r["layer_sparsity"]) == 7 else float("nan")
            rows.append(f"| {r['n']} | {' '.join(f'{v:.2f}' for v in r['layer_sparsity'])} | {dev:.3f} |")
        if p:
            rows.append(f"| paper (54,000) | {' '.join(f'{v:.2f}' for v in p['sparsity'])} | 0 |")
        run.section("\n".join(rows))


# ============================================================================================
# main
# ============================================================================================


def main(argv=None) -> int:
    args = parse_args(NAME, __doc__.splitlines()[0], argv)
    run = Run(NAME, args, TITLE)
    cfg, data = _setup(args)
    progress = getattr(run, "_progress", False)
    units = []
    for g in GAMMAS:
        units.append((g, run.unit(f"prune/{_gkey(g)}", lambda g=g: _prune_and_measure(cfg, data, g, args.seed))))
    trend = run.unit("cs_examples/gamma=0.1", lambda: _cs_examples_trend(cfg, data, 1e-1, args.seed))
    trained = []
    for g in GAMMAS:
        t = run.unit(f"train/{_gkey(g)}", lambda g=g: _train_one(cfg, data, g, args.seed, progress))
        t = dict(t, n_train=int(data[0].shape[0]))
        trained.append((g, t))
    _checks(run, args, cfg, units, trained)
    _sections(run, args, cfg, units, trained, trend)
    _plot_jsv(run.figure_path("jsv_histograms.png", "Histograms of the pooled Jacobian singular values per gamma "
                                                     "(left: dense at init; right: pruned to 90%), log x"), units)
    _plot_sparsity(run.figure_path("layer_sparsity.png", "Per-layer sparsity of the CS mask per gamma "
                                                          "(bars: refnet; black ticks: paper)"), units)
    _plot_error(run.figure_path("test_error.png", "Test error at the checkpoints per gamma"), trained)
    return run.finish()


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
