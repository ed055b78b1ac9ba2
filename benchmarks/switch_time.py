"""Time of the switch's decomposition of N weights x T samples on a device (issue #16).

Usage: python benchmarks/switch_time.py [--n 2000000] [--t 20] [--modes 10] [--device cpu|cuda]
       [--repeat 3] [--record-dtype float32|bfloat16] [--json OUT]

Importable: ``measure_switch(n_weights, t, n_modes, device) -> dict``. The trajectory is synthetic
(planted modes, as in ``decompose_scale.py``) and lives on the host, time-major, the way a
``SnapshotBuffer`` holds a recording: pinned when the device is CUDA (a recording of CUDA tensors
is pinned), so the timed call streams it up exactly as ``CMDOptimizer``'s switch does. The result
says seconds per call and per 100 M weights (linear scaling assumed: it is measured linear on
the CPU, see docs/performance.md), and on CUDA the peak device memory of the call.

The seconds include the fixed cost of sampling and clustering K = 1000 weights on the CPU
(scipy, O(K^2 T), about a second on this 2-core machine). At small N that cost dominates and
``seconds_per_100M`` overstates the linear part: use N >= 10 M for a per-100 M figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import modeopt  # noqa: E402
from modeopt.trajectories.trajectory import Trajectory  # noqa: E402


def planted_recording(n: int, t: int, m: int, *, seed: int = 0, pin: bool = False,
                      dtype: torch.dtype = torch.float32) -> Trajectory:
    """A (T, N) host recording of planted modes; bf16/fp16 stores movements from an anchor."""
    g = torch.Generator().manual_seed(seed)
    prof = torch.randn(m, t, generator=g)
    lab = torch.randint(0, m, (n,), generator=g)
    a = torch.randn(n, generator=g)
    b = torch.randn(n, generator=g)
    data = torch.empty(t, n, dtype=dtype, pin_memory=pin)
    anchor = None
    if dtype not in (torch.float32, torch.float64):
        anchor = torch.empty(n, dtype=torch.float32, pin_memory=pin)
        anchor.copy_(a * prof[lab, 0] + b)
    step = 1 << 20
    for s in range(t):
        for i in range(0, n, step):
            j = min(i + step, n)
            row = a[i:j] * prof[lab[i:j], s] + b[i:j] + 1e-3 * torch.randn(j - i, generator=g)
            if anchor is not None:
                row -= anchor[i:j]
            data[s, i:j] = row
    return Trajectory(data, None, None, anchor)


def measure_switch(n_weights: int, t: int, n_modes: int, device, *, repeat: int = 3,
                   record_dtype: torch.dtype = torch.float32, n_samples: int = 1000,
                   chunk_rows: int | None = None) -> dict:
    """Decompose a planted ``n_weights x t`` host recording on ``device``; time it.

    Returns a dict: device, N, T, M, seconds (median of ``repeat`` calls after one warm-up call),
    all timings, seconds_per_100M, n_modes_found, peak_device_bytes (CUDA only; the increase of
    ``max_memory_allocated`` over the call) and the recording's host bytes.
    """
    dev = torch.device(device)
    is_cuda = dev.type == "cuda"
    traj = planted_recording(n_weights, t, n_modes, pin=is_cuda, dtype=record_dtype)

    def call():
        return modeopt.decompose(traj, n_modes=n_modes, n_samples=n_samples, seed=0, progress=False,
                                 device=dev, chunk_rows=chunk_rows)

    def sync():
        if is_cuda:
            torch.cuda.synchronize(dev)

    d = call()  # warm-up: CUDA context, cuBLAS handles, allocator pools, page faults
    times, peak = [], None
    for _ in range(max(1, repeat)):
        sync()
        if is_cuda:
            base = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        d = call()
        sync()
        times.append(time.perf_counter() - t0)
        if is_cuda:
            peak = max(peak or 0, torch.cuda.max_memory_allocated(dev) - base)
        del d
        d = None
    times.sort()
    med = times[len(times) // 2]
    found = call().n_modes
    return {
        "device": str(dev), "device_name": torch.cuda.get_device_name(dev) if is_cuda else None,
        "N": n_weights, "T": t, "M": n_modes, "record_dtype": str(record_dtype).replace("torch.", ""),
        "seconds": med, "all_seconds": times, "seconds_per_100M": med * 1e8 / n_weights,
        "n_modes_found": found, "peak_device_bytes": peak,
        "recording_host_bytes": traj.data.numel() * traj.data.element_size()
        + (0 if traj.offset is None else traj.offset.numel() * 4),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[2_000_000])
    ap.add_argument("--t", type=int, default=20)
    ap.add_argument("--modes", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--record-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    for n in args.n:
        r = measure_switch(n, args.t, args.modes, args.device, repeat=args.repeat,
                           record_dtype=getattr(torch, args.record_dtype))
        rows.append(r)
        peak = "" if r["peak_device_bytes"] is None else f", peak device {r['peak_device_bytes'] / 2**20:.0f} MiB"
        print(f"{r['device']}: N={n:,} T={r['T']} M={r['M']} ({r['record_dtype']}): {r['seconds']:.3f} s "
              f"= {r['seconds_per_100M']:.2f} s per 100 M weights{peak}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
