"""Figures (matplotlib, the ``plot`` extra: ``pip install refnet[plot]``): the one place refnet
makes and saves them, for the commands and the validation scripts alike.

matplotlib is imported only inside these functions, and only its object-oriented API is used
(``matplotlib.figure.Figure`` with the Agg canvas): no pyplot, no global backend switch, no window.
Every figure is written as PNG atomically (a temporary file in the same folder, then
``os.replace``) and the path returned.

* :func:`new_figure`, :func:`new_figure_row` -- an empty figure and its axes, to draw on;
  :func:`atomic_savefig` writes it; :func:`require_matplotlib` says how to install matplotlib;
* :func:`plot_jsv_histograms` -- histograms of the pooled singular values, one per initialisation;
* :func:`plot_jsv_ecdf` -- their empirical CDFs;
* :func:`plot_layer_bands` -- per layer ``l``, the min-max band, the 5-95% band and the median of
  the singular values of ``J^{l-1,l}``, with a dashed line at 1 (isometry);
* :func:`plot_training_curves` -- training loss and test error against the SGD step.

When the positive values span more than two decades the value axis is logarithmic; zeros (rank
deficient Jacobians) cannot be drawn there, and the legend says how many were left out.
"""

from __future__ import annotations

import textwrap

import numpy as np

from ._io import atomic_savefig

__all__ = [
    "atomic_savefig",
    "new_figure",
    "new_figure_row",
    "plot_jsv_ecdf",
    "plot_jsv_histograms",
    "plot_layer_bands",
    "plot_training_curves",
    "require_matplotlib",
]

_INSTALL = "matplotlib is needed for refnet.plots; install it with: pip install refnet[plot]"

#: positive values spanning more than this ratio get a logarithmic axis
_DECADES_RATIO = 100.0


def require_matplotlib() -> None:
    """Raise ``ImportError`` saying how to install matplotlib when it cannot be imported."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"{_INSTALL} ({exc})") from exc


def new_figure(nrows: int = 1, ncols: int = 1, figsize=(7.0, 4.5), sharey: bool = False):
    """A matplotlib Figure on the Agg canvas (no pyplot state, constrained layout) and its
    ``(nrows, ncols)`` grid of axes (always 2-D)."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False, sharey=sharey)


def new_figure_row(ncols: int = 1, figsize=(7.0, 4.5), sharey: bool = False):
    """:func:`new_figure` with one row: ``(fig, axes)`` with ``axes`` of length ``ncols``."""
    fig, axes = new_figure(1, ncols, figsize, sharey=sharey)
    return fig, axes[0]


def _wrap(title: str, width: int = 72) -> str:
    return textwrap.fill(str(title), width) if title else ""


def _check_spectra(spectra) -> dict:
    if not isinstance(spectra, dict) or not spectra:
        raise TypeError(f"spectra must be a non-empty dict label -> 1-D array of singular values, got {type(spectra).__name__}")
    out = {}
    for label, v in spectra.items():
        a = np.asarray(v, dtype=np.float64).ravel()
        if a.size == 0:
            raise ValueError(f"spectra[{label!r}] must hold at least one value, got none")
        if np.isnan(a).any():
            raise ValueError(f"spectra[{label!r}] must not hold NaN, got {int(np.isnan(a).sum())}")
        out[str(label)] = a
    return out


def _use_log(values) -> bool:
    """True when the positive finite values span more than two decades."""
    pos = np.concatenate([v[(v > 0) & np.isfinite(v)] for v in values]) if values else np.zeros(0)
    return pos.size > 0 and pos.max() / pos.min() > _DECADES_RATIO


def _dropped_note(v: np.ndarray, log: bool) -> str:
    n_zero = int(np.count_nonzero(v <= 0)) if log else 0
    n_inf = int(np.count_nonzero(~np.isfinite(v)))
    parts = [f"{n_zero} zeros" if n_zero else "", f"{n_inf} inf" if n_inf else ""]
    parts = [p for p in parts if p]
    return f" ({', '.join(parts)} not shown)" if parts else ""


