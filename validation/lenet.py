r"""SNIP on LeNet-300-100: 95% and 98% sparse nets trained from one-shot masks, and the first-layer mask.

PAPER.md section 10 ([SNIP], LeNets on MNIST, error %): LeNet-300-100 (ReLU 784-300-100-10)
reference (dense) 1.7, SNIP at 95% sparsity 1.6, at 98% 2.4; single shot, no pretraining. The mask
of the first layer, summed over its 300 units and reshaped to 28 x 28, keeps the pixels where
digits are and drops the border.

What refnet does (SNIP, PAPER.md section 4): LeNet-300-100 with VS-L init (LeCun normal
``N(0, 1/fan_in)``, biases 0; the SNIP code's ``tf.variance_scaling_initializer()``), connection
sensitivity ``|dL/dc|`` of the cross-entropy on ONE mini-batch of 100 training images (the first
100 rows; for mnist5k that is 10 of each class), global top-k over the weights (biases are not
ranked and stay trainable), then the same weights are trained with the mask fixed.

Training. The SNIP paper trained LeNets with SGD momentum 0.9, batch 100, lr 0.1 decayed, for 250k
iterations on MNIST. mnist5k has 4,000 training images, so refnet trains far fewer steps with the
same shape of schedule: momentum 0.9, batch 100, weight decay 0.00025 (the SNIP code's
``0.00025 * sum w^2``), lr 0.1 for the first half of the steps, 0.01 for the next quarter, 0.001
for the last quarter (one :func:`refnet.train` run with that lr schedule: the momentum buffer
and the epoch order carry over at a decay; the batch order is drawn from seed ``100 * seed``);
best test error over 20 checkpoints. Full mode: 10,000 steps (250 epochs of 4,000 images; the
error has converged by about 6,000), seeds --seed, --seed + 1, --seed + 2 averaged; about 7
minutes of CPU. Quick mode: 1,500 steps, one seed; about 20 s of CPU. Tiny: seconds, meaningless
numbers. ``--seeds N`` overrides the number of seeds. (Timings with one thread everywhere,
``OMP_NUM_THREADS=OPENBLAS_NUM_THREADS=NUMBA_NUM_THREADS=1``, on the 2-core development machine.
The masked layers run on refnet's automatic kernel engine; there, Numba's default thread count
made the 95%/98% nets train 5-7x slower per CPU second than with one Numba thread.)

Differences from the SNIP code (namhoonlee/snip-public), stated rather than copied: it draws a
second, fresh initialisation after pruning (``weights_ap``) and trains that under the mask, it
uses truncated normals, and at pruning time its biases are VS-initialised (non-zero) and ranked
with the weights. refnet prunes and trains one draw, untruncated, biases 0 and not ranked.

Agreement criteria. With 4,000 training images the absolute errors are about 3x the paper's
(reported, not judged). The claim "SNIP-pruned nets lose (almost) nothing" is judged on the
difference to the dense net trained the same way: ``err(s) - err(dense) <= paper's difference +
1.5 pp``, i.e. <= 1.4 pp at 95% (paper -0.1) and <= 2.2 pp at 98% (paper +0.7). 1.5 pp is about
1.5 standard errors of a difference of two best errors on 1,000 test images (quick: one seed;
full: the mean over three). The mask picture: the kept fraction of first-layer weights from the
central 20 x 20 pixels must be >= 5x that from the 384 border pixels, and the Pearson correlation
between the mask-sum image (kept weights per pixel) and the mean pixel intensity of the training
images must be > 0.5. The intensity image uses the raw pixels (/255): after the scalar
standardisation an always-black border pixel is -mu/sigma = -0.42, not 0, so the standardised
image is not "where digits are"; it is also why border weights are not scored exactly 0.

Run: ``refnet reproduce lenet [--quick]`` or ``python -m refnet.validation.lenet``.
"""

from __future__ import annotations

import time
import warnings

import numpy as np

import refnet
from refnet import data as rdata
from refnet import pruning

from .common import Run, atomic_savefig, fmt, load_train_test, new_figure_row, seeded_settings, start, unit_grid

NAME = "lenet"
TITLE = "SNIP: LeNet-300-100 at 95% and 98% sparsity, and the first-layer mask"

