"""Peak memory of fine-tuning the real MiniLM-L6 (22.7 M weights): plain AdamW vs. CMDOptimizer.

Each configuration runs in its own process. The process's resident high-water mark (Linux VmHWM)
is reset once the phase of interest is in its steady state, then a few steps are run and the new
high-water mark read: the peak of full AdamW steps, and the peak of embedded-phase steps. Also
reported: the baseline (RSS with torch, transformers and the model loaded, before training), so
that "training state" = peak - baseline isolates what the optimizer and backward hold, and the
warm-up recording (formula T * N * itemsize, measured by the optimizer).

    python benchmarks/memory.py       # batch 16 x 64 tokens and batch 1 x 16 tokens, every weight trainable

The children run with glibc's mmap threshold fixed (MALLOC_MMAP_THRESHOLD_=65536): otherwise glibc
raises it after freeing a large block and keeps later frees resident, and RSS would count freed
snapshots and optimizer state as live.

Results: benchmarks/results/memory.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from _common import machine, machine_line, peak_rss_mib, reset_peak_rss, rss_mib, save  # noqa: E402

CONFIGS = {
    "plain": "plain AdamW",
    "cmd10": "CMD AdamW, M = 10",
    "cmd100": "CMD AdamW, M = 100",
    "cmd100_bf16": "CMD AdamW, M = 100, a in bf16",
}


def child(config: str, batch: int, seq: int, steps: int) -> dict:
    import torch

    import modeopt
    from workloads import load_minilm, review_sentiment

    torch.manual_seed(0)
    model, tok = load_minilm()
    texts, labels, *_ = review_sentiment(n_train=batch * 4, n_test=10)
    enc = tok(texts, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
    batches = [({k: v[i:i + batch] for k, v in enc.items()}, labels[i:i + batch]) for i in range(0, len(texts), batch)]
    n = sum(p.numel() for p in model.parameters())
    base = torch.optim.AdamW(model.parameters(), lr=3e-5, weight_decay=0.01)
    warm = 6
    if config == "plain":
        opt = base
    else:
        m = 10 if config == "cmd10" else 100
        opt = modeopt.CMDOptimizer(model, base, n_modes=m, n_samples=max(1000, 30 * m), warmup_steps=warm,
                                   snapshot_every=2, seed=0, progress=False,
                                   coef_dtype=torch.bfloat16 if config.endswith("bf16") else torch.float32)
    baseline = rss_mib()
    recording = 0

    def step(i: int) -> None:
        nonlocal recording
        x, y = batches[i % len(batches)]
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(**x).logits, y).backward()
        opt.step()
        if config != "plain":
            recording = max(recording, opt.recording_bytes)

    for i in range(warm + 2):  # past the switch (CMD) / with the AdamW state allocated (plain)
        step(i)
    warm_peak = peak_rss_mib()
    ok = reset_peak_rss()
    for i in range(steps):
        step(warm + 2 + i)
    out = {
        "config": config, "N": n, "baseline_mib": baseline, "peak_mib": peak_rss_mib(), "reset_ok": ok,
        "warmup_peak_mib": warm_peak, "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    if config != "plain":
        out["phase"] = opt.phase
        out["recording_bytes"] = recording
        out["recording_formula_bytes"] = (warm // 2) * n * 4
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["16x64", "1x16"], help="batch x sequence length")
    ap.add_argument("--batch", type=int, default=16, help=argparse.SUPPRESS)
    ap.add_argument("--seq", type=int, default=64, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS))
    ap.add_argument("--child", default=None)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.batch, args.seq, args.steps)))
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="131072")
    m = machine()
    results, lines = {}, []
    for shape in args.shapes:
        batch, seq = (int(v) for v in shape.split("x"))
        rows = {}
        for c in args.configs:
            out = subprocess.run([sys.executable, __file__, "--child", c, "--batch", str(batch), "--seq", str(seq),
                                  "--steps", str(args.steps)], capture_output=True, text=True, env=env)
            if out.returncode:
                raise SystemExit(f"{c} failed:\n{out.stderr[-3000:]}")
            rows[c] = json.loads(out.stdout.strip().splitlines()[-1])
            r = rows[c]
            print(f"batch {batch} x {seq}: {CONFIGS[c]:32s} peak {r['peak_mib']:7.0f} MiB  baseline "
                  f"{r['baseline_mib']:6.0f}  training state {r['peak_mib'] - r['baseline_mib']:6.0f} MiB")
        results[shape] = rows
        plain = rows.get("plain")
        lines += [
            f"**Batch {batch} x {seq} tokens** (peak RSS over {args.steps} steady-state steps of the phase):",
            "",
            "| configuration | trainable | peak RSS (MiB) | / plain | training state = peak - baseline (MiB) | / plain |",
            "|---|---|---|---|---|---|",
        ]
        for c, r in rows.items():
            st = r["peak_mib"] - r["baseline_mib"]
            rel = f"{r['peak_mib'] / plain['peak_mib']:.2f}" if plain else "-"
            rel_st = f"{st / (plain['peak_mib'] - plain['baseline_mib']):.2f}" if plain else "-"
            lines.append(f"| {CONFIGS[c]} | {r['trainable']:,} | {r['peak_mib']:.0f} | {rel} | {st:.0f} | {rel_st} |")
        lines.append("")
    any_cmd = next((r for rows in results.values() for c, r in rows.items() if c != "plain"), None)
    head = [
        f"Memory of fine-tuning the pretrained MiniLM-L6 ({any_cmd['N']:,} weights, all trainable) with AdamW "
        "(lr 3e-5, wd 0.01): full AdamW vs. CMDOptimizer's embedded phase.",
        f"Machine: {machine_line(m)}.",
        "",
    ]
    if any_cmd:
        lines += [f"Baseline (torch + transformers + the model, before training): {any_cmd['baseline_mib']:.0f} MiB. "
                  f"Warm-up recording: T x N x 4 bytes = {any_cmd['recording_formula_bytes'] / 2**20:.0f} MiB for "
                  f"T = 3 snapshots (measured by the optimizer: {any_cmd['recording_bytes'] / 2**20:.0f} MiB)."]
    md = "\n".join(head + lines)
    print("\n" + md)
    save("memory", {"machine": m, "args": vars(args), "results": results}, md)


if __name__ == "__main__":
    main()
