r"""SPP figure "signal propagation and trainability": JSV mean against sparsity, and loss curves.

PAPER.md section 9. The tanh MLP 784-100x6-10 (K = 7 weight layers) is pruned at several
sparsities by four recipes, named {init}-{prune}-{AI} as in the paper:

* ``VS-CS``      LeCun normal init (variance scaling, N(0, 1/fan_in)) + connection sensitivity;
* ``LDI-CS``     orthogonal init (layerwise dynamical isometry) + connection sensitivity;
* ``LDI-CS-AI``  LDI-CS followed by approximate isometry (AI, PAPER.md section 7: plain GD on
  ``sum_l ||(C*W) (C*W)^T - I||_F`` over the kept weights, lr 0.1, 10,000 steps as the SPP code);
* ``LDI-Rand``   orthogonal init + a uniformly random mask of the same size.

For every recipe and sparsity the script measures the mean of the pooled singular values of the
input-output Jacobian dx^K/dx^0 (PAPER.md section 6) of the pruned network, and at 90% sparsity it
trains the four networks (SGD lr 0.1, batch 100, weight decay 0.00025, PAPER.md section 8) and
records the training-loss curve. The paper's claims, each a check with its criterion:

1. the JSV mean decreases as the sparsity grows (VS-CS, LDI-CS, LDI-Rand);
2. random pruning drops it fastest (relative to each recipe's own dense network);
3. CS preserves it better than random pruning (LDI-CS above LDI-Rand);
4. LDI-CS-AI restores it (closest to 1 of the four; back to the dense network's level at 90%);
5. networks with better JSV train faster (at 90%: rank correlation of the JSV mean with the loss
   after 100 steps and with the area under the first 1,000 steps of the loss curve, the same
   horizons in every mode; in full mode also with the area under the whole 10,000-step curve).

Conventions, following the SPP code: connection sensitivity sums dL/dc over the whole training
split in batches of 100 and ranks the biases too (zero biases score 0 and are all pruned); the
random mask ranks the weights only, with the biases forced out as well (bias scores -inf), so all
four recipes keep the same number of weights and train with zero biases. JSV on the first rows of
the training split (the SPP code's ``check.py`` uses the training split).

Modes: full = sparsities 0.5, 0.7, 0.9, 0.95, 0.99, AI 10,000 steps, 10,000 training steps; quick =
0.5, 0.9, 0.99, AI 1,000 steps, 1,000 training steps (AI reaches its plateau well before 1,000
steps: the report lists the objective along the way); tiny = a 16-unit net, seconds.
Run: ``refnet reproduce trainability [--quick]``.
"""

from __future__ import annotations

import math
import time
import warnings

import numpy as np

import refnet
from refnet import isometry, pruning, spectrum

from .common import Run, atomic_savefig, fmt, load_train_test, new_figure_row, parse_args

NAME = "trainability"
TITLE = "SPP figure: signal propagation (JSV mean) against sparsity for VS-CS, LDI-CS, LDI-CS-AI, LDI-Rand, and trainability at 90%"

#: name -> (init, pruning, approximate isometry)
METHODS = {
    "VS-CS": ("lecun", "cs", False),
    "LDI-CS": ("orthogonal", "cs", False),
    "LDI-CS-AI": ("orthogonal", "cs", True),
    "LDI-Rand": ("orthogonal", "rand", False),
}
DENSE = {"VS": "lecun", "LDI": "orthogonal"}  # the unpruned reference of each init
TRAIN_SPARSITY = 0.9
LR, BATCH, WEIGHT_DECAY = 0.1, 100, 0.00025
AI_LR = 0.1
CURVE_EVERY = 10  # training-loss curve: mean of the objective over every 10 steps

MODES = {
    "full": dict(hidden=100, n_train=None, n_jsv=1_000, sparsities=(0.5, 0.7, 0.9, 0.95, 0.99), ai_steps=10_000,
                 train_steps=10_000),
    "quick": dict(hidden=100, n_train=None, n_jsv=500, sparsities=(0.5, 0.9, 0.99), ai_steps=1_000, train_steps=1_000),
    "tiny": dict(hidden=16, n_train=300, n_jsv=10, sparsities=(0.5, 0.9), ai_steps=20, train_steps=20),
}

