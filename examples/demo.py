"""modeopt demo: Correlation Mode Decomposition of a real training run.

Trains a small CNN on 4,000 real MNIST digits (4 epochs, Adam), records the weights every
5 steps, decomposes the trajectory into M = 1..10 modes, and compares the test accuracy of
the raw weights with the CMD-modelled weights ``a_i * w_ref(t) + b_i``.

Writes ``out/demo/results.md`` and ``out/demo/accuracy.png``. Runs in about a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm.auto import tqdm

import modeopt
from modeopt.datasets import mnist_subset
from modeopt.zoo import SmallCNN, batches, evaluate, train_steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--out", default="out/demo")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    xtr, ytr, xte, yte = mnist_subset()
    torch.manual_seed(args.seed)
    model = SmallCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    recorder = modeopt.TrajectoryRecorder(model, every=5)
    steps = args.epochs * (len(xtr) // 64)
    bar = tqdm(total=steps, desc="training (recording every 5 steps)", mininterval=1.0)

    def on_step(i: int, loss: float) -> None:
        recorder.step()
        bar.update()
        bar.set_postfix(loss=f"{loss:.3f}")

    train_steps(model, opt, batches(xtr, ytr, 64, seed=args.seed), steps, on_step=on_step)
    bar.close()
    traj = recorder.trajectory()
    raw_acc = evaluate(model, xte, yte)
    n = traj.n_weights

    rows = []
    probe = SmallCNN()
    for m in tqdm([1, 2, 3, 5, 10], desc="decomposing"):
        d = modeopt.decompose(traj, n_modes=m, seed=0)
        d.load_into(probe, -1)
        rows.append((m, evaluate(probe, xte, yte), float((d.reconstruct() - traj.matrix).norm() / traj.matrix.norm())))

    # Accuracy along the trajectory: raw snapshots vs. the M = 5 CMD model of each snapshot.
    d5 = modeopt.decompose(traj, n_modes=5, seed=0)
    raw_curve, cmd_curve = [], []
    for t in tqdm(range(traj.n_samples), desc="evaluating the trajectory"):
        traj.load_into(probe, t)
        raw_curve.append(evaluate(probe, xte, yte))
        d5.load_into(probe, t)
        cmd_curve.append(evaluate(probe, xte, yte))

    lines = [
        f"CMD of a real training: SmallCNN ({n:,} weights), {traj.n_samples} snapshots, MNIST subset",
        "",
        "| model | dimensions | test accuracy | trajectory rel. error |",
        "|---|---|---|---|",
        f"| raw weights (plain Adam) | {n:,} | {raw_acc:.3f} | - |",
    ]
    lines += [f"| CMD, M = {m} | {m} | {acc:.3f} | {err:.2e} |" for m, acc, err in rows]
    table = "\n".join(lines)
    print("\n" + table)
    (out / "results.md").write_text(table + "\n")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot; pip install modeopt[plot])")
        return
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    ax[0].plot(traj.steps, raw_curve, label="raw weights", color="0.3")
    ax[0].plot(traj.steps, cmd_curve, label="CMD model, M = 5", color="tab:red")
    ax[0].set(xlabel="training step", ylabel="test accuracy", title="accuracy along the trajectory",
              ylim=(max(0.0, min(raw_curve[2:] + cmd_curve[2:]) - 0.02), 1.0))
    ax[0].legend()
    for mode in range(d5.n_modes):
        prof = d5.profiles[mode]
        prof = (prof - prof.mean()) / prof.std()
        ax[1].plot(traj.steps, prof.numpy(), label=f"mode {mode} ({int(d5.sizes[mode]):,} weights)")
    ax[1].set(xlabel="training step", ylabel="reference weight (standardised)",
              title="the 5 modes' reference profiles")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    print(f"wrote {out / 'results.md'} and {out / 'accuracy.png'}")


if __name__ == "__main__":
    main()
