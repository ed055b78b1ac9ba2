"""The mode-space reduction of bf16 gradients on CPU: the C kernels against the torch reference (issue 25).

Before, ``cpu.reduce`` sent any gradient that was not float32 to the torch reference
(``segment_sum(g.float() * a.float(), unpacked labels)``), so every backward of a bf16/fp16 model
reduced through it. Now the C kernels read bf16/fp16 gradients directly.

1. One reduce over ``--n`` bf16 gradients (one tensor) with M = 10 modes: int8 codes + packed 4-bit
   labels (the 8-bit encoding) and float32 ``a`` + uint8 labels; C against the reference
   (``kernels.use_fused(False)``), float32 gradients through C for scale, in interleaved rounds.
2. ``--model``: full steps (zero_grad, forward, backward, step) of a bf16 model embedded by
   ``CMDOptimizer`` (AdamW), with the C reduce of half gradients ("after") against the same
   optimizer whose half gradients take the reference ("before": ``cpu._G`` narrowed to float32,
   the dispatch as it was), side by side in one process, the order alternating every round.

    python benchmarks/half_grad_reduce.py --n 20000000 --rounds 7 --model minilm --steps 10

Results: benchmarks/results/half_grad_reduce.{json,md}
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, machine_line, save, summary, timed  # noqa: E402

from modeopt.modespace import kernels  # noqa: E402
from modeopt.modespace.kernels import cpu, encoding  # noqa: E402

CPU = torch.device("cpu")


def reduce_cases(n: int, m: int = 10) -> dict:
    """name -> (grads, a, labels, scales) of one tensor of ``n`` weights."""
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, m, (n,), generator=g)
    grad = torch.randn(n, generator=g).to(torch.bfloat16)
    q, s = encoding.quantize(torch.randn(n, generator=g), idx, m)
    a32 = torch.randn(n, generator=g)
    return {"int8 a + packed labels": ([grad], [q], [encoding.pack_labels(idx)], [s]),
            "float32 a + uint8 labels": ([grad], [a32], [idx.to(torch.uint8)], [])}


def time_reduce(n: int, rounds: int, m: int = 10) -> dict:
    out = {}
    for name, (grads, a, labels, scales) in reduce_cases(n, m).items():
        g32 = [grads[0].float()]
        runs = {"C (bf16 grads)": lambda: kernels.reduce(grads, a, labels, m, scales),
                "C (float32 grads)": lambda: kernels.reduce(g32, a, labels, m, scales)}

        def ref():
            with kernels.use_fused(False):
                kernels.reduce(grads, a, labels, m, scales)
        runs["reference (bf16 grads)"] = ref
        times = {k: [] for k in runs}
        for fn in runs.values():
            fn()
        for rnd in range(rounds):
            keys = list(runs)[rnd % len(runs):] + list(runs)[:rnd % len(runs)]
            for k in keys:
                times[k].append(timed(runs[k], CPU))
        row = {k: summary(t) for k, t in times.items()}
        row["speedup"] = statistics.median(times["reference (bf16 grads)"]) / statistics.median(times["C (bf16 grads)"])
        out[name] = row
        print(name, {k: round(v["median"] * 1e3, 1) for k, v in row.items() if k != "speedup"}, "ms",
              f"speedup {row['speedup']:.1f}x", flush=True)
    return out


def time_model(name: str, steps: int, batch: int, snapshots: int = 4) -> dict:
    from half_precision_step_time import build, make, step_fn

    runs = {}
    for variant in ("before", "after"):
        model, inputs, y, loss_fn = build(name, CPU, batch)
        opt = make("formed", model, snapshots, 10)
        run = step_fn(model, opt, inputs, y, loss_fn)
        narrowed = variant == "before"

        def step(run=run, narrowed=narrowed):
            saved = cpu._G
            cpu._G = (torch.float32,) if narrowed else saved  # before: half grads took the reference
            try:
                run()
            finally:
                cpu._G = saved
        for _ in range(snapshots + 2):
            step()
        assert opt.phase == "embedded"
        runs[variant] = step
    times = {k: [] for k in runs}
    for rnd in range(steps):
        for k in (("before", "after") if rnd % 2 == 0 else ("after", "before")):
            times[k].append(timed(runs[k], CPU))
    row = {k: summary(t) for k, t in times.items()}
    row["after_over_before"] = statistics.median([a / b for a, b in zip(times["after"], times["before"])])
    print(name, {k: round(v["median"], 3) for k, v in row.items() if k != "after_over_before"}, "s",
          f"after/before {row['after_over_before']:.3f}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000_000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--model", default=None, help="minilm, resnet18 or mlp (benchmarks/half_precision_step_time.py)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    assert kernels.fused_available(), "the C kernels are not available"
    load = os.getloadavg()
    res = {"args": vars(args), "machine": machine(), "loadavg_before": load, "reduce": time_reduce(args.n, args.rounds)}
    if args.model:
        res["model"] = {args.model: time_model(args.model, args.steps, args.batch)}
    res["loadavg_after"] = os.getloadavg()
    lines = ["# Reduce of bf16 gradients on CPU: C kernels vs torch reference", "",
             f"{machine_line(res['machine'])}; load average {load[0]:.1f} before, {res['loadavg_after'][0]:.1f} "
             f"after; {args.threads} torch thread(s), MODEOPT_KERNEL_THREADS={cpu.THREADS}.", "",
             f"One reduce of {args.n:,} bf16 grads, M = 10, median of {args.rounds} interleaved rounds:", "",
             "| case | C, bf16 grads | C, float32 grads | reference, bf16 grads | speed-up |", "|---|---|---|---|---|"]
    for case, row in res["reduce"].items():
        ms = [row[k]["median"] * 1e3 for k in ("C (bf16 grads)", "C (float32 grads)", "reference (bf16 grads)")]
        lines.append(f"| {case} | {ms[0]:.1f} ms | {ms[1]:.1f} ms | {ms[2]:.1f} ms | {row['speedup']:.1f}x |")
    if args.model:
        row = res["model"][args.model]
        lines += ["", f"Embedded bf16 {args.model} step (AdamW, batch {args.batch}, M = 10), median of {args.steps} "
                  "alternating steps:", "",
                  f"before (half grads -> reference) {row['before']['median']:.3f} s, after (C) "
                  f"{row['after']['median']:.3f} s, median ratio after/before {row['after_over_before']:.3f}"]
    save("half_grad_reduce", res, "\n".join(lines))


if __name__ == "__main__":
    main()
