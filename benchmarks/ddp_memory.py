"""Per-rank memory and all-reduce payload of CMDOptimizer under DistributedDataParallel.

Two CPU ranks (gloo, 127.0.0.1, ``modeopt.distributed.launch_local``) train an MLP of
~8.9 M weights with AdamW: a warm-up (plain DDP steps, recorded), the switch, then mode-space
steps. Per rank and phase: the peak resident set over steady-state steps (Linux VmHWM, reset when
the phase is steady), the DDP reducer's gradient buckets (``_get_ddp_logging_data``) and the bytes
handed to all-reduce per step (``CommMeter``). The children run with glibc's mmap threshold fixed
(as in ``memory.py``), so freed blocks leave the RSS.

    python benchmarks/ddp_memory.py        # ~1 min

Results: benchmarks/results/ddp_memory.{json,md}
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # inherited by the spawned ranks

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, machine_line, peak_rss_mib, reset_peak_rss, rss_mib, save  # noqa: E402

import modeopt  # noqa: E402
from modeopt.distributed.ddp import CommMeter, launch_local  # noqa: E402

WIDTH, DEPTH, BATCH, M = 2048, 2, 32, 10
WARMUP, EVERY, STEADY = 12, 4, 4


def rank_main(rank: int, world: int, out_dir: str) -> None:
    torch.manual_seed(0)
    layers = [nn.Linear(256, WIDTH), nn.ReLU()]
    for _ in range(DEPTH):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(WIDTH, 10))
    n = sum(p.numel() for p in model.parameters())
    base_rss = rss_mib()
    ddp = DDP(model)
    meter = CommMeter.register(ddp)
    opt = modeopt.CMDOptimizer(ddp, torch.optim.AdamW(model.parameters(), lr=1e-3), n_modes=M,
                               warmup_steps=WARMUP, snapshot_every=EVERY, n_samples=30 * M, seed=0,
                               exclude=lambda name, p: p.ndim < 2, progress=False)
    g = torch.Generator().manual_seed(rank)
    rows = {}

    def nbytes(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def step(account: dict | None = None):
        x = torch.randn(BATCH, 256, generator=g)
        y = torch.randint(0, 10, (BATCH,), generator=g)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(ddp(x), y).backward()
        if account is not None:  # gradients as they stand when the optimizer steps
            account["gradients"] = nbytes(p.grad for p in model.parameters())
        opt.step()
        if account is not None:
            space = opt.space
            account.update(
                weights=nbytes(model.parameters()),
                ddp_buckets=int(ddp._get_ddp_logging_data()["total_parameter_size_bytes"]),
                optimizer_state=nbytes(v for st in opt.base.state.values() for v in st.values()
                                       if torch.is_tensor(v)),
                recording=opt.recording_bytes,
                mode_space=0 if space is None else nbytes([*space.a, *space.labels, *(space.a_scale or []),
                                                         space.r_in_weights]),
            )

    def measure(phase: str) -> None:
        reset_peak_rss()
        sent, account = [], {}
        for _ in range(STEADY):
            meter.take()
            step(account)
            sent.append(meter.take()[0])
        rows[phase] = {"peak_rss_mib": peak_rss_mib(), "trainable": opt.trainable_parameters(),
                       "allreduce_bytes_per_step": max(sent), "bytes": account,
                       "training_state_bytes": sum(account.values())}

    for _ in range(WARMUP - STEADY - 1):
        step()  # warm-up: optimizer state and part of the recording exist
    measure("warmup")  # the last steady steps before the switch (recording nearly full)
    assert opt.phase == "warmup"
    step()  # the switch
    assert opt.phase == "embedded"
    for _ in range(2):
        step()
    measure("embedded")
    result = {"rank": rank, "n": n, "baseline_rss_mib": base_rss, "phases": rows}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        wall = launch_local(rank_main, (tmp,), nprocs=2, timeout=300)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(2)]
    m = machine()
    n = ranks[0]["n"]
    lines = [
        f"Per-rank memory and all-reduce payload, 2 CPU ranks (DDP, gloo, 1 torch thread each), MLP of {n:,} "
        f"weights ({DEPTH} x {WIDTH}x{WIDTH} hidden), AdamW, batch {BATCH} per rank, biases kept out of the "
        f"embedding, M = {M}, warm-up {WARMUP} steps recorded every {EVERY}. Training state = the tensors each "
        "rank holds at the optimizer step, counted exactly; peak RSS over "
        f"{STEADY} steady-state steps of each phase (VmHWM reset at its start; freed memory is reused but not "
        f"always returned to the OS, so RSS understates the drop). Wall time {wall:.0f} s.",
        f"Machine: {machine_line(m)}.", "",
        "| rank | phase | trainable | all-reduce per step | weights | gradients | DDP buckets | optimizer state "
        "| warm-up recording | a + labels | training state | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
    for r in ranks:
        for phase, row in r["phases"].items():
            b = row["bytes"]
            lines.append(f"| {r['rank']} | {phase} | {row['trainable']:,} | {row['allreduce_bytes_per_step']:,} B | "
                         f"{mib(b['weights'])} | {mib(b['gradients'])} | {mib(b['ddp_buckets'])} | "
                         f"{mib(b['optimizer_state'])} | {mib(b['recording'])} | {mib(b['mode_space'])} | "
                         f"**{mib(row['training_state_bytes'])}** | {row['peak_rss_mib']:.0f} MiB |")
    lines += ["", f"Baseline RSS (torch, modeopt and the model, before DDP): {ranks[0]['baseline_rss_mib']:.0f} MiB. "
              f"One copy of the weights is {4 * n / 2**20:.1f} MiB. With `gradient_as_bucket_view=True` the "
              "gradients live in the DDP buckets (one copy instead of two)."]
    save("ddp_memory", {"machine": m, "wall_s": wall, "ranks": ranks}, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
