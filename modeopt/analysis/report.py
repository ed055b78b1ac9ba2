"""The analysis report of a training run: CMD (and DMD) of its trajectory, figures, HTML/markdown.

:func:`analyze` computes everything (:class:`Report` holds the data), then writes PNG figures,
``index.html``, ``report.md`` and ``summary.json`` into ``out``.
"""

from __future__ import annotations

import html
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from modeopt.utils.checks import check_int
from modeopt.decomposition.algorithm import Decomposition, decompose
from modeopt.trajectories.trajectory import Trajectory
from .dmd import DMD, dmd
from .evaluation import AccuracyCurves, Evaluate, ModelFactory, accuracy_curves
from .stats import (
    CorrelationData, LayerDistribution, ProfileBands, ReconstructionErrors, WeightExamples,
    correlation_data, layer_distribution, profile_bands, reconstruction_errors, weight_examples,
)

__all__ = ["Report", "analyze", "FIGURES"]

#: figure key -> (file name, caption).
FIGURES = {
    "correlation": ("correlation.png",
                    "The |corr| matrix of the sampled weights, grouped by mode (dashed lines: mode boundaries). "
                    "Bright square blocks on the diagonal are modes: their weights move together."),
    "profiles": ("profiles.png",
                 "Each mode's reference weight over time (normalised: centred, unit std, sign-aligned), with the "
                 "band holding 95% of its members. A narrow band means the mode's weights follow one profile."),
    "modes": ("modes.png",
              "How many weights each mode holds, and how each layer's weights split over the modes."),
    "errors": ("errors.png",
               "How well CMD and DMD reproduce each weight (relative error: RMS error over the weight's own "
               "standard deviation in time; 1 = no better than its mean) and each layer. DMD at rank r stores r "
               "numbers per weight, CMD two (a, b)."),
    "cmd_vs_dmd": ("cmd_vs_dmd.png",
                   "Top: the reconstruction error of CMD and DMD at every sample. Bottom: a few weights from the "
                   "largest modes, recorded (black) and reconstructed."),
    "accuracy": ("accuracy.png",
                 "The evaluation metric of the recorded weights and of their CMD and DMD reconstructions at every "
                 "evaluated sample (right: the second half of the run, zoomed)."),
}


@dataclass
class Report:
    """Everything :func:`analyze` computed, and where it wrote the report."""

    out: Path | None
    trajectory: Trajectory
    decomposition: Decomposition
    dmd: dict[str, DMD]
    correlation: CorrelationData
    profiles: ProfileBands
    layers: LayerDistribution
    errors: dict[str, ReconstructionErrors]
    examples: WeightExamples
    accuracy: AccuracyCurves | None
    summary: dict
    figures: dict[str, Path] = field(default_factory=dict)
    time_label: str = "step"

    @property
    def index(self) -> Path | None:
        """The report's ``index.html`` (``None`` when nothing was written)."""
        return None if self.out is None else self.out / "index.html"


