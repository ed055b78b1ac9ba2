"""How the costs of mode-space training grow with the number of weights N (1 M -> 100 M).

Synthetic, so that N can grow freely: weights in tensors of at most 4 M elements (like the layers
of a real network), planted-mode trajectories of T = 20 snapshots for the switch.

* switch: ``decompose`` of an (N, 20) trajectory, in a fresh process per N (time, extra peak RSS);
* step: the two mode-space passes (reduction of the weight gradients onto the modes, in-place
  weight update) vs. the update of the plain SGD+momentum and AdamW optimizers on the same tensors;
* memory per weight, from the data structures (bytes per weight, independent of N).

    python benchmarks/scaling.py [--n 1e6 4e6 16e6 64e6 100e6]

Results: benchmarks/results/scaling.{json,md}
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from _common import machine, machine_line, save

HERE = Path(__file__).resolve().parent


def tensors(n: int, biggest: int = 1 << 22) -> list[torch.Tensor]:
    sizes = [biggest] * (n // biggest) + ([n % biggest] if n % biggest else [])
    return [torch.randn(s) for s in sizes]


def med(fn, k: int = 7) -> float:
    fn()
    ts = []
    for _ in range(k):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def step_costs(n: int, m: int) -> dict:
    from modeopt.modespace.space import kernels

    ws = tensors(n)
    gs = [torch.randn_like(w) for w in ws]
    a = [torch.randn_like(w) for w in ws]
    labels = [torch.randint(0, m, (w.numel(),)).to(kernels.label_dtype(m)) for w in ws]
    delta = torch.randn(m)
    out = {
        "reduce_ms": med(lambda: kernels.reduce(gs, a, labels, m)) * 1e3,
        "update_ms": med(lambda: kernels.update(ws, a, labels, delta)) * 1e3,
    }
    params = [torch.nn.Parameter(w) for w in ws]
    for p, g in zip(params, gs):
        p.grad = g
    for name, opt in (("sgd_momentum_ms", torch.optim.SGD(params, lr=1e-6, momentum=0.9)),
                      ("adamw_ms", torch.optim.AdamW(params, lr=1e-6))):
        out[name] = med(opt.step) * 1e3
        opt.state.clear()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=float, nargs="+", default=[1e6, 4e6, 16e6, 64e6, 100e6])
    ap.add_argument("--modes", type=int, default=10)
    args = ap.parse_args()
    rows = []
    for n in (int(x) for x in args.n):
        out = subprocess.run([sys.executable, str(HERE / "decompose_scale.py"), "--child", "--n", str(n), "--t", "20",
                              "--modes", str(args.modes)], capture_output=True, text=True, check=True)
        sw = json.loads(out.stdout.strip().splitlines()[-1])
        st = step_costs(n, args.modes)
        row = {"N": n, "switch_s": sw["seconds"], "switch_extra_peak_over_input": sw["extra_over_input"], **st}
        rows.append(row)
        print(f"N={n:>12,}: switch {row['switch_s']:6.2f} s | reduce {st['reduce_ms']:7.1f} ms, update "
              f"{st['update_ms']:7.1f} ms | SGD+mom {st['sgd_momentum_ms']:7.1f} ms, AdamW {st['adamw_ms']:7.1f} ms")
    m = machine()
    lines = [
        f"Cost growth with N (synthetic: tensors of <= 4 M weights; switch on a T = 20 trajectory with "
        f"M = {args.modes}). Machine: {machine_line(m)}.",
        "",
        "| N | switch (s) | switch extra peak / input | reduce (ms) | update (ms) | mode-space passes (ms) "
        "| SGD+momentum update (ms) | AdamW update (ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['N']:,} | {r['switch_s']:.2f} | {r['switch_extra_peak_over_input']:.2f} | "
                     f"{r['reduce_ms']:.1f} | {r['update_ms']:.1f} | {r['reduce_ms'] + r['update_ms']:.1f} | "
                     f"{r['sgd_momentum_ms']:.1f} | {r['adamw_ms']:.1f} |")
    lines += [
        "",
        "Memory per embedded weight (bytes), from the data structures:",
        "",
        "| | weight | gradient | optimizer state | mode index | a | total |",
        "|---|---|---|---|---|---|---|",
        "| plain SGD + momentum | 4 | 4 | 4 | - | - | 12 |",
        "| plain AdamW | 4 | 4 | 8 | - | - | 16 |",
        "| CMD, embedded (a fp32) | 4 | transient, one group of <= 2^21 weights | - | 1 (M <= 256) | 4 | 9 |",
        "| CMD, embedded (a bf16) | 4 | transient | - | 1 | 2 | 7 |",
        "| CMD warm-up recording | | | | | | + 4 T (fp32) or 2 T + 4 (bf16) |",
    ]
    md = "\n".join(lines)
    print("\n" + md)
    save("scaling", {"machine": m, "args": vars(args), "rows": rows}, md)


if __name__ == "__main__":
    main()
