"""How much memory an embedded step's backward adds, with mode space's reduction nodes made when the
forward starts (before 2026-12: ``ModeSpace.FORM_ON_USE = False``) or when each weight is first read.

    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/backward_grad_memory.py

An MLP of 8 x Linear(2048, 2048) (33.6 M weights) in float32 and bf16, ``CMDOptimizer`` with SGD, M = 10,
batch 16. Per variant: the largest RSS above the steady state during one embedded step (forward,
backward, step), sampled every 2 ms, the smaller of two interleaved repeats. With the nodes made at the
start, autograd ran every reduction after the whole backward and each embedded weight's gradient was
alive until then: a gradient-sized copy of the model. Results: ``benchmarks/results/backward_grad_memory.{json,md}``.
"""

from __future__ import annotations

import json
import os
import platform
import re
import threading
import time
from pathlib import Path

import torch
from torch import nn

import modeopt
from modeopt.modespace.space import ModeSpace

OUT = Path(__file__).resolve().parent / "results"


def _rss_mib() -> float:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def main() -> None:
    torch.set_num_threads(2)
    peak = [0.0]

    def sample() -> None:
        while True:
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(0.002)

    threading.Thread(target=sample, daemon=True).start()
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(2048, 2048) for _ in range(8)]).to(dtype)
        opt = modeopt.CMDOptimizer(model, torch.optim.SGD(model.parameters(), lr=1e-3), n_modes=10, warmup_steps=3,
                                   snapshot_every=1, n_samples=500, seed=0, progress=False)
        x = torch.randn(16, 2048).to(dtype)
        for _ in range(4):
            opt.zero_grad()
            model(x).float().pow(2).mean().backward()
            opt.step()
        out: dict[bool, list[float]] = {}
        for first_use in (False, True, False, True):
            ModeSpace.FORM_ON_USE = first_use
            opt.zero_grad(set_to_none=True)
            time.sleep(0.05)
            base = peak[0] = _rss_mib()
            model(x).float().pow(2).mean().backward()
            opt.step()
            time.sleep(0.05)
            out.setdefault(first_use, []).append(peak[0] - base)
        ModeSpace.FORM_ON_USE = True
        n = sum(p.numel() for p in model.parameters())
        rows.append({"dtype": str(dtype).replace("torch.", ""), "weights": n,
                     "weights_mib": n * model[0].weight.element_size() / 2**20,
                     "at_start_mib": min(out[False]), "at_first_use_mib": min(out[True])})
        del model, opt
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "torch": torch.__version__, "load": os.getloadavg()[0]}
    lines = ["# Memory an embedded step adds: reduction nodes made at the forward's start vs at first use", "",
             f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, load {machine['load']:.1f}. "
             "Produced by `benchmarks/backward_grad_memory.py`.", "",
             "| weights | dtype | weights MiB | step peak above steady state, nodes at start MiB | at first use MiB | ratio |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['weights'] / 1e6:.1f} M | {r['dtype']} | {r['weights_mib']:.0f} | {r['at_start_mib']:.0f} | "
                     f"{r['at_first_use_mib']:.0f} | {r['at_first_use_mib'] / r['at_start_mib']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    OUT.mkdir(exist_ok=True)
    (OUT / "backward_grad_memory.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    (OUT / "backward_grad_memory.md").write_text(text)


if __name__ == "__main__":
    main()