SPARSITIES = (0.95, 0.98)
PAPER_ERR = {"dense": 1.7, 0.95: 1.6, 0.98: 2.4}  # %
MOMENTUM, BATCH, WEIGHT_DECAY, LR = 0.9, 100, 0.00025, 0.1
#: lr schedule: (fraction of the steps, lr multiplier)
PHASES = ((0.5, 1.0), (0.25, 0.1), (0.25, 0.01))
N_SNIP = 100  # SNIP scores one mini-batch
N_CHECKPOINTS = 20
TOL_PP = 1.5
RATIO_MIN = 5.0
CORR_MIN = 0.5

MODES = {
    "full": dict(steps=10_000, n_seeds=3, n_train=None, n_test=None),
    "quick": dict(steps=1_500, n_seeds=1, n_train=None, n_test=None),
    "tiny": dict(steps=20, n_seeds=1, n_train=300, n_test=200),
}


def _add_arguments(p) -> None:
    p.add_argument("--seeds", type=int, default=None,
                   help="number of seeds (--seed, --seed+1, ...) whose errors are averaged (default: full 3, quick 1)")


def _key(s) -> str:
    return "dense" if s is None else f"{s:g}"


# ============================================================================================
# computation
# ============================================================================================


def _setup(args):
    cfg = seeded_settings(args, MODES)  # with n_seeds and seeds
    X, y, Xt, yt = load_train_test(args, cfg["n_train"], cfg["n_test"], hold_out=False)
    info = rdata.info(args.data)
    cfg["image_shape"] = tuple(info.image_shape[1:]) if info.image_shape[0] == 1 else None
    cfg["n_in"], cfg["n_classes"] = X.shape[1], int(max(y.max(), yt.max())) + 1
    cfg["eval_every"] = max(1, cfg["steps"] // N_CHECKPOINTS)
    # mean raw pixel intensity (0..1) over the training rows: "where the digits are"
    Xraw, _ = rdata.load(args.data, split="train", data_dir=args.data_dir, preprocess=False)
    cfg["mean_intensity"] = (Xraw / info.scale).mean(axis=0)  # (n_in,)
    return cfg, (X, y, Xt, yt)


def _build(cfg, seed: int):
    return refnet.build("lenet300", (cfg["n_in"],), cfg["n_classes"], init="vs-l", seed=seed)


def _snip_mask(net, X, y, sparsity: float):
    """SNIP: |dL/dc| of the mean cross-entropy on the first 100 rows, global top-k of the weights."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", pruning.LayerCollapseWarning)
        masks = pruning.snip(net, X[:N_SNIP], y[:N_SNIP], sparsity)
    return masks, [str(w.message) for w in caught]


def _regions(shape):
    """Boolean (H, W) masks: the central box (20 x 20 for 28 x 28) and the outer 2-pixel ring."""
    H, W = shape
    m = int(round(4 * H / 28)), int(round(4 * W / 28))
    central = np.zeros((H, W), dtype=bool)
    central[m[0] : H - m[0], m[1] : W - m[1]] = True
    r = max(1, int(round(2 * H / 28))), max(1, int(round(2 * W / 28)))
    ring = np.ones((H, W), dtype=bool)
    ring[r[0] : H - r[0], r[1] : W - r[1]] = False
    return central, ring


def _mask_unit(cfg, data, sparsity: float, seed: int) -> dict:
    X, y, _, _ = data
    net = _build(cfg, seed)
    t = time.perf_counter()
    masks, notes = _snip_mask(net, X, y, sparsity)
    rep = pruning.pruning_report(masks)
    M1 = masks[[i for i, m in enumerate(masks) if "W" in m][0]]["W"]  # (300, n_in)
    per_pixel = M1.sum(axis=0)  # (n_in,) kept weights per input pixel, 0..300
    out = {
        "sparsity": sparsity,
        "layer_sparsity": [r["sparsity"] for r in rep],
        "kept_weights": sum(r["kept"] for r in rep),
        "total_weights": sum(r["total"] for r in rep),
        "n_units": int(M1.shape[0]),
        "per_pixel": per_pixel.astype(int).tolist(),
        "corr_intensity": float(np.corrcoef(per_pixel, cfg["mean_intensity"])[0, 1]) if per_pixel.std() > 0 else None,
        "pixels_never_kept": int(np.count_nonzero(per_pixel == 0)),
        "warnings": notes,
        "seconds": time.perf_counter() - t,
    }
    if cfg["image_shape"] is not None:
        central, ring = _regions(cfg["image_shape"])
        img = per_pixel.reshape(cfg["image_shape"]) / M1.shape[0]  # kept fraction per pixel
        out.update(
            central_kept=float(img[central].mean()),
            border_kept=float(img[~central].mean()),
            ring_kept=float(img[ring].mean()),
            n_central=int(central.sum()),
            n_border=int((~central).sum()),
        )
    return out


def _train_unit(cfg, data, sparsity, seed: int, progress) -> dict:
    X, y, Xt, yt = data
    net = _build(cfg, seed)
    if sparsity is not None:
        masks, _ = _snip_mask(net, X, y, sparsity)
        net = net.with_masks(masks)
    out = {"steps": cfg["steps"], "eval_every": cfg["eval_every"], "phases": []}
    checkpoints, errors, t0 = [], [], time.perf_counter()
    n_phase = [int(round(f * cfg["steps"])) for f, _ in PHASES[:-1]]
    n_phase.append(cfg["steps"] - sum(n_phase))
    schedule, start = [], 1
    for (_, mult), n in zip(PHASES, n_phase):
        if n > 0:
            schedule.append((start, LR * mult))
            out["phases"].append({"lr": LR * mult, "start": start - 1, "steps": n})
            start += n
    try:  # one run: the momentum buffer and the epoch order carry over from phase to phase
        hist = refnet.train(net, X, y, steps=cfg["steps"], lr=schedule, momentum=MOMENTUM, batch_size=BATCH,
                            weight_decay=WEIGHT_DECAY, seed=100 * seed, X_test=Xt, y_test=yt,
                            eval_every=cfg["eval_every"], train_eval_size=0, progress=bool(progress))
    except FloatingPointError as exc:  # a diverged run is a finding, reported as such
        out.update(status="diverged", error=str(exc))
    else:
        out["status"] = "completed"
        checkpoints = list(hist.steps)
        errors = [None if a is None else 1.0 - a for a in hist.test_acc]
    valid = [e for e in errors if e is not None]
    out.update(
        best_test_error=min(valid) if valid and out["status"] == "completed" else None,
        final_test_error=valid[-1] if valid else None,
        best_test_step=checkpoints[errors.index(min(valid))] if valid else None,
        checkpoints=checkpoints,
        test_error=errors,
        seconds=time.perf_counter() - t0,
    )
    return out


# ============================================================================================
# checks and report
# ============================================================================================


def _pp(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _summary(cfg, trained: dict) -> dict:
    err, diff = {}, {}
    for s in (None,) + SPARSITIES:
        runs = [trained[_key(s), seed] for seed in cfg["seeds"]]
        ok = all(r.get("best_test_error") is not None for r in runs)
        err[_key(s)] = float(np.mean([r["best_test_error"] for r in runs])) if ok else None
        if s is not None:
            dense = [trained["dense", seed] for seed in cfg["seeds"]]
            ok2 = ok and all(d.get("best_test_error") is not None for d in dense)
            diff[_key(s)] = (float(np.mean([r["best_test_error"] - d["best_test_error"] for r, d in zip(runs, dense)]))
                             if ok2 else None)
    return {"err": err, "diff": diff}


def _checks(run: Run, cfg, E: dict, masks: dict, n_train: int) -> None:
    n = cfg["n_seeds"]
    how = f"{cfg['steps']:,} steps, {'mean of ' + str(n) + ' seeds' if n > 1 else 'one seed'}"
    for s in SPARSITIES:
        k = _key(s)
        pd = PAPER_ERR[s] - PAPER_ERR["dense"]
        d = E["diff"][k]
        run.check(
            f"SNIP {s:.0%} sparse vs dense: error difference",
            f"{PAPER_ERR[s]} - {PAPER_ERR['dense']} = {pd:+.1f} pp",
            "diverged" if d is None else f"{_pp(E['err'][k])} - {_pp(E['err']['dense'])} = {100 * d:+.2f} pp",
            f"err({s:.0%}) - err(dense) <= {pd:+.1f} + {TOL_PP} = {pd + TOL_PP:.1f} pp ({how})",
            d is not None and 100 * d <= pd + TOL_PP,
        )
    run.check(
        "absolute test errors % (dense / 95% / 98%)",
        f"{PAPER_ERR['dense']} / {PAPER_ERR[0.95]} / {PAPER_ERR[0.98]}",
        " / ".join(_pp(E["err"][_key(s)]) for s in (None,) + SPARSITIES),
        f"reported, not judged: {n_train:,} training images vs MNIST's 55,000-60,000",
        None,
    )
    s0 = cfg["seeds"][0]
    if cfg["image_shape"] is None:
        return
    ms = [masks[s, s0] for s in SPARSITIES]
    ratios = [m["central_kept"] / m["border_kept"] if m["border_kept"] > 0 else float("inf") for m in ms]
    run.check(
        "first-layer mask drops the border",
        "keeps digit pixels, drops the border",
        "; ".join(f"{s:.0%}: central {100 * m['central_kept']:.2f}% vs border {100 * m['border_kept']:.2f}% kept "
                  f"(x{r:.0f}; outer 2-px ring {100 * m['ring_kept']:.2f}%)" for s, m, r in zip(SPARSITIES, ms, ratios)),
        f"kept fraction of the central {int(np.sqrt(ms[0]['n_central']))}x{int(np.sqrt(ms[0]['n_central']))} pixels "
        f">= {RATIO_MIN:g}x that of the {ms[0]['n_border']} border pixels, at both sparsities (seed {s0})",
        all(r >= RATIO_MIN for r in ratios),
    )
    corrs = [m["corr_intensity"] for m in ms]
    run.check(
        "first-layer mask keeps the pixels where digits are",
        "keeps digit pixels, drops the border",
        "; ".join(f"{s:.0%}: r = {fmt(c, '.3f')}" for s, c in zip(SPARSITIES, corrs)),
        f"Pearson r between kept weights per pixel and the mean raw pixel intensity > {CORR_MIN} at both sparsities (seed {s0})",
        all(c is not None and c > CORR_MIN for c in corrs),
    )


def _sections(run: Run, cfg, E: dict, trained: dict, masks: dict, n_train: int) -> None:
    n = cfg["n_seeds"]
    sched = ", ".join(f"lr {LR * m:g} for {f:.0%}" for f, m in PHASES)
    run.section(
        f"Setting: LeNet-300-100 (ReLU {cfg['n_in']}-300-100-{cfg['n_classes']}), VS-L init; SNIP scores the mean "
        f"cross-entropy on the first {N_SNIP} training images, global top-k over the weights; training on {n_train:,} "
        f"images: SGD momentum {MOMENTUM}, batch {BATCH}, weight decay {WEIGHT_DECAY}, {cfg['steps']:,} steps "
        f"({sched} of the steps), best test error over {N_CHECKPOINTS} checkpoints; seeds "
        f"{', '.join(map(str, cfg['seeds']))}. Differences are taken seed by seed (same init), then averaged."
    )
    rows = ["| net | weights kept | paper error % | refnet best error % | refnet final error % | paper minus dense (pp) | refnet minus dense (pp) |",
            "|---|---|---|---|---|---|---|"]
    s0 = cfg["seeds"][0]
    for s in (None,) + SPARSITIES:
        k = _key(s)
        kept = f"{masks[SPARSITIES[0], s0]['total_weights']:,} (all)" if s is None else f"{masks[s, s0]['kept_weights']:,}"
        pd = "-" if s is None else f"{PAPER_ERR[s] - PAPER_ERR['dense']:+.1f}"
        rd = "-" if s is None else ("-" if E["diff"][k] is None else f"{100 * E['diff'][k]:+.2f}")
        per_seed = " (" + ", ".join(_pp(trained[k, sd]["best_test_error"]) for sd in cfg["seeds"]) + ")" if n > 1 else ""
        label = "dense" if s is None else f"SNIP {s:.0%}"
        fv = [trained[k, sd].get("final_test_error") for sd in cfg["seeds"]]
        final = "-" if any(v is None for v in fv) else _pp(float(np.mean(fv)))
        rows.append(f"| {label} | {kept} | {PAPER_ERR['dense' if s is None else s]} | {_pp(E['err'][k])}{per_seed} | {final} | {pd} | {rd} |")
    run.section("Best error = the papers' metric (best over the checkpoints, which favours noisy curves); "
                "final = the last checkpoint, for reference.\n\n" + "\n".join(rows))
    rows = ["| sparsity | layer sparsity 1..3 | central kept % | border kept % | outer ring kept % | pixels never kept | r with intensity |",
            "|---|---|---|---|---|---|---|"]
    for s in SPARSITIES:
        m = masks[s, s0]
        rows.append(f"| {s:.0%} | {' '.join(f'{v:.3f}' for v in m['layer_sparsity'])} | "
                    f"{_pp(m.get('central_kept'))} | {_pp(m.get('border_kept'))} | {_pp(m.get('ring_kept'))} | "
                    f"{m['pixels_never_kept']} of {len(m['per_pixel'])} | {fmt(m['corr_intensity'], '.3f')} |")
    run.section(f"First-layer masks (seed {s0}); 'kept %' = kept weights / (300 x pixels) in the region.\n\n" + "\n".join(rows))


# ============================================================================================
# figures
# ============================================================================================


def _plot_masks(path, cfg, masks: dict) -> None:
    from matplotlib.patches import Rectangle

    shape = cfg["image_shape"]
    s0 = cfg["seeds"][0]
    fig, axes = new_figure_row(1 + len(SPARSITIES), figsize=(4.0 * (1 + len(SPARSITIES)), 4.0))
    im = axes[0].imshow(np.asarray(cfg["mean_intensity"]).reshape(shape), cmap="gray", vmin=0)
    axes[0].set_title("mean pixel intensity (raw, 0..1)", fontsize=10)
    fig.colorbar(im, ax=axes[0], shrink=0.8)
    central, _ = _regions(shape)
    rows, cols = np.nonzero(central)
    for ax, s in zip(axes[1:], SPARSITIES):
        m = masks[s, s0]
        img = np.asarray(m["per_pixel"]).reshape(shape)
        im = ax.imshow(img, cmap="viridis", vmin=0)
        ax.add_patch(Rectangle((cols.min() - 0.5, rows.min() - 0.5), cols.max() - cols.min() + 1,
                               rows.max() - rows.min() + 1, fill=False, edgecolor="w", linestyle="--", linewidth=1.0))
        ax.set_title(f"SNIP {s:.0%}: kept weights per pixel (of {m['n_units']})\n"
                     f"r = {fmt(m['corr_intensity'], '.2f')}, central/border kept x{m['central_kept'] / max(m['border_kept'], 1e-12):.0f}",
                     fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"LeNet-300-100 first layer: mask summed over the 300 units (seed {s0}); dashed: central region",
                 fontsize=10)
    atomic_savefig(fig, path)


def _plot_curves(path, cfg, trained: dict) -> None:
    fig, (ax,) = new_figure_row(1, figsize=(7.5, 4.5))
    s0 = cfg["seeds"][0]
    for i, s in enumerate((None,) + SPARSITIES):
        t = trained[_key(s), s0]
        e = [np.nan if v is None else 100 * v for v in t["test_error"]]
        ax.plot(t["checkpoints"], e, "o-", markersize=3, color=f"C{i}",
                label=("dense" if s is None else f"SNIP {s:.0%}") + f" (best {_pp(t['best_test_error'])}%)")
    for ph in trained["dense", s0]["phases"][1:]:
        ax.axvline(ph["start"], color="k", linestyle=":", linewidth=1.0)
    ax.set_xlabel("training step (dotted: lr divided by 10)")
    ax.set_ylabel("test error %")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"LeNet-300-100 test error during training (seed {s0})", fontsize=10)
    atomic_savefig(fig, path)


# ============================================================================================
# main
# ============================================================================================


def main(argv=None) -> int:
    run, cfg, data, progress = start(NAME, TITLE, __doc__, argv, _setup, _add_arguments)
    masks = unit_grid(run, cfg["seeds"], SPARSITIES, lambda s, seed: f"mask/sparsity={s:g}/seed={seed}",
                      lambda s, seed: _mask_unit(cfg, data, s, seed))
    sparsity = {_key(s): s for s in (None,) + SPARSITIES}  # "dense", "0.95", "0.98"
    trained = unit_grid(run, cfg["seeds"], list(sparsity), lambda k, seed: f"train/{k}/seed={seed}/steps={cfg['steps']}",
                        lambda k, seed: _train_unit(cfg, data, sparsity[k], seed, progress))
    E = _summary(cfg, trained)
    n_train = int(data[0].shape[0])
    _checks(run, cfg, E, masks, n_train)
    _sections(run, cfg, E, trained, masks, n_train)
    if cfg["image_shape"] is not None:
        _plot_masks(run.figure_path("first_layer_mask.png",
                                    "First-layer mask summed over the 300 units, as an image, beside the mean pixel intensity"),
                    cfg, masks)
    _plot_curves(run.figure_path("test_error.png", "Test error during training: dense vs SNIP 95% and 98%"), cfg, trained)
    return run.finish()


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