def analyze(
    trajectory: Trajectory,
    *,
    out: str | os.PathLike | None,
    n_modes: int | None = None,
    threshold: float | None = None,
    n_samples: int = 1000,
    seed: int = 0,
    dmd_rank: int | list[int] | None = None,
    evaluate: Evaluate | None = None,
    model_factory: ModelFactory | None = None,
    eval_every: int = 1,
    metric: str = "accuracy",
    time_label: str = "step",
    title: str | None = None,
    max_members: int = 2000,
    figures: bool = True,
    progress: bool | None = None,
) -> Report:
    """Decompose a trajectory with CMD (and exact DMD), and write the analysis report.

    Args:
        trajectory: the recorded run (see :func:`modeopt.analysis.load_trajectory`).
        out: directory for the PNG figures, ``index.html``, ``report.md`` and ``summary.json``
            (``None``: compute only).
        n_modes, threshold: CMD's number of modes M or distance threshold t (exactly one).
        n_samples, seed: CMD's K sampled weights and sampling seed.
        dmd_rank: rank r of the DMD baseline, or a list of ranks; default ``[M, 2]``: the
            paper's comparison at r = M, and r = 2, which stores as much per weight as CMD
            (two numbers). Capped at T - 1; ``0`` or ``[]`` skips DMD.
        evaluate, model_factory: ``evaluate(model) -> float`` and a factory of the recorded
            architecture; with both, the metric of the recorded and reconstructed weights is
            computed along the run (every ``eval_every``-th sample, and the last).
        metric: the name of what ``evaluate`` returns (axis label).
        time_label: what the trajectory's steps count ("step", "epoch").
        title: the report's title.
        max_members: members per mode used for the profile bands (a random subset).
        figures: write the PNG figures (needs matplotlib).
        progress: progress bars (``None``: only on a terminal).

    Raises:
        ValueError: bad arguments, or a trajectory CMD cannot model (see :func:`modeopt.decompose`).
        ImportError: ``figures=True`` without matplotlib (checked before any work).
    """
    if (evaluate is None) != (model_factory is None):
        raise ValueError("give both evaluate= and model_factory= (or neither)")
    if figures and out is not None:
        from .figures import require_matplotlib

        require_matplotlib()
    T = trajectory.n_samples
    if T < 3:
        raise ValueError(f"the trajectory has {T} sample(s); CMD needs at least 3: record more snapshots")
    hide = None if progress is None else not progress
    stages = ["CMD", "DMD", "statistics", "errors"] + (["evaluation"] if evaluate else []) + (
        ["figures"] if figures and out is not None else [])
    bar = tqdm(total=len(stages), desc="analysis", disable=hide)
    timings = {}

    def stage(name):
        bar.set_postfix_str(name)
        timings[name] = time.perf_counter()

    def done(name):
        timings[name] = time.perf_counter() - timings[name]
        bar.update()

    stage("CMD")
    dec = decompose(trajectory, n_modes=n_modes, threshold=threshold, n_samples=n_samples, seed=seed,
                    progress=progress)
    done("CMD")
    stage("DMD")
    ranks = _dmd_ranks(dmd_rank, dec.n_modes, T)
    dmds = {}
    for r in ranks:
        d = dmd(trajectory, r, progress=progress)
        dmds[f"DMD, r = {d.rank}"] = d
    done("DMD")
    cmd_name = f"CMD, M = {dec.n_modes}"
    first_dmd = next(iter(dmds.values()), None)

    stage("statistics")
    corr = correlation_data(dec)
    bands = profile_bands(trajectory, dec, max_members=max_members, seed=seed)
    layers = layer_distribution(dec)
    examples = weight_examples(trajectory, dec, first_dmd, n=3, seed=seed, dmd_name=next(iter(dmds), "DMD"))
    done("statistics")
    stage("errors")
    errors = {cmd_name: reconstruction_errors(trajectory, dec, name=cmd_name, progress=progress)}
    for name, d in dmds.items():
        errors[name] = reconstruction_errors(trajectory, d, name=name, progress=progress)
    done("errors")

    acc = None
    if evaluate is not None:
        stage("evaluation")
        models = {"recorded": trajectory, cmd_name: dec, **dmds}
        acc = accuracy_curves(models, evaluate, model_factory, n_samples=T, steps=list(trajectory.steps),
                              every=eval_every, progress=progress)
        done("evaluation")

    summary = _summary(trajectory, dec, dmds, corr, layers, errors, acc, time_label, metric)
    report = Report(out=None if out is None else Path(out), trajectory=trajectory, decomposition=dec, dmd=dmds,
                    correlation=corr, profiles=bands, layers=layers, errors=errors, examples=examples,
                    accuracy=acc, summary=summary, time_label=time_label)
    if out is not None:
        outp = Path(out)
        outp.mkdir(parents=True, exist_ok=True)
        if figures:
            stage("figures")
            report.figures = _write_figures(report, outp, metric)
            done("figures")
        summary["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
        (outp / "summary.json").write_text(json.dumps(summary, indent=1))
        (outp / "report.md").write_text(_markdown(report, title, metric))
        (outp / "index.html").write_text(_html(report, title, metric))
    bar.close()
    return report


# ------------------------------------------------------------------ output
def _write_figures(r: Report, out: Path, metric: str) -> dict[str, Path]:
    from . import figures as F

    errs = list(r.errors.values())
    paths = {
        "correlation": F.plot_correlation(r.correlation, out / FIGURES["correlation"][0]),
        "profiles": F.plot_profiles(r.profiles, out / FIGURES["profiles"][0], time_label=r.time_label),
        "modes": F.plot_modes(r.layers, out / FIGURES["modes"][0]),
        "errors": F.plot_errors(errs, r.layers.names, out / FIGURES["errors"][0]),
        "cmd_vs_dmd": F.plot_cmd_vs_dmd(errs, r.examples, r.trajectory.steps, out / FIGURES["cmd_vs_dmd"][0],
                                        time_label=r.time_label),
    }
    if r.accuracy is not None:
        paths["accuracy"] = F.plot_accuracy(r.accuracy, out / FIGURES["accuracy"][0], time_label=r.time_label,
                                            metric=metric)
    return paths


def _dmd_ranks(dmd_rank, n_modes: int, T: int) -> list[int]:
    """The DMD ranks to compare: given ones, or M and 2 (CMD's storage: 2 numbers per weight)."""
    if dmd_rank is None:
        wanted = [n_modes, 2]
    elif isinstance(dmd_rank, int):
        wanted = [dmd_rank]
    else:
        wanted = list(dmd_rank)
    for r in wanted:
        check_int("a DMD rank (0 skips DMD)", r, 0)
    out = []
    for r in wanted:
        r = min(r, T - 1)
        if r > 0 and r not in out:
            out.append(r)
    return out


def _summary(traj, dec, dmds, corr, layers, errors, acc, time_label, metric) -> dict:
    s = {
        "n_weights": traj.n_weights,
        "n_samples": traj.n_samples,
        "steps": [traj.steps[0], traj.steps[-1]],
        "time_unit": time_label,
        "n_layers": len(layers.names),
        "n_modes": dec.n_modes,
        "n_sampled": int(dec.samples.numel()),
        "n_constant": int(dec.constant.sum()),
        "mode_sizes": [int(x) for x in layers.mode_sizes],
        "within_mode_abs_corr": [round(float(x), 4) for x in corr.within],
        "between_mode_abs_corr": None if np.isnan(corr.between) else round(corr.between, 4),
        "relative_error": {k: e.total_rel for k, e in errors.items()},
        "median_weight_relative_error": {k: float(np.nanmedian(e.rel)) if np.isfinite(e.rel).any() else None
                                         for k, e in errors.items()},
        "dmd_ranks": [d.rank for d in dmds.values()],
        "dmd_max_abs_eigenvalue": {k: float(d.eigenvalues.abs().max()) for k, d in dmds.items()},
    }
    if acc is not None:
        s["metric"] = metric
        s["evaluated_steps"] = [int(x) for x in acc.steps]
        s[metric] = {k: [float(x) for x in v] for k, v in acc.curves.items()}
        s[f"final_{metric}"] = {k: float(v[-1]) for k, v in acc.curves.items()}
    return s


def summary_rows(r: Report, metric: str) -> list[tuple[str, str]]:
    """``(label, value)`` rows of the report's key numbers (the CLI's summary, the report's table)."""
    s, dec = r.summary, r.decomposition
    rows = [
        ("weights (N)", f"{s['n_weights']:,} in {s['n_layers']} tensors"),
        ("samples (T)", f"{s['n_samples']} ({r.time_label}s {s['steps'][0]}–{s['steps'][1]})"),
        ("modes (M)", f"{dec.n_modes} (from {s['n_sampled']} sampled weights)"),
        ("mode sizes", ", ".join(f"{x:,}" for x in s["mode_sizes"][:12]) + (" …" if dec.n_modes > 12 else "")),
        ("constant weights", f"{s['n_constant']:,}"),
        ("mean |corr| inside modes / between", f"{np.mean(r.correlation.within):.3f} / "
         + ("–" if s["between_mode_abs_corr"] is None else f"{s['between_mode_abs_corr']:.3f}")),
    ]
    for e in r.errors.values():
        rows.append((f"relative error, {e.name}", f"{e.total_rel:.4g} (median weight {np.nanmedian(e.rel):.3g})"))
    if r.accuracy is not None:
        for k, v in r.accuracy.curves.items():
            rows.append((f"{metric}, {k}", f"end {v[-1]:.4f}, best {np.nanmax(v):.4f}"))
    return rows


def _markdown(r: Report, title: str | None, metric: str) -> str:
    lines = [f"# {title or 'Training dynamics: correlation modes'}", "", "| | |", "|---|---|"]
    lines += [f"| {k.replace('|', '&#124;')} | {v.replace('|', '&#124;')} |" for k, v in summary_rows(r, metric)]
    lines.append("")
    for key, path in r.figures.items():
        lines += [f"![{key}]({path.name})", "", FIGURES[key][1], ""]
    return "\n".join(lines)


def _html(r: Report, title: str | None, metric: str) -> str:
    t = html.escape(title or "Training dynamics: correlation modes")
    rows = "\n".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in summary_rows(r, metric))
    figs = "\n".join(
        f'<figure><img src="{html.escape(p.name)}" alt="{key}"><figcaption>{html.escape(FIGURES[key][1])}'
        "</figcaption></figure>" for key, p in r.figures.items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{t}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1180px; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0 2em; }}
th, td {{ text-align: left; padding: .3em .9em; border-bottom: 1px solid #ddd; }}
th {{ font-weight: 600; color: #444; }}
figure {{ margin: 0 0 2.5em; }} img {{ max-width: 100%; border: 1px solid #eee; }}
figcaption {{ color: #555; font-size: .92em; margin-top: .4em; }}
</style></head><body>
<h1>{t}</h1>
<p>Correlation Mode Decomposition (CMD) of the recorded weights, next to exact DMD on the same trajectory.
Generated by <code>modeopt analyze</code>; the numbers are in <a href="summary.json">summary.json</a>.</p>
<table>
{rows}
</table>
{figs}
</body></html>
"""
