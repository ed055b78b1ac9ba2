"""Are two training runs the same dynamical system? Koopman spectra of real runs, with p-values.

Trains ``workloads.SmallCNN`` (29,994 weights) on 4,000 real MNIST digits, records the weights at every
step, and compares runs with :func:`modeopt.analysis.compare_dynamics` (the leading 10 principal
coordinates of the weights, 32 delays, exact DMD at the rank that holds 99 % of the energy; the
null distribution from windows of the runs - see docs/koopman.md).

Study 1 - optimizers: Adam (seeds 0 and 1) and SGD + momentum (seeds 0 and 1), ``--steps`` steps
from initialisation each. Same optimizer, other seed vs. other optimizer.

Study 2 - mode-space training: Adam for ``--warmup`` steps, then from that same point either plain
Adam or :class:`modeopt.CMDOptimizer`'s mode-space phase (M = 10 modes fitted to the warm-up) for
``--post`` steps, each with two orders of the mini-batches after the switch. Only the steps after
the switch are compared. Is training in mode space the same dynamical system as full training?

Then the same eight comparisons under three other settings (50 principal coordinates; 8 delays;
the lossless ``fc2.weight`` observable), to show how much the verdicts depend on the choice of
observable (``--no-sensitivity`` skips them).

Writes ``OUT/study1/*.png``, ``OUT/study2/*.png`` and ``OUT/koopman_study.{md,json}``; ``--images``
also copies the four figures docs/koopman.md shows there (docs/images/koopman). About 5 minutes on
one CPU thread.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import modeopt
from modeopt.analysis import Recording, compare_dynamics
from workloads import SmallCNN, batches, cpu_name, evaluate
from mnist_eval import mnist_split  # examples/ is on sys.path when a script here runs


def make_optimizer(kind: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=1e-3)
    return torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)


def train(model, opt, data, steps: int, rec: Recording | None = None) -> None:
    for _ in range(steps):
        xb, yb = next(data)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
        if rec is not None:
            rec.step()


#: the settings of the sensitivity table: (name, keyword arguments of compare_dynamics)
SENSITIVITY = [("50 principal coordinates", {"n_components": 50}), ("8 delays", {"delays": 8}),
               ("layer fc2.weight (all its coordinates)",
                {"observable": "layer", "layer": "fc2.weight", "n_components": None})]
#: the figures docs/koopman.md shows
DOC_FIGURES = [("study1", "pair0"), ("study1", "pair2"), ("study2", "pair0"), ("study2", "pair2")]


def study1(args, xtr, ytr, xte, yte) -> dict:
    """Four runs from initialisation, every step recorded; pairwise comparisons."""
    runs, acc = {}, {}
    for kind, seed in [("adam", 0), ("adam", 1), ("sgd", 0), ("sgd", 1)]:
        name = f"{'Adam' if kind == 'adam' else 'SGD+momentum'}, seed {seed}"
        torch.manual_seed(seed)
        model = SmallCNN()
        opt = make_optimizer(kind, model)
        t0 = time.perf_counter()
        with Recording(model, every=1, initial=True) as rec:
            train(model, opt, batches(xtr, ytr, 64, seed=seed), args.steps, rec)
        runs[name] = rec.trajectory()
        acc[name] = evaluate(model, xte, yte)
        print(f"  {name}: {args.steps} steps in {time.perf_counter() - t0:.0f} s, test accuracy {acc[name]:.3f}")
    pairs = [("Adam, seed 0", "Adam, seed 1"), ("SGD+momentum, seed 0", "SGD+momentum, seed 1"),
             ("Adam, seed 0", "SGD+momentum, seed 0"), ("Adam, seed 1", "SGD+momentum, seed 1")]
    return {"accuracy": acc, "rows": compare_pairs(args, runs, pairs, Path(args.out) / "study1"),
            "runs": runs, "pairs": pairs}


def study2(args, xtr, ytr, xte, yte) -> dict:
    """One Adam warm-up; plain Adam vs. CMDOptimizer's mode-space phase after it, two batch orders each."""
    w, post = args.warmup, args.post
    names = [n for n, _ in SmallCNN().named_parameters()]
    runs, acc = {}, {}
    for kind in ("plain Adam", "mode space (CMD, M = 10)"):
        for order in (1, 2):
            torch.manual_seed(0)
            model = SmallCNN()
            base = torch.optim.Adam(model.parameters(), lr=1e-3)
            opt = base if kind == "plain Adam" else modeopt.CMDOptimizer(
                model, base, n_modes=10, warmup_steps=w, snapshot_every=5, seed=0, progress=False)
            t0 = time.perf_counter()
            train(model, opt, batches(xtr, ytr, 64, seed=0), w)  # the shared warm-up: same init, same batches
            if kind != "plain Adam":
                assert opt.phase == "embedded", opt.phase
            name = f"{kind}, batch order {order}"
            with Recording(model, every=1, initial=True, names=names) as rec:  # the switch point, then each step
                train(model, opt, batches(xtr, ytr, 64, seed=100 + order), post, rec)
            runs[name] = rec.trajectory()
            acc[name] = evaluate(model, xte, yte)
            print(f"  {name}: {w} + {post} steps in {time.perf_counter() - t0:.0f} s, test accuracy {acc[name]:.3f}")
    first = runs["plain Adam, batch order 1"].data[0]
    same_start = max(float((t.data[0] - first).abs().max()) for t in runs.values())
    print(f"  largest difference between the branches' weights at the switch: {same_start:.3g}")
    p, c = "plain Adam", "mode space (CMD, M = 10)"
    pairs = [(f"{p}, batch order 1", f"{p}, batch order 2"), (f"{c}, batch order 1", f"{c}, batch order 2"),
             (f"{p}, batch order 1", f"{c}, batch order 1"), (f"{p}, batch order 2", f"{c}, batch order 2")]
    return {"accuracy": acc, "same_start_max_abs_diff": same_start,
            "rows": compare_pairs(args, runs, pairs, Path(args.out) / "study2"), "runs": runs, "pairs": pairs}


