"""Rendering the report's figures (PNG) from the data of :mod:`modeopt.analysis.stats`.

matplotlib is optional (``pip install 'modeopt[analysis]'``); it is imported on first use, through
its object-oriented API only (no pyplot, no change of the user's backend).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .evaluation import AccuracyCurves
from .stats import CorrelationData, LayerDistribution, ProfileBands, ReconstructionErrors, WeightExamples

__all__ = ["plot_correlation", "plot_profiles", "plot_modes", "plot_errors", "plot_cmd_vs_dmd", "plot_accuracy",
           "plot_comparison", "require_matplotlib"]

DPI = 100
CMD_COLOR, DMD_COLOR, RAW_COLOR = "#1f77b4", "#d62728", "#222222"
#: colours of the compared models, in order: CMD, then each DMD rank.
MODEL_COLORS = [CMD_COLOR, DMD_COLOR, "#ff7f0e", "#9467bd", "#8c564b"]
MODEL_STYLES = ["--", ":", "-.", (0, (5, 1)), (0, (1, 2))]
MAX_PROFILE_PANELS = 12
MAX_LAYER_MODES = 10  # modes drawn with their own colour in the layer chart; the rest are "other"
MAX_MATRIX_PIXELS = 500  # the correlation matrix is block-averaged down to this many rows


def require_matplotlib():
    """``matplotlib.figure.Figure`` and the Agg canvas, or an ImportError saying what to install."""
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("the report's figures need matplotlib: pip install 'modeopt[analysis]' "
                          "(or pip install matplotlib)") from e
    del matplotlib
    return Figure, FigureCanvasAgg


def _figure(w: float, h: float):
    Figure, Canvas = require_matplotlib()
    fig = Figure(figsize=(w, h), dpi=DPI, layout="constrained")
    Canvas(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    """Save as PNG, quantised to a 256-colour palette when Pillow is there (3-5x smaller files)."""
    import io

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=DPI, format="png")
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a matplotlib dependency
        path.write_bytes(buf.getvalue())
        return path
    with Image.open(buf) as im:
        im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            path, optimize=True)
    return path


def _mode_colors(m: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if m <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(m)]


def _block_mean(x: np.ndarray, size: int) -> tuple[np.ndarray, int]:
    """Average ``f x f`` blocks so that the matrix has at most ``size`` rows (about the axes'
    pixels): the picture is the same, drawing it and its PNG are several times cheaper.
    Returns the averaged matrix and ``f``."""
    f = -(-x.shape[0] // size)
    if f <= 1:
        return x, 1
    n = -(-x.shape[0] // f) * f
    pad = np.full((n, n), np.nan, dtype=np.float64)
    pad[: x.shape[0], : x.shape[1]] = x
    return np.nanmean(pad.reshape(n // f, f, n // f, f), axis=(1, 3)), f


# ------------------------------------------------------------------ figures
def plot_correlation(data: CorrelationData, path, *, title: str | None = None) -> Path:
    """``|corr|`` of the sampled weights, ordered by mode; dashed lines at the mode boundaries."""
    k = data.abs_corr.shape[0]
    fig = _figure(6.6, 5.8)
    ax = fig.add_subplot()
    shown, f = _block_mean(data.abs_corr, MAX_MATRIX_PIXELS)
    span = shown.shape[0] * f  # samples covered, with the padding of the last block
    im = ax.imshow(shown, cmap="viridis", vmin=0, vmax=1, interpolation="antialiased",
                   extent=(-0.5, span - 0.5, span - 0.5, -0.5))
    ax.set_xlim(-0.5, k - 0.5)
    ax.set_ylim(k - 0.5, -0.5)
    for b in data.bounds[1:-1]:
        ax.axhline(b - 0.5, color="white", ls="--", lw=0.9)
        ax.axvline(b - 0.5, color="white", ls="--", lw=0.9)
    centres = (data.bounds[:-1] + data.bounds[1:]) / 2 - 0.5
    sizes = np.diff(data.bounds)
    show = sizes >= max(1, 0.02 * k)  # label blocks wide enough to hold a number
    top = ax.secondary_xaxis("top")
    top.set_xticks(centres[show], [str(i) for i in np.flatnonzero(show)])
    top.tick_params(length=0, labelsize=8)
    top.set_xlabel("mode")
    ax.set_yticks(centres[show], [str(i) for i in np.flatnonzero(show)])
    ax.tick_params(axis="y", length=0, labelsize=8)
    ax.set_ylabel("mode")
    ax.set_xticks([])
    ax.set_xlabel(f"{k} sampled weights, grouped by mode (dendrogram order inside a mode)")
    cb = fig.colorbar(im, ax=ax, shrink=0.85)
    cb.set_label("|corr| over the trajectory")
    ax.set_title(title or f"Clustered correlation matrix ({len(sizes)} modes)", fontsize=11)
    return _save(fig, path)


def plot_profiles(bands: ProfileBands, path, *, time_label: str = "step") -> Path:
    """One panel per mode: the normalised reference profile and the band of its members."""
    m = min(len(bands.sizes), MAX_PROFILE_PANELS)
    ncols = min(m, 4 if m > 6 else 3 if m > 4 else m)
    nrows = -(-m // ncols)
    fig = _figure(3.1 * ncols + 0.4, 2.35 * nrows + 0.7)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True)
    total = max(int(bands.sizes.sum()), 1)
    colors = _mode_colors(len(bands.sizes))
    x = bands.steps
    pct = int(round(bands.level * 100))
    for j in range(nrows * ncols):
        ax = axes.flat[j]
        if j >= m:
            ax.set_visible(False)
            continue
        c = colors[j]
        ax.fill_between(x, bands.lower[j], bands.upper[j], color=c, alpha=0.25, lw=0, label=f"{pct}% of members")
        ax.plot(x, bands.reference[j], color=c, lw=1.6, label="reference")
        ax.set_title(f"mode {j}: {int(bands.sizes[j]):,} weights ({100 * bands.sizes[j] / total:.1f}%)", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if j % ncols == 0:
            ax.set_ylabel("normalised value", fontsize=9)
        if j >= (nrows - 1) * ncols or j + ncols >= m:
            ax.set_xlabel(time_label, fontsize=9)
            ax.xaxis.set_tick_params(labelbottom=True)
    axes.flat[0].legend(fontsize=7, loc="best")
    more = "" if m == len(bands.sizes) else f" (the {m} largest of {len(bands.sizes)} modes)"
    fig.suptitle(f"Reference profiles and the {pct}% band of their members{more}\n"
                 "(each weight centred, scaled to unit std, sign-aligned with its reference)", fontsize=10)
    return _save(fig, path)


def plot_modes(layers: LayerDistribution, path) -> Path:
    """Mode sizes (left) and each layer's split over the modes (right)."""
    sizes = layers.mode_sizes
    m, n_layers = len(sizes), len(layers.names)
    colors = _mode_colors(m)
    h = min(16.0, max(4.0, 0.24 * n_layers + 1.6))
    fig = _figure(11.5, h)
    gs = fig.add_gridspec(1, 2, width_ratios=[1, 1.6])
    ax = fig.add_subplot(gs[0])
    ax.bar(np.arange(m), sizes, color=colors)
    total = max(int(sizes.sum()), 1)
    if m <= 20:
        for i, s in enumerate(sizes):
            ax.text(i, s, f"{100 * s / total:.0f}%", ha="center", va="bottom", fontsize=7)
    if sizes.max() > 100 * max(sizes.min(), 1):
        ax.set_yscale("log")
    ax.set_xlabel("mode")
    ax.set_ylabel("weights")
    ax.set_xticks(np.arange(m) if m <= 20 else np.arange(0, m, max(1, m // 10)))
    const = int(layers.constant.sum())
    ax.set_title(f"Mode sizes ({total:,} moving weights" + (f", {const:,} constant)" if const else ")"),
                 fontsize=10)
    ax.grid(axis="y", alpha=0.3)

    ax = fig.add_subplot(gs[1])
    frac = layers.counts / np.maximum(layers.sizes, 1)[:, None]
    shown = min(m, MAX_LAYER_MODES)
    y = np.arange(n_layers)
    left = np.zeros(n_layers)
    for j in range(shown):
        ax.barh(y, frac[:, j], left=left, color=colors[j], label=f"mode {j}", height=0.8)
        left += frac[:, j]
    if m > shown:
        rest = frac[:, shown:].sum(axis=1)
        ax.barh(y, rest, left=left, color="#bbbbbb", label=f"modes {shown}-{m - 1}", height=0.8)
        left += rest
    if const:
        cfrac = layers.constant / np.maximum(layers.sizes, 1)
        ax.barh(y, cfrac, left=left, color="white", edgecolor="#888888", hatch="//", label="constant", height=0.8)
    ax.set_yticks(y, [f"{n} ({s:,})" for n, s in zip(layers.names, layers.sizes)],
                  fontsize=8 if n_layers <= 30 else 6)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of the layer's weights")
    ax.set_title("Modes across the layers", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _save(fig, path)


def _hist_bins(values: list[np.ndarray]) -> np.ndarray:
    finite = np.concatenate([v[np.isfinite(v) & (v > 0)] for v in values] or [np.ones(1)])
    lo = max(float(np.quantile(finite, 0.001)) if finite.size else 1e-6, 1e-8)
    hi = max(float(finite.max()) if finite.size else 1.0, lo * 10)
    return np.geomspace(lo, hi, 60)


def plot_errors(errors: list[ReconstructionErrors], layer_names: list[str], path) -> Path:
    """Per-weight relative error histograms (left) and per-layer relative errors (right)."""
    n_layers = len(layer_names)
    h = min(14.0, max(4.0, 0.2 * n_layers * max(1, len(errors) / 1.5) + 1.6))
    fig = _figure(11.5, h)
    gs = fig.add_gridspec(1, 2, width_ratios=[1.1, 1])
    ax = fig.add_subplot(gs[0])
    colors = MODEL_COLORS
    rels = [e.rel for e in errors]
    bins = _hist_bins(rels)
    for e, r, c in zip(errors, rels, colors):
        r = r[np.isfinite(r)]
        med = float(np.median(r)) if r.size else float("nan")
        ax.hist(np.clip(r, bins[0], bins[-1]), bins=bins, histtype="step", lw=1.6, color=c,
                label=f"{e.name}: median {med:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("relative error of a weight (RMS error / its std over time)")
    ax.set_ylabel("weights")
    ax.set_title("Per-weight reconstruction error", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)

    ax = fig.add_subplot(gs[1])
    y = np.arange(n_layers)
    hgt = 0.8 / len(errors)
    for k, (e, c) in enumerate(zip(errors, colors)):
        ax.barh(y - 0.4 + hgt * (k + 0.5), np.maximum(e.layer_rel, 1e-12), height=hgt, color=c, label=e.name)
    ax.set_yticks(y, layer_names, fontsize=8 if n_layers <= 30 else 6)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("relative error of the layer (||error|| / ||movement||)")
    ax.set_title("Per-layer reconstruction error", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def plot_cmd_vs_dmd(errors: list[ReconstructionErrors], examples: WeightExamples | None, steps, path, *,
                    time_label: str = "step") -> Path:
    """Relative error over time for each model (top) and a few weights with their reconstructions."""
    n_ex = 0 if examples is None else len(examples.rows)
    fig = _figure(11.5, 6.6 if n_ex else 3.6)
    gs = fig.add_gridspec(2 if n_ex else 1, max(n_ex, 1), height_ratios=[1, 1] if n_ex else [1])
    ax = fig.add_subplot(gs[0, :])
    colors = MODEL_COLORS
    steps = np.asarray(steps)
    for e, c in zip(errors, colors):
        v = np.where(np.isfinite(e.time_rel), e.time_rel, np.nan)
        ax.plot(steps, np.maximum(v, 1e-12), color=c, lw=1.6, marker="o", ms=2.5,
                label=f"{e.name} (whole run {e.total_rel:.3g})")
    ax.set_yscale("log")
    ax.set_xlabel(time_label)
    ax.set_ylabel("||x̂ − x|| / RMS ||x − mean||")
    ax.set_title("Reconstruction error over time (relative to the weights' RMS movement)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    if n_ex:
        for i in range(n_ex):
            ax = fig.add_subplot(gs[1, i])
            ax.plot(steps, examples.raw[i], color=RAW_COLOR, lw=1.4, label="recorded")
            ax.plot(steps, examples.cmd[i], color=CMD_COLOR, lw=1.3, ls="--", label=errors[0].name if errors else "CMD")
            if examples.dmd is not None:
                d = examples.dmd[i]
                lo, hi = examples.raw[i].min(), examples.raw[i].max()
                pad = 0.5 * (hi - lo) + 1e-12
                ax.plot(steps, d, color=DMD_COLOR, lw=1.2, ls=":", label=examples.dmd_name)
                if np.isfinite(d).all() and (d.min() < lo - 3 * pad or d.max() > hi + 3 * pad):
                    ax.set_ylim(lo - 3 * pad, hi + 3 * pad)  # keep a DMD blow-up from hiding the weight
            ax.set_title(f"{examples.names[i]} (mode {int(examples.modes[i])})", fontsize=8)
            ax.set_xlabel(time_label, fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if i == 0:
                ax.set_ylabel("weight value", fontsize=8)
                ax.legend(fontsize=7)
    return _save(fig, path)


def plot_accuracy(acc: AccuracyCurves, path, *, time_label: str = "step", metric: str = "accuracy") -> Path:
    """The metric of the recorded weights and of each reconstruction along the run; the right
    panel zooms on the second half, where the curves are close."""
    fig = _figure(11.5, 4.2)
    axes = fig.subplots(1, 2, width_ratios=[1, 1])
    names = list(acc.curves)
    half = acc.steps >= acc.steps[0] + (acc.steps[-1] - acc.steps[0]) / 2
    for ax, sel in zip(axes, [np.ones_like(half), half]):
        for k, name in enumerate(names):
            v = acc.curves[name]
            color = RAW_COLOR if k == 0 else MODEL_COLORS[(k - 1) % len(MODEL_COLORS)]
            ls = "-" if k == 0 else MODEL_STYLES[(k - 1) % len(MODEL_STYLES)]
            ax.plot(acc.steps[sel], v[sel], color=color, ls=ls, lw=1.6 if k < 2 else 1.3, marker="o", ms=2.5,
                    label=f"{name} (end {v[-1]:.3f})")
        ax.set_xlabel(time_label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(metric)
    axes[0].set_title(f"{metric.capitalize()} along the run", fontsize=10)
    axes[1].set_title("Second half (zoom)", fontsize=10)
    # The zoom follows the recorded and CMD curves: a failing baseline must not squash them.
    main = np.concatenate([acc.curves[n][half] for n in names[:2]])
    main = main[np.isfinite(main)]
    if main.size:
        lo, hi = float(main.min()), float(main.max())
        pad = 0.15 * (hi - lo) + 2e-3
        axes[1].set_ylim(lo - pad, hi + pad)
    axes[0].legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def plot_comparison(cmp: Any, path, *, title: str | None = None) -> Path:
    """A :class:`~modeopt.analysis.DynamicsComparison` (not imported here: it imports this module
    to plot itself). Left: both Koopman spectra in the complex plane (unit circle; matched pairs
    joined). Right: the null (within-run window distances) next to the between-run ones, and the statistic."""
    fig = _figure(11.5, 4.9)
    axes = fig.subplots(1, 2, width_ratios=[1, 1.15])
    ax = axes[0]
    la, lb = cmp.spectrum_a.eigenvalues, cmp.spectrum_b.eigenvalues
    name_a, name_b = cmp.labels
    for i, j in cmp.pairs:
        ax.plot([la[i].real, lb[j].real], [la[i].imag, lb[j].imag], color="#888888", lw=0.9, zorder=1)
    ax.scatter(la.real, la.imag, s=26, marker="o", facecolors="none", edgecolors=CMD_COLOR, lw=1.3, zorder=3,
               label=f"{name_a} ({len(la)})")
    ax.scatter(lb.real, lb.imag, s=30, marker="x", color=DMD_COLOR, lw=1.3, zorder=3, label=f"{name_b} ({len(lb)})")
    theta = np.linspace(0, 2 * np.pi, 721)
    ax.plot(np.cos(theta), np.sin(theta), color=RAW_COLOR, lw=0.8, ls="--", zorder=0, label="unit circle")
    # Fit the view to the eigenvalues: training spectra often crowd near 1, where the whole
    # circle would squash them into a dot.
    pts = np.concatenate([la, lb])
    lo_x, hi_x, lo_y, hi_y = pts.real.min(), pts.real.max(), pts.imag.min(), pts.imag.max()
    span = max(hi_x - lo_x, hi_y - lo_y, 0.05)
    cx, cy = (lo_x + hi_x) / 2, (lo_y + hi_y) / 2
    half = 0.6 * span
    if half > 0.8:  # they fill most of the disc anyway: show all of it
        cx, cy, half = 0.0, 0.0, max(1.1, 0.6 * span)
    ax.set_xlim(cx - half, cx + half)
    ax.set_ylim(cy - half, cy + half)
    ax.set_aspect("equal")
    ax.axhline(0, color="#cccccc", lw=0.6, zorder=0)
    ax.set_xlabel("Re λ")
    ax.set_ylabel("Im λ")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=1, frameon=False)
    ax.set_title(f"Koopman spectra (rank {cmp.rank}, {cmp.delays} delays)\n"
                 f"W1 = {cmp.distance:.4g}, p = {cmp.p_value:.3g}", fontsize=10)

    ax = axes[1]
    both = np.concatenate([cmp.null, cmp.between])
    bins = np.linspace(0, max(float(both.max()), cmp.statistic) * 1.05 + 1e-12, 40)
    ax.hist(cmp.null, bins=bins, color="#7f7f7f", alpha=0.55,
            label=f"null: within a run ({len(cmp.null)})")
    ax.hist(cmp.between, bins=bins, histtype="step", lw=1.6, color="#2ca02c",
            label=f"between the runs ({len(cmp.between)})")
    ax.axvline(cmp.statistic, color=RAW_COLOR, lw=1.8, label=f"statistic: median between = {cmp.statistic:.4g}")
    ax.set_xlabel(f"W1 distance between the spectra of two windows of {cmp.window} samples")
    ax.set_ylabel("window pairs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(f"Null distribution: p = {cmp.p_value:.3g} (share of the null ≥ the statistic)", fontsize=10)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)
