r"""[DI]'s MLP-7-linear experiment: L1 neuron pruning breaks dynamical isometry, OrthP repairs it.

PAPER.md section 11 (Wang, Qin, Bai, Fu 2021, "Dynamical Isometry: The Missing Ingredient for
Neural Network Pruning"). The pipeline, per replicate ``r`` (seeds from ``--seed`` and ``r``):

1. **Network and data.** MLP-7-linear: ``1024-100-100-100-100-100-100-10``, identity activation,
   a bias on every layer, VS-L init (``N(0, 1/fan_in)``; [DI]'s PyTorch code uses PyTorch's default
   init). MNIST images (mnist5k by default: 4,000 train / 1,000 test) **padded with 2 black pixels
   on each side to 32 x 32 = 1024 inputs** instead of [DI]'s resize to 32 x 32 (refnet has no
   resizer; the padding keeps the pixels as they are): ``x / 255`` padded with 0, then
   standardised by one scalar mean and std of the padded training split (PAPER.md section 8).
   Other data sets are padded the same way (2 pixels each side) and flattened.
2. **Pretraining** (settings are ours: [DI] starts from a trained checkpoint whose recipe is not
   in PAPER.md): SGD, momentum 0.9, weight decay 1e-4, batch 100, lr 0.01 constant.
3. **L1-norm neuron pruning** (:func:`refnet.neuron_pruning.l1_neuron_prune`): keep the 20 units of
   largest incoming-weight L1 norm in each of layers 1-6; the units are removed, giving the dense
   ``1024-20-20-20-20-20-20-10`` network.
4. **OrthP** (:func:`refnet.neuron_pruning.orthp`, gain 1 for linear): every weight matrix replaced by the
   orthonormal factor of its QR with the sign fix (rows for ``n_out < n_in``, else columns);
   biases untouched. For this network that makes ``W^1`` (20 x 1024) and ``W^7`` (10 x 20) have
   orthonormal rows and ``W^2..W^6`` (20 x 20) orthogonal, so the input-output Jacobian of the
   linear net ``J = W^7 ... W^1`` (10 x 1024) satisfies ``J J^T = I_10``: **every** JSV is 1,
   up to rounding. The script measures it.
5. **Fine-tuning**, with and without OrthP, at the two initial learning rates of [DI], 1e-2 and
   1e-3, each with [DI]'s step schedule ``lr, lr/10, lr/100`` over three equal stages
   (``lr_ft 0:0.01,30:0.001,60:0.0001`` over 90 epochs in [DI]'s script), SGD momentum 0.9,
   weight decay 1e-4, batch 100. refnet's ``train`` has a constant lr, so each stage is one call;
   the momentum buffer restarts at each stage (a deviation, stated). Quick mode runs shorter
   stages than [DI]'s 30 epochs.

Metrics: the JSV mean of the whole-network Jacobian ``dlogits/dx^0`` (PAPER.md section 6,
:func:`refnet.spectrum.jsv_stats`; for a linear net it is the same for every input, so 10 test
images are used) after pretraining, after pruning and after OrthP, and the test accuracy after
fine-tuning (final checkpoint) per learning rate.

Checks ([DI]'s claims, with criteria judged over every replicate):

* pruning breaks dynamical isometry: JSV mean after L1 pruning off from 1 by a factor >= 2;
* OrthP restores it exactly for the linear net: max |sigma - 1| <= 1e-12;
* without OrthP the larger fine-tuning lr helps: acc(1e-2) - acc(1e-3) > 0 in every replicate;
* with OrthP the advantage of the larger lr shrinks: the gap without OrthP minus the gap with
  OrthP is > 0 in every replicate.
"""

from __future__ import annotations


import numpy as np

from .common import Run, fmt, parse_args

