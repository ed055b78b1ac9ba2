"""Per-rank memory and communication of CMDOptimizer on an FSDP2 (``fully_shard``) model, next to
FSDP2 + AdamW on the same model.

2 and 4 CPU ranks (gloo, 127.0.0.1, ``modeopt.distributed.launch_local``, one torch thread each)
train an MLP of ~5.1 M weights, each Linear and the root ``fully_shard``-ed. Per rank and phase:
the training state counted exactly from the tensors the rank holds at the optimizer step (its
weight shards, gradient shards, optimizer state, warm-up recording, ``a`` + labels + ``r``), the
peak resident set over steady steps (Linux VmHWM, reset at the start of each phase) and the bytes
this rank hands to each ``torch.distributed`` collective per step
(:func:`modeopt.distributed.sharding.count_collectives`). The children run with glibc's mmap threshold fixed
(as in ``memory.py``), so freed blocks leave the RSS.

    python benchmarks/fsdp_memory.py        # ~2 min on 2 vCPUs

Results: benchmarks/results/fsdp.{json,md}
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, machine_line, peak_rss_mib, reset_peak_rss, rss_mib, save  # noqa: E402

import modeopt  # noqa: E402
from modeopt.distributed.ddp import launch_local  # noqa: E402
from modeopt.distributed.sharding import count_collectives  # noqa: E402

IN, WIDTH, DEPTH, OUT, BATCH, M = 256, 1536, 2, 10, 32, 10
WARMUP, EVERY, STEADY = 16, 4, 4
WORLDS = (2, 4)


def build(world: int) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    layers = [nn.Linear(IN, WIDTH), nn.ReLU()]
    for _ in range(DEPTH):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(WIDTH, OUT))
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def nbytes(tensors) -> int:
    return sum(local(t).numel() * local(t).element_size() for t in tensors if t is not None)


def rank_main(rank: int, world: int, out_dir: str, kind: str) -> None:
    base_rss = rss_mib()
    model = build(world)
    n = sum(p.numel() for p in model.parameters())
    base = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt = base if kind == "adamw" else modeopt.CMDOptimizer(
        model, base, n_modes=M, warmup_steps=WARMUP, snapshot_every=EVERY, n_samples=30 * M, seed=0, progress=False)
    if kind == "cmd-keep-grads":  # the same, keeping each gradient shard until the step
        opt.drop_weight_grads = False
    g = torch.Generator().manual_seed(rank)
    rows = {}

    def phase() -> str:
        return "adamw" if kind == "adamw" else opt.phase

    def step(account: dict | None = None) -> dict:
        x = torch.randn(BATCH, IN, generator=g)
        y = torch.randint(0, OUT, (BATCH,), generator=g)
        with count_collectives() as c:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            if account is not None:  # gradients as they stand when the optimizer steps
                account["gradients"] = nbytes(p.grad for p in model.parameters())
            opt.step()
        if account is not None:
            s = getattr(opt, "space", None)
            account.update(
                weights=nbytes(model.parameters()),
                optimizer_state=nbytes(v for st in base.state.values() for v in st.values() if torch.is_tensor(v)),
                recording=getattr(opt, "recording_bytes", 0),
                a_labels_r=0 if s is None else nbytes([*s["a"], *s["labels"], s["applied"], s["partial"]]))
        return dict(c.bytes)

    def measure(name: str) -> None:
        reset_peak_rss()
        sent, account = [], {}
        for _ in range(STEADY):
            sent.append(step(account))
        rows[name] = {"peak_rss_mib": peak_rss_mib(), "bytes": account, "training_state_bytes": sum(account.values()),
                      "sent_per_step": sent[-1], "sent_total_per_step": sum(sent[-1].values())}

    for _ in range(WARMUP - STEADY - 1):
        step()
    measure(phase())  # the warm-up's last steady steps (recording nearly full), or AdamW
    with count_collectives() as c:
        step()  # the switch (a plain step for AdamW)
    switch = dict(c.bytes)
    for _ in range(2):
        step()
    measure(phase())
    result = {"rank": rank, "world": world, "kind": kind, "n": n, "baseline_rss_mib": base_rss, "phases": rows,
              "switch_step_sent": switch}
    Path(out_dir, f"{kind}-w{world}-rank{rank}.json").write_text(json.dumps(result))


def main() -> None:
    results, walls = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in WORLDS:
            for kind in ("adamw", "cmd") + (("cmd-keep-grads",) if world == WORLDS[0] else ()):
                walls[f"{kind}-w{world}"] = launch_local(rank_main, (tmp, kind), nprocs=world, timeout=600)
                results += [json.loads(Path(tmp, f"{kind}-w{world}-rank{r}.json").read_text()) for r in range(world)]
    m = machine()
    n = results[0]["n"]
    mib = lambda b: f"{b / 2**20:.2f} MiB"  # noqa: E731
    lines = [
        f"Per-rank training state, peak RSS and bytes sent per step: FSDP2 (`fully_shard` per Linear + root) "
        f"+ AdamW vs FSDP2 + CMDOptimizer(AdamW), MLP of {n:,} weights ({DEPTH} x {WIDTH}x{WIDTH} hidden), "
        f"batch {BATCH} per rank, M = {M}, every weight embedded, warm-up {WARMUP} steps recorded every {EVERY} "
        f"(T = {WARMUP // EVERY}). Training state = the tensors a rank holds at the optimizer step, counted "
        f"exactly; peak RSS (VmHWM) over {STEADY} steady steps of each phase; sent = the input bytes this rank "
        "handed to each collective in one step. gloo over 127.0.0.1, 1 torch thread per rank.",
        f"Machine: {machine_line(m)}.", "",
        "| world | rank | run | phase | weights | gradients | optimizer state | recording | a + labels + r "
        "| training state | peak RSS | sent per step (all-gather + reduce-scatter + all-reduce) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for ph, row in r["phases"].items():
            b, s = row["bytes"], row["sent_per_step"]
            parts = " + ".join(f"{s.get(k, 0):,}" for k in ("all_gather_single", "reduce_scatter_single", "all_reduce"))
            lines.append(f"| {r['world']} | {r['rank']} | {r['kind']} | {ph} | {mib(b['weights'])} | "
                         f"{mib(b['gradients'])} | {mib(b['optimizer_state'])} | {mib(b['recording'])} | "
                         f"{mib(b['a_labels_r'])} | **{mib(row['training_state_bytes'])}** | "
                         f"{row['peak_rss_mib']:.0f} MiB | {parts} B |")
    lines += ["", "Ratios (rank 0, CMD / FSDP2+AdamW):", "",
              "| world | phase | training state | peak RSS | bytes sent per step |", "|---|---|---|---|---|"]
    summary = {}
    for world in WORLDS:
        ad = next(r for r in results if r["world"] == world and r["kind"] == "adamw" and r["rank"] == 0)
        cmd = next(r for r in results if r["world"] == world and r["kind"] == "cmd" and r["rank"] == 0)
        a_row = ad["phases"]["adamw"]
        keep = [r for r in results if r["world"] == world and r["kind"] == "cmd-keep-grads" and r["rank"] == 0]
        if keep:
            row = keep[0]["phases"]["embedded"]
            summary[f"w{world}-embedded-keep-grads"] = (row["training_state_bytes"] / a_row["training_state_bytes"],
                                                       row["peak_rss_mib"] / a_row["peak_rss_mib"])
        for ph, row in cmd["phases"].items():
            ratio = (row["training_state_bytes"] / a_row["training_state_bytes"],
                     row["peak_rss_mib"] / a_row["peak_rss_mib"],
                     row["sent_total_per_step"] / a_row["sent_total_per_step"])
            summary[f"w{world}-{ph}"] = ratio
            lines.append(f"| {world} | {ph} | {ratio[0]:.2f} | {ratio[1]:.2f} | {ratio[2]:.4f} |")
        if keep:
            k = summary[f"w{world}-embedded-keep-grads"]
            lines.append(f"| {world} | embedded, gradient shards kept until the step | {k[0]:.2f} | {k[1]:.2f} | |")
        sw = cmd["switch_step_sent"]
        lines.append(f"| {world} | the switch step (once) | | | sent {sum(sw.values()):,} B: "
                     + ", ".join(f"{k} {v:,}" for k, v in sorted(sw.items())) + " |")
    lines += ["", f"Baseline RSS (torch and modeopt imported, before the model): {results[0]['baseline_rss_mib']:.0f} "
              f"MiB. One full copy of the weights is {mib(4 * n)}; (weights + a + labels) / world = "
              + ", ".join(f"{mib(9 * n / w)} on {w} ranks" for w in WORLDS) + ". Wall: "
              + ", ".join(f"{k} {v:.0f} s" for k, v in walls.items()) + "."]
    save("fsdp", {"machine": m, "walls_s": walls, "ranks": results, "ratios_rank0": summary}, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
