"""Memory of embedding one block, as BlockwiseCMD does (docs/finetuning.md, "What it holds").

A synthetic layer shaped like one MiniLM-L6 encoder layer (q, k, v, o 384x384, FFN 1536x384 and
384x1536: 1,769,472 weights), 9 bf16 snapshots of correlated movement. Two ways to go from the
recording to a mode space, each in a fresh process (glibc returns freed blocks:
MALLOC_MMAP_THRESHOLD_=65536), peak resident memory above the memory once the recording exists:

* ``decompose``: one (T, N) recording of the block, :func:`modeopt.decompose` and the switch's
  :func:`modeopt.modespace.switch.initial_mode_space` (what CMDOptimizer does), then compact labels and bf16 ``a``;
* ``embed_block``: one recording per tensor, :func:`modeopt.blockwise.embed_block`, which frees
  each tensor's recording once it is assigned (what BlockwiseCMD does).

    cd benchmarks && python block_embedding_memory.py        # writes results/block_embedding_memory.{json,md}
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

SHAPES = [(384, 384)] * 4 + [(1536, 384), (384, 1536)]
T, M = 9, 10


def _recordings(per_tensor: bool):
    import torch

    from modeopt.trajectories.layout import ParamLayout
    from modeopt.trajectories.snapshots import SnapshotBuffer

    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(s, generator=g) for s in SHAPES]
    drift = [torch.randn(s, generator=g) for s in SHAPES]
    names = [f"w{i}" for i in range(len(SHAPES))]
    if per_tensor:
        recs = [SnapshotBuffer(w.numel(), dtype=torch.bfloat16, capacity=T) for w in ws]
    else:
        layout = ParamLayout(names, SHAPES)
        recs = [SnapshotBuffer(layout.n, dtype=torch.bfloat16, capacity=T)]
    for t in range(T):
        for w, d in zip(ws, drift):
            w += 0.01 * d * (1 + t) + 0.001 * torch.randn(w.shape, generator=g)
        if per_tensor:
            for rec, name, w in zip(recs, names, ws):
                rec.append(ParamLayout([name], [tuple(w.shape)]), [w], t)
        else:
            recs[0].append(layout, ws, t)
    return names, ws, recs


def child(variant: str, k: int) -> dict:
    import gc

    import torch

    from _common import peak_rss_mib, reset_peak_rss, rss_mib
    from modeopt.modespace.space import kernels
    from modeopt.blockwise.embedding import embed_block
    from modeopt.decomposition.algorithm import decompose
    from modeopt.trajectories.layout import ParamLayout
    from modeopt.modespace.switch import initial_mode_space
    from modeopt.trajectories.trajectory import Trajectory

    torch.set_num_threads(1)
    names, ws, recs = _recordings(per_tensor=variant == "embed_block")
    recording = sum(r.nbytes for r in recs) / 2**20
    gc.collect()
    reset_peak_rss()
    base = rss_mib()
    if variant == "embed_block":
        init = embed_block(recs, names, ws, [0] * len(ws), 1, n_modes=M, n_samples=k, seed=0)
    else:
        layout = ParamLayout(names, SHAPES)
        data, steps = recs[0].raw()
        d = decompose(Trajectory(data, layout, steps, recs[0].anchor), n_modes=M, n_samples=k, seed=0, progress=False)
        init = initial_mode_space(d, layout, ws, [0] * len(ws), 1, "rms")
        ldt = kernels.label_dtype(M)
        init.labels = [lab.to(ldt) for lab in init.labels]
        init.a = [a.to(torch.bfloat16) for a in init.a]
        del d
    kept = sum(t.numel() * t.element_size() for t in init.a + init.labels) / 2**20
    return {"peak_above_recording_mib": peak_rss_mib() - base, "recording_mib": recording, "kept_mib": kept}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], int(sys.argv[3]))))
        return
    import torch

    from _common import machine, machine_line, save

    torch.set_num_threads(1)  # as in the children (the machine line reports it)

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    rows = []
    for variant, k in (("decompose", 1000), ("decompose", 300), ("embed_block", 1000), ("embed_block", 300)):
        runs = [json.loads(subprocess.run([sys.executable, __file__, "--child", variant, str(k)], env=env, check=True,
                                          capture_output=True, text=True).stdout.strip().splitlines()[-1])
                for _ in range(3)]
        med = statistics.median(r["peak_above_recording_mib"] for r in runs)
        rows.append({"variant": variant, "n_samples": k, "peak_above_recording_mib": med,
                     "runs_mib": [r["peak_above_recording_mib"] for r in runs], "recording_mib": runs[0]["recording_mib"],
                     "kept_mib": runs[0]["kept_mib"]})
        print(f"{variant:12s} K={k:5d}: peak above the recording {med:6.1f} MiB (median of 3; "
              f"recording {runs[0]['recording_mib']:.1f} MiB, mode space kept {runs[0]['kept_mib']:.1f} MiB)")
    m = machine()
    ref = rows[0]["peak_above_recording_mib"]
    md = [f"# Embedding one MiniLM-shaped layer (1,769,472 weights, {T} bf16 snapshots, M = {M})", "",
          f"Machine: {machine_line(m)}. `benchmarks/block_embedding_memory.py`; medians of 3 fresh processes.", "",
          "| path | K | peak above the recording, MiB | / decompose K=1000 | recording MiB | kept (a bf16 + labels) MiB |",
          "|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['variant']} | {r['n_samples']} | {r['peak_above_recording_mib']:.1f} | "
                  f"{r['peak_above_recording_mib'] / ref:.2f} | {r['recording_mib']:.1f} | {r['kept_mib']:.1f} |")
    save("block_embedding_memory", {"machine": m, "rows": rows, "shapes": SHAPES, "T": T, "M": M}, "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