def compare_pairs(args, runs: dict, pairs: list[tuple[str, str]], out: Path | None, **settings) -> list[dict]:
    """compare_dynamics on each pair (the defaults of the example unless ``settings`` override them);
    a figure of each when ``out`` is given."""
    kw = {"n_components": args.components, "delays": args.delays, **settings}
    rows = []
    for k, (a, b) in enumerate(pairs):
        t0 = time.perf_counter()
        cmp = compare_dynamics(runs[a], runs[b], labels=(a, b), seed=0, progress=False, **kw)
        secs = time.perf_counter() - t0
        fig = cmp.plot(out / f"pair{k}.png", title=f"{a}  vs.  {b}") if out is not None else None
        sa, sb = cmp.spectrum_a, cmp.spectrum_b
        rows.append({"a": a, "b": b, "distance": cmp.distance, "p_value": cmp.p_value, "statistic": cmp.statistic,
                     "null_median": float(torch.tensor(cmp.null).median()), "rank": cmp.rank, "window": cmp.window,
                     "n_null": len(cmp.null), "explained_a": sa.explained_variance, "explained_b": sb.explained_variance,
                     "one_step_a": sa.reconstruction_error, "one_step_b": sb.reconstruction_error,
                     "max_abs_a": float(abs(sa.eigenvalues).max()), "max_abs_b": float(abs(sb.eigenvalues).max()),
                     "seconds": secs, "figure": None if fig is None else str(fig), "notes": cmp.notes})
        print(f"  {a} vs. {b}: W1 {cmp.distance:.4f}, p = {cmp.p_value:.3f} (rank {cmp.rank}; median distance "
              f"between {cmp.statistic:.4f}, within {rows[-1]['null_median']:.4f}; {secs:.1f} s)")
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| run A | run B | W1 distance | median window distance, between / within | p | rank |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['a']} | {r['b']} | {r['distance']:.4f} | {r['statistic']:.4f} / {r['null_median']:.4f} "
                     f"| {r['p_value']:.3f} | {r['rank']} |")
    return "\n".join(lines)


