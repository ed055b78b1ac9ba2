"""Time and peak memory of `decompose` on synthetic (N, T) trajectories.

Usage: python benchmarks/decompose_scale.py [--n 2000000] [--t 20] [--modes 10] [--json OUT]
Each size runs in its own process so that the peak RSS belongs to that size alone.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time


def planted(n: int, t: int, m: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    prof = torch.randn(m, t, generator=g)
    lab = torch.randint(0, m, (n,), generator=g)
    a = torch.randn(n, generator=g)
    b = torch.randn(n, generator=g)
    w = prof[lab]  # (n, t), the only full-size allocation
    w.mul_(a[:, None]).add_(b[:, None])
    for i in range(0, n, 1 << 18):
        w[i : i + (1 << 18)].add_(torch.randn(min(1 << 18, n - i), t, generator=g), alpha=1e-3)
    return w


def one(n: int, t: int, m: int) -> dict:
    import torch

    import modeopt

    torch.set_num_threads(torch.get_num_threads())
    w = planted(n, t, m)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    d = modeopt.decompose(w, n_modes=m, seed=0, progress=False)
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "N": n, "T": t, "M": m, "seconds": round(dt, 3), "input_bytes": w.numel() * 4,
        "extra_peak_bytes": max(0, peak - base), "extra_over_input": round(max(0, peak - base) / (w.numel() * 4), 3),
        "modes_found": d.n_modes,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[2_000_000])
    ap.add_argument("--t", type=int, default=20)
    ap.add_argument("--modes", type=int, default=10)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", action="store_true")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one(args.n[0], args.t, args.modes)))
        return
    rows = []
    for n in args.n:
        out = subprocess.run([sys.executable, __file__, "--child", "--n", str(n), "--t", str(args.t),
                              "--modes", str(args.modes)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"N={r['N']:>11,}  T={r['T']}  M={r['M']}  {r['seconds']:7.2f} s  "
              f"extra peak {r['extra_peak_bytes'] / 2**20:8.1f} MiB = {r['extra_over_input']:.2f} x input")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": platform.processor() or platform.machine(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