NAME = "orthp"
DESCRIPTION = ("[DI]: MLP-7-linear on MNIST padded to 32x32, L1 neuron pruning (keep 20 of 100 in layers 1-6), "
               "JSV after pruning and after OrthP, test accuracy after fine-tuning at lr 1e-2 and 1e-3 with "
               "and without OrthP.")
TITLE = "[DI] MLP-7-linear: L1 neuron pruning, dynamical isometry and OrthP"

WIDTH, DEPTH, KEEP = 100, 7, 20
LRS = (1e-2, 1e-3)
METHODS = ("L1", "L1+OrthP")
MOMENTUM, WEIGHT_DECAY, BATCH = 0.9, 1e-4, 100
PRETRAIN_LR = 1e-2
JSV_EXAMPLES = 10

#: per mode: training-set and test-set sizes (None: all), pretraining steps, steps of each of the
#: three fine-tuning stages (lr, lr/10, lr/100), replicates
SETTINGS = {
    "tiny": dict(n_train=400, n_test=200, pretrain_steps=20, stage_steps=4, reps=1),
    "quick": dict(n_train=None, n_test=None, pretrain_steps=400, stage_steps=400, reps=3),
    "full": dict(n_train=None, n_test=None, pretrain_steps=3600, stage_steps=1200, reps=5),
}


def load_padded(args, split: str):
    """``(X, y)``: images / scale, padded with 2 zero (black) pixels per side, flattened (n, C*(H+4)*(W+4))."""
    from refnet import data

    X, y = data.load(args.data, split=split, data_dir=args.data_dir, preprocess=False, flatten=False)
    X = X / data.info(args.data).scale  # (n, C, H, W) in [0, 1]
    X = np.pad(X, ((0, 0), (0, 0), (2, 2), (2, 2)))  # (n, C, H+4, W+4): 28x28 -> 32x32
    return X.reshape(X.shape[0], -1), y


def _data(args, cfg):
    Xtr, ytr = load_padded(args, "train")
    Xte, yte = load_padded(args, "test")
    if cfg["n_train"]:
        Xtr, ytr = Xtr[: cfg["n_train"]], ytr[: cfg["n_train"]]
    if cfg["n_test"]:
        Xte, yte = Xte[: cfg["n_test"]], yte[: cfg["n_test"]]
    mu, sd = Xtr.mean(), Xtr.std()  # one scalar mean and std of the (padded) training split
    return (Xtr - mu) / sd, ytr, (Xte - mu) / sd, yte


def _rng(seed: int, *tags: int) -> np.random.Generator:
    return np.random.default_rng([seed, *tags])


def _accuracy(net, X, y) -> float:
    return float(np.mean(net.forward(X).argmax(axis=1) == y))


def _jsv(net, X) -> dict:
    from refnet.spectrum import singular_values, summarize

    sv = singular_values(net, X[:JSV_EXAMPLES], zero_rtol=0.0)  # (n, 10)
    s = summarize(sv)
    return {"mean": s["mean"], "std": s["std"], "min": s["min"], "max": s["max"], "cn_mean": s["cn_mean"],
            "max_abs_sv_minus_1": float(np.abs(sv - 1.0).max())}


class _Pipeline:
    """Pretrained, pruned and OrthP networks of one replicate, built on first use (a resumed run
    that has every unit of the replicate never builds them)."""

    def __init__(self, args, cfg, data, r: int):
        self.args, self.cfg, self.data, self.r = args, cfg, data, r
        self._nets = None

    def nets(self):
        if self._nets is None:
            import refnet as rn
            from refnet.neuron_pruning import l1_neuron_prune, orthp

            Xtr, ytr, Xte, yte = self.data
            seed = self.args.seed
            net = rn.mlp([Xtr.shape[1]] + [WIDTH] * (DEPTH - 1) + [10], activation="identity", init="lecun",
                         seed=_rng(seed, self.r, 0))
            rn.train(net, Xtr, ytr, steps=self.cfg["pretrain_steps"], lr=PRETRAIN_LR, batch_size=BATCH,
                     momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, seed=_rng(seed, self.r, 1), progress=False)
            pruned = l1_neuron_prune(net, KEEP)  # layers 1-6 (every affine layer but the last)
            self._nets = {"dense": net, "L1": pruned, "L1+OrthP": orthp(pruned, gain=1.0)}
        return self._nets


