"""Study a real training run with modes: record it to a directory, then `modeopt analyze` it.

Trains ``workloads.SmallCNN`` on 4,000 real MNIST digits (plain loop), recording the weights every 4
steps into ``OUT/run/`` (one file per snapshot), then runs

    modeopt analyze OUT/run --modes 10 --eval examples/mnist_eval.py:evaluation --out OUT/report

and prints CMD next to DMD at several sizes (relative error of the weights, final test
accuracy). ``--sgd-augment`` trains with SGD + momentum on randomly shifted digits instead of
Adam on the plain ones (the setting where the CMD paper reports DMD failing). The default run's
figures are the ones in docs/studying.md. About a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import modeopt
from modeopt.analysis import Recording, dmd, load_snapshots, reconstruction_errors
from modeopt.cli import main as cli
from workloads import SmallCNN, batches, evaluate
from mnist_eval import mnist_split  # examples/ is on sys.path when a script here runs


def shifted(x: torch.Tensor, g: torch.Generator, max_shift: int = 3) -> torch.Tensor:
    """The batch moved by one random offset of up to ``max_shift`` pixels (augmentation)."""
    pad = F.pad(x, (max_shift,) * 4, value=float(x.min()))
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2,), generator=g).tolist()
    return pad[:, :, dy : dy + x.shape[2], dx : dx + x.shape[3]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--every", type=int, default=4, help="snapshot every k optimizer steps")
    ap.add_argument("--modes", type=int, default=10)
    ap.add_argument("--sgd-augment", action="store_true", help="SGD + momentum on randomly shifted digits")
    ap.add_argument("--out", default="out/study")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    run = out / "run"
    shutil.rmtree(run, ignore_errors=True)

    xtr, ytr, xte, yte = mnist_split()
    torch.manual_seed(args.seed)
    model = SmallCNN()
    if args.sgd_augment:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        setting = "SGD + momentum, shifted digits"
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        setting = "Adam"
    g = torch.Generator().manual_seed(args.seed)
    steps = args.epochs * (len(xtr) // 64)
    with Recording(model, every=args.every, initial=True, directory=run) as rec:
        for xb, yb in tqdm(batches(xtr, ytr, 64, seed=args.seed, epochs=args.epochs), total=steps,
                           desc=f"training (snapshot every {args.every} steps)"):
            if args.sgd_augment:
                xb = shifted(xb, g)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            rec.step()
    print(f"{rec.n_snapshots} snapshots in {run}")
    spec = f"{Path(__file__).with_name('mnist_eval.py')}:evaluation"  # the mnist_eval imported above: its data
    cli(["analyze", str(run), "--modes", str(args.modes), "--eval", spec, "--out", str(out / "report"),
         "--title", f"SmallCNN on the MNIST subset: {args.epochs} epochs of {setting}, M = {args.modes}"])

    # CMD next to DMD at several sizes, on the same trajectory.
    traj = load_snapshots(run)
    probe = SmallCNN()
    rows = [("recorded weights", "-", "-", evaluate(model, xte, yte))]
    for m in (1, 2, 5, 10):
        d = modeopt.decompose(traj, n_modes=m, seed=0)
        d.load_into(probe, -1)
        rows.append((f"CMD, M = {m}", "2", f"{reconstruction_errors(traj, d).total_rel:.3f}",
                     evaluate(probe, xte, yte)))
    for r in (1, 2, 3, 5, 10):
        d = dmd(traj, r)
        d.load_into(probe, -1)
        rows.append((f"DMD, r = {r}", str(r), f"{reconstruction_errors(traj, d).total_rel:.3f}",
                     evaluate(probe, xte, yte)))
    lines = ["| model | numbers per weight | relative error of the weights | test accuracy, last sample |",
             "|---|---|---|---|"] + [f"| {a} | {b} | {c} | {acc:.3f} |" for a, b, c, acc in rows]
    table = "\n".join(lines)
    print("\n" + table)
    (out / "cmd_vs_dmd.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
