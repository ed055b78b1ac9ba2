"""Step time and memory of exact half-precision mode space (issue 25) against the in-place update it replaced.

bf16 weights in mode space are kept as their frozen switch-time value and formed in every forward
(``w = round(w_switch + a * dr)``, one out-of-place pass per forward, another per weight that the
backward needs again), where before each step added ``a * dr`` in place (one pass per step, but
the rounding accumulated: ``half_precision_drift.py``). For each model this builds the same bf16
model four times - plain AdamW on the bf16 weights (what the HF ``Trainer`` does with a bf16 model),
``CMDOptimizer`` with the in-place update (``ModeSpace.HALF_FORMED = False``), ``CMDOptimizer`` with
every half weight formed when the forward starts and kept until it ends (``ModeSpace.FORM_ON_USE =
False``, before), ``CMDOptimizer`` forming each weight in the operation that reads it (the default) -
takes the CMD ones past the switch, and times full steps
(zero_grad, forward, backward, step) in interleaved rounds (the order rotates every round). Ratio =
the round's step time / the in-place step of the same round; medians and interquartile ranges.

Memory (``--memory``): each variant in a fresh process (CPU: glibc told to map every allocation of
64 KiB or more on its own and return it when freed, so the RSS follows the live tensors); after the
switch and two steps the peak RSS is reset (``/proc/self/clear_refs``), three more steps run, and
the peak above the RSS before them is the step's working memory (activations, gradients, formed
weights). On CUDA: ``max_memory_allocated`` above the allocation before the three steps.

    python benchmarks/half_precision_step_time.py                  # resnet18 and a MiniLM-shaped BERT, CPU
    python benchmarks/half_precision_step_time.py --models mlp minilm --memory
    python benchmarks/half_precision_step_time.py --device cuda    # (benchmarks/gpu_check.py runs this)

Results: benchmarks/results/half_precision_step_time[_<device>].{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, machine_line, save, summary, timed  # noqa: E402

import modeopt  # noqa: E402
from modeopt.modespace.space import ModeSpace  # noqa: E402

VARIANTS = ("plain", "in_place", "formed_start", "formed")
NAMES = {"plain": "plain AdamW (bf16 weights)", "in_place": "CMD, in-place update (before)",
         "formed_start": "CMD, formed at the forward's start (before)",
         "formed": "CMD, formed on use (now)",
         "formed_kept": "CMD, formed, kept for backward (no re-forming)"}
#: memory only: the formed weights without the saved-tensor hooks (what they save)
MEMORY_VARIANTS = VARIANTS + ("formed_kept",)


def build(name: str, device: torch.device, batch: int):
    """(model in bf16, inputs, targets, loss function) of ``name``: resnet18 on 32x32 images, a
    MiniLM-L12-H384-shaped BERT classifier (random weights) on random tokens, sequence 64, or an MLP
    of six 512-wide Linear layers (where the per-operation cost of forming on use shows most)."""
    torch.manual_seed(0)
    if name == "mlp":
        layers = [m for _ in range(6) for m in (torch.nn.Linear(512, 512), torch.nn.GELU())]
        model = torch.nn.Sequential(*layers, torch.nn.Linear(512, 10))
        x = torch.randn(batch, 512, device=device, dtype=torch.bfloat16)
        y = torch.randint(0, 10, (batch,), device=device)
        return model.to(device, torch.bfloat16), (x,), y, lambda out, y: F.cross_entropy(out.float(), y)
    if name == "resnet18":
        from torchvision.models import resnet18

        model = resnet18(num_classes=10)
        x = torch.randn(batch, 3, 32, 32, device=device, dtype=torch.bfloat16)
        y = torch.randint(0, 10, (batch,), device=device)
        return model.to(device, torch.bfloat16), (x,), y, lambda out, y: F.cross_entropy(out.float(), y)
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=12, num_attention_heads=12,
                     intermediate_size=1536, max_position_embeddings=512, num_labels=2)
    model = BertForSequenceClassification(cfg)
    ids = torch.randint(0, cfg.vocab_size, (batch, 64), device=device)
    y = torch.randint(0, 2, (batch,), device=device)
    return model.to(device, torch.bfloat16), (ids,), y, lambda out, y: F.cross_entropy(out.logits.float(), y)


def make(variant: str, model, snapshots: int, n_modes: int):
    base = torch.optim.AdamW(model.parameters(), lr=1e-4, eps=1e-4)
    if variant == "plain":
        return base
    return modeopt.CMDOptimizer(model, base, n_modes=n_modes, warmup_steps=snapshots, snapshot_every=1, seed=0,
                                progress=False)


def step_fn(model, opt, inputs, y, loss_fn, on_use: bool = True):
    def run():
        ModeSpace.FORM_ON_USE = on_use  # read at every forward; the variants interleave in one process
        opt.zero_grad(set_to_none=True)
        loss_fn(model(*inputs), y).backward()
        opt.step()
    return run


def prepared(variant: str, name: str, device: torch.device, batch: int, snapshots: int, n_modes: int):
    """A variant's step function, past the switch (CMD variants)."""
    model, inputs, y, loss_fn = build(name, device, batch)
    ModeSpace.HALF_FORMED = variant != "in_place"
    ModeSpace.RECOMPUTE_FORMED = variant != "formed_kept"  # read at every forward: stays for this process
    try:
        opt = make(variant, model, snapshots, n_modes)
        run = step_fn(model, opt, inputs, y, loss_fn, on_use=variant != "formed_start")
        for _ in range(snapshots + 1):
            run()
    finally:
        ModeSpace.HALF_FORMED = True
    assert variant == "plain" or opt.phase == "embedded"
    return run