def _prune_unit(pipe: _Pipeline) -> dict:
    nets = pipe.nets()
    _, _, Xte, yte = pipe.data
    out = {"widths": [layer.n_out for layer in nets["L1"].layers], "in_dim": int(Xte.shape[1])}
    for key in ("dense", "L1", "L1+OrthP"):
        out[key] = {"acc": _accuracy(nets[key], Xte, yte), "jsv": _jsv(nets[key], Xte)}
    return out


def _finetune_unit(pipe: _Pipeline, lr: float, method: str) -> dict:
    import refnet as rn

    Xtr, ytr, Xte, yte = pipe.data
    net = pipe.nets()[method].copy()
    accs, steps = [], pipe.cfg["stage_steps"]
    for k, factor in enumerate((1.0, 0.1, 0.01)):  # [DI]'s step schedule
        h = rn.train(net, Xtr, ytr, steps=steps, lr=lr * factor, batch_size=BATCH, momentum=MOMENTUM,
                     weight_decay=WEIGHT_DECAY, seed=_rng(pipe.args.seed, pipe.r, 2, k), X_test=Xte, y_test=yte,
                     eval_every=max(1, steps // 4), progress=False)
        accs += [a for a in h.test_acc if a is not None]
    return {"acc_final": accs[-1], "acc_best": max(accs), "test_acc": accs, "jsv_after": _jsv(net, Xte)["mean"]}


def main(argv=None) -> int:
    args = parse_args(NAME, DESCRIPTION, argv)
    run = Run(NAME, args, TITLE)
    cfg = SETTINGS[args.mode]
    data = _data(args, cfg)
    reps = cfg["reps"]
    prune, ft = [], []
    for r in range(reps):
        pipe = _Pipeline(args, cfg, data, r)
        prune.append(run.unit(f"rep{r}/prune", lambda: _prune_unit(pipe)))
        ft.append({(lr, m): run.unit(f"rep{r}/finetune/lr={lr:g}/{m}", lambda lr=lr, m=m: _finetune_unit(pipe, lr, m))
                   for lr in LRS for m in METHODS})

    in_dim = prune[0]["in_dim"]
    arch = f"{in_dim}-" + "-".join(str(w) for w in prune[0]["widths"])
    n_train = data[0].shape[0]
    epochs = cfg["stage_steps"] * BATCH / n_train
    setting = (f"{reps} replicate(s); pretrain {cfg['pretrain_steps']} steps; fine-tune 3 stages (lr, lr/10, lr/100) "
               f"x {cfg['stage_steps']} steps = {epochs:.3g} epochs of {n_train} images each ([DI]: 30 epochs each)")

    # --- JSV ---------------------------------------------------------------------------------
    jd = [p["dense"]["jsv"]["mean"] for p in prune]
    jp = [p["L1"]["jsv"]["mean"] for p in prune]
    cn = [p["L1"]["jsv"]["cn_mean"] for p in prune]
    run.check("JSV mean after L1 neuron pruning (MLP-7-linear, keep 20/100 in layers 1-6) [DI]",
              "pruning breaks dynamical isometry: JSV mean far from 1",
              f"{fmt(jp)} (CN mean {fmt(cn)}); pretrained dense: {fmt(jd)}",
              "JSV mean < 0.5 or > 2 in every replicate", all(v < 0.5 or v > 2.0 for v in jp))
    jo = [p["L1+OrthP"]["jsv"] for p in prune]
    dev = max(j["max_abs_sv_minus_1"] for j in jo)
    run.check("JSV after OrthP (gain 1, linear) [DI]",
              "OrthP restores dynamical isometry; for this linear net J J^T = I_10 exactly "
              "(W1, W7 orthonormal rows, W2..W6 orthogonal)",
              f"mean {fmt([j['mean'] for j in jo], '.15g')}, max |σ-1| = {dev:.1e}", "max |σ-1| <= 1e-12",
              dev <= 1e-12)

    # --- accuracy vs fine-tuning lr --------------------------------------------------------------
    def acc(m, lr):
        return np.array([f[(lr, m)]["acc_final"] for f in ft])

    gaps = {m: acc(m, LRS[0]) - acc(m, LRS[1]) for m in METHODS}

    def mstd(v):
        v = np.asarray(v, dtype=np.float64)
        return f"{v.mean():.4f}" + (f" ± {v.std(ddof=1):.4f} (sd)" if v.size > 1 else "")

    for m in METHODS:
        run.check(f"test accuracy after fine-tuning, {m}, lr {LRS[0]:g} / {LRS[1]:g} (setting: {setting})",
                  "reported per lr", f"{mstd(acc(m, LRS[0]))} / {mstd(acc(m, LRS[1]))}",
                  "reported, not judged", None)
    g = gaps["L1"]
    run.check("without OrthP the larger fine-tuning lr helps [DI]",
              f"acc(lr={LRS[0]:g}) > acc(lr={LRS[1]:g})", f"gap = {mstd(g)}; per replicate {fmt(g, '.4f')}",
              "gap > 0 in every replicate", bool(np.all(g > 0)))
    d = gaps["L1"] - gaps["L1+OrthP"]
    run.check("with OrthP the accuracy is less sensitive to the fine-tuning lr [DI]",
              "the larger-lr advantage shrinks with OrthP",
              f"gap with OrthP = {mstd(gaps['L1+OrthP'])}; reduction = {mstd(d)}; per replicate {fmt(d, '.4f')}",
              "gap(L1) - gap(L1+OrthP) > 0 in every replicate", bool(np.all(d > 0)))

    # --- detail tables --------------------------------------------------------------------------
    lines = [f"### Networks after pretraining and pruning ({arch} after pruning)", "",
             "| replicate | net | test acc (no fine-tuning) | JSV mean | JSV std | JSV min | JSV max | CN mean |",
             "|---|---|---|---|---|---|---|---|"]
    for r, p in enumerate(prune):
        for key, lab in (("dense", "pretrained dense"), ("L1", "L1-pruned"), ("L1+OrthP", "L1-pruned + OrthP")):
            j = p[key]["jsv"]
            lines.append(f"| {r} | {lab} | {p[key]['acc']:.4f} | {j['mean']:.4g} | {j['std']:.3g} | {j['min']:.4g} | "
                         f"{j['max']:.4g} | {j['cn_mean']:.4g} |")
    lines += ["", "### Fine-tuning", "",
              "| replicate | method | initial lr | final test acc | best test acc | JSV mean after fine-tuning |",
              "|---|---|---|---|---|---|"]
    for r, f in enumerate(ft):
        for m in METHODS:
            for lr in LRS:
                u = f[(lr, m)]
                lines.append(f"| {r} | {m} | {lr:g} | {u['acc_final']:.4f} | {u['acc_best']:.4f} | {u['jsv_after']:.4g} |")
    lines += ["", f"Setting: {setting}; SGD momentum {MOMENTUM}, weight decay {WEIGHT_DECAY}, batch {BATCH}; "
              f"pretraining lr {PRETRAIN_LR} (ours). Deviations from [DI]: MNIST padded (not resized) to 32x32; "
              "refnet's VS-L init instead of PyTorch's default; momentum restarts at each lr stage; "
              "quick mode uses shorter stages than [DI]'s 30 epochs; mnist5k is a 5,000-image subset of MNIST."]
    run.section("\n".join(lines))
    return run.finish()


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
