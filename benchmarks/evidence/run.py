"""Evidence runner: plain training vs. CMDOptimizer vs. peers, same data, model, steps and seeds.

One command per experiment; the experiment is a TOML file in ``benchmarks/evidence/configs/``:

    python benchmarks/evidence/run.py benchmarks/evidence/configs/cnn_mnist.toml
    python benchmarks/evidence/run.py CONFIG --seeds 0 --methods plain cmd_M10   # a subset
    python benchmarks/evidence/run.py CONFIG --report-only                        # re-aggregate

Every (method, seed) runs in its own process (clean step timing and peak memory), and its result
is cached in ``benchmarks/results/evidence/<experiment>/runs/`` so an interrupted experiment resumes.
The experiment's table (JSON + markdown) and plot (accuracy vs. step, switches marked) are written
to ``benchmarks/results/evidence/<experiment>.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
RESULTS = HERE.parent / "results" / "evidence"


def load_config(path: str) -> dict:
    with open(path, "rb") as f:
        cfg = tomllib.load(f)
    names = [m["name"] for m in cfg["methods"]]
    if len(set(names)) != len(names):
        raise SystemExit(f"{path}: method names must be unique, got {names}")
    if "plain" not in names:
        raise SystemExit(f"{path}: an experiment needs a method named 'plain' (the reference)")
    return cfg


def child(path: str, method_name: str, seed: int) -> None:
    import torch

    from methods import run_one
    from tasks import make_task

    torch.set_num_threads(int(os.environ.get("EVIDENCE_THREADS", torch.get_num_threads())))
    cfg = load_config(path)
    method = next(m for m in cfg["methods"] if m["name"] == method_name)
    print("RESULT " + json.dumps(run_one(cfg, make_task(cfg), method, seed)), flush=True)


def run_all(path: str, cfg: dict, seeds: list[int], methods: list[str], force: bool) -> None:
    runs = RESULTS / cfg["name"] / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="131072")
    todo = [(m, s) for s in seeds for m in methods if force or not (runs / f"{m}_s{s}.json").exists()]
    for i, (m, s) in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {cfg['name']}: {m}, seed {s}", flush=True)
        out = subprocess.run([sys.executable, __file__, "--child", path, "--method", m, "--seed", str(s)],
                             stdout=subprocess.PIPE, text=True, env=env)
        line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
        if out.returncode or line is None:
            raise SystemExit(f"{m} seed {s} failed (exit {out.returncode}):\n{out.stdout[-3000:]}")
        (runs / f"{m}_s{s}.json").write_text(line[len("RESULT "):])


def _ms(xs: list[float]) -> str:
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def _acc_at(curve, step: int) -> float:
    return min(curve, key=lambda c: abs(c[0] - step))[1]


def report(cfg: dict) -> None:
    runs_dir = RESULTS / cfg["name"] / "runs"
    runs = [json.loads(p.read_text()) for p in sorted(runs_dir.glob("*.json"))]
    if not runs:
        raise SystemExit(f"no runs in {runs_dir}")
    by = {}
    for r in runs:
        by.setdefault(r["method"], []).append(r)
    plain = {r["seed"]: r for r in by.get("plain", [])}
    order = [m["name"] for m in cfg["methods"] if m["name"] in by]
    desc = {m["name"]: m.get("label", m["name"]) for m in cfg["methods"]}
    lines = [
        f"# {cfg.get('title', cfg['name'])}",
        "",
        cfg.get("description", "").strip(),
        "",
        f"Seeds: {sorted({r['seed'] for r in runs})}; {by['plain'][0]['total_steps'] if 'plain' in by else '?'} steps. "
        "Accuracy on held-out data, mean ± standard deviation over seeds. *Share of gain* = "
        "(final - plain's accuracy at the switch) / (plain's final - plain's accuracy at the switch), same seed. "
        "Step time: median step of the final phase (embedded phase for CMD/DLDR). Each run is one process with "
        f"{os.environ.get('EVIDENCE_THREADS', 'all')} torch thread(s); other jobs may share the machine, so step "
        "times are indicative only (timing claims: docs/performance.md, measured side by side).",
        "",
        f"Machine: {_machine_line()}.",
        "",
        "| method | trainable after switch | final accuracy | best accuracy | share of plain's gain after the switch "
        "| step (ms) | peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    table = {}
    for name in order:
        rs = by[name]
        shares = []
        for r in rs:
            p = plain.get(r["seed"])
            if r["switch_step"] and p:
                base = _acc_at(p["curve"], r["switch_step"])
                if p["final"] - base > 1e-9:
                    shares.append((r["final"] - base) / (p["final"] - base))
        row = {"final": [r["final"] for r in rs], "best": [r["best"] for r in rs], "share": shares,
               "trainable": rs[0]["trainable"], "step_ms": statistics.median(r["step_ms"] for r in rs),
               "peak_mib": statistics.median(r["peak_mib"] for r in rs)}
        table[name] = row
        share = f"{statistics.mean(shares):.0%}" if shares else "-"
        trainable = f"{row['trainable']:,}"
        if rs[0]["kind"] == "gradual":  # it shrinks as tensors freeze: show where it ends
            trainable += f" → {statistics.mean(r['trainable_end'] for r in rs):,.0f}"
        lines.append(f"| {desc[name]} | {trainable} | {_ms(row['final'])} | {_ms(row['best'])} | {share} | "
                     f"{row['step_ms']:.1f} | {row['peak_mib']:.0f} |")
    if "plain" in by and "shadows" in by["plain"][0]:
        sh = by["plain"][0]["shadows"]
        lines += ["", "Shadow models of the plain runs (same runs, no extra training; *best* over the evaluation "
                  "points):", "", "| shadow | final accuracy | best accuracy |", "|---|---|---|",
                  f"| raw weights | {_ms([r['final'] for r in by['plain']])} | {_ms([r['best'] for r in by['plain']])} |"]
        labels = {"ema": f"EMA (decay {cfg.get('ema_decay', 0.995)})", "swa": "SWA (swa_utils)",
                  "online": f"online CMD (M = {cfg.get('online_modes', 10)})"}
        for k in sh:
            if k.endswith("_best"):
                continue
            label = labels.get(k, k.replace("posthoc_M", "post-hoc CMD, M = "))
            best = _ms([r["shadows"][k + "_best"] for r in by["plain"]]) if k + "_best" in sh else "-"
            lines.append(f"| {label} | {_ms([r['shadows'][k] for r in by['plain']])} | {best} |")
            table[f"plain/{k}"] = {"final": [r["shadows"][k] for r in by["plain"]]}
    grad = [n for n in order if by[n][0]["kind"] == "gradual"]
    for name in grad:
        rs = by[name]
        lines += ["", f"{desc[name]}: frozen fraction at the end {_ms([r['frozen_fraction'] for r in rs])}; trainable "
                  f"tensors' weights at the end {statistics.mean(r['trainable_end'] for r in rs):,.0f}; its CMD shadow "
                  f"{_ms([r['shadow_final'] for r in rs])}."]
    notes = cfg.get("notes", "").strip()
    if notes:
        lines += ["", notes]
    md = "\n".join(lines)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{cfg['name']}.md").write_text(md + "\n")
    from _common import machine

    (RESULTS / f"{cfg['name']}.json").write_text(json.dumps({"config": cfg, "machine": machine(), "table": table,
                                                              "runs": runs}, indent=1) + "\n")
    print(md)
    _plot(cfg, by, order, desc)


def _plot(cfg: dict, by: dict, order: list[str], desc: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return
    fig, ax = plt.subplots(figsize=(9, 5))
    colors = plt.cm.tab10.colors
    for i, name in enumerate(order):
        rs = by[name]
        steps = [c[0] for c in rs[0]["curve"]]
        accs = [[r["curve"][j][1] for r in rs if j < len(r["curve"])] for j in range(len(steps))]
        mean = [statistics.mean(a) for a in accs]
        color = "0.2" if name == "plain" else colors[i % 10]
        ax.plot(steps, mean, label=desc[name], color=color, lw=2 if name == "plain" else 1.4)
        if len(rs) > 1:
            ax.fill_between(steps, [min(a) for a in accs], [max(a) for a in accs], color=color, alpha=0.12)
        for sw in rs[0].get("switches") or ([rs[0]["switch_step"]] if rs[0].get("switch_step") else []):
            ax.axvline(sw, color=color, ls=":", lw=1)
    finals = [r["final"] for rs in by.values() for r in rs]
    ax.set_ylim(max(0.0, min(finals) - 0.08), min(1.0, max(finals) + 0.02))
    ax.set(xlabel="training step", ylabel="test accuracy",
           title=f"{cfg.get('title', cfg['name'])}\n(mean over seeds, band = min-max; dotted = switch to mode space)")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{cfg['name']}.png", dpi=110)
    print(f"wrote {RESULTS / (cfg['name'] + '.png')}")


def _machine_line() -> str:
    from _common import machine, machine_line

    m = machine()
    m["torch_threads"] = int(os.environ.get("EVIDENCE_THREADS", m["torch_threads"]))  # the runs' setting
    return machine_line(m)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--methods", nargs="+", default=None)
    ap.add_argument("--force", action="store_true", help="re-run cached (method, seed) results")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.config, args.method, args.seed)
        return
    cfg = load_config(args.config)
    if not args.report_only:
        seeds = args.seeds if args.seeds is not None else list(cfg.get("seeds", [0, 1, 2]))
        methods = args.methods or [m["name"] for m in cfg["methods"]]
        run_all(args.config, cfg, seeds, methods, args.force)
    report(cfg)


if __name__ == "__main__":
    main()
