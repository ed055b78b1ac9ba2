"""Narrow vs. wide fully connected networks: are their training dynamics distinguishable, and from which width on?

After Redman et al., "Identifying Equivalent Training Dynamics" (arXiv 2302.09160, NeurIPS 2024), Sec. 4.2 /
Fig. 3: one-hidden-layer ReLU networks 784 -> h -> 10 without biases, trained with plain SGD (lr 0.1, batch 60)
on MNIST, the output-layer weights ``fc2.weight`` recorded at every step; their Koopman (DMD) eigenvalues are
compared across widths by the Wasserstein-1 distance.

Here, on CPU and on the 4,000-digit real MNIST subset of ``workloads.mnist_subset()`` (1,000 held out):

* widths ``--widths`` (default 5 10 20 40 80), ``--seeds`` seeds each (default 5; seed s sets both the
  initialisation and the order of the mini-batches), ``--steps`` SGD steps (default 1,000, the paper's
  length: 15 passes over the 4,000 digits), the paper's architecture and optimizer;
* **observable**: ``fc2.weight`` (the paper's), recorded at every step from initialisation; reduced to its
  leading ``--components`` (10) principal coordinates (``observable="pca"`` on a trajectory of ``fc2.weight``
  alone), so that every width has the same observable dimension and the same ``--delays`` (32); DMD at the
  fixed ``--rank`` 10 (the paper's ``k_mode``), so every spectrum has 10 eigenvalues;
* the W1 distance between the spectra of **every** pair of runs (the heat map; within-width = seed vs. seed),
  and per pair of widths a seed-level permutation test on it (``modeopt.analysis.compare_groups``) (between- minus within-width mean W1, every
  split of the 2 x 5 runs into two groups of 5: smallest p = 2/252 = 0.008), done in this script;
* ``compare_dynamics`` (distance + p-value from its window null) on the pairs of runs with seeds (i, j),
  i < j < 3: within a width and across every pair of widths, so a within-width pair and a between-width pair
  differ only in the width;
* a second observable, the leading 10 principal coordinates of **all** the weights (fc1 + fc2), as a
  sensitivity check: its spectra (W1 matrix only, no p-values: the full trajectories are not kept).

A pair of widths counts as *distinguishable* when most of its seed pairs get compare_dynamics p <= 0.05 (rule
fixed before the first run), or, second rule, when the permutation test gives p <= 0.05 (added after a first
run with 3 seeds). The script reports, for each rule, the smallest width from which on no pair of widths is
distinguishable, if any.

Writes ``OUT/fcn_width.{json,md}`` and ``OUT/{distances,eigenvalues}.png``; ``--images DIR`` copies the two
figures there (docs/images/studies). Measured on this project's machine (2 shared vCPUs, one torch thread,
three other jobs running): the full setting took about 7 minutes (25 runs of 1,000 steps: 30 s; 45
compare_dynamics calls: ~6 s each); ``--quick`` 7-8 s.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from modeopt.analysis import Recording, compare_dynamics, compare_groups, koopman_spectrum, spectrum_distance
from workloads import batches, cpu_name, evaluate, mnist_subset

#: the figures docs/koopman.md shows, copied by --images under these names
DOC_FIGURES = {"distances.png": "fcn_width_distances.png", "eigenvalues.png": "fcn_width_eigenvalues.png"}


class FCN(nn.Module):
    """784 -> h -> 10, ReLU, no biases (the paper's FCN)."""

    def __init__(self, h: int):
        super().__init__()
        self.fc1 = nn.Linear(28 * 28, h, bias=False)
        self.fc2 = nn.Linear(h, 10, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def settings(args) -> dict:
    """The DMD settings shared by every spectrum and comparison."""
    return {"n_components": args.components, "delays": args.delays, "rank": args.rank}


def train_run(args, h: int, seed: int, data) -> dict:
    """One run: train, record fc2.weight (and all weights, for the sensitivity spectrum), evaluate."""
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    model = FCN(h)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    stream = batches(xtr, ytr, args.batch, seed=seed)
    t0 = time.perf_counter()
    losses = []
    with Recording(model, every=1, initial=True, names=["fc2.weight"]) as rec_fc2, \
            Recording(model, every=1, initial=True) as rec_all:
        for _ in range(args.steps):
            xb, yb = next(stream)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            rec_fc2.step()
            rec_all.step()
    train_s = time.perf_counter() - t0
    fc2 = rec_fc2.trajectory()
    spec = koopman_spectrum(fc2, observable="pca", progress=False, **settings(args))
    spec_all = None
    if not args.no_all_weights:
        spec_all = koopman_spectrum(rec_all.trajectory(), observable="pca", progress=False, **settings(args))
    del rec_all
    acc = evaluate(model, xte, yte)
    tail = max(1, args.steps // 10)
    print(f"  h={h:3d} seed {seed}: {args.steps} steps in {train_s:.1f} s, test accuracy {acc:.3f}, "
          f"one-step error {spec.reconstruction_error:.3f}, max |lambda| {np.abs(spec.eigenvalues).max():.4f}")
    return {"h": h, "seed": seed, "label": f"h={h}, seed {seed}", "fc2": fc2, "spectrum": spec,
            "spectrum_all": spec_all, "test_accuracy": acc, "final_train_loss": float(np.mean(losses[-tail:])),
            "n_weights": sum(p.numel() for p in model.parameters()), "train_seconds": train_s}


def w1_matrix(runs: list[dict], key: str) -> np.ndarray:
    n = len(runs)
    m = np.zeros((n, n))
    for i, j in itertools.combinations(range(n), 2):
        m[i, j] = m[j, i] = spectrum_distance(runs[i][key], runs[j][key])[0]
    return m


def width_block_stats(runs: list[dict], m: np.ndarray, widths: list[int]) -> dict:
    """Mean, sd and n of the W1 distances between runs of width a and width b (different seeds only)."""
    out = {}
    for a, b in itertools.combinations_with_replacement(widths, 2):
        vals = [m[i, j] for i, ri in enumerate(runs) for j, rj in enumerate(runs)
                if ri["h"] == a and rj["h"] == b and ri["seed"] != rj["seed"] and (a != b or i < j)]
        out[f"{a}-{b}"] = {"mean": float(np.mean(vals)), "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
                           "n": len(vals)}
    return out


def permutation_test(runs: list[dict], key: str, a: int, b: int) -> dict:
    """Seed-level test of width a vs. width b: :func:`modeopt.analysis.compare_groups` on the runs' spectra
    (statistic: mean between-width W1 minus mean within-width W1; exact null over every split of the runs)."""
    res = compare_groups([r[key] for r in runs if r["h"] == a], [r[key] for r in runs if r["h"] == b])
    return {"statistic": res.statistic, "p_value": res.p_value, "n_splits": res.n_splits}


def compare_pairs(args, runs: list[dict], widths: list[int]) -> list[dict]:
    """compare_dynamics on run pairs with seeds (i, j), i < j < --compare-seeds: within each width and across
    every width pair."""
    by = {(r["h"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})[: args.compare_seeds]
    rows = []
    for a, b in itertools.combinations_with_replacement(widths, 2):
        for si, sj in itertools.combinations(seeds, 2):
            ra, rb = by[a, si], by[b, sj]
            t0 = time.perf_counter()
            cmp = compare_dynamics(ra["fc2"], rb["fc2"], observable="pca", labels=(ra["label"], rb["label"]),
                                   n_null=args.null_samples, seed=0, progress=False, **settings(args))
            within = float(np.median(cmp.null))
            rows.append({"h_a": a, "h_b": b, "seed_a": si, "seed_b": sj, "distance": cmp.distance,
                         "p_value": cmp.p_value, "statistic": cmp.statistic, "null_median": within,
                         "ratio": cmp.statistic / within, "rank": cmp.rank, "window": cmp.window,
                         "n_null": len(cmp.null), "seconds": time.perf_counter() - t0})
            print(f"  h={a} s{si} vs h={b} s{sj}: W1 {cmp.distance:.4f}, p = {cmp.p_value:.3f}, "
                  f"between/within {cmp.statistic:.4f}/{within:.4f}")
    return rows


def summarise_pairs(rows: list[dict], widths: list[int]) -> dict:
    out = {}
    for a, b in itertools.combinations_with_replacement(widths, 2):
        sel = [r for r in rows if r["h_a"] == a and r["h_b"] == b]
        d = np.array([r["distance"] for r in sel])
        p = np.array([r["p_value"] for r in sel])
        q = np.array([r["ratio"] for r in sel])
        n_sig = int((p <= 0.05).sum())
        out[f"{a}-{b}"] = {"h_a": a, "h_b": b, "n": len(sel), "distance_mean": float(d.mean()),
                           "distance_sd": float(d.std(ddof=1)) if len(d) > 1 else 0.0,
                           "p_values": [float(v) for v in p], "p_median": float(np.median(p)),
                           "ratio_mean": float(q.mean()), "ratio_min": float(q.min()), "ratio_max": float(q.max()),
                           "n_significant": n_sig, "distinguishable": a != b and n_sig > len(sel) / 2}
    return out


def threshold_width(distinguishable, widths: list[int]) -> int | None:
    """The smallest width w such that no pair of widths >= w is distinguishable (None: not even the widest).

    ``distinguishable(a, b)`` says whether widths a < b are told apart."""
    for k, w in enumerate(widths):
        rest = widths[k:]
        if len(rest) < 2:
            return None
        if not any(distinguishable(a, b) for a, b in itertools.combinations(rest, 2)):
            return w
    return None


def plot_distances(path: Path, widths: list[int], block: dict, summary: dict, block_all: dict | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(widths)
    panels = [("W1, fc2.weight (10 PCs)", block), ("median p (compare_dynamics)", None)]
    if block_all is not None:
        panels.append(("W1, all weights (10 PCs)", block_all))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.0))
    for ax, (title, blk) in zip(axes, panels):
        m = np.full((n, n), np.nan)
        for i, a in enumerate(widths):
            for j, b in enumerate(widths):
                key = f"{min(a, b)}-{max(a, b)}"
                m[i, j] = blk[key]["mean"] if blk is not None else summary[key]["p_median"]
        cmap = "viridis" if blk is not None else "magma"
        im = ax.imshow(m, cmap=cmap, vmin=0 if blk is None else None, vmax=1 if blk is None else None)
        for i in range(n):
            for j in range(n):
                key = f"{min(widths[i], widths[j])}-{max(widths[i], widths[j])}"
                perm = blk[key].get("permutation") if blk is not None else None
                txt = (f"{m[i, j]:.4f}\n±{blk[key]['sd']:.4f}" + (f"\np={perm['p_value']:.2f}" if perm else "")
                       if blk is not None else
                       f"{m[i, j]:.2f}\n{summary[key]['n_significant']}/{summary[key]['n']} sig")
                ax.text(j, i, txt, ha="center", va="center", fontsize=7,
                        color="w" if (blk is None and m[i, j] < 0.5) else "k" if blk is None else "w")
        ax.set_xticks(range(n), [str(w) for w in widths])
        ax.set_yticks(range(n), [str(w) for w in widths])
        ax.set_xlabel("hidden width h")
        ax.set_ylabel("hidden width h")
        ax.set_title(title, fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle("Narrow vs. wide FCNs on MNIST: distances between Koopman spectra (diagonal: seed vs. seed)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_eigenvalues(path: Path, runs: list[dict], widths: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.cm.viridis(np.linspace(0, 0.9, len(widths)))
    markers = "osD^v<>px*"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    th = np.linspace(-np.pi, np.pi, 2000)
    for ax, (xl, yl) in zip(axes, [((0.945, 1.01), (-0.09, 0.09)), ((0.985, 1.003), (-0.02, 0.02))]):
        ax.plot(np.cos(th), np.sin(th), "k--", lw=0.8, label="unit circle")
        for c, mk, h in zip(colors, markers, widths):
            first = True
            for r in runs:
                if r["h"] != h:
                    continue
                ev = r["spectrum"].eigenvalues
                ax.scatter(ev.real, ev.imag, s=22, color=c, marker=mk, alpha=0.75,
                           label=f"h = {h}" if first else None)
                first = False
        ax.set_xlim(*xl)
        ax.set_ylim(*yl)
        ax.set_xlabel("Re λ")
        ax.set_ylabel("Im λ")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower left")
    axes[0].set_title("Koopman eigenvalues of fc2.weight, every seed (rank 10, 32 delays)", fontsize=9)
    axes[1].set_title("zoom near λ = 1", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fmt(x: float, sd: float) -> str:
    return f"{x:.4f} ± {sd:.4f}"


def markdown(res: dict) -> str:
    a = res["args"]
    widths = a["widths"]
    lines = [f"# Narrow vs. wide FCNs: Koopman spectra across hidden widths", "",
             f"{res['machine']}; total {res['seconds']:.0f} s. 784 -> h -> 10 (ReLU, no biases), SGD lr {a['lr']}, "
             f"batch {a['batch']}, {a['steps']} steps from initialisation on {res['n_train']} real MNIST digits; "
             f"seeds {res['seeds']}. Observable: fc2.weight, leading {a['components']} principal coordinates, "
             f"{a['delays']} delays, DMD rank {a['rank']}.", "",
             "## Accuracy (held-out 1,000 digits), mean ± sd over seeds", "",
             "| h | weights | test accuracy | final train loss | one-step DMD error | max abs(λ) | median abs(λ) | "
             "median abs(angle λ), rad/step |", "|---|---|---|---|---|---|---|---|"]
    for h in widths:
        rs = [r for r in res["runs"] if r["h"] == h]
        acc = np.array([r["test_accuracy"] for r in rs])
        loss = np.array([r["final_train_loss"] for r in rs])
        err = np.array([r["one_step_error"] for r in rs])
        mx = np.array([r["max_abs_eigenvalue"] for r in rs])
        md = np.array([r["median_abs_eigenvalue"] for r in rs])
        ang = np.array([r["median_abs_angle"] for r in rs])
        sd = (lambda v: float(v.std(ddof=1)) if len(v) > 1 else 0.0)
        lines.append(f"| {h} | {rs[0]['n_weights']} | {acc.mean():.3f} ± {sd(acc):.3f} | {loss.mean():.3f} ± "
                     f"{sd(loss):.3f} | {err.mean():.3f} ± {sd(err):.3f} | {mx.mean():.4f} ± {sd(mx):.4f} | "
                     f"{md.mean():.4f} ± {sd(md):.4f} | {ang.mean():.4f} ± {sd(ang):.4f} |")
    lines += ["", "## W1 between spectra, all pairs of runs with different seeds (mean ± sd, n pairs)", "",
              "Seed-level permutation test (between minus within mean W1; every split of the 2n runs): p_perm.", "",
              "| h_a | h_b | W1, fc2.weight | n | p_perm | W1, all weights | p_perm |", "|---|---|---|---|---|---|---|"]
    alt = res["w1_blocks_all_weights"]
    pp = (lambda v: f"{v['permutation']['p_value']:.3f}" if v.get("permutation") else "-")
    for key, v in res["w1_blocks"].items():
        ha, hb = key.split("-")
        lines.append(f"| {ha} | {hb} | {fmt(v['mean'], v['sd'])} | {v['n']} | {pp(v)} | "
                     f"{fmt(alt[key]['mean'], alt[key]['sd']) if alt else '-'} | {pp(alt[key]) if alt else '-'} |")
    lines += ["", f"## compare_dynamics, seed pairs (i, j), i < j < {a['compare_seeds']}", "",
              "| h_a | h_b | W1 (mean ± sd) | p-values | between/within median window distance (mean, range) | "
              "p <= 0.05 | distinguishable |", "|---|---|---|---|---|---|---|"]
    for v in res["pair_summary"].values():
        lines.append(f"| {v['h_a']} | {v['h_b']} | {fmt(v['distance_mean'], v['distance_sd'])} | "
                     f"{', '.join(f'{p:.3f}' for p in v['p_values'])} | {v['ratio_mean']:.2f} "
                     f"({v['ratio_min']:.2f}-{v['ratio_max']:.2f}) | {v['n_significant']}/{v['n']} | "
                     f"{'yes' if v['distinguishable'] else ('-' if v['h_a'] == v['h_b'] else 'no')} |")
    t = res["threshold_width"]
    tp = res["threshold_width_permutation"]
    lines += ["", f"**Threshold width** (smallest w such that no pair of widths >= w is distinguishable): by "
              f"compare_dynamics (most seed pairs p <= 0.05) {t if t is not None else 'none'}; by the seed-level "
              f"permutation test on W1 (p_perm <= 0.05) {tp if tp is not None else 'none'}.", ""]
    if res.get("paper_reference"):
        p = res["paper_reference"]
        lines += ["## The paper's own eigenvalues (authors' repository, 25 batch seeds), W1 recomputed here", "",
                  "| pair | W1 mean ± sd |", "|---|---|"]
        for k, v in p.items():
            lines.append(f"| {k} | {fmt(v['mean'], v['sd'])} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", type=int, nargs="+", default=[5, 10, 20, 40, 80])
    ap.add_argument("--seeds", type=int, default=5, help="seeds per width (0 .. seeds-1)")
    ap.add_argument("--compare-seeds", type=int, default=3,
                    help="compare_dynamics (p-values) on the pairs of the first this many seeds (it costs ~6 s a pair)")
    ap.add_argument("--steps", type=int, default=1000, help="SGD steps per run (the paper: 1,000)")
    ap.add_argument("--batch", type=int, default=60)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--components", type=int, default=10)
    ap.add_argument("--delays", type=int, default=32)
    ap.add_argument("--rank", type=int, default=10)
    ap.add_argument("--null-samples", type=int, default=200)
    ap.add_argument("--no-all-weights", action="store_true", help="skip the all-weights sensitivity spectra")
    ap.add_argument("--paper-eigenvalues", default=None,
                    help="a folder with the authors' Koopman_eigenvalues_FCN_MNIST_h={5,10,40}.npy, to recompute "
                         "their W1 next to ours (optional; not needed for the study)")
    ap.add_argument("--quick", action="store_true", help="seconds: widths 5 40, 2 seeds, 240 steps, 16 delays")
    ap.add_argument("--out", default="out/studies/fcn_width")
    ap.add_argument("--images", default=None, help="copy the docs' figures here (e.g. docs/images/studies)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.quick:
        args.widths, args.seeds, args.steps, args.delays, args.null_samples = [5, 40], 3, 240, 16, 60
        args.compare_seeds = 2
        args.no_all_weights = True
    torch.set_num_threads(args.threads)
    widths = sorted(set(args.widths))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    xtr, ytr, xte, yte = mnist_subset()
    data = (xtr, ytr, xte, yte)
    print(f"training {len(widths)} widths x {args.seeds} seeds, {args.steps} steps each")
    runs = [train_run(args, h, s, data) for h in widths for s in range(args.seeds)]
    m = w1_matrix(runs, "spectrum")
    block = width_block_stats(runs, m, widths)
    perm = {f"{a}-{b}": permutation_test(runs, "spectrum", a, b) for a, b in itertools.combinations(widths, 2)}
    block_all, perm_all = None, None
    if not args.no_all_weights:
        m_all = w1_matrix(runs, "spectrum_all")
        block_all = width_block_stats(runs, m_all, widths)
        perm_all = {f"{a}-{b}": permutation_test(runs, "spectrum_all", a, b) for a, b in itertools.combinations(widths, 2)}
    for key, v in block.items():
        v["permutation"] = perm.get(key)
        if block_all is not None:
            block_all[key]["permutation"] = perm_all.get(key)
    print("compare_dynamics on seed pairs")
    rows = compare_pairs(args, runs, widths)
    summary = summarise_pairs(rows, widths)
    thr = threshold_width(lambda a, b: summary[f"{a}-{b}"]["distinguishable"], widths)
    thr_perm = threshold_width(lambda a, b: block[f"{a}-{b}"]["permutation"]["p_value"] <= 0.05, widths)
    paper = None
    if args.paper_eigenvalues:
        paper = paper_reference(Path(args.paper_eigenvalues))
    total = time.perf_counter() - t0
    plot_distances(out / "distances.png", widths, block, summary, block_all)
    plot_eigenvalues(out / "eigenvalues.png", runs, widths)
    res = {
        "args": {**vars(args), "widths": widths}, "machine": f"{cpu_name()}, {args.threads} torch thread(s), CPU only",
        "seconds": total, "n_train": len(xtr), "seeds": list(range(args.seeds)), "observable": "fc2.weight, pca",
        "runs": [{"h": r["h"], "seed": r["seed"], "n_weights": r["n_weights"], "test_accuracy": r["test_accuracy"],
                  "final_train_loss": r["final_train_loss"], "train_seconds": r["train_seconds"],
                  "one_step_error": r["spectrum"].reconstruction_error,
                  "explained_variance": r["spectrum"].explained_variance,
                  "max_abs_eigenvalue": float(np.abs(r["spectrum"].eigenvalues).max()),
                  "median_abs_eigenvalue": float(np.median(np.abs(r["spectrum"].eigenvalues))),
                  "median_abs_angle": float(np.median(np.abs(np.angle(r["spectrum"].eigenvalues)))),
                  "eigenvalues": [[float(v.real), float(v.imag)] for v in r["spectrum"].eigenvalues],
                  "eigenvalues_all_weights": None if r["spectrum_all"] is None else
                  [[float(v.real), float(v.imag)] for v in r["spectrum_all"].eigenvalues]} for r in runs],
        "run_labels": [r["label"] for r in runs], "w1_matrix": m.tolist(),
        "w1_blocks": block, "w1_blocks_all_weights": block_all,
        "pairs": rows, "pair_summary": summary, "threshold_width": thr,
        "threshold_width_permutation": thr_perm, "paper_reference": paper,
    }
    md = markdown(res)
    (out / "fcn_width.md").write_text(md)
    (out / "fcn_width.json").write_text(json.dumps(res, indent=1))
    print("\n" + md)
    if args.images:
        img = Path(args.images)
        img.mkdir(parents=True, exist_ok=True)
        for src, dst in DOC_FIGURES.items():
            shutil.copy(out / src, img / dst)
    print(f"total {total:.0f} s; written to {out}")
    return res


def paper_reference(folder: Path) -> dict:
    """W1 (mean ± sd over the 25 batch seeds) between the authors' saved spectra, and seed vs. seed within h=40."""
    e = {h: np.load(folder / f"Koopman_eigenvalues_FCN_MNIST_h={h}.npy") for h in (5, 10, 40)}
    out = {}
    for a, b in [(5, 10), (5, 40), (10, 40)]:
        d = np.array([spectrum_distance(e[a][s], e[b][s])[0] for s in range(len(e[a]))])
        out[f"h={a} vs h={b} (same batch seed)"] = {"mean": float(d.mean()), "sd": float(d.std(ddof=1))}
    for h in (5, 10, 40):
        d = np.array([spectrum_distance(e[h][i], e[h][j])[0] for i, j in itertools.combinations(range(len(e[h])), 2)])
        out[f"h={h} vs h={h} (batch seed vs seed)"] = {"mean": float(d.mean()), "sd": float(d.std(ddof=1))}
    return out


if __name__ == "__main__":
    main()
