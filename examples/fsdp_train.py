"""Sharded training with ``CMDOptimizer`` on an FSDP2 (``fully_shard``) model under ``torchrun``.

    torchrun --standalone --nproc_per_node 2 examples/fsdp_train.py
    python examples/fsdp_train.py --local 2        # the same without torchrun (spawns 2 CPU processes)

Every rank trains the SmallCNN, each layer and the root ``fully_shard``-ed, on its part of the same
global batch of real MNIST digits. ``modeopt.CMDOptimizer`` sees the FSDP2 model and works on each
rank's shards: in the warm-up each rank records its own shards; at the switch the ranks decompose
together (the sampled rows are gathered, each rank fits its own); in mode space each rank reduces
its shard of the gradient onto the M modes and one all-reduce of M numbers is added to FSDP2's
traffic. Rank 0 prints the bytes each step sent, by collective, and what it holds at the end; then a
sharded checkpoint (DCP) is saved and reloaded into a fresh model and optimizer. Measured with
``--local 2`` (CPU, gloo): 119,976 B all-gathered and reduce-scattered per step in both phases,
+ 40 B all-reduced in mode space; test accuracy 0.874 after epoch 1 (warm-up), 0.923 after epoch 2
(mode space). Only CPU with gloo has run; ``--local`` is CPU only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

import torch
import torch.distributed as dist
import torch.nn.functional as F

import modeopt
from modeopt.cmd_optimizer import sharded_checkpoint
from modeopt.distributed.ddp import launch_local
from modeopt.distributed.sharding import count_collectives
from workloads import SmallCNN, batches, evaluate, mnist_subset


def train(rank: int, world: int, args: argparse.Namespace) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    xtr, ytr, xte, yte = mnist_subset()
    cuda = dist.get_backend() == "nccl"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = SmallCNN().to(device)
    mesh = init_device_mesh(device.type, (world,))
    for child in model.children():
        if any(True for _ in child.parameters()):
            fully_shard(child, mesh=mesh)
    fully_shard(model, mesh=mesh)
    base = torch.optim.Adam(model.parameters(), lr=args.lr)
    opt = modeopt.CMDOptimizer(model, base, n_modes=args.n_modes, warmup_steps=args.warmup_steps,
                               snapshot_every=args.snapshot_every, seed=args.seed, progress=False)
    if rank == 0:
        print(f"{type(opt).__name__}: this rank holds {opt.shards.n_local:,} of {opt.shards.n_global:,} weights")
    per_rank = args.batch_size // world
    steps_per_epoch = len(xtr) // args.batch_size
    for step, (xb, yb) in enumerate(batches(xtr, ytr, args.batch_size, seed=args.seed, epochs=args.epochs), 1):
        xb, yb = xb[rank * per_rank:(rank + 1) * per_rank].to(device), yb[rank * per_rank:(rank + 1) * per_rank].to(device)
        phase = opt.phase
        with count_collectives() as sent:
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
        acc = evaluate(model, xte.to(device), yte.to(device)) if step % steps_per_epoch == 0 else None
        if rank == 0 and (acc is not None or step in (args.warmup_steps, args.warmup_steps + 1)):
            what = ", ".join(f"{k} {v:,}" for k, v in sorted(sent.bytes.items()))
            print(f"step {step:4d}  phase {phase:8s}  sent {what} B" + (f"  test accuracy {acc:.3f}" if acc else ""),
                  flush=True)
    s = opt.state_bytes()
    if rank == 0:
        print(f"rank 0 holds: weights {s['weights']:,} B, a {s['a']:,} B, labels {s['labels']:,} B, gradients "
              f"{s['grads']:,} B, optimizer state {s['optimizer']:,} B; trainable {opt.trainable_parameters():,} scalars")
    # A sharded checkpoint (torch.distributed.checkpoint), loaded into a fresh model and optimizer.
    path = [tempfile.mkdtemp(prefix="modeopt-fsdp-") if rank == 0 else None]
    dist.broadcast_object_list(path, src=0)
    sharded_checkpoint.save(path[0], model, opt)
    torch.manual_seed(args.seed + 1)
    fresh = SmallCNN().to(device)
    for child in fresh.children():
        if any(True for _ in child.parameters()):
            fully_shard(child, mesh=mesh)
    fully_shard(fresh, mesh=mesh)
    opt2 = modeopt.CMDOptimizer(fresh, torch.optim.Adam(fresh.parameters(), lr=args.lr), n_modes=args.n_modes,
                                warmup_steps=args.warmup_steps, snapshot_every=args.snapshot_every, seed=args.seed)
    sharded_checkpoint.load(path[0], fresh, opt2)
    same = all(torch.equal(a.to_local(), b.to_local()) for a, b in zip(model.parameters(), fresh.parameters()))
    if rank == 0:
        print(f"checkpoint {path[0]}: reloaded in phase {opt2.phase!r}, weights identical: {same}, "
              f"r identical: {torch.equal(opt.r_full(), opt2.r_full())}")
    dist.barrier()
    if rank == 0:
        shutil.rmtree(path[0], ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=2)
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
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    try:
        train(dist.get_rank(), dist.get_world_size(), args)
    finally:
        dist.destroy_process_group()


def _entry(rank: int, world: int, args: argparse.Namespace) -> None:
    train(rank, world, args)


if __name__ == "__main__":
    main()