def sensitivity_table(results: dict[str, list[dict]], pairs: list[tuple[str, str]]) -> str:
    """One row per pair, one column per setting: W1 (p), and the between/within ratio of medians."""
    names = list(results)
    lines = ["| run A | run B | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for k, (a, b) in enumerate(pairs):
        cells = [f"{results[n][k]['distance']:.4f} (p {results[n][k]['p_value']:.3f}, "
                 f"{results[n][k]['statistic'] / results[n][k]['null_median']:.2f}x)" for n in names]
        lines.append(f"| {a} | {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600, help="study 1: steps per run, from initialisation")
    ap.add_argument("--warmup", type=int, default=300, help="study 2: Adam steps before the switch")
    ap.add_argument("--post", type=int, default=600, help="study 2: steps after the switch")
    ap.add_argument("--delays", type=int, default=32)
    ap.add_argument("--components", type=int, default=10)
    ap.add_argument("--out", default="out/koopman")
    ap.add_argument("--images", default=None, help="also copy the figures here (e.g. docs/images/koopman)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-sensitivity", action="store_true", help="skip the comparisons under other settings")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    xtr, ytr, xte, yte = mnist_split()
    t0 = time.perf_counter()
    print(f"study 1: optimizers, {args.steps} steps each from initialisation")
    s1 = study1(args, xtr, ytr, xte, yte)
    print(f"study 2: {args.warmup} Adam steps, then {args.post} steps of plain Adam or of mode-space training")
    s2 = study2(args, xtr, ytr, xte, yte)
    sens = {}
    if not args.no_sensitivity:
        print("the same comparisons under other settings")
        default = f"default ({args.components} coordinates, {args.delays} delays)"
        for study in (s1, s2):
            study["sensitivity"] = {default: study["rows"]}
        for name, settings in SENSITIVITY:
            print(f" {name}")
            for study in (s1, s2):
                study["sensitivity"][name] = compare_pairs(args, study["runs"], study["pairs"], None, **settings)
        sens = {k: sensitivity_table(study["sensitivity"], study["pairs"]) for k, study in (("1", s1), ("2", s2))}
    total = time.perf_counter() - t0
    machine = f"{cpu_name()}, {args.threads} torch thread(s), CPU only"
    md = (f"# Koopman spectra of SmallCNN training runs\n\n{machine}; total {total:.0f} s.\n\n"
          f"## Study 1: optimizers ({args.steps} steps from initialisation)\n\n{table(s1['rows'])}\n\n"
          f"## Study 2: after {args.warmup} Adam steps, plain Adam vs. mode space ({args.post} steps)\n\n"
          f"{table(s2['rows'])}\n")
    if sens:
        md += (f"\n## Sensitivity: W1 (p, between/within median ratio)\n\n### Study 1\n\n{sens['1']}\n\n"
               f"### Study 2\n\n{sens['2']}\n")
    (out / "koopman_study.md").write_text(md)
    for study in (s1, s2):
        del study["runs"]
    (out / "koopman_study.json").write_text(json.dumps({"args": vars(args), "machine": machine, "seconds": total,
                                                        "study1": s1, "study2": s2}, indent=1))
    print("\n" + md)
    if args.images:
        img = Path(args.images)
        img.mkdir(parents=True, exist_ok=True)
        for study, pair in DOC_FIGURES:
            shutil.copy(out / study / f"{pair}.png", img / f"{study}_{pair}.png")
    print(f"total {total:.0f} s; written to {out}")


if __name__ == "__main__":
    main()
