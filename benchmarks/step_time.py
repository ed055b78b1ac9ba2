"""Step time of mode-space training vs. plain training, side by side in one process.

For each base optimizer (SGD + momentum, AdamW) it builds the same model three times - plain,
CMDOptimizer with the fused kernels, CMDOptimizer on the torch fallback - takes them past the switch,
then times full training steps (zero_grad, forward, backward, step) in interleaved rounds (the order
rotates every round), and reports medians, spread and per-round ratios to the plain step. It also
times the switch itself (decomposition + embedding) after a warm-up of ``--snapshots`` snapshots.

    python benchmarks/step_time.py                      # resnet18, batch 64, 32x32, CPU
    python benchmarks/step_time.py --device cuda --batch 256

Results: benchmarks/results/step_time[_<device>].{json,md}
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
import torch.nn.functional as F
from torchvision.models import resnet18

import modeopt
from modeopt.modespace.space import kernels

from _common import machine, machine_line, save, summary, timed

BASES = {
    "sgd": ("SGD + momentum", lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9)),
    "adamw": ("AdamW", lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01)),
}


def step_fn(model, opt, x, y):
    def run():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--image", type=int, default=32)
    ap.add_argument("--n-modes", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--steps", type=int, default=1, help="timed steps per variant per round")
    ap.add_argument("--snapshots", type=int, default=20, help="warm-up snapshots before the timed switch")
    ap.add_argument("--bases", nargs="+", default=list(BASES))
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.image, args.image, device=dev)
    y = torch.randint(0, 10, (args.batch,), device=dev)
    proto = resnet18(num_classes=10).to(dev)
    n_weights = sum(p.numel() for p in proto.parameters())
    variants = ["plain", "cmd", "cmd_bf16"] + (["cmd_torch"] if dev.type == "cpu" else [])
    print(f"resnet18(num_classes=10), {n_weights:,} weights, batch {args.batch}, {args.image}x{args.image}, "
          f"{dev}; fused kernels: {kernels.fused_available()}")
    rows = {}
    switch = {}
    for key in args.bases:
        label, make = BASES[key]
        runs = {}
        for v in variants:
            model = copy.deepcopy(proto)
            base = make(model.parameters())
            if v == "plain":
                opt = base
            else:
                opt = modeopt.CMDOptimizer(model, base, n_modes=args.n_modes, warmup_steps=args.snapshots,
                                           snapshot_every=1, seed=0, progress=False,
                                           coef_dtype=torch.bfloat16 if v == "cmd_bf16" else torch.float32)
            runs[v] = (model, opt)
        # warm-up (and, for the CMD variants, the switch: timed once per base for the fused variant)
        for v, (model, opt) in runs.items():
            ctx = kernels.use_fused(v != "cmd_torch")
            with ctx:
                run = step_fn(model, opt, x, y)
                warm = [timed(run, dev) for _ in range(args.snapshots - 1)]
                last = timed(run, dev)
                if v == "cmd":
                    switch[key] = {"switch_step_s": last, "warmup_step_median_s": statistics.median(warm[2:]),
                                   "switch_extra_s": last - statistics.median(warm[2:]),
                                   "snapshots": args.snapshots, "N": n_weights}
                assert v == "plain" or opt.phase == "embedded"
                run()  # first embedded step (allocations)
        times = {v: [] for v in variants}
        ratios = {v: [] for v in variants if v != "plain"}
        for rnd in range(args.rounds):
            order = variants[rnd % len(variants):] + variants[: rnd % len(variants)]
            this = {}
            for v in order:
                model, opt = runs[v]
                with kernels.use_fused(v != "cmd_torch"):
                    run = step_fn(model, opt, x, y)
                    ts = [timed(run, dev) for _ in range(args.steps)]
                this[v] = statistics.median(ts)
                times[v] += ts
            for v in ratios:
                ratios[v].append(this[v] / this["plain"])
        rows[key] = {"label": label, "times_s": {v: summary(t) for v, t in times.items()},
                     "ratio_to_plain": {v: summary(r) for v, r in ratios.items()}}
        for v, r in ratios.items():
            q = statistics.quantiles(r, n=4)
            rows[key]["ratio_to_plain"][v].update({"q1": q[0], "q3": q[2]})
        r = rows[key]
        print(f"{label:16s} plain {r['times_s']['plain']['median'] * 1e3:7.1f} ms | " + " | ".join(
            f"{v} {r['times_s'][v]['median'] * 1e3:7.1f} ms ({r['ratio_to_plain'][v]['median']:.3f}x)" for v in ratios))

    m = machine()
    names = {"cmd": "CMD (fused, a fp32)", "cmd_bf16": "CMD (fused, a bf16)", "cmd_torch": "CMD (torch fallback)"}
    lines = [
        f"Step time, resnet18(num_classes=10) ({n_weights:,} weights), batch {args.batch}, "
        f"{args.image}x{args.image}, M = {args.n_modes}, device {dev}.",
        f"Machine: {machine_line(m)}.",
        f"{args.rounds} interleaved rounds (the order rotates) x {args.steps} step(s) per variant; ratio = the "
        "round's step time / the plain step of the same round: median [interquartile range] over rounds.",
        "",
        "| base optimizer | plain step (ms) | " + " | ".join(names[v] for v in variants if v != "plain") + " |",
        "|---|---|" + "---|" * (len(variants) - 1),
    ]
    for key, r in rows.items():
        cells = []
        for v in variants:
            if v == "plain":
                continue
            q = r["ratio_to_plain"][v]
            cells.append(f"{r['times_s'][v]['median'] * 1e3:.1f} ms, **{q['median']:.3f}x** [{q['q1']:.2f}-{q['q3']:.2f}]")
        lines.append(f"| {r['label']} | {r['times_s']['plain']['median'] * 1e3:.1f} | " + " | ".join(cells) + " |")
    lines += ["", "Switch (decomposition of the warm-up + entering mode space), measured as the switching step "
              "minus a median warm-up step:", ""]
    for key, s in switch.items():
        lines.append(f"- {BASES[key][0]}: {s['switch_extra_s']:.2f} s for N = {s['N']:,} x T = {s['snapshots']}")
    md = "\n".join(lines)
    print("\n" + md)
    suffix = "" if dev.type == "cpu" else f"_{dev.type}"
    save(f"step_time{suffix}", {"machine": m, "args": vars(args), "rows": rows, "switch": switch}, md)


if __name__ == "__main__":
    main()
