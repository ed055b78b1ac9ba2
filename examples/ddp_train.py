"""Data-parallel training with ``CMDOptimizer`` under ``torchrun`` (DDP, gloo on CPU or NCCL on GPU).

    torchrun --standalone --nproc_per_node 2 examples/ddp_train.py
    python examples/ddp_train.py --local 2        # the same without torchrun (spawns 2 processes)

Every rank trains a SmallCNN on its shard of the same global batch of real MNIST digits. In the
warm-up DDP all-reduces all N weight gradients; at the switch every rank decomposes the same
recording (``modeopt.distributed.ddp`` makes the seed agree and checks the result), and DDP's reducer
is rebuilt over the M mode scalars - the all-reduce then carries M numbers per step. Rank 0 prints
the bytes each step handed to all-reduce, measured on the real reducer with a communication hook.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import modeopt
from workloads import mnist_subset
from modeopt.distributed.ddp import CommMeter, launch_local
from workloads import SmallCNN, batches, evaluate


def train(rank: int, world: int, args: argparse.Namespace) -> None:
    xtr, ytr, xte, yte = mnist_subset()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if dist.get_backend() == "nccl" else None
    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)
    model = SmallCNN().to(device)
    ddp = DDP(model, device_ids=[device.index] if device is not None else None)
    meter = CommMeter.register(ddp)
    base = torch.optim.Adam(model.parameters(), lr=args.lr)
    # Built on the DDP model: CMDOptimizer unwraps it and attaches modeopt.distributed.ddp for you.
    opt = modeopt.CMDOptimizer(ddp, base, n_modes=args.n_modes, warmup_steps=args.warmup_steps,
                               snapshot_every=args.snapshot_every, seed=args.seed, progress=rank == 0)
    per_rank = args.batch_size // world
    steps_per_epoch = len(xtr) // args.batch_size
    for step, (xb, yb) in enumerate(batches(xtr, ytr, args.batch_size, seed=args.seed, epochs=args.epochs), 1):
        xb, yb = xb[rank * per_rank:(rank + 1) * per_rank], yb[rank * per_rank:(rank + 1) * per_rank]
        if device is not None:
            xb, yb = xb.to(device), yb.to(device)
        phase = opt.phase
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(ddp(xb), yb).backward()
        opt.step()
        sent, _ = meter.take()
        if rank == 0 and (step % steps_per_epoch == 0 or step in (args.warmup_steps, args.warmup_steps + 1)):
            acc = evaluate(model, xte.to(device) if device is not None else xte, yte.to(device) if device is not None else yte)
            print(f"step {step:4d}  phase {phase:8s}  all-reduce {sent:>9,} B  test accuracy {acc:.3f}", flush=True)
    # The ranks hold the same weights: check it (one small all-gather).
    digest = torch.tensor([sum(float(p.detach().double().sum()) for p in model.parameters())], dtype=torch.float64)
    every = [torch.zeros_like(digest) for _ in range(world)]
    dist.all_gather(every, digest.to(device) if device is not None else digest)
    if rank == 0:
        same = all(torch.equal(e.cpu(), every[0].cpu()) for e in every)
        print(f"{world} ranks, identical weights: {same}; trainable now {opt.trainable_parameters():,} "
              f"scalars for {sum(p.numel() for n, p in model.named_parameters() if 'modeopt_r' not in n):,} weights")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64, help="global batch, split across the ranks")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--n-modes", type=int, default=10)
    ap.add_argument("--warmup-steps", type=int, default=80)
    ap.add_argument("--snapshot-every", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--local", type=int, default=0, metavar="N",
                    help="spawn N local CPU processes instead of running under torchrun")
    args = ap.parse_args()
    if args.local:
        launch_local(_entry, (args,), nprocs=args.local, timeout=600)
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    try:
        train(dist.get_rank(), dist.get_world_size(), args)
    finally:
        dist.destroy_process_group()


def _entry(rank: int, world: int, args: argparse.Namespace) -> None:
    train(rank, world, args)


if __name__ == "__main__":
    main()