def plot_jsv_histograms(spectra: dict, path, bins: int = 60, log: bool = True,
                        title: str = "Singular values of the input-output Jacobian dx^K/dx^0") -> str:
    """Overlaid histograms of singular values, one per label (e.g. per initialisation).

    Parameters
    ----------
    spectra : dict label -> array_like
        The pooled singular values (any shape, flattened) of each run.
    path : str or os.PathLike
        Where the PNG goes (folders are created).
    bins : int
        Number of bins over the common range of all labels.
    log : bool
        Logarithmic value axis and log-spaced bins when the positive values span more than two
        decades (values <= 0 are then left out and counted in the legend).
    title : str

    Returns
    -------
    str : ``path``
    """
    spectra = _check_spectra(spectra)
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
        raise ValueError(f"bins must be an int >= 1, got {bins!r}")
    logx = bool(log) and _use_log(list(spectra.values()))
    shown = {k: v[np.isfinite(v) & ((v > 0) if logx else True)] for k, v in spectra.items()}
    allv = np.concatenate([v for v in shown.values()]) if shown else np.zeros(0)
    fig, (ax,) = new_figure_row()
    if allv.size:
        lo, hi = float(allv.min()), float(allv.max())
        if logx:
            edges = np.geomspace(lo, hi, bins + 1) if hi > lo else np.geomspace(lo / 1.1, hi * 1.1, bins + 1)
        else:
            edges = np.linspace(lo, hi, bins + 1) if hi > lo else np.linspace(lo - 0.5, hi + 0.5, bins + 1)
        for i, (label, v) in enumerate(shown.items()):
            full = spectra[label]
            w = np.full(v.shape, 1.0 / full.size)  # fraction of ALL values of this label
            color = f"C{i % 10}"
            ax.hist(v, bins=edges, weights=w, histtype="stepfilled", alpha=0.25, color=color)
            ax.hist(v, bins=edges, weights=w, histtype="step", linewidth=1.5, color=color,
                    label=f"{label}: n={full.size}" + _dropped_note(full, logx))
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel("singular value sigma (dimensionless)" + (", log scale" if logx else ""))
    ax.set_ylabel("fraction of singular values per bin")
    ax.set_title(_wrap(title), fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return atomic_savefig(fig, path)


def plot_jsv_ecdf(spectra: dict, path, log: bool = True,
                  title: str = "Empirical CDF of the input-output Jacobian singular values") -> str:
    """Empirical CDFs ``F(s) = #{sigma <= s} / n`` of the singular values, one curve per label.

    Zeros count in ``F`` (the curve starts at their fraction) but lie left of a log axis.
    """
    spectra = _check_spectra(spectra)
    logx = bool(log) and _use_log(list(spectra.values()))
    fig, (ax,) = new_figure_row()
    for label, v in spectra.items():
        s = np.sort(v)
        F = np.arange(1, s.size + 1) / s.size
        keep = np.isfinite(s) & ((s > 0) if logx else True)
        ax.step(s[keep], F[keep], where="post", linewidth=1.5, label=f"{label}: n={s.size}" + _dropped_note(v, logx))
    if logx:
        ax.set_xscale("log")
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("singular value sigma (dimensionless)" + (", log scale" if logx else ""))
    ax.set_ylabel("fraction of singular values <= sigma")
    ax.set_title(_wrap(title), fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return atomic_savefig(fig, path)


def plot_layer_bands(layer_values, path, log: bool = True,
                     title: str = "Singular values of the layer Jacobians J^(l-1,l)") -> str:
    """Per layer ``l``: min-max band, 5-95% band and median of the singular values of ``J^{l-1,l}``.

    Parameters
    ----------
    layer_values : list of array_like, or dict label -> list of array_like
        Per layer, the singular values (any shape, flattened) of ``J^{l-1,l}`` over all examples,
        as :func:`refnet.spectrum.layer_singular_values` returns. A dict gives one panel per label
        (side by side, shared value axis).
    path : str or os.PathLike
    log : bool
        Logarithmic value axis when the positive values span more than two decades.

    A dashed line marks sigma = 1 (isometry).
    """
    if isinstance(layer_values, dict):
        groups = dict(layer_values)
    else:
        groups = {"": layer_values}
    if not groups:
        raise TypeError("layer_values must be a non-empty list of arrays or dict label -> list")
    clean = {}
    for label, layers in groups.items():
        if not isinstance(layers, (list, tuple)) or not layers:
            raise TypeError(f"layer_values[{label!r}] must be a non-empty list of per-layer arrays, got {type(layers).__name__}")
        clean[label] = _check_spectra({i + 1: a for i, a in enumerate(layers)})
    logy = bool(log) and _use_log([v for d in clean.values() for v in d.values()])
    n = len(clean)
    fig, axes = new_figure_row(n, figsize=(max(5.0, 3.6 * n), 4.5), sharey=True)
    for ax, (label, layers) in zip(axes, clean.items()):
        ls = np.array([int(k) for k in layers])
        q = np.array([np.percentile(v[np.isfinite(v)], [0, 5, 50, 95, 100]) if np.isfinite(v).any() else [np.nan] * 5
                      for v in layers.values()])  # (L, 5)
        ax.fill_between(ls, q[:, 0], q[:, 4], alpha=0.2, color="C0", label="min-max")
        ax.fill_between(ls, q[:, 1], q[:, 3], alpha=0.45, color="C0", label="5-95%")
        ax.plot(ls, q[:, 2], "o-", color="C0", markersize=4, label="median")
        ax.axhline(1.0, linestyle="--", color="k", linewidth=1.0, label="sigma = 1 (isometry)")
        if logy:
            ax.set_yscale("log", nonpositive="clip")
        ax.set_xticks(ls)
        ax.set_xlabel("layer l")
        n_zero = sum(int(np.count_nonzero(v <= 0)) for v in layers.values())
        note = f" ({n_zero} zeros below the axis)" if logy and n_zero else ""
        ax.set_title(_wrap(f"{label}{note}", 40), fontsize=9)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("singular value of J^(l-1,l)" + (" (log scale)" if logy else ""))
    axes[0].legend(fontsize=8)
    fig.suptitle(_wrap(title, 40 * n if n > 1 else 72), fontsize=10)
    return atomic_savefig(fig, path)


def plot_training_curves(hist, path) -> str:
    """Two panels against the SGD step: the training loss (mean since the previous evaluation, log
    scale) and the test error in percent.

    Parameters
    ----------
    hist : refnet.training.History
        Its ``steps``, ``train_loss`` and ``test_acc`` (one entry per evaluation).
    path : str or os.PathLike

    Returns
    -------
    str : ``path``
    """
    fig, ax = new_figure_row(2, figsize=(10, 3.6))
    ax[0].plot(hist.steps, hist.train_loss, marker=".")
    ax[0].set_xlabel("SGD step")
    ax[0].set_ylabel("training loss (mean since last evaluation)")
    ax[0].set_yscale("log")
    ax[1].plot(hist.steps, [100 * (1 - a) for a in hist.test_acc], marker=".", color="C1")
    ax[1].set_xlabel("SGD step")
    ax[1].set_ylabel("test error (%)")
    return atomic_savefig(fig, path)