def _rss_mib() -> float:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def _hwm_mib() -> float:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def memory_child(variant: str, name: str, batch: int, snapshots: int, n_modes: int) -> dict:
    """In this (fresh) process: the peak RSS of three steps above the RSS before them (CPU)."""
    run = prepared(variant, name, torch.device("cpu"), batch, snapshots, n_modes)
    run()
    run()
    before = _rss_mib()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    for _ in range(3):
        run()
    return {"step_peak_above_mib": _hwm_mib() - before, "rss_before_mib": before}


def memory_cuda(variant: str, name: str, batch: int, snapshots: int, n_modes: int, device: torch.device) -> dict:
    run = prepared(variant, name, device, batch, snapshots, n_modes)
    run()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(3):
        run()
    torch.cuda.synchronize(device)
    ModeSpace.RECOMPUTE_FORMED = True  # prepared() set it for this variant
    return {"step_peak_above_mib": (torch.cuda.max_memory_allocated(device) - before) / 2**20,
            "allocated_before_mib": before / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet18", "minilm"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--snapshots", type=int, default=4, help="warm-up snapshots before the switch")
    ap.add_argument("--n-modes", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--memory", action="store_true", help="also measure each variant's step memory (fresh processes)")
    ap.add_argument("--child", nargs=2, metavar=("VARIANT", "MODEL"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(memory_child(*args.child, args.batch, args.snapshots, args.n_modes)))
        return
    dev = torch.device(args.device)
    results: dict = {"args": vars(args), "models": {}}
    for name in args.models:
        runs = {v: prepared(v, name, dev, args.batch, args.snapshots, args.n_modes) for v in VARIANTS}
        for run in runs.values():
            run()
        times = {v: [] for v in VARIANTS}
        ratios = {v: [] for v in VARIANTS if v != "in_place"}
        on_use_vs_start = []
        for rnd in range(args.rounds):
            order = VARIANTS[rnd % len(VARIANTS):] + VARIANTS[:rnd % len(VARIANTS)]
            this = {v: timed(runs[v], dev) for v in order}
            for v in VARIANTS:
                times[v].append(this[v])
            for v in ratios:
                ratios[v].append(this[v] / this["in_place"])
            on_use_vs_start.append(this["formed"] / this["formed_start"])
        del runs
        row = {"weights_mib": sum(p.numel() for p in build(name, torch.device("cpu"), 1)[0].parameters()) * 2 / 2**20,
               "times_s": {v: summary(t) for v, t in times.items()},
               "ratio_to_in_place": {v: summary(r) for v, r in ratios.items()},
               "on_use_to_start": summary(on_use_vs_start)}
        q = statistics.quantiles(on_use_vs_start, n=4)
        row["on_use_to_start"].update({"q1": q[0], "q3": q[2]})
        for v, r in ratios.items():
            q = statistics.quantiles(r, n=4)
            row["ratio_to_in_place"][v].update({"q1": q[0], "q3": q[2]})
        if args.memory:
            row["memory"] = {}
            for v in MEMORY_VARIANTS:
                if dev.type == "cuda":
                    row["memory"][v] = memory_cuda(v, name, args.batch, args.snapshots, args.n_modes, dev)
                else:
                    # glibc: every allocation of 64 KiB or more is its own mapping, returned when freed,
                    # so the RSS follows the live tensors and its peak is the step's peak
                    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MALLOC_MMAP_THRESHOLD_": "65536",
                           "MALLOC_TRIM_THRESHOLD_": "0"}
                    cmd = [sys.executable, __file__, "--child", v, name, "--batch", str(args.batch), "--snapshots",
                           str(args.snapshots), "--n-modes", str(args.n_modes), "--threads", str(args.threads)]
                    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
                    row["memory"][v] = json.loads(out.stdout.strip().splitlines()[-1])
        results["models"][name] = row
        print(name, {v: f"{row['times_s'][v]['median'] * 1e3:.1f} ms" for v in VARIANTS},
              {v: f"{row['ratio_to_in_place'][v]['median']:.3f}x" for v in ratios}, row.get("memory", ""))
    try:
        load = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        load = ["?"] * 3
    m = machine()
    results["machine"], results["loadavg"] = m, load
    lines = [f"# Exact half-precision mode space: step time against the in-place update ({dev})", "",
             f"Machine: {machine_line(m)}; load average {' '.join(load)} when it finished.",
             f"bf16 weights, AdamW, batch {args.batch}, M = {args.n_modes}; {args.rounds} interleaved rounds "
             "(the order rotates); ratio = step time / the in-place step of the same round: median "
             "[interquartile range].", "",
             "| model | " + " | ".join(NAMES[v] for v in VARIANTS)
             + " | on use / at start | formed / in-place | plain / in-place |",
             "|---" * (len(VARIANTS) + 4) + "|"]
    for name, row in results["models"].items():
        t = row["times_s"]
        r = row["ratio_to_in_place"]
        o = row["on_use_to_start"]
        lines.append(f"| {name} | " + " | ".join(f"{t[v]['median'] * 1e3:.1f} ms" for v in VARIANTS)
                     + f" | **{o['median']:.3f}x** [{o['q1']:.2f}-{o['q3']:.2f}]"
                     + f" | **{r['formed']['median']:.3f}x** [{r['formed']['q1']:.2f}-{r['formed']['q3']:.2f}]"
                     + f" | {r['plain']['median']:.3f}x |")
    if args.memory:
        lines += ["", "Step working memory (peak during three steps above the memory before them, MiB; the "
                  "bf16 weights themselves are listed for scale):", "",
                  "| model | bf16 weights | " + " | ".join(NAMES[v] for v in MEMORY_VARIANTS) + " |",
                  "|---" * (len(MEMORY_VARIANTS) + 2) + "|"]
        for name, row in results["models"].items():
            lines.append(f"| {name} | {row['weights_mib']:.0f} | " + " | ".join(
                f"{row['memory'][v]['step_peak_above_mib']:.0f}" for v in MEMORY_VARIANTS) + " |")
    suffix = "" if dev.type == "cpu" else f"_{dev.type}"
    save(f"half_precision_step_time{suffix}", results, "\n".join(lines),
         out_dir=Path(args.out) if args.out else None)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
