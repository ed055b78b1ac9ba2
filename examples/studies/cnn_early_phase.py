"""Where do a CNN's training dynamics change early on? Windows of one run compared (Redman et al., Sec. 4.3).

The paper (arXiv 2302.09160, Fig. 4 and an appendix figure) trains LeNet on MNIST and ResNet-20 on
CIFAR-10, computes Koopman eigenvalues of windows of the early training iterations, and shows the
Wasserstein distance between the windows' eigenvalues as a heat map: the dynamics go through
transitions early in training (non-conjugate windows), then settle (windows that are close).

Here: ``workloads.SmallCNN`` (a LeNet-style CNN, 29,994 weights) on 4,000 real MNIST digits
(``workloads.mnist_subset``), plain SGD (lr 0.1, batch 64), ``--steps`` steps from initialisation
with the weights recorded at every step, for ``--seeds`` seeds (initialisation and batch order).
Each run is cut into windows of ``--window`` steps (starting every ``--stride`` steps); each window
gets ``koopman_spectrum`` (10 principal coordinates of all weights, ``--delays`` delays, fixed
``--rank`` so that all spectra have equal size) and ``spectrum_distance`` gives

* the distance between each window and the next non-overlapping one (where does it jump?);
* the heat map of all non-overlapping windows (the paper's figure);
* the same-window distance between seeds, the scale of "the same dynamics" at each point;

and ``compare_dynamics`` (with its p-value) between consecutive segments of ``--segment`` steps.
Loss (per step, on the mini-batch) and test accuracy (1,000 held-out digits, at every window
boundary) are recorded alongside.

Runtime: about 1 minute for the full setting on one shared CPU thread (measured: 61 s, 3 seeds x 600
steps; the JSON's ``seconds``); ``--quick`` (1 seed, 150 steps) about 12 s. Writes ``OUT/cnn_early_phase.{json,md}``
and ``OUT/*.png``; ``--images`` copies the figures the docs show to ``docs/images/studies/``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from modeopt.analysis import Recording, compare_dynamics, koopman_spectrum, spectrum_distance
from workloads import SmallCNN, batches, cpu_name, evaluate, mnist_subset

DOC_FIGURES = ["cnn_early_phase.png"]


def train_run(seed: int, steps: int, lr: float, every_eval: int, data) -> dict:
    """One recorded SGD run: trajectory (steps + 1 samples), loss per step, test accuracy every ``every_eval``."""
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    it = batches(xtr, ytr, 64, seed=seed)
    losses, acc = [], {0: evaluate(model, xte, yte)}
    with Recording(model, every=1, initial=True) as rec:
        for t in range(1, steps + 1):
            xb, yb = next(it)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            rec.step()
            losses.append(loss.item())
            if t % every_eval == 0:
                acc[t] = evaluate(model, xte, yte)
    return {"trajectory": rec.trajectory(), "loss": losses, "accuracy": acc}


def window_spectra(traj, starts, window, **kw):
    return [koopman_spectrum(traj.window(s, s + window), **kw) for s in starts]


def smooth(x, k=10):
    x = np.asarray(x)
    return np.convolve(x, np.ones(k) / k, mode="valid")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="out/studies/cnn_early_phase")
    ap.add_argument("--quick", action="store_true", help="1 seed, 150 steps, windows of 30 (seconds)")
    ap.add_argument("--images", action="store_true", help="copy the docs' figures to docs/images/studies/")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--window", type=int, default=50)
    ap.add_argument("--stride", type=int, default=25)
    ap.add_argument("--delays", type=int, default=8)
    ap.add_argument("--rank", type=int, default=6)
    ap.add_argument("--segment", type=int, default=150)
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.window, args.stride, args.delays, args.rank, args.segment = 1, 150, 30, 15, 4, 4, 75
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = mnist_subset()
    W, S = args.window, args.stride
    kw = {"delays": args.delays, "rank": args.rank}
    starts = list(range(0, args.steps + 1 - W + 1, S))  # sliding windows of W samples
    blocks = list(range(0, args.steps + 1 - W + 1, W))  # non-overlapping windows (heat map)

    runs, per_seed = {}, []
    for seed in range(args.seeds):
        ts = time.perf_counter()
        run = train_run(seed, args.steps, args.lr, W, data)
        runs[seed] = run
        traj = run["trajectory"]
        specs = window_spectra(traj, starts, W, **kw)
        # distance of the window at s to the adjacent non-overlapping window at s + W
        nxt = {s: i for i, s in enumerate(starts)}
        consecutive = [(s, spectrum_distance(specs[i], specs[nxt[s + W]])[0]) for i, s in enumerate(starts)
                       if s + W in nxt]
        bspecs = [specs[nxt[b]] for b in blocks]
        heat = np.array([[spectrum_distance(a, b)[0] for b in bspecs] for a in bspecs])
        segs = []
        for a in range(0, args.steps + 1 - 2 * args.segment, args.segment):
            A = traj.window(a, a + args.segment)
            B = traj.window(a + args.segment, a + 2 * args.segment)
            try:
                c = compare_dynamics(A, B, labels=(f"{a}-{a + args.segment}", f"{a + args.segment}-{a + 2 * args.segment}"),
                                     progress=False, **kw)
                segs.append({"a": [a, a + args.segment], "b": [a + args.segment, a + 2 * args.segment],
                             "distance": c.distance, "p_value": c.p_value, "statistic": c.statistic,
                             "null_median": float(np.median(c.null)), "rank": c.rank, "window": c.window})
            except ValueError as e:
                segs.append({"a": [a, a + args.segment], "error": str(e)[:200]})
        jump = max(consecutive, key=lambda x: x[1])
        per_seed.append({
            "seed": seed, "consecutive": [[int(s), float(d)] for s, d in consecutive],
            "largest_jump_window_start": int(jump[0]), "largest_jump": float(jump[1]),
            "heat": heat.tolist(), "segments": segs, "accuracy": {str(k): v for k, v in run["accuracy"].items()},
            "final_accuracy": run["accuracy"][max(run["accuracy"])], "loss": run["loss"],
            "max_abs_eig": [float(np.abs(s.eigenvalues).max()) for s in specs],
            "one_step_error": [float(s.reconstruction_error) for s in specs],
            "window_eigenvalues": [[[float(v.real), float(v.imag)] for v in s.eigenvalues] for s in specs],
            "seconds": time.perf_counter() - ts})
        print(f"seed {seed}: {time.perf_counter() - ts:.0f} s, test accuracy {per_seed[-1]['final_accuracy']:.3f}; "
              f"largest consecutive-window distance {jump[1]:.4f} at window {jump[0]}-{jump[0] + W} vs. next; "
              "segments: " + ", ".join(f"{s['a']}: W1 {s['distance']:.4f} p {s['p_value']:.3f}" if "p_value" in s
                                       else f"{s['a']}: error" for s in segs))
        per_seed[-1]["_specs"] = specs

    # same window, other seed: what "the same dynamics" looks like at each point of training
    between_seeds = []
    for i, s in enumerate(starts):
        ds = [spectrum_distance(per_seed[a]["_specs"][i], per_seed[b]["_specs"][i])[0]
              for a in range(len(per_seed)) for b in range(a + 1, len(per_seed))]
        if ds:
            between_seeds.append([int(s), float(np.mean(ds))])
    for p in per_seed:
        del p["_specs"]

    res = {"settings": {**vars(args), "optimizer": f"SGD lr {args.lr}, batch 64", "model": "workloads.SmallCNN",
                        "data": "workloads.mnist_subset(): 4,000 train / 1,000 test", "observable": "pca, 10 coordinates",
                        "window_starts": starts, "blocks": blocks},
           "per_seed": per_seed, "between_seeds_same_window": between_seeds,
           "seconds": time.perf_counter() - t0,
           "machine": f"{cpu_name()}, torch threads 1"}
    paths = figures(out, res, args)
    (out / "cnn_early_phase.json").write_text(json.dumps(res, indent=1))
    (out / "cnn_early_phase.md").write_text(markdown(res, args))
    if args.images:
        dst = Path(__file__).resolve().parents[2] / "docs" / "images" / "studies"
        dst.mkdir(parents=True, exist_ok=True)
        for p in paths:
            shutil.copy(p, dst / p.name)
    print(f"done in {res['seconds']:.0f} s -> {out}")
    return res


def figures(out: Path, res: dict, args) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    W = args.window
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    ax = axes[0]
    for p in res["per_seed"]:
        c = np.array(p["consecutive"])
        ax.plot(c[:, 0], c[:, 1], "o-", ms=3, label=f"seed {p['seed']}")
    if res["between_seeds_same_window"]:
        b = np.array(res["between_seeds_same_window"])
        ax.plot(b[:, 0], b[:, 1], "k--", lw=1, label="same window, other seed (mean)")
    ax.set(yscale="log", xlabel=f"start of the window (step); the next one starts {W} steps later",
           ylabel=f"W1(window, next window), {W} steps each",
           title="consecutive windows: where the dynamics change")
    ax.legend(fontsize=8)
    ax = axes[1]
    ax2 = ax.twinx()
    for p in res["per_seed"]:
        ax.plot(np.arange(args.window // 5, len(p["loss"]) + 1)[: len(smooth(p["loss"]))] , smooth(p["loss"]), lw=1)
        acc = sorted((int(k), v) for k, v in p["accuracy"].items())
        ax2.plot([a for a, _ in acc], [v for _, v in acc], "o:", ms=3)
    ax.set(yscale="log", xlabel="step", ylabel="training loss (mini-batch, 10-step mean)", title="loss (lines) and "
           "test accuracy (dots)")
    ax2.set_ylabel("test accuracy")
    ax = axes[2]
    h = np.array(res["per_seed"][0]["heat"])
    h = np.where(np.eye(len(h), dtype=bool), np.nan, h)  # the diagonal is 0
    im = ax.imshow(np.log10(h), cmap="viridis", origin="upper")
    blocks = res["settings"]["blocks"]
    ax.set_xticks(range(len(blocks)))
    ax.set_xticklabels([str(b) for b in blocks], rotation=90, fontsize=7)
    ax.set_yticks(range(len(blocks)))
    ax.set_yticklabels([str(b) for b in blocks], fontsize=7)
    ax.set(title=f"log10 W1 between windows (seed 0; window start)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    path = out / "cnn_early_phase.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def markdown(res: dict, args) -> str:
    W = args.window
    L = ["# The early phase of a CNN: windows of one run compared (Redman et al., Sec. 4.3)", "",
         f"SmallCNN on 4,000 MNIST digits, SGD lr {args.lr}, batch 64, {args.steps} steps, weights at every step; "
         f"windows of {W} steps every {args.stride}; 10 principal coordinates, {args.delays} delays, rank {args.rank}. "
         f"Runtime {res['seconds']:.0f} s.", "",
         "| seed | test accuracy at steps " + ", ".join(str(k) for k in sorted(int(k) for k in res['per_seed'][0]['accuracy']))
         + " | largest W1(window, next) | at window | median W1(window, next) after step 200 |", "|---|---|---|---|---|"]
    for p in res["per_seed"]:
        acc = ", ".join(f"{p['accuracy'][str(k)]:.3f}" for k in sorted(int(k) for k in p["accuracy"]))
        late = [d for s, d in p["consecutive"] if s >= 200]
        L.append(f"| {p['seed']} | {acc} | {p['largest_jump']:.4f} | {p['largest_jump_window_start']}-"
                 f"{p['largest_jump_window_start'] + W} vs. next | {np.median(late) if late else float('nan'):.4f} |")
    L += ["", "## W1(window, next window) per window start", "",
          "| window start | " + " | ".join(f"seed {p['seed']}" for p in res["per_seed"]) + " | same window, other seed |",
          "|---|" + "---|" * (len(res["per_seed"]) + 1)]
    bs = dict((s, d) for s, d in res["between_seeds_same_window"])
    for i, (s, _) in enumerate(res["per_seed"][0]["consecutive"]):
        L.append(f"| {s} | " + " | ".join(f"{p['consecutive'][i][1]:.4f}" for p in res["per_seed"]) +
                 f" | {bs.get(s, float('nan')):.4f} |")
    L += ["", f"## compare_dynamics between consecutive segments of {args.segment} steps (W1, p, between/within)", "",
          "| segment A | segment B | " + " | ".join(f"seed {p['seed']}" for p in res["per_seed"]) + " |",
          "|---|---|" + "---|" * len(res["per_seed"])]
    for j, s in enumerate(res["per_seed"][0]["segments"]):
        cells = []
        for p in res["per_seed"]:
            q = p["segments"][j]
            cells.append(f"{q['distance']:.4f}, p {q['p_value']:.3f}, {q['statistic'] / q['null_median']:.2f}x"
                         if "p_value" in q else "error: " + q["error"][:60])
        L.append(f"| {s['a'][0]}-{s['a'][1]} | {s['a'][1]}-{s['a'][1] + args.segment} | " + " | ".join(cells) + " |")
    L += ["", f"Machine: {res['machine']}", ""]
    return "\n".join(L)


if __name__ == "__main__":
    main()
