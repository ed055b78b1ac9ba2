"""modeopt demo: train a CNN plainly and in mode space, side by side, on real MNIST digits.

Both runs start from the same initial weights and see the same batches. The plain run uses Adam
for 6 epochs. The CMD run uses ``modeopt.CMDOptimizer`` around the same Adam: 3 recorded warm-up
epochs, then 3 epochs in which only 10 mode scalars train (plus the 90 biases). The demo also
decomposes the plain run's recorded trajectory after the fact (post-hoc CMD, the paper's analysis).

Prints a table, and writes ``out/demo/results.md``, ``out/demo/demo.png`` (accuracy vs. step, the
switch marked; the modes' reference profiles) and ``out/demo/results.json``. About two minutes on
2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import modeopt
from workloads import mnist_subset
from workloads import SmallCNN, batches, evaluate


def train(name, model, opt, data, steps, test, eval_every, recorder=None):
    """Plain training loop; returns the accuracy curve and step times."""
    curve, times = [], []
    bar = tqdm(range(1, steps + 1), desc=name, mininterval=1.0)
    for step in bar:
        xb, yb = next(data)
        t = time.perf_counter()
        opt.zero_grad()
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        times.append((time.perf_counter() - t, getattr(opt, "phase", "plain")))
        if recorder is not None:
            recorder.step()
        if step % eval_every == 0 or step == steps:
            curve.append((step, evaluate(model, *test)))
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{curve[-1][1]:.3f}")
    return curve, times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--warmup-epochs", type=int, default=3)
    ap.add_argument("--modes", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out/demo")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    xtr, ytr, xte, yte = mnist_subset()
    spe = len(xtr) // 64
    steps, warmup, eval_every = args.epochs * spe, args.warmup_epochs * spe, spe // 2
    torch.manual_seed(args.seed)
    init = SmallCNN().state_dict()

    plain = SmallCNN()
    plain.load_state_dict(init)
    recorder = modeopt.TrajectoryRecorder(plain, every=5)
    plain_curve, plain_times = train("plain Adam", plain, torch.optim.Adam(plain.parameters(), lr=1e-3),
                                     batches(xtr, ytr, 64, seed=args.seed), steps, (xte, yte), eval_every, recorder)

    model = SmallCNN()
    model.load_state_dict(init)
    opt = modeopt.CMDOptimizer(model, torch.optim.Adam(model.parameters(), lr=1e-3), n_modes=args.modes,
                               warmup_steps=warmup, snapshot_every=5, seed=args.seed,
                               exclude=lambda name, p: p.ndim < 2)  # biases stay free
    cmd_curve, cmd_times = train(f"CMDOptimizer (M={args.modes})", model, opt, batches(xtr, ytr, 64, seed=args.seed),
                                 steps, (xte, yte), eval_every)

    # Post-hoc CMD of the plain run: model its whole trajectory with the same number of modes.
    d = modeopt.decompose(recorder.trajectory(), n_modes=args.modes, seed=args.seed)
    probe = SmallCNN()
    probe.load_state_dict(plain.state_dict())
    d.load_into(probe, -1)
    posthoc = evaluate(probe, xte, yte)

    at = lambda curve, s: min(curve, key=lambda c: abs(c[0] - s))[1]  # noqa: E731
    ms = lambda times, phase=None: 1e3 * statistics.median(t for t, p in times if phase is None or p == phase)  # noqa: E731
    n = sum(p.numel() for p in plain.parameters())
    share = (cmd_curve[-1][1] - at(plain_curve, warmup)) / max(1e-9, plain_curve[-1][1] - at(plain_curve, warmup))
    rows = [
        ("plain Adam", f"{n:,}", at(plain_curve, warmup), plain_curve[-1][1], ms(plain_times)),
        (f"CMDOptimizer, M = {args.modes} (+ biases)", f"{opt.trainable_parameters():,}", at(cmd_curve, warmup),
         cmd_curve[-1][1], ms(cmd_times, "embedded")),
    ]
    lines = [
        f"SmallCNN on 4,000 real MNIST digits, {args.epochs} epochs of Adam (lr 1e-3), seed {args.seed}; "
        f"CMD switches to mode space after {args.warmup_epochs} epochs (step {warmup}).",
        "",
        "| run | trainable after the switch | accuracy at the switch | final accuracy | step (ms) |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c:.3f} | {e:.3f} | {f:.1f} |" for a, b, c, e, f in rows]
    lines += [
        "",
        f"Mode space kept {share:.0%} of the accuracy plain training gained after the switch, training "
        f"{opt.trainable_parameters():,} numbers instead of {n:,}.",
        f"Post-hoc CMD of the plain run (its whole trajectory modelled by {args.modes} modes, weights at the last "
        f"snapshot): {posthoc:.3f} (raw weights {plain_curve[-1][1]:.3f}).",
    ]
    table = "\n".join(lines)
    print("\n" + table)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"plain": plain_curve, "cmd": cmd_curve, "switch_step": warmup,
                                                  "posthoc": posthoc, "trainable": opt.trainable_parameters()}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot; pip install 'modeopt[analysis]')")
        return
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.3), gridspec_kw={"width_ratios": [1.4, 1]})
    ax[0].plot(*zip(*plain_curve), color="0.25", lw=2, label=f"plain Adam ({n:,} trainable)")
    ax[0].plot(*zip(*cmd_curve), color="tab:red", lw=2,
               label=f"CMDOptimizer ({opt.trainable_parameters():,} trainable after the switch)")
    ax[0].axvline(warmup, color="tab:red", ls=":", lw=1.2)
    ax[0].annotate(f"switch to {args.modes} modes", (warmup, 0.5), xycoords=("data", "axes fraction"),
                   xytext=(-4, 0), textcoords="offset points", rotation=90, va="center", ha="right",
                   color="tab:red", fontsize=9)
    ax[0].axhline(posthoc, color="tab:blue", ls="--", lw=1, label=f"post-hoc CMD of the plain run: {posthoc:.3f}")
    lo = min(c[1] for c in plain_curve[2:] + cmd_curve[2:])
    ax[0].set(xlabel="training step", ylabel="test accuracy", ylim=(max(0, lo - 0.01), 1.0),
              title="Test accuracy, plain vs. mode-space training")
    ax[0].legend(fontsize=8, loc="lower right")
    ax[0].grid(alpha=0.3)
    traj_steps = d.steps
    for m in range(min(d.n_modes, 6)):
        prof = d.profiles[m]
        ax[1].plot(traj_steps, ((prof - prof.mean()) / prof.std()).numpy(), lw=1.3,
                   label=f"mode {m}: {int(d.sizes[m]):,} weights")
    ax[1].set(xlabel="training step", ylabel="reference weight (standardised)",
              title="Post-hoc CMD: the largest modes' reference profiles")
    ax[1].legend(fontsize=8)
    ax[1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "demo.png", dpi=110)
    print(f"wrote {out / 'results.md'}, {out / 'results.json'} and {out / 'demo.png'}")


if __name__ == "__main__":
    main()