RESTORE_FACTOR = 2.0  # LDI-CS-AI at 90%: JSV mean within this factor of the dense LDI network's
SPEARMAN_MAX = -0.8  # better JSV trains faster: rank correlation at most this (one adjacent swap of 4)
AI_RECORD = (0, 10, 100, 1_000, 10_000)  # steps at which the AI objective is recorded
EARLY_STEP = 100  # "trains faster": the loss after this many steps (every mode) ...
AUC_STEPS = 1_000  # ... and the area under the first this many steps (and under the whole run if longer)


# ============================================================================================
# networks
# ============================================================================================


def _setup(args):
    cfg = dict(MODES[args.mode])
    X, y, Xt, yt = load_train_test(args, cfg["n_train"])  # full MNIST: 54,000 as the paper
    cfg["n_jsv"] = min(cfg["n_jsv"], X.shape[0])
    n_classes = int(max(y.max(), yt.max())) + 1
    cfg["sizes"] = [X.shape[1]] + [cfg["hidden"]] * 6 + [n_classes]
    return cfg, (X, y, Xt, yt)


def _skey(s: float) -> str:
    return f"s={s:g}"


def _masks(net, how: str, sparsity: float, X, y, seed: int):
    """CS (SPP code: summed over the training split, biases ranked) or a random mask of the same
    size (weights ranked at random, biases forced out)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pruning.LayerCollapseWarning)
        if how == "cs":
            return pruning.snip(net, X, y, sparsity=sparsity, batch_size=BATCH, include_bias=True)
        scores = pruning.random_scores(net, seed, include_bias=True)
        for s in scores:
            if "b" in s:
                s["b"] = np.full_like(s["b"], -np.inf)  # biases rank last: pruned, as with CS
        return pruning.prune(net, scores, sparsity, include_bias=True)


def _pruned_net(cfg, data, method: str, sparsity: float, seed: int, cache: dict):
    """The network of ``method`` at ``sparsity`` (AI applied for LDI-CS-AI) and the AI report.
    AI results are kept in ``cache`` for the rest of this process (AI is the costly step)."""
    key = (method, sparsity)
    if key in cache:
        return cache[key]
    init, how, ai = METHODS[method]
    X, y, _, _ = data
    net = refnet.mlp(cfg["sizes"], activation="tanh", init=init, seed=seed)
    net = net.with_masks(_masks(net, how, sparsity, X, y, seed))
    report = None
    if ai:
        trace = {}

        def record(step, F):
            if step in AI_RECORD:
                trace[step] = F

        net, report = isometry.approximate_isometry(net, steps=cfg["ai_steps"], lr=AI_LR, progress=record,
                                                    return_report=True)
        trace[0] = report["objective_before"]
        report = dict(report, trace={str(k): v for k, v in sorted(trace.items())})
        cache[key] = (net, report)
    return net, report


def _jsv_summary(net, Xj) -> dict:
    st = spectrum.jsv_stats(net, Xj, layerwise=False)
    return {k: st[k] for k in ("mean", "std", "min", "max", "cn", "cn_mean", "cn_median", "n_examples")}


def _dense_unit(cfg, data, init: str, seed: int) -> dict:
    X = data[0]
    net = refnet.mlp(cfg["sizes"], activation="tanh", init=init, seed=seed)
    return _jsv_summary(net, X[: cfg["n_jsv"]])


def _jsv_unit(cfg, data, method: str, sparsity: float, seed: int, cache: dict) -> dict:
    X = data[0]
    t = time.perf_counter()
    net, report = _pruned_net(cfg, data, method, sparsity, seed, cache)
    out = _jsv_summary(net, X[: cfg["n_jsv"]])
    rep = pruning.pruning_report(net)
    out["layer_sparsity"] = [r["sparsity"] for r in rep]
    out["weight_sparsity"] = 1.0 - sum(r["kept"] for r in rep) / sum(r["total"] for r in rep)
    if report is not None:
        out["ai"] = {
            "steps": report["steps"],
            "stopped": report["stopped"],
            "objective_before": report["objective_before"],
            "objective_after": report["objective_after"],
            "lower_bound_sum": sum(r["lower_bound"] for r in report["layers"]),
            "residual_after": [r["residual_after"] for r in report["layers"]],
            "lower_bound": [r["lower_bound"] for r in report["layers"]],
            "trace": report["trace"],
            "seconds": report["time"],
        }
    out["seconds"] = time.perf_counter() - t
    return out


def _train_unit(cfg, data, method: str, seed: int, cache: dict, progress) -> dict:
    X, y, Xt, yt = data
    net, _ = _pruned_net(cfg, data, method, TRAIN_SPARSITY, seed, cache)
    net = net.copy()  # training is in place; keep the cached (AI) net untouched
    steps = cfg["train_steps"]
    out = {"steps": steps}
    try:
        hist = refnet.train(net, X, y, steps=steps, lr=LR, batch_size=BATCH, weight_decay=WEIGHT_DECAY, seed=seed,
                            eval_every=min(CURVE_EVERY, steps), train_eval_size=0, progress=bool(progress))
    except FloatingPointError as exc:
        out.update(status="diverged", error=str(exc))
        return out
    loss, acc = net.evaluate(Xt, yt)
    out.update(status=hist.status, curve_steps=list(hist.steps), train_loss=list(hist.train_loss),
               test_loss=loss, test_error=1.0 - acc, seconds=hist.wall_time)
    return out


# ============================================================================================
# statistics
# ============================================================================================


def _ranks(v) -> np.ndarray:
    """Ranks 1..n, ties averaged."""
    v = np.asarray(v, dtype=float)
    order = np.argsort(v, kind="stable")
    r = np.empty(len(v))
    r[order] = np.arange(1, len(v) + 1)
    for val in np.unique(v):
        tie = v == val
        r[tie] = r[tie].mean()
    return r


def spearman(a, b) -> float:
    """Spearman rank correlation (Pearson correlation of the tie-averaged ranks); nan if constant."""
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def _auc(t: dict, upto: int | None = None) -> float:
    """Mean of the training-loss curve over the steps <= ``upto`` (default: the whole run), i.e. the
    area under the curve divided by the number of steps."""
    steps = np.asarray(t["curve_steps"])
    loss = np.asarray(t["train_loss"], dtype=float)
    keep = steps <= (steps[-1] if upto is None else max(upto, steps[0]))
    return float(loss[keep].mean())


def _loss_at(t: dict, step: int) -> tuple[int, float]:
    """The curve point at the last recorded step <= ``step`` (the mean loss of the 10 steps before
    it); the first point if ``step`` comes before it."""
    steps = np.asarray(t["curve_steps"])
    i = max(int(np.searchsorted(steps, step, side="right")) - 1, 0)
    return int(steps[i]), float(t["train_loss"][i])


def _decreasing(vals) -> bool:
    """Each value below the previous one, or both exactly 0 (a disconnected net stays at 0)."""
    return all(b < a or (a == 0.0 and b == 0.0) for a, b in zip(vals, vals[1:]))


# ============================================================================================
# figures
# ============================================================================================


def _plot_jsv(path, sparsities, jsv, dense) -> None:
    fig, (ax,) = new_figure_row(1)
    pos = [float(v["mean"]) for m in jsv for v in jsv[m].values() if float(v["mean"]) > 0]
    floor = min(pos + [float(d["mean"]) for d in dense.values()]) / 3.0 if pos else 1e-3
    for i, m in enumerate(METHODS):
        ys = [float(jsv[m][_skey(s)]["mean"]) for s in sparsities]
        shown = [y if y > 0 else np.nan for y in ys]
        ax.plot(sparsities, shown, marker="o", color=f"C{i}", label=m)
        zeros = [s for s, y in zip(sparsities, ys) if y == 0]
        if zeros:
            ax.scatter(zeros, [floor] * len(zeros), marker="v", color=f"C{i}", zorder=3,
                       label=f"{m}: JSV mean exactly 0 (disconnected)")
    for j, (name, d) in enumerate(dense.items()):
        ax.axhline(float(d["mean"]), linestyle="--", linewidth=1, color="grey" if j else "k",
                   label=f"dense {name} net (no pruning): {fmt(d['mean'])}")
    ax.axhline(1.0, linestyle=":", linewidth=1, color="k", alpha=0.5)
    ax.set_yscale("log")
    ax.set_xlabel("sparsity (fraction of weights pruned)")
    ax.set_ylabel("mean Jacobian singular value (log scale)")
    ax.set_title("Signal propagation against sparsity (tanh MLP-7)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    atomic_savefig(fig, path)


def _plot_loss(path, trained) -> None:
    fig, (ax,) = new_figure_row(1)
    for i, (m, t) in enumerate(trained.items()):
        if t.get("train_loss"):
            ax.plot(t["curve_steps"], t["train_loss"], color=f"C{i}", linewidth=1.2, label=m)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"training objective (mean over {CURVE_EVERY} steps)")
    ax.set_title(f"Training loss at {TRAIN_SPARSITY:.0%} sparsity (SGD lr {LR:g}, batch {BATCH}, wd {WEIGHT_DECAY:g})",
                 fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    atomic_savefig(fig, path)


# ============================================================================================
# checks and report
# ============================================================================================


class _TinyRun:
    """In tiny mode the numbers are meaningless: every check is reported, none is judged."""

    def __init__(self, run: Run):
        self.run = run

    def check(self, name, paper, refnet, criterion, holds, note=""):
        return self.run.check(name, paper, refnet, criterion, None, note=(note + "; " if note else "") + "tiny mode: not judged")


def _series(jsv, m, sparsities):
    return [float(jsv[m][_skey(s)]["mean"]) for s in sparsities]


def _checks(run, args, sparsities, jsv, dense, trained) -> None:
    if args.mode == "tiny":
        run = _TinyRun(run)
    sp_txt = ", ".join(f"{s:g}" for s in sparsities)
    # 1. decreases with sparsity
    for m in ("VS-CS", "LDI-CS", "LDI-Rand"):
        ys = _series(jsv, m, sparsities)
        run.check(f"{m}: JSV mean decreases as sparsity grows", "decreases", " > ".join(fmt(v) for v in ys),
                  f"each value below the previous one over sparsity {sp_txt} (0 = 0 allowed)", _decreasing(ys))
    # 2. random drops fastest, relative to its own dense network
    ref = {"VS-CS": float(dense["VS"]["mean"]), "LDI-CS": float(dense["LDI"]["mean"]), "LDI-Rand": float(dense["LDI"]["mean"])}
    ratios = {m: [v / ref[m] for v in _series(jsv, m, sparsities)] for m in ref}
    ok = all(ratios["LDI-Rand"][k] <= min(ratios["VS-CS"][k], ratios["LDI-CS"][k]) for k in range(len(sparsities)))
    strict = all(ratios["LDI-Rand"][k] < min(ratios["VS-CS"][k], ratios["LDI-CS"][k]) for k in range(len(sparsities)))
    run.check("random pruning drops the JSV mean fastest", "LDI-Rand lowest",
              "Rand/dense: " + " ".join(fmt(v) for v in ratios["LDI-Rand"]),
              f"JSV mean / dense-net JSV mean of LDI-Rand <= that of VS-CS and LDI-CS at every sparsity ({sp_txt})",
              ok, note="" if strict else "ties at 0 where several nets are disconnected")
    # 3. CS preserves better than random (same init)
    cs, rd = _series(jsv, "LDI-CS", sparsities), _series(jsv, "LDI-Rand", sparsities)
    run.check("CS preserves the JSV mean better than random pruning", "LDI-CS above LDI-Rand",
              " ".join(f"{fmt(a)}/{fmt(b)}" for a, b in zip(cs, rd)),
              f"LDI-CS > LDI-Rand at every sparsity ({sp_txt}); shown as LDI-CS/LDI-Rand", all(a > b for a, b in zip(cs, rd)))
    # 4. AI restores
    def dist(v):
        return abs(math.log10(v)) if v > 0 else math.inf

    closest = []
    for s in sparsities:
        vals = {m: float(jsv[m][_skey(s)]["mean"]) for m in METHODS}
        closest.append(min(vals, key=lambda m: dist(vals[m])))
    run.check("LDI-CS-AI: JSV mean closest to 1 of the four", "LDI-CS-AI at every sparsity",
              " ".join(closest), f"abs(log10 JSV mean) smallest for LDI-CS-AI at every sparsity ({sp_txt})",
              all(c == "LDI-CS-AI" for c in closest))
    if TRAIN_SPARSITY in sparsities:
        ai = float(jsv["LDI-CS-AI"][_skey(TRAIN_SPARSITY)]["mean"])
        dl = float(dense["LDI"]["mean"])
        run.check(f"LDI-CS-AI restores the dense network's JSV mean at {TRAIN_SPARSITY:.0%}", fmt(dl) + " (dense LDI)",
                  ai, f"within a factor {RESTORE_FACTOR:g} of the unpruned orthogonal net's JSV mean",
                  dl > 0 and ai > 0 and max(ai / dl, dl / ai) <= RESTORE_FACTOR,
                  note=f"LDI-CS without AI: {fmt(jsv['LDI-CS'][_skey(TRAIN_SPARSITY)]['mean'])}")
    # 5. better JSV trains faster: the same absolute horizons in every mode (early training), and
    #    over the whole run when it is longer than that
    ok_runs = {m: t for m, t in trained.items() if t.get("train_loss")}
    if len(ok_runs) == len(METHODS) and TRAIN_SPARSITY in sparsities:
        js = [float(jsv[m][_skey(TRAIN_SPARSITY)]["mean"]) for m in METHODS]
        steps = next(iter(ok_runs.values()))["steps"]
        at = [_loss_at(ok_runs[m], EARLY_STEP) for m in METHODS]
        rho = spearman(js, [a[1] for a in at])
        order = sorted(METHODS, key=lambda m: _loss_at(ok_runs[m], EARLY_STEP)[1])
        run.check(f"better JSV trains faster: loss after {at[0][0]} steps", "rank corr. < 0 (better JSV, lower loss)",
                  f"rho = {rho:.2f}", f"Spearman rho(JSV mean, training loss at step {at[0][0]}) <= {SPEARMAN_MAX:g} "
                  "(4 nets: at most one adjacent pair out of order)", rho <= SPEARMAN_MAX,
                  note="lowest first: " + ", ".join(order))
        horizons = [min(AUC_STEPS, steps)] + ([steps] if steps > AUC_STEPS else [])
        for h in horizons:
            aucs = [_auc(ok_runs[m], h) for m in METHODS]
            rho = spearman(js, aucs)
            order = sorted(METHODS, key=lambda m: _auc(ok_runs[m], h))
            what = f"first {h} steps" if h < steps or steps <= AUC_STEPS else f"whole run ({h} steps)"
            run.check(f"better JSV trains faster: area under the loss curve, {what}", "rank corr. < 0",
                      f"rho = {rho:.2f}", f"Spearman rho(JSV mean, mean training loss over the {what}) <= {SPEARMAN_MAX:g}",
                      rho <= SPEARMAN_MAX, note="lowest first: " + ", ".join(order))
    else:
        bad = ", ".join(f"{m}: {t.get('error', t.get('status'))}" for m, t in trained.items() if not t.get("train_loss"))
        run.check("better JSV trains faster", "rank corr. < 0", "-", "needs the four training runs", False, note=bad)


def _sections(run, args, cfg, sparsities, jsv, dense, trained) -> None:
    head = "| recipe | " + " | ".join(f"s = {s:g}" for s in sparsities) + " |"
    lines = ["## JSV mean of the pruned networks", "",
             f"Mean of the pooled singular values of dx^K/dx^0 over the first {cfg['n_jsv']} training rows "
             f"(dense reference: VS {fmt(dense['VS']['mean'])}, LDI {fmt(dense['LDI']['mean'])}). A 0 means the "
             "mask disconnects the input from the output.", "", head, "|---" * (len(sparsities) + 1) + "|"]
    for m in METHODS:
        lines.append(f"| {m} | " + " | ".join(fmt(jsv[m][_skey(s)]["mean"]) for s in sparsities) + " |")
    lines += ["", "Per-layer sparsity of the masks (layers 1..7):", "", head, "|---" * (len(sparsities) + 1) + "|"]
    for m in ("VS-CS", "LDI-CS", "LDI-Rand"):
        lines.append(f"| {m} | " + " | ".join(" ".join(f"{v:.2f}" for v in jsv[m][_skey(s)]["layer_sparsity"])
                                               for s in sparsities) + " |")
    run.section("\n".join(lines))

    lines = ["## Approximate isometry: how far the repair gets", "",
             f"Plain GD on sum_l ||V V^T - I||_F (unsquared, as the SPP code), lr {AI_LR:g}, at most {cfg['ai_steps']} "
             "steps (the paper: 10,000). The lower bound sqrt(rows - structural rank of the mask) holds for every W; "
             "layers whose mask keeps a full-rank pattern can reach 0 in principle, but with the unsquared norm and a "
             "constant lr GD ends in a small limit cycle (refnet.isometry docstring), so a residual of order lr per "
             "layer remains.", "",
             "| sparsity | objective before | after | sum of lower bounds | objective at steps " +
             ", ".join(str(s) for s in AI_RECORD) + " | stopped | per-layer residual after (lower bound) | s |",
             "|---|---|---|---|---|---|---|---|"]
    for s in sparsities:
        a = jsv["LDI-CS-AI"][_skey(s)].get("ai")
        if not a:
            continue
        tr = " / ".join(fmt(a["trace"].get(str(k))) for k in AI_RECORD if str(k) in a["trace"])
        per = " ".join(f"{fmt(r, '.2f')}({fmt(lb, '.2f')})" for r, lb in zip(a["residual_after"], a["lower_bound"]))
        lines.append(f"| {s:g} | {fmt(a['objective_before'])} | {fmt(a['objective_after'])} | {fmt(a['lower_bound_sum'])} "
                     f"| {tr} | {a['stopped']} after {a['steps']} | {per} | {a['seconds']:.1f} |")
    run.section("\n".join(lines))

    lines = [f"## Training at {TRAIN_SPARSITY:.0%} sparsity", "",
             f"SGD lr {LR:g}, batch {BATCH}, weight decay {WEIGHT_DECAY:g} on sum ||c*W||^2, {cfg['train_steps']} steps "
             f"(the paper: 10,000), seed {args.seed}; curve = mean objective over every {CURVE_EVERY} steps.", "",
             f"| recipe | JSV mean | loss at step {EARLY_STEP} | mean loss, first {AUC_STEPS} steps | mean loss, whole run "
             "| final loss | test error % |",
             "|---|---|---|---|---|---|---|"]
    for m, t in trained.items():
        if not t.get("train_loss"):
            lines.append(f"| {m} | - | {t.get('status')}: {t.get('error', '')} | - | - | - | - |")
            continue
        st, el = _loss_at(t, EARLY_STEP)
        js = jsv[m][_skey(TRAIN_SPARSITY)]["mean"] if _skey(TRAIN_SPARSITY) in jsv[m] else None
        lines.append(f"| {m} | {fmt(js)} | {el:.3f} (step {st}) | {_auc(t, AUC_STEPS):.3f} | {_auc(t):.3f} "
                     f"| {t['train_loss'][-1]:.3f} | {100 * t['test_error']:.2f} |")
    done = {m: t for m, t in trained.items() if t.get("train_loss")}
    if len(done) == len(METHODS):
        final = sorted(done, key=lambda m: done[m]["train_loss"][-1])
        lines += ["", f"Lowest final training loss: {final[0]} (order: {', '.join(final)}). \"Trains faster\" is judged "
                  f"on the early phase (step {EARLY_STEP}, first {AUC_STEPS} steps), the same in every mode; where the "
                  "whole run is longer it is judged separately, because a faster start need not give a lower loss "
                  "later."]
    if args.mode == "quick":
        lines += ["", f"**quick mode**: {cfg['train_steps']} training steps and {cfg['ai_steps']} AI steps (the paper: "
                  "10,000 each); the trainability claim is about how fast the loss falls early on, so the ordering is "
                  "still judged on the shorter curves."]
    elif args.mode == "tiny":
        lines += ["", "**tiny mode**: a smoke test; the numbers mean nothing and nothing is judged."]
    lines += ["", f"Settings: MLP {'-'.join(str(s) for s in cfg['sizes'])}, tanh, zero biases (pruned in every recipe), "
              f"data {args.data} ({cfg['n_train_used']} training rows); connection sensitivity summed over all training "
              "rows in batches of 100 (SPP code)."]
    run.section("\n".join(lines))


# ============================================================================================
# main
# ============================================================================================


def main(argv=None) -> int:
    args = parse_args(NAME, __doc__.splitlines()[0], argv)
    run = Run(NAME, args, TITLE)
    cfg, data = _setup(args)
    cfg["n_train_used"] = int(data[0].shape[0])
    progress = getattr(run, "_progress", False)
    cache: dict = {}
    sparsities = list(cfg["sparsities"])
    dense = {name: run.unit(f"dense/{name}", lambda init=init: _dense_unit(cfg, data, init, args.seed))
             for name, init in DENSE.items()}
    jsv = {m: {} for m in METHODS}
    for s in sparsities:
        for m in METHODS:
            jsv[m][_skey(s)] = run.unit(f"jsv/{m}/{_skey(s)}",
                                        lambda m=m, s=s: _jsv_unit(cfg, data, m, s, args.seed, cache))
    trained = {}
    for m in METHODS:
        trained[m] = run.unit(f"train/{m}/{_skey(TRAIN_SPARSITY)}",
                              lambda m=m: _train_unit(cfg, data, m, args.seed, cache, progress))
    cache.clear()
    _checks(run, args, sparsities, jsv, dense, trained)
    _sections(run, args, cfg, sparsities, jsv, dense, trained)
    _plot_jsv(run.figure_path("jsv_vs_sparsity.png", "Mean Jacobian singular value against sparsity (log y); "
                                                     "dashed: the unpruned networks"), sparsities, jsv, dense)
    _plot_loss(run.figure_path("loss_curves.png", f"Training loss at {TRAIN_SPARSITY:.0%} sparsity"), trained)
    return run.finish()


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
