"""The ``modeopt`` command line.

Subcommands register themselves in :data:`SUBCOMMANDS`: each is a function that adds its parser
to the ``subparsers`` action and sets ``run=`` (a function of the parsed arguments returning an
exit status). Errors a user can fix (``ValueError``, missing files, missing optional packages)
are printed as one line, ``modeopt COMMAND: error: ...``, with exit status 1.

    modeopt analyze RUN [RUN ...] --modes 10 --out report/
    modeopt compare RUN_A RUN_B --out comparison/
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

__all__ = ["main", "build_parser", "SUBCOMMANDS"]


# ------------------------------------------------------------------ analyze
def _add_analyze(sub) -> None:
    p = sub.add_parser(
        "analyze",
        help="decompose a recorded training run and write a report (figures + index.html)",
        description="Correlation Mode Decomposition of a recorded training run, next to exact DMD, written as a "
                    "report: PNG figures, index.html, report.md and summary.json.",
        epilog="RUN is a trajectory file (Trajectory.save), a snapshot directory (modeopt.analysis.Recording), "
               "a directory of checkpoints, or several checkpoint files (ordered by the numbers in their names). "
               "Example: modeopt analyze runs/cnn --modes 10 --eval examples/mnist_eval.py:evaluation --out report/",
    )
    p.add_argument("inputs", nargs="+", metavar="RUN", help="trajectory file, snapshot/checkpoint directory, "
                   "or checkpoint files")
    p.add_argument("--out", "-o", default="report", help="report directory (default: report)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--modes", "-m", type=int, help="number of modes M (default 10)")
    g.add_argument("--threshold", "-t", type=float, help="cut the clustering at distance t (1 - |corr|) instead")
    p.add_argument("--samples", "-k", type=int, default=1000,
                   help="weights sampled for the clustering (K, default 1000)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--dmd-rank", type=int, nargs="+", default=None, metavar="R",
                   help="rank(s) r of the DMD baseline (default: M and 2, the rank that stores as much per weight "
                        "as CMD; 0 skips DMD)")
    p.add_argument("--start", type=int, default=None, help="drop the samples before this step/epoch")
    p.add_argument("--stop", type=int, default=None, help="drop the samples from this step/epoch on")
    p.add_argument("--every", type=int, default=1, help="keep every k-th sample (sub-sampling)")
    p.add_argument("--key", default=None, help="entry of each checkpoint that holds the state dict (e.g. model)")
    p.add_argument("--keep-order", action="store_true", help="keep checkpoint files in the order given")
    p.add_argument("--eval", default=None, metavar="SPEC",
                   help="score the recorded and reconstructed weights along the run: 'package.module:function' or "
                        "'path/to/file.py:function', a function returning (model_factory, evaluate) "
                        "(e.g. examples/mnist_eval.py:evaluation)")
    p.add_argument("--eval-every", type=int, default=1, help="evaluate every k-th sample (and the last)")
    p.add_argument("--metric", default="accuracy", help="name of what --eval measures (default: accuracy)")
    p.add_argument("--title", default=None, help="report title")
    p.add_argument("--no-figures", action="store_true", help="write the numbers only (no matplotlib needed)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or summary")
    p.set_defaults(run=_run_analyze)


def _run_analyze(args: argparse.Namespace) -> int:
    from .analysis import analyze, load_trajectory, resolve_eval

    if args.modes is None and args.threshold is None:
        args.modes = 10
    if not args.no_figures:
        from modeopt.analysis.figures import require_matplotlib

        require_matplotlib()  # fail before any work
    progress = False if args.quiet else None
    factory = evaluate = None
    if args.eval is not None:
        factory, evaluate = resolve_eval(args.eval)
    traj, unit = load_trajectory(args.inputs[0] if len(args.inputs) == 1 else args.inputs, key=args.key,
                                 keep_order=args.keep_order, start=args.start, stop=args.stop, every=args.every,
                                 progress=progress)
    if not args.quiet:
        print(f"modeopt analyze: {traj.n_weights:,} weights x {traj.n_samples} samples "
              f"({unit}s {traj.steps[0]}..{traj.steps[-1]})", file=sys.stderr)
    report = analyze(traj, out=args.out, n_modes=args.modes, threshold=args.threshold, n_samples=args.samples,
                     seed=args.seed, dmd_rank=args.dmd_rank, evaluate=evaluate, model_factory=factory,
                     eval_every=args.eval_every, metric=args.metric, time_label=unit, title=args.title,
                     figures=not args.no_figures, progress=progress)
    if not args.quiet:
        from modeopt.analysis.report import summary_rows as _rows

        width = max(len(k) for k, _ in _rows(report, args.metric))
        for k, v in _rows(report, args.metric):
            print(f"  {k:<{width}}  {v}")
        print(f"report: {report.index}")
    return 0


# ------------------------------------------------------------------ compare
def _add_compare(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="compare the training dynamics of two runs: Koopman spectra, W1 distance, p-value",
        description="Koopman (DMD) spectra of two recorded runs (an observable of the weights, time-delay "
                    "embedded, exact DMD), the Wasserstein-1 distance between them, and its p-value against the "
                    "distances between windows of one run. Writes comparison.png, comparison.json and "
                    "comparison.md.",
        epilog="RUN_A and RUN_B are each a trajectory file (Trajectory.save), a snapshot directory "
               "(modeopt.analysis.Recording) or a directory of checkpoints, recorded at evenly spaced steps. "
               "Example: modeopt compare runs/adam runs/sgd --delays 32 --out comparison/",
    )
    p.add_argument("run_a", metavar="RUN_A", help="the first run")
    p.add_argument("run_b", metavar="RUN_B", help="the second run")
    p.add_argument("--out", "-o", default="comparison", help="output directory (default: comparison)")
    p.add_argument("--observable", choices=["pca", "layer"], default="pca",
                   help="pca: leading principal coordinates of all weights (default); layer: the tensors --layer names")
    p.add_argument("--layer", action="append", default=None, metavar="NAME",
                   help="tensor name or module prefix for --observable layer (repeat for several)")
    p.add_argument("--components", "-k", type=int, default=None,
                   help="principal coordinates kept (default 10 for pca, all for layer)")
    p.add_argument("--delays", "-d", type=int, default=32, help="delays of the Hankel embedding (default 32)")
    p.add_argument("--rank", "-r", type=int, default=None, help="DMD rank (default: chosen by --energy)")
    p.add_argument("--energy", "-e", type=float, default=0.99,
                   help="share of the squared singular values the rank keeps, when --rank is not given (default 0.99)")
    p.add_argument("--window", type=int, default=None,
                   help="samples per window of the null (default: a third of the shorter run)")
    p.add_argument("--null-samples", type=int, default=200, help="at most this many null distances (default 200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the null's choice of window pairs (default 0)")
    p.add_argument("--labels", nargs=2, default=None, metavar=("A", "B"),
                   help="names of the runs in the figure and report (default: the directory names)")
    p.add_argument("--start", type=int, default=None, help="drop the samples before this step")
    p.add_argument("--stop", type=int, default=None, help="drop the samples from this step on")
    p.add_argument("--every", type=int, default=1, help="keep every k-th sample")
    p.add_argument("--key", default=None, help="entry of each checkpoint that holds the state dict (e.g. model)")
    p.add_argument("--title", default=None, help="report title")
    p.add_argument("--no-figures", action="store_true", help="write the numbers only (no matplotlib needed)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or summary")
    p.set_defaults(run=_run_compare)


def _run_compare(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from .analysis import compare_dynamics, load_trajectory

    if not args.no_figures:
        from modeopt.analysis.figures import require_matplotlib

        require_matplotlib()  # fail before any work
    if args.layer is not None and args.observable != "layer":
        raise ValueError("--layer needs --observable layer")
    progress = False if args.quiet else None
    runs = []
    for path in (args.run_a, args.run_b):
        traj, _unit = load_trajectory(path, key=args.key, start=args.start, stop=args.stop, every=args.every,
                                      progress=progress)
        runs.append(traj)
    labels = tuple(args.labels) if args.labels else tuple(Path(p).name or str(p) for p in (args.run_a, args.run_b))
    if labels[0] == labels[1]:
        labels = ("A: " + labels[0], "B: " + labels[1])
    if not args.quiet:
        for lab, t in zip(labels, runs):
            print(f"modeopt compare: {lab}: {t.n_weights:,} weights x {t.n_samples} samples "
                  f"(steps {t.steps[0]}..{t.steps[-1]})", file=sys.stderr)
    layer = None if args.layer is None else (args.layer[0] if len(args.layer) == 1 else args.layer)
    cmp = compare_dynamics(runs[0], runs[1], observable=args.observable, n_components=args.components, layer=layer,
                           delays=args.delays, rank=args.rank, energy=args.energy, window=args.window,
                           n_null=args.null_samples, seed=args.seed, labels=labels, progress=progress)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figure = None
    if not args.no_figures:
        cmp.plot(out / "comparison.png", title=args.title)
        figure = "comparison.png"
    data = cmp.to_dict()
    data["inputs"] = [str(args.run_a), str(args.run_b)]
    (out / "comparison.json").write_text(json.dumps(data, indent=1))
    (out / "comparison.md").write_text(cmp.markdown(title=args.title, figure=figure))
    print(f"W1 distance {cmp.distance:.4g}  p = {cmp.p_value:.3g}  (rank {cmp.rank}, {cmp.delays} delays, "
          f"window {cmp.window}, {len(cmp.null)} null distances)")
    if not args.quiet:
        print(f"report: {out / 'comparison.md'}")
    return 0


#: functions that each add one subcommand (``compare`` and others append here).
SUBCOMMANDS: list[Callable] = [_add_analyze, _add_compare]


def build_parser() -> argparse.ArgumentParser:
    """The ``modeopt`` parser, with every subcommand of :data:`SUBCOMMANDS`."""
    from modeopt import __version__

    parser = argparse.ArgumentParser(prog="modeopt", description="modeopt: Correlation Mode Decomposition tools.")
    parser.add_argument("--version", action="version", version=f"modeopt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (ValueError, FileNotFoundError, ImportError, KeyError) as e:
        msg = str(e).strip("'\"") if isinstance(e, KeyError) else str(e)
        print(f"modeopt {args.command}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
